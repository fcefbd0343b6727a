-- A person's pending deliveries, which each applied event looks at to cancel those it no longer
-- calls for (store._APPLY_PERSON). Without it the planner intersected deliveries_by_person with
-- the whole of deliveries_due, a cost that grew with the backlog of pending e-mails (a bulk
-- import made it quadratic).
CREATE INDEX deliveries_pending_by_person ON deliveries (cpf) WHERE status = 'pending';
