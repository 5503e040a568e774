import type net from 'node:net';

/**
 * Messages gathered for one socket and written together at the end of the received chunk,
 * so a burst of small messages costs one corked write instead of one write each.
 */
export class OutputBatch {
  private readonly parts: Buffer[] = [];

  constructor(private readonly socket: net.Socket) {}

  add(bytes: Buffer): void {
    this.parts.push(bytes);
  }

  get isEmpty(): boolean {
    return this.parts.length === 0;
  }

  /** Writes what was gathered. Returns false when the socket's buffer is full. */
  flush(): boolean {
    const { parts, socket } = this;
    if (parts.length === 0) return true;
    if (socket.destroyed) {
      parts.length = 0;
      return true;
    }
    let writable: boolean;
    if (parts.length === 1) {
      writable = socket.write(parts[0]);
    } else {
      socket.cork();
      for (const part of parts) socket.write(part);
      writable = socket.writableLength < socket.writableHighWaterMark;
      socket.uncork();
    }
    parts.length = 0;
    return writable;
  }
}
