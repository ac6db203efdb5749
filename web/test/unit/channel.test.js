// The browser Channel's backpressure (lib/channel.js) on a stand-in for
// RTCDataChannel that counts what the browser holds, as Chromium does.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Channel } from '../../lib/channel.js';

class RawChannel extends EventTarget {
  constructor() {
    super();
    this.label = 'x';
    this.readyState = 'open';
    this.bufferedAmount = 0;
    this.bufferedAmountLowThreshold = 0;
    this.ordered = true;
    this.maxRetransmits = null;
    this.maxPacketLifeTime = null;
    /** @type {Uint8Array[]} what the browser took, copied as it copies */
    this.sent = [];
  }
  send(/** @type {Uint8Array} */ d) {
    this.sent.push(d.slice());
    this.bufferedAmount += d.byteLength;
  }
  /** The browser sends `n` bytes on the wire. @param {number} n */
  drain(n) {
    const before = this.bufferedAmount;
    this.bufferedAmount = Math.max(0, before - n);
    if (before > this.bufferedAmountLowThreshold && this.bufferedAmount <= this.bufferedAmountLowThreshold) this.dispatchEvent(new Event('bufferedamountlow'));
  }
  close() { this.readyState = 'closed'; this.dispatchEvent(new Event('close')); }
}

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
