-- The daily cap (EMAILS_PER_ADDRESS_PER_DAY) counts e-mails per mailbox, not per spelling of an
-- address: letter case and a `+tag` are ignored everywhere, and at Gmail (gmail.com and its
-- alias googlemail.com) so are the dots of the local part, which Gmail delivers to one inbox.
-- 'Victim+1@GMAIL.com', 'v.i.c.t.i.m@googlemail.com' and 'victim@gmail.com' are one mailbox;
-- 'ana.maria@corp.example' and 'anamaria@corp.example' are two (elsewhere a dot is a letter).
CREATE FUNCTION mailbox_of(address text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN a.domain IS NULL THEN a.whole
        WHEN rtrim(a.domain, '.') IN ('gmail.com', 'googlemail.com')
            THEN replace(a.plain, '.', '') || '@gmail.com'
        ELSE a.plain || '@' || rtrim(a.domain, '.')
    END
    FROM (
        SELECT lower(btrim(address)) AS whole,
               substring(lower(btrim(address)) FROM '@([^@]*)$') AS domain,
               split_part(substring(lower(btrim(address)) FROM '^(.*)@[^@]*$'), '+', 1) AS plain
    ) AS a
$$;

CREATE INDEX deliveries_by_mailbox ON deliveries (mailbox_of(to_email), created_at);
DROP INDEX deliveries_by_address;  -- 006's, by lower(to_email): the cap no longer asks it

-- E-mails recorded before this version were composed with the name as it came (email.py now
-- leaves out any name that is not plainly one). One still to be sent or retried whose text holds
-- a second link or an address is cancelled, never sent: the person can ask for a new link, which
-- is composed under the new rule.
UPDATE deliveries
SET status = 'cancelled',
    last_error = 'cancelled: composed with a link or an address from the name (before migration 010)'
WHERE status IN ('pending', 'failed') AND (text LIKE '%://%://%' OR text LIKE '%@%');
