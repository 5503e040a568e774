// Verifies client tokens with jose. Each configured key accepts only the algorithms of its
// own kind (HMAC secrets HS*, RSA keys RS*/PS*, EC keys ES*, OKP keys EdDSA), which closes
// the classic confusion attack where an HS256 token is signed with an RSA public key.
import { createPublicKey, createSecretKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';

import {
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  importJWK,
  jwtVerify,
  type JWK,
  type JWTPayload,
  type JWTVerifyGetKey,
} from 'jose';

import type { Config, JwtKeyConfig } from '../../config/schema.ts';

type KeySource = { describe: string; algorithms: string[]; key: KeyObject | Uint8Array | JWTVerifyGetKey };

export class TokenRejected extends Error {
  override name = 'TokenRejected';
}

const HMAC = ['HS256', 'HS384', 'HS512'];
const RSA = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512'];
/** EC algorithms by the OpenSSL name of the key's curve. */
const EC_BY_CURVE: Record<string, string[]> = { prime256v1: ['ES256'], secp384r1: ['ES384'], secp521r1: ['ES512'] };
const OKP = ['EdDSA', 'Ed25519'];
const ASYMMETRIC = [...RSA, 'ES256', 'ES384', 'ES512', ...OKP];

export class JwtVerifier {
  private readonly sources: KeySource[];

  constructor(private readonly settings: Config['auth']['jwt'], baseDirectory: string) {
    this.sources = settings.keys.map((key, index) => loadKey(key, index, baseDirectory));
  }

  /** Returns the verified payload, or throws TokenRejected with the reason (for the log only). */
  async verify(token: string): Promise<JWTPayload> {
    let headerAlgorithm: string | undefined;
    try {
      headerAlgorithm = decodeProtectedHeader(token).alg;
    } catch (error) {
      throw new TokenRejected(`ERR_JWS_INVALID: malformed token: ${(error as Error).message}`);
    }
    const allowed = this.settings.algorithms;
    let lastReason = `ERR_JOSE_ALG_NOT_ALLOWED: algorithm ${headerAlgorithm ?? '(none)'} is not accepted by any configured key`;
    for (const source of this.sources) {
      const algorithms = allowed ? source.algorithms.filter((algorithm) => allowed.includes(algorithm as never)) : source.algorithms;
      // Only keys of the token's algorithm family can verify it; the others would only
      // hide the real reason behind "algorithm not allowed".
      if (headerAlgorithm === undefined || !algorithms.includes(headerAlgorithm)) continue;
      try {
        const { payload } = await jwtVerify(token, source.key as never, {
          algorithms,
          issuer: this.settings.issuer,
          audience: this.settings.audience,
          clockTolerance: Math.round(this.settings.clock_tolerance / 1000),
        });
        return payload;
      } catch (error) {
        lastReason = `${source.describe}: ${describeJoseError(error)}`;
        // A claim problem (expired, wrong issuer) will not change with another key.
        if (error instanceof joseErrors.JWTClaimValidationFailed || error instanceof joseErrors.JWTExpired) break;
      }
    }
    throw new TokenRejected(lastReason);
  }
}

function describeJoseError(error: unknown): string {
  if (error instanceof joseErrors.JOSEError) return `${error.code}: ${error.message}`;
  return (error as Error).message;
}

function loadKey(key: JwtKeyConfig, index: number, baseDirectory: string): KeySource {
  const describe = `auth.jwt.keys[${index}]`;
  const resolve = (path: string) => (path.startsWith('/') ? path : `${baseDirectory}/${path}`);

  if ('secret' in key) {
    return { describe, algorithms: HMAC, key: createSecretKey(Buffer.from(key.secret, 'utf8')) };
  }
  if ('public_key_file' in key) {
    const publicKey = createPublicKey(readFileSync(resolve(key.public_key_file), 'utf8'));
    return { describe, algorithms: key.algorithm ? [key.algorithm] : algorithmsFor(publicKey), key: publicKey };
  }
  if ('jwk_file' in key) {
    const jwk = JSON.parse(readFileSync(resolve(key.jwk_file), 'utf8')) as JWK;
    let algorithms = jwk.kty === 'oct' ? HMAC : ASYMMETRIC;
    if (jwk.alg) algorithms = [jwk.alg];
    const resolver: JWTVerifyGetKey = async (header) => importJWK(jwk, header.alg);
    return { describe, algorithms, key: resolver };
  }
  if ('jwks_file' in key) {
    const jwks = JSON.parse(readFileSync(resolve(key.jwks_file), 'utf8')) as { keys: JWK[] };
    return { describe, algorithms: ASYMMETRIC, key: createLocalJWKSet(jwks) };
  }
  return { describe, algorithms: ASYMMETRIC, key: createRemoteJWKSet(new URL(key.jwks_url)) };
}

function algorithmsFor(publicKey: KeyObject): string[] {
  switch (publicKey.asymmetricKeyType) {
    case 'rsa':
    case 'rsa-pss':
      return RSA;
    case 'ec':
      return EC_BY_CURVE[publicKey.asymmetricKeyDetails?.namedCurve ?? ''] ?? [];
    case 'ed25519':
    case 'ed448':
      return OKP;
    default:
      throw new Error(`unsupported public key type ${publicKey.asymmetricKeyType}`);
  }
}
