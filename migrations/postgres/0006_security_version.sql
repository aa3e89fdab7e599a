-- Every security change of an account (password, status, roles, "revoke all
-- sessions") bumps its security version in the same transaction. Session
-- creation, refresh rotation and device-token trust are conditional on the
-- version the request read, so a request that raced a change cannot leave a
-- session behind it.
ALTER TABLE users ADD COLUMN security_version bigint NOT NULL DEFAULT 0;
