// A plain node-postgres application with nothing specific to pg-audit-proxy. It reads its
// connection from the standard environment variables (PGHOST, PGPORT, PGDATABASE, PGUSER,
// PGPASSWORD) and edits the `documents` table: two inserts in one transaction, two updates
// and a delete, in both the extended and the simple query protocol.
//
// Usage: PG...=... node --import tsx demo/sample-app.ts LABEL
// LABEL starts the titles of the documents it creates.
import pg from 'pg';

const label = process.argv[2] ?? 'Untitled';

async function editDocuments(client: pg.Client): Promise<void> {
  await client.query('BEGIN');
  const plan = await client.query<{ id: number }>(
    'INSERT INTO documents (title, body) VALUES ($1, $2) RETURNING id',
    [`${label}: plan`, 'first draft'],
  );
  const scratch = await client.query<{ id: number }>(
    'INSERT INTO documents (title, body) VALUES ($1, $2) RETURNING id',
    [`${label}: scratch`, 'to be deleted'],
  );
  await client.query('COMMIT');
  const planId = plan.rows[0].id;
  const scratchId = scratch.rows[0].id;
  console.log(`inserted documents ${planId} and ${scratchId}`);

  await client.query('UPDATE documents SET body = $1 WHERE id = $2', ['second draft', planId]);
  console.log(`updated the body of document ${planId}`);

  // Reviews the oldest document, written by any user.
  const reviewed = await client.query<{ id: number }>(
    "UPDATE documents SET title = title || ' (reviewed)' WHERE id = (SELECT min(id) FROM documents) RETURNING id",
  );
  console.log(`reviewed document ${reviewed.rows[0]?.id}`);

  // A query without parameters goes out as a simple Query message.
  await client.query(`DELETE FROM documents WHERE id = ${Number(scratchId)}`);
  console.log(`deleted document ${scratchId}`);
}

const client = new pg.Client();
try {
  await client.connect();
  await editDocuments(client);
} catch (error) {
  console.error(`sample-app: ${(error as Error).message}`);
  process.exitCode = 1;
} finally {
  await client.end().catch(() => {});
}
