// A joined room: a full mesh of WebRTC connections with perfect
// negotiation, named channels, ICE restarts, and the signaling link under
// it. The browser's twin of crates/peer (room.rs, mesh.rs): the same
// conventions (docs/PROTOCOL.md, "Peers"), so browsers and native peers
// share rooms.
//
//   const room = new Room({ server: location.origin, room: 'lobby', channels: [reliable('chat')] });
//   room.on('channel_open', (ch) => ch.on('message', (m) => console.log(ch.peer, m)));
//   await room.join();

import { Emitter } from './events.js';
import { Channel } from './channel.js';
import { Signaling, SignalingError } from './signaling.js';
import { Overlay, CHANNEL_LABEL, encode as encodeOverlay, decode as decodeOverlay } from './overlay.js';
import { parseSignal } from './protocol.js';
import { RoomSecret, EVERYONE, REFUSED_KEY, sdpFingerprint } from './e2e.js';
import { SealedChannel, SealError } from './sealed.js';
import { Conn } from './conn.js';

/** What a `direct` message adds to its payload on the wire (generously), as in the Rust twin. */
const DIRECT_OVERHEAD = 64;

/** Largest message {@link Room.broadcast} and {@link Room.sendTo} take (as in Rust). */
export const MAX_ROOM_MESSAGE = 64 * 1024;
/** Key of the server-routed messages that turn an overlay offer down (`busy`), or ask for signals through the server (`via_server`). */
export const BUSY_KEY = 'peerlink_overlay';
export const VIA_SERVER = 'via_server';
/** How long a peer that refused a relayed offer is signalled through the server (ms), and at most how many. */
const SERVER_ONLY_MS = 60_000;
/** How long an offer relayed over the overlay waits for its answer before the connection starts over through the server (ms). */
const RELAYED_ANSWER_MS = 3_000;
const MAX_SERVER_ONLY = 1024;

/** @typedef {import('./channel.js').ChannelSpec} ChannelSpec */
/** @typedef {import('./protocol.js').ServerMsg} ServerMsg */
/** @typedef {import('./protocol.js').Signal} Signal */
/** @typedef {{ local: Uint8Array, remote: Uint8Array }} SignalKeys  from pairing: MAC ours, check theirs */
/** @typedef {import('./conn.js').ConnState} ConnState */
/** @typedef {import('./conn.js').Path} Path */
/** @typedef {import('./conn.js').PeerStats} PeerStats */




/**
 * @typedef {object} RoomOptions
 * @property {string} server          signaling server (`http://host:port`, `ws://host:port/ws`, `host:port`)
 * @property {string[]} [fallbackServers] other nodes of the same deployment to reconnect to when the server goes away
 * @property {string} room
 * @property {string} [name]          display name
 * @property {string} [token]         join token from the application's backend, for servers that require one
 * @property {ChannelSpec[]} [channels] opened to every member by the later joiner
 * @property {boolean} [autoConnect]  full mesh (true), or only {@link Room.connect}
 * @property {RTCIceServer[]} [iceServers] more STUN/TURN servers besides the server's
 * @property {RTCIceTransportPolicy} [iceTransportPolicy] `relay` to offer relayed candidates only
 * @property {number} [connectTimeoutMs] negotiation plus checks per peer (15 s)
 * @property {number} [restartAfterMs] a connection down this long is restarted (1 s; the polite side 2 s)
 * @property {number} [giveUpAfterMs] down this long: failed for good (60 s)
 * @property {import('./channel.js').ChannelOptions} [channelOptions]
 * @property {string} [roomSecret] an end-to-end encrypted room: the secret every member shares (the link's `#k=`), never sent to the server; offers and answers are authenticated with keys from it (members without it, or a server changing them, are refused: `auth_failed`) and {@link Room.sendViaServer} seals its messages (the server relays ciphertext)
 * @property {boolean | import('./overlay.js').OverlayConfig} [overlay] join as a member of an overlay (large rooms; every member joins this way): a handful of connections whatever the room's size, {@link Room.broadcast} and {@link Room.sendTo}; `channels` and `autoConnect` are not used
 * @property {typeof RTCPeerConnection} [RTCPeerConnection]
 * @property {typeof WebSocket} [WebSocket]
 */

/**
 * @typedef {object} RoomEvents
 * @property {{ peer: string, name: string | null }} peer_joined
 * @property {{ peer: string }} peer_left
 * @property {{ peer: string, state: ConnState }} state
 * @property {Channel} channel_open
 * @property {{ peer: string, label: string }} channel_close
 * @property {{ from: string, data: unknown }} server_message
 * @property {{ peer: string, reason: string }} auth_failed
 * @property {{ from: string, reason: string }} server_message_refused  in an end-to-end encrypted room, a message through the server not sealed with the room's key for us: dropped
 * @property {{ code: string, message: string }} server_error
 * @property {{ attempt: number, inMs: number, reason: string }} reconnecting
 * @property {{ id: string, resumed: boolean }} rejoined   after a reconnect: `resumed` when the server gave our id back (every connection kept), else with a new id (connections rebuilt)
 * @property {{ from: string, data: Uint8Array, kind: 'broadcast' | 'direct', hops?: number }} message  sent with broadcast() or sendTo() (overlay rooms)
 * @property {{ peer: string, messages: number }} send_failed  messages sent with sendTo() that could not be delivered (no connection in three attempts)
 * @property {{ peer: string, track: MediaStreamTrack, stream: MediaStream }} track  a peer sends a camera, microphone or screen (again: the same track object may come back after `track_removed`)
 * @property {{ peer: string, track: MediaStreamTrack, stream: MediaStream }} track_removed  that peer stopped sending it, or the connection ended
 * @property {{ reason: string }} closed
 */

/** Signals held per member not connected to yet, and members with held signals. */
const MAX_HELD = 64;


const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

/** A signal relayed over the overlay (JSON, as in `signal` messages), or null. @param {Uint8Array} payload */
function relayedSignal(payload) {
  try { return parseSignal(JSON.parse(fromUtf8.decode(payload))); } catch { return null; }
}

/** @extends {Emitter<RoomEvents>} */
export class Room extends Emitter {
  /** @param {RoomOptions} options */
  constructor(options) {
    super();
    this.options = {
      channels: [],
      autoConnect: true,
      connectTimeoutMs: 15_000,
      restartAfterMs: 1_000,
      giveUpAfterMs: 60_000,
      ...options,
    };
    /** @type {string} */
    this.id = '';
    /** @type {Map<string, { name: string | null }>} */
    this.members = new Map();
    /** @type {Map<string, Conn>} */
    this.conns = new Map();
    /** @type {Map<string, Signal[]>} */
    this.held = new Map();
    /**
     * Members kept though the `joined` of our resume did not list them (one
     * may be reconnecting too): taken for gone once their connection fails
     * (at once without a live one), unless it comes up again, a
     * `peer_joined` names them or a signal from them through the server
     * shows them still there. Mirrors the native `Mesh`.
     * @type {Set<string>}
     */
    this.unconfirmed = new Set();
    /** @type {RTCIceServer[]} */
    this.iceServers = [];
    this.closed = false;
    this.leaving = false;
    /** @type {Overlay | null} */
    this.overlay = null;
    /** @type {Map<string, Channel[]>} the overlay's channels by peer */
    this.overlayChannels = new Map();
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.overlayTimer = null;
    /** _overlayRun is carrying out outputs: one called meanwhile leaves the new ones to it. */
    this.overlayRunning = false;
    /** Signals for our connections sent through the server (overlay rooms). */
    this.signalsViaServer = 0;
    /** @type {Map<string, number>} peers signalled through the server until (ms): they refused a relayed offer */
    this.serverOnly = new Map();
    /** @type {Map<MediaStreamTrack, MediaStream>} tracks sent to every peer (a call) */
    this.localTracks = new Map();
    /** an end-to-end encrypted room's keys */
    this.secret = options.roomSecret ? new RoomSecret(options.roomSecret, options.room) : null;
    /** @type {Promise<unknown>} server-routed messages sealed one after another (they leave in order) */
    this._sealing = Promise.resolve();
    /** @type {Promise<unknown>} and opened one after another (they are delivered in order) */
    this._opening = Promise.resolve();
    if (options.overlay) this.options.autoConnect = false;
    this.signaling = new Signaling({
      server: options.server,
      fallbackServers: options.fallbackServers,
      room: options.room,
      name: options.name,
      token: options.token,
      WebSocket: options.WebSocket,
    });
  }

  /**
   * Connects to the signaling server, joins the room and starts connecting
   * to everyone in it. Listen for events before calling it.
   */
  async join() {
    /** @type {import('./signaling.js').Session} */
    let session;
    try {
      session = await this.signaling.connect();
    } catch (e) {
      // Left while joining: the room is closed (and says so) as after a join.
      if (this.leaving) this._close('left the room before it was joined');
      throw e;
    }
    // Left as the join came in: `leave` told the server; nothing starts.
    if (this.signaling.closed) {
      this._close('left the room before it was joined');
      throw new SignalingError('closed', 'left the room before it was joined');
    }
    this.signaling.on('message', (msg) => this._onServer(msg));
    // Peer connections do not need the server once up: they carry on
    // while signaling reconnects.
    this.signaling.on('reconnecting', (r) => this.emit('reconnecting', r));
    this.signaling.on('joined', (s) => {
      const resumed = s.resumed;
      // Not resumed (a new id, or our place was gone and the others were
      // told we left): today's connections go and the room is joined
      // afresh. Resumed: members we know are kept (one not listed may be
      // reconnecting too, after a server restart).
      if (!resumed) for (const peer of [...this.members.keys()]) this._removeMember(peer);
      else if (s.size === undefined && !this.options.overlay) {
        // A whole list: who is not on it may have left while we were away
        // (its `peer_left` written to our old socket).
        const listed = new Set(s.peers.map((p) => p.id));
        this.unconfirmed = new Set([...this.members.keys()].filter((p) => !listed.has(p)));
        // One without a live connection has nothing left to tell us.
        for (const peer of [...this.unconfirmed]) {
          const c = this.conns.get(peer);
          if (!c || c.state === 'failed' || c.state === 'closed') this._removeMember(peer);
        }
      }
      // Resumed: members we do not know yet are connected to as a joiner
      // would; the others are kept as they are.
      this._start(s);
      // Fresh TURN credentials for the connections we keep: their next
      // ICE restart allocates with them.
      for (const c of this.conns.values()) c.setIceServers(this.iceServers);
      this.emit('rejoined', { id: s.id, resumed });
    });
    this.signaling.on('closed', ({ reason }) => this._close(reason));
    this._start(session);
    return this;
  }

  /** @param {import('./signaling.js').Session} session */
  _start(session) {
    this.id = session.id;
    this.iceServers = [...(session.iceServers ?? []), ...(this.options.iceServers ?? [])];
    if (this.options.overlay) {
      const now = Date.now();
      const config = typeof this.options.overlay === 'object' ? this.options.overlay : {};
      if (!this.overlay || this.overlay.me !== this.id) this.overlay = new Overlay(this.id, config, now);
      if (session.size !== undefined) {
        // A large room: a sample to meet, not the room's list.
        for (const p of session.peers) if (!this.members.has(p.id)) this.members.set(p.id, { name: p.name ?? null });
      } else {
        for (const p of session.peers) this._memberJoined(p.id, p.name ?? null, true);
      }
      this.overlay.join(session.peers.map((p) => p.id), session.size ?? session.peers.length, now);
      this._overlayRun();
      return;
    }
    for (const p of session.peers) this._memberJoined(p.id, p.name ?? null, true);
  }

  /**
   * Carries out what the overlay asks, and sets its timer. Called again
   * while it runs (an output that leads to more), it returns at once: the
   * loop running takes the new outputs, in order.
   */
  _overlayRun() {
    const ov = this.overlay;
    if (!ov || this.closed || this.overlayRunning) return;
    this.overlayRunning = true;
    try {
      this._overlayOutputs(ov);
    } finally {
      this.overlayRunning = false;
    }
    if (this.overlayTimer) clearTimeout(this.overlayTimer);
    const at = ov.pollTimeout();
    this.overlayTimer = at === null ? null : setTimeout(() => {
      this.overlayTimer = null;
      ov.handleTimeout(Date.now());
      this._overlayRun();
    }, Math.max(0, at - Date.now()));
  }

  /** @param {Overlay} ov */
  _overlayOutputs(ov) {
    let out;
    while ((out = ov.pollOutput())) {
      switch (out.type) {
        case 'connect': {
          const peer = out.peer;
          if (!this.members.has(peer)) this.members.set(peer, { name: null });
          const conn = this.conns.get(peer);
          if (conn && conn.state !== 'failed' && conn.state !== 'closed') {
            if (this.overlayChannels.has(peer)) ov.connected(peer, Date.now());
          } else {
            this._createConn(peer, [{ label: CHANNEL_LABEL, reliability: 'reliable' }], null);
          }
          break;
        }
        case 'close': {
          // Forgotten first: its close is not news to the overlay.
          const conn = this.conns.get(out.peer);
          this.overlayChannels.delete(out.peer);
          this.conns.delete(out.peer);
          conn?.close();
          break;
        }
        case 'send': {
          const ch = (this.overlayChannels.get(out.peer) ?? []).find((c) => !c.isClosed);
          if (!ch) break;
          ch.send(encodeOverlay(out.message)).catch(() => { ov.stats.dropped++; });
          break;
        }
        case 'deliver':
          this.emit('message', { from: out.origin, data: out.payload, kind: 'broadcast', hops: out.hops });
          break;
        case 'direct':
          this.emit('message', { from: out.from, data: out.payload, kind: 'direct' });
          break;
        case 'direct_failed':
          this.emit('send_failed', { peer: out.peer, messages: out.messages });
          break;
        case 'relayed': {
          const signal = relayedSignal(out.payload);
          if (!signal) break;
          // Its sender is who the writer says it is: it may set up a
          // connection, never touch one that is up. An offer for one (its
          // writer replaced a connection we still hold) is asked for again
          // through the server, which vouches for who sends it.
          const conn = this.conns.get(out.from);
          if (conn && conn.state !== 'connecting') {
            if (signal.kind === 'offer') this._sendViaServer(out.from, { [BUSY_KEY]: VIA_SERVER });
            break;
          }
          this._signalFrom(out.from, signal, true);
          break;
        }
        case 'relay_failed': {
          // Came back: through the server, where nothing is in its way.
          const signal = relayedSignal(out.payload);
          if (!signal) break;
          this.signalsViaServer++;
          this.signaling.send({ type: 'signal', room: this.options.room, to: out.to, signal });
          break;
        }
        default:
          break;
      }
    }
  }

  /** A channel opened: the overlay's is kept here, others go to the application. @param {Channel} ch */
  _channelOpen(ch) {
    if (!this.overlay || ch.label !== CHANNEL_LABEL) {
      this.emit('channel_open', ch);
      return;
    }
    const peer = ch.peer;
    const list = this.overlayChannels.get(peer) ?? [];
    list.push(ch);
    this.overlayChannels.set(peer, list);
    ch.on('message', (m) => {
      if (typeof m === 'string' || !this.overlay) return;
      // Not once the overlay let the connection go (a `disconnect` just
      // handled): it would count the connection as up again, with no channel.
      if (!this.overlayChannels.get(peer)?.includes(ch)) return;
      try {
        this.overlay.handleMessage(peer, decodeOverlay(m), Date.now());
      } catch {
        return; // a malformed or newer message: dropped
      }
      this._overlayRun();
    });
    if (list.length === 1) {
      this.overlay.connected(peer, Date.now());
      this._overlayRun();
    }
  }

  /** @param {string} peer @param {string} label */
  _channelClose(peer, label) {
    if (!this.overlay || label !== CHANNEL_LABEL) {
      this.emit('channel_close', { peer, label });
      return;
    }
    const list = (this.overlayChannels.get(peer) ?? []).filter((c) => !c.isClosed);
    if (list.length) {
      this.overlayChannels.set(peer, list);
      return;
    }
    this._overlayDown(peer);
  }

  /** The connection to `peer` is gone for the overlay. @param {string} peer */
  _overlayDown(peer) {
    if (!this.overlay) return;
    this.overlayChannels.delete(peer);
    const conn = this.conns.get(peer);
    this.conns.delete(peer);
    conn?.close();
    this.overlay.disconnected(peer, Date.now());
    this._overlayRun();
  }

  /**
   * Sends `data` to every member of the room (overlay rooms); each gets a
   * `message` event.
   * @param {Uint8Array | string} data
   */
  broadcast(data) {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    if (!this.overlay) throw new Error('this room has no overlay: join with `overlay: true` to broadcast');
    if (bytes.length > MAX_ROOM_MESSAGE) throw new Error(`room message of ${bytes.length} bytes exceeds the maximum of ${MAX_ROOM_MESSAGE}`);
    this.overlay.broadcast(bytes, Date.now());
    this._overlayRun();
  }

  /**
   * Sends `data` to `peer` alone, over a direct connection opened on
   * demand (overlay rooms). Returns false if it could not be queued: too
   * much waits for the connection to come up or, once up, in its channel's
   * send queue (what the overlay hands a full channel would be lost), or
   * no connection can be opened; try again later.
   * @param {string} peer
   * @param {Uint8Array | string} data
   */
  sendTo(peer, data) {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    if (!this.overlay) throw new Error('this room has no overlay: join with `overlay: true` to send to one peer');
    if (bytes.length > MAX_ROOM_MESSAGE) throw new Error(`room message of ${bytes.length} bytes exceeds the maximum of ${MAX_ROOM_MESSAGE}`);
    const ch = (this.overlayChannels.get(peer) ?? []).find((c) => !c.isClosed);
    if (ch && !ch.fits(bytes.length + DIRECT_OVERHEAD)) return false;
    const ok = this.overlay.sendDirect(peer, bytes, Date.now());
    this._overlayRun();
    return ok;
  }

  /**
   * The overlay's neighbours and counters, or null without one.
   * `signalsRelayed`: signals for our connections sent over the overlay;
   * `signalsViaServer`: through the server (no route known, or one came
   * back); `relaysReceived`, `relaysForwarded` (for others), `relaysFailed`
   * (came back unreachable, then sent through the server).
   */
  overlayStats() {
    const ov = this.overlay;
    if (!ov) return null;
    const { relayed, ...stats } = ov.stats;
    return {
      neighbors: [...ov.active], passive: ov.passive.length, connections: ov.conns.size, ...stats,
      signalsRelayed: relayed, signalsViaServer: this.signalsViaServer,
    };
  }

  /**
   * @param {string} peer
   * @param {string | null} name
   * @param {boolean} initiator  listed in `joined`: we make the connection
   */
  _memberJoined(peer, name, initiator) {
    // Known already: the server says it is here (see `unconfirmed`).
    this.unconfirmed.delete(peer);
    if (peer === this.id || this.members.has(peer)) return;
    this.members.set(peer, { name });
    this.emit('peer_joined', { peer, name });
    this.overlay?.peerKnown(peer);
    if (this.options.autoConnect) {
      const conn = this._createConn(peer, initiator ? this.options.channels ?? [] : [], null);
      // The one who connects makes the first offer: with the signaling
      // channel in it, even in a room with no channels (a call).
      if (initiator) conn.openSignalChannel();
    }
  }

  /**
   * @param {string} peer
   * @param {ChannelSpec[]} channels
   * @param {SignalKeys | null} keys
   */
  _createConn(peer, channels, keys) {
    const existing = this.conns.get(peer);
    if (existing && existing.state !== 'failed' && existing.state !== 'closed') {
      for (const spec of channels) existing.openChannel(spec);
      return existing;
    }
    existing?.close();
    // Pairing's keys, else the room secret's: every SDP authenticated.
    const conn = new Conn(this, peer, this.id < peer, keys ?? this.secret?.signalKeys(this.id, peer) ?? null);
    this.conns.set(peer, conn);
    // Held signals first: a side that holds the peer's offer answers it
    // instead of making an offer of its own.
    for (const signal of this.held.get(peer) ?? []) conn.onSignal(signal);
    this.held.delete(peer);
    for (const spec of channels) conn.openChannel(spec);
    return conn;
  }

  /**
   * An offer relayed over the overlay RELAYED_ANSWER_MS ago: unanswered (it
   * may have been lost with a link on the way), the connection starts over
   * through the server.
   * @param {string} peer
   * @param {Conn} conn
   */
  _relayedOfferDue(peer, conn) {
    conn.relayTimer = null;
    if (this.conns.get(peer) === conn && conn.state === 'connecting' && !conn.pc.remoteDescription) this._startOver(peer);
  }

  /**
   * Starts the connection to `peer` over, signalling it through the server
   * for a while: its relayed offer was refused or went unanswered.
   * @param {string} peer
   */
  _startOver(peer) {
    const now = Date.now();
    if (this.serverOnly.size >= MAX_SERVER_ONLY) {
      for (const [p, until] of this.serverOnly) if (until <= now) this.serverOnly.delete(p);
    }
    if (this.serverOnly.size < MAX_SERVER_ONLY) this.serverOnly.set(peer, now + SERVER_ONLY_MS);
    const conn = this.conns.get(peer);
    this.conns.delete(peer);
    conn?.close();
    this._createConn(peer, [{ label: CHANNEL_LABEL, reliability: 'reliable' }], null);
  }

  /**
   * A signal from `from`, through the server or relayed over the overlay;
   * through the server, our signals for that connection go that way too.
   * @param {string} from
   * @param {Signal} signal
   * @param {boolean} [relayed]
   */
  _signalFrom(from, signal, relayed = false) {
    if (!relayed) {
      // The server relays only between members: still one, and one taken
      // for gone (see `unconfirmed`) is one again.
      this.unconfirmed.delete(from);
      if (!this.overlay) this._memberJoined(from, null, false);
    }
    this._takeSignal(from, signal);
    const conn = this.conns.get(from);
    if (!relayed && conn) conn.serverSignalled = true;
  }

  /** @param {string} from @param {Signal} signal */
  _takeSignal(from, signal) {
    const old = this.conns.get(from);
    // An offer for a connection that failed (its peer connection is closed)
    // starts a new one: the peer tries again, perhaps after its own
    // reconnect, and a failed connection would swallow every offer.
    // An offer of a new session: the remote closed our connection and
    // opened another before we noticed; this offer is not for ours.
    if (old && signal.kind === 'offer' && (old.state === 'failed' || old.state === 'closed' || old.isNewSession(signal.sdp))) {
      this.overlayChannels.delete(from);
      this.conns.delete(from);
      old.close();
      this.overlay?.disconnected(from, Date.now());
    }
    const conn = this.conns.get(from);
    if (conn) conn.onSignal(signal);
    else if (this.overlay && signal.kind === 'offer') {
      // The overlay takes an offer within its connection limit, and says
      // no through the server otherwise.
      if (this.overlay.accept(from, Date.now())) {
        if (!this.members.has(from)) this.members.set(from, { name: null });
        this._createConn(from, [], null).onSignal(signal);
      } else {
        this._sendViaServer(from, { [BUSY_KEY]: 'busy' });
      }
      this._overlayRun();
    }
    else if (this.options.autoConnect && this.members.has(from)) this._createConn(from, [], null).onSignal(signal);
    else if (this.overlay || this.members.has(from)) {
      // Not connected to yet: held for connect(), or (overlay rooms) for
      // the offer, which a relayed signal may overtake; within bounds.
      if (!this.held.has(from) && this.held.size >= MAX_HELD) {
        if (!this.overlay) return;
        // Overlay rooms have no presence to clear them: another goes.
        const old = this.held.keys().next().value;
        if (old !== undefined) this.held.delete(old);
      }
      const q = this.held.get(from) ?? [];
      if (q.length >= MAX_HELD) q.shift();
      q.push(signal);
      this.held.set(from, q);
    }
  }

  /**
   * A connection's state changed: a member not listed on our resume is
   * confirmed once it is up, and taken for gone once it fails (a browser's
   * connection is `closed` only by our own close, as by `disconnect()`,
   * which keeps the member).
   * @param {import('./conn.js').Conn} conn @param {string} state
   */
  _connState(conn, state) {
    const peer = conn.peer;
    if (this.conns.get(peer) !== conn || !this.unconfirmed.has(peer)) return;
    if (state === 'connected') this.unconfirmed.delete(peer);
    else if (state === 'failed') {
      // Once the connection has finished failing, unless an offer replaced it.
      queueMicrotask(() => {
        if (this.unconfirmed.has(peer) && (this.conns.get(peer) ?? conn) === conn) this._removeMember(peer);
      });
    }
  }

  /** @param {string} peer */
  _removeMember(peer) {
    this.held.delete(peer);
    this.unconfirmed.delete(peer);
    this.conns.get(peer)?.close();
    this.conns.delete(peer);
    if (this.members.delete(peer)) this.emit('peer_left', { peer });
  }

  /**
   * A message through the server (opened, in a secret room): the overlay's
   * own, or the application's.
   * @param {string} from @param {unknown} data
   */
  _serverMessage(from, data) {
    const d = /** @type {any} */ (data);
    if (this.secret && d && typeof d === 'object' && typeof d[REFUSED_KEY] === 'string') {
      // A member refused what reached it as our signaling. Sealed messages
      // carry no counter, so the server could replay an old notice: it
      // only ends a connection not yet up.
      const conn = this.conns.get(from);
      if (conn?.state !== 'connected') {
        const reason = `it refused our signaling: ${d[REFUSED_KEY]}`;
        conn?._fail(reason);
        this.emit('auth_failed', { peer: from, reason });
      }
    } else if (this.overlay && d && typeof d === 'object' && d[BUSY_KEY] === 'busy') {
      this._overlayDown(from);
    } else if (this.overlay && d && typeof d === 'object' && d[BUSY_KEY] === VIA_SERVER) {
      // Our relayed offer was refused.
      if (this.conns.get(from)?.state === 'connecting') this._startOver(from);
    } else {
      this.emit('server_message', { from, data });
    }
  }

  /** @param {ServerMsg} msg */
  _onServer(msg) {
    switch (msg.type) {
      case 'peer_joined':
        this._memberJoined(msg.peer.id, msg.peer.name ?? null, false);
        break;
      case 'peer_left':
        this._removeMember(msg.peer_id);
        if (this.overlay) {
          this.overlayChannels.delete(msg.peer_id);
          this.overlay.peerGone(msg.peer_id, Date.now());
          this._overlayRun();
        }
        break;
      case 'signal':
        this._signalFrom(msg.from, msg.signal);
        break;
      case 'message': {
        if (!this.secret) {
          this._serverMessage(msg.from, msg.data);
          break;
        }
        const { from, data } = msg;
        const secret = this.secret;
        // Room-wide messages are sealed to `*`, the rest to us.
        this._opening = this._opening
          .then(() => secret.open(from, this.id, data).catch(() => secret.open(from, EVERYONE, data)))
          .then((d) => this._serverMessage(from, d), (e) => this.emit('server_message_refused', { from, reason: e.message }));
        break;
      }
      case 'error':
        this.emit('server_error', { code: msg.code, message: msg.message });
        break;
      default:
        break;
    }
  }

  /**
   * Connects to `peer`, a member, opening `channels` (for rooms without
   * `autoConnect`); on a live connection it only opens the channels.
   * `offer: false` (with no channels) makes no offer: the connection waits
   * for the peer's, with these keys. When both sides know who connects,
   * one side offering avoids two first offers crossing: Chromium does not
   * reliably recover from rolling back a connection's first offer (a
   * browser-to-browser transfer failed to connect about one time in six).
   * @param {string} peer
   * @param {{ channels?: ChannelSpec[], keys?: SignalKeys | null, offer?: boolean }} [opts]
   */
  connect(peer, opts = {}) {
    if (!this.members.has(peer)) throw new Error(`no peer ${peer} in this room`);
    const conn = this._createConn(peer, opts.channels ?? [], opts.keys ?? null);
    if (opts.offer !== false) conn.openSignalChannel();
  }

  /** Closes the connection to `peer`; it stays a member. @param {string} peer */
  disconnect(peer) {
    this.conns.get(peer)?.close();
    this.conns.delete(peer);
  }

  /**
   * Opens another channel to `peer` (the other side gets `channel_open` too).
   * @param {string} peer
   * @param {ChannelSpec} spec
   */
  openChannel(peer, spec) {
    const conn = this.conns.get(peer);
    if (!conn) throw new Error(`no connection to ${peer}`);
    conn.openChannel(spec);
  }

  /**
   * Sends `data` through the server to `to`, or to every other member:
   * whether it was queued (in an end-to-end encrypted room, sealed first,
   * so a promise of that). False also while the link to the server holds
   * 24 MiB (the application sends faster than it drains: try again later;
   * the rest is kept for the room's own signals), as the native
   * `Error::SignalingBusy`.
   * @param {string | null} to
   * @param {unknown} data
   * @returns {boolean | Promise<boolean>}
   */
  sendViaServer(to, data) {
    return this._sendViaServer(to, data, true);
  }

  /**
   * {@link Room.sendViaServer} without the application's limit: the room's
   * own notices (busy, refused) take the share kept for signals.
   * @param {string | null} to
   * @param {unknown} data
   * @param {boolean} [app] an application's message: refused while the link is busy
   * @returns {boolean | Promise<boolean>}
   */
  _sendViaServer(to, data, app = false) {
    if (app && this.signaling.busy()) return this.secret ? Promise.resolve(false) : false;
    const send = (/** @type {unknown} */ d) => {
      // Checked again once sealed: the link may have filled meanwhile.
      if (app && this.signaling.busy()) return false;
      /** @type {Record<string, unknown>} */
      const msg = { type: 'send', room: this.options.room, data: d };
      if (to) msg.to = to;
      return this.signaling.send(/** @type {any} */ (msg));
    };
    if (!this.secret) return send(data);
    // Sealed for the addressee (or everyone), one after another.
    const secret = this.secret;
    const sent = this._sealing.then(() => secret.seal(this.id, to ?? EVERYONE, data)).then(send);
    this._sealing = sent.catch(() => {});
    return sent;
  }

  /**
   * Sends `signal` to `peer`: in an overlay room, over the overlay while the
   * connection has never been up and a route to `peer` is known (a
   * connection that was up re-signals through the server: an ICE restart
   * must not depend on the overlay it may be part of); else through the
   * server.
   * @param {string} peer
   * @param {Signal} signal
   */
  _signal(peer, signal) {
    const ov = this.overlay;
    if (ov) {
      const serverOnly = (this.serverOnly.get(peer) ?? 0) > Date.now();
      const conn = this.conns.get(peer);
      if (!serverOnly && conn?.state === 'connecting' && !conn.serverSignalled && ov.relay(peer, utf8.encode(JSON.stringify(signal)), Date.now())) {
        if (signal.kind === 'offer' && !conn.relayTimer) {
          conn.relayTimer = setTimeout(() => this._relayedOfferDue(peer, conn), RELAYED_ANSWER_MS);
        }
        this._overlayRun();
        return;
      }
      this.signalsViaServer++;
    }
    this.signaling.send({ type: 'signal', room: this.options.room, to: peer, signal });
  }

  /**
   * Sends `track` (a camera, microphone or screen from getUserMedia or
   * getDisplayMedia) to every peer connected now or later, as part of
   * `stream` (tracks of one stream play together at the other end):
   * each connection renegotiates (perfect negotiation, as for channels).
   * Peers that decline media (native peers) keep their data channels.
   * Full-mesh rooms only: an overlay room's neighbours are not its callers.
   * @param {MediaStreamTrack} track @param {MediaStream} stream
   */
  addTrack(track, stream) {
    if (this.overlay) throw new Error('calls need a full-mesh room: an overlay room has no connection to most members');
    this.localTracks.set(track, stream);
    for (const c of this.conns.values()) c.addTrack(track, stream);
  }

  /** Stops sending `track` to everyone (the others see `track_removed`); the track itself is the caller's to stop. @param {MediaStreamTrack} track */
  removeTrack(track) {
    if (!this.localTracks.delete(track)) return;
    for (const c of this.conns.values()) c.removeTrack(track);
  }

  /**
   * Seals `channel` end to end at the application layer (a sealed channel:
   * ECDH P-256 keys bound to this connection's DTLS fingerprints, AES-256-GCM
   * per message), for apps that store or forward what they receive. The
   * other end must seal it too.
   * @param {Channel} channel @param {{ timeoutMs?: number }} [opts]
   */
  async seal(channel, opts) {
    const pc = this.conns.get(channel.peer)?.pc;
    const ours = sdpFingerprint(pc?.localDescription?.sdp ?? '');
    const theirs = sdpFingerprint(pc?.remoteDescription?.sdp ?? '');
    if (!ours || !theirs) throw new SealError('closed', `no connection to ${channel.peer}`);
    return SealedChannel.open(channel, ours, theirs, opts);
  }

  /** Open channels labelled `label`: one per connected peer. @param {string} label */
  openChannels(label) {
    return [...this.conns.values()].flatMap((c) => {
      const ch = c.channels.get(label);
      return ch && !ch.isClosed ? [ch] : [];
    });
  }

  /** @param {string} peer @returns {Promise<PeerStats | null>} */
  async stats(peer) {
    return (await this.conns.get(peer)?.stats()) ?? null;
  }

  /**
   * Restarts ICE on the connection to `peer` (after a network change, or to
   * look for a better path); connections also restart on their own when
   * their path goes down. Once connected, the offer and answer go on the
   * connection's own signaling channel, without the server.
   * @param {string} peer
   */
  restartIce(peer) {
    const conn = this.conns.get(peer);
    if (!conn) throw new Error(`no connection to ${peer}`);
    conn.iceRestarts += 1;
    void conn.restartIce();
  }

  /**
   * Leaves the room and closes every connection, trying not to lose what
   * was sent: first waits, at most `linger` ms, until the channels of
   * every peer connected, or disconnected for the moment (the path may
   * come back within the linger), have handed all queued messages to the
   * browser and the browser has passed them to SCTP (`bufferedAmount` 0), gives them
   * `settle` ms more on the wire, and only then tells the server (members
   * close their connection to a peer that left). A browser cannot see what
   * SCTP has acknowledged: a packet lost in the last `settle` ms is lost.
   * @param {{ linger?: number, settle?: number }} [options]
   */
  async leave({ linger = 5000, settle = 250 } = {}) {
    if (this.closed || this.leaving) return;
    this.leaving = true;
    if (this.overlay) {
      this.overlay.leave(Date.now());
      this._overlayRun();
    }
    const deadline = Date.now() + linger;
    const pending = () =>
      [...this.conns.values()].some(
        (c) => (c.state === 'connected' || c.state === 'disconnected') && [...c.channels.values()].some((ch) => !ch.isGone && (ch.queuedBytes > 0 || ch.bufferedAmount > 0)),
      );
    while (pending() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const connected = [...this.conns.values()].some((c) => c.state === 'connected');
    if (connected && Date.now() < deadline) await new Promise((r) => setTimeout(r, Math.min(settle, deadline - Date.now())));
    this.signaling.close();
  }

  /** @param {string} reason */
  _close(reason) {
    if (this.closed) return;
    this.closed = true;
    if (this.overlayTimer) clearTimeout(this.overlayTimer);
    this.overlayTimer = null;
    for (const peer of [...this.members.keys()]) this._removeMember(peer);
    for (const conn of this.conns.values()) conn.close();
    this.conns.clear();
    this.emit('closed', { reason });
  }
}
