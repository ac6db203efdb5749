// Pairing: codes, the SPAKE2 vectors of fixtures/pairing/ byte for byte,
// the SDP MAC, every message form, and the session fixture step by step.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { Code, CodeError, MIN_WORDS } from '../../lib/pair/code.js';
import { WORDS } from '../../lib/pair/words.js';
import { Pairing, PairError, parsePairMsg, passwordScalar } from '../../lib/pair/pake.js';
import { signSdp, verifySdp } from '../../lib/auth.js';
import { toHex, fromHex } from '../../lib/bytes.js';

const fixture = (rel) => JSON.parse(readFileSync(new URL(`../../../fixtures/pairing/${rel}`, import.meta.url), 'utf8'));
const V = fixture('peerlink-pair-v1.json');
const hex = (h) => fromHex(h);

test('the word list is the Rust one, sorted, with unique three-letter prefixes', () => {
  const txt = readFileSync(new URL('../../../crates/pair/src/words.txt', import.meta.url), 'utf8').split('\n').map((w) => w.trim()).filter(Boolean);
  assert.deepEqual([...WORDS], txt);
  assert.equal(WORDS.length, 1296);
  assert.equal(new Set(WORDS.map((w) => w.slice(0, 3))).size, 1296);
  for (let i = 1; i < WORDS.length; i++) assert.ok(WORDS[i - 1] < WORDS[i]);
});

test('codes: generate, parse as people type them, refuse with reasons', () => {
  for (let i = 0; i < 50; i++) {
    const c = Code.generate();
    assert.ok(c.nameplate >= 1 && c.nameplate <= 999);
    assert.equal(Code.parse(c.toString()).toString(), c.toString());
  }
  assert.equal(Code.parse('  7 Lantern-ZEBRA   acid ').toString(), '7-lantern-zebra-acid');
  assert.equal(Code.parse('7-lantern-zebra').room(), 'pair-7');
  const err = (s) => { try { Code.parse(s); } catch (e) { assert.ok(e instanceof CodeError); return e; } assert.fail(`${s} parsed`); };
  assert.equal(err('').code, 'empty');
  assert.equal(err('lantern-zebra').code, 'bad_number');
  assert.equal(err('0-lantern-zebra').code, 'bad_number');
  assert.equal(err('+7-lantern-zebra').code, 'bad_number');
  const few = err('7-lantern');
  assert.equal(few.code, 'too_few_words');
  assert.match(few.message, new RegExp(`at least ${MIN_WORDS} words`));
  const typo = err('7-lantren-zebra');
  assert.equal(typo.code, 'unknown_word');
  assert.equal(typo.suggestion, 'lantern');
  assert.match(typo.message, /did you mean "lantern"/);
});

test('SPAKE2: the published vectors, byte for byte', () => {
  assert.equal(toHex(Uint8Array.from(passwordScalar(V.password_utf8).toString(16).padStart(64, '0').match(/../g).reverse().map((b) => parseInt(b, 16)))), V.pw_scalar_le_hex);
  const a = new Pairing('creator', V.password_utf8, hex(V.rngA_64_hex));
  const b = new Pairing('joiner', V.password_utf8, hex(V.rngB_64_hex));
  assert.deepEqual(a.first(), { type: 'pair_pake', msg: V.msgA_hex });
  assert.deepEqual(b.first(), { type: 'pair_pake', msg: V.msgB_hex });
  assert.equal(toHex(a.sharedKey(hex(V.msgB_hex))), V.spake2_key_hex);
  const confA = a.handle(b.first());
  const confB = b.handle(a.first());
  assert.deepEqual(confA, { type: 'pair_confirm', mac: V.confirmA_hex });
  assert.deepEqual(confB, { type: 'pair_confirm', mac: V.confirmB_hex });
  assert.equal(a.handle(confB), null);
  assert.equal(b.handle(confA), null);
  assert.equal(toHex(a.keys.sdpLocal), V.k_sdp_A_hex);
  assert.equal(toHex(a.keys.sdpRemote), V.k_sdp_B_hex);
  assert.equal(toHex(a.keys.file), V.k_file_hex);
  assert.deepEqual(b.keys.sdpLocal, a.keys.sdpRemote);
});

test('a wrong code fails on both sides at the first try', () => {
  const a = new Pairing('creator', V.password_utf8, hex(V.rngA_64_hex));
  const b = new Pairing('joiner', V.wrong_code_B, hex(V.rngB_64_hex));
  assert.equal(b.first().msg, V.wrong_msgB_hex);
  assert.equal(toHex(a.sharedKey(hex(V.wrong_msgB_hex))), V.wrong_keyA_hex);
  const ca = a.handle(b.first());
  const cb = b.handle(a.first());
  assert.throws(() => a.handle(cb), (e) => e instanceof PairError && e.code === 'wrong_code');
  assert.throws(() => b.handle(ca), (e) => e instanceof PairError && e.code === 'wrong_code');
  assert.equal(a.keys, null);
});

test('malformed, reflected and out-of-order messages are refused', () => {
  const code = Code.generate();
  const [a, first] = Pairing.start('creator', code);
  assert.throws(() => a.handle(first), /reflected/);
  const [a2] = Pairing.start('creator', code);
  assert.throws(() => a2.handle({ type: 'pair_confirm', mac: '00'.repeat(32) }), /before the pake/);
  assert.throws(() => a2.handle({ type: 'pair_pake', msg: 'zz' }), /not hex/);
  const [, otherCreator] = Pairing.start('creator', code);
  assert.throws(() => a2.handle(otherCreator), /wrong side/);
  assert.throws(() => a2.handle({ type: 'pair_abort', reason: 'bye' }), (e) => e.code === 'aborted');
});

test('the SDP MAC of the vector, and any change is caught', async () => {
  const auth = await signSdp(hex(V.k_sdp_A_hex), 'offer', 0, V.sdp_example);
  assert.deepEqual(auth, { seq: 0, mac: V.sdp_tag_A_offer_seq0_hex });
  const key = hex(V.k_sdp_A_hex);
  assert.equal(await verifySdp(key, 'offer', V.sdp_example, auth), true);
  assert.equal(await verifySdp(key, 'offer', V.sdp_example.replace('AB:CD', 'AB:CE'), auth), false);
  assert.equal(await verifySdp(key, 'answer', V.sdp_example, auth), false);
  assert.equal(await verifySdp(key, 'offer', V.sdp_example, { ...auth, seq: 1 }), false);
  assert.equal(await verifySdp(hex(V.k_sdp_B_hex), 'offer', V.sdp_example, auth), false);
  assert.equal(await verifySdp(key, 'offer', V.sdp_example, { seq: 0, mac: 'zz'.repeat(32) }), false);
});

test('every message form of fixtures/pairing/messages.json', () => {
  const m = fixture('messages.json');
  for (const { name, json } of m.messages) {
    assert.deepEqual(parsePairMsg(json), json, name);
  }
  assert.equal(parsePairMsg(m.unknown_code.json).code, 'from_the_future');
  for (const n of m.not_pairing) assert.equal(parsePairMsg(n), null, JSON.stringify(n));
});
