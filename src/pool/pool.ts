// Server connections to one upstream server. Each connection is in exactly one collection
// (idle, active, or being opened), so the pool's state and its metrics are the collection
// sizes. Waiting clients are served first come, first served.
import type { UpstreamServerConfig } from '../config/schema.ts';
import { ServerConnection } from '../backend/server-connection.ts';
import type { Logger } from '../observability/logger.ts';

export class CheckoutTimeout extends Error {
  override name = 'CheckoutTimeout';
  constructor(readonly waitedMs: number) {
    super(`no server connection available within ${waitedMs} ms`);
  }
}

export class UpstreamUnavailable extends Error {
  override name = 'UpstreamUnavailable';
}

export class CheckoutCanceled extends Error {
  override name = 'CheckoutCanceled';
}

interface Waiter {
  owner: object;
  resolve(connection: ServerConnection): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

/** A pending checkout; `cancel()` withdraws it. */
export interface Checkout {
  connection: Promise<ServerConnection>;
  cancel(): void;
}

export interface PoolSettings {
  size: number;
  checkoutTimeoutMs: number;
  idleTimeoutMs: number;
}

export class Pool {
  /** Most recently used last. */
  readonly idle: ServerConnection[] = [];
  readonly active = new Set<ServerConnection>();
  opening = 0;
  readonly waiters: Waiter[] = [];
  /** Parameters the server reported to the first connection opened, as a fresh session has them. */
  referenceParameters: ReadonlyMap<string, string> | null = null;
  private readonly sweepTimer: NodeJS.Timeout | null;
  private closed = false;

  constructor(
    readonly name: string,
    readonly target: UpstreamServerConfig,
    private readonly settings: PoolSettings,
    private readonly log: Logger,
  ) {
    this.sweepTimer = settings.idleTimeoutMs > 0 ? setInterval(() => this.closeExpiredIdle(), Math.min(settings.idleTimeoutMs, 10_000)) : null;
    this.sweepTimer?.unref();
  }

  get size(): number {
    return this.idle.length + this.active.size + this.opening;
  }

  /** True when a checkout would not wait for another client to release a connection. */
  get canServeNow(): boolean {
    return this.idle.length > 0 || this.size < this.settings.size;
  }

  /**
   * Requests a server connection for `owner`, preferring one that already has the
   * owner's identity. Rejects with CheckoutTimeout after the configured wait.
   */
  checkout(owner: object): Checkout {
    if (this.closed) return { connection: Promise.reject(new UpstreamUnavailable('the proxy is shutting down')), cancel() {} };

    const connection = this.takeIdle(owner);
    if (connection !== null) return { connection: Promise.resolve(connection), cancel() {} };

    let waiter!: Waiter;
    const promise = new Promise<ServerConnection>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.removeWaiter(waiter);
        reject(new CheckoutTimeout(this.settings.checkoutTimeoutMs));
      }, this.settings.checkoutTimeoutMs);
      waiter = { owner, resolve, reject, timer };
    });
    this.waiters.push(waiter);
    if (this.size < this.settings.size) this.open();
    return {
      connection: promise,
      cancel: () => {
        if (this.removeWaiter(waiter)) waiter.reject(new CheckoutCanceled('checkout canceled'));
      },
    };
  }

  /** Returns a clean connection (idle, nothing owed) to the pool or to the next waiter. */
  release(connection: ServerConnection): void {
    this.active.delete(connection);
    connection.sink = null;
    connection.lastUsedAt = Date.now();
    if (connection.closed) return;
    if (!connection.reusable || connection.cancelsInFlight > 0) {
      connection.close('released while not reusable');
      return;
    }
    const waiter = this.waiters.shift();
    if (waiter !== undefined) {
      clearTimeout(waiter.timer);
      this.active.add(connection);
      waiter.resolve(connection);
      return;
    }
    if (this.closed) {
      connection.close('pool closed');
      return;
    }
    this.idle.push(connection);
  }

  /** Closes every connection; waiting clients get UpstreamUnavailable. */
  close(): void {
    this.closed = true;
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    for (const waiter of this.waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(new UpstreamUnavailable('the proxy is shutting down'));
    }
    for (const connection of this.idle.splice(0)) connection.close('pool closed');
  }

  private takeIdle(owner: object): ServerConnection | null {
    if (this.idle.length === 0) return null;
    let index = this.idle.length - 1;
    for (let i = this.idle.length - 1; i >= 0; i--) {
      if (this.idle[i].identityOwner === owner) {
        index = i;
        break;
      }
    }
    const [connection] = this.idle.splice(index, 1);
    this.active.add(connection);
    return connection;
  }

  private open(): void {
    this.opening++;
    ServerConnection.connect(this.target, this.log).then(
      (connection) => {
        this.opening--;
        connection.onClose = (closed) => this.forget(closed);
        this.referenceParameters ??= new Map(connection.startupParameters);
        this.log.info({ serverConnId: connection.id, serverPid: connection.processId }, 'server connection opened');
        this.active.add(connection);
        this.release(connection);
      },
      (error: Error) => {
        this.opening--;
        this.log.error({ err: error.message }, 'server connection failed');
        // The error belongs to the client that caused the attempt: the oldest waiter.
        const waiter = this.waiters.shift();
        if (waiter !== undefined) {
          clearTimeout(waiter.timer);
          waiter.reject(new UpstreamUnavailable(error.message));
        }
        if (this.waiters.length > 0 && this.size < this.settings.size) this.open();
      },
    );
  }

  private forget(connection: ServerConnection): void {
    this.active.delete(connection);
    const index = this.idle.indexOf(connection);
    if (index >= 0) this.idle.splice(index, 1);
    if (this.waiters.length > 0 && this.size < this.settings.size) this.open();
  }

  private removeWaiter(waiter: Waiter): boolean {
    const index = this.waiters.indexOf(waiter);
    if (index < 0) return false;
    this.waiters.splice(index, 1);
    clearTimeout(waiter.timer);
    return true;
  }

  private closeExpiredIdle(): void {
    const limit = Date.now() - this.settings.idleTimeoutMs;
    for (const connection of this.idle.filter((candidate) => candidate.lastUsedAt < limit)) {
      connection.close('idle timeout');
    }
  }
}
