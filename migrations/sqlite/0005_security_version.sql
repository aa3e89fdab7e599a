-- See migrations/postgres/0006_security_version.sql.
ALTER TABLE users ADD COLUMN security_version INTEGER NOT NULL DEFAULT 0;
