-- Why a grant waits for revocation: its user was deleted, or the user
-- disconnected the account while the platform did not answer (either way
-- `platform_disconnected` carries it once the platform has answered).
ALTER TABLE platform_grant_revocations ADD COLUMN reason text NOT NULL DEFAULT 'user_deleted';
