// A video call in the room page: two Chromium tabs with fake cameras see
// each other's video (getStats framesDecoded rising), turning a camera off
// and on renegotiates without adding m-lines, and a native `peerlink chat`
// in the same room declines the media and keeps chatting throughout.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { run, setup, say, shot, until } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});

/** @typedef {import('playwright-core').Page} Page */

/** The page's id in the room. @param {Page} page */
const idOf = (page) => page.evaluate(() => /** @type {any} */ (globalThis).peerlinkRoom.id);

/** The connection's media counters, as the page's room reports them. @param {Page} page @param {string} peer */
const media = (page, peer) => page.evaluate(async (p) => (await /** @type {any} */ (globalThis).peerlinkRoom.stats(p))?.media, peer);

/** Media transceivers (audio and video m-lines) on the page's connection to `peer`. @param {Page} page @param {string} peer */
const transceivers = (page, peer) => page.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).pc.getTransceivers().length, peer);

/** Waits until `page` decodes video from `peer`, frames still arriving: returns the count. @param {Page} page @param {string} peer */
async function decoding(page, peer, what = 'video decoded') {
  const first = await until(async () => {
    const n = (await media(page, peer))?.framesDecoded ?? 0;
    return n > 0 && n;
  }, 20_000, what);
  return until(async () => {
    const n = (await media(page, peer))?.framesDecoded ?? 0;
    return n > first + 10 && n;
  }, 10_000, `${what}, still rising`);
}

/** Checks chat both ways between the native peer and the tabs. */
async function chatsWithNative(/** @type {ReturnType<typeof run>} */ native, /** @type {Page[]} */ tabs, /** @type {string} */ tag) {
  native.proc.stdin.write(`native ${tag}\n`);
  for (const p of tabs) await p.waitForSelector(`#log li:has-text("native ${tag}")`, { timeout: 10_000 });
  await say(tabs[0], `tab ${tag}`);
  await native.line((l) => l.endsWith(`: tab ${tag}`), 10_000, `tab ${tag} at the native peer`);
}

test('two tabs in a call see each other; camera off and on renegotiates; a native peer keeps chatting', async () => {
  const native = run(['chat', '--server', server.ws, '--ice-addr', '127.0.0.1', '--name', 'native', 'call']);
  try {
    await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
    const a = await chrome.page(`${server.url}/room/call?name=ann`);
    const b = await chrome.page(`${server.url}/room/call?name=ben`);
    for (const p of [a, b]) {
      await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
    }
    const [ida, idb] = [await idOf(a), await idOf(b)];
    const nativeId = /** @type {string} */ (await a.evaluate((b) => [.../** @type {any} */ (globalThis).peerlinkRoom.conns.keys()].find((p) => p !== b), idb));
    await chatsWithNative(native, [a, b], 'before');

    // Ann's camera: Ben decodes it and shows a tile for it; the native peer
    // declined the media (nothing is sent to it) and still chats.
    await a.click('#camera');
    await a.waitForSelector('#camera[aria-pressed="true"]');
    await a.waitForSelector('.tile[data-peer="me"] video');
    await decoding(b, ida, 'ben decodes ann');
    await b.waitForSelector(`.tile[data-peer="${ida}"] figcaption:has-text("ann")`, { timeout: 10_000 });
    assert.match(await b.textContent(`.tile[data-peer="${ida}"] figcaption`) ?? '', /direct/, 'the tile shows the path');
    await until(async () => (await media(a, idb))?.framesSent > 0, 10_000, 'ann sends to ben');
    assert.equal((await media(a, nativeId))?.framesSent, 0, 'no video to the native peer');
    await chatsWithNative(native, [a, b], 'after ann turned her camera on');

    // Ben's camera goes on the m-line Ann opened: one video m-line between them.
    await b.click('#camera');
    await decoding(a, idb, 'ann decodes ben');
    await a.waitForSelector(`.tile[data-peer="${idb}"]`, { timeout: 10_000 });
    await shot(a, 'room-call');

    // Ann turns her camera off: Ben's tile for her goes; on again: frames again.
    await a.click('#camera');
    await a.waitForSelector('#camera[aria-pressed="false"]');
    await b.waitForSelector(`.tile[data-peer="${ida}"]`, { state: 'detached', timeout: 10_000 });
    await a.waitForSelector('.tile[data-peer="me"]', { state: 'detached' });
    const stopped = (await media(b, ida))?.framesDecoded ?? 0;
    await chatsWithNative(native, [a, b], 'while ann was off');
    await a.click('#camera');
    await b.waitForSelector(`.tile[data-peer="${ida}"]`, { timeout: 10_000 });
    await until(async () => ((await media(b, ida))?.framesDecoded ?? 0) > stopped + 10, 20_000, 'ben decodes ann again');
    assert.equal(await transceivers(a, idb), 1, 'one video m-line both ways, however often a camera goes off and on');
    // Ann still decodes Ben's video.
    await decoding(a, idb, 'ann still decodes ben');

    // The microphone: audio reaches Ben.
    await a.click('#microphone');
    await until(async () => ((await media(b, ida))?.audioPacketsReceived ?? 0) > 10, 20_000, 'ben receives ann\'s audio');

    // An ICE restart (new credentials, renegotiated with the media) keeps the call.
    const ufrag = () => a.evaluate((p) => /a=ice-ufrag:(\S+)/.exec(/** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).pc.localDescription.sdp)?.[1], idb);
    const before = await ufrag();
    await a.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).pc.restartIce(), idb);
    await until(async () => (await ufrag()) !== before, 10_000, 'restarted');
    await decoding(b, ida, 'ben decodes ann after the restart');
    await decoding(a, idb, 'ann decodes ben after the restart');

    // Screen sharing: a tile of its own at the other end.
    await a.click('#screen');
    await b.waitForFunction((p) => document.querySelectorAll(`.tile[data-peer="${p}"]`).length === 2, ida, { timeout: 10_000 });
    await a.click('#screen');
    await b.waitForFunction((p) => document.querySelectorAll(`.tile[data-peer="${p}"]`).length === 1, ida, { timeout: 10_000 });
    await chatsWithNative(native, [a, b], 'at the end');
    // The native peer rejected the first video m-line (Chromium drops a
    // rejected transceiver); nothing was offered to it after that.
    assert.equal(await transceivers(a, nativeId), 0, 'no media m-line with the native peer');
    assert.equal(await a.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).declinesMedia, nativeId), true);
    // One connection to each tab all along: nothing was torn down and rebuilt.
    assert.equal(native.lines.filter((l) => l.startsWith('* connected to')).length, 2, native.lines.join('\n'));
    assert.ok(!native.lines.some((l) => l.endsWith(' left')), native.lines.join('\n'));

    // Ann leaves: her tile goes from Ben's page.
    await a.close();
    await b.waitForSelector(`.tile[data-peer="${ida}"]`, { state: 'detached', timeout: 15_000 });
    await b.close();
  } finally {
    native.proc.stdin.end();
    native.kill();
    await native.exit(10_000);
  }
});

test('a newcomer joins a call in progress: it connects to everyone and gets the video', async () => {
  const a = await chrome.page(`${server.url}/room/late?name=ann`);
  const b = await chrome.page(`${server.url}/room/late?name=ben`);
  for (const p of [a, b]) await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });
  await a.click('#camera');
  await decoding(b, await idOf(a), 'ben decodes ann');
  // Three newcomers one after another: each meets a member with a camera
  // on (whose connection must not offer its video before the newcomer's
  // first offer is answered: Chromium did not recover from that collision
  // about one time in three).
  for (const name of ['cy', 'dee', 'eve']) {
    const c = await chrome.page(`${server.url}/room/late?name=${name}`);
    await c.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
    await decoding(c, await idOf(a), `${name} decodes ann`);
    await c.close();
  }
  await a.close();
  await b.close();
});
