-- A platform that answered 429: no replica calls it again before `until`
-- (its Retry-After, or Twitch's Ratelimit-Reset).
CREATE TABLE platform_cooldowns (
    platform text PRIMARY KEY,
    until    timestamptz NOT NULL
);
