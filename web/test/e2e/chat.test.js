// Two tabs in a room chat both ways over a data channel; the server's
// counters show the chat did not pass through it.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { serve, shot, until, setup, say } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});
// The restart test replaces the server: stop the one running at the end.
after(() => server?.stop());

test('two tabs chat both ways, peer to peer', async () => {
  const a = await chrome.page(`${server.url}/room/lobby`);
  const b = await chrome.page(`${server.url}/room/lobby`);
  for (const p of [a, b]) {
    await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });
  }
  // The path shown comes from getStats: both tabs on loopback, direct.
  await until(async () => (await a.textContent('#peers li .path'))?.startsWith('direct'), 10_000, 'path shown');
  const before = await server.healthz();
  await say(a, 'hello from a');
  await say(b, 'and hello from b');
  await b.waitForSelector('#log li:has-text("hello from a")');
  await a.waitForSelector('#log li:has-text("and hello from b")');
  const after = await server.healthz();
  // Signals (SDP, candidates) went through the server; chat did not.
  assert.ok(before.signals_relayed > 0, JSON.stringify(before));
  assert.equal(after.messages_relayed, before.messages_relayed, 'chat messages passed through the server');
  assert.equal(after.signals_relayed, before.signals_relayed, 'chat caused signaling');
  await shot(a, 'room-chat');
  await a.close();
  await b.waitForSelector('#log li:has-text("left")');
  assert.equal(await b.locator('#peers li').count(), 0);
});

test('the server restarts: tabs resume their ids, keep their connections and chat on', async () => {
  const a = await chrome.page(`${server.url}/room/again?name=ann`);
  const b = await chrome.page(`${server.url}/room/again?name=ben`);
  for (const p of [a, b]) await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });
  const peerOf = (/** @type {import('playwright-core').Page} */ p) => p.getAttribute('#peers li', 'data-peer');
  const [bAsSeenByA, aAsSeenByB] = [await peerOf(a), await peerOf(b)];
  const addr = server.addr;
  await server.stop();
  await a.waitForFunction(() => /going away|Lost the server/.test(document.getElementById('status')?.textContent ?? ''), null, { timeout: 10_000 });
  // Data channels do not need the server.
  await say(a, 'while it is down');
  await b.waitForSelector('#log li:has-text("while it is down")', { timeout: 10_000 });
  server = await serve([], addr);
  for (const p of [a, b]) {
    await p.waitForFunction(() => (document.getElementById('status')?.textContent ?? '') === '', null, { timeout: 30_000 });
  }
  // The same ids, the same connections: nobody left, nothing was rebuilt.
  assert.equal(await peerOf(a), bAsSeenByA);
  assert.equal(await peerOf(b), aAsSeenByB);
  for (const p of [a, b]) {
    assert.equal(await p.locator('#peers li[data-state="connected"]').count(), 1);
    assert.equal(await p.locator('#log li:has-text("left")').count(), 0, 'no one was seen to leave');
  }
  // Signaling works again: a newcomer reaches both through the new server.
  const c = await chrome.page(`${server.url}/room/again?name=cy`);
  await c.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
  await say(c, 'hello both');
  for (const p of [a, b]) await p.waitForSelector('#log li:has-text("hello both")', { timeout: 10_000 });
  await a.close();
  await b.close();
  await c.close();
});

test('the pages fit a phone (390 px wide): nothing runs off the side', async () => {
  const page = await chrome.page(`${server.url}/`);
  await page.setViewportSize({ width: 390, height: 844 });
  for (const path of ['/', '/room/phone?name=pat']) {
    await page.goto(`${server.url}${path}`);
    await page.waitForLoadState('networkidle');
    const { scroll, client } = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth }));
    assert.ok(scroll <= client, `${path}: ${scroll} px wide in a ${client} px window`);
  }
  await page.waitForSelector('body[data-joined]');
  await shot(page, 'room-phone');
  await page.close();
});

test('a page sending through the server faster than its link drains is refused (false) and stays connected; a member gets what was accepted', async () => {
  // Limits off, so only the page's own link can be the bottleneck.
  const fast = await serve(['--messages-per-second', '1000000', '--message-burst', '1000000']);
  try {
    const a = await chrome.page(`${fast.url}/room/busy?name=ann`);
    const b = await chrome.page(`${fast.url}/room/busy?name=ben`);
    for (const p of [a, b]) await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });
    await b.evaluate(() => {
      const g = /** @type {any} */ (globalThis);
      g.viaServer = 0;
      g.peerlinkRoom.on('server_message', (/** @type {any} */ m) => { if (m.data?.bulk) g.viaServer++; });
    });
    const r = await a.evaluate(async () => {
      const room = /** @type {any} */ (globalThis).peerlinkRoom;
      const events = /** @type {string[]} */ ([]);
      room.signaling.on('reconnecting', () => events.push('reconnecting'));
      room.signaling.on('closed', () => events.push('closed'));
      // The server refuses what the member's queue cannot take (peer_busy).
      const g = /** @type {any} */ (globalThis);
      g.serverErrors = /** @type {Record<string, number>} */ ({});
      room.on('server_error', (/** @type {any} */ e) => { g.serverErrors[e.code] = (g.serverErrors[e.code] ?? 0) + 1; });
      const bulk = 'x'.repeat(60_000);
      let sent = 0;
      let refused = 0;
      // 1,500 x 60 KB in one task: the socket cannot drain meanwhile.
      for (let i = 0; i < 1500; i++) (room.sendViaServer(null, { bulk, i }) ? sent++ : refused++);
      let again = false;
      for (let i = 0; i < 100 && !again; i++) {
        await new Promise((res) => setTimeout(res, 100));
        again = room.sendViaServer(null, { bulk: 'after', i: -1 }) === true;
      }
      return { sent, refused, again, events };
    });
    assert.ok(r.refused > 0, `some refused: ${JSON.stringify(r)}`);
    assert.ok(r.sent >= 300, `about 24 MiB accepted: ${JSON.stringify(r)}`);
    assert.equal(r.again, true, 'accepted again once drained');
    assert.deepEqual(r.events, [], 'the link was never dropped');
    // Every message the page accepted reaches the member, or comes back
    // refused by the server (the member's queue was full): none is lost.
    const tally = async () => ({
      got: await b.evaluate(() => /** @type {any} */ (globalThis).viaServer),
      errors: await a.evaluate(() => /** @type {any} */ (globalThis).serverErrors),
    });
    await until(async () => {
      const t = await tally();
      return t.got + (t.errors.peer_busy ?? 0) === r.sent + 1;
    }, 30_000, 'every accepted message arrives or is refused').catch(async (e) => {
      throw new Error(`${e.message}: ${JSON.stringify({ ...r, ...(await tally()) })}`);
    });
    const t = await tally();
    assert.deepEqual(Object.keys(t.errors).filter((c) => c !== 'peer_busy'), [], JSON.stringify(t.errors));
    await a.close();
    await b.close();
  } finally {
    await fast.stop();
  }
});
