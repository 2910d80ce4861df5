// A push-fed async iterable: the request side of a client-streaming or bidirectional call.
//
// Connect takes a stream's requests as an AsyncIterable it pulls from; a session produces
// frames when events happen (a batch stored, a heartbeat due). This queue joins the two:
// push() hands a value to the pending pull (or buffers it), end() finishes the iteration.
// Its iterator implements return() and throw(), which Connect calls to stop pulling.

export class PushQueue<T> implements AsyncIterable<T> {
  private readonly buffered: T[] = [];
  private waiting: ((result: IteratorResult<T>) => void) | undefined;
  private ended = false;

  /** Queue `value`; false when the queue has already ended (the value is dropped). */
  push(value: T): boolean {
    if (this.ended) return false;
    const waiting = this.waiting;
    if (waiting !== undefined) {
      this.waiting = undefined;
      waiting({ value, done: false });
    } else {
      this.buffered.push(value);
    }
    return true;
  }

  /** Finish the iteration after what is buffered (half-close of the call). */
  end(): void {
    this.ended = true;
    const waiting = this.waiting;
    if (waiting !== undefined && this.buffered.length === 0) {
      this.waiting = undefined;
      waiting({ value: undefined, done: true });
    }
  }

  /** End at once, dropping what is buffered. */
  private close(): void {
    this.buffered.length = 0;
    this.end();
  }

  get isEnded(): boolean {
    return this.ended;
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => {
        if (this.buffered.length > 0) {
          return Promise.resolve({ value: this.buffered.shift() as T, done: false });
        }
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => {
          this.waiting = resolve;
        });
      },
      return: () => {
        // The consumer stopped pulling (the call ended): nothing more will be sent.
        this.close();
        return Promise.resolve({ value: undefined, done: true });
      },
      throw: (error: unknown) => {
        // The consumer aborts the iteration (Connect does when the call fails).
        this.close();
        return Promise.reject(error instanceof Error ? error : new Error(String(error)));
      },
    };
  }
}
