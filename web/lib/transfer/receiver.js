// The receiving side (Rust: crates/transfer/src/receiver.rs): checks and
// accepts a manifest, then drives: asks for hashes and chunks within a
// window, verifies every chunk, and tells its driver what to write.
//
// One difference from the Rust engine, for browsers: a complete chunk is
// handed out as a `verify` output, and the driver reports its SHA-256 with
// chunkHashed() (WebCrypto's digest is asynchronous and ten times faster
// than hashing in JavaScript). A driver that hashes synchronously calls
// chunkHashed() at once. Chunks being verified count against the window
// and the write slots like chunks in flight.

import { ProtocolError, ManifestError } from './errors.js';
import { Manifest, validChunkSize, PROTOCOL_VERSION } from './manifest.js';
import { parseCtl, decodeFrame, HASHES_PER_MESSAGE } from './wire.js';
import { fileHash, hashesFromHex } from './hash.js';
import { equalBytes } from '../bytes.js';

/** How far ahead of the data (chunks past the first one missing) hashes are asked for: 64 pages. */
export const HASHES_AHEAD_OF_DATA = 64 * HASHES_PER_MESSAGE;

/** Most ranges in one `want`. */
const MAX_RANGES_PER_WANT = 2048;

/**
 * The receiver's limits (`ReceiverConfig` in Rust).
 * @typedef {object} ReceiverConfig
 * @property {number} windowBytes     bytes asked for and not yet written (16 MiB)
 * @property {number} hashPagesAhead  `get_hashes` in flight (32)
 * @property {number} maxEntries      manifest entries accepted (1,000,000)
 * @property {number} maxTotalBytes   bytes a manifest may announce (1 TiB)
 * @property {number} maxPathBytes    bytes of paths a manifest may carry, all entries together (64 MiB)
 * @property {number} maxChunkAttempts failures of one chunk that cancel (3)
 * @property {number} maxPendingWrites chunks asked for and not yet written (256)
 * @property {number} maxFilesInFlight files started and not finished (64)
 */

/** @type {ReceiverConfig} */
export const DEFAULT_RECEIVER_CONFIG = Object.freeze({
  windowBytes: 16 << 20,
  hashPagesAhead: 32,
  maxEntries: 1_000_000,
  maxTotalBytes: 2 ** 40,
  maxPathBytes: 64 * 2 ** 20,
  maxChunkAttempts: 3,
  maxPendingWrites: 256,
  maxFilesInFlight: 64,
});

/** @typedef {import('./wire.js').Ctl} Ctl */
/** @typedef {import('./wire.js').CancelCode} CancelCode */

/**
 * @typedef {{ type: 'ctl', msg: Ctl }
 *   | { type: 'prepare', file: number }
 *   | { type: 'create_dir', entry: number }
 *   | { type: 'verify', file: number, chunk: number, data: Uint8Array }
 *   | { type: 'write', file: number, chunk: number, offset: number, data: Uint8Array }
 *   | { type: 'finish', file: number, hash: Uint8Array }
 *   | { type: 'offered' }
 *   | { type: 'resumed' }
 *   | { type: 'chunk_corrupt', file: number, chunk: number, attempt: number }
 *   | { type: 'file_done', file: number, hash: Uint8Array }
 *   | { type: 'text', file: number, text: string }
 *   | { type: 'complete' }
 *   | { type: 'cancelled', code: CancelCode, reason: string, byPeer: boolean }} ReceiverOutput
 */

const PHASES = { idle: 'waiting for a manifest', collecting: 'receiving a manifest', offered: 'waiting for the user to accept', transferring: 'transferring', complete: 'complete', declined: 'declined', cancelled: 'cancelled' };
/** @typedef {keyof typeof PHASES} PhaseName */

/** @param {number} size @param {number} chunkSize @param {number} chunk */
const chunkLen = (size, chunkSize, chunk) => Math.max(0, Math.min(chunkSize, size - chunk * chunkSize));

class Active {
  /** @param {number} size @param {number} chunks @param {boolean} text */
  constructor(size, chunks, text) {
    this.size = size;
    this.chunks = chunks;
    this.text = text;
    /** @type {'preparing' | 'transferring' | 'finishing'} `prepare` is handed out at once; hashes are asked for meanwhile */
    this.stage = 'preparing';
    /** @type {Uint8Array[]} */
    this.hashes = [];
    this.asked = 0;
    /** hashes received this session; only chunks below it are asked for, so data moves once the first page is in */
    this.confirmed = 0;
    /** @type {(Uint8Array | null)[]} chunks found on disk by `partialScanned`, until every hash is known */
    this.onDisk = [];
    this.have = new Uint8Array(chunks);
    this.busy = new Uint8Array(chunks);
    this.haveCount = 0;
    this.haveBytes = 0;
    this.busyBytes = 0;
    this.cursor = 0;
    /** @type {Map<number, number>} */
    this.attempts = new Map();
    /** @type {Uint8Array | null} */
    this.textBuf = null;
    this.fileHash = new Uint8Array(32);
  }

  /**
   * Counts `chunk` as had if the copy found on disk matches its hash.
   * @param {number} chunk @param {number} len @param {Transfer} t
   */
  takeFromDisk(chunk, len, t) {
    const found = this.onDisk[chunk];
    const hash = this.hashes[chunk];
    if (found && hash && equalBytes(found, hash) && !this.have[chunk] && !this.busy[chunk]) {
      this.have[chunk] = 1;
      this.haveCount += 1;
      this.haveBytes += len;
      t.bytesDone += len;
      t.bytesResumed += len;
    }
  }

  remaining() {
    return Math.max(0, this.size - (this.haveBytes + this.busyBytes));
  }
}

const key = (/** @type {number} */ f, /** @type {number} */ c) => `${f}:${c}`;

class Transfer {
  /** @param {Manifest} manifest */
  constructor(manifest) {
    this.manifest = manifest;
    this.nextFile = 0;
    /** @type {Map<number, Active>} ordered by insertion = file order */
    this.active = new Map();
    this.filesDone = 0;
    this.nextDir = 0;
    /** @type {[number, number][]} */
    this.hashRequests = [];
    /** @type {{ file: number, chunk: number, offset: number, len: number }[]} */
    this.requested = [];
    /** @type {Uint8Array | null} the chunk being assembled (its frames copied in once) */
    this.assembling = null;
    this.assembled = 0;
    /** @type {Map<string, { file: number, chunk: number, offset: number, data: Uint8Array }>} complete chunks waiting for their hash */
    this.verifying = new Map();
    /** @type {Map<string, number>} */
    this.pendingWrites = new Map();
    this.wantedBytes = 0;
    this.unwrittenBytes = 0;
    this.bytesDone = 0;
    this.bytesResumed = 0;
    this.corruptChunks = 0;
  }

  takeDir() {
    while (this.nextDir < this.manifest.entries.length) {
      const i = this.nextDir++;
      if (this.manifest.entries[i].kind === 'dir') return i;
    }
    return null;
  }

  resetSession() {
    for (const r of this.requested.splice(0)) {
      const a = this.active.get(r.file);
      if (a) {
        a.busy[r.chunk] = 0;
        a.busyBytes -= r.len;
        a.cursor = Math.min(a.cursor, r.chunk);
      }
      this.unwrittenBytes -= r.len;
    }
    this.wantedBytes = 0;
    this.assembling = null;
    this.assembled = 0;
    this.hashRequests = [];
    for (const a of this.active.values()) {
      // A file with every chunk has nothing to fetch; any other asks for
      // its hashes again, which also checks the sender's file is the same.
      a.asked = a.confirmed = a.haveCount === a.chunks ? a.chunks : 0;
    }
  }

  /** @param {ReceiverConfig} config @param {ReceiverOutput[]} out */
  pump(config, out) {
    this.startFiles(config, out);
    this.askHashes(config, out);
    this.askChunks(config, out);
    // Asking for chunks moves each file's cursor past what is on disk:
    // hashes further ahead may be due now, and nothing else would ask.
    this.askHashes(config, out);
  }

  /** @param {ReceiverConfig} config @param {ReceiverOutput[]} out */
  startFiles(config, out) {
    const ahead = () => [...this.active.values()].reduce((n, a) => n + a.remaining(), 0);
    while (this.nextFile < this.manifest.fileCount && this.active.size < Math.max(config.maxFilesInFlight, 1) && ahead() < Math.max(config.windowBytes, 1)) {
      const file = this.nextFile++;
      const e = this.manifest.file(file);
      const chunks = this.manifest.chunkCount(file);
      if (!e || chunks === undefined) continue;
      const a = new Active(e.size, chunks, e.kind === 'text');
      this.active.set(file, a);
      if (a.text) {
        a.stage = 'transferring'; // kept in memory: nothing on disk to prepare
        this.maybeFinish(file, out);
      } else out.push({ type: 'prepare', file });
    }
  }

  /** @param {ReceiverConfig} config @param {ReceiverOutput[]} out */
  askHashes(config, out) {
    for (const [file, a] of this.active) {
      // No further ahead of the data than HASHES_AHEAD_OF_DATA: the hashes
      // kept grow with what arrived, not with what the sender claims.
      while (
        this.hashRequests.length < Math.max(config.hashPagesAhead, 1) &&
        a.asked < a.chunks &&
        a.asked < a.cursor + HASHES_AHEAD_OF_DATA
      ) {
        const from = a.asked;
        a.asked += Math.min(a.chunks - from, HASHES_PER_MESSAGE);
        this.hashRequests.push([file, from]);
        out.push({ type: 'ctl', msg: { type: 'get_hashes', file, from } });
      }
    }
  }

  /** @param {ReceiverConfig} config @param {ReceiverOutput[]} out */
  askChunks(config, out) {
    const chunkSize = this.manifest.chunkSize;
    for (const [file, a] of this.active) {
      if (a.stage !== 'transferring') continue;
      /** @type {[number, number][]} */
      let ranges = [];
      const flush = () => {
        if (ranges.length) out.push({ type: 'ctl', msg: { type: 'want', file, ranges } });
        ranges = [];
      };
      for (;;) {
        while (a.cursor < a.confirmed && (a.have[a.cursor] || a.busy[a.cursor])) a.cursor++;
        if (a.cursor >= a.confirmed) break; // the rest waits for its hashes
        const chunk = a.cursor;
        const len = chunkLen(a.size, chunkSize, chunk);
        const slots = this.requested.length + this.pendingWrites.size + this.verifying.size;
        const fits = this.unwrittenBytes === 0 || this.unwrittenBytes + len <= config.windowBytes;
        if (slots >= Math.max(config.maxPendingWrites, 1) || !fits) {
          flush();
          return;
        }
        a.busy[chunk] = 1;
        a.busyBytes += len;
        this.wantedBytes += len;
        this.unwrittenBytes += len;
        this.requested.push({ file, chunk, offset: chunk * chunkSize, len });
        const last = ranges[ranges.length - 1];
        if (last && last[1] === chunk) last[1] += 1;
        else ranges.push([chunk, chunk + 1]);
        if (ranges.length === MAX_RANGES_PER_WANT) flush();
      }
      flush();
    }
  }

  /** @param {number} file @param {number} from @param {string} hex @param {ReceiverOutput[]} out */
  onHashes(file, from, hex, out) {
    const expected = this.hashRequests[0];
    if (!expected || expected[0] !== file || expected[1] !== from) {
      throw new ProtocolError('unasked_hashes', `\`hashes\` for file ${file} from ${from} was not asked for (expected ${expected ? expected.join(', ') : 'none'})`);
    }
    this.hashRequests.shift();
    const chunks = this.manifest.chunkCount(file) ?? 0;
    const count = Math.min(Math.max(chunks - from, 0), HASHES_PER_MESSAGE);
    const hashes = hashesFromHex(hex);
    if (hashes.length !== count) throw new ProtocolError('hash_count', `\`hashes\` for file ${file} from ${from} carries ${hashes.length} hashes, expected ${count}`);
    const a = this.active.get(file);
    if (!a) return;
    if (from !== a.confirmed) throw new ProtocolError('unasked_hashes', `\`hashes\` for file ${file} from ${from} was not asked for (expected ${file}, ${a.confirmed})`);
    hashes.forEach((h, i) => {
      const known = a.hashes[from + i];
      if (known && !equalBytes(known, h)) {
        throw new ProtocolError('changed', `file ${file} (${JSON.stringify(this.manifest.file(file)?.path ?? '')}) changed on the sender since the last session`);
      }
      if (!known) {
        a.hashes.push(h);
        if (a.stage === 'transferring') a.takeFromDisk(from + i, chunkLen(a.size, this.manifest.chunkSize, from + i), this);
      }
    });
    a.confirmed = from + count;
    if (a.hashes.length === a.chunks) a.onDisk = [];
    this.maybeFinish(file, out);
  }

  /** @param {number} file @param {number} offset @param {Uint8Array} payload @param {ReceiverOutput[]} out */
  onFrame(file, offset, payload, out) {
    const head = this.requested[0];
    if (!head) throw new ProtocolError('unasked_frame', `data frame for file ${file} at offset ${offset} was not asked for (expected none)`);
    const at = head.offset + this.assembled;
    if (file !== head.file || offset !== at) {
      throw new ProtocolError('unasked_frame', `data frame for file ${file} at offset ${offset} was not asked for (expected file ${head.file} at ${at})`);
    }
    if (payload.length > head.len - this.assembled) {
      throw new ProtocolError('frame_crosses_chunk', `data frame for file ${file} at offset ${offset} with ${payload.length} bytes crosses the end of its chunk`);
    }
    this.assembling ??= new Uint8Array(head.len);
    this.assembling.set(payload, this.assembled);
    this.assembled += payload.length;
    if (this.assembled < head.len) return;
    this.requested.shift();
    const data = this.assembling;
    this.assembling = null;
    this.assembled = 0;
    this.wantedBytes -= head.len;
    this.verifying.set(key(file, head.chunk), { file, chunk: head.chunk, offset: head.offset, data });
    out.push({ type: 'verify', file, chunk: head.chunk, data });
  }

  /**
   * @param {number} file @param {number} chunk @param {Uint8Array} hash
   * @param {ReceiverConfig} config @param {ReceiverOutput[]} out
   */
  onHashed(file, chunk, hash, config, out) {
    const v = this.verifying.get(key(file, chunk));
    if (!v) return;
    this.verifying.delete(key(file, chunk));
    const len = v.data.length;
    const a = this.active.get(file);
    if (!a) {
      this.unwrittenBytes -= len;
      return;
    }
    if (!a.hashes[chunk] || !equalBytes(a.hashes[chunk], hash)) {
      this.corruptChunks += 1;
      this.unwrittenBytes -= len;
      a.busy[chunk] = 0;
      a.busyBytes -= len;
      a.cursor = Math.min(a.cursor, chunk);
      const attempt = (a.attempts.get(chunk) ?? 0) + 1;
      a.attempts.set(chunk, attempt);
      out.push({ type: 'chunk_corrupt', file, chunk, attempt });
      if (attempt >= config.maxChunkAttempts) {
        throw new ProtocolError('chunk_retries', `chunk ${chunk} of file ${file} failed verification ${attempt} times`);
      }
      return;
    }
    if (a.text) {
      if (!a.textBuf) a.textBuf = new Uint8Array(a.size);
      a.textBuf.set(v.data, v.offset);
      this.unwrittenBytes -= len;
      a.busy[chunk] = 0;
      a.busyBytes -= len;
      if (!a.have[chunk]) {
        a.have[chunk] = 1;
        a.haveCount += 1;
        a.haveBytes += len;
        this.bytesDone += len;
      }
      this.maybeFinish(file, out);
      return;
    }
    this.pendingWrites.set(key(file, chunk), len);
    out.push({ type: 'write', file, chunk, offset: v.offset, data: v.data });
  }

  /** @param {number} file @param {ReceiverOutput[]} out */
  maybeFinish(file, out) {
    const a = this.active.get(file);
    if (!a || a.stage !== 'transferring' || a.haveCount !== a.chunks) return;
    a.fileHash = fileHash(a.size, this.manifest.chunkSize, a.hashes);
    if (a.text) {
      let text;
      try {
        text = new TextDecoder('utf-8', { fatal: true }).decode(a.textBuf ?? new Uint8Array(0));
      } catch {
        throw new ProtocolError('text_not_utf8', `text entry ${file} is not valid UTF-8`);
      }
      this.active.delete(file);
      this.filesDone += 1;
      out.push({ type: 'text', file, text });
      out.push({ type: 'file_done', file, hash: a.fileHash });
    } else {
      a.stage = 'finishing';
      out.push({ type: 'finish', file, hash: a.fileHash });
    }
  }
}

export class Receiver {
  /** @param {Partial<ReceiverConfig>} [config] */
  constructor(config = {}) {
    /** @type {ReceiverConfig} */
    this.config = { ...DEFAULT_RECEIVER_CONFIG, ...config };
    /** @type {PhaseName} */
    this.phase = 'idle';
    /** @type {{ chunkSize: number, entries: number, bytes: number, got: import('./manifest.js').Entry[], pathBytes: number } | null} */
    this.collecting = null;
    /** @type {Manifest | null} */
    this.offered = null;
    /** @type {Transfer | null} */
    this.transfer = null;
    /** @type {ReceiverOutput[]} */
    this.out = [];
    this.bytesReceivedSession = 0;
  }

  isFinal() {
    return this.phase === 'complete' || this.phase === 'declined' || this.phase === 'cancelled';
  }

  /** A new or reconnected sender: forget what was in flight; keep verified chunks. */
  startSession() {
    if (this.isFinal()) return;
    this.phase = 'idle';
    this.collecting = null;
    this.bytesReceivedSession = 0;
    this.out = this.out.filter((o) => o.type !== 'ctl');
    this.transfer?.resetSession();
  }

  /** @param {() => void} fn  runs fn, turning a protocol error into a cancel */
  _guard(fn) {
    try {
      fn();
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      if (!this.isFinal()) {
        const code = e.cancelCode();
        this._endCancelled();
        this.out.push({ type: 'ctl', msg: { type: 'cancel', code, reason: e.message } });
        this.out.push({ type: 'cancelled', code, reason: e.message, byPeer: false });
      }
      throw e;
    }
  }

  /** @param {string} text */
  handleCtlJson(text) {
    if (this.isFinal()) return;
    this._guard(() => {
      this._applyCtl(parseCtl(text));
      this._pump();
    });
  }

  /** @param {Ctl} msg */
  handleCtl(msg) {
    if (this.isFinal()) return;
    this._guard(() => {
      this._applyCtl(msg);
      this._pump();
    });
  }

  /** One data frame from the sender. @param {Uint8Array} frame */
  handleData(frame) {
    if (this.isFinal()) return;
    this._guard(() => {
      const [file, offset, payload] = decodeFrame(frame);
      if (this.phase !== 'transferring' || !this.transfer) {
        throw new ProtocolError('unexpected', `unexpected \`data frame\` while ${PHASES[this.phase]}`);
      }
      this.bytesReceivedSession += payload.length;
      this.transfer.onFrame(file, offset, payload, this.out);
      this._pump();
    });
  }

  /** The driver hashed a chunk handed out in `verify`. @param {number} file @param {number} chunk @param {Uint8Array} hash */
  chunkHashed(file, chunk, hash) {
    if (this.isFinal() || !this.transfer) return;
    const t = this.transfer;
    try {
      this._guard(() => {
        t.onHashed(file, chunk, hash, this.config, this.out);
        this._pump();
      });
    } catch {
      // Already a cancel for the peer and an event.
    }
  }

  accept() {
    if (this.phase !== 'offered' || !this.offered) return;
    this.transfer = new Transfer(this.offered);
    this.offered = null;
    this.phase = 'transferring';
    this.out.push({ type: 'ctl', msg: { type: 'accept' } });
    try { this._guard(() => this._pump()); } catch { /* cancelled */ }
  }

  /** @param {string} reason */
  decline(reason) {
    if (this.phase === 'offered') {
      this.phase = 'declined';
      this.out.push({ type: 'ctl', msg: { type: 'decline', reason } });
    }
  }

  /**
   * The driver hashed the complete chunks already in `file`'s partial file
   * (`onDisk[i]` is chunk i's hash, or null).
   * @param {number} file @param {(Uint8Array | null)[]} onDisk
   */
  partialScanned(file, onDisk) {
    if (this.isFinal() || !this.transfer) return;
    const t = this.transfer;
    const a = t.active.get(file);
    if (!a || a.stage !== 'preparing') return;
    a.onDisk = onDisk.slice(0, a.chunks);
    // Chunks whose hashes are in already; the rest as their hashes come.
    for (let chunk = 0; chunk < a.hashes.length; chunk++) a.takeFromDisk(chunk, chunkLen(a.size, t.manifest.chunkSize, chunk), t);
    if (a.hashes.length === a.chunks) a.onDisk = [];
    a.stage = 'transferring';
    try { this._guard(() => { t.maybeFinish(file, this.out); this._pump(); }); } catch { /* cancelled */ }
  }

  /** The driver wrote a chunk. @param {number} file @param {number} chunk */
  chunkWritten(file, chunk) {
    if (this.isFinal() || !this.transfer) return;
    const t = this.transfer;
    const len = t.pendingWrites.get(key(file, chunk));
    if (len === undefined) return;
    t.pendingWrites.delete(key(file, chunk));
    t.unwrittenBytes -= len;
    const a = t.active.get(file);
    if (a) {
      a.busy[chunk] = 0;
      a.busyBytes -= len;
      if (!a.have[chunk]) {
        a.have[chunk] = 1;
        a.haveCount += 1;
        a.haveBytes += len;
        t.bytesDone += len;
      }
    }
    try { this._guard(() => { t.maybeFinish(file, this.out); this._pump(); }); } catch { /* cancelled */ }
  }

  /** @param {number} file @param {boolean} diskFull @param {string} error */
  writeFailed(file, diskFull, error) {
    const path = this.manifest()?.file(file)?.path ?? `file ${file}`;
    this.cancel(diskFull ? 'disk_full' : 'io', `writing ${path}: ${error}`);
  }

  /** The driver flushed and finished `file`. @param {number} file */
  fileFinished(file) {
    if (this.isFinal() || !this.transfer) return;
    const t = this.transfer;
    const a = t.active.get(file);
    if (!a || a.stage !== 'finishing') return;
    t.active.delete(file);
    t.filesDone += 1;
    this.out.push({ type: 'file_done', file, hash: a.fileHash });
    try { this._guard(() => this._pump()); } catch { /* cancelled */ }
  }

  /** Ends the transfer from this side. @param {CancelCode} code @param {string} reason */
  cancel(code, reason) {
    if (this.isFinal()) return;
    this._endCancelled();
    this.out.push({ type: 'ctl', msg: { type: 'cancel', code, reason } });
    this.out.push({ type: 'cancelled', code, reason, byPeer: false });
  }

  /** The next thing to do, or null. @returns {ReceiverOutput | null} */
  poll() {
    const o = this.out.shift();
    if (o) return o;
    if (this.phase !== 'transferring' || !this.transfer) return null;
    const t = this.transfer;
    const dir = t.takeDir();
    if (dir !== null) return { type: 'create_dir', entry: dir };
    if (t.filesDone === t.manifest.fileCount) {
      this.phase = 'complete';
      this.out.push({ type: 'complete' });
      return { type: 'ctl', msg: { type: 'done', files: t.filesDone, bytes: t.manifest.totalBytes } };
    }
    return null;
  }

  progress() {
    const m = this.manifest();
    const t = this.transfer;
    return {
      filesTotal: m?.fileCount ?? 0,
      filesDone: t?.filesDone ?? 0,
      bytesTotal: m?.totalBytes ?? 0,
      bytesDone: t?.bytesDone ?? 0,
      bytesResumed: t?.bytesResumed ?? 0,
      bytesReceivedSession: this.bytesReceivedSession,
      corruptChunks: t?.corruptChunks ?? 0,
    };
  }

  /** What is outstanding: the quantities the limits bound. */
  inFlight() {
    const t = this.transfer;
    if (!t) return { wantedBytes: 0, unwrittenBytes: 0, unwrittenChunks: 0, pendingWrites: 0, files: 0, hashRequests: 0 };
    return {
      wantedBytes: t.wantedBytes,
      unwrittenBytes: t.unwrittenBytes,
      unwrittenChunks: t.requested.length + t.pendingWrites.size + t.verifying.size,
      pendingWrites: t.pendingWrites.size,
      files: t.active.size,
      hashRequests: t.hashRequests.length,
    };
  }

  /** The manifest offered or accepted, once complete and valid. */
  manifest() {
    return this.offered ?? this.transfer?.manifest ?? null;
  }

  /** @param {Ctl} msg */
  _applyCtl(msg) {
    const c = this.config;
    if (msg.type === 'cancel') {
      this._endCancelled();
      this.out.push({ type: 'cancelled', code: msg.code, reason: msg.reason, byPeer: true });
    } else if (msg.type === 'manifest' && this.phase === 'idle') {
      if (msg.version !== PROTOCOL_VERSION) throw new ProtocolError('version', `protocol version ${msg.version} is not supported (this side speaks ${PROTOCOL_VERSION})`);
      if (msg.entries > c.maxEntries) throw new ProtocolError('too_large', `manifest has ${msg.entries} entries, more than this receiver's limit of ${c.maxEntries}`);
      if (msg.bytes > c.maxTotalBytes) throw new ProtocolError('too_large', `manifest has ${msg.bytes} bytes, more than this receiver's limit of ${c.maxTotalBytes}`);
      if (!validChunkSize(msg.chunk_size)) throw ProtocolError.badManifest(new ManifestError('chunk_size', `chunk size ${msg.chunk_size} is not a power of two from 16 KiB to 16 MiB`));
      this.phase = 'collecting';
      this.collecting = { chunkSize: msg.chunk_size, entries: msg.entries, bytes: msg.bytes, got: [], pathBytes: 0 };
    } else if (msg.type === 'manifest_part' && this.phase === 'collecting' && this.collecting) {
      const total = this.collecting.got.length + msg.entries.length;
      if (total > this.collecting.entries) throw ProtocolError.badManifest(new ManifestError('entry_count', `manifest announced ${this.collecting.entries} entries but carried ${total}`));
      for (const e of msg.entries) this.collecting.pathBytes += new TextEncoder().encode(e.path).length;
      if (this.collecting.pathBytes > c.maxPathBytes) throw new ProtocolError('too_large', `manifest has ${this.collecting.pathBytes} bytes of paths, more than this receiver's limit of ${c.maxPathBytes}`);
      for (const e of msg.entries) this.collecting.got.push({ kind: /** @type {any} */ (e.kind), path: e.path, size: e.size ?? 0 });
    } else if (msg.type === 'manifest_end' && this.phase === 'collecting' && this.collecting) {
      const { chunkSize, entries, bytes, got } = this.collecting;
      this.collecting = null;
      if (got.length !== entries) throw ProtocolError.badManifest(new ManifestError('entry_count', `manifest announced ${entries} entries but carried ${got.length}`));
      let manifest;
      try {
        manifest = new Manifest(chunkSize, got);
      } catch (e) {
        throw ProtocolError.badManifest(/** @type {ManifestError} */ (e));
      }
      if (manifest.totalBytes !== bytes) throw ProtocolError.badManifest(new ManifestError('byte_count', `manifest announced ${bytes} bytes but its sizes add up to ${manifest.totalBytes}`));
      if (this.transfer && this.transfer.manifest.equals(manifest)) {
        this.phase = 'transferring';
        this.out.push({ type: 'resumed' });
        this.out.push({ type: 'ctl', msg: { type: 'accept' } });
      } else {
        this.transfer = null;
        this.offered = manifest;
        this.phase = 'offered';
        this.out.push({ type: 'offered' });
      }
    } else if (msg.type === 'hashes' && this.phase === 'transferring') {
      this.transfer?.onHashes(msg.file, msg.from, msg.hashes, this.out);
    } else {
      throw new ProtocolError('unexpected', `unexpected \`${msg.type}\` while ${PHASES[this.phase]}`);
    }
  }

  _pump() {
    if (this.phase === 'transferring' && this.transfer) this.transfer.pump(this.config, this.out);
  }

  _endCancelled() {
    this.phase = 'cancelled';
    this.out = this.out.filter((o) => o.type !== 'ctl');
  }
}
