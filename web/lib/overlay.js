// The overlay for large rooms, without I/O: the browser's twin of
// crates/overlay (HyParView membership, Plumtree broadcast, direct
// messages on connections opened on demand, signals relayed along reverse
// paths). docs/PROTOCOL.md, "Large rooms: the overlay", describes the
// protocol; fixtures/overlay/ pins the wire format. Time comes in as `now`
// (ms); outputs are polled.

export const CHANNEL_LABEL = 'peerlink.overlay';
export const VERSION = 1;
export const MAX_LISTED = 64;
export const MAX_IHAVE = 256;
/** Largest payload of a `relay` or `unreachable` (a signal: an SDP with its candidates is a few KiB). */
export const MAX_RELAY = 16 * 1024;
/** Broadcasts announced and not received, tracked at once. */
const MAX_MISSING = 4096;
/** Routes known at once. */
const MAX_ROUTES = 4096;
/**
 * A spare that turned a neighbour request down is not asked again (unless
 * we are below MIN_NEIGHBORS) for this long: each request costs it a
 * connection, and a full peer would refuse every tick.
 */
const REFUSED_FOR_MS = 10_000;
/**
 * Fewest neighbours a peer settles for: below this it asks spares at high
 * priority, which they cannot refuse.
 */
const MIN_NEIGHBORS = 2;
/**
 * With no neighbour, nobody to ask and no join under way, the join is made
 * again through the peers we joined by: first after 1 s, then after twice
 * the last wait, up to 30 s.
 */
const REJOIN_FIRST_MS = 1000;
const REJOIN_MAX_MS = 30_000;

const T = {
  join: 1, forward_join: 2, neighbor: 3, neighbor_reply: 4, disconnect: 5, shuffle: 6, shuffle_reply: 7,
  gossip: 16, ihave: 17, graft: 18, prune: 19, gossip_all: 20, direct: 32,
  relay: 33, unreachable: 34,
};

/**
 * An overlay message. Broadcast ids are 16 hex digits (u64); payloads bytes.
 * @typedef {{ type: 'join' }
 *   | { type: 'forward_join', peer: string, ttl: number }
 *   | { type: 'neighbor', high: boolean }
 *   | { type: 'neighbor_reply', accepted: boolean }
 *   | { type: 'disconnect', alive: boolean }
 *   | { type: 'shuffle', origin: string, ttl: number, peers: string[] }
 *   | { type: 'shuffle_reply', peers: string[] }
 *   | { type: 'gossip', id: string, origin: string, hops: number, all?: boolean, payload: Uint8Array }
 *   | { type: 'ihave', ids: [string, number][] }
 *   | { type: 'graft', id?: string }
 *   | { type: 'prune' }
 *   | { type: 'direct', payload: Uint8Array }
 *   | { type: 'relay', to: string, from: string, ttl: number, payload: Uint8Array }
 *   | { type: 'unreachable', to: string, from: string, ttl: number, payload: Uint8Array }} OverlayMessage
 */

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

/** @param {OverlayMessage} m @returns {Uint8Array} */
export function encode(m) {
  /** @type {number[]} */
  const out = [VERSION];
  /** @param {string} s */
  const id = (s) => {
    const b = utf8.encode(s).subarray(0, 255);
    out.push(b.length, ...b);
  };
  /** @param {string} hex */
  const u64 = (hex) => {
    for (let i = 0; i < 16; i += 2) out.push(parseInt(hex.slice(i, i + 2), 16));
  };
  /** @param {number} n */
  const u16 = (n) => out.push((n >> 8) & 255, n & 255);
  let payload = null;
  switch (m.type) {
    case 'join': out.push(T.join); break;
    case 'forward_join': out.push(T.forward_join); id(m.peer); out.push(m.ttl); break;
    case 'neighbor': out.push(T.neighbor, m.high ? 1 : 0); break;
    case 'neighbor_reply': out.push(T.neighbor_reply, m.accepted ? 1 : 0); break;
    case 'disconnect': out.push(T.disconnect, m.alive ? 1 : 0); break;
    case 'shuffle':
      out.push(T.shuffle); id(m.origin); out.push(m.ttl);
      out.push(Math.min(m.peers.length, MAX_LISTED)); m.peers.slice(0, MAX_LISTED).forEach(id);
      break;
    case 'shuffle_reply':
      out.push(T.shuffle_reply, Math.min(m.peers.length, MAX_LISTED)); m.peers.slice(0, MAX_LISTED).forEach(id);
      break;
    case 'gossip':
      out.push(m.all ? T.gossip_all : T.gossip); u64(m.id); id(m.origin); u16(m.hops); payload = m.payload;
      break;
    case 'ihave': {
      const ids = m.ids.slice(0, MAX_IHAVE);
      out.push(T.ihave); u16(ids.length);
      for (const [i, h] of ids) { u64(i); u16(h); }
      break;
    }
    case 'graft': out.push(T.graft); if (m.id !== undefined) u64(m.id); break;
    case 'prune': out.push(T.prune); break;
    case 'direct': out.push(T.direct); payload = m.payload; break;
    case 'relay':
    case 'unreachable': out.push(T[m.type]); id(m.to); id(m.from); out.push(m.ttl); payload = m.payload; break;
  }
  const head = Uint8Array.from(out);
  if (!payload) return head;
  const all = new Uint8Array(head.length + payload.length);
  all.set(head);
  all.set(payload, head.length);
  return all;
}

export class DecodeError extends Error {}

/** @param {Uint8Array} b @returns {OverlayMessage} */
export function decode(b) {
  let at = 0;
  /** @param {number} n */
  const take = (n) => {
    if (b.length - at < n) throw new DecodeError('malformed overlay message: cut short');
    const s = b.subarray(at, at + n);
    at += n;
    return s;
  };
  const u8 = () => take(1)[0];
  const flag = () => {
    const v = u8();
    if (v > 1) throw new DecodeError('malformed overlay message: flag not 0 or 1');
    return v === 1;
  };
  const u16 = () => { const s = take(2); return (s[0] << 8) | s[1]; };
  const u64 = () => [...take(8)].map((x) => x.toString(16).padStart(2, '0')).join('');
  const id = () => {
    const n = u8();
    let s;
    try { s = fromUtf8.decode(take(n)); } catch (e) {
      if (e instanceof DecodeError) throw e;
      throw new DecodeError('malformed overlay message: peer id not UTF-8');
    }
    if (!s) throw new DecodeError('malformed overlay message: invalid peer id');
    return s;
  };
  const ids = () => {
    const n = u8();
    if (n > MAX_LISTED) throw new DecodeError('malformed overlay message: too many peers listed');
    return Array.from({ length: n }, id);
  };
  const version = u8();
  if (version !== VERSION) throw new DecodeError(`overlay message version ${version}, expected ${VERSION}`);
  const type = u8();
  /** @type {OverlayMessage} */
  let m;
  switch (type) {
    case T.join: m = { type: 'join' }; break;
    case T.forward_join: m = { type: 'forward_join', peer: id(), ttl: u8() }; break;
    case T.neighbor: m = { type: 'neighbor', high: flag() }; break;
    case T.neighbor_reply: m = { type: 'neighbor_reply', accepted: flag() }; break;
    case T.disconnect: m = { type: 'disconnect', alive: flag() }; break;
    case T.shuffle: m = { type: 'shuffle', origin: id(), ttl: u8(), peers: ids() }; break;
    case T.shuffle_reply: m = { type: 'shuffle_reply', peers: ids() }; break;
    case T.gossip:
    case T.gossip_all: {
      const gid = u64();
      const origin = id();
      const hops = u16();
      /** @type {OverlayMessage} */
      const g = { type: 'gossip', id: gid, origin, hops, payload: b.slice(at) };
      if (type === T.gossip_all) g.all = true;
      return g;
    }
    case T.ihave: {
      const n = u16();
      if (n > MAX_IHAVE) throw new DecodeError('malformed overlay message: too many ids');
      /** @type {[string, number][]} */
      const list = [];
      for (let i = 0; i < n; i++) list.push([u64(), u16()]);
      m = { type: 'ihave', ids: list };
      break;
    }
    case T.graft: m = at === b.length ? { type: 'graft' } : { type: 'graft', id: u64() }; break;
    case T.prune: m = { type: 'prune' }; break;
    case T.direct: return { type: 'direct', payload: b.slice(at) };
    case T.relay:
    case T.unreachable: {
      const to = id();
      const from = id();
      const ttl = u8();
      if (b.length - at > MAX_RELAY) throw new DecodeError('malformed overlay message: relayed signal over 16 KiB');
      return { type: type === T.relay ? 'relay' : 'unreachable', to, from, ttl, payload: b.slice(at) };
    }
    default: throw new DecodeError(`unknown overlay message type ${type}`);
  }
  if (at !== b.length) throw new DecodeError('malformed overlay message: trailing bytes');
  return m;
}

/**
 * The overlay's settings (crates/overlay `Config`; times in ms).
 * @typedef {object} OverlayConfig
 * @property {number} [fullMeshUpTo]
 * @property {number} [activeView]
 * @property {number} [passiveView]
 * @property {number} [activeWalk]
 * @property {number} [passiveWalk]
 * @property {number} [shuffleMs]
 * @property {number} [connectTimeoutMs]
 * @property {number} [neighborTimeoutMs]
 * @property {number} [tickMs]
 * @property {number} [ihaveDelayMs]
 * @property {number} [graftTimeoutMs]
 * @property {number} [graftRetryMs]
 * @property {number} [optimizationHops]
 * @property {number} [cacheMs]
 * @property {number} [cacheBytes]  bytes of broadcasts kept for grafts; the oldest go first
 * @property {number} [idMs]
 * @property {number} [maxIds]
 * @property {number} [idleCloseMs]
 * @property {number} [lingerMs]
 * @property {number} [maxConnections]
 * @property {number} [maxQueuedBytes] bytes queued per connection being set up; messages beyond are dropped
 * @property {number} [relayTtl]    hops a relayed signal may cross ({@link Overlay.relay})
 * @property {number} [routeRetentionMs] a route learned from a message (a join walk, a shuffle, a broadcast, a relayed signal) is used this long
 * @property {number} [maxRelaysPerSecond] relayed signals passed on for others per second at most; beyond, they go back to their writer
 */

const DEFAULTS = {
  fullMeshUpTo: 8, activeView: 5, passiveView: 30, activeWalk: 6, passiveWalk: 3, shuffleMs: 30_000,
  shuffleActive: 3, shufflePassive: 4, connectTimeoutMs: 15_000, neighborTimeoutMs: 20_000, tickMs: 500,
  ihaveDelayMs: 10, graftTimeoutMs: 150, graftRetryMs: 200, optimizationHops: 2, cacheMs: 30_000, cacheBytes: 16 << 20,
  idMs: 120_000, maxIds: 200_000, idleCloseMs: 30_000, lingerMs: 2_000, maxConnections: 8, maxQueuedBytes: 256 << 10,
  relayTtl: 8, routeRetentionMs: 60_000, maxRelaysPerSecond: 200,
};

/**
 * What the caller carries out.
 * @typedef {{ type: 'connect', peer: string }
 *   | { type: 'close', peer: string }
 *   | { type: 'send', peer: string, message: OverlayMessage }
 *   | { type: 'deliver', id: string, origin: string, hops: number, payload: Uint8Array }
 *   | { type: 'direct', from: string, payload: Uint8Array }
 *   | { type: 'direct_failed', peer: string, messages: number }
 *   | { type: 'relayed', from: string, payload: Uint8Array }
 *   | { type: 'relay_failed', to: string, payload: Uint8Array }
 *   | { type: 'neighbor_up', peer: string }
 *   | { type: 'neighbor_down', peer: string }} OverlayOutput
 */

/** @template T @param {T[]} a @returns {T | undefined} */
const pick = (a) => a[Math.floor(Math.random() * a.length)];
/** @template T @param {T[]} a @param {number} k @returns {T[]} */
function sample(a, k) {
  const c = [...a];
  for (let i = c.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [c[i], c[j]] = [c[j], c[i]];
  }
  return c.slice(0, k);
}
const randomId = () => Array.from(crypto.getRandomValues(new Uint8Array(8)), (x) => x.toString(16).padStart(2, '0')).join('');

/**
 * @typedef {{ up: boolean, deadline: number, queue: OverlayMessage[], queuedBytes: number, lastUsed: number, direct: boolean }} Conn
 */

/** One peer's overlay (crates/overlay `Overlay`). */
export class Overlay {
  /** @param {string} me @param {OverlayConfig} [config] @param {number} [now] */
  constructor(me, config = {}, now = Date.now()) {
    this.me = me;
    this.c = { ...DEFAULTS, ...config };
    /** @type {string[]} */ this.active = [];
    /** @type {string[]} */ this.passive = [];
    /** @type {Map<string, number>} */ this.pending = new Map();
    /** @type {string[]} */ this.contacts = [];
    /** @type {string | null} */ this.joining = null;
    /** The peers we joined through, to join through again when left with nobody. @type {string[]} */
    this.introducers = [];
    /** When to join again if still alone, and the last wait. */
    this.rejoinAt = now + REJOIN_FIRST_MS;
    this.rejoinWait = REJOIN_FIRST_MS;
    /** Spares that turned a neighbour request down, and until when they are not asked again. @type {Map<string, number>} */
    this.refused = new Map();
    /** @type {Map<string, Conn>} */ this.conns = new Map();
    /** @type {Set<string>} */ this.eager = new Set();
    /** @type {Set<string>} */ this.lazy = new Set();
    /** @type {Map<string, number>} */ this.seen = new Map();
    /** @type {Map<string, { from: string | null, origin: string, hops: number, payload: Uint8Array, at: number }>} */ this.cache = new Map();
    this.cacheUsed = 0;
    /** @type {Map<string, { announcers: [string, number][], deadline: number }>} */ this.missing = new Map();
    /** @type {Map<string, [string, number][]>} */ this.lazyOut = new Map();
    /** @type {Map<string, number>} */ this.dupStreak = new Map();
    /** @type {number | null} */ this.lazyFlush = null;
    /** @type {string[]} */ this.unsent = [];
    /** @type {Map<string, { messages: OverlayMessage[], attempts: number, at: number }>} */ this.retry = new Map();
    /** @type {Map<string, number>} */ this.hopsFrom = new Map();
    /** Reverse paths to peers we are not connected to, for relayed signals. @type {Map<string, { via: string, until: number }>} */
    this.routes = new Map();
    /** Start of the current second, and relays passed on in it. */
    this.relayWindow = now;
    this.relaysInWindow = 0;
    this.nextTick = now + this.c.tickMs;
    this.nextShuffle = now + this.c.shuffleMs * (0.5 + Math.random());
    this.left = false;
    /** @type {OverlayOutput[]} */ this.out = [];
    this.stats = { delivered: 0, duplicates: 0, forwarded: 0, announced: 0, grafts: 0, prunes: 0, replacements: 0, dropped: 0,
      relayed: 0, relaysReceived: 0, relaysForwarded: 0, relaysFailed: 0, rejoins: 0 };
  }

  /** @returns {OverlayOutput | undefined} */
  pollOutput() { return this.out.shift(); }

  /** @returns {number | null} */
  pollTimeout() {
    if (this.left) return null;
    let t = Math.min(this.nextTick, this.nextShuffle);
    if (this.lazyFlush !== null) t = Math.min(t, this.lazyFlush);
    for (const m of this.missing.values()) t = Math.min(t, m.deadline);
    return t;
  }

  /** @param {string[]} contacts @param {number} roomSize @param {number} now */
  join(contacts, roomSize, now) {
    contacts = sample([...new Set(contacts)].filter((c) => c !== this.me), contacts.length);
    for (const c of contacts) this._addPassive(c);
    this.introducers = [...contacts];
    this.rejoinAt = now + REJOIN_FIRST_MS;
    this.rejoinWait = REJOIN_FIRST_MS;
    if (roomSize < this.c.fullMeshUpTo && contacts.length >= roomSize) {
      for (const c of contacts) this._requestNeighbor(c, false, now);
      return;
    }
    this.contacts = contacts;
    this._joinNext(now);
  }

  /** @param {number} now */
  _joinNext(now) {
    let c;
    while ((c = this.contacts.pop()) !== undefined) {
      if (this.active.includes(c)) continue;
      this.joining = c;
      this.pending.set(c, now + this.c.neighborTimeoutMs);
      this._send(c, { type: 'join' }, now);
      return;
    }
    this.joining = null;
  }

  /** @param {string} peer */
  peerKnown(peer) { if (peer !== this.me && !this.active.includes(peer)) this._addPassive(peer); }

  /** @param {string} peer @param {number} now */
  peerGone(peer, now) {
    this.passive = this.passive.filter((p) => p !== peer);
    this.introducers = this.introducers.filter((p) => p !== peer);
    if (this.conns.has(peer)) this.out.push({ type: 'close', peer });
    this.conns.delete(peer);
    this._lost(peer, now);
  }

  /** @param {string} peer @param {number} now @returns {boolean} */
  accept(peer, now) {
    if (this.left || peer === this.me) return false;
    if (this.conns.has(peer)) return true;
    if (!this._makeRoom()) return false;
    this.conns.set(peer, { up: false, deadline: now + this.c.connectTimeoutMs, queue: [], queuedBytes: 0, lastUsed: now, direct: false });
    return true;
  }

  /**
   * The connection to `peer` is up (whoever opened it). One we did not open
   * or accept is closed if it would take us past `maxConnections`.
   * @param {string} peer @param {number} now
   */
  connected(peer, now) {
    if (this.left || peer === this.me) return;
    let conn = this.conns.get(peer);
    if (!conn) {
      if (!this._makeRoom()) { this.out.push({ type: 'close', peer }); return; }
      conn = { up: false, deadline: now, queue: [], queuedBytes: 0, lastUsed: now, direct: false };
      this.conns.set(peer, conn);
    }
    conn.up = true;
    conn.lastUsed = now;
    const r = this.retry.get(peer);
    if (r && r.messages.length === 0) this.retry.delete(peer);
    conn.queuedBytes = 0;
    for (const message of conn.queue.splice(0)) this.out.push({ type: 'send', peer, message });
  }

  /** @param {string} peer @param {number} now */
  disconnected(peer, now) {
    const c = this.conns.get(peer);
    this.conns.delete(peer);
    if (c && !c.up) this._setupFailed(peer, c, now);
    this._lost(peer, now);
  }

  /** @param {string} peer @param {Conn} c @param {number} now */
  _setupFailed(peer, c, now) {
    const direct = c.queue.filter((m) => m.type === 'direct');
    if (!direct.length || this.left) return;
    const r = this.retry.get(peer) ?? { messages: [], attempts: 0, at: now };
    r.attempts += 1;
    r.messages.push(...direct);
    r.at = now + 1000;
    this.retry.set(peer, r);
    if (r.attempts >= 3) {
      this.retry.delete(peer);
      this.stats.dropped += r.messages.length;
      this.out.push({ type: 'direct_failed', peer, messages: r.messages.length });
    }
  }

  /** @param {Uint8Array} payload @param {number} now @returns {string} */
  broadcast(payload, now) {
    const id = randomId();
    this._remember(id, now);
    if (this._smallRoom()) {
      for (const p of this.active) {
        this.stats.forwarded++;
        this._send(p, { type: 'gossip', id, origin: this.me, hops: 0, all: true, payload }, now);
      }
    } else {
      this._push(id, this.me, 0, payload, null, now);
    }
    this._cache(id, { from: null, origin: this.me, hops: 0, payload, at: now });
    if (!this.active.length) {
      if (this.unsent.length >= 1024) this.unsent.shift();
      this.unsent.push(id);
    }
    return id;
  }

  /** @param {string} peer @param {Uint8Array} payload @param {number} now @returns {boolean} */
  sendDirect(peer, payload, now) {
    if (peer === this.me || this.left) return false;
    if (!this.conns.has(peer) && !this._makeRoom()) { this.stats.dropped++; return false; }
    const dropped = this.stats.dropped;
    this._send(peer, { type: 'direct', payload }, now);
    const c = this.conns.get(peer);
    if (c) c.direct = true;
    return this.stats.dropped === dropped;
  }

  /** @param {number} now */
  leave(now) {
    for (const a of [...this.active]) this._send(a, { type: 'disconnect', alive: false }, now);
    this.left = true;
  }

  /** @param {string} from @param {OverlayMessage} msg @param {number} now */
  handleMessage(from, msg, now) {
    if (this.left || from === this.me) return;
    const c = this.conns.get(from);
    if (c) c.lastUsed = now;
    else {
      this.connected(from, now);
      if (!this.conns.has(from)) return; // closed: over the limit
    }
    switch (msg.type) {
      case 'join':
        this._addActive(from, now);
        this._send(from, { type: 'neighbor_reply', accepted: true }, now);
        for (const a of [...this.active]) if (a !== from) this._send(a, { type: 'forward_join', peer: from, ttl: this.c.activeWalk }, now);
        break;
      case 'forward_join': this._learnRoute(msg.peer, from, now); this._forwardJoin(from, msg.peer, msg.ttl, now); break;
      case 'neighbor': {
        const accepted = msg.high || this.active.includes(from) || this.active.length < this._cap();
        if (accepted) this._addActive(from, now);
        this._send(from, { type: 'neighbor_reply', accepted }, now);
        break;
      }
      case 'neighbor_reply': {
        if (!this.pending.delete(from)) return;
        if (msg.accepted) this._addActive(from, now);
        else {
          this.refused.set(from, now + REFUSED_FOR_MS);
          if (this.conns.has(from) && !this.conns.get(from)?.direct) { this.conns.delete(from); this.out.push({ type: 'close', peer: from }); }
        }
        if (this.joining === from) {
          if (msg.accepted) { this.joining = null; this.contacts = []; } else this._joinNext(now);
        }
        break;
      }
      case 'disconnect': {
        const was = this._removeActive(from);
        if (msg.alive) this._addPassive(from); else this.passive = this.passive.filter((p) => p !== from);
        if (this.conns.has(from) && !this.conns.get(from)?.direct) { this.conns.delete(from); this.out.push({ type: 'close', peer: from }); }
        if (was) this._fillActive(now);
        break;
      }
      case 'shuffle': this._learnRoute(msg.origin, from, now); this._shuffle(from, msg.origin, msg.ttl, msg.peers, now); break;
      case 'shuffle_reply': this._merge(msg.peers, []); break;
      case 'gossip': this._gossip(from, msg.id, msg.origin, msg.hops, !!msg.all, msg.payload, now); break;
      case 'ihave':
        if (!this.active.includes(from)) return;
        for (const [id, hops] of msg.ids) {
          if (this.seen.has(id)) { this._maybeOptimize(from, id, hops, now); continue; }
          let m = this.missing.get(id);
          if (!m && this.missing.size >= MAX_MISSING) continue; // announced faster than fetched: wait for another
          if (!m) { m = { announcers: [], deadline: now + this.c.graftTimeoutMs }; this.missing.set(id, m); }
          if (m.announcers.length < 16) m.announcers.push([from, hops]);
        }
        break;
      case 'graft': {
        if (this.active.includes(from)) { this.lazy.delete(from); this.eager.add(from); }
        const cached = msg.id !== undefined ? this.cache.get(msg.id) : undefined;
        if (msg.id !== undefined && cached) {
          this.stats.forwarded++;
          this._send(from, { type: 'gossip', id: msg.id, origin: cached.origin, hops: cached.hops, payload: cached.payload }, now);
        }
        break;
      }
      case 'prune': if (this.eager.delete(from)) this.lazy.add(from); break;
      case 'direct': {
        const conn = this.conns.get(from);
        if (conn) conn.direct = true;
        this.out.push({ type: 'direct', from, payload: msg.payload });
        break;
      }
      case 'relay': this._onRelay(from, msg.to, msg.from, msg.ttl, msg.payload, now); break;
      case 'unreachable': this._onUnreachable(from, msg.to, msg.from, msg.ttl, msg.payload, now); break;
    }
  }

  /**
   * Sends a signal (an offer, answer or candidate for a connection being set
   * up) to `to` over the overlay, hop by hop along the reverse path of a
   * message `to` sent us before (its join walk, a shuffle, a broadcast, a
   * relayed signal). False if no route is known (or the payload is over
   * MAX_RELAY): send it through the server. One that cannot go on comes back
   * as a `relay_failed` output. Signals to one peer follow one route, in order.
   * @param {string} to @param {Uint8Array} payload @param {number} now @returns {boolean}
   */
  relay(to, payload, now) {
    if (this.left || to === this.me || payload.length > MAX_RELAY) return false;
    const hop = this._nextHop(to, null, now);
    if (hop === null) return false;
    this.stats.relayed++;
    this._send(hop, { type: 'relay', to, from: this.me, ttl: this.c.relayTtl, payload }, now);
    return true;
  }

  /** @param {string} peer */
  _isUp(peer) { return this.conns.get(peer)?.up === true; }

  /**
   * The neighbour to pass a relayed signal for `to` to: `to` itself if
   * connected, else the route's, if it is up and not `except`.
   * @param {string} to @param {string | null} except @param {number} now @returns {string | null}
   */
  _nextHop(to, except, now) {
    if (this._isUp(to)) return to;
    const r = this.routes.get(to);
    return r && r.until > now && r.via !== except && this._isUp(r.via) ? r.via : null;
  }

  /**
   * `dest` sent something that came to us through `via`: the way back. The
   * first route stays while it lasts and its link is up, so signals to one
   * peer keep their order.
   * @param {string} dest @param {string} via @param {number} now
   */
  _learnRoute(dest, via, now) {
    if (dest === this.me || dest === via) return;
    const until = now + this.c.routeRetentionMs;
    const r = this.routes.get(dest);
    if (r && r.via === via) { r.until = until; return; }
    if (r && r.until > now && this._isUp(r.via)) return;
    if (!r && this.routes.size >= MAX_ROUTES) {
      for (const [d, x] of this.routes) if (x.until <= now) this.routes.delete(d);
      if (this.routes.size >= MAX_ROUTES) return;
    }
    this.routes.set(dest, { via, until });
  }

  /** Whether one more relay may be passed on this second. @param {number} now */
  _relayBudget(now) {
    if (now >= this.relayWindow + 1000) { this.relayWindow = now; this.relaysInWindow = 0; }
    if (this.relaysInWindow >= this.c.maxRelaysPerSecond) return false;
    this.relaysInWindow++;
    return true;
  }

  /**
   * @param {string} link @param {string} to @param {string} from @param {number} ttl
   * @param {Uint8Array} payload @param {number} now
   */
  _onRelay(link, to, from, ttl, payload, now) {
    if (payload.length > MAX_RELAY) return;
    if (from === this.me) {
      // Ours, back by a loop of routes learned at different times.
      this.routes.delete(to);
      this.stats.relaysFailed++;
      this.out.push({ type: 'relay_failed', to, payload });
      return;
    }
    this._learnRoute(from, link, now);
    if (to === this.me) {
      this.stats.relaysReceived++;
      this.out.push({ type: 'relayed', from, payload });
      return;
    }
    let hop = ttl > 0 && this._relayBudget(now) ? this._nextHop(to, link, now) : null;
    if (hop === from) hop = null; // not back to its writer: the route would loop
    if (hop !== null) {
      this.stats.relaysForwarded++;
      this._send(hop, { type: 'relay', to, from, ttl: ttl - 1, payload }, now);
    } else {
      // Back the way it came: each hop learned the way to its writer.
      this._send(link, { type: 'unreachable', to: from, from: to, ttl: this.c.relayTtl, payload }, now);
    }
  }

  /**
   * @param {string} link @param {string} to @param {string} from @param {number} ttl
   * @param {Uint8Array} payload @param {number} now
   */
  _onUnreachable(link, to, from, ttl, payload, now) {
    if (this.routes.get(from)?.via === link) this.routes.delete(from);
    if (to === this.me) {
      this.stats.relaysFailed++;
      this.out.push({ type: 'relay_failed', to: from, payload });
      return;
    }
    const hop = ttl > 0 && this._relayBudget(now) ? this._nextHop(to, link, now) : null;
    if (hop !== null) this._send(hop, { type: 'unreachable', to, from, ttl: ttl - 1, payload }, now);
    else this.stats.dropped++;
  }

  /** @param {number} now */
  handleTimeout(now) {
    if (this.left) return;
    if (this.lazyFlush !== null && this.lazyFlush <= now) {
      this.lazyFlush = null;
      const out = this.lazyOut;
      this.lazyOut = new Map();
      for (const [peer, ids] of out) {
        if (!this.active.includes(peer)) continue;
        for (let i = 0; i < ids.length; i += MAX_IHAVE) {
          const chunk = ids.slice(i, i + MAX_IHAVE);
          this.stats.announced += chunk.length;
          this._send(peer, { type: 'ihave', ids: chunk }, now);
        }
      }
    }
    for (const [id, m] of [...this.missing]) if (m.deadline <= now) this._graft(id, now);
    if (this.nextShuffle <= now) { this.nextShuffle = now + this.c.shuffleMs; this._startShuffle(now); }
    if (this.nextTick <= now) { this.nextTick = now + this.c.tickMs; this._tick(now); }
  }

  _smallRoom() { return 1 + this.active.length + this.passive.length <= this.c.fullMeshUpTo; }
  _cap() { return this._smallRoom() ? Math.max(this.c.fullMeshUpTo - 1, 1) : Math.max(this.c.activeView, 1); }

  /** @param {string} peer */
  _addPassive(peer) {
    if (peer === this.me || this.passive.includes(peer) || this.active.includes(peer)) return;
    if (this.passive.length >= Math.max(this.c.passiveView, 1)) this.passive.splice(Math.floor(Math.random() * this.passive.length), 1);
    this.passive.push(peer);
  }

  _canOpen() {
    if (this.conns.size < this.c.maxConnections) return true;
    for (const [p, c] of this.conns) if (c.up && !this.active.includes(p) && !this.pending.has(p)) return true;
    return false;
  }

  /** @param {string} peer @param {number} now */
  _addActive(peer, now) {
    this.pending.delete(peer);
    if (peer === this.me || this.active.includes(peer)) return;
    if (!this.conns.has(peer) && !this._canOpen()) return;
    this.passive = this.passive.filter((p) => p !== peer);
    while (this.active.length >= this._cap()) this._evict(/** @type {string} */ (pick(this.active)), now);
    this.active.push(peer);
    this.rejoinWait = REJOIN_FIRST_MS;
    this.eager.add(peer);
    this.lazy.delete(peer);
    if (!this.conns.has(peer) && !this._open(peer, now)) { this._removeActive(peer); return; }
    for (const id of this.unsent.splice(0)) {
      const c = this.cache.get(id);
      if (c) { this.stats.forwarded++; this._send(peer, { type: 'gossip', id, origin: this.me, hops: 0, payload: c.payload }, now); }
    }
    this.out.push({ type: 'neighbor_up', peer });
  }

  /** @param {string} victim @param {number} now */
  _evict(victim, now) {
    this._send(victim, { type: 'disconnect', alive: true }, now);
    this._removeActive(victim);
    this._addPassive(victim);
  }

  /** @param {string} peer */
  _removeActive(peer) {
    const i = this.active.indexOf(peer);
    if (i < 0) return false;
    this.active.splice(i, 1);
    this.eager.delete(peer);
    this.lazy.delete(peer);
    this.lazyOut.delete(peer);
    this.dupStreak.delete(peer);
    this.out.push({ type: 'neighbor_down', peer });
    return true;
  }

  /** @param {string} peer @param {number} now */
  _lost(peer, now) {
    const wasActive = this._removeActive(peer);
    const wasPending = this.pending.delete(peer);
    if (wasPending) this.passive = this.passive.filter((p) => p !== peer);
    if (wasActive) this.stats.replacements++;
    if (this.joining === peer) this._joinNext(now);
    if (wasActive || wasPending) this._fillActive(now);
  }

  /** @param {string} peer @param {boolean} high @param {number} now */
  _requestNeighbor(peer, high, now) {
    if (peer === this.me || this.active.includes(peer) || this.pending.has(peer)) return;
    this.pending.set(peer, now + this.c.neighborTimeoutMs);
    this._send(peer, { type: 'neighbor', high }, now);
  }

  /** @param {number} now */
  _fillActive(now) {
    let wanted = this._cap() - this.active.length - this.pending.size;
    if (wanted <= 0 || this.joining !== null) return;
    // Below two neighbours we ask at high priority, which is never
    // refused: with one, every spare with a full view would turn us down,
    // and we would hang on that one link (HyParView asks so only with none).
    // Not in views of two: the peer a full one gives up would then be left
    // with one and ask the same way, and so on.
    const high = this.active.length < Math.max(1, Math.min(MIN_NEIGHBORS, this._cap() - 1));
    const spares = this.passive.filter((x) => !this.pending.has(x) && (high || !((this.refused.get(x) ?? 0) > now)));
    for (const p of sample(spares, spares.length)) {
      if (wanted <= 0 || !this._canOpen()) break;
      this._requestNeighbor(p, high, now);
      wanted--;
    }
  }

  /** Joins again through the peers we joined by, when left with no neighbour, no spare and no request under way. @param {number} now */
  _rejoinIfAlone(now) {
    const alone = this.active.length === 0 && this.pending.size === 0 && this.joining === null
      && this.passive.length === 0 && this.introducers.length > 0;
    if (!alone || now < this.rejoinAt) return;
    this.rejoinWait = Math.min(this.rejoinWait * 2, REJOIN_MAX_MS);
    this.rejoinAt = now + this.rejoinWait;
    this.stats.rejoins++;
    this.contacts = sample(this.introducers, this.introducers.length);
    this._joinNext(now);
  }

  /** @param {string} from @param {string} peer @param {number} ttl @param {number} now */
  _forwardJoin(from, peer, ttl, now) {
    if (peer === this.me) return;
    const accept = () => {
      if (this.active.includes(peer)) return;
      this._addActive(peer, now);
      if (this.active.includes(peer)) this._send(peer, { type: 'neighbor', high: true }, now);
    };
    if (ttl === 0 || this.active.length <= 1) { accept(); return; }
    if (ttl === this.c.passiveWalk) this._addPassive(peer);
    const next = pick(this.active.filter((a) => a !== from && a !== peer));
    if (next !== undefined) this._send(next, { type: 'forward_join', peer, ttl: ttl - 1 }, now);
    else accept();
  }

  /** @param {number} now */
  _startShuffle(now) {
    const target = pick(this.active);
    if (target === undefined) return;
    const peers = [this.me, ...sample(this.active, this.c.shuffleActive), ...sample(this.passive, this.c.shufflePassive)]
      .filter((p) => p !== target)
      .slice(0, MAX_LISTED);
    this._send(target, { type: 'shuffle', origin: this.me, ttl: this.c.activeWalk, peers }, now);
  }

  /** @param {string} from @param {string} origin @param {number} ttl @param {string[]} peers @param {number} now */
  _shuffle(from, origin, ttl, peers, now) {
    if (ttl > 1 && this.active.length > 1) {
      const next = pick(this.active.filter((a) => a !== from && a !== origin));
      if (next !== undefined) { this._send(next, { type: 'shuffle', origin, ttl: ttl - 1, peers }, now); return; }
    }
    const reply = sample(this.passive, peers.length);
    this._send(from, { type: 'shuffle_reply', peers: reply }, now);
    this._merge(peers, reply);
  }

  /** @param {string[]} peers @param {string[]} sent */
  _merge(peers, sent) {
    const spare = [...sent];
    for (const p of peers.slice(0, MAX_LISTED)) {
      if (p === this.me || this.active.includes(p) || this.passive.includes(p)) continue;
      if (this.passive.length >= this.c.passiveView && spare.length) {
        const s = spare.pop();
        this.passive = this.passive.filter((x) => x !== s);
      }
      this._addPassive(p);
    }
  }

  /**
   * @param {string} from @param {string} id @param {string} origin @param {number} hops
   * @param {boolean} all @param {Uint8Array} payload @param {number} now
   */
  _gossip(from, id, origin, hops, all, payload, now) {
    if (this.seen.has(id)) {
      // Pruned on the second duplicate in a row from the same neighbour
      // (one is often two broadcasts crossing).
      this.stats.duplicates++;
      const n = (this.dupStreak.get(from) ?? 0) + 1;
      if (n < 2) { this.dupStreak.set(from, n); return; }
      this.dupStreak.delete(from);
      if (this.eager.delete(from)) this.lazy.add(from);
      this.stats.prunes++;
      this._send(from, { type: 'prune' }, now);
      return;
    }
    this.dupStreak.delete(from);
    this._remember(id, now);
    this._learnRoute(origin, from, now);
    this.missing.delete(id);
    if (this.active.includes(from)) { this.lazy.delete(from); this.eager.add(from); }
    hops = Math.min(hops + 1, 65_535);
    this.stats.delivered++;
    if (this.hopsFrom.size >= 4096 && !this.hopsFrom.has(origin)) this.hopsFrom.clear();
    this.hopsFrom.set(origin, hops);
    this.out.push({ type: 'deliver', id, origin, hops, payload });
    if (all) {
      for (const p of this.active) if (p !== from && p !== origin) this._announce(p, id, hops, now);
    } else if (origin !== this.me) {
      this._push(id, origin, hops, payload, from, now);
    }
    if (origin !== this.me) this._cache(id, { from, origin, hops, payload, at: now });
  }

  /** @param {string} peer @param {string} id @param {number} hops @param {number} now */
  _announce(peer, id, hops, now) {
    const l = this.lazyOut.get(peer) ?? [];
    l.push([id, hops]);
    this.lazyOut.set(peer, l);
    if (this.lazyFlush === null) this.lazyFlush = now + this.c.ihaveDelayMs;
  }

  /**
   * @param {string} id @param {string} origin @param {number} hops @param {Uint8Array} payload
   * @param {string | null} except @param {number} now
   */
  _push(id, origin, hops, payload, except, now) {
    for (const p of [...this.eager]) {
      if (p === except || p === origin) continue;
      this.stats.forwarded++;
      this._send(p, { type: 'gossip', id, origin, hops, payload }, now);
    }
    for (const p of this.lazy) if (p !== except && p !== origin) this._announce(p, id, hops, now);
  }

  /** @param {string} from @param {string} id @param {number} hops @param {number} now */
  _maybeOptimize(from, id, hops, now) {
    const c = this.cache.get(id);
    if (!c || hops + 1 + this.c.optimizationHops > c.hops || !this.lazy.has(from)) return;
    const old = c.from;
    c.from = from;
    c.hops = hops + 1;
    this.lazy.delete(from);
    this.eager.add(from);
    this._send(from, { type: 'graft' }, now);
    if (old !== null && old !== from && this.eager.delete(old)) {
      this.lazy.add(old);
      this.stats.prunes++;
      this._send(old, { type: 'prune' }, now);
    }
  }

  /** @param {string} id @param {number} now */
  _graft(id, now) {
    const m = this.missing.get(id);
    if (!m) return;
    let a;
    while ((a = m.announcers.shift()) !== undefined) {
      const [peer] = a;
      if (!this.active.includes(peer)) continue;
      m.deadline = now + this.c.graftRetryMs;
      this.lazy.delete(peer);
      this.eager.add(peer);
      this.stats.grafts++;
      this._send(peer, { type: 'graft', id }, now);
      return;
    }
    this.missing.delete(id);
  }

  /**
   * Keeps a broadcast for grafts, within `cacheBytes` (the oldest go first).
   * @param {string} id
   * @param {{ from: string | null, origin: string, hops: number, payload: Uint8Array, at: number }} entry
   */
  _cache(id, entry) {
    const old = this.cache.get(id);
    if (old) this.cacheUsed -= old.payload.length;
    this.cache.set(id, entry);
    this.cacheUsed += entry.payload.length;
    for (const [k, c] of this.cache) {
      if (this.cacheUsed <= this.c.cacheBytes) break;
      this.cache.delete(k);
      this.cacheUsed -= c.payload.length;
    }
  }

  /** @param {string} id @param {number} now */
  _remember(id, now) {
    this.seen.set(id, now);
    if (this.seen.size > this.c.maxIds) {
      const first = this.seen.keys().next().value;
      if (first !== undefined) this.seen.delete(first);
    }
  }

  /** @param {number} now */
  _tick(now) {
    for (const [p, c] of [...this.conns]) {
      if (!c.up && c.deadline <= now) {
        this.conns.delete(p);
        this._setupFailed(p, c, now);
        this.out.push({ type: 'close', peer: p });
        this._lost(p, now);
      }
    }
    for (const [p, r] of [...this.retry]) {
      if (r.at > now || this.conns.has(p) || !this._makeRoom()) continue;
      const messages = r.messages.splice(0);
      for (const m of messages) this._send(p, m, now);
      const c = this.conns.get(p);
      if (c) c.direct = true;
    }
    for (const [p, d] of [...this.pending]) {
      if (d > now) continue;
      if (this.conns.delete(p)) this.out.push({ type: 'close', peer: p });
      this._lost(p, now);
    }
    while (this.active.length > this._cap()) this._evict(/** @type {string} */ (pick(this.active)), now);
    for (const [p, c] of [...this.conns]) {
      const keep = c.direct ? this.c.idleCloseMs : this.c.lingerMs;
      if (c.up && !this.active.includes(p) && !this.pending.has(p) && c.lastUsed + keep <= now) {
        this.conns.delete(p);
        this.out.push({ type: 'close', peer: p });
      }
    }
    this._fillActive(now);
    this._rejoinIfAlone(now);
    for (const [p, until] of this.refused) if (until <= now) this.refused.delete(p);
    for (const [d, r] of this.routes) if (r.until <= now) this.routes.delete(d);
    for (const [id, t] of this.seen) { if (t + this.c.idMs > now) break; this.seen.delete(id); }
    for (const [id, c] of this.cache) {
      if (c.at + this.c.cacheMs > now) break;
      this.cache.delete(id);
      this.cacheUsed -= c.payload.length;
    }
  }

  _makeRoom() {
    if (this.conns.size < this.c.maxConnections) return true;
    /** @type {string | null} */
    let victim = null;
    let oldest = Infinity;
    for (const [p, c] of this.conns) {
      if (c.up && !this.active.includes(p) && !this.pending.has(p) && c.lastUsed < oldest) { victim = p; oldest = c.lastUsed; }
    }
    if (victim === null) return false;
    this.conns.delete(victim);
    this.out.push({ type: 'close', peer: victim });
    return true;
  }

  /** @param {string} peer @param {number} now */
  _open(peer, now) {
    if (!this._makeRoom()) return false;
    this.conns.set(peer, { up: false, deadline: now + this.c.connectTimeoutMs, queue: [], queuedBytes: 0, lastUsed: now, direct: false });
    this.out.push({ type: 'connect', peer });
    return true;
  }

  /** @param {string} to @param {OverlayMessage} message @param {number} now */
  _send(to, message, now) {
    if (!this.conns.has(to) && !this._open(to, now)) { this.stats.dropped++; this.pending.delete(to); return; }
    const c = /** @type {Conn} */ (this.conns.get(to));
    c.lastUsed = now;
    if (c.up) { this.out.push({ type: 'send', peer: to, message }); return; }
    const size = queuedSize(message);
    if (c.queuedBytes + size > this.c.maxQueuedBytes) { this.stats.dropped++; return; }
    c.queuedBytes += size;
    c.queue.push(message);
  }
}

/** Roughly what a message costs in a setup queue (as the Rust twin counts it). @param {OverlayMessage} m */
function queuedSize(m) {
  switch (m.type) {
    case 'gossip': case 'direct': case 'relay': case 'unreachable': return m.payload.byteLength + 32;
    case 'ihave': return m.ids.length * 10 + 4;
    default: return 64;
  }
}
