-- Bulk imports belong to the API key that made them (its digest; '' where keys are off): the
-- Idempotency-Key is scoped to it, and another key's import is not found.
ALTER TABLE imports ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE imports DROP CONSTRAINT imports_idempotency_key_key;
ALTER TABLE imports ADD CONSTRAINT imports_owner_idempotency_key_key UNIQUE (owner, idempotency_key);
CREATE INDEX imports_queued_by_owner ON imports (owner) WHERE status <> 'done';
