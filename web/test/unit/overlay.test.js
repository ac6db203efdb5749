// fixtures/overlay/messages.json: the overlay's wire format, and a few of
// the state machine's answers (crates/overlay has the full tests and the
// simulation; this is the same protocol in JavaScript).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { encode, decode, DecodeError, Overlay } from '../../lib/overlay.js';

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
  assert.equal(fixture.valid.length, 19);
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
