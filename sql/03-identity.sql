-- Reading the identity that the proxy gives each server connection, through two carriers:
--   settings:   the setting pg_audit_proxy.identity contains a JSON object such as
--               {"empnum":"42","fullname":"Ada"}, set with set_config(..., false).
--   temp_table: a temporary table pg_temp.userinfo contains exactly one row.
-- Neither reader raises on any value a client can put into a carrier, so a trigger that reads
-- them never makes the client's statement fail.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE audit_proxy_owner;

-- Regular expression for the settings carrier's value: a flat JSON object whose values are
-- strings, true, false or null. Every text it matches casts to jsonb without error, so the
-- cast needs no exception handler (a subtransaction for every audited row). These do not
-- match: numbers (jsonb rejects some long ones), nested values, and \u escapes other than
-- U+0001..U+001F (jsonb may reject those). Such a value counts as no identity. JSON.stringify
-- output of an object of strings always matches unless a string has an unpaired UTF-16
-- surrogate.
-- NOTE: pg_input_is_valid(value, 'jsonb') would accept more, but it appeared only in
-- PostgreSQL 16 and still raises "stack depth limit exceeded" on deeply nested arrays (checked
-- on 17).
-- IMMUTABLE, so the planner evaluates calls once per plan.
CREATE OR REPLACE FUNCTION audit.identity_json_pattern() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (
  SELECT '^' || ws || '\{' || ws || '(?:' || member || '(?:,' || ws || member || ')*)?\}' || ws || '$'
  FROM (SELECT '[ \t\n\r]*' AS ws,
               '"(?:[^"\\\x01-\x1f]|\\["\\/bfnrt]|\\u00(?:0[1-9a-fA-F]|1[0-9a-fA-F]))*"' AS string) AS token,
       LATERAL (SELECT token.string || token.ws || ':' || token.ws
                       || '(?:' || token.string || '|true|false|null)' || token.ws AS member) AS grammar
);

-- Returns the settings carrier's JSON object, or null when the setting is unset, empty (as it
-- reads after a transaction-local value ends) or not a flat JSON object.
-- The SQL-standard body is parsed at install time, so callers need no USAGE on schema audit.
-- That matters because public.userinfo calls this function with the privileges of the role
-- that reads the view. A body without a subquery lets the planner inline it.
CREATE OR REPLACE FUNCTION audit.settings_identity() RETURNS jsonb
LANGUAGE sql STABLE
RETURN CASE
  WHEN pg_catalog.current_setting('pg_audit_proxy.identity', true) ~ audit.identity_json_pattern()
  THEN pg_catalog.current_setting('pg_audit_proxy.identity', true)::jsonb
END;

-- Returns empnum and fullname from the session's temporary table userinfo when it contains
-- exactly one row, else two nulls. Clients own that table and may have changed it, and this
-- function runs as audit_proxy_owner inside audit.record_edit(), so it reads the table only
-- in ways that cannot run code a client wrote:
--   * only an ordinary table without row-level security (a policy or a view would run the
--     client's expressions);
--   * only columns of built-in types, converted with built-in casts (a cast from a type the
--     client created could call the client's function);
--   * ONLY, so inheritance children are not read.
-- Missing privileges or columns mean no identity, never an error.
CREATE OR REPLACE FUNCTION audit.temp_table_identity(OUT empnum text, OUT fullname text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  -- Object ids below this one belong to objects built into PostgreSQL (FirstNormalObjectId).
  first_user_oid CONSTANT oid := 16384;
  temp_schema oid := pg_catalog.pg_my_temp_schema();
  temp_table oid;
  empnum_type oid;
  fullname_type oid;
  fullname_expression text := 'NULL::pg_catalog.text';
  rows_read integer;
BEGIN
  -- pg_my_temp_schema() is 0 until the session creates its first temporary object.
  IF temp_schema = 0 THEN
    RETURN;
  END IF;

  -- pg_class gives the relation's kind and row security in the same lookup.
  SELECT c.oid INTO temp_table
  FROM pg_catalog.pg_class AS c
  WHERE c.relnamespace = temp_schema
    AND c.relname = 'userinfo'
    AND c.relkind = 'r'
    AND NOT c.relrowsecurity;

  IF temp_table IS NULL
     OR NOT pg_catalog.has_schema_privilege(temp_schema, 'USAGE')
     OR NOT pg_catalog.has_table_privilege(temp_table, 'SELECT') THEN
    RETURN;
  END IF;

  SELECT a.atttypid INTO empnum_type
  FROM pg_catalog.pg_attribute AS a
  WHERE a.attrelid = temp_table AND a.attname = 'empnum' AND a.attnum > 0 AND NOT a.attisdropped;

  SELECT a.atttypid INTO fullname_type
  FROM pg_catalog.pg_attribute AS a
  WHERE a.attrelid = temp_table AND a.attname = 'fullname' AND a.attnum > 0 AND NOT a.attisdropped;

  IF empnum_type IS NULL OR empnum_type >= first_user_oid THEN
    RETURN;
  END IF;
  IF fullname_type IS NOT NULL AND fullname_type < first_user_oid THEN
    fullname_expression := 'u.fullname::pg_catalog.text';
  END IF;

  -- Reading a temporary table makes PostgreSQL refuse PREPARE TRANSACTION for the rest of the
  -- transaction. The lookups above do not.
  EXECUTE 'SELECT pg_catalog.count(*)::integer, pg_catalog.max(r.empnum), pg_catalog.max(r.fullname) '
          'FROM (SELECT u.empnum::pg_catalog.text AS empnum, ' || fullname_expression || ' AS fullname '
          'FROM ONLY pg_temp.userinfo AS u LIMIT 2) AS r'
    INTO rows_read, empnum, fullname;

  IF rows_read <> 1 THEN
    empnum := NULL;
    fullname := NULL;
  END IF;
END
$function$;

REVOKE ALL ON FUNCTION audit.temp_table_identity() FROM PUBLIC;

RESET ROLE;

-- public.userinfo: the identity of the settings carrier under the name that existing triggers
-- read (SELECT fullname, empnum FROM userinfo). It has one row while the setting contains an
-- identity, and none otherwise. With the temp_table carrier, the session's pg_temp.userinfo comes first in
-- the search path and hides this view.
CREATE OR REPLACE VIEW public.userinfo AS
SELECT identity ->> 'empnum' AS empnum,
       identity ->> 'fullname' AS fullname,
       identity
FROM (SELECT audit.settings_identity() AS identity) AS carrier
WHERE identity IS NOT NULL;

GRANT SELECT ON public.userinfo TO PUBLIC;

-- A superuser can give the view to audit_proxy_owner. Another installer can do so only when
-- that role may create objects in schema public, and otherwise keeps the view itself.
DO $install$
BEGIN
  IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = CURRENT_USER)
     OR pg_catalog.has_schema_privilege('audit_proxy_owner', 'public', 'CREATE') THEN
    ALTER VIEW public.userinfo OWNER TO audit_proxy_owner;
  END IF;
END
$install$;
