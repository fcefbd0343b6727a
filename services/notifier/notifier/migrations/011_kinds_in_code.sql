-- Which kinds of e-mail there are is the notifier's code (email.KINDS), not the schema's: a new
-- kind needs no migration. The column still holds only a kind's name.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_is_a_name
    CHECK (kind ~ '^[a-z][a-z0-9_]{0,39}$');
