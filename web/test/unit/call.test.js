// A call's wiring in the room (lib/room.js): local tracks go to every
// connection, now and later; turning a camera off and on reuses its
// m-line; a peer that rejects media (a native peer) is offered none again;
// the peer's tracks come and go as events. Real Chromium runs the whole
// call in test/e2e/call.test.js.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Room } from '../../lib/room.js';
import { FakePC as BasePC } from './fakepc.js';

class FakeTransceiver {
  /** @param {string} kind @param {string} mid */
  constructor(kind, mid) {
    this.mid = mid;
    this.direction = 'sendrecv';
    /** @type {string | null} */
    this.currentDirection = null;
    this.receiver = { track: { kind } };
    this.sender = {
      /** @type {any} */ track: null,
      /** @type {any[]} */ streams: [],
      setStreams(/** @type {any[]} */ ...s) { this.streams = s; },
      async replaceTrack(/** @type {any} */ t) { await null; this.track = t; }, // settles later, as a browser's does
    };
  }
}

class FakePC extends BasePC {
  constructor() {
    super();
    /** @type {FakeTransceiver[]} */
    this.transceivers = [];
    /** answers from this peer reject every media m-line (what str0m without codecs does) */
    this.rejectsMedia = false;
  }
  getTransceivers() { return [...this.transceivers]; }
  getSenders() { return this.transceivers.map((t) => t.sender); }
  addTrack(/** @type {any} */ track, /** @type {any} */ stream) {
    const t = new FakeTransceiver(track.kind, String(this.transceivers.length));
    t.sender.track = track;
    t.sender.streams = [stream];
    this.transceivers.push(t);
    return t.sender;
  }
  removeTrack(/** @type {any} */ sender) {
    const t = this.transceivers.find((x) => x.sender === sender);
    if (!t) throw new Error('InvalidAccessError');
    sender.track = null;
    t.direction = 'recvonly';
  }
  async setRemoteDescription(/** @type {any} */ d) {
    await super.setRemoteDescription(d);
    if (d.type === 'answer' && this.rejectsMedia) {
      // Rejected m-lines stop their transceivers, which Chromium then drops.
      for (const t of this.transceivers) t.currentDirection = 'stopped';
      this.transceivers = [];
    }
  }
  /** @param {'offer' | 'answer'} type */
  localSdp(type) {
    return `v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n${type}`;
  }
}

const track = (/** @type {string} */ kind) => ({ kind, id: `${kind}-${Math.random()}` });

/** A full-mesh room as `me` with fake connections; `join(peer)` brings a member. */
function meshRoom(me = 'm') {
  const room = new Room({ server: '127.0.0.1:9', room: 'call', RTCPeerConnection: /** @type {any} */ (FakePC) });
  room.id = me;
  room.signaling.send = () => true;
  // A member, and the connection's first offer and answer (tracks wait
  // for them).
  const join = async (/** @type {string} */ peer) => {
    room._memberJoined(peer, null, true);
    const conn = /** @type {any} */ (room.conns.get(peer));
    conn.onSignal({ kind: 'offer', sdp: 'v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\noffer' });
    await conn.chain;
    return /** @type {FakePC} */ (conn.pc);
  };
  return { room, join };
}

test('call: tracks go to every connection, also ones made later; removeTrack stops them everywhere', async () => {
  const { room, join } = meshRoom();
  const first = await join('p1');
  const cam = track('video');
  const stream = /** @type {any} */ ({ id: 's' });
  room.addTrack(/** @type {any} */ (cam), stream);
  const later = await join('p2');
  for (const pc of [first, later]) {
    assert.deepEqual(pc.getSenders().map((s) => s.track), [cam]);
    assert.deepEqual(pc.getSenders()[0].streams, [stream]);
  }
  room.removeTrack(/** @type {any} */ (cam));
  for (const pc of [first, later]) assert.deepEqual(pc.getSenders().map((s) => s.track), [null]);
  // Gone from the room: a newcomer does not get it.
  assert.equal((await join('p3')).getSenders().length, 0);
});

test('call: a connection sends the room\'s tracks once its first offer and answer are through, not before', async () => {
  const { room } = meshRoom();
  const cam = track('video');
  room.addTrack(/** @type {any} */ (cam), /** @type {any} */ ({ id: 's' }));
  room._memberJoined('p1', null, true);
  const conn = /** @type {any} */ (room.conns.get('p1'));
  // Our first offer is out: no video offered beside it (a member with its
  // camera on would otherwise collide with the newcomer's first offer).
  await conn.pc.setLocalDescription();
  assert.equal(conn.pc.getSenders().length, 0);
  conn.onSignal({ kind: 'answer', sdp: 'v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\nanswer' });
  await conn.chain;
  assert.deepEqual(conn.pc.getSenders().map((/** @type {any} */ s) => s.track), [cam]);
});

test('call: a camera turned off and on again, or sent back on the m-line the peer opened, adds no m-line', async () => {
  const { room, join } = meshRoom();
  const pc = await join('p1');
  const stream = /** @type {any} */ ({ id: 's' });
  const cam = track('video');
  room.addTrack(/** @type {any} */ (cam), stream);
  room.removeTrack(/** @type {any} */ (cam));
  const again = track('video');
  room.addTrack(/** @type {any} */ (again), stream);
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(pc.transceivers.length, 1);
  assert.equal(pc.transceivers[0].sender.track, again);
  assert.equal(pc.transceivers[0].direction, 'sendrecv');
  // The peer's own video m-line (we only receive on it) carries ours too;
  // a microphone needs an audio one.
  const fresh = meshRoom();
  const other = await fresh.join('p2');
  const theirs = new FakeTransceiver('video', '0');
  theirs.direction = 'recvonly';
  theirs.currentDirection = 'recvonly';
  other.transceivers.push(theirs);
  const cam2 = track('video');
  fresh.room.addTrack(/** @type {any} */ (cam2), stream);
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(theirs.sender.track, cam2);
  assert.equal(theirs.direction, 'sendrecv');
  fresh.room.addTrack(/** @type {any} */ (track('audio')), stream);
  assert.deepEqual(other.transceivers.map((t) => t.receiver.track.kind), ['video', 'audio']);
});

test('call: a camera turned off before it was on (replaceTrack pending) ends off, and a track added twice is sent once', async () => {
  const { room, join } = meshRoom();
  const pc = await join('p1');
  const stream = /** @type {any} */ ({ id: 's' });
  const theirs = new FakeTransceiver('video', '0');
  theirs.direction = 'recvonly';
  theirs.currentDirection = 'recvonly';
  pc.transceivers.push(theirs);
  const cam = track('video');
  room.addTrack(/** @type {any} */ (cam), stream);
  room.removeTrack(/** @type {any} */ (cam)); // before replaceTrack settled
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(theirs.sender.track, null, 'not sending the camera that was turned off');
  assert.equal(theirs.direction, 'recvonly');
  // The m-line is free again for the next camera.
  const again = track('video');
  room.addTrack(/** @type {any} */ (again), stream);
  room.addTrack(/** @type {any} */ (again), stream);
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(pc.transceivers.length, 1);
  assert.equal(theirs.sender.track, again);
});

test('call: a peer that rejects the media m-lines (a native peer) is offered no media again, and keeps its connection', async () => {
  const { room, join } = meshRoom();
  const pc = await join('native');
  pc.rejectsMedia = true;
  const stream = /** @type {any} */ ({ id: 's' });
  room.addTrack(/** @type {any} */ (track('video')), stream);
  await pc.setLocalDescription();
  const conn = /** @type {any} */ (room.conns.get('native'));
  conn.onSignal({ kind: 'answer', sdp: 'v=0\r\no=- 9 2 IN IP4 127.0.0.1\r\nanswer' });
  await conn.chain;
  assert.equal(conn.declinesMedia, true);
  assert.equal(pc.transceivers.length, 0);
  room.addTrack(/** @type {any} */ (track('audio')), stream);
  room.addTrack(/** @type {any} */ (track('video')), stream);
  assert.equal(pc.transceivers.length, 0, 'nothing offered after the rejection');
  assert.equal(conn.state, 'connecting', 'the connection itself is untouched');
  // A browser peer in the same room still gets every track.
  assert.equal((await join('browser')).transceivers.length, 3);
});

test('call: the peer\'s tracks arrive once as `track`, and leave as `track_removed` (removed by the peer, or the connection ended)', async () => {
  const { room, join } = meshRoom();
  const pc = await join('p1');
  /** @type {string[]} */
  const seen = [];
  room.on('track', ({ peer, track: t }) => seen.push(`+${peer}/${/** @type {any} */ (t).id}`));
  room.on('track_removed', ({ peer, track: t }) => seen.push(`-${peer}/${/** @type {any} */ (t).id}`));
  const stream = Object.assign(new EventTarget(), { id: 'theirs' });
  const video = { kind: 'video', id: 'v' };
  const audio = { kind: 'audio', id: 'a' };
  pc.ontrack({ track: video, streams: [stream] });
  pc.ontrack({ track: video, streams: [stream] }); // renegotiated, still the same track
  pc.ontrack({ track: audio, streams: [stream] });
  stream.dispatchEvent(Object.assign(new Event('removetrack'), { track: video }));
  pc.ontrack({ track: video, streams: [stream] }); // on again
  assert.deepEqual(seen, ['+p1/v', '+p1/a', '-p1/v', '+p1/v']);
  room.conns.get('p1')?.close();
  assert.deepEqual(seen.slice(4).sort(), ['-p1/a', '-p1/v']);
});
