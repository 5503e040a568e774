// Shared helpers for the regression tests in test/regression/, which reproduce bugs found by adversarial testing.
import { connect } from '../helpers/postgres.ts';
import type { ProxyEnvironment } from '../helpers/proxy-env.ts';
import { login, RawConnection, type BackendMessage } from '../helpers/raw-client.ts';

export interface AuditRow {
  username: string;
  fullname: string | null;
  attributed: boolean;
  query: string;
}

/** Audit rows whose query contains `marker`, over a direct connection. */
export async function auditRowsFor(env: ProxyEnvironment, marker: string): Promise<AuditRow[]> {
  const direct = await connect(env.database.url());
  try {
    const result = await direct.query<AuditRow>(
      'SELECT username, fullname, attributed, query FROM audit.edits WHERE query LIKE $1 ORDER BY id',
      [`%${marker}%`],
    );
    return result.rows;
  } finally {
    await direct.end();
  }
}

/** Runs SQL as the database owner over a direct connection. */
export async function asOwner(env: ProxyEnvironment, sql: string): Promise<void> {
  const direct = await connect(env.database.url());
  try {
    await direct.query(sql);
  } finally {
    await direct.end();
  }
}

/** Opens a raw protocol connection through the proxy and logs in with `token` as the password. */
export async function rawClient(env: ProxyEnvironment, token: string): Promise<RawConnection> {
  const raw = await RawConnection.open(env.proxy.host, env.proxy.port);
  await login(raw, { user: 'app', database: env.database.name }, token);
  return raw;
}

/** Reads messages until `count` ReadyForQuery have arrived, bounded by `timeoutMs`. */
export async function readReadies(raw: RawConnection, count: number, timeoutMs = 5000): Promise<BackendMessage[]> {
  const deadline = Date.now() + timeoutMs;
  const all: BackendMessage[] = [];
  for (let i = 0; i < count; i++) all.push(...(await raw.readUntil('Z', Math.max(1, deadline - Date.now()))));
  return all;
}

export const types = (messages: BackendMessage[]) => messages.map((m) => m.type).join('');

import { cString, frontendMessage } from '../helpers/raw-client.ts';

const int16 = (value: number) => {
  const bytes = Buffer.alloc(2);
  bytes.writeInt16BE(value);
  return bytes;
};
const int32 = (value: number) => {
  const bytes = Buffer.alloc(4);
  bytes.writeInt32BE(value);
  return bytes;
};

export const parse = (name: string, sql: string) => frontendMessage('P', Buffer.concat([cString(name), cString(sql), int16(0)]));
export const bind = (statement: string, values: (string | null)[] = [], portal = '') =>
  frontendMessage('B', Buffer.concat([
    cString(portal), cString(statement), int16(0), int16(values.length),
    ...values.map((v) => (v === null ? int32(-1) : Buffer.concat([int32(Buffer.byteLength(v)), Buffer.from(v)]))),
    int16(0),
  ]));
export const execute = (portal = '', maxRows = 0) => frontendMessage('E', Buffer.concat([cString(portal), int32(maxRows)]));
export const describeStatement = (name: string) => frontendMessage('D', Buffer.concat([Buffer.from('S'), cString(name)]));
export const closeStatement = (name: string) => frontendMessage('C', Buffer.concat([Buffer.from('S'), cString(name)]));
export const sync = () => frontendMessage('S');
export const flush = () => frontendMessage('H');
export const copyData = (text: string) => frontendMessage('d', Buffer.from(text));
export const copyDone = () => frontendMessage('c');
