// Send and receive by code between the CLI and browsers, and between two
// browsers: hashes equal for a 100 MiB file and a folder; a wrong code
// fails on both sides; a sender leaving mid-transfer is shown, and one
// restarted with the same code finishes the transfer.

import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFileSync, mkdirSync, readdirSync, statSync, openSync, writeSync, closeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { setup, run, scratch, writeRandom, sha256, shot } from './harness.js';

const MiB = 1 << 20;
/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
/** @type {string} */
let dir;
/** @type {string} */
let big;
/** @type {string} */
let folder;
/** @type {Map<string, string>} folder file path (relative, with the folder) -> sha256 */
const folderHashes = new Map();
/** @type {string} */
let bigHash;

setup((s, c) => {
  server = s;
  chrome = c;
});

before(async () => {
  dir = scratch('transfer');
  big = join(dir, 'big.bin');
  writeRandom(big, 100 * MiB);
  bigHash = await sha256(big);
  folder = join(dir, 'album');
  mkdirSync(join(folder, 'raw'), { recursive: true });
  writeRandom(join(folder, 'one.jpg'), 3 * MiB + 17);
  writeRandom(join(folder, 'raw', 'two.dng'), 5 * MiB);
  writeFileSync(join(folder, 'notes été.txt'), 'Ünïcode notes\n');
  writeFileSync(join(folder, 'empty'), '');
  // RFC 8187 escapes these; a bare ' there cost the download its name.
  writeFileSync(join(folder, "Bob's notes (draft).txt"), 'draft\n');
  for (const rel of ['one.jpg', 'raw/two.dng', 'notes été.txt', 'empty', "Bob's notes (draft).txt"]) folderHashes.set(`album/${rel}`, await sha256(join(folder, rel)));
});

const net = () => ['--server', server.ws, '--ice-addr', '127.0.0.1', '--json'];

/**
 * Receives in `page` whatever the code offers (the /r#CODE link), accepting
 * it, and returns the downloads' paths by file name.
 * @param {import('playwright-core').Page} page
 * @param {number} files
 */
async function receiveInPage(page, files) {
  /** @type {Map<string, string>} */
  const got = new Map();
  /** @type {Promise<void>[]} */
  const pending = [];
  page.on('download', (d) => {
    pending.push((async () => {
      // A download that skipped the service worker fails instead of hanging.
      const path = await Promise.race([d.path(), d.failure().then((f) => { throw new Error(`download failed: ${f}`); })]);
      got.set(d.suggestedFilename(), /** @type {string} */ (path));
    })());
  });
  await page.waitForSelector('#accept', { state: 'visible', timeout: 30_000 }).catch(async (e) => {
    // Say what the page showed instead of the offer.
    const shown = await page.evaluate(() => `state=${document.body.dataset.state} text=${document.body.innerText.replace(/\s+/g, ' ').slice(0, 400)}`);
    throw new Error(`no offer to accept: ${shown}`, { cause: e });
  });
  await page.click('#accept');
  await page.waitForFunction(() => document.body.dataset.state === 'received' || document.body.dataset.state === 'failed', null, { timeout: 240_000 });
  assert.equal(await page.evaluate(() => document.body.dataset.state), 'received', await page.textContent('#error') ?? '');
  while (pending.length < files) await new Promise((r) => setTimeout(r, 100));
  await Promise.all(pending);
  return got;
}

/** Every file under `root` with its hash, by path relative to `root`. @param {string} root */
async function tree(root) {
  /** @type {Map<string, string>} */
  const out = new Map();
  const walk = async (/** @type {string} */ d, /** @type {string} */ rel) => {
    for (const n of readdirSync(d)) {
      const p = join(d, n);
      if (statSync(p).isDirectory()) await walk(p, `${rel}${n}/`);
      else out.set(`${rel}${n}`, await sha256(p));
    }
  };
  await walk(root, '');
  return out;
}

test('peerlink send -> browser: a 100 MiB file and a folder arrive with equal hashes', async () => {
  const s = run(['send', ...net(), big]);
  // The link peerlink send prints opens the receiving page.
  const { code, link } = await s.event('code');
  assert.equal(link, `${server.url}/r#${code}`);
  const page = await chrome.page(link);
  const got = await receiveInPage(page, 1);
  assert.equal(await s.exit(), 0, s.stderr);
  assert.equal(await sha256(/** @type {string} */ (got.get('big.bin'))), bigHash);
  assert.match(await page.textContent('#status') ?? '', /verified/);
  await page.close();

  const f = run(['send', ...net(), folder]);
  const c2 = (await f.event('code')).code;
  const p2 = await chrome.page(`${server.url}/r#${c2}`);
  const files = await receiveInPage(p2, folderHashes.size);
  assert.equal(await f.exit(), 0, f.stderr);
  // Progress names the file, its share and the total.
  assert.match(await p2.textContent('#progress-text') ?? '', /\(file [1-5] of 5\): \d+% of .* · all: 100%/);
  for (const [rel, hash] of folderHashes) {
    const path = files.get(rel.split('/').join(' - '));
    assert.ok(path, `${rel} downloaded (got ${[...files.keys()]})`);
    assert.equal(await sha256(path), hash, rel);
  }
  await p2.close();
});

test('browser -> peerlink receive: a 100 MiB file and a folder arrive with equal hashes', async () => {
  const page = await chrome.page(`${server.url}/`);
  await page.setInputFiles('#pick-files', big);
  await page.click('#send-go');
  const code = (await page.textContent('#code', { timeout: 20_000 }))?.trim() ?? '';
  assert.match(code, /^\d+-\w+-\w+-\w+$/);
  assert.equal(await page.getAttribute('#link', 'href'), `${server.url}/r#${code}`);
  assert.equal(await page.locator('#qr img').count(), 1);
  await shot(page, 'send-page');
  const out = scratch('from-browser');
  const r = run(['receive', ...net(), '--out', out, '--yes', code]);
  assert.equal(await r.exit(240_000), 0, r.stderr);
  await page.waitForFunction(() => document.body.dataset.state === 'sent', null, { timeout: 30_000 });
  assert.equal(await sha256(join(out, 'big.bin')), bigHash);
  await page.close();

  const p2 = await chrome.page(`${server.url}/`);
  await p2.setInputFiles('#pick-folder', folder);
  await p2.click('#send-go');
  const c2 = (await p2.textContent('#code', { timeout: 20_000 }))?.trim() ?? '';
  const out2 = scratch('folder-from-browser');
  const r2 = run(['receive', ...net(), '--out', out2, '--yes', c2]);
  assert.equal(await r2.exit(120_000), 0, r2.stderr);
  const got = await tree(out2);
  // A folder picker lists files, not empty folders; every file arrives.
  for (const [rel, hash] of folderHashes) assert.equal(got.get(rel), hash, rel);
  await p2.close();
});

test('a file changed on disk while a browser sends it: both sides stop and name it, nothing is presented as complete', async () => {
  // The browser refuses to read a picked file that changed since it was
  // picked (NotReadableError), which is what lets the sending tab skip the
  // CLI's second hash of every chunk before it goes out.
  const live = join(dir, 'live.bin');
  writeRandom(live, 100 * MiB);
  const page = await chrome.page(`${server.url}/`);
  await page.setInputFiles('#pick-files', live);
  await page.click('#send-go');
  const code = (await page.textContent('#code', { timeout: 20_000 }))?.trim() ?? '';
  const out = scratch('changed');
  const r = run(['receive', ...net(), '--out', out, '--yes', code]);
  await r.event('progress', (e) => e.bytes_done >= 2 * MiB);
  // Same size, other bytes, written in place: the second half.
  const f = openSync(live, 'r+');
  writeSync(f, randomBytes(50 * MiB), 0, 50 * MiB, 50 * MiB);
  closeSync(f);
  assert.notEqual(await r.exit(120_000), 0, r.stderr);
  const done = r.events().find((e) => e.event === 'finished');
  assert.match(done?.message ?? '', /live\.bin changed while it was being sent/);
  await page.waitForSelector('#error:not([hidden])', { timeout: 30_000 });
  assert.match(await page.textContent('#error') ?? '', /live\.bin changed while it was being sent/);
  assert.ok(!readdirSync(out).includes('live.bin'), 'not presented as complete');
  await page.close();
});

test('browser -> browser by code, with a transfer in progress on screen', async () => {
  const s = await chrome.page(`${server.url}/`);
  await s.setInputFiles('#pick-files', big);
  await s.click('#send-go');
  const code = (await s.textContent('#code', { timeout: 20_000 }))?.trim() ?? '';
  const r = await chrome.page(`${server.url}/r#${code}`);
  r.once('download', () => setTimeout(() => shot(r, 'transfer-in-progress').catch(() => {}), 300));
  const got = await receiveInPage(r, 1);
  assert.equal(await sha256(/** @type {string} */ (got.get('big.bin'))), bigHash);
  await s.waitForFunction(() => document.body.dataset.state === 'sent', null, { timeout: 30_000 });
  await s.close();
  await r.close();
});

test('a wrong code fails on both sides, browser receiving and browser sending', async () => {
  // peerlink send, a browser types the wrong words.
  const s = run(['send', ...net(), join(folder, 'one.jpg')]);
  const { code } = await s.event('code');
  const wrong = `${code.split('-')[0]}-zebra-zebra-zebra`;
  const page = await chrome.page(`${server.url}/r#${wrong}`);
  await page.waitForSelector('#error:not([hidden])', { timeout: 30_000 });
  assert.match(await page.textContent('#error') ?? '', /codes do not match/);
  assert.equal(await s.exit(), 4, 'the sender gives the code up');
  const done = s.events().find((e) => e.event === 'finished');
  assert.match(done?.message ?? '', /code/);
  await page.close();

  // A browser sends, peerlink receive types the wrong words.
  const p2 = await chrome.page(`${server.url}/`);
  await p2.setInputFiles('#pick-files', join(folder, 'one.jpg'));
  await p2.click('#send-go');
  const c2 = (await p2.textContent('#code', { timeout: 20_000 }))?.trim() ?? '';
  const out = scratch('wrong');
  const r = run(['receive', ...net(), '--out', out, '--yes', `${c2.split('-')[0]}-zebra-zebra-zebra`]);
  assert.equal(await r.exit(), 4, r.stderr);
  await p2.waitForSelector('#error:not([hidden])', { timeout: 30_000 });
  assert.match(await p2.textContent('#error') ?? '', /codes do not match/);
  assert.deepEqual(readdirSync(out), []);
  // The used-up code goes from the page, and the same file can be sent
  // again under a new one (the button stayed disabled, the code on screen).
  assert.equal(await p2.isHidden('#offer'), true);
  await p2.click('#send-go', { timeout: 5_000 });
  await p2.waitForFunction((old) => { const c = document.getElementById('code')?.textContent?.trim(); return !!c && c !== old; }, c2, { timeout: 20_000 });
  await p2.close();
});

test('a sender leaving mid-transfer is shown, and a sender restarted with the same code finishes the transfer', async () => {
  const s = run(['send', ...net(), big]);
  const { code } = await s.event('code');
  const page = await chrome.page(`${server.url}/r#${code}`);
  /** @type {Promise<string>} */
  const downloaded = new Promise((ok, fail) => {
    page.once('download', (d) => Promise.race([d.path(), d.failure().then((f) => { throw new Error(`download failed: ${f}`); })]).then((p) => ok(/** @type {string} */ (p)), fail));
  });
  await page.waitForSelector('#accept', { state: 'visible', timeout: 30_000 }).catch(async (e) => {
    // Say what the page showed instead of the offer.
    const shown = await page.evaluate(() => `state=${document.body.dataset.state} text=${document.body.innerText.replace(/\s+/g, ' ').slice(0, 400)}`);
    throw new Error(`no offer to accept: ${shown}`, { cause: e });
  });
  await page.click('#accept');
  await page.waitForFunction(() => /** @type {HTMLProgressElement} */ (document.getElementById('progress')).value > 0.05, null, { timeout: 60_000 });
  s.kill('SIGKILL');
  await page.waitForFunction(() => /Connection lost/.test(document.getElementById('status')?.textContent ?? ''), null, { timeout: 30_000 });
  assert.match(await page.textContent('#status') ?? '', /the other side left/);
  const before = await page.evaluate(() => /** @type {HTMLProgressElement} */ (document.getElementById('progress')).value);
  // The sender comes back with the same code; the page, still open, pairs
  // again and asks only for what it has not verified yet.
  const again = run(['send', ...net(), '--code', code, big]);
  await page.waitForFunction(() => document.body.dataset.state === 'received' || document.body.dataset.state === 'failed', null, { timeout: 120_000 });
  assert.equal(await page.evaluate(() => document.body.dataset.state), 'received', await page.textContent('#error') ?? '');
  assert.equal(await again.exit(), 0, again.stderr);
  const done = again.events().find((e) => e.event === 'finished');
  assert.ok(before > 0.05, `progress before the restart: ${before}`);
  // The restarted sender sent less than the whole file: the rest was kept.
  assert.ok(done.bytes_sent < 100 * MiB, JSON.stringify(done));
  assert.equal(await sha256(await downloaded), bigHash);
  await page.close();
});

test('the picker path: received straight into the file showSaveFilePicker returns', async () => {
  const s = run(['send', ...net(), join(folder, 'raw', 'two.dng')]);
  const { link } = await s.event('code');
  // Chromium headless has the File System Access API but no dialog: the
  // picker returns a file in the origin's private file system instead.
  await chrome.context.addInitScript(() => {
    /** @type {any} */ (window).showSaveFilePicker = async () => (await navigator.storage.getDirectory()).getFileHandle('picked.bin', { create: true });
  });
  const page = await chrome.page(link.replace(/#.*/, ''));
  await page.click('#tab-receive');
  await page.fill('#code-input', link.split('#')[1]);
  await page.check('#pick');
  await page.click('#receive-go');
  await page.waitForSelector('#accept', { state: 'visible', timeout: 30_000 }).catch(async (e) => {
    // Say what the page showed instead of the offer.
    const shown = await page.evaluate(() => `state=${document.body.dataset.state} text=${document.body.innerText.replace(/\s+/g, ' ').slice(0, 400)}`);
    throw new Error(`no offer to accept: ${shown}`, { cause: e });
  });
  await page.click('#accept');
  await page.waitForFunction(() => document.body.dataset.state === 'received', null, { timeout: 60_000 });
  assert.equal(await s.exit(), 0, s.stderr);
  // Download the picked file (a disk-backed File, not read into the page) to hash it.
  const download = page.waitForEvent('download');
  await page.evaluate(async () => {
    const file = await (await (await navigator.storage.getDirectory()).getFileHandle('picked.bin')).getFile();
    const a = document.createElement('a');
    a.href = URL.createObjectURL(file);
    a.download = 'picked.bin';
    document.body.append(a);
    a.click();
  });
  const d = await download;
  assert.equal(await sha256(/** @type {string} */ (await d.path())), folderHashes.get('album/raw/two.dng'));
  await page.close();
});
