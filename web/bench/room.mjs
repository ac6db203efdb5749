// What people do in a room, timed in the web app (issue 14's figures):
//  - a video call: the time from a tab turning its camera on to the first
//    frame decoded by the other tab (getUserMedia with Chromium's fake
//    camera, renegotiation, first keyframe), and the frames decoded per
//    second after that;
//  - shared notes: three tabs make EDITS single-character edits between
//    them at once (each its share, at random places, one Y.js transaction
//    each) and the time until all three hold the same text.
//
//   cargo build --release -p peerlink
//   unshare -n sh -c 'ip link set lo up; node web/bench/room.mjs'    # RUNS=5 EDITS=1000

import { chromium } from 'playwright-core';
import { fileURLToPath } from 'node:url';

const RUNS = Number(process.env.RUNS ?? 5);
const EDITS = Number(process.env.EDITS ?? 1000);
process.env.PEERLINK_BIN ??= fileURLToPath(new URL('../../target/release/peerlink', import.meta.url));
const { assertIsolated, serve, CHROMIUM, BIN } = await import('../test/e2e/harness.js');
if (BIN !== process.env.PEERLINK_BIN) throw new Error(`the harness runs ${BIN}, not ${process.env.PEERLINK_BIN}`);

assertIsolated();
const server = await serve();
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--allow-loopback-in-peer-connection', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream'],
});

/** @param {string} url */
async function newPage(url) {
  const context = await browser.newContext();
  await context.grantPermissions(['camera', 'microphone'], { origin: server.url });
  const page = await context.newPage();
  await page.goto(url);
  return page;
}

/** @param {import('playwright-core').Page} page @param {number} n */
const connectedTo = (page, n) => page.waitForFunction((n) => document.querySelectorAll('#peers li[data-state="connected"]').length === n, n, { timeout: 30_000 });
/** @param {import('playwright-core').Page} page */
const idOf = (page) => page.evaluate(() => /** @type {any} */ (globalThis).peerlinkRoom.id);
/** @param {import('playwright-core').Page} page @param {string} peer */
const decoded = (page, peer) => page.evaluate(async (p) => (await /** @type {any} */ (globalThis).peerlinkRoom.stats(p))?.media.framesDecoded ?? 0, peer);
/** @param {import('playwright-core').Page} page @param {string} peer */
const sent = (page, peer) => page.evaluate(async (p) => (await /** @type {any} */ (globalThis).peerlinkRoom.stats(p))?.media.framesSent ?? 0, peer);
const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));
/** @param {number[]} v @param {number} q */
const pct = (v, q) => [...v].sort((x, y) => x - y)[Math.min(v.length - 1, Math.floor((q / 100) * v.length))];

const setups = [];
const rates = [];
/** frames the camera's tab sent per second, in the same interval */
const sentRates = [];
for (let run = 0; run < RUNS; run++) {
  const a = await newPage(`${server.url}/room/call-${run}?name=ann`);
  const b = await newPage(`${server.url}/room/call-${run}?name=ben`);
  for (const p of [a, b]) await connectedTo(p, 1);
  const ida = await idOf(a);
  const t0 = Date.now();
  await a.click('#camera');
  let first = 0;
  while ((first = await decoded(b, ida)) === 0) {
    if (Date.now() - t0 > 20_000) throw new Error('no frame decoded within 20 s');
    await sleep(10);
  }
  setups.push(Date.now() - t0);
  await sleep(1000);
  const idb = await idOf(b);
  const [f1, g1, s1] = [await decoded(b, ida), await sent(a, idb), Date.now()];
  await sleep(10_000);
  const [f2, g2, s2] = [await decoded(b, ida), await sent(a, idb), Date.now()];
  rates.push(((f2 - f1) * 1000) / (s2 - s1));
  sentRates.push(((g2 - g1) * 1000) / (s2 - s1));
  await a.context().close();
  await b.context().close();
}
console.log(`video call, two tabs, ${RUNS} runs: camera on -> first frame decoded by the other tab p50 ${pct(setups, 50)} ms, max ${Math.max(...setups)} ms; then ${pct(rates, 50).toFixed(1)} frames decoded/s (p50; min ${Math.min(...rates).toFixed(1)}) of ${pct(sentRates, 50).toFixed(1)} sent/s (Chromium's fake camera)`);

const converge = [];
/** time until every tab had made its own edits */
const edits = [];
for (let run = 0; run < RUNS; run++) {
  const tabs = [];
  for (const name of ['ann', 'ben', 'cy']) tabs.push(await newPage(`${server.url}/room/notes-${run}?name=${name}`));
  for (const p of tabs) await connectedTo(p, 2);
  const share = Math.ceil(EDITS / tabs.length);
  const total = share * tabs.length;
  const t0 = Date.now();
  await Promise.all(tabs.map((p, i) => p.evaluate(([share, i]) => {
    const g = /** @type {any} */ (globalThis);
    const text = g.peerlinkShared.doc.getText('notes');
    for (let k = 0; k < share; k++) text.insert(Math.floor(Math.random() * (text.length + 1)), String.fromCharCode(97 + ((i * 7 + k) % 26)));
  }, [share, i])));
  edits.push(Date.now() - t0);
  for (;;) {
    const texts = await Promise.all(tabs.map((p) => p.evaluate(() => /** @type {any} */ (globalThis).peerlinkShared.doc.getText('notes').toString())));
    if (texts.every((t) => t.length === total && t === texts[0])) break;
    if (Date.now() - t0 > 60_000) throw new Error(`no convergence within 60 s: lengths ${texts.map((t) => t.length)}`);
    await sleep(5);
  }
  converge.push(Date.now() - t0);
  for (const p of tabs) await p.context().close();
}
console.log(`shared notes, three tabs, ${EDITS} concurrent edits between them (${Math.ceil(EDITS / 3)} each, one transaction per character), ${RUNS} runs: the same text in all three after p50 ${pct(converge, 50)} ms, max ${Math.max(...converge)} ms (the tabs' own edits done after p50 ${pct(edits, 50)} ms)`);

await browser.close();
await server.stop();
