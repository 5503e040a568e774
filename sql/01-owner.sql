-- Owner role and schema of the audit trail.
--
-- Every file in sql/ runs in one transaction, in name order (src/sql-install.ts), and may run
-- again on an installed database without changing it. All names are schema-qualified, and the
-- search path below keeps objects that other roles created in public out of name resolution.

SET LOCAL search_path = pg_catalog, pg_temp;

DO $install$
BEGIN
  -- CREATE OR REPLACE TRIGGER (used by audit.enable) and SQL-standard function bodies
  -- appeared in PostgreSQL 14.
  IF pg_catalog.current_setting('server_version_num')::integer < 140000 THEN
    RAISE EXCEPTION 'pg-audit-proxy needs PostgreSQL 14 or later, but this server runs %',
      pg_catalog.current_setting('server_version');
  END IF;

  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'audit_proxy_owner') THEN
    BEGIN
      CREATE ROLE audit_proxy_owner NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      -- Roles are shared by all databases of a cluster, and an install into another database
      -- created this one after the check above.
      NULL;
    END;
  END IF;

  -- The owner of the audit trail must not be able to log in, because a session acting as it
  -- can rewrite audit.edits.
  IF (SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = 'audit_proxy_owner') THEN
    ALTER ROLE audit_proxy_owner NOLOGIN;
  END IF;

  -- The next files create objects under SET ROLE audit_proxy_owner, which a superuser may
  -- always do and any other role only as a member. From PostgreSQL 16 a membership may lack
  -- the SET option: a CREATEROLE role gets such a membership in each role it creates.
  BEGIN
    IF pg_catalog.current_setting('server_version_num')::integer >= 160000 THEN
      IF NOT pg_catalog.pg_has_role('audit_proxy_owner', 'SET') THEN
        -- EXECUTE because PostgreSQL 14 and 15 cannot parse the WITH clause.
        EXECUTE 'GRANT audit_proxy_owner TO CURRENT_USER WITH SET TRUE';
      END IF;
    ELSIF NOT pg_catalog.pg_has_role('audit_proxy_owner', 'MEMBER') THEN
      GRANT audit_proxy_owner TO CURRENT_USER;
    END IF;
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'role % may not act as audit_proxy_owner and may not grant itself that role',
      CURRENT_USER
      USING ERRCODE = 'insufficient_privilege',
            HINT = pg_catalog.format('Run the install as a superuser, or have one run: '
                                     'GRANT audit_proxy_owner TO %I WITH ADMIN OPTION', CURRENT_USER);
  END;

  IF NOT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'audit') THEN
    CREATE SCHEMA audit AUTHORIZATION audit_proxy_owner;
  ELSIF (SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'audit')
        <> 'audit_proxy_owner'::pg_catalog.regrole THEN
    RAISE EXCEPTION 'schema audit already exists and is owned by %, not by audit_proxy_owner',
      (SELECT nspowner::pg_catalog.regrole FROM pg_catalog.pg_namespace WHERE nspname = 'audit')
      USING HINT = 'If it holds an earlier pg-audit-proxy install, run ALTER SCHEMA audit OWNER TO '
                   'audit_proxy_owner; otherwise rename that schema.';
  END IF;
END
$install$;

SET LOCAL ROLE audit_proxy_owner;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;
RESET ROLE;
