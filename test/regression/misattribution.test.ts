// A client's own statements that clear or change its identity (RESET ALL, set_config) must
// not leave its later writes unattributed or attributed to someone else.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { asOwner, auditRowsFor } from './helpers.ts';

describe('identity kept through a client\'s own statements', () => {
  let env: ProxyEnvironment;
  let ada: string;
  let grace: string;

  beforeAll(async () => {
    env = await createProxyEnvironment('atk_mis', { pool: { size: 1 } });
    ada = await env.token('ada-42', 'Ada Lovelace');
    grace = await env.token('grace-7', 'Grace Hopper');
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterAll(async () => {
    await env?.close();
  });

  it('restores the identity after RESET ALL in a pinned session', async () => {
    const client = await env.client(ada);
    await client.query('LISTEN some_channel'); // pins the client: its lease is now the whole session
    await client.query('RESET ALL');
    await client.query("INSERT INTO accounts (note) VALUES ('pinned-reset-all')");
    const rows = await auditRowsFor(env, 'pinned-reset-all');
    await client.end();
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'ada-42', attributed: true });
  });

  it('restores the identity after RESET ALL inside a transaction', async () => {
    const client = await env.client(ada);
    await client.query('BEGIN');
    await client.query('RESET ALL');
    await client.query("INSERT INTO accounts (note) VALUES ('tx-reset-all')");
    await client.query('COMMIT');
    const rows = await auditRowsFor(env, 'tx-reset-all');
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'ada-42', attributed: true });
  });

  it('a client cannot write another user name into the audit trail with set_config', async () => {
    const client = await env.client(ada);
    await client.query(`SELECT set_config('pg_audit_proxy.identity', '{"empnum":"grace-7","fullname":"Grace Hopper"}', false)`);
    await client.query("INSERT INTO accounts (note) VALUES ('forged-set-config')");
    const rows = await auditRowsFor(env, 'forged-set-config');
    expect(rows).toHaveLength(1);
    expect(rows[0].username).not.toBe('grace-7');
  });

  it('restores an identity cleared by set_config in a SELECT', async () => {
    const client = await env.client(grace);
    await client.query(`SELECT set_config('pg_audit_proxy.identity', '', false)`);
    // A later, separate transaction: a new lease, which should carry the identity again.
    await client.query("INSERT INTO accounts (note) VALUES ('cleared-by-select')");
    const rows = await auditRowsFor(env, 'cleared-by-select');
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'grace-7', attributed: true });
  });
});
