// The signaling client against a scripted server (a WebSocket stand-in):
// which refusals of a rejoin end the session and which are tried again.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { Signaling } from '../../lib/signaling.js';
import { readFileSync } from 'node:fs';

/** The server's welcome with a resume token, as the fixture has it. */
const WELCOME = JSON.parse(readFileSync(new URL('../../../fixtures/protocol/server/welcome_resume.json', import.meta.url), 'utf8'));

/**
 * A server that welcomes every socket and answers each `join` with the
 * next of `answers` (a server message; `joined` once they run out).
 * @param {object[]} answers
 * @param {() => object} [welcome]  the welcome for each new socket
 */
function scriptedServer(answers, welcome = () => WELCOME) {
  /** @type {FakeWs[]} */
  const sockets = [];
  class FakeWs {
    /** @param {string} url */
    constructor(url) {
      this.url = url;
      /** @type {any} */ this.onopen = null;
      /** @type {any} */ this.onmessage = null;
      /** @type {any} */ this.onclose = null;
      /** @type {any} */ this.onerror = null;
      this.closed = false;
      this.readyState = 0;
      sockets.push(this);
      setTimeout(() => { this.readyState = 1; this.onopen?.(); }, 0);
    }

    /** @param {object} m */
    reply(m) {
      setTimeout(() => { if (!this.closed) this.onmessage?.({ data: JSON.stringify(m) }); }, 0);
    }

    /** @param {string} text */
    send(text) {
      const m = JSON.parse(text);
      if (m.type === 'hello') {
        this.reply(welcome());
      } else if (m.type === 'join') {
        this.reply(answers.shift() ?? { type: 'joined', room: m.room, peers: [], resumed: true });
      }
    }

    /** The connection breaks (or the server closes it). @param {number} [code] */
    close(code = 1000) {
      if (this.closed) return;
      this.closed = true;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason: '' }), 0);
    }
  }
  return { FakeWs, sockets };
}

/**
 * Joins, breaks the socket, and reports how the reconnect ended.
 * @param {object[]} refusals  the answers to the joins after the first
 */
async function rejoinAfter(refusals) {
  const { FakeWs, sockets } = scriptedServer([{ type: 'joined', room: 'r', peers: [] }, ...refusals]);
  const s = new Signaling({ server: 'ws://server.test/ws', room: 'r', maxBackoffMs: 20, timeoutMs: 1000, WebSocket: /** @type {any} */ (FakeWs) });
  await s.connect();
  const outcome = new Promise((resolve) => {
    s.on('joined', (session) => resolve(`joined again, resumed ${session.resumed}`));
    s.on('closed', ({ reason }) => resolve(`closed: ${reason}`));
  });
  sockets[0].close(1006);
  const result = await Promise.race([outcome, new Promise((r) => setTimeout(() => r('nothing within 5 s'), 5000))]);
  s.close();
  return { result, attempts: sockets.length };
}

test('a rejoin refused as unavailable (a node without its room store) or rate limited is tried again, and resumes', async () => {
  const { result, attempts } = await rejoinAfter([
    { type: 'error', code: 'unavailable', message: 'the room store is unreachable' },
    { type: 'error', code: 'rate_limited', message: 'slow down' },
  ]);
  assert.equal(result, 'joined again, resumed true');
  assert.equal(attempts, 4);
});

test('a rejoin refused for good (a token no longer valid) ends the session with the reason', async () => {
  const { result, attempts } = await rejoinAfter([{ type: 'error', code: 'unauthorized', message: 'the token expired' }]);
  assert.match(String(result), /^closed: .*unauthorized: the token expired/);
  assert.equal(attempts, 2);
});

test('a room left while its join is under way closes, and says so', async () => {
  const { Room } = await import('../../lib/room.js');
  // A server that never answers the join.
  const { FakeWs } = scriptedServer([]);
  FakeWs.prototype.send = function () {};
  const room = new Room({ server: 'ws://server.test/ws', room: 'r', WebSocket: /** @type {any} */ (FakeWs) });
  const closed = new Promise((r) => room.on('closed', ({ reason }) => r(reason)));
  const joined = room.join().then(() => 'joined', (e) => `refused: ${e.message}`);
  await new Promise((r) => setTimeout(r, 20));
  await room.leave();
  assert.match(await joined, /^refused: left the room/);
  const reason = await Promise.race([closed, new Promise((r) => setTimeout(() => r('no closed event'), 2000))]);
  assert.match(String(reason), /left the room/);
  assert.equal(room.closed, true);
});

test('a member the joined of a resume does not list goes once its connection fails, at once if it has none; a listed one, or one a peer_joined names, stays', async () => {
  const { Room } = await import('../../lib/room.js');
  const { FakePC } = await import('./fakepc.js');
  const { FakeWs, sockets } = scriptedServer([
    { type: 'joined', room: 'r', peers: [{ id: 'p-listed' }, { id: 'p-gone' }, { id: 'p-back' }, { id: 'p-dead' }] },
    // Back after the socket broke: only one is listed (the others left
    // meanwhile, their peer_left sent to the broken socket, or reconnect
    // after us).
    { type: 'joined', room: 'r', peers: [{ id: 'p-listed' }], resumed: true },
  ]);
  const room = new Room({ server: 'ws://server.test/ws', room: 'r', WebSocket: /** @type {any} */ (FakeWs), RTCPeerConnection: /** @type {any} */ (FakePC) });
  /** @type {string[]} */
  const left = [];
  room.on('peer_left', ({ peer }) => left.push(peer));
  await room.join();
  assert.deepEqual([...room.conns.keys()].sort(), ['p-back', 'p-dead', 'p-gone', 'p-listed']);
  // Its connection gave up while we were away.
  /** @type {any} */ (room.conns.get('p-dead'))._fail('the connection was lost and no path came back');
  const rejoined = new Promise((r) => room.on('rejoined', r));
  sockets[0].close(1006);
  await rejoined;
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(left, ['p-dead'], 'one without a live connection goes on the resume itself; the others wait');
  /** @type {any} */ (room.conns.get('p-gone'))._fail('the connection was lost and no path came back');
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(left, ['p-dead', 'p-gone']);
  // Named by a peer_joined (it reconnected after us): confirmed, its
  // connection failing later does not make it gone.
  sockets[1].reply({ type: 'peer_joined', room: 'r', peer: { id: 'p-back' } });
  await new Promise((r) => setTimeout(r, 10));
  /** @type {any} */ (room.conns.get('p-back'))._fail('checks failed');
  // A listed member whose connection fails stays a member.
  /** @type {any} */ (room.conns.get('p-listed'))._fail('checks failed');
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(left, ['p-dead', 'p-gone']);
  assert.deepEqual([...room.members.keys()].sort(), ['p-back', 'p-listed']);
  // Had it been there after all, a signal from it through the server
  // (which relays only between members) makes it a member again.
  /** @type {string[]} */
  const joined = [];
  room.on('peer_joined', ({ peer }) => joined.push(peer));
  sockets[1].reply({ type: 'signal', room: 'r', from: 'p-gone', signal: { kind: 'offer', sdp: 'v=0\r\n' } });
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(joined, ['p-gone']);
  assert.ok(room.conns.has('p-gone'));
  room.signaling.close();
  room._close('test over');
});

test('TURN credentials are renewed before they expire: a resume on a new socket, the old one closed, every connection given them', async () => {
  const { Room } = await import('../../lib/room.js');
  const { FakePC } = await import('./fakepc.js');
  let n = 0;
  // The first welcome's TURN username expires a second from now, the
  // next ones' in an hour.
  const welcome = () => ({
    ...WELCOME,
    ice_servers: [{ urls: ['turn:127.0.0.1:3478?transport=udp'], username: `${Math.floor(Date.now() / 1000) + (n ? 3600 : 1)}:p-9b71e0aa`, credential: `c${++n}` }],
  });
  const { FakeWs, sockets } = scriptedServer([{ type: 'joined', room: 'r', peers: [{ id: 'p-other' }] }], welcome);
  const room = new Room({ server: 'ws://server.test/ws', room: 'r', WebSocket: /** @type {any} */ (FakeWs), RTCPeerConnection: /** @type {any} */ (FakePC) });
  room.signaling.options.renewMinMs = 50;
  /** @type {string[]} */
  const seen = [];
  room.on('peer_left', ({ peer }) => seen.push(`left ${peer}`));
  room.on('rejoined', ({ resumed }) => seen.push(`rejoined, resumed ${resumed}`));
  await room.join();
  const pc = /** @type {any} */ (room.conns.get('p-other')).pc;
  assert.equal(pc.config.iceServers[0].credential, 'c1');
  for (let i = 0; i < 100 && sockets.length < 2; i++) await new Promise((r) => setTimeout(r, 20));
  for (let i = 0; i < 50 && !seen.length; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(sockets.length >= 2, true, 'a second socket opened');
  assert.deepEqual(seen.slice(0, 1), ['rejoined, resumed true']);
  assert.equal(room.signaling.ws, sockets[1]);
  // What the server had queued on the old socket still arrives, then it is closed.
  assert.equal(sockets[0].closed, false, 'the old socket is still read');
  /** @type {string[]} */
  const joined = [];
  room.on('peer_joined', ({ peer }) => joined.push(peer));
  sockets[0].reply({ type: 'peer_joined', room: 'r', peer: { id: 'p-late' } });
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(joined, ['p-late']);
  for (let i = 0; i < 70 && !sockets[0].closed; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(sockets[0].closed, true, 'the old socket closed');
  assert.equal(pc.config.iceServers[0].credential, 'c2', 'the kept connection has the fresh credentials');
  assert.deepEqual(room.iceServers.map((s) => s.credential), ['c2']);
  room.signaling.close();
  room._close('test over');
});
