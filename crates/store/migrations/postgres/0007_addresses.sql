-- Version 7: where clients reach each registered service (ADDR:PORT, comma-separated, sorted), as
-- the node's agent announces it: the destinations other agents capture (capture.directory).
ALTER TABLE registrations ADD COLUMN addresses TEXT NOT NULL DEFAULT '';
