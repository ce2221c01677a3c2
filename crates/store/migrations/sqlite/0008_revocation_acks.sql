-- Version 8: revocation propagation. `version` is the state-feed version of the first document
-- that carried the revocation (NULL until one did); `revocation_acks` records when each node
-- applied it (the node asked the feed again with `since` at or past that version, which an agent
-- does only after applying the document's revocations).
ALTER TABLE revocations ADD COLUMN version INTEGER;
CREATE TABLE revocation_acks (
    revocation_id INTEGER NOT NULL REFERENCES revocations (id),
    node          TEXT    NOT NULL,
    applied_at    INTEGER NOT NULL,
    PRIMARY KEY (revocation_id, node)
);
