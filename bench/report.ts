// The benchmark's results: their shape (also written as JSON) and the text table for stdout.
import type { PgbenchErrorCount } from './pgbench.ts';

export type Workload = 'select-only' | 'tpcb' | 'tpcb-audit' | 'select-only-prepared';
export type Route =
  | 'direct'
  | 'socket-pipe'
  | 'proxy-settings'
  | 'proxy-temp-table'
  | 'proxy-settings-small-pool'
  | 'proxy-temp-table-small-pool';
export type Carrier = 'settings' | 'temp_table';

export const WORKLOAD_TITLES: Record<Workload, string> = {
  'select-only': 'select-only (-S)',
  tpcb: 'TPC-B-like',
  'tpcb-audit': 'TPC-B-like, audited',
  'select-only-prepared': 'select-only, -M prepared',
};

/** The proxy behind each proxy route. A small pool has half the server connections of the full one. */
export const PROXY_ROUTES: Partial<Record<Route, { carrier: Carrier; smallPool: boolean }>> = {
  'proxy-settings': { carrier: 'settings', smallPool: false },
  'proxy-temp-table': { carrier: 'temp_table', smallPool: false },
  'proxy-settings-small-pool': { carrier: 'settings', smallPool: true },
  'proxy-temp-table-small-pool': { carrier: 'temp_table', smallPool: true },
};

/** Names a proxy by its identity carrier and pool size, as in `proxy (settings, pool 16)`. */
export function proxyName(carrier: Carrier, poolSize: number): string {
  return `proxy (${carrier}, pool ${poolSize})`;
}

/** Audit rows that one run of the audited workload left in audit.edits. */
export interface AuditCheck {
  /** Rows of pgbench_history: one per committed TPC-B transaction. */
  historyRows: number;
  auditRows: number;
  attributedRows: number;
  /** Rows attributed to the benchmark token's identity: empnum bench-user, fullname Bench User. */
  rowsOfTokenIdentity: number;
}

export interface SessionGroup {
  state: string | null;
  waitEvent: string | null;
  query: string;
  count: number;
}

export interface RunResult {
  workload: Workload;
  route: Route;
  /** `direct`, `socket pipe` or the proxy's name with its carrier and pool size. */
  routeTitle: string;
  seconds: number;
  tps: number | null;
  transactions: number | null;
  failedTransactions: number | null;
  abortedClients: number;
  runAborted: boolean;
  exitCode: number | null;
  timedOut: boolean;
  errors: PgbenchErrorCount[];
  /** This run's TPS divided by the direct run's TPS of the same workload. */
  ratioToDirect: number | null;
  /** CPU time (user + system) of the socket pipe or proxy process during the run. */
  cpuSeconds: number | null;
  cpuMicrosecondsPerTransaction: number | null;
  /**
   * Statements the server ran per pgbench transaction, from pg_stat_statements (top-level
   * statements only), or null without --count-statements. Through the proxy, the excess over
   * the direct run is the proxy's own statements, such as setting the identity.
   */
  statementsPerTransaction: number | null;
  /** CPU time of the PostgreSQL server (all its processes) per transaction. */
  postgresCpuMicrosecondsPerTransaction: number | null;
  /** Time between the CPU samples taken just before and after pgbench. */
  wallSeconds: number | null;
  /**
   * CPU time of processes outside the benchmark during the run, as a percentage of all CPUs:
   * other work on the machine that competed with the run. Interrupt time is not included.
   */
  otherCpuPercent: number | null;
  audit: AuditCheck | null;
  /** Sessions of the benchmark database when pgbench timed out, grouped by state, wait event and query. */
  sessionsAtTimeout: SessionGroup[] | null;
  /** Reason the run did not take place, such as a proxy that had exited. */
  skippedBecause: string | null;
}

export interface ProxyReport {
  name: string;
  carrier: Carrier;
  poolSize: number;
  /** VmHWM of the proxy process after its last run. */
  peakRssKiB: number | null;
  logCounts: Record<string, number>;
  logExamples: Record<string, unknown>[];
  /** Set when the proxy exited before the benchmark stopped it. */
  exitedEarly: string | null;
}

export interface BenchmarkReport {
  startedAt: string;
  finishedAt: string;
  hardware: { cpuCount: number; cpuModel: string; memoryMiB: number; kernel: string };
  software: {
    node: string;
    postgres: string;
    pgbench: string;
    /** Git commit of the proxy under test, and whether src/, sql/ or bin/ differed from it. */
    proxySource: { commit: string; uncommittedChanges: boolean } | null;
  };
  parameters: {
    seconds: number;
    clients: number;
    threads: number;
    scale: number;
    /** Size of the benchmark database after set-up (`pgbench -i` and sql/), before the first run. */
    databaseMiB: number;
    poolSize: number;
    smallPoolSize: number;
    /** Whether pg_stat_statements was loaded to count the server's statements. */
    countStatements: boolean;
    postgresSettings: Record<string, string>;
  };
  runs: RunResult[];
  /** Select-only CPU time per transaction of the socket pipe and of the proxy (settings carrier, full pool). */
  cpuPerTransaction: { socketPipeMicroseconds: number | null; proxyMicroseconds: number | null; proxyToPipeRatio: number | null };
  proxies: ProxyReport[];
}

function formatNumber(value: number | null, digits: number): string {
  return value === null ? '-' : value.toFixed(digits);
}

function formatTable(header: string[], rows: string[][]): string {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  // The first two columns are text and read best left-aligned; the rest are numbers.
  const formatRow = (cells: string[]): string =>
    cells.map((cell, column) => (column < 2 ? cell.padEnd(widths[column]) : cell.padStart(widths[column]))).join('  ').trimEnd();
  const rule = widths.map((width) => '-'.repeat(width)).join('  ');
  return [formatRow(header), rule, ...rows.map(formatRow)].join('\n');
}

/** Renders the report as the plain-text summary that the benchmark prints on stdout. */
export function renderReport(report: BenchmarkReport): string {
  const { parameters, hardware, software } = report;
  const lines: string[] = [];

  lines.push(`pg-audit-proxy benchmark, ${report.startedAt}`);
  lines.push(`machine: ${hardware.cpuCount} CPUs (${hardware.cpuModel}), ${hardware.memoryMiB} MiB, Linux ${hardware.kernel}`);
  const source = software.proxySource;
  const sourceText =
    source === null ? 'proxy source: unknown (not a git checkout)' : `proxy commit ${source.commit}${source.uncommittedChanges ? ' with uncommitted changes' : ''}`;
  lines.push(`software: Node.js ${software.node}, PostgreSQL ${software.postgres}, pgbench ${software.pgbench}; ${sourceText}`);
  lines.push(
    `pgbench -c ${parameters.clients} -j ${parameters.threads} -T ${parameters.seconds}, scale ${parameters.scale} (${parameters.databaseMiB} MiB); ` +
      `proxy pool sizes ${parameters.poolSize} and ${parameters.smallPoolSize}`,
  );
  lines.push(
    `PostgreSQL settings: ${Object.entries(parameters.postgresSettings)
      .filter(([, value]) => value !== '')
      .map(([name, value]) => `${name}=${value}`)
      .join(', ')}`,
  );
  lines.push('');

  const header = ['workload', 'route', 'TPS', 'vs direct', 'failed tx', 'aborted clients', 'CPU us/tx', 'PG CPU us/tx', 'other CPU %'];
  if (parameters.countStatements) {
    header.push('PG stmts/tx');
  }
  const rows = report.runs.map((run) => [
    WORKLOAD_TITLES[run.workload],
    run.routeTitle,
    run.skippedBecause !== null ? 'skipped' : formatNumber(run.tps, 1),
    formatNumber(run.ratioToDirect, 2),
    formatNumber(run.failedTransactions, 0),
    String(run.abortedClients),
    formatNumber(run.cpuMicrosecondsPerTransaction, 1),
    formatNumber(run.postgresCpuMicrosecondsPerTransaction, 1),
    // Tick rounding can make a near-zero share slightly negative.
    formatNumber(run.otherCpuPercent === null ? null : Math.max(0, run.otherCpuPercent), 0),
    ...(parameters.countStatements ? [formatNumber(run.statementsPerTransaction, 3)] : []),
  ]);
  lines.push(formatTable(header, rows));
  lines.push('');

  const cpu = report.cpuPerTransaction;
  lines.push(
    `CPU per select-only transaction: socket pipe ${formatNumber(cpu.socketPipeMicroseconds, 1)} us, ` +
      `proxy ${formatNumber(cpu.proxyMicroseconds, 1)} us, proxy/pipe ${formatNumber(cpu.proxyToPipeRatio, 2)}`,
  );
  for (const proxy of report.proxies) {
    const rss = proxy.peakRssKiB === null ? '-' : `${(proxy.peakRssKiB / 1024).toFixed(1)} MiB`;
    lines.push(`${proxy.name} peak RSS (VmHWM): ${rss}`);
  }

  const audited = report.runs.filter((run) => run.audit !== null);
  if (audited.length > 0) {
    lines.push('');
    lines.push('audit rows per audited run (pgbench_history rows = committed transactions):');
    for (const run of audited) {
      const audit = run.audit as AuditCheck;
      lines.push(
        `  ${run.routeTitle}: ${audit.historyRows} transactions, ${audit.auditRows} audit rows, ` +
          `${audit.attributedRows} attributed, ${audit.rowsOfTokenIdentity} to the token's identity`,
      );
    }
  }

  const problems = collectProblems(report);
  lines.push('');
  if (problems.length === 0) {
    lines.push('problems: none (no pgbench errors, no proxy log lines of level warn or higher, no busy machine)');
  } else {
    lines.push('problems:');
    lines.push(...problems.map((problem) => `  ${problem}`));
  }
  return `${lines.join('\n')}\n`;
}

/** Share of the CPUs used by other processes above which a run's figures are flagged. */
const BUSY_MACHINE_PERCENT = 10;

function collectProblems(report: BenchmarkReport): string[] {
  const problems: string[] = [];
  for (const run of report.runs) {
    const name = `${WORKLOAD_TITLES[run.workload]} via ${run.routeTitle}`;
    if (run.skippedBecause !== null) {
      problems.push(`${name}: skipped: ${run.skippedBecause}`);
      continue;
    }
    if (run.timedOut) {
      problems.push(`${name}: pgbench did not finish in time and was killed; sessions of the database at that moment:`);
      for (const group of run.sessionsAtTimeout ?? []) {
        problems.push(`    ${group.count} x ${group.state ?? '-'}, waiting for ${group.waitEvent ?? '-'}: ${group.query}`);
      }
    } else if (run.exitCode !== 0) {
      problems.push(`${name}: pgbench exit status ${run.exitCode}${run.runAborted ? ' (run aborted, results incomplete)' : ''}`);
    }
    for (const error of run.errors) {
      problems.push(`${name}: ${error.count} x ${error.message}`);
    }
    if (run.otherCpuPercent !== null && run.otherCpuPercent > BUSY_MACHINE_PERCENT) {
      problems.push(`${name}: processes outside the benchmark used ${run.otherCpuPercent.toFixed(0)}% of the CPUs, so its figures are lower than on an idle machine`);
    }
  }
  for (const proxy of report.proxies) {
    if (proxy.exitedEarly !== null) {
      problems.push(`${proxy.name}: ${proxy.exitedEarly}`);
    }
    for (const [message, count] of Object.entries(proxy.logCounts)) {
      if (/^(warn|error|fatal):/.test(message)) {
        problems.push(`${proxy.name} log: ${count} x ${message}`);
      }
    }
  }
  return problems;
}
