// Copies the third-party modules the browser loads into web/vendor/: the
// files reachable from what web/lib imports (and their licenses), as they
// are in node_modules. `peerlink serve` embeds them; CI runs this again and
// checks that nothing changed (the committed copy is fresh).
import { readFileSync, writeFileSync, mkdirSync, rmSync, readdirSync, statSync, copyFileSync, existsSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const web = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const vendor = join(web, 'vendor');
const modules = join(web, 'node_modules');

/** Every .js file under `dir`. */
function jsFiles(dir) {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? jsFiles(p) : p.endsWith('.js') ? [p] : [];
  });
}

const importRe = /(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;

/** Bare specifiers (`@noble/...`) imported by a file. */
function imports(file) {
  const text = readFileSync(file, 'utf8');
  return [...text.matchAll(importRe)].map((m) => m[1] ?? m[2] ?? m[3]);
}

/** Packages whose bare specifiers the browser resolves through the import map. */
const BARE = ['yjs', 'y-protocols', 'lib0'];
/** Bare specifier -> file, for the import map (`vendor/importmap.json`). */
const bare = new Map();

/** A package's file for a bare specifier, by its `exports` (browser first). @param {string} spec */
function resolveBare(spec) {
  const [pkg, ...rest] = spec.split('/');
  const json = JSON.parse(readFileSync(join(modules, pkg, 'package.json'), 'utf8'));
  const sub = rest.length ? `./${rest.join('/')}` : '.';
  /** @param {any} t @returns {string | undefined} */
  const pick = (t) => (typeof t === 'string' ? t : t && (pick(t.browser) ?? pick(t.module) ?? pick(t.import) ?? pick(t.default)));
  const target = pick(json.exports?.[sub]) ?? (sub === '.' ? json.module : `${sub}.js`);
  return join(modules, pkg, target);
}

const needed = new Set();
const queue = [];
const visit = (spec, from) => {
  let file;
  if (spec.startsWith('.')) {
    file = resolve(dirname(from), spec);
    // `import('../x.js')` in a JSDoc type of a bundled file names no file.
    if (!existsSync(file)) return;
  } else if (spec.startsWith('@noble/')) file = join(modules, spec);
  else if (BARE.includes(spec.split('/')[0])) {
    file = resolveBare(spec);
    bare.set(spec, file);
  } else return;
  if (!needed.has(file)) {
    needed.add(file);
    queue.push(file);
  }
};
const isVendored = (/** @type {string} */ spec) => spec.startsWith('@noble/') || BARE.includes(spec.split('/')[0]);
for (const f of [...jsFiles(join(web, 'lib')), ...jsFiles(join(web, 'app'))]) {
  for (const spec of imports(f)) if (isVendored(spec)) visit(spec, f);
}
while (queue.length) {
  const f = queue.shift();
  for (const spec of imports(f)) visit(spec, f);
}
rmSync(vendor, { recursive: true, force: true });
const packages = new Set();
for (const f of [...needed].sort()) {
  const rel = relative(modules, f);
  packages.add(rel.split('/').slice(0, rel.startsWith('@') ? 2 : 1).join('/'));
  mkdirSync(dirname(join(vendor, rel)), { recursive: true });
  copyFileSync(f, join(vendor, rel));
}
for (const p of packages) {
  copyFileSync(join(modules, p, 'LICENSE'), join(vendor, p, 'LICENSE'));
  const version = JSON.parse(readFileSync(join(modules, p, 'package.json'), 'utf8')).version;
  writeFileSync(join(vendor, p, 'VERSION'), `${p}@${version} (npm), copied by web/scripts/vendor.mjs\n`);
}
// The QR code generator (the send page's code as a QR): one ES module whose
// header carries its MIT licence.
const qr = join(modules, 'qrcode-generator');
mkdirSync(join(vendor, 'qrcode-generator'), { recursive: true });
copyFileSync(join(qr, 'dist', 'qrcode.mjs'), join(vendor, 'qrcode-generator', 'qrcode.mjs'));
const qrVersion = JSON.parse(readFileSync(join(qr, 'package.json'), 'utf8')).version;
writeFileSync(join(vendor, 'qrcode-generator', 'VERSION'), `qrcode-generator@${qrVersion} (npm, MIT), copied by web/scripts/vendor.mjs\n`);
packages.add('qrcode-generator');
// The bare specifiers the pages' import maps must resolve (checked by
// test/unit/importmap.test.js against every page).
const map = Object.fromEntries([...bare].sort(([a], [b]) => a.localeCompare(b)).map(([spec, f]) => [spec, `/vendor/${relative(modules, f)}`]));
writeFileSync(join(vendor, 'importmap.json'), `${JSON.stringify({ imports: map }, null, 2)}\n`);
console.log(`vendored ${needed.size} files of ${[...packages].join(', ')}`);
