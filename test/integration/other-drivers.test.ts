// Drivers of other languages through the proxy: psycopg2 and asyncpg (Python) and pgjdbc
// (Java). Each test is skipped, naming the Debian package, when its driver is missing.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { runCommand } from '../helpers/commands.ts';
import { connect } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';

/** Debian's Python, where its python3-* packages are installed (a pyenv python3 may come first on PATH). */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const JDBC_JAR = '/usr/share/java/postgresql.jar';

function pythonHas(module: string): boolean {
  return spawnSync(PYTHON, ['-c', `import ${module}`], { stdio: 'ignore' }).status === 0;
}

const psycopg2Missing = !pythonHas('psycopg2');
const asyncpgMissing = !pythonHas('asyncpg');
const jdbcMissing = !existsSync(JDBC_JAR) || spawnSync('java', ['-version'], { stdio: 'ignore' }).status !== 0;
if (psycopg2Missing) console.warn('psycopg2 not found: its test is skipped (install the Debian package python3-psycopg2)');
if (asyncpgMissing) console.warn('asyncpg not found: its test is skipped (install the Debian package python3-asyncpg)');
if (jdbcMissing) console.warn('pgjdbc or java not found: its test is skipped (install the Debian package libpostgresql-jdbc-java and a JRE)');

describe('other drivers through the proxy', () => {
  let env: ProxyEnvironment;
  let directory: string;

  beforeAll(async () => {
    env = await createProxyEnvironment('drivers', { pool: { size: 2 } });
    directory = await mkdtemp(path.join(os.tmpdir(), 'pg-audit-proxy-drivers-'));
    const owner = await connect(env.database.url());
    await owner.query("CREATE TABLE notes (id serial PRIMARY KEY, body text); SELECT audit.enable('notes')");
    await owner.end();
  });

  afterAll(async () => {
    await env?.close();
  });

  async function auditedBy(sub: string): Promise<{ total: number; attributed: number }> {
    const direct = await connect(env.database.url());
    const result = await direct.query(
      'SELECT count(*)::int AS total, count(*) FILTER (WHERE attributed AND username = $1)::int AS attributed FROM audit.edits WHERE username = $1 OR NOT attributed',
      [sub],
    );
    await direct.end();
    return result.rows[0];
  }

  it.skipIf(psycopg2Missing)('attributes psycopg2 writes', async () => {
    const token = await env.token('py-1', 'Psycopg User');
    const script = [
      'import os, psycopg2',
      "conn = psycopg2.connect(host=os.environ['HOST'], port=os.environ['PORT'], dbname=os.environ['DB'], user='app', password=os.environ['TOKEN'], connect_timeout=10)",
      'with conn:',
      '    with conn.cursor() as cur:',
      "        cur.execute('INSERT INTO notes (body) VALUES (%s)', ('from psycopg2',))",
      "        cur.execute('UPDATE notes SET body = %s WHERE body = %s', ('from psycopg2, edited', 'from psycopg2'))",
      'conn.close()',
    ].join('\n');
    const run = await runCommand(PYTHON, ['-c', script], {
      env: { HOST: env.proxy.host, PORT: String(env.proxy.port), DB: env.database.name, TOKEN: token },
    });
    expect(run.code, run.stderr).toBe(0);
    expect(await auditedBy('py-1')).toEqual({ total: 2, attributed: 2 });
  });

  it.skipIf(asyncpgMissing)('attributes asyncpg writes made with its prepared statements', async () => {
    const token = await env.token('apg-1', 'Asyncpg User');
    const script = [
      'import asyncio, os, asyncpg',
      'async def main():',
      "    conn = await asyncpg.connect(host=os.environ['HOST'], port=int(os.environ['PORT']), database=os.environ['DB'], user='app', password=os.environ['TOKEN'], timeout=10)",
      '    for i in range(5):',
      "        await conn.execute('INSERT INTO notes (body) VALUES ($1)', f'asyncpg {i}')",
      '    async with conn.transaction():',
      "        await conn.execute('UPDATE notes SET body = body || $1 WHERE body = $2', '!', 'asyncpg 0')",
      "    rows = await conn.fetch('SELECT body FROM notes WHERE body LIKE $1 ORDER BY id', 'asyncpg%')",
      '    assert len(rows) == 5, rows',
      '    await conn.close()',
      'asyncio.run(main())',
    ].join('\n');
    const run = await runCommand(PYTHON, ['-c', script], {
      env: { HOST: env.proxy.host, PORT: String(env.proxy.port), DB: env.database.name, TOKEN: token },
    });
    expect(run.code, run.stderr).toBe(0);
    expect(await auditedBy('apg-1')).toEqual({ total: 6, attributed: 6 });
  });

  it.skipIf(jdbcMissing)('attributes pgjdbc writes, also once it switches to server-side statements', async () => {
    const token = await env.token('jdbc-1', 'Jdbc User');
    const source = path.join(directory, 'JdbcWrites.java');
    await writeFile(
      source,
      [
        'import java.sql.*;',
        'public class JdbcWrites {',
        '  public static void main(String[] args) throws Exception {',
        '    String url = "jdbc:postgresql://" + System.getenv("HOST") + ":" + System.getenv("PORT") + "/" + System.getenv("DB") + "?prepareThreshold=2&connectTimeout=10";',
        '    try (Connection conn = DriverManager.getConnection(url, "app", System.getenv("TOKEN"))) {',
        '      try (PreparedStatement insert = conn.prepareStatement("INSERT INTO notes (body) VALUES (?)")) {',
        '        for (int i = 0; i < 6; i++) { insert.setString(1, "jdbc " + i); insert.executeUpdate(); }',
        '      }',
        '      conn.setAutoCommit(false);',
        '      try (Statement statement = conn.createStatement()) { statement.executeUpdate("UPDATE notes SET body = body || \'!\' WHERE body = \'jdbc 0\'"); }',
        '      conn.commit();',
        '    }',
        '  }',
        '}',
      ].join('\n'),
    );
    const run = await runCommand('java', ['-cp', JDBC_JAR, source], {
      env: { HOST: env.proxy.host, PORT: String(env.proxy.port), DB: env.database.name, TOKEN: token },
      timeoutMs: 120_000,
    });
    expect(run.code, run.stderr).toBe(0);
    expect(await auditedBy('jdbc-1')).toEqual({ total: 7, attributed: 7 });
  }, 150_000);
});
