-- An activation request that arrives before its registration's first event carries the welcome
-- too: one event may record two e-mails, so "once per event" is per (event, kind).
ALTER TABLE deliveries DROP CONSTRAINT deliveries_event_id_key;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_event_id_kind_key UNIQUE (event_id, kind);
