-- A delivery records the intent (its kind, the address, the name to greet, the registration) and
-- the sender composes the e-mail when it sends it (notifier/email.py): the e-mail text and its
-- activation link are no longer stored in the ledger, and a link is signed when it goes out.
-- Rows recorded before keep their text and are sent as they are.
ALTER TABLE deliveries ADD COLUMN name text;
ALTER TABLE deliveries ALTER COLUMN html DROP NOT NULL, ALTER COLUMN text DROP NOT NULL;
-- Retention (notifier/retention.py): the settled deliveries that still keep the name they greet,
-- found by age without reading the whole table.
CREATE INDEX deliveries_name_kept ON deliveries (created_at, id)
    WHERE name IS NOT NULL AND status IN ('sent', 'cancelled', 'suppressed');
