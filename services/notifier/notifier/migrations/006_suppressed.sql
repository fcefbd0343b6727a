-- E-mails past EMAILS_PER_ADDRESS_PER_DAY to one address are recorded as suppressed, not sent.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_status_check
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled', 'suppressed'));
CREATE INDEX deliveries_by_address ON deliveries (lower(to_email), created_at);
