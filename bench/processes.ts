// Child processes of the benchmark and what Linux reports about them in /proc. Services (the
// proxy, the socket pipe) announce their port in a JSON `listening` line. Commands (pgbench,
// token minting) run to completion. CPU time and peak memory come from /proc.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';

const STDERR_KEPT_BYTES = 8 * 1024;
const STOP_TIMEOUT_MS = 10_000;

/** Children that are still running, so that an interrupted benchmark can end each of them. */
const runningChildren = new Set<ChildProcess>();
let spawningStopped = false;

/** Makes every later spawn fail, for use once the benchmark is shutting down. */
export function stopSpawning(): void {
  spawningStopped = true;
}

function spawnTracked(command: string, args: string[], env: NodeJS.ProcessEnv): ChildProcess {
  if (spawningStopped) {
    throw new Error(`not starting ${command}: the benchmark is shutting down`);
  }
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  runningChildren.add(child);
  child.once('exit', () => runningChildren.delete(child));
  return child;
}

/** Sends SIGTERM to every child still running, then SIGKILL to those left after STOP_TIMEOUT_MS. */
export async function stopAllChildren(): Promise<void> {
  await Promise.all([...runningChildren].map((child) => stopChild(child)));
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}

/** Keeps only the last `maxBytes` of `text`. */
function keepTail(text: string, maxBytes: number): string {
  return text.length > maxBytes ? text.slice(text.length - maxBytes) : text;
}

export interface LogSummary {
  /** Number of log lines per level name and message, such as `warn: authentication failed`. */
  countsByMessage: Record<string, number>;
  /** Up to 5 whole lines of level warn or higher, as examples. */
  examples: Record<string, unknown>[];
}

const PINO_LEVEL_NAMES: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };
const PINO_WARN_LEVEL = 40;
const EXAMPLES_KEPT = 5;

/** A service child process that printed its port in a JSON `listening` line on stdout. */
export class Service {
  readonly logs: LogSummary = { countsByMessage: {}, examples: [] };
  private stderrTail = '';
  /** The proxy's `shutting down` log line, which names the signal that stopped it. */
  private shutdownLine: string | null = null;

  private constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readonly port: number,
  ) {}

  get pid(): number {
    return this.child.pid as number;
  }

  get isRunning(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Describes how the process ended, with the end of its stderr, for error messages. */
  describeExit(): string {
    const status = this.child.signalCode !== null ? `signal ${this.child.signalCode}` : `exit status ${this.child.exitCode}`;
    const shutdown = this.shutdownLine === null ? '' : `; it had logged ${this.shutdownLine}`;
    return `${this.name} exited with ${status}${shutdown}; last stderr:\n${this.stderrTail.trim() || '(empty)'}`;
  }

  stop(): Promise<void> {
    return stopChild(this.child);
  }

  /**
   * Starts `command` and resolves once it prints a JSON line with `msg: "listening"` and a
   * numeric `port`. Rejects when it exits first or prints no such line within `timeoutMs`.
   * Later stdout lines are read as pino JSON lines and counted by level and message.
   */
  static start(name: string, command: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<Service> {
    const child = spawnTracked(command, args, env);
    let service: Service | null = null;
    let stderr = '';
    let stdoutRest = '';

    return new Promise<Service>((resolve, reject) => {
      const fail = (reason: string): void => {
        clearTimeout(timer);
        void stopChild(child);
        reject(new Error(`${name} did not start: ${reason}; last stderr:\n${keepTail(stderr, STDERR_KEPT_BYTES).trim() || '(empty)'}`));
      };
      const timer = setTimeout(() => fail(`no "listening" log line within ${timeoutMs} ms`), timeoutMs);

      child.stderr?.on('data', (chunk: Buffer) => {
        stderr = keepTail(stderr + chunk.toString('utf8'), STDERR_KEPT_BYTES);
        if (service !== null) {
          service.stderrTail = stderr;
        }
      });
      child.stdout?.on('data', (chunk: Buffer) => {
        const lines = (stdoutRest + chunk.toString('utf8')).split('\n');
        stdoutRest = lines.pop() ?? '';
        for (const line of lines) {
          const entry = parseJsonLine(line);
          if (entry === null) {
            continue;
          }
          if (service !== null) {
            service.countLogLine(entry);
            if (entry.msg === 'shutting down') {
              service.shutdownLine ??= line;
            }
          } else if (entry.msg === 'listening' && typeof entry.port === 'number') {
            clearTimeout(timer);
            service = new Service(name, child, entry.port);
            service.stderrTail = stderr;
            resolve(service);
          }
        }
      });
      child.once('error', (error) => fail(error.message));
      child.once('exit', (code, signal) => {
        if (service === null) {
          fail(signal !== null ? `killed by signal ${signal}` : `exit status ${code}`);
        }
      });
    });
  }

  private countLogLine(entry: Record<string, unknown>): void {
    const level = typeof entry.level === 'number' ? entry.level : 0;
    const key = `${PINO_LEVEL_NAMES[level] ?? `level ${level}`}: ${String(entry.msg)}`;
    this.logs.countsByMessage[key] = (this.logs.countsByMessage[key] ?? 0) + 1;
    if (level >= PINO_WARN_LEVEL && this.logs.examples.length < EXAMPLES_KEPT) {
      this.logs.examples.push(entry);
    }
  }
}

function parseJsonLine(line: string): Record<string, unknown> | null {
  if (!line.startsWith('{')) {
    return null;
  }
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return null;
  }
}

export interface CommandResult {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/**
 * Runs `command` to completion and collects its output. After `timeoutMs` it awaits
 * `beforeKill` (to record what the command was stuck on), then kills the command.
 */
export function runCommand(
  command: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  timeoutMs: number,
  beforeKill: () => Promise<void> = async () => {},
): Promise<CommandResult> {
  const child = spawnTracked(command, args, env);
  let stdout = '';
  let stderr = '';
  let timedOut = false;
  child.stdout?.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  const timer = setTimeout(() => {
    timedOut = true;
    void beforeKill()
      .catch(() => {})
      .finally(() => child.kill('SIGKILL'));
  }, timeoutMs);

  return new Promise((resolve, reject) => {
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`could not run ${command}: ${error.message}`, { cause: error }));
    });
    child.once('close', (exitCode, signal) => {
      clearTimeout(timer);
      resolve({ exitCode, signal, stdout, stderr, timedOut });
    });
  });
}

/** Clock ticks per second of the utime and stime fields in /proc/PID/stat (`getconf CLK_TCK`). */
export function clockTicksPerSecond(): number {
  const text = execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim();
  const ticks = Number(text);
  if (!Number.isInteger(ticks) || ticks <= 0) {
    throw new Error(`getconf CLK_TCK returned ${JSON.stringify(text)}, expected a positive integer`);
  }
  return ticks;
}

/** User plus system CPU time of process `pid` so far, in seconds, summed over all its threads. */
export async function readCpuSeconds(pid: number, ticksPerSecond: number): Promise<number> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  // Field 2 (comm) is in parentheses and may contain spaces, so count fields after the last ')'.
  // That rest starts at field 3 (state); utime and stime are fields 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const utime = Number(fields[14 - 3]);
  const stime = Number(fields[15 - 3]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) {
    throw new Error(`could not read utime and stime from /proc/${pid}/stat: ${stat.trim()}`);
  }
  return (utime + stime) / ticksPerSecond;
}

/** Peak resident set size of process `pid` (VmHWM in /proc/PID/status), in KiB. */
export async function readPeakRssKiB(pid: number): Promise<number> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const match = /^VmHWM:\s+(\d+) kB$/m.exec(status);
  if (match === null) {
    throw new Error(`no VmHWM line in /proc/${pid}/status`);
  }
  return Number(match[1]);
}

interface ProcessStat {
  pid: number;
  parentPid: number;
  /** utime + stime + cutime + cstime: the process's own CPU time plus that of its reaped children. */
  cpuTicks: number;
}

async function readAllProcessStats(): Promise<ProcessStat[]> {
  const entries = await fs.readdir('/proc');
  const stats: ProcessStat[] = [];
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) {
      continue;
    }
    // A process may exit between readdir and readFile.
    const text = await fs.readFile(`/proc/${entry}/stat`, 'utf8').catch(() => null);
    if (text === null) {
      continue;
    }
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    const field = (number: number): number => Number(fields[number - 3]);
    stats.push({ pid: Number(entry), parentPid: field(4), cpuTicks: field(14) + field(15) + field(16) + field(17) });
  }
  return stats;
}

/**
 * CPU time in clock ticks used so far by process `rootPid` and all its descendants, living or
 * reaped. A reaped child's time is in its parent's cutime and cstime, so each tick counts once.
 * A descendant that a process outside the tree reaps (an orphan) is missed.
 */
export async function readProcessTreeCpuTicks(rootPid: number): Promise<number> {
  const stats = await readAllProcessStats();
  const childrenByParent = new Map<number, ProcessStat[]>();
  for (const stat of stats) {
    const siblings = childrenByParent.get(stat.parentPid) ?? [];
    siblings.push(stat);
    childrenByParent.set(stat.parentPid, siblings);
  }

  let ticks = 0;
  const pending = stats.filter((stat) => stat.pid === rootPid);
  while (pending.length > 0) {
    const stat = pending.pop() as ProcessStat;
    ticks += stat.cpuTicks;
    pending.push(...(childrenByParent.get(stat.pid) ?? []));
  }
  return ticks;
}

/**
 * CPU time that all processes of the machine spent in user and kernel mode so far, in clock
 * ticks, from the first line of /proc/stat. Interrupt and softirq time (much of loopback TCP
 * processing) and time stolen by a hypervisor are left out, because /proc/PID/stat does not
 * charge them to a process.
 */
export async function readMachineProcessCpuTicks(): Promise<number> {
  const line = (await fs.readFile('/proc/stat', 'utf8')).split('\n')[0];
  const [label, user, nice, system] = line.split(/\s+/);
  if (label !== 'cpu') {
    throw new Error(`unexpected first line of /proc/stat: ${line}`);
  }
  return Number(user) + Number(nice) + Number(system);
}
