-- Rotation: a rotated key names its successor (rotated_to) and the successor
-- its predecessor (rotated_from). A key with rotated_to set is in its grace
-- period until its expire_time and no longer counts toward the org's
-- active-key limit.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rotated_to uuid;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rotated_from uuid;

-- Defence in depth, whatever code talks to the database: a rotation is for
-- good (rotated_to and rotated_from never change once set), and a rotated
-- key's grace period can only be shortened, never extended.
CREATE OR REPLACE FUNCTION api_keys_protect_rotation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.rotated_from IS DISTINCT FROM OLD.rotated_from
       OR (OLD.rotated_to IS NOT NULL AND NEW.rotated_to IS DISTINCT FROM OLD.rotated_to) THEN
        RAISE EXCEPTION 'api_keys: a rotation cannot be changed or undone';
    END IF;
    IF NEW.rotated_to IS NOT NULL AND (NEW.expire_time IS NULL
       OR (OLD.rotated_to IS NOT NULL AND NEW.expire_time > OLD.expire_time)) THEN
        RAISE EXCEPTION 'api_keys: a rotated key''s grace period cannot be extended';
    END IF;
    RETURN NEW;
END;
$$;

-- Only for statements that set these columns: the frequent last_used_time
-- flushes and revocations never run it.
DROP TRIGGER IF EXISTS api_keys_protect_rotation ON api_keys;
CREATE TRIGGER api_keys_protect_rotation BEFORE UPDATE OF expire_time, rotated_to, rotated_from ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_protect_rotation();
