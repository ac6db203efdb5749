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
import { Channel, channelInit } from './channel.js';
import { Signaling } from './signaling.js';
import { signSdp, verifySdp } from './auth.js';
import { Overlay, CHANNEL_LABEL, encode as encodeOverlay, decode as decodeOverlay } from './overlay.js';
import { parseSignal, parseChannelSignal, SIGNAL_LABEL, SIGNAL_HELLO } from './protocol.js';
import { RoomSecret, EVERYONE, REFUSED_KEY, sdpFingerprint, safetyNumber } from './e2e.js';
import { SealedChannel, SealError } from './sealed.js';

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

/** @typedef {'connecting' | 'connected' | 'disconnected' | 'failed' | 'closed'} ConnState */

/**
 * How the data of a connection travels (`Path` in Rust): `relay` if either
 * end is a TURN relay, `host` if both are interface addresses, else `srflx`
 * (direct, through a NAT).
 * @typedef {{ kind: 'host' | 'srflx' | 'relay', local: string, remote: string }} Path
 */

/**
 * @typedef {object} PeerStats
 * @property {ConnState} state
 * @property {Path | null} path
 * @property {number | null} rttMs
 * @property {number} bytesSent
 * @property {number} bytesReceived
 * @property {number} iceRestarts
 * @property {number} signalsSentOnChannel  offers, answers and candidates sent to the peer on the connection's own signaling channel (not through the server)
 * @property {number} signalsReceivedOnChannel  and received from it there
 * @property {string | null} failure  why it failed, when it did
 * @property {string | null} safetyNumber  five groups of five digits from both ends' DTLS fingerprints, the same at both ends (people who read the same number to each other know nobody sits in between)
 * @property {{ framesSent: number, framesDecoded: number, audioPacketsReceived: number }} media  video frames sent and decoded, audio packets received on this connection (a call)
 */

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
/** Remote candidates held until the remote description is set. */
const MAX_EARLY_CANDIDATES = 64;

/** The session id of an SDP's `o=` line, or null. @param {string} sdp */
function sdpSession(sdp) {
  const o = sdp.split(/\r?\n/).find((l) => l.startsWith('o='));
  return o?.split(/\s+/)[1] ?? null;
}

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
    const session = await this.signaling.connect();
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
      // Resumed: members we do not know yet are connected to as a joiner
      // would; the others are kept as they are.
      this._start(s);
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
            if (signal.kind === 'offer') this.sendViaServer(out.from, { [BUSY_KEY]: VIA_SERVER });
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
   * demand (overlay rooms). Returns false if it could not be queued.
   * @param {string} peer
   * @param {Uint8Array | string} data
   */
  sendTo(peer, data) {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    if (!this.overlay) throw new Error('this room has no overlay: join with `overlay: true` to send to one peer');
    if (bytes.length > MAX_ROOM_MESSAGE) throw new Error(`room message of ${bytes.length} bytes exceeds the maximum of ${MAX_ROOM_MESSAGE}`);
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
    for (const spec of channels) conn.openChannel(spec);
    for (const signal of this.held.get(peer) ?? []) conn.onSignal(signal);
    this.held.delete(peer);
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
    this._takeSignal(from, signal);
    const conn = this.conns.get(from);
    if (!relayed && conn) conn.serverSignalled = true;
  }

  /** @param {string} from @param {Signal} signal */
  _takeSignal(from, signal) {
    const old = this.conns.get(from);
    if (old && signal.kind === 'offer' && old.isNewSession(signal.sdp)) {
      // The remote closed our connection and opened another before we
      // noticed: this offer is not for ours, which goes.
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
        this.sendViaServer(from, { [BUSY_KEY]: 'busy' });
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

  /** @param {string} peer */
  _removeMember(peer) {
    this.held.delete(peer);
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
   * @param {string} peer
   * @param {{ channels?: ChannelSpec[], keys?: SignalKeys | null }} [opts]
   */
  connect(peer, opts = {}) {
    if (!this.members.has(peer)) throw new Error(`no peer ${peer} in this room`);
    this._createConn(peer, opts.channels ?? [], opts.keys ?? null).openSignalChannel();
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
   * so a promise of that).
   * @param {string | null} to
   * @param {unknown} data
   * @returns {boolean | Promise<boolean>}
   */
  sendViaServer(to, data) {
    const send = (/** @type {unknown} */ d) => {
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
    conn.pc.restartIce();
  }

  /**
   * Leaves the room and closes every connection, trying not to lose what
   * was sent: first waits, at most `linger` ms, until every connected
   * peer's channels have handed all queued messages to the browser and the
   * browser has passed them to SCTP (`bufferedAmount` 0), gives them
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
        (c) => c.state === 'connected' && [...c.channels.values()].some((ch) => !ch.isClosed && (ch.queuedBytes > 0 || ch.bufferedAmount > 0)),
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

/** One peer connection: perfect negotiation, channels, restarts, timers. */
class Conn {
  /**
   * @param {Room} room
   * @param {string} peer
   * @param {boolean} polite
   * @param {SignalKeys | null} keys
   */
  constructor(room, peer, polite, keys) {
    this.room = room;
    this.peer = peer;
    this.polite = polite;
    this.keys = keys;
    this.sendSeq = 0;
    /** @type {Promise<unknown>} signed SDPs leave one after another */
    this._signing = Promise.resolve();
    /** @type {number | null} */
    this.recvSeq = null;
    /** @type {ConnState} */
    this.state = 'connecting';
    this.everConnected = false;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingAnswer = false;
    this.iceRestarts = 0;
    /** @type {string | null} */
    this.failure = null;
    /** @type {Map<string, Channel>} */
    this.channels = new Map();
    /** @type {RTCIceCandidateInit[]} */
    this.early = [];
    /** @type {string | null} the session id of the remote's SDP: another is another peer connection */
    this.remoteSession = null;
    /** @type {ReturnType<typeof setTimeout> | null} waits for the answer to an offer relayed over the overlay */
    this.relayTimer = null;
    /** a signal for it came through the server: ours go that way too */
    this.serverSignalled = false;
    /** @type {RTCDataChannel[]} open signaling channels (normally one; two if both sides opened one at once) */
    this.signalChannels = [];
    /** the peer said hello on a signaling channel: it reads signals there */
    this.remoteReadsChannel = false;
    /** @type {RTCDataChannel | null} the way our last offer or answer went (null: the server); candidates follow it */
    this.sdpVia = null;
    /** @type {RTCDataChannel | null} the way the peer's last offer came; our answer goes back that way */
    this.offerVia = null;
    this.signalsSentOnChannel = 0;
    this.signalsReceivedOnChannel = 0;
    /** we opened a signaling channel (with our first offer) */
    this.signalChannelAsked = false;
    /** An offer from the peer is in hand (perhaps not yet applied): this side does not make the first offer. */
    this.offerSeen = false;
    /** our last SDP was an answer */
    this.lastSentAnswer = false;
    /** @type {Promise<void>} */
    this.chain = Promise.resolve();
    /** @type {number | null} */
    this.downSince = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.restartTimer = null;
    /** @type {{ label: string, init: RTCDataChannelInit }[]} channels opened before the first offer and answer went through */
    this.unnegotiated = [];
    /** @type {RTCPeerConnection} */
    this.pc = this._newPc();
    /** @type {Map<MediaStreamTrack, MediaStream>} tracks the peer sends us */
    this.remoteTracks = new Map();
    /** the peer rejected the media we offered (a native peer): no more offers of it */
    this.declinesMedia = false;
    /** @type {Map<RTCRtpTransceiver, MediaStreamTrack>} transceivers taken by addTrack whose replaceTrack has not finished, and the track */
    this.reused = new Map();
    /**
     * Tracks are sent once the first offer and answer are through: a member
     * with a camera on, meeting a newcomer, would otherwise offer its video
     * while the newcomer offers its channels, and Chromium does not
     * reliably recover from rolling back a connection's first offer (the
     * newcomer's connection to the one with the camera failed about one
     * time in three).
     */
    this.tracksReady = false;
    this.connectTimer = setTimeout(() => {
      if (!this.everConnected) this._fail(this.pc.remoteDescription ? 'connectivity checks timed out: no candidate pair answered' : 'no answer to the offer arrived (is the other side there?)');
    }, room.options.connectTimeoutMs ?? 15_000);
  }

  /** A peer connection with this connection's handlers. @returns {RTCPeerConnection} */
  _newPc() {
    const room = this.room;
    const PC = room.options.RTCPeerConnection ?? globalThis.RTCPeerConnection;
    const pc = new PC({ iceServers: room.iceServers, iceTransportPolicy: room.options.iceTransportPolicy ?? 'all' });
    pc.onnegotiationneeded = () => this._offer();
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && candidate.candidate) {
        /** @type {Signal} */
        const s = { kind: 'candidate', candidate: candidate.candidate };
        if (candidate.sdpMid !== null && candidate.sdpMid !== undefined) s.mid = candidate.sdpMid;
        this._send(s, this.sdpVia);
      } else if (!candidate) {
        this._send({ kind: 'end_of_candidates' }, this.sdpVia);
      }
    };
    pc.ondatachannel = ({ channel }) => (channel.label === SIGNAL_LABEL ? this._adoptSignal(channel) : this._adopt(channel));
    pc.ontrack = ({ track, streams }) => this._remoteTrack(track, streams[0] ?? new MediaStream([track]));
    pc.onconnectionstatechange = () => this._onState();
    return pc;
  }

  /**
   * The polite side of a collision between both sides' first offers,
   * when the peer's offer names its data m-line otherwise than ours (str0m
   * picks random mids; browsers say "0"): Chromium cannot take that offer
   * after rolling ours back ("Failed to start SCTP transport"). Nothing has
   * been negotiated yet, so this side starts on a fresh peer connection
   * with the same channels (none has opened) and answers there.
   */
  _replaceUnnegotiatedPc() {
    const old = this.pc;
    old.onnegotiationneeded = old.onicecandidate = old.ondatachannel = old.ontrack = old.onconnectionstatechange = null;
    this.pc = this._newPc();
    try { old.close(); } catch { /* already closed */ }
    this.makingOffer = false;
    this.signalChannels = [];
    for (const { label, init } of this.unnegotiated) this._adopt(this.pc.createDataChannel(label, init));
  }

  /** @param {ChannelSpec} spec */
  openChannel(spec) {
    if (spec.label === SIGNAL_LABEL) throw new Error(`the channel label ${SIGNAL_LABEL} is reserved for peerlink's own signaling between connected peers`);
    this.openSignalChannel();
    const init = channelInit(spec);
    if (!this.pc.remoteDescription) this.unnegotiated.push({ label: spec.label, init });
    this._adopt(this.pc.createDataChannel(spec.label, init));
  }

  /** Opens the signaling channel if this side makes the connection's first offer. */
  openSignalChannel() {
    if (this.pc.remoteDescription || this.offerSeen || this.signalChannels.length > 0 || this.signalChannelAsked) return;
    this.signalChannelAsked = true;
    this._adoptSignal(this.pc.createDataChannel(SIGNAL_LABEL, { ordered: true }));
  }

  /**
   * A signaling channel (PROTOCOL.md "Signaling between connected peers"):
   * hello once open, then the peer's signals, applied like those through
   * the server.
   * @param {RTCDataChannel} raw
   */
  _adoptSignal(raw) {
    const opened = () => {
      if (!this.signalChannels.includes(raw)) this.signalChannels.push(raw);
      try {
        raw.send(SIGNAL_HELLO);
      } catch {
        // Closed already: the server carries our signals.
      }
    };
    if (raw.readyState === 'open') opened();
    else raw.addEventListener('open', opened);
    raw.addEventListener('message', (e) => {
      if (typeof e.data !== 'string') return;
      const m = parseChannelSignal(e.data);
      if ('hello' in m) this.remoteReadsChannel = true;
      else if ('signal' in m) {
        this.signalsReceivedOnChannel += 1;
        this.onSignal(m.signal, raw);
      } else console.debug(`peerlink: signaling channel from ${this.peer}: ${m.ignored}`);
    });
    raw.addEventListener('close', () => {
      this.signalChannels = this.signalChannels.filter((c) => c !== raw);
    });
  }

  /** The signaling channel when signals can go there: connected, and the peer said hello. */
  _channelIfUp() {
    if (this.state !== 'connected' || !this.remoteReadsChannel) return null;
    return this.signalChannels.find((c) => c.readyState === 'open') ?? null;
  }

  /**
   * Sends `signal` on `via` (a signaling channel), or through the server.
   * @param {Signal} signal @param {RTCDataChannel | null} via
   */
  _send(signal, via) {
    if (via && via.readyState === 'open' && this.signalChannels.includes(via)) {
      try {
        via.send(JSON.stringify(signal));
        this.signalsSentOnChannel += 1;
        return;
      } catch {
        // Closing under us: through the server.
      }
    }
    this.room._signal(this.peer, signal);
  }

  /**
   * Sends `track`: on a transceiver of its kind that sends nothing (ours,
   * after removeTrack, or one the peer opened to send us its own), else a
   * new one, so turning a camera off and on does not add m-lines.
   * @param {MediaStreamTrack} track @param {MediaStream} stream
   */
  addTrack(track, stream) {
    if (!this.tracksReady || this.declinesMedia || this.pc.signalingState === 'closed') return;
    if (this.pc.getSenders().some((s) => s.track === track) || [...this.reused.values()].includes(track)) return;
    const free = this.pc.getTransceivers().find((t) => t.currentDirection !== 'stopped' && t.direction !== 'stopped' && t.mid !== null
      && t.receiver.track.kind === track.kind && !t.sender.track && !this.reused.has(t));
    if (!free) {
      this.pc.addTrack(track, stream);
      return;
    }
    this.reused.set(free, track);
    free.direction = free.currentDirection === 'sendonly' || free.currentDirection === 'inactive' ? 'sendonly' : 'sendrecv';
    free.sender.setStreams(stream);
    free.sender.replaceTrack(track).catch((e) => console.warn(`peerlink: sending ${track.kind} to ${this.peer} failed`, e))
      .finally(() => { if (this.reused.get(free) === track) this.reused.delete(free); });
  }

  /** @param {MediaStreamTrack} track */
  removeTrack(track) {
    // Still being put on a transceiver (its replaceTrack pending): undone
    // after it (a transceiver's operations run in order).
    for (const [t, pending] of this.reused) {
      if (pending !== track) continue;
      this.reused.delete(t);
      t.direction = t.direction === 'sendrecv' ? 'recvonly' : 'inactive';
      t.sender.replaceTrack(null).catch(() => {});
    }
    for (const sender of this.pc.getSenders()) {
      if (sender.track !== track) continue;
      try {
        this.pc.removeTrack(sender);
      } catch {
        // The transceiver was stopped (the peer declined it): nothing is sent.
      }
    }
  }

  /** @param {MediaStreamTrack} track @param {MediaStream} stream */
  _remoteTrack(track, stream) {
    if (this.remoteTracks.has(track)) return;
    this.remoteTracks.set(track, stream);
    const gone = (/** @type {MediaStreamTrackEvent} */ e) => {
      if (e.track !== track || !this.remoteTracks.has(track)) return;
      this.remoteTracks.delete(track);
      stream.removeEventListener('removetrack', gone);
      this.room.emit('track_removed', { peer: this.peer, track, stream });
    };
    stream.addEventListener('removetrack', gone);
    this.room.emit('track', { peer: this.peer, track, stream });
  }

  /**
   * After a description is applied: a peer that rejected the media m-lines
   * we send on (port 0: the transceiver is stopped, and Chromium drops it)
   * is offered none again.
   * @param {RTCRtpTransceiver[]} sending transceivers that had a track before
   */
  _checkDeclined(sending) {
    if (sending.length === 0) return;
    const now = this.pc.getTransceivers();
    if (sending.some((t) => t.currentDirection === 'stopped' || !now.includes(t))) this.declinesMedia = true;
  }

  /** @param {RTCDataChannel} raw */
  _adopt(raw) {
    const maxMessageSize = this.pc.sctp?.maxMessageSize || 65_536;
    const ch = new Channel(raw, this.peer, { maxMessageSize, ...(this.room.options.channelOptions ?? {}) });
    const opened = () => {
      const old = this.channels.get(ch.label);
      if (old && old !== ch && !old.isClosed) old.close();
      this.channels.set(ch.label, ch);
      ch.maxMessageSize = this.pc.sctp?.maxMessageSize || maxMessageSize;
      this.room._channelOpen(ch);
    };
    if (raw.readyState === 'open') opened();
    else ch.on('open', opened);
    ch.on('close', () => {
      if (this.channels.get(ch.label) === ch) {
        this.channels.delete(ch.label);
        this.room._channelClose(this.peer, ch.label);
      }
    });
  }

  async _offer() {
    const pc = this.pc;
    // (Negotiation-needed can come while an offer from the peer is being
    // applied: setLocalDescription() would make a second answer.)
    if (pc.signalingState !== 'stable') return;
    try {
      this.makingOffer = true;
      await pc.setLocalDescription();
      const sdp = pc.localDescription?.sdp;
      if (sdp && pc === this.pc && pc.localDescription?.type === 'offer') await this._sendSdp('offer', sdp);
    } catch (e) {
      if (pc === this.pc) console.warn(`peerlink: offer to ${this.peer} failed`, e);
    } finally {
      if (pc === this.pc) this.makingOffer = false;
    }
  }


  /**
   * @param {'offer' | 'answer'} kind
   * @param {string} sdp
   */
  _sendSdp(kind, sdp) {
    /** @type {Signal} */
    const signal = kind === 'offer' ? { kind: 'offer', sdp } : { kind: 'answer', sdp };
    // An offer on the signaling channel while connected, else through the
    // server; an answer back the way its offer came.
    // (An offer right after our answer through the server goes that way
    // too: it must not overtake the answer.)
    const via = kind === 'answer' ? this.offerVia : this.lastSentAnswer && !this.sdpVia ? null : this._channelIfUp();
    this.sdpVia = via;
    this.lastSentAnswer = kind === 'answer';
    const keys = this.keys;
    if (!keys) {
      this._send(signal, via);
      return Promise.resolve();
    }
    // The number taken now and the signals sent in that order: an offer and
    // an answer signed at once must not share one, nor overtake each other
    // (the other side refuses a number that is not higher).
    const seq = this.sendSeq++;
    const sent = this._signing.then(async () => {
      signal.auth = await signSdp(keys.local, kind, seq, sdp);
      this._send(signal, via);
    });
    this._signing = sent.catch(() => {});
    return sent;
  }

  /**
   * Whether `sdp` comes from another peer connection than the one this
   * connection negotiated with (the remote closed that one and started
   * anew before we noticed): then this connection must be replaced.
   * @param {string} sdp
   */
  isNewSession(sdp) {
    const id = sdpSession(sdp);
    return this.remoteSession !== null && id !== null && id !== this.remoteSession;
  }

  /**
   * Applies signals one after another.
   * @param {Signal} signal
   * @param {RTCDataChannel | null} [via] the signaling channel it came on (null: the server)
   */
  onSignal(signal, via = null) {
    if (signal.kind === 'offer') this.offerSeen = true;
    if ((signal.kind === 'offer' || signal.kind === 'answer') && this.remoteSession === null) {
      this.remoteSession = sdpSession(signal.sdp);
    }
    this.chain = this.chain.then(() => {
      if (signal.kind === 'offer') this.offerVia = via;
      return this._apply(signal);
    }).catch((e) => {
      console.warn(`peerlink: signal from ${this.peer} not applied`, e);
    });
  }

  /** @param {Signal} signal */
  async _apply(signal) {
    if (this.state === 'closed') return;
    let pc = this.pc;
    if (signal.kind === 'offer' || signal.kind === 'answer') {
      if (this.keys) {
        const why = await this._checkAuth(signal.kind, signal.sdp, signal.auth);
        if (why === 'stale') {
          console.debug(`peerlink: ignoring an ${signal.kind} from ${this.peer} older than one applied`);
          return;
        }
        if (why) {
          this.room.emit('auth_failed', { peer: this.peer, reason: why });
          // Sealed, so the peer can trust it: the signaling between us was
          // changed (or it lacks the secret).
          if (this.room.secret) this.room.sendViaServer(this.peer, { [REFUSED_KEY]: why });
          this._fail(`signaling was not authentic: ${why}`);
          return;
        }
      }
      const ready = !this.makingOffer && (pc.signalingState === 'stable' || this.settingAnswer);
      const collision = signal.kind === 'offer' && !ready;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) return;
      if (collision && !pc.remoteDescription) {
        this._replaceUnnegotiatedPc();
        pc = this.pc;
      }
      if (signal.kind === 'answer' && pc.signalingState !== 'have-local-offer') return;
      // Applied: older SDPs are ignored from now on (not when this one is
      // ignored in a collision: an older one may still be due).
      if (this.keys && signal.auth) this.recvSeq = signal.auth.seq;
      this.settingAnswer = signal.kind === 'answer';
      // (Data-only implementations, e.g. in Node, may have no transceivers.)
      const sending = pc.getTransceivers?.().filter((t) => t.sender.track) ?? [];
      await pc.setRemoteDescription({ type: signal.kind, sdp: signal.sdp });
      this.settingAnswer = false;
      this._checkDeclined(sending);
      for (const c of this.early.splice(0)) await this._addCandidate(c);
      if (signal.kind === 'offer') {
        await pc.setLocalDescription();
        const sdp = pc.localDescription?.sdp;
        if (sdp) await this._sendSdp('answer', sdp);
      }
      if (!this.tracksReady && pc.signalingState === 'stable') {
        // The first offer and answer are through: the room's tracks now.
        this.tracksReady = true;
        for (const [track, stream] of this.room.localTracks) this.addTrack(track, stream);
      }
    } else if (signal.kind === 'candidate') {
      const c = { candidate: signal.candidate.replace(/^a=/, ''), sdpMid: signal.mid ?? null, sdpMLineIndex: signal.mid ? null : 0 };
      if (!pc.remoteDescription) {
        if (this.early.length < MAX_EARLY_CANDIDATES) this.early.push(c);
      } else {
        await this._addCandidate(c);
      }
    }
  }

  /** @param {RTCIceCandidateInit} c */
  async _addCandidate(c) {
    try {
      await this.pc.addIceCandidate(c);
    } catch (e) {
      if (!this.ignoreOffer) console.debug(`peerlink: candidate from ${this.peer} not used`, e);
    }
  }

  /**
   * Why an offer or answer is not authentic (a string), `'stale'` for an
   * authentic one older than one applied (it came the slow way: through the
   * server while a later one came on the signaling channel, or the server
   * replayed it), or null to apply it.
   * @param {'offer' | 'answer'} kind
   * @param {string} sdp
   * @param {{ seq: number, mac: string } | undefined} auth
   */
  async _checkAuth(kind, sdp, auth) {
    if (!this.keys) return null;
    if (!auth) return `the ${kind} carries no authentication`;
    if (!(await verifySdp(this.keys.remote, kind, sdp, auth))) {
      return `the ${kind} was modified in transit (its MAC does not match)`;
    }
    if (this.recvSeq !== null && auth.seq <= this.recvSeq) return 'stale';
    return null;
  }

  /** @param {ConnState} state */
  _setState(state) {
    if (this.state === state || this.state === 'closed' || (this.state === 'failed' && state !== 'closed')) return;
    this.state = state;
    this.room.emit('state', { peer: this.peer, state });
    if ((state === 'failed' || state === 'closed') && this.room.overlay && this.room.conns.get(this.peer) === this) {
      this.room._overlayDown(this.peer);
    }
  }

  _onState() {
    const s = this.pc.connectionState;
    if (s === 'connected') {
      // The peer has applied our answer (the path needs it): an offer cannot overtake it.
      this.lastSentAnswer = false;
      this.everConnected = true;
      this.downSince = null;
      if (this.restartTimer) clearTimeout(this.restartTimer);
      this.restartTimer = null;
      this._setState('connected');
    } else if ((s === 'disconnected' || s === 'failed') && this.everConnected) {
      this.downSince ??= Date.now();
      this._setState('disconnected');
      this._scheduleRestart();
    } else if (s === 'failed') {
      this._fail('connectivity checks failed: no candidate pair answered');
    }
  }

  /** The impolite side restarts ICE first; the polite one later, if still down. */
  _scheduleRestart() {
    if (this.restartTimer) return;
    const o = this.room.options;
    const wait = (o.restartAfterMs ?? 1000) * (this.polite ? 2 : 1);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = null;
      if (this.downSince === null || this.state === 'closed' || this.state === 'failed') return;
      if (Date.now() - this.downSince >= (o.giveUpAfterMs ?? 60_000)) {
        this._fail(`the connection was lost and no path came back within ${(o.giveUpAfterMs ?? 60_000) / 1000} s (${this.iceRestarts} ICE restarts)`);
        return;
      }
      this.iceRestarts += 1;
      this.pc.restartIce();
      this._scheduleRestart();
    }, wait);
  }

  /** @param {string} why */
  _fail(why) {
    if (this.state === 'failed' || this.state === 'closed') return;
    this.failure = why;
    this._setState('failed');
    this._shutdown();
  }

  close() {
    this._setState('closed');
    this._shutdown();
  }

  _shutdown() {
    clearTimeout(this.connectTimer);
    if (this.relayTimer) clearTimeout(this.relayTimer);
    if (this.restartTimer) clearTimeout(this.restartTimer);
    try { this.pc.close(); } catch { /* already closed */ }
    // pc.close() fires no close event on its channels: close them here, so
    // every open channel reports `channel_close`.
    for (const ch of [...this.channels.values()]) ch._closed();
    for (const [track, stream] of [...this.remoteTracks]) {
      this.remoteTracks.delete(track);
      this.room.emit('track_removed', { peer: this.peer, track, stream });
    }
  }

  /** @returns {Promise<PeerStats>} */
  async stats() {
    /** @type {PeerStats} */
    const out = { state: this.state, path: null, rttMs: null, bytesSent: 0, bytesReceived: 0, iceRestarts: this.iceRestarts,
      signalsSentOnChannel: this.signalsSentOnChannel, signalsReceivedOnChannel: this.signalsReceivedOnChannel, failure: this.failure,
      safetyNumber: null, media: { framesSent: 0, framesDecoded: 0, audioPacketsReceived: 0 } };
    const ours = sdpFingerprint(this.pc.localDescription?.sdp ?? '');
    const theirs = sdpFingerprint(this.pc.remoteDescription?.sdp ?? '');
    if (ours && theirs) out.safetyNumber = safetyNumber(ours, theirs);
    if (this.state === 'closed' || this.state === 'failed') return out;
    const report = await this.pc.getStats();
    /** @type {Map<string, any>} */
    const byId = new Map();
    report.forEach((s) => byId.set(s.id, s));
    let pair = null;
    for (const s of byId.values()) {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = byId.get(s.selectedCandidatePairId);
      if (s.type === 'data-channel') {
        out.bytesSent += s.bytesSent ?? 0;
        out.bytesReceived += s.bytesReceived ?? 0;
      }
      if (s.type === 'outbound-rtp' && s.kind === 'video') out.media.framesSent += s.framesSent ?? 0;
      if (s.type === 'inbound-rtp' && s.kind === 'video') out.media.framesDecoded += s.framesDecoded ?? 0;
      if (s.type === 'inbound-rtp' && s.kind === 'audio') out.media.audioPacketsReceived += s.packetsReceived ?? 0;
    }
    if (!pair) {
      for (const s of byId.values()) if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    }
    if (pair) {
      const l = byId.get(pair.localCandidateId);
      const r = byId.get(pair.remoteCandidateId);
      if (l && r) {
        const kind = l.candidateType === 'relay' || r.candidateType === 'relay' ? 'relay' : r.candidateType === 'host' ? 'host' : 'srflx';
        out.path = { kind, local: `${l.candidateType} ${l.address ?? l.ip}:${l.port}`, remote: `${r.candidateType} ${r.address ?? r.ip}:${r.port}` };
      }
      if (typeof pair.currentRoundTripTime === 'number') out.rttMs = pair.currentRoundTripTime * 1000;
    }
    return out;
  }
}
