// The SQLSTATE codes the proxy itself sends, named as in PostgreSQL's errcodes.txt.
export const SqlState = {
  ConnectionFailure: '08006',
  ProtocolViolation: '08P01',
  InvalidAuthorizationSpecification: '28000',
  InvalidPassword: '28P01',
  InvalidCatalogName: '3D000',
  TooManyConnections: '53300',
  AdminShutdown: '57P01',
  QueryCanceled: '57014',
  CharacterNotInRepertoire: '22021',
  FeatureNotSupported: '0A000',
  InternalError: 'XX000',
  DuplicatePreparedStatement: '42P05',
  InvalidSqlStatementName: '26000',
} as const;
