// Named prepared statements survive transaction pooling: a statement a client prepared is
// prepared again, unseen, on whichever server connection its next transaction lands.
import { serialize } from 'pg-protocol';
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { hasProgram, runCommand } from '../helpers/commands.ts';
import { connect } from '../helpers/postgres.ts';
import { createProxyEnvironment, dropServerConnections as dropConnections, initPgbench, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { dataRows, firstError, login, RawConnection, type BackendMessage } from '../helpers/raw-client.ts';

const pgbenchMissing = !hasProgram('pgbench');
if (pgbenchMissing) console.warn('pgbench not found: pgbench -M tests skipped (install the Debian package postgresql-client)');

function types(messages: BackendMessage[]): string {
  return messages.map((message) => message.type).join('');
}

describe('prepared statements through the proxy', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('prepared', { pool: { size: 2 } });
    const owner = await connect(env.database.url());
    await owner.query(`
      CREATE TABLE items (id int PRIMARY KEY, label text);
      INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
      SELECT audit.enable('items');
    `);
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  const dropServerConnections = () => dropConnections(env);

  async function rawClient(): Promise<RawConnection> {
    const connection = await RawConnection.open(env.proxy.host, env.proxy.port);
    await login(connection, { user: 'app', database: env.database.name }, await env.token('raw-1', 'Raw One'));
    return connection;
  }

  it('prepares a statement again where the next transaction lands', async () => {
    const client = await rawClient();
    client.send(Buffer.concat([serialize.parse({ name: 's1', text: 'SELECT label FROM items WHERE id = $1', types: [23] }), serialize.sync()]));
    expect(types(await client.readUntil('Z', 5000))).toBe('1Z');

    await dropServerConnections();
    client.send(Buffer.concat([serialize.bind({ statement: 's1', values: ['7'] }), serialize.execute({}), serialize.sync()]));
    const bound = await client.readUntil('Z', 5000);
    expect(types(bound)).toBe('2DCZ');
    expect(dataRows(bound)).toEqual([['item 7']]);

    await dropServerConnections();
    client.send(Buffer.concat([serialize.describe({ type: 'S', name: 's1' }), serialize.sync()]));
    expect(types(await client.readUntil('Z', 5000))).toBe('tTZ');
    client.destroy();
  });

  it('rejects a second Parse of the same name with 42P05', async () => {
    const client = await rawClient();
    client.send(Buffer.concat([serialize.parse({ name: 's1', text: 'SELECT 1' }), serialize.sync()]));
    expect(types(await client.readUntil('Z', 5000))).toBe('1Z');
    client.send(Buffer.concat([serialize.parse({ name: 's1', text: 'SELECT 2' }), serialize.sync()]));
    const again = await client.readUntil('Z', 5000);
    expect(types(again)).toBe('EZ');
    expect(firstError(again)?.get('C')).toBe('42P05');
    client.destroy();
  });

  it('rolls back the batch in which the proxy rejected a Parse', async () => {
    const client = await rawClient();
    client.send(Buffer.concat([serialize.parse({ name: 'dup', text: 'SELECT 1' }), serialize.sync()]));
    await client.readUntil('Z', 5000);
    client.send(
      Buffer.concat([
        serialize.parse({ text: "UPDATE items SET label = 'changed' WHERE id = 1" }),
        serialize.bind({}),
        serialize.execute({}),
        serialize.parse({ name: 'dup', text: 'SELECT 2' }),
        serialize.bind({ statement: 'dup' }),
        serialize.execute({}),
        serialize.sync(),
      ]),
    );
    const replies = await client.readUntil('Z', 5000);
    expect(types(replies)).toBe('12CEZ');
    expect(firstError(replies)?.get('C')).toBe('42P05');
    const direct = await connect(env.database.url());
    const label = await direct.query('SELECT label FROM items WHERE id = 1');
    await direct.end();
    expect(label.rows[0].label).toBe('item 1');
    client.destroy();
  });

  it('rejects Bind of a closed statement with 26000', async () => {
    const client = await rawClient();
    client.send(Buffer.concat([serialize.parse({ name: 's1', text: 'SELECT 1' }), serialize.sync()]));
    expect(types(await client.readUntil('Z', 5000))).toBe('1Z');
    client.send(Buffer.concat([serialize.close({ type: 'S', name: 's1' }), serialize.sync()]));
    expect(types(await client.readUntil('Z', 5000))).toBe('3Z');
    client.send(Buffer.concat([serialize.bind({ statement: 's1' }), serialize.execute({}), serialize.sync()]));
    const replies = await client.readUntil('Z', 5000);
    expect(types(replies)).toBe('EZ');
    expect(firstError(replies)?.get('C')).toBe('26000');
    const after = await client.readUntil('Z', 10).catch(() => null);
    expect(after).toBeNull();
    client.destroy();
  });

  it('runs postgres.js with its defaults and attributes every write', async () => {
    const sql = postgres({
      host: env.proxy.host,
      port: env.proxy.port,
      database: env.database.name,
      username: 'app',
      password: await env.token('pjs-1', 'Postgres Js'),
      max: 6,
      connect_timeout: 10,
      onnotice: () => {},
    });
    try {
      const reads = Array.from({ length: 60 }, (_, index) => sql`SELECT label FROM items WHERE id = ${(index % 100) + 1}`);
      const rows = await Promise.all(reads);
      expect(rows.every((result) => result.length === 1)).toBe(true);
      await dropServerConnections();
      await Promise.all(
        Array.from({ length: 6 }, (_, index) =>
          sql.begin(async (transaction) => {
            await transaction`UPDATE items SET label = ${`pjs ${index}`} WHERE id = ${index + 10}`;
            await transaction`UPDATE items SET label = label || '!' WHERE id = ${index + 10}`;
          }),
        ),
      );
    } finally {
      await sql.end({ timeout: 5 });
    }
    const direct = await connect(env.database.url());
    const audit = await direct.query(
      "SELECT count(*)::int AS total, count(*) FILTER (WHERE attributed AND username = 'pjs-1')::int AS mine FROM audit.edits WHERE username = 'pjs-1' OR query LIKE '%label || %'",
    );
    await direct.end();
    expect(audit.rows[0].total).toBe(12);
    expect(audit.rows[0].mine).toBe(12);
  });

  it('reuses node-postgres named statements across transactions', async () => {
    const client = await env.client(await env.token('named-1', 'Named One'));
    const query = { name: 'label-by-id', text: 'SELECT label FROM items WHERE id = $1' };
    expect((await client.query({ ...query, values: [3] })).rows).toEqual([{ label: 'item 3' }]);
    await dropServerConnections();
    expect((await client.query({ ...query, values: [4] })).rows).toEqual([{ label: 'item 4' }]);
    await client.query('BEGIN');
    expect((await client.query({ ...query, values: [5] })).rows).toEqual([{ label: 'item 5' }]);
    await client.query({ name: 'touch', text: 'UPDATE items SET label = label WHERE id = $1', values: [5] });
    await client.query('COMMIT');
    await client.query({ name: 'touch', text: 'UPDATE items SET label = label WHERE id = $1', values: [6] });
    const direct = await connect(env.database.url());
    const audit = await direct.query("SELECT count(*)::int AS n FROM audit.edits WHERE username = 'named-1' AND attributed");
    await direct.end();
    expect(audit.rows[0].n).toBe(2);
  });

  it('closes the least recently used statement beyond the cache size', async () => {
    await env.proxy.close();
    const small = await createProxyEnvironment('prepared_small', { pool: { size: 1, prepared_statement_cache_size: 3 } });
    try {
      const client = await small.client(await small.token('cache-1'));
      for (let round = 0; round < 2; round++) {
        for (let index = 0; index < 6; index++) {
          const result = await client.query({ name: `q${index}`, text: `SELECT ${index}::int AS n` });
          expect(result.rows).toEqual([{ n: index }]);
        }
      }
      const connection = [...small.proxy.proxy.writePool.idle][0];
      expect(connection.statementCache.size).toBe(3);
      const server = await client.query('SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE $1', ['pg_audit_proxy\\_%\\_%']);
      expect(server.rows[0].n).toBeLessThanOrEqual(3);
    } finally {
      await small.close();
    }
  });
});

describe.skipIf(pgbenchMissing)('pgbench with prepared and extended protocols', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('prepared_pgbench', { pool: { size: 4 } });
    await initPgbench(env);
  }, 180_000);

  afterAll(async () => {
    await env?.close();
  });

  // One pgbench thread per client: pgbench prepares statements synchronously, so a thread
  // driving several clients would block on one client's wait for a server connection that
  // its other clients hold.
  it.each(['prepared', 'extended'])('attributes pgbench -M %s on a small pool', async (mode) => {
    const admin = await connect(env.database.url('superuser'));
    await admin.query('TRUNCATE pgbench_history');
    await admin.query('DELETE FROM audit.edits');
    const token = await env.token(`bench-${mode}`);
    const run = await runCommand(
      'pgbench',
      ['-n', '-M', mode, '-c', '16', '-j', '16', '-T', '5', '-h', env.proxy.host, '-p', String(env.proxy.port), '-U', 'bench', env.database.name],
      { env: { PGPASSWORD: token, PGCONNECT_TIMEOUT: '10' }, timeoutMs: 120_000 },
    );
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/number of failed transactions: 0 /);
    const counts = await admin.query(
      `SELECT (SELECT count(*) FROM pgbench_history)::int AS history,
              count(*)::int AS audited,
              count(*) FILTER (WHERE attributed AND username = $1)::int AS mine
         FROM audit.edits WHERE tablename = 'public.pgbench_accounts'`,
      [`bench-${mode}`],
    );
    await admin.end();
    expect(counts.rows[0].history).toBeGreaterThan(0);
    expect(counts.rows[0].audited).toBe(counts.rows[0].history);
    expect(counts.rows[0].mine).toBe(counts.rows[0].history);
  }, 60_000);
});
