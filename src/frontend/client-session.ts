// One client connection, where the proxy plays the PostgreSQL server. It runs startup and
// JWT authentication, then relays the client's requests to a leased server connection and
// the server's replies back, one transaction per lease (or one session for a pinned client).
//
// Lease rule (transaction pooling): a server connection belongs to the client from the
// first message of a request until three things are true. Every Sync and Query it
// forwarded has had its ReadyForQuery, no extended-protocol batch is left without its
// Sync, and the last ReadyForQuery reports the idle status. `ServerConnection.reusable`
// encodes exactly that.
import { randomInt, timingSafeEqual } from 'node:crypto';
import type net from 'node:net';

import { serialize } from 'pg-protocol';

import { ReplyKind, replyKindOf } from '../backend/owed-replies.ts';
import { type ServerConnection, type ServerReplySink, UNREPLAYABLE_PARAMETERS } from '../backend/server-connection.ts';
import * as clientErrors from '../errors/client-errors.ts';
import { ClaimNotRepresentable, identityFromClaims, identityJson, type Identity } from '../identity/claims.ts';
import { type ClientState, ServerError } from '../identity/inject.ts';
import type { Logger } from '../observability/logger.ts';
import type { Checkout } from '../pool/pool.ts';
import { CheckoutCanceled, CheckoutTimeout, UpstreamUnavailable } from '../pool/pool.ts';
import {
  AuthenticationCleartextPassword,
  AuthenticationOk,
  backendKeyData,
  EncryptionNotSupported,
  errorResponse,
  type ErrorFields,
  negotiateProtocolVersion,
  parameterStatus,
  ReadyForQueryIdle,
} from '../protocol/backend-messages.ts';
import { Backend, Frontend, MAX_STARTUP_PACKET_BYTES } from '../protocol/codes.ts';
import { type FrameHandler, FramingError, MessageFramer } from '../protocol/framing.ts';
import { parseOptions, parseStartupPacket } from '../protocol/frontend-messages.ts';
import { TokenRejected } from './auth/jwt-auth.ts';
import type { ProxyContext } from './proxy-context.ts';
import { OutputBatch } from './output-batch.ts';
import {
  AbortBatchParse,
  AbortStatementQuery,
  mayCreateSessionState,
  mentionsSessionAdvisoryLock,
  type ClientStatement,
  clientStatement,
  CloseComplete,
  ParseComplete,
  readCString,
  renameInMessage,
} from './prepared-statements.ts';

/**
 * Query for what a client's statements left in the session. Rows of ('setting', name, value) are
 * settings changed other than the proxy's identity; rows of ('state', description, detail)
 * cannot be replayed. SET ROLE and SET SESSION AUTHORIZATION do not show in pg_settings,
 * so they are read from current_user and session_user (pg_stat_activity keeps the role
 * that logged in).
 */
const SESSION_STATE_SQL = [
  "SELECT 'setting', name, setting FROM pg_catalog.pg_settings WHERE source = 'session' AND name <> 'pg_audit_proxy.identity'",
  "SELECT 'identity', 'pg_audit_proxy.identity', pg_catalog.current_setting('pg_audit_proxy.identity', true)",
  "SELECT 'state', 'SET ROLE', current_user::text WHERE current_user <> session_user",
  "SELECT 'state', 'SET SESSION AUTHORIZATION', session_user::text WHERE session_user <> " +
    '(SELECT usename FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid())',
  "SELECT 'state', 'LISTEN', channel FROM pg_catalog.pg_listening_channels() AS channel",
  "SELECT 'state', 'session advisory lock', objid::text FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()",
  "SELECT 'state', 'temporary table', relname::text FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema() AND relname <> 'userinfo'",
  "SELECT 'state', 'WITH HOLD cursor', name FROM pg_catalog.pg_cursors WHERE is_holdable",
  "SELECT 'state', 'PREPARE', name FROM pg_catalog.pg_prepared_statements WHERE from_sql",
].join(' UNION ALL ');

/** Reads a DataRow of `count` text columns. */
function readTextDataRow(frame: Buffer, count: number): (string | null)[] {
  const values: (string | null)[] = [];
  let offset = 7;
  for (let column = 0; column < count; column++) {
    const length = frame.readInt32BE(offset);
    offset += 4;
    if (length < 0) {
      values.push(null);
      continue;
    }
    values.push(frame.toString('utf8', offset, offset + length));
    offset += length;
  }
  return values;
}

/** Describe and Close name a prepared statement with 'S', a portal with 'P'. */
const STATEMENT = 0x53;

type SessionState = 'startup' | 'password' | 'authenticating' | 'ready' | 'closed';

/** Startup parameters that are about the connection, not session settings to apply. */
const CONNECTION_PARAMETERS = new Set(['user', 'database', 'options', 'jwt', 'replication']);
/**
 * Client message types that may stream through when larger than the framer's buffer limit.
 * Parse and Bind are read for statement names, so they arrive whole (up to
 * listen.max_message_bytes).
 */
const STREAMABLE = new Set<number>([Frontend.CopyData, Frontend.Query]);
/** Client messages that may follow login; any other type byte is a protocol violation. */
const FORWARDED_TYPES = new Set<number>([
  Frontend.Bind, Frontend.Close, Frontend.CopyData, Frontend.CopyDone, Frontend.CopyFail, Frontend.Describe,
  Frontend.Execute, Frontend.Flush, Frontend.FunctionCall, Frontend.Parse, Frontend.Query, Frontend.Sync,
]);
/** A password message carries the token; tokens of several kilobytes are normal. */
const MAX_PASSWORD_MESSAGE_BYTES = 64 * 1024;
/** Pending client bytes, while waiting for a server connection, before reading pauses. */
const MAX_PENDING_BYTES = 1024 * 1024;

interface PendingMessage {
  type: number;
  bytes: Buffer;
  /** A piece of a streamed message: `start` marks its first piece, `last` its final one. */
  piece?: { start: boolean; last: boolean };
}

let nextSessionId = 1;

export class ClientSession implements FrameHandler, ServerReplySink {
  readonly id = nextSessionId++;
  processId = 0;
  readonly secretKey = Buffer.alloc(4);
  state: SessionState = 'startup';
  log: Logger;

  private startupBytes: Buffer = Buffer.alloc(0);
  private readonly heldDuringAuthentication: Buffer[] = [];
  private readonly framer: MessageFramer;
  private readonly toClient: OutputBatch;
  private readonly toServer: Buffer[] = [];
  private startupTimer: NodeJS.Timeout | null;

  private user = '';
  private identity: Identity = new Map();
  private readonly settings = new Map<string, string>();
  /** The settings as the client's startup packet gave them: what RESET ALL and DISCARD ALL return to. */
  private startupSettings: ReadonlyMap<string, string> = new Map();
  /** The client's named prepared statements, by the client's names. */
  private readonly statements = new Map<string, ClientStatement>();
  private clientState!: ClientState;

  lease: ServerConnection | null = null;
  /** The statement that pinned the client to its server connection, or null under transaction pooling. */
  pinnedBy: string | null = null;
  private checkout: Checkout | null = null;
  private readonly pending: PendingMessage[] = [];
  private pendingBytes = 0;
  /** After an error of the proxy's own inside an extended batch: drop messages until Sync. */
  private discardUntilSync = false;
  /** A request of the proxy's own (lease setup, session inspection) is in flight and the client's messages wait for it. */
  private settingUp = false;
  /** The type of a client message being streamed through, or 0. */
  private streamingType = 0;

  constructor(
    readonly socket: net.Socket,
    private readonly context: ProxyContext,
  ) {
    this.log = context.log.child({ side: 'client', connId: this.id, peer: `${socket.remoteAddress}:${socket.remotePort}` });
    this.framer = new MessageFramer(this, context.config.listen.max_message_bytes, STREAMABLE);
    this.toClient = new OutputBatch(socket);
    this.startupTimer = setTimeout(() => this.disconnect('startup timeout', clientErrors.startupTimeout()), context.config.listen.startup_timeout);

    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (error) => this.disconnect(`socket error: ${error.message}`));
    socket.on('close', () => this.disconnect('client closed the connection'));
  }

  private receive(chunk: Buffer): void {
    if (this.isClosed) return;
    try {
      if (this.state === 'startup') {
        this.receiveStartup(chunk);
      } else if (this.state === 'authenticating') {
        // Nothing may reach a server before the token is verified; keep it for later.
        this.heldDuringAuthentication.push(chunk);
        this.socket.pause();
      } else {
        this.framer.push(chunk);
      }
    } catch (error) {
      this.handleReceiveError(error);
    }
  }

  /** Ends the session after a malformed message (08P01) or a bug of the proxy's (XX000, logged in full). */
  private handleReceiveError(error: unknown): void {
    if (error instanceof FramingError || error instanceof RangeError) {
      this.disconnect(error.message, clientErrors.protocolViolation(`invalid message format: ${error.message}`));
    } else {
      this.log.error({ err: error }, 'unexpected error while handling client data');
      this.disconnect('internal error', clientErrors.internalError());
    }
  }

  // Startup: length-only packets (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage).

  private receiveStartup(chunk: Buffer): void {
    this.startupBytes = this.startupBytes.length === 0 ? chunk : Buffer.concat([this.startupBytes, chunk]);
    while (this.state === 'startup' && this.startupBytes.length >= 4) {
      const length = this.startupBytes.readUInt32BE(0);
      if (length < 8 || length > MAX_STARTUP_PACKET_BYTES) {
        this.disconnect(`invalid startup packet length ${length}`, clientErrors.protocolViolation('invalid length of startup packet'));
        return;
      }
      if (this.startupBytes.length < length) return;
      const packet = this.startupBytes.subarray(0, length);
      this.startupBytes = this.startupBytes.subarray(length);
      this.handleStartupPacket(packet);
    }
    if (this.state !== 'startup' && !this.isClosed && this.startupBytes.length > 0) {
      const rest = this.startupBytes;
      this.startupBytes = Buffer.alloc(0);
      this.receive(rest);
    }
  }

  private handleStartupPacket(packet: Buffer): void {
    let parsed;
    try {
      parsed = parseStartupPacket(packet);
    } catch (error) {
      this.disconnect(`invalid startup packet: ${(error as Error).message}`, clientErrors.protocolViolation((error as Error).message));
      return;
    }
    switch (parsed.kind) {
      case 'ssl':
      case 'gssenc':
        if (this.startupBytes.length > 0) {
          // Bytes sent before our reply could not have been protected by the encryption
          // the client requested, so PostgreSQL rejects them too.
          this.disconnect('data received after an encryption request', clientErrors.protocolViolation('received unencrypted data after SSL request'));
          return;
        }
        this.socket.write(EncryptionNotSupported);
        return;
      case 'cancel':
        this.context.cancel(parsed.processId, parsed.secretKey, this.log);
        this.disconnect('cancel request handled');
        return;
      case 'startup':
        this.startSession(parsed.minorVersion, parsed.parameters);
        return;
    }
  }

  private startSession(minorVersion: number, parameters: Map<string, string>): void {
    this.user = parameters.get('user') ?? '';
    if (this.user === '') {
      this.disconnect('no user name in startup packet', clientErrors.invalidStartupParameter('no PostgreSQL user name specified in startup packet'));
      return;
    }
    if (parameters.has('replication')) {
      this.disconnect('replication connection requested', clientErrors.invalidStartupParameter('replication connections are not supported by pg-audit-proxy'));
      return;
    }
    const unrecognized = [...parameters.keys()].filter((name) => name.startsWith('_pq_.'));
    if (minorVersion !== 0 || unrecognized.length > 0) this.socket.write(negotiateProtocolVersion(0, unrecognized));

    let options = new Map<string, string>();
    try {
      options = parseOptions(parameters.get('options') ?? '');
    } catch (error) {
      this.disconnect('invalid options parameter', clientErrors.invalidStartupParameter((error as Error).message));
      return;
    }
    for (const [name, value] of parameters) {
      if (!CONNECTION_PARAMETERS.has(name) && !name.startsWith('_pq_.')) this.settings.set(name, value);
    }
    for (const [name, value] of options) {
      if (name !== 'jwt') this.settings.set(name, value);
    }

    const database = parameters.get('database') || this.user;
    const token = parameters.get('jwt') ?? options.get('jwt');
    this.log = this.log.child({ user: this.user, database });
    if (token !== undefined) {
      this.state = 'authenticating';
      void this.authenticate(token, database);
    } else {
      this.state = 'password';
      this.passwordDatabase = database;
      this.framer.maxMessageBytes = MAX_PASSWORD_MESSAGE_BYTES;
      this.socket.write(AuthenticationCleartextPassword);
    }
  }

  private passwordDatabase = '';

  private async authenticate(token: string, database: string): Promise<void> {
    this.state = 'authenticating';
    const { context } = this;
    try {
      const payload = await context.verifier.verify(token);
      if (this.state !== 'authenticating') return;
      if (database !== context.config.upstream.write.database) {
        this.disconnect(`unknown database "${database}"`, clientErrors.databaseNotFound(database));
        return;
      }
      this.identity = identityFromClaims(payload, context.config.identity.columns);
    } catch (error) {
      if (error instanceof TokenRejected) {
        this.log.warn({ reason: error.message }, 'authentication failed');
        this.disconnect('authentication failed', clientErrors.authenticationFailed(this.user));
      } else if (error instanceof ClaimNotRepresentable) {
        this.log.warn({ column: error.column }, 'authentication failed: claim contains a NUL byte');
        this.disconnect('claim contains a NUL byte', clientErrors.claimNotRepresentable(error.column));
      } else {
        this.log.error({ err: error }, 'token verification failed unexpectedly');
        this.disconnect('internal error', clientErrors.internalError());
      }
      return;
    }
    this.clientState = { owner: this, identity: this.identity, settings: this.settings, settingsVersion: 0 };
    this.log = this.log.child({ identity: Object.fromEntries(this.identity) });
    await this.applyStartupSettings();
  }

  /**
   * Applies the client's startup settings on a server connection once, so invalid values
   * are rejected at login as PostgreSQL would, and the client learns each reported
   * parameter as the server normalized it. When every server connection is busy, a login
   * does not wait for one: it reports the pool's known parameters with the client's values,
   * and an invalid value fails at the client's first request instead.
   */
  private async applyStartupSettings(): Promise<void> {
    const pool = this.context.writePool;
    let connection: ServerConnection;
    if (pool.referenceParameters !== null && !pool.canServeNow) {
      this.finishStartup(pool.referenceParameters);
      return;
    }

    const checkout = pool.checkout(this);
    this.checkout = checkout;
    try {
      connection = await checkout.connection;
    } catch (error) {
      this.checkout = null;
      if (this.isClosed) return;
      const reason = (error as Error).message;
      this.disconnect(`no server connection at login: ${reason}`, { ...clientErrors.upstreamUnavailable(reason), severity: 'FATAL' });
      return;
    }
    this.checkout = null;
    if (this.isClosed) {
      pool.release(connection);
      return;
    }

    try {
      await this.context.leaseSetup.apply(connection, this.clientState, { identity: false, wait: true });
    } catch (error) {
      // The connection's record of its parameters now includes values the server rejected.
      connection.close('a client startup setting was rejected');
      pool.release(connection);
      const fields = error instanceof ServerError ? error.fields : new Map<string, string>();
      const message = (error as Error).message;
      this.disconnect(`startup setting rejected: ${message}`, { severity: 'FATAL', code: fields.get('C') ?? '22023', message, hint: fields.get('H') });
      return;
    }

    for (const [name, value] of connection.parameters) {
      if (this.settings.has(name) && connection.startupParameters.has(name)) this.settings.set(name, value);
    }
    this.clientState.settingsVersion++;
    const startupParameters = connection.startupParameters;
    pool.release(connection);
    if (this.isClosed) return;
    this.finishStartup(startupParameters);
  }

  /** Sends AuthenticationOk, every reported parameter as this client sees it, BackendKeyData and ReadyForQuery. */
  private finishStartup(serverParameters: ReadonlyMap<string, string>): void {
    if (this.startupTimer) clearTimeout(this.startupTimer);
    this.startupTimer = null;
    this.state = 'ready';
    this.startupSettings = new Map(this.settings);
    this.processId = this.context.registerSession(this);
    this.secretKey.writeInt32BE(randomInt(-(2 ** 31), 2 ** 31));
    const reported: Buffer[] = [];
    for (const [name, serverValue] of serverParameters) reported.push(parameterStatus(name, this.settings.get(name) ?? serverValue));
    this.socket.write(Buffer.concat([AuthenticationOk, ...reported, backendKeyData(this.processId, this.secretKey.readInt32BE()), ReadyForQueryIdle]));
    this.log.info('client authenticated');
    for (const chunk of this.heldDuringAuthentication.splice(0)) this.receive(chunk);
    this.socket.resume();
  }

  private get isClosed(): boolean {
    return this.state === 'closed';
  }

  /** True when `secretKey` matches this session's, compared in constant time. */
  matchesSecret(secretKey: Buffer): boolean {
    return secretKey.length === 4 && timingSafeEqual(secretKey, this.secretKey);
  }

  // FrameHandler: every client message after startup passes here.

  message(type: number, frame: Buffer): void {
    if (this.state === 'password') {
      this.handlePassword(type, frame);
      return;
    }
    if (this.state !== 'ready') return;
    if (this.discardUntilSync) {
      if (type === Frontend.Terminate) {
        this.disconnect('client sent Terminate');
        return;
      }
      if (type !== Frontend.Sync) return;
      this.discardUntilSync = false;
      if (this.lease === null && this.pending.length === 0) {
        this.toClient.add(ReadyForQueryIdle);
        return;
      }
    }
    if (type === Frontend.Terminate) {
      this.disconnect('client sent Terminate');
      return;
    }
    if (!FORWARDED_TYPES.has(type)) {
      this.disconnect(`invalid frontend message type ${type}`, clientErrors.protocolViolation(`invalid frontend message type ${type}`));
      return;
    }
    if (this.lease === null || this.pending.length > 0 || this.settingUp) {
      this.enqueue({ type, bytes: frame });
      return;
    }
    this.forward(this.lease, type, frame);
  }

  streamStart(type: number, _totalLength: number, piece: Buffer): void {
    if (this.state !== 'ready') {
      this.disconnect('message too large during startup', clientErrors.protocolViolation('invalid message length during startup'));
      return;
    }
    this.streamingType = type;
    if (this.lease === null || this.pending.length > 0 || this.settingUp) {
      this.enqueue({ type, bytes: piece, piece: { start: true, last: false } });
      return;
    }
    this.send(this.lease, type, piece);
  }

  streamPiece(piece: Buffer, last: boolean): void {
    if (last) this.streamingType = 0;
    if (this.lease === null || this.pending.length > 0 || this.settingUp) {
      this.enqueue({ type: 0, bytes: piece, piece: { start: false, last } });
      return;
    }
    this.toServer.push(piece);
  }

  chunkEnd(): void {
    this.flushToServer();
    this.toClient.flush();
  }

  private handlePassword(type: number, frame: Buffer): void {
    if (type !== Frontend.PasswordMessage || frame.length > MAX_PASSWORD_MESSAGE_BYTES) {
      this.disconnect('expected a password message', clientErrors.protocolViolation(`expected password response, got message type ${type}`));
      return;
    }
    this.framer.maxMessageBytes = this.context.config.listen.max_message_bytes;
    const end = frame.indexOf(0, 5);
    const token = frame.toString('utf8', 5, end < 0 ? frame.length : end);
    void this.authenticate(token, this.passwordDatabase);
  }

  /** Forwards one client message, translating named prepared statements to their server names. */
  private forward(connection: ServerConnection, type: number, frame: Buffer): void {
    if (!connection.identityIntact && !connection.unsynced && !connection.copyIn && connection.identityOwner === this) {
      // One of the client's own statements cleared its identity: restore it before the
      // next request, so the rest of the lease stays attributed.
      this.context.leaseSetup.restoreIdentity(connection, this.clientState);
    }
    switch (type) {
      case Frontend.Parse:
        this.forwardParse(connection, frame);
        return;
      case Frontend.Bind:
        this.forwardStatementUse(connection, frame, readCString(frame, 5)[1]);
        return;
      case Frontend.Describe:
        if (frame[5] === STATEMENT) this.forwardStatementUse(connection, frame, 6);
        else this.send(connection, type, frame);
        return;
      case Frontend.Close:
        if (frame[5] === STATEMENT) this.closeStatement(connection, frame);
        else this.send(connection, type, frame);
        return;
      default:
        this.send(connection, type, frame);
    }
  }

  /** Sends a message unchanged and registers the reply it is owed. */
  private send(connection: ServerConnection, type: number, bytes: Buffer): void {
    if ((type === Frontend.Query || type === Frontend.Parse) && mayCreateSessionState(bytes)) {
      if (mentionsSessionAdvisoryLock(bytes) && this.context.config.pool.session_state === 'reject') {
        this.rejectStatement(connection, type, 'session advisory lock');
        return;
      }
      connection.sessionCheckNeeded = true;
    }
    const kind = replyKindOf(type);
    if (type === Frontend.Sync) {
      connection.unsynced = false;
      // The server ignores Sync during COPY FROM STDIN and sends no ReadyForQuery for it.
      if (!connection.copyIn) connection.expect({ kind: ReplyKind.Sync, forward: true });
    } else if (kind !== undefined) {
      connection.expect({ kind, forward: true });
      if (kind !== ReplyKind.Query) connection.unsynced = true;
    } else if (type === Frontend.CopyDone || type === Frontend.CopyFail) {
      connection.copyIn = false;
      connection.expect({ kind: ReplyKind.Synthetic, forward: true, copyEnd: true });
    }
    this.toServer.push(bytes);
  }

  private forwardParse(connection: ServerConnection, frame: Buffer): void {
    const [name, bodyOffset] = readCString(frame, 5);
    if (name === '') {
      this.send(connection, Frontend.Parse, frame);
      return;
    }
    if (this.statements.has(name)) {
      this.failBatch(connection, clientErrors.duplicatePreparedStatement(name));
      return;
    }
    const statement = clientStatement(frame, bodyOffset);
    this.statements.set(name, statement);
    // A Parse the server fails or skips after an earlier error defines nothing.
    const forget = () => {
      if (this.statements.get(name) === statement) this.statements.delete(name);
    };
    connection.unsynced = true;
    if (connection.statementCache.has(statement.serverName)) {
      this.touchCached(connection, statement.serverName);
      connection.expect({ kind: ReplyKind.Synthetic, forward: true, synthetic: ParseComplete, onDropped: forget });
      return;
    }
    this.prepareOnServer(connection, statement, true, forget);
  }

  /** Bind or Describe of a named statement: prepare it on this connection if needed, then rename it. */
  private forwardStatementUse(connection: ServerConnection, frame: Buffer, nameStart: number): void {
    const [name, nameEnd] = readCString(frame, nameStart);
    if (name === '') {
      this.send(connection, frame[0], frame);
      return;
    }
    const statement = this.statements.get(name);
    if (statement === undefined) {
      this.failBatch(connection, clientErrors.unknownPreparedStatement(name));
      return;
    }
    if (connection.statementCache.has(statement.serverName)) this.touchCached(connection, statement.serverName);
    else this.prepareOnServer(connection, statement, false);
    this.send(connection, frame[0], renameInMessage(frame, nameStart, nameEnd, statement.serverName));
  }

  /** Close of a named statement ends the client's name only; the server statement stays cached for reuse. */
  private closeStatement(connection: ServerConnection, frame: Buffer): void {
    const [name] = readCString(frame, 6);
    const statement = this.statements.get(name);
    this.statements.delete(name);
    connection.unsynced = true;
    // A Close the server would have skipped after an earlier error leaves the statement in place.
    const restore = () => {
      if (statement !== undefined && !this.statements.has(name)) this.statements.set(name, statement);
    };
    connection.expect({ kind: ReplyKind.Synthetic, forward: true, synthetic: CloseComplete, onDropped: restore });
  }

  /** Sends the statement's Parse; its ParseComplete goes to the client only when the client sent that Parse. */
  private prepareOnServer(connection: ServerConnection, statement: ClientStatement, forward: boolean, onDropped?: () => void): void {
    const cache = connection.statementCache;
    if (cache.size >= this.context.config.pool.prepared_statement_cache_size) {
      const oldest = cache.keys().next().value as string;
      cache.delete(oldest);
      connection.expect({ kind: ReplyKind.CloseComplete, forward: false });
      this.toServer.push(serialize.close({ type: 'S', name: oldest }));
    }
    cache.set(statement.serverName, true);
    connection.expect({ kind: ReplyKind.ParseComplete, forward, statement: statement.serverName, onDropped });
    connection.unsynced = true;
    this.toServer.push(statement.parse);
  }

  private touchCached(connection: ServerConnection, serverName: string): void {
    connection.statementCache.delete(serverName);
    connection.statementCache.set(serverName, true);
  }

  /**
   * Keeps the client on this server connection until it disconnects, because its session
   * now contains state that cannot be replayed elsewhere. The connection is closed afterwards.
   */
  private pin(connection: ServerConnection, statement: string): void {
    connection.discardAfterLease = true;
    if (this.pinnedBy !== null) return;
    this.pinnedBy = statement;
    this.context.stats.pinnedClients++;
    this.log.info({ statement, serverConnId: connection.id }, 'client pinned to its server connection');
  }

  /** Fails a Query or Parse that would create session state, under pool.session_state = reject. */
  private rejectStatement(connection: ServerConnection, type: number, statement: string): void {
    this.context.stats.rejectedStatements++;
    this.log.warn({ statement }, 'statement rejected: session state under transaction pooling');
    const error = clientErrors.sessionStateRejected(statement);
    if (type === Frontend.Parse) {
      this.failBatch(connection, error);
      return;
    }
    // The server runs a statement that fails instead, so a transaction block is aborted as
    // it would be by a real error. Its error is swallowed and the client gets ours.
    connection.expect({ kind: ReplyKind.Synthetic, forward: true, synthetic: errorResponse(error) });
    connection.expect({ kind: ReplyKind.Query, forward: true, swallowError: true });
    this.toServer.push(AbortStatementQuery);
  }

  sessionDiscarded(): void {
    this.settings.clear();
    for (const [name, value] of this.startupSettings) this.settings.set(name, value);
    this.clientState.settingsVersion++;
    this.statements.clear();
    this.log.debug('client session discarded');
  }

  /** Pins the client or rejects the statement after a CommandComplete showed session state (see ServerConnection.noteCommandTag). */
  sessionStateCreated(connection: ServerConnection, statement: string): boolean {
    if (this.context.config.pool.session_state === 'reject') {
      this.context.stats.rejectedStatements++;
      this.log.warn({ statement }, 'statement rejected: session state under transaction pooling');
      connection.discardAfterLease = true;
      this.toClient.add(errorResponse(clientErrors.sessionStateRejected(statement)));
      return true;
    }
    this.pin(connection, statement);
    return false;
  }

  /**
   * Rejects a message inside the client's batch as PostgreSQL would: the client gets the
   * ErrorResponse in its place, the server is made to abort the batch's implicit
   * transaction, and the client's messages until Sync are skipped.
   */
  private failBatch(connection: ServerConnection, error: ErrorFields): void {
    this.log.info({ code: error.code, message: error.message }, 'client message rejected');
    connection.expect({ kind: ReplyKind.Synthetic, forward: true, synthetic: errorResponse(error) });
    connection.expect({ kind: ReplyKind.ParseComplete, forward: false, swallowError: true });
    connection.unsynced = true;
    this.toServer.push(AbortBatchParse);
    this.discardUntilSync = true;
  }

  private flushToServer(): void {
    const connection = this.lease;
    if (connection === null || this.toServer.length === 0) return;
    const bytes = this.toServer.length === 1 ? this.toServer[0] : Buffer.concat(this.toServer);
    this.toServer.length = 0;
    if (!connection.send(bytes)) {
      this.socket.pause();
      connection.socket.once('drain', () => this.socket.resume());
    }
  }

  private enqueue(message: PendingMessage): void {
    this.pending.push(message);
    this.pendingBytes += message.bytes.length;
    if (this.pendingBytes > MAX_PENDING_BYTES) this.socket.pause();
    if (this.lease === null && this.checkout === null) void this.acquireLease();
  }

  // Leases.

  private async acquireLease(): Promise<void> {
    const pool = this.context.writePool;
    const checkout = pool.checkout(this);
    this.checkout = checkout;
    let connection: ServerConnection;
    try {
      connection = await checkout.connection;
    } catch (error) {
      this.checkout = null;
      this.failPending(this.describeCheckoutError(error));
      return;
    }
    this.checkout = null;
    if (this.isClosed) {
      pool.release(connection);
      return;
    }

    connection.sink = this;
    this.lease = connection;
    this.log.trace({ serverConnId: connection.id }, 'lease started');
    try {
      const setup = this.context.leaseSetup.apply(connection, this.clientState, { identity: true, wait: false });
      if (setup !== null) {
        // The setup's own ReadyForQuery must not end the lease before the client's messages go out.
        this.settingUp = true;
        await setup;
      }
    } catch (error) {
      this.log.error({ err: (error as Error).message, serverConnId: connection.id }, 'could not set the identity on a server connection');
      this.lease = null;
      connection.sink = null;
      connection.close('identity setup failed');
      this.failPending(clientErrors.upstreamUnavailable(`could not set the identity: ${(error as Error).message}`));
      return;
    } finally {
      this.settingUp = false;
    }
    if (this.isClosed || this.lease !== connection) return;
    this.drainPending(connection);
  }

  private describeCheckoutError(error: unknown): ErrorFields {
    if (error instanceof CheckoutTimeout) {
      this.log.warn({ waitedMs: error.waitedMs }, 'server connection checkout timed out');
      return clientErrors.checkoutTimeout(error.waitedMs);
    }
    if (error instanceof CheckoutCanceled) return clientErrors.queryCanceledWhileWaiting();
    if (error instanceof UpstreamUnavailable) return clientErrors.upstreamUnavailable(error.message);
    this.log.error({ err: error }, 'server connection checkout failed unexpectedly');
    return clientErrors.upstreamUnavailable('internal error');
  }

  /** Forwards the messages that arrived while waiting for the lease, in order. */
  private drainPending(connection: ServerConnection): void {
    try {
      for (const message of this.pending) {
        if (this.discardUntilSync) {
          if (message.type !== Frontend.Sync) continue;
          this.discardUntilSync = false;
        }
        if (message.piece === undefined) this.forward(connection, message.type, message.bytes);
        else if (message.piece.start) this.send(connection, message.type, message.bytes);
        else this.toServer.push(message.bytes);
      }
    } catch (error) {
      this.pending.length = 0;
      this.handleReceiveError(error);
      return;
    }
    this.pending.length = 0;
    this.pendingBytes = 0;
    this.flushToServer();
    if (!this.isClosed) this.socket.resume();
  }

  /**
   * Replies to the pending requests with `error` as a server would: one ErrorResponse per
   * Query and per Sync-delimited batch, one ReadyForQuery per Query and Sync, and
   * messages after the error are skipped until the client's next Sync.
   */
  private failPending(error: ErrorFields): void {
    if (this.isClosed) return;
    let errorSent = false;
    for (const message of this.pending) {
      if (message.piece !== undefined && !message.piece.start) continue;
      if (!errorSent) {
        this.toClient.add(errorResponse(error));
        errorSent = true;
      }
      if (message.type === Frontend.Query || message.type === Frontend.Sync || message.type === Frontend.FunctionCall) {
        this.toClient.add(ReadyForQueryIdle);
        errorSent = false;
      }
    }
    this.discardUntilSync = errorSent;
    this.pending.length = 0;
    this.pendingBytes = 0;
    this.toClient.flush();
    this.socket.resume();
  }

  /** Cancels this client's request: at the server if one is running, else its wait for a server connection. */
  cancelRequest(): void {
    if (this.checkout !== null) {
      this.checkout.cancel();
      return;
    }
    const connection = this.lease;
    if (connection !== null && connection.owed.length > 0) this.context.forwardCancel(connection, this.log);
  }

  // ServerReplySink: replies from the leased server connection.

  relay(frame: Buffer): void {
    if (frame[0] === Backend.ParameterStatus) this.noteParameterStatus(frame);
    this.toClient.add(frame);
  }

  relayPiece(piece: Buffer): void {
    this.toClient.add(piece);
  }

  relayFlush(): void {
    const connection = this.lease;
    if (!this.toClient.flush() && connection !== null) {
      connection.socket.pause();
      this.socket.once('drain', () => connection.socket.resume());
    }
  }

  readyForQuery(connection: ServerConnection): void {
    if (connection !== this.lease || !connection.reusable || this.streamingType !== 0 || this.pinnedBy !== null) return;
    if (this.settingUp || this.pending.length > 0) return;
    if (connection.sessionCheckNeeded) {
      connection.sessionCheckNeeded = false;
      this.inspectSession(connection);
      return;
    }
    this.relayFlush();
    this.lease = null;
    this.log.trace({ serverConnId: connection.id }, 'lease ended');
    connection.socket.resume();
    this.context.releaseLease(connection);
    if (this.pending.length > 0 && this.checkout === null) void this.acquireLease();
  }

  /**
   * Reads back what the client's statements left in the session: settings the server does
   * not report, so the next lease replays them, and state that cannot be replayed (a role,
   * LISTEN, advisory locks, temporary tables, holdable cursors, SQL prepared statements),
   * which pins the client, or under pool.session_state = reject closes the connection
   * after the lease. The lease is held meanwhile, then released as after any ReadyForQuery.
   */
  private inspectSession(connection: ServerConnection): void {
    const changed = new Map<string, string>();
    const unreplayable: string[] = [];
    // The client's next messages wait, so they run with whatever the inspection restores.
    this.settingUp = true;
    connection.request(serialize.query(SESSION_STATE_SQL), {
      forward: false,
      onRow: (frame) => {
        const [kind, name, value] = readTextDataRow(frame, 3);
        if (kind === 'setting' && name !== null && value !== null) changed.set(name, value);
        else if (kind === 'state' && name !== null) unreplayable.push(name);
        else if (kind === 'identity' && value !== identityJson(this.identity)) connection.identityIntact = false;
      },
      done: (error) => {
        this.log.debug({ changed: Object.fromEntries(changed), unreplayable, error: error && Object.fromEntries(error) }, 'session inspected');
        this.settingUp = false;
        if (this.lease !== connection) return;
        if (error !== null) {
          connection.discardAfterLease = true;
        } else {
          for (const name of [...this.settings.keys()]) {
            if (!connection.startupParameters.has(name) && !changed.has(name)) this.settings.delete(name);
          }
          for (const [name, value] of changed) {
            this.settings.set(name, value);
            // Recorded on the connection too, so the next owner gets it reset.
            connection.parameters.set(name, value);
          }
          connection.appliedSettings = null;
          this.clientState.settingsVersion++;
          if (unreplayable.length > 0) this.keepSessionState(connection, unreplayable[0]);
        }
        if (this.pending.length > 0) this.drainPending(connection);
        else this.readyForQuery(connection);
      },
    });
  }

  /** Pins the client for state found in its session, or under `reject` keeps that state from being handed on. */
  private keepSessionState(connection: ServerConnection, statement: string): void {
    if (this.context.config.pool.session_state === 'pin') {
      this.pin(connection, statement);
      return;
    }
    this.context.stats.rejectedStatements++;
    this.log.warn({ statement }, 'session state found after the lease; its server connection will be closed');
    connection.discardAfterLease = true;
  }

  connectionLost(connection: ServerConnection, reason: string): void {
    if (connection !== this.lease) return;
    this.lease = null;
    this.log.warn({ serverConnId: connection.id, reason }, 'server connection lost during lease');
    this.toClient.flush();
    this.disconnect(`server connection lost: ${reason}`, clientErrors.upstreamConnectionLost());
  }

  /** Keeps the client's own changes to reported parameters, so the next lease replays them. */
  private noteParameterStatus(frame: Buffer): void {
    const nameEnd = frame.indexOf(0, 5);
    const name = frame.toString('utf8', 5, nameEnd);
    if (UNREPLAYABLE_PARAMETERS.has(name)) return;
    this.settings.set(name, frame.toString('utf8', nameEnd + 1, frame.indexOf(0, nameEnd + 1)));
    this.clientState.settingsVersion++;
  }

  // Shutdown.

  /** Sends `error` if given, closes the client, and hands its server connection to cleanup. */
  disconnect(reason: string, error?: ErrorFields): void {
    if (this.isClosed) return;
    const wasReady = this.state === 'ready';
    this.state = 'closed';
    if (this.startupTimer) clearTimeout(this.startupTimer);
    if (error !== undefined && !this.socket.destroyed) {
      this.toClient.add(errorResponse(error));
      this.toClient.flush();
    }
    this.socket.end();
    this.socket.destroySoon?.();
    setTimeout(() => this.socket.destroy(), 1000).unref();

    this.checkout?.cancel();
    this.checkout = null;
    this.pending.length = 0;
    const connection = this.lease;
    this.lease = null;
    if (connection !== null) {
      this.context.abandonLease(connection, this.streamingType !== 0, this.log);
    }
    this.context.unregisterSession(this);
    if (error !== undefined) this.log.info({ reason, code: error.code }, 'client disconnected with error');
    else if (wasReady) this.log.info({ reason }, 'client disconnected');
    else this.log.debug({ reason }, 'client disconnected before login');
  }

  /** Tells the client the proxy is shutting down, and closes it. */
  shutdown(): void {
    this.disconnect('proxy shutting down', clientErrors.shuttingDown());
  }
}
