// Authentication as a client of the upstream server: cleartext, md5 and SCRAM-SHA-256.
// The SCRAM and md5 arithmetic is node-postgres's own (pg/lib/crypto), pinned with pg's
// version, so the proxy carries no hand-written crypto.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

interface ScramSession {
  mechanism: string;
  response: string;
}

const sasl = require('pg/lib/crypto/sasl.js') as {
  startSession(mechanisms: string[], stream?: unknown): ScramSession;
  continueSession(session: ScramSession, password: string, serverData: string, stream?: unknown): Promise<void>;
  finalizeSession(session: ScramSession, serverData: string): void;
};
const cryptoUtils = require('pg/lib/crypto/utils.js') as {
  postgresMd5PasswordHash(user: string, password: string, salt: Buffer): Promise<string>;
};

export const startScram = (mechanisms: string[]): ScramSession => sasl.startSession(mechanisms);
export const continueScram = (session: ScramSession, password: string, serverData: string) =>
  sasl.continueSession(session, password, serverData);
export const finishScram = (session: ScramSession, serverData: string) => sasl.finalizeSession(session, serverData);
export const md5Password = (user: string, password: string, salt: Buffer) =>
  cryptoUtils.postgresMd5PasswordHash(user, password, salt);
export type { ScramSession };
