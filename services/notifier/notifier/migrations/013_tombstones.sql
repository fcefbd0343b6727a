-- Retention (notifier/retention.py): the tombstones (deleted people) found by age without
-- reading the whole view.
CREATE INDEX users_tombstones ON users (updated_at, cpf) WHERE deleted;
