-- Every action an operator takes in the console: which key, when, what, on how many messages.
CREATE TABLE audit (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    who      text        NOT NULL,
    action   text        NOT NULL,
    target   text        NOT NULL,
    count    integer     NOT NULL,
    detail   text        NOT NULL DEFAULT ''
);
