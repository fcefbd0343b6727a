-- The trace context of the event that recorded an e-mail: the send continues its trace.
ALTER TABLE deliveries ADD COLUMN trace_context text;
