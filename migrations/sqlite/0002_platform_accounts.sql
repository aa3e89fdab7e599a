-- Streaming-platform accounts (embedded default); same tables and columns
-- as migrations/postgres/0003_platform_accounts.sql.

CREATE TABLE platform_link_states (
    state_hash    BLOB PRIMARY KEY NOT NULL,
    user_id       BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform      TEXT NOT NULL,
    redirect_uri  TEXT NOT NULL,
    verifier_key  TEXT,
    verifier      BLOB,
    expires_at    TEXT NOT NULL
);
CREATE INDEX platform_link_states_expiry ON platform_link_states (expires_at);

CREATE TABLE platform_accounts (
    user_id             BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform            TEXT NOT NULL,
    platform_user_id    TEXT NOT NULL,
    login               TEXT NOT NULL,
    display_name        TEXT NOT NULL,
    scopes              TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'reauth_required', 'revoked')),
    key_id              TEXT NOT NULL,
    access_token        BLOB NOT NULL,
    refresh_token       BLOB,
    token_expires_at    TEXT,
    token_version       INTEGER NOT NULL,
    refresh_lease_until TEXT,
    validated_at        TEXT,
    connected_at        TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    PRIMARY KEY (user_id, platform),
    UNIQUE (platform, platform_user_id)
);
CREATE INDEX platform_accounts_expiry ON platform_accounts (platform, token_expires_at) WHERE status = 'active';

CREATE TABLE webhook_messages (
    source      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX webhook_messages_age ON webhook_messages (received_at);
