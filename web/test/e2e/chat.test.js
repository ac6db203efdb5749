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

test('the server restarts: tabs reconnect with backoff, rejoin the room and chat again', async () => {
  const a = await chrome.page(`${server.url}/room/again?name=ann`);
  const b = await chrome.page(`${server.url}/room/again?name=ben`);
  for (const p of [a, b]) await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });
  const addr = server.addr;
  await server.stop();
  await a.waitForFunction(() => /Lost the server/.test(document.getElementById('status')?.textContent ?? ''), null, { timeout: 10_000 });
  server = await serve([], addr);
  // Each tab rejoins under a new id and the mesh forms again, channels and all.
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 1, null, { timeout: 30_000 });
  }
  await say(a, 'back again');
  await b.waitForSelector('#log li:has-text("back again")', { timeout: 10_000 });
  assert.equal(await a.locator('#peers li').count(), 1, 'the old ids are gone');
  await a.close();
  await b.close();
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
