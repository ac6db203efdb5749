// fixtures/peer/signal-channel.json: the messages connected peers send on
// their signaling channel read as the fixture says, and a signal written
// back is the same text (the native peer checks the same file).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { parseChannelSignal, SIGNAL_LABEL, SIGNAL_HELLO } from '../../lib/protocol.js';

const fixture = JSON.parse(readFileSync(new URL('../../../fixtures/peer/signal-channel.json', import.meta.url), 'utf8'));

test('signaling channel messages match the fixture', () => {
  assert.equal(fixture.label, SIGNAL_LABEL);
  assert.equal(fixture.messages.length, 6);
  for (const m of fixture.messages) {
    const parsed = parseChannelSignal(m.text);
    if ('hello' in parsed) {
      assert.equal(m.name, 'hello');
      assert.equal(m.text, SIGNAL_HELLO);
    } else if ('signal' in parsed) {
      assert.equal(JSON.stringify(parsed.signal), m.text, m.name);
    } else {
      assert.equal(m.ignored, true, `${m.name}: ${parsed.ignored}`);
    }
  }
  assert.ok('ignored' in parseChannelSignal('not json'));
  assert.ok('ignored' in parseChannelSignal('{"kind":"offer"}'), 'an offer without sdp is not applied');
});

test('an authentic SDP older than one applied is ignored; a forged one is refused', async () => {
  const { Room } = await import('../../lib/room.js');
  const { signSdp } = await import('../../lib/auth.js');
  class PC {
    constructor() { this.signalingState = 'stable'; this.connectionState = 'new'; }
    close() {}
  }
  const room = new Room({ server: '127.0.0.1:9', room: 'r', RTCPeerConnection: /** @type {any} */ (PC) });
  room.signaling.send = () => true;
  const ours = new Uint8Array(32).fill(1);
  const theirs = new Uint8Array(32).fill(2);
  room.members.set('p', { name: null });
  const conn = /** @type {any} */ (room._createConn('p', [], { local: ours, remote: theirs }));
  const sdp = 'v=0\r\n';
  assert.equal(await conn._checkAuth('offer', sdp, await signSdp(theirs, 'offer', 5, sdp)), null);
  // Not applied yet (ignored in a collision): an older one still counts.
  assert.equal(await conn._checkAuth('answer', sdp, await signSdp(theirs, 'answer', 4, sdp)), null);
  conn.recvSeq = 5; // applied
  // Came the slow way (through the server, after a later one on the
  // signaling channel), or replayed: ignored, not fatal.
  assert.equal(await conn._checkAuth('answer', sdp, await signSdp(theirs, 'answer', 4, sdp)), 'stale');
  assert.equal(await conn._checkAuth('offer', sdp, await signSdp(theirs, 'offer', 5, sdp)), 'stale');
  const forged = { seq: 6, mac: '00'.repeat(32) };
  assert.match(await conn._checkAuth('offer', sdp, forged), /modified in transit/);
  clearTimeout(conn.connectTimer);
});

test('an offer ignored in a collision does not make the answer that follows it stale', async () => {
  const { Room } = await import('../../lib/room.js');
  const { signSdp } = await import('../../lib/auth.js');
  class PC {
    constructor() {
      this.signalingState = 'stable';
      this.connectionState = 'new';
      /** @type {any} */ this.remoteDescription = null;
      /** @type {any} */ this.localDescription = null;
    }
    async setRemoteDescription(/** @type {any} */ d) {
      this.remoteDescription = d;
      this.signalingState = d.type === 'offer' ? 'have-remote-offer' : 'stable';
    }
    async setLocalDescription() {
      const type = this.signalingState === 'have-remote-offer' ? 'answer' : 'offer';
      this.localDescription = { type, sdp: 'v=0\r\n' };
      this.signalingState = type === 'answer' ? 'stable' : 'have-local-offer';
    }
    async addIceCandidate() {}
    close() {}
  }
  const room = new Room({ server: '127.0.0.1:9', room: 'r', RTCPeerConnection: /** @type {any} */ (PC) });
  room.signaling.send = () => true;
  room.id = 'z'; // the impolite side towards 'p'
  const theirs = new Uint8Array(32).fill(2);
  room.members.set('p', { name: null });
  const conn = /** @type {any} */ (room._createConn('p', [], { local: new Uint8Array(32).fill(1), remote: theirs }));
  await conn.pc.setLocalDescription(); // our offer is out
  const sdp = 'v=0\r\n';
  // The peer's offer (its sequence 5) collides with ours: ignored.
  conn.onSignal({ kind: 'offer', sdp, auth: await signSdp(theirs, 'offer', 5, sdp) });
  await conn.chain;
  assert.equal(conn.pc.signalingState, 'have-local-offer');
  assert.equal(conn.recvSeq, null, 'an ignored offer is not recorded');
  // Its answer to our offer, signed earlier (4), still applies.
  conn.onSignal({ kind: 'answer', sdp, auth: await signSdp(theirs, 'answer', 4, sdp) });
  await conn.chain;
  assert.equal(conn.pc.signalingState, 'stable');
  assert.equal(conn.recvSeq, 4);
  clearTimeout(conn.connectTimer);
});

test('the connecting side opens the signaling channel, even in a room with no channels', async () => {
  const { Room } = await import('../../lib/room.js');
  /** @type {string[]} */
  const opened = [];
  class PC {
    constructor() { this.signalingState = 'stable'; this.connectionState = 'new'; this.remoteDescription = null; }
    createDataChannel(/** @type {string} */ label) {
      opened.push(label);
      return Object.assign(new EventTarget(), { label, readyState: 'connecting', send() {}, close() {} });
    }
    close() {}
  }
  const room = new Room({ server: '127.0.0.1:9', room: 'r', channels: [], RTCPeerConnection: /** @type {any} */ (PC) });
  room.signaling.send = () => true;
  room.id = 'me';
  room._memberJoined('a', null, true); // listed in `joined`: we connect
  assert.deepEqual(opened, ['peerlink-signal']);
  room._memberJoined('b', null, false); // joined after us: it connects
  assert.deepEqual(opened, ['peerlink-signal'], 'the other side opens it');
  assert.throws(() => room.openChannel('a', { label: 'peerlink-signal', reliability: 'reliable' }), /reserved/);
  for (const c of room.conns.values()) clearTimeout(/** @type {any} */ (c).connectTimer);
});

test('both sides connect at once, the peer naming its data m-line otherwise (str0m): the polite side answers on a fresh peer connection with its channels; an offer in hand is answered, not met with ours', async () => {
  const { Room } = await import('../../lib/room.js');
  /** @type {any[]} */
  const pcs = [];
  // Chromium 156: after rolling back a local offer with a data m-line,
  // it cannot answer an offer whose data m-line has another mid.
  class PC {
    constructor() {
      this.signalingState = 'stable';
      this.connectionState = 'new';
      /** @type {any} */ this.remoteDescription = null;
      /** @type {any} */ this.localDescription = null;
      /** @type {string[]} */ this.labels = [];
      this.rolledBack = false;
      this.closed = false;
      /** @type {any} */ this.onnegotiationneeded = null;
      pcs.push(this);
    }
    createDataChannel(/** @type {string} */ label) {
      this.labels.push(label);
      // Negotiation is needed for the first channel, unless an offer
      // applied by then brought the data m-line.
      if (this.labels.length === 1 && !this.remoteDescription) setTimeout(() => { if (!this.remoteDescription) this.onnegotiationneeded?.(); }, 0);
      return Object.assign(new EventTarget(), { label, readyState: 'connecting', send() {}, close() {} });
    }
    async setRemoteDescription(/** @type {any} */ d) {
      if (this.signalingState === 'have-local-offer' && d.type === 'offer') this.rolledBack = true;
      this.remoteDescription = d;
      this.signalingState = d.type === 'offer' ? 'have-remote-offer' : 'stable';
    }
    async setLocalDescription() {
      if (this.signalingState === 'have-remote-offer') {
        if (this.rolledBack && !this.remoteDescription.sdp.includes('a=mid:0')) throw new Error('Failed to start SCTP transport.');
        this.localDescription = { type: 'answer', sdp: 'v=0\r\na=mid:THR\r\n' };
        this.signalingState = 'stable';
      } else {
        this.localDescription = { type: 'offer', sdp: 'v=0\r\na=mid:0\r\n' };
        this.signalingState = 'have-local-offer';
      }
    }
    async addIceCandidate() {}
    close() { this.closed = true; }
  }
  const room = new Room({ server: '127.0.0.1:9', room: 'r', autoConnect: false, RTCPeerConnection: /** @type {any} */ (PC) });
  /** @type {any[]} */
  const wire = [];
  room.signaling.send = (/** @type {any} */ m) => { wire.push(m); return true; };
  room.id = 'a'; // polite towards 'p'
  room.members.set('p', { name: null });
  const peerOffer = { kind: 'offer', sdp: 'v=0\r\na=mid:THR\r\n' };

  room.connect('p', { channels: [{ label: 'ctl', reliability: 'reliable' }] });
  const conn = /** @type {any} */ (room.conns.get('p'));
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(pcs[0].signalingState, 'have-local-offer');
  assert.deepEqual(wire.map((m) => m.signal?.kind), ['offer']);
  conn.onSignal(peerOffer);
  await conn.chain;
  assert.equal(pcs.length, 2, 'a fresh peer connection');
  assert.ok(pcs[0].closed);
  assert.equal(conn.pc, pcs[1]);
  assert.deepEqual(pcs[1].labels, ['ctl', 'peerlink-signal'], 'the channel opened anew, and our signaling channel (the peer\'s offer may carry none)');
  assert.deepEqual(wire.map((m) => m.signal?.kind), ['offer', 'answer']);
  clearTimeout(conn.connectTimer);

  // The peer's offer (signed, so checking it takes a while) came before
  // connect() with channels: answered, no offer of ours.
  const { signSdp } = await import('../../lib/auth.js');
  const theirs = new Uint8Array(32).fill(2);
  pcs.length = 0;
  const b = new Room({ server: '127.0.0.1:9', room: 'r', autoConnect: false, RTCPeerConnection: /** @type {any} */ (PC) });
  /** @type {any[]} */
  const wireB = [];
  b.signaling.send = (/** @type {any} */ m) => { wireB.push(m); return true; };
  b.id = 'a';
  b.members.set('p', { name: null });
  const signed = { ...peerOffer, auth: await signSdp(theirs, 'offer', 0, peerOffer.sdp) };
  b._onServer({ type: 'signal', from: 'p', signal: signed }); // held for connect()
  b.connect('p', { channels: [{ label: 'ctl', reliability: 'reliable' }], keys: { local: new Uint8Array(32).fill(1), remote: theirs } });
  const connB = /** @type {any} */ (b.conns.get('p'));
  await new Promise((r) => setTimeout(r, 20));
  await connB.chain;
  assert.equal(pcs.length, 1);
  assert.deepEqual(pcs[0].labels, ['ctl'], 'no signaling channel of ours: the peer opened one');
  assert.deepEqual(wireB.map((m) => m.signal?.kind), ['answer']);
  clearTimeout(connB.connectTimer);

  // The impolite side of the glare between two browsers: the ignored
  // offer's peer connection is not taken as the peer's (the polite side
  // may replace it), the one whose answer is applied is.
  const z = new Room({ server: '127.0.0.1:9', room: 'r', autoConnect: false, RTCPeerConnection: /** @type {any} */ (PC) });
  z.signaling.send = () => true;
  z.id = 'z';
  z.members.set('p', { name: null });
  z.connect('p', { channels: [{ label: 'ctl', reliability: 'reliable' }] });
  const connZ = /** @type {any} */ (z.conns.get('p'));
  await new Promise((r) => setTimeout(r, 5));
  connZ.onSignal({ kind: 'offer', sdp: 'v=0\r\no=- 111 1 IN IP4 0.0.0.0\r\na=mid:0\r\n' });
  await connZ.chain;
  assert.equal(connZ.pc.signalingState, 'have-local-offer', 'ignored: we are impolite');
  connZ.onSignal({ kind: 'answer', sdp: 'v=0\r\no=- 222 1 IN IP4 0.0.0.0\r\na=mid:0\r\n' });
  await connZ.chain;
  assert.equal(connZ.pc.signalingState, 'stable');
  assert.equal(connZ.isNewSession('v=0\r\no=- 222 2 IN IP4 0.0.0.0\r\n'), false, 'the answering peer connection is the peer\'s');
  assert.equal(connZ.isNewSession('v=0\r\no=- 111 2 IN IP4 0.0.0.0\r\n'), true);
  clearTimeout(connZ.connectTimer);
});

test('leave waits for a connection that is down for the moment, until what it queued is handed on', async () => {
  const { Room } = await import('../../lib/room.js');
  const { FakePC } = await import('./fakepc.js');
  const room = new Room({ server: '127.0.0.1:9', room: 'r', RTCPeerConnection: /** @type {any} */ (FakePC) });
  let toldServerAt = 0;
  room.signaling.close = () => { toldServerAt = Date.now(); };
  const channel = { isClosed: false, queuedBytes: 12, bufferedAmount: 0 };
  const conn = { state: 'disconnected', channels: new Map([['chat', channel]]), close() {} };
  room.conns.set('p', /** @type {any} */ (conn));
  const start = Date.now();
  // The path comes back after 150 ms and the message goes out.
  setTimeout(() => { conn.state = 'connected'; channel.queuedBytes = 0; }, 150);
  await room.leave({ linger: 2000, settle: 0 });
  assert.ok(toldServerAt - start >= 140, `the server was told only once the message was handed on (${toldServerAt - start} ms)`);
  assert.ok(toldServerAt - start < 1000, 'and not at the linger');
});

test('an offer sent on the signaling channel over a path that then went down is made again through the server', async () => {
  const { Room } = await import('../../lib/room.js');
  const { FakePC } = await import('./fakepc.js');
  // The W3C rules this needs: a rollback returns to stable, and restartIce()
  // asks for negotiation only from stable (else once stable again).
  class PC extends FakePC {
    /** @param {any} [d] */
    async setLocalDescription(d) {
      if (d?.type !== 'rollback') return super.setLocalDescription();
      this.signalingState = 'stable';
    }
    restartIce() {
      if (this.signalingState === 'stable') queueMicrotask(() => /** @type {any} */ (this).onnegotiationneeded?.());
    }
  }
  const room = new Room({ server: '127.0.0.1:9', room: 'r', restartAfterMs: 10, RTCPeerConnection: /** @type {any} */ (PC) });
  /** @type {any[]} */
  const server = [];
  room.signaling.send = (m) => { server.push(m); return true; };
  room.id = 'me';
  room.members.set('p', { name: null });
  const conn = /** @type {any} */ (room._createConn('p', [], null));
  const pc = conn.pc;
  // Connected, with a greeted signaling channel.
  pc.remoteDescription = { type: 'answer', sdp: 'v=0' };
  /** @type {string[]} */
  const onChannel = [];
  conn.signalChannels.push({ label: 'peerlink-signal', readyState: 'open', send: (/** @type {string} */ m) => onChannel.push(m) });
  conn.remoteReadsChannel = true;
  pc.connectionState = 'connected';
  pc.onconnectionstatechange();
  assert.equal(conn.state, 'connected');
  // A restart while connected: its offer goes on the channel...
  room.restartIce('p');
  for (let i = 0; i < 20 && onChannel.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(JSON.parse(onChannel[0] ?? '{}').kind, 'offer', 'the offer went on the signaling channel');
  assert.equal(pc.signalingState, 'have-local-offer');
  // ...over a path that is down: no answer will come that way.
  pc.connectionState = 'disconnected';
  pc.onconnectionstatechange();
  const offered = () => server.some((m) => m.type === 'signal' && m.to === 'p' && m.signal.kind === 'offer');
  for (let i = 0; i < 40 && !offered(); i++) await new Promise((r) => setTimeout(r, 10));
  conn.close();
  assert.ok(offered(), `the restart's offer went through the server (server got: ${JSON.stringify(server.map((m) => m.signal?.kind ?? m.type))})`);
});

test('an offer from a peer whose connection failed starts a new connection instead of being swallowed by the failed one', async () => {
  const { Room } = await import('../../lib/room.js');
  const { FakePC } = await import('./fakepc.js');
  const room = new Room({ server: '127.0.0.1:9', room: 'r', RTCPeerConnection: /** @type {any} */ (FakePC) });
  room.signaling.send = () => true;
  room.id = 'me';
  room.members.set('p', { name: null });
  const failed = /** @type {any} */ (room._createConn('p', [], null));
  failed._fail('no answer to the offer arrived (is the other side there?)');
  assert.equal(failed.state, 'failed');
  // The peer, back after its own reconnect, offers again.
  room._signalFrom('p', { kind: 'offer', sdp: 'v=0\r\no=- 42 2 IN IP4 127.0.0.1\r\n' });
  const conn = /** @type {any} */ (room.conns.get('p'));
  assert.notEqual(conn, failed, 'a new connection');
  for (let i = 0; i < 50 && conn.pc.remotes.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(conn.pc.remotes[0]?.type, 'offer', 'the offer was applied to it');
  assert.equal(conn.state, 'connecting');
  conn.close();
});
