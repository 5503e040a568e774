// Installs the audit schema from sql/ into one database, idempotently.

import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import pg from 'pg';

export interface InstallSqlOptions {
  /**
   * URL of the target database, for a superuser or for a role with CREATEROLE and the CREATE
   * privilege on the database and on schema public. The install creates the role
   * audit_proxy_owner if missing and makes the installing role a member.
   */
  databaseUrl: string;
  /** Roles that applications log in as. An empty list means the database's owner. */
  appRoles: string[];
  /** Receives one line per step and per warning. */
  log?: (line: string) => void;
}

/** Takes the transaction-level advisory lock that serializes installs into one database. */
const INSTALL_LOCK_SQL = "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('pg_audit_proxy.sql_install', 0))";
const CONNECT_TIMEOUT_MS = 10_000;
const OWNER_ROLE = 'audit_proxy_owner';

/**
 * Runs the sql/*.sql files in name order in one transaction, then grants application roles
 * read access to audit.edits and the right to call audit.enable and audit.disable. Re-running
 * it leaves an installed database as it was. Errors name the file or step that failed.
 */
export async function installSql(options: InstallSqlOptions): Promise<void> {
  const log = options.log ?? (() => {});
  const sqlDir = findSqlDir();
  const files = (await fs.readdir(sqlDir)).filter((name) => name.endsWith('.sql')).sort();
  if (files.length === 0) {
    throw new Error(`sql install failed: no .sql files found in ${sqlDir}`);
  }

  const client = new pg.Client({
    connectionString: options.databaseUrl,
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    application_name: 'pg-audit-proxy sql install',
  });
  // A connection lost between queries makes the next query fail. Without a listener, the
  // 'error' event would also crash the process.
  client.on('error', () => {});

  try {
    await client.connect();
  } catch (error) {
    const missingPassword = /client password must be a (non-empty )?string/.test(errorMessage(error));
    const hint = missingPassword ? ' (the server requires a password: put it in the URL or set PGPASSWORD)' : '';
    throw new Error(`sql install failed: could not connect to the database: ${errorMessage(error)}${hint}`, {
      cause: error,
    });
  }

  try {
    await client.query('BEGIN');
    await client.query(INSTALL_LOCK_SQL);

    for (const file of files) {
      log(`sql install: running ${file}`);
      const text = await fs.readFile(path.join(sqlDir, file), 'utf8');
      try {
        await client.query(text);
      } catch (error) {
        throw new Error(`sql install failed in ${path.join(sqlDir, file)}${lineSuffix(text, error)}: ${errorMessage(error)}`, {
          cause: error,
        });
      }
    }

    const appRoles = options.appRoles.length > 0 ? options.appRoles : [await databaseOwner(client)];
    // As the owner of the audit objects, so that an installer that is not a superuser may grant.
    await client.query(`SET LOCAL ROLE ${OWNER_ROLE}`);
    for (const role of appRoles) {
      await grantToAppRole(client, role, log);
    }
    await client.query('RESET ROLE');

    await client.query('COMMIT');
    log(`sql install: done, application roles: ${appRoles.join(', ')}`);
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    await client.end().catch(() => {});
  }
}

async function databaseOwner(client: pg.Client): Promise<string> {
  const result = await client.query<{ owner: string }>(
    'SELECT pg_catalog.pg_get_userbyid(datdba) AS owner FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()',
  );
  const owner = result.rows[0]?.owner;
  if (owner === undefined) {
    throw new Error('sql install failed: could not find the owner of the current database');
  }
  return owner;
}

/**
 * Grants `role` what applications need and revokes write access to audit.edits that an
 * earlier manual grant may have given. Warns when the role could still change audit rows.
 */
async function grantToAppRole(client: pg.Client, role: string, log: (line: string) => void): Promise<void> {
  const found = await client.query<{ rolsuper: boolean; owner_member: boolean }>(
    `SELECT rolsuper, pg_catalog.pg_has_role(oid, $2, 'MEMBER') AS owner_member
       FROM pg_catalog.pg_roles WHERE rolname = $1`,
    [role, OWNER_ROLE],
  );
  const info = found.rows[0];
  if (info === undefined) {
    throw new Error(`sql install failed: application role ${JSON.stringify(role)} does not exist: create it first or pass another --app-role`);
  }

  const quoted = pg.escapeIdentifier(role);
  const statements = [
    `GRANT USAGE ON SCHEMA audit TO ${quoted}`,
    `GRANT SELECT ON TABLE audit.edits TO ${quoted}`,
    `REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON TABLE audit.edits FROM ${quoted}`,
    `GRANT EXECUTE ON FUNCTION audit.enable(regclass), audit.disable(regclass) TO ${quoted}`,
  ];
  for (const statement of statements) {
    try {
      await client.query(statement);
    } catch (error) {
      throw new Error(`sql install failed while granting to application role ${role} (${statement}): ${errorMessage(error)}`, {
        cause: error,
      });
    }
  }

  if (info.rolsuper) {
    log(`sql install: warning: application role ${role} is a superuser and can change or delete audit rows`);
  } else if (info.owner_member) {
    log(`sql install: warning: application role ${role} is a member of ${OWNER_ROLE} and can change or delete audit rows`);
  }
}

/** Finds sql/ next to package.json, from src/ when run with tsx and from dist/src/ when built. */
function findSqlDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(path.join(dir, 'package.json')) && existsSync(path.join(dir, 'sql'))) {
      return path.join(dir, 'sql');
    }
    const parent = path.dirname(dir);
    if (parent === dir) {
      throw new Error(`sql install failed: no sql/ directory found above ${fileURLToPath(import.meta.url)}`);
    }
    dir = parent;
  }
}

/** Returns " (line N)" for an error whose position points into `text`, else "". */
function lineSuffix(text: string, error: unknown): string {
  const position = Number((error as { position?: string }).position);
  if (!Number.isInteger(position) || position < 1) {
    return '';
  }
  const line = text.slice(0, position - 1).split('\n').length;
  return ` (line ${line})`;
}

/** Formats a pg error with its SQLSTATE, detail, hint and PL/pgSQL context where present. */
function errorMessage(error: unknown): string {
  if (!(error instanceof Error)) {
    return String(error);
  }
  const fields = error as { code?: unknown; detail?: unknown; hint?: unknown; where?: unknown };
  let message = error.message;
  if (typeof fields.code === 'string') {
    message += ` (SQLSTATE ${fields.code})`;
  }
  if (typeof fields.detail === 'string') {
    message += `; detail: ${fields.detail}`;
  }
  if (typeof fields.hint === 'string') {
    message += `; hint: ${fields.hint}`;
  }
  if (typeof fields.where === 'string') {
    message += `; context: ${fields.where.replaceAll('\n', ' / ')}`;
  }
  return message;
}
