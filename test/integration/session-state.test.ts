// Session state stays with the client that created it: replayed where it can be, pinned
// or rejected where it cannot, and never handed to another client.
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { hasProgram, runCommand } from '../helpers/commands.ts';
import { connect, withTimeout } from '../helpers/postgres.ts';
import { createProxyEnvironment, dropServerConnections, type ProxyEnvironment } from '../helpers/proxy-env.ts';

const pgbenchMissing = !hasProgram('pgbench');
if (pgbenchMissing) console.warn('pgbench not found: pgbench -C test skipped (install the Debian package postgresql-client)');

/** Server backends of the test database other than the caller, as pg_stat_activity shows them. */
async function serverBackends(env: ProxyEnvironment): Promise<{ state: string; xact_start: Date | null }[]> {
  const admin = await connect(env.database.url('superuser'));
  try {
    const result = await admin.query(
      "SELECT state, xact_start FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
      [env.database.name],
    );
    return result.rows;
  } finally {
    await admin.end();
  }
}

describe('session state on a pool of one', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('session_state', { pool: { size: 1, checkout_timeout: '1s' } });
    const owner = await connect(env.database.url());
    await owner.query('CREATE SCHEMA elsewhere; CREATE TABLE notes (id serial PRIMARY KEY, body text); SELECT audit.enable(\'notes\')');
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  it('keeps one client settings away from the next client', async () => {
    const a = await env.client(await env.token('a-user'));
    await a.query("SET TimeZone = 'Pacific/Auckland'");
    await a.query('SET search_path = elsewhere, public');
    await a.query('SET default_transaction_read_only = on');
    const b = await env.client(await env.token('b-user'));

    const seenByB = await b.query('SELECT current_setting($1) AS tz, current_setting($2) AS path, current_setting($3) AS ro', [
      'TimeZone',
      'search_path',
      'default_transaction_read_only',
    ]);
    expect(seenByB.rows[0].tz).not.toBe('Pacific/Auckland');
    expect(seenByB.rows[0].path).toBe('"$user", public');
    expect(seenByB.rows[0].ro).toBe('off');
    await b.query("INSERT INTO notes (body) VALUES ('written by b')");

    await dropServerConnections(env);
    const seenByA = await a.query('SELECT current_setting($1) AS tz, current_setting($2) AS path, current_setting($3) AS ro', [
      'TimeZone',
      'search_path',
      'default_transaction_read_only',
    ]);
    expect(seenByA.rows[0].tz).toBe('Pacific/Auckland');
    expect(seenByA.rows[0].path).toBe('elsewhere, public');
    expect(seenByA.rows[0].ro).toBe('on');
    await expect(a.query("INSERT INTO notes (body) VALUES ('read only')")).rejects.toMatchObject({ code: '25006' });
    await a.end();
    await b.end();
  });

  it('resets a client session on DISCARD ALL without pinning it', async () => {
    const a = await env.client(await env.token('a-user'), { options: '-c statement_timeout=5s' });
    await a.query("SET TimeZone = 'Asia/Tokyo'");
    await a.query({ name: 'before-discard', text: 'SELECT 1 AS one' });
    await a.query('DISCARD ALL');
    const b = await env.client(await env.token('b-user'));
    expect((await withTimeout(b.query('SELECT 1 AS one'), 5000, 'client B query')).rows).toEqual([{ one: 1 }]);
    const settings = await a.query("SELECT current_setting('TimeZone') AS tz, current_setting('statement_timeout') AS timeout");
    expect(settings.rows[0].tz).not.toBe('Asia/Tokyo');
    expect(settings.rows[0].timeout).toBe('5s');
    expect(env.proxy.logsWith('client pinned to its server connection')).toHaveLength(0);
    await a.end();
    await b.end();
  });

  it('keeps a rejected startup setting away from later clients', async () => {
    const first = await env.client(await env.token('a-user'), { options: '-c search_path=elsewhere' });
    await first.end();
    await expect(env.client(await env.token('a-user'), { options: '-c no_such_setting=1' })).rejects.toMatchObject({ code: '42704' });
    const plain = await env.client(await env.token('b-user'));
    const path = await plain.query('SHOW search_path');
    expect(path.rows[0].search_path).toBe('"$user", public');
    await plain.end();
  });

  it('reports each client its own parameter values', async () => {
    const a = await env.client(await env.token('a-user'), { options: '-c DateStyle=SQL,DMY' });
    const b = await env.client(await env.token('b-user'));
    const aStyle = await a.query('SHOW DateStyle');
    const bStyle = await b.query('SHOW DateStyle');
    expect(aStyle.rows[0].DateStyle).toBe('SQL, DMY');
    expect(bStyle.rows[0].DateStyle).toBe('ISO, MDY');
    await a.end();
    await b.end();
  });

  it('pins a session advisory lock holder', async () => {
    const a = await env.client(await env.token('a-user'));
    await a.query('SELECT pg_advisory_lock(4242)');
    const b = await env.client(await env.token('b-user'));
    await expect(b.query('SELECT 1')).rejects.toMatchObject({ code: '53300' });
    expect(env.proxy.logsWith('client pinned to its server connection').length).toBeGreaterThan(0);

    await a.query('SELECT 1');
    await a.end();
    const rows = await withTimeout(
      (async () => {
        for (;;) {
          try {
            return (await b.query("SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'")).rows;
          } catch {
            await new Promise((resolve) => setTimeout(resolve, 50));
          }
        }
      })(),
      5000,
      'client B getting a server connection',
    );
    expect(rows[0].n).toBe(0);
    await b.query("INSERT INTO notes (body) VALUES ('after the lock')");
    await b.end();
  });

  it('pins a client after SET ROLE', async () => {
    const admin = await connect(env.database.url('superuser'));
    await admin.query("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'notes_reader') THEN CREATE ROLE notes_reader; END IF; END $$");
    await admin.query('GRANT notes_reader TO app_scram');
    await admin.end();

    const a = await env.client(await env.token('a-user'));
    await a.query('SET ROLE notes_reader');
    expect((await a.query('SELECT current_user AS role')).rows[0].role).toBe('notes_reader');
    await a.end();

    const b = await env.client(await env.token('b-user'));
    const role = await withTimeout(b.query('SELECT current_user AS role'), 5000, 'client B query');
    expect(role.rows[0].role).toBe('app_scram');
    await b.end();
  });

  it('pins a client after set_config of role', async () => {
    const a = await env.client(await env.token('a-user'));
    await a.query("SELECT set_config('role', 'notes_reader', false)");
    expect((await a.query('SELECT current_user AS role')).rows[0].role).toBe('notes_reader');
    const logged = env.proxy.logsWith('client pinned to its server connection').filter((line) => line.statement === 'SET ROLE');
    expect(logged.length).toBeGreaterThan(0);
    await a.end();
    const b = await env.client(await env.token('b-user'));
    const role = await withTimeout(b.query('SELECT current_user AS role'), 5000, 'client B query');
    expect(role.rows[0].role).toBe('app_scram');
    await b.end();
  });
});

describe('session state under pool.session_state = reject', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('session_reject', { pool: { size: 1, session_state: 'reject' } });
  });

  afterAll(async () => {
    await env?.close();
  });

  it.each([
    ['LISTEN', 'LISTEN some_channel'],
    ['session advisory lock', 'SELECT pg_advisory_lock(1)'],
    ['PREPARE', 'PREPARE sql_statement AS SELECT 1'],
  ])('rejects %s with 0A000 and keeps the client usable', async (_name, statement) => {
    const client = await env.client(await env.token('r-user'));
    await expect(client.query(statement)).rejects.toMatchObject({ code: '0A000' });
    expect((await client.query('SELECT 1 AS one')).rows).toEqual([{ one: 1 }]);
    const locks = await client.query("SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'");
    expect(locks.rows[0].n).toBe(0);
    await client.end();
  });
});

describe('no leaked or dirty server connections', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('session_leaks', { pool: { size: 4, checkout_timeout: '10s' } });
    const owner = await connect(env.database.url());
    await owner.query("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g; SELECT audit.enable('counters')");
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  it('survives 100 clients that disconnect mid-transaction at random', async () => {
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const token = await env.token('mixed-user');
    const clients = Array.from({ length: 100 }, async (_, index) => {
      const prepared = index % 2 === 0;
      const sql = postgres({
        host: env.proxy.host,
        port: env.proxy.port,
        database: env.database.name,
        username: 'app',
        password: token,
        prepare: prepared,
        max: 1,
        connect_timeout: 10,
        onnotice: () => {},
      });
      try {
        for (let round = 0; round < 3; round++) {
          const id = 1 + Math.floor(random() * 20);
          if (random() < 0.2) {
            // Leave in the middle of a transaction: the proxy must roll it back.
            const reserved = await sql.reserve();
            await reserved`BEGIN`;
            await reserved`UPDATE counters SET n = n + 1000 WHERE id = ${id}`;
            reserved.release();
            await sql.end({ timeout: 0 });
            return;
          }
          await sql.begin(async (transaction) => {
            await transaction`UPDATE counters SET n = n + 1 WHERE id = ${id}`;
          });
        }
      } finally {
        await sql.end({ timeout: 1 });
      }
    });
    await withTimeout(Promise.allSettled(clients), 60_000, '100 clients');

    await withTimeout(
      (async () => {
        for (;;) {
          const backends = await serverBackends(env);
          if (backends.every((backend) => backend.state === 'idle' && backend.xact_start === null)) return;
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      })(),
      10_000,
      'every server connection going idle outside a transaction',
    );
    const backends = await serverBackends(env);
    expect(backends.length).toBeLessThanOrEqual(4);

    const direct = await connect(env.database.url());
    const total = await direct.query('SELECT sum(n)::int AS total FROM counters');
    const audited = await direct.query("SELECT count(*)::int AS n FROM audit.edits WHERE tablename = 'public.counters' AND attributed AND username = 'mixed-user'");
    await direct.end();
    expect(total.rows[0].total).toBeLessThan(1000);
    expect(audited.rows[0].n).toBe(total.rows[0].total);
  }, 90_000);

  it.skipIf(pgbenchMissing)('leaves no dirty server connection after pgbench -C', async () => {
    const token = await env.token('bench-c');
    const run = await runCommand(
      'pgbench',
      ['-n', '-C', '-c', '8', '-j', '8', '-T', '3', '-h', env.proxy.host, '-p', String(env.proxy.port), '-U', 'bench', '-f', '-', env.database.name],
      { env: { PGPASSWORD: token, PGCONNECT_TIMEOUT: '10' }, input: 'SELECT n FROM counters WHERE id = 1;\n', timeoutMs: 60_000 },
    );
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/number of failed transactions: 0 /);
    const backends = await serverBackends(env);
    expect(backends.length).toBeLessThanOrEqual(4);
    for (const backend of backends) {
      expect(backend.state).toBe('idle');
      expect(backend.xact_start).toBeNull();
    }
  }, 60_000);
});
