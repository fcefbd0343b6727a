-- Retention (notifier/retention.py): the settled deliveries that still keep their e-mail text,
-- and the development mailbox, each found by age without reading the whole table.
CREATE INDEX deliveries_text_kept ON deliveries (created_at, id)
    WHERE html <> '' AND status IN ('sent', 'cancelled', 'suppressed');
CREATE INDEX mailbox_by_age ON mailbox (received_at, id);
