-- audit.enable(table) and audit.disable(table): attach and detach audit.record_edit().
-- Both run with the caller's privileges, and creating or dropping a trigger needs the table's
-- owner (or the TRIGGER privilege). Calling either twice has the same effect as once.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE audit_proxy_owner;

-- Attaches the audit triggers to target, replacing (and so re-enabling) triggers of the same
-- names.
CREATE OR REPLACE FUNCTION audit.enable(target regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
  IF target = 'audit.edits'::pg_catalog.regclass THEN
    RAISE EXCEPTION 'audit.edits cannot be audited: its trigger would record its own inserts without end';
  END IF;

  -- With this search path, a regclass prints schema-qualified and quoted where needed.
  EXECUTE pg_catalog.format(
    'CREATE OR REPLACE TRIGGER audit_record_edit AFTER INSERT OR UPDATE OR DELETE ON %s '
    'FOR EACH ROW EXECUTE FUNCTION audit.record_edit()', target);
  EXECUTE pg_catalog.format(
    'CREATE OR REPLACE TRIGGER audit_record_truncate AFTER TRUNCATE ON %s '
    'FOR EACH STATEMENT EXECUTE FUNCTION audit.record_edit()', target);
END
$function$;

-- Removes the audit triggers from target. A table without them stays unchanged.
CREATE OR REPLACE FUNCTION audit.disable(target regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
  EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS audit_record_edit ON %s', target);
  EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS audit_record_truncate ON %s', target);
END
$function$;

-- The installer grants EXECUTE to the application roles.
REVOKE ALL ON FUNCTION audit.enable(regclass), audit.disable(regclass) FROM PUBLIC;

RESET ROLE;
