// Starts the proxy in the test process on a port the OS picks, with its log captured.
import { Writable } from 'node:stream';

import { parseConfig } from '../../src/config/load.ts';
import type { Config } from '../../src/config/schema.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { Proxy } from '../../src/proxy.ts';

export interface ProxyHandle {
  proxy: Proxy;
  host: string;
  port: number;
  config: Config;
  /** Parsed log lines so far. */
  logs: Record<string, unknown>[];
  /** Log lines whose `msg` equals `message`. */
  logsWith(message: string): Record<string, unknown>[];
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface UpstreamTarget {
  host: string;
  port: number;
  database: string;
  user: string;
  password?: string;
}

/** Builds a config from the given sections, validated like a file, with the listen port 0. */
export function proxyConfig(sections: { upstream: UpstreamTarget; secret: string } & Record<string, unknown>): Config {
  const { upstream, secret, ...rest } = sections;
  const document = {
    listen: { host: '127.0.0.1', port: 0 },
    upstream: { write: upstream, read: [] },
    auth: { jwt: { keys: [{ secret }] } },
    log: { level: 'debug' },
    ...rest,
  };
  return parseConfig(JSON.stringify(document), 'test config');
}

export async function startProxy(config: Config): Promise<ProxyHandle> {
  const logs: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (line.trim() !== '') logs.push(JSON.parse(line) as Record<string, unknown>);
      }
      callback();
    },
  });
  const proxy = new Proxy(config, createLogger(config.log.level, sink));
  const address = await proxy.listen();
  const close = () => proxy.close();
  return {
    proxy,
    host: '127.0.0.1',
    port: address.port,
    config,
    logs,
    logsWith: (message) => logs.filter((line) => line.msg === message),
    close,
    [Symbol.asyncDispose]: close,
  };
}
