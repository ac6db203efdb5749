// The signaling protocol's messages (docs/PROTOCOL.md; Rust:
// crates/proto). The contract is fixtures/protocol/: the tests check that
// every fixture parses to the message it shows and writes back unchanged.

/** The protocol version this client speaks (`hello.version`). */
export const PROTOCOL_VERSION = 1;

/** Room names: 1 to 64 of A-Z a-z 0-9 `-` `_` `.`. */
export const MAX_ROOM_LEN = 64;
/** Display names: at most this many UTF-8 bytes. */
export const MAX_NAME_LEN = 64;

/** Every error code a server of this version sends; others are treated as a generic refusal. */
export const ERROR_CODES = Object.freeze([
  'bad_json', 'unknown_type', 'bad_message', 'too_large', 'binary_frame', 'unsupported_version',
  'hello_required', 'already_greeted', 'invalid_room', 'invalid_name', 'room_full', 'too_many_rooms',
  'already_joined', 'not_in_room', 'unknown_peer', 'spoofed_sender', 'unauthorized', 'origin_not_allowed', 'rate_limited', 'flooding', 'peer_busy', 'idle_timeout',
  'slow_consumer', 'shutting_down', 'unavailable',
]);

/** Codes after which the server closes the connection. */
export const FATAL_CODES = Object.freeze(['unsupported_version', 'idle_timeout', 'slow_consumer', 'shutting_down', 'flooding', 'origin_not_allowed']);

/** @param {string} room */
export function validRoom(room) {
  return room.length >= 1 && room.length <= MAX_ROOM_LEN && /^[A-Za-z0-9._-]+$/.test(room);
}

/**
 * @typedef {{ urls: string[], username?: string, credential?: string }} IceServer
 * @typedef {{ id: string, name?: string }} PeerInfo
 * @typedef {{ max_message_bytes: number, max_peers_per_room: number, max_rooms_per_connection: number, messages_per_second: number, message_burst: number, idle_timeout_ms: number }} Limits
 * @typedef {{ seq: number, mac: string }} SignalAuth
 * @typedef {{ kind: 'offer', sdp: string, auth?: SignalAuth }
 *   | { kind: 'answer', sdp: string, auth?: SignalAuth }
 *   | { kind: 'candidate', candidate: string, mid?: string }
 *   | { kind: 'end_of_candidates' }
 *   | { kind: 'unknown' }} Signal
 */

/**
 * Client → server.
 * @typedef {{ type: 'hello', version: number, client?: string, resume?: string }
 *   | { type: 'join', room: string, name?: string, token?: string }
 *   | { type: 'leave', room: string }
 *   | { type: 'signal', room: string, to: string, signal: Signal }
 *   | { type: 'send', room: string, to?: string, data: unknown }
 *   | { type: 'ping', nonce?: number }} ClientMsg
 */

/**
 * Server → client. Types this version does not know parse to `{type: 'unknown'}`.
 * @typedef {{ type: 'welcome', version: number, peer_id: string, ice_servers: IceServer[], limits: Limits, resume?: string }
 *   | { type: 'joined', room: string, peers: PeerInfo[], resumed?: boolean, size?: number }
 *   | { type: 'left', room: string }
 *   | { type: 'peer_joined', room: string, peer: PeerInfo }
 *   | { type: 'peer_left', room: string, peer_id: string }
 *   | { type: 'signal', room: string, from: string, signal: Signal }
 *   | { type: 'message', room: string, from: string, data: unknown }
 *   | { type: 'error', code: string, message: string }
 *   | { type: 'pong', nonce?: number }
 *   | { type: 'unknown' }} ServerMsg
 */

/** Malformed input from the server. */
export class ProtocolError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'ProtocolError';
  }
}

/** @param {unknown} v @returns {v is Record<string, unknown>} */
const isObj = (v) => typeof v === 'object' && v !== null && !Array.isArray(v);
/** @param {Record<string, unknown>} o @param {string} k */
function str(o, k) {
  const v = o[k];
  if (typeof v !== 'string') throw new ProtocolError(`field ${k} must be a string`);
  return v;
}
/** @param {Record<string, unknown>} o @param {string} k */
function optStr(o, k) {
  const v = o[k];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw new ProtocolError(`field ${k} must be a string`);
  return v;
}
/** @param {Record<string, unknown>} o @param {string} k */
function uint(o, k) {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw new ProtocolError(`field ${k} must be an unsigned integer`);
  return v;
}

/** @param {unknown} v @returns {Signal} */
export function parseSignal(v) {
  if (!isObj(v)) throw new ProtocolError('a signal is an object');
  switch (v.kind) {
    case 'offer':
    case 'answer': {
      /** @type {any} */
      const s = { kind: v.kind, sdp: str(v, 'sdp') };
      if (v.auth !== undefined) {
        if (!isObj(v.auth)) throw new ProtocolError('auth must be an object');
        s.auth = { seq: uint(v.auth, 'seq'), mac: str(v.auth, 'mac') };
      }
      return s;
    }
    case 'candidate': {
      /** @type {Signal} */
      const s = { kind: 'candidate', candidate: str(v, 'candidate') };
      const mid = optStr(v, 'mid');
      if (mid !== undefined) s.mid = mid;
      return s;
    }
    case 'end_of_candidates':
      return { kind: 'end_of_candidates' };
    default:
      if (typeof v.kind !== 'string') throw new ProtocolError('a signal has a string kind');
      return { kind: 'unknown' };
  }
}

/** The label of the channel connected peers signal on (PROTOCOL.md "Signaling between connected peers"). */
export const SIGNAL_LABEL = 'peerlink-signal';
/** What a side sends on that channel once it reads signals there. */
export const SIGNAL_HELLO = '{"kind":"hello"}';

/**
 * One message on the signaling channel: the other side's hello, a signal,
 * or something to ignore (unreadable, or a kind this version does not know).
 * @param {string} text
 * @returns {{ hello: true } | { signal: Signal } | { ignored: string }}
 */
export function parseChannelSignal(text) {
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    return { ignored: `unreadable message: ${e}` };
  }
  if (isObj(v) && v.kind === 'hello') return { hello: true };
  try {
    const signal = parseSignal(v);
    if (signal.kind === 'unknown') return { ignored: 'a signal kind this version does not know' };
    return { signal };
  } catch (e) {
    return { ignored: `unreadable signal: ${e}` };
  }
}

/** @param {unknown} v @returns {PeerInfo} */
function parsePeer(v) {
  if (!isObj(v)) throw new ProtocolError('a peer is an object');
  /** @type {PeerInfo} */
  const p = { id: str(v, 'id') };
  const name = optStr(v, 'name');
  if (name !== undefined) p.name = name;
  return p;
}

/**
 * Parses one server message. Unknown types give `{type: 'unknown'}`; a
 * malformed known message throws {@link ProtocolError}.
 * @param {string} text
 * @returns {ServerMsg}
 */
export function parseServerMsg(text) {
  /** @type {unknown} */
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError(`not JSON: ${e}`);
  }
  if (!isObj(v)) throw new ProtocolError('a message is a JSON object');
  switch (v.type) {
    case 'welcome': {
      if (!Array.isArray(v.ice_servers) || !isObj(v.limits)) throw new ProtocolError('bad welcome');
      const ice_servers = v.ice_servers.map((s) => {
        if (!isObj(s) || !Array.isArray(s.urls)) throw new ProtocolError('bad ice server');
        /** @type {IceServer} */
        const out = { urls: s.urls.map(String) };
        const u = optStr(s, 'username');
        const c = optStr(s, 'credential');
        if (u !== undefined) out.username = u;
        if (c !== undefined) out.credential = c;
        return out;
      });
      const l = v.limits;
      /** @type {Limits} */
      const limits = {
        max_message_bytes: uint(l, 'max_message_bytes'),
        max_peers_per_room: uint(l, 'max_peers_per_room'),
        max_rooms_per_connection: uint(l, 'max_rooms_per_connection'),
        messages_per_second: uint(l, 'messages_per_second'),
        message_burst: uint(l, 'message_burst'),
        idle_timeout_ms: uint(l, 'idle_timeout_ms'),
      };
      /** @type {ServerMsg} */
      const welcome = { type: 'welcome', version: uint(v, 'version'), peer_id: str(v, 'peer_id'), ice_servers, limits };
      const resume = optStr(v, 'resume');
      if (resume !== undefined) welcome.resume = resume;
      return welcome;
    }
    case 'joined': {
      if (!Array.isArray(v.peers)) throw new ProtocolError('joined.peers must be a list');
      /** @type {{ type: 'joined', room: string, peers: PeerInfo[], resumed?: boolean, size?: number }} */
      const msg = { type: 'joined', room: str(v, 'room'), peers: v.peers.map(parsePeer) };
      if (v.resumed === true) msg.resumed = true;
      if (v.size !== undefined) {
        const size = v.size;
        if (typeof size !== 'number' || !Number.isInteger(size) || size < 0) throw new ProtocolError('joined.size must be a count');
        msg.size = size;
      }
      return msg;
    }
    case 'left':
      return { type: 'left', room: str(v, 'room') };
    case 'peer_joined':
      return { type: 'peer_joined', room: str(v, 'room'), peer: parsePeer(v.peer) };
    case 'peer_left':
      return { type: 'peer_left', room: str(v, 'room'), peer_id: str(v, 'peer_id') };
    case 'signal':
      return { type: 'signal', room: str(v, 'room'), from: str(v, 'from'), signal: parseSignal(v.signal) };
    case 'message':
      if (!('data' in v)) throw new ProtocolError('message.data is missing');
      return { type: 'message', room: str(v, 'room'), from: str(v, 'from'), data: v.data };
    case 'error':
      return { type: 'error', code: str(v, 'code'), message: str(v, 'message') };
    case 'pong': {
      /** @type {ServerMsg} */
      const m = { type: 'pong' };
      if (v.nonce !== undefined) m.nonce = uint(v, 'nonce');
      return m;
    }
    default:
      if (typeof v.type !== 'string') throw new ProtocolError('a message has a string type');
      return { type: 'unknown' };
  }
}

/**
 * The wire form of a client message (fields in the fixtures' order).
 * @param {ClientMsg} msg
 */
export function encodeClientMsg(msg) {
  return JSON.stringify(msg);
}
