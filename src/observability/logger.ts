import pino, { type Logger } from 'pino';

export type { Logger };

/** Field paths pino replaces with `[redacted]`, so a token or password can never reach the log. */
const REDACT_PATHS = ['password', 'token', 'jwt', '*.password', '*.token', '*.jwt', 'parameters.jwt', 'parameters.options'];

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino({ level, base: { service: 'pg-audit-proxy' }, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, destination);
}
