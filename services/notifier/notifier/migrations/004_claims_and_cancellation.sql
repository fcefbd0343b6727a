-- A claim is owned by the worker that made it: results are recorded only by that worker, so a
-- late answer cannot undo another worker's 'sent'. A deletion cancels what is still pending.
ALTER TABLE deliveries ADD COLUMN claim_token uuid;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_status_check
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled'));
