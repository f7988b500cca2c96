-- API gateway: usage bookkeeping must not look like an edit of a key.
--
-- The gateway records api_keys.last_used_at in batches; with the trigger of 0001 firing on every
-- UPDATE, each batch would also move updated_at, which is meant to say when the key itself
-- (hash, name, tier, state) last changed. The trigger now fires only for those columns.
DROP TRIGGER api_keys_touch_updated_at ON api_keys;
CREATE TRIGGER api_keys_touch_updated_at
    BEFORE UPDATE OF key_hash, key_prefix, name, tier, is_active, revoked_at ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tokvel_touch_updated_at();

-- `tokvel keys revoke/rotate/set-tier` name a key by its display prefix as well as by its id.
CREATE INDEX idx_api_keys_prefix ON api_keys (key_prefix);
