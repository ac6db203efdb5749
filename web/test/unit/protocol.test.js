// fixtures/protocol/: every server message parses and writes back byte for
// byte; every client message the library builds is the fixture's bytes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';

import { parseServerMsg, parseSignal, validRoom, PROTOCOL_VERSION, ERROR_CODES, FATAL_CODES } from '../../lib/protocol.js';
import { signalingUrl } from '../../lib/signaling.js';

const dir = new URL('../../../fixtures/protocol/', import.meta.url);
const read = (rel) => readFileSync(new URL(rel, dir), 'utf8').trimEnd();
const sdp = (n, m) => `v=0\r\no=- ${n} ${m} IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n`;

test('every server fixture parses and writes back byte for byte', () => {
  const files = readdirSync(new URL('server/', dir));
  assert.ok(files.length >= 9);
  for (const f of files) {
    const wire = read(`server/${f}`);
    const msg = parseServerMsg(wire);
    assert.notEqual(msg.type, 'unknown', f);
    assert.equal(JSON.stringify(msg), wire, f);
    if (msg.type === 'error') assert.ok(ERROR_CODES.includes(msg.code), `${f}: ${msg.code} is a known code`);
  }
});

test('the client messages the library sends are the fixtures', () => {
  const expected = {
    'hello.json': { type: 'hello', version: PROTOCOL_VERSION, client: 'peerlink-cli/0.1.0' },
    'hello_resume.json': { type: 'hello', version: PROTOCOL_VERSION, client: 'peerlink-cli/0.1.0', resume: 'p-9b71e0aa.1767225600.Qm9ndXMgTUFDIGZvciB0aGUgZml4dHVyZSBvbmx5IQ' },
    'join.json': { type: 'join', room: 'lobby', name: 'ada' },
    'join_token.json': { type: 'join', room: 'lobby', name: 'ada', token: 'eyJyb29tIjoibG9iYnkiLCJuYW1lIjoiYWRhIiwiZXhwIjoxNzY3MjI1NjAwfQ.y3_4jLKoyBDRSULMcDf_klyNETm9LxrvKkYHM-h_4q0' },
    'leave.json': { type: 'leave', room: 'lobby' },
    'ping.json': { type: 'ping', nonce: 42 },
    'send_one.json': { type: 'send', room: 'lobby', to: 'p-4f2a9c1d', data: { type: 'hello', name: 'ada' } },
    'send_room.json': { type: 'send', room: 'lobby', data: 'hi all' },
    'signal_offer.json': { type: 'signal', room: 'lobby', to: 'p-4f2a9c1d', signal: { kind: 'offer', sdp: sdp(1, 2) } },
    'signal_answer.json': { type: 'signal', room: 'lobby', to: 'p-4f2a9c1d', signal: { kind: 'answer', sdp: sdp(3, 4) } },
    'signal_candidate.json': { type: 'signal', room: 'lobby', to: 'p-4f2a9c1d', signal: { kind: 'candidate', candidate: 'candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host', mid: '0' } },
    'signal_end_of_candidates.json': { type: 'signal', room: 'lobby', to: 'p-4f2a9c1d', signal: { kind: 'end_of_candidates' } },
    'signal_offer_auth.json': { type: 'signal', room: 'lobby', to: 'p-4f2a9c1d', signal: { kind: 'offer', sdp: 'v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\na=fingerprint:sha-256 AB:CD\r\n', auth: { seq: 0, mac: '8eaad41fefd4d5a4bddceba19ea55c8605da1cb3522c23b282dcabb7c9e90965' } } },
  };
  const files = readdirSync(new URL('client/', dir));
  assert.deepEqual(files.sort(), Object.keys(expected).sort(), 'every client fixture is checked');
  for (const [f, msg] of Object.entries(expected)) {
    assert.equal(JSON.stringify(msg), read(`client/${f}`), f);
    if (msg.type === 'signal') assert.deepEqual(parseSignal(msg.signal), msg.signal);
  }
});

test('what a newer server may send is tolerated', () => {
  assert.deepEqual(parseServerMsg('{"type":"teleported","x":1}'), { type: 'unknown' });
  assert.deepEqual(parseSignal({ kind: 'quantum', x: 1 }), { kind: 'unknown' });
  assert.equal(parseServerMsg('{"type":"error","code":"new_code","message":"m"}').code, 'new_code');
  assert.equal(parseServerMsg('{"type":"left","room":"r","extra":true}').type, 'left');
  assert.throws(() => parseServerMsg('[1]'));
  assert.throws(() => parseServerMsg('{"type":"joined","room":"r"}'));
  assert.ok(FATAL_CODES.every((c) => ERROR_CODES.includes(c)));
});

test('room names and server addresses as people type them', () => {
  assert.ok(validRoom('lobby') && validRoom('a.b-c_9') && !validRoom('') && !validRoom('a b') && !validRoom('x'.repeat(65)));
  for (const [typed, url] of [
    ['ws://127.0.0.1:8080/ws', 'ws://127.0.0.1:8080/ws'], ['ws://127.0.0.1:8080', 'ws://127.0.0.1:8080/ws'],
    ['http://192.0.2.7:8080', 'ws://192.0.2.7:8080/ws'], ['https://peer.example/', 'wss://peer.example/ws'],
    ['192.0.2.7:8080', 'ws://192.0.2.7:8080/ws'], ['wss://peer.example/signal/ws', 'wss://peer.example/signal/ws'],
  ]) assert.equal(signalingUrl(typed), url, typed);
});
