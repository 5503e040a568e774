// Clients that break the protocol, send too much or too little, or negotiate encryption and
// cancellation: each gets a clear error or a quiet close, and other clients never notice.
import { randomBytes } from 'node:crypto';

import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { withTimeout } from '../helpers/postgres.ts';
import { createProxyEnvironment, type ProxyEnvironment } from '../helpers/proxy-env.ts';
import { waitForRunningStatement } from '../helpers/server-activity.ts';
import {
  CANCEL_REQUEST_CODE,
  cancelRequest,
  cString,
  dataRows,
  firstError,
  frontendMessage,
  gssencRequest,
  int32,
  lengthOnlyPacket,
  login,
  PROTOCOL_VERSION_3,
  queryMessage,
  RawConnection,
  simpleQuery,
  sslRequest,
  startupMessage,
  uint32,
  type BackendMessage,
} from '../helpers/raw-client.ts';

/** PostgreSQL's bound on a startup packet, length word included (MAX_STARTUP_PACKET_LENGTH). */
const MAX_STARTUP_PACKET_BYTES = 10_000;
const STARTUP_TIMEOUT_MS = 500;
/** Upper bound for the proxy to reply to and close a misbehaving connection. */
const CLOSE_TIMEOUT_MS = 5000;

let env: ProxyEnvironment;
let token: string;
/** A client logged in before any misbehaving one, used after each case to show it was not disturbed. */
let bystander: pg.Client;

beforeAll(async () => {
  env = await createProxyEnvironment('protocol', {
    listen: { host: '127.0.0.1', port: 0, startup_timeout: `${STARTUP_TIMEOUT_MS}ms` },
  });
  token = await env.token('ada-42', 'Ada Lovelace');
  bystander = await env.client(token);
});

afterAll(async () => {
  await env?.close();
});

async function openRaw(): Promise<RawConnection> {
  return RawConnection.open(env.proxy.host, env.proxy.port);
}

function loginParameters(): Record<string, string> {
  return { user: 'app', database: env.database.name };
}

/** Fails unless the bystander and a newly connected client can both still run queries. */
async function expectOtherClientsServed(): Promise<void> {
  const before = await withTimeout(bystander.query('SELECT 1 AS one'), CLOSE_TIMEOUT_MS, 'a query from the client logged in earlier');
  expect(before.rows).toEqual([{ one: 1 }]);
  const client = await env.client(token);
  try {
    const result = await withTimeout(client.query('SELECT 2 AS two'), CLOSE_TIMEOUT_MS, 'a query from a new client');
    expect(result.rows).toEqual([{ two: 2 }]);
  } finally {
    await client.end();
  }
}

/** Waits for the proxy to close `connection`, and returns what it sent with the SQLSTATE and severity of its first ErrorResponse. */
async function awaitClose(connection: RawConnection): Promise<{ code: string | undefined; severity: string | undefined; messages: BackendMessage[] }> {
  const messages = await connection.readUntilClosed(CLOSE_TIMEOUT_MS);
  const error = firstError(messages);
  return { code: error?.get('C'), severity: error?.get('S'), messages };
}

describe('invalid first packets', () => {
  const garbage: [string, Buffer][] = [
    ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\nHost: localhost\r\n\r\n', 'latin1')],
    ['bytes of 0xff', Buffer.alloc(64, 0xff)],
    ['a length below 8', Buffer.concat([uint32(4), int32(PROTOCOL_VERSION_3)])],
    ['protocol version 2.0', lengthOnlyPacket(Buffer.concat([int32(2 << 16), cString('user'), cString('app'), Buffer.alloc(1)]))],
    ['a startup packet without its final NUL', lengthOnlyPacket(Buffer.concat([int32(PROTOCOL_VERSION_3), cString('user'), Buffer.from('app')]))],
    ['a regular message in place of a startup packet', frontendMessage('Q', cString('SELECT 1'))],
  ];

  it.each(garbage)('closes the connection after %s with 08P01', async (_name, bytes) => {
    const connection = await openRaw();
    connection.send(bytes);
    const { code, severity } = await awaitClose(connection);
    expect(code).toBe('08P01');
    expect(severity).toBe('FATAL');
    await expectOtherClientsServed();
  });
});

describe('startup packet size', () => {
  /** Builds a StartupMessage for a valid login, padded with application_name to exactly `size` bytes. */
  function startupOfSize(size: number): Buffer {
    const unpadded = startupMessage({ ...loginParameters(), application_name: '' });
    const packet = startupMessage({ ...loginParameters(), application_name: 'x'.repeat(size - unpadded.length) });
    expect(packet.length).toBe(size);
    return packet;
  }

  it('rejects a declared length above 10,000 bytes before the body arrives', async () => {
    const connection = await openRaw();
    connection.send(Buffer.concat([uint32(MAX_STARTUP_PACKET_BYTES + 1), int32(PROTOCOL_VERSION_3)]));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });

  it('rejects a complete startup packet of 10,001 bytes', async () => {
    const connection = await openRaw();
    connection.send(startupOfSize(MAX_STARTUP_PACKET_BYTES + 1));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });

  it('rejects a declared length of 2^31 with 08P01', async () => {
    const connection = await openRaw();
    connection.send(Buffer.concat([uint32(2 ** 31), int32(PROTOCOL_VERSION_3)]));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });

  it('accepts a startup packet of exactly 10,000 bytes', async () => {
    const connection = await openRaw();
    try {
      connection.send(startupOfSize(MAX_STARTUP_PACKET_BYTES));
      const request = await connection.readMessage(CLOSE_TIMEOUT_MS);
      expect(request.type).toBe('R');
      expect(request.body.readInt32BE(0)).toBe(3);
      connection.send(frontendMessage('p', cString(token)));
      const messages = await connection.readUntil('Z', CLOSE_TIMEOUT_MS);
      expect(firstError(messages)).toBeNull();
      expect(dataRows(await simpleQuery(connection, 'SELECT 1'))).toEqual([['1']]);
    } finally {
      connection.destroy();
    }
  });
});

describe('oversize messages after login', () => {
  it('closes the connection with 08P01 for a declared length of 2^31', async () => {
    const connection = await openRaw();
    await login(connection, loginParameters(), token);
    connection.send(Buffer.concat([Buffer.from('Q', 'latin1'), uint32(2 ** 31)]));
    const { code, severity } = await awaitClose(connection);
    expect(code).toBe('08P01');
    expect(severity).toBe('FATAL');
    await expectOtherClientsServed();
  });

  it('closes the connection with 08P01 for a declared length above max_message_bytes', async () => {
    const connection = await openRaw();
    await login(connection, loginParameters(), token);
    const limit = env.proxy.config.listen.max_message_bytes;
    connection.send(Buffer.concat([Buffer.from('B', 'latin1'), uint32(limit + 4 + 1)]));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });
});

describe('unknown message types', () => {
  it('closes the connection with 08P01 for an unknown message type after login', async () => {
    const connection = await openRaw();
    await login(connection, loginParameters(), token);
    connection.send(frontendMessage('z', cString('what is this')));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });
});

describe('startup timeout', () => {
  it('closes a connection that sends nothing with 08P01', async () => {
    const connection = await openRaw();
    const { code, messages } = await awaitClose(connection);
    expect(code).toBe('08P01');
    expect(messages.map((message) => message.type)).toEqual(['E']);
    await expectOtherClientsServed();
  });

  it('closes a connection that never sends its password with 08P01', async () => {
    const connection = await openRaw();
    connection.send(startupMessage(loginParameters()));
    const { code, messages } = await awaitClose(connection);
    expect(messages[0]?.type).toBe('R');
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });

  it('closes a half-sent startup packet with 08P01', async () => {
    const connection = await openRaw();
    connection.send(startupMessage(loginParameters()).subarray(0, 12));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });
});

describe('encryption requests', () => {
  it.each([
    ['SSLRequest', sslRequest],
    ['GSSENCRequest', gssencRequest],
  ])('responds N to %s, then accepts a login', async (_name, request) => {
    const connection = await openRaw();
    try {
      connection.send(request());
      const response = await connection.readBytes(1, CLOSE_TIMEOUT_MS);
      expect(response.toString('latin1')).toBe('N');
      await login(connection, loginParameters(), token);
      expect(dataRows(await simpleQuery(connection, 'SELECT empnum FROM userinfo'))).toEqual([['ada-42']]);
    } finally {
      connection.destroy();
    }
  });

  it('rejects plaintext pipelined behind an SSLRequest with 08P01', async () => {
    const connection = await openRaw();
    connection.send(Buffer.concat([sslRequest(), startupMessage(loginParameters())]));
    const messages = await connection.readUntilClosed(CLOSE_TIMEOUT_MS);
    // The response must not be 'N' followed by a login, because the bytes after the request
    // arrived before the client could know whether encryption was on.
    expect(messages[0]?.type).toBe('E');
    expect(firstError(messages)?.get('C')).toBe('08P01');
    await expectOtherClientsServed();
  });
});

describe('cancel requests', () => {
  it('closes a cancel request with an unknown key quietly', async () => {
    const logStart = env.proxy.logs.length;
    const connection = await openRaw();
    connection.send(cancelRequest(0x7fff_fff0, randomBytes(4)));
    const messages = await connection.readUntilClosed(CLOSE_TIMEOUT_MS);
    expect(messages).toEqual([]);
    expect(env.proxy.logs.slice(logStart).filter((line) => line.msg === 'cancel request ignored: no such session')).toHaveLength(1);
    await expectOtherClientsServed();
  });

  it('ignores a cancel request with the right process id but the wrong secret', async () => {
    const target = await openRaw();
    try {
      const session = await login(target, loginParameters(), token);
      const wrongSecret = Buffer.from(session.secretKey.map((byte) => byte ^ 0xff));
      const marker = 'wrong-secret-cancel';
      target.send(queryMessage(`SELECT pg_sleep(0.5), 1 /* ${marker} */`));
      await waitForRunningStatement(env.database.name, marker);

      const canceller = await openRaw();
      canceller.send(cancelRequest(session.processId, wrongSecret));
      expect(await canceller.readUntilClosed(CLOSE_TIMEOUT_MS)).toEqual([]);

      const messages = await target.readUntil('Z', CLOSE_TIMEOUT_MS);
      expect(firstError(messages)).toBeNull();
      expect(dataRows(messages)).toEqual([['', '1']]);
    } finally {
      target.destroy();
    }
  });

  it('rejects a cancel request shorter than 16 bytes with 08P01', async () => {
    const connection = await openRaw();
    connection.send(lengthOnlyPacket(Buffer.concat([int32(CANCEL_REQUEST_CODE), uint32(1)])));
    const { code } = await awaitClose(connection);
    expect(code).toBe('08P01');
    await expectOtherClientsServed();
  });
});

describe('password message size', () => {
  // Its own proxy, with the default startup timeout of 10 s, so that a close caused by the
  // startup timeout cannot pass for the check of the declared length.
  let passwordEnv: ProxyEnvironment;

  beforeAll(async () => {
    passwordEnv = await createProxyEnvironment('protocol_password');
  });

  afterAll(async () => {
    await passwordEnv?.close();
  });

  it('rejects an oversize password message before its body arrives', async () => {
    const connection = await RawConnection.open(passwordEnv.proxy.host, passwordEnv.proxy.port);
    try {
      connection.send(startupMessage({ user: 'app', database: passwordEnv.database.name }));
      const request = await connection.readMessage(CLOSE_TIMEOUT_MS);
      expect(request.body.readInt32BE(0)).toBe(3);
      // A password message declaring 32 MiB, of which only the first bytes are sent.
      connection.send(Buffer.concat([Buffer.from('p', 'latin1'), uint32(32 * 1024 * 1024 + 4), Buffer.from('eyJ')]));
      const messages = await connection.readUntilClosed(2000);
      expect(firstError(messages)?.get('C')).toBe('08P01');
    } finally {
      connection.destroy();
    }
  });
});
