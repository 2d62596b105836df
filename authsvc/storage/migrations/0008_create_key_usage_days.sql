-- Per-key daily Authorize counts for GetKeyUsage: one row per key and UTC
-- day that had calls. Written only by the usage batcher, which adds each
-- process's counts for a flush interval in the same statement that moves
-- last_used_time, so Authorize never waits on it. Rows outlive revocation
-- and expiry (keys are never deleted), so a key keeps its history.
CREATE TABLE key_usage_days (
    key_id       uuid NOT NULL,
    day          date NOT NULL,
    allowed      bigint NOT NULL DEFAULT 0,
    denied       bigint NOT NULL DEFAULT 0,
    rate_limited bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
