// The replies a server connection still owes, one entry per message sent that the server
// replies to, in sending order. Each entry is forwarded to the leasing client or swallowed
// (the proxy's own messages), or is synthetic: a reply the proxy produces itself, such as
// ParseComplete for a statement the server already has, released when every reply before
// it has arrived. After an ErrorResponse in the extended protocol the server skips to the
// next Sync, so the entries up to that Sync are dropped with it.
import { Frontend } from '../protocol/codes.ts';

/** The server message that completes an entry. */
export const enum ReplyKind {
  ParseComplete,
  BindComplete,
  CloseComplete,
  /** RowDescription or NoData, after an optional ParameterDescription. */
  Describe,
  /** CommandComplete, EmptyQueryResponse or PortalSuspended. */
  Execute,
  /** ReadyForQuery of a Sync: ends an extended-protocol batch. */
  Sync,
  /** ReadyForQuery of a simple Query or FunctionCall. */
  Query,
  /** Nothing from the server: the entry's `synthetic` bytes go to the client when it reaches the front. */
  Synthetic,
}

export interface OwedReply {
  kind: ReplyKind;
  /** True: relay to the leasing client. False: the proxy's own message; swallow. */
  forward: boolean;
  /** For ReplyKind.Synthetic: the bytes to send the client. */
  synthetic?: Buffer;
  /** An error of this entry is never relayed, even inside a client's batch. */
  swallowError?: boolean;
  /** The client already got an error for its request: swallow the rest, except the final ReadyForQuery. */
  muted?: boolean;
  /** For a Parse the proxy sent: the server statement name, forgotten if the Parse fails. */
  statement?: string;
  /** Called when the server skipped or failed this message, so it had no effect. */
  onDropped?: () => void;
  /** A marker placed where the client sent CopyDone or CopyFail; it has no reply. */
  copyEnd?: boolean;
  /** For the proxy's own queries: receives each DataRow of the entry. */
  onRow?: (frame: Buffer) => void;
  /** For Sync and Query entries: called at their ReadyForQuery with the first error's fields, if any. */
  done?: (error: Map<string, string> | null) => void;
  error?: Map<string, string> | null;
}

/** Returns the reply kind of a frontend message type, or undefined for types the server does not reply to. */
export function replyKindOf(type: number): ReplyKind | undefined {
  switch (type) {
    case Frontend.Parse:
      return ReplyKind.ParseComplete;
    case Frontend.Bind:
      return ReplyKind.BindComplete;
    case Frontend.Close:
      return ReplyKind.CloseComplete;
    case Frontend.Describe:
      return ReplyKind.Describe;
    case Frontend.Execute:
      return ReplyKind.Execute;
    case Frontend.Sync:
      return ReplyKind.Sync;
    case Frontend.Query:
    case Frontend.FunctionCall:
      return ReplyKind.Query;
    default:
      return undefined;
  }
}

/** Entries in `bytes`, a sequence of complete frontend messages the proxy sends itself. */
export function repliesFor(bytes: Buffer, reply: Omit<OwedReply, 'kind'>): OwedReply[] {
  const replies: OwedReply[] = [];
  let offset = 0;
  while (offset < bytes.length) {
    const kind = replyKindOf(bytes[offset]);
    if (kind !== undefined) replies.push({ kind, forward: reply.forward, swallowError: reply.swallowError, onRow: reply.onRow });
    offset += 1 + bytes.readUInt32BE(offset + 1);
  }
  const last = replies[replies.length - 1];
  if (last !== undefined) last.done = reply.done;
  return replies;
}
