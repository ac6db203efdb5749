// Shared documents (docs/PROTOCOL.md, "Shared documents"): a Y.js document
// kept in sync between every member of a room over a data channel per
// document, `peerlink-doc:NAME`, with y-protocols' sync and awareness
// messages (the framing y-websocket uses: a varint message type, 0 sync or
// 1 awareness, then the message), so any Y.js editor binding works on it
// and `yrs` speaks the same. Members that meet exchange state vectors and
// the updates the other lacks: edits made apart (offline, or before
// joining) merge when they meet again.

import * as Y from 'yjs';
import * as sync from 'y-protocols/sync';
import * as awarenessProtocol from 'y-protocols/awareness';
import * as encoding from 'lib0/encoding';
import * as decoding from 'lib0/decoding';
import { reliable } from './channel.js';
import { Emitter } from './events.js';

/** Channel label prefix of a document: `peerlink-doc:NAME`. */
export const DOC_PREFIX = 'peerlink-doc:';
const MESSAGE_SYNC = 0;
const MESSAGE_AWARENESS = 1;
const MESSAGE_PART = 16;
/** Largest channel message a document writes: longer messages go in parts. */
export const PART_LIMIT = 65_536;
/** Largest message a document writes or collects from parts (64 MiB). */
export const MAX_DOC_MESSAGE = 64 << 20;
/** Smallest channel message that can carry parts (a part's header takes up to 21 bytes). */
const MIN_PART_LIMIT = 64;

/**
 * `m` as the channel messages that carry it: itself if it fits in `limit`
 * bytes, else parts (message type 16) of at most `limit` bytes each,
 * header included.
 * @param {Uint8Array} m @param {number} limit
 * @returns {Uint8Array[]}
 */
export function splitMessage(m, limit) {
  if (m.byteLength <= limit) return [m];
  const parts = [];
  for (let offset = 0; offset < m.byteLength; ) {
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MESSAGE_PART);
    encoding.writeVarUint(e, m.byteLength);
    encoding.writeVarUint(e, offset);
    const take = Math.min(m.byteLength - offset, limit - encoding.length(e));
    encoding.writeUint8Array(e, m.subarray(offset, offset + take));
    parts.push(encoding.toUint8Array(e));
    offset += take;
  }
  return parts;
}

/**
 * Collects the parts of one channel's messages (docs/PROTOCOL.md, "Shared
 * documents", type 16): {@link Reassembly.push} returns each whole message
 * as it completes, and throws on parts that break the rules.
 */
export class Reassembly {
  constructor() {
    /** @type {Uint8Array[]} */
    this.pieces = [];
    this.total = 0;
    this.received = 0;
  }

  /**
   * The whole message `m` completes, `m` itself if it is not a part, or
   * null while parts are being collected.
   * @param {Uint8Array} m
   * @returns {Uint8Array | null}
   */
  push(m) {
    const d = decoding.createDecoder(m);
    if (decoding.readVarUint(d) !== MESSAGE_PART) {
      // The writer stopped the message it was sending in parts.
      this._reset();
      return m;
    }
    const total = decoding.readVarUint(d);
    const offset = decoding.readVarUint(d);
    const data = m.subarray(d.pos);
    if (data.byteLength === 0) throw new Error('an empty part');
    if (total > MAX_DOC_MESSAGE) throw new Error(`a message of ${total} bytes in parts (at most ${MAX_DOC_MESSAGE})`);
    if (offset === 0) {
      this._reset();
      this.total = total;
    } else if (this.pieces.length === 0) {
      throw new Error('a part of a message whose start never came');
    } else if (total !== this.total || offset !== this.received) {
      throw new Error(`a part at ${offset} of ${total} after ${this.received} of ${this.total}`);
    }
    if (offset + data.byteLength > total) throw new Error('a part running past its message');
    this.pieces.push(data);
    this.received += data.byteLength;
    if (this.received < total) return null;
    const whole = new Uint8Array(total);
    let at = 0;
    for (const p of this.pieces) {
      whole.set(p, at);
      at += p.byteLength;
    }
    this._reset();
    if (decoding.readVarUint(decoding.createDecoder(whole)) === MESSAGE_PART) throw new Error('a part made of parts');
    return whole;
  }

  _reset() {
    this.pieces = [];
    this.total = 0;
    this.received = 0;
  }
}

/** The channel a room opens for document `name` (put it in the room's `channels`). @param {string} name */
export const docChannel = (name) => reliable(`${DOC_PREFIX}${name}`);

/** @typedef {import('./channel.js').Channel} Channel */
/** @typedef {import('./room.js').Room} Room */

/**
 * @typedef {object} DocEvents
 * @property {{ peer: string }} synced  the document caught up with `peer` (both sides exchanged what the other lacked)
 * @property {{ peer: string, error: string }} error  a message from `peer` that did not parse, or one for it that could not be sent (its channel closed, or over 64 MiB): sync with `peer` stops, that channel is dropped
 */

/**
 * A Y.js document shared with everyone in a room (and in the rooms it is
 * attached to later: the document outlives a room, so edits made while
 * away merge on return).
 * @extends {Emitter<DocEvents>}
 */
export class SharedDoc extends Emitter {
  /** @param {string} name @param {{ doc?: Y.Doc }} [opts] */
  constructor(name, opts = {}) {
    super();
    this.name = name;
    this.label = `${DOC_PREFIX}${name}`;
    this.doc = opts.doc ?? new Y.Doc();
    this.awareness = new awarenessProtocol.Awareness(this.doc);
    /** @type {Map<string, Channel>} */
    this.channels = new Map();
    /** @type {Map<string, Set<number>>} awareness clients heard from each peer, forgotten when it goes */
    this.clientsOf = new Map();
    /** @type {Set<string>} peers sent nothing for now: their queue was full (they get the whole state once it has room), or a message to them is going in parts */
    this.behind = new Set();
    /** @type {Set<string>} peers behind that missed a message meanwhile */
    this.missed = new Set();
    /** @type {Map<string, Uint8Array>} state vectors of peers behind whose sync step 1 waits for an answer */
    this.owed = new Map();
    /** @type {(() => void)[]} */
    this._detach = [];
    this.doc.on('update', (/** @type {Uint8Array} */ update, /** @type {unknown} */ origin) => {
      const e = encoding.createEncoder();
      encoding.writeVarUint(e, MESSAGE_SYNC);
      sync.writeUpdate(e, update);
      this._broadcast(encoding.toUint8Array(e), origin);
    });
    this.awareness.on('update', (/** @type {{ added: number[], updated: number[], removed: number[] }} */ c, /** @type {unknown} */ origin) => {
      const changed = [...c.added, ...c.updated, ...c.removed];
      this._broadcast(this._awarenessMessage(changed), origin);
    });
  }

  /**
   * Shares the document in `room`: with every member whose document
   * channel opens (the room must list {@link docChannel} in its `channels`).
   * @param {Room} room
   */
  attach(room) {
    this.detach();
    for (const ch of room.openChannels(this.label)) this._add(ch);
    this._detach.push(
      room.on('channel_open', (ch) => { if (ch.label === this.label) this._add(ch); }),
      room.on('channel_close', ({ peer, label }) => { if (label === this.label) this._remove(peer); }),
      room.on('peer_left', ({ peer }) => this._remove(peer)),
    );
  }

  /** Stops sharing in the current room; the document and its edits stay. */
  detach() {
    for (const off of this._detach.splice(0)) off();
    for (const peer of [...this.channels.keys()]) this._remove(peer);
  }

  /** @param {Channel} ch */
  _add(ch) {
    const old = this.channels.get(ch.peer);
    if (old === ch) return;
    // A channel that replaces another starts afresh: what the old one held
    // back is covered by the sync steps this one exchanges.
    this.behind.delete(ch.peer);
    this.missed.delete(ch.peer);
    this.owed.delete(ch.peer);
    this.channels.set(ch.peer, ch);
    const parts = new Reassembly();
    ch.on('message', (m) => {
      if (this.channels.get(ch.peer) !== ch || !(m instanceof Uint8Array)) return;
      try {
        const whole = parts.push(m);
        if (whole) this._receive(ch, whole);
      } catch (e) {
        this._fail(ch, `a message that does not parse: ${e instanceof Error ? e.message : e}`);
      }
    });
    // What we have (our state vector), and who is here.
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MESSAGE_SYNC);
    sync.writeSyncStep1(e, this.doc);
    this._send(ch, encoding.toUint8Array(e));
    this._send(ch, this._awarenessMessage([...this.awareness.getStates().keys()]));
  }

  /** @param {string} peer */
  _remove(peer) {
    this.behind.delete(peer);
    this.missed.delete(peer);
    this.owed.delete(peer);
    if (!this.channels.delete(peer)) return;
    const gone = [...(this.clientsOf.get(peer) ?? [])];
    this.clientsOf.delete(peer);
    if (gone.length) awarenessProtocol.removeAwarenessStates(this.awareness, gone, peer);
  }

  /** @param {Channel} ch @param {Uint8Array} m */
  _receive(ch, m) {
    const d = decoding.createDecoder(m);
    const type = decoding.readVarUint(d);
    if (type === MESSAGE_SYNC) {
      if (this.behind.has(ch.peer) && decoding.peekVarUint(d) === sync.messageYjsSyncStep1) {
        // Answered once the peer is no longer behind (the answer covers
        // what it missed meanwhile).
        decoding.readVarUint(d);
        const sv = decoding.readVarUint8Array(d);
        Y.decodeStateVector(sv); // throws now, not when it is answered
        this.owed.set(ch.peer, sv);
        return;
      }
      const reply = encoding.createEncoder();
      encoding.writeVarUint(reply, MESSAGE_SYNC);
      const kind = sync.readSyncMessage(d, reply, this.doc, ch.peer);
      if (encoding.length(reply) > 1) this._send(ch, encoding.toUint8Array(reply));
      if (kind === sync.messageYjsSyncStep2) this.emit('synced', { peer: ch.peer });
    } else if (type === MESSAGE_AWARENESS) {
      const update = decoding.readVarUint8Array(d);
      // Remember whose clients these are, to clear them when the peer goes.
      const ud = decoding.createDecoder(update);
      const n = decoding.readVarUint(ud);
      const mine = this.clientsOf.get(ch.peer) ?? new Set();
      for (let i = 0; i < n; i++) {
        mine.add(decoding.readVarUint(ud));
        decoding.readVarUint(ud);
        decoding.readVarString(ud);
      }
      this.clientsOf.set(ch.peer, mine);
      awarenessProtocol.applyAwarenessUpdate(this.awareness, update, ch.peer);
    } else {
      throw new Error(`unknown document message type ${type}`);
    }
  }

  /** @param {number[]} clients */
  _awarenessMessage(clients) {
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MESSAGE_AWARENESS);
    encoding.writeVarUint8Array(e, awarenessProtocol.encodeAwarenessUpdate(this.awareness, clients));
    return encoding.toUint8Array(e);
  }

  /** To every peer but the one it came from. @param {Uint8Array} m @param {unknown} origin */
  _broadcast(m, origin) {
    for (const [peer, ch] of this.channels) if (peer !== origin) this._send(ch, m);
  }

  /** @param {Channel} ch @param {Uint8Array} m */
  _send(ch, m) {
    // Behind: what it misses goes in one update afterwards.
    if (this.behind.has(ch.peer)) {
      this.missed.add(ch.peer);
      return;
    }
    if (m.byteLength > MAX_DOC_MESSAGE) {
      this._fail(ch, `a document message of ${m.byteLength} bytes (at most ${MAX_DOC_MESSAGE})`);
      return;
    }
    const limit = Math.min(PART_LIMIT, ch.maxMessageSize);
    if (m.byteLength > limit) {
      if (limit < MIN_PART_LIMIT) {
        this._fail(ch, `its channel carries at most ${limit} bytes per message (documents need ${MIN_PART_LIMIT})`);
        return;
      }
      void this._sendParts(ch, m, limit);
      return;
    }
    if (!ch.isClosed && !ch.fits(m.byteLength)) {
      // Said now, not when the refusal comes back: a message sent after
      // this one in the same task must find the peer behind.
      void this._catchUp(ch);
      return;
    }
    ch.send(m).catch((/** @type {any} */ e) => {
      if (this.channels.get(ch.peer) !== ch) return;
      if (e?.code === 'overflow') {
        // A peer that cannot keep up: its queue stays bounded, and what it
        // missed is not lost (a CRDT update of the whole state merges).
        void this._catchUp(ch);
        return;
      }
      this._fail(ch, e instanceof Error ? e.message : String(e));
    });
  }

  /**
   * Sends `m` in parts, each once the queue has room for it, and nothing
   * else to `ch`'s peer meanwhile; then what changed since `m` was made.
   * @param {Channel} ch @param {Uint8Array} m @param {number} limit
   */
  async _sendParts(ch, m, limit) {
    const peer = ch.peer;
    // `m` was made from the document as it is now.
    const since = Y.encodeStateVector(this.doc);
    this.behind.add(peer);
    try {
      for (const part of splitMessage(m, limit)) {
        await ch.ready(part.byteLength);
        if (this.channels.get(peer) !== ch) return;
        ch.trySend(part);
      }
    } catch (e) {
      if (this.channels.get(peer) === ch) this._fail(ch, e instanceof Error ? e.message : String(e));
      return;
    }
    if (this.channels.get(peer) !== ch || !this.behind.delete(peer)) return;
    this._resume(ch, since);
  }

  /** @param {Channel} ch @param {string} why */
  _fail(ch, why) {
    this.emit('error', { peer: ch.peer, error: `sync with ${ch.peer} stopped: ${why}` });
    this._remove(ch.peer);
    ch.close();
  }

  /**
   * Sends `ch`'s peer the whole state (and who is here) once everything
   * queued for it has gone, sending it nothing else meanwhile.
   * @param {Channel} ch
   */
  async _catchUp(ch) {
    if (this.behind.has(ch.peer)) return;
    this.behind.add(ch.peer);
    await ch.flush();
    if (this.channels.get(ch.peer) !== ch || !this.behind.delete(ch.peer)) return;
    this._resume(ch);
  }

  /**
   * After a pause in what `ch`'s peer was sent: the answer to its sync
   * step 1 if one waits (it covers everything), else what the document
   * has beyond state vector `since` if the peer missed something (without
   * `since`, the whole state), and every awareness state.
   * @param {Channel} ch @param {Uint8Array} [since]
   */
  _resume(ch, since) {
    try {
      this._resumeUnguarded(ch, since);
    } catch (e) {
      this._fail(ch, e instanceof Error ? e.message : String(e));
    }
  }

  /** @param {Channel} ch @param {Uint8Array} [since] */
  _resumeUnguarded(ch, since) {
    const owed = this.owed.get(ch.peer);
    this.owed.delete(ch.peer);
    const missed = this.missed.delete(ch.peer);
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MESSAGE_SYNC);
    if (owed) sync.writeSyncStep2(e, this.doc, owed);
    else if (missed || !since) sync.writeUpdate(e, Y.encodeStateAsUpdate(this.doc, since));
    else return;
    this._send(ch, encoding.toUint8Array(e));
    this._send(ch, this._awarenessMessage([...this.awareness.getStates().keys()]));
  }

  /** Stops sharing and frees the awareness timers. */
  destroy() {
    this.detach();
    this.awareness.destroy();
  }
}
