// Readers for the length-only startup packets a client sends first: StartupMessage,
// SSLRequest, GSSENCRequest and CancelRequest.
import { StartupCode } from './codes.ts';

export type StartupPacket =
  | { kind: 'ssl' }
  | { kind: 'gssenc' }
  | { kind: 'cancel'; processId: number; secretKey: Buffer }
  | { kind: 'startup'; majorVersion: number; minorVersion: number; parameters: Map<string, string> };

/** Parses one startup packet, length included. Throws Error with a client-facing message when it is malformed. */
export function parseStartupPacket(packet: Buffer): StartupPacket {
  if (packet.length < 8) throw new Error('invalid startup packet length');
  const code = packet.readUInt32BE(4);

  if (code === StartupCode.SSLRequest && packet.length === 8) return { kind: 'ssl' };
  if (code === StartupCode.GSSENCRequest && packet.length === 8) return { kind: 'gssenc' };
  if (code === StartupCode.CancelRequest) {
    if (packet.length < 16) throw new Error('invalid cancel request length');
    return { kind: 'cancel', processId: packet.readUInt32BE(8), secretKey: packet.subarray(12) };
  }

  const majorVersion = code >>> 16;
  const minorVersion = code & 0xffff;
  if (majorVersion !== 3) {
    throw new Error(`unsupported frontend protocol ${majorVersion}.${minorVersion}: server supports 3.0`);
  }
  return { kind: 'startup', majorVersion, minorVersion, parameters: readParameters(packet) };
}

function readParameters(packet: Buffer): Map<string, string> {
  const parameters = new Map<string, string>();
  let offset = 8;
  while (offset < packet.length && packet[offset] !== 0) {
    const nameEnd = packet.indexOf(0, offset);
    if (nameEnd < 0) throw new Error('invalid startup packet layout: expected terminator as last byte');
    const valueEnd = packet.indexOf(0, nameEnd + 1);
    if (valueEnd < 0) throw new Error('invalid startup packet layout: expected terminator as last byte');
    parameters.set(packet.toString('utf8', offset, nameEnd), packet.toString('utf8', nameEnd + 1, valueEnd));
    offset = valueEnd + 1;
  }
  if (offset !== packet.length - 1) throw new Error('invalid startup packet layout: expected terminator as last byte');
  return parameters;
}

/**
 * Splits the `options` startup parameter the way PostgreSQL does: whitespace separates
 * arguments and a backslash escapes the next character. Returns the `-c name=value` and
 * `--name=value` settings; throws on anything else.
 */
export function parseOptions(options: string): Map<string, string> {
  const words: string[] = [];
  let current = '';
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const char = options[i];
    if (char === '\\' && i + 1 < options.length) {
      current += options[++i];
      inWord = true;
    } else if (/\s/.test(char)) {
      if (inWord) words.push(current);
      current = '';
      inWord = false;
    } else {
      current += char;
      inWord = true;
    }
  }
  if (inWord) words.push(current);

  const settings = new Map<string, string>();
  for (let i = 0; i < words.length; i++) {
    let assignment: string;
    if (words[i] === '-c' && i + 1 < words.length) assignment = words[++i];
    else if (words[i].startsWith('-c')) assignment = words[i].slice(2);
    else if (words[i].startsWith('--')) assignment = words[i].slice(2);
    else throw new Error(`invalid command-line argument in "options": ${words[i]}`);
    const equals = assignment.indexOf('=');
    if (equals <= 0) throw new Error(`invalid setting in "options": "${assignment}" has no "name=value" form`);
    settings.set(assignment.slice(0, equals).replace(/-/g, '_'), assignment.slice(equals + 1));
  }
  return settings;
}
