// JWT login: where the proxy reads the token from, which tokens it rejects and how, what
// reaches its log, and that identity values arrive in the audit trail byte for byte.
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { SignJWT } from 'jose';
import pg from 'pg';
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { connect, CONNECT_TIMEOUT_MS, createTestDatabase, QUERY_TIMEOUT_MS, TEST_ROLES, testServer, withTimeout, type TestDatabase } from '../helpers/postgres.ts';
import { dataRows, login, LoginFailed, RawConnection, simpleQuery, type LoginResult } from '../helpers/raw-client.ts';
import { proxyConfig, startProxy, type ProxyHandle } from '../helpers/start-proxy.ts';
import { newRsaKeyPair, newSecret, signToken } from '../helpers/tokens.ts';

const ISSUER = 'https://id.test.invalid/';
const AUDIENCE = 'pg-audit-proxy-test';
const LOGIN_TIMEOUT_MS = 10_000;

/** The parts of an ErrorResponse that must be the same for every rejected token. */
interface LoginError {
  severity: string | undefined;
  code: string | undefined;
  message: string | undefined;
  detail: string | undefined;
  hint: string | undefined;
}

let database: TestDatabase;
let proxy: ProxyHandle;
let secret: string;
let rsa: ReturnType<typeof newRsaKeyPair>;
let keyDirectory: string;
/** Every token a test sent, so the last test can check that none reached the log. */
const tokensSent: string[] = [];

beforeAll(async () => {
  database = await createTestDatabase('jwt_auth');
  secret = newSecret();
  rsa = newRsaKeyPair();
  keyDirectory = await fs.mkdtemp(path.join(os.tmpdir(), 'pg-audit-proxy-jwt-'));
  const publicKeyFile = path.join(keyDirectory, 'public.pem');
  await fs.writeFile(publicKeyFile, rsa.publicKeyPem);

  const server = testServer();
  proxy = await startProxy(
    proxyConfig({
      upstream: { host: server.host, port: server.port, database: database.name, user: 'app_scram', password: TEST_ROLES.app_scram.password },
      secret,
      auth: { jwt: { keys: [{ secret }, { public_key_file: publicKeyFile }], issuer: ISSUER, audience: AUDIENCE } },
    }),
  );

  const owner = await connect(database.url());
  await owner.query(`
    CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
    SELECT audit.enable('notes');
  `);
  await owner.end();
});

afterAll(async () => {
  await proxy?.close();
  await database?.drop();
  if (keyDirectory !== undefined) await fs.rm(keyDirectory, { recursive: true, force: true });
});

/** Signs a token the proxy accepts: HS256 with the configured secret, issuer and audience. */
async function validToken(claims: Record<string, unknown> = { sub: 'ada-42', name: 'Ada Lovelace' }): Promise<string> {
  const token = await signToken(secret, claims, { issuer: ISSUER, audience: AUDIENCE });
  tokensSent.push(token);
  return token;
}

/** Builds an unsigned token (`alg: none`) by hand, because jose refuses to make one. */
function unsignedToken(claims: Record<string, unknown>): string {
  const now = Math.floor(Date.now() / 1000);
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const header = encode({ alg: 'none', typ: 'JWT' });
  const payload = encode({ ...claims, iss: ISSUER, aud: AUDIENCE, iat: now, exp: now + 3600 });
  return `${header}.${payload}.`;
}

function clientConfig(overrides: Partial<pg.ClientConfig>): pg.ClientConfig {
  return {
    host: proxy.host,
    port: proxy.port,
    database: database.name,
    user: 'app',
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    query_timeout: QUERY_TIMEOUT_MS,
    ...overrides,
  };
}

/** Runs `work` with a node-postgres client logged in through the proxy, then closes it. */
async function withProxyClient<T>(overrides: Partial<pg.ClientConfig>, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client(clientConfig(overrides));
  client.on('error', () => {});
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

/** Reads userinfo as a client logged in with `overrides`, which shows the identity the proxy set. */
async function userinfoOf(overrides: Partial<pg.ClientConfig>): Promise<unknown[]> {
  return withProxyClient(overrides, async (client) => (await client.query('SELECT empnum, fullname FROM userinfo')).rows);
}

/** Expects a node-postgres login with `overrides` to be rejected, and returns the ErrorResponse. */
async function rejectedLogin(overrides: Partial<pg.ClientConfig>): Promise<LoginError> {
  const client = new pg.Client(clientConfig(overrides));
  client.on('error', () => {});
  const outcome = await client.connect().then(
    () => null,
    (error: unknown) => error,
  );
  if (outcome === null) {
    await client.end();
    throw new Error('the login succeeded, but it should have been rejected');
  }
  if (!(outcome instanceof pg.DatabaseError)) throw outcome;
  return { severity: outcome.severity, code: outcome.code, message: outcome.message, detail: outcome.detail, hint: outcome.hint };
}

/** Logs in over a raw socket with `parameters` and `password`, and returns the login or the ErrorResponse. */
async function rawLogin(parameters: Record<string, string>, password: string | null): Promise<{ login?: LoginResult; error?: LoginError; connection: RawConnection }> {
  const connection = await RawConnection.open(proxy.host, proxy.port);
  try {
    return { login: await login(connection, { user: 'app', database: database.name, ...parameters }, password, LOGIN_TIMEOUT_MS), connection };
  } catch (error) {
    connection.destroy();
    if (!(error instanceof LoginFailed)) throw error;
    const { fields } = error;
    return {
      error: { severity: fields.get('S'), code: fields.get('C'), message: fields.get('M'), detail: fields.get('D'), hint: fields.get('H') },
      connection,
    };
  }
}

/** Fails unless a new client with a valid token can log in and run a query. */
async function expectProxyServes(): Promise<void> {
  const token = await validToken({ sub: 'probe', name: 'Probe' });
  const rows = await withTimeout(
    withProxyClient({ password: token }, async (client) => (await client.query('SELECT 1 AS one')).rows),
    LOGIN_TIMEOUT_MS,
    'a query from a new client after a rejected login',
  );
  expect(rows).toEqual([{ one: 1 }]);
}

/** Log lines with message "authentication failed" written since log index `start`. */
function authenticationFailuresSince(start: number): Record<string, unknown>[] {
  return proxy.logs.slice(start).filter((line) => line.msg === 'authentication failed');
}

describe('token sources', () => {
  it('accepts the token as the password', async () => {
    const token = await validToken({ sub: 'by-password', name: 'Password User' });
    expect(await userinfoOf({ password: token })).toEqual([{ empnum: 'by-password', fullname: 'Password User' }]);
  });

  it('accepts the token in options as -c jwt', async () => {
    const token = await validToken({ sub: 'by-options', name: 'Options User' });
    expect(await userinfoOf({ options: `-c jwt=${token}` })).toEqual([{ empnum: 'by-options', fullname: 'Options User' }]);
  });

  it('accepts the token as a jwt startup parameter from postgres.js', async () => {
    const token = await validToken({ sub: 'by-parameter', name: 'Parameter User' });
    const sql = postgres({
      host: proxy.host,
      port: proxy.port,
      database: database.name,
      username: 'app',
      connection: { jwt: token },
      max: 1,
      connect_timeout: 10,
      idle_timeout: 1,
      onnotice: () => {},
    });
    try {
      const rows = await withTimeout(sql`SELECT empnum, fullname FROM userinfo`, LOGIN_TIMEOUT_MS, 'a query from postgres.js');
      expect([...rows]).toEqual([{ empnum: 'by-parameter', fullname: 'Parameter User' }]);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });

  it('does not request a password when the jwt parameter is present', async () => {
    const token = await validToken({ sub: 'no-password-request', name: 'Parameter User' });
    const { login: result, connection } = await rawLogin({ jwt: token }, null);
    try {
      expect(result).toBeDefined();
      const requests = result!.messages.filter((message) => message.type === 'R').map((message) => message.body.readInt32BE(0));
      expect(requests).toEqual([0]);
    } finally {
      connection.destroy();
    }
  });

  it('accepts a 6 kB token as the jwt startup parameter', async () => {
    const name = 'N'.repeat(4400);
    const token = await validToken({ sub: 'long-parameter', name });
    expect(token.length).toBeGreaterThan(6000);
    const { login: result, connection } = await rawLogin({ jwt: token }, null);
    try {
      expect(result).toBeDefined();
      expect(dataRows(await simpleQuery(connection, 'SELECT length(fullname) FROM userinfo'))).toEqual([[String(name.length)]]);
    } finally {
      connection.destroy();
    }
  });

  it('accepts an RS256 token signed with the configured RSA key', async () => {
    const now = Math.floor(Date.now() / 1000);
    const token = await new SignJWT({ sub: 'rsa-user', name: 'RSA User' })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT' })
      .setIssuer(ISSUER)
      .setAudience(AUDIENCE)
      .setIssuedAt(now)
      .setExpirationTime(now + 3600)
      .sign(rsa.privateKey);
    tokensSent.push(token);
    expect(await userinfoOf({ password: token })).toEqual([{ empnum: 'rsa-user', fullname: 'RSA User' }]);
  });
});

describe('first token found decides', () => {
  it('rejects a bad jwt parameter even with a good password', async () => {
    const good = await validToken();
    const { error } = await rawLogin({ jwt: 'not-a-jwt' }, good);
    expect(error?.code).toBe('28P01');
    expect(error?.severity).toBe('FATAL');
    await expectProxyServes();
  });

  it('rejects a bad options jwt even with a good password', async () => {
    const good = await validToken();
    const error = await rejectedLogin({ options: '-c jwt=not-a-jwt', password: good });
    expect(error.code).toBe('28P01');
    await expectProxyServes();
  });

  it('rejects a bad jwt parameter even with a good options jwt', async () => {
    const good = await validToken();
    const { error } = await rawLogin({ jwt: 'not-a-jwt', options: `-c jwt=${good}` }, null);
    expect(error?.code).toBe('28P01');
    await expectProxyServes();
  });

  it('takes the jwt parameter before the options jwt', async () => {
    const fromParameter = await validToken({ sub: 'from-parameter', name: 'Parameter' });
    const fromOptions = await validToken({ sub: 'from-options', name: 'Options' });
    const { login: result, connection } = await rawLogin({ jwt: fromParameter, options: `-c jwt=${fromOptions}` }, null);
    try {
      expect(result).toBeDefined();
      const rows = dataRows(await simpleQuery(connection, 'SELECT empnum FROM userinfo'));
      expect(rows).toEqual([['from-parameter']]);
    } finally {
      connection.destroy();
    }
  });
});

describe('rejected tokens', () => {
  /** The ErrorResponse for a login without a token. Every other rejected token must get exactly the same one. */
  let reference: LoginError;

  beforeAll(async () => {
    const { error } = await rawLogin({}, '');
    if (error === undefined) throw new Error('a login with an empty password succeeded');
    reference = error;
  });

  it('rejects an empty password with FATAL 28P01', async () => {
    expect(reference.code).toBe('28P01');
    expect(reference.severity).toBe('FATAL');
    await expectProxyServes();
  });

  // Each case makes a token, and `reasons` matches the jose error codes its logged reason may name.
  const cases: { name: string; token: () => Promise<string> | string; reasons: RegExp }[] = [
    { name: 'that is malformed', token: () => 'not-a-jwt', reasons: /ERR_JWS_INVALID/ },
    {
      name: 'that has expired',
      token: () => signToken(secret, { sub: 'ada-42' }, { expiresInSeconds: -3600, issuer: ISSUER, audience: AUDIENCE }),
      reasons: /ERR_JWT_EXPIRED/,
    },
    {
      name: 'that is not valid yet',
      token: () => signToken(secret, { sub: 'ada-42' }, { notBeforeSeconds: 3600, issuer: ISSUER, audience: AUDIENCE }),
      reasons: /ERR_JWT_CLAIM_VALIDATION_FAILED.*nbf/,
    },
    {
      name: 'from the wrong issuer',
      token: () => signToken(secret, { sub: 'ada-42' }, { issuer: 'https://other-issuer.test.invalid/', audience: AUDIENCE }),
      reasons: /ERR_JWT_CLAIM_VALIDATION_FAILED.*iss/,
    },
    {
      name: 'for the wrong audience',
      token: () => signToken(secret, { sub: 'ada-42' }, { issuer: ISSUER, audience: 'another-service' }),
      reasons: /ERR_JWT_CLAIM_VALIDATION_FAILED.*aud/,
    },
    {
      name: 'signed with another secret',
      token: () => signToken(newSecret(), { sub: 'ada-42' }, { issuer: ISSUER, audience: AUDIENCE }),
      reasons: /ERR_JWS_SIGNATURE_VERIFICATION_FAILED/,
    },
    { name: 'without signature (alg none)', token: () => unsignedToken({ sub: 'ada-42' }), reasons: /ERR_JOSE_ALG_NOT_ALLOWED/ },
    {
      // The classic key confusion: an HS256 token whose HMAC secret is the RSA public key's PEM text.
      name: 'signed HS256 with the RSA public key as secret',
      token: () => signToken(rsa.publicKeyPem, { sub: 'ada-42' }, { issuer: ISSUER, audience: AUDIENCE }),
      reasons: /ERR_JWS_SIGNATURE_VERIFICATION_FAILED|ERR_JOSE_ALG_NOT_ALLOWED/,
    },
  ];

  it.each(cases.map((rejection) => [rejection.name, rejection] as const))('rejects a token %s with the same FATAL 28P01', async (_name, { token: makeToken }) => {
    const token = await makeToken();
    tokensSent.push(token);

    const error = await rejectedLogin({ password: token });

    expect(error.code).toBe('28P01');
    expect(error).toEqual(reference);
    expect(JSON.stringify(proxy.logs)).not.toContain(token);
    await expectProxyServes();
  });

  it.each(cases.map((rejection) => [rejection.name, rejection] as const))('logs the reason for a token %s', async (_name, { token: makeToken, reasons }) => {
    const token = await makeToken();
    tokensSent.push(token);
    const logStart = proxy.logs.length;

    await rejectedLogin({ password: token });

    const failures = authenticationFailuresSince(logStart);
    expect(failures).toHaveLength(1);
    expect(failures[0].reason).toMatch(reasons);
  });

  it('logs the reason for an empty password', async () => {
    const logStart = proxy.logs.length;
    const { error } = await rawLogin({}, '');
    expect(error?.code).toBe('28P01');
    const failures = authenticationFailuresSince(logStart);
    expect(failures).toHaveLength(1);
    expect(failures[0].reason).toMatch(/ERR_JWS_INVALID/);
  });

  it('rejects a bad token with 28P01 before checking the database name', async () => {
    const error = await rejectedLogin({ password: 'not-a-jwt', database: 'no_such_database' });
    expect(error.code).toBe('28P01');
    expect(error).toEqual(reference);
    await expectProxyServes();
  });
});

describe('malformed options', () => {
  it('rejects a token in options without -c with 08P01', async () => {
    const token = await validToken();
    const error = await rejectedLogin({ options: `jwt=${token}` });
    expect(error.code).toBe('08P01');
    await expectProxyServes();
  });
});

describe('after the token is verified', () => {
  it('rejects an unknown database name with FATAL 3D000', async () => {
    const token = await validToken();
    const error = await rejectedLogin({ password: token, database: 'no_such_database' });
    expect(error.code).toBe('3D000');
    expect(error.severity).toBe('FATAL');
    await expectProxyServes();
  });

  it.each(['name', 'sub'])('rejects a NUL byte in the %s claim with FATAL 22021', async (claim) => {
    const claims: Record<string, unknown> = { sub: 'nul-user', name: 'NUL User' };
    claims[claim] = 'before\u0000after';
    const token = await validToken(claims);
    const error = await rejectedLogin({ password: token });
    expect(error.code).toBe('22021');
    expect(error.severity).toBe('FATAL');
    await expectProxyServes();
  });
});

describe('identity values in the audit trail', () => {
  /** Inserts a row through the proxy as the token's user and returns its audit row, read directly. */
  async function auditedInsert(claims: Record<string, unknown>, marker: string): Promise<{ username: string; fullname: string; attributed: boolean }[]> {
    const token = await validToken(claims);
    await withProxyClient({ password: token }, (client) => client.query('INSERT INTO notes (body) VALUES ($1)', [marker]));
    const direct = await connect(database.url());
    try {
      const result = await direct.query<{ username: string; fullname: string; attributed: boolean }>(
        "SELECT username, fullname, attributed FROM audit.edits WHERE tablename = 'public.notes' AND new->>'body' = $1",
        [marker],
      );
      return result.rows;
    } finally {
      await direct.end();
    }
  }

  it('stores a 10 kB name claim exactly', async () => {
    const name = 'Ada Lovelace, Countess of Lovelace; '.repeat(300).slice(0, 10_240);
    const rows = await auditedInsert({ sub: 'long-name', name }, 'long-name');
    expect(rows).toHaveLength(1);
    expect(rows[0].fullname).toHaveLength(10_240);
    expect(rows[0].fullname).toBe(name);
    expect(rows[0].username).toBe('long-name');
    expect(rows[0].attributed).toBe(true);
  });

  it('stores quotes, backslashes, semicolons and dollar quotes exactly', async () => {
    const sub = `o'brien"\\;$$`;
    const name = `O'Brien "Bob" \\back\\slash\\; DROP TABLE notes; -- $$ $tag$ $1 '' \\' E'\\x41'`;
    const rows = await auditedInsert({ sub, name }, 'special-characters');
    expect(rows).toHaveLength(1);
    expect(rows[0].username).toBe(sub);
    expect(rows[0].fullname).toBe(name);
    expect(rows[0].attributed).toBe(true);
  });

  it('stores non-ASCII names exactly', async () => {
    const name = 'Zoë Åström 山田太郎 🙂';
    const rows = await auditedInsert({ sub: 'unicode', name }, 'unicode');
    expect(rows).toHaveLength(1);
    expect(rows[0].fullname).toBe(name);
  });
});

describe('proxy log', () => {
  it('contains none of the tokens sent', () => {
    expect(tokensSent.length).toBeGreaterThan(10);
    const logText = JSON.stringify(proxy.logs);
    const leaked = tokensSent.filter((token) => logText.includes(token));
    expect(leaked).toEqual([]);
    // A token's signature segment alone would identify it too.
    const leakedSignatures = tokensSent
      .map((token) => token.split('.')[2] ?? '')
      .filter((signature) => signature.length >= 16 && logText.includes(signature));
    expect(leakedSignatures).toEqual([]);
  });
});
