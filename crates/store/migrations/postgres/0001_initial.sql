-- tapproof control-plane schema, version 1 (PostgreSQL).
CREATE TABLE cas (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('root', 'intermediate')),
    parent_id   BIGINT REFERENCES cas(id),
    cert_pem    TEXT    NOT NULL,
    key_sealed  BYTEA    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retired')),
    not_after   BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE join_tokens (
    id          TEXT    PRIMARY KEY,
    secret_hash BYTEA    NOT NULL,
    node        TEXT    NOT NULL,
    services    TEXT    NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE nodes (
    name        TEXT    PRIMARY KEY,
    spiffe_id   TEXT    NOT NULL,
    created_at  BIGINT NOT NULL,
    last_seen   BIGINT,
    revoked_at  BIGINT
);

CREATE TABLE registrations (
    node        TEXT    NOT NULL,
    service     TEXT    NOT NULL,
    PRIMARY KEY (node, service)
);

CREATE TABLE certificates (
    serial      TEXT    PRIMARY KEY,
    spiffe_id   TEXT    NOT NULL,
    node        TEXT    NOT NULL,
    not_before  BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    issued_at   BIGINT NOT NULL
);

CREATE TABLE revocations (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('node', 'spiffe_id', 'serial')),
    value       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    revoked_at  BIGINT NOT NULL,
    UNIQUE (kind, value)
);

CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    prev_hash   BYTEA    NOT NULL,
    hash        BYTEA    NOT NULL
);
