// Every error the proxy itself sends to a client. Nothing else reaches a client: any other
// exception is logged in full and the client gets `internalError()`.
import type { ErrorFields } from '../protocol/backend-messages.ts';
import { SqlState } from '../protocol/sqlstate.ts';

/** Builds the one error for every token problem, so a client learns nothing about why; the reason is logged. */
export function authenticationFailed(user: string): ErrorFields {
  return {
    severity: 'FATAL',
    code: SqlState.InvalidPassword,
    message: `JWT authentication failed for user "${user}"`,
    hint: 'Send a valid, unexpired token as the password, as the "jwt" startup parameter, or as "-c jwt=TOKEN" in options.',
  };
}

export function databaseNotFound(database: string): ErrorFields {
  return { severity: 'FATAL', code: SqlState.InvalidCatalogName, message: `database "${database}" does not exist` };
}

export function protocolViolation(message: string): ErrorFields {
  return { severity: 'FATAL', code: SqlState.ProtocolViolation, message };
}

export function invalidStartupParameter(message: string): ErrorFields {
  return { severity: 'FATAL', code: SqlState.ProtocolViolation, message };
}

export function claimNotRepresentable(column: string): ErrorFields {
  return {
    severity: 'FATAL',
    code: SqlState.CharacterNotInRepertoire,
    message: `token claim for identity column "${column}" contains a NUL byte`,
    detail: 'PostgreSQL text values cannot contain NUL (0x00) characters.',
  };
}

export function startupTimeout(): ErrorFields {
  return { severity: 'FATAL', code: SqlState.ProtocolViolation, message: 'startup and authentication timed out' };
}

export function tooManyClients(limit: number): ErrorFields {
  return {
    severity: 'FATAL',
    code: SqlState.TooManyConnections,
    message: 'sorry, too many clients already',
    detail: `The proxy accepts at most ${limit} client connections (listen.max_clients).`,
  };
}

export function checkoutTimeout(waitedMs: number): ErrorFields {
  return {
    severity: 'ERROR',
    code: SqlState.TooManyConnections,
    message: `no server connection available within ${waitedMs} ms`,
    detail: 'Every server connection of the pool is in use (pool.size); the wait limit is pool.checkout_timeout.',
    hint: 'Retry later, or raise pool.size or pool.checkout_timeout.',
  };
}

export function upstreamUnavailable(reason: string): ErrorFields {
  return {
    severity: 'ERROR',
    code: SqlState.ConnectionFailure,
    message: 'could not connect to the upstream server',
    detail: reason,
  };
}

export function upstreamConnectionLost(): ErrorFields {
  return {
    severity: 'FATAL',
    code: SqlState.ConnectionFailure,
    message: 'server connection lost while the client was using it',
    detail: 'The transaction in progress, if any, was rolled back by the server.',
  };
}

export function queryCanceledWhileWaiting(): ErrorFields {
  return { severity: 'ERROR', code: SqlState.QueryCanceled, message: 'canceling statement due to user request' };
}

export function shuttingDown(): ErrorFields {
  return { severity: 'FATAL', code: SqlState.AdminShutdown, message: 'terminating connection due to administrator command' };
}

export function duplicatePreparedStatement(name: string): ErrorFields {
  return { severity: 'ERROR', code: SqlState.DuplicatePreparedStatement, message: `prepared statement "${name}" already exists` };
}

export function unknownPreparedStatement(name: string): ErrorFields {
  return { severity: 'ERROR', code: SqlState.InvalidSqlStatementName, message: `prepared statement "${name}" does not exist` };
}

export function sessionStateRejected(statement: string): ErrorFields {
  return {
    severity: 'ERROR',
    code: SqlState.FeatureNotSupported,
    message: `${statement} is not supported under transaction pooling`,
    detail: `The statement creates session state that cannot follow the client to another server connection, and pool.session_state is "reject".`,
    hint: 'Set pool.session_state to "pin" to keep such clients on one server connection, or avoid the statement.',
  };
}

export function internalError(): ErrorFields {
  return { severity: 'FATAL', code: SqlState.InternalError, message: 'internal error in the proxy; see its log' };
}
