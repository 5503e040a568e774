import type { JWTPayload } from 'jose';

/** One client's identity: userinfo column name to value, in configuration order. */
export type Identity = ReadonlyMap<string, string | null>;

export class ClaimNotRepresentable extends Error {
  constructor(readonly column: string) {
    super(`claim for identity column "${column}" contains a NUL byte`);
  }
}

/**
 * Maps verified claims to identity columns. A missing claim is NULL; a string is stored as
 * it is; any other JSON value is stored as its JSON text. Throws ClaimNotRepresentable for
 * a NUL byte, which PostgreSQL text cannot hold.
 */
export function identityFromClaims(payload: JWTPayload, columns: Record<string, string>): Identity {
  const identity = new Map<string, string | null>();
  for (const [column, claim] of Object.entries(columns)) {
    const value = payload[claim];
    let text: string | null;
    if (value === undefined || value === null) text = null;
    else if (typeof value === 'string') text = value;
    else text = JSON.stringify(value);
    if (text !== null && text.includes('\0')) throw new ClaimNotRepresentable(column);
    identity.set(column, text);
  }
  return identity;
}

/** Formats the identity as the JSON object the `settings` carrier stores in `pg_audit_proxy.identity`. */
export function identityJson(identity: Identity): string {
  return JSON.stringify(Object.fromEntries(identity));
}
