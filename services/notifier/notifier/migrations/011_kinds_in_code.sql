-- Which kinds of e-mail there are is the notifier's code (email.KINDS), not the schema's: a new
-- kind needs no migration. The column still holds only a kind's name.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_is_a_name
    CHECK (kind ~ '^[a-z][a-z0-9_]{0,39}$');

-- A kind that goes at most once per registration of a person (email.Kind.once) says so on each
-- of its rows; the welcome keeps its own index too (one_welcome_per_registration, which also
-- covers the welcomes recorded before this column).
ALTER TABLE deliveries ADD COLUMN once_per_registration boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX one_per_registration
    ON deliveries (cpf, registered_at, kind) WHERE once_per_registration;
