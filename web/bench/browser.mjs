// Throughput and memory of transfers through the web app, in one run:
// native -> Chromium, Chromium -> native, Chromium -> Chromium (two tabs),
// beside a bare W3C data channel between two tabs (the reference: 256 MiB
// in 64 KiB messages, bufferedAmount <= 1 MiB, low threshold 256 KiB, as
// ../shared/tools/refbench measures Chromium).
//
//   cargo build --release -p peerlink
//   unshare -n sh -c 'ip link set lo up; node web/bench/browser.mjs'     # SIZE_MIB=1024 by default
//
// Figures: MB/s = 10^6 bytes/s from the receiver's accept (a browser) or
// start (the CLI: pairing included) to its last byte verified and written; peak JS heap of the receiving tab (CDP
// Performance.getMetrics JSHeapUsedSize, sampled every 250 ms); peak RSS
// (VmHWM) of the largest renderer process.

import { chromium } from 'playwright-core';
import { readFileSync, rmSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';

const SIZE = Number(process.env.SIZE_MIB ?? 1024) * (1 << 20);
const REF_SIZE = Number(process.env.REF_MIB ?? 256) * (1 << 20);
// CASES=n2c,c2n,c2c,c2n-bare,n2c-bare,ref (all but the two -bare by default) picks the rows to measure.
// PROFILE=1 prints where the transferring tab's main thread spent its time.
const CASES = new Set((process.env.CASES ?? 'n2c,c2n,c2c,ref').split(','));
// The release build, unless PEERLINK_BIN names another: set before the
// harness is loaded, which reads it once (a static import would load it
// first, and the bench would time the debug build).
process.env.PEERLINK_BIN ??= fileURLToPath(new URL('../../target/release/peerlink', import.meta.url));
const { assertIsolated, serve, run, scratch, writeRandom, sha256, REPO, CHROMIUM, BIN } = await import('../test/e2e/harness.js');
if (BIN !== process.env.PEERLINK_BIN) throw new Error(`the harness runs ${BIN}, not ${process.env.PEERLINK_BIN}`);

assertIsolated();
const server = await serve();
const net = ['--server', server.ws, '--ice-addr', '127.0.0.1', '--json'];
const dir = scratch('bench');
const file = join(dir, 'big.bin');
writeRandom(file, SIZE);
const hash = await sha256(file);

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--allow-loopback-in-peer-connection', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream'],
});
const cdp = await browser.newBrowserCDPSession();

async function newPage(/** @type {string} */ url) {
  const context = await browser.newContext({ acceptDownloads: true });
  await context.grantPermissions(['camera', 'microphone'], { origin: server.url });
  const page = await context.newPage();
  await page.goto(url);
  return { context, page };
}

/** Peak RSS (VmHWM, MiB) of Chromium's renderer processes. */
async function rendererPeakMiB() {
  const { processInfo } = /** @type {any} */ (await cdp.send('SystemInfo.getProcessInfo'));
  let peak = 0;
  for (const p of processInfo) {
    if (p.type !== 'renderer') continue;
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${p.id}/status`, 'utf8'));
      if (m) peak = Math.max(peak, Number(m[1]) / 1024);
    } catch { /* gone */ }
  }
  return peak;
}

/** Samples the page's JS heap until stopped; returns the peak (MiB). @param {import('playwright-core').Page} page */
async function heapSampler(page) {
  const s = await page.context().newCDPSession(page);
  await s.send('Performance.enable');
  let peak = 0;
  let on = true;
  const loop = (async () => {
    while (on) {
      const { metrics } = /** @type {any} */ (await s.send('Performance.getMetrics'));
      const heap = metrics.find((/** @type {any} */ m) => m.name === 'JSHeapUsedSize')?.value ?? 0;
      peak = Math.max(peak, heap / (1 << 20));
      await new Promise((r) => setTimeout(r, 250));
    }
  })();
  return async () => { on = false; await loop; return peak; };
}

/**
 * PROFILE=1: a CPU profile of the page's main thread (CDP Profiler) while
 * it transfers; the stop function prints how long the thread was busy and
 * where that time went (self time per function, top 12).
 * @param {import('playwright-core').Page} page @param {string} what
 */
async function profiler(page, what) {
  if (!process.env.PROFILE) return async () => {};
  const s = await page.context().newCDPSession(page);
  await s.send('Profiler.enable');
  await s.send('Profiler.setSamplingInterval', { interval: 200 });
  await s.send('Profiler.start');
  return async () => {
    const { profile } = /** @type {any} */ (await s.send('Profiler.stop'));
    const nodes = new Map(profile.nodes.map((/** @type {any} */ n) => [n.id, n]));
    /** @type {Map<string, number>} */
    const self = new Map();
    let total = 0;
    profile.samples.forEach((/** @type {number} */ id, /** @type {number} */ i) => {
      const f = nodes.get(id).callFrame;
      const key = `${f.functionName || '(anonymous)'} ${f.url.split('/').pop()}${f.lineNumber >= 0 ? `:${f.lineNumber + 1}` : ''}`.trim();
      self.set(key, (self.get(key) ?? 0) + profile.timeDeltas[i]);
      total += profile.timeDeltas[i];
    });
    const idle = self.get('(idle)') ?? 0;
    console.log(`\n${what}: main thread busy ${((total - idle) / 1e6).toFixed(2)} s of ${(total / 1e6).toFixed(2)} s`);
    for (const [k, t] of [...self].filter(([k]) => k !== '(idle)').sort((a, b) => b[1] - a[1]).slice(0, 12)) {
      console.log(`${(t / 1e3).toFixed(0).padStart(8)} ms  ${k}`);
    }
  };
}

/** Accepts in `page` and waits for the end; returns seconds and the download's path. @param {import('playwright-core').Page} page @param {string} what */
async function receiveHere(page, what) {
  const dl = page.waitForEvent('download', { timeout: 60_000 });
  await page.waitForSelector('#accept', { state: 'visible', timeout: 60_000 });
  const stop = await heapSampler(page);
  const stopProfile = await profiler(page, what);
  const t0 = performance.now();
  await page.click('#accept');
  await page.waitForFunction(() => document.body.dataset.state === 'received' || document.body.dataset.state === 'failed', null, { timeout: 1_800_000, polling: 100 });
  const seconds = (performance.now() - t0) / 1000;
  if (await page.evaluate(() => document.body.dataset.state) !== 'received') throw new Error(`failed: ${await page.textContent('#error')}`);
  await stopProfile();
  const d = await dl;
  const path = /** @type {string} */ (await d.path());
  const heap = await stop();
  return { seconds, path, heap };
}

/** A bare data channel: the library's Room connects, then raw RTCDataChannel sends of 64 KiB
 * (bufferedAmount <= 1 MiB, low threshold 256 KiB) or counts what arrives. */
const bareChannel = async (/** @type {any} */ o) => {
  const { Room } = await import('/lib/room.js');
  const room = new Room({ server: o.server, room: o.room, channels: [{ label: 'bulk', reliability: 'reliable' }] });
  /** @type {any} */
  const ch = await new Promise((ok) => { room.on('channel_open', (c) => ok(c)); room.join(); });
  const raw = ch.raw;
  raw.binaryType = 'arraybuffer';
  if (o.sender) {
    const msg = new Uint8Array(65536);
    raw.bufferedAmountLowThreshold = 262144;
    let sent = 0;
    while (sent < o.size) {
      if (raw.bufferedAmount > 1048576) await new Promise((r) => raw.addEventListener('bufferedamountlow', r, { once: true }));
      raw.send(msg);
      sent += msg.length;
    }
    await new Promise((r) => setTimeout(r, 60_000));
    return 0;
  }
  return new Promise((ok) => {
    let got = 0;
    let t0 = 0;
    raw.addEventListener('message', (/** @type {MessageEvent} */ e) => {
      if (!t0) t0 = performance.now();
      got += e.data.byteLength;
      if (got >= o.size) ok((performance.now() - t0) / 1000);
    });
  });
};

const rows = [];
const mbps = (/** @type {number} */ bytes, /** @type {number} */ s) => bytes / s / 1e6;

// native -> Chromium
if (CASES.has('n2c')) {
  const s = run(['send', ...net, file]);
  const { link } = await s.event('code');
  const { context, page } = await newPage(link);
  const r = await receiveHere(page, 'receiving tab (native -> Chromium)');
  if (await s.exit() !== 0) throw new Error(s.stderr);
  const ok = (await sha256(r.path)) === hash;
  rows.push({ what: 'native -> Chromium', mbps: mbps(SIZE, r.seconds), heap: r.heap, rss: await rendererPeakMiB(), ok });
  rmSync(r.path, { force: true });
  await context.close();
}

// Chromium -> native
if (CASES.has('c2n')) {
  const { context, page } = await newPage(`${server.url}/`);
  await page.setInputFiles('#pick-files', file);
  await page.click('#send-go');
  const code = (await page.textContent('#code', { timeout: 30_000 }))?.trim() ?? '';
  const out = scratch('bench-out');
  const stop = await heapSampler(page);
  const stopProfile = await profiler(page, 'sending tab (Chromium -> native)');
  const t0 = performance.now();
  const r = run(['receive', ...net, '--out', out, '--yes', code]);
  if (await r.exit(1_800_000) !== 0) throw new Error(r.stderr);
  await stopProfile();
  const seconds = (performance.now() - t0) / 1000;
  const ok = (await sha256(join(out, 'big.bin'))) === hash;
  rows.push({ what: 'Chromium -> native (timed from the receiver\'s start: pairing included)', mbps: mbps(SIZE, seconds), heap: await stop(), rss: await rendererPeakMiB(), ok });
  rmSync(out, { recursive: true, force: true });
  await context.close();
}

// Chromium -> Chromium, two tabs
if (CASES.has('c2c')) {
  const a = await newPage(`${server.url}/`);
  await a.page.setInputFiles('#pick-files', file);
  await a.page.click('#send-go');
  const code = (await a.page.textContent('#code', { timeout: 30_000 }))?.trim() ?? '';
  const b = await newPage(`${server.url}/r#${code}`);
  const r = await receiveHere(b.page, 'receiving tab (Chromium -> Chromium)');
  const ok = (await sha256(r.path)) === hash;
  rows.push({ what: 'Chromium -> Chromium (two tabs)', mbps: mbps(SIZE, r.seconds), heap: r.heap, rss: await rendererPeakMiB(), ok });
  rmSync(r.path, { force: true });
  await a.context.close();
  await b.context.close();
}

// A bare channel from a tab to a native peer (crates/peer/examples/bulk_sink.rs,
// built with `cargo build --release -p peerlink-peer --example bulk_sink`):
// what the transfer rows run on.
if (CASES.has('c2n-bare')) {
  const sink = spawn(join(REPO, 'target/release/examples/bulk_sink'), [server.ws, 'bare-native', String(REF_SIZE)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  sink.stdout.on('data', (d) => { out += d; });
  const done = new Promise((ok) => sink.on('exit', ok));
  while (!out.includes('joined')) await new Promise((r) => setTimeout(r, 50));
  const a = await newPage(`${server.url}/`);
  void a.page.evaluate(bareChannel, { server: server.url, room: 'bare-native', size: REF_SIZE, sender: true }).catch(() => {});
  await done;
  const m = /([\d.]+) MB\/s/.exec(out);
  rows.push({ what: `bare data channel, Chromium -> native (${REF_SIZE >> 20} MiB)`, mbps: m ? Number(m[1]) : NaN, heap: NaN, rss: NaN, ok: Boolean(m) });
  await a.context.close();
}

// A bare channel from a native peer into a tab (the same example, --send).
if (CASES.has('n2c-bare')) {
  const source = spawn(join(REPO, 'target/release/examples/bulk_sink'), [server.ws, 'bare-native-out', String(REF_SIZE), '--send'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  source.stdout.on('data', (d) => { out += d; });
  const done = new Promise((ok) => source.on('exit', ok));
  while (!out.includes('joined')) await new Promise((r) => setTimeout(r, 50));
  const a = await newPage(`${server.url}/`);
  const seconds = /** @type {number} */ (await a.page.evaluate(bareChannel, { server: server.url, room: 'bare-native-out', size: REF_SIZE, sender: false }));
  rows.push({ what: `bare data channel, native -> Chromium (${REF_SIZE >> 20} MiB)`, mbps: mbps(REF_SIZE, seconds), heap: NaN, rss: NaN, ok: true });
  await done;
  await a.context.close();
}

// Reference: a bare data channel between two tabs (connected through the
// library's Room, then raw RTCDataChannel sends).
if (CASES.has('ref')) {
  const a = await newPage(`${server.url}/`);
  const b = await newPage(`${server.url}/`);
  const receiving = b.page.evaluate(bareChannel, { server: server.url, room: 'bare-reference', size: REF_SIZE, sender: false });
  void a.page.evaluate(bareChannel, { server: server.url, room: 'bare-reference', size: REF_SIZE, sender: true }).catch(() => {});
  const seconds = /** @type {number} */ (await receiving);
  rows.push({ what: `reference: bare data channel, two tabs (${REF_SIZE >> 20} MiB)`, mbps: mbps(REF_SIZE, seconds), heap: NaN, rss: NaN, ok: true });
  await a.context.close();
  await b.context.close();
}

await browser.close();
await server.stop();
rmSync(dir, { recursive: true, force: true });

const ref = CASES.has('ref') ? rows[rows.length - 1].mbps : NaN;
console.log(`\n${SIZE >> 20} MiB through the web app (peerlink ${BIN}), Chromium ${CHROMIUM}`);
console.log('| transfer | MB/s | x reference | peak JS heap MiB | peak renderer RSS MiB | hash ok |');
console.log('|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.what} | ${r.mbps.toFixed(1)} | ${(r.mbps / ref).toFixed(2)} | ${Number.isNaN(r.heap) ? '-' : r.heap.toFixed(1)} | ${Number.isNaN(r.rss) ? '-' : r.rss.toFixed(0)} | ${r.ok} |`);
}
