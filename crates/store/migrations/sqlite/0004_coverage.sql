-- Version 4: coverage reports from agents (the audit), kept as history.
CREATE TABLE coverage (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    node         TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    links        INTEGER NOT NULL,
    encrypted    INTEGER NOT NULL,
    plaintext    INTEGER NOT NULL,
    report       TEXT    NOT NULL
);
CREATE INDEX coverage_node_at ON coverage (node, at);
CREATE INDEX coverage_at ON coverage (at);
