// Sealed channels: the browser library against fixtures/rooms/sealed.json
// (made with Python's `cryptography`; crates/peer/src/sealed.rs checks the
// same), and a sealed channel over a pair of linked channels.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { Sealer, SealedChannel, SealError } from '../../lib/sealed.js';
import { Emitter } from '../../lib/events.js';
import { toHex, fromHex } from '../../lib/bytes.js';

const v = JSON.parse(readFileSync(new URL('../../../fixtures/rooms/sealed.json', import.meta.url), 'utf8'));

/** base64url of hex. @param {string} hex */
const b64 = (hex) => Buffer.from(hex, 'hex').toString('base64url');

/** A JWK for the fixture's private key `d` with public key `pub`. @param {string} d @param {string} pub */
const jwk = (d, pub) => ({ kty: 'EC', crv: 'P-256', d: b64(d), x: b64(pub.slice(2, 66)), y: b64(pub.slice(66)), ext: true });

async function pair() {
  const a = await Sealer.create(v.label, v.fingerprint_a, v.fingerprint_b, jwk(v.a_private_hex, v.a_public_hex));
  const b = await Sealer.create(v.label, v.fingerprint_b, v.fingerprint_a, jwk(v.b_private_hex, v.b_public_hex));
  return { a, b };
}

const hex = (/** @type {string} */ h) => /** @type {Uint8Array} */ (fromHex(h));

test('sealed: the wire matches the vectors both ways; replays and reordering are refused', async () => {
  const { a, b } = await pair();
  assert.equal(toHex(a.hello()), v.a_hello_hex);
  assert.equal(a.isReady, false);
  await a.handleHello(b.hello());
  await b.handleHello(a.hello());
  const text = await a.seal(v.a_text_seq0.text);
  assert.equal(toHex(text), v.a_text_seq0.wire_hex);
  const bytes = await a.seal(hex(v.a_binary_seq1.bytes_hex));
  assert.equal(toHex(bytes), v.a_binary_seq1.wire_hex);
  assert.equal(toHex(await b.seal('and back')), v.b_text_seq0.wire_hex);
  assert.equal(await b.open(text), 'hello, sealed');
  assert.deepEqual(await b.open(bytes), hex('00ff10'));
  assert.equal(await a.open(hex(v.b_text_seq0.wire_hex)), 'and back');
  // Replayed: refused, and nothing after it opens.
  await assert.rejects(a.open(hex(v.b_text_seq0.wire_hex)), (e) => e instanceof SealError && e.code === 'forged');
  await assert.rejects(a.open(await b.seal('next')), (e) => e instanceof SealError && e.code === 'forged');
  // Reordered (the second before the first), or one missing: refused.
  const { a: x, b: y } = await pair();
  await x.handleHello(y.hello());
  await y.handleHello(x.hello());
  await x.seal('1');
  await assert.rejects(y.open(await x.seal('2')), (e) => e instanceof SealError && e.code === 'forged');
});

test('sealed: another DTLS session, a flipped bit, a cut message or a hello that is not a key do not open', async () => {
  const wire = hex(v.a_text_seq0.wire_hex);
  const { a } = await pair();
  const other = await Sealer.create(v.label, v.fingerprint_b, 'sha-256 00:11', jwk(v.b_private_hex, v.b_public_hex));
  await other.handleHello(a.hello());
  await assert.rejects(other.open(wire), (e) => e instanceof SealError && e.code === 'forged');
  const { a: a2, b } = await pair();
  await b.handleHello(a2.hello());
  const flipped = wire.slice();
  flipped[flipped.length - 1] ^= 1;
  await assert.rejects(b.open(flipped), (e) => e instanceof SealError && e.code === 'forged');
  await assert.rejects(b.open(wire.slice(0, 20)), (e) => e instanceof SealError && e.code === 'forged');
  await assert.rejects(b.handleHello(new Uint8Array([1, 4, 1, 2])), (e) => e instanceof SealError && e.code === 'bad_hello');
  const junk = new Uint8Array(66);
  junk[0] = 1;
  await assert.rejects(b.handleHello(junk), (e) => e instanceof SealError && e.code === 'bad_hello');
});

/** Two channels wired to each other, as a connection's two ends see one channel. */
function linked() {
  /** @param {string} label */
  const end = (label) => Object.assign(new Emitter(), { label, peer: 'p', other: /** @type {any} */ (null), sent: /** @type {Uint8Array[]} */ ([]),
    async send(/** @type {Uint8Array} */ m) { this.sent.push(m); queueMicrotask(() => this.other.emit('message', m)); } });
  const x = end('notes');
  const y = end('notes');
  x.other = y;
  y.other = x;
  return [x, y];
}

test('sealed channel: fresh keys agreed over the channel; text and bytes arrive in order, ciphertext on the wire; a changed message is an error', async () => {
  const [x, y] = linked();
  const [sx, sy] = await Promise.all([
    SealedChannel.open(/** @type {any} */ (x), v.fingerprint_a, v.fingerprint_b),
    SealedChannel.open(/** @type {any} */ (y), v.fingerprint_b, v.fingerprint_a),
  ]);
  /** @type {unknown[]} */
  const got = [];
  sy.on('message', (m) => got.push(m));
  for (let i = 0; i < 20; i++) void sx.send(i % 2 ? new Uint8Array([i]) : `line ${i}`);
  await sx.send('last');
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(got.length, 21);
  assert.equal(got[0], 'line 0');
  assert.deepEqual(got[1], new Uint8Array([1]));
  assert.equal(got[20], 'last');
  assert.ok(!Buffer.concat(x.sent).toString('latin1').includes('line'), 'no plaintext on the channel');
  /** @type {SealError[]} */
  const errors = [];
  sy.on('error', (e) => errors.push(e));
  const tampered = (await sx.sealer.seal('x')).slice();
  tampered[tampered.length - 1] ^= 1;
  y.emit('message', tampered);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(errors[0]?.code, 'forged');
});

test('sealed channel: a message the channel refuses leaves no gap; the next one opens', async () => {
  const [x, y] = linked();
  const [sx, sy] = await Promise.all([
    SealedChannel.open(/** @type {any} */ (x), v.fingerprint_a, v.fingerprint_b),
    SealedChannel.open(/** @type {any} */ (y), v.fingerprint_b, v.fingerprint_a),
  ]);
  // The channel refuses what is over its maximum, as Channel.send does.
  const send = x.send.bind(x);
  x.send = async (/** @type {Uint8Array} */ m) => {
    if (m.byteLength > 100) throw Object.assign(new Error('too large'), { code: 'too_large' });
    return send(m);
  };
  /** @type {unknown[]} */
  const got = [];
  /** @type {SealError[]} */
  const errors = [];
  sy.on('message', (m) => got.push(m));
  sy.on('error', (e) => errors.push(e));
  await sx.send('first');
  await assert.rejects(sx.send(new Uint8Array(200)), (e) => /** @type {any} */ (e).code === 'too_large');
  await sx.send('after a refused one');
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(errors.map((e) => e.code), []);
  assert.deepEqual(got, ['first', 'after a refused one']);
});

test('sealed channel: no key from the other side within the timeout', async () => {
  const [x] = linked();
  x.other = new Emitter(); // nobody answers
  await assert.rejects(SealedChannel.open(/** @type {any} */ (x), v.fingerprint_a, v.fingerprint_b, { timeoutMs: 50 }), (e) => e instanceof SealError && e.code === 'timeout');
  // It stopped listening: a second try gets the next message as its key.
  const again = SealedChannel.open(/** @type {any} */ (x), v.fingerprint_a, v.fingerprint_b, { timeoutMs: 50 });
  x.emit('message', new Uint8Array([9]));
  await assert.rejects(again, (e) => e instanceof SealError && e.code === 'bad_hello');
});
