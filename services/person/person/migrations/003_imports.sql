-- Bulk registration (POST /person/bulk): an import, its stored items and its failed items.
CREATE TABLE imports (
    id               uuid        PRIMARY KEY,
    idempotency_key  text        UNIQUE,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'running', 'done')),
    total            integer     NOT NULL CHECK (total >= 0),
    processed        integer     NOT NULL DEFAULT 0,
    succeeded        integer     NOT NULL DEFAULT 0,
    failed           integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- What the importer claims next: the oldest import not done.
CREATE INDEX imports_unfinished ON imports (created_at, id) WHERE status <> 'done';

-- The payload, one row per item (COPY fills it); deleted when the import is done. Text, not
-- jsonb: an item is stored as received (jsonb refuses \u0000) and validated by the importer.
CREATE TABLE import_items (
    import_id  uuid    NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    idx        integer NOT NULL,
    item       text    NOT NULL,
    PRIMARY KEY (import_id, idx)
);

-- One row per failed item: its index in the payload and its reasons per field (JSON text).
CREATE TABLE import_failures (
    import_id  uuid    NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    idx        integer NOT NULL,
    errors     text    NOT NULL,
    PRIMARY KEY (import_id, idx)
);
