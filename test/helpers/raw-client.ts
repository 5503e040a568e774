// A PostgreSQL frontend at the byte level, for tests that must send what no driver sends
// (malformed packets, custom startup parameters, CancelRequest) or read exactly what the
// proxy sends back. Message layouts follow the "Message Formats" chapter of the PostgreSQL
// documentation, protocol version 3.0.
import net from 'node:net';

/** Request codes that take the place of the protocol version in length-only startup packets. */
export const PROTOCOL_VERSION_3 = 196608;
export const CANCEL_REQUEST_CODE = 80877102;
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;

/** Authentication request codes of the AuthenticationXXX messages. */
export const AUTHENTICATION_OK = 0;
export const AUTHENTICATION_CLEARTEXT_PASSWORD = 3;

// ---------------------------------------------------------------------------------------------
// Byte builders

export function int32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeInt32BE(value);
  return bytes;
}

export function uint32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value);
  return bytes;
}

/** Encodes `value` as a NUL-terminated UTF-8 string. */
export function cString(value: string): Buffer {
  return Buffer.concat([Buffer.from(value, 'utf8'), Buffer.alloc(1)]);
}

/** Prefixes `body` with its Int32 length, the length word included, as startup packets are framed. */
export function lengthOnlyPacket(body: Buffer): Buffer {
  return Buffer.concat([uint32(body.length + 4), body]);
}

/** Builds a protocol 3.0 StartupMessage with `parameters` in the given order. */
export function startupMessage(parameters: Record<string, string>, protocolVersion = PROTOCOL_VERSION_3): Buffer {
  const pairs = Object.entries(parameters).flatMap(([name, value]) => [cString(name), cString(value)]);
  return lengthOnlyPacket(Buffer.concat([int32(protocolVersion), ...pairs, Buffer.alloc(1)]));
}

export function sslRequest(): Buffer {
  return lengthOnlyPacket(int32(SSL_REQUEST_CODE));
}

export function gssencRequest(): Buffer {
  return lengthOnlyPacket(int32(GSSENC_REQUEST_CODE));
}

/** Builds a CancelRequest (16 bytes) for the process id and 4-byte secret key of a BackendKeyData. */
export function cancelRequest(processId: number, secretKey: Buffer): Buffer {
  if (secretKey.length !== 4) throw new Error(`a protocol 3.0 secret key has 4 bytes, got ${secretKey.length}`);
  return lengthOnlyPacket(Buffer.concat([int32(CANCEL_REQUEST_CODE), uint32(processId), secretKey]));
}

/** Builds a regular message: type byte, Int32 length (the length word included), body. */
export function frontendMessage(type: string, body: Buffer = Buffer.alloc(0)): Buffer {
  if (type.length !== 1) throw new Error(`a message type is one character, got ${JSON.stringify(type)}`);
  return Buffer.concat([Buffer.from(type, 'latin1'), uint32(body.length + 4), body]);
}

export function queryMessage(sql: string): Buffer {
  return frontendMessage('Q', cString(sql));
}

export function passwordMessage(password: string): Buffer {
  return frontendMessage('p', cString(password));
}

export function terminateMessage(): Buffer {
  return frontendMessage('X');
}

// ---------------------------------------------------------------------------------------------
// Reading backend messages

/** One backend message: its type letter and its body (the bytes after the length). */
export interface BackendMessage {
  type: string;
  body: Buffer;
}

/** Reads the fields of an ErrorResponse or NoticeResponse body, keyed by field letter (C is the SQLSTATE). */
export function parseErrorFields(body: Buffer): Map<string, string> {
  const fields = new Map<string, string>();
  let offset = 0;
  while (offset < body.length && body[offset] !== 0) {
    const code = String.fromCharCode(body[offset]);
    const end = body.indexOf(0, offset + 1);
    if (end < 0) throw new Error(`ErrorResponse field ${code} has no NUL terminator`);
    fields.set(code, body.toString('utf8', offset + 1, end));
    offset = end + 1;
  }
  return fields;
}

/** Returns the fields of the first ErrorResponse in `messages`, or null when there is none. */
export function firstError(messages: BackendMessage[]): Map<string, string> | null {
  const error = messages.find((message) => message.type === 'E');
  return error === undefined ? null : parseErrorFields(error.body);
}

/** Reads [name, value] from a ParameterStatus body. */
export function parseParameterStatus(body: Buffer): [string, string] {
  const nameEnd = body.indexOf(0);
  const valueEnd = body.indexOf(0, nameEnd + 1);
  return [body.toString('utf8', 0, nameEnd), body.toString('utf8', nameEnd + 1, valueEnd)];
}

/** Decodes the DataRow messages in `messages` into rows of text values, with NULL as null. */
export function dataRows(messages: BackendMessage[]): (string | null)[][] {
  return messages
    .filter((message) => message.type === 'D')
    .map(({ body }) => {
      const columns: (string | null)[] = [];
      let offset = 2;
      for (let column = 0; column < body.readUInt16BE(0); column++) {
        const length = body.readInt32BE(offset);
        offset += 4;
        if (length < 0) {
          columns.push(null);
        } else {
          columns.push(body.toString('utf8', offset, offset + length));
          offset += length;
        }
      }
      return columns;
    });
}

/** Maximum message length a test expects from the proxy. A longer declared length means a framing bug. */
const MAX_EXPECTED_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * A TCP connection that buffers everything the peer sends, so a test can read it as raw bytes
 * or as backend messages, each read bounded by a timeout.
 */
export class RawConnection {
  private received = Buffer.alloc(0);
  private ended = false;
  private socketError: Error | null = null;
  private wake: (() => void) | null = null;
  /** Resolves when the socket has closed, for whatever reason. */
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.received = Buffer.concat([this.received, chunk]);
      this.notify();
    });
    socket.on('error', (error) => {
      this.socketError = error;
      this.notify();
    });
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.ended = true;
        this.notify();
        resolve();
      });
    });
  }

  /** Connects to `host`:`port`, and rejects when the connection is not open after `timeoutMs`. */
  static async open(host: string, port: number, timeoutMs = 5000): Promise<RawConnection> {
    const socket = net.connect({ host, port });
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connecting to ${host}:${port} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve();
      });
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
    return new RawConnection(socket);
  }

  /** True once the peer has closed the connection or the socket failed. */
  get isClosed(): boolean {
    return this.ended;
  }

  /** Bytes received and not read yet. */
  get unreadBytes(): number {
    return this.received.length;
  }

  send(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Reads exactly `count` bytes. Rejects if they have not all arrived after `timeoutMs` or the socket closed first. */
  async readBytes(count: number, timeoutMs: number): Promise<Buffer> {
    await this.waitFor(() => this.received.length >= count, timeoutMs, `${count} bytes`);
    const bytes = this.received.subarray(0, count);
    this.received = this.received.subarray(count);
    return bytes;
  }

  /** Reads one backend message. Rejects after `timeoutMs` or when the socket closes before a whole message arrived. */
  async readMessage(timeoutMs: number): Promise<BackendMessage> {
    await this.waitFor(() => this.received.length >= 5, timeoutMs, 'a message header');
    const length = this.received.readUInt32BE(1);
    if (length < 4 || length > MAX_EXPECTED_MESSAGE_BYTES) {
      throw new Error(`received message type ${JSON.stringify(String.fromCharCode(this.received[0]))} with invalid length ${length}`);
    }
    await this.waitFor(() => this.received.length >= length + 1, timeoutMs, `a message of ${length + 1} bytes`);
    const type = String.fromCharCode(this.received[0]);
    const body = Buffer.from(this.received.subarray(5, length + 1));
    this.received = this.received.subarray(length + 1);
    return { type, body };
  }

  /** Reads messages up to and including the first one of type `type`, and rejects after `timeoutMs` in total. */
  async readUntil(type: string, timeoutMs: number): Promise<BackendMessage[]> {
    const deadline = Date.now() + timeoutMs;
    const messages: BackendMessage[] = [];
    for (;;) {
      const message = await this.readMessage(Math.max(0, deadline - Date.now()));
      messages.push(message);
      if (message.type === type) return messages;
    }
  }

  /**
   * Reads every message until the peer closes the connection. Rejects when the connection is
   * still open after `timeoutMs`, or when the peer closes in the middle of a message.
   */
  async readUntilClosed(timeoutMs: number): Promise<BackendMessage[]> {
    await this.waitFor(() => this.ended, timeoutMs, 'the connection to close');
    const messages: BackendMessage[] = [];
    while (this.received.length > 0) messages.push(await this.readMessage(0));
    return messages;
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  private async waitFor(ready: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!ready()) {
      if (this.ended) {
        const cause = this.socketError === null ? '' : ` (${this.socketError.message})`;
        throw new Error(`connection closed while waiting for ${what}${cause}, with ${this.received.length} unread bytes`);
      }
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}, with ${this.received.length} unread bytes`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Login

export interface LoginResult {
  /** Everything the proxy sent during login, up to and including the first ReadyForQuery. */
  messages: BackendMessage[];
  processId: number;
  secretKey: Buffer;
  parameters: Map<string, string>;
}

/**
 * Sends a StartupMessage with `parameters` and, if the proxy requests a cleartext password,
 * `password`, then reads until ReadyForQuery. Throws with the SQLSTATE and message when the
 * proxy sends an ErrorResponse instead.
 */
export async function login(
  connection: RawConnection,
  parameters: Record<string, string>,
  password: string | null,
  timeoutMs = 10_000,
): Promise<LoginResult> {
  const deadline = Date.now() + timeoutMs;
  const remaining = () => Math.max(0, deadline - Date.now());
  const messages: BackendMessage[] = [];
  const result: LoginResult = { messages, processId: 0, secretKey: Buffer.alloc(4), parameters: new Map() };

  connection.send(startupMessage(parameters));
  for (;;) {
    const message = await connection.readMessage(remaining());
    messages.push(message);
    switch (message.type) {
      case 'R': {
        const request = message.body.readInt32BE(0);
        if (request === AUTHENTICATION_CLEARTEXT_PASSWORD) {
          if (password === null) throw new Error('the proxy requested a password, but the test passed none to login()');
          connection.send(passwordMessage(password));
        } else if (request !== AUTHENTICATION_OK) {
          throw new Error(`unexpected authentication request ${request}`);
        }
        break;
      }
      case 'K':
        result.processId = message.body.readUInt32BE(0);
        result.secretKey = Buffer.from(message.body.subarray(4, 8));
        break;
      case 'S': {
        const [name, value] = parseParameterStatus(message.body);
        result.parameters.set(name, value);
        break;
      }
      case 'E': {
        const fields = parseErrorFields(message.body);
        throw new LoginFailed(fields);
      }
      case 'Z':
        return result;
    }
  }
}

/** The ErrorResponse a proxy sent instead of completing a login. */
export class LoginFailed extends Error {
  override name = 'LoginFailed';
  constructor(readonly fields: Map<string, string>) {
    super(`login failed: ${fields.get('S')} ${fields.get('C')} ${fields.get('M')}`);
  }

  get code(): string | undefined {
    return this.fields.get('C');
  }
}

/** Sends a simple Query and reads until its ReadyForQuery. */
export async function simpleQuery(connection: RawConnection, sql: string, timeoutMs = 10_000): Promise<BackendMessage[]> {
  connection.send(queryMessage(sql));
  return connection.readUntil('Z', timeoutMs);
}
