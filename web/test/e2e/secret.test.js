// An end-to-end encrypted room (`/room/NAME#k=SECRET`, `peerlink chat
// --room-secret`): two tabs and a native peer with the secret connect, chat,
// and show the same safety number at both ends of each connection; a tab
// opened without the secret connects to nobody; messages through the server
// are sealed. A sealed channel between a tab and a native peer.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { run, setup, say, shot, until, REPO } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});

const SECRET = 'Kx3w-9vQ2bYtR7mLp0sZ4A';

test('a secret room: members connect end to end with matching safety numbers, a tab without the secret connects to nobody', async () => {
  const native = run(['chat', '--server', server.ws, '--ice-addr', '127.0.0.1', '--name', 'native', '--room-secret', SECRET, 'vault']);
  try {
    await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
    const a = await chrome.page(`${server.url}/room/vault?name=ann#k=${SECRET}`);
    const b = await chrome.page(`${server.url}/room/vault?name=ben#k=${SECRET}`);
    for (const p of [a, b]) {
      assert.equal(await p.isVisible('#e2e'), true, 'the page says the room is end-to-end encrypted');
      await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
    }
    // The native peer printed a safety number per tab; each tab shows the
    // same one for the native peer, and the two tabs agree on theirs.
    await until(() => native.lines.filter((l) => l.includes('end to end (safety number')).length === 2, 20_000, 'native connected end to end');
    const nativeNumbers = native.lines.flatMap((l) => /^\* connected to (\w+), end to end \(safety number ([\d ]+)\)$/.exec(l)?.slice(1, 3) ?? []);
    /** The safety number `p` shows for `who`. @param {import('playwright-core').Page} p @param {string} who */
    const safetyOf = async (p, who) => {
      const text = await p.waitForFunction((w) => {
        const li = [...document.querySelectorAll('#peers li')].find((l) => l.querySelector('.name')?.textContent === w);
        const t = li?.querySelector('.safety')?.textContent ?? '';
        return /^safety number \d{5}( \d{5}){4}$/.test(t) && t;
      }, who, { timeout: 10_000 });
      return String(await text.jsonValue()).replace('safety number ', '');
    };
    const fromNative = new Map([[nativeNumbers[0], nativeNumbers[1]], [nativeNumbers[2], nativeNumbers[3]]]);
    assert.equal(await safetyOf(a, 'native'), fromNative.get('ann'));
    assert.equal(await safetyOf(b, 'native'), fromNative.get('ben'));
    assert.equal(await safetyOf(a, 'ben'), await safetyOf(b, 'ann'));
    assert.notEqual(await safetyOf(a, 'ben'), await safetyOf(a, 'native'));
    await shot(a, 'room-secret');

    await say(a, 'for members only');
    await native.line((l) => l.endsWith(': for members only'), 10_000, 'chat at the native peer');
    await b.waitForSelector('#log li:has-text("for members only")', { timeout: 10_000 });

    // Sealed through the server: the other tab opens it, the server never saw it.
    const got = b.evaluate(() => new Promise((ok) => /** @type {any} */ (globalThis).peerlinkRoom.on('server_message', (/** @type {any} */ m) => ok(m.data))));
    const before = await server.healthz();
    await a.evaluate(() => /** @type {any} */ (globalThis).peerlinkRoom.sendViaServer(null, { note: 'sealed for the room' }));
    assert.deepEqual(await got, { note: 'sealed for the room' });
    assert.ok((await server.healthz()).messages_relayed > before.messages_relayed, 'it went through the server');

    // Without the secret: in the room, connected to nobody; the members say why.
    const c = await chrome.page(`${server.url}/room/vault?name=cy`);
    await a.waitForSelector('#log li:has-text("cy is not connected")', { timeout: 20_000 });
    await native.line((l) => l.startsWith('* refused cy: the offer carries no authentication'), 20_000, 'native refuses cy');
    // And it stays so (not just not yet).
    await c.waitForTimeout(2_000);
    assert.equal(await c.locator('#peers li[data-state="connected"]').count(), 0);
    assert.equal(await a.locator('#peers li[data-state="connected"]').count(), 2, 'the members stay connected');
    await c.close();
    await a.close();
    await b.close();
  } finally {
    native.proc.stdin.end();
    native.kill();
    await native.exit(10_000);
  }
});

test('a sealed channel between a tab and a native peer: keys agreed over it, messages both ways', async () => {
  const echo = spawn(join(REPO, 'target/debug/examples/sealed_echo'), [server.ws, 'sealed'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  echo.stdout.on('data', (d) => { out += d; });
  try {
    await until(() => out.includes('joined'), 20_000, 'the native end joined');
    const page = await chrome.page(`${server.url}/`);
    const replies = await page.evaluate(async () => {
      const { Room } = await import('/lib/room.js');
      const room = new Room({ server: location.origin, room: 'sealed', channels: [{ label: 'notes', reliability: 'reliable' }] });
      /** @type {Promise<any>} */
      const sealed = new Promise((ok, no) => room.on('channel_open', (ch) => { if (ch.label === 'notes') room.seal(ch).then(ok, no); }));
      await room.join();
      const s = await sealed;
      /** @type {unknown[]} */
      const got = [];
      const two = new Promise((ok) => s.on('message', (/** @type {unknown} */ m) => { got.push(m instanceof Uint8Array ? [...m] : m); if (got.length === 2) ok(undefined); }));
      await s.send('quiet please');
      await s.send(new Uint8Array([1, 2, 3]));
      await two;
      room.leave();
      return got;
    });
    assert.deepEqual(replies, ['QUIET PLEASE', [3, 2, 1]]);
    assert.match(out, /sealed with p-/);
    await page.close();
  } finally {
    echo.kill();
  }
});
