// Splits a byte stream into protocol messages by type byte and length only, never by
// content. Complete messages are handed over as views into the received chunk, so
// forwarding them copies nothing. A message larger than `bufferLimit` whose type the
// handler does not need to read (DataRow, CopyData, Bind) is streamed through piece by
// piece, so memory stays bounded whatever size the peer declares.

/** Thrown when the peer sends a length the protocol or our limits do not allow. */
export class FramingError extends Error {
  override name = 'FramingError';
}

export interface FrameHandler {
  /** A complete message, header included, as a view into the received bytes. */
  message(type: number, frame: Buffer): void;
  /** The first piece (header included) of a message too large to buffer. */
  streamStart(type: number, totalLength: number, piece: Buffer): void;
  /** A further piece of the streamed message; `last` marks its final piece. */
  streamPiece(piece: Buffer, last: boolean): void;
  /** The chunk has been consumed; a good place to flush batched output. */
  chunkEnd(): void;
}

const HEADER_BYTES = 5;

export class MessageFramer {
  /** Bytes of a header or a buffered message that a chunk split. */
  private partial: Buffer | null = null;
  private partialFilled = 0;
  private streamRemaining = 0;

  constructor(
    private readonly handler: FrameHandler,
    /** Largest declared length accepted, header excluded; may change between phases of a session. */
    public maxMessageBytes: number,
    /** Type bytes that may be streamed instead of buffered. */
    private readonly streamableTypes: ReadonlySet<number>,
    /** Messages up to this many bytes are always delivered whole. */
    private readonly bufferLimit = 256 * 1024,
  ) {}

  /** True while part of a message has been received but not all of it. */
  get midMessage(): boolean {
    return this.partial !== null || this.streamRemaining > 0;
  }

  push(chunk: Buffer): void {
    let offset = 0;

    if (this.streamRemaining > 0) {
      const take = Math.min(this.streamRemaining, chunk.length);
      this.streamRemaining -= take;
      this.handler.streamPiece(chunk.subarray(0, take), this.streamRemaining === 0);
      offset = take;
    } else if (this.partial !== null) {
      offset = this.fillPartial(chunk);
      if (offset < 0) return;
    }

    while (offset < chunk.length) {
      const available = chunk.length - offset;
      if (available < HEADER_BYTES) {
        this.partial = Buffer.allocUnsafe(HEADER_BYTES);
        chunk.copy(this.partial, 0, offset);
        this.partialFilled = available;
        break;
      }
      const type = chunk[offset];
      const total = this.checkedLength(chunk.readUInt32BE(offset + 1), type) + 1;
      if (total <= available) {
        this.handler.message(type, chunk.subarray(offset, offset + total));
        offset += total;
        continue;
      }
      if (total > this.bufferLimit && this.streamableTypes.has(type)) {
        this.streamRemaining = total - available;
        this.handler.streamStart(type, total, chunk.subarray(offset));
      } else {
        this.partial = Buffer.allocUnsafe(total);
        chunk.copy(this.partial, 0, offset);
        this.partialFilled = available;
      }
      break;
    }
    this.handler.chunkEnd();
  }

  /**
   * Adds the start of `chunk` to the partial header or message. Returns the offset where
   * unread bytes begin, or -1 when the whole chunk was consumed.
   */
  private fillPartial(chunk: Buffer): number {
    let partial = this.partial!;
    let offset = 0;

    if (partial.length === HEADER_BYTES && this.partialFilled < HEADER_BYTES) {
      const take = Math.min(HEADER_BYTES - this.partialFilled, chunk.length);
      chunk.copy(partial, this.partialFilled, 0, take);
      this.partialFilled += take;
      offset = take;
      if (this.partialFilled < HEADER_BYTES) return -1;

      const type = partial[0];
      const total = this.checkedLength(partial.readUInt32BE(1), type) + 1;
      if (total > this.bufferLimit && this.streamableTypes.has(type)) {
        this.partial = null;
        this.streamRemaining = total - HEADER_BYTES;
        this.handler.streamStart(type, total, partial);
        const take = Math.min(this.streamRemaining, chunk.length - offset);
        if (take > 0) {
          this.streamRemaining -= take;
          this.handler.streamPiece(chunk.subarray(offset, offset + take), this.streamRemaining === 0);
        }
        return this.finishFill(chunk, offset + take);
      }
      const grown = Buffer.allocUnsafe(total);
      partial.copy(grown, 0, 0, HEADER_BYTES);
      partial = grown;
      this.partial = grown;
    }

    const take = Math.min(partial.length - this.partialFilled, chunk.length - offset);
    chunk.copy(partial, this.partialFilled, offset, offset + take);
    this.partialFilled += take;
    offset += take;
    if (this.partialFilled < partial.length) return -1;

    this.partial = null;
    this.handler.message(partial[0], partial);
    return this.finishFill(chunk, offset);
  }

  private finishFill(chunk: Buffer, offset: number): number {
    if (offset >= chunk.length) {
      this.handler.chunkEnd();
      return -1;
    }
    return offset;
  }

  private checkedLength(length: number, type: number): number {
    if (length < 4 || length - 4 > this.maxMessageBytes) {
      throw new FramingError(
        `invalid message length ${length} for message type "${String.fromCharCode(type)}" (limit ${this.maxMessageBytes} bytes)`,
      );
    }
    return length;
  }
}
