-- E-mails only to the current address: each delivery keeps the version of the person event that
-- recorded it. A view that has applied a later version in which the person is deleted, registered
-- again or has another address cancels it; a view that has not caught up with it (a row lost and
-- an older event applied since) holds it, unsent, until verification repairs the view.
ALTER TABLE deliveries ADD COLUMN version bigint;
