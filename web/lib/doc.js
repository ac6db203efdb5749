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

/** The channel a room opens for document `name` (put it in the room's `channels`). @param {string} name */
export const docChannel = (name) => reliable(`${DOC_PREFIX}${name}`);

/** @typedef {import('./channel.js').Channel} Channel */
/** @typedef {import('./room.js').Room} Room */

/**
 * @typedef {object} DocEvents
 * @property {{ peer: string }} synced  the document caught up with `peer` (both sides exchanged what the other lacked)
 * @property {{ peer: string, error: string }} error  a message from `peer` that did not parse, or one for it its channel refused (too large): sync with `peer` stops, that channel is dropped
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
    /** @type {Set<string>} peers whose channel's queue was full: they get the whole state once it has room */
    this.behind = new Set();
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
    this.channels.set(ch.peer, ch);
    ch.on('message', (m) => {
      if (this.channels.get(ch.peer) !== ch || !(m instanceof Uint8Array)) return;
      try {
        this._receive(ch, m);
      } catch (e) {
        this.emit('error', { peer: ch.peer, error: String(e) });
        this._remove(ch.peer);
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
    // Behind: what it misses goes in one update once its queue has room.
    if (this.behind.has(ch.peer)) return;
    ch.send(m).catch((/** @type {any} */ e) => {
      if (this.channels.get(ch.peer) !== ch) return;
      if (e?.code === 'overflow') {
        // A peer that cannot keep up: its queue stays bounded, and what it
        // missed is not lost (a CRDT update of the whole state merges).
        void this._catchUp(ch);
        return;
      }
      this.emit('error', { peer: ch.peer, error: `sync with ${ch.peer} stopped: ${e instanceof Error ? e.message : e}` });
      this._remove(ch.peer);
      ch.close();
    });
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
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MESSAGE_SYNC);
    sync.writeUpdate(e, Y.encodeStateAsUpdate(this.doc));
    this._send(ch, encoding.toUint8Array(e));
    this._send(ch, this._awarenessMessage([...this.awareness.getStates().keys()]));
  }

  /** Stops sharing and frees the awareness timers. */
  destroy() {
    this.detach();
    this.awareness.destroy();
  }
}
