// One connection to an upstream PostgreSQL server, where the proxy is the client. After
// the handshake it frames the server's messages, keeps the queue of replies still owed
// (each forwarded to the leasing client or swallowed), and tracks the transaction status
// and the parameters the server reports.
import net from 'node:net';

import { serialize } from 'pg-protocol';
import { Parser } from 'pg-protocol/dist/parser.js';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';

import type { UpstreamServerConfig } from '../config/schema.ts';
import type { Logger } from '../observability/logger.ts';
import { Backend, TransactionStatus } from '../protocol/codes.ts';
import { readErrorFields } from '../protocol/backend-messages.ts';
import { type FrameHandler, MessageFramer } from '../protocol/framing.ts';
import { type OwedReply, ReplyKind, repliesFor } from './owed-replies.ts';
import { continueScram, finishScram, md5Password, startScram, type ScramSession } from './server-auth.ts';

/** The client side of a lease: where the server's forwarded replies go. */
export interface ServerReplySink {
  /** A complete message for the client, as a view into the received bytes. */
  relay(frame: Buffer): void;
  /** Part of a message too large to buffer. */
  relayPiece(piece: Buffer): void;
  /** The received chunk has been handled: flush what was relayed. */
  relayFlush(): void;
  /** A ReadyForQuery was received (relayed or swallowed); the owed queue has been updated. */
  readyForQuery(connection: ServerConnection): void;
  /** The connection failed or the server closed it. */
  connectionLost(connection: ServerConnection, reason: string): void;
  /**
   * A client statement created session state that replaying parameters cannot carry to
   * another server connection (`statement` names it). Returns true when the sink sent the
   * client something else in place of this CommandComplete.
   */
  sessionStateCreated?(connection: ServerConnection, statement: string): boolean;
  /** The client ran DISCARD ALL: its session is back to how it started. */
  sessionDiscarded?(connection: ServerConnection): void;
}

/** Types of server messages that may stream through instead of being buffered whole. */
const STREAMABLE = new Set<number>([Backend.DataRow, Backend.CopyData]);

let nextConnectionId = 1;

export class ServerConnection implements FrameHandler {
  readonly id = nextConnectionId++;
  processId = 0;
  secretKey = 0;
  /** Status byte of the last ReadyForQuery. */
  transactionStatus: number = TransactionStatus.Idle;
  /** Parameters as the server reported them right after startup. */
  readonly startupParameters = new Map<string, string>();
  /** Parameters as they are now: reported ones, plus those the proxy set for a client. */
  readonly parameters = new Map<string, string>();
  readonly owed: OwedReply[] = [];
  /** Client messages since the last Sync: the server has an unfinished extended-protocol batch. */
  unsynced = false;
  /** The server is in COPY FROM STDIN and ignores Sync until CopyDone or CopyFail. */
  copyIn = false;
  /** Prepared statements of the proxy's own (identity, parameters) that exist on this connection. */
  readonly proxyStatements = new Set<string>();
  /** Clients' named statements prepared here under their shared server names, least recently used first. */
  readonly statementCache = new Map<string, true>();
  /** The client whose settings were last applied here, and their version then; cleared when parameters change. */
  appliedSettings: object | null = null;
  appliedSettingsVersion = 0;
  /** The client session whose identity the connection holds, and whether it may have been changed since. */
  identityOwner: object | null = null;
  /** The identity (as its JSON text) last written to this connection's carrier, or null for none. */
  identity: string | null = null;
  identityIntact = false;
  /** A client ran SET or RESET during its lease: session state must be reset before reuse. */
  sessionStateDirty = false;
  /** A client's session state lives here (pinned, or rejected after the fact): close instead of reusing. */
  discardAfterLease = false;
  /**
   * A client statement may have left session state that no ParameterStatus shows (SET of
   * an unreported parameter, DO blocks, LISTEN, temporary tables...): the session is
   * inspected before the connection goes back to the pool.
   */
  sessionCheckNeeded = false;
  /** Cancel requests sent for this connection whose socket the server has not closed yet. */
  cancelsInFlight = 0;
  /** Called when the last cancel in flight has settled. */
  afterCancels: (() => void) | null = null;
  lastUsedAt = Date.now();
  closed = false;

  sink: ServerReplySink | null = null;
  private streamingForward = false;
  private readonly framer: MessageFramer;
  readonly log: Logger;

  private constructor(
    readonly socket: net.Socket,
    readonly target: UpstreamServerConfig,
    parentLog: Logger,
  ) {
    this.log = parentLog.child({ side: 'server', serverConnId: this.id });
    this.framer = new MessageFramer(this, 1024 * 1024 * 1024, STREAMABLE);
  }

  /** Opens, authenticates and waits for the first ReadyForQuery. */
  static connect(target: UpstreamServerConfig, parentLog: Logger): Promise<ServerConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: target.host, port: target.port });
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 60_000);
      const connection = new ServerConnection(socket, target, parentLog);
      const fail = (error: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new Error(`connecting to ${target.host}:${target.port} timed out after ${target.connect_timeout} ms`)),
        target.connect_timeout,
      );
      socket.once('error', (error) => fail(new Error(`connecting to ${target.host}:${target.port} failed: ${error.message}`)));
      socket.once('close', () => fail(new Error(`server ${target.host}:${target.port} closed the connection during startup`)));
      socket.once('connect', () => {
        connection.handshake().then(
          () => {
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            connection.attach();
            resolve(connection);
          },
          (error: Error) => fail(error),
        );
      });
    });
  }

  /** Runs startup and authentication with pg-protocol's parser, until ReadyForQuery. */
  private handshake(): Promise<void> {
    const { socket, target } = this;
    const parser = new Parser();
    let scram: ScramSession | null = null;

    return new Promise<void>((resolve, reject) => {
      const password = () => {
        if (target.password === undefined) throw new Error(`server requested a password for user "${target.user}" but upstream password is not configured`);
        return target.password;
      };
      const onMessage = async (message: BackendMessage) => {
        const fields = message as unknown as Record<string, unknown>;
        switch (message.name) {
          case 'authenticationCleartextPassword':
            socket.write(serialize.password(password()));
            break;
          case 'authenticationMD5Password':
            socket.write(serialize.password(await md5Password(target.user, password(), fields.salt as Buffer)));
            break;
          case 'authenticationSASL':
            scram = startScram(fields.mechanisms as string[]);
            socket.write(serialize.sendSASLInitialResponseMessage(scram.mechanism, scram.response));
            break;
          case 'authenticationSASLContinue':
            await continueScram(scram!, password(), fields.data as string);
            socket.write(serialize.sendSCRAMClientFinalMessage(scram!.response));
            break;
          case 'authenticationSASLFinal':
            finishScram(scram!, fields.data as string);
            break;
          case 'authenticationOk':
          case 'notice':
            break;
          case 'parameterStatus':
            this.startupParameters.set(fields.parameterName as string, fields.parameterValue as string);
            this.parameters.set(fields.parameterName as string, fields.parameterValue as string);
            break;
          case 'backendKeyData':
            this.processId = fields.processID as number;
            this.secretKey = fields.secretKey as number;
            break;
          case 'readyForQuery':
            socket.removeListener('data', onData);
            resolve();
            break;
          case 'error':
            throw new Error(`server rejected the connection: ${(message as unknown as Error).message}`);
          default:
            throw new Error(`unexpected message "${message.name}" during startup`);
        }
      };
      // Authentication steps are asynchronous (SCRAM key derivation), so messages are
      // handled one after another in arrival order.
      let chain = Promise.resolve();
      const onData = (chunk: Buffer) => {
        parser.parse(chunk, (message) => {
          chain = chain.then(() => onMessage(message)).catch(reject);
        });
      };
      socket.on('data', onData);
      socket.write(serialize.startup({ user: target.user, database: target.database, client_encoding: 'UTF8' }));
    });
  }

  private attach(): void {
    this.socket.on('data', (chunk: Buffer) => {
      try {
        this.framer.push(chunk);
      } catch (error) {
        this.close(`invalid data from server: ${(error as Error).message}`);
      }
    });
    this.socket.on('error', (error) => this.close(`socket error: ${error.message}`));
    this.socket.on('close', () => this.close('server closed the connection'));
  }

  /** Sends bytes to the server. Returns false when the socket buffer is full. */
  send(bytes: Buffer): boolean {
    return this.socket.write(bytes);
  }

  /** Registers the reply owed for one message sent (or a synthetic one), and releases synthetic replies now at the front. */
  expect(reply: OwedReply): void {
    this.owed.push(reply);
    if (this.owed.length === 1 && reply.kind === ReplyKind.Synthetic) this.releaseSynthetic();
  }

  /** Sends complete messages of the proxy's own; `reply.done` runs at the final ReadyForQuery. */
  request(bytes: Buffer, reply: Omit<OwedReply, 'kind'>): void {
    for (const owed of repliesFor(bytes, reply)) this.owed.push(owed);
    this.send(bytes);
  }

  /** True when the connection can go back to the pool as it is. */
  get reusable(): boolean {
    return (
      !this.closed &&
      this.owed.length === 0 &&
      !this.unsynced &&
      !this.copyIn &&
      this.transactionStatus === TransactionStatus.Idle
    );
  }

  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.log.info({ reason }, 'server connection closed');
    this.socket.destroy();
    const sink = this.sink;
    this.sink = null;
    for (const reply of this.owed.splice(0)) reply.done?.(new Map([['M', reason]]));
    this.statementCache.clear();
    this.proxyStatements.clear();
    sink?.connectionLost(this, reason);
    this.onClose?.(this);
  }

  /** Set by the pool, to forget a closed connection. */
  onClose: ((connection: ServerConnection) => void) | null = null;

  // FrameHandler: every server message passes here.

  message(type: number, frame: Buffer): void {
    switch (type) {
      case Backend.ParseComplete:
        this.complete(ReplyKind.ParseComplete, frame);
        return;
      case Backend.BindComplete:
        this.complete(ReplyKind.BindComplete, frame);
        return;
      case Backend.CloseComplete:
        this.complete(ReplyKind.CloseComplete, frame);
        return;
      case Backend.NoData:
        this.complete(ReplyKind.Describe, frame);
        return;
      case Backend.RowDescription:
        if (this.owed[0]?.kind === ReplyKind.Describe) this.complete(ReplyKind.Describe, frame);
        else this.relayByHead(frame);
        return;
      case Backend.CommandComplete:
      case Backend.EmptyQueryResponse:
      case Backend.PortalSuspended:
        if (type === Backend.CommandComplete && this.noteCommandTag(frame)) {
          // The client got an error in place of this reply: mute the rest of its request.
          this.muteUntilReady();
          if (this.owed[0]?.kind === ReplyKind.Execute) this.complete(ReplyKind.Execute, frame);
          return;
        }
        if (this.owed[0]?.kind === ReplyKind.Execute) this.complete(ReplyKind.Execute, frame);
        else this.relayByHead(frame);
        return;
      case Backend.ReadyForQuery:
        this.transactionStatus = frame[5];
        this.complete(this.owed[0]?.kind === ReplyKind.Query ? ReplyKind.Query : ReplyKind.Sync, frame);
        this.sink?.readyForQuery(this);
        return;
      case Backend.ErrorResponse:
        this.handleError(frame);
        return;
      case Backend.ParameterStatus:
        this.noteParameterStatus(frame);
        break;
      case Backend.CopyInResponse:
      case Backend.CopyBothResponse:
        this.copyIn = true;
        this.dropSyncsDuringCopy();
        break;
    }
    this.relayByHead(frame);
  }

  /** Relays a message that does not complete an entry, if the entry it belongs to is forwarded. */
  private relayByHead(frame: Buffer): void {
    const head = this.owed[0];
    if (head?.onRow !== undefined && frame[0] === Backend.DataRow) head.onRow(frame);
    if (head !== undefined ? head.forward && !head.muted : this.sink !== null) this.sink?.relay(frame);
  }

  /** Swallows every reply up to the next ReadyForQuery, which still reaches the client. */
  private muteUntilReady(): void {
    for (const entry of this.owed) {
      entry.muted = true;
      if (entry.kind === ReplyKind.Sync || entry.kind === ReplyKind.Query) break;
    }
  }

  /** Completes the front entry with `frame`, which must be the reply it waits for. */
  private complete(kind: ReplyKind, frame: Buffer): void {
    const head = this.owed.shift();
    if (head === undefined || head.kind !== kind) {
      // The server sent a reply to something we did not send: the bookkeeping can no
      // longer be trusted, so neither can the connection.
      this.close(`unexpected reply "${String.fromCharCode(frame[0])}" from server`);
      return;
    }
    if (head.forward && (!head.muted || kind === ReplyKind.Sync || kind === ReplyKind.Query)) this.sink?.relay(frame);
    head.done?.(head.error ?? null);
    this.releaseSynthetic();
  }

  /**
   * Forgets the Syncs the client sent after the Execute that started a COPY FROM STDIN and
   * before its CopyDone or CopyFail, because the server ignores Sync while the COPY runs.
   */
  private dropSyncsDuringCopy(): void {
    let index = 1;
    while (index < this.owed.length && !this.owed[index].copyEnd) {
      if (this.owed[index].kind === ReplyKind.Sync) this.owed.splice(index, 1);
      else index++;
    }
  }

  /** Sends the synthetic replies that every earlier reply has now preceded. */
  private releaseSynthetic(): void {
    while (this.owed.length > 0 && this.owed[0].kind === ReplyKind.Synthetic) {
      const entry = this.owed.shift()!;
      if (entry.synthetic !== undefined) this.sink?.relay(entry.synthetic);
    }
  }

  /**
   * Ends the front entry at an ErrorResponse. In the extended protocol the server then skips
   * every message until Sync, so their entries go too. The error reaches the client when
   * its messages were among those affected, unless the proxy already sent it one (swallowError).
   */
  private handleError(frame: Buffer): void {
    const head = this.owed[0];
    if (head === undefined) {
      if (this.sink !== null) {
        this.sink.relay(frame);
      } else {
        // An error outside any request is the server ending the session (FATAL).
        this.log.warn({ error: Object.fromEntries(readErrorFields(frame)) }, 'server sent an error while idle');
      }
      return;
    }
    let relay = head.forward && !head.swallowError && !head.muted;
    let end = head;
    if (head.kind !== ReplyKind.Query) {
      let skipped = 0;
      while (skipped < this.owed.length && this.owed[skipped].kind !== ReplyKind.Sync) {
        const entry = this.owed[skipped];
        if (entry.statement !== undefined) this.statementCache.delete(entry.statement);
        entry.onDropped?.();
        if (entry.forward && !head.swallowError) relay = true;
        skipped++;
      }
      this.owed.splice(0, skipped);
      if (this.owed.length > 0) {
        end = this.owed[0];
        if (end.forward && !head.swallowError) relay = true;
      }
    }
    if (relay) {
      this.sink?.relay(frame);
      return;
    }
    end.error ??= readErrorFields(frame);
    if (!head.swallowError) this.log.error({ error: Object.fromEntries(end.error) }, 'proxy request failed on server');
  }

  streamStart(type: number, _totalLength: number, piece: Buffer): void {
    const head = this.owed[0];
    this.streamingForward = head !== undefined ? head.forward : this.sink !== null;
    if (this.streamingForward) this.sink?.relayPiece(piece);
  }

  streamPiece(piece: Buffer): void {
    if (this.streamingForward) this.sink?.relayPiece(piece);
  }

  chunkEnd(): void {
    this.sink?.relayFlush();
  }

  private noteParameterStatus(frame: Buffer): void {
    const nameEnd = frame.indexOf(0, 5);
    const valueEnd = frame.indexOf(0, nameEnd + 1);
    const name = frame.toString('utf8', 5, nameEnd);
    this.parameters.set(name, frame.toString('utf8', nameEnd + 1, valueEnd));
    this.appliedSettings = null;
  }

  /**
   * Watches the tags of client statements for session state. SET and RESET change settings
   * (the identity among them), DISCARD and DEALLOCATE drop the proxy's statements (DISCARD
   * ALL resets the client's whole session), and
   * LISTEN, SQL PREPARE, cursors and tables (temporary ones included) create state that
   * parameter replay cannot carry. Only the first bytes of common tags are read. Returns
   * true when the sink replaced this reply.
   */
  private noteCommandTag(frame: Buffer): boolean {
    if (!this.owed[0]?.forward) return false;
    const first = frame[5];
    if (first !== 0x53 /* S */ && first !== 0x52 /* R */ && first !== 0x44 /* D */ && first !== 0x4c /* L */ && first !== 0x50 /* P */ && first !== 0x43 /* C */) {
      return false;
    }
    const tag = frame.toString('latin1', 5, Math.min(frame.length - 1, 24));
    let statement: string | null = null;
    if (tag === 'SET' || tag === 'RESET') {
      this.appliedSettings = null;
      this.sessionStateDirty = true;
      this.identityIntact = false;
      // SET LOCAL, SET TRANSACTION and SET of unreported parameters look alike here, and
      // since PostgreSQL 14 a ParameterStatus follows the CommandComplete: the session's
      // settings are read back at the end of the lease instead.
      this.sessionCheckNeeded = true;
    } else if (tag.startsWith('DISCARD') || tag.startsWith('DEALLOCATE')) {
      this.appliedSettings = null;
      this.sessionStateDirty = true;
      this.identityIntact = false;
      this.proxyStatements.clear();
      this.statementCache.clear();
      if (tag === 'DISCARD ALL') this.sink?.sessionDiscarded?.(this);
    } else if (tag === 'LISTEN' || tag === 'PREPARE') {
      this.sessionCheckNeeded = true;
      statement = tag;
    } else if (tag === 'DO' || tag === 'DECLARE CURSOR' || tag === 'CREATE TABLE') {
      this.sessionCheckNeeded = true;
    }
    if (statement === null) return false;
    return this.sink?.sessionStateCreated?.(this, statement) ?? false;
  }
}

/** Reported parameters that change only with SET ROLE or SESSION AUTHORIZATION, or never: not replayable. */
export const UNREPLAYABLE_PARAMETERS = new Set([
  'is_superuser', 'session_authorization', 'server_version', 'server_encoding', 'integer_datetimes', 'in_hot_standby',
]);
