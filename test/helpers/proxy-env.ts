// A test database with sql/ installed and a proxy in front of it, logging in upstream as
// the non-superuser app_scram, plus clients that connect through the proxy with a token.
import pg from 'pg';

import { createTestDatabase, CONNECT_TIMEOUT_MS, QUERY_TIMEOUT_MS, TEST_ROLES, testServer, type TestDatabase } from './postgres.ts';
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
