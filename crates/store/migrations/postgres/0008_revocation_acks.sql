-- Version 8: revocation propagation. `version` is the state-feed version of the first document
-- that carried the revocation (NULL until one did); `revocation_acks` records when each node
-- applied it (the node asked the feed again with `since` at or past that version, which an agent
-- does only after applying the document's revocations).
ALTER TABLE revocations ADD COLUMN version BIGINT;
CREATE TABLE revocation_acks (
    revocation_id BIGINT NOT NULL REFERENCES revocations (id),
    node          TEXT   NOT NULL,
    applied_at    BIGINT NOT NULL,
    PRIMARY KEY (revocation_id, node)
);
