-- API keys. Only the SHA-256 of a key is stored (key_hash); the secret never is.
CREATE TABLE api_keys (
    id             uuid PRIMARY KEY,
    org_id         text NOT NULL,
    name           text NOT NULL,
    prefix         text NOT NULL,
    key_hash       bytea NOT NULL,
    scopes         text[] NOT NULL,
    created_by     text NOT NULL,
    create_time    timestamptz NOT NULL,
    expire_time    timestamptz,
    revoke_time    timestamptz,
    revoked_by     text NOT NULL DEFAULT '',
    revoke_reason  text NOT NULL DEFAULT '',
    last_used_time timestamptz,
    rate_limit     integer NOT NULL DEFAULT 0,
    CONSTRAINT api_keys_key_hash_unique UNIQUE (key_hash),
    CONSTRAINT api_keys_key_hash_is_sha256 CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_scopes_not_empty CHECK (cardinality(scopes) > 0)
);

-- ListKeys: newest first within an org; also serves the active-key count.
CREATE INDEX api_keys_org_create_time ON api_keys (org_id, create_time DESC, id DESC);
