// The audit schema from sql/, exercised over direct connections (no proxy) as the
// non-superuser application role app_scram, which owns the test database.

import { randomBytes } from 'node:crypto';

import pg from 'pg';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

import { installSql } from '../../src/sql-install.ts';
import {
  adminUrl,
  connect,
  createTestDatabase,
  testServer,
  withAdmin,
  type TestDatabase,
} from '../helpers/postgres.ts';

interface EditRow {
  id: string;
  tablename: string;
  username: string;
  fullname: string | null;
  action: string;
  old: Record<string, unknown> | null;
  new: Record<string, unknown> | null;
  changed: string[] | null;
  query: string | null;
  txid: string;
  recorded: Date;
  db_user: string;
  attributed: boolean;
}

const IDENTITY_SETTING = 'pg_audit_proxy.identity';

let db: TestDatabase;
/** app_scram session that owns public.accounts, which has the audit triggers. */
let app: pg.Client;

beforeAll(async () => {
  db = await createTestDatabase('audit_trigger');
  app = await connect(db.url());
  await app.query('CREATE TABLE public.accounts (id integer PRIMARY KEY, name text, balance numeric)');
  await app.query("SELECT audit.enable('public.accounts')");
});

afterAll(async () => {
  await app?.end();
  await db?.drop();
});

/** Runs `work` on a new app_scram session, so carriers it sets up cannot leak into other tests. */
async function withAppSession<T>(work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = await connect(db.url());
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

async function lastEditId(client: pg.Client = app): Promise<bigint> {
  const result = await client.query<{ id: string | null }>('SELECT max(id) AS id FROM audit.edits');
  return BigInt(result.rows[0]?.id ?? 0);
}

/** Returns the audit rows written after `afterId` that `client` can see, oldest first. */
async function editsAfter(afterId: bigint, client: pg.Client = app): Promise<EditRow[]> {
  const result = await client.query<EditRow>('SELECT * FROM audit.edits WHERE id > $1 ORDER BY id', [
    afterId.toString(),
  ]);
  return result.rows;
}

/**
 * Runs `statement` on `client` and returns the audit rows it wrote, read on the same session
 * so that rows of an open transaction count.
 */
async function recordedBy(client: pg.Client, statement: string, values: unknown[] = []): Promise<EditRow[]> {
  const before = await lastEditId(client);
  await client.query(statement, values);
  return editsAfter(before, client);
}

async function setIdentity(client: pg.Client, value: string): Promise<void> {
  await client.query('SELECT set_config($1, $2, false)', [IDENTITY_SETTING, value]);
}

/** Creates the temp_table carrier the way the proxy does and fills it with `rows`. */
async function createTempUserinfo(client: pg.Client, rows: Array<[string | null, string | null]>): Promise<void> {
  await client.query('CREATE TEMP TABLE userinfo (empnum text, fullname text)');
  await client.query('GRANT SELECT ON pg_temp.userinfo TO PUBLIC');
  for (const [empnum, fullname] of rows) {
    await client.query('INSERT INTO pg_temp.userinfo (empnum, fullname) VALUES ($1, $2)', [empnum, fullname]);
  }
}

async function sqlState(promise: Promise<unknown>): Promise<string | undefined> {
  try {
    await promise;
    return undefined;
  } catch (error) {
    return (error as { code?: string }).code;
  }
}

/** Catalog state of everything sql/ installs, for comparing before and after a re-install. */
async function installedObjects(database: string): Promise<unknown> {
  return withAdmin(database, async (client) => {
    const result = await client.query(`
      SELECT jsonb_build_object(
        'schema', (SELECT jsonb_build_object('oid', n.oid, 'owner', n.nspowner::regrole::text, 'acl', n.nspacl::text)
                   FROM pg_namespace n WHERE n.nspname = 'audit'),
        'owner_role', (SELECT jsonb_build_object('oid', r.oid, 'login', r.rolcanlogin, 'super', r.rolsuper)
                       FROM pg_roles r WHERE r.rolname = 'audit_proxy_owner'),
        'functions', (SELECT jsonb_agg(jsonb_build_object(
                         'signature', p.oid::regprocedure::text, 'oid', p.oid,
                         'owner', p.proowner::regrole::text, 'acl', p.proacl::text,
                         'definition', pg_get_functiondef(p.oid))
                       ORDER BY p.oid::regprocedure::text)
                      FROM pg_proc p WHERE p.pronamespace = 'audit'::regnamespace),
        'relations', (SELECT jsonb_agg(jsonb_build_object(
                         'name', c.relname, 'oid', c.oid, 'kind', c.relkind,
                         'owner', c.relowner::regrole::text, 'acl', c.relacl::text)
                       ORDER BY c.relname)
                      FROM pg_class c WHERE c.relnamespace = 'audit'::regnamespace),
        'columns', (SELECT jsonb_agg(jsonb_build_object(
                       'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
                       'not_null', a.attnotnull, 'identity', a.attidentity)
                     ORDER BY a.attnum)
                    FROM pg_attribute a WHERE a.attrelid = 'audit.edits'::regclass AND a.attnum > 0),
        'userinfo', (SELECT jsonb_build_object(
                        'oid', c.oid, 'owner', c.relowner::regrole::text, 'acl', c.relacl::text,
                        'definition', pg_get_viewdef(c.oid))
                     FROM pg_class c WHERE c.oid = 'public.userinfo'::regclass),
        'triggers', (SELECT jsonb_agg(jsonb_build_object('oid', t.oid, 'name', t.tgname, 'enabled', t.tgenabled)
                      ORDER BY t.tgname)
                     FROM pg_trigger t WHERE t.tgrelid = 'public.accounts'::regclass),
        'edits', (SELECT count(*) FROM audit.edits)
      ) AS objects`);
    return result.rows[0]?.objects;
  });
}

describe('install', () => {
  test('second install changes nothing', async () => {
    await app.query("INSERT INTO accounts VALUES (900, 'kept', 1)");
    const before = await installedObjects(db.name);

    await installSql({ databaseUrl: db.url('superuser'), appRoles: ['app_scram'] });
    await installSql({ databaseUrl: db.url('superuser'), appRoles: ['app_scram'] });

    expect(await installedObjects(db.name)).toEqual(before);
    await app.query('DELETE FROM accounts WHERE id = 900');
  });

  test('concurrent installs both succeed', async () => {
    const before = await installedObjects(db.name);

    await Promise.all([
      installSql({ databaseUrl: db.url('superuser'), appRoles: ['app_scram'] }),
      installSql({ databaseUrl: db.url('superuser'), appRoles: ['app_scram'] }),
    ]);

    expect(await installedObjects(db.name)).toEqual(before);
  });

  test('unknown app role is rejected', async () => {
    const install = installSql({ databaseUrl: db.url('superuser'), appRoles: ['no_such_role_x'] });

    await expect(install).rejects.toThrow(/application role "no_such_role_x" does not exist/);
  });

  test('database owner is the default app role', async () => {
    const name = `audit_default_role_${randomBytes(4).toString('hex')}`;
    await withAdmin(undefined, (client) =>
      client.query(`CREATE DATABASE ${pg.escapeIdentifier(name)} OWNER app_md5 TEMPLATE template0`),
    );
    try {
      const lines: string[] = [];
      await installSql({ databaseUrl: adminUrl(name), appRoles: [], log: (line) => lines.push(line) });

      const privileges = await withAdmin(name, async (client) => {
        const result = await client.query<{ role: string; can_read: boolean; can_enable: boolean }>(`
          SELECT r AS role,
                 has_table_privilege(r, 'audit.edits', 'SELECT') AS can_read,
                 has_function_privilege(r, 'audit.enable(regclass)', 'EXECUTE') AS can_enable
          FROM unnest(ARRAY['app_md5', 'app_scram']) AS r ORDER BY r`);
        return result.rows;
      });
      expect(privileges).toEqual([
        { role: 'app_md5', can_read: true, can_enable: true },
        { role: 'app_scram', can_read: false, can_enable: false },
      ]);
      expect(lines.at(-1)).toBe('sql install: done, application roles: app_md5');
    } finally {
      await withAdmin(undefined, (client) =>
        client.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`),
      );
    }
  });

  test('non-superuser installer can install', async () => {
    const suffix = randomBytes(4).toString('hex');
    const installer = `installer_${suffix}`;
    const name = `audit_installer_${suffix}`;
    const password = randomBytes(12).toString('hex');
    await withAdmin(undefined, async (client) => {
      await client.query(`CREATE ROLE ${installer} LOGIN CREATEROLE PASSWORD '${password}'`);
      await client.query(`CREATE DATABASE ${name} OWNER ${installer} TEMPLATE template0`);
    });
    const installerUrl = new URL(adminUrl(name));
    installerUrl.username = installer;
    installerUrl.password = password;

    try {
      // Before PostgreSQL 16, CREATEROLE alone let a role grant itself any non-superuser role.
      if (testServer().serverVersionNum >= 160000) {
        const withoutGrant = installSql({ databaseUrl: installerUrl.toString(), appRoles: ['app_scram'] });
        await expect(withoutGrant).rejects.toThrow(/may not act as audit_proxy_owner/);
      }

      await withAdmin(undefined, (client) => client.query(`GRANT audit_proxy_owner TO ${installer} WITH ADMIN OPTION`));
      await installSql({ databaseUrl: installerUrl.toString(), appRoles: ['app_scram'] });
      await installSql({ databaseUrl: installerUrl.toString(), appRoles: ['app_scram'] });

      const owners = await withAdmin(name, async (client) => {
        const result = await client.query<{ name: string; owner: string }>(`
          SELECT c.relname AS name, c.relowner::regrole::text AS owner FROM pg_class c
          WHERE c.oid IN ('audit.edits'::regclass, 'public.userinfo'::regclass) ORDER BY 1`);
        return result.rows;
      });
      expect(owners).toEqual([
        { name: 'edits', owner: 'audit_proxy_owner' },
        { name: 'userinfo', owner: installer },
      ]);
    } finally {
      await withAdmin(undefined, async (client) => {
        await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
        await client.query(`DROP ROLE IF EXISTS ${installer}`);
      });
    }
  });
});

describe('recording', () => {
  test('insert records the new row', async () => {
    await app.query('BEGIN');
    const edits = await recordedBy(app, "INSERT INTO accounts VALUES (1, 'Ada', 10.50)");
    const txid = await app.query<{ txid: string }>('SELECT txid_current()::text AS txid');
    await app.query('COMMIT');

    expect(edits).toHaveLength(1);
    const edit = edits[0]!;
    expect(edit.action).toBe('I');
    expect(edit.tablename).toBe('public.accounts');
    expect(edit.old).toBeNull();
    expect(edit.new).toEqual({ id: 1, name: 'Ada', balance: 10.5 });
    expect(edit.changed).toBeNull();
    expect(edit.query).toBe("INSERT INTO accounts VALUES (1, 'Ada', 10.50)");
    expect(edit.txid).toBe(txid.rows[0]?.txid);
    expect(edit.recorded).toBeInstanceOf(Date);
    expect(edit.db_user).toBe('app_scram');
  });

  test('update records changed columns', async () => {
    await app.query("INSERT INTO accounts VALUES (2, 'Bob', 5)");

    const edits = await recordedBy(app, "UPDATE accounts SET name = 'Robert', balance = 5.0 WHERE id = 2");

    expect(edits).toHaveLength(1);
    expect(edits[0]?.action).toBe('U');
    expect(edits[0]?.old).toEqual({ id: 2, name: 'Bob', balance: 5 });
    expect(edits[0]?.new).toEqual({ id: 2, name: 'Robert', balance: 5 });
    // 5 to 5.0 changes the stored numeric's scale, so balance counts as changed.
    expect(edits[0]?.changed).toEqual(['name', 'balance']);
  });

  test('update to same values records no columns', async () => {
    await app.query("INSERT INTO accounts VALUES (3, 'Cy', 7)");

    const edits = await recordedBy(app, 'UPDATE accounts SET name = name WHERE id = 3');

    expect(edits).toHaveLength(1);
    expect(edits[0]?.changed).toEqual([]);
  });

  test('delete records the old row', async () => {
    await app.query("INSERT INTO accounts VALUES (4, 'Dee', 1)");

    const edits = await recordedBy(app, 'DELETE FROM accounts WHERE id = 4');

    expect(edits).toHaveLength(1);
    expect(edits[0]?.action).toBe('D');
    expect(edits[0]?.old).toEqual({ id: 4, name: 'Dee', balance: 1 });
    expect(edits[0]?.new).toBeNull();
    expect(edits[0]?.changed).toBeNull();
  });

  test('truncate records one row', async () => {
    await app.query('CREATE TABLE public.scratch (id integer)');
    await app.query("SELECT audit.enable('public.scratch')");
    await app.query('INSERT INTO scratch SELECT generate_series(1, 3)');

    const edits = await recordedBy(app, 'TRUNCATE scratch');

    expect(edits).toHaveLength(1);
    expect(edits[0]?.action).toBe('T');
    expect(edits[0]?.tablename).toBe('public.scratch');
    expect(edits[0]?.old).toBeNull();
    expect(edits[0]?.new).toBeNull();
    expect(edits[0]?.query).toBe('TRUNCATE scratch');
  });

  test('quoted table names recorded quoted', async () => {
    await app.query('CREATE SCHEMA "Sales"');
    await app.query('CREATE TABLE "Sales"."Order Lines" (id integer)');
    await app.query(`SELECT audit.enable('"Sales"."Order Lines"')`);

    const edits = await recordedBy(app, 'INSERT INTO "Sales"."Order Lines" VALUES (1)');

    expect(edits.map((edit) => edit.tablename)).toEqual(['"Sales"."Order Lines"']);
  });

  test('enable twice keeps one trigger each', async () => {
    await app.query("SELECT audit.enable('public.accounts')");
    await app.query("SELECT audit.enable('public.accounts')");

    const triggers = await app.query<{ tgname: string }>(
      "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.accounts'::regclass ORDER BY tgname",
    );
    expect(triggers.rows.map((row) => row.tgname)).toEqual(['audit_record_edit', 'audit_record_truncate']);
  });

  test('disable stops recording', async () => {
    await app.query('CREATE TABLE public.unaudited (id integer)');
    await app.query("SELECT audit.enable('public.unaudited')");

    await app.query("SELECT audit.disable('public.unaudited')");
    await app.query("SELECT audit.disable('public.unaudited')");

    expect(await recordedBy(app, 'INSERT INTO unaudited VALUES (1)')).toEqual([]);
    expect(await recordedBy(app, 'TRUNCATE unaudited')).toEqual([]);
  });

  test('enable rejects audit.edits', async () => {
    await expect(app.query("SELECT audit.enable('audit.edits')")).rejects.toThrow(
      /audit\.edits cannot be audited/,
    );
  });

  test('prepared transaction keeps its audit rows', async (context) => {
    const setting = await app.query<{ max_prepared_transactions: string }>('SHOW max_prepared_transactions');
    if (setting.rows[0]?.max_prepared_transactions === '0') {
      context.skip('the test server has max_prepared_transactions = 0');
    }

    await withAppSession(async (client) => {
      // Without an identity setting the trigger looks for pg_temp.userinfo, and a session with
      // other temporary objects has a temporary schema to look in.
      await client.query('CREATE TEMP TABLE scratch_notes (note text)');
      const before = await lastEditId();
      const gid = `audit_${randomBytes(4).toString('hex')}`;

      await client.query('BEGIN');
      await client.query("INSERT INTO accounts VALUES (5, 'Two Phase', 1)");
      await client.query(`PREPARE TRANSACTION '${gid}'`);
      await client.query(`COMMIT PREPARED '${gid}'`);

      const edits = await editsAfter(before);
      expect(edits.map((edit) => [edit.action, edit.username])).toEqual([['I', 'app_scram']]);
    });
  });
});

describe('identity', () => {
  test('settings carrier attributes edits', async () => {
    await withAppSession(async (client) => {
      await setIdentity(client, '{"empnum":"42","fullname":"Ada Lovelace","client_addr":"10.0.0.1"}');

      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (10, 'x', 0)");

      expect(edits).toHaveLength(1);
      expect(edits[0]?.username).toBe('42');
      expect(edits[0]?.fullname).toBe('Ada Lovelace');
      expect(edits[0]?.attributed).toBe(true);
      expect(edits[0]?.db_user).toBe('app_scram');
    });
  });

  test('transaction-local identity ends with transaction', async () => {
    await withAppSession(async (client) => {
      await client.query('BEGIN');
      await client.query('SELECT set_config($1, $2, true)', [IDENTITY_SETTING, '{"empnum":"7"}']);
      const inside = await recordedBy(client, "INSERT INTO accounts VALUES (11, 'x', 0)");
      await client.query('COMMIT');

      // The setting now reads as '' rather than NULL.
      const after = await recordedBy(client, "INSERT INTO accounts VALUES (12, 'x', 0)");

      expect(inside.map((edit) => [edit.username, edit.attributed])).toEqual([['7', true]]);
      expect(after.map((edit) => [edit.username, edit.attributed])).toEqual([['app_scram', false]]);
    });
  });

  test('no identity leaves edits unattributed', async () => {
    await withAppSession(async (client) => {
      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (13, 'x', 0)");

      expect(edits).toHaveLength(1);
      expect(edits[0]?.attributed).toBe(false);
      expect(edits[0]?.username).toBe('app_scram');
      expect(edits[0]?.fullname).toBeNull();
    });
  });

  test('malformed identity leaves edits unattributed', async () => {
    const values = [
      '{"empnum":',
      'not json',
      '["42"]',
      '"42"',
      '{"empnum":"42",}',
      '{"empnum":"\\u0000"}',
      '{"empnum":"42","n":1e999999}',
      `{"empnum":"42","deep":${'['.repeat(100_000)}${']'.repeat(100_000)}}`,
      '{"empnum":{"nested":"42"}}',
      '{"empnum":""}',
      '{"fullname":"No Number"}',
    ];

    await withAppSession(async (client) => {
      for (const [index, value] of values.entries()) {
        await setIdentity(client, value);

        const edits = await recordedBy(client, 'INSERT INTO accounts VALUES ($1, $2, 0)', [100 + index, value.slice(0, 40)]);

        expect(edits.map((edit) => [edit.username, edit.fullname, edit.attributed]), value.slice(0, 60)).toEqual([
          ['app_scram', null, false],
        ]);
      }
    });
  });

  test('temp table carrier attributes edits', async () => {
    await withAppSession(async (client) => {
      await createTempUserinfo(client, [['43', 'Grace Hopper']]);

      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (20, 'x', 0)");

      expect(edits).toHaveLength(1);
      expect(edits[0]?.username).toBe('43');
      expect(edits[0]?.fullname).toBe('Grace Hopper');
      expect(edits[0]?.attributed).toBe(true);
    });
  });

  test('settings carrier comes before temp table', async () => {
    await withAppSession(async (client) => {
      await createTempUserinfo(client, [['from-table', 'Table']]);
      await setIdentity(client, '{"empnum":"from-setting","fullname":"Setting"}');

      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (21, 'x', 0)");

      expect(edits.map((edit) => [edit.username, edit.fullname])).toEqual([['from-setting', 'Setting']]);
    });
  });

  test('altered temp table still attributes', async () => {
    await withAppSession(async (client) => {
      await createTempUserinfo(client, [['44', 'Barbara Liskov']]);
      await client.query('ALTER TABLE pg_temp.userinfo ADD COLUMN client_addr inet');
      await client.query('ALTER TABLE pg_temp.userinfo ALTER COLUMN empnum TYPE integer USING empnum::integer');

      const withInteger = await recordedBy(client, "INSERT INTO accounts VALUES (22, 'x', 0)");
      await client.query('ALTER TABLE pg_temp.userinfo DROP COLUMN fullname');
      const withoutFullname = await recordedBy(client, "INSERT INTO accounts VALUES (23, 'x', 0)");

      expect(withInteger.map((edit) => [edit.username, edit.fullname, edit.attributed])).toEqual([
        ['44', 'Barbara Liskov', true],
      ]);
      expect(withoutFullname.map((edit) => [edit.username, edit.fullname, edit.attributed])).toEqual([
        ['44', null, true],
      ]);
    });
  });

  test('unusable temp tables leave edits unattributed', async () => {
    const setups: Array<[string, string[]]> = [
      ['no rows', ['CREATE TEMP TABLE userinfo (empnum text, fullname text)', 'GRANT SELECT ON pg_temp.userinfo TO PUBLIC']],
      [
        'two rows',
        [
          'CREATE TEMP TABLE userinfo (empnum text, fullname text)',
          'GRANT SELECT ON pg_temp.userinfo TO PUBLIC',
          "INSERT INTO pg_temp.userinfo VALUES ('1', 'One'), ('2', 'Two')",
        ],
      ],
      ['no grant', ['CREATE TEMP TABLE userinfo (empnum text, fullname text)', "INSERT INTO pg_temp.userinfo VALUES ('1', 'One')"]],
      [
        'no empnum column',
        [
          'CREATE TEMP TABLE userinfo (id text, fullname text)',
          'GRANT SELECT ON pg_temp.userinfo TO PUBLIC',
          "INSERT INTO pg_temp.userinfo VALUES ('1', 'One')",
        ],
      ],
      [
        'empty empnum',
        [
          'CREATE TEMP TABLE userinfo (empnum text, fullname text)',
          'GRANT SELECT ON pg_temp.userinfo TO PUBLIC',
          "INSERT INTO pg_temp.userinfo VALUES ('', 'Nobody')",
        ],
      ],
      [
        'temp view',
        ["CREATE TEMP VIEW userinfo AS SELECT '1'::text AS empnum, 'One'::text AS fullname", 'GRANT SELECT ON pg_temp.userinfo TO PUBLIC'],
      ],
      [
        'row security policy that raises',
        [
          'CREATE TEMP TABLE userinfo (empnum text, fullname text)',
          'GRANT SELECT ON pg_temp.userinfo TO PUBLIC',
          "INSERT INTO pg_temp.userinfo VALUES ('1', 'One')",
          'ALTER TABLE pg_temp.userinfo ENABLE ROW LEVEL SECURITY',
          'CREATE POLICY always_fails ON pg_temp.userinfo USING (1 / 0 = 1)',
        ],
      ],
    ];

    for (const [index, [name, statements]] of setups.entries()) {
      await withAppSession(async (client) => {
        for (const statement of statements) {
          await client.query(statement);
        }

        const edits = await recordedBy(client, 'INSERT INTO accounts VALUES ($1, $2, 0)', [200 + index, name]);

        expect(edits.map((edit) => [edit.username, edit.fullname, edit.attributed]), name).toEqual([
          ['app_scram', null, false],
        ]);
      });
    }
  });

  test('client casts never run as owner', async () => {
    // A type the application owns, with casts whose functions raise when called. Were they
    // called inside audit.record_edit(), they would run as audit_proxy_owner and the insert
    // would fail.
    await app.query("CREATE TYPE public.mood AS ENUM ('happy', 'sad')");
    await app.query(`CREATE FUNCTION public.mood_to_json(public.mood) RETURNS json LANGUAGE plpgsql AS
      $$BEGIN RAISE EXCEPTION 'cast to json called as %', current_user; END$$`);
    await app.query(`CREATE FUNCTION public.mood_to_jsonb(public.mood) RETURNS jsonb LANGUAGE plpgsql AS
      $$BEGIN RAISE EXCEPTION 'cast to jsonb called as %', current_user; END$$`);
    await app.query(`CREATE FUNCTION public.mood_to_text(public.mood) RETURNS text LANGUAGE plpgsql AS
      $$BEGIN RAISE EXCEPTION 'cast to text called as %', current_user; END$$`);
    await app.query('CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_to_json(public.mood)');
    await app.query('CREATE CAST (public.mood AS jsonb) WITH FUNCTION public.mood_to_jsonb(public.mood)');
    await app.query('CREATE CAST (public.mood AS text) WITH FUNCTION public.mood_to_text(public.mood)');
    await app.query('CREATE TABLE public.moods (id integer, mood public.mood, moods public.mood[], score numeric)');
    await app.query("SELECT audit.enable('public.moods')");

    try {
      const inserted = await recordedBy(app, "INSERT INTO moods VALUES (1, 'happy', '{happy,sad}', NULL)");
      const updated = await recordedBy(app, "UPDATE moods SET mood = 'sad'");

      const typedEmpnum = await withAppSession(async (client) => {
        await client.query('CREATE TEMP TABLE userinfo (empnum public.mood, fullname text)');
        await client.query('GRANT SELECT ON pg_temp.userinfo TO PUBLIC');
        await client.query("INSERT INTO pg_temp.userinfo VALUES ('happy', 'Cast')");
        return recordedBy(client, "INSERT INTO moods VALUES (2, 'happy', NULL, 1)");
      });
      const typedExtraColumn = await withAppSession(async (client) => {
        await client.query('CREATE TEMP TABLE userinfo (empnum text, fullname text, extra public.mood)');
        await client.query('GRANT SELECT ON pg_temp.userinfo TO PUBLIC');
        await client.query("INSERT INTO pg_temp.userinfo VALUES ('45', 'Extra', 'sad')");
        return recordedBy(client, "INSERT INTO moods VALUES (3, 'happy', NULL, 1)");
      });

      expect(inserted.map((edit) => edit.new)).toEqual([
        { id: '1', mood: 'happy', moods: '{happy,sad}', score: null },
      ]);
      expect(updated.map((edit) => [edit.old?.mood, edit.new?.mood, edit.changed])).toEqual([
        ['happy', 'sad', ['mood']],
      ]);
      expect(typedEmpnum.map((edit) => [edit.username, edit.attributed])).toEqual([['app_scram', false]]);
      expect(typedExtraColumn.map((edit) => [edit.username, edit.attributed])).toEqual([['45', true]]);
    } finally {
      await app.query('DROP CAST (public.mood AS json)');
      await app.query('DROP CAST (public.mood AS jsonb)');
      await app.query('DROP CAST (public.mood AS text)');
    }

    const withoutCasts = await recordedBy(app, "INSERT INTO moods VALUES (4, 'sad', NULL, 2)");
    expect(withoutCasts.map((edit) => edit.new)).toEqual([{ id: 4, mood: 'sad', moods: null, score: 2 }]);
  });

  test('temp table named edits captures nothing', async () => {
    await withAppSession(async (client) => {
      await client.query('CREATE TEMP TABLE edits (LIKE audit.edits)');
      await client.query('CREATE TEMP TABLE audit (id integer)');

      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (30, 'x', 0)");
      const captured = await client.query('SELECT count(*)::integer AS n FROM pg_temp.edits');

      expect(edits).toHaveLength(1);
      expect(captured.rows[0]?.n).toBe(0);
    });
  });

  test('claim values round-trip exactly', async () => {
    const claims = {
      empnum: `O'Brien "quoted" \\back\\slash; DROP TABLE accounts; -- $$ $tag$ */`,
      fullname: `${'x'.repeat(10 * 1024)} '"\\;$$ é 😀 \n\t\u0001 end`,
    };

    const viaSettings = await withAppSession(async (client) => {
      await setIdentity(client, JSON.stringify(claims));
      const view = await client.query<{ empnum: string; fullname: string }>('SELECT empnum, fullname FROM userinfo');
      const edits = await recordedBy(client, "INSERT INTO accounts VALUES (40, 'x', 0)");
      return { view: view.rows, edits };
    });
    const viaTempTable = await withAppSession(async (client) => {
      await createTempUserinfo(client, [[claims.empnum, claims.fullname]]);
      return recordedBy(client, "INSERT INTO accounts VALUES (41, 'x', 0)");
    });

    expect(viaSettings.view).toEqual([claims]);
    expect(viaSettings.edits.map((edit) => ({ empnum: edit.username, fullname: edit.fullname }))).toEqual([claims]);
    expect(viaTempTable.map((edit) => ({ empnum: edit.username, fullname: edit.fullname }))).toEqual([claims]);
  });
});

describe('userinfo view', () => {
  test('one row while identity set', async () => {
    await withAppSession(async (client) => {
      await setIdentity(client, '{"empnum":"42","fullname":"Ada"}');

      const result = await client.query('SELECT fullname, empnum FROM userinfo');

      expect(result.rows).toEqual([{ fullname: 'Ada', empnum: '42' }]);
    });
  });

  test('no rows without identity', async () => {
    await withAppSession(async (client) => {
      const unset = await client.query('SELECT fullname, empnum FROM userinfo');
      await setIdentity(client, '');
      const empty = await client.query('SELECT fullname, empnum FROM userinfo');
      await setIdentity(client, '{"empnum":');
      const malformed = await client.query('SELECT fullname, empnum FROM userinfo');

      expect(unset.rows).toEqual([]);
      expect(empty.rows).toEqual([]);
      expect(malformed.rows).toEqual([]);
    });
  });

  test('readable without audit privileges', async () => {
    const role = `userinfo_reader_${randomBytes(4).toString('hex')}`;
    await withAdmin(db.name, async (client) => {
      await client.query(`CREATE ROLE ${role} NOLOGIN`);
      try {
        await client.query(`SET ROLE ${role}`);
        await setIdentity(client, '{"empnum":"42","fullname":"Ada"}');

        const result = await client.query('SELECT fullname, empnum FROM userinfo');

        expect(result.rows).toEqual([{ fullname: 'Ada', empnum: '42' }]);
      } finally {
        await client.query('RESET ROLE');
        await client.query(`DROP ROLE ${role}`);
      }
    });
  });
});

describe('privileges', () => {
  test('app role cannot change audit rows', async () => {
    await app.query("INSERT INTO accounts VALUES (50, 'x', 0)");
    const statements = [
      "INSERT INTO audit.edits (tablename, username, action, txid, recorded, db_user, attributed) VALUES ('public.accounts', 'forged', 'I', 1, now(), 'app_scram', true)",
      "UPDATE audit.edits SET username = 'forged'",
      'DELETE FROM audit.edits',
      'TRUNCATE audit.edits',
      'ALTER TABLE audit.edits DISABLE TRIGGER ALL',
      'DROP TABLE audit.edits',
      'CREATE OR REPLACE FUNCTION audit.record_edit() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$',
      "SELECT * FROM audit.temp_table_identity()",
    ];

    for (const statement of statements) {
      expect(await sqlState(app.query(statement)), statement).toBe('42501');
    }
  });
});
