-- Wake senders only when a statement leaves a delivery pending: the claim's own UPDATE (to
-- 'sending', or matching nothing) used to notify too, so an idle sender woke itself forever.
DROP TRIGGER IF EXISTS deliveries_notify ON deliveries;
CREATE OR REPLACE FUNCTION deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE status = 'pending') THEN
        PERFORM pg_notify('deliveries', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_notify_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION deliveries_notify();
CREATE TRIGGER deliveries_notify_update AFTER UPDATE ON deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION deliveries_notify();

-- The claim looks only at open deliveries: without this it walks past every one ever sent.
CREATE INDEX deliveries_open ON deliveries (id) WHERE status IN ('pending', 'sending');
