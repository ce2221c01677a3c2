-- tapproof control-plane schema, version 1 (SQLite).
CREATE TABLE cas (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT    NOT NULL CHECK (kind IN ('root', 'intermediate')),
    parent_id   INTEGER REFERENCES cas(id),
    cert_pem    TEXT    NOT NULL,
    key_sealed  BLOB    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retired')),
    not_after   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE join_tokens (
    id          TEXT    PRIMARY KEY,
    secret_hash BLOB    NOT NULL,
    node        TEXT    NOT NULL,
    services    TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    created_at  INTEGER NOT NULL
);

CREATE TABLE nodes (
    name        TEXT    PRIMARY KEY,
    spiffe_id   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    last_seen   INTEGER,
    revoked_at  INTEGER
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
    not_before  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    issued_at   INTEGER NOT NULL
);

CREATE TABLE revocations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT    NOT NULL CHECK (kind IN ('node', 'spiffe_id', 'serial')),
    value       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    revoked_at  INTEGER NOT NULL,
    UNIQUE (kind, value)
);

CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    prev_hash   BLOB    NOT NULL,
    hash        BLOB    NOT NULL
);
