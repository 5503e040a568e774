// Reading pgbench's report. The line formats are those of pgbench 15 to 17.
import type { CommandResult } from './processes.ts';

export interface PgbenchErrorCount {
  /** An error line of pgbench's stderr with client numbers and other digits replaced by N. */
  message: string;
  count: number;
}

export interface PgbenchOutcome {
  /** Transactions per second excluding the initial connection time, or null when not reported. */
  tps: number | null;
  /** "number of transactions actually processed". */
  transactions: number | null;
  /** "number of failed transactions": serialization and deadlock failures only. */
  failedTransactions: number | null;
  /** Clients that pgbench stopped after an error; their later transactions never ran. */
  abortedClients: number;
  /** pgbench reported "Run was aborted; the above results are incomplete". */
  runAborted: boolean;
  errors: PgbenchErrorCount[];
  exitCode: number | null;
  timedOut: boolean;
}

function matchNumber(text: string, pattern: RegExp): number | null {
  const match = pattern.exec(text);
  return match === null ? null : Number(match[1]);
}

/** Extracts the figures and the errors from one pgbench run's output. */
export function parsePgbenchOutput(result: CommandResult): PgbenchOutcome {
  const { stdout, stderr } = result;
  const errorLines = stderr
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => /^pgbench: (error|fatal):/.test(line) || /^(ERROR|FATAL|DETAIL|HINT):/.test(line));

  const counts = new Map<string, number>();
  for (const line of errorLines) {
    const message = line.replace(/\d+/g, 'N');
    counts.set(message, (counts.get(message) ?? 0) + 1);
  }

  return {
    tps: matchNumber(stdout, /^tps = ([\d.]+) \(without initial connection time\)$/m),
    transactions: matchNumber(stdout, /^number of transactions actually processed: (\d+)/m),
    failedTransactions: matchNumber(stdout, /^number of failed transactions: (\d+)/m),
    abortedClients: errorLines.filter((line) => /client \d+ (script \d+ )?aborted/.test(line)).length,
    runAborted: /Run was aborted/.test(stderr),
    errors: [...counts].map(([message, count]) => ({ message, count })),
    exitCode: result.exitCode,
    timedOut: result.timedOut,
  };
}
