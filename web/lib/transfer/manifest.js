// The manifest: validated paths, entries, chunk geometry, and how it is
// announced (docs/TRANSFER.md; Rust: crates/transfer/src/manifest.rs and
// announce.rs). Sizes are JavaScript numbers: exact up to 2^53 bytes (8 PiB).

import { sha256 } from '@noble/hashes/sha2.js';
import { toHex } from '../bytes.js';
import { PathError, ManifestError } from './errors.js';

export const MAX_PATH_BYTES = 4096;
export const MAX_PATH_COMPONENTS = 64;
export const MAX_TEXT_BYTES = 1 << 20;
export const MIN_CHUNK_SIZE = 16 << 10;
export const MAX_CHUNK_SIZE = 16 << 20;
export const DEFAULT_CHUNK_SIZE = 1 << 20;
export const PROTOCOL_VERSION = 1;
export const MAX_CTL_BYTES = 60_000;

const utf8 = (/** @type {string} */ s) => new TextEncoder().encode(s).length;

/** @param {number} n */
export function validChunkSize(n) {
  return Number.isInteger(n) && n >= MIN_CHUNK_SIZE && n <= MAX_CHUNK_SIZE && (n & (n - 1)) === 0;
}

/** Most chunks a file may have: a receiver keeps every chunk hash of a file (at most 128 MiB). */
export const MAX_CHUNKS = 2 ** 22;

/**
 * The chunk size a sender picks for files of at most `largest` bytes: the
 * smallest power of two from {@link DEFAULT_CHUNK_SIZE} up that keeps them
 * within {@link MAX_CHUNKS}; undefined above 64 TiB.
 * @param {number} largest
 * @returns {number | undefined}
 */
export function chunkSizeFor(largest) {
  for (let size = DEFAULT_CHUNK_SIZE; size <= MAX_CHUNK_SIZE; size *= 2) {
    if (chunkCount(largest, size) <= MAX_CHUNKS) return size;
  }
  return undefined;
}

/** `ceil(size / chunkSize)`. @param {number} size @param {number} chunkSize */
export function chunkCount(size, chunkSize) {
  return Math.ceil(size / Math.max(chunkSize, 1));
}

/**
 * Checks a manifest path against every rule; returns it, or throws {@link PathError}.
 * @param {string} path
 */
export function parseRelPath(path) {
  if (path.length === 0) throw new PathError('empty', 'path is empty');
  const len = utf8(path);
  if (len > MAX_PATH_BYTES) throw new PathError('too_long', `path is ${len} bytes, more than ${MAX_PATH_BYTES}`);
  if (path.startsWith('/')) throw new PathError('absolute', 'path is absolute');
  if (/^[A-Za-z]:/.test(path)) throw new PathError('drive_letter', 'path starts with a drive letter');
  const parts = path.split('/');
  if (parts.length > MAX_PATH_COMPONENTS) {
    throw new PathError('too_many_components', `path has ${parts.length} components, more than ${MAX_PATH_COMPONENTS}`);
  }
  for (const c of parts) {
    if (c === '') throw new PathError('empty_component', 'path has an empty component');
    if (c === '.' || c === '..') throw new PathError('dot_component', 'path has a `.` or `..` component');
    if (c.includes('\\')) throw new PathError('backslash', 'path contains a backslash');
    // Unicode control characters (Cc), as Rust's char::is_control.
    if (/[\u0000-\u001f\u007f-\u009f]/.test(c)) throw new PathError('control_char', 'path contains a control character');
  }
  return path;
}

/** @typedef {'file' | 'dir' | 'text'} EntryKind */
/** @typedef {{ kind: EntryKind, path: string, size: number }} Entry */

/** @param {string} path @param {number} size @returns {Entry} */
export const fileEntry = (path, size) => ({ kind: 'file', path: parseRelPath(path), size });
/** @param {string} path @returns {Entry} */
export const dirEntry = (path) => ({ kind: 'dir', path: parseRelPath(path), size: 0 });
/** @param {string} path @param {number} size @returns {Entry} */
export const textEntry = (path, size) => ({ kind: 'text', path: parseRelPath(path), size });

/** The wire form of an entry (a `dir` has no `size`). @param {Entry} e */
export function entryJson(e) {
  return e.kind === 'dir' ? { kind: e.kind, path: e.path } : { kind: e.kind, path: e.path, size: e.size };
}

/**
 * The per-entry rules, on an entry as it came off the wire.
 * @param {unknown} raw
 * @returns {Entry}
 */
export function validateEntry(raw) {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ManifestError('json', 'an entry is an object');
  const o = /** @type {Record<string, unknown>} */ (raw);
  if (typeof o.kind !== 'string' || typeof o.path !== 'string') throw new ManifestError('json', 'an entry has a string kind and path');
  const { kind, path } = o;
  if (kind !== 'file' && kind !== 'dir' && kind !== 'text') throw new ManifestError('unknown_kind', `unknown entry kind ${JSON.stringify(kind)} for ${JSON.stringify(path)}`);
  try {
    parseRelPath(path);
  } catch (e) {
    throw new ManifestError('path', `bad path ${JSON.stringify(path)}: ${/** @type {Error} */ (e).message}`);
  }
  const size = o.size;
  if (size !== undefined && size !== null && !(typeof size === 'number' && Number.isSafeInteger(size) && size >= 0)) {
    throw new ManifestError('json', `${JSON.stringify(path)}: size must be a byte count`);
  }
  if (kind === 'dir') {
    if (size) throw new ManifestError('dir_with_size', `${JSON.stringify(path)} is a dir entry with a size (${size})`);
    return { kind, path, size: 0 };
  }
  if (size === undefined || size === null) throw new ManifestError('missing_size', `${JSON.stringify(path)} is a file or text entry without a size`);
  return { kind, path, size };
}

/** A validated manifest: what the sender offers and the receiver accepted. */
export class Manifest {
  /**
   * Checks every rule of docs/TRANSFER.md; throws {@link ManifestError}.
   * @param {number} chunkSize
   * @param {Entry[]} entries
   */
  constructor(chunkSize, entries) {
    if (!validChunkSize(chunkSize)) throw new ManifestError('chunk_size', `chunk size ${chunkSize} is not a power of two from 16 KiB to 16 MiB`);
    /** @type {number[]} entry index of each file index */
    const files = [];
    let total = 0;
    const paths = new Set();
    const folders = new Set();
    entries.forEach((e, index) => {
      if (e.kind === 'dir' && e.size !== 0) throw new ManifestError('dir_with_size', `${JSON.stringify(e.path)} is a dir entry with a size (${e.size})`);
      if (e.kind === 'text' && e.size > MAX_TEXT_BYTES) throw new ManifestError('text_too_large', `text entry ${JSON.stringify(e.path)} is ${e.size} bytes, more than ${MAX_TEXT_BYTES}`);
      if (chunkCount(e.size, chunkSize) > MAX_CHUNKS) throw new ManifestError('too_many_chunks', `${JSON.stringify(e.path)} (${e.size} bytes) needs more than 2^22 chunks of this size`);
      if (paths.has(e.path)) throw new ManifestError('duplicate', `${JSON.stringify(e.path)} appears twice`);
      paths.add(e.path);
      for (let at = e.path.indexOf('/'); at >= 0; at = e.path.indexOf('/', at + 1)) folders.add(e.path.slice(0, at));
      if (e.kind !== 'dir') {
        files.push(index);
        total += e.size;
        if (!Number.isSafeInteger(total)) throw new ManifestError('total_overflow', 'the sizes add up to more than this client can count (2^53 bytes)');
      }
    });
    for (const e of entries) {
      if (e.kind === 'file' && folders.has(e.path)) {
        const inside = entries.find((x) => x.path.startsWith(`${e.path}/`));
        throw new ManifestError('file_is_folder', `${JSON.stringify(e.path)} is a file, but ${JSON.stringify(inside?.path ?? '')} would be inside it`);
      }
    }
    this.chunkSize = chunkSize;
    this.entries = entries;
    this._files = files;
    this.totalBytes = total;
  }

  get fileCount() {
    return this._files.length;
  }

  /** The entry of file index `file`. @param {number} file */
  file(file) {
    const i = this._files[file];
    return i === undefined ? undefined : this.entries[i];
  }

  /** The `file` and `text` entries with their file indices. @returns {[number, Entry][]} */
  files() {
    return this._files.map((i, file) => [file, this.entries[i]]);
  }

  /** @param {number} file */
  chunkCount(file) {
    const e = this.file(file);
    return e === undefined ? undefined : chunkCount(e.size, this.chunkSize);
  }

  /**
   * Byte offset and length of `chunk` of `file`, or undefined.
   * @param {number} file @param {number} chunk
   * @returns {[number, number] | undefined}
   */
  chunkSpan(file, chunk) {
    const e = this.file(file);
    if (!e) return undefined;
    const offset = chunk * this.chunkSize;
    if (offset >= e.size) return undefined;
    return [offset, Math.min(this.chunkSize, e.size - offset)];
  }

  /** @param {Manifest} other */
  equals(other) {
    return this.chunkSize === other.chunkSize && this.entries.length === other.entries.length &&
      this.entries.every((e, i) => e.kind === other.entries[i].kind && e.path === other.entries[i].path && e.size === other.entries[i].size);
  }

  /** The messages that announce it: `manifest`, parts under the size limit, `manifest_end`. */
  toCtlMessages() {
    const cursor = new ManifestCursor();
    const out = [];
    for (let m = cursor.next(this); m; m = cursor.next(this)) out.push(m);
    return out;
  }

  /** A stable identity: hex SHA-256 of the announcement, one JSON message per line (as `Manifest::id` in Rust). */
  id() {
    const text = this.toCtlMessages().map((m) => JSON.stringify(m) + '\n').join('');
    return toHex(sha256(new TextEncoder().encode(text)));
  }
}

/** Where a sender is in announcing a manifest, one message at a time. */
export class ManifestCursor {
  constructor() {
    this.headerSent = false;
    this.nextEntry = 0;
    this.endSent = false;
  }

  /** @param {Manifest} m @returns {import('./wire.js').Ctl | null} */
  next(m) {
    if (!this.headerSent) {
      this.headerSent = true;
      return { type: 'manifest', version: PROTOCOL_VERSION, chunk_size: m.chunkSize, entries: m.entries.length, bytes: m.totalBytes };
    }
    if (this.nextEntry < m.entries.length) {
      let len = utf8(JSON.stringify({ type: 'manifest_part', entries: [] }));
      const part = [];
      for (const e of m.entries.slice(this.nextEntry)) {
        const entryLen = utf8(JSON.stringify(entryJson(e))) + (part.length ? 1 : 0);
        if (part.length && len + entryLen > MAX_CTL_BYTES) break;
        len += entryLen;
        part.push(entryJson(e));
      }
      this.nextEntry += part.length;
      return { type: 'manifest_part', entries: part };
    }
    if (!this.endSent) {
      this.endSent = true;
      return { type: 'manifest_end' };
    }
    return null;
  }
}
