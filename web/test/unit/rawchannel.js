// A stand-in for RTCDataChannel in unit tests (no WebRTC in Node): what the
// browser took (copied, as it copies) counts in `bufferedAmount` until the
// test says it went on the wire, and the low-threshold event fires as
// Chromium fires it.

export class RawChannel extends EventTarget {
  constructor(label = 'x') {
    super();
    this.label = label;
    this.readyState = 'open';
    this.bufferedAmount = 0;
    this.bufferedAmountLowThreshold = 0;
    this.ordered = true;
    this.maxRetransmits = null;
    this.maxPacketLifeTime = null;
    /** @type {Uint8Array[]} what the browser took, copied as it copies */
    this.sent = [];
  }
  send(/** @type {any} */ d) {
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
