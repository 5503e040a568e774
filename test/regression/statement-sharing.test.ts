// Server-side prepared statements live in the server session, which clients share.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { asOwner, auditRowsFor } from './helpers.ts';

describe('prepared statements on a shared server connection', () => {
  let env: ProxyEnvironment;

  beforeEach(async () => {
    env = await createProxyEnvironment('atk_stmt', { pool: { size: 1 } });
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterEach(async () => {
    await env?.close();
  });

  it('a client that deallocates the proxy\'s statement in a DO block cannot make the next client write under its chosen identity', async () => {
    const mallory = await env.client(await env.token('mallory-666', 'Mallory'));
    const ada = await env.client(await env.token('ada-42', 'Ada Lovelace'));
    await ada.query('SELECT 1'); // the proxy's statements now exist on the only server connection
    await mallory.query(`
      SELECT set_config('pg_audit_proxy.identity', '{"empnum":"framed-9","fullname":"Framed"}', false);
      DO $$ BEGIN EXECUTE 'DEALLOCATE pg_audit_proxy_set_parameters'; END $$;
    `);
    await ada.query("INSERT INTO accounts (note) VALUES ('after-deallocate')").catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, 200));
    const rows = await auditRowsFor(env, 'after-deallocate');
    for (const row of rows) expect(row).toMatchObject({ username: 'ada-42', attributed: true });
  });
});
