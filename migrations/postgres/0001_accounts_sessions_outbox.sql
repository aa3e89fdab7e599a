-- Accounts, refresh-token sessions and the transactional outbox.

CREATE TABLE users (
    id            uuid PRIMARY KEY,                 -- UUIDv7
    email         text NOT NULL UNIQUE,             -- normalised lower-case
    username      text NOT NULL UNIQUE,             -- normalised lower-case
    password_hash text NOT NULL,                    -- argon2id PHC string
    roles         jsonb NOT NULL,                   -- sorted array of role names
    status        text NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- One row per refresh-token family (one login).
CREATE TABLE sessions (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at          timestamptz NOT NULL,
    absolute_expires_at timestamptz NOT NULL,
    revoked_at          timestamptz,
    revoked_reason      text
);
CREATE INDEX sessions_live_by_user ON sessions (user_id) WHERE revoked_at IS NULL;

-- Refresh tokens are stored as SHA-256 hashes only.
CREATE TABLE refresh_tokens (
    token_hash      bytea PRIMARY KEY,
    session_id      uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL,
    idle_expires_at timestamptz NOT NULL,
    used_at         timestamptz
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- Written in the same transaction as the change it records.
CREATE TABLE outbox (
    id           uuid PRIMARY KEY,                  -- event id, UUIDv7
    event_type   text NOT NULL,
    user_id      uuid,
    occurred_at  timestamptz NOT NULL,
    payload      jsonb NOT NULL,
    traceparent  text,
    attempts     integer NOT NULL DEFAULT 0,
    lease_until  timestamptz,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
