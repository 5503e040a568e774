// Protocol regressions: replies that differed from PostgreSQL's, and leases that never ended.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { withTimeout } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { firstError } from '../helpers/raw-client.ts';
import { asOwner, bind, copyData, copyDone, execute, parse, rawClient, readReadies, sync, types } from './helpers.ts';

describe('protocol', () => {
  let env: ProxyEnvironment;
  let ada: string;

  beforeEach(async () => {
    env = await createProxyEnvironment('atk_proto', { pool: { size: 1, checkout_timeout: '2s' } });
    ada = await env.token('ada-42', 'Ada Lovelace');
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterEach(async () => {
    await env?.close();
  });

  it('reuses a name whose Parse failed', async () => {
    const raw = await rawClient(env, ada);
    try {
      raw.send(Buffer.concat([parse('s1', 'SELECT * FROM not_yet_there'), sync()]));
      const first = await readReadies(raw, 1);
      expect(firstError(first)?.get('C')).toBe('42P01');
      await asOwner(env, 'CREATE TABLE not_yet_there (x int)');
      raw.send(Buffer.concat([parse('s1', 'SELECT * FROM not_yet_there'), bind('s1'), execute(), sync()]));
      const second = await readReadies(raw, 1);
      // PostgreSQL never created s1, so this Parse succeeds on a direct connection.
      expect(firstError(second)).toBeNull();
      expect(types(second)).toBe('12CZ');
    } finally {
      raw.destroy();
    }
  });

  it('lets node-postgres retry a failed named query', async () => {
    const client = await env.client(ada);
    const query = { name: 'late-table', text: 'SELECT count(*)::int AS n FROM late_table' };
    await expect(client.query(query)).rejects.toMatchObject({ code: '42P01' });
    await asOwner(env, 'CREATE TABLE late_table (x int)');
    const result = await client.query(query);
    expect(result.rows).toEqual([{ n: 0 }]);
  });

  it('forgets a Parse skipped after an error', async () => {
    const raw = await rawClient(env, ada);
    try {
      raw.send(Buffer.concat([parse('', 'SELECT 1/0'), bind(''), execute(), parse('s2', 'SELECT 2'), sync()]));
      const first = await readReadies(raw, 1);
      expect(firstError(first)?.get('C')).toBe('22012');
      raw.send(Buffer.concat([parse('s2', 'SELECT 2'), bind('s2'), execute(), sync()]));
      const second = await readReadies(raw, 1);
      expect(firstError(second)).toBeNull();
    } finally {
      raw.destroy();
    }
  });

  it('releases the lease after extended COPY FROM STDIN', async () => {
    const raw = await rawClient(env, ada);
    try {
      raw.send(Buffer.concat([parse('', 'COPY accounts (note) FROM STDIN'), bind(''), execute(), sync()]));
      await raw.readUntil('G', 5000);
      raw.send(Buffer.concat([copyData('copied-row\n'), copyDone(), sync()]));
      const replies = await readReadies(raw, 1);
      expect(firstError(replies)).toBeNull();
      // The client is idle now: another client must be able to use the only server connection.
      const other = await env.client(await env.token('grace-7', 'Grace'));
      await withTimeout(other.query('SELECT 1'), 5000, 'second client query');
    } finally {
      raw.destroy();
    }
  });
});
