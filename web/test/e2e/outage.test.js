// Signaling between connected peers: with the signaling server killed, two
// tabs and a native `peerlink chat` in a room keep chatting, start a video
// call (a renegotiation: tracks added) and restart ICE, the offers and
// answers going on each connection's own `peerlink-signal` channel; the
// server comes back and a newcomer joins them.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { run, serve, setup, say, until } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});
// The test replaces the server: stop the one running at the end.
after(() => server?.stop());

/** @typedef {import('playwright-core').Page} Page */

/** What a page's connections are doing, for failure messages. @param {Page} page */
const conns = (page) => page.evaluate(() => [.../** @type {any} */ (globalThis).peerlinkRoom.conns.entries()]
  .map(([peer, c]) => `${peer}: ${c.state} ${c.pc.signalingState} ${c.pc.connectionState} [${[...c.channels.keys()].join(' ')}] signal ${c.signalChannels.length}/${c.remoteReadsChannel} ${c.failure ?? ''}`));

/** The page's id in the room. @param {Page} page */
const idOf = (page) => page.evaluate(() => /** @type {any} */ (globalThis).peerlinkRoom.id);
/** The page's stats of its connection to `peer`. @param {Page} page @param {string} peer */
const stats = (page, peer) => page.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.stats(p), peer);

test('with the server down, a room chats, starts a call and restarts ICE over its own channels', async () => {
  const native = run(['chat', '--server', server.ws, '--ice-addr', '127.0.0.1', '--name', 'native', 'outage']);
  try {
    await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
    const a = await chrome.page(`${server.url}/room/outage?name=ann`);
    const b = await chrome.page(`${server.url}/room/outage?name=ben`);
    for (const p of [a, b]) {
      await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
    }
    const [ida, idb] = [await idOf(a), await idOf(b)];
    const nativeId = /** @type {string} */ (await a.evaluate((b) => [.../** @type {any} */ (globalThis).peerlinkRoom.conns.keys()].find((p) => p !== b), idb));
    // Every pair's signaling channel is open and greeted before the outage.
    for (const [page, peer] of [[a, idb], [a, nativeId], [b, ida]]) {
      await until(() => page.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).remoteReadsChannel, peer), 10_000, 'hello on the signaling channel');
    }
    // The channel is the library's own: the page's channels do not list it.
    assert.equal(await a.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).channels.has('peerlink-signal'), idb), false);
    const addr = server.addr;
    const relayedBefore = (await server.healthz()).signals_relayed;

    // Killed, not shut down: nobody is told.
    server.proc.kill('SIGKILL');
    await server.proc.exit(10_000);
    await a.waitForFunction(() => /going away|Lost the server/.test(document.getElementById('status')?.textContent ?? ''), null, { timeout: 10_000 });

    // Channels flow without the server.
    await say(a, 'while the server is down');
    await b.waitForSelector('#log li:has-text("while the server is down")', { timeout: 10_000 });
    await native.line((l) => l.endsWith(': while the server is down'), 10_000, 'chat at the native peer');

    // A call starts: Ann's camera renegotiates with Ben (who decodes it)
    // and with the native peer (which declines the media), over the
    // connections' own signaling channels.
    await a.click('#camera');
    await until(async () => ((await stats(b, ida))?.media?.framesDecoded ?? 0) > 10, 20_000, 'ben decodes ann during the outage');
    const [ab, ba, an] = [await stats(a, idb), await stats(b, ida), await stats(a, nativeId)];
    assert.ok(ab.signalsSentOnChannel > 0 && ab.signalsReceivedOnChannel > 0, JSON.stringify(ab));
    assert.ok(ba.signalsSentOnChannel > 0 && ba.signalsReceivedOnChannel > 0, JSON.stringify(ba));
    assert.ok(an.signalsSentOnChannel > 0 && an.signalsReceivedOnChannel > 0, `the native peer answered on the channel: ${JSON.stringify(an)}`);
    await until(() => a.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).declinesMedia, nativeId), 10_000, 'the native peer declined the media');

    // An ICE restart: new credentials, the video goes on.
    const ufrag = () => a.evaluate((p) => /a=ice-ufrag:(\S+)/.exec(/** @type {any} */ (globalThis).peerlinkRoom.conns.get(p).pc.remoteDescription.sdp)?.[1], idb);
    const before = await ufrag();
    await a.evaluate((p) => /** @type {any} */ (globalThis).peerlinkRoom.restartIce(p), idb);
    await until(async () => (await ufrag()) !== before, 10_000, 'ben answered the restart');
    const decoded = (await stats(b, ida)).media.framesDecoded;
    await until(async () => (await stats(b, ida)).media.framesDecoded > decoded + 10, 10_000, 'ben decodes ann after the restart');
    native.proc.stdin.write('native during the outage\n');
    for (const p of [a, b]) await p.waitForSelector('#log li:has-text("native during the outage")', { timeout: 10_000 });

    // The server comes back: both tabs take their places again, and a
    // newcomer connects to everyone through it.
    server = await serve([], addr);
    for (const p of [a, b]) {
      await p.waitForFunction(() => (document.getElementById('status')?.textContent ?? '') === '', null, { timeout: 30_000 });
    }
    assert.equal((await server.healthz()).signals_relayed, 0, 'nothing was signaled through the new server yet');
    assert.ok(relayedBefore > 0);
    const c = await chrome.page(`${server.url}/room/outage?name=cy`);
    await c.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 3, null, { timeout: 20_000 }).catch(async (e) => {
      const seen = await c.evaluate(() => [...document.querySelectorAll('#peers li')].map((li) => `${li.getAttribute('data-peer')} ${li.getAttribute('data-state')}`));
      throw new Error(`${e}\nthe newcomer sees: ${seen.join(', ')}\ncy: ${(await conns(c)).join('; ')}\nann: ${(await conns(a)).join('; ')}\nnative: ${native.lines.join('\n')}\n${native.stderr}`);
    });
    await say(c, 'hello all');
    for (const p of [a, b]) {
      await p.waitForSelector('#log li:has-text("hello all")', { timeout: 10_000 }).catch(async (e) => {
        throw new Error(`${e}\nann: ${(await conns(a)).join('; ')}\nben: ${(await conns(b)).join('; ')}\ncy: ${(await conns(c)).join('; ')}`);
      });
    }
    await native.line((l) => l.endsWith(': hello all'), 10_000, 'the newcomer at the native peer');
    // Nobody was seen to leave; each tab kept one connection to the native peer.
    for (const p of [a, b]) assert.equal(await p.locator('#log li:has-text("left")').count(), 0);
    assert.equal(native.lines.filter((l) => l.startsWith('* connected to')).length, 3, native.lines.join('\n'));
    await a.close();
    await b.close();
    await c.close();
  } finally {
    native.proc.stdin.end();
    native.kill();
    await native.exit(10_000);
  }
});
