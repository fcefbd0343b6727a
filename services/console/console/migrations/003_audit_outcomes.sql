-- An action is recorded before it is taken (phase 'intent'), then with what it did ('done') or
-- how it failed ('failed'), the outcome naming its intent: an action the log could not record
-- does not happen, and one that stopped halfway shows as an intent without an outcome. Views
-- and sign-ins are one row each ('done').
ALTER TABLE audit
    ADD COLUMN phase  text   NOT NULL DEFAULT 'done' CHECK (phase IN ('intent', 'done', 'failed')),
    ADD COLUMN intent bigint REFERENCES audit (id);
-- The failed sign-ins of one client in the last minutes: what the sign-in throttle counts.
CREATE INDEX audit_sign_in_failures ON audit (who, at) WHERE action = 'sign in failed';
