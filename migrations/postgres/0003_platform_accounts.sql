-- Streaming-platform accounts: link states, linked accounts with sealed
-- tokens, and webhook message ids (replay protection).

-- A started link, single-use, keyed by the SHA-256 of its state.
CREATE TABLE platform_link_states (
    state_hash    bytea PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform      text NOT NULL,
    redirect_uri  text NOT NULL,
    verifier_key  text,                             -- vault key id
    verifier      bytea,                            -- sealed PKCE verifier
    expires_at    timestamptz NOT NULL
);
CREATE INDEX platform_link_states_expiry ON platform_link_states (expires_at);

CREATE TABLE platform_accounts (
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform            text NOT NULL,
    platform_user_id    text NOT NULL,
    login               text NOT NULL,
    display_name        text NOT NULL,
    scopes              jsonb NOT NULL,
    status              text NOT NULL CHECK (status IN ('active', 'reauth_required', 'revoked')),
    key_id              text NOT NULL,              -- vault key that sealed both tokens
    access_token        bytea NOT NULL,             -- sealed (XChaCha20-Poly1305)
    refresh_token       bytea,                      -- sealed; none for Facebook
    token_expires_at    timestamptz,
    token_version       bigint NOT NULL,
    refresh_lease_until timestamptz,
    validated_at        timestamptz,
    connected_at        timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    PRIMARY KEY (user_id, platform),
    -- One platform account belongs to at most one user.
    UNIQUE (platform, platform_user_id)
);
CREATE INDEX platform_accounts_expiry ON platform_accounts (platform, token_expires_at) WHERE status = 'active';

CREATE TABLE webhook_messages (
    source      text NOT NULL,
    message_id  text NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX webhook_messages_age ON webhook_messages (received_at);
