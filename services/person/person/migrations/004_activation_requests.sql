-- When the last activation e-mail was asked for: another is refused (429) for
-- ACTIVATION_RESEND_SECONDS after it, or after the registration.
ALTER TABLE person ADD COLUMN activation_requested_at timestamptz;
