-- Version 9: per-handshake records (issue 15): every tunnel handshake an agent accepted, dialled
-- or refused, shipped with its coverage reports. A record is named by (node, at_ms, seq), so an
-- upload sent twice stores it once. `grp` is the key-exchange group (GROUP is a keyword).
CREATE TABLE handshakes (
    node             TEXT    NOT NULL,
    at_ms            BIGINT  NOT NULL,
    seq              BIGINT  NOT NULL,
    side             TEXT    NOT NULL,
    local_addr       TEXT    NOT NULL,
    remote_addr      TEXT    NOT NULL,
    local_id         TEXT    NOT NULL,
    local_serial     TEXT    NOT NULL,
    peer_id          TEXT,
    peer_serial      TEXT,
    tls_version      TEXT,
    cipher           TEXT,
    grp              TEXT,
    signature_scheme TEXT,
    resumed          BOOLEAN NOT NULL,
    outcome          TEXT    NOT NULL,
    reason           TEXT,
    received_at      BIGINT  NOT NULL,
    PRIMARY KEY (node, at_ms, seq)
);
CREATE INDEX handshakes_at ON handshakes (at_ms);
