// A room with two browsers and a native `peerlink chat`: everyone sees
// everyone, chat reaches all, and a file dropped in one tab reaches the
// other. Then Chromium with default settings (no media permission: its host
// addresses hidden behind mDNS names) against a native peer.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { run, scratch, writeRandom, sha256, shot, until, setup, say, browser, serve } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});

test('two browsers and peerlink chat share a room: presence, chat, file drop', async () => {
  const native = run(['chat', '--server', server.ws, '--ice-addr', '127.0.0.1', '--name', 'native', 'team']);
  await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
  const a = await chrome.page(`${server.url}/room/team?name=alice`);
  const b = await chrome.page(`${server.url}/room/team?name=bob`);
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 30_000 });
  }
  const names = await a.locator('#peers li .name').allTextContents();
  assert.deepEqual(names.sort(), ['bob', 'native']);
  // The native side has two data-channel connections.
  await native.line((l) => l.startsWith('* connected to'), 20_000);
  await until(() => native.lines.filter((l) => l.startsWith('* connected to')).length === 2, 20_000, 'native connected to both tabs');

  await say(a, 'hi all, alice here');
  await b.waitForSelector('#log li:has-text("hi all, alice here")');
  await native.line((l) => l.endsWith(': hi all, alice here'), 10_000, 'alice at the native peer');
  native.proc.stdin.write('native says hello\n');
  for (const p of [a, b]) await p.waitForSelector('#log li:has-text("native says hello")', { timeout: 10_000 });

  // A file dropped (picked) in alice's tab, to bob only.
  const dir = scratch('room');
  const file = join(dir, 'slides.pdf');
  writeRandom(file, 7 * (1 << 20) + 5);
  const bobId = await b.evaluate(() => document.body.dataset.joined);
  await a.selectOption('#to', /** @type {string} */ (bobId));
  await a.setInputFiles('#pick-files', file);
  await b.waitForSelector('#transfers li[data-direction="in"] button.accept', { timeout: 20_000 });
  assert.match(await b.textContent('#transfers li[data-direction="in"] .title') ?? '', /slides\.pdf .* from alice/);
  const download = b.waitForEvent('download');
  await b.click('#transfers li[data-direction="in"] button.accept');
  const d = await download;
  const path = await Promise.race([d.path(), d.failure().then((f) => { throw new Error(`download failed: ${f}`); })]);
  await b.waitForSelector('#transfers li[data-direction="in"][data-state="done"]', { timeout: 60_000 });
  await a.waitForSelector('#transfers li[data-direction="out"][data-state="done"]', { timeout: 60_000 });
  assert.equal(d.suggestedFilename(), 'slides.pdf');
  assert.equal(await sha256(/** @type {string} */ (path)), await sha256(file));
  await shot(a, 'room-page');

  // A file offered to the terminal peer, which takes no files: its channels
  // are closed unheard, and the row says so (it used to wait for ever).
  await a.selectOption('#to', { label: 'native' });
  await a.setInputFiles('#pick-files', file);
  const toNative = a.locator('#transfers li[data-direction="out"]').first();
  await toNative.and(a.locator('[data-state="failed"]')).waitFor({ timeout: 20_000 });
  assert.match(await toNative.locator('.detail').textContent() ?? '', /does not take files/);
  assert.match(await toNative.locator('.title').textContent() ?? '', /→ native/);

  // An offer bob has not answered is cancelled by alice: both rows say so.
  await a.selectOption('#to', /** @type {string} */ (bobId));
  await a.setInputFiles('#pick-files', file);
  const offered = b.locator('#transfers li[data-direction="in"]').first();
  await offered.locator('button.accept').waitFor({ timeout: 20_000 });
  const pending = a.locator('#transfers li[data-direction="out"]').first();
  await pending.locator('button.cancel').click();
  await pending.and(a.locator('[data-state="failed"]')).waitFor({ timeout: 10_000 });
  assert.match(await pending.locator('.detail').textContent() ?? '', /the sender cancelled/);
  await offered.and(b.locator('[data-state="failed"]')).waitFor({ timeout: 10_000 });
  assert.match(await offered.locator('.detail').textContent() ?? '', /The sender stopped: the sender cancelled/);
  assert.equal(await offered.locator('button').count(), 0);

  // Leaving shows on every side.
  native.proc.stdin.end();
  native.kill();
  await native.exit(10_000);
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.querySelectorAll('#peers li').length === 1, null, { timeout: 20_000 });
  }

  // Bob chosen, then gone: he stays chosen, marked, and a file is not
  // offered to everyone instead (the choice used to fall back to everyone).
  await a.selectOption('#to', /** @type {string} */ (bobId));
  await b.close();
  await a.waitForFunction(() => document.querySelectorAll('#peers li').length === 0, null, { timeout: 20_000 });
  assert.equal(await a.inputValue('#to'), bobId);
  assert.match(await a.locator('#to option:checked').textContent() ?? '', /bob \(left\)/);
  const rows = await a.locator('#transfers li').count();
  await a.setInputFiles('#pick-files', file);
  assert.match(await a.textContent('#error') ?? '', /bob left the room/);
  assert.equal(await a.locator('#transfers li').count(), rows);
});

test('Chromium with default settings (mDNS host candidates) connects to a native peer', async () => {
  // A veth pair gives Chromium a real interface and a default route, the
  // case where it hides its host address behind a <uuid>.local name; the
  // names begin with `pl` so assertIsolated knows them as ours.
  const sh = (/** @type {string} */ c) => execFileSync('sh', ['-c', c]);
  sh('ip link show pl0 >/dev/null 2>&1 || (ip link add pl0 type veth peer name pl1 && ip addr add 10.77.0.1/24 dev pl0 && ip addr add 10.77.0.2/24 dev pl1 && ip link set pl0 up && ip link set pl1 up && ip route add default via 10.77.0.2 dev pl0)');
  const plain = await browser({ media: false, loopback: false });
  try {
    const native = run(['chat', '--server', server.ws, '--ice-addr', '10.77.0.2', '--name', 'native', 'mdns'], { env: { RUST_LOG: 'peerlink_peer=debug' } });
    await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
    // Record the candidates the page gathers.
    await plain.context.addInitScript(() => {
      const Native = window.RTCPeerConnection;
      /** @type {any} */ (window).__candidates = [];
      window.RTCPeerConnection = class extends Native {
        /** @param {RTCConfiguration} [c] */
        constructor(c) {
          super(c);
          this.addEventListener('icecandidate', (e) => { if (e.candidate) /** @type {any} */ (window).__candidates.push(e.candidate.candidate); });
        }
      };
    });
    const page = await plain.page(`${server.url}/room/mdns?name=plain`);
    // The new interface can make Chromium abort the page's first loads
    // (ERR_NETWORK_CHANGED): load it again if it did not get to join.
    for (let i = 0; i < 3; i++) {
      if (await page.waitForFunction(() => document.body.dataset.joined, null, { timeout: 5_000 }).then(() => true, () => false)) break;
      await page.reload();
    }
    await page.waitForSelector('#peers li[data-state="connected"]', { timeout: 30_000 }).catch(async (e) => {
      const candidates = await page.evaluate(() => /** @type {any} */ (window).__candidates);
      throw new Error(`${e.message}\npage: ${await page.textContent("main")}\ncandidates: ${JSON.stringify(candidates)}\nnative: ${native.stderr.slice(-3000)}`);
    });
    await say(page, 'from a browser that hides its address');
    await native.line((l) => l.endsWith(': from a browser that hides its address'), 10_000, 'chat at the native peer');
    // Chromium never revealed its address (10.77.0.1) in a candidate, and
    // the native peer did not complain about what it got: the connection
    // formed through the peer-reflexive candidate of Chromium's checks.
    const candidates = await page.evaluate(() => /** @type {any} */ (window).__candidates);
    console.log(`candidates offered by default Chromium: ${JSON.stringify(candidates)}`);
    assert.ok(candidates.every((/** @type {string} */ c) => !c.includes('10.77.0.1')), JSON.stringify(candidates));
    // Chromium drops the mDNS host candidate when registering its name
    // fails (it does, now and then, in a namespace); when it offers one,
    // the native peer skips it quietly.
    if (candidates.some((/** @type {string} */ c) => /[0-9a-f-]{36}\.local .* typ host/.test(c))) {
      assert.match(native.stderr, /skipping mDNS candidate/);
    }
    assert.doesNotMatch(native.stderr, /WARN/);
    native.kill();
    await native.exit(10_000);
  } finally {
    await plain.close();
  }
});

test('a relay-only tab and a relay-only native peer talk through the embedded TURN server on channels', async () => {
  const native = run(['chat', '--server', server.ws, '--ice-addr', '127.0.0.1', '--relay-only', '--name', 'native', 'relayed']);
  await native.line((l) => l.startsWith('* joined'), 20_000, 'joined');
  // `?relay=1`: the tab offers relayed candidates only.
  const page = await chrome.page(`${server.url}/room/relayed?name=alice&relay=1`);
  await page.waitForSelector('#peers li[data-state="connected"]', { timeout: 30_000 });
  await page.waitForSelector('#peers li .path:has-text("relayed by the TURN server")', { timeout: 10_000 });
  // The tab's own end of the pair is relayed too (the native one is anyway).
  const local = await page.evaluate(async () => {
    const peer = /** @type {HTMLElement} */ (document.querySelector('#peers li[data-state="connected"]')).dataset.peer;
    return (await /** @type {any} */ (window).peerlinkRoom.stats(peer))?.path?.local;
  });
  assert.match(local, /^relay /);
  await say(page, 'through the relay');
  await native.line((l) => l.endsWith(': through the relay'), 10_000, 'chat at the native peer');
  native.proc.stdin.write('and back\n');
  await page.waitForSelector('#log li:has-text("and back")', { timeout: 10_000 });
  // Chromium binds TURN channels on its own and the native peer once data
  // flows: the server relayed their data on its channel shortcut.
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  const shortcuts = Number(/^peerlink_turn_channel_shortcuts_total (\d+)$/m.exec(metrics)?.[1]);
  assert.ok(shortcuts > 0, metrics.split('\n').filter((l) => l.startsWith('peerlink_turn')).join('\n'));
  native.proc.stdin.end();
  native.kill();
  await native.exit(10_000);
});

test('a room left before its join came back stays left: the page is not a member afterwards', async () => {
  const page = await chrome.page(`${server.url}/`);
  const outcome = await page.evaluate(async () => {
    const { Room } = await import('/lib/room.js');
    const server = location.origin;
    const early = new Room({ server, room: 'left-early', name: 'early' });
    // Left at once: the WebSocket is still opening.
    const joining = early.join().then(() => 'joined', (/** @type {any} */ e) => `refused: ${e.code}`);
    await early.leave();
    const join = await joining;
    // Long enough for a join that went on regardless to reach the room.
    await new Promise((r) => setTimeout(r, 500));
    const later = new Room({ server, room: 'left-early', name: 'later' });
    await later.join();
    const members = [...later.members.values()].map((m) => m.name);
    await later.leave();
    return { join, members, socket: early.signaling.ws === null };
  });
  assert.deepEqual(outcome, { join: 'refused: closed', members: [], socket: true });
  await page.close();
});

test('a relay-only tab renews its TURN credentials: a newcomer after they expired still connects through the relay', async () => {
  // Credentials that live 15 s (1 h by default): renewed after 12 s.
  const short = await serve(['--turn-ttl', '15s']);
  try {
    const a = await chrome.page(`${short.url}/room/renew?name=ann&relay=1`);
    await a.waitForFunction(() => document.body.dataset.joined, null, { timeout: 20_000 });
    const before = await a.evaluate(() => /** @type {any} */ (window).peerlinkRoom.iceServers.map((/** @type {any} */ s) => s.username).join());
    // Past the first credentials' expiry, a newcomer: the tab's new peer
    // connection allocates on the TURN server with what it has (without a
    // renewal it had the expired ones, and never connected).
    await new Promise((r) => setTimeout(r, 17_000));
    const after = await a.evaluate(() => /** @type {any} */ (window).peerlinkRoom.iceServers.map((/** @type {any} */ s) => s.username).join());
    const b = await chrome.page(`${short.url}/room/renew?name=ben&relay=1`);
    for (const p of [a, b]) {
      await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 30_000 }).catch(async (e) => {
        throw new Error(`${e.message}\ncredentials then ${before}, now ${after}\npage: ${await p.textContent('main')}`);
      });
    }
    assert.notEqual(after, before, 'renewed');
    await say(a, 'relayed with fresh credentials');
    await b.waitForSelector('#log li:has-text("relayed with fresh credentials")', { timeout: 10_000 });
    // The renewal was a resume: nobody saw the tab leave or come back.
    assert.equal(await b.locator('#log li:has-text("left")').count(), 0);
    await b.close();
    await a.close();
  } finally {
    await short.stop();
  }
});
