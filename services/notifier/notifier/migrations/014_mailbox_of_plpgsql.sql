-- mailbox_of (migration 010) again, the same rule in PL/pgSQL. As an SQL function with a FROM
-- it was never inlined: every statement that inserted a delivery (the index
-- deliveries_by_mailbox) or counted the day's e-mails parsed and planned its body again, a
-- third of the notifier consumer's time in PostgreSQL during a bulk import. A PL/pgSQL body is
-- compiled once per connection. Same results for every input (test_store_plans.py compares the
-- two), so the index is not rebuilt.
CREATE OR REPLACE FUNCTION mailbox_of(address text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    whole text := lower(btrim(address));
    domain text := substring(whole FROM '@([^@]*)$');
    plain text := split_part(substring(whole FROM '^(.*)@[^@]*$'), '+', 1);
BEGIN
    IF domain IS NULL THEN
        RETURN whole;
    ELSIF rtrim(domain, '.') IN ('gmail.com', 'googlemail.com') THEN
        RETURN replace(plain, '.', '') || '@gmail.com';
    END IF;
    RETURN plain || '@' || rtrim(domain, '.');
END
$$;
