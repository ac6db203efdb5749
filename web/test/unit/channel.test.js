// The browser Channel's backpressure (lib/channel.js) on a stand-in for
// RTCDataChannel that counts what the browser holds, as Chromium does.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Channel } from '../../lib/channel.js';
import { RawChannel } from './rawchannel.js';


test('room() waits for the browser to have room; sendNow hands a reused buffer over or says no, never queues', async () => {
  const raw = new RawChannel();
  const ch = new Channel(/** @type {any} */ (raw), 'p', { maxBufferedAmount: 1000, maxMessageSize: 400 });
  const buf = new Uint8Array(400);
  buf.fill(1);
  await ch.room(400);
  assert.equal(ch.sendNow(buf), true);
  buf.fill(2); // reused at once: what was handed over is unchanged
  assert.equal(ch.sendNow(buf), true);
  assert.equal(raw.sent[0][0], 1);
  assert.equal(raw.bufferedAmount, 800);
  assert.equal(ch.sendNow(buf), false, 'no room: not sent');
  assert.equal(raw.sent.length, 2);
  assert.equal(ch.queuedBytes, 0, 'and nothing queued');
  let ready = false;
  const waiting = ch.room(400).then(() => { ready = true; });
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(ready, false);
  raw.drain(600); // down to the low threshold (250): room again
  await waiting;
  assert.equal(ch.sendNow(buf), true);
  // Something queued goes first: no room until it has gone.
  await ch.send(new Uint8Array(400)); // fits: 600 buffered
  const queued = ch.send(new Uint8Array(400)); // queued behind the browser's buffer
  assert.equal(ch.sendNow(buf), false);
  raw.drain(1000);
  await queued;
  assert.throws(() => ch.sendNow(new Uint8Array(500)), /exceeds the negotiated maximum/);
  raw.close();
  await assert.rejects(ch.room(1), /closed/);
});

test('a queued message larger than the room left at the low threshold goes when the buffer falls to it', async () => {
  const raw = new RawChannel();
  // The low threshold is a quarter of the browser's buffer: 250 bytes.
  const ch = new Channel(/** @type {any} */ (raw), 'p', { maxBufferedAmount: 1000, maxMessageSize: 900 });
  await ch.send(new Uint8Array(900));
  const second = ch.send(new Uint8Array(900)).then(() => 'sent');
  assert.equal(ch.queuedBytes, 900, 'queued behind the browser\'s buffer');
  raw.drain(700); // 200 left: the one bufferedamountlow event
  const outcome = await Promise.race([second, new Promise((r) => setTimeout(() => r('still queued'), 50))]);
  assert.equal(outcome, 'sent');
  assert.equal(raw.sent.length, 2);
  assert.equal(ch.queuedBytes, 0);
  // A reused buffer's sender too: room for it once the buffer is down to
  // the threshold (1,100 held, 850 sent).
  const room = ch.room(900);
  raw.drain(850);
  await room;
  assert.equal(ch.sendNow(new Uint8Array(900)), true);
});

test('close() refuses new sends, still hands over what was queued, then closes the channel', async () => {
  const raw = new RawChannel();
  let closeCalls = 0;
  const rawClose = raw.close.bind(raw);
  raw.close = () => { closeCalls++; rawClose(); };
  const ch = new Channel(/** @type {any} */ (raw), 'p', { maxBufferedAmount: 1000, maxMessageSize: 400 });
  let closed = false;
  ch.on('close', () => { closed = true; });
  await ch.send(new Uint8Array(400).fill(1));
  await ch.send(new Uint8Array(400).fill(2));
  const queued = [ch.send(new Uint8Array(400).fill(3)), ch.send(new Uint8Array(400).fill(4))];
  assert.equal(ch.queuedBytes, 800);
  ch.close();
  assert.equal(ch.isClosed, true);
  await assert.rejects(ch.send(new Uint8Array(1)), /closed/);
  assert.equal(closeCalls, 0, 'not closed while messages wait');
  raw.drain(1000);
  await Promise.all(queued);
  assert.deepEqual(raw.sent.map((m) => m[0]), [1, 2, 3, 4], 'everything queued went, in order');
  assert.equal(closeCalls, 1);
  assert.equal(closed, true);
  ch.close();
  assert.equal(closeCalls, 1, 'once');
});

test('close() on a channel whose queue does not go closes it anyway after closeDrainMs, failing what waited', async () => {
  const raw = new RawChannel();
  const ch = new Channel(/** @type {any} */ (raw), 'p', { maxBufferedAmount: 1000, maxMessageSize: 400, closeDrainMs: 50 });
  await ch.send(new Uint8Array(400));
  await ch.send(new Uint8Array(400));
  const stuck = ch.send(new Uint8Array(400));
  ch.close();
  assert.equal(raw.readyState, 'open', 'waits for the queue first');
  await assert.rejects(stuck, /closed/);
  assert.equal(raw.readyState, 'closed');
});
