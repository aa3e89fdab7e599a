-- The revocation log behind WatchRevocations (embedded default); same
-- tables as migrations/postgres/0004_revocation_log.sql.
CREATE TABLE revocation_seq (
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO revocation_seq (id, n) VALUES (1, 0);

CREATE TABLE revocation_log (
    seq         INTEGER PRIMARY KEY NOT NULL,
    event_id    BLOB NOT NULL,
    event_type  TEXT NOT NULL,
    user_id     BLOB,
    occurred_at TEXT NOT NULL,
    payload     TEXT NOT NULL
);
