// The transfer engine: every fixture of fixtures/transfer/ byte for byte,
// the manifest rules, and sender ↔ receiver in memory (round trips, resume,
// corruption, bounds, random input), mirroring crates/transfer/tests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';

import { parseCtl, ctlJson, encodeFrame, encodeFrameInto, decodeFrame, frames, FRAME_HEADER } from '../../lib/transfer/wire.js';
import { Manifest, parseRelPath, validateEntry, fileEntry, dirEntry, textEntry, MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, MAX_CTL_BYTES, MAX_CHUNKS, chunkSizeFor } from '../../lib/transfer/manifest.js';
import { chunkHash, fileHash, hashesToHex, toHex } from '../../lib/transfer/hash.js';
import { Sender } from '../../lib/transfer/sender.js';
import { Receiver, HASHES_AHEAD_OF_DATA } from '../../lib/transfer/receiver.js';
import { ProtocolError, PathError } from '../../lib/transfer/errors.js';
import { fromHex } from '../../lib/bytes.js';

const root = new URL('../../../fixtures/transfer/', import.meta.url);
const read = (rel) => readFileSync(new URL(rel, root), 'utf8');
const enc = (s) => new TextEncoder().encode(s);

test('every control message fixture parses and writes back byte for byte', () => {
  const files = readdirSync(new URL('ctl/', root)).filter((f) => f.endsWith('.json'));
  assert.equal(files.length, 10);
  for (const f of files) {
    const wire = read(`ctl/${f}`).trimEnd();
    const msg = parseCtl(wire);
    assert.equal(msg.type, f.replace('.json', ''));
    assert.equal(ctlJson(msg), wire, f);
  }
  const h = parseCtl(read('ctl/hashes.json'));
  assert.equal(h.hashes, hashesToHex([chunkHash(enc('a')), chunkHash(new Uint8Array(0))]));
});

test('the fixture manifest is what a sender announces', () => {
  const part = parseCtl(read('ctl/manifest_part.json'));
  const m = new Manifest(DEFAULT_CHUNK_SIZE, part.entries.map(validateEntry));
  assert.deepEqual(m.toCtlMessages().map(ctlJson), ['manifest', 'manifest_part', 'manifest_end'].map((n) => read(`ctl/${n}.json`).trimEnd()));
});

test('data frames and file hashes of the fixtures', () => {
  const fx = JSON.parse(read('frames.json'));
  for (const ex of fx.examples) {
    const frame = encodeFrame(ex.file, ex.offset, fromHex(ex.payload));
    assert.equal(toHex(frame), ex.frame);
    // The same frame written into a reused buffer (a view into a larger one).
    const big = new Uint8Array(FRAME_HEADER + 4096 + 7).fill(0xee).subarray(7);
    assert.equal(toHex(encodeFrameInto(big, ex.file, ex.offset, fromHex(ex.payload))), ex.frame);
    const [file, offset, payload] = decodeFrame(fromHex(ex.frame));
    assert.deepEqual([file, offset, toHex(payload)], [ex.file, ex.offset, ex.payload]);
  }
  assert.throws(() => decodeFrame(new Uint8Array(12)), (e) => e.kind === 'short_frame');
  const data = Uint8Array.from({ length: 100 }, (_, i) => i);
  const out = [...frames(3, 1000, data, FRAME_HEADER + 30)];
  assert.equal(out.length, 4);
  assert.equal([...frames(0, 0, data, 0)].length, 100);
  const hx = JSON.parse(read('hashes.json'));
  for (const ex of hx.examples) {
    const bytes = ex.content.utf8 !== undefined ? enc(ex.content.utf8) : Uint8Array.from({ length: ex.size }, (_, i) => i % ex.content.mod);
    const hashes = [];
    for (let at = 0; at < bytes.length; at += ex.chunk_size) hashes.push(chunkHash(bytes.subarray(at, at + ex.chunk_size)));
    assert.deepEqual(hashes.map(toHex), ex.chunk_hashes, ex.name);
    assert.equal(toHex(fileHash(ex.size, ex.chunk_size, hashes)), ex.file_hash, ex.name);
  }
});

test('unsafe paths are refused, as in crates/transfer/tests/hostile.rs', () => {
  const bad = ['../x', 'a/../../x', '..', '/etc/passwd', 'C:\\x', 'C:/x', 'c:x', 'a\\b', 'a//b', 'a/', '.', 'a/./b', '', 'a\0b', 'a\u0001b', 'line\nbreak', 'del\u007f',
    'a/'.repeat(64) + 'b', 'x'.repeat(4097)];
  for (const p of bad) assert.throws(() => parseRelPath(p), PathError, JSON.stringify(p));
  for (const p of bad) {
    const msg = JSON.stringify({ type: 'manifest_part', entries: [{ kind: 'file', path: p, size: 1 }] });
    assert.throws(() => parseCtl(msg), (e) => e instanceof ProtocolError && e.cancelCode() === 'bad_manifest');
  }
  for (const ok of ['a', 'a/b/c', 'été/ü.txt', 'a b', '.hidden', 'x..y']) assert.equal(parseRelPath(ok), ok);
});

test('bad manifests are refused', () => {
  const m = (entries, size = MIN_CHUNK_SIZE) => () => new Manifest(size, entries);
  assert.throws(m([fileEntry('a', 1), fileEntry('a', 2)]), /twice/);
  assert.throws(m([fileEntry('a', 1), dirEntry('a')]), /twice/);
  assert.throws(m([fileEntry('a', 1), fileEntry('a/b', 1)]), /would be inside/);
  assert.throws(m([fileEntry('x/a/b', 1), fileEntry('x/a', 1)]), /would be inside/);
  assert.throws(m([textEntry('t', (1 << 20) + 1)]), /more than/);
  assert.throws(() => validateEntry({ kind: 'dir', path: 'd', size: 5 }), /with a size/);
  assert.throws(() => validateEntry({ kind: 'symlink', path: 'l', size: 0 }), /unknown entry kind/);
  assert.throws(() => validateEntry({ kind: 'file', path: 'f' }), /without a size/);
  for (const size of [0, 16385, 8192, 32 << 20]) assert.throws(m([fileEntry('a', 1)], size), /chunk size/);
});

test('a manifest whose paths hold more bytes than the receiver allows is refused as too_large, as in hostile.rs', () => {
  const msgs = [
    '{"type":"manifest","version":1,"chunk_size":16384,"entries":2,"bytes":2}',
    '{"type":"manifest_part","entries":[{"kind":"file","path":"abcdef","size":1},{"kind":"file","path":"ghijkl","size":1}]}',
    '{"type":"manifest_end"}',
  ];
  const offer = (maxPathBytes) => {
    const r = new Receiver({ maxPathBytes });
    r.startSession();
    try {
      for (const m of msgs) r.handleCtlJson(m);
    } catch (e) {
      return /** @type {any} */ (e).kind;
    }
    return r.phase;
  };
  assert.equal(offer(11), 'too_large');
  assert.equal(offer(12), 'offered', 'at the limit is fine');
});

/** Files by index, an in-memory disk for the receiver, and a trip-by-trip network. */
function harness(files, { chunkSize = MIN_CHUNK_SIZE, receiver = new Receiver(), corrupt = null, disk = new Map(), deferPrepare = false } = {}) {
  const entries = files.map(([path, data]) => (data === null ? dirEntry(path) : fileEntry(path, data.length)));
  const sender = new Sender(new Manifest(chunkSize, entries));
  const src = files.filter(([, d]) => d !== null).map(([, d]) => d);
  const h = { sender, receiver, disk, toR: [], toS: [], data: [], events: [], sent: 0, maxUnwritten: 0, maxChunks: 0, fromR: [], prepares: [] };
  /** The driver's `prepare`: the partial file's chunks hashed. */
  const prepare = (file) => {
    const d = disk.get(file) ?? new Uint8Array(0);
    const m = receiver.manifest();
    const found = [];
    for (let c = 0; c < m.chunkCount(file); c++) {
      const [off, len] = m.chunkSpan(file, c);
      found.push(d.length >= off + len ? chunkHash(d.subarray(off, off + len)) : null);
    }
    receiver.partialScanned(file, found);
  };
  h.trip = () => {
    for (let o = sender.poll(); o; o = sender.poll()) {
      if (o.type === 'ctl') h.toR.push(ctlJson(o.msg));
      else if (o.type === 'hash') {
        const hs = [];
        for (let c = o.from; c < o.from + o.count; c++) {
          const [off, len] = sender.manifest.chunkSpan(o.file, c);
          hs.push(chunkHash(src[o.file].subarray(off, off + len)));
        }
        sender.hashesComputed(o.file, o.from, hs);
      } else if (o.type === 'send') {
        let bytes = src[o.file].slice(o.offset, o.offset + o.len);
        h.sent += o.len;
        if (corrupt && corrupt(o)) bytes[0] ^= 0xff;
        for (const f of frames(o.file, o.offset, bytes, 16 * 1024)) h.data.push(f);
      } else h.events.push(['sender', o]);
    }
    for (let o = receiver.poll(); o; o = receiver.poll()) {
      if (o.type === 'ctl') {
        h.toS.push(ctlJson(o.msg));
        h.fromR.push(o.msg);
      } else if (o.type === 'offered') receiver.accept();
      else if (o.type === 'prepare') {
        // Deferred: answered after the next trip's control messages, as a slow disk scan would.
        if (deferPrepare) h.prepares.push(o.file);
        else prepare(o.file);
      } else if (o.type === 'verify') receiver.chunkHashed(o.file, o.chunk, chunkHash(o.data));
      else if (o.type === 'write') {
        const f = disk.get(o.file) ?? new Uint8Array(0);
        const grown = new Uint8Array(Math.max(f.length, o.offset + o.data.length));
        grown.set(f);
        grown.set(o.data, o.offset);
        disk.set(o.file, grown);
        receiver.chunkWritten(o.file, o.chunk);
      } else if (o.type === 'finish') receiver.fileFinished(o.file);
      else if (o.type !== 'create_dir') h.events.push(['receiver', o]);
      const f = receiver.inFlight();
      h.maxUnwritten = Math.max(h.maxUnwritten, f.unwrittenBytes);
      h.maxChunks = Math.max(h.maxChunks, f.unwrittenChunks);
    }
    for (const t of h.toR.splice(0)) try { receiver.handleCtlJson(t); } catch { /* cancelled */ }
    for (const file of h.prepares.splice(0)) prepare(file);
    for (const f of h.data.splice(0)) try { receiver.handleData(f); } catch { /* cancelled */ }
    for (const t of h.toS.splice(0)) try { sender.handleCtlJson(t); } catch { /* cancelled */ }
  };
  h.run = (trips = 10_000) => {
    for (let i = 0; i < trips; i++) {
      h.trip();
      if (sender.isFinal() && receiver.isFinal()) return i;
    }
    return trips;
  };
  h.start = () => { sender.startSession(); receiver.startSession(); };
  h.src = src;
  return h;
}

const pattern = (len, seed) => {
  const out = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; out[i] = x & 0xff; }
  return out;
};

test('round trips: empty file, one chunk, chunk + 1, folders, Unicode, many small files', () => {
  const cs = MIN_CHUNK_SIZE;
  const files = [['empty', new Uint8Array(0)], ['d', null], ['one', pattern(cs, 1)], ['d/plus', pattern(cs + 1, 2)], ['été/ü.bin', pattern(3 * cs + 7, 3)]];
  for (let i = 0; i < 300; i++) files.push([`many/${i}`, pattern(100 + i, 10 + i)]);
  const h = harness(files);
  h.start();
  h.run();
  assert.ok(h.receiver.phase === 'complete' && h.sender.state === 'finished', `${h.receiver.phase} ${h.sender.state}`);
  h.src.forEach((d, i) => assert.deepEqual(h.disk.get(i) ?? new Uint8Array(0), d, `file ${i}`));
  const done = h.events.filter(([, o]) => o.type === 'file_done');
  assert.equal(done.length, h.src.length);
});

test('resume: a new session asks only for what is missing, exactly once', () => {
  const cs = MIN_CHUNK_SIZE;
  const big = pattern(20 * cs + 5, 7);
  const h = harness([['big', big]], { receiver: new Receiver({ windowBytes: 2 * cs }) });
  h.start();
  for (let i = 0; i < 6; i++) h.trip();
  const before = h.receiver.progress().bytesDone;
  assert.ok(before > 0 && before < big.length, `${before}`);
  // The connection drops: both sides start a new session; nothing verified is asked for again.
  h.start();
  const sentBefore = h.sent;
  h.run();
  assert.equal(h.receiver.phase, 'complete');
  assert.deepEqual(h.disk.get(0), big);
  assert.ok(h.sent - sentBefore <= big.length - before + 2 * cs, `re-sent ${h.sent - sentBefore}, missing ${big.length - before}`);
  // A fresh receiver that finds the partial file on disk keeps it.
  const half = big.slice(0, 10 * cs);
  const h2 = harness([['big', big]], { disk: new Map([[0, half]]) });
  h2.start();
  h2.run();
  assert.deepEqual(h2.disk.get(0), big);
  assert.equal(h2.receiver.progress().bytesResumed, 10 * cs);
  assert.equal(h2.sent, big.length - 10 * cs);
});

test('data moves once the first page of hashes is in; chunks on disk are kept across pages', () => {
  // As crates/transfer/tests/transfer.rs: a file of three pages of hashes,
  // partly on disk in each page; the disk scan ends before or after the
  // first pages arrive.
  const cs = MIN_CHUNK_SIZE;
  const chunks = 600;
  const big = pattern(chunks * cs, 7);
  for (const deferPrepare of [false, true]) {
    const part = new Uint8Array(chunks * cs);
    for (const [a, b] of [[0, 10], [300, 310], [590, 600]]) part.set(big.subarray(a * cs, b * cs), a * cs);
    part[305 * cs + 1] ^= 1;
    const receiver = new Receiver({ hashPagesAhead: 1, windowBytes: 64 * cs });
    const h = harness([['big', big]], { receiver, disk: new Map([[0, part]]), deferPrepare });
    h.start();
    h.run();
    assert.equal(h.receiver.phase, 'complete', `deferPrepare ${deferPrepare}`);
    assert.deepEqual(h.disk.get(0), big);
    const kept = (10 + 9 + 10) * cs;
    assert.equal(h.receiver.progress().bytesResumed, kept);
    assert.equal(h.sent, big.length - kept);
    const firstWant = h.fromR.findIndex((m) => m.type === 'want');
    const lastPage = h.fromR.findIndex((m) => m.type === 'get_hashes' && m.from === 512);
    assert.ok(firstWant >= 0 && firstWant < lastPage, `chunks asked for only after the last page of hashes (deferPrepare ${deferPrepare}): ${JSON.stringify(h.fromR.map((m) => m.type))}`);
  }
});

test('a corrupted chunk is detected and fetched again; three failures cancel', () => {
  const cs = MIN_CHUNK_SIZE;
  const data = pattern(4 * cs, 9);
  let once = true;
  const h = harness([['f', data]], { corrupt: (o) => o.chunk === 2 && once && !(once = false) });
  h.start();
  h.run();
  assert.deepEqual(h.disk.get(0), data);
  assert.deepEqual(h.events.filter(([, o]) => o.type === 'chunk_corrupt').map(([, o]) => [o.chunk, o.attempt]), [[2, 1]]);
  const h2 = harness([['f', data]], { corrupt: (o) => o.chunk === 1 });
  h2.start();
  h2.run();
  assert.equal(h2.receiver.phase, 'cancelled');
  assert.equal(h2.sender.state, 'cancelled');
});

test('the window and write-slot bounds hold at every step', () => {
  const cs = MIN_CHUNK_SIZE;
  const h = harness([['a', pattern(40 * cs, 1)], ['b', pattern(13 * cs + 3, 2)]], { receiver: new Receiver({ windowBytes: 4 * cs, maxPendingWrites: 3 }) });
  h.start();
  h.run();
  assert.equal(h.receiver.phase, 'complete');
  assert.ok(h.maxUnwritten <= 4 * cs, `${h.maxUnwritten}`);
  assert.ok(h.maxChunks <= 3, `${h.maxChunks}`);
});

test('a declined offer and a sender changed between sessions', () => {
  const h = harness([['a', pattern(100, 1)]]);
  h.receiver.accept = () => h.receiver.decline('not now');
  h.start();
  h.run();
  assert.equal(h.sender.state, 'declined');
  const cs = MIN_CHUNK_SIZE;
  const v1 = pattern(3 * cs, 1);
  const h2 = harness([['a', v1]], { receiver: new Receiver({ windowBytes: cs }) });
  h2.start();
  for (let i = 0; i < 4; i++) h2.trip();
  // Same names and sizes, other bytes: the hashes differ, the receiver cancels with `changed`.
  const v2 = pattern(3 * cs, 2);
  const h3 = harness([['a', v2]], { receiver: h2.receiver, disk: h2.disk });
  h3.start();
  h3.run();
  assert.equal(h2.receiver.phase, 'cancelled');
  assert.ok(h3.events.some(([, o]) => o.type === 'cancelled' && o.code === 'changed'), JSON.stringify(h3.events.map(([, o]) => o.type)));
});

test('random input never throws anything but the engine’s own errors', () => {
  let seed = 12345;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const samples = ['{"type":"manifest","version":1,"chunk_size":16384,"entries":1,"bytes":5}', '{"type":"manifest_part","entries":[{"kind":"file","path":"a","size":5}]}', '{"type":"manifest_end"}', '{"type":"hashes","file":0,"from":0,"hashes":"' + '0'.repeat(64) + '"}', '{"type":"want","file":0,"ranges":[[0,1]]}', '{"type":"get_hashes","file":0,"from":0}', '{"type":"done","files":1,"bytes":5}', '{"type":"accept"}'];
  for (let round = 0; round < 300; round++) {
    const r = new Receiver();
    const s = new Sender(new Manifest(MIN_CHUNK_SIZE, [fileEntry('a', 5)]));
    r.startSession();
    s.startSession();
    for (let i = 0; i < 12; i++) {
      let text = samples[Math.floor(rnd() * samples.length)];
      if (rnd() < 0.5) { const at = Math.floor(rnd() * text.length); text = text.slice(0, at) + String.fromCharCode(Math.floor(rnd() * 128)) + text.slice(at + 1); }
      for (const target of [r, s]) {
        try { target.handleCtlJson(text); } catch (e) { assert.ok(e instanceof ProtocolError, String(e)); }
      }
      const frame = Uint8Array.from({ length: Math.floor(rnd() * 40) }, () => Math.floor(rnd() * 256));
      try { r.handleData(frame); } catch (e) { assert.ok(e instanceof ProtocolError, String(e)); }
      while (r.poll()); while (s.poll());
    }
  }
  assert.throws(() => parseCtl('{"type":"decline","reason":"' + 'x'.repeat(MAX_CTL_BYTES) + '"}'), (e) => e.kind === 'ctl_too_long');
  assert.throws(() => parseCtl('{"type":"teleport"}'), (e) => e.kind === 'json');
  assert.deepEqual(parseCtl('{"type":"cancel","code":"quantum","reason":"x"}'), { type: 'cancel', code: 'unknown', reason: 'x' });
  assert.deepEqual(parseCtl('{"type":"accept","extra":1}'), { type: 'accept' });
});

test('manifest id is stable and follows the content', () => {
  const m = (n) => new Manifest(MIN_CHUNK_SIZE, [fileEntry('a.txt', n)]);
  assert.equal(m(5).id(), m(5).id());
  assert.notEqual(m(5).id(), m(6).id());
  assert.equal(m(5).id().length, 64);
});

test('transfer: files of more chunks than fixtures/transfer/chunks.json allows are refused, and a sender picks its chunk size as it says', () => {
  const f = JSON.parse(readFileSync(new URL('chunks.json', root), 'utf8'));
  assert.equal(MAX_CHUNKS, f.max_chunks);
  for (const c of f.files) {
    const make = () => new Manifest(c.chunk_size, [fileEntry('f', c.size)]);
    if (c.valid) make();
    else assert.throws(make, /2\^22 chunks/, c.why);
  }
  for (const c of f.sender_chunk_size) assert.equal(chunkSizeFor(c.largest_file), c.chunk_size ?? undefined, c.why);
});

test('transfer: a sender that answers every get_hashes at once cannot make the receiver hold a huge file\'s hashes before any data came', () => {
  const r = new Receiver();
  r.startSession();
  const size = 16384 * MAX_CHUNKS;
  for (const m of [
    { type: 'manifest', version: 1, chunk_size: 16384, entries: 1, bytes: size },
    { type: 'manifest_part', entries: [{ kind: 'file', path: 'big', size }] },
    { type: 'manifest_end' },
  ]) r.handleCtlJson(JSON.stringify(m));
  assert.deepEqual(r.poll(), { type: 'offered' });
  r.accept();
  let asked = 0;
  for (let round = 0; round < 100_000; round++) {
    let answered = false;
    for (let o = r.poll(); o; o = r.poll()) {
      if (o.type === 'prepare') {
        r.partialScanned(o.file, []);
        answered = true;
      } else if (o.type === 'ctl' && o.msg.type === 'get_hashes') {
        const { file, from } = o.msg;
        const n = Math.min(256, MAX_CHUNKS - from);
        asked += n;
        r.handleCtl({ type: 'hashes', file, from, hashes: hashesToHex(Array.from({ length: n }, () => new Uint8Array(32).fill(7))) });
        answered = true;
      }
    }
    if (!answered) break;
  }
  assert.ok(asked > 0);
  assert.ok(asked <= HASHES_AHEAD_OF_DATA + 256, `${asked} chunks' hashes asked for before any data`);
});

test('transfer: a resume with more chunks on disk than hashes are asked for ahead goes on to the end', () => {
  const CHUNKS = HASHES_AHEAD_OF_DATA + 3000;
  const size = 16384 * CHUNKS;
  const r = new Receiver();
  r.startSession();
  for (const m of [
    { type: 'manifest', version: 1, chunk_size: 16384, entries: 1, bytes: size },
    { type: 'manifest_part', entries: [{ kind: 'file', path: 'big', size }] },
    { type: 'manifest_end' },
  ]) r.handleCtlJson(JSON.stringify(m));
  r.accept();
  const hash = new Uint8Array(32).fill(7);
  /** @type {number | undefined} */
  let prepared;
  let pages = 0;
  let finished = false;
  for (let round = 0; round < 10_000; round++) {
    let progress = false;
    for (let o = r.poll(); o; o = r.poll()) {
      if (o.type === 'prepare') prepared = o.file;
      else if (o.type === 'ctl' && o.msg.type === 'get_hashes') {
        const { file, from } = o.msg;
        const n = Math.min(256, CHUNKS - from);
        r.handleCtl({ type: 'hashes', file, from, hashes: hashesToHex(Array.from({ length: n }, () => hash)) });
        pages++;
        progress = true;
      } else if (o.type === 'finish') finished = true;
    }
    if (!progress && prepared !== undefined) {
      // Scanned only now: every chunk is on disk and matches.
      r.partialScanned(prepared, Array.from({ length: CHUNKS }, () => hash));
      prepared = undefined;
      progress = true;
    }
    if (!progress) break;
  }
  assert.ok(finished, `finished from disk after ${pages} pages of hashes`);
  assert.equal(pages, Math.ceil(CHUNKS / 256));
});
