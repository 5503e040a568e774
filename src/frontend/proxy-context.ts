import type { ServerConnection } from '../backend/server-connection.ts';
import type { Config } from '../config/schema.ts';
import type { LeaseSetup } from '../identity/inject.ts';
import type { Logger } from '../observability/logger.ts';
import type { Pool } from '../pool/pool.ts';
import type { JwtVerifier } from './auth/jwt-auth.ts';
import type { ClientSession } from './client-session.ts';

export interface ProxyStats {
  /** Clients kept on one server connection because of session state. */
  pinnedClients: number;
  /** Statements failed because they would create session state (pool.session_state = reject). */
  rejectedStatements: number;
}

/** Services a client session uses from the proxy that owns it. */
export interface ProxyContext {
  readonly config: Config;
  readonly log: Logger;
  readonly verifier: JwtVerifier;
  readonly leaseSetup: LeaseSetup;
  readonly writePool: Pool;
  /** Counters for operators. */
  readonly stats: ProxyStats;
  /** Registers a logged-in session for cancel requests; returns its BackendKeyData process id. */
  registerSession(session: ClientSession): number;
  unregisterSession(session: ClientSession): void;
  /** Handles a CancelRequest received on a new connection. */
  cancel(processId: number, secretKey: Buffer, log: Logger): void;
  /** Sends a CancelRequest for the statement running on `connection`. */
  forwardCancel(connection: ServerConnection, log: Logger): void;
  /** Returns a connection whose lease ended normally to its pool, resetting session state first if needed. */
  releaseLease(connection: ServerConnection): void;
  /** Cleans up after a client that left during its lease: drains owed replies, rolls back, or closes. */
  abandonLease(connection: ServerConnection, midMessage: boolean, log: Logger): void;
}
