// Chunk and file hashes (SHA-256) and their hex form on the wire
// (docs/TRANSFER.md; Rust: crates/transfer/src/hash.rs). Synchronous
// hashing uses @noble/hashes; `chunkHashAsync` uses WebCrypto, about ten
// times faster in a browser, for drivers that can wait.

import { sha256 } from '@noble/hashes/sha2.js';
import { toHex, fromHex, concat } from '../bytes.js';
import { ProtocolError } from './errors.js';

/** Hex characters per hash on the wire. */
export const HASH_HEX_LEN = 64;
/** The domain-separation prefix of a file hash. */
export const FILE_HASH_TAG = new TextEncoder().encode('peerlink/v1/file\0');

/** SHA-256 of one chunk. @param {Uint8Array} data */
export function chunkHash(data) {
  return sha256(data);
}

/** SHA-256 of one chunk, with WebCrypto. @param {Uint8Array} data */
export async function chunkHashAsync(data) {
  return new Uint8Array(await globalThis.crypto.subtle.digest('SHA-256', /** @type {BufferSource} */ (data)));
}

/**
 * `SHA-256("peerlink/v1/file\0" ‖ u64be(size) ‖ u32be(chunk_size) ‖ h_0 ‖ … ‖ h_{n-1})`.
 * @param {number} size
 * @param {number} chunkSize
 * @param {Uint8Array[]} hashes
 */
export function fileHash(size, chunkSize, hashes) {
  const head = new Uint8Array(12);
  const v = new DataView(head.buffer);
  v.setBigUint64(0, BigInt(size), false);
  v.setUint32(8, chunkSize, false);
  return sha256(concat(FILE_HASH_TAG, head, ...hashes));
}

/** @param {Uint8Array[]} hashes */
export function hashesToHex(hashes) {
  return hashes.map(toHex).join('');
}

/**
 * The `hashes` field of a `hashes` message.
 * @param {string} text
 * @returns {Uint8Array[]}
 */
export function hashesFromHex(text) {
  if (text.length % HASH_HEX_LEN !== 0) throw new ProtocolError('bad_hashes', 'bad `hashes` field: length is not a multiple of 64');
  const out = [];
  for (let i = 0; i < text.length; i += HASH_HEX_LEN) {
    const h = fromHex(text.slice(i, i + HASH_HEX_LEN));
    if (!h) throw new ProtocolError('bad_hashes', 'bad `hashes` field: not hex');
    out.push(h);
  }
  return out;
}

export { toHex };
