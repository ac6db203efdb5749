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
  // Came the slow way (through the server, after a later one on the
  // signaling channel), or replayed: ignored, not fatal.
  assert.equal(await conn._checkAuth('answer', sdp, await signSdp(theirs, 'answer', 4, sdp)), 'stale');
  assert.equal(await conn._checkAuth('offer', sdp, await signSdp(theirs, 'offer', 5, sdp)), 'stale');
  const forged = { seq: 6, mac: '00'.repeat(32) };
  assert.match(await conn._checkAuth('offer', sdp, forged), /modified in transit/);
  clearTimeout(conn.connectTimer);
});
