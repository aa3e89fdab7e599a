-- Grants still to be revoked at their platform: a deleted user's linked
-- accounts move here, sealed tokens and all, in the transaction that
-- deletes the user. Each row stays until the platform has answered the
-- revocation (or answered that the grant is already dead); then the row
-- goes and `platform_disconnected` is written, in one transaction.
CREATE TABLE platform_grant_revocations (
    user_id          uuid NOT NULL,
    platform         text NOT NULL,
    queued_at        timestamptz NOT NULL,
    platform_user_id text NOT NULL,
    scopes           jsonb NOT NULL,
    key_id           text NOT NULL,              -- vault key that sealed both tokens
    access_token     bytea NOT NULL,             -- sealed, as in platform_accounts
    refresh_token    bytea,
    token_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,       -- also the claim: a replica trying it moves this ahead
    PRIMARY KEY (user_id, platform, queued_at)
);
CREATE INDEX platform_grant_revocations_due ON platform_grant_revocations (next_attempt_at);
