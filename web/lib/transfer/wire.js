// The wire format: control messages (JSON on `peerlink-xfer-ctl`) and data
// frames (binary on `peerlink-xfer-data`). Rust: crates/transfer/src/wire.rs;
// fixtures/transfer/ pins both.

import { ProtocolError } from './errors.js';
import { MAX_CTL_BYTES, validateEntry } from './manifest.js';

/** Bytes of a data frame's header: `u32be file ‖ u64be offset`. */
export const FRAME_HEADER = 12;
/** Hashes in one `hashes` message; fewer only at the end of a file. */
export const HASHES_PER_MESSAGE = 256;
export const CTL_LABEL = 'peerlink-xfer-ctl';
export const DATA_LABEL = 'peerlink-xfer-data';

/** @typedef {'user' | 'declined' | 'bad_manifest' | 'changed' | 'io' | 'disk_full' | 'protocol' | 'too_large' | 'unknown'} CancelCode */
const CANCEL_CODES = ['user', 'declined', 'bad_manifest', 'changed', 'io', 'disk_full', 'protocol', 'too_large'];

/**
 * A control message, fields in wire order.
 * @typedef {{ type: 'manifest', version: number, chunk_size: number, entries: number, bytes: number }
 *   | { type: 'manifest_part', entries: { kind: string, path: string, size?: number }[] }
 *   | { type: 'manifest_end' }
 *   | { type: 'hashes', file: number, from: number, hashes: string }
 *   | { type: 'accept' }
 *   | { type: 'decline', reason: string }
 *   | { type: 'get_hashes', file: number, from: number }
 *   | { type: 'want', file: number, ranges: [number, number][] }
 *   | { type: 'done', files: number, bytes: number }
 *   | { type: 'cancel', code: CancelCode, reason: string }} Ctl
 */

/** @param {Record<string, unknown>} o @param {string} k @param {number} max */
function uint(o, k, max = Number.MAX_SAFE_INTEGER) {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new ProtocolError('json', `malformed control message: \`${k}\` must be an integer from 0 to ${max}`);
  }
  return v;
}
/** @param {Record<string, unknown>} o @param {string} k */
function str(o, k) {
  const v = o[k] ?? '';
  if (typeof v !== 'string') throw new ProtocolError('json', `malformed control message: \`${k}\` must be a string`);
  return v;
}
const U32 = 0xffff_ffff;

/**
 * Parses one control message. Unknown fields are ignored; an unknown type,
 * a missing field or a message over 60,000 bytes is a {@link ProtocolError}
 * (`bad_manifest` for an invalid manifest entry).
 * @param {string} text
 * @returns {Ctl}
 */
export function parseCtl(text) {
  const len = new TextEncoder().encode(text).length;
  if (len > MAX_CTL_BYTES) throw new ProtocolError('ctl_too_long', `control message is ${len} bytes, more than the ${MAX_CTL_BYTES}-byte limit`);
  /** @type {unknown} */
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError('json', `malformed control message: ${e}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ProtocolError('json', 'malformed control message: not an object');
  const o = /** @type {Record<string, unknown>} */ (v);
  switch (o.type) {
    case 'manifest':
      return { type: 'manifest', version: uint(o, 'version', U32), chunk_size: uint(o, 'chunk_size', U32), entries: uint(o, 'entries'), bytes: uint(o, 'bytes') };
    case 'manifest_part': {
      if (!Array.isArray(o.entries)) throw new ProtocolError('json', 'malformed control message: `entries` must be a list');
      const entries = o.entries.map((raw) => {
        try {
          const e = validateEntry(raw);
          return e.kind === 'dir' ? { kind: e.kind, path: e.path } : { kind: e.kind, path: e.path, size: e.size };
        } catch (e) {
          const err = /** @type {import('./errors.js').ManifestError} */ (e);
          if (err.kind === 'json') throw new ProtocolError('json', `malformed control message: ${err.message}`);
          throw ProtocolError.badManifest(err);
        }
      });
      return { type: 'manifest_part', entries };
    }
    case 'manifest_end': return { type: 'manifest_end' };
    case 'hashes': return { type: 'hashes', file: uint(o, 'file', U32), from: uint(o, 'from', U32), hashes: str(o, 'hashes') };
    case 'accept': return { type: 'accept' };
    case 'decline': return { type: 'decline', reason: str(o, 'reason') };
    case 'get_hashes': return { type: 'get_hashes', file: uint(o, 'file', U32), from: uint(o, 'from', U32) };
    case 'want': {
      if (!Array.isArray(o.ranges)) throw new ProtocolError('json', 'malformed control message: `ranges` must be a list');
      /** @type {[number, number][]} */
      const ranges = o.ranges.map((r) => {
        if (!Array.isArray(r) || r.length !== 2) throw new ProtocolError('json', 'malformed control message: a range is [start, end]');
        return [uint({ s: r[0] }, 's', U32), uint({ e: r[1] }, 'e', U32)];
      });
      return { type: 'want', file: uint(o, 'file', U32), ranges };
    }
    case 'done': return { type: 'done', files: uint(o, 'files'), bytes: uint(o, 'bytes') };
    case 'cancel': {
      if (typeof o.code !== 'string') throw new ProtocolError('json', 'malformed control message: `code` must be a string');
      const code = /** @type {CancelCode} */ (CANCEL_CODES.includes(o.code) ? o.code : 'unknown');
      return { type: 'cancel', code, reason: str(o, 'reason') };
    }
    default:
      throw new ProtocolError('json', `malformed control message: unknown type ${JSON.stringify(o.type)}`);
  }
}

/** The JSON text of a control message. @param {Ctl} msg */
export function ctlJson(msg) {
  return JSON.stringify(msg);
}

/**
 * A data frame: `u32be file ‖ u64be offset ‖ payload`.
 * @param {number} file @param {number} offset @param {Uint8Array} payload
 */
export function encodeFrame(file, offset, payload) {
  return encodeFrameInto(new Uint8Array(FRAME_HEADER + payload.length), file, offset, payload);
}

/**
 * A data frame written at the start of `buf` (a sender's reused buffer, at
 * least FRAME_HEADER + payload bytes): the view of it that holds the frame.
 * @param {Uint8Array} buf @param {number} file @param {number} offset @param {Uint8Array} payload
 */
export function encodeFrameInto(buf, file, offset, payload) {
  const frame = buf.subarray(0, FRAME_HEADER + payload.length);
  const v = new DataView(frame.buffer, frame.byteOffset, FRAME_HEADER);
  v.setUint32(0, file, false);
  v.setBigUint64(4, BigInt(offset), false);
  frame.set(payload, FRAME_HEADER);
  return frame;
}

/**
 * Splits a data frame into file, offset and payload (at least one byte).
 * @param {Uint8Array} frame
 * @returns {[number, number, Uint8Array]}
 */
export function decodeFrame(frame) {
  if (frame.length <= FRAME_HEADER) throw new ProtocolError('short_frame', `data frame of ${frame.length} bytes: needs a 12-byte header and at least one payload byte`);
  const v = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const offset = v.getBigUint64(4, false);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('unasked_frame', `data frame offset ${offset} is beyond any file this client takes`);
  return [v.getUint32(0, false), Number(offset), frame.subarray(FRAME_HEADER)];
}

/**
 * The frames that carry `data` (bytes of `file` from `offset`), each at most
 * `maxMessageSize` bytes with its header.
 * @param {number} file @param {number} offset @param {Uint8Array} data @param {number} maxMessageSize
 */
export function* frames(file, offset, data, maxMessageSize) {
  const maxPayload = Math.max(maxMessageSize - FRAME_HEADER, 1);
  for (let at = 0; at < data.length; at += maxPayload) {
    yield encodeFrame(file, offset + at, data.subarray(at, Math.min(at + maxPayload, data.length)));
  }
}
