// The pairing exchange (docs/PAIRING.md; Rust: crates/pair/src/pake.rs):
// SPAKE2 over Ed25519 exactly as python-spake2 0.9 and RustCrypto's
// spake2 0.4 run it, key confirmation, and the keys that authenticate the
// WebRTC session. Primitives: @noble/curves and @noble/hashes (audited).

import { ed25519 } from '@noble/curves/ed25519.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { hmac } from '@noble/hashes/hmac.js';
import { toHex, fromHex, equalBytes, concat } from '../bytes.js';

/** SPAKE2 identity of the side that made the code (side A). */
export const ID_CREATOR = 'peerlink/v1/pair/creator';
/** SPAKE2 identity of the side that typed it (side B). */
export const ID_JOINER = 'peerlink/v1/pair/joiner';
/** HKDF salt of every key derived from the SPAKE2 key. */
export const HKDF_SALT = 'peerlink pair v1';

const Point = ed25519.Point;
const L = Point.Fn.ORDER;
const M = Point.fromHex('15cfd18e385952982b6a8f8c7854963b58e34388c8e6dae891db756481a02312');
const N = Point.fromHex('f04f2e7eb734b2a8f8b472eaf9c3c632576ac64aea650b496a8a20ff00e583c3');
const enc = (/** @type {string} */ s) => new TextEncoder().encode(s);

/** @typedef {'creator' | 'joiner'} Role */

/**
 * A pairing message (server-routed `send` data).
 * @typedef {{ type: 'pair_pake', msg: string }
 *   | { type: 'pair_confirm', mac: string }
 *   | { type: 'pair_abort', code?: string, reason: string }} PairMsg
 */

/** Session keys; the server never sees them. */
/** @typedef {{ sdpLocal: Uint8Array, sdpRemote: Uint8Array, file: Uint8Array }} Keys */

/** Why pairing failed (`PairError` in Rust). */
export class PairError extends Error {
  /**
   * @param {'wrong_code' | 'invalid' | 'aborted'} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'PairError';
    this.code = code;
  }
}

/**
 * Reads a server-routed message; null if it is not a pairing message.
 * @param {unknown} v
 * @returns {PairMsg | null}
 */
export function parsePairMsg(v) {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return null;
  const o = /** @type {Record<string, unknown>} */ (v);
  if (o.type === 'pair_pake' && typeof o.msg === 'string') return { type: 'pair_pake', msg: o.msg };
  if (o.type === 'pair_confirm' && typeof o.mac === 'string') return { type: 'pair_confirm', mac: o.mac };
  if (o.type === 'pair_abort' && typeof o.reason === 'string') {
    if (o.code !== undefined && typeof o.code !== 'string') return null;
    return o.code === undefined ? { type: 'pair_abort', reason: o.reason } : { type: 'pair_abort', code: o.code, reason: o.reason };
  }
  return null;
}

/** Big-endian bytes as an integer. @param {Uint8Array} b */
function beInt(b) {
  return b.length ? BigInt('0x' + toHex(b)) : 0n;
}

/** Little-endian bytes as an integer. @param {Uint8Array} b */
function leInt(b) {
  return beInt(Uint8Array.from(b).reverse());
}

/** The password scalar: HKDF-SHA256(salt "", info "SPAKE2 pw", 48 bytes), big-endian, mod L. @param {string} password */
export function passwordScalar(password) {
  return beInt(hkdf(sha256, enc(password), new Uint8Array(0), enc('SPAKE2 pw'), 48)) % L;
}

/**
 * `s·p`, for any scalar in [0, L).
 * @param {import('@noble/curves/abstract/edwards.js').EdwardsPoint} p
 * @param {bigint} s
 */
function mul(p, s) {
  return s === 0n ? Point.ZERO : p.multiply(s);
}

/** @param {Uint8Array} key @param {string} label */
const derive = (key, label) => hkdf(sha256, key, enc(HKDF_SALT), enc(label), 32);

/**
 * One pairing attempt, without I/O: messages in, messages out.
 * Both sides send {@link Pairing.start}'s message, feed every pairing
 * message from the other side to {@link Pairing.handle} and send what it
 * returns; once the other side's confirmation checks out, `keys` is set.
 */
export class Pairing {
  /**
   * @param {Role} role
   * @param {string} password  the code's canonical form
   * @param {Uint8Array} [random64]  64 random bytes (tests pass the vectors')
   */
  constructor(role, password, random64) {
    const rng = random64 ?? globalThis.crypto.getRandomValues(new Uint8Array(64));
    if (rng.length !== 64) throw new Error('64 random bytes');
    this.role = role;
    this.password = password;
    this.w = passwordScalar(password);
    this.x = leInt(rng) % L;
    const blind = role === 'creator' ? M : N;
    const element = mul(Point.BASE, this.x).add(mul(blind, this.w)).toBytes();
    /** Our 33-byte message: side byte and element. */
    this.mine = concat(Uint8Array.of(role === 'creator' ? 0x41 : 0x42), element);
    /** @type {{ theirKey: Uint8Array, transcript: Uint8Array, keys: Keys } | null} */
    this.confirming = null;
    /** @type {Keys | null} */
    this.keys = null;
    this.finished = false;
  }

  /**
   * Starts a pairing for `code`; returns it and the first message to send.
   * @param {Role} role
   * @param {{ password(): string }} code
   * @returns {[Pairing, PairMsg]}
   */
  static start(role, code) {
    const p = new Pairing(role, code.password());
    return [p, p.first()];
  }

  /** @returns {PairMsg} */
  first() {
    return { type: 'pair_pake', msg: toHex(this.mine) };
  }

  /** The SPAKE2 key, from the other side's message (exported for the vectors). @param {Uint8Array} theirs */
  sharedKey(theirs) {
    const expect = this.role === 'creator' ? 0x42 : 0x41;
    if (theirs.length !== 33 || theirs[0] !== expect) throw new PairError('invalid', 'pake message from the wrong side, or malformed');
    let Y;
    try {
      Y = Point.fromBytes(theirs.subarray(1));
    } catch {
      throw new PairError('invalid', 'pake message: not a curve point');
    }
    const unblind = this.role === 'creator' ? N : M;
    const Z = mul(Y.subtract(mul(unblind, this.w)), this.x).toBytes();
    const [X, Yb] = this.role === 'creator' ? [this.mine.subarray(1), theirs.subarray(1)] : [theirs.subarray(1), this.mine.subarray(1)];
    return sha256(concat(sha256(enc(this.password)), sha256(enc(ID_CREATOR)), sha256(enc(ID_JOINER)), X, Yb, Z));
  }

  /**
   * Handles a message from the other side; returns the reply to send, if any.
   * Throws {@link PairError}: `wrong_code` when the confirmation fails.
   * @param {PairMsg} msg
   * @returns {PairMsg | null}
   */
  handle(msg) {
    if (msg.type === 'pair_abort') throw new PairError('aborted', `the other side aborted pairing: ${msg.reason}`);
    if (msg.type === 'pair_pake') {
      const theirs = fromHex(msg.msg);
      if (!theirs || msg.msg.length > 1024) throw new PairError('invalid', 'pake message is not hex');
      if (equalBytes(theirs, this.mine)) throw new PairError('invalid', 'our own message was reflected back');
      if (this.finished) throw new PairError('invalid', 'a second pake message');
      const key = this.sharedKey(theirs);
      this.finished = true;
      const [msgA, msgB] = this.role === 'creator' ? [this.mine, theirs] : [theirs, this.mine];
      const sub = (/** @type {string} */ l) => derive(key, l);
      const mineC = sub(this.role === 'creator' ? 'confirm A' : 'confirm B');
      const theirsC = sub(this.role === 'creator' ? 'confirm B' : 'confirm A');
      const [sdpA, sdpB] = [sub('sdp A'), sub('sdp B')];
      const keys = this.role === 'creator'
        ? { sdpLocal: sdpA, sdpRemote: sdpB, file: sub('file') }
        : { sdpLocal: sdpB, sdpRemote: sdpA, file: sub('file') };
      const transcript = concat(msgA, msgB);
      this.confirming = { theirKey: theirsC, transcript, keys };
      return { type: 'pair_confirm', mac: toHex(hmac(sha256, mineC, transcript)) };
    }
    if (!this.confirming) throw new PairError('invalid', 'confirmation before the pake message');
    const theirs = fromHex(msg.mac);
    if (!theirs) throw new PairError('invalid', 'confirmation is not hex');
    const expected = hmac(sha256, this.confirming.theirKey, this.confirming.transcript);
    const c = this.confirming;
    this.confirming = null;
    if (!equalBytes(theirs, expected)) throw new PairError('wrong_code', 'the codes do not match (a typo, or someone else tried to guess the code)');
    this.keys = c.keys;
    return null;
  }
}
