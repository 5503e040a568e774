// A test database with sql/ installed and a proxy in front of it, logging in upstream as
// the non-superuser app_scram, plus clients that connect through the proxy with a token.
import pg from 'pg';

import { runCommand } from './commands.ts';
import { connect, createTestDatabase, CONNECT_TIMEOUT_MS, QUERY_TIMEOUT_MS, TEST_ROLES, testServer, withTimeout, type TestDatabase } from './postgres.ts';
import { proxyConfig, startProxy, type ProxyHandle } from './start-proxy.ts';
import { newSecret, signToken } from './tokens.ts';

export interface ProxyEnvironment {
  database: TestDatabase;
  proxy: ProxyHandle;
  secret: string;
  /** A token for `sub` with `name`, signed with the proxy's secret. */
  token(sub: string, name?: string, extra?: Record<string, unknown>): Promise<string>;
  /** A node-postgres client connected through the proxy, the token sent as the password. */
  client(token: string, options?: Partial<pg.ClientConfig>): Promise<pg.Client>;
  /** A libpq-style URL through the proxy (no password in it). */
  proxyUrl(user?: string): string;
  close(): Promise<void>;
}

export async function createProxyEnvironment(prefix: string, sections: Record<string, unknown> = {}): Promise<ProxyEnvironment> {
  const database = await createTestDatabase(prefix);
  const server = testServer();
  const secret = newSecret();
  const config = proxyConfig({
    upstream: { host: server.host, port: server.port, database: database.name, user: 'app_scram', password: TEST_ROLES.app_scram.password },
    secret,
    ...sections,
  });
  const proxy = await startProxy(config);
  const clients: pg.Client[] = [];

  return {
    database,
    proxy,
    secret,
    token: (sub, name, extra = {}) => signToken(secret, { sub, ...(name === undefined ? {} : { name }), ...extra }),
    async client(token, options = {}) {
      const client = new pg.Client({
        host: proxy.host,
        port: proxy.port,
        database: database.name,
        user: 'app',
        password: token,
        connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
        query_timeout: QUERY_TIMEOUT_MS,
        ...options,
      });
      client.on('error', () => {});
      await client.connect();
      clients.push(client);
      return client;
    },
    proxyUrl: (user = 'app') => `postgres://${user}@${proxy.host}:${proxy.port}/${database.name}`,
    async close() {
      await Promise.allSettled(clients.map((client) => client.end()));
      await proxy.close();
      await database.drop();
    },
  };
}

/** Ends every server connection of the proxy's pool, so the next transaction lands on a new one. */
export async function dropServerConnections(env: ProxyEnvironment): Promise<void> {
  const admin = await connect(env.database.url('superuser'));
  await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [env.database.name]);
  await admin.end();
  const pool = env.proxy.proxy.writePool;
  await withTimeout(
    (async () => {
      while (pool.size > 0) await new Promise((resolve) => setTimeout(resolve, 20));
    })(),
    5000,
    'the pool noticing closed server connections',
  );
}

/** Creates pgbench's tables (scale 1) in the environment's database, owned by app_scram, with the audit trigger on pgbench_accounts. */
export async function initPgbench(env: ProxyEnvironment): Promise<void> {
  const server = testServer();
  const init = await runCommand(
    'pgbench',
    ['-i', '-q', '-s', '1', '-h', server.host, '-p', String(server.port), '-U', 'app_scram', env.database.name],
    { env: { PGPASSWORD: TEST_ROLES.app_scram.password }, timeoutMs: 120_000 },
  );
  if (init.code !== 0) throw new Error(`pgbench -i failed: ${init.stderr}`);
  const owner = await connect(env.database.url());
  await owner.query("SELECT audit.enable('pgbench_accounts')");
  await owner.end();
}
