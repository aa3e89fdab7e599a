-- Service accounts (embedded default); same as
-- migrations/postgres/0005_service_accounts.sql.
CREATE TABLE service_accounts (
    id                BLOB PRIMARY KEY NOT NULL,
    name              TEXT NOT NULL UNIQUE,
    roles             TEXT NOT NULL,
    secret_hash       BLOB NOT NULL,
    created_at        TEXT NOT NULL,
    secret_rotated_at TEXT NOT NULL
);
