// fixtures/overlay/messages.json: the overlay's wire format, and a few of
// the state machine's answers (crates/overlay has the full tests and the
// simulation; this is the same protocol in JavaScript).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { encode, decode, DecodeError, Overlay, MAX_RELAY } from '../../lib/overlay.js';
import { Room, BUSY_KEY, VIA_SERVER } from '../../lib/room.js';
import { FakePC } from './fakepc.js';

const fixture = JSON.parse(readFileSync(new URL('../../../fixtures/overlay/messages.json', import.meta.url), 'utf8'));
const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');

/** The fixture's description as the library's message object. */
function message(m) {
  const out = { ...m };
  if ('payload' in m) out.payload = hex(m.payload);
  return out;
}

test('every overlay message encodes and decodes as the fixture says', () => {
  assert.equal(fixture.valid.length, 22, 'a fixture was added or lost: update this count');
  for (const c of fixture.valid) {
    const m = message(c.message);
    assert.equal(toHex(encode(m)), c.hex, JSON.stringify(c.message));
    assert.deepEqual(decode(hex(c.hex)), m, c.hex);
  }
});

test('malformed overlay messages are refused with the reason', () => {
  for (const c of fixture.invalid) {
    assert.throws(() => decode(hex(c.hex)), (e) => e instanceof DecodeError, c.why);
  }
});

const drain = (o) => { const out = []; let x; while ((x = o.pollOutput())) out.push(x); return out; };
const sends = (out) => out.filter((x) => x.type === 'send').map((x) => [x.peer, x.message]);

test('a contact takes the newcomer and walks it to its neighbours', () => {
  const now = 0;
  const o = new Overlay('a', {}, now);
  for (let i = 0; i < 20; i++) o.peerKnown(`s${i}`);
  for (const n of ['b', 'c']) { o.accept(n, now); o.connected(n, now); o.handleMessage(n, { type: 'join' }, now); }
  drain(o);
  o.accept('d', now); o.connected('d', now);
  o.handleMessage('d', { type: 'join' }, now);
  const s = sends(drain(o));
  assert.deepEqual(s.find(([p]) => p === 'd'), ['d', { type: 'neighbor_reply', accepted: true }]);
  assert.ok(s.some(([p, m]) => p === 'b' && m.type === 'forward_join' && m.peer === 'd' && m.ttl === 6));
  assert.ok(s.some(([p, m]) => p === 'c' && m.type === 'forward_join' && m.peer === 'd'));
  assert.equal(o.active.length, 3);
});

test('a broadcast is delivered once, pushed on, and a missing one is grafted', () => {
  const now = 0;
  const o = new Overlay('a', {}, now);
  for (let i = 0; i < 20; i++) o.peerKnown(`s${i}`);
  for (const n of ['b', 'c', 'd']) { o.accept(n, now); o.connected(n, now); o.handleMessage(n, { type: 'join' }, now); }
  drain(o);
  const g = { type: 'gossip', id: '00000000000000aa', origin: 'z', hops: 1, payload: Uint8Array.of(1) };
  o.handleMessage('b', g, now);
  let out = drain(o);
  assert.equal(out.filter((x) => x.type === 'deliver').length, 1);
  assert.ok(sends(out).some(([p, m]) => p === 'c' && m.type === 'gossip' && m.hops === 2));
  o.handleMessage('c', g, now);
  assert.equal(drain(o).filter((x) => x.type === 'deliver').length, 0, 'no second delivery');
  o.handleMessage('d', { type: 'ihave', ids: [['00000000000000bb', 2]] }, now);
  o.handleTimeout(now + 150);
  out = drain(o);
  assert.ok(sends(out).some(([p, m]) => p === 'd' && m.type === 'graft' && m.id === '00000000000000bb'));
});

test('broadcasts kept for grafts stay within cacheBytes, the oldest going first', () => {
  const o = new Overlay('a', { cacheBytes: 10_000 }, 0);
  for (let i = 0; i < 20; i++) o.broadcast(new Uint8Array(1000), 0);
  assert.equal(o.cache.size, 10);
  assert.ok(o.cacheUsed <= 10_000);
  o.handleTimeout(60_000);
  assert.equal(o.cache.size, 0);
  assert.equal(o.cacheUsed, 0);
});

/** Peer `me` with neighbours `ns` (they joined through it), in a large room. */
function withNeighbors(me, ns, now, config = {}) {
  const o = new Overlay(me, config, now);
  for (let i = 0; i < 20; i++) o.peerKnown(`s${i}`); // spares: the room counts as large
  for (const n of ns) { assert.ok(o.accept(n, now)); o.connected(n, now); o.handleMessage(n, { type: 'join' }, now); }
  drain(o);
  return o;
}

/** Hands what `from` sends to `to` over; `from`'s other outputs are returned. */
function hand(from, to, now) {
  const rest = [];
  for (const x of drain(from)) {
    if (x.type === 'send' && x.peer === to.me) to.handleMessage(from.me, x.message, now);
    else rest.push(x);
  }
  return rest;
}

const bytes = (s) => new TextEncoder().encode(s);

test('a signal goes back along a join walk to the newcomer, and the answer comes back', () => {
  // 9 joined through 3; the walk went 3 -> 2 -> 1 and ends at 1, which
  // connects to 9: its offer goes 1 -> 2 -> 3 -> 9, the answer back.
  const now = 0;
  const o1 = withNeighbors('1', ['2'], now);
  const o2 = withNeighbors('2', ['1', '3'], now);
  const o3 = withNeighbors('3', ['2', '9'], now);
  const o9 = withNeighbors('9', ['3'], now);
  assert.equal(o1.relay('9', bytes('offer'), now), false, 'no route before the walk');
  o2.handleMessage('3', { type: 'forward_join', peer: '9', ttl: 1 }, now);
  assert.deepEqual(hand(o2, o1, now), []);
  assert.ok(o1.active.includes('9'), 'the walk ends at 1, which takes the newcomer');
  assert.ok(drain(o1).some((x) => x.type === 'connect' && x.peer === '9'));
  assert.equal(o1.relay('9', bytes('offer'), now), true);
  hand(o1, o2, now);
  hand(o2, o3, now);
  hand(o3, o9, now);
  assert.deepEqual(drain(o9), [{ type: 'relayed', from: '1', payload: bytes('offer') }]);
  // The answer follows the routes the offer left.
  assert.equal(o9.relay('1', bytes('answer'), now), true);
  hand(o9, o3, now);
  hand(o3, o2, now);
  hand(o2, o1, now);
  assert.deepEqual(drain(o1), [{ type: 'relayed', from: '9', payload: bytes('answer') }]);
  assert.equal(o1.stats.relayed, 1);
  assert.equal(o1.stats.relaysReceived, 1);
  assert.equal(o9.stats.relayed, 1);
  assert.equal(o9.stats.relaysReceived, 1);
  assert.equal(o2.stats.relaysForwarded, 2);
  assert.equal(o3.stats.relaysForwarded, 2);
});

test('a relay whose next hop lost its route comes back to its writer as relay_failed', () => {
  const now = 0;
  const o1 = withNeighbors('1', ['2'], now);
  const o2 = withNeighbors('2', ['1', '3'], now);
  // 1 and 2 learned their way to 42 (2 through 3); then 2's link to 3 goes.
  o2.handleMessage('3', { type: 'shuffle', origin: '42', ttl: 1, peers: [] }, now);
  drain(o2);
  o1.handleMessage('2', { type: 'shuffle', origin: '42', ttl: 1, peers: [] }, now);
  drain(o1);
  o2.disconnected('3', now);
  drain(o2);
  assert.equal(o1.relay('42', bytes('offer'), now), true);
  hand(o1, o2, now);
  const back = drain(o2);
  assert.deepEqual(sends(back), [['1', { type: 'unreachable', to: '1', from: '42', ttl: 8, payload: bytes('offer') }]]);
  for (const [, m] of sends(back)) o1.handleMessage('2', m, now);
  assert.deepEqual(drain(o1), [{ type: 'relay_failed', to: '42', payload: bytes('offer') }]);
  assert.equal(o1.stats.relaysFailed, 1);
  assert.equal(o2.stats.relaysForwarded, 0);
  assert.equal(o1.relay('42', bytes('again'), now), false, 'the broken route is forgotten');

  // One of ours back by a loop of routes: failed, not lost.
  o1.handleMessage('2', { type: 'relay', to: '43', from: '1', ttl: 5, payload: bytes('looped') }, now);
  assert.deepEqual(drain(o1), [{ type: 'relay_failed', to: '43', payload: bytes('looped') }]);
});

test('without a route a signal is not relayed (it goes through the server)', () => {
  const now = 0;
  const o = withNeighbors('1', ['2', '3'], now);
  assert.equal(o.relay('42', bytes('offer'), now), false, 'no route to 42');
  assert.equal(o.relay('1', bytes('offer'), now), false, 'not to ourselves');
  assert.deepEqual(drain(o), []);
  o.handleMessage('2', { type: 'forward_join', peer: '42', ttl: 3 }, now);
  drain(o);
  assert.equal(o.relay('42', new Uint8Array(MAX_RELAY + 1), now), false, 'over MAX_RELAY');
  assert.equal(o.relay('42', bytes('offer'), now), true);
  assert.ok(sends(drain(o)).some(([p, m]) => p === '2' && m.type === 'relay' && m.to === '42' && m.from === '1' && m.ttl === 8));
  assert.equal(o.stats.relayed, 1);
  // A broadcast's origin is reached the way it came (first delivery only).
  const g = { type: 'gossip', id: '00000000000000aa', origin: 'z', hops: 1, payload: Uint8Array.of(1) };
  o.handleMessage('3', g, now);
  o.handleMessage('2', g, now);
  drain(o);
  assert.equal(o.relay('z', bytes('offer'), now), true);
  assert.deepEqual(sends(drain(o)).map(([p, m]) => [p, m.type]), [['3', 'relay']]);
  // Routes expire, and repair drops them.
  const later = now + 61_000;
  o.handleTimeout(later);
  assert.equal(o.routes.size, 0);
  assert.equal(o.relay('42', bytes('offer'), later), false);
  // A peer's own connection, once up, needs no route.
  assert.equal(o.relay('3', bytes('offer'), later), true);
  assert.deepEqual(sends(drain(o)).filter(([, m]) => m.type === 'relay'), [['3', { type: 'relay', to: '3', from: '1', ttl: 8, payload: bytes('offer') }]]);
});

test('a relay with no hops left bounces at the hop; with one it goes on', () => {
  const now = 0;
  const o = withNeighbors('2', ['1', '3'], now);
  o.handleMessage('3', { type: 'relay', to: '1', from: '3', ttl: 0, payload: bytes('x') }, now);
  assert.deepEqual(sends(drain(o)), [['3', { type: 'unreachable', to: '3', from: '1', ttl: 8, payload: bytes('x') }]]);
  o.handleMessage('3', { type: 'relay', to: '1', from: '3', ttl: 1, payload: bytes('y') }, now);
  assert.deepEqual(sends(drain(o)), [['1', { type: 'relay', to: '1', from: '3', ttl: 0, payload: bytes('y') }]]);
  assert.equal(o.stats.relaysForwarded, 1);
  // Nor back to its writer: 2's way to 42 is through 1, who wrote it.
  o.handleMessage('1', { type: 'forward_join', peer: '42', ttl: 0 }, now);
  drain(o);
  o.handleMessage('3', { type: 'relay', to: '42', from: '1', ttl: 5, payload: bytes('w') }, now);
  assert.deepEqual(sends(drain(o)), [['3', { type: 'unreachable', to: '1', from: '42', ttl: 8, payload: bytes('w') }]]);
  // An unreachable with no hops left is dropped.
  const dropped = o.stats.dropped;
  o.handleMessage('3', { type: 'unreachable', to: '1', from: '99', ttl: 0, payload: bytes('z') }, now);
  assert.deepEqual(drain(o), []);
  assert.equal(o.stats.dropped, dropped + 1);
});

test('relays passed on for others are limited per second: the 201st bounces', () => {
  const now = 0;
  const o = withNeighbors('1', ['2', '3'], now);
  const results = [];
  for (let i = 0; i < 210; i++) {
    o.handleMessage('2', { type: 'relay', to: '3', from: `w${i}`, ttl: 4, payload: bytes('s') }, now + (i % 900));
    const s = sends(drain(o));
    assert.equal(s.length, 1);
    const [[p, m]] = s;
    if (p === '3' && m.type === 'relay') results.push('forwarded');
    else if (p === '2' && m.type === 'unreachable' && m.to === `w${i}` && m.from === '3') results.push('bounced');
    else assert.fail(JSON.stringify(s));
  }
  assert.equal(results.indexOf('bounced'), 200, 'the first 200 went on');
  assert.deepEqual(results.slice(200), Array(10).fill('bounced'));
  assert.equal(o.stats.relaysForwarded, 200);
  // A second later there is room again.
  o.handleMessage('2', { type: 'relay', to: '3', from: 'w7', ttl: 4, payload: bytes('s') }, now + 1000);
  assert.deepEqual(sends(drain(o)).map(([p, m]) => [p, m.type]), [['3', 'relay']]);
});

test('a connection being set up queues up to its bytes and refuses beyond', () => {
  const now = 1000;
  const o = withNeighbors('me', ['n1'], now);
  // 64 KiB messages: three fit in the 256 KiB setup queue, the fourth not.
  const big = new Uint8Array(64 << 10);
  for (let i = 0; i < 3; i++) assert.equal(o.sendDirect('x', big, now), true);
  const dropped = o.stats.dropped;
  assert.equal(o.sendDirect('x', big, now), false, 'refused: the queue holds its bytes');
  assert.equal(o.stats.dropped, dropped + 1);
  assert.equal(o.sendDirect('x', new Uint8Array(1), now), true, 'a small one still fits');
  drain(o);
  o.connected('x', now);
  assert.equal(drain(o).filter((x) => x.type === 'send' && x.peer === 'x').length, 4, 'what was queued goes out once connected');
  assert.equal(o.sendDirect('x', big, now), true, 'up: nothing is held, nothing refused');
});

test('a connection we did not open or accept stays within maxConnections', () => {
  const now = 0;
  const o = withNeighbors('1', ['2', '3', '4', '5', '6'], now);
  for (const p of ['7', '8', '9']) assert.ok(o.accept(p, now));
  assert.equal(o.conns.size, 8);
  // Neighbours' or being set up: none can go, so the newcomer's is closed.
  o.connected('50', now);
  assert.deepEqual(drain(o), [{ type: 'close', peer: '50' }]);
  assert.ok(!o.conns.has('50'));
  // A message on such a connection is not handled either.
  o.handleMessage('51', { type: 'join' }, now);
  assert.deepEqual(drain(o), [{ type: 'close', peer: '51' }]);
  assert.ok(!o.active.includes('51'));
  assert.equal(o.conns.size, 8);
  // With a spare connection up, that one goes (the least recently used) instead.
  o.connected('7', now + 1);
  o.connected('52', now + 2);
  assert.deepEqual(drain(o), [{ type: 'close', peer: '7' }]);
  assert.ok(o.conns.get('52')?.up);
  assert.equal(o.conns.size, 8);
});

const connects = (out) => out.filter((x) => x.type === 'connect').map((x) => x.peer);

test('a spare that turned us down is not asked again every tick', () => {
  const t0 = 0;
  const o = new Overlay('1', {}, t0);
  for (const p of ['100', '101', '102']) o.peerKnown(p);
  for (const n of ['2', '3']) { o.accept(n, t0); o.connected(n, t0); o.handleMessage(n, { type: 'join' }, t0); }
  drain(o);
  // The first repair asks every spare; each is full and says no.
  let now = t0 + 500;
  o.handleTimeout(now);
  const asked = connects(drain(o)).sort();
  assert.deepEqual(asked, ['100', '101', '102']);
  for (const p of asked) {
    o.connected(p, now);
    assert.deepEqual(sends(drain(o)), [[p, { type: 'neighbor', high: false }]]);
    o.handleMessage(p, { type: 'neighbor_reply', accepted: false }, now);
    assert.deepEqual(drain(o), [{ type: 'close', peer: p }], 'the connection made for the request closes');
  }
  // Not asked again at every repair (each time a connection for nothing) ...
  while (now < t0 + 10_000) {
    now += 100;
    o.handleTimeout(now);
    assert.deepEqual(connects(drain(o)), [], `at ${now - t0} ms`);
  }
  // ... but after a while (a neighbour of theirs may have gone).
  const again = [];
  while (now < t0 + 12_000) { now += 100; o.handleTimeout(now); again.push(...connects(drain(o))); }
  assert.deepEqual(again.sort(), ['100', '101', '102']);
});

test('a peer left with one neighbour asks at high priority and is taken', () => {
  const t0 = 0;
  const o = withNeighbors('1', ['2'], t0);
  // One link is one failure from alone: the spares are asked at high
  // priority, which a full peer cannot refuse.
  const now = t0 + 500;
  o.handleTimeout(now);
  const asked = connects(drain(o));
  assert.ok(asked.length > 0);
  for (const p of asked) {
    o.connected(p, now);
    assert.deepEqual(sends(drain(o)), [[p, { type: 'neighbor', high: true }]]);
  }
  // A full peer takes it, giving up a neighbour of its own; at low priority it would not.
  for (const high of [true, false]) {
    const full = withNeighbors('100', ['10', '11', '12', '13', '14'], t0);
    assert.ok(full.accept('1', now));
    full.connected('1', now);
    full.handleMessage('1', { type: 'neighbor', high }, now);
    assert.deepEqual(sends(drain(full)).filter(([p]) => p === '1'), [['1', { type: 'neighbor_reply', accepted: high }]]);
  }
});

test('with views of two, one neighbour is asked for at low priority', () => {
  // A full view of two that took a high-priority request would leave the
  // neighbour it gave up with one, asking the same way: a chain.
  const t0 = 0;
  const o = withNeighbors('1', ['2'], t0, { activeView: 2 });
  const now = t0 + 500;
  o.handleTimeout(now);
  const asked = connects(drain(o));
  assert.equal(asked.length, 1, `${asked}`);
  o.connected(asked[0], now);
  assert.deepEqual(sends(drain(o)), [[asked[0], { type: 'neighbor', high: false }]]);
});

test('a newcomer whose contacts were all full joins again through them', () => {
  const t0 = 0;
  const o = new Overlay('50', {}, t0);
  o.join(['1', '2', '3', '4'], 20, t0);
  // Each contact in turn turns the connection down: the next is tried, until none is left.
  const tried = [];
  for (let i = 0; i < 4; i++) {
    const c = connects(drain(o));
    assert.equal(c.length, 1, `one contact at a time: ${c}`);
    tried.push(c[0]);
    o.disconnected(c[0], t0);
  }
  assert.deepEqual(tried.sort(), ['1', '2', '3', '4']);
  assert.deepEqual(drain(o), []);
  assert.equal(o.active.length + o.passive.length, 0);
  // Alone: after a second the join is made again through them, and the
  // next round waits twice as long.
  let now = t0;
  const rejoins = [];
  while (now < t0 + 4000) {
    now += 100;
    o.handleTimeout(now);
    for (const c of connects(drain(o))) {
      rejoins.push(now - t0);
      if (rejoins.length < 5) { o.disconnected(c, now); continue; }
      o.connected(c, now);
      assert.deepEqual(sends(drain(o)), [[c, { type: 'join' }]]);
      o.handleMessage(c, { type: 'neighbor_reply', accepted: true }, now);
      assert.ok(drain(o).some((x) => x.type === 'neighbor_up' && x.peer === c));
    }
  }
  assert.equal(rejoins.length, 5, `${rejoins}`);
  assert.equal(rejoins[0], 1000);
  assert.ok(rejoins[3] < 2000, `${rejoins}`);
  assert.equal(rejoins[4], 3000);
  assert.equal(o.active.length, 1);
  assert.equal(o.stats.rejoins, 2);
});

// Room wiring (crates/peer mesh.rs, mesh_overlay.rs): a room with a fake
// RTCPeerConnection, the server and the overlay's channels recorded.

/** An overlay room as `me`, in a large room; `link(peer)` makes `peer` a neighbour. */
function overlayRoom(me) {
  const room = new Room({ server: '127.0.0.1:9', room: 'big', overlay: true, RTCPeerConnection: FakePC });
  room.id = me;
  room.overlay = new Overlay(me, {}, Date.now());
  for (let i = 0; i < 20; i++) room.overlay.peerKnown(`s${i}`);
  const server = [];
  room.signaling.send = (m) => { server.push(m); return true; };
  const wire = [];
  const link = (peer) => {
    room.overlayChannels.set(peer, [{ isClosed: false, send: async (b) => { wire.push([peer, decode(b)]); } }]);
    room.overlay.accept(peer, Date.now());
    room.overlay.connected(peer, Date.now());
    room.overlay.handleMessage(peer, { type: 'join' }, Date.now());
    room._overlayRun();
    wire.length = 0;
  };
  return { room, server, wire, link };
}

const candidate = { kind: 'candidate', candidate: 'candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host', mid: '0' };

test('room: signals of a connection being set up go over the overlay when a route is known', () => {
  const { room, server, wire, link } = overlayRoom('me');
  try {
    link('2');
    // The end of p's join walk: we connect to p, and know the way back.
    room.overlay.handleMessage('2', { type: 'forward_join', peer: 'p', ttl: 0 }, Date.now());
    room._overlayRun();
    const conn = room.conns.get('p');
    assert.equal(conn?.state, 'connecting');
    wire.length = 0;
    room._signal('p', candidate);
    assert.deepEqual(server, []);
    assert.deepEqual(wire, [['2', { type: 'relay', to: 'p', from: 'me', ttl: 8, payload: bytes(JSON.stringify(candidate)) }]]);
    // No route: through the server.
    room._signal('q', candidate);
    assert.deepEqual(server, [{ type: 'signal', room: 'big', to: 'q', signal: candidate }]);
    // A connection that was up (an ICE restart): through the server too.
    conn.state = 'disconnected';
    room._signal('p', candidate);
    assert.deepEqual(server.map((m) => m.to), ['q', 'p']);
    assert.equal(wire.length, 1);
    const st = room.overlayStats();
    assert.equal(st.signalsRelayed, 1);
    assert.equal(st.signalsViaServer, 2);
    assert.ok(!('relayed' in st));
  } finally { room._close('test'); }
});

test('room: a relayed offer is answered over the overlay, with a candidate that overtook it held and applied', async () => {
  const { room, server, wire, link } = overlayRoom('me');
  try {
    link('2');
    const relay = (signal) => {
      room.overlay.handleMessage('2', { type: 'relay', to: 'me', from: 'x', ttl: 5, payload: bytes(JSON.stringify(signal)) }, Date.now());
      room._overlayRun();
    };
    relay(candidate);
    assert.ok(!room.conns.has('x'));
    assert.deepEqual(room.held.get('x'), [candidate]);
    const offer = { kind: 'offer', sdp: 'v=0 remote' };
    relay(offer);
    const conn = room.conns.get('x');
    assert.ok(conn, 'the offer was taken');
    assert.ok(!room.held.has('x'));
    await conn.chain;
    assert.deepEqual(conn.pc.remotes, [{ type: 'offer', sdp: offer.sdp }]);
    assert.deepEqual(conn.pc.added.map((c) => c.candidate), [candidate.candidate]);
    // The answer went back the way the offer came, not through the server.
    assert.deepEqual(server, []);
    const back = wire.filter(([, m]) => m.type === 'relay');
    assert.equal(back.length, 1);
    assert.equal(back[0][0], '2');
    assert.equal(back[0][1].to, 'x');
    assert.deepEqual(JSON.parse(new TextDecoder().decode(back[0][1].payload)), { kind: 'answer', sdp: 'v=0 answer' });
    const st = room.overlayStats();
    assert.equal(st.relaysReceived, 2);
    assert.equal(st.signalsRelayed, 1);
  } finally { room._close('test'); }
});

test('room: a relayed signal that comes back goes through the server', () => {
  const { room, server, link } = overlayRoom('me');
  try {
    link('2');
    room.overlay.handleMessage('2', { type: 'unreachable', to: 'me', from: 'p', ttl: 7, payload: bytes(JSON.stringify(candidate)) }, Date.now());
    room._overlayRun();
    assert.deepEqual(server, [{ type: 'signal', room: 'big', to: 'p', signal: candidate }]);
    const st = room.overlayStats();
    assert.equal(st.relaysFailed, 1);
    assert.equal(st.signalsViaServer, 1);
  } finally { room._close('test'); }
});

test('room: signals held in an overlay room stay bounded, another peer\'s going when full', () => {
  const { room } = overlayRoom('me');
  try {
    const from = (peer) => room._onServer({ type: 'signal', room: 'big', from: peer, signal: candidate });
    for (let i = 0; i < 70; i++) from('h0');
    assert.equal(room.held.get('h0')?.length, 64);
    for (let i = 1; i <= 64; i++) from(`h${i}`);
    assert.equal(room.held.size, 64);
    assert.ok(!room.held.has('h0') && room.held.has('h64'));
  } finally { room._close('test'); }
});

test('room: a message after a disconnect on the same channel does not bring the connection back', () => {
  const { room } = overlayRoom('a');
  /** A channel that records the room's message handler. */
  const ch = { label: 'peerlink.overlay', peer: 'b', isClosed: false, handlers: {}, on(ev, fn) { this.handlers[ev] = fn; }, send: async () => {} };
  try {
    room._channelOpen(ch);
    const deliver = (m) => ch.handlers.message(encode(m));
    deliver({ type: 'join' });
    assert.ok(room.overlay.active.includes('b') && room.overlay.conns.get('b')?.up);
    // b drops us as a neighbour, and something it sent before arrives after.
    deliver({ type: 'disconnect', alive: true });
    deliver({ type: 'ihave', ids: [] });
    // (It may be asked again as a spare: a new connection, not up.)
    assert.ok(!room.overlay.conns.get('b')?.up, 'the overlay does not count a connection it closed as up');
    assert.ok(!room.overlayChannels.has('b'));
  } finally { room._close('test'); }
});

test('room: outputs produced while the overlay\'s outputs are carried out are not lost', () => {
  const { room, wire, link } = overlayRoom('me');
  try {
    link('2');
    link('3');
    const off = room.on('message', () => { off(); room.broadcast('pong'); });
    room.overlay.handleMessage('2', { type: 'gossip', id: '00000000000000aa', origin: 'z', hops: 1, payload: Uint8Array.of(1) }, Date.now());
    room._overlayRun();
    assert.equal(room.overlayRunning, false);
    const gossip = wire.filter(([, m]) => m.type === 'gossip').map(([p, m]) => [p, m.origin]).sort();
    assert.deepEqual(gossip, [['2', 'me'], ['3', 'me'], ['3', 'z']]);
    assert.ok(room.overlayTimer !== null);
  } finally { room._close('test'); }
});

test('room: a relayed signal never touches a connection that is up; its offer is asked for through the server', async () => {
  const { room, server, link } = overlayRoom('me');
  try {
    link('2');
    const relay = (signal) => {
      room.overlay.handleMessage('2', { type: 'relay', to: 'me', from: 'x', ttl: 5, payload: bytes(JSON.stringify(signal)) }, Date.now());
      room._overlayRun();
    };
    relay({ kind: 'offer', sdp: 'v=0\r\no=- 111 2 IN IP4 0.0.0.0\r\n' });
    const conn = room.conns.get('x');
    await conn.chain;
    conn.state = 'connected';
    // Anyone can write `from: x` in a relay: a new offer for a connection
    // that is up is not applied, and x is asked through the server.
    relay({ kind: 'offer', sdp: 'v=0\r\no=- 999 2 IN IP4 0.0.0.0\r\n' });
    relay(candidate);
    await conn.chain;
    assert.equal(room.conns.get('x'), conn, 'the connection stays');
    assert.equal(conn.pc.remotes.length, 1);
    assert.deepEqual(conn.pc.added, []);
    assert.deepEqual(server, [{ type: 'send', room: 'big', to: 'x', data: { peerlink_overlay: 'via_server' } }]);
  } finally { room._close('test'); }
});

test('room: asked for signals through the server, a connection being set up starts over there', () => {
  const { room, server, wire, link } = overlayRoom('me');
  try {
    link('2');
    room.overlay.handleMessage('2', { type: 'forward_join', peer: 'p', ttl: 0 }, Date.now());
    room._overlayRun();
    const first = room.conns.get('p');
    assert.equal(first?.state, 'connecting');
    room._onServer({ type: 'message', room: 'big', from: 'p', data: { peerlink_overlay: 'via_server' } });
    const again = room.conns.get('p');
    assert.ok(again && again !== first && first.state === 'closed', 'a new connection');
    wire.length = 0;
    server.length = 0;
    room._signal('p', candidate);
    assert.deepEqual(wire, [], 'not over the overlay');
    assert.deepEqual(server, [{ type: 'signal', room: 'big', to: 'p', signal: candidate }]);
  } finally { room._close('test'); }
});

test('room: an offer of a new session replaces the connection it would renegotiate', async () => {
  const { room } = overlayRoom('me');
  try {
    const offer = (id) => ({ kind: 'offer', sdp: `v=0\r\no=- ${id} 2 IN IP4 0.0.0.0\r\n` });
    room._onServer({ type: 'signal', room: 'big', from: 'x', signal: offer(111) });
    const first = room.conns.get('x');
    await first.chain;
    first.state = 'connected';
    // A renegotiation of the same session stays on it.
    room._onServer({ type: 'signal', room: 'big', from: 'x', signal: { ...offer(111), sdp: offer(111).sdp + 'a=x\r\n' } });
    await first.chain;
    assert.equal(room.conns.get('x'), first);
    assert.equal(first.pc.remotes.length, 2);
    // x closed that connection and opened another: ours goes, a new one answers.
    room._onServer({ type: 'signal', room: 'big', from: 'x', signal: offer(222) });
    const second = room.conns.get('x');
    assert.ok(second && second !== first);
    assert.equal(first.state, 'closed');
    await second.chain;
    assert.deepEqual(second.pc.remotes.map((d) => d.sdp), [offer(222).sdp]);
  } finally { room._close('test'); }
});

test('room: a message to one peer whose channel cannot take it is refused, not handed on to be dropped', async () => {
  const { Channel } = await import('../../lib/channel.js');
  const { RawChannel } = await import('./rawchannel.js');
  const { room, wire, link } = overlayRoom('me');
  link('p');
  // The connection's real channel, over a stand-in whose buffer never drains.
  const raw = new RawChannel('peerlink.overlay');
  const ch = new Channel(/** @type {any} */ (raw), 'p', { maxBufferedAmount: 1 << 20, maxQueuedBytes: 256 << 10 });
  room.overlayChannels.set('p', [ch]);
  try {
    const msg = new Uint8Array(60_000);
    let accepted = 0;
    while (room.sendTo('p', msg) && accepted < 200) accepted++;
    // The browser's buffer (1 MiB) and the queue (256 KiB) took what fits.
    assert.ok(accepted >= 20 && accepted < 30, `${accepted} accepted`);
    assert.equal(room.overlay.stats.dropped, 0, 'nothing handed on and dropped');
    assert.equal(wire.length, 0);
    await new Promise((r) => setTimeout(r, 0));
    assert.equal(room.overlay.stats.dropped, 0, 'no send rejected later');
  } finally { room._close('test'); }
});

test('server-routed overlay messages match the fixture', () => {
  const f = JSON.parse(readFileSync(new URL('../../../fixtures/overlay/server_messages.json', import.meta.url), 'utf8'));
  assert.deepEqual({ [BUSY_KEY]: 'busy' }, f.busy);
  assert.deepEqual({ [BUSY_KEY]: VIA_SERVER }, f.via_server);
});

test('room: an offer relayed over the overlay and not answered in time starts over through the server', async () => {
  const { room, server, wire, link } = overlayRoom('me');
  try {
    link('2');
    room.overlay.handleMessage('2', { type: 'forward_join', peer: 'p', ttl: 0 }, Date.now());
    room._overlayRun();
    const first = room.conns.get('p');
    await first.chain;
    await new Promise((r) => setTimeout(r, 10));
    room._signal('p', { kind: 'offer', sdp: 'v=0 offer' });
    assert.ok(first.relayTimer, 'waiting for the answer');
    assert.equal(wire.filter(([, m]) => m.type === 'relay').length, 1);
    // Answered: nothing happens when the wait is over.
    first.pc.remoteDescription = { type: 'answer', sdp: 'v=0 answer' };
    room._relayedOfferDue('p', first);
    assert.equal(room.conns.get('p'), first);
    // Not answered: a new connection, signalled through the server.
    first.pc.remoteDescription = null;
    room._relayedOfferDue('p', first);
    const again = room.conns.get('p');
    assert.ok(again && again !== first && first.state === 'closed');
    server.length = 0;
    room._signal('p', candidate);
    assert.deepEqual(server, [{ type: 'signal', room: 'big', to: 'p', signal: candidate }]);
  } finally { room._close('test'); }
});

test('room: an offer that came through the server is answered through the server', async () => {
  const { room, server, wire, link } = overlayRoom('me');
  try {
    link('2');
    // A way to x is known (x's join walk came through 2)...
    room.overlay.handleMessage('2', { type: 'forward_join', peer: 'x', ttl: 3 }, Date.now());
    room._overlayRun();
    wire.length = 0;
    // ...but x's offer came through the server: so does our answer.
    room._onServer({ type: 'signal', room: 'big', from: 'x', signal: { kind: 'offer', sdp: 'v=0 remote' } });
    const conn = room.conns.get('x');
    await conn.chain;
    assert.deepEqual(wire.filter(([, m]) => m.type === 'relay'), []);
    assert.deepEqual(server.filter((m) => m.type === 'signal').map((m) => [m.to, m.signal.kind]), [['x', 'answer']]);
  } finally { room._close('test'); }
});
