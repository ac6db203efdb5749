// Shared parts of the browser tests: the real `peerlink` binary, Debian's
// Chromium driven by playwright-core, the CLI as the other peer. They run
// only inside a network namespace (scripts/netns-test.sh makes one with
// just loopback): a browser cannot be kept off other interfaces otherwise.

import { before, after } from 'node:test';
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { readFileSync, mkdtempSync, mkdirSync, rmSync, createReadStream } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, '../../..');
export const BIN = process.env.PEERLINK_BIN ?? join(REPO, 'target/debug/peerlink');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
/** Screenshots and other things worth keeping from a run. */
export const ARTIFACTS = process.env.PEERLINK_ARTIFACTS ?? join(REPO, 'target/e2e-artifacts');
mkdirSync(ARTIFACTS, { recursive: true });

/** Refuses to run where a browser could reach a real network. */
export function assertIsolated() {
  const routes = readFileSync('/proc/net/route', 'utf8').split('\n').slice(1).filter(Boolean);
  const outside = routes.filter((l) => {
    const [iface, dest] = l.trim().split(/\s+/);
    return dest === '00000000' && !iface.startsWith('pl');
  });
  if (outside.length) {
    throw new Error('browser tests run only in a network namespace without a way out: use scripts/netns-test.sh');
  }
}

/** Kills what a test started when it ends, by PID. */
const started = new Set();
process.on('exit', () => {
  for (const p of started) try { p.kill('SIGKILL'); } catch { /* gone */ }
});

/**
 * A `peerlink` process; its stdout lines (JSON events with --json) collected.
 * @param {string[]} args
 */
export function run(args, { env = {} } = {}) {
  const proc = spawn(BIN, args, { env: { ...process.env, NO_COLOR: '1', ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  started.add(proc);
  const p = {
    proc,
    /** @type {string[]} */ lines: [],
    stderr: '',
    /** @type {Set<() => void>} */ waiters: new Set(),
    exited: /** @type {Promise<number>} */ (new Promise((ok) => proc.on('exit', (code, sig) => { started.delete(proc); ok(code ?? (sig ? 128 : 1)); }))),
    /** JSON events so far. */
    events() {
      return p.lines.flatMap((l) => { try { return [JSON.parse(l)]; } catch { return []; } });
    },
    /** The first line for which `pred` holds, within `ms`. @param {(l: string) => boolean} pred */
    async line(pred, ms = 30_000, what = 'a line') {
      const deadline = Date.now() + ms;
      for (;;) {
        const hit = p.lines.find(pred);
        if (hit !== undefined) return hit;
        if (Date.now() > deadline) throw new Error(`no ${what} within ${ms} ms; stdout: ${p.lines.join('\n')}\nstderr: ${p.stderr}`);
        await new Promise((r) => { p.waiters.add(r); setTimeout(r, 200); });
      }
    },
    /** The first JSON event `name` for which `pred` holds. */
    async event(name, pred = (/** @type {any} */ _e) => true, ms = 30_000) {
      const l = await p.line((l) => { try { const e = JSON.parse(l); return e.event === name && pred(e); } catch { return false; } }, ms, `${name} event`);
      return JSON.parse(l);
    },
    async exit(ms = 60_000) {
      const t = setTimeout(() => proc.kill('SIGKILL'), ms);
      const code = await p.exited;
      clearTimeout(t);
      return code;
    },
    kill(sig = 'SIGTERM') { proc.kill(sig); },
  };
  let buf = '';
  proc.stdout.on('data', (d) => {
    buf += d;
    const parts = buf.split('\n');
    buf = parts.pop() ?? '';
    p.lines.push(...parts);
    for (const w of p.waiters) w();
    p.waiters.clear();
  });
  proc.stderr.on('data', (d) => { p.stderr += d; });
  return p;
}

/** `peerlink serve` on a free loopback port. */
export async function serve(extra = [], listen = '127.0.0.1:0') {
  // One resume key for every server a test starts: a restarted server
  // takes its clients back under their ids.
  const p = run(['serve', '--listen', listen, '--turn-listen', '127.0.0.1:0', '--turn-external-ip', '127.0.0.1', '--turn-allow-loopback', '--resume-secret', 'e2e-resume-key', ...extra]);
  const line = await new Promise((ok, fail) => {
    const t = setTimeout(() => fail(new Error(`serve did not start: ${p.stderr}`)), 20_000);
    const check = () => {
      const l = (p.stderr + p.lines.join('\n')).split('\n').find((x) => x.includes('listening on'));
      if (l) { clearTimeout(t); ok(l); } else setTimeout(check, 50);
    };
    check();
  });
  const addr = line.trim().split(' ').pop();
  return { url: `http://${addr}`, ws: `ws://${addr}/ws`, addr, proc: p, async healthz() { return (await fetch(`http://${addr}/healthz`)).json(); }, stop: () => { p.kill(); return p.exit(10_000); } };
}

/**
 * Chromium from Debian. `media`: grant camera and microphone so Chromium
 * offers real host candidates (without it, host addresses hide behind
 * mDNS names and a loopback-only namespace has no usable candidate).
 */
export async function browser({ media = true, loopback = true } = {}) {
  const userDataDir = mkdtempSync(join(tmpdir(), 'peerlink-chromium-'));
  const args = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'];
  // The fake media flags count as media permission to Chromium: without
  // them (and without a grant) it hides host addresses behind mDNS names.
  if (media) args.push('--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream');
  if (loopback) args.push('--allow-loopback-in-peer-connection');
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM, headless: true, args, acceptDownloads: true, viewport: { width: 1100, height: 800 },
  });
  return {
    context,
    /** A new tab on `url`, with media permission for its origin unless `media` is false. @param {string} url */
    async page(url) {
      if (media) await context.grantPermissions(['camera', 'microphone'], { origin: new URL(url).origin });
      const page = await context.newPage();
      page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
      // PEERLINK_E2E_CONSOLE=1: every console message, not only errors.
      page.on('console', (m) => { if (m.type() === 'error' || process.env.PEERLINK_E2E_CONSOLE) console.error(`[console ${m.type()}] ${m.text()}`); });
      await page.goto(url);
      return page;
    },
    async close() {
      await context.close();
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Scratch folders made by this test file's run, removed when it ends (sources and downloads of 100 MiB and more). */
const scratchDirs = [];
process.on('exit', () => {
  for (const d of scratchDirs) rmSync(d, { recursive: true, force: true });
});

/** A scratch folder, removed when the test process exits. @param {string} name */
export function scratch(name) {
  const d = mkdtempSync(join(tmpdir(), `peerlink-e2e-${name}-`));
  scratchDirs.push(d);
  return d;
}

/** Pseudo-random bytes written to `path` in 1 MiB pieces (size in bytes). */
export function writeRandom(path, size, seed = 1) {
  mkdirSync(dirname(path), { recursive: true });
  execFileSync('sh', ['-c', `head -c ${size} /dev/urandom > "$0"`, path]);
  void seed;
}

/** SHA-256 of a file, hex. @param {string} path */
export async function sha256(path) {
  const h = createHash('sha256');
  const s = createReadStream(path);
  s.on('data', (d) => h.update(d));
  await once(s, 'end');
  return h.digest('hex');
}

/** Screenshot into the artifacts folder. @param {import('playwright-core').Page} page @param {string} name */
export async function shot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** Waits until `fn` returns truthy (polling), within `ms`. @template T @param {() => Promise<T> | T} fn */
export async function until(fn, ms = 30_000, what = 'condition') {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Registers, for the test file calling it, a `peerlink serve` and a
 * Chromium started before its tests and stopped after them; `ready` gets
 * them once started.
 * @param {(server: Awaited<ReturnType<typeof serve>>, chrome: Awaited<ReturnType<typeof browser>>) => void} ready
 */
export function setup(ready) {
  /** @type {Awaited<ReturnType<typeof serve>> | undefined} */
  let server;
  /** @type {Awaited<ReturnType<typeof browser>> | undefined} */
  let chrome;
  before(async () => {
    assertIsolated();
    server = await serve();
    chrome = await browser();
    ready(server, chrome);
  });
  after(async () => {
    await chrome?.close();
    await server?.stop();
  });
}

/** Types `text` into the room page's chat and sends it. @param {import('playwright-core').Page} page @param {string} text */
export async function say(page, text) {
  await page.fill('#chat-input', text);
  await page.click('#chat-form button');
}
