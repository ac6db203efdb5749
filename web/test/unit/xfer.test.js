// SendTransfer hashes ahead while it waits for a receiver, as `peerlink
// send` does (crates/cli/src/transfer/hasher.rs): when the receiver asks for
// a page of hashes, the answer is ready, with no hashing left to do.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { SendTransfer, ReceiveTransfer } from '../../lib/xfer.js';
import { Emitter } from '../../lib/events.js';
import { Channel } from '../../lib/channel.js';
import { RawChannel } from './rawchannel.js';
import { chunkHash, hashesToHex } from '../../lib/transfer/hash.js';
import { MIN_CHUNK_SIZE } from '../../lib/transfer/manifest.js';

/** A link that never finds a receiver. */
class NoReceiver extends Emitter {
  async start() {}
  close() {}
}

test('a sender hashes its files ahead while no receiver is there', async () => {
  const cs = MIN_CHUNK_SIZE;
  const a = new Uint8Array(40 * cs).map((_, i) => (i * 7) & 0xff);
  const b = new Uint8Array(3 * cs + 5).map((_, i) => (i * 13) & 0xff);
  const t = new SendTransfer({
    server: 'ws://127.0.0.1:1',
    chunkSize: cs,
    items: [{ path: 'a.bin', blob: new Blob([a]) }, { path: 'b.bin', blob: new Blob([b]) }],
    link: /** @type {any} */ (new NoReceiver()),
  });
  let reads = 0;
  const read = t._read.bind(t);
  t._read = (file, chunk) => { reads++; return read(file, chunk); };
  t.run().catch(() => {});
  const total = 40 + 4;
  for (let i = 0; i < 200 && reads < total; i++) await new Promise((r) => setTimeout(r, 10));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(reads, total, 'every chunk read once, ahead of any request');

  // A receiver arrives and asks: the engine answers from what it has, with
  // no `hash` request for the driver.
  const s = t.sender;
  s.startSession();
  while (s.poll()) { /* the manifest */ }
  s.handleCtlJson('{"type":"accept"}');
  s.handleCtlJson('{"type":"get_hashes","file":0,"from":0}');
  s.handleCtlJson('{"type":"get_hashes","file":1,"from":0}');
  const outs = [];
  for (let o = s.poll(); o; o = s.poll()) outs.push(o);
  assert.ok(!outs.some((o) => o.type === 'hash'), JSON.stringify(outs.map((o) => o.type)));
  const answers = outs.filter((o) => o.type === 'ctl' && o.msg.type === 'hashes').map((o) => o.msg);
  const expect = (data, n) => hashesToHex(Array.from({ length: n }, (_, c) => chunkHash(data.subarray(c * cs, Math.min((c + 1) * cs, data.length)))));
  assert.deepEqual(answers.map((m) => [m.file, m.from, m.hashes]), [[0, 0, expect(a, 40)], [1, 0, expect(b, 4)]]);
  assert.equal(reads, total, 'nothing read again');
});

/** An RTCDataChannel stand-in wired to another: what one sends, the other gets at once. */
class WiredRaw extends RawChannel {
  /** @type {WiredRaw | null} */
  other = null;
  send(/** @type {string | Uint8Array} */ d) {
    const data = typeof d === 'string' ? d : d.slice().buffer;
    queueMicrotask(() => this.other?.dispatchEvent(new MessageEvent('message', { data })));
  }
}

/** A paired link whose channels are `WiredRaw`s: `open` as soon as it starts. */
function wiredLinks() {
  const raws = ['ctl', 'data'].map((label) => [new WiredRaw(label), new WiredRaw(label)]);
  for (const [x, y] of raws) { x.other = y; y.other = x; }
  /** @param {0 | 1} side */
  const link = (side) => Object.assign(new Emitter(), {
    async start() {
      const [ctl, data] = raws.map((pair) => new Channel(/** @type {any} */ (pair[side]), side ? 'sender' : 'receiver'));
      queueMicrotask(() => this.emit('open', { ctl, data, peer: 'p' }));
    },
    close() {},
  });
  return [link(0), link(1)];
}

test('a receiver whose sink cannot open the file fails the transfer with the reason, and does not hang', async () => {
  const [sendLink, receiveLink] = wiredLinks();
  const sender = new SendTransfer({
    server: 'ws://127.0.0.1:1',
    chunkSize: MIN_CHUNK_SIZE,
    items: [{ path: 'a.bin', blob: new Blob([new Uint8Array(3 * MIN_CHUNK_SIZE)]) }],
    link: /** @type {any} */ (sendLink),
  });
  sender.run().catch(() => {});
  const sink = { open: async () => { throw new Error('no space left on the device'); } };
  const receiver = new ReceiveTransfer({ server: 'ws://127.0.0.1:1', sink: /** @type {any} */ (sink), autoAccept: true, link: /** @type {any} */ (receiveLink) });
  const outcome = await Promise.race([
    receiver.run().then(() => 'finished', (e) => `${e.code}: ${e.message}`),
    new Promise((r) => setTimeout(() => r('still running after 5 s'), 5000)),
  ]);
  assert.match(String(outcome), /^cancelled: .*no space left/);
});

test('a sender told to hash on acceptance reads nothing while its offer waits, then sends it all', async () => {
  const [sendLink, receiveLink] = wiredLinks();
  const data = new Uint8Array(6 * MIN_CHUNK_SIZE).map((_, i) => (i * 5) & 0xff);
  const sender = new SendTransfer({
    server: 'ws://127.0.0.1:1',
    chunkSize: MIN_CHUNK_SIZE,
    items: [{ path: 'a.bin', blob: new Blob([data]) }],
    link: /** @type {any} */ (sendLink),
    hashAheadOnAccept: true,
  });
  let reads = 0;
  const read = sender._read.bind(sender);
  sender._read = (file, chunk) => { reads++; return read(file, chunk); };
  const sent = sender.run();
  /** @type {Uint8Array[]} */
  const got = [];
  const sink = { open: async () => ({ write: async (/** @type {Uint8Array} */ d) => { got.push(d.slice()); }, close: async () => {}, abort: async () => {} }) };
  const receiver = new ReceiveTransfer({ server: 'ws://127.0.0.1:1', sink: /** @type {any} */ (sink), link: /** @type {any} */ (receiveLink) });
  const offered = new Promise((r) => receiver.on('offered', r));
  const received = receiver.run();
  await offered;
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(reads, 0, 'nothing read before a yes');
  receiver.accept();
  await Promise.all([sent, received]);
  assert.deepEqual(Buffer.concat(got), Buffer.from(data));
});

test('a receiver that declines for a reason of its own is told that reason; accepting after the end does nothing', async () => {
  const [sendLink, receiveLink] = wiredLinks();
  const sender = new SendTransfer({
    server: 'ws://127.0.0.1:1',
    chunkSize: MIN_CHUNK_SIZE,
    items: [{ path: 'a.bin', blob: new Blob([new Uint8Array(10)]) }],
    link: /** @type {any} */ (sendLink),
  });
  const sent = sender.run().then(() => 'finished', (e) => `${e.code}: ${e.message}`);
  let opened = 0;
  const sink = { open: async () => { opened++; throw new Error('unexpected'); } };
  const receiver = new ReceiveTransfer({ server: 'ws://127.0.0.1:1', sink: /** @type {any} */ (sink), link: /** @type {any} */ (receiveLink) });
  receiver.on('offered', () => receiver.decline('could not save: the service worker did not register'));
  const outcome = await receiver.run().then(() => 'finished', (e) => `${e.code}: ${e.message}`);
  assert.equal(outcome, 'declined: Declined: could not save: the service worker did not register');
  assert.equal(await sent, 'declined: The receiver declined: could not save: the service worker did not register');
  assert.ok(receiver.ended);
  receiver.accept();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(opened, 0, 'no file opened after the end');
});
