// Attacks on the temp_table identity carrier: one client tampering with what the next
// client on the same server connection is attributed as, and leases that end too early.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { withTimeout } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { asOwner, auditRowsFor } from './helpers.ts';

describe('temp_table carrier: the next client keeps its own identity', () => {
  let env: ProxyEnvironment;
  let mallory: string;
  let ada: string;

  // A fresh proxy and database for each test, so what one attack leaves on the single
  // server connection cannot affect the next test.
  beforeEach(async () => {
    env = await createProxyEnvironment('atk_tt', { identity: { carrier: 'temp_table' }, pool: { size: 1 } });
    mallory = await env.token('mallory-666', 'Mallory');
    ada = await env.token('ada-42', 'Ada Lovelace');
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterEach(async () => {
    await env?.close();
  });

  it('ignores a settings-carrier value left by the previous client', async () => {
    const attacker = await env.client(mallory);
    await attacker.query(`SELECT set_config('pg_audit_proxy.identity', '{"empnum":"framed-9","fullname":"Framed"}', false)`);
    const victim = await env.client(ada);
    await victim.query("INSERT INTO accounts (note) VALUES ('tt-settings-override')");
    await attacker.end();
    await victim.end();
    const rows = await auditRowsFor(env, 'tt-settings-override');
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'ada-42', fullname: 'Ada Lovelace', attributed: true });
  });

  it('rebuilds a userinfo table a client put a trigger on', async () => {
    const attacker = await env.client(mallory);
    await attacker.query(`
      CREATE FUNCTION pg_temp.forge() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN NEW.empnum := 'framed-9'; NEW.fullname := 'Framed'; RETURN NEW; END $$;
      CREATE TRIGGER forge BEFORE INSERT ON pg_temp.userinfo FOR EACH ROW EXECUTE FUNCTION pg_temp.forge();
    `);
    const victim = await env.client(ada);
    await victim.query("INSERT INTO accounts (note) VALUES ('tt-trigger-forge')");
    await attacker.end();
    await victim.end();
    const rows = await auditRowsFor(env, 'tt-trigger-forge');
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'ada-42', fullname: 'Ada Lovelace', attributed: true });
  });

  it('a client that drops its userinfo table does not break the next client', async () => {
    const attacker = await env.client(mallory);
    await attacker.query('DROP TABLE pg_temp.userinfo');
    const victim = await env.client(ada);
    await withTimeout(victim.query("INSERT INTO accounts (note) VALUES ('tt-dropped')"), 10_000, 'victim insert');
    await attacker.end();
    await victim.end();
    const rows = await auditRowsFor(env, 'tt-dropped');
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ username: 'ada-42', attributed: true });
  });
});

describe('temp_table carrier: two clients sharing one server connection', () => {
  let env: ProxyEnvironment;

  beforeAll(async () => {
    env = await createProxyEnvironment('atk_tt2', { identity: { carrier: 'temp_table' }, pool: { size: 1, checkout_timeout: '3s' } });
    await asOwner(env, `CREATE TABLE accounts (id serial PRIMARY KEY, note text); SELECT audit.enable('accounts');`);
  });

  afterAll(async () => {
    await env?.close();
  });

  it('both clients make progress when they write at the same time', async () => {
    const ada = await env.client(await env.token('ada-42', 'Ada Lovelace'));
    const grace = await env.client(await env.token('grace-7', 'Grace Hopper'));
    const work = async (client: typeof ada, label: string) => {
      for (let i = 0; i < 5; i++) await client.query(`INSERT INTO accounts (note) VALUES ('tt-concurrent ${label}')`);
    };
    await withTimeout(Promise.all([work(ada, 'ada'), work(grace, 'grace')]), 15_000, 'two concurrent writers');
    const adaRows = await auditRowsFor(env, 'tt-concurrent ada');
    const graceRows = await auditRowsFor(env, 'tt-concurrent grace');
    expect(adaRows.map((row) => row.username)).toEqual(Array(5).fill('ada-42'));
    expect(graceRows.map((row) => row.username)).toEqual(Array(5).fill('grace-7'));
  });
});
