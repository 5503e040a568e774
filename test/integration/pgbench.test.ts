// pgbench through the proxy: under load, every audited update carries the identity of the
// token that made it, and none is lost.
import { writeFile, mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { hasProgram, runCommand } from '../helpers/commands.ts';
import { connect } from '../helpers/postgres.ts';
import { createProxyEnvironment, initPgbench, type ProxyEnvironment } from '../helpers/proxy-env.ts';

const pgbenchMissing = !hasProgram('pgbench');
if (pgbenchMissing) console.warn('pgbench not found: pgbench tests skipped (install the Debian package postgresql-client)');

const SCALE_ACCOUNTS = 100_000;

describe.skipIf(pgbenchMissing)('pgbench through the proxy', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('pgbench', { pool: { size: 3 } });
    await initPgbench(env);
  }, 180_000);

  afterAll(async () => {
    await env?.close();
  });

  async function pgbench(token: string, args: string[]) {
    return runCommand('pgbench', ['-n', '-h', env.proxy.host, '-p', String(env.proxy.port), '-U', 'bench', ...args, env.database.name], {
      env: { PGPASSWORD: token, PGCONNECT_TIMEOUT: '10' },
      timeoutMs: 120_000,
    });
  }

  async function resetCounts(): Promise<void> {
    const owner = await connect(env.database.url('superuser'));
    await owner.query('TRUNCATE pgbench_history');
    await owner.query("DELETE FROM audit.edits WHERE tablename = 'public.pgbench_accounts'");
    await owner.end();
  }

  it('records one attributed audit row per TPC-B transaction', async () => {
    await resetCounts();
    const token = await env.token('bench-1', 'Bench One');
    const run = await pgbench(token, ['-c', '8', '-j', '2', '-T', '10']);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/number of failed transactions: 0 /);

    const direct = await connect(env.database.url('superuser'));
    const history = await direct.query<{ count: string }>('SELECT count(*) FROM pgbench_history');
    const audit = await direct.query<{ total: string; by_token: string }>(
      `SELECT count(*) AS total, count(*) FILTER (WHERE attributed AND username = 'bench-1' AND fullname = 'Bench One') AS by_token
         FROM audit.edits WHERE tablename = 'public.pgbench_accounts'`,
    );
    await direct.end();
    expect(Number(history.rows[0].count)).toBeGreaterThan(0);
    expect(audit.rows[0].total).toBe(history.rows[0].count);
    expect(audit.rows[0].by_token).toBe(history.rows[0].count);
  }, 60_000);

  it('keeps two concurrent runs with different tokens apart on a small pool', async () => {
    await resetCounts();
    const directory = await mkdtemp(path.join(os.tmpdir(), 'pgbench-scripts-'));
    const script = (low: number, high: number) =>
      [
        `\\set aid random(${low}, ${high})`,
        '\\set delta random(-5000, 5000)',
        'BEGIN;',
        'UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;',
        'INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);',
        'END;',
        '',
      ].join('\n');
    const half = SCALE_ACCOUNTS / 2;
    const lowScript = path.join(directory, 'low.sql');
    const highScript = path.join(directory, 'high.sql');
    await writeFile(lowScript, script(1, half));
    await writeFile(highScript, script(half + 1, SCALE_ACCOUNTS));

    const lowToken = await env.token('low-user', 'Low User');
    const highToken = await env.token('high-user', 'High User');
    const [low, high] = await Promise.all([
      pgbench(lowToken, ['-c', '4', '-T', '5', '-f', lowScript]),
      pgbench(highToken, ['-c', '4', '-T', '5', '-f', highScript]),
    ]);
    expect(low.code, low.stderr).toBe(0);
    expect(high.code, high.stderr).toBe(0);

    const direct = await connect(env.database.url('superuser'));
    const result = await direct.query<{ history: string; audited: string; wrong: string; unattributed: string }>(
      `SELECT (SELECT count(*) FROM pgbench_history) AS history,
              count(*) AS audited,
              count(*) FILTER (WHERE username <> CASE WHEN (new->>'aid')::int <= $1 THEN 'low-user' ELSE 'high-user' END) AS wrong,
              count(*) FILTER (WHERE NOT attributed) AS unattributed
         FROM audit.edits WHERE tablename = 'public.pgbench_accounts'`,
      [half],
    );
    await direct.end();
    const counts = result.rows[0];
    expect(Number(counts.history)).toBeGreaterThan(0);
    expect(counts.audited).toBe(counts.history);
    expect(counts.wrong).toBe('0');
    expect(counts.unattributed).toBe('0');
  }, 60_000);
});
