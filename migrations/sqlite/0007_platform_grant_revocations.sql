-- See migrations/postgres/0008_platform_grant_revocations.sql.
CREATE TABLE platform_grant_revocations (
    user_id          BLOB NOT NULL,
    platform         TEXT NOT NULL,
    queued_at        TEXT NOT NULL,
    platform_user_id TEXT NOT NULL,
    scopes           TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    access_token     BLOB NOT NULL,
    refresh_token    BLOB,
    token_expires_at TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    PRIMARY KEY (user_id, platform, queued_at)
);
CREATE INDEX platform_grant_revocations_due ON platform_grant_revocations (next_attempt_at);
