-- See migrations/postgres/0007_platform_cooldowns.sql.
CREATE TABLE platform_cooldowns (
    platform TEXT PRIMARY KEY,
    until    TEXT NOT NULL
);
