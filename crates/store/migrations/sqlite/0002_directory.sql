-- Version 2: where each node's tunnel listener is reached (the service directory), and a change
-- counter the state feed's version comes from.
ALTER TABLE nodes ADD COLUMN tunnel_addr TEXT;

CREATE TABLE changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL
);
