-- See migrations/postgres/0009_grant_revocation_reason.sql.
ALTER TABLE platform_grant_revocations ADD COLUMN reason TEXT NOT NULL DEFAULT 'user_deleted';
