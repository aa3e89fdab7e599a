-- Accounts, refresh-token sessions and the transactional outbox (embedded
-- default). Same tables and columns as migrations/postgres; UUIDs are 16-byte
-- blobs, times RFC 3339 text, JSON is text.

CREATE TABLE users (
    id            BLOB PRIMARY KEY NOT NULL,
    email         TEXT NOT NULL UNIQUE,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    roles         TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE sessions (
    id                  BLOB PRIMARY KEY NOT NULL,
    user_id             BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at          TEXT NOT NULL,
    absolute_expires_at TEXT NOT NULL,
    revoked_at          TEXT,
    revoked_reason      TEXT
);
CREATE INDEX sessions_live_by_user ON sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    token_hash      BLOB PRIMARY KEY NOT NULL,
    session_id      BLOB NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at      TEXT NOT NULL,
    idle_expires_at TEXT NOT NULL,
    used_at         TEXT
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE outbox (
    id           BLOB PRIMARY KEY NOT NULL,
    event_type   TEXT NOT NULL,
    user_id      BLOB,
    occurred_at  TEXT NOT NULL,
    payload      TEXT NOT NULL,
    traceparent  TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  TEXT,
    published_at TEXT
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
