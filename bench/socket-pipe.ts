// A bare TCP relay, the CPU baseline for the proxy in `npm run bench`: for each client it
// opens one upstream connection and pipes bytes both ways without parsing them.
//
//   node --import tsx bench/socket-pipe.ts --upstream-port PORT [--upstream-host 127.0.0.1]
//
// It listens on a port of 127.0.0.1 that the OS picks and prints one JSON line,
// {"msg":"listening","host":"127.0.0.1","port":N}, on stdout. SIGINT or SIGTERM stops it.
import net from 'node:net';
import { parseArgs } from 'node:util';

const USAGE = 'Usage: node --import tsx bench/socket-pipe.ts --upstream-port PORT [--upstream-host HOST]';

function parseOptions(): { upstreamHost: string; upstreamPort: number } {
  const { values } = parseArgs({
    options: {
      'upstream-host': { type: 'string', default: '127.0.0.1' },
      'upstream-port': { type: 'string' },
    },
    strict: true,
  });
  const port = Number(values['upstream-port']);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new Error(`invalid --upstream-port ${JSON.stringify(values['upstream-port'])}: expected a TCP port from 1 to 65535`);
  }
  return { upstreamHost: values['upstream-host'], upstreamPort: port };
}

/** Relays `client` to a new upstream connection until either side closes or fails. */
function relay(client: net.Socket, upstreamHost: string, upstreamPort: number): void {
  const upstream = net.connect({ host: upstreamHost, port: upstreamPort });
  // The proxy sets TCP_NODELAY on both sides too, so neither waits on Nagle's algorithm.
  client.setNoDelay(true);
  upstream.setNoDelay(true);

  client.pipe(upstream);
  upstream.pipe(client);

  client.on('error', () => upstream.destroy());
  upstream.on('error', () => client.destroy());
  client.on('close', () => upstream.destroy());
  upstream.on('close', () => client.destroy());
}

function main(): void {
  let options: ReturnType<typeof parseOptions>;
  try {
    options = parseOptions();
  } catch (error) {
    process.stderr.write(`socket-pipe: ${(error as Error).message}\n${USAGE}\n`);
    process.exit(2);
  }

  const clients = new Set<net.Socket>();
  const server = net.createServer((client) => {
    clients.add(client);
    client.on('close', () => clients.delete(client));
    relay(client, options.upstreamHost, options.upstreamPort);
  });

  server.on('error', (error) => {
    process.stderr.write(`socket-pipe: listener failed: ${error.message}\n`);
    process.exit(1);
  });
  server.listen(0, '127.0.0.1', () => {
    const address = server.address() as net.AddressInfo;
    process.stdout.write(`${JSON.stringify({ msg: 'listening', host: address.address, port: address.port })}\n`);
  });

  const stop = (): void => {
    server.close();
    for (const client of clients) {
      client.destroy();
    }
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

main();
