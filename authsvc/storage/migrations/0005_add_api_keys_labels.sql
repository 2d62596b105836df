-- Labels: what services want to know about a key besides its scopes (a
-- customer tier, an environment), returned on every Authorize. A JSON object
-- of string values; the application checks names and sizes before writing.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS labels jsonb NOT NULL DEFAULT '{}'::jsonb;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'api_keys_labels_is_object') THEN
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_labels_is_object CHECK (jsonb_typeof(labels) = 'object');
    END IF;
END;
$$;
