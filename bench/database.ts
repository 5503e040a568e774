// The benchmark's PostgreSQL side: the database, its application role and pgbench tables,
// resets between runs, the audit checks, and stopping the embedded server.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';

import pg from 'pg';

import { installSql } from '../src/sql-install.ts';
import type { EmbeddedPostgres } from '../test/helpers/postgres.ts';
import { runCommand } from './processes.ts';
import type { AuditCheck, SessionGroup } from './report.ts';

export const DATABASE = 'bench';
export const APP_ROLE = 'bench_app';
const PGBENCH_INIT_TIMEOUT_MS = 600_000;

/** Reads the server's process id from the first line of postmaster.pid in its data directory. */
export async function readPostmasterPid(server: EmbeddedPostgres): Promise<number> {
  const file = path.join(server.dataDir, 'postmaster.pid');
  const text = await fs.readFile(file, 'utf8');
  const pid = Number.parseInt(text, 10);
  if (!Number.isInteger(pid) || pid <= 0) {
    throw new Error(`no process id on the first line of ${file}`);
  }
  return pid;
}

/**
 * Stops the embedded server and removes its files. Ctrl-C in a terminal also reaches the
 * server, which then shuts down by itself, and EmbeddedPostgres.stop() would wait for an exit
 * that already happened, so a server that is gone only has its files removed.
 */
export async function destroyEmbeddedPostgres(server: EmbeddedPostgres): Promise<void> {
  const pid = await readPostmasterPid(server).catch(() => null);
  let running = false;
  if (pid !== null) {
    try {
      process.kill(pid, 0);
      running = true;
    } catch {
      running = false;
    }
  }
  if (running) {
    await server.destroy();
  } else {
    await fs.rm(server.runDir, { recursive: true, force: true });
  }
}

/**
 * Copies process.env without the variables whose names start with `prefix`, plus `extra`.
 * With the prefix PG, only the libpq settings given here reach pgbench.
 */
export function environmentWithout(prefix: string, extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith(prefix)) {
      env[name] = value;
    }
  }
  return { ...env, ...extra };
}

export function pgbenchEnvironment(password: string): NodeJS.ProcessEnv {
  return environmentWithout('PG', { PGPASSWORD: password, PGCONNECT_TIMEOUT: '10' });
}

export interface Database {
  server: EmbeddedPostgres;
  appPassword: string;
  /** Runs `work` with a superuser connection to the benchmark database. */
  asSuperuser<T>(work: (client: pg.Client) => Promise<T>): Promise<T>;
}

async function connectAsSuperuser(server: EmbeddedPostgres, database: string): Promise<pg.Client> {
  const client = new pg.Client({
    host: server.host,
    port: server.port,
    user: server.superuser,
    password: server.superuserPassword,
    database,
    connectionTimeoutMillis: 10_000,
  });
  client.on('error', () => {});
  await client.connect();
  return client;
}

/**
 * Creates the application role with a SCRAM password, a database it owns, the pgbench tables
 * (then handed to the role, as an application would own its tables) and the audit schema.
 */
export async function prepareDatabase(
  server: EmbeddedPostgres,
  options: { scale: number; countStatements: boolean },
  progress: (line: string) => void,
): Promise<Database> {
  const { scale } = options;
  const appPassword = randomBytes(18).toString('base64url');

  const admin = await connectAsSuperuser(server, 'postgres');
  try {
    await admin.query(`CREATE ROLE ${APP_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD ${pg.escapeLiteral(appPassword)}`);
    await admin.query(`CREATE DATABASE ${DATABASE} OWNER ${APP_ROLE} TEMPLATE template0`);
  } finally {
    await admin.end();
  }

  progress(`initializing pgbench tables, scale ${scale}...`);
  const init = await runCommand(
    'pgbench',
    ['-i', '-q', '-s', String(scale), '-h', server.host, '-p', String(server.port), '-U', server.superuser, DATABASE],
    pgbenchEnvironment(server.superuserPassword),
    PGBENCH_INIT_TIMEOUT_MS,
  );
  if (init.exitCode !== 0) {
    throw new Error(`pgbench -i failed with exit status ${init.exitCode}${init.timedOut ? ' (timed out)' : ''}:\n${init.stderr.trim()}`);
  }

  const asSuperuser = async <T>(work: (client: pg.Client) => Promise<T>): Promise<T> => {
    const client = await connectAsSuperuser(server, DATABASE);
    try {
      return await work(client);
    } finally {
      await client.end();
    }
  };

  await asSuperuser(async (client) => {
    for (const table of ['pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history']) {
      await client.query(`ALTER TABLE ${table} OWNER TO ${APP_ROLE}`);
    }
  });

  progress('installing the audit schema (sql/)...');
  const url = new URL('postgres://');
  url.hostname = server.host;
  url.port = String(server.port);
  url.pathname = `/${DATABASE}`;
  url.username = encodeURIComponent(server.superuser);
  url.password = encodeURIComponent(server.superuserPassword);
  await installSql({ databaseUrl: url.toString(), appRoles: [APP_ROLE] });
  if (options.countStatements) {
    await asSuperuser((client) => client.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements'));
  }

  return { server, appPassword, asSuperuser };
}

/**
 * Gives every run the same starting point: empties pgbench_history and audit.edits, vacuums
 * the pgbench tables and writes a checkpoint.
 */
export async function resetBetweenRuns(database: Database, countStatements: boolean): Promise<void> {
  await database.asSuperuser(async (client) => {
    await client.query('TRUNCATE pgbench_history, audit.edits');
    await client.query('VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history');
    await client.query('CHECKPOINT');
    if (countStatements) {
      await client.query('SELECT pg_stat_statements_reset()');
    }
  });
}

/** Top-level statements that pg_stat_statements counted in the benchmark database since its reset. */
export async function countStatements(database: Database): Promise<number> {
  return database.asSuperuser(async (client) => {
    const result = await client.query<{ calls: string }>(
      `SELECT coalesce(sum(calls), 0) AS calls FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())`,
    );
    return Number(result.rows[0].calls);
  });
}

export async function setAuditTrigger(database: Database, enabled: boolean): Promise<void> {
  const statement = enabled ? "SELECT audit.enable('pgbench_accounts')" : "SELECT audit.disable('pgbench_accounts')";
  await database.asSuperuser((client) => client.query(statement));
}

/** Counts the audit rows of the last run, and those that carry the identity `empnum` and `fullname`. */
export async function checkAuditRows(database: Database, empnum: string, fullname: string): Promise<AuditCheck> {
  return database.asSuperuser(async (client) => {
    const history = await client.query<{ count: string }>('SELECT count(*) FROM pgbench_history');
    const audit = await client.query<{ total: string; attributed: string; of_token: string }>(
      `SELECT count(*) AS total,
              count(*) FILTER (WHERE attributed) AS attributed,
              count(*) FILTER (WHERE attributed AND username = $1 AND fullname = $2) AS of_token
         FROM audit.edits WHERE tablename = 'public.pgbench_accounts'`,
      [empnum, fullname],
    );
    const row = audit.rows[0];
    return {
      historyRows: Number(history.rows[0].count),
      auditRows: Number(row.total),
      attributedRows: Number(row.attributed),
      rowsOfTokenIdentity: Number(row.of_token),
    };
  });
}

/** Groups the other sessions of the benchmark database by state, wait event and query. */
export async function readSessions(database: Database): Promise<SessionGroup[]> {
  return database.asSuperuser(async (client) => {
    const result = await client.query<{ state: string | null; wait_event: string | null; query: string; count: string }>(
      `SELECT state, wait_event_type || ':' || wait_event AS wait_event, left(query, 120) AS query, count(*) AS count
         FROM pg_catalog.pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_catalog.pg_backend_pid()
        GROUP BY 1, 2, 3 ORDER BY 4 DESC`,
    );
    return result.rows.map((row) => ({ state: row.state, waitEvent: row.wait_event, query: row.query, count: Number(row.count) }));
  });
}
