// Whom to pair with in a code's room, without I/O (docs/PAIRING.md, "Whom
// to pair with"; Rust: crates/pair/src/session.rs). Room events, pairing
// messages and time go in; messages to send, the peer to connect to and
// events come out. fixtures/pairing/session.json replays the rules.

import { Pairing, PairError } from './pake.js';

/** Opening messages kept from peers that asked while another pairing ran, and members remembered to try. */
export const MAX_WAITING = 16;

/** @typedef {import('./pake.js').PairMsg} PairMsg */
/** @typedef {import('./pake.js').Keys} Keys */
/** @typedef {import('./pake.js').Role} Role */

/**
 * Why a session ended: `code` is what `pair_abort` carries.
 * @typedef {{ code: 'wrong_code' | 'tampered' | 'timeout' | 'failed', detail: string }} Abort
 */

/** @param {Abort} a */
export function abortText(a) {
  switch (a.code) {
    case 'wrong_code': return 'the codes do not match';
    case 'tampered': return `tampering detected: ${a.detail}`;
    case 'timeout': return "nobody in the code's room completed pairing in time";
    default: return a.detail;
  }
}

/**
 * Reads a `pair_abort`; version-1 peers send no code, so their text is read.
 * @param {string | undefined} code
 * @param {string} reason
 * @returns {Abort}
 */
export function abortFrom(code, reason) {
  const TAMPER = 'tampering detected: ';
  switch (code) {
    case 'wrong_code': return { code: 'wrong_code', detail: '' };
    case 'tampered': return { code: 'tampered', detail: reason.startsWith(TAMPER) ? reason.slice(TAMPER.length) : reason };
    case 'timeout': return { code: 'timeout', detail: '' };
    case undefined:
      if (reason.startsWith(TAMPER)) return { code: 'tampered', detail: reason.slice(TAMPER.length) };
      if (reason.includes('codes do not match')) return { code: 'wrong_code', detail: '' };
      return { code: 'failed', detail: reason };
    default: return { code: 'failed', detail: reason };
  }
}

/**
 * @typedef {{ type: 'send', to: string, msg: PairMsg }
 *   | { type: 'connect', peer: string, keys: Keys }
 *   | { type: 'peer_seen', peer: string }
 *   | { type: 'paired', peer: string }
 *   | { type: 'notice', notice: 'quiet_peer_trying_next' | 'quiet_peer_still_waiting', text: string }
 *   | { type: 'peer_gone', peer: string, wasPaired: boolean }
 *   | { type: 'ended', reason: Abort, byPeer: boolean }} SessionOutput
 */

export class Session {
  /**
   * @param {Role} role
   * @param {{ password(): string }} code
   * @param {number} timeoutMs  a peer that does not complete pairing in this time is given up on
   */
  constructor(role, code, timeoutMs) {
    this.role = role;
    this.code = code;
    this.timeoutMs = timeoutMs;
    /** @type {{ peer: string, pairing: Pairing, since: number } | null} */
    this.pairing = null;
    /** @type {string | null} */
    this.paired = null;
    /** @type {[string, PairMsg][]} */
    this.waiting = [];
    /** @type {string[]} */
    this.members = [];
    /** @type {string[]} */
    this.tried = [];
    /** @type {SessionOutput[]} */
    this.out = [];
    this.ended = false;
  }

  /** The next thing to do, or null. */
  poll() {
    return this.out.shift() ?? null;
  }

  /** When {@link Session.handleTimeout} should run next (ms), or null. */
  timeout() {
    return this.pairing ? this.pairing.since + this.timeoutMs : null;
  }

  /** @param {Abort} reason @param {boolean} byPeer */
  _end(reason, byPeer) {
    if (!this.ended) {
      this.ended = true;
      this.out.push({ type: 'ended', reason, byPeer });
    }
  }

  /** @param {string} peer @param {number} now */
  _start(peer, now) {
    const [pairing, first] = Pairing.start(this.role, this.code);
    this.out.push({ type: 'send', to: peer, msg: first });
    if (!this.tried.includes(peer)) this.tried.push(peer);
    this.pairing = { peer, pairing, since: now };
  }

  _reset() {
    this.pairing = null;
    this.paired = null;
  }

  /** @param {string} peer */
  _ours(peer) {
    return this.paired === peer || this.pairing?.peer === peer;
  }

  /** A member is in the room (listed in `joined`, in order, or joined since). @param {string} peer @param {number} now */
  peerJoined(peer, now) {
    if (this.ended) return;
    if (this.members.length < MAX_WAITING) this.members.push(peer);
    if (!this.pairing && !this.paired) {
      this._start(peer, now);
      this.out.push({ type: 'peer_seen', peer });
    }
  }

  /** A member left. @param {string} peer @param {number} now */
  peerLeft(peer, now) {
    if (this.ended) return;
    const ours = this._ours(peer);
    this.waiting = this.waiting.filter(([p]) => p !== peer);
    this.members = this.members.filter((p) => p !== peer);
    this.tried = this.tried.filter((p) => p !== peer);
    if (ours) {
      const wasPaired = this.paired !== null;
      this._reset();
      if (!wasPaired && this._takeUpWaiting(now)) return;
      this.out.push({ type: 'peer_gone', peer, wasPaired });
    }
  }

  /** The connection to the paired peer broke: a fresh pake from it is answered. @param {string} peer */
  connectionLost(peer) {
    if (this.paired === peer) this._reset();
  }

  /** This side gives up; the other side is told why. @param {Abort} reason */
  abort(reason) {
    if (this.ended) return;
    const peer = this.paired ?? this.pairing?.peer;
    if (peer) this.out.push({ type: 'send', to: peer, msg: { type: 'pair_abort', code: reason.code, reason: abortText(reason) } });
    this._end(reason, false);
  }

  /** @param {number} now */
  handleTimeout(now) {
    const due = this.timeout();
    if (this.ended || due === null || now < due) return;
    this._reset();
    if (this._takeUpWaiting(now)) return;
    const secs = Math.floor(this.timeoutMs / 1000);
    if (this.role === 'joiner') {
      const next = this.members.find((p) => !this.tried.includes(p));
      if (next !== undefined) {
        this._start(next, now);
        this.out.push({ type: 'notice', notice: 'quiet_peer_trying_next', text: `a peer in the code's room did not complete pairing within ${secs} s; trying the next` });
      } else {
        this._end({ code: 'timeout', detail: '' }, false);
      }
    } else {
      this.out.push({ type: 'notice', notice: 'quiet_peer_still_waiting', text: `a peer in the code's room did not complete pairing within ${secs} s; still waiting for the receiver` });
    }
  }

  /** @param {number} now */
  _takeUpWaiting(now) {
    const next = this.waiting.shift();
    if (!next) return false;
    const [peer, msg] = next;
    this._start(peer, now);
    this.out.push({ type: 'peer_seen', peer });
    this.handleMessage(peer, msg, now);
    return true;
  }

  /**
   * A pairing message from `from`.
   * @param {string} from
   * @param {PairMsg} msg
   * @param {number} now
   */
  handleMessage(from, msg, now) {
    if (this.ended) return;
    if (msg.type === 'pair_abort') {
      if (this._ours(from)) this._end(abortFrom(msg.code, msg.reason), true);
      return;
    }
    const fresh = msg.type === 'pair_pake';
    if (this.pairing && this.pairing.peer === from) {
      // ours
    } else if (!this.pairing && fresh && (this.paired === null || this.paired === from)) {
      this._reset();
      this._start(from, now);
      this.out.push({ type: 'peer_seen', peer: from });
    } else if (fresh) {
      this.waiting = this.waiting.filter(([p]) => p !== from);
      if (this.paired === null && this.waiting.length < MAX_WAITING) this.waiting.push([from, msg]);
      return;
    } else {
      return;
    }
    const { peer, pairing } = /** @type {NonNullable<Session['pairing']>} */ (this.pairing);
    try {
      const reply = pairing.handle(msg);
      if (reply) this.out.push({ type: 'send', to: peer, msg: reply });
      if (pairing.keys) {
        this.pairing = null;
        this.paired = peer;
        this.out.push({ type: 'connect', peer, keys: pairing.keys });
        this.out.push({ type: 'paired', peer });
      }
    } catch (e) {
      if (e instanceof PairError && e.code === 'wrong_code') this.abort({ code: 'wrong_code', detail: '' });
      else this.abort({ code: 'failed', detail: e instanceof Error ? e.message : String(e) });
    }
  }
}
