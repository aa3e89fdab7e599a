-- The edge deny map (src/edge) starts from the first row of the last access
-- token lifetime, found by time; the retention purge deletes by time too.
CREATE INDEX revocation_log_occurred_at ON revocation_log (occurred_at);
