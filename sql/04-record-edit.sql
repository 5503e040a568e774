-- The trigger function that writes audit.edits. audit.enable(table) attaches it.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE audit_proxy_owner;

-- Returns whether to_jsonb() on rows runs only code that a superuser installed. For a value of
-- a type created in the database, to_jsonb() calls the function of a cast from that type to
-- json (seen on PostgreSQL 15 and 17), and the owner of a type may create such a cast. Inside
-- audit.record_edit() that function would run as audit_proxy_owner and could rewrite
-- audit.edits. Casts to jsonb count here too, in case some release calls those. Casts whose
-- function a superuser owns (PostGIS has some) are trusted.
-- PL/pgSQL rather than SQL because PL/pgSQL keeps the queries' plans for the session, and this
-- runs for every audited row.
CREATE OR REPLACE FUNCTION audit.json_casts_are_trusted() RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
  -- The usual case, no such cast at all, takes one small query. With the owner check joined
  -- in, a call took about 20 times as long (measured on PostgreSQL 17).
  IF NOT EXISTS (
    SELECT
    FROM pg_catalog.pg_cast AS c
    WHERE c.castsource >= 16384::pg_catalog.oid
      AND c.casttarget IN ('pg_catalog.json'::pg_catalog.regtype, 'pg_catalog.jsonb'::pg_catalog.regtype)
  ) THEN
    RETURN true;
  END IF;

  RETURN NOT EXISTS (
    SELECT
    FROM pg_catalog.pg_cast AS c
    JOIN pg_catalog.pg_proc AS p ON p.oid = c.castfunc
    JOIN pg_catalog.pg_roles AS r ON r.oid = p.proowner
    WHERE c.castsource >= 16384::pg_catalog.oid
      AND c.casttarget IN ('pg_catalog.json'::pg_catalog.regtype, 'pg_catalog.jsonb'::pg_catalog.regtype)
      AND NOT r.rolsuper
  );
END
$function$;

-- Returns row_value as a jsonb object of its columns' text forms (strings or null), made with
-- the types' output functions only. For the types a non-superuser can create (enum, domain,
-- composite, range) those functions are built into PostgreSQL. audit.record_edit() uses this
-- in place of to_jsonb() while an untrusted cast to json exists, so numbers and booleans then
-- appear as strings.
CREATE OR REPLACE FUNCTION audit.row_to_text_object(row_value anyelement, relation oid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  names text[];
  value_expressions text;
  result jsonb;
BEGIN
  SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum),
         pg_catalog.string_agg(
           pg_catalog.format(
             'CASE WHEN pg_catalog.num_nulls(($1).%1$I) = 1 THEN NULL ELSE pg_catalog.format(''%%s'', ($1).%1$I) END',
             a.attname),
           ', ' ORDER BY a.attnum)
    INTO names, value_expressions
  FROM pg_catalog.pg_attribute AS a
  WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped;

  IF names IS NULL THEN
    RETURN '{}'::jsonb;
  END IF;

  EXECUTE 'SELECT pg_catalog.jsonb_object($2, ARRAY[' || value_expressions || ']::pg_catalog.text[])'
    INTO result
    USING row_value, names;
  RETURN result;
END
$function$;

-- Records one audit.edits row for each inserted, updated or deleted row (AFTER ... FOR EACH
-- ROW) and one for each TRUNCATE (AFTER TRUNCATE FOR EACH STATEMENT).
-- SECURITY DEFINER because applications may not write audit.edits themselves. The identity
-- comes from the settings carrier, else from the temp_table carrier. Without one, the row is
-- recorded as unattributed under session_user. Nothing here raises on client-controlled
-- input, and there is no exception handler, which would cost a subtransaction per row.
CREATE OR REPLACE FUNCTION audit.record_edit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  settings_claims jsonb := audit.settings_identity();
  identity_empnum text := settings_claims ->> 'empnum';
  identity_fullname text := settings_claims ->> 'fullname';
  old_row jsonb;
  new_row jsonb;
  changed_columns text[];
BEGIN
  IF identity_empnum IS NULL OR identity_empnum = '' THEN
    SELECT t.empnum, t.fullname INTO identity_empnum, identity_fullname
    FROM audit.temp_table_identity() AS t;
  END IF;
  -- An identity without an empnum counts as no identity.
  IF identity_empnum = '' THEN
    identity_empnum := NULL;
  END IF;
  IF identity_empnum IS NULL THEN
    identity_fullname := NULL;
  END IF;

  IF TG_LEVEL = 'ROW' THEN
    IF audit.json_casts_are_trusted() THEN
      IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := pg_catalog.to_jsonb(OLD);
      END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := pg_catalog.to_jsonb(NEW);
      END IF;
    ELSE
      IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := audit.row_to_text_object(OLD, TG_RELID);
      END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := audit.row_to_text_object(NEW, TG_RELID);
      END IF;
    END IF;

    IF TG_OP = 'UPDATE' THEN
      -- Compared as jsonb text so that a change of numeric scale (1.0 to 1.00) counts.
      SELECT COALESCE(pg_catalog.array_agg(a.attname::text ORDER BY a.attnum), '{}')
        INTO changed_columns
      FROM pg_catalog.pg_attribute AS a
      WHERE a.attrelid = TG_RELID
        AND a.attnum > 0
        AND NOT a.attisdropped
        AND (old_row -> a.attname::text)::text IS DISTINCT FROM (new_row -> a.attname::text)::text;
    END IF;
  END IF;

  INSERT INTO audit.edits
    (tablename, username, fullname, action, old, new, changed,
     query, txid, recorded, db_user, attributed)
  VALUES
    (pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME),
     COALESCE(identity_empnum, SESSION_USER),
     identity_fullname,
     pg_catalog.left(TG_OP, 1),
     old_row,
     new_row,
     changed_columns,
     pg_catalog.current_query(),
     pg_catalog.txid_current(),
     pg_catalog.now(),
     SESSION_USER,
     identity_empnum IS NOT NULL);

  RETURN NULL;
END
$function$;

REVOKE ALL ON FUNCTION audit.json_casts_are_trusted() FROM PUBLIC;
REVOKE ALL ON FUNCTION audit.row_to_text_object(anyelement, oid) FROM PUBLIC;

RESET ROLE;
