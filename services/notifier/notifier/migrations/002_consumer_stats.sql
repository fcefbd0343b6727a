-- The consumer's statistics, written with its heartbeat, read by the API's /metrics.
ALTER TABLE heartbeats ADD COLUMN stats jsonb;
