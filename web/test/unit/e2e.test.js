// End-to-end encrypted rooms: the browser library against the vectors in
// fixtures/rooms/e2e.json (made with Python; crates/peer/src/e2e.rs checks
// the same), and the room's wiring: every connection authenticated with
// keys from the secret, server-routed messages sealed and opened.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { RoomSecret, OpenError, SEALED_KEY, REFUSED_KEY, safetyNumber, sdpFingerprint, newRoomSecret } from '../../lib/e2e.js';
import { signSdp, verifySdp } from '../../lib/auth.js';
import { toHex, fromHex } from '../../lib/bytes.js';
import { Room } from '../../lib/room.js';
import { FakePC } from './fakepc.js';

const v = JSON.parse(readFileSync(new URL('../../../fixtures/rooms/e2e.json', import.meta.url), 'utf8'));

test('e2e: keys and SDP tags match the vectors', async () => {
  const s = new RoomSecret(v.secret, v.room);
  const ka = s.signalKeys(v.a, v.b);
  const kb = s.signalKeys(v.b, v.a);
  assert.equal(toHex(ka.local), v.k_sdp_a_to_b_hex);
  assert.equal(toHex(ka.remote), v.k_sdp_b_to_a_hex);
  assert.deepEqual([kb.local, kb.remote], [ka.remote, ka.local]);
  assert.equal(toHex(new RoomSecret(v.secret, 'other').signalKeys(v.a, v.b).local), v.k_sdp_a_to_b_in_room_other_hex);
  assert.equal(toHex(s.sendKey), v.k_send_hex);
  const tag = await signSdp(ka.local, 'offer', 0, v.sdp_example);
  assert.equal(tag.mac, v.sdp_tag_a_offer_seq0_hex);
  assert.equal((await signSdp(kb.local, 'answer', 3, v.sdp_example)).mac, v.sdp_tag_b_answer_seq3_hex);
  assert.ok(await verifySdp(kb.remote, 'offer', v.sdp_example, tag));
  const wrong = new RoomSecret('another secret, as long', v.room).signalKeys(v.b, v.a);
  assert.ok(!(await verifySdp(wrong.remote, 'offer', v.sdp_example, tag)));
});

test('e2e: a sealed message matches the vector; anything else is refused', async () => {
  const s = new RoomSecret(v.secret, v.room);
  const m = v.send_from_a_to_b;
  assert.equal(toHex(s.aad(v.a, v.b)), m.aad_hex);
  assert.deepEqual(await s.seal(v.a, v.b, m.data, /** @type {Uint8Array} */ (fromHex(m.nonce_hex))), m.sealed);
  assert.deepEqual(await s.open(v.a, v.b, m.sealed), m.data);
  const [x, y] = [await s.seal(v.a, v.b, m.data), await s.seal(v.a, v.b, m.data)];
  assert.notDeepEqual(x, y, 'random nonces');
  assert.deepEqual(await s.open(v.a, v.b, y), m.data);
  /** @param {Promise<unknown>} p @param {string} code */
  const refused = (p, code) => assert.rejects(p, (e) => e instanceof OpenError && e.code === code);
  await refused(s.open(v.b, v.a, m.sealed), 'forged');
  await refused(new RoomSecret(v.secret, 'other').open(v.a, v.b, m.sealed), 'forged');
  await refused(new RoomSecret('nope, not this one either', v.room).open(v.a, v.b, m.sealed), 'forged');
  const text = m.sealed[SEALED_KEY];
  await refused(s.open(v.a, v.b, { [SEALED_KEY]: `${text.slice(0, -1)}${text.endsWith('A') ? 'B' : 'A'}` }), 'forged');
  await refused(s.open(v.a, v.b, m.data), 'not_sealed');
  await refused(s.open(v.a, v.b, { [SEALED_KEY]: 'AAAA' }), 'forged');
  await refused(s.open(v.a, v.b, { [SEALED_KEY]: '!!' }), 'forged');
  assert.equal(typeof v.refused_example[REFUSED_KEY], 'string');
});

test('e2e: safety numbers match the vector at both ends; new secrets are 22 characters', () => {
  assert.equal(safetyNumber(v.fingerprint_a, v.fingerprint_b), v.safety_number);
  assert.equal(safetyNumber(v.fingerprint_b, v.fingerprint_a), v.safety_number);
  assert.equal(sdpFingerprint(v.sdp_example), v.fingerprint_a);
  assert.match(newRoomSecret(), /^[A-Za-z0-9_-]{22}$/);
  assert.throws(() => new RoomSecret('short', 'r'), /at least 16 characters/);
  assert.notEqual(newRoomSecret(), newRoomSecret());
});

test('e2e room: connections carry the secret\'s keys; server-routed messages go sealed and come back opened, in order; unsealed ones are refused', async () => {
  const room = new Room({ server: '127.0.0.1:9', room: v.room, roomSecret: v.secret, RTCPeerConnection: /** @type {any} */ (FakePC) });
  room.id = v.a;
  /** @type {any[]} */
  const wire = [];
  room.signaling.send = (/** @type {any} */ m) => { wire.push(m); return true; };
  room._memberJoined(v.b, null, true);
  const conn = /** @type {any} */ (room.conns.get(v.b));
  assert.equal(toHex(conn.keys.local), v.k_sdp_a_to_b_hex);
  assert.equal(toHex(conn.keys.remote), v.k_sdp_b_to_a_hex);

  await room.sendViaServer(v.b, { to: 'b' });
  await room.sendViaServer(null, { to: 'everyone' });
  assert.equal(wire.length, 2);
  assert.equal(wire[0].to, v.b);
  for (const m of wire) assert.deepEqual(Object.keys(m.data), [SEALED_KEY]);
  assert.ok(!JSON.stringify(wire).includes('everyone'));
  const bs = new RoomSecret(v.secret, v.room);
  assert.deepEqual(await bs.open(v.a, v.b, wire[0].data), { to: 'b' });
  assert.deepEqual(await bs.open(v.a, '*', wire[1].data), { to: 'everyone' });

  /** @type {unknown[]} */
  const got = [];
  /** @type {string[]} */
  const refused = [];
  room.on('server_message', ({ data }) => got.push(data));
  room.on('server_message_refused', ({ from, reason }) => refused.push(`${from}: ${reason}`));
  for (let i = 0; i < 5; i++) room._onServer({ type: 'message', from: v.b, data: await bs.seal(v.b, i % 2 ? v.a : '*', { i }) });
  room._onServer({ type: 'message', from: v.b, data: { plain: true } });
  room._onServer({ type: 'message', from: 'p-other', data: await bs.seal(v.b, v.a, { spoofed: true }) });
  await room._opening;
  assert.deepEqual(got, [0, 1, 2, 3, 4].map((i) => ({ i })));
  assert.equal(refused.length, 2);
  assert.match(refused[0], /not sealed/);
  assert.match(refused[1], /^p-other: .*does not open/);

  // A member that refused our signaling says so, sealed: the connection fails, with why.
  /** @type {string[]} */
  const failed = [];
  room.on('auth_failed', ({ peer, reason }) => failed.push(`${peer}: ${reason}`));
  room._onServer({ type: 'message', from: v.b, data: await bs.seal(v.b, v.a, { [REFUSED_KEY]: 'the offer was modified in transit' }) });
  await room._opening;
  assert.deepEqual(failed, [`${v.b}: it refused our signaling: the offer was modified in transit`]);
  assert.equal(conn.state, 'failed');
  assert.equal(got.length, 5, 'not delivered as an application message');
});
