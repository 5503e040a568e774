// A malformed message that arrives while the client waits for a server connection is
// parsed later, in an async path: an error there must end only that client, never the
// whole proxy process.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { createTestDatabase, TEST_ROLES, testServer, type TestDatabase } from '../helpers/postgres.ts';
import { frontendMessage, login, RawConnection } from '../helpers/raw-client.ts';
import { newSecret, signToken } from '../helpers/tokens.ts';

describe('proxy process survives malformed client messages', () => {
  let database: TestDatabase;
  let child: ChildProcess | null = null;
  let directory: string;

  beforeEach(async () => {
    database = await createTestDatabase('atk_crash');
    directory = fs.mkdtempSync(path.join(os.tmpdir(), 'atk-crash-'));
  });

  afterEach(async () => {
    if (child !== null && child.exitCode === null) child.kill('SIGTERM');
    child = null;
    await database?.drop();
    fs.rmSync(directory, { recursive: true, force: true });
  });

  it('survives an unterminated Bind before a lease', async () => {
    const server = testServer();
    const secret = newSecret();
    const configFile = path.join(directory, 'config.json');
    // JSON is valid YAML.
    fs.writeFileSync(configFile, JSON.stringify({
      listen: { host: '127.0.0.1', port: 0 },
      upstream: { write: { host: server.host, port: server.port, database: database.name, user: 'app_scram', password: TEST_ROLES.app_scram.password } },
      auth: { jwt: { keys: [{ secret }] } },
      log: { level: 'info' },
    }));
    const proc = spawn(process.execPath, ['bin/pg-audit-proxy.js', 'serve', '--config', configFile], { cwd: process.cwd(), stdio: ['ignore', 'pipe', 'pipe'] });
    child = proc;
    let stderr = '';
    proc.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('proxy did not log listening within 15 s')), 15_000);
      let buffered = '';
      proc.stdout!.on('data', (chunk: Buffer) => {
        buffered += chunk.toString();
        for (const line of buffered.split('\n')) {
          if (line.includes('"listening"')) {
            clearTimeout(timer);
            resolve(JSON.parse(line).port as number);
          }
        }
      });
    });

    const token = await signToken(secret, { sub: 'mallory', name: 'Mallory' });
    const bystander = await RawConnection.open('127.0.0.1', port);
    await login(bystander, { user: 'app', database: database.name }, token);

    const attacker = await RawConnection.open('127.0.0.1', port);
    await login(attacker, { user: 'app', database: database.name }, token);
    // Bind whose portal name has no NUL: the framer accepts it, forward() throws later.
    attacker.send(frontendMessage('B', Buffer.from('xyz')));

    const code = await Promise.race([exited, new Promise<'alive'>((resolve) => setTimeout(() => resolve('alive'), 3000))]);
    attacker.destroy();
    bystander.destroy();
    expect(code, stderr.slice(0, 600)).toBe('alive');
  });
});
