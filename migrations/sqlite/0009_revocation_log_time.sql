-- As migrations/postgres/0010_revocation_log_time.sql.
CREATE INDEX revocation_log_occurred_at ON revocation_log (occurred_at);
