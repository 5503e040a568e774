// Vitest global setup: provides one PostgreSQL server for the whole test run and the login
// roles the tests use. Which server:
//   PG_AUDIT_PROXY_TEST_DATABASE_URL=postgres://superuser:pw@host:port/db  an existing server
//   PG_AUDIT_PROXY_TEST_DOCKER=1                                           a Docker container
//   otherwise                                                              embedded PostgreSQL

import { randomBytes } from 'node:crypto';

import pg from 'pg';
import type { TestProject } from 'vitest/node';

import {
  CONNECT_TIMEOUT_MS,
  QUERY_TIMEOUT_MS,
  TEST_ROLES,
  startEmbeddedPostgres,
  withTimeout,
  type TestServer,
} from './helpers/postgres.ts';

const DOCKER_IMAGE = 'postgres:17';
const DOCKER_PG_HBA_PATH = '/etc/pg-audit-proxy-test/pg_hba.conf';
const DOCKER_START_TIMEOUT_MS = 180_000;

interface StartedServer {
  server: Omit<TestServer, 'serverVersionNum'>;
  stop: () => Promise<void>;
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const started = await startServer();
  try {
    const serverVersionNum = await createTestRoles(started.server);
    project.provide('postgres', { ...started.server, serverVersionNum });
  } catch (error) {
    await started.stop();
    throw error;
  }
  return started.stop;
}

async function startServer(): Promise<StartedServer> {
  const externalUrl = process.env.PG_AUDIT_PROXY_TEST_DATABASE_URL;
  if (externalUrl !== undefined && externalUrl !== '') {
    return { server: parseExternalUrl(externalUrl), stop: async () => {} };
  }
  if (process.env.PG_AUDIT_PROXY_TEST_DOCKER === '1') {
    return startDockerServer();
  }

  const embedded = await startEmbeddedPostgres();
  return {
    server: {
      kind: 'embedded',
      host: embedded.host,
      port: embedded.port,
      superuser: embedded.superuser,
      superuserPassword: embedded.superuserPassword,
      database: 'postgres',
      perUserAuth: true,
    },
    stop: embedded.destroy,
  };
}

function parseExternalUrl(text: string): StartedServer['server'] {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Error(
      'PG_AUDIT_PROXY_TEST_DATABASE_URL is not a valid URL: expected postgres://SUPERUSER:PASSWORD@HOST:PORT/DATABASE',
    );
  }
  if (url.username === '') {
    throw new Error('PG_AUDIT_PROXY_TEST_DATABASE_URL has no user name: give a superuser in the URL');
  }
  return {
    kind: 'external',
    host: url.hostname,
    port: url.port === '' ? 5432 : Number(url.port),
    superuser: decodeURIComponent(url.username),
    superuserPassword: decodeURIComponent(url.password),
    database: url.pathname.length > 1 ? decodeURIComponent(url.pathname.slice(1)) : 'postgres',
    perUserAuth: false,
  };
}

// NOTE: not run in this repository's CI, which has no Docker engine.
async function startDockerServer(): Promise<StartedServer> {
  const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
  const password = randomBytes(18).toString('base64url');
  // Clients reach the container through Docker's network, so the per-user rules match any
  // address. The local line serves the image's initialisation scripts.
  const pgHba = [
    'local  all  all        trust',
    'host   all  app_trust  all  trust',
    'host   all  app_md5    all  md5',
    'host   all  all        all  scram-sha-256',
    'host   replication  all  all  scram-sha-256',
    '',
  ].join('\n');

  const container = await withTimeout(
    new PostgreSqlContainer(DOCKER_IMAGE)
      .withUsername('postgres')
      .withPassword(password)
      .withDatabase('postgres')
      .withCopyContentToContainer([{ content: pgHba, target: DOCKER_PG_HBA_PATH, mode: 0o644 }])
      .withCommand([
        'postgres',
        '-c', `hba_file=${DOCKER_PG_HBA_PATH}`,
        '-c', 'max_connections=300',
        '-c', 'max_prepared_transactions=10',
        '-c', 'fsync=off',
      ])
      .start(),
    DOCKER_START_TIMEOUT_MS,
    `starting the ${DOCKER_IMAGE} container`,
  );

  return {
    server: {
      kind: 'docker',
      host: container.getHost(),
      port: container.getPort(),
      superuser: 'postgres',
      superuserPassword: password,
      database: 'postgres',
      perUserAuth: true,
    },
    stop: async () => {
      await container.stop();
    },
  };
}

/**
 * Creates or updates the login roles in TEST_ROLES and returns server_version_num. Each
 * password is stored with its role's encryption, because md5 authentication needs an MD5 hash.
 */
async function createTestRoles(server: StartedServer['server']): Promise<number> {
  const client = new pg.Client({
    host: server.host,
    port: server.port,
    user: server.superuser,
    password: server.superuserPassword,
    database: server.database,
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    query_timeout: QUERY_TIMEOUT_MS,
  });
  client.on('error', () => {});
  await client.connect();

  try {
    const version = await client.query<{ server_version_num: string }>('SHOW server_version_num');
    const superuser = await client.query<{ rolsuper: boolean }>(
      'SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user',
    );
    if (superuser.rows[0]?.rolsuper !== true) {
      throw new Error(`the test server's admin role ${server.superuser} is not a superuser`);
    }

    await client.query('BEGIN');
    // Serializes concurrent test runs that share an external server.
    await client.query("SELECT pg_advisory_xact_lock(hashtext('pg_audit_proxy.test_roles'))");
    for (const [name, role] of Object.entries(TEST_ROLES)) {
      const exists = await client.query('SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1', [name]);
      const verb = exists.rowCount === 0 ? 'CREATE' : 'ALTER';
      const password = role.password === null ? 'NULL' : pg.escapeLiteral(role.password);
      if (role.encryption !== null) {
        await client.query(`SET LOCAL password_encryption = ${pg.escapeLiteral(role.encryption)}`);
      }
      await client.query(
        `${verb} ROLE ${pg.escapeIdentifier(name)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD ${password}`,
      );
    }
    await client.query('COMMIT');

    return Number(version.rows[0]?.server_version_num);
  } finally {
    await client.end();
  }
}
