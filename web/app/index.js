// The send / receive page (`/`, and `/r#CODE` from a link or QR code).

import qrcode from 'qrcode-generator';
import { SendTransfer, ReceiveTransfer } from '../lib/xfer.js';
import { newRoomSecret } from '../lib/e2e.js';
import { Code, CodeError } from '../lib/pair/code.js';
import { $, h, bytes, progressText, canPick, chooseSink, droppedFiles, pickedFiles } from './ui.js';

/** @typedef {import('../lib/xfer.js').Sink} Sink */

const origin = location.origin;
/** @type {{ path: string, blob: File }[]} */
let items = [];
let busy = false;

/** @param {string} which */
function tab(which) {
  for (const t of ['send', 'receive', 'room']) {
    $(t).hidden = t !== which;
    $(`tab-${t}`).setAttribute('aria-selected', String(t === which));
  }
}
$('tab-send').addEventListener('click', () => tab('send'));
$('tab-receive').addEventListener('click', () => tab('receive'));
$('tab-room').addEventListener('click', () => tab('room'));

/** @param {string} text */
function status(text) {
  $('status').textContent = text;
}
/** @param {string} text */
function error(text) {
  const e = $('error');
  e.textContent = text;
  e.hidden = !text;
}
/** @type {import('../lib/xfer.js').Progress | null} */
let shownProgress = null;
/** @type {ReturnType<typeof setTimeout> | null} */
let progressTimer = null;
/**
 * Shows progress at most ten times a second (each update costs the page a
 * layout; a chunk comes many times a second), and the end at once.
 * @param {import('../lib/xfer.js').Progress} p
 */
function progress(p) {
  shownProgress = p;
  if (p.bytesDone >= p.bytesTotal) showProgress();
  else if (!progressTimer) progressTimer = setTimeout(showProgress, 100);
}
function showProgress() {
  if (progressTimer) clearTimeout(progressTimer);
  progressTimer = null;
  const p = shownProgress;
  if (!p) return;
  $('progress-box').hidden = false;
  /** @type {HTMLProgressElement} */ ($('progress')).value = p.bytesTotal ? p.bytesDone / p.bytesTotal : 1;
  $('progress-text').textContent = progressText(p);
}
window.addEventListener('beforeunload', (ev) => {
  if (busy) ev.preventDefault();
});

// ---- send ----

function showItems() {
  const list = $('send-list');
  list.replaceChildren(...items.map((i) => h('li', {}, [i.path, h('span', { class: 'size' }, [bytes(i.blob.size)])])));
  const total = items.reduce((n, i) => n + i.blob.size, 0);
  if (items.length > 1) list.append(h('li', { class: 'total' }, [`${items.length} files`, h('span', { class: 'size' }, [bytes(total)])]));
  /** @type {HTMLButtonElement} */ ($('send-go')).disabled = items.length === 0 || busy;
}

const drop = $('drop');
drop.addEventListener('dragover', (ev) => {
  ev.preventDefault();
  drop.classList.add('over');
});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', async (ev) => {
  ev.preventDefault();
  drop.classList.remove('over');
  if (busy || !ev.dataTransfer) return;
  items = await droppedFiles(ev.dataTransfer);
  showItems();
});
for (const id of ['pick-files', 'pick-folder']) {
  $(id).addEventListener('change', (ev) => {
    const input = /** @type {HTMLInputElement} */ (ev.target);
    items = pickedFiles(input);
    // Picking the same files again (after a failed send) fires 'change' too.
    input.value = '';
    showItems();
  });
}

$('send-go').addEventListener('click', async () => {
  if (busy || !items.length) return;
  busy = true;
  error('');
  /** @type {HTMLButtonElement} */ ($('send-go')).disabled = true;
  const tx = new SendTransfer({ server: origin, items });
  tx.on('code', ({ code }) => {
    $('offer').hidden = false;
    $('code').textContent = code;
    $('origin').textContent = origin;
    $('cli-receive').textContent = `peerlink receive ${code} --server ${origin}`;
    const link = tx.link(origin);
    const a = /** @type {HTMLAnchorElement} */ ($('link'));
    a.href = link;
    a.textContent = link;
    const qr = qrcode(0, 'M');
    qr.addData(link);
    qr.make();
    $('qr').replaceChildren(h('img', { src: qr.createDataURL(6, 8), alt: `QR code of ${link}`, width: '240', height: '240' }));
    status('Waiting for the other side to type the code…');
  });
  tx.on('peer_seen', () => status('Someone is typing the code: checking it…'));
  tx.on('paired', () => status('The codes match. Connecting…'));
  tx.on('connected', () => status('Connected directly. Waiting for the other side to accept…'));
  tx.on('notice', ({ text }) => status(text));
  tx.on('lost', ({ reason }) => status(`Connection lost (${reason}). Waiting for the other side to come back with the same code…`));
  tx.on('progress', progress);
  tx.on('done', ({ bytes: n, seconds }) => status(`Sent ${items.length} file${items.length === 1 ? '' : 's'} (${bytes(n)}) in ${seconds.toFixed(1)} s. The other side verified every chunk.`));
  try {
    await tx.run();
    document.body.dataset.state = 'sent';
  } catch (e) {
    error(/** @type {Error} */ (e).message);
    status('');
    document.body.dataset.state = 'failed';
    // The code is used up: it goes, and the files can be sent again.
    $('offer').hidden = true;
  } finally {
    busy = false;
    showItems();
  }
});
$('copy-link').addEventListener('click', () => navigator.clipboard?.writeText(/** @type {HTMLAnchorElement} */ ($('link')).href));

// ---- receive ----

if (canPick) $('pick-label').hidden = false;

$('receive-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  receive(/** @type {HTMLInputElement} */ ($('code-input')).value);
});

/** @param {string} text */
async function receive(text) {
  if (busy) return;
  error('');
  /** @type {Code} */
  let code;
  try {
    code = Code.parse(text);
  } catch (e) {
    error(e instanceof CodeError ? `That is not a code: ${e.message}` : String(e));
    return;
  }
  busy = true;
  /** @type {Sink | null} */
  let real = null;
  /** @type {Sink} */
  const sink = {
    open: (path, size) => /** @type {Sink} */ (real).open(path, size),
    dir: (path) => real?.dir?.(path) ?? Promise.resolve(),
  };
  const rx = new ReceiveTransfer({ server: origin, code, sink });
  status('Looking for the sender…');
  rx.on('peer_seen', () => status('Found the sender: checking the code…'));
  rx.on('paired', () => status('The codes match. Connecting…'));
  rx.on('connected', () => status('Connected directly.'));
  rx.on('notice', ({ text: t }) => status(t));
  rx.on('lost', ({ reason }) => status(`Connection lost (${reason}). Waiting for the sender to come back…`));
  rx.on('offered', ({ manifest }) => {
    const files = manifest.files();
    $('incoming').hidden = false;
    $('incoming-summary').textContent = `The sender offers ${files.length} file${files.length === 1 ? '' : 's'}, ${bytes(manifest.totalBytes)}:`;
    $('incoming-list').replaceChildren(...files.slice(0, 200).map(([, e]) => h('li', {}, [e.path, h('span', { class: 'size' }, [bytes(e.size)])])));
    status('Accept to start.');
    const accept = async () => {
      $('incoming').hidden = true;
      try {
        const pick = /** @type {HTMLInputElement} */ ($('pick')).checked;
        real = await chooseSink({ pick, files: files.length, firstName: files[0]?.[1].path.split('/').pop() ?? 'download' });
      } catch (e) {
        rx.decline(`could not save: ${/** @type {Error} */ (e).message}`);
        return;
      }
      status('Receiving…');
      rx.accept();
    };
    $('accept').onclick = accept;
    $('decline').onclick = () => {
      $('incoming').hidden = true;
      rx.decline('the receiver said no');
    };
  });
  rx.on('progress', progress);
  rx.on('file_done', ({ path }) => $('done-list').append(h('li', { class: 'ok' }, [`✓ ${path}`, h('span', { class: 'size' }, ['verified'])])));
  rx.on('text', ({ text: t }) => {
    const pre = $('texts');
    pre.hidden = false;
    pre.textContent += `${t}\n`;
  });
  rx.on('done', ({ bytes: n, seconds }) => status(`Received ${bytes(n)} in ${seconds.toFixed(1)} s. Every chunk verified (SHA-256).`));
  try {
    await rx.run();
    document.body.dataset.state = 'received';
  } catch (e) {
    error(/** @type {Error} */ (e).message);
    status('');
    document.body.dataset.state = 'failed';
  } finally {
    busy = false;
    // An offer still on screen can no longer be taken.
    $('incoming').hidden = true;
  }
}

// ---- room ----

$('room-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = /** @type {HTMLInputElement} */ ($('room-input')).value.trim();
  const e2e = /** @type {HTMLInputElement} */ ($('room-e2e')).checked;
  if (name) location.href = `/room/${encodeURIComponent(name)}${e2e ? `#k=${newRoomSecret()}` : ''}`;
});

// A link or QR code: /r#CODE receives at once.
if (location.pathname === '/r' && location.hash.length > 1) {
  const code = decodeURIComponent(location.hash.slice(1));
  history.replaceState(null, '', '/r');
  tab('receive');
  /** @type {HTMLInputElement} */ ($('code-input')).value = code;
  receive(code);
}
