// One peer connection of a room (lib/room.js): perfect negotiation, the
// signaling channel between connected peers, channels, tracks, ICE
// restarts and timers. The browser's twin of crates/peer/src/conn.rs
// (docs/PROTOCOL.md, "Peers").

import { Channel, channelInit } from './channel.js';
import { signSdp, verifySdp } from './auth.js';
import { parseChannelSignal, SIGNAL_LABEL, SIGNAL_HELLO } from './protocol.js';
import { REFUSED_KEY, sdpFingerprint, safetyNumber } from './e2e.js';

/** @typedef {import('./room.js').Room} Room */
/** @typedef {import('./channel.js').ChannelSpec} ChannelSpec */
/** @typedef {import('./protocol.js').Signal} Signal */
/** @typedef {import('./room.js').SignalKeys} SignalKeys */

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

/** Remote candidates held until the remote description is set. */
const MAX_EARLY_CANDIDATES = 64;
/**
 * An offer through the server with no answer for this long is taken as
 * lost (the server may drop a message for a member that is reconnecting)
 * and made again when a restart is due (conn.rs `OFFER_LOST_AFTER`).
 */
const OFFER_LOST_AFTER_MS = 15_000;

/** The mid of an SDP's first m-line (`a=mid:`), or null. @param {string} sdp */
function sdpFirstMid(sdp) {
  const m = sdp.split(/\r?\n/).find((l) => l.startsWith('a=mid:'));
  return m ? m.slice(6).trim() : null;
}

/** The session id of an SDP's `o=` line, or null. @param {string} sdp */
function sdpSession(sdp) {
  const o = sdp.split(/\r?\n/).find((l) => l.startsWith('o='));
  return o?.split(/\s+/)[1] ?? null;
}

/** One peer connection: perfect negotiation, channels, restarts, timers. */
export class Conn {
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
    /** when our last offer left (ms) */
    this.lastOfferAt = 0;
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
    // Ours again (the peer's offer may carry none: two are fine).
    if (this.signalChannelAsked) this._adoptSignal(this.pc.createDataChannel(SIGNAL_LABEL, { ordered: true }));
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
    // Negotiation-needed can come while an offer from the peer is being
    // applied (setLocalDescription() would make a second answer), or
    // checked (its MAC): it comes again, if still needed, once the answer
    // is made.
    if (pc.signalingState !== 'stable' || (this.offerSeen && !pc.remoteDescription)) return;
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
    if (kind === 'offer') this.lastOfferAt = Date.now();
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
          if (this.room.secret) this.room._sendViaServer(this.peer, { [REFUSED_KEY]: why });
          this._fail(`signaling was not authentic: ${why}`);
          return;
        }
      }
      const ready = !this.makingOffer && (pc.signalingState === 'stable' || this.settingAnswer);
      const collision = signal.kind === 'offer' && !ready;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) return;
      if (collision && !pc.remoteDescription) {
        // Our first offer rolled back: on a fresh peer connection if the
        // peer names its data m-line otherwise (or ours is not known yet).
        const mine = pc.localDescription ? sdpFirstMid(pc.localDescription.sdp) : null;
        if (mine === null || mine !== sdpFirstMid(signal.sdp)) {
          this._replaceUnnegotiatedPc();
          pc = this.pc;
        }
      }
      if (signal.kind === 'answer' && pc.signalingState !== 'have-local-offer') return;
      // The peer connection at the other end, known from what we apply
      // (not from an offer ignored in a collision, which may come from one
      // the peer has replaced since).
      this.remoteSession ??= sdpSession(signal.sdp);
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

  /**
   * The ICE servers to gather with from the next ICE restart on (fresh
   * TURN credentials).
   * @param {RTCIceServer[]} servers
   */
  setIceServers(servers) {
    if (this.state === 'failed' || this.state === 'closed') return;
    try {
      this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers: servers });
    } catch (e) {
      console.debug(`peerlink: new ICE servers for ${this.peer} not taken`, e);
    }
  }

  /** @param {ConnState} state */
  _setState(state) {
    if (this.state === state || this.state === 'closed' || (this.state === 'failed' && state !== 'closed')) return;
    this.state = state;
    this.room.emit('state', { peer: this.peer, state });
    this.room._connState(this, state);
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
      void this.restartIce();
      this._scheduleRestart();
    }, wait);
  }

  /**
   * Restarts ICE: a new offer now, or once the offer that is out is
   * answered. As the native twin (conn.rs `negotiate`), an offer that may be
   * lost is not waited for: one sent on the signaling channel while the
   * path is down, or through the server {@link OFFER_LOST_AFTER_MS} ago.
   * It is rolled back, and the restart's offer goes through the server.
   * (`restartIce()` alone waits for the answer: negotiation is needed only
   * once the peer connection is stable again.)
   */
  async restartIce() {
    const pc = this.pc;
    if (pc.signalingState === 'have-local-offer' && !this.makingOffer) {
      const lost = (this.sdpVia !== null && this.state !== 'connected') || Date.now() - this.lastOfferAt >= OFFER_LOST_AFTER_MS;
      if (lost) {
        try {
          await pc.setLocalDescription({ type: 'rollback' });
        } catch (e) {
          console.debug(`peerlink: rolling back an unanswered offer to ${this.peer} failed`, e);
        }
      }
    }
    if (pc === this.pc) pc.restartIce();
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
