-- The console's sessions, server-side (console/sessions.py): the browser's cookie holds a random
-- token, this table the token's HMAC under CONSOLE_SECRET (never the token itself). Signing out
-- deletes the row; a session also ends at expires_at, or when it has not been seen for the idle
-- time.
CREATE TABLE sessions (
    id          text        PRIMARY KEY,
    data        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);
