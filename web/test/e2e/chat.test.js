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
