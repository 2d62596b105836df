-- Defence in depth for the product's promises, whatever code talks to the
-- database: a key's identity and scopes never change, and a revocation is
-- for good.
CREATE FUNCTION api_keys_protect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id <> OLD.id OR NEW.org_id <> OLD.org_id OR NEW.key_hash <> OLD.key_hash
       OR NEW.prefix <> OLD.prefix OR NEW.scopes <> OLD.scopes OR NEW.created_by <> OLD.created_by
       OR NEW.create_time <> OLD.create_time THEN
        RAISE EXCEPTION 'api_keys: id, org_id, key_hash, prefix, scopes, created_by and create_time are immutable';
    END IF;
    IF OLD.revoke_time IS NOT NULL AND (NEW.revoke_time IS DISTINCT FROM OLD.revoke_time
       OR NEW.revoked_by <> OLD.revoked_by OR NEW.revoke_reason <> OLD.revoke_reason) THEN
        RAISE EXCEPTION 'api_keys: a revoked key cannot be changed or un-revoked';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_keys_protect BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_protect();
