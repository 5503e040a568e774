// The proxy's own requests at the start of each lease: they bring a server connection to
// the leasing client's session parameters and identity, in a transaction of the proxy's
// own, before any of the client's messages. Claim values and parameter values travel as
// bind parameters of prepared statements, never inside SQL text. Their replies are
// swallowed through the connection's queue of owed replies.
import { serialize } from 'pg-protocol';

import type { Config } from '../config/schema.ts';
import { type ServerConnection, UNREPLAYABLE_PARAMETERS } from '../backend/server-connection.ts';
import { identityJson, type Identity } from './claims.ts';

/** The custom setting that carries the identity, as a JSON object, for the `settings` carrier. */
export const IDENTITY_SETTING = 'pg_audit_proxy.identity';

const SET_PARAMETERS = 'pg_audit_proxy_set_parameters';
/** Sets each name to its value; a NULL value restores the setting's reset value. */
const SET_PARAMETERS_SQL =
  'SELECT pg_catalog.set_config(t.name, coalesce(t.value, ' +
  '(SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE s.name = t.name)), false) ' +
  'FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS t(name, value)';

const BEGIN = 'pg_audit_proxy_begin';
const COMMIT = 'pg_audit_proxy_commit';
const REFRESH_USERINFO = 'pg_audit_proxy_refresh_userinfo';

export const Sync = serialize.sync();

/** The session a client expects on its leased server connection. */
export interface ClientState {
  /** The client session object; compared by identity to skip refreshes. */
  owner: object;
  identity: Identity;
  /** Session parameters the client set at startup or since, by name. */
  settings: ReadonlyMap<string, string>;
  /** Incremented whenever `settings` changes, so an unchanged client can skip the comparison. */
  settingsVersion: number;
}

export class LeaseSetup {
  private readonly columns: string[];
  private readonly createUserinfoSql: string;
  private readonly refreshUserinfoSql: string;

  constructor(private readonly identity: Config['identity']) {
    this.columns = Object.keys(identity.columns);
    const columnList = this.columns.join(', ');
    this.createUserinfoSql =
      'BEGIN READ WRITE; ' +
      `CREATE TEMP TABLE IF NOT EXISTS userinfo (${this.columns.map((column) => `${column} text`).join(', ')}); ` +
      'GRANT SELECT ON pg_temp.userinfo TO PUBLIC; COMMIT';
    const placeholders = this.columns.map((_, index) => `$${index + 1}`).join(', ');
    // Returns whether the table carries a trigger or rule, through which a client could
    // rewrite the row the proxy writes.
    this.refreshUserinfoSql =
      `WITH cleared AS (DELETE FROM pg_temp.userinfo), written AS (INSERT INTO pg_temp.userinfo (${columnList}) VALUES (${placeholders})) ` +
      "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = 'pg_temp.userinfo'::pg_catalog.regclass) " +
      "OR EXISTS (SELECT FROM pg_catalog.pg_rewrite WHERE ev_class = 'pg_temp.userinfo'::pg_catalog.regclass)";
  }

  /**
   * Sends what `connection` needs to match `client`: parameter changes and, on the write
   * pool, the identity. Returns a promise when the client's messages must wait for the
   * replies, or null when they may follow at once. They wait whenever the identity on the
   * connection is another user's. The proxy's request can fail (a client deallocated its
   * statement, or left a setting that breaks it), and then that identity would still be in
   * place, so the client's work must not run before the request has succeeded.
   */
  apply(connection: ServerConnection, client: ClientState, options: { identity: boolean; wait: boolean }): Promise<void> | null {
    const identity = identityJson(client.identity);
    // Two sessions of the same end user may share what the connection holds: only a change
    // of identity matters for attribution.
    const sameIdentity = connection.identityIntact && connection.identity === identity;
    if (
      options.identity &&
      sameIdentity &&
      connection.appliedSettings === client.owner &&
      connection.appliedSettingsVersion === client.settingsVersion
    ) {
      connection.identityOwner = client.owner;
      return null;
    }
    const settingsCarrier = this.identity.carrier === 'settings';
    const newIdentity = options.identity && !sameIdentity;
    // The previous identity is another user's: the client's work must not start before it is replaced.
    const replacesAnother = newIdentity && connection.identity !== null;
    const names: string[] = [];
    const values: (string | null)[] = [];
    if (newIdentity) {
      // A previous user may have changed the role in a way no command tag shows, such as
      // set_config('role', ...) inside a function: every new identity starts as the login role.
      names.push('role');
      values.push('none');
    }
    this.collectParameterChanges(connection, client, names, values);

    if (newIdentity && settingsCarrier) {
      names.push(IDENTITY_SETTING);
      values.push(identity);
    } else if (newIdentity) {
      // The audit trigger reads the settings carrier first: clear what a client may have put there.
      names.push(IDENTITY_SETTING);
      values.push('');
    }

    let parametersSet: Promise<void> | null = null;
    if (names.length > 0) {
      if (connection.parameters.get('client_encoding') !== 'UTF8') {
        // Bind parameters are decoded in the connection's client_encoding: speak UTF-8 first.
        // The client's own encoding, if any, is in `names` and applied by this same statement.
        connection.request(serialize.query("SET client_encoding = 'UTF8'"), { forward: false });
      }
      const messages: Buffer[] = [];
      if (!connection.proxyStatements.has(SET_PARAMETERS)) {
        messages.push(serialize.parse({ name: SET_PARAMETERS, text: SET_PARAMETERS_SQL }));
        connection.proxyStatements.add(SET_PARAMETERS);
      }
      messages.push(
        serialize.bind({ statement: SET_PARAMETERS, values: [textArray(names), textArray(values)] }),
        serialize.execute({}),
        Sync,
      );
      parametersSet = this.request(connection, Buffer.concat(messages));
      parametersSet.catch(() => connection.close('setting session parameters failed'));
      names.forEach((name, index) => {
        if (name === IDENTITY_SETTING || name === 'role') return;
        const value = values[index];
        if (value !== null) connection.parameters.set(name, value);
        else if (connection.startupParameters.has(name)) connection.parameters.set(name, connection.startupParameters.get(name)!);
        else connection.parameters.delete(name);
      });
    }

    connection.appliedSettings = client.owner;
    connection.appliedSettingsVersion = client.settingsVersion;
    if (options.identity) connection.identityOwner = client.owner;
    if (newIdentity) {
      connection.identity = identity;
      connection.identityIntact = true;
      if (!settingsCarrier) return Promise.all([parametersSet, this.refreshUserinfo(connection, client, true)]).then(() => undefined);
    }
    return options.wait || replacesAnother ? parametersSet : null;
  }

  /**
   * Sets the client's identity again in the middle of its lease, after one of its own
   * statements cleared or changed it (RESET ALL, DISCARD ALL, SET of the identity setting).
   * Sent before the client's next request, without waiting: only the client's own
   * attribution is at stake. Settings carrier only; the temp_table carrier is refreshed at
   * the next lease.
   */
  restoreIdentity(connection: ServerConnection, client: ClientState): void {
    if (this.identity.carrier !== 'settings') return;
    const messages: Buffer[] = [];
    if (!connection.proxyStatements.has(SET_PARAMETERS)) {
      messages.push(serialize.parse({ name: SET_PARAMETERS, text: SET_PARAMETERS_SQL }));
      connection.proxyStatements.add(SET_PARAMETERS);
    }
    messages.push(
      serialize.bind({ statement: SET_PARAMETERS, values: [textArray([IDENTITY_SETTING]), textArray([identityJson(client.identity)])] }),
      serialize.execute({}),
      Sync,
    );
    this.request(connection, Buffer.concat(messages)).catch(() => connection.close('restoring the identity failed'));
    connection.identity = identityJson(client.identity);
    connection.identityIntact = true;
  }

  private collectParameterChanges(connection: ServerConnection, client: ClientState, names: string[], values: (string | null)[]): void {
    for (const [name, value] of client.settings) {
      if (connection.parameters.get(name) !== value) {
        names.push(name);
        values.push(value);
      }
    }
    for (const [name, current] of connection.parameters) {
      if (client.settings.has(name) || UNREPLAYABLE_PARAMETERS.has(name)) continue;
      const startupValue = connection.startupParameters.get(name);
      if (current === startupValue) continue;
      names.push(name);
      values.push(startupValue ?? null);
    }
  }

  /** Writes the identity into the connection's temp table `userinfo`, creating or repairing the table as needed. */
  private async refreshUserinfo(connection: ServerConnection, client: ClientState, mayRepair: boolean): Promise<void> {
    const messages: Buffer[] = [];
    if (!connection.proxyStatements.has(REFRESH_USERINFO)) {
      await this.request(connection, serialize.query(this.createUserinfoSql));
      messages.push(
        serialize.parse({ name: BEGIN, text: 'BEGIN READ WRITE' }),
        serialize.parse({ name: REFRESH_USERINFO, text: this.refreshUserinfoSql }),
        serialize.parse({ name: COMMIT, text: 'COMMIT' }),
      );
      for (const name of [BEGIN, REFRESH_USERINFO, COMMIT]) connection.proxyStatements.add(name);
    }
    const values = this.columns.map((column) => client.identity.get(column) ?? null);
    messages.push(
      serialize.bind({ statement: BEGIN }), serialize.execute({}),
      serialize.bind({ statement: REFRESH_USERINFO, values }), serialize.execute({}),
      serialize.bind({ statement: COMMIT }), serialize.execute({}),
      Sync,
    );
    try {
      let tampered = false;
      await this.request(connection, Buffer.concat(messages), (row) => {
        tampered = row.readInt32BE(7) === 1 && row[11] === 0x74; // one column, 't'
      });
      if (tampered) throw new Error('a client put a trigger or rule on the userinfo temp table');
    } catch (error) {
      // A client dropped, altered or instrumented its connection's userinfo table: end any
      // transaction the failed refresh left open, and build the table anew, once.
      connection.identityIntact = false;
      if (!mayRepair || connection.closed) throw error;
      connection.log.warn({ err: (error as Error).message }, 'userinfo temp table refresh failed; recreating the table');
      await this.request(connection, serialize.query('ROLLBACK'));
      for (const name of [BEGIN, REFRESH_USERINFO, COMMIT]) connection.proxyStatements.delete(name);
      // Close, unlike DEALLOCATE, succeeds for a statement that no longer exists.
      const closes = [BEGIN, REFRESH_USERINFO, COMMIT].map((name) => serialize.close({ type: 'S', name }));
      await this.request(connection, Buffer.concat([...closes, Sync]));
      await this.request(connection, serialize.query('DROP TABLE IF EXISTS pg_temp.userinfo'));
      await this.refreshUserinfo(connection, client, false);
      connection.identityIntact = true;
    }
  }

  /** Sends one request of the proxy's own that ends in exactly one ReadyForQuery, and waits for it. */
  private request(connection: ServerConnection, bytes: Buffer, onRow?: (frame: Buffer) => void): Promise<void> {
    return new Promise((resolve, reject) => {
      connection.request(bytes, {
        forward: false,
        onRow,
        done: (error) => (error === null ? resolve() : reject(new ServerError(error))),
      });
    });
  }
}

/** An ErrorResponse the server sent for one of the proxy's own requests. */
export class ServerError extends Error {
  override name = 'ServerError';
  constructor(readonly fields: Map<string, string>) {
    super(fields.get('M') ?? 'request failed');
  }
}

/** Formats a PostgreSQL text array literal; NULL elements stay NULL. */
export function textArray(values: (string | null)[]): string {
  const elements = values.map((value) => (value === null ? 'NULL' : `"${value.replace(/[\\"]/g, '\\$&')}"`));
  return `{${elements.join(',')}}`;
}
