// The signaling client (docs/PROTOCOL.md): greets the server, joins a
// room, then carries client messages out and server messages in. When the
// socket drops, or the server says `shutting_down`, it reconnects with
// backoff (to the server, then to `fallbackServers` in turn) and presents
// its resume token: the server gives the same peer id back and its place in
// the room, so the room keeps every peer connection, and messages sent
// meanwhile are held (bounded) and sent then. A server that cannot resume
// us gives a new id, and the room rebuilds its connections. Mirrors
// crates/peer/src/signaling.rs and driver.rs.

import { Emitter } from './events.js';
import { PROTOCOL_VERSION, FATAL_CODES, parseServerMsg } from './protocol.js';

/** @typedef {import('./protocol.js').ServerMsg} ServerMsg */
/** @typedef {import('./protocol.js').ClientMsg} ClientMsg */
/** @typedef {import('./protocol.js').IceServer} IceServer */
/** @typedef {import('./protocol.js').PeerInfo} PeerInfo */

/**
 * A joined session: what `welcome` and `joined` said, and the URL.
 * @typedef {{ id: string, iceServers: IceServer[], limits: Record<string, number>, peers: PeerInfo[], size?: number, resume?: string, url: string, resumed: boolean }} Session
 */

/**
 * @typedef {object} SignalingEvents
 * @property {ServerMsg} message        a server message after `joined`
 * @property {Session} joined           joined (again, after a reconnect)
 * @property {{ attempt: number, inMs: number, reason: string }} reconnecting
 * @property {{ reason: string }} closed  for good
 */

/** Why the signaling connection cannot go on. */
export class SignalingError extends Error {
  /**
   * @param {string} code  a server error code, or `timeout`, `unreachable`, `closed`
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'SignalingError';
    this.code = code;
  }
}

/**
 * The signaling WebSocket URL for what a person typed: ws(s) URLs as given
 * (with `/ws` added when they have no path), http(s) URLs as the matching
 * WebSocket URL, a bare `host[:port]` as `ws://host[:port]/ws`.
 * Same rules as `signaling_url` in crates/peer.
 * @param {string} input
 */
export function signalingUrl(input) {
  const text = input.trim();
  const m = /^([a-z]+):\/\/(.*)$/.exec(text);
  let scheme = 'ws';
  let rest = text;
  if (m) {
    scheme = { http: 'ws', https: 'wss' }[m[1]] ?? m[1];
    rest = m[2];
  }
  const slash = rest.indexOf('/');
  if (slash < 0) rest += '/ws';
  else if (rest.slice(slash) === '/') rest = rest.slice(0, slash) + '/ws';
  return `${scheme}://${rest}`;
}

/**
 * @typedef {object} SignalingOptions
 * @property {string} server      server address (see {@link signalingUrl})
 * @property {string[]} [fallbackServers] other nodes of the deployment to reconnect to, after `server`
 * @property {string} room
 * @property {string} [name]      display name
 * @property {string} [token]     join token, for servers that require one (`unauthorized` otherwise)
 * @property {number} [timeoutMs] bound on every wait for the server (10 s)
 * @property {boolean} [reconnect] reconnect when the socket drops (true)
 * @property {number} [maxBackoffMs] longest wait between attempts (10 s)
 * @property {number} [maxAttempts] attempts before giving up for good (30)
 * @property {string} [client]    free-form client description for the server's logs
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global)
 * @property {number} [renewMinMs] shortest wait before renewing TURN credentials (10 s)
 */

/** Messages queued while the socket is open but not yet writable (bounded). */
const MAX_QUEUED = 512;
/**
 * Of those, what the application's own messages ({@link Signaling.busy})
 * may fill: the rest stays for the room's signals, as the native client
 * keeps 128 of its 512.
 */
const MAX_QUEUED_FOR_APP = 384;
/**
 * Messages held while reconnecting with a resume token; beyond it the
 * newest are dropped (as the native client does), so an offer is never
 * lost to the candidates that follow it.
 */
const MAX_HELD = 512;
/**
 * Why a reconnect failed that is worth another try (with backoff): the
 * server was not there, or it said to try again (`unavailable`: its room
 * store is out of reach; `rate_limited`), docs/PROTOCOL.md "Errors". Any
 * other refusal (a token, a full room) ends the session.
 */
const RETRIED = ['timeout', 'unreachable', 'closed', 'shutting_down', 'unavailable', 'rate_limited'];
/** Bounds on when TURN credentials are renewed (see `Signaling._scheduleRenew`). */
const RENEW_MIN_MS = 10_000;
const RENEW_MAX_MS = 30 * 60_000;
const RENEW_EXPIRED_MS = 10 * 60_000;
/** How long the socket a renewal replaced is still read. */
const OLD_SOCKET_GRACE_MS = 5_000;
/** An application ping keeps the link honest; a pong must come within. */
const PING_EVERY_MS = 15_000;
const PONG_WITHIN_MS = 10_000;

/** @extends {Emitter<SignalingEvents>} */
export class Signaling extends Emitter {
  /** @param {SignalingOptions} options */
  constructor(options) {
    super();
    this.options = { timeoutMs: 10_000, reconnect: true, maxBackoffMs: 10_000, maxAttempts: 30, ...options };
    this.url = signalingUrl(options.server);
    /** The server, then the fallbacks: reconnect attempts go round them. */
    this.urls = [this.url, ...(options.fallbackServers ?? []).map(signalingUrl)];
    /** @type {ClientMsg[]} */
    this._held = [];
    /** @type {WebSocket | null} */
    this.ws = null;
    /** @type {Session | null} */
    this.session = null;
    this.closed = false;
    this._attempt = 0;
    /** @type {ReturnType<typeof setInterval> | null} */
    this._pinger = null;
    this._nonce = 0;
    /** @type {number | null} */
    this._awaitingPong = null;
    /** Gives up the connection being opened, if any (`close` while joining). @type {(() => void) | null} */
    this._abandon = null;
    /** When the TURN credentials are renewed (see {@link Signaling._renew}). @type {ReturnType<typeof setTimeout> | null} */
    this._renewTimer = null;
    /** A renewal under way. @type {Promise<void> | null} */
    this._renewing = null;
  }

  /**
   * Connects, says hello and joins; resolves with the session, or rejects
   * with a {@link SignalingError} (refused, unreachable, timed out).
   * @returns {Promise<Session>}
   */
  async connect() {
    const session = await this._open();
    return session;
  }

  /**
   * @param {string} [url]
   * @returns {Promise<Session>}
   */
  _open(url = this.url) {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    const { timeoutMs } = this.options;
    const resume = this.session?.resume;
    return new Promise((resolve, reject) => {
      /** @type {WebSocket} */
      let ws;
      try {
        ws = new WS(url);
      } catch (e) {
        reject(new SignalingError('unreachable', `cannot open ${url}: ${e}`));
        return;
      }
      let settled = false;
      /** @type {{ id: string, iceServers: IceServer[], limits: Record<string, number>, resume?: string } | null} */
      let welcome = null;
      const fail = (/** @type {SignalingError} */ err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (this._abandon === abandon) this._abandon = null;
        try { ws.close(); } catch { /* already closed */ }
        reject(err);
      };
      // Left meanwhile: this connection must not join on our behalf.
      const abandon = () => fail(new SignalingError('closed', 'left the room before it was joined'));
      this._abandon = abandon;
      const timer = setTimeout(
        () => fail(new SignalingError('timeout', `the signaling server did not answer within ${timeoutMs} ms`)),
        timeoutMs,
      );
      ws.onopen = () => {
        /** @type {Record<string, unknown>} */
        const hello = { type: 'hello', version: PROTOCOL_VERSION, client: this.options.client ?? 'peerlink-web/0.1' };
        if (resume) hello.resume = resume;
        ws.send(JSON.stringify(hello));
      };
      ws.onerror = () => fail(new SignalingError('unreachable', `cannot reach the signaling server at ${url}`));
      ws.onclose = (ev) => {
        if (!settled) fail(new SignalingError('closed', `the signaling server closed the connection (${ev.code} ${ev.reason})`));
        else if (this.ws === ws) this._lost(`the signaling connection closed (${ev.code}${ev.reason ? ' ' + ev.reason : ''})`);
      };
      ws.onmessage = (ev) => {
        /** @type {ServerMsg} */
        let msg;
        try {
          msg = parseServerMsg(String(ev.data));
        } catch (e) {
          // As the native client: before `joined` the join fails with the
          // reason; after, the message is skipped with a warning.
          const why = `unreadable message from the signaling server: ${e instanceof Error ? e.message : e}`;
          if (settled) console.warn(`peerlink: ${why}`);
          else fail(new SignalingError('closed', why));
          return;
        }
        if (settled) {
          this._onMessage(msg);
          return;
        }
        if (msg.type === 'error') {
          fail(new SignalingError(msg.code, `the signaling server refused: ${msg.code}: ${msg.message}`));
        } else if (msg.type === 'welcome') {
          if (msg.version !== PROTOCOL_VERSION) {
            fail(new SignalingError('unsupported_version', `the server speaks protocol ${msg.version}, we speak ${PROTOCOL_VERSION}`));
            return;
          }
          welcome = { id: msg.peer_id, iceServers: msg.ice_servers, limits: msg.limits, resume: msg.resume };
          /** @type {Record<string, unknown>} */
          const join = { type: 'join', room: this.options.room };
          if (this.options.name) join.name = this.options.name;
          if (this.options.token) join.token = this.options.token;
          ws.send(JSON.stringify(join));
        } else if (msg.type === 'joined' && welcome) {
          settled = true;
          clearTimeout(timer);
          if (this._abandon === abandon) this._abandon = null;
          const before = this.session?.id;
          this.ws = ws;
          // `resumed`: the server kept our place (same id, nobody told).
          const resumed = before === welcome.id && msg.resumed === true;
          this.session = { ...welcome, peers: msg.peers, url, resumed };
          if (msg.size !== undefined) this.session.size = msg.size;
          this._attempt = 0;
          this._scheduleRenew(welcome.iceServers);
          // Held messages belong to the session they were made in.
          const held = this._held;
          this._held = [];
          if (resumed) for (const m of held) ws.send(JSON.stringify(m));
          this._startPings();
          resolve(this.session);
        }
      };
    });
  }

  /** @param {ServerMsg} msg */
  _onMessage(msg) {
    if (msg.type === 'pong') {
      this._awaitingPong = null;
      return;
    }
    if (msg.type === 'error' && isFatal(msg.code)) {
      // The server closes next; `shutting_down` is worth a reconnect.
      if (msg.code !== 'shutting_down') this.options.reconnect = false;
    }
    this.emit('message', msg);
  }

  _startPings() {
    this._stopPings();
    this._pinger = setInterval(() => {
      if (this._awaitingPong !== null && Date.now() - this._awaitingPong > PONG_WITHIN_MS) {
        this.ws?.close(4000, 'no pong');
        return;
      }
      if (this._awaitingPong === null) this._awaitingPong = Date.now();
      this.send({ type: 'ping', nonce: ++this._nonce });
    }, PING_EVERY_MS);
  }

  _stopPings() {
    if (this._pinger) clearInterval(this._pinger);
    this._pinger = null;
    this._awaitingPong = null;
  }

  /** @param {string} reason */
  async _lost(reason) {
    this._stopPings();
    this.ws = null;
    if (this.closed) return;
    if (this._renewing) {
      // A renewal is opening the next connection: it may carry on there.
      await this._renewing;
      if (this.ws || this.closed) return;
    }
    if (!this.options.reconnect) {
      this._ended();
      this.emit('closed', { reason });
      return;
    }
    while (!this.closed) {
      this._attempt += 1;
      if (this._attempt > (this.options.maxAttempts ?? 30)) {
        this._ended();
        this.emit('closed', { reason: `${reason}; gave up after ${this._attempt - 1} attempts to reconnect` });
        return;
      }
      const base = Math.min(this.options.maxBackoffMs ?? 10_000, 250 * 2 ** Math.min(this._attempt, 10));
      const inMs = Math.round(base / 2 + Math.random() * (base / 2));
      this.emit('reconnecting', { attempt: this._attempt, inMs, reason });
      await new Promise((r) => setTimeout(r, inMs));
      if (this.closed) return;
      try {
        // Each URL once without a wait between, then back off.
        const n = this.urls.length;
        for (let i = 0; ; i++) {
          try {
            const session = await this._open(this.urls[(this._attempt - 1 + i) % n]);
            // Closed as the join came in: `close` told the server.
            if (!this.closed) this.emit('joined', session);
            return;
          } catch (e) {
            if (i + 1 >= n || this.closed) throw e;
          }
        }
      } catch (e) {
        reason = e instanceof Error ? e.message : String(e);
        if (e instanceof SignalingError && !RETRIED.includes(e.code)) {
          this._ended();
          this.emit('closed', { reason });
          return;
        }
      }
    }
  }

  /**
   * Sends a client message. Without an open connection it is held while
   * reconnecting with a resume token (sent once the same session is back),
   * else dropped and false returned: signals belong to their session.
   * @param {ClientMsg} msg
   */
  send(msg) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) {
      // Reconnecting with a resume token: the session goes on, so hold it.
      if (!this.closed && this.session?.resume && this.options.reconnect) {
        if (this._held.length >= MAX_HELD) return false;
        this._held.push(msg);
        return true;
      }
      return false;
    }
    if (ws.bufferedAmount > MAX_QUEUED * 65_536) {
      ws.close(4001, 'not draining');
      return false;
    }
    ws.send(JSON.stringify(msg));
    return true;
  }

  /**
   * Whether the link to the server holds as much as the application's
   * messages may fill (they are refused then; signals still go).
   */
  busy() {
    return (this.ws?.bufferedAmount ?? 0) > MAX_QUEUED_FOR_APP * 65_536;
  }

  /**
   * Sets the renewal of the TURN credentials `servers` carry: REST
   * usernames (`EXPIRY:NAME`, docs/PROTOCOL.md) that a server refuses for a
   * new allocation once expired, while a room outlives them (a browser
   * allocates for every new peer connection and ICE restart). Renewed once
   * four fifths of their life has gone, and at least every 30 min, so that
   * a clock that is wrong by less than the lifetime less 30 min does not
   * matter; every 10 min when they look expired already (a clock ahead);
   * never sooner than 10 s after the last (`renewMinMs`).
   * @param {IceServer[]} servers
   */
  _scheduleRenew(servers) {
    if (this._renewTimer) clearTimeout(this._renewTimer);
    this._renewTimer = null;
    const expiries = servers.map((s) => /^(\d{9,}):/.exec(s.username ?? '')?.[1]).filter((e) => e !== undefined).map(Number);
    if (!expiries.length) return;
    const left = Math.min(...expiries) * 1000 - Date.now();
    const floor = this.options.renewMinMs ?? RENEW_MIN_MS;
    const inMs = left > 0 ? Math.min(Math.max(left * 0.8, floor), RENEW_MAX_MS) : RENEW_EXPIRED_MS;
    this._renewTimer = setTimeout(() => this._renew(), inMs);
  }

  /**
   * Fresh TURN credentials come with a `welcome`: opens the next connection
   * with the resume token (the server moves our place to it and tells
   * nobody), switches to it, and closes the old one a few seconds later:
   * what the server had already queued there still arrives. Fails quietly
   * (the old connection stays; tried again after `renewMinMs`).
   */
  _renew() {
    const old = this.ws;
    if (this.closed || !old || old.readyState !== 1 || this._renewing) return;
    this._renewing = this._open(this.session?.url ?? this.url).then(
      (session) => {
        this.emit('joined', session);
        // Read until what was on its way there has come (its messages
        // still reach `_onMessage`), then closed.
        setTimeout(() => {
          try { old.close(1000, 'TURN credentials renewed'); } catch { /* already closed */ }
        }, OLD_SOCKET_GRACE_MS);
      },
      () => {
        if (!this.closed) this._renewTimer = setTimeout(() => this._renew(), this.options.renewMinMs ?? RENEW_MIN_MS);
      },
    ).finally(() => { this._renewing = null; });
  }

  /** Closed for good: nothing is renewed any more. */
  _ended() {
    this.closed = true;
    if (this._renewTimer) clearTimeout(this._renewTimer);
    this._renewTimer = null;
  }

  /** Leaves the room and closes the connection for good. */
  close() {
    if (this.closed) return;
    this._ended();
    this._stopPings();
    this._abandon?.();
    if (this.ws && this.session) {
      try { this.ws.send(JSON.stringify({ type: 'leave', room: this.options.room })); } catch { /* closing anyway */ }
    }
    try { this.ws?.close(1000, 'bye'); } catch { /* already closed */ }
    this.ws = null;
    this.emit('closed', { reason: 'left the room' });
  }
}

/** @param {string} code */
function isFatal(code) {
  return FATAL_CODES.includes(code);
}
