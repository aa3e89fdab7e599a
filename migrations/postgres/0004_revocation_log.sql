-- The revocation log behind WatchRevocations: every revocation-type event,
-- numbered in commit order. The number comes from a one-row counter updated
-- in the writing transaction, so concurrent revocations serialise on that row
-- and a reader that has seen N has seen everything below N.
CREATE TABLE revocation_seq (
    id integer PRIMARY KEY CHECK (id = 1),
    n  bigint NOT NULL
);
INSERT INTO revocation_seq (id, n) VALUES (1, 0);

CREATE TABLE revocation_log (
    seq         bigint PRIMARY KEY,
    event_id    uuid NOT NULL,
    event_type  text NOT NULL,
    user_id     uuid,
    occurred_at timestamptz NOT NULL,
    payload     jsonb NOT NULL
);
