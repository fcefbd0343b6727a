"""The notifier's retention rules: what the sender process prunes (servicekit.retention).

A settled delivery (sent, cancelled or suppressed) keeps its row, the record of what was sent
to whom, when and why not; its e-mail text (which holds the activation link) is blanked after
DELIVERY_TEXT_RETENTION_DAYS. A failed delivery keeps its text: an operator may send it again.
The development mailbox's e-mails are deleted after MAILBOX_RETENTION_DAYS.
"""

from __future__ import annotations

from servicekit.retention import Rule

from .config import NotifierConfig

SETTLED = "('sent', 'cancelled', 'suppressed')"


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
        Rule(
            "mailbox e-mails",
            config.mailbox_retention_days,
            due="SELECT id FROM mailbox "
            "WHERE received_at < now() - make_interval(secs => %(seconds)s) "
            "AND NOT (id = ANY(%(skip)s)) ORDER BY received_at, id LIMIT %(limit)s",
            prune="DELETE FROM mailbox WHERE id = ANY(%(keys)s) "
            "AND received_at < now() - make_interval(secs => %(seconds)s) RETURNING id",
        ),
    ]
