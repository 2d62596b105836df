-- Defence in depth for "a timestamp reads back as the instant that was
-- written": asyncpg turns datetime.max/min into infinity/-infinity and back,
-- and one such expire_time once made every ListKeys and GetKey of its
-- organization fail. The service refuses those values before writing
-- (authsvc.validation.timestamp); this makes sure no code path can store one.
--
-- Rows written before this check get the finite value that means the same,
-- so the constraint can be added without stranding a database that already
-- holds one: an infinite expiry is no expiry, -infinity expired at creation,
-- and an infinite last_used_time is forgotten (the next use sets it again).
UPDATE api_keys SET expire_time = NULL WHERE expire_time = 'infinity';
UPDATE api_keys SET expire_time = create_time WHERE expire_time = '-infinity';
UPDATE api_keys SET last_used_time = NULL WHERE NOT isfinite(last_used_time);

ALTER TABLE api_keys ADD CONSTRAINT api_keys_timestamps_finite CHECK (
    isfinite(create_time)
    AND (expire_time IS NULL OR isfinite(expire_time))
    AND (revoke_time IS NULL OR isfinite(revoke_time))
    AND (last_used_time IS NULL OR isfinite(last_used_time))
);
