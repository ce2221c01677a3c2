-- Version 3: the policy document (which identities may open which service), one row.
CREATE TABLE policy (
    id          BIGINT  PRIMARY KEY CHECK (id = 1),
    document    TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL
);
