// Authenticated signaling (docs/PROTOCOL.md, `signal`; Rust:
// crates/peer/src/auth.rs): paired peers MAC every offer and answer with
// HMAC-SHA256 over `kind ‖ 0x00 ‖ u64be(seq) ‖ sdp`, so a signaling server
// cannot change the DTLS fingerprints in them. WebCrypto does the HMAC.

import { toHex, fromHex } from './bytes.js';

/** @param {Uint8Array} key */
function importKey(key) {
  return globalThis.crypto.subtle.importKey('raw', /** @type {BufferSource} */ (key), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign', 'verify']);
}

/**
 * @param {'offer' | 'answer'} kind
 * @param {number} seq
 * @param {string} sdp
 */
function signed(kind, seq, sdp) {
  const k = new TextEncoder().encode(kind);
  const s = new TextEncoder().encode(sdp);
  const out = new Uint8Array(k.length + 1 + 8 + s.length);
  out.set(k, 0);
  out[k.length] = 0;
  new DataView(out.buffer).setBigUint64(k.length + 1, BigInt(seq), false);
  out.set(s, k.length + 9);
  return out;
}

/**
 * The `auth` of an SDP we send, with our key.
 * @param {Uint8Array} key
 * @param {'offer' | 'answer'} kind
 * @param {number} seq
 * @param {string} sdp
 * @returns {Promise<{ seq: number, mac: string }>}
 */
export async function signSdp(key, kind, seq, sdp) {
  const tag = await globalThis.crypto.subtle.sign('HMAC', await importKey(key), signed(kind, seq, sdp));
  return { seq, mac: toHex(new Uint8Array(tag)) };
}

/**
 * Whether `auth` proves the other side (with `key`) wrote `sdp`.
 * @param {Uint8Array} key
 * @param {'offer' | 'answer'} kind
 * @param {string} sdp
 * @param {{ seq: number, mac: string }} auth
 */
export async function verifySdp(key, kind, sdp, auth) {
  const tag = fromHex(auth.mac);
  if (!tag || tag.length !== 32 || !Number.isSafeInteger(auth.seq) || auth.seq < 0) return false;
  return globalThis.crypto.subtle.verify('HMAC', await importKey(key), /** @type {BufferSource} */ (tag), signed(kind, auth.seq, sdp));
}
