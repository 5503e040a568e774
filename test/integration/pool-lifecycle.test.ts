// Server connections over a lease's whole life: waiting for one when the pool is exhausted,
// getting it back clean when a client leaves in the middle of its work, and cancelling a
// running statement or a wait.
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { connect, withTimeout } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import {
  cancelRequest,
  dataRows,
  firstError,
  login,
  queryMessage,
  RawConnection,
  simpleQuery,
  terminateMessage,
} from '../helpers/raw-client.ts';
import { backendsOf, pollUntil, waitForRunningStatement } from '../helpers/server-activity.ts';

/** Upper bound for the proxy to reply or clean up after one step of a test. */
const STEP_TIMEOUT_MS = 5000;

async function queryError(client: pg.Client, text: string, values?: unknown[]): Promise<pg.DatabaseError> {
  const outcome = await withTimeout(
    client.query(text, values).then(
      () => null,
      (error: unknown) => error,
    ),
    STEP_TIMEOUT_MS,
    `the query ${JSON.stringify(text)}`,
  );
  if (outcome === null) throw new Error(`the query ${JSON.stringify(text)} succeeded, but it should have failed`);
  if (!(outcome instanceof pg.DatabaseError)) throw outcome;
  return outcome;
}

describe('pool exhausted', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('pool_wait', { pool: { size: 1, checkout_timeout: '300ms' } });
  });

  afterAll(async () => {
    await env?.close();
  });

  /** Logs in A and B, then has A hold the only server connection in an open transaction. */
  async function holdTheOnlyConnection(): Promise<{ holder: pg.Client; waiter: pg.Client }> {
    // Both log in before the holder takes the connection, so only the waiter's query waits.
    const holder = await env.client(await env.token('holder', 'Holder'));
    const waiter = await env.client(await env.token('waiter', 'Waiter'));
    await holder.query('BEGIN');
    await holder.query('SELECT 1');
    return { holder, waiter };
  }

  it('fails a simple query with ERROR 53300 after checkout_timeout', async () => {
    const { holder, waiter } = await holdTheOnlyConnection();
    const error = await queryError(waiter, 'SELECT 1');
    expect(error.code).toBe('53300');
    expect(error.severity).toBe('ERROR');
    await holder.query('COMMIT');
  });

  it('keeps the waiting client usable after 53300', async () => {
    const { holder, waiter } = await holdTheOnlyConnection();
    expect((await queryError(waiter, 'SELECT 1')).code).toBe('53300');
    await holder.query('COMMIT');
    const result = await withTimeout(waiter.query('SELECT 2 AS two'), STEP_TIMEOUT_MS, 'the next query after 53300');
    expect(result.rows).toEqual([{ two: 2 }]);
  });

  it('fails an extended-protocol query with 53300 and keeps the client usable', async () => {
    const { holder, waiter } = await holdTheOnlyConnection();
    expect((await queryError(waiter, 'SELECT $1::int AS value', [1])).code).toBe('53300');
    await holder.query('COMMIT');
    const result = await withTimeout(waiter.query('SELECT $1::int AS value', [3]), STEP_TIMEOUT_MS, 'the next query after 53300');
    expect(result.rows).toEqual([{ value: 3 }]);
  });

  it('keeps the holder transaction intact when another client times out', async () => {
    const { holder, waiter } = await holdTheOnlyConnection();
    const before = await holder.query<{ txid: string }>('SELECT txid_current()::text AS txid');
    expect((await queryError(waiter, 'SELECT 1')).code).toBe('53300');
    const after = await holder.query<{ txid: string }>('SELECT txid_current()::text AS txid');
    expect(after.rows[0].txid).toBe(before.rows[0].txid);
    await holder.query('COMMIT');
  });
});

describe('clients that leave', () => {
  let env: ProxyEnvironment;
  let token: string;
  const START_BALANCE = 1000;

  beforeAll(async () => {
    // One server connection, so anything a departed client leaves behind blocks the next client.
    env = await createProxyEnvironment('pool_leave', { pool: { size: 1, checkout_timeout: '5s' } });
    token = await env.token('ada-42', 'Ada Lovelace');
    const owner = await connect(env.database.url());
    await owner.query(`
      CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
      SELECT audit.enable('accounts');
    `);
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  async function openLoggedIn(): Promise<{ connection: RawConnection; processId: number; secretKey: Buffer }> {
    const connection = await RawConnection.open(env.proxy.host, env.proxy.port);
    const session = await login(connection, { user: 'app', database: env.database.name }, token);
    return { connection, processId: session.processId, secretKey: session.secretKey };
  }

  /** Reads the balance of account `id` over a direct connection. */
  async function balanceOf(id: number): Promise<number> {
    const direct = await connect(env.database.url());
    try {
      const result = await direct.query<{ balance: number }>('SELECT balance FROM accounts WHERE id = $1', [id]);
      return result.rows[0].balance;
    } finally {
      await direct.end();
    }
  }

  async function auditRowCount(marker: string): Promise<number> {
    const direct = await connect(env.database.url());
    try {
      const result = await direct.query<{ count: number }>('SELECT count(*)::int AS count FROM audit.edits WHERE query LIKE $1', [`%${marker}%`]);
      return result.rows[0].count;
    } finally {
      await direct.end();
    }
  }

  /** Waits until no backend of the test database is idle in a transaction. */
  async function waitForNoOpenTransaction(): Promise<void> {
    await pollUntil(
      () => backendsOf(env.database.name),
      (rows) => rows.every((row) => !(row.state ?? '').startsWith('idle in transaction')),
      STEP_TIMEOUT_MS,
      'no backend is idle in transaction',
    );
  }

  const leaveWays: [string, number, (client: pg.Client) => Promise<void>][] = [
    ['client.end()', 1, (client) => client.end()],
    [
      'a destroyed socket',
      2,
      async (client) => {
        // node-postgres exposes its socket only as the untyped connection.stream.
        const stream = (client as unknown as { connection: { stream: { destroy(): void } } }).connection.stream;
        stream.destroy();
      },
    ],
  ];

  it.each(leaveWays)('rolls back the open transaction of a client that leaves by %s', async (way, id, leave) => {
    const owner = await connect(env.database.url());
    await owner.query('INSERT INTO accounts VALUES ($1, $2)', [id, START_BALANCE]);
    await owner.end();
    const marker = `departed-${id}`;

    const departing = await env.client(token);
    await departing.query('BEGIN');
    await departing.query(`UPDATE accounts SET balance = balance + 100 WHERE id = $1 /* ${marker} */`, [id]);
    const during = await backendsOf(env.database.name);
    expect(during.filter((row) => row.state === 'idle in transaction'), 'the transaction is open before the client leaves').toHaveLength(1);

    await leave(departing);

    await waitForNoOpenTransaction();
    const next = await env.client(token);
    await withTimeout(next.query('UPDATE accounts SET balance = balance + 1 WHERE id = $1', [id]), STEP_TIMEOUT_MS, `updating the row the client that left by ${way} had locked`);
    expect(await balanceOf(id)).toBe(START_BALANCE + 1);
    expect(await auditRowCount(marker)).toBe(0);
  });

  it('rolls back a raw client that closes its socket inside a transaction', async () => {
    const id = 3;
    const marker = `departed-raw-${id}`;
    const owner = await connect(env.database.url());
    await owner.query('INSERT INTO accounts VALUES ($1, $2)', [id, START_BALANCE]);
    await owner.end();

    const { connection } = await openLoggedIn();
    expect(firstError(await simpleQuery(connection, 'BEGIN'))).toBeNull();
    const updated = await simpleQuery(connection, `UPDATE accounts SET balance = balance + 100 WHERE id = ${id} /* ${marker} */`);
    expect(firstError(updated)).toBeNull();
    expect(updated.at(-1)?.body.toString('latin1')).toBe('T');
    connection.destroy();

    await waitForNoOpenTransaction();
    const next = await env.client(token);
    await withTimeout(next.query('UPDATE accounts SET balance = balance + 1 WHERE id = $1', [id]), STEP_TIMEOUT_MS, 'updating the row the raw client had locked');
    expect(await balanceOf(id)).toBe(START_BALANCE + 1);
    expect(await auditRowCount(marker)).toBe(0);
  });

  it('rolls back a client that sends Terminate inside a transaction', async () => {
    const id = 4;
    const marker = `departed-terminate-${id}`;
    const owner = await connect(env.database.url());
    await owner.query('INSERT INTO accounts VALUES ($1, $2)', [id, START_BALANCE]);
    await owner.end();

    const { connection } = await openLoggedIn();
    await simpleQuery(connection, 'BEGIN');
    await simpleQuery(connection, `UPDATE accounts SET balance = balance + 100 WHERE id = ${id} /* ${marker} */`);
    connection.send(terminateMessage());
    await withTimeout(connection.closed, STEP_TIMEOUT_MS, 'the proxy closing the connection after Terminate');

    await waitForNoOpenTransaction();
    const next = await env.client(token);
    await withTimeout(next.query('UPDATE accounts SET balance = balance + 1 WHERE id = $1', [id]), STEP_TIMEOUT_MS, 'updating the row the terminated client had locked');
    expect(await balanceOf(id)).toBe(START_BALANCE + 1);
    expect(await auditRowCount(marker)).toBe(0);
  });

  it('returns the server connection of a client that leaves during a long query', async () => {
    const marker = 'departed-long-query';
    const { connection } = await openLoggedIn();
    connection.send(queryMessage(`SELECT pg_sleep(2) /* ${marker} */`));
    await waitForRunningStatement(env.database.name, marker);
    connection.destroy();

    // The pool has one server connection, so this query runs only after the departed client's is returned.
    const next = await env.client(token);
    const result = await withTimeout(next.query('SELECT 1 AS one'), 10_000, 'a query from the next client');
    expect(result.rows).toEqual([{ one: 1 }]);
    const backends = await backendsOf(env.database.name);
    expect(backends.filter((row) => row.query.includes(marker) && row.state === 'active')).toEqual([]);
  });

  it('cancels a running statement with ERROR 57014 and keeps the client usable', async () => {
    const marker = 'cancel-me';
    const { connection, processId, secretKey } = await openLoggedIn();
    try {
      connection.send(queryMessage(`SELECT pg_sleep(10) /* ${marker} */`));
      await waitForRunningStatement(env.database.name, marker);

      const canceller = await RawConnection.open(env.proxy.host, env.proxy.port);
      canceller.send(cancelRequest(processId, secretKey));
      expect(await canceller.readUntilClosed(STEP_TIMEOUT_MS)).toEqual([]);

      const replies = await connection.readUntil('Z', STEP_TIMEOUT_MS);
      expect(firstError(replies)?.get('C')).toBe('57014');
      expect(firstError(replies)?.get('S')).toBe('ERROR');
      expect(replies.filter((message) => message.type === 'Z')).toHaveLength(1);

      expect(dataRows(await simpleQuery(connection, 'SELECT 1', STEP_TIMEOUT_MS))).toEqual([['1']]);
    } finally {
      connection.destroy();
    }
  });

  it('cancels a client waiting for a server connection with ERROR 57014', async () => {
    const holder = await env.client(token);
    const { connection, processId, secretKey } = await openLoggedIn();
    try {
      await holder.query('BEGIN');
      connection.send(queryMessage('SELECT 1'));
      // The wait is the proxy's own: no backend shows it, so watch the pool's queue.
      const pool = env.proxy.proxy.writePool;
      await pollUntil(async () => pool.waiters.length, (waiting) => waiting === 1, STEP_TIMEOUT_MS, 'the client waits for a server connection');

      const canceller = await RawConnection.open(env.proxy.host, env.proxy.port);
      canceller.send(cancelRequest(processId, secretKey));

      // Well before checkout_timeout (5 s), after which the proxy would reply 53300 instead.
      const replies = await connection.readUntil('Z', 2000);
      expect(firstError(replies)?.get('C')).toBe('57014');

      await holder.query('COMMIT');
      expect(dataRows(await simpleQuery(connection, 'SELECT 2', STEP_TIMEOUT_MS))).toEqual([['2']]);
    } finally {
      connection.destroy();
      await holder.query('ROLLBACK').catch(() => {});
    }
  });
});
