// The proxy: listener, pools, and what client sessions share. Holds no protocol logic.
import { randomInt } from 'node:crypto';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';

import { serialize } from 'pg-protocol';

import type { ServerConnection, ServerReplySink } from './backend/server-connection.ts';
import type { Config } from './config/schema.ts';
import * as clientErrors from './errors/client-errors.ts';
import { JwtVerifier } from './frontend/auth/jwt-auth.ts';
import { ClientSession } from './frontend/client-session.ts';
import type { ProxyContext, ProxyStats } from './frontend/proxy-context.ts';
import { LeaseSetup, Sync } from './identity/inject.ts';
import type { Logger } from './observability/logger.ts';
import { Pool } from './pool/pool.ts';
import { errorResponse } from './protocol/backend-messages.ts';
import { TransactionStatus } from './protocol/codes.ts';

/** BackendKeyData process ids carry this proxy copy's tag in their top bits, so a cancel can be routed to the copy that issued it. */
const SESSION_COUNTER_BITS = 21;

export class Proxy implements ProxyContext {
  readonly verifier: JwtVerifier;
  readonly leaseSetup: LeaseSetup;
  readonly writePool: Pool;
  readonly stats: ProxyStats = { pinnedClients: 0, rejectedStatements: 0 };
  /** Random per process, 1..1023: the top bits of every process id this copy hands out. */
  readonly instanceTag = randomInt(1, 1024);
  private nextSessionNumber = 1;
  private readonly sessionsByProcessId = new Map<number, ClientSession>();
  private readonly sessions = new Set<ClientSession>();
  private server: net.Server | null = null;

  constructor(
    readonly config: Config,
    readonly log: Logger,
    configDirectory: string = process.cwd(),
  ) {
    this.verifier = new JwtVerifier(config.auth.jwt, path.resolve(configDirectory));
    this.leaseSetup = new LeaseSetup(config.identity);
    this.writePool = new Pool(
      'write',
      config.upstream.write,
      { size: config.pool.size, checkoutTimeoutMs: config.pool.checkout_timeout, idleTimeoutMs: config.pool.idle_timeout },
      log.child({ pool: 'write' }),
    );
  }

  /** Starts listening; resolves with the bound address (the OS picks the port when it is 0). */
  async listen(): Promise<net.AddressInfo> {
    const server = net.createServer((socket) => this.accept(socket));
    this.server = server;
    server.listen(this.config.listen.port, this.config.listen.host);
    await once(server, 'listening');
    const address = server.address() as net.AddressInfo;
    // Operators and scripts read the bound port from this line (the OS picks it for port 0),
    // so it is written even when log.level hides other info lines.
    const startupLog = this.log.level === 'silent' ? this.log : this.log.child({}, { level: 'info' });
    startupLog.info({ host: address.address, port: address.port }, 'listening');
    return address;
  }

  private accept(socket: net.Socket): void {
    if (this.sessions.size >= this.config.listen.max_clients) {
      this.log.warn({ peer: socket.remoteAddress, limit: this.config.listen.max_clients }, 'client rejected: too many clients');
      socket.end(errorResponse(clientErrors.tooManyClients(this.config.listen.max_clients)));
      socket.on('error', () => {});
      return;
    }
    const session = new ClientSession(socket, this);
    this.sessions.add(session);
    socket.once('close', () => this.sessions.delete(session));
  }

  registerSession(session: ClientSession): number {
    const counter = this.nextSessionNumber++ & ((1 << SESSION_COUNTER_BITS) - 1);
    const processId = (this.instanceTag << SESSION_COUNTER_BITS) | counter;
    this.sessionsByProcessId.set(processId, session);
    return processId;
  }

  unregisterSession(session: ClientSession): void {
    if (this.sessionsByProcessId.get(session.processId) === session) this.sessionsByProcessId.delete(session.processId);
  }

  cancel(processId: number, secretKey: Buffer, log: Logger): void {
    const session = this.sessionsByProcessId.get(processId);
    if (session === undefined || !session.matchesSecret(secretKey)) {
      log.info({ processId }, 'cancel request ignored: no such session');
      return;
    }
    session.log.info('cancel request received');
    session.cancelRequest();
  }

  forwardCancel(connection: ServerConnection, log: Logger): void {
    const { host, port } = connection.target;
    connection.cancelsInFlight++;
    const socket = net.connect({ host, port });
    const settle = () => {
      connection.cancelsInFlight--;
      if (connection.cancelsInFlight === 0) connection.afterCancels?.();
    };
    socket.once('connect', () => socket.end(serialize.cancel(connection.processId, connection.secretKey)));
    socket.once('error', (error) => log.warn({ err: error.message }, 'forwarding a cancel request failed'));
    socket.once('close', settle);
    socket.setTimeout(this.config.upstream.write.connect_timeout, () => socket.destroy());
  }

  releaseLease(connection: ServerConnection): void {
    if (connection.cancelsInFlight > 0) {
      // A cancel delivered late must not hit the next client's statement: wait until the
      // server has closed every cancel socket, which it does after signalling the backend.
      connection.sink = null;
      connection.afterCancels = () => {
        connection.afterCancels = null;
        this.releaseLease(connection);
      };
      return;
    }
    if (connection.discardAfterLease) {
      connection.close('a client left session state on it');
      this.writePool.release(connection);
      return;
    }
    if (!connection.sessionStateDirty) {
      this.writePool.release(connection);
      return;
    }
    connection.sink = null;
    connection.request(serialize.query('RESET ALL'), {
      forward: false,
      done: (error) => {
        if (error !== null) {
          connection.close('RESET ALL failed');
          this.writePool.release(connection);
          return;
        }
        connection.sessionStateDirty = false;
        connection.appliedSettings = null;
        connection.identityOwner = null;
        connection.identity = null;
        connection.identityIntact = false;
        connection.parameters.clear();
        for (const [name, value] of connection.startupParameters) connection.parameters.set(name, value);
        this.writePool.release(connection);
      },
    });
  }

  abandonLease(connection: ServerConnection, midMessage: boolean, log: Logger): void {
    if (midMessage || connection.copyIn) {
      connection.close(midMessage ? 'client left in the middle of a message' : 'client left during COPY');
      this.writePool.release(connection);
      return;
    }
    for (const reply of connection.owed) reply.forward = false;
    if (connection.unsynced) {
      connection.unsynced = false;
      connection.request(Sync, { forward: false });
    }
    const timer = setTimeout(() => {
      log.warn({ serverConnId: connection.id }, 'server connection did not finish a departed client\'s work in time');
      connection.close('cleanup timeout');
      this.writePool.release(connection);
    }, this.config.pool.cleanup_timeout);
    timer.unref();

    const cleanup: ServerReplySink = {
      relay() {},
      relayPiece() {},
      relayFlush() {},
      readyForQuery: () => {
        if (connection.owed.length > 0) return;
        if (connection.transactionStatus !== TransactionStatus.Idle) {
          connection.request(serialize.query('ROLLBACK'), { forward: false });
          return;
        }
        clearTimeout(timer);
        this.releaseLease(connection);
      },
      connectionLost: () => {
        clearTimeout(timer);
        this.writePool.release(connection);
      },
    };
    connection.sink = cleanup;
    if (connection.owed.length === 0) cleanup.readyForQuery(connection);
  }

  /** Stops accepting, sends every client 57P01, and closes the pools. */
  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    for (const session of this.sessions) session.shutdown();
    this.writePool.close();
    await closed;
  }
}
