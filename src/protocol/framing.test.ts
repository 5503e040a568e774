// MessageFramer splits a byte stream into messages by type byte and length only, whatever
// the chunk boundaries, checks declared lengths, and streams large messages in pieces.
import { describe, expect, it } from 'vitest';

import { type FrameHandler, FramingError, MessageFramer } from './framing.ts';

const QUERY = 0x51; // Q
const COPY_DATA = 0x64; // d
const BIND = 0x42; // B

type FramerEvent =
  | { kind: 'message'; type: number; bytes: Buffer }
  | { kind: 'streamStart'; type: number; totalLength: number; bytes: Buffer }
  | { kind: 'streamPiece'; bytes: Buffer; last: boolean }
  | { kind: 'chunkEnd' };

/** A FrameHandler that records every call, with copies of the bytes it was given. */
class RecordingHandler implements FrameHandler {
  readonly events: FramerEvent[] = [];

  message(type: number, frame: Buffer): void {
    this.events.push({ kind: 'message', type, bytes: Buffer.from(frame) });
  }

  streamStart(type: number, totalLength: number, piece: Buffer): void {
    this.events.push({ kind: 'streamStart', type, totalLength, bytes: Buffer.from(piece) });
  }

  streamPiece(piece: Buffer, last: boolean): void {
    this.events.push({ kind: 'streamPiece', bytes: Buffer.from(piece), last });
  }

  chunkEnd(): void {
    this.events.push({ kind: 'chunkEnd' });
  }

  /** The complete messages received, as whole frames. */
  get messages(): Buffer[] {
    return this.events.flatMap((event) => (event.kind === 'message' ? [event.bytes] : []));
  }
}

/** Builds a message: type byte, Int32 length (the length word included), body. */
function frame(type: string, body: Buffer | string = Buffer.alloc(0)): Buffer {
  const bodyBytes = typeof body === 'string' ? Buffer.from(body, 'utf8') : body;
  const header = Buffer.alloc(5);
  header.write(type, 0, 'latin1');
  header.writeUInt32BE(bodyBytes.length + 4, 1);
  return Buffer.concat([header, bodyBytes]);
}

/** Splits `bytes` at each of `offsets` (ascending, inside the buffer). */
function splitAt(bytes: Buffer, offsets: number[]): Buffer[] {
  const pieces: Buffer[] = [];
  let start = 0;
  for (const offset of offsets) {
    pieces.push(bytes.subarray(start, offset));
    start = offset;
  }
  pieces.push(bytes.subarray(start));
  return pieces;
}

/**
 * Feeds `chunks` to a new framer and checks that every push that delivered a message or a
 * piece ended with chunkEnd, because the session flushes its output only there.
 */
function feed(chunks: Buffer[], options: { maxMessageBytes?: number; streamable?: number[]; bufferLimit?: number } = {}): RecordingHandler {
  const handler = new RecordingHandler();
  const framer = new MessageFramer(handler, options.maxMessageBytes ?? 1024 * 1024, new Set(options.streamable ?? []), options.bufferLimit);
  for (const [index, chunk] of chunks.entries()) {
    const before = handler.events.length;
    // Each chunk is a copy, so the framer cannot rely on bytes outside it.
    framer.push(Buffer.from(chunk));
    const added = handler.events.slice(before);
    if (added.some((event) => event.kind !== 'chunkEnd')) {
      expect(added.at(-1)?.kind, `push ${index} delivered data without a chunkEnd after it`).toBe('chunkEnd');
    }
  }
  return handler;
}

// Bodies begin with type letters and contain bytes that read as lengths, so a framer that
// looked at content instead of the declared length would split them wrongly.
const SAMPLE_MESSAGES = [
  frame('Q', 'SELECT 1\0'),
  frame('P', Buffer.concat([Buffer.from('stmt\0SELECT $1\0'), Buffer.from([0, 1, 0, 0, 0, 25])])),
  frame('B', Buffer.from([0x5a, 0, 0, 0, 5, 0x49, 0x53, 0, 0, 0, 4])),
  frame('S'),
  frame('d', Buffer.alloc(300, 0x45)),
  frame('H'),
  frame('E', Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0])),
  frame('X'),
];
const SAMPLE_STREAM = Buffer.concat(SAMPLE_MESSAGES);

describe('MessageFramer', () => {
  it('delivers messages received in one chunk', () => {
    const handler = feed([SAMPLE_STREAM]);
    expect(handler.messages).toEqual(SAMPLE_MESSAGES);
  });

  it('delivers the same messages for a split at every offset', () => {
    for (let offset = 1; offset < SAMPLE_STREAM.length; offset++) {
      const handler = feed(splitAt(SAMPLE_STREAM, [offset]));
      expect(handler.messages, `split at offset ${offset}`).toEqual(SAMPLE_MESSAGES);
    }
  });

  it('delivers the same messages for two splits at every pair of offsets', () => {
    const prefix = SAMPLE_STREAM.subarray(0, 60);
    const expected = feed([prefix]).messages;
    for (let first = 1; first < prefix.length; first++) {
      for (let second = first + 1; second < prefix.length; second++) {
        const handler = feed(splitAt(prefix, [first, second]));
        expect(handler.messages, `split at offsets ${first} and ${second}`).toEqual(expected);
      }
    }
  });

  it('delivers the same messages fed byte by byte', () => {
    const bytes = [...SAMPLE_STREAM].map((byte) => Buffer.from([byte]));
    const handler = feed(bytes);
    expect(handler.messages).toEqual(SAMPLE_MESSAGES);
  });

  it('reports a partial message until its last byte arrives', () => {
    const handler = new RecordingHandler();
    const framer = new MessageFramer(handler, 1024, new Set());
    const message = frame('Q', 'SELECT 1\0');
    expect(framer.midMessage).toBe(false);
    framer.push(message.subarray(0, 3));
    expect(framer.midMessage).toBe(true);
    framer.push(message.subarray(3, 9));
    expect(framer.midMessage).toBe(true);
    framer.push(message.subarray(9));
    expect(framer.midMessage).toBe(false);
    expect(handler.messages).toEqual([message]);
  });

  describe('declared lengths', () => {
    const header = (type: number, length: number) => {
      const bytes = Buffer.alloc(5);
      bytes[0] = type;
      bytes.writeUInt32BE(length, 1);
      return bytes;
    };

    it('raises FramingError for a length above the limit', () => {
      const framer = new MessageFramer(new RecordingHandler(), 1024, new Set());
      expect(() => framer.push(header(QUERY, 1024 + 4 + 1))).toThrow(FramingError);
    });

    it('raises FramingError for a length of 2^31', () => {
      const framer = new MessageFramer(new RecordingHandler(), 64 * 1024 * 1024, new Set([QUERY]));
      expect(() => framer.push(header(QUERY, 2 ** 31))).toThrow(FramingError);
    });

    it('raises FramingError for a length below 4', () => {
      for (const length of [0, 1, 3]) {
        const framer = new MessageFramer(new RecordingHandler(), 1024, new Set());
        expect(() => framer.push(header(QUERY, length)), `length ${length}`).toThrow(FramingError);
      }
    });

    it('raises FramingError for an oversize length split across chunks', () => {
      const framer = new MessageFramer(new RecordingHandler(), 1024, new Set([COPY_DATA]));
      const bytes = header(COPY_DATA, 2 ** 31);
      framer.push(bytes.subarray(0, 2));
      expect(() => framer.push(bytes.subarray(2))).toThrow(FramingError);
    });

    it('raises FramingError for an oversize length after a complete message', () => {
      const framer = new MessageFramer(new RecordingHandler(), 1024, new Set());
      expect(() => framer.push(Buffer.concat([frame('S'), header(QUERY, 1024 + 4 + 1)]))).toThrow(FramingError);
    });

    it('accepts a body of exactly the limit', () => {
      const message = frame('Q', Buffer.alloc(1024, 0x61));
      const handler = feed([message.subarray(0, 100), message.subarray(100)], { maxMessageBytes: 1024 });
      expect(handler.messages).toEqual([message]);
    });
  });

  describe('streaming', () => {
    const BUFFER_LIMIT = 64;
    const large = frame('d', Buffer.from([...Array(1000).keys()].map((index) => index % 251)));

    /** Joins the streamed message's start piece and every further piece, in order. */
    function streamedBytes(handler: RecordingHandler): Buffer {
      const pieces = handler.events.flatMap((event) => (event.kind === 'streamStart' || event.kind === 'streamPiece' ? [event.bytes] : []));
      return Buffer.concat(pieces);
    }

    function expectStreamedWhole(handler: RecordingHandler, label: string): void {
      const starts = handler.events.filter((event) => event.kind === 'streamStart');
      expect(starts, label).toHaveLength(1);
      const start = starts[0] as Extract<FramerEvent, { kind: 'streamStart' }>;
      expect(start.type, label).toBe(COPY_DATA);
      expect(start.totalLength, label).toBe(large.length);
      expect(streamedBytes(handler).equals(large), `${label}: pieces add up to the original bytes`).toBe(true);
      const pieces = handler.events.filter((event) => event.kind === 'streamPiece') as Extract<FramerEvent, { kind: 'streamPiece' }>[];
      expect(pieces.filter((piece) => piece.last), `${label}: exactly one last piece`).toHaveLength(1);
      expect(pieces.at(-1)?.last, `${label}: the last piece comes last`).toBe(true);
      expect(handler.messages.some((message) => message[0] === COPY_DATA), `${label}: not also delivered whole`).toBe(false);
    }

    it('streams a large message of a streamable type in pieces', () => {
      const handler = feed(splitAt(large, [10, 500]), { streamable: [COPY_DATA], bufferLimit: BUFFER_LIMIT });
      expectStreamedWhole(handler, 'split at 10 and 500');
    });

    it('streams the same bytes for a split at every offset', () => {
      for (let offset = 1; offset < large.length; offset++) {
        const handler = feed(splitAt(large, [offset]), { streamable: [COPY_DATA], bufferLimit: BUFFER_LIMIT });
        expectStreamedWhole(handler, `split at offset ${offset}`);
      }
    });

    it('streams the same bytes fed byte by byte', () => {
      const handler = feed([...large].map((byte) => Buffer.from([byte])), { streamable: [COPY_DATA], bufferLimit: BUFFER_LIMIT });
      expectStreamedWhole(handler, 'byte by byte');
    });

    it('delivers the messages around a streamed one whole', () => {
      const before = frame('Q', 'COPY t FROM STDIN\0');
      const after = [frame('c'), frame('S')];
      const stream = Buffer.concat([before, large, ...after]);
      for (const offsets of [[before.length + 3], [before.length + large.length - 1], [7, before.length + 200, stream.length - 3]]) {
        const handler = feed(splitAt(stream, offsets), { streamable: [COPY_DATA], bufferLimit: BUFFER_LIMIT });
        const label = `split at ${offsets.join(', ')}`;
        expect(handler.messages, label).toEqual([before, ...after]);
        expect(streamedBytes(handler).equals(large), label).toBe(true);
      }
    });

    it('buffers a large message of a type that is not streamable', () => {
      const bind = frame('B', Buffer.alloc(1000, 0x42));
      const handler = feed(splitAt(bind, [3, 100, 700]), { streamable: [COPY_DATA], bufferLimit: BUFFER_LIMIT });
      expect(handler.events.some((event) => event.kind === 'streamStart')).toBe(false);
      expect(handler.messages).toEqual([bind]);
      expect(handler.messages[0][0]).toBe(BIND);
    });
  });
});
