-- Retention (person/retention.py): finished imports found by age without reading the table.
CREATE INDEX imports_finished ON imports (finished_at, id) WHERE status = 'done';
