// Session state one client creates without a command tag the proxy watches (SELECT
// set_config, DO blocks) must not reach the next client.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { asOwner } from './helpers.ts';

describe('session state leaking between clients on one server connection', () => {
  let env: ProxyEnvironment;
  let mallory: string;
  let ada: string;

  beforeEach(async () => {
    env = await createProxyEnvironment('atk_leak', { pool: { size: 1 } });
    mallory = await env.token('mallory-666', 'Mallory');
    ada = await env.token('ada-42', 'Ada Lovelace');
    await asOwner(env, 'CREATE TABLE accounts (id serial PRIMARY KEY, note text)');
  });

  afterEach(async () => {
    await env?.close();
  });

  it('keeps set_config in a SELECT from the next client', async () => {
    const first = await env.client(mallory);
    const before = await first.query('SHOW statement_timeout');
    await first.query(`SELECT set_config('statement_timeout', '4321', false)`);
    const second = await env.client(ada);
    const seen = await second.query('SHOW statement_timeout');
    expect(seen.rows[0].statement_timeout).toBe(before.rows[0].statement_timeout);
  });

  it('keeps a SET inside DO from the next client', async () => {
    const first = await env.client(mallory);
    await first.query(`DO $$ BEGIN SET search_path = pg_catalog; END $$`);
    const second = await env.client(ada);
    const seen = await second.query('SHOW search_path');
    expect(seen.rows[0].search_path).toBe('"$user", public');
  });

});
