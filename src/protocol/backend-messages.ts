// Builders for the backend messages the proxy sends to clients itself, where it plays the
// server. Upstream messages the proxy sends as a client are built with pg-protocol's
// serializer instead.
import { Backend, TransactionStatus } from './codes.ts';

function withHeader(type: number, body: Buffer): Buffer {
  const message = Buffer.allocUnsafe(5 + body.length);
  message[0] = type;
  message.writeUInt32BE(4 + body.length, 1);
  body.copy(message, 5);
  return message;
}

function cString(value: string): Buffer {
  return Buffer.from(`${value}\0`, 'utf8');
}

function int32(value: number): Buffer {
  const buffer = Buffer.allocUnsafe(4);
  buffer.writeInt32BE(value);
  return buffer;
}

export const AuthenticationOk = withHeader(Backend.Authentication, int32(0));
export const AuthenticationCleartextPassword = withHeader(Backend.Authentication, int32(3));
export const ReadyForQueryIdle = readyForQuery(TransactionStatus.Idle);
/** The reply to SSLRequest and GSSENCRequest when encryption is not offered. */
export const EncryptionNotSupported = Buffer.from('N');

export function readyForQuery(status: number): Buffer {
  return withHeader(Backend.ReadyForQuery, Buffer.from([status]));
}

export function parameterStatus(name: string, value: string): Buffer {
  return withHeader(Backend.ParameterStatus, Buffer.concat([cString(name), cString(value)]));
}

export function backendKeyData(processId: number, secretKey: number): Buffer {
  return withHeader(Backend.BackendKeyData, Buffer.concat([int32(processId), int32(secretKey)]));
}

/** NegotiateProtocolVersion: the newest minor version we speak and the options we did not recognise. */
export function negotiateProtocolVersion(minorVersion: number, unrecognizedOptions: string[]): Buffer {
  return withHeader(
    Backend.NegotiateProtocolVersion,
    Buffer.concat([int32(minorVersion), int32(unrecognizedOptions.length), ...unrecognizedOptions.map(cString)]),
  );
}

export type Severity = 'ERROR' | 'FATAL' | 'PANIC' | 'WARNING' | 'NOTICE';

export interface ErrorFields {
  severity: Severity;
  code: string;
  message: string;
  detail?: string;
  hint?: string;
}

/** ErrorResponse (or NoticeResponse) with the fields PostgreSQL always sends plus detail and hint. */
export function errorResponse(fields: ErrorFields, type: number = Backend.ErrorResponse): Buffer {
  const parts = [
    Buffer.from('S'), cString(fields.severity),
    Buffer.from('V'), cString(fields.severity),
    Buffer.from('C'), cString(fields.code),
    Buffer.from('M'), cString(fields.message),
  ];
  if (fields.detail !== undefined) parts.push(Buffer.from('D'), cString(fields.detail));
  if (fields.hint !== undefined) parts.push(Buffer.from('H'), cString(fields.hint));
  parts.push(Buffer.from([0]));
  return withHeader(type, Buffer.concat(parts));
}

/** Reads the fields of an ErrorResponse or NoticeResponse into a map keyed by field code. */
export function readErrorFields(frame: Buffer): Map<string, string> {
  const fields = new Map<string, string>();
  let offset = 5;
  while (offset < frame.length && frame[offset] !== 0) {
    const code = String.fromCharCode(frame[offset]);
    const end = frame.indexOf(0, offset + 1);
    if (end < 0) break;
    fields.set(code, frame.toString('utf8', offset + 1, end));
    offset = end + 1;
  }
  return fields;
}
