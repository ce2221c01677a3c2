-- Version 5: reusable join tokens (kubeadm style). `node` holds a name pattern when `pattern` is
-- 1; a token may be used `max_uses` times (1: single-use, as before); `uses` counts the joins.
ALTER TABLE join_tokens ADD COLUMN pattern  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE join_tokens ADD COLUMN max_uses INTEGER NOT NULL DEFAULT 1;
ALTER TABLE join_tokens ADD COLUMN uses     INTEGER NOT NULL DEFAULT 0;
UPDATE join_tokens SET uses = 1 WHERE used_at IS NOT NULL;
