// A stand-in for RTCPeerConnection in unit tests of the room (no WebRTC in
// Node): the signaling states of the W3C API, the descriptions and
// candidates it was given, data channels that never open.

export class FakePC {
  constructor(/** @type {any} */ config = {}) {
    /** @type {any} */
    this.config = config;
    this.signalingState = 'stable';
    /** @type {any} */
    this.remoteDescription = null;
    /** @type {any} */
    this.localDescription = null;
    this.connectionState = 'new';
    this.sctp = null;
    /** @type {any[]} remote descriptions set, in order */
    this.remotes = [];
    /** @type {any[]} candidates added */
    this.added = [];
    /** @type {string[]} labels of the channels created */
    this.labels = [];
    /** @type {any} */
    this.ontrack = null;
  }

  createDataChannel(/** @type {string} */ label) {
    this.labels.push(label);
    const dc = new EventTarget();
    return Object.assign(dc, {
      label, readyState: 'connecting', bufferedAmount: 0, maxRetransmits: null, maxPacketLifeTime: null,
      send() {}, close() { dc.readyState = 'closed'; },
    });
  }

  async setRemoteDescription(/** @type {any} */ d) {
    this.remoteDescription = d;
    this.remotes.push(d);
    this.signalingState = d.type === 'offer' ? 'have-remote-offer' : 'stable';
  }

  async setLocalDescription() {
    const type = this.signalingState === 'have-remote-offer' ? 'answer' : 'offer';
    this.localDescription = { type, sdp: this.localSdp(type) };
    this.signalingState = type === 'answer' ? 'stable' : 'have-local-offer';
  }

  /** The SDP text of our offer or answer. @param {'offer' | 'answer'} type */
  localSdp(type) {
    return `v=0 ${type}`;
  }

  async addIceCandidate(/** @type {any} */ c) { this.added.push(c); }
  getConfiguration() { return { ...this.config }; }
  setConfiguration(/** @type {any} */ c) { this.config = c; }
  restartIce() {}
  close() {}
}
