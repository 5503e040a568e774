// When the proxy's own lease setup fails on the server, the client's messages must not run
// with the identity of the previous client of that connection.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { asOwner, auditRowsFor } from './helpers.ts';

describe('a failing parameter replay at lease start', () => {
  let env: ProxyEnvironment;

  beforeEach(async () => {
    env = await createProxyEnvironment('atk_replay', { pool: { size: 1 } });
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterEach(async () => {
    await env?.close();
  });

  it('does not let the client\'s write run under the previous client\'s identity', async () => {
    const mallory = await env.client(await env.token('mallory-666', 'Mallory'));
    const ada = await env.client(await env.token('ada-42', 'Ada Lovelace'));

    // Mallory keeps a setting whose value stops being valid once the object it names is gone.
    await mallory.query('CREATE TEXT SEARCH CONFIGURATION public.mallory_cfg (COPY = pg_catalog.simple)');
    await mallory.query("SET default_text_search_config = 'public.mallory_cfg'");
    await mallory.query('DROP TEXT SEARCH CONFIGURATION public.mallory_cfg');

    // Ada uses the only server connection: it now carries Ada's identity.
    await ada.query('SELECT 1');

    // Mallory's next lease: the replay of default_text_search_config fails, so the identity
    // in the same statement is not set either, but the INSERT right behind it still runs.
    const outcome = await mallory.query("INSERT INTO accounts (note) VALUES ('replay-failed-insert')").then(() => 'ok', (error: Error) => error.message);
    console.log('mallory insert outcome:', outcome);
    await new Promise((resolve) => setTimeout(resolve, 200));

    const rows = await auditRowsFor(env, 'replay-failed-insert');
    for (const row of rows) expect(row.username).not.toBe('ada-42');
    // The write should either be refused or be recorded as Mallory's.
    expect(rows.every((row) => row.username === 'mallory-666')).toBe(true);
  });
});
