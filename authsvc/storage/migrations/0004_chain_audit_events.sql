-- Tamper evidence for the audit trail: each organization's events form a
-- hash chain, computed here in the database so that no code path (ours,
-- an older replica's during a rolling upgrade, a hand-written INSERT) can
-- add an unchained row.
--
--   hash = sha256(prev_hash || convert_to(canonical, 'UTF8'))
--   canonical = jsonb_build_array(id, time, org_id, actor_user_id, actor_role,
--                                 caller, action, key_id, outcome, detail)::text
--
-- with time as 'YYYY-MM-DDTHH:MM:SS.ffffffZ' in UTC and SQL NULLs as JSON
-- null (jsonb's text form is canonical: one spelling per value, object keys
-- sorted). The first event of an organization chains onto 32 zero bytes.
--
-- audit_chains holds, per organization, the head (the last event's hash,
-- which the next event chains onto) and the anchor (the prev_hash of the
-- first event still stored: zeros until pruning removes the oldest events).
-- Its row lock serialises inserts per organization; under REPEATABLE READ
-- or SERIALIZABLE a concurrent insert fails with a serialization error
-- rather than forking the chain. Ids are drawn after that lock, so within
-- an organization id order is chain order.
--
-- caller: the admin token's name or the client certificate identity behind
-- the call, once a later change fills it in.

ALTER TABLE audit_events
    ADD COLUMN caller    text,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash      bytea;

CREATE TABLE audit_chains (
    org_id      text PRIMARY KEY,
    head_id     bigint,
    head_hash   bytea NOT NULL,
    anchor_hash bytea NOT NULL,
    pruned_through_id bigint,
    CONSTRAINT audit_chains_hashes_are_sha256 CHECK (octet_length(head_hash) = 32 AND octet_length(anchor_hash) = 32)
);

CREATE FUNCTION audit_event_hash(
    prev_hash bytea, id bigint, occurred_at timestamptz, org_id text, actor_user_id text, actor_role text,
    caller text, action text, key_id uuid, outcome text, detail jsonb
) RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(prev_hash || convert_to(jsonb_build_array(
        id,
        to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        org_id, actor_user_id, actor_role, caller, action, key_id::text, outcome, detail
    )::text, 'UTF8'))
$$;

CREATE FUNCTION audit_events_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    INSERT INTO audit_chains (org_id, head_hash, anchor_hash)
        VALUES (NEW.org_id, decode(repeat('00', 32), 'hex'),
                decode(repeat('00', 32), 'hex'))
        ON CONFLICT (org_id) DO NOTHING;
    SELECT head_hash INTO previous FROM audit_chains WHERE org_id = NEW.org_id FOR UPDATE;
    NEW.id := nextval(pg_get_serial_sequence('audit_events', 'id'));
    NEW.prev_hash := previous;
    NEW.hash := audit_event_hash(previous, NEW.id, NEW.occurred_at, NEW.org_id, NEW.actor_user_id, NEW.actor_role,
                                 NEW.caller, NEW.action, NEW.key_id, NEW.outcome, NEW.detail);
    UPDATE audit_chains SET head_id = NEW.id, head_hash = NEW.hash WHERE org_id = NEW.org_id;
    RETURN NEW;
END;
$$;

-- Backfill: chain the events already stored, per organization in id order.
-- The table lock keeps an old replica from inserting meanwhile.
LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE;
DO $$
DECLARE
    event record;
    previous bytea;
    current_org text;
BEGIN
    FOR event IN SELECT * FROM audit_events ORDER BY org_id, id LOOP
        IF current_org IS DISTINCT FROM event.org_id THEN
            IF current_org IS NOT NULL THEN
                INSERT INTO audit_chains (org_id, head_id, head_hash, anchor_hash)
                    VALUES (current_org, (SELECT max(id) FROM audit_events WHERE org_id = current_org), previous,
                            decode(repeat('00', 32), 'hex'));
            END IF;
            current_org := event.org_id;
            previous := decode(repeat('00', 32), 'hex');
        END IF;
        UPDATE audit_events SET prev_hash = previous,
            hash = audit_event_hash(previous, event.id, event.occurred_at, event.org_id, event.actor_user_id,
                                    event.actor_role, event.caller, event.action, event.key_id, event.outcome,
                                    event.detail)
            WHERE id = event.id
            RETURNING hash INTO previous;
    END LOOP;
    IF current_org IS NOT NULL THEN
        INSERT INTO audit_chains (org_id, head_id, head_hash, anchor_hash)
            VALUES (current_org, (SELECT max(id) FROM audit_events WHERE org_id = current_org), previous,
                    decode(repeat('00', 32), 'hex'));
    END IF;
END;
$$;

ALTER TABLE audit_events
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL;

CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_chain();
-- The trigger draws the id (after the chain's lock); a default would draw a second one.
ALTER TABLE audit_events ALTER COLUMN id DROP DEFAULT;

-- verify walks each chain in id order; prune deletes each chain's oldest events.
CREATE INDEX audit_events_org_id ON audit_events (org_id, id);
