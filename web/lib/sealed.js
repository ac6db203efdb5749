// Sealed channels (docs/PROTOCOL.md, "Sealed channels"; Rust:
// crates/peer/src/sealed.rs): messages on a data channel encrypted at the
// application layer as well, for apps that store or forward them. The two
// ends agree a key by ECDH P-256 (a fresh key pair per channel, the public
// keys as each side's first message), bound to the connection's two DTLS
// fingerprints; every message is AES-256-GCM with a counter nonce.
// WebCrypto does ECDH and AES-GCM, @noble/hashes the HKDF.

import { extract, expand } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { concat } from './bytes.js';
import { Emitter } from './events.js';

const HELLO = 0x01;
const DATA = 0x02;
const PUBLIC_LEN = 65;
const NONCE_LEN = 12;
const TAG_LEN = 16;
const utf8 = new TextEncoder();
const subtle = () => globalThis.crypto.subtle;

/** What went wrong on a sealed channel: `bad_hello`, `forged`, `timeout`, `closed`. */
export class SealError extends Error {
  /** @param {'bad_hello' | 'forged' | 'timeout' | 'closed'} code @param {string} message */
  constructor(code, message) {
    super(message);
    this.name = 'SealError';
    this.code = code;
  }
}

const forged = () => new SealError('forged', 'a message on the sealed channel does not open (changed, replayed or out of order)');

/** @param {number} seq */
function counterNonce(seq) {
  const n = new Uint8Array(NONCE_LEN);
  new DataView(n.buffer).setBigUint64(4, BigInt(seq), false);
  return n;
}

/** The sealed-channel protocol for one end, without I/O. */
export class Sealer {
  /**
   * @param {CryptoKeyPair} pair @param {Uint8Array} publicKey
   * @param {string} label @param {string} ours @param {string} theirs
   */
  constructor(pair, publicKey, label, ours, theirs) {
    this.pair = pair;
    this.publicKey = publicKey;
    this.label = label;
    this.ours = ours;
    this.theirs = theirs;
    /** @type {{ send: CryptoKey, recv: CryptoKey } | null} */
    this.keys = null;
    this.sendSeq = 0;
    /** the counter the next message must carry */
    this.recvNext = 0;
    /** a message did not open: nothing after it is trusted */
    this.broken = false;
  }

  /**
   * One end of sealed channel `label` on a connection whose DTLS
   * fingerprints are `ours` and `theirs` (`sha-256 AB:...`), with a fresh
   * key pair (or `privateJwk`, for test vectors).
   * @param {string} label @param {string} ours @param {string} theirs @param {JsonWebKey} [privateJwk]
   */
  static async create(label, ours, theirs, privateJwk) {
    const alg = { name: 'ECDH', namedCurve: 'P-256' };
    /** @type {CryptoKeyPair} */
    let pair;
    if (privateJwk) {
      const { d: _d, ...pub } = privateJwk;
      pair = { privateKey: await subtle().importKey('jwk', privateJwk, alg, false, ['deriveBits']), publicKey: await subtle().importKey('jwk', pub, alg, true, []) };
    } else {
      pair = /** @type {CryptoKeyPair} */ (await subtle().generateKey(alg, false, ['deriveBits']));
    }
    const publicKey = new Uint8Array(await subtle().exportKey('raw', pair.publicKey));
    return new Sealer(pair, publicKey, label, ours, theirs);
  }

  /** Our first message: `0x01 ‖ our public key` (65 bytes, uncompressed). */
  hello() {
    return concat(new Uint8Array([HELLO]), this.publicKey);
  }

  get isReady() {
    return this.keys !== null;
  }

  /** The other side's first message: agrees the keys. @param {Uint8Array} msg */
  async handleHello(msg) {
    const bad = new SealError('bad_hello', 'the other side did not start the sealed channel (its first message is not a P-256 public key)');
    if (msg.length !== 1 + PUBLIC_LEN || msg[0] !== HELLO) throw bad;
    const theirs = msg.slice(1);
    let shared;
    try {
      const key = await subtle().importKey('raw', /** @type {BufferSource} */ (theirs), { name: 'ECDH', namedCurve: 'P-256' }, false, []);
      shared = new Uint8Array(await subtle().deriveBits({ name: 'ECDH', public: key }, this.pair.privateKey, 256));
    } catch {
      throw bad;
    }
    const prk = extract(sha256, shared, utf8.encode('peerlink sealed v1'));
    const key = (/** @type {string} */ fpW, /** @type {string} */ fpR, /** @type {Uint8Array} */ pubW, /** @type {Uint8Array} */ pubR) =>
      expand(sha256, prk, concat(utf8.encode('key\0'), utf8.encode(fpW), new Uint8Array([0]), utf8.encode(fpR), new Uint8Array([0]), pubW, pubR), 32);
    const aes = (/** @type {Uint8Array} */ k) => subtle().importKey('raw', /** @type {BufferSource} */ (k), { name: 'AES-GCM' }, false, ['encrypt', 'decrypt']);
    this.keys = {
      send: await aes(key(this.ours, this.theirs, this.publicKey, theirs)),
      recv: await aes(key(this.theirs, this.ours, theirs, this.publicKey)),
    };
  }

  /**
   * `msg` sealed for the wire: `0x02 ‖ nonce ‖ AES-GCM(kind ‖ payload)`, kind
   * 1 for text, 0 for bytes.
   * @param {string | Uint8Array} msg
   */
  async seal(msg) {
    const wire = await this.sealNext(msg);
    this.sendSeq++;
    return wire;
  }

  /**
   * `msg` sealed as the next message, the counter left where it is: the
   * channel moves it on once the message is queued, so a send refused (too
   * large, closed) leaves no gap, which the other side would take for a
   * dropped or forged message.
   * @param {string | Uint8Array} msg
   */
  async sealNext(msg) {
    if (!this.keys) throw new Error('seal after the keys are agreed');
    const nonce = counterNonce(this.sendSeq);
    const plain = typeof msg === 'string' ? concat(new Uint8Array([1]), utf8.encode(msg)) : concat(new Uint8Array([0]), msg);
    const sealed = await subtle().encrypt({ name: 'AES-GCM', iv: nonce, additionalData: utf8.encode(this.label) }, this.keys.send, /** @type {BufferSource} */ (plain));
    return concat(new Uint8Array([DATA]), nonce, new Uint8Array(sealed));
  }

  /**
   * A message from the wire, opened: only the next one in the order sent
   * (a replayed, reordered or missing message is refused), and nothing
   * after one that did not open. Calls must not overlap.
   * @param {Uint8Array} wire
   * @returns {Promise<string | Uint8Array>}
   */
  async open(wire) {
    try {
      return await this._openNext(wire);
    } catch (e) {
      this.broken = true;
      throw e;
    }
  }

  /** @param {Uint8Array} wire */
  async _openNext(wire) {
    if (this.broken || !this.keys || wire[0] !== DATA || wire.length < 1 + NONCE_LEN + 1 + TAG_LEN) throw forged();
    const nonce = wire.slice(1, 1 + NONCE_LEN);
    const view = new DataView(nonce.buffer);
    const seq = Number(view.getBigUint64(4, false));
    if (view.getUint32(0) !== 0 || seq !== this.recvNext) throw forged();
    let plain;
    try {
      plain = new Uint8Array(await subtle().decrypt({ name: 'AES-GCM', iv: nonce, additionalData: utf8.encode(this.label) }, this.keys.recv, /** @type {BufferSource} */ (wire.slice(1 + NONCE_LEN))));
    } catch {
      throw forged();
    }
    /** @type {string | Uint8Array} */
    let msg;
    if (plain[0] === 1) {
      try {
        msg = new TextDecoder('utf-8', { fatal: true }).decode(plain.subarray(1));
      } catch {
        throw forged();
      }
    } else if (plain[0] === 0) {
      msg = plain.slice(1);
    } else {
      throw forged();
    }
    this.recvNext = seq + 1;
    return msg;
  }
}

/**
 * @typedef {object} SealedEvents
 * @property {string | Uint8Array} message  opened, in the order sent
 * @property {SealError} error  a message that did not open (the channel is not to be trusted after it)
 */

/**
 * A data channel whose messages are sealed end to end; both ends must open
 * it as sealed. Get one with `room.seal(channel)`.
 * @extends {Emitter<SealedEvents>}
 */
export class SealedChannel extends Emitter {
  /** @param {import('./channel.js').Channel} channel @param {Sealer} sealer */
  constructor(channel, sealer) {
    super();
    this.channel = channel;
    this.sealer = sealer;
    /** @type {Promise<unknown>} */
    this._sending = Promise.resolve();
    /** @type {Promise<unknown>} */
    this._opening = Promise.resolve();
  }

  /**
   * Agrees the keys over `channel` (each side sends its public key first),
   * waiting at most `timeoutMs` for the other side's. Call it as the
   * channel opens (in `channel_open`, before any `await`): a message that
   * arrives before anyone listens is gone.
   * @param {import('./channel.js').Channel} channel @param {string} ours @param {string} theirs
   * @param {{ timeoutMs?: number }} [opts]
   */
  static async open(channel, ours, theirs, opts = {}) {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    /** @type {SealedChannel | null} */
    let sealed = null;
    /** @type {Uint8Array[]} messages that came with or right after the other side's key */
    const early = [];
    /** @type {(v: Uint8Array) => void} */
    let gotHello = () => {};
    const hello = new Promise((ok) => { gotHello = ok; });
    let first = true;
    const onMessage = (/** @type {unknown} */ m) => {
      const bytes = m instanceof Uint8Array ? m : m instanceof ArrayBuffer ? new Uint8Array(m) : utf8.encode(String(m));
      if (first) {
        first = false;
        gotHello(bytes);
      } else if (sealed) {
        sealed._receive(bytes);
      } else {
        early.push(bytes);
      }
    };
    // Listening before anything is awaited: the other side's key may be
    // on its way already (a browser channel keeps no message for later).
    const unlisten = channel.on('message', onMessage);
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let timer;
    try {
      const sealer = await Sealer.create(channel.label, ours, theirs);
      await channel.send(sealer.hello());
      const theirsHello = await Promise.race([
        hello,
        new Promise((_, no) => { timer = setTimeout(() => no(new SealError('timeout', `the other side's key did not arrive within ${timeoutMs} ms`)), timeoutMs); }),
      ]);
      await sealer.handleHello(/** @type {Uint8Array} */ (theirsHello));
      sealed = new SealedChannel(channel, sealer);
    } catch (e) {
      // Not sealed: stop listening (nothing piles up for nobody).
      unlisten();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    for (const b of early) sealed._receive(b);
    return sealed;
  }

  /** @param {Uint8Array} wire */
  _receive(wire) {
    this._opening = this._opening.then(() => this.sealer.open(wire)).then(
      (m) => this.emit('message', m),
      (e) => this.emit('error', e),
    );
  }

  /** Seals and sends `msg`, in order (backpressure as `Channel.send`). @param {string | Uint8Array} msg */
  send(msg) {
    // One at a time: each is sealed once the one before is queued or refused.
    const sent = this._sending
      .then(() => this.sealer.sealNext(msg))
      .then((w) => this.channel.send(w))
      .then(() => { this.sealer.sendSeq++; });
    this._sending = sent.catch(() => {});
    return sent;
  }
}
