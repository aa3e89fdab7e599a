-- Every commit that writes outbox rows wakes the relays listening on the
-- channel `auth_outbox`, in any process or replica. NOTIFY is delivered at
-- commit (never for a rolled-back transaction) and identical notifications of
-- one transaction fold into one. The relays' idle poll remains the backstop
-- for a notification missed while a listener reconnects.
CREATE FUNCTION auth_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('auth_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION auth_outbox_notify();
