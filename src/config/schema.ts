// Every setting of the configuration file, with its type and default. The file is
// validated once, at load; the rest of the proxy reads the typed result and never checks
// a setting again.
import { z } from 'zod';

import { parseDuration } from './duration.ts';

/** Duration written as `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds; stored in milliseconds. */
const duration = z.union([z.number().nonnegative(), z.string()]).transform((value, context) => {
  try {
    return parseDuration(value);
  } catch (error) {
    context.addIssue({ code: 'custom', message: (error as Error).message });
    return z.NEVER;
  }
});

const port = z.number().int().min(0).max(65535);

const upstreamServer = z.strictObject({
  host: z.string().min(1),
  port: port.default(5432),
  database: z.string().min(1),
  user: z.string().min(1),
  password: z.string().optional(),
  /** How long opening and authenticating one server connection may take. */
  connect_timeout: duration.default(5000),
});

const jwtKey = z.union([
  // HS256 needs a key at least as long as its 256-bit hash (RFC 7518, section 3.2).
  z.strictObject({ secret: z.string().min(32, 'must be at least 32 characters (256 bits for HS256)'), kid: z.string().optional() }),
  z.strictObject({ public_key_file: z.string().min(1), algorithm: z.string().optional(), kid: z.string().optional() }),
  z.strictObject({ jwk_file: z.string().min(1) }),
  z.strictObject({ jwks_file: z.string().min(1) }),
  z.strictObject({ jwks_url: z.url() }),
]);

/** Algorithms accepted unless `auth.jwt.algorithms` narrows them; `none` is never accepted. */
export const SUPPORTED_ALGORITHMS = [
  'HS256', 'HS384', 'HS512',
  'RS256', 'RS384', 'RS512',
  'PS256', 'PS384', 'PS512',
  'ES256', 'ES384', 'ES512',
  'EdDSA', 'Ed25519',
] as const;

const identityColumnName = z.string().regex(/^[a-z_][a-z0-9_]*$/, 'must be a lowercase SQL identifier');

export const configSchema = z.strictObject({
  listen: z.strictObject({
    host: z.string().default('127.0.0.1'),
    port: port.default(6432),
    /** A client that has not finished startup and authentication by then is disconnected. */
    startup_timeout: duration.default(10_000),
    /** Largest message a client may send after startup; larger declared lengths are rejected before any allocation. */
    max_message_bytes: z.number().int().min(1024).max(1024 * 1024 * 1024).default(64 * 1024 * 1024),
    max_clients: z.number().int().positive().default(1000),
  }).prefault({}),
  upstream: z.strictObject({
    write: upstreamServer,
    read: z.array(upstreamServer).default([]),
  }),
  pool: z.strictObject({
    /** Server connections per upstream server. */
    size: z.number().int().positive().default(20),
    /** How long a client waits for a server connection before it gets ERROR 53300. */
    checkout_timeout: duration.default(5000),
    /** Idle server connections older than this are closed. 0 keeps them. */
    idle_timeout: duration.default(600_000),
    /**
     * Policy for session state that cannot follow a client to another server connection
     * (LISTEN, SQL PREPARE, holdable cursors, temporary tables, session advisory locks, a
     * changed role). `pin` keeps the client on its server connection until it disconnects.
     * `reject` fails the statement with SQLSTATE 0A000.
     */
    session_state: z.enum(['pin', 'reject']).default('pin'),
    /** Clients' named prepared statements kept per server connection; the least recently used is closed beyond this. */
    prepared_statement_cache_size: z.number().int().positive().default(250),
    /** How long a server connection may take to finish the replies a departed client still owed before it is closed. */
    cleanup_timeout: duration.default(5000),
  }).prefault({}),
  auth: z.strictObject({
    jwt: z.strictObject({
      keys: z.array(jwtKey).min(1),
      issuer: z.string().optional(),
      audience: z.union([z.string(), z.array(z.string())]).optional(),
      algorithms: z.array(z.enum(SUPPORTED_ALGORITHMS)).min(1).optional(),
      /** Allowed clock difference when checking `exp` and `nbf`. */
      clock_tolerance: duration.default(30_000),
    }),
  }),
  identity: z.strictObject({
    carrier: z.enum(['settings', 'temp_table']).default('settings'),
    /** userinfo column name: JWT claim name. */
    columns: z.record(identityColumnName, z.string().min(1)).default({ empnum: 'sub', fullname: 'name' }),
  }).prefault({}),
  routing: z.strictObject({}).prefault({}),
  admin: z.strictObject({
    http: z.strictObject({ host: z.string().default('127.0.0.1'), port: port.default(9187) }).optional(),
  }).prefault({}),
  log: z.strictObject({
    level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  }).prefault({}),
});

export type Config = z.output<typeof configSchema>;
export type UpstreamServerConfig = z.output<typeof upstreamServer>;
export type JwtKeyConfig = z.output<typeof jwtKey>;
