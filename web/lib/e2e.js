// End-to-end encrypted rooms (docs/PROTOCOL.md, "End-to-end encrypted
// rooms"; Rust: crates/peer/src/e2e.rs): members share a room secret the
// server never sees (the link's `#k=`). Keys derived from it MAC every offer
// and answer between two members, so the server cannot swap the DTLS
// fingerprints and sit in the middle, and seal server-routed messages with
// AES-256-GCM, so the server relays only ciphertext. A safety number from
// both DTLS fingerprints lets two people check their connection by eye.
// HKDF and SHA-256 from @noble/hashes (synchronous: keys are ready when a
// connection is made); AES-GCM from WebCrypto.

import { extract, expand } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { concat } from './bytes.js';

/** The shortest room secret accepted: 16 characters (a random one from {@link newRoomSecret}, 22 characters, has 128 bits). */
export const MIN_ROOM_SECRET = 16;
/** The key of a sealed server-routed message: `{"peerlink_e2e": "..."}`. */
export const SEALED_KEY = 'peerlink_e2e';
/**
 * In a secret room, a member that refused a peer's offer or answer tells it
 * so, sealed (the server cannot forge or read it): `{"peerlink_refused": REASON}`.
 */
export const REFUSED_KEY = 'peerlink_refused';
/** The addressee in a room-wide message's associated data. */
export const EVERYONE = '*';
const NONCE_LEN = 12;
const TAG_LEN = 16;

const utf8 = new TextEncoder();

/** `parts`, UTF-8, joined by 0x00. @param {...string} parts */
function joined(...parts) {
  /** @type {Uint8Array[]} */
  const out = [];
  parts.forEach((p, i) => {
    if (i > 0) out.push(new Uint8Array([0]));
    out.push(utf8.encode(p));
  });
  return concat(...out);
}

/** @param {Uint8Array} bytes */
function toBase64Url(bytes) {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** @param {string} text @returns {Uint8Array | null} */
function fromBase64Url(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) return null;
  try {
    const s = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
    return Uint8Array.from(s, (c) => c.charCodeAt(0));
  } catch {
    return null;
  }
}

/** Why a server-routed message of a secret room was refused. */
export class OpenError extends Error {
  /** @param {'not_sealed' | 'forged'} code @param {string} message */
  constructor(code, message) {
    super(message);
    this.name = 'OpenError';
    this.code = code;
  }
}

/** A room's secret, bound to the room's name: two rooms with one secret share no key. */
export class RoomSecret {
  /** @param {string} secret @param {string} room */
  constructor(secret, room) {
    // The server sees what the keys MAC and seal: a short secret could be
    // guessed offline.
    if ([...secret].length < MIN_ROOM_SECRET) throw new Error(`a room secret needs at least ${MIN_ROOM_SECRET} characters of randomness (newRoomSecret() makes 22)`);
    this.room = room;
    this.prk = extract(sha256, utf8.encode(secret), utf8.encode('peerlink room v1'));
    this.sendKey = expand(sha256, this.prk, joined('send', room), 32);
    /** @type {Promise<CryptoKey> | null} */
    this._aes = null;
  }

  /**
   * The SDP keys between `me` and `peer`: ours MACs what we send, theirs
   * checks what we receive (the pairing scheme's, docs/PAIRING.md).
   * @param {string} me @param {string} peer
   */
  signalKeys(me, peer) {
    return { local: this._sdpKey(me, peer), remote: this._sdpKey(peer, me) };
  }

  /** @param {string} from @param {string} to */
  _sdpKey(from, to) {
    return expand(sha256, this.prk, joined('sdp', this.room, from, to), 32);
  }

  /** The associated data of a message from `from` to `to`. @param {string} from @param {string} to */
  aad(from, to) {
    return joined('send', this.room, from, to);
  }

  _key() {
    this._aes ??= globalThis.crypto.subtle.importKey('raw', /** @type {BufferSource} */ (this.sendKey), { name: 'AES-GCM' }, false, ['encrypt', 'decrypt']);
    return this._aes;
  }

  /**
   * `data` from `from` to `to` (`*`: everyone), sealed:
   * `{"peerlink_e2e": base64url(nonce ‖ ciphertext ‖ tag)}`.
   * @param {string} from @param {string} to @param {unknown} data
   * @param {Uint8Array} [nonce] 12 bytes, random unless given (tests)
   */
  async seal(from, to, data, nonce = globalThis.crypto.getRandomValues(new Uint8Array(NONCE_LEN))) {
    const plain = utf8.encode(JSON.stringify(data));
    const sealed = await globalThis.crypto.subtle.encrypt(
      { name: 'AES-GCM', iv: /** @type {BufferSource} */ (nonce), additionalData: /** @type {BufferSource} */ (this.aad(from, to)) },
      await this._key(), /** @type {BufferSource} */ (plain));
    return { [SEALED_KEY]: toBase64Url(concat(nonce, new Uint8Array(sealed))) };
  }

  /**
   * The message `from` sent `to`, opened; rejects with {@link OpenError}
   * anything not sealed with this room's key for exactly this sender and
   * addressee.
   * @param {string} from @param {string} to @param {unknown} data
   * @returns {Promise<unknown>}
   */
  async open(from, to, data) {
    const o = /** @type {Record<string, unknown>} */ (data);
    const text = data && typeof data === 'object' && !Array.isArray(data) && Object.keys(o).length === 1 ? o[SEALED_KEY] : undefined;
    if (typeof text !== 'string') throw new OpenError('not_sealed', 'the message is not sealed with the room\'s key');
    const forged = new OpenError('forged', 'the message does not open with the room\'s key (another secret, or changed on the way)');
    const sealed = fromBase64Url(text);
    if (!sealed || sealed.length < NONCE_LEN + TAG_LEN) throw forged;
    let plain;
    try {
      plain = await globalThis.crypto.subtle.decrypt(
        { name: 'AES-GCM', iv: /** @type {BufferSource} */ (sealed.subarray(0, NONCE_LEN)), additionalData: /** @type {BufferSource} */ (this.aad(from, to)) },
        await this._key(), /** @type {BufferSource} */ (sealed.subarray(NONCE_LEN)));
    } catch {
      throw forged;
    }
    try {
      return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(plain));
    } catch {
      throw forged;
    }
  }
}

/** The DTLS fingerprint of an SDP (`sha-256 AB:CD:...`), as its `a=fingerprint:` line has it, or null. @param {string} sdp */
export function sdpFingerprint(sdp) {
  for (const line of sdp.split(/\r?\n/)) {
    const l = line.trim();
    if (l.startsWith('a=fingerprint:')) return l.slice('a=fingerprint:'.length).trim();
  }
  return null;
}

/**
 * The safety number of a connection: five groups of five digits from both
 * DTLS fingerprints, the same at both ends.
 * @param {string} ours @param {string} theirs
 */
export function safetyNumber(ours, theirs) {
  const [a, b] = [utf8.encode(ours), utf8.encode(theirs)];
  const [lo, hi] = compareBytes(a, b) <= 0 ? [a, b] : [b, a];
  const h = sha256(concat(utf8.encode('peerlink safety v1'), new Uint8Array([0]), lo, new Uint8Array([0]), hi));
  const view = new DataView(h.buffer, h.byteOffset, h.byteLength);
  return [0, 1, 2, 3, 4].map((i) => String(view.getUint32(4 * i, false) % 100000).padStart(5, '0')).join(' ');
}

/** @param {Uint8Array} a @param {Uint8Array} b */
function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

/** A new room secret for a link: 16 random bytes, base64url (22 characters). */
export function newRoomSecret() {
  return toBase64Url(globalThis.crypto.getRandomValues(new Uint8Array(16)));
}
