// Every edit made through the proxy is recorded with the identity of the token that made
// it, whatever client and statement shape, under both identity carriers.
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { hasProgram, runCommand } from '../helpers/commands.ts';
import { connect } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';

const psqlMissing = !hasProgram('psql');
if (psqlMissing) console.warn('psql not found: psql tests skipped (install the Debian package postgresql-client)');

interface AuditRow {
  tablename: string;
  username: string;
  fullname: string | null;
  action: string;
  attributed: boolean;
}

describe.each(['settings', 'temp_table'] as const)('attribution with the %s carrier', (carrier) => {
  let env: ProxyEnvironment;
  let adaToken: string;

  beforeAll(async () => {
    env = await createProxyEnvironment(`attr_${carrier}`, { identity: { carrier }, pool: { size: 1 } });
    adaToken = await env.token('ada-42', 'Ada Lovelace');
    const owner = await connect(env.database.url());
    await owner.query(`
      CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL DEFAULT 0);
      SELECT audit.enable('accounts');
      CREATE FUNCTION bump(target int) RETURNS int LANGUAGE sql VOLATILE AS
        'UPDATE accounts SET balance = balance + 1 WHERE id = target RETURNING balance';
    `);
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  /** Audit rows whose `query` contains `marker`, read over a direct connection. */
  async function auditRowsFor(marker: string): Promise<AuditRow[]> {
    const direct = await connect(env.database.url());
    try {
      const result = await direct.query<AuditRow>(
        'SELECT tablename, username, fullname, action, attributed FROM audit.edits WHERE query LIKE $1 ORDER BY id',
        [`%${marker}%`],
      );
      return result.rows;
    } finally {
      await direct.end();
    }
  }

  function expectAllByAda(rows: AuditRow[], count: number): void {
    expect(rows).toHaveLength(count);
    for (const row of rows) {
      expect(row.attributed).toBe(true);
      expect(row.username).toBe('ada-42');
      expect(row.fullname).toBe('Ada Lovelace');
    }
  }

  it('attributes a simple query from node-postgres', async () => {
    const client = await env.client(adaToken);
    await client.query('INSERT INTO accounts VALUES (1, 10) /* simple-insert */');
    expectAllByAda(await auditRowsFor('simple-insert'), 1);
  });

  it('attributes a parameterized query from node-postgres', async () => {
    const client = await env.client(adaToken);
    await client.query('INSERT INTO accounts VALUES ($1, $2) /* param-insert */', [2, 20]);
    await client.query('UPDATE accounts SET balance = $1 WHERE id = $2 /* param-insert */', [21, 2]);
    const rows = await auditRowsFor('param-insert');
    expectAllByAda(rows, 2);
    expect(rows.map((row) => row.action)).toEqual(['I', 'U']);
  });

  it('attributes postgres.js queries without prepared statements', async () => {
    const token = await env.token('grace-7', 'Grace Hopper');
    const sql = postgres({
      host: env.proxy.host,
      port: env.proxy.port,
      database: env.database.name,
      username: 'app',
      password: token,
      prepare: false,
      max: 2,
      connect_timeout: 10,
      onnotice: () => {},
    });
    try {
      await sql`INSERT INTO accounts VALUES (${3}, ${30}) /* postgresjs-insert */`;
      await sql.begin(async (transaction) => {
        await transaction`UPDATE accounts SET balance = 31 WHERE id = 3 /* postgresjs-insert */`;
      });
    } finally {
      await sql.end({ timeout: 5 });
    }
    const rows = await auditRowsFor('postgresjs-insert');
    expect(rows).toHaveLength(2);
    for (const row of rows) {
      expect(row.username).toBe('grace-7');
      expect(row.fullname).toBe('Grace Hopper');
      expect(row.attributed).toBe(true);
    }
  });

  it('attributes writes in functions, writable CTEs, DO blocks and after ROLLBACK TO SAVEPOINT', async () => {
    const client = await env.client(adaToken);
    await client.query('INSERT INTO accounts VALUES (4, 0) /* shapes */');
    await client.query('SELECT bump(4) /* shapes */');
    await client.query('WITH moved AS (UPDATE accounts SET balance = balance + 1 WHERE id = 4 RETURNING id) SELECT count(*) FROM moved /* shapes */');
    await client.query("DO $$ BEGIN UPDATE accounts SET balance = balance + 1 WHERE id = 4; END $$ /* shapes */");
    await client.query('BEGIN');
    await client.query('SAVEPOINT before_bump');
    await client.query('UPDATE accounts SET balance = balance + 100 WHERE id = 4 /* shapes-undone */');
    await client.query('ROLLBACK TO SAVEPOINT before_bump');
    await client.query('UPDATE accounts SET balance = balance + 1 WHERE id = 4 /* shapes */');
    await client.query('COMMIT');
    expectAllByAda(await auditRowsFor('shapes */'), 5);
    expect(await auditRowsFor('shapes-undone')).toHaveLength(0);
  });

  it('keeps two users apart on a shared server connection', async () => {
    const graceToken = await env.token('grace-7', 'Grace Hopper');
    const ada = await env.client(adaToken);
    const grace = await env.client(graceToken);
    await ada.query('INSERT INTO accounts VALUES (5, 0) /* two-users */');
    for (let round = 0; round < 10; round++) {
      await ada.query('UPDATE accounts SET balance = balance + 1 WHERE id = 5 /* two-users ada */');
      await grace.query('UPDATE accounts SET balance = balance + 1 WHERE id = 5 /* two-users grace */');
    }
    const adaRows = await auditRowsFor('two-users ada');
    const graceRows = await auditRowsFor('two-users grace');
    expectAllByAda(adaRows, 10);
    expect(graceRows).toHaveLength(10);
    for (const row of graceRows) expect(row.username).toBe('grace-7');
  });

  it('shows exactly the client identity in userinfo', async () => {
    const client = await env.client(adaToken);
    const result = await client.query('SELECT fullname, empnum FROM userinfo');
    expect(result.rows).toEqual([{ fullname: 'Ada Lovelace', empnum: 'ada-42' }]);
  });

  it('reports the same SQLSTATE and position as a direct connection', async () => {
    const statement = 'SELECT 1 FROM accounts WHERE no_such_column = 1';
    const direct = await connect(env.database.url());
    const directError = await direct.query(statement).then(() => null, (error: { code: string; position: string }) => error);
    await direct.end();
    const client = await env.client(adaToken);
    const proxiedError = await client.query(statement).then(() => null, (error: { code: string; position: string }) => error);
    expect(proxiedError?.code).toBe('42703');
    expect(proxiedError?.code).toBe(directError?.code);
    expect(proxiedError?.position).toBe(directError?.position);
    const after = await client.query('SELECT 1 AS one');
    expect(after.rows).toEqual([{ one: 1 }]);
  });

  it('runs statements that need their own transaction as on a direct connection', async () => {
    const client = await env.client(adaToken);
    await client.query('VACUUM accounts');
    await client.query('CREATE INDEX CONCURRENTLY IF NOT EXISTS accounts_balance ON accounts (balance)');
    await client.query('BEGIN READ ONLY');
    const readOnly = await client.query('SHOW transaction_read_only');
    expect(readOnly.rows[0].transaction_read_only).toBe('on');
    await client.query('COMMIT');
    await client.query('BEGIN');
    await client.query('SET TRANSACTION ISOLATION LEVEL SERIALIZABLE');
    const isolation = await client.query('SHOW transaction_isolation');
    expect(isolation.rows[0].transaction_isolation).toBe('serializable');
    await client.query('UPDATE accounts SET balance = balance + 1 WHERE id = 1 /* serializable */');
    await client.query('COMMIT');
    expectAllByAda(await auditRowsFor('serializable'), 1);
  });

  it.skipIf(carrier !== 'settings')('prepares and commits a two-phase transaction', async () => {
    const client = await env.client(adaToken);
    const gid = `gid_${Date.now()}`;
    await client.query('BEGIN');
    await client.query('UPDATE accounts SET balance = balance + 1 WHERE id = 1 /* two-phase */');
    await client.query(`PREPARE TRANSACTION '${gid}'`);
    await client.query(`COMMIT PREPARED '${gid}'`);
    expectAllByAda(await auditRowsFor('two-phase'), 1);
  });

  it.skipIf(psqlMissing)('attributes psql statements, transactions and savepoints', async () => {
    const owner = await connect(env.database.url());
    await owner.query('INSERT INTO accounts VALUES (100, 0), (101, 0) ON CONFLICT DO NOTHING');
    await owner.end();

    const run = (args: string[], input?: string) =>
      runCommand('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', env.proxyUrl('ada'), ...args], {
        env: { PGPASSWORD: adaToken, PGCONNECT_TIMEOUT: '10' },
        input,
      });

    const multi = await run(['-c', 'UPDATE accounts SET balance = 1 WHERE id = 100 /* psql-multi */; COMMIT; UPDATE accounts SET balance = 2 WHERE id = 101 /* psql-multi */']);
    expect(multi.code, multi.stderr).toBe(0);
    expectAllByAda(await auditRowsFor('psql-multi'), 2);

    const script = [
      'BEGIN;',
      'UPDATE accounts SET balance = 3 WHERE id = 100 /* psql-tx */;',
      'SAVEPOINT s1;',
      'UPDATE accounts SET balance = 4 WHERE id = 100 /* psql-undone */;',
      'ROLLBACK TO SAVEPOINT s1;',
      'UPDATE accounts SET balance = 5 WHERE id = 101 /* psql-tx */;',
      'COMMIT;',
      'BEGIN;',
      'UPDATE accounts SET balance = 6 WHERE id = 100 /* psql-undone */;',
      'ROLLBACK;',
      '',
    ].join('\n');
    const transactions = await run(['-f', '-'], script);
    expect(transactions.code, transactions.stderr).toBe(0);
    expectAllByAda(await auditRowsFor('psql-tx'), 2);
    expect(await auditRowsFor('psql-undone')).toHaveLength(0);
  });
});
