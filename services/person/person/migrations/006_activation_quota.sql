-- Activation e-mails each API key asked for (POST /person/<cpf>/activation), per UTC day: past
-- ACTIVATION_REQUESTS_PER_KEY_PER_DAY a key is refused (429) until the next day. A key keeps the
-- row of its current day only. key_digest is the SHA-256 of the key ('' where keys are off).
CREATE TABLE activation_quota (
    key_digest  text    NOT NULL,
    day         date    NOT NULL,
    requests    integer NOT NULL,
    PRIMARY KEY (key_digest, day)
);
