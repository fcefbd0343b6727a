CREATE TABLE person (
    cpf            text        PRIMARY KEY CHECK (cpf ~ '^[0-9]{1,14}$'),
    name           text        NOT NULL,
    address        text        NOT NULL,
    date_of_birth  date        NOT NULL,
    email          text,
    status         text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'active')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Incomes, assets and debts: one table, one entity type per kind in the event stream.
CREATE TABLE item (
    id          uuid          PRIMARY KEY,
    cpf         text          NOT NULL REFERENCES person (cpf),
    kind        text          NOT NULL CHECK (kind IN ('income', 'asset', 'debt')),
    type        text,
    value       numeric(17, 2) NOT NULL CHECK (value >= 0),
    created_at  timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX item_by_person ON item (cpf, kind, created_at);
