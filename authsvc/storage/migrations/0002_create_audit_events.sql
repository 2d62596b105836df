-- One row per management call: who did what to which key, when, and why.
CREATE TABLE audit_events (
    id            bigserial PRIMARY KEY,
    occurred_at   timestamptz NOT NULL DEFAULT now(),
    org_id        text NOT NULL,
    actor_user_id text NOT NULL,
    actor_role    text NOT NULL,
    action        text NOT NULL,
    key_id        uuid,
    outcome       text NOT NULL,
    detail        jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX audit_events_org_occurred_at ON audit_events (org_id, occurred_at DESC);
