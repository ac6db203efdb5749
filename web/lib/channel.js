// A data channel to one peer, with a bounded, backpressure-aware send
// queue in front of the browser's own buffer. Mirrors DataChannel in
// crates/peer/src/channel.rs: `send` queues (and says when the queue is
// full), `ready` waits for room, messages arrive as `message` events.

import { Emitter } from './events.js';

/** @typedef {'reliable' | 'unreliable' | { maxLifetimeMs: number }} Reliability */

/**
 * A channel's label and delivery mode (`ChannelSpec` in Rust).
 * @typedef {{ label: string, reliability?: Reliability }} ChannelSpec
 */

/** How long {@link Channel.close} waits for its queue to go before it closes anyway. */
const CLOSE_DRAIN_MS = 10_000;

/** @param {string} label @returns {ChannelSpec} */
export const reliable = (label) => ({ label, reliability: 'reliable' });
/** @param {string} label @returns {ChannelSpec} */
export const unreliable = (label) => ({ label, reliability: 'unreliable' });
/** @param {string} label @param {number} ms @returns {ChannelSpec} */
export const maxLifetime = (label, ms) => ({ label, reliability: { maxLifetimeMs: ms } });

/**
 * The W3C options for a spec.
 * @param {ChannelSpec} spec
 * @returns {RTCDataChannelInit}
 */
export function channelInit(spec) {
  const r = spec.reliability ?? 'reliable';
  if (r === 'reliable') return { ordered: true };
  if (r === 'unreliable') return { ordered: false, maxRetransmits: 0 };
  return { ordered: true, maxPacketLifeTime: r.maxLifetimeMs };
}

/**
 * The spec of a channel the other side opened.
 * @param {RTCDataChannel} raw
 * @returns {ChannelSpec}
 */
export function specOf(raw) {
  if (raw.maxRetransmits !== null && raw.maxRetransmits !== undefined) return unreliable(raw.label);
  if (raw.maxPacketLifeTime !== null && raw.maxPacketLifeTime !== undefined) {
    return maxLifetime(raw.label, raw.maxPacketLifeTime);
  }
  return reliable(raw.label);
}

/** Why a send failed (`SendError` in Rust). */
export class SendError extends Error {
  /**
   * @param {'overflow' | 'too_large' | 'closed'} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'SendError';
    this.code = code;
  }
}

/** The queue is full: throttle, drop, or buffer at a higher layer. */
export class ChannelOverflowError extends SendError {
  /** @param {string} message */
  constructor(message) {
    super('overflow', message);
    this.name = 'ChannelOverflowError';
  }
}

/**
 * @typedef {object} ChannelOptions
 * @property {number} [maxBufferedAmount] most bytes handed to the browser at once (1 MiB)
 * @property {number} [maxQueuedSends]   messages waiting here at most (256)
 * @property {number} [maxQueuedBytes]   bytes waiting here at most (4 MiB)
 * @property {number} [maxMessageSize]   largest message the other side takes (64 KiB if unknown)
 * @property {number} [closeDrainMs]     how long close() waits for the queue to go before it closes anyway (10 s)
 */

/**
 * @typedef {object} ChannelEvents
 * @property {string | Uint8Array} message
 * @property {void} open
 * @property {void} close
 */

/** @typedef {string | Uint8Array | ArrayBuffer} Payload */

/** @param {Payload} data */
function size(data) {
  return typeof data === 'string' ? new TextEncoder().encode(data).length : data.byteLength;
}

/** @extends {Emitter<ChannelEvents>} */
export class Channel extends Emitter {
  /**
   * @param {RTCDataChannel} raw
   * @param {string} peer  the remote peer's id
   * @param {ChannelOptions} [options]
   */
  constructor(raw, peer, options = {}) {
    super();
    this.raw = raw;
    this.peer = peer;
    this.spec = specOf(raw);
    this.maxBufferedAmount = options.maxBufferedAmount ?? 1 << 20;
    this.maxQueuedSends = options.maxQueuedSends ?? 256;
    this.maxQueuedBytes = options.maxQueuedBytes ?? 4 << 20;
    this.maxMessageSize = options.maxMessageSize ?? 65_536;
    this.closeDrainMs = options.closeDrainMs ?? CLOSE_DRAIN_MS;
    /** @type {{ data: Payload, bytes: number, done: () => void, fail: (e: Error) => void }[]} */
    this._queue = [];
    this.queuedBytes = 0;
    /** @type {(() => void)[]} */
    this._waiters = [];
    this._gone = false;
    /** close() was called: nothing more is taken; the queue goes, then the channel closes */
    this._closing = false;
    raw.binaryType = 'arraybuffer';
    raw.bufferedAmountLowThreshold = Math.floor(this.maxBufferedAmount / 4);
    raw.addEventListener('bufferedamountlow', () => this._drain());
    raw.addEventListener('message', (ev) => {
      const d = ev.data;
      this.emit('message', typeof d === 'string' ? d : new Uint8Array(d));
    });
    raw.addEventListener('open', () => this.emit('open', undefined));
    raw.addEventListener('close', () => this._closed());
    raw.addEventListener('error', () => this._closed());
  }

  get label() {
    return this.raw.label;
  }

  get isOpen() {
    return this.raw.readyState === 'open';
  }

  /** The channel has closed (not merely closing): nothing more will go. */
  get isGone() {
    return this._gone || this.raw.readyState === 'closed';
  }

  /** Closed, closing, or {@link Channel.close} was called. */
  get isClosed() {
    return this._closing || this.raw.readyState === 'closing' || this.raw.readyState === 'closed';
  }

  /** Bytes handed to the browser and not yet sent. */
  get bufferedAmount() {
    return this.raw.bufferedAmount;
  }

  /**
   * Queues `data`: resolves once it is handed to the browser. Rejects with
   * {@link ChannelOverflowError} when the queue is full (nothing queued),
   * `too_large` above the other side's maximum, `closed` on a closed channel.
   * On a reliable channel every message that resolves is delivered, in
   * order, unless the connection is lost.
   * @param {Payload} data
   * @returns {Promise<void>}
   */
  send(data) {
    try {
      const bytes = this._check(data);
      if (this._queue.length === 0 && this._takes(bytes)) {
        this.raw.send(/** @type {any} */ (data));
        return Promise.resolve();
      }
      this._fits(bytes);
      return new Promise((done, fail) => {
        this._queue.push({ data, bytes, done, fail });
        this.queuedBytes += bytes;
      });
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Sends now if the queue has room, else throws: the synchronous twin of
   * {@link Channel.send} (`try_send` in Rust).
   * @param {Payload} data
   */
  trySend(data) {
    const bytes = this._check(data);
    if (this._queue.length === 0 && this._takes(bytes)) {
      this.raw.send(/** @type {any} */ (data));
      return;
    }
    this._fits(bytes);
    this._queue.push({ data, bytes, done: () => {}, fail: () => {} });
    this.queuedBytes += bytes;
  }

  /**
   * Whether a message of `bytes` would be taken now (sent, or queued).
   * @param {number} bytes
   */
  fits(bytes) {
    return !this.isClosed && this._queue.length < this.maxQueuedSends && this.queuedBytes + bytes <= this.maxQueuedBytes;
  }

  /**
   * Resolves when a message of `bytes` would be queued (a producer that
   * must not drop waits here: backpressure).
   * @param {number} [bytes]
   * @returns {Promise<void>}
   */
  async ready(bytes = 0) {
    while (
      !this.isClosed &&
      (this._queue.length >= this.maxQueuedSends || this.queuedBytes + bytes > this.maxQueuedBytes)
    ) {
      await new Promise((r) => this._waiters.push(/** @type {() => void} */ (r)));
    }
    if (this.isClosed) throw new SendError('closed', `channel ${this.label} to ${this.peer} is closed`);
  }

  /**
   * Resolves when a message of `bytes` can be handed to the browser at once
   * (nothing queued, and room under `maxBufferedAmount`): a sender that
   * reuses one buffer for its messages waits here, then calls
   * {@link Channel.sendNow}.
   * @param {number} [bytes]
   * @returns {Promise<void>}
   */
  async room(bytes = 0) {
    while (!this.isClosed && !this._roomNow(bytes)) {
      await new Promise((r) => this._waiters.push(/** @type {() => void} */ (r)));
    }
    if (this.isClosed) throw new SendError('closed', `channel ${this.label} to ${this.peer} is closed`);
  }

  /**
   * Hands `data` to the browser now, which copies it (the caller may reuse
   * the buffer), and returns true; false if it would have to be queued
   * (nothing is queued then). Throws as {@link Channel.trySend} does for a
   * closed channel or a message too large.
   * @param {Payload} data
   */
  sendNow(data) {
    const bytes = this._check(data);
    if (!this._roomNow(bytes)) return false;
    this.raw.send(/** @type {any} */ (data));
    return true;
  }

  /** @param {number} bytes */
  _roomNow(bytes) {
    return this._queue.length === 0 && this._takes(bytes);
  }

  /**
   * Whether the browser takes `bytes` more now: within `maxBufferedAmount`,
   * or whatever the size once its buffer is down to the low threshold. The
   * `bufferedamountlow` event that moves the queue fires only as the buffer
   * falls to that threshold, so a message larger than the room left there
   * must go then: it would otherwise wait for an event that never comes.
   * @param {number} bytes
   */
  _takes(bytes) {
    const held = this.raw.bufferedAmount;
    return held <= this.raw.bufferedAmountLowThreshold || held + bytes <= this.maxBufferedAmount;
  }

  /** Resolves when everything queued has been handed to the browser. */
  async flush() {
    while (this._queue.length > 0 && !this.isClosed) {
      await new Promise((r) => this._waiters.push(/** @type {() => void} */ (r)));
    }
  }

  /** @param {Payload} data */
  _check(data) {
    if (this.isClosed) throw new SendError('closed', `channel ${this.label} to ${this.peer} is closed`);
    const bytes = size(data);
    if (bytes > this.maxMessageSize) {
      throw new SendError('too_large', `message of ${bytes} bytes exceeds the negotiated maximum of ${this.maxMessageSize}`);
    }
    return bytes;
  }

  /** @param {number} bytes */
  _fits(bytes) {
    if (this._queue.length >= this.maxQueuedSends || this.queuedBytes + bytes > this.maxQueuedBytes) {
      throw new ChannelOverflowError(
        `send queue full: ${this._queue.length} messages, ${this.queuedBytes} bytes queued (at most ${this.maxQueuedSends}, ${this.maxQueuedBytes})`,
      );
    }
  }

  _drain() {
    while (this._queue.length > 0 && this.raw.readyState === 'open') {
      const next = this._queue[0];
      if (!this._takes(next.bytes)) break;
      this._queue.shift();
      this.queuedBytes -= next.bytes;
      try {
        this.raw.send(/** @type {any} */ (next.data));
        next.done();
      } catch (e) {
        next.fail(e instanceof Error ? e : new Error(String(e)));
      }
    }
    if (this._closing && this._queue.length === 0 && this.raw.readyState === 'open') this.raw.close();
    this._wake();
  }

  _wake() {
    const waiters = this._waiters.splice(0);
    for (const w of waiters) w();
  }

  _closed() {
    if (this._gone) return;
    this._gone = true;
    const queued = this._queue.splice(0);
    this.queuedBytes = 0;
    for (const q of queued) q.fail(new SendError('closed', `channel ${this.label} to ${this.peer} closed`));
    this._wake();
    this.emit('close', undefined);
  }

  /**
   * Closes the channel at both ends, as the native `DataChannel::close`:
   * sends are refused from now on (`closed`), messages already queued
   * still go (the browser sends what it took before it closes), and then
   * the channel closes; `close` fires once it has.
   */
  close() {
    if (this._closing) return;
    this._closing = true;
    this._wake();
    if (this._queue.length === 0 || this.raw.readyState !== 'open') {
      this.raw.close();
      return;
    }
    // A peer that reads nothing more must not keep it open for ever.
    const t = setTimeout(() => this.raw.close(), this.closeDrainMs);
    const off = this.on('close', () => {
      clearTimeout(t);
      off();
    });
  }
}
