-- Service accounts (client credentials); secrets stored as SHA-256 only.
CREATE TABLE service_accounts (
    id                uuid PRIMARY KEY,
    name              text NOT NULL UNIQUE,
    roles             jsonb NOT NULL,
    secret_hash       bytea NOT NULL,
    created_at        timestamptz NOT NULL,
    secret_rotated_at timestamptz NOT NULL
);
