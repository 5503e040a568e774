// `npm run bench`: pgbench against an embedded PostgreSQL, directly, through a bare Node.js
// socket pipe and through the proxy, on 127.0.0.1 only. Prints a table on stdout, progress on
// stderr, and writes the same results to .tmp/bench-results.json. See bench/README.md.
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { stringify as toYaml } from 'yaml';

import { startEmbeddedPostgres } from '../test/helpers/postgres.ts';
import {
  APP_ROLE,
  checkAuditRows,
  countStatements,
  DATABASE,
  destroyEmbeddedPostgres,
  environmentWithout,
  pgbenchEnvironment,
  prepareDatabase,
  readPostmasterPid,
  readSessions,
  resetBetweenRuns,
  setAuditTrigger,
  type Database,
} from './database.ts';
import { parsePgbenchOutput } from './pgbench.ts';
import {
  clockTicksPerSecond,
  readCpuSeconds,
  readMachineProcessCpuTicks,
  readPeakRssKiB,
  readProcessTreeCpuTicks,
  runCommand,
  Service,
  stopAllChildren,
  stopSpawning,
} from './processes.ts';
import {
  PROXY_ROUTES,
  proxyName,
  renderReport,
  WORKLOAD_TITLES,
  type BenchmarkReport,
  type Carrier,
  type ProxyReport,
  type Route,
  type RunResult,
  type SessionGroup,
  type Workload,
} from './report.ts';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PROXY_BIN = path.join(REPO_ROOT, 'bin', 'pg-audit-proxy.js');
const SOCKET_PIPE_SCRIPT = path.join(REPO_ROOT, 'bench', 'socket-pipe.ts');
const RESULTS_FILE = path.join(REPO_ROOT, '.tmp', 'bench-results.json');

const DEFAULT_SECONDS = 15;
const QUICK_SECONDS = 5;
const DEFAULT_POOL_SIZE = 16;
const DEFAULT_SCALE = 10;
const CLIENTS = 16;
const THREADS = 2;

const TOKEN_SUBJECT = 'bench-user';
const TOKEN_NAME = 'Bench User';

/**
 * Server settings for the runs, on top of the test helper's, which already turn off fsync,
 * synchronous_commit and full_page_writes. The scale-10 database fits in shared_buffers, and
 * autovacuum is off because the benchmark vacuums before every run.
 */
const POSTGRES_SETTINGS: Record<string, string> = {
  shared_buffers: '256MB',
  autovacuum: 'off',
};
/** Settings read back from the server for the report. */
const REPORTED_SETTINGS = [
  'fsync',
  'synchronous_commit',
  'full_page_writes',
  'shared_buffers',
  'autovacuum',
  'max_connections',
  'shared_preload_libraries',
];

const SERVICE_START_TIMEOUT_MS = 30_000;
/** How long a run may exceed its duration before pgbench is killed, for example when a client hangs. */
const PGBENCH_GRACE_MS = 60_000;

const USAGE = `Usage: npm run bench -- [--seconds N | --quick] [--pool-size N] [--scale N] [--count-statements]

  --seconds N         duration of each pgbench run in seconds (default ${DEFAULT_SECONDS}, or BENCH_SECONDS)
  --quick             ${QUICK_SECONDS}-second runs, to check that everything works
  --pool-size N       server connections in the proxy's full pool (default ${DEFAULT_POOL_SIZE}); the small
                      pool has half as many
  --scale N           pgbench scale factor, 100,000 accounts each (default ${DEFAULT_SCALE})
  --count-statements  load pg_stat_statements and report the server's statements per transaction
                      (adds its overhead to every run)`;

interface Options {
  seconds: number;
  poolSize: number;
  scale: number;
  countStatements: boolean;
}

class UsageError extends Error {}

function parsePositiveInteger(text: string, name: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || value < 1) {
    throw new UsageError(`invalid ${name} ${JSON.stringify(text)}: expected a positive whole number`);
  }
  return value;
}

function parseOptions(argv: string[]): Options | 'help' {
  const { values } = parseArgs({
    args: argv,
    options: {
      seconds: { type: 'string' },
      quick: { type: 'boolean', default: false },
      'pool-size': { type: 'string' },
      scale: { type: 'string' },
      'count-statements': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    return 'help';
  }
  if (values.quick && values.seconds !== undefined) {
    throw new UsageError('--quick and --seconds both set the run duration: give only one');
  }

  let seconds = DEFAULT_SECONDS;
  const fromEnvironment = process.env.BENCH_SECONDS;
  if (values.seconds !== undefined) {
    seconds = parsePositiveInteger(values.seconds, '--seconds');
  } else if (values.quick) {
    seconds = QUICK_SECONDS;
  } else if (fromEnvironment !== undefined && fromEnvironment !== '') {
    seconds = parsePositiveInteger(fromEnvironment, 'BENCH_SECONDS');
  }

  return {
    seconds,
    poolSize: values['pool-size'] === undefined ? DEFAULT_POOL_SIZE : parsePositiveInteger(values['pool-size'], '--pool-size'),
    scale: values.scale === undefined ? DEFAULT_SCALE : parsePositiveInteger(values.scale, '--scale'),
    countStatements: values['count-statements'],
  };
}

function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

// ---------------------------------------------------------------------------------------------
// Clean-up: on success, on failure and on SIGINT, SIGTERM or SIGHUP.

/** Clean-up steps in the order they were registered; they run in reverse. */
const cleanupSteps: Array<{ name: string; run: () => Promise<void> }> = [];
let cleanupDone: Promise<void> | null = null;
/** The signal that stopped the benchmark; the errors it causes in the runs are not reported. */
let interruptedBy: NodeJS.Signals | null = null;

function onCleanup(name: string, run: () => Promise<void>): void {
  cleanupSteps.push({ name, run });
}

async function runCleanupSteps(): Promise<void> {
  stopSpawning();
  await stopAllChildren();
  for (const step of cleanupSteps.reverse()) {
    try {
      await step.run();
    } catch (error) {
      progress(`clean-up: ${step.name} failed: ${errorMessage(error)}`);
    }
  }
}

function cleanUp(): Promise<void> {
  cleanupDone ??= runCleanupSteps();
  return cleanupDone;
}

/**
 * Cleans up and exits on SIGINT, SIGTERM or SIGHUP. The listeners stay installed while the
 * clean-up runs: under `tsx`, a signal that finds no listener makes the process exit at once,
 * and tsx's parent process may relay a second copy of the same Ctrl-C.
 */
function exitOnSignals(): void {
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(signal, () => {
      if (interruptedBy !== null || cleanupDone !== null) {
        return;
      }
      interruptedBy = signal;
      progress(`received ${signal}: stopping the benchmark and cleaning up`);
      void cleanUp().finally(() => process.exit(128 + os.constants.signals[signal]));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Proxy and socket pipe

interface ProxyUnderTest {
  name: string;
  carrier: Carrier;
  poolSize: number;
  service: Service;
  token: string;
}

/**
 * Writes a proxy config for `carrier` and `poolSize` and starts the proxy in a child process.
 * Secrets reach the proxy through environment variables that the config file names.
 */
async function startProxy(database: Database, carrier: Carrier, poolSize: number, workDir: string): Promise<ProxyUnderTest> {
  const name = proxyName(carrier, poolSize);
  const configFile = path.join(workDir, `proxy-${carrier}-pool-${poolSize}.yaml`);
  const config = {
    listen: { host: '127.0.0.1', port: 0 },
    upstream: {
      write: {
        host: database.server.host,
        port: database.server.port,
        database: DATABASE,
        user: APP_ROLE,
        password: '${BENCH_APP_PASSWORD}',
      },
      read: [],
    },
    pool: { size: poolSize },
    auth: { jwt: { keys: [{ secret: '${BENCH_JWT_SECRET}' }] } },
    identity: { carrier, columns: { empnum: 'sub', fullname: 'name' } },
    // NOTE: info, not warn, because the proxy logs its `listening` line (the only way to learn
    // a port chosen by the OS) at info. pgbench connects once per client, so the run adds only
    // a few dozen info lines.
    log: { level: 'info' },
  };
  await fs.writeFile(configFile, toYaml(config), { mode: 0o600 });

  const env = environmentWithout('PG', {
    BENCH_APP_PASSWORD: database.appPassword,
    BENCH_JWT_SECRET: randomBytes(32).toString('hex'),
  });
  const service = await Service.start(
    name,
    process.execPath,
    [PROXY_BIN, 'serve', '--config', configFile],
    env,
    SERVICE_START_TIMEOUT_MS,
  );

  const minted = await runCommand(
    process.execPath,
    [PROXY_BIN, 'token', '--config', configFile, '--sub', TOKEN_SUBJECT, '--name', TOKEN_NAME],
    env,
    SERVICE_START_TIMEOUT_MS,
  );
  if (minted.exitCode !== 0) {
    throw new Error(`pg-audit-proxy token failed with exit status ${minted.exitCode}: ${minted.stderr.trim()}`);
  }
  return { name, carrier, poolSize, service, token: minted.stdout.trim() };
}

/** Starts bench/socket-pipe.ts with the same Node.js and tsx loader as the proxy's bin script. */
function startSocketPipe(database: Database): Promise<Service> {
  return Service.start(
    'socket pipe',
    process.execPath,
    ['--import', 'tsx', SOCKET_PIPE_SCRIPT, '--upstream-port', String(database.server.port)],
    environmentWithout('PG', {}),
    SERVICE_START_TIMEOUT_MS,
  );
}

// ---------------------------------------------------------------------------------------------
// Runs

const WORKLOAD_ARGS: Record<Workload, string[]> = {
  'select-only': ['-S'],
  tpcb: [],
  'tpcb-audit': [],
  'select-only-prepared': ['-S', '-M', 'prepared'],
};

/**
 * The runs in order. Ratios compare each run with the direct run of its workload.
 *
 * With the full pool (as many server connections as clients) the proxy nearly always leases a
 * client the server connection it used last, which still holds that client's identity, so the
 * identity is seldom set again. The small-pool runs make connections change clients at almost
 * every lease, so they include the cost of setting the identity.
 */
const PLAN: Array<{ workload: Workload; route: Route }> = [
  { workload: 'select-only', route: 'direct' },
  { workload: 'select-only', route: 'socket-pipe' },
  { workload: 'select-only', route: 'proxy-settings' },
  { workload: 'select-only', route: 'proxy-settings-small-pool' },
  { workload: 'tpcb', route: 'direct' },
  { workload: 'tpcb', route: 'proxy-settings' },
  { workload: 'tpcb-audit', route: 'direct' },
  { workload: 'tpcb-audit', route: 'proxy-settings' },
  { workload: 'tpcb-audit', route: 'proxy-temp-table' },
  { workload: 'tpcb-audit', route: 'proxy-settings-small-pool' },
  { workload: 'tpcb-audit', route: 'proxy-temp-table-small-pool' },
  { workload: 'select-only-prepared', route: 'direct' },
  { workload: 'select-only-prepared', route: 'proxy-settings' },
];

/** Address and credentials pgbench uses for a run, and the process whose CPU time is measured (none for direct). */
interface Target {
  port: number;
  user: string;
  password: string;
  measured: Service | null;
}

interface Session {
  options: Options;
  database: Database;
  workDir: string;
  ticksPerSecond: number;
  /** Running proxies by name. */
  proxies: Map<string, ProxyUnderTest>;
  socketPipe: Service | null;
  /** The PostgreSQL server's main process, parent of every backend. */
  postmasterPid: number;
  /** Start-up error of each route whose socket pipe or proxy could not start. */
  startFailures: Map<Route, string>;
}

function smallPoolSize(poolSize: number): number {
  return Math.max(1, Math.floor(poolSize / 2));
}

function routeTitle(route: Route, options: Options): string {
  const proxy = PROXY_ROUTES[route];
  if (proxy !== undefined) {
    return proxyName(proxy.carrier, proxy.smallPool ? smallPoolSize(options.poolSize) : options.poolSize);
  }
  return route === 'direct' ? 'direct' : 'socket pipe';
}

/**
 * Starts the socket pipe and every proxy before the first run, so that all of them load the
 * same source files even if someone edits src/ during the benchmark.
 */
async function startServices(session: Session): Promise<void> {
  for (const route of new Set(PLAN.map((run) => run.route))) {
    if (route === 'direct') {
      continue;
    }
    progress(`starting the ${routeTitle(route, session.options)}...`);
    try {
      await targetFor(route, session);
    } catch (error) {
      session.startFailures.set(route, errorMessage(error));
    }
  }
}

/** Starts the service a route needs if it is not running yet and returns where pgbench connects. */
async function targetFor(route: Route, session: Session): Promise<Target> {
  const { database } = session;
  if (route === 'direct') {
    return { port: database.server.port, user: APP_ROLE, password: database.appPassword, measured: null };
  }
  if (route === 'socket-pipe') {
    session.socketPipe ??= await startSocketPipe(database);
    return { port: session.socketPipe.port, user: APP_ROLE, password: database.appPassword, measured: session.socketPipe };
  }

  const variant = PROXY_ROUTES[route];
  if (variant === undefined) {
    throw new Error(`no proxy is defined for route ${route}`);
  }
  const poolSize = variant.smallPool ? smallPoolSize(session.options.poolSize) : session.options.poolSize;
  const name = proxyName(variant.carrier, poolSize);
  let proxy = session.proxies.get(name);
  if (proxy === undefined) {
    proxy = await startProxy(database, variant.carrier, poolSize, session.workDir);
    session.proxies.set(name, proxy);
  }
  // The user name is informational: the token decides who the client is.
  return { port: proxy.service.port, user: TOKEN_SUBJECT, password: proxy.token, measured: proxy.service };
}

function skippedRun(workload: Workload, route: Route, options: Options, reason: string): RunResult {
  return {
    workload,
    route,
    routeTitle: routeTitle(route, options),
    seconds: options.seconds,
    tps: null,
    transactions: null,
    failedTransactions: null,
    abortedClients: 0,
    runAborted: false,
    exitCode: null,
    timedOut: false,
    errors: [],
    ratioToDirect: null,
    cpuSeconds: null,
    cpuMicrosecondsPerTransaction: null,
    statementsPerTransaction: null,
    postgresCpuMicrosecondsPerTransaction: null,
    wallSeconds: null,
    otherCpuPercent: null,
    audit: null,
    sessionsAtTimeout: null,
    skippedBecause: reason,
  };
}

interface CpuSample {
  time: bigint;
  machineTicks: number;
  /** This process and all its descendants: PostgreSQL, pgbench, the proxies, the socket pipe. */
  benchmarkTicks: number;
  postgresTicks: number;
}

async function sampleCpu(session: Session): Promise<CpuSample> {
  const [machineTicks, benchmarkTicks, postgresTicks] = await Promise.all([
    readMachineProcessCpuTicks(),
    readProcessTreeCpuTicks(process.pid),
    readProcessTreeCpuTicks(session.postmasterPid),
  ]);
  return { time: process.hrtime.bigint(), machineTicks, benchmarkTicks, postgresTicks };
}

async function runOne(workload: Workload, route: Route, session: Session): Promise<RunResult> {
  const { seconds } = session.options;
  const startFailure = session.startFailures.get(route);
  if (startFailure !== undefined) {
    return skippedRun(workload, route, session.options, startFailure);
  }
  let target: Target;
  try {
    target = await targetFor(route, session);
  } catch (error) {
    return skippedRun(workload, route, session.options, errorMessage(error));
  }
  if (target.measured !== null && !target.measured.isRunning) {
    // The exit itself is reported once, with the proxy's last log lines, under the proxy.
    return skippedRun(workload, route, session.options, `${target.measured.name} had exited before this run`);
  }

  await resetBetweenRuns(session.database, session.options.countStatements);
  const title = routeTitle(route, session.options);
  const via = route === 'direct' ? 'directly' : `through the ${title}`;
  progress(`running ${WORKLOAD_TITLES[workload]} ${via}, ${seconds} s...`);

  const args = [
    '-n',
    ...WORKLOAD_ARGS[workload],
    '-c', String(CLIENTS),
    '-j', String(THREADS),
    '-T', String(seconds),
    '-h', '127.0.0.1',
    '-p', String(target.port),
    '-U', target.user,
    DATABASE,
  ];
  const pid = target.measured?.pid;
  const before = await sampleCpu(session);
  const cpuBefore = pid === undefined ? null : await readCpuSeconds(pid, session.ticksPerSecond);
  let sessionsAtTimeout: SessionGroup[] | null = null;
  const result = await runCommand('pgbench', args, pgbenchEnvironment(target.password), seconds * 1000 + PGBENCH_GRACE_MS, async () => {
    sessionsAtTimeout = await readSessions(session.database);
  });
  const cpuAfter =
    pid === undefined || !target.measured?.isRunning ? null : await readCpuSeconds(pid, session.ticksPerSecond).catch(() => null);
  const after = await sampleCpu(session);

  const outcome = parsePgbenchOutput(result);
  const statements = session.options.countStatements ? await countStatements(session.database) : null;
  const perTransaction = (cpuSeconds: number | null): number | null =>
    cpuSeconds === null || outcome.transactions === null || outcome.transactions === 0
      ? null
      : (cpuSeconds * 1e6) / outcome.transactions;
  const cpuSeconds = cpuBefore === null || cpuAfter === null ? null : cpuAfter - cpuBefore;
  const postgresCpuSeconds = (after.postgresTicks - before.postgresTicks) / session.ticksPerSecond;
  const wallSeconds = Number(after.time - before.time) / 1e9;
  const outsideTicks = after.machineTicks - before.machineTicks - (after.benchmarkTicks - before.benchmarkTicks);
  const otherCpuPercent = (100 * outsideTicks) / session.ticksPerSecond / (wallSeconds * os.availableParallelism());

  return {
    workload,
    route,
    routeTitle: title,
    seconds,
    tps: outcome.tps,
    transactions: outcome.transactions,
    failedTransactions: outcome.failedTransactions,
    abortedClients: outcome.abortedClients,
    runAborted: outcome.runAborted,
    exitCode: outcome.exitCode,
    timedOut: outcome.timedOut,
    errors: outcome.errors,
    ratioToDirect: null,
    cpuSeconds,
    cpuMicrosecondsPerTransaction: perTransaction(cpuSeconds),
    statementsPerTransaction:
      statements === null || outcome.transactions === null || outcome.transactions === 0 ? null : statements / outcome.transactions,
    postgresCpuMicrosecondsPerTransaction: perTransaction(postgresCpuSeconds),
    wallSeconds,
    otherCpuPercent,
    audit: workload === 'tpcb-audit' ? await checkAuditRows(session.database, TOKEN_SUBJECT, TOKEN_NAME) : null,
    sessionsAtTimeout,
    skippedBecause: null,
  };
}

function addRatios(runs: RunResult[]): void {
  for (const run of runs) {
    const direct = runs.find((other) => other.workload === run.workload && other.route === 'direct');
    if (run.route !== 'direct' && direct?.tps != null && direct.tps > 0 && run.tps !== null) {
      run.ratioToDirect = run.tps / direct.tps;
    }
  }
}

async function describeProxy(proxy: ProxyUnderTest): Promise<ProxyReport> {
  const running = proxy.service.isRunning;
  return {
    name: proxy.name,
    carrier: proxy.carrier,
    poolSize: proxy.poolSize,
    peakRssKiB: running ? await readPeakRssKiB(proxy.service.pid).catch(() => null) : null,
    logCounts: proxy.service.logs.countsByMessage,
    logExamples: proxy.service.logs.examples,
    exitedEarly: running ? null : proxy.service.describeExit(),
  };
}

/**
 * Describes the proxy code under test: the current commit and whether src/, sql/ or bin/ has
 * uncommitted changes, or null outside a git checkout.
 */
function describeSourceVersion(): { commit: string; uncommittedChanges: boolean } | null {
  const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: REPO_ROOT, encoding: 'utf8' });
  const status = spawnSync('git', ['status', '--porcelain', '--', 'src', 'sql', 'bin'], { cwd: REPO_ROOT, encoding: 'utf8' });
  if (commit.status !== 0 || status.status !== 0) {
    return null;
  }
  return { commit: commit.stdout.trim(), uncommittedChanges: status.stdout.trim() !== '' };
}

function pgbenchVersion(): string | null {
  const result = spawnSync('pgbench', ['--version'], { encoding: 'utf8' });
  if (result.error !== undefined || result.status !== 0) {
    return null;
  }
  return result.stdout.trim().replace(/^pgbench \(PostgreSQL\) /, '');
}

async function runBenchmark(options: Options, pgbench: string): Promise<BenchmarkReport> {
  const startedAt = new Date().toISOString();
  const ticksPerSecond = clockTicksPerSecond();

  const workDir = await fs.mkdtemp(path.join(os.tmpdir(), 'pg-audit-proxy-bench-'));
  onCleanup('removing the proxy config directory', () => fs.rm(workDir, { recursive: true, force: true }));

  progress('starting the embedded PostgreSQL...');
  const settings = options.countStatements ? { ...POSTGRES_SETTINGS, shared_preload_libraries: 'pg_stat_statements' } : POSTGRES_SETTINGS;
  const server = await startEmbeddedPostgres({ settings });
  onCleanup('stopping the embedded PostgreSQL', () => destroyEmbeddedPostgres(server));

  const database = await prepareDatabase(server, options, progress);
  const { postgresVersion, databaseMiB, postgresSettings } = await database.asSuperuser(async (client) => {
    const version = await client.query<{ server_version: string }>('SHOW server_version');
    const size = await client.query<{ bytes: string }>('SELECT pg_catalog.pg_database_size(current_database()) AS bytes');
    const settings = await client.query<{ name: string; setting: string }>(
      `SELECT name, current_setting(name) AS setting FROM pg_catalog.pg_settings WHERE name = ANY($1) ORDER BY name`,
      [REPORTED_SETTINGS],
    );
    return {
      postgresVersion: version.rows[0].server_version,
      databaseMiB: Math.round(Number(size.rows[0].bytes) / 1024 / 1024),
      postgresSettings: Object.fromEntries(settings.rows.map((row) => [row.name, row.setting])),
    };
  });

  const session: Session = {
    options,
    database,
    workDir,
    ticksPerSecond,
    proxies: new Map(),
    socketPipe: null,
    postmasterPid: await readPostmasterPid(server),
    startFailures: new Map(),
  };
  const proxySource = describeSourceVersion();
  await startServices(session);

  const runs: RunResult[] = [];
  let auditEnabled = false;
  for (const { workload, route } of PLAN) {
    const wantAudit = workload === 'tpcb-audit';
    if (wantAudit !== auditEnabled) {
      await setAuditTrigger(database, wantAudit);
      auditEnabled = wantAudit;
    }
    runs.push(await runOne(workload, route, session));
  }
  addRatios(runs);

  const proxies = await Promise.all([...session.proxies.values()].map(describeProxy));
  const pipeRun = runs.find((run) => run.workload === 'select-only' && run.route === 'socket-pipe');
  const proxyRun = runs.find((run) => run.workload === 'select-only' && run.route === 'proxy-settings');
  const pipeMicroseconds = pipeRun?.cpuMicrosecondsPerTransaction ?? null;
  const proxyMicroseconds = proxyRun?.cpuMicrosecondsPerTransaction ?? null;

  const cpus = os.cpus();
  return {
    startedAt,
    finishedAt: new Date().toISOString(),
    hardware: {
      cpuCount: cpus.length,
      cpuModel: cpus[0]?.model ?? 'unknown',
      memoryMiB: Math.round(os.totalmem() / 1024 / 1024),
      kernel: os.release(),
    },
    software: { node: process.version, postgres: postgresVersion, pgbench, proxySource },
    parameters: {
      seconds: options.seconds,
      clients: CLIENTS,
      threads: THREADS,
      scale: options.scale,
      databaseMiB,
      poolSize: options.poolSize,
      smallPoolSize: smallPoolSize(options.poolSize),
      countStatements: options.countStatements,
      postgresSettings,
    },
    runs,
    cpuPerTransaction: {
      socketPipeMicroseconds: pipeMicroseconds,
      proxyMicroseconds,
      proxyToPipeRatio: pipeMicroseconds !== null && proxyMicroseconds !== null && pipeMicroseconds > 0 ? proxyMicroseconds / pipeMicroseconds : null,
    },
    proxies,
  };
}

async function main(argv: string[]): Promise<number> {
  let options: Options;
  try {
    const parsed = parseOptions(argv);
    if (parsed === 'help') {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    options = parsed;
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`run-bench: ${errorMessage(error)}\n${USAGE}\n`);
      return 2;
    }
    throw error;
  }

  const pgbench = pgbenchVersion();
  if (pgbench === null) {
    process.stderr.write(
      'run-bench: pgbench not found on the PATH: install the Debian package postgresql-client (apt-get install postgresql-client) and run again\n',
    );
    return 1;
  }

  exitOnSignals();
  try {
    const report = await runBenchmark(options, pgbench);
    await fs.mkdir(path.dirname(RESULTS_FILE), { recursive: true });
    await fs.writeFile(RESULTS_FILE, `${JSON.stringify(report, null, 2)}\n`);
    process.stdout.write(renderReport(report));
    progress(`results written to ${path.relative(process.cwd(), RESULTS_FILE)}`);
    return 0;
  } catch (error) {
    if (interruptedBy !== null) {
      return 128 + os.constants.signals[interruptedBy];
    }
    process.stderr.write(`run-bench: benchmark failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    return 1;
  } finally {
    await cleanUp();
  }
}

process.exitCode = await main(process.argv.slice(2));
