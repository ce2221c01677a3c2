-- Version 4: coverage reports from agents (the audit), kept as history.
CREATE TABLE coverage (
    id           BIGSERIAL PRIMARY KEY,
    node         TEXT      NOT NULL,
    at           BIGINT    NOT NULL,
    links        BIGINT    NOT NULL,
    encrypted    BIGINT    NOT NULL,
    plaintext    BIGINT    NOT NULL,
    report       TEXT      NOT NULL
);
CREATE INDEX coverage_node_at ON coverage (node, at);
CREATE INDEX coverage_at ON coverage (at);
