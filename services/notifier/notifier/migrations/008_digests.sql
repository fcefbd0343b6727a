-- Verification (messaging.verification): each user row keeps its bucket and its contribution to
-- the bucket's digest (messaging.digests), written with the row; the view's digests are summed
-- from them, so a row deleted by hand is missing from the sum. Existing rows get theirs here.
ALTER TABLE users ADD COLUMN bucket integer;
ALTER TABLE users ADD COLUMN contribution bigint;
UPDATE users SET bucket = (('x' || substr(encode(sha256(convert_to('person' || ':' || cpf, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint % 1024),
    contribution = (('x' || substr(encode(sha256(convert_to('person' || ':' || cpf || ':' || version::text, 'UTF8')), 'hex'), 1, 13))::bit(52)::bigint);
CREATE INDEX users_bucket ON users (bucket);
-- The buckets the last check found differing: "two checks in a row", whichever replica checks.
CREATE TABLE verification (
    name       text  PRIMARY KEY,
    divergent  jsonb NOT NULL
);
