-- Who called, as authsvc authenticated it: the admin token's or client
-- certificate's configured name (NULL while management is unprotected).
-- actor_user_id is only what the calling service asserted.
-- IF NOT EXISTS: the audit hash-chain migration adds the same column.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS caller text;
