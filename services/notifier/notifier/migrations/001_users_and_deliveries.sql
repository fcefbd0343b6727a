-- The denormalised user view, version-gated by the person's entity_version.
CREATE TABLE users (
    cpf            text        PRIMARY KEY,
    version        bigint      NOT NULL,
    deleted        boolean     NOT NULL DEFAULT false,
    name           text,
    email          text,
    status         text,
    registered_at  timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The e-mail delivery ledger: the consumer records intents, the sender delivers them.
CREATE TABLE deliveries (
    id                   bigserial   PRIMARY KEY,
    kind                 text        NOT NULL CHECK (kind IN ('welcome', 'activation')),
    cpf                  text        NOT NULL,
    registered_at        timestamptz,
    event_id             uuid        NOT NULL UNIQUE,
    to_email             text        NOT NULL,
    subject              text        NOT NULL,
    html                 text        NOT NULL,
    text                 text        NOT NULL,
    status               text        NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts             integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    claimed_at           timestamptz,
    last_error           text,
    provider             text,
    provider_message_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    sent_at              timestamptz
);
-- One welcome e-mail per registration of a person (a re-registration is a new one).
CREATE UNIQUE INDEX one_welcome_per_registration
    ON deliveries (cpf, registered_at) WHERE kind = 'welcome';
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_by_person ON deliveries (cpf, created_at);

-- The development mailbox: where e-mails go when no SENDGRID_API_KEY is set.
CREATE TABLE mailbox (
    id           bigserial   PRIMARY KEY,
    delivery_id  bigint      NOT NULL UNIQUE REFERENCES deliveries (id),
    to_email     text        NOT NULL,
    from_email   text        NOT NULL,
    subject      text        NOT NULL,
    html         text        NOT NULL,
    text         text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('deliveries', '');
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_notify AFTER INSERT OR UPDATE OF status ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION deliveries_notify();

-- Consumer liveness, read by the API's /ready (the consumer runs in its own process).
CREATE TABLE heartbeats (
    name     text        PRIMARY KEY,
    seen_at  timestamptz NOT NULL
);
