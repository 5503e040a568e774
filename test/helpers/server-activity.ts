// What the test server's backends are doing, read from pg_stat_activity over a direct
// superuser connection, and a bounded poll for conditions that become true asynchronously.
import { withAdmin } from './postgres.ts';

export interface BackendActivity {
  pid: number;
  usename: string;
  state: string | null;
  query: string;
}

/** Lists the client backends connected to `database`, except the one that runs this query. */
export async function backendsOf(database: string): Promise<BackendActivity[]> {
  return withAdmin(undefined, async (client) => {
    const result = await client.query<BackendActivity>(
      `SELECT pid, usename, state, query FROM pg_catalog.pg_stat_activity
        WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()`,
      [database],
    );
    return result.rows;
  });
}

/**
 * Calls `read` every `intervalMs` until `done` accepts its result, and returns that result.
 * Rejects with `description` and the last result after `timeoutMs`.
 */
export async function pollUntil<T>(
  read: () => Promise<T>,
  done: (value: T) => boolean,
  timeoutMs: number,
  description: string,
  intervalMs = 50,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (done(value)) return value;
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting until ${description} (last value: ${JSON.stringify(value)})`);
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Waits until a backend of `database` is running a statement whose text contains `marker`. */
export async function waitForRunningStatement(database: string, marker: string, timeoutMs = 5000): Promise<BackendActivity> {
  const backends = await pollUntil(
    () => backendsOf(database),
    (rows) => rows.some((row) => row.state === 'active' && row.query.includes(marker)),
    timeoutMs,
    `a statement containing ${JSON.stringify(marker)} runs on ${database}`,
  );
  return backends.find((row) => row.state === 'active' && row.query.includes(marker))!;
}
