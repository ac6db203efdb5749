// A large room (the server lists a sample of 3 and tells nobody of joins)
// of six native peers on the overlay and three Chromium tabs on the
// browser's overlay: broadcasts from native peers reach every tab, a tab's
// broadcasts reach every native peer and the other tabs, a message to one
// tab arrives over a direct connection, and connections are signalled over
// the overlay.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { run, serve, setup } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((_s, c) => {
  chrome = c;
});

/** Joins `room` with the overlay in the page; collects broadcasts as `from:seq`. */
const join = async (/** @type {any} */ o) => {
  const { Room } = await import('/lib/room.js');
  const w = /** @type {any} */ (window);
  w.room = new Room({ server: o.server, room: o.room, overlay: true });
  w.got = new Set();
  w.direct = [];
  w.room.on('message', (/** @type {any} */ m) => {
    if (m.kind === 'direct') { w.direct.push(new TextDecoder().decode(m.data)); return; }
    const v = new DataView(m.data.buffer, m.data.byteOffset, m.data.byteLength);
    w.got.add(`${v.getUint32(0)}:${v.getUint32(4)}`);
  });
  await w.room.join();
  return w.room.id;
};

test('three tabs and six native peers share a large room on the overlay', async () => {
  const server = await serve(['--listed-peers', '3', '--max-peers-per-room', '64']);
  const worker = run(['bench', 'room-worker', '--server', server.ws, '--room', 'big', '--first', '0', '--count', '6',
    '--senders', '2', '--messages', '10', '--size', '64', '--rate', '20']);
  try {
    await worker.line((l) => l === 'ready', 60_000, 'native peers connected');
    const tabs = [];
    for (let i = 0; i < 3; i++) tabs.push(await chrome.page(`${server.url}/`));
    const ids = [];
    for (const t of tabs) ids.push(await t.evaluate(join, { server: server.url, room: 'big' }));
    for (const t of tabs) {
      await t.waitForFunction(() => /** @type {any} */ (window).room.overlayStats().neighbors.length > 0, null, { timeout: 30_000 });
    }
    // The room is large: nobody holds a connection to everyone.
    for (const t of tabs) {
      const st = await t.evaluate(() => /** @type {any} */ (window).room.overlayStats());
      assert.ok(st.connections <= 8, JSON.stringify(st));
    }

    // Native peers 0 and 1 broadcast 10 numbered messages each.
    worker.proc.stdin.write('go\n');
    for (const t of tabs) {
      await t.waitForFunction(() => /** @type {any} */ (window).got.size >= 20, null, { timeout: 30_000 });
      const got = await t.evaluate(() => [.../** @type {any} */ (window).got].sort());
      const want = [0, 1].flatMap((f) => Array.from({ length: 10 }, (_, k) => `${f}:${k}`)).sort();
      assert.deepEqual(got, want);
    }

    // The first tab broadcasts 5 in the same format (sender 100).
    await tabs[0].evaluate(() => {
      for (let k = 0; k < 5; k++) {
        const b = new Uint8Array(16);
        const v = new DataView(b.buffer);
        v.setUint32(0, 100);
        v.setUint32(4, k);
        v.setBigUint64(8, BigInt(Date.now()) * 1000n);
        /** @type {any} */ (window).room.broadcast(b);
      }
    });
    for (const t of tabs.slice(1)) {
      await t.waitForFunction(() => [.../** @type {any} */ (window).got].filter((x) => x.startsWith('100:')).length === 5, null, { timeout: 30_000 });
    }

    // To one tab alone.
    await tabs[1].evaluate((to) => /** @type {any} */ (window).room.sendTo(to, 'just you'), ids[2]);
    await tabs[2].waitForFunction(() => /** @type {any} */ (window).direct.includes('just you'), null, { timeout: 30_000 });
    assert.deepEqual(await tabs[0].evaluate(() => /** @type {any} */ (window).direct), []);

    // Every native peer got the other native sender's 10 (or both senders')
    // and the tab's 5.
    await new Promise((r) => setTimeout(r, 1000));
    worker.proc.stdin.write('stop\n');
    const line = await worker.line((l) => l.startsWith('report '), 30_000, 'the native report');
    const reports = JSON.parse(line.slice('report '.length));
    assert.equal(reports.length, 6);
    for (const r of reports) {
      const want = (r.index < 2 ? 10 : 20) + 5;
      assert.equal(r.received, want, `native peer ${r.index}: ${JSON.stringify({ ...r, latencies: r.latencies.length })}`);
      assert.ok(r.connections <= 8);
    }
    // Connections were signalled over the overlay, between tabs and native
    // peers alike: relayed signals reached the tabs, and native peers sent some.
    const tabStats = [];
    for (const t of tabs) tabStats.push(await t.evaluate(() => /** @type {any} */ (window).room.overlayStats()));
    const received = tabStats.reduce((n, st) => n + st.relaysReceived, 0);
    assert.ok(received > 0, JSON.stringify(tabStats));
    assert.ok(reports.reduce((n, r) => n + r.signals_relayed, 0) > 0, 'native peers relayed signals');
    for (const t of tabs) await t.close();
  } finally {
    worker.kill();
    await server.stop();
  }
});
