// Command-line entry: `serve` (the default), `check-config`, `token` and `sql install`.
// Exit status: 0 on success, 2 for usage or configuration errors, 1 for other failures.
import path from 'node:path';
import { parseArgs } from 'node:util';

import { SignJWT } from 'jose';
import { stringify as toYaml } from 'yaml';

import { parseDuration } from './config/duration.ts';
import { ConfigError, loadConfig, printableConfig } from './config/load.ts';
import { createLogger } from './observability/logger.ts';
import { Proxy } from './proxy.ts';

const USAGE = `Usage:
  pg-audit-proxy [serve] --config FILE
  pg-audit-proxy check-config --config FILE
  pg-audit-proxy token --config FILE --sub ID [--name NAME] [--ttl 1h] [--claim key=value]...
  pg-audit-proxy sql install --database-url URL [--app-role ROLE]...`;

class UsageError extends Error {}

export async function main(argv: string[]): Promise<number> {
  try {
    const [command, ...rest] = argv[0] !== undefined && !argv[0].startsWith('-') ? argv : ['serve', ...argv];
    switch (command) {
      case 'serve':
        return await serve(rest);
      case 'check-config':
        return await checkConfig(rest);
      case 'token':
        return await token(rest);
      case 'sql':
        return await sql(rest);
      case 'help':
        process.stdout.write(`${USAGE}\n`);
        return 0;
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (error) {
    if (error instanceof UsageError || error instanceof ConfigError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`pg-audit-proxy: ${(error as Error).message}\n`);
      if (error instanceof UsageError || !(error instanceof ConfigError)) process.stderr.write(`${USAGE}\n`);
      return 2;
    }
    process.stderr.write(`pg-audit-proxy: ${(error as Error).message}\n`);
    return 1;
  }
}

function configPath(values: { config?: string }): string {
  if (values.config === undefined) throw new UsageError('missing --config FILE');
  return values.config;
}

async function serve(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { config: { type: 'string' } }, strict: true });
  const file = configPath(values);
  const config = await loadConfig(file);
  const log = createLogger(config.log.level);
  const proxy = new Proxy(config, log, path.dirname(path.resolve(file)));
  // An unhandled rejected promise is a bug of the proxy's. It is logged, because exiting
  // would drop every client.
  process.on('unhandledRejection', (reason) => log.error({ err: reason }, 'unhandled promise rejection'));
  await proxy.listen();

  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, 'shutting down');
      proxy.close().then(resolve, resolve);
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  log.info('stopped');
  return 0;
}

async function checkConfig(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { config: { type: 'string' } }, strict: true });
  const config = await loadConfig(configPath(values));
  process.stdout.write(toYaml(printableConfig(config)));
  return 0;
}

async function token(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      config: { type: 'string' },
      sub: { type: 'string' },
      name: { type: 'string' },
      ttl: { type: 'string', default: '1h' },
      claim: { type: 'string', multiple: true, default: [] },
    },
    strict: true,
  });
  if (values.sub === undefined) throw new UsageError('missing --sub ID');
  const config = await loadConfig(configPath(values));
  const secretKey = config.auth.jwt.keys.find((key) => 'secret' in key);
  if (secretKey === undefined || !('secret' in secretKey)) {
    throw new ConfigError('auth.jwt.keys has no shared-secret key ("secret") to sign with');
  }
  let ttlMs: number;
  try {
    ttlMs = parseDuration(values.ttl);
  } catch (error) {
    throw new UsageError(`--ttl: ${(error as Error).message}`);
  }

  const claims: Record<string, unknown> = {};
  if (values.name !== undefined) claims.name = values.name;
  for (const pair of values.claim) {
    const equals = pair.indexOf('=');
    if (equals <= 0) throw new UsageError(`--claim "${pair}": expected key=value`);
    claims[pair.slice(0, equals)] = parseClaimValue(pair.slice(equals + 1));
  }
  let jwt = new SignJWT(claims)
    .setProtectedHeader({ alg: 'HS256', typ: 'JWT', ...(secretKey.kid ? { kid: secretKey.kid } : {}) })
    .setSubject(values.sub)
    .setIssuedAt()
    .setExpirationTime(Math.floor((Date.now() + ttlMs) / 1000));
  if (config.auth.jwt.issuer !== undefined) jwt = jwt.setIssuer(config.auth.jwt.issuer);
  if (config.auth.jwt.audience !== undefined) jwt = jwt.setAudience(config.auth.jwt.audience);
  process.stdout.write(`${await jwt.sign(Buffer.from(secretKey.secret, 'utf8'))}\n`);
  return 0;
}

/** Reads a claim value as JSON where it parses (numbers, booleans, arrays), else as a string. */
function parseClaimValue(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

async function sql(args: string[]): Promise<number> {
  const [subcommand, ...rest] = args;
  if (subcommand !== 'install') throw new UsageError(`unknown sql subcommand "${subcommand ?? ''}"; expected "install"`);
  const { values } = parseArgs({
    args: rest,
    options: { 'database-url': { type: 'string' }, 'app-role': { type: 'string', multiple: true, default: [] } },
    strict: true,
  });
  if (values['database-url'] === undefined) throw new UsageError('missing --database-url URL');
  const { installSql } = await import('./sql-install.ts');
  await installSql({
    databaseUrl: values['database-url'],
    appRoles: values['app-role'],
    log: (line) => process.stderr.write(`${line}\n`),
  });
  return 0;
}
