// Shared documents (lib/doc.js): Y.js documents kept in sync over a pair
// of linked channels with y-protocols' messages, as two tabs of a room do;
// real Chromium runs the room page's notes and board in test/e2e/doc.test.js.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as Y from 'yjs';
import { readFileSync } from 'node:fs';
import { SharedDoc, DOC_PREFIX, splitMessage, Reassembly, MAX_DOC_MESSAGE } from '../../lib/doc.js';
import { Channel } from '../../lib/channel.js';
import { Emitter } from '../../lib/events.js';
import { RawChannel } from './rawchannel.js';

/** A fake room with `channel_open` / `peer_left` and linked channels to other fake rooms. */
class FakeRoom extends Emitter {
  /** @param {string} id */
  constructor(id) {
    super();
    this.id = id;
    /** @type {any[]} */
    this.open = [];
  }
  /** @param {string} label */
  openChannels(label) { return this.open.filter((c) => c.label === label && !c.isClosed); }
}

/** Connects two fake rooms with a document channel; returns both ends. @param {FakeRoom} x @param {FakeRoom} y */
function link(x, y, label = `${DOC_PREFIX}notes`) {
  const end = (/** @type {string} */ peer) => Object.assign(new Emitter(), {
    label, peer, isClosed: false, other: /** @type {any} */ (null), sent: 0, maxMessageSize: 65_536,
    fits() { return !this.isClosed; },
    async send(/** @type {Uint8Array} */ m) { if (this.isClosed) throw new Error('closed'); this.sent++; const o = this.other; queueMicrotask(() => o.isClosed || o.emit('message', m)); },
    close() { this.isClosed = true; },
  });
  const cx = end(y.id);
  const cy = end(x.id);
  cx.other = cy;
  cy.other = cx;
  x.open.push(cx);
  y.open.push(cy);
  x.emit('channel_open', cx);
  y.emit('channel_open', cy);
  return [cx, cy];
}

const settle = () => new Promise((r) => setTimeout(r, 20));

test('doc: edits made apart merge when two members meet, and later edits flow both ways', async () => {
  const [ra, rb] = [new FakeRoom('a'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('notes'), new SharedDoc('notes')];
  da.attach(/** @type {any} */ (ra));
  db.attach(/** @type {any} */ (rb));
  da.doc.getText('t').insert(0, 'from a');
  db.doc.getText('t').insert(0, 'from b');
  /** @type {string[]} */
  const synced = [];
  da.on('synced', ({ peer }) => synced.push(peer));
  link(ra, rb);
  await settle();
  assert.equal(da.doc.getText('t').toString(), db.doc.getText('t').toString());
  assert.match(da.doc.getText('t').toString(), /from a/);
  assert.match(da.doc.getText('t').toString(), /from b/);
  assert.deepEqual(synced, ['b']);
  db.doc.getArray('strokes').push([{ c: '#000', p: [0, 0, 1, 1] }]);
  await settle();
  assert.deepEqual(da.doc.getArray('strokes').toJSON(), [{ c: '#000', p: [0, 0, 1, 1] }]);
  da.destroy();
  db.destroy();
});

test('doc: three members relay nothing twice; a member that goes takes its awareness with it; a bad message drops that channel only', async () => {
  const rooms = ['a', 'b', 'c'].map((id) => new FakeRoom(id));
  const docs = rooms.map(() => new SharedDoc('notes'));
  docs.forEach((d, i) => d.attach(/** @type {any} */ (rooms[i])));
  link(rooms[0], rooms[1]);
  const [ac] = link(rooms[0], rooms[2]);
  const [, cb] = link(rooms[1], rooms[2]);
  docs[1].awareness.setLocalState({ name: 'b' });
  docs[0].doc.getText('t').insert(0, 'x');
  await settle();
  for (const d of docs) assert.equal(d.doc.getText('t').toString(), 'x');
  assert.ok([...docs[2].awareness.getStates().values()].some((s) => s?.name === 'b'));
  // b goes: c forgets b's awareness.
  rooms[2].emit('peer_left', { peer: 'b' });
  assert.ok(![...docs[2].awareness.getStates().values()].some((s) => s?.name === 'b'));
  // Garbage from a on c's channel: c drops that channel, keeps its document.
  /** @type {string[]} */
  const errors = [];
  docs[2].on('error', ({ peer }) => errors.push(peer));
  ac.other.emit('message', new Uint8Array([7, 7, 7]));
  assert.deepEqual(errors, ['a']);
  assert.equal(docs[2].channels.has('a'), false);
  assert.equal(docs[2].doc.getText('t').toString(), 'x');
  void cb;
  docs.forEach((d) => d.destroy());
});

test('doc: the state survives detach and attach to another room (away and back)', async () => {
  const [r1, r2, other] = [new FakeRoom('a1'), new FakeRoom('a2'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('notes'), new SharedDoc('notes', { doc: new Y.Doc() })];
  da.attach(/** @type {any} */ (r1));
  db.attach(/** @type {any} */ (other));
  link(r1, other);
  da.doc.getText('t').insert(0, 'shared');
  await settle();
  da.detach();
  da.doc.getText('t').insert(6, ' (edited away)');
  db.doc.getText('t').insert(0, '> ');
  await settle();
  assert.equal(db.doc.getText('t').toString(), '> shared');
  da.attach(/** @type {any} */ (r2));
  link(r2, other);
  await settle();
  assert.equal(da.doc.getText('t').toString(), '> shared (edited away)');
  assert.equal(db.doc.getText('t').toString(), '> shared (edited away)');
  da.destroy();
  db.destroy();
});

test('doc: a peer whose channel is full misses nothing: it gets the whole state once the queue has room; a refused update stops sync with an error', async () => {
  const [ra, rb] = [new FakeRoom('a'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('notes'), new SharedDoc('notes')];
  da.attach(/** @type {any} */ (ra));
  db.attach(/** @type {any} */ (rb));
  const [cx] = link(ra, rb);
  await settle();
  /** @type {string[]} */
  const errors = [];
  da.on('error', ({ error }) => errors.push(error));
  // a's channel to b refuses as a full queue does, until it has drained.
  const send = cx.send.bind(cx);
  let full = true;
  /** @type {() => void} */
  let drained = () => {};
  cx.send = async (/** @type {Uint8Array} */ m) => {
    if (full) throw Object.assign(new Error('send queue full'), { code: 'overflow' });
    return send(m);
  };
  cx.fits = () => !full;
  cx.flush = () => new Promise((r) => { drained = () => r(undefined); });
  da.doc.getText('t').insert(0, 'typed while b could not keep up; ');
  da.doc.getText('t').insert(0, 'and more. ');
  await settle();
  assert.equal(db.doc.getText('t').toString(), '', 'nothing got through yet');
  full = false;
  drained();
  await settle();
  assert.equal(db.doc.getText('t').toString(), da.doc.getText('t').toString());
  assert.deepEqual(errors, []);
  // Too large for the channel: sync with b stops, and a says so.
  cx.send = async () => { throw Object.assign(new Error('message too large'), { code: 'too_large' }); };
  da.doc.getText('t').insert(0, 'x');
  await settle();
  assert.equal(errors.length, 1);
  assert.match(errors[0], /sync with b stopped: message too large/);
  assert.equal(da.channels.has('b'), false);
  da.destroy();
  db.destroy();
});

const fixture = JSON.parse(readFileSync(new URL('../../../fixtures/docs/parts.json', import.meta.url), 'utf8'));
const hex = (/** @type {string} */ h) => Uint8Array.from(Buffer.from(h, 'hex'));
const toHex = (/** @type {Uint8Array} */ b) => Buffer.from(b).toString('hex');

test('doc parts: messages are cut and collected as fixtures/docs/parts.json says, and parts that break the rules are refused', () => {
  assert.equal(MAX_DOC_MESSAGE, fixture.max_total);
  for (const c of fixture.splits) {
    assert.deepEqual(splitMessage(hex(c.message), c.limit).map(toHex), c.parts, c.name);
    const r = new Reassembly();
    const out = c.parts.map((/** @type {string} */ p) => r.push(hex(p))).filter(Boolean);
    assert.deepEqual(out.map(toHex), [c.message], c.name);
  }
  for (const c of fixture.streams) {
    const r = new Reassembly();
    const out = c.received.map((/** @type {string} */ p) => r.push(hex(p))).filter(Boolean);
    assert.deepEqual(out.map(toHex), c.messages, c.name);
  }
  for (const c of fixture.invalid) {
    const r = new Reassembly();
    assert.throws(() => { for (const p of c.received) r.push(hex(p)); }, Error, c.name);
  }
});

/**
 * Two rooms linked by real Channels over RawChannel stand-ins with a small
 * maximum message size and small queues, and a wire that moves at most
 * `perTick` bytes each way every millisecond.
 * @param {FakeRoom} x @param {FakeRoom} y
 */
function wire(x, y, { maxMessageSize = 16_384, perTick = 128 * 1024, maxQueuedBytes = 256 * 1024 } = {}) {
  const label = `${DOC_PREFIX}board`;
  const [rx, ry] = [new RawChannel(label), new RawChannel(label)];
  const opts = { maxMessageSize, maxBufferedAmount: 64 * 1024, maxQueuedBytes };
  const [cx, cy] = [new Channel(/** @type {any} */ (rx), y.id, opts), new Channel(/** @type {any} */ (ry), x.id, opts)];
  let peakQueued = 0;
  const move = (/** @type {RawChannel} */ from, /** @type {RawChannel} */ to) => {
    let budget = perTick;
    while (from.sent.length && budget > 0) {
      const m = /** @type {Uint8Array} */ (from.sent.shift());
      assert.ok(m.byteLength <= maxMessageSize, `a channel message of ${m.byteLength} bytes`);
      budget -= m.byteLength;
      from.drain(m.byteLength);
      to.dispatchEvent(new MessageEvent('message', { data: m.buffer.slice(m.byteOffset, m.byteOffset + m.byteLength) }));
    }
  };
  const timer = setInterval(() => {
    peakQueued = Math.max(peakQueued, cx.queuedBytes, cy.queuedBytes);
    move(rx, ry);
    move(ry, rx);
  }, 1);
  x.open.push(cx);
  y.open.push(cy);
  x.emit('channel_open', cx);
  y.emit('channel_open', cy);
  return { raws: [rx, ry], channels: [cx, cy], peak: () => peakQueued, stop: () => clearInterval(timer) };
}

/** A stroke of `n` points, as the room page's board keeps one. @param {number} n @param {number} seed */
const stroke = (n, seed) => ({ c: '#123456', p: Array.from({ length: 2 * n }, (_, i) => Math.round(((seed * 7919 + i * 104729) % 100000)) / 100000) });

/** Waits until `cond` holds (at most 10 s). @param {() => boolean} cond */
async function until(cond) {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  return cond();
}

test('doc: a document larger than a channel message reaches a late joiner in parts, with the edits made meanwhile on both sides', async () => {
  const [ra, rb] = [new FakeRoom('a'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('board'), new SharedDoc('board')];
  da.attach(/** @type {any} */ (ra));
  db.attach(/** @type {any} */ (rb));
  const board = da.doc.getArray('strokes');
  for (let i = 0; i < 1500; i++) board.push([stroke(100, i)]);
  const size = Y.encodeStateAsUpdate(da.doc).byteLength;
  assert.ok(size > 1_000_000, `a board of ${size} bytes`);
  /** @type {string[]} */
  const errors = [];
  da.on('error', ({ error }) => errors.push(error));
  db.on('error', ({ error }) => errors.push(error));
  /** @type {string[]} */
  const synced = [];
  db.on('synced', ({ peer }) => synced.push(peer));
  const w = wire(ra, rb);
  // Edits on both sides while the board is on its way.
  await new Promise((r) => setTimeout(r, 5));
  board.push([stroke(50, 9001)]);
  db.doc.getArray('strokes').push([stroke(50, 9002)]);
  db.doc.getText('notes').insert(0, 'hello');
  const same = () =>
    JSON.stringify(da.doc.getArray('strokes').toJSON()) === JSON.stringify(db.doc.getArray('strokes').toJSON()) &&
    da.doc.getText('notes').toString() === 'hello';
  const converged = await until(same);
  assert.deepEqual(errors, []);
  assert.ok(converged, `b has ${db.doc.getArray('strokes').length} of ${board.length} strokes`);
  assert.equal(board.length, 1502);
  assert.deepEqual(synced, ['a'], 'b saw its sync step 2, in parts');
  assert.ok(w.peak() <= 256 * 1024, `queued ${w.peak()} bytes`);
  // A paste larger than a channel message goes in parts too, and an edit
  // after it as one message again.
  const paste = 'pasted text '.repeat(10_000);
  da.doc.getText('notes').insert(5, paste);
  assert.ok(await until(() => db.doc.getText('notes').length === 5 + paste.length));
  board.delete(0, 1);
  const deleted = await until(() => db.doc.getArray('strokes').length === 1501);
  w.stop();
  assert.ok(deleted);
  assert.equal(w.raws[0].sent.length + w.raws[1].sent.length, 0);
  da.destroy();
  db.destroy();
});

test('doc: an edit that finds the queue full is not lost when a message in parts follows in the same task', async () => {
  const [ra, rb] = [new FakeRoom('a'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('board'), new SharedDoc('board')];
  da.attach(/** @type {any} */ (ra));
  db.attach(/** @type {any} */ (rb));
  const w = wire(ra, rb, { maxQueuedBytes: 64 * 1024 });
  const text = da.doc.getText('notes');
  text.insert(0, 'first line\n');
  assert.ok(await until(() => db.doc.getText('notes').toString() === 'first line\n'));
  // In one task (the wire cannot move meanwhile): fill a's queue to b,
  // then a small edit that does not fit, then one that goes in parts.
  const [cx] = w.channels;
  let typed = 0;
  while (cx.fits(1100) && typed < 1000) {
    text.insert(text.length, 'y'.repeat(1000));
    typed++;
  }
  assert.ok(!cx.fits(2100), 'the queue filled');
  text.insert(0, 'w'.repeat(2000));
  text.insert(0, 'z'.repeat(40_000));
  const same = () => db.doc.getText('notes').toString() === text.toString();
  const converged = await until(same);
  w.stop();
  assert.ok(converged, `b has ${db.doc.getText('notes').length} characters of ${text.length}; starts ${JSON.stringify(db.doc.getText('notes').toString().slice(40_000, 40_010))}`);
  da.destroy();
  db.destroy();
});

test('doc: a channel that replaces one the document was holding back for starts afresh', async () => {
  const [ra, rb] = [new FakeRoom('a'), new FakeRoom('b')];
  const [da, db] = [new SharedDoc('board'), new SharedDoc('board')];
  da.attach(/** @type {any} */ (ra));
  db.attach(/** @type {any} */ (rb));
  const first = wire(ra, rb);
  assert.ok(await until(() => da.channels.size === 1 && db.channels.size === 1));
  // The wire stops while a message to b goes in parts: a holds b back.
  first.stop();
  da.doc.getText('notes').insert(0, 'x'.repeat(600_000));
  await new Promise((r) => setTimeout(r, 20));
  assert.ok(da.behind.has('b'), 'a holds back for b');
  // A new channel to b replaces the stalled one (no close event for it).
  const second = wire(ra, rb);
  db.doc.getText('notes').insert(0, 'from b: ');
  const same = () =>
    da.doc.getText('notes').toString() === db.doc.getText('notes').toString() &&
    da.doc.getText('notes').length === 600_008;
  const converged = await until(same);
  second.stop();
  assert.ok(converged, `a ${da.doc.getText('notes').length}, b ${db.doc.getText('notes').length} characters`);
  da.destroy();
  db.destroy();
});
