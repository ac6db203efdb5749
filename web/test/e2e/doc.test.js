// The room page's shared notes and whiteboard (a Y.js document over a data
// channel per document): two tabs edit the notes at once and converge, a
// stroke drawn in one appears in the other, each sees where the other is,
// and a tab that left, edited alone and came back merges with what was
// written meanwhile. A native keeper keeps the notes for tabs that come
// later, across its own restart, and `peerlink doc` prints them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setup, shot, until, run, scratch } from './harness.js';

/** @type {Awaited<ReturnType<typeof import('./harness.js').serve>>} */
let server;
/** @type {Awaited<ReturnType<typeof import('./harness.js').browser>>} */
let chrome;
setup((s, c) => {
  server = s;
  chrome = c;
});

/** @typedef {import('playwright-core').Page} Page */

const notes = (/** @type {Page} */ p) => p.inputValue('#notes');

/** Types `text` at the end (or the start) of `p`'s notes. @param {Page} p @param {string} text */
async function typeAt(p, where, text) {
  await p.focus('#notes');
  await p.keyboard.press(where === 'start' ? 'Control+Home' : 'Control+End');
  await p.keyboard.type(text, { delay: 5 });
}

test('notes and whiteboard: concurrent edits converge, strokes and carets are shared, a tab that was away merges on return', async () => {
  const a = await chrome.page(`${server.url}/room/notes?name=ann`);
  const b = await chrome.page(`${server.url}/room/notes?name=ben`);
  for (const p of [a, b]) await p.waitForSelector('#peers li[data-state="connected"]', { timeout: 20_000 });

  await typeAt(a, 'end', 'Agenda');
  await until(async () => (await notes(b)) === 'Agenda', 10_000, 'ben sees the notes');
  // Both type at once, at either end: both edits everywhere, in one order.
  await Promise.all([typeAt(a, 'end', ' and minutes'), typeAt(b, 'start', 'Team: ')]);
  await until(async () => (await notes(a)) === (await notes(b)) && (await notes(a)).length === 'Team: Agenda and minutes'.length, 10_000, 'converged');
  assert.equal(await notes(a), 'Team: Agenda and minutes');

  // Each sees the other in the document, with the line their caret is on.
  await b.waitForSelector('#editors li:has-text("ann")', { timeout: 10_000 });
  await a.waitForSelector('#editors li:has-text("ben")', { timeout: 10_000 });

  // A stroke drawn on Ann's board appears on Ben's.
  await a.locator('#board').scrollIntoViewIfNeeded();
  const box = /** @type {{ x: number, y: number, width: number, height: number }} */ (await a.locator('#board').boundingBox());
  await a.mouse.move(box.x + 40, box.y + 40);
  await a.mouse.down();
  for (let i = 1; i <= 10; i++) await a.mouse.move(box.x + 40 + i * 20, box.y + 40 + i * 10);
  await a.mouse.up();
  await b.waitForSelector('#board[data-strokes="1"]', { timeout: 10_000 }).catch(async (e) => {
    throw new Error(`${e.message}: ann has ${await a.getAttribute('#board', 'data-strokes')}, ben ${await b.getAttribute('#board', 'data-strokes')}, box ${JSON.stringify(box)}`);
  });
  const points = await b.evaluate(() => /** @type {any} */ (globalThis).peerlinkShared.doc.getArray('strokes').get(0).p.length);
  assert.ok(points >= 20, `the whole stroke (${points / 2} points)`);
  await shot(a, 'room-notes-board');

  // Ben leaves, edits alone, and comes back with what he wrote.
  await b.evaluate(() => /** @type {any} */ (globalThis).peerlinkRoom.leave());
  await a.waitForSelector('#log li:has-text("ben left")', { timeout: 10_000 }).catch(async (e) => {
    throw new Error(`${e.message}\nann's log: ${await a.textContent('#log')}`);
  });
  await typeAt(b, 'end', '\nben, offline');
  await typeAt(a, 'start', '[draft] ');
  assert.ok(!(await notes(a)).includes('offline'), 'not while away');
  await b.evaluate(async () => {
    const { Room } = await import('/lib/room.js');
    const { docChannel } = await import('/lib/doc.js');
    const room = new Room({ server: location.origin, room: 'notes', name: 'ben', channels: [docChannel('room')] });
    /** @type {any} */ (globalThis).peerlinkShared.attach(room);
    await room.join();
  });
  const merged = '[draft] Team: Agenda and minutes\nben, offline';
  await until(async () => (await notes(a)) === merged && (await notes(b)) === merged, 15_000, 'merged on return');
  await a.close();
  await b.close();
});

test('a native keeper (`peerlink keep`) keeps the notes after every tab left, across its own restart; `peerlink doc` prints them', async () => {
  const dir = scratch('keep');
  const keepArgs = ['keep', 'kept', '--dir', dir, '--server', server.ws, '--ice-addr', '127.0.0.1', '--name', 'keeper'];
  let keeper = run(keepArgs);
  try {
    await keeper.line((l) => l.startsWith('* keeping'), 20_000, 'keeping');
    const a = await chrome.page(`${server.url}/room/kept?name=ann`);
    const b = await chrome.page(`${server.url}/room/kept?name=ben`);
    for (const p of [a, b]) await p.waitForFunction(() => document.querySelectorAll('#peers li[data-state="connected"]').length === 2, null, { timeout: 20_000 });
    await until(() => keeper.lines.filter((l) => l.includes('opened peerlink-doc:room')).length === 2, 20_000, 'both tabs share with the keeper');
    await typeAt(a, 'end', 'kept');
    await until(async () => (await notes(b)) === 'kept', 10_000, 'ben has it');
    // At once, at either end of what both have (two inserts into an empty
    // text would be ordered by Y.js's tie-break, not by the test).
    await Promise.all([typeAt(a, 'end', ' by the keeper'), typeAt(b, 'start', '# ')]);
    const text = '# kept by the keeper';
    await until(async () => (await notes(a)) === text && (await notes(b)) === text, 10_000, 'converged').catch(async (e) => {
      throw new Error(`${e.message}: ann ${JSON.stringify(await notes(a))}, ben ${JSON.stringify(await notes(b))}\nkeeper: ${keeper.lines.join('\n')}\n${keeper.stderr}`);
    });
    // From a terminal, while the tabs are there.
    const printed = run(['doc', 'kept', '--server', server.ws, '--ice-addr', '127.0.0.1']);
    assert.equal(await printed.exit(30_000), 0, printed.stderr);
    assert.equal(printed.lines.join('\n'), text);
    await a.close();
    await b.close();

    // Every tab gone: a newcomer gets the notes from the keeper.
    const c = await chrome.page(`${server.url}/room/kept?name=cy`);
    await until(async () => (await notes(c)) === text, 20_000, 'the newcomer has the notes');
    await typeAt(c, 'end', ', and more');
    await until(() => keeper.lines.length > 0 && existsSync(join(dir, 'room.ydoc')), 5_000, 'a file');
    // A board of about 1 MB, four times what one Chromium channel message
    // carries: it goes to the keeper in parts, and comes back in parts.
    const size = await c.evaluate(() => {
      const { doc } = /** @type {any} */ (globalThis).peerlinkShared;
      const strokes = doc.getArray('strokes');
      doc.transact(() => {
        for (let i = 0; i < 600; i++) {
          strokes.push([{ c: '#336699', p: Array.from({ length: 200 }, (_, j) => ((i * 7919 + j * 104729) % 100000) / 100000) }]);
        }
      });
      return strokes.length;
    });
    assert.equal(size, 600);
    await until(() => statSync(join(dir, 'room.ydoc')).size > 1_000_000, 20_000, 'the board kept');
    await c.close();

    // The keeper restarts from its folder.
    keeper.kill();
    await keeper.exit(10_000);
    keeper = run(keepArgs);
    await keeper.line((l) => l.startsWith('* keeping'), 20_000, 'keeping again');
    const followed = run(['doc', 'kept', '--follow', '--server', server.ws, '--ice-addr', '127.0.0.1']);
    const first = await followed.line((l) => l.startsWith('{'), 30_000, 'the text');
    assert.equal(JSON.parse(first).text, `${text}, and more`);
    const d = await chrome.page(`${server.url}/room/kept?name=dee`);
    await until(async () => (await notes(d)) === `${text}, and more`, 20_000, 'after the restart');
    await until(() => d.evaluate(() => /** @type {any} */ (globalThis).peerlinkShared.doc.getArray('strokes').length === 600), 20_000, 'the board after the restart');
    // --follow prints each change.
    await typeAt(d, 'end', '!');
    await followed.line((l) => l.startsWith('{') && JSON.parse(l).text.endsWith('more!'), 10_000, 'the change followed');
    followed.kill();
    await followed.exit(10_000);
    await d.close();
  } finally {
    keeper.kill();
    await keeper.exit(10_000);
  }
});
