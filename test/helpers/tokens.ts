// JWT signing keys generated per test run, and tokens signed with them.
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import { SignJWT, type JWTPayload } from 'jose';

/** Generates an HMAC secret: 32 random bytes as hex. */
export function newSecret(): string {
  return randomBytes(32).toString('hex');
}

export interface TokenOptions {
  alg?: string;
  expiresInSeconds?: number;
  notBeforeSeconds?: number;
  issuer?: string;
  audience?: string;
}

/** Signs `claims` with an HMAC secret (HS256 unless `alg` names another); expires in an hour by default. */
export async function signToken(secret: string | Uint8Array, claims: JWTPayload, options: TokenOptions = {}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  let jwt = new SignJWT(claims)
    .setProtectedHeader({ alg: options.alg ?? 'HS256', typ: 'JWT' })
    .setIssuedAt(now)
    .setExpirationTime(now + (options.expiresInSeconds ?? 3600));
  if (options.notBeforeSeconds !== undefined) jwt = jwt.setNotBefore(now + options.notBeforeSeconds);
  if (options.issuer !== undefined) jwt = jwt.setIssuer(options.issuer);
  if (options.audience !== undefined) jwt = jwt.setAudience(options.audience);
  const key = typeof secret === 'string' ? new TextEncoder().encode(secret) : secret;
  return jwt.sign(key);
}

/** Generates an RSA key pair, the public key as PEM text. */
export function newRsaKeyPair(): { publicKeyPem: string; privateKey: ReturnType<typeof generateKeyPairSync>['privateKey'] } {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(), privateKey };
}
