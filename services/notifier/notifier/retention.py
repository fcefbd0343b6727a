"""The notifier's retention rules: what the sender process prunes (servicekit.retention).

A settled delivery (sent, cancelled or suppressed) keeps its row, the record of what was sent
to whom, when and why not, but not what it said after DELIVERY_TEXT_RETENTION_DAYS: since
migration 015 a delivery records an intent (the sender composes the e-mail) and the name it
greets is forgotten then; one recorded before has its text (which holds the activation link)
blanked then. A failed delivery keeps both: an operator may send it again.
The development mailbox's e-mails are deleted after MAILBOX_RETENTION_DAYS.

A deleted person's row (a tombstone: it keeps a late event from bringing the person back, and
cancels a delivery still due) is deleted TOMBSTONE_RETENTION_DAYS after the deletion was
applied, unless a delivery of theirs may still go (pending, sending, or failed: an operator may
retry it, and the tombstone cancels it then); docs/guarantees.md says why that is safe.
"""

from __future__ import annotations

from servicekit.retention import Rule

from .config import NotifierConfig

SETTLED = "('sent', 'cancelled', 'suppressed')"

# A tombstone applied longer ago than the retention, of a person none of whose deliveries may
# still be sent (the tombstone is what cancels those).
_TOMBSTONE_DUE = """u.updated_at < now() - make_interval(secs => %(seconds)s)
    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.cpf = u.cpf
                    AND d.status IN ('pending', 'sending', 'failed'))"""


def rules(config: NotifierConfig) -> list[Rule]:
    return [
        Rule(
            "delivery e-mail texts",
            config.delivery_text_retention_days,
            due=f"SELECT id FROM deliveries WHERE html <> '' AND status IN {SETTLED} "
            "AND created_at < now() - make_interval(secs => %(seconds)s) "
            "AND NOT (id = ANY(%(skip)s)) ORDER BY created_at, id LIMIT %(limit)s",
            prune=f"UPDATE deliveries SET html = '', text = '' WHERE id = ANY(%(keys)s) "
            f"AND html <> '' AND status IN {SETTLED} "
            "AND created_at < now() - make_interval(secs => %(seconds)s) RETURNING id",
        ),
        Rule(  # a delivery recorded since migration 015 holds the name it greets instead
            "delivery names",
            config.delivery_text_retention_days,
            due=f"SELECT id FROM deliveries WHERE name IS NOT NULL AND status IN {SETTLED} "
            "AND created_at < now() - make_interval(secs => %(seconds)s) "
            "AND NOT (id = ANY(%(skip)s)) ORDER BY created_at, id LIMIT %(limit)s",
            prune=f"UPDATE deliveries SET name = NULL WHERE id = ANY(%(keys)s) "
            f"AND name IS NOT NULL AND status IN {SETTLED} "
            "AND created_at < now() - make_interval(secs => %(seconds)s) RETURNING id",
        ),
        Rule(
            "mailbox e-mails",
            config.mailbox_retention_days,
            due="SELECT id FROM mailbox "
            "WHERE received_at < now() - make_interval(secs => %(seconds)s) "
            "AND NOT (id = ANY(%(skip)s)) ORDER BY received_at, id LIMIT %(limit)s",
            prune="DELETE FROM mailbox WHERE id = ANY(%(keys)s) "
            "AND received_at < now() - make_interval(secs => %(seconds)s) RETURNING id",
        ),
        Rule(
            "tombstones",
            config.tombstone_retention_days,
            due=f"SELECT cpf FROM users u WHERE deleted AND {_TOMBSTONE_DUE} "
            "AND NOT (cpf = ANY(%(skip)s)) ORDER BY updated_at, cpf LIMIT %(limit)s",
            prune=f"DELETE FROM users u WHERE cpf = ANY(%(keys)s) AND deleted AND {_TOMBSTONE_DUE} "
            "RETURNING cpf",
        ),
    ]
