// The library's channels in real Chromium data channels: a bounded send
// queue with a typed overflow error, backpressure that waits instead of
// dropping, and everything that was accepted delivered in order.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setup } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});

/** Joins `room` in the page with the library alone; resolves with the first channel's label. */
const join = async (/** @type {any} */ o) => {
  const { Room } = await import('/lib/room.js');
  const w = /** @type {any} */ (window);
  w.room = new Room({ server: o.server, room: o.room, channels: [{ label: 'bulk', reliability: 'reliable' }], channelOptions: o.channelOptions });
  w.got = [];
  w.ch = await new Promise((ok) => {
    w.room.on('channel_open', (/** @type {any} */ c) => {
      c.on('message', (/** @type {any} */ m) => w.got.push(typeof m === 'string' ? m : `bin:${m.byteLength}`));
      ok(c);
    });
    w.room.join();
  });
  return w.ch.label;
};

test('a full send queue refuses with ChannelOverflowError, ready() waits, and what was accepted arrives in order', async () => {
  const a = await chrome.page(`${server.url}/`);
  const b = await chrome.page(`${server.url}/`);
  const options = { maxBufferedAmount: 64 * 1024, maxQueuedSends: 8, maxQueuedBytes: 1 << 20 };
  const joined = Promise.all([
    a.evaluate(join, { server: server.url, room: 'bp', channelOptions: options }),
    b.evaluate(join, { server: server.url, room: 'bp', channelOptions: options }),
  ]);
  assert.deepEqual(await joined, ['bulk', 'bulk']);

  const result = await a.evaluate(async () => {
    const { ChannelOverflowError } = await import('/lib/channel.js');
    const ch = /** @type {any} */ (window).ch;
    const big = new Uint8Array(32 * 1024);
    // Synchronous sends until the queue refuses: the browser takes 64 KiB,
    // then 8 messages wait here.
    let accepted = 0;
    /** @type {any} */
    let refused = null;
    for (let i = 0; i < 1000 && !refused; i++) {
      try {
        ch.trySend(big);
        accepted++;
      } catch (e) {
        refused = e;
      }
    }
    const overflow = refused instanceof ChannelOverflowError && refused.code === 'overflow';
    // A producer that must not drop: wait for room, then send, 200 more.
    for (let i = 0; i < 200; i++) {
      await ch.ready(big.byteLength);
      await ch.send(`seq:${i}`);
    }
    await ch.flush();
    return { accepted, overflow, message: String(refused?.message) };
  });
  assert.ok(result.overflow, result.message);
  assert.match(result.message, /send queue full/);
  // At most the browser's share plus the queue went through trySend.
  assert.ok(result.accepted >= 8 && result.accepted <= 2 + 8, `${result.accepted} accepted`);

  await b.waitForFunction((n) => /** @type {any} */ (window).got.length === n, result.accepted + 200, { timeout: 30_000 });
  const got = await b.evaluate(() => /** @type {any} */ (window).got);
  assert.deepEqual(got.slice(0, result.accepted), Array(result.accepted).fill(`bin:${32 * 1024}`));
  assert.deepEqual(got.slice(result.accepted), Array.from({ length: 200 }, (_, i) => `seq:${i}`));

  // A message above the other side's maximum is refused with its own code.
  const tooLarge = await a.evaluate(async () => {
    const ch = /** @type {any} */ (window).ch;
    return ch.send(new Uint8Array(ch.maxMessageSize + 1)).then(() => 'sent', (/** @type {any} */ e) => e.code);
  });
  assert.equal(tooLarge, 'too_large');
  await a.close();
  await b.close();
});

test('a tab that sends and leaves at once: everything it queued arrives before the other sees it go', async () => {
  const a = await chrome.page(`${server.url}/`);
  const b = await chrome.page(`${server.url}/`);
  const options = { maxBufferedAmount: 64 * 1024, maxQueuedSends: 1000, maxQueuedBytes: 4 << 20 };
  await Promise.all([
    a.evaluate(join, { server: server.url, room: 'leave', channelOptions: options }),
    b.evaluate(join, { server: server.url, room: 'leave', channelOptions: options }),
  ]);
  await b.evaluate(() => {
    const w = /** @type {any} */ (window);
    w.room.on('peer_left', () => (w.gotAtLeave = w.got.length));
  });
  // 2 MiB queued: most of it still waits in the library's queue when
  // leave() is called.
  const n = await a.evaluate(async () => {
    const w = /** @type {any} */ (window);
    const part = new Uint8Array(16 * 1024);
    let n = 0;
    for (; n < 128; n++) w.ch.trySend(part);
    await w.room.leave();
    return n;
  });
  await b.waitForFunction(() => /** @type {any} */ (window).gotAtLeave !== undefined, null, { timeout: 20_000 });
  const { got, gotAtLeave } = await b.evaluate(() => ({ got: /** @type {any} */ (window).got, gotAtLeave: /** @type {any} */ (window).gotAtLeave }));
  assert.equal(gotAtLeave, n, 'every message arrived before peer_left');
  assert.deepEqual(got, Array(n).fill(`bin:${16 * 1024}`));
  await a.close();
  await b.close();
});
