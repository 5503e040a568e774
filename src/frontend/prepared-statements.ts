// Named prepared statements under transaction pooling. A client's statement names are its
// own. On the server each statement is named after a digest of its text and parameter types,
// so clients that prepare the same text share one server-side statement. Any server
// connection can be given the statement again when a client's next transaction lands there.
import { createHash } from 'node:crypto';

import { Backend, Frontend } from '../protocol/codes.ts';

export interface ClientStatement {
  /** Name of the shared statement on server connections. */
  serverName: string;
  /** The client's Parse, renamed to `serverName`, ready to send to any server connection. */
  parse: Buffer;
}

export const ParseComplete = Buffer.from([Backend.ParseComplete, 0, 0, 0, 4]);
export const CloseComplete = Buffer.from([Backend.CloseComplete, 0, 0, 0, 4]);

/**
 * A Parse that always fails (syntax error) and creates nothing. Sent when the proxy itself
 * rejects a message inside a client's batch, so the server aborts the batch's implicit
 * transaction and skips to Sync exactly as it would have for its own error.
 */
export const AbortBatchParse = buildMessage(Frontend.Parse, [cString('pg_audit_proxy_abort'), cString('pg_audit_proxy abort batch'), Buffer.from([0, 0])]);

/** A Query that always fails (syntax error), for the same purpose in the simple protocol. */
export const AbortStatementQuery = buildMessage(Frontend.Query, [cString('pg_audit_proxy abort statement')]);

/**
 * True when a Query or Parse calls a session-level advisory lock function
 * (pg_advisory_lock, pg_try_advisory_lock and their _shared forms), whose lock outlives the
 * transaction. A byte search first, so ordinary statements cost one scan.
 */
export function mentionsSessionAdvisoryLock(frame: Buffer): boolean {
  if (!frame.includes('advisory') && !frame.includes('ADVISORY')) return false;
  return /pg_(try_)?advisory_lock(_shared)?\s*\(/i.test(frame.toString('utf8', 5));
}

/** Words whose presence in a statement's text calls for a session check at the end of the lease. */
const SESSION_STATE_WORDS = ['set_config', 'advisory', 'temp', 'listen', 'prepare', 'declare'].flatMap((word) => [word, word.toUpperCase()]);

/**
 * True when a Query or Parse may create session state that its command tag does not show,
 * for instance set_config in a SELECT or CREATE TEMP TABLE AS. This only decides whether the
 * session is inspected afterwards; the inspection itself reads the server's catalogs.
 */
export function mayCreateSessionState(frame: Buffer): boolean {
  for (const word of SESSION_STATE_WORDS) {
    if (frame.includes(word, 5)) return true;
  }
  return false;
}

function cString(value: string): Buffer {
  return Buffer.from(`${value}\0`, 'utf8');
}

function buildMessage(type: number, parts: Buffer[]): Buffer {
  const bodyLength = parts.reduce((sum, part) => sum + part.length, 0);
  const message = Buffer.allocUnsafe(5 + bodyLength);
  message[0] = type;
  message.writeUInt32BE(4 + bodyLength, 1);
  let offset = 5;
  for (const part of parts) {
    part.copy(message, offset);
    offset += part.length;
  }
  return message;
}

/** Reads the NUL-terminated string at `offset`; returns it and the offset after its NUL. */
export function readCString(frame: Buffer, offset: number): [string, number] {
  const end = frame.indexOf(0, offset);
  if (end < 0) throw new RangeError('missing string terminator');
  return [frame.toString('utf8', offset, end), end + 1];
}

/** Derives the server name of a statement from a digest of its query text and parameter types. */
export function serverStatementName(queryAndTypes: Buffer): string {
  return `pg_audit_proxy_${createHash('sha1').update(queryAndTypes).digest('hex')}`;
}

/** Parse(name, ...) into the client statement it defines. `bodyOffset` is where the query text starts. */
export function clientStatement(frame: Buffer, bodyOffset: number): ClientStatement {
  const queryAndTypes = frame.subarray(bodyOffset);
  const serverName = serverStatementName(queryAndTypes);
  return { serverName, parse: buildMessage(Frontend.Parse, [cString(serverName), queryAndTypes]) };
}

/** Copies a Bind or Describe with its statement name, which spans [nameStart, nameEnd) including the NUL, replaced. */
export function renameInMessage(frame: Buffer, nameStart: number, nameEnd: number, newName: string): Buffer {
  return buildMessage(frame[0], [frame.subarray(5, nameStart), cString(newName), frame.subarray(nameEnd)]);
}
