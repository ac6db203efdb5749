// Send and receive by code in a browser: the pairing session (pair/session.js)
// over a Room, and the transfer engines (transfer/) over its two channels.
// The browser's twin of crates/cli/src/transfer/{link,send,receive}.rs: a
// browser and `peerlink send` / `peerlink receive` are interchangeable.
//
//   const tx = new SendTransfer({ server: location.origin, items: [{ path: 'a.txt', blob: file }] });
//   tx.on('code', ({ code }) => show(code));
//   await tx.run();            // resolves when the receiver has everything
//
// Files are read in slices (Blob.slice) and received files go to a sink
// (receive side) that writes them out as they arrive: nothing holds a whole
// file in memory.

import { Emitter } from './events.js';
import { Room } from './room.js';
import { reliable } from './channel.js';
import { Code } from './pair/code.js';
import { Session, abortText } from './pair/session.js';
import { parsePairMsg } from './pair/pake.js';
import { Sender } from './transfer/sender.js';
import { Receiver } from './transfer/receiver.js';
import { Manifest, fileEntry, dirEntry, textEntry, chunkSizeFor } from './transfer/manifest.js';
import { ctlJson, encodeFrameInto, FRAME_HEADER, CTL_LABEL, DATA_LABEL } from './transfer/wire.js';
import { chunkHashAsync, toHex } from './transfer/hash.js';

/** How long a peer may take to complete pairing (the CLI's default). */
export const PAIRING_TIMEOUT_MS = 60_000;
/** Largest data frame sent (header included); the CLI sends the same. */
const FRAME_MAX = 64 * 1024;
/** Messages a transfer channel keeps until its twin opens (the other side's first control messages). */
const MAX_EARLY_MESSAGES = 256;
/** Chunks a sender reads and checks ahead of its channel (memory: this many chunks). */
const READ_AHEAD = 4;
/** Most chunks hashed ahead of the receiver's requests (64 GiB of 1 MiB chunks), as `peerlink send` does. */
const AHEAD_CHUNKS = 1 << 16;
/** Chunks hashed ahead at a time: a request waits for at most this much hashing. */
const AHEAD_STEP = 16;

/** A first-come, first-served counting semaphore. */
class Slots {
  /** @param {number} n */
  constructor(n) {
    this.free = n;
    /** @type {(() => void)[]} */
    this.waiting = [];
  }

  /** @returns {Promise<void>} */
  take() {
    if (this.free > 0) {
      this.free--;
      return Promise.resolve();
    }
    return new Promise((r) => this.waiting.push(r));
  }

  give() {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }
}

/** @typedef {import('./pair/session.js').Abort} Abort */
/** @typedef {import('./channel.js').Channel} Channel */

/**
 * Why a transfer ended badly, in words for a person, and a code for code.
 * `wrong_code`, `tampered`, `timeout` (nobody paired in time), `declined`,
 * `cancelled` (the transfer engine's code is in `detail`), `failed`.
 */
export class TransferError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ byPeer?: boolean }} [opts]
   */
  constructor(code, message, opts = {}) {
    super(message);
    this.name = 'TransferError';
    this.code = code;
    this.byPeer = opts.byPeer ?? false;
  }
}

/**
 * @typedef {object} LinkEvents
 * @property {{ peer: string }} peer_seen
 * @property {{ peer: string }} paired
 * @property {{ ctl: Channel, data: Channel, peer: string }} open
 * @property {{ reason: string }} lost      the other side left or the connection broke; it may come back
 * @property {{ text: string }} notice
 * @property {{ error: TransferError }} ended
 */

/**
 * Pairs with whoever holds the same code in the code's room and opens the
 * transfer channels to it (docs/PAIRING.md). Reconnects are paired afresh.
 * @extends {Emitter<LinkEvents>}
 */
export class Link extends Emitter {
  /**
   * @param {{ server: string, code: Code, role: 'creator' | 'joiner', timeoutMs?: number,
   *   iceServers?: RTCIceServer[], RTCPeerConnection?: typeof RTCPeerConnection, WebSocket?: typeof WebSocket }} opts
   */
  constructor(opts) {
    super();
    this.role = opts.role;
    this.session = new Session(opts.role, opts.code, opts.timeoutMs ?? PAIRING_TIMEOUT_MS);
    this.room = new Room({
      server: opts.server,
      room: opts.code.room(),
      autoConnect: false,
      iceServers: opts.iceServers,
      RTCPeerConnection: opts.RTCPeerConnection,
      WebSocket: opts.WebSocket,
    });
    /** @type {Channel | null} */
    this.ctl = null;
    /** @type {Channel | null} */
    this.data = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    this.closed = false;
  }

  async start() {
    const r = this.room;
    r.on('peer_joined', ({ peer }) => this._step(() => this.session.peerJoined(peer, Date.now())));
    r.on('peer_left', ({ peer }) => this._step(() => this.session.peerLeft(peer, Date.now())));
    r.on('server_message', ({ from, data }) => {
      const msg = parsePairMsg(data);
      if (msg) this._step(() => this.session.handleMessage(from, msg, Date.now()));
    });
    r.on('channel_open', (ch) => {
      if (ch.peer !== this.session.paired) return;
      if (ch.label === CTL_LABEL) this.ctl = ch;
      if (ch.label === DATA_LABEL) this.data = ch;
      if (this.ctl && this.data && this.ctl.isOpen && this.data.isOpen) {
        this.emit('open', { ctl: this.ctl, data: this.data, peer: ch.peer });
      }
    });
    r.on('state', ({ peer, state }) => {
      if (peer !== this.session.paired || (state !== 'failed' && state !== 'closed')) return;
      if (state === 'closed') {
        // A member that leaves has its connection closed first: let
        // peer_left say so ("the other side left") if that is what happened.
        setTimeout(() => {
          if (this.session.paired !== peer || this.room.members.has(peer) === false) return;
          this.session.connectionLost(peer);
          this.ctl = this.data = null;
          this._step(() => {});
          this.emit('lost', { reason: 'the connection closed' });
        }, 0);
        return;
      }
      this.session.connectionLost(peer);
      this.ctl = this.data = null;
      this._step(() => {});
      this.emit('lost', { reason: 'no path found to the other side' });
    });
    r.on('auth_failed', ({ reason }) => this._step(() => this.session.abort({ code: 'tampered', detail: reason })));
    r.on('closed', ({ reason }) => this._step(() => this.session.abort({ code: 'failed', detail: `signaling: ${reason}` })));
    await r.join();
    this._step(() => {});
  }

  /** Runs `fn` on the session, then carries out what it asks. @param {() => void} fn */
  _step(fn) {
    if (this.closed) return;
    fn();
    for (let out = this.session.poll(); out; out = this.session.poll()) {
      switch (out.type) {
        case 'send':
          this.room.sendViaServer(out.to, out.msg);
          break;
        case 'connect': {
          this.room.disconnect(out.peer);
          this.ctl = this.data = null;
          // The joiner opens the channels and makes the offer; the creator
          // waits for it (two first offers crossing are a glare Chromium
          // does not always recover from).
          const joiner = this.role === 'joiner';
          const channels = joiner ? [reliable(CTL_LABEL), reliable(DATA_LABEL)] : [];
          this.room.connect(out.peer, { channels, keys: { local: out.keys.sdpLocal, remote: out.keys.sdpRemote }, offer: joiner });
          break;
        }
        case 'peer_seen':
          this.emit('peer_seen', { peer: out.peer });
          break;
        case 'paired':
          this.emit('paired', { peer: out.peer });
          break;
        case 'notice':
          this.emit('notice', { text: out.text });
          break;
        case 'peer_gone':
          this.ctl = this.data = null;
          this.emit('lost', { reason: 'the other side left' });
          break;
        case 'ended':
          this.emit('ended', { error: new TransferError(out.reason.code, endText(out.reason, out.byPeer), { byPeer: out.byPeer }) });
          break;
      }
    }
    if (this.timer) clearTimeout(this.timer);
    const at = this.session.timeout();
    this.timer = at === null ? null : setTimeout(() => this._step(() => this.session.handleTimeout(Date.now())), Math.max(0, at - Date.now()));
  }

  /** Gives up: the other side is told why (when paired or pairing). @param {Abort} reason */
  abort(reason) {
    this._step(() => this.session.abort(reason));
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    void this.room.leave();
  }
}

/** @param {Abort} a @param {boolean} byPeer */
function endText(a, byPeer) {
  if (a.code === 'wrong_code') return 'The codes do not match: check the code and try again (this code is used up; the sender needs a new one).';
  if (a.code === 'tampered') return `The connection was tampered with: ${a.detail}`;
  if (a.code === 'timeout') return 'Nobody with this code completed pairing in time.';
  return byPeer ? `The other side stopped: ${abortText(a)}` : abortText(a);
}

/**
 * The two channels of one transfer inside a room (`/room/NAME` file drop):
 * no pairing, the room is the trust scope. The sending side opens
 * `peerlink-xfer-ctl:ID` and `peerlink-xfer-data:ID` to `peer`; the
 * receiving side makes one from the first of them it sees.
 * @extends {Emitter<LinkEvents>}
 */
export class ChannelLink extends Emitter {
  /**
   * @param {Room} room
   * @param {string} peer
   * @param {string} id
   * @param {{ open?: boolean, first?: Channel }} [opts]  `open`: this side opens the channels
   */
  constructor(room, peer, id, opts = {}) {
    super();
    this.room = room;
    this.peer = peer;
    this.labels = [`${CTL_LABEL}:${id}`, `${DATA_LABEL}:${id}`];
    /** @type {(Channel | null)[]} */
    this.chans = [null, null];
    this.opener = opts.open ?? false;
    /** Whether anything came from the other side on this link's channels. */
    this.heard = false;
    /** @type {(() => void)[]} */
    this._offs = [];
    /** @type {Map<Channel, { early: unknown[], off: () => void }>} messages that came before both channels were here */
    this._early = new Map();
    if (opts.first) this._take(opts.first);
  }

  /** @param {Channel} ch */
  _take(ch) {
    const i = this.labels.indexOf(ch.label);
    if (ch.peer !== this.peer || i < 0) return;
    this.chans[i] = ch;
    ch.on('message', () => { this.heard = true; });
    ch.on('close', () => {
      if (this.chans[i] !== ch) return;
      // A peer that closes the channels unheard, its connection up, does
      // not take transfers (a terminal in the room: `peerlink chat`, `keep`).
      const up = this.room.conns.get(this.peer)?.state === 'connected';
      const what = !this.heard && up ? 'The other side closed the transfer without a word: it does not take files.' : 'The connection to the other side closed.';
      // After a `peer_left` of the same moment (its connection is closed
      // first), which says more.
      queueMicrotask(() => this.emit('ended', { error: new TransferError('failed', what, { byPeer: true }) }));
    });
    // The other side may start on one channel before this side saw the
    // other open (two SCTP streams, no order between them), and a browser
    // channel keeps no message for later: keep them (bounded) for whoever
    // listens once both are here.
    /** @type {unknown[]} */
    const early = [];
    const off = ch.on('message', (m) => { if (early.length < MAX_EARLY_MESSAGES) early.push(m); });
    this._early.set(ch, { early, off });
    const [ctl, data] = this.chans;
    if (ctl && data) {
      this.emit('open', { ctl, data, peer: this.peer });
      for (const c of [ctl, data]) {
        const kept = this._early.get(c);
        if (!kept) continue;
        this._early.delete(c);
        kept.off();
        for (const m of kept.early) c.emit('message', /** @type {any} */ (m));
      }
    }
  }

  async start() {
    this._offs.push(
      this.room.on('channel_open', (ch) => this._take(ch)),
      this.room.on('peer_left', (e) => {
        if (e.peer === this.peer) this.emit('ended', { error: new TransferError('failed', 'The other side left the room.', { byPeer: true }) });
      }),
    );
    if (this.opener) for (const label of this.labels) this.room.openChannel(this.peer, reliable(label));
    else {
      // The two channels may open in either order (DCEP messages on two
      // streams): take one that opened before this link existed.
      const open = this.room.conns.get(this.peer)?.channels;
      for (const label of this.labels) {
        const ch = open?.get(label);
        if (ch && !this.chans.includes(ch)) this._take(ch);
      }
    }
  }

  /** @param {Abort} _reason */
  abort(_reason) {
    this.close();
  }

  close() {
    for (const off of this._offs.splice(0)) off();
    const chans = this.chans;
    this.chans = [null, null];
    // Let what is queued go out before the channels close.
    setTimeout(() => { for (const c of chans) c?.close(); }, 1000);
  }
}

/**
 * @typedef {object} Progress
 * @property {number} bytesDone
 * @property {number} bytesTotal
 * @property {number} filesDone
 * @property {number} files
 * @property {number} rate     bytes per second over the last few seconds
 * @property {number | null} etaSeconds
 * @property {string} current  the file being sent or received now
 * @property {number} currentDone  its bytes sent (or verified and written)
 * @property {number} currentSize  its size
 */

class Meter {
  constructor() {
    /** @type {[number, number][]} */
    this.samples = [];
  }

  /** @param {number} bytes */
  rate(bytes) {
    const now = performance.now();
    this.samples.push([now, bytes]);
    while (this.samples.length > 2 && now - this.samples[0][0] > 3000) this.samples.shift();
    const [t0, b0] = this.samples[0];
    return now > t0 ? ((bytes - b0) * 1000) / (now - t0) : 0;
  }
}

/**
 * @typedef {object} TransferEvents
 * @property {{ code: string }} code
 * @property {{ peer: string }} peer_seen
 * @property {{}} paired
 * @property {{}} connected
 * @property {{ reason: string }} lost
 * @property {{ text: string }} notice
 * @property {{ manifest: Manifest }} offered
 * @property {Progress} progress
 * @property {{ file: number, path: string, hash: string }} file_done
 * @property {{ path: string, text: string }} text
 * @property {{ bytes: number, seconds: number }} done
 */

/**
 * An item to send: a file (any Blob), a folder, or a text message.
 * @typedef {{ path: string, blob: Blob } | { path: string, dir: true } | { path: string, text: string }} Item
 */

/**
 * Sends files to whoever types the code (`peerlink receive CODE` or a browser).
 * @extends {Emitter<TransferEvents>}
 */
export class SendTransfer extends Emitter {
  /**
   * @param {{ server: string, items: Item[], code?: Code, chunkSize?: number, timeoutMs?: number,
   *   iceServers?: RTCIceServer[], link?: Link | ChannelLink, hashAheadOnAccept?: boolean }} opts
   *   `hashAheadOnAccept`: hash ahead only once the receiver accepts (an offer
   *   in a room to several people, some of whom may never answer), not
   *   while the code waits to be typed
   */
  constructor(opts) {
    super();
    this.opts = opts;
    this.code = opts.code ?? Code.generate();
    /** @type {Blob[]} source of each file index */
    this.sources = [];
    const entries = opts.items.map((it) => {
      if ('dir' in it) return dirEntry(it.path);
      if ('text' in it) {
        const blob = new Blob([it.text]);
        this.sources.push(blob);
        return textEntry(it.path, blob.size);
      }
      this.sources.push(it.blob);
      return fileEntry(it.path, it.blob.size);
    });
    const largest = entries.reduce((m, e) => Math.max(m, e.size), 0);
    const chunkSize = opts.chunkSize ?? chunkSizeFor(largest);
    if (chunkSize === undefined) throw new Error(`cannot send a file of ${largest} bytes: at most 64 TiB`);
    this.manifest = new Manifest(chunkSize, entries);
    this.sender = new Sender(this.manifest);
    this.meter = new Meter();
    this.startedAt = 0;
    this.current = '';
    this.currentIndex = 0;
    /** @type {Map<number, number>} bytes sent of each file (this session and before) */
    this.fileSent = new Map();
  }

  /** The link a receiving browser opens (`/r#CODE`; the fragment never reaches the server). */
  link(origin = globalThis.location?.origin ?? this.opts.server) {
    return `${origin.replace(/\/$/, '')}/r#${this.code}`;
  }

  /** Pairs, sends, and resolves when the receiver has verified everything; rejects with {@link TransferError}. */
  run() {
    return new Promise((resolve, reject) => {
      const link = this.opts.link ?? new Link({ server: this.opts.server, code: this.code, role: 'creator', timeoutMs: this.opts.timeoutMs, iceServers: this.opts.iceServers });
      this.linkObj = link;
      /** @type {Channel | null} */
      let ctl = null;
      /** @type {Channel | null} */
      let data = null;
      // Two lines of work: hashing what the receiver asks about, and
      // sending. Chunks to send are read and checked up to READ_AHEAD ahead
      // of the channel (so it never waits on the disk), and sent in order.
      let hashing = Promise.resolve();
      let sending = Promise.resolve();
      const slots = new Slots(READ_AHEAD);
      /** @type {Uint8Array | null} */
      let frameBuf = null;
      let session = 0;
      let ended = false;
      // Hashing ahead, between the receiver's requests, from now on (as
      // `peerlink send` does): when the receiver asks, the first pages are
      // known. `prefix[f]`: file f's chunks below it were hashed ahead.
      const counts = Array.from({ length: this.manifest.fileCount }, (_, f) => this.manifest.chunkCount(f) ?? 0);
      const prefix = counts.map(() => 0);
      const ahead = { file: 0, next: 0, budget: AHEAD_CHUNKS };
      let requests = 0;
      let mayHashAhead = !this.opts.hashAheadOnAccept;
      const hashAhead = () => {
        if (!mayHashAhead || ended || requests > 0 || this.sender.isFinal()) return;
        while (ahead.file < counts.length && ahead.next >= counts[ahead.file]) { ahead.file++; ahead.next = 0; }
        if (ahead.file === counts.length || ahead.budget <= 0) return;
        const file = ahead.file;
        const from = ahead.next;
        const count = Math.min(counts[file] - from, AHEAD_STEP, ahead.budget);
        ahead.budget -= count;
        hashing = hashing.then(async () => {
          try {
            const hashes = [];
            for (let c = from; c < from + count; c++) hashes.push(await chunkHashAsync(await this._read(file, c)));
            this.sender.hashesComputed(file, from, hashes);
            ahead.next = prefix[file] = from + count;
            pump();
          } catch {
            ahead.next = counts[file]; // unreadable now: left to the request that needs it
          }
        }).then(hashAhead);
      };
      const finish = (/** @type {Error | null} */ err) => {
        if (ended) return;
        ended = true;
        link.close();
        if (err) reject(err);
        else resolve(undefined);
      };
      const pump = () => {
        for (let o = this.sender.poll(); o; o = this.sender.poll()) {
          const out = o;
          const mine = session;
          switch (out.type) {
            case 'ctl':
              ctl?.send(ctlJson(out.msg)).catch(() => {});
              break;
            case 'hash':
              requests++;
              hashing = hashing.then(async () => {
                if (mine !== session) return;
                // What was hashed ahead is known already: only the rest.
                const end = out.from + out.count;
                const from = Math.max(out.from, prefix[out.file]);
                const hashes = [];
                for (let c = from; c < end; c++) hashes.push(await chunkHashAsync(await this._read(out.file, c)));
                if (mine === session && hashes.length) this.sender.hashesComputed(out.file, from, hashes);
                // A request that continues what was hashed ahead: ahead goes on after it.
                if (out.file === ahead.file && out.from <= prefix[out.file]) {
                  prefix[out.file] = Math.max(prefix[out.file], end);
                  ahead.next = Math.max(ahead.next, prefix[out.file]);
                }
                pump();
              }).catch((e) => {
                if (mine !== session) return;
                this._readFailed(out.file, e);
                pump();
              }).finally(() => {
                requests--;
                hashAhead();
              });
              break;
            case 'send': {
              // Read now (within the read-ahead), send in turn. A Blob's
              // bytes cannot change (a File whose file changed on disk
              // fails to read, NotReadableError: 'changed' below), so the
              // hash the receiver has from the 'hash' step still holds:
              // no second hash, unlike the CLI reading a live file.
              // A read that fails resolves to its error, kept apart from the
              // channel's own errors (which the link reports and recovers).
              const prepared = slots.take().then(async () => {
                if (mine !== session) return null;
                return this._read(out.file, out.chunk).catch((e) => ({ readError: e }));
              });
              sending = sending.then(async () => {
                try {
                  const bytes = await prepared;
                  if (mine !== session || !data || bytes === null) return;
                  if ('readError' in bytes) {
                    this._readFailed(out.file, bytes.readError);
                    pump();
                    return;
                  }
                  this.current = this.manifest.file(out.file)?.path ?? '';
                  this.currentIndex = out.file;
                  // One buffer for every frame: the browser copies a
                  // message when it is handed over (sendNow), so a frame
                  // costs no allocation.
                  const max = Math.min(FRAME_MAX, data.maxMessageSize);
                  const maxPayload = Math.max(max - FRAME_HEADER, 1);
                  if (!frameBuf || frameBuf.length < FRAME_HEADER + maxPayload) frameBuf = new Uint8Array(FRAME_HEADER + maxPayload);
                  for (let at = 0; at < bytes.length; at += maxPayload) {
                    const frame = encodeFrameInto(frameBuf, out.file, out.offset + at, bytes.subarray(at, Math.min(at + maxPayload, bytes.length)));
                    /** @type {Channel | null} */
                    const ch = data;
                    if (mine !== session || !ch) return;
                    await ch.room(frame.byteLength);
                    if (mine !== session || data !== ch) return;
                    if (!ch.sendNow(frame)) await ch.send(frame.slice());
                  }
                  this.fileSent.set(out.file, (this.fileSent.get(out.file) ?? 0) + out.len);
                  this._progress();
                } finally {
                  slots.give();
                }
              }).catch(() => { /* the channel closed: the link reports it */ });
              break;
            }
            case 'accepted':
              this.startedAt = performance.now();
              if (!mayHashAhead) {
                mayHashAhead = true;
                hashAhead();
              }
              break;
            case 'declined':
              finish(new TransferError('declined', `The receiver declined: ${out.reason}`, { byPeer: true }));
              break;
            case 'finished':
              this._progress();
              this.emit('done', { bytes: this.manifest.totalBytes, seconds: (performance.now() - this.startedAt) / 1000 });
              // Give the last control messages a moment to leave.
              ctl?.flush().finally(() => setTimeout(() => finish(null), 200));
              break;
            case 'cancelled':
              finish(new TransferError('cancelled', out.byPeer ? `The receiver stopped: ${out.reason}` : out.reason, { byPeer: out.byPeer }));
              break;
          }
        }
      };
      /** @type {(() => void) | null} */
      this._pump = pump;
      link.on('peer_seen', (e) => this.emit('peer_seen', e));
      link.on('paired', () => this.emit('paired', {}));
      link.on('notice', (e) => this.emit('notice', e));
      link.on('lost', (e) => {
        session++;
        ctl = data = null;
        if (!ended && !this.sender.isFinal()) this.emit('lost', e);
      });
      link.on('ended', ({ error }) => finish(error));
      link.on('open', (o) => {
        session++;
        ctl = o.ctl;
        data = o.data;
        ctl.on('message', (m) => {
          if (typeof m !== 'string') return;
          try {
            this.sender.handleCtlJson(m);
          } catch {
            // The engine cancelled; its output says why.
          }
          pump();
        });
        this.emit('connected', {});
        this.sender.startSession();
        pump();
      });
      this.emit('code', { code: this.code.toString() });
      hashAhead();
      link.start().catch((e) => finish(new TransferError('failed', `Cannot reach the server: ${e.message ?? e}`)));
    });
  }

  /**
   * A source that could not be read: one whose file changed on disk since
   * it was picked (the browser refuses to read it: NotReadableError) is
   * 'changed', as the CLI says of a file rewritten while it is sent.
   * @param {number} file @param {unknown} e
   */
  _readFailed(file, e) {
    if (e instanceof DOMException && e.name === 'NotReadableError') {
      this.sender.cancel('changed', `${this.manifest.file(file)?.path} changed while it was being sent`);
    } else {
      this.sender.readFailed(file, String(e));
    }
  }

  /** @param {number} file @param {number} chunk */
  async _read(file, chunk) {
    const [off, len] = this.manifest.chunkSpan(file, chunk) ?? [0, 0];
    return new Uint8Array(await this.sources[file].slice(off, off + len).arrayBuffer());
  }

  _progress() {
    const bytesDone = this.sender.stats.bytesSent;
    const total = this.manifest.totalBytes;
    const rate = this.meter.rate(bytesDone);
    this.emit('progress', {
      bytesDone,
      bytesTotal: total,
      filesDone: this.currentIndex,
      files: this.manifest.fileCount,
      rate,
      etaSeconds: rate > 0 ? (total - bytesDone) / rate : null,
      current: this.current,
      currentDone: Math.min(this.fileSent.get(this.currentIndex) ?? 0, this.manifest.file(this.currentIndex)?.size ?? 0),
      currentSize: this.manifest.file(this.currentIndex)?.size ?? 0,
    });
  }

  /** Stops: the receiver is told, and `run()` rejects with `cancelled`. */
  cancel(reason = 'the sender cancelled') {
    this.sender.cancel('user', reason);
    this._pump?.();
    this.linkObj?.abort({ code: 'failed', detail: reason });
  }
}

/**
 * Where received files go. `open` is called for one file at a time, in
 * manifest order; `write`s come in order of offset; `close` after the
 * last byte (its hash verified), `abort` if the transfer ends first.
 * @typedef {object} Sink
 * @property {(path: string, size: number) => Promise<FileWriter>} open
 * @property {(path: string) => Promise<void>} [dir]  a folder entry (empty folders)
 */
/**
 * @typedef {object} FileWriter
 * @property {(data: Uint8Array) => Promise<void>} write   resolves when the bytes are taken (backpressure); it may keep or detach `data`
 * @property {() => Promise<void>} close
 * @property {(reason: string) => Promise<void>} abort
 */

/** What a decline without a reason tells the sender. */
const DEFAULT_DECLINE = 'the receiver said no';

/**
 * Receives what the code's sender offers into a {@link Sink}.
 * `accept()` after `offered` (or pass `autoAccept`).
 * @extends {Emitter<TransferEvents>}
 */
export class ReceiveTransfer extends Emitter {
  /**
   * @param {{ server: string, code?: string | Code, sink: Sink, autoAccept?: boolean, timeoutMs?: number,
   *   iceServers?: RTCIceServer[], windowBytes?: number, link?: Link | ChannelLink }} opts
   */
  constructor(opts) {
    super();
    this.opts = opts;
    this.code = typeof opts.code === 'string' ? Code.parse(opts.code) : (opts.code ?? null);
    // One file at a time, in order: a download stream cannot seek.
    this.receiver = new Receiver({ maxFilesInFlight: 1, ...(opts.windowBytes ? { windowBytes: opts.windowBytes } : {}) });
    this.meter = new Meter();
    /** @type {Map<number, { writer: FileWriter, next: number, held: Map<number, { chunk: number, data: Uint8Array }>, opened: Promise<void> }>} */
    this.files = new Map();
    this.startedAt = 0;
    this.filesDone = 0;
    this.current = '';
    this.currentFile = -1;
    this.currentSize = 0;
    /** @type {(() => void) | null} */
    this._accept = null;
    /** Whether `run()` has settled. */
    this.ended = false;
    this.declineReason = DEFAULT_DECLINE;
  }

  /** Takes the offer (after `offered`); does nothing once the transfer has ended. */
  accept() {
    if (this.ended) return;
    this.receiver.accept();
    this._accept?.();
  }

  /** Says no to the offer. @param {string} [reason] */
  decline(reason = DEFAULT_DECLINE) {
    if (this.ended) return;
    this.declineReason = reason;
    this.receiver.decline(reason);
    this._accept?.();
  }

  /** Pairs, receives, and resolves when every file is verified and written; rejects with {@link TransferError}. */
  run() {
    return new Promise((resolve, reject) => {
      const link = this.opts.link ?? new Link({ server: this.opts.server, code: /** @type {Code} */ (this.code), role: 'joiner', timeoutMs: this.opts.timeoutMs, iceServers: this.opts.iceServers });
      this.linkObj = link;
      /** @type {Channel | null} */
      let ctl = null;
      let verify = Promise.resolve();
      let disk = Promise.resolve();
      let ended = false;
      let completed = false;
      const finish = (/** @type {Error | null} */ err) => {
        if (ended) return;
        ended = this.ended = true;
        // A file whose sink is still opening (or failed to) has no writer
        // yet: it is aborted once it has one.
        if (err) for (const f of this.files.values()) f.opened.then(() => f.writer?.abort(err.message)).catch(() => {});
        setTimeout(() => link.close(), err ? 0 : 200);
        if (err) reject(err);
        else resolve(undefined);
      };
      const fail = (/** @type {unknown} */ e, /** @type {number} */ file) => {
        const msg = e instanceof Error ? e.message : String(e);
        this.receiver.writeFailed(file, /quota|space/i.test(msg), msg);
        pump();
      };
      const pump = () => {
        const r = this.receiver;
        for (let o = r.poll(); o; o = r.poll()) {
          const out = o;
          switch (out.type) {
            case 'ctl':
              ctl?.send(ctlJson(out.msg)).catch(() => {});
              break;
            case 'offered':
              this.emit('offered', { manifest: /** @type {Manifest} */ (r.manifest()) });
              if (this.opts.autoAccept) r.accept();
              break;
            case 'prepare': {
              const m = /** @type {Manifest} */ (r.manifest());
              const e = /** @type {import('./transfer/manifest.js').Entry} */ (m.file(out.file));
              this.current = e.path;
              this.currentFile = out.file;
              this.currentSize = e.size;
              const f = { writer: /** @type {FileWriter} */ (/** @type {unknown} */ (null)), next: 0, held: new Map(), opened: Promise.resolve() };
              f.opened = this.opts.sink.open(e.path, e.size).then((w) => { f.writer = w; });
              this.files.set(out.file, f);
              disk = disk.then(() => f.opened).then(() => { r.partialScanned(out.file, []); pump(); }, (e) => fail(e, out.file));
              break;
            }
            case 'create_dir': {
              const m = /** @type {Manifest} */ (r.manifest());
              const path = m.entries[out.entry].path;
              disk = disk.then(() => this.opts.sink.dir?.(path));
              break;
            }
            case 'verify':
              verify = verify.then(async () => {
                const h = await chunkHashAsync(out.data);
                r.chunkHashed(out.file, out.chunk, h);
                pump();
              }).catch((e) => finish(new TransferError('failed', `verifying a chunk: ${e}`)));
              break;
            case 'write': {
              const f = this.files.get(out.file);
              if (!f) break;
              f.held.set(out.offset, { chunk: out.chunk, data: out.data });
              disk = disk.then(async () => {
                // Writes go out in offset order; an early chunk waits for the ones before it.
                for (let h = f.held.get(f.next); h; h = f.held.get(f.next)) {
                  f.held.delete(f.next);
                  const len = h.data.byteLength;
                  await f.writer.write(h.data); // takes the bytes (may detach them)
                  f.next += len;
                  r.chunkWritten(out.file, h.chunk);
                }
                this._progress();
                pump();
              }).catch((e) => fail(e, out.file));
              break;
            }
            case 'finish': {
              const f = this.files.get(out.file);
              disk = disk.then(async () => {
                await f?.writer.close();
                this.files.delete(out.file);
                r.fileFinished(out.file);
                pump();
              }).catch((e) => fail(e, out.file));
              break;
            }
            case 'file_done': {
              this.filesDone++;
              const m = /** @type {Manifest} */ (r.manifest());
              this.emit('file_done', { file: out.file, path: m.file(out.file)?.path ?? '', hash: toHex(out.hash) });
              break;
            }
            case 'text': {
              const m = /** @type {Manifest} */ (r.manifest());
              this.emit('text', { path: m.file(out.file)?.path ?? '', text: out.text });
              break;
            }
            case 'resumed':
              break;
            case 'complete':
              completed = true;
              this._progress();
              this.emit('done', { bytes: r.manifest()?.totalBytes ?? 0, seconds: (performance.now() - this.startedAt) / 1000 });
              ctl?.flush().finally(() => finish(null));
              break;
            case 'cancelled':
              if (out.code === 'declined') finish(new TransferError('declined', out.reason));
              else finish(new TransferError('cancelled', out.byPeer ? `The sender stopped: ${out.reason}` : out.reason, { byPeer: out.byPeer }));
              break;
            case 'chunk_corrupt':
              break;
          }
        }
        if (r.phase === 'declined') {
          const why = this.declineReason === DEFAULT_DECLINE ? 'You declined the transfer.' : `Declined: ${this.declineReason}`;
          finish(new TransferError('declined', why));
        }
      };
      this._accept = () => {
        if (!this.startedAt) this.startedAt = performance.now();
        pump();
      };
      /** @type {(() => void) | null} */
      this._pump = pump;
      link.on('peer_seen', (e) => this.emit('peer_seen', e));
      link.on('paired', () => this.emit('paired', {}));
      link.on('notice', (e) => this.emit('notice', e));
      link.on('lost', (e) => {
        ctl = null;
        // The sender leaves once it has heard `done`: not a loss.
        if (!ended && !completed) this.emit('lost', e);
      });
      link.on('ended', ({ error }) => finish(error));
      link.on('open', (o) => {
        ctl = o.ctl;
        ctl.on('message', (m) => {
          if (typeof m !== 'string') return;
          try {
            this.receiver.handleCtlJson(m);
          } catch {
            // Cancelled; the output says why.
          }
          pump();
        });
        o.data.on('message', (m) => {
          if (typeof m === 'string') return;
          try {
            this.receiver.handleData(m);
          } catch {
            // Cancelled; the output says why.
          }
          pump();
        });
        this.emit('connected', {});
        this.receiver.startSession();
        pump();
      });
      link.start().catch((e) => finish(new TransferError('failed', `Cannot reach the server: ${e.message ?? e}`)));
    });
  }

  _progress() {
    const p = this.receiver.progress();
    const rate = this.meter.rate(p.bytesDone);
    const total = p.bytesTotal;
    this.emit('progress', {
      bytesDone: p.bytesDone,
      bytesTotal: total,
      filesDone: this.filesDone,
      files: this.receiver.manifest()?.fileCount ?? 0,
      rate,
      etaSeconds: rate > 0 ? (total - p.bytesDone) / rate : null,
      current: this.current,
      currentDone: this.files.get(this.currentFile)?.next ?? this.currentSize,
      currentSize: this.currentSize,
    });
  }

  /** Stops: the sender is told, and `run()` rejects with `cancelled`. */
  cancel(reason = 'the receiver cancelled') {
    this.receiver.cancel('user', reason);
    this._pump?.();
    this.linkObj?.abort({ code: 'failed', detail: reason });
  }
}
