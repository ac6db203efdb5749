// Every page's import map resolves every bare specifier the vendored
// modules need (web/vendor/importmap.json, written by scripts/vendor.mjs),
// to a file that is there.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, existsSync } from 'node:fs';

const web = new URL('../../', import.meta.url);
const needed = JSON.parse(readFileSync(new URL('vendor/importmap.json', web), 'utf8')).imports;

for (const page of ['app/index.html', 'app/room.html']) {
  test(`import map of ${page} covers the vendored modules`, () => {
    const html = readFileSync(new URL(page, web), 'utf8');
    const m = /<script type="importmap">(.*?)<\/script>/s.exec(html);
    assert.ok(m, 'an inline import map');
    const imports = JSON.parse(m[1]).imports;
    for (const [spec, url] of Object.entries(needed)) assert.equal(imports[spec], url, spec);
    for (const url of Object.values(imports)) {
      if (!url.endsWith('/')) assert.ok(existsSync(new URL(`.${url}`, web)), url);
    }
  });
}
