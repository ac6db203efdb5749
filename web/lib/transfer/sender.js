// The sending side (Rust: crates/transfer/src/sender.rs): offers a
// manifest, answers `get_hashes` and `want`, and asks its driver to hash
// and read chunks. Without I/O: feed it control messages and results, and
// poll() until it returns null.

import { ProtocolError } from './errors.js';
import { ManifestCursor } from './manifest.js';
import { parseCtl, HASHES_PER_MESSAGE } from './wire.js';
import { hashesToHex } from './hash.js';

/** Most `get_hashes` queued; a receiver keeps a few in flight. */
export const MAX_QUEUED_HASH_REQUESTS = 4096;
/** Most `want` ranges queued. */
export const MAX_QUEUED_WANT_RANGES = 1 << 16;

/** @typedef {import('./wire.js').Ctl} Ctl */
/** @typedef {import('./wire.js').CancelCode} CancelCode */
/** @typedef {import('./manifest.js').Manifest} Manifest */

/**
 * @typedef {{ type: 'ctl', msg: Ctl }
 *   | { type: 'hash', file: number, from: number, count: number }
 *   | { type: 'send', file: number, chunk: number, offset: number, len: number, expected: Uint8Array }
 *   | { type: 'accepted' }
 *   | { type: 'declined', reason: string }
 *   | { type: 'finished' }
 *   | { type: 'cancelled', code: CancelCode, reason: string, byPeer: boolean }} SenderOutput
 * `hash`: read and hash chunks from..from+count, then hashesComputed (or readFailed).
 * `send`: read `len` bytes at `offset`, make sure they are the bytes whose
 * hash is `expected` (else cancel('changed'): the CLI hashes them again; a
 * browser's File cannot change without failing to read), send them as data
 * frames, in order.
 */

const STATES = { idle: 'no session has started', offering: 'waiting for accept or decline', accepted: 'sending', finished: 'finished', declined: 'declined', cancelled: 'cancelled' };
/** @typedef {keyof typeof STATES} State */

/** @param {SenderOutput} o */
const isEvent = (o) => o.type !== 'ctl' && o.type !== 'hash' && o.type !== 'send';

export class Sender {
  /** @param {Manifest} manifest */
  constructor(manifest) {
    this.manifest = manifest;
    /** @type {State} */
    this.state = 'idle';
    /** @type {ManifestCursor | null} */
    this.announce = null;
    /** @type {SenderOutput[]} */
    this.out = [];
    /** @type {[number, number][]} */
    this.hashJobs = [];
    this.hashJobsIssued = 0;
    /** @type {{ file: number, next: number, end: number }[]} */
    this.wants = [];
    /** @type {{ hashes: (Uint8Array | null)[], requested: Uint8Array }[]} */
    this.cache = Array.from({ length: manifest.fileCount }, () => ({ hashes: [], requested: new Uint8Array(0) }));
    this.stats = { chunksSent: 0, bytesSent: 0, bytesSentSession: 0 };
  }

  isFinal() {
    return this.state === 'finished' || this.state === 'declined' || this.state === 'cancelled';
  }

  /** A receiver (re)connected: announce again, forget the session's requests. */
  startSession() {
    if (this.isFinal()) return;
    for (const c of this.cache) c.requested.fill(0);
    this.state = 'offering';
    this.announce = new ManifestCursor();
    this.hashJobs = [];
    this.hashJobsIssued = 0;
    this.wants = [];
    this.out = this.out.filter(isEvent);
    this.stats.bytesSentSession = 0;
  }

  /** @param {string} text  a control message as received; throws on a protocol error (already cancelled) */
  handleCtlJson(text) {
    if (this.isFinal()) return;
    let msg;
    try {
      msg = parseCtl(text);
    } catch (e) {
      this._fail(/** @type {ProtocolError} */ (e));
      throw e;
    }
    this.handleCtl(msg);
  }

  /** @param {Ctl} msg */
  handleCtl(msg) {
    if (this.isFinal()) return;
    try {
      this._apply(msg);
    } catch (e) {
      if (e instanceof ProtocolError) this._fail(e);
      throw e;
    }
  }

  /** @param {Ctl} msg */
  _apply(msg) {
    const unexpected = () => new ProtocolError('unexpected', `unexpected \`${msg.type}\` while ${STATES[this.state]}`);
    if (msg.type === 'cancel') {
      this._end('cancelled');
      this.out.push({ type: 'cancelled', code: msg.code, reason: msg.reason, byPeer: true });
    } else if (msg.type === 'accept' && this.state === 'offering' && !this.announce) {
      this.state = 'accepted';
      this.out.push({ type: 'accepted' });
    } else if (msg.type === 'decline' && this.state === 'offering' && !this.announce) {
      this._end('declined');
      this.out.push({ type: 'declined', reason: msg.reason });
    } else if (msg.type === 'get_hashes' && this.state === 'accepted') {
      const chunks = this._chunks(msg.file);
      if (msg.from >= chunks) throw new ProtocolError('bad_range', `chunks ${msg.from}..${msg.from} of file ${msg.file} are not a valid range (the file has ${chunks} chunks)`);
      if (this.hashJobs.length >= MAX_QUEUED_HASH_REQUESTS) throw new ProtocolError('too_many_requests', `more than ${MAX_QUEUED_HASH_REQUESTS} get_hashes requests queued`);
      this.hashJobs.push([msg.file, msg.from]);
    } else if (msg.type === 'want' && this.state === 'accepted') {
      const chunks = this._chunks(msg.file);
      for (const [start, end] of msg.ranges) {
        if (start >= end || end > chunks) throw new ProtocolError('bad_range', `chunks ${start}..${end} of file ${msg.file} are not a valid range (the file has ${chunks} chunks)`);
      }
      if (this.wants.length + msg.ranges.length > MAX_QUEUED_WANT_RANGES) throw new ProtocolError('too_many_requests', `more than ${MAX_QUEUED_WANT_RANGES} want ranges queued`);
      for (const [start, end] of msg.ranges) this.wants.push({ file: msg.file, next: start, end });
    } else if (msg.type === 'done' && this.state === 'accepted') {
      const [files, bytes] = [this.manifest.fileCount, this.manifest.totalBytes];
      if (msg.files !== files || msg.bytes !== bytes) throw new ProtocolError('done_mismatch', `\`done\` says ${msg.files} files and ${msg.bytes} bytes, the manifest has ${files} and ${bytes}`);
      this._end('finished');
      this.out.push({ type: 'finished' });
    } else {
      throw unexpected();
    }
  }

  /**
   * The driver hashed chunks from..from+hashes.length of `file`.
   * @param {number} file @param {number} from @param {Uint8Array[]} hashes
   */
  hashesComputed(file, from, hashes) {
    const chunks = this.manifest.chunkCount(file);
    if (chunks === undefined || from + hashes.length > chunks) return;
    const c = this._cache(file);
    hashes.forEach((h, i) => {
      c.hashes[from + i] = h;
      c.requested[from + i] = 0;
    });
  }

  /** @param {number} file @param {string} error */
  readFailed(file, error) {
    this.cancel('io', `reading ${this.manifest.file(file)?.path ?? `file ${file}`}: ${error}`);
  }

  /** Ends the transfer from this side. @param {CancelCode} code @param {string} reason */
  cancel(code, reason) {
    if (this.isFinal()) return;
    const tell = this.state !== 'idle';
    this._end('cancelled');
    if (tell) this.out.push({ type: 'ctl', msg: { type: 'cancel', code, reason } });
    this.out.push({ type: 'cancelled', code, reason, byPeer: false });
  }

  /** The next thing to do, or null until more input arrives. @returns {SenderOutput | null} */
  poll() {
    const o = this.out.shift();
    if (o) return o;
    if (this.announce) {
      const msg = this.announce.next(this.manifest);
      if (msg) return { type: 'ctl', msg };
      this.announce = null;
    }
    if (this.state !== 'accepted') return null;
    const front = this.hashJobs[0];
    if (front) {
      const [file, from] = front;
      const count = this._pageLen(file, from);
      const hashes = this._cached(file, from, count);
      if (hashes) {
        this.hashJobs.shift();
        this.hashJobsIssued = Math.max(0, this.hashJobsIssued - 1);
        return { type: 'ctl', msg: { type: 'hashes', file, from, hashes: hashesToHex(hashes) } };
      }
    }
    while (this.hashJobsIssued < this.hashJobs.length) {
      const [file, from] = this.hashJobs[this.hashJobsIssued];
      this.hashJobsIssued += 1;
      const req = this._requestMissing(file, from, this._pageLen(file, from));
      if (req) return req;
    }
    while (this.wants.length) {
      const span = this.wants[0];
      if (span.next >= span.end) {
        this.wants.shift();
        continue;
      }
      const chunk = span.next;
      const expected = this.cache[span.file]?.hashes[chunk];
      if (!expected) return this._requestMissing(span.file, chunk, Math.min(span.end - chunk, HASHES_PER_MESSAGE));
      span.next += 1;
      const s = this.manifest.chunkSpan(span.file, chunk);
      if (!s) continue;
      const [offset, len] = s;
      this.stats.chunksSent += 1;
      this.stats.bytesSent += len;
      this.stats.bytesSentSession += len;
      return { type: 'send', file: span.file, chunk, offset, len, expected };
    }
    return null;
  }

  /** @param {number} file */
  _chunks(file) {
    const n = this.manifest.chunkCount(file);
    if (n === undefined) throw new ProtocolError('no_such_file', `file index ${file} is out of range (the manifest has ${this.manifest.fileCount} files)`);
    return n;
  }

  /** @param {number} file @param {number} from */
  _pageLen(file, from) {
    return Math.min(Math.max((this.manifest.chunkCount(file) ?? 0) - from, 0), HASHES_PER_MESSAGE);
  }

  /** @param {number} file */
  _cache(file) {
    const chunks = this.manifest.chunkCount(file) ?? 0;
    const c = this.cache[file];
    if (c.hashes.length === 0 && chunks > 0) {
      c.hashes = new Array(chunks).fill(null);
      c.requested = new Uint8Array(chunks);
    }
    return c;
  }

  /** @param {number} file @param {number} from @param {number} count */
  _cached(file, from, count) {
    const h = this.cache[file]?.hashes.slice(from, from + count);
    if (!h || h.length !== count || h.some((x) => !x)) return null;
    return /** @type {Uint8Array[]} */ (h);
  }

  /** @param {number} file @param {number} from @param {number} count @returns {SenderOutput | null} */
  _requestMissing(file, from, count) {
    const c = this._cache(file);
    const end = from + count;
    const wanted = (/** @type {number} */ at) => at < c.hashes.length && !c.hashes[at] && !c.requested[at];
    let start = from;
    while (start < end && !wanted(start)) start++;
    if (start === end) return null;
    let stop = start;
    while (stop < end && wanted(stop)) c.requested[stop++] = 1;
    return { type: 'hash', file, from: start, count: stop - start };
  }

  /** @param {State} state */
  _end(state) {
    this.state = state;
    this.announce = null;
    this.hashJobs = [];
    this.hashJobsIssued = 0;
    this.wants = [];
    this.out = this.out.filter(isEvent);
  }

  /** @param {ProtocolError} e */
  _fail(e) {
    const code = e.cancelCode();
    this._end('cancelled');
    this.out.push({ type: 'ctl', msg: { type: 'cancel', code, reason: e.message } });
    this.out.push({ type: 'cancelled', code, reason: e.message, byPeer: false });
  }
}
