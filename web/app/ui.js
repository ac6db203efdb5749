// Small helpers shared by the pages: formatting and the download helper.

import { downloadSink, fileSystemSink } from '../lib/sinks.js';

/** @param {number} n */
export function bytes(n) {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n < 10 && i > 0 ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

/** @param {number | null} s */
export function duration(s) {
  if (s === null || !Number.isFinite(s)) return '…';
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** @param {import('../lib/xfer.js').Progress} p */
export function progressText(p) {
  const pct = p.bytesTotal ? Math.floor((p.bytesDone * 100) / p.bytesTotal) : 100;
  const all = `${pct}% · ${bytes(p.bytesDone)} of ${bytes(p.bytesTotal)} · ${bytes(p.rate)}/s · ${duration(p.etaSeconds)} left`;
  if (p.files <= 1 || !p.current) return all;
  const filePct = p.currentSize ? Math.floor((p.currentDone * 100) / p.currentSize) : 100;
  const fileEta = p.rate > 0 ? (p.currentSize - p.currentDone) / p.rate : null;
  return `${p.current} (file ${Math.min(p.filesDone + 1, p.files)} of ${p.files}): ${filePct}% of ${bytes(p.currentSize)}, ${duration(fileEta)} left · all: ${all}`;
}

/** @param {string} id */
export function $(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`no #${id}`);
  return el;
}

/**
 * An element with text and children.
 * @param {string} tag @param {Record<string, string>} [attrs] @param {(Node | string)[]} [kids]
 */
export function h(tag, attrs = {}, kids = []) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const k of kids) el.append(k);
  return el;
}

/** @type {Promise<ServiceWorkerRegistration> | null} */
let worker = null;

/** The download helper (app/sw.js), registered once per page. */
export function downloadWorker() {
  worker ??= (async () => {
    if (!('serviceWorker' in navigator)) throw new Error('this browser cannot stream downloads (no service workers)');
    await navigator.serviceWorker.register('/sw.js', { scope: '/' });
    return navigator.serviceWorker.ready;
  })();
  return worker;
}

/** Whether this browser can write straight into a file or folder the user picks. */
export const canPick = typeof (/** @type {any} */ (window).showSaveFilePicker) === 'function';

/**
 * Where a transfer's files go: the user's pick (File System Access) when
 * asked for and possible, else streamed downloads.
 * @param {{ pick: boolean, files: number, firstName: string }} o
 * @returns {Promise<import('../lib/xfer.js').Sink>}
 */
export async function chooseSink(o) {
  const w = /** @type {any} */ (window);
  if (o.pick && canPick) {
    if (o.files === 1) return fileSystemSink({ file: await w.showSaveFilePicker({ suggestedName: o.firstName }) });
    return fileSystemSink({ dir: await w.showDirectoryPicker({ mode: 'readwrite' }) });
  }
  return downloadSink({ registration: await downloadWorker() });
}

/**
 * Files from a drop, with their folder paths (folders are walked).
 * @param {DataTransfer} dt
 * @returns {Promise<{ path: string, blob: File }[]>}
 */
export async function droppedFiles(dt) {
  /** @type {{ path: string, blob: File }[]} */
  const out = [];
  /** @param {any} entry @param {string} prefix */
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((ok, err) => entry.file(ok, err));
      out.push({ path: prefix + entry.name, blob: /** @type {File} */ (file) });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, err) => reader.readEntries(ok, err));
        if (!batch.length) break;
        for (const e of batch) await walk(e, `${prefix}${entry.name}/`);
      }
    }
  };
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (entries.length) for (const e of entries) await walk(e, '');
  else for (const f of dt.files) out.push({ path: f.name, blob: f });
  return out;
}

/** Files from an <input type=file> (with `webkitdirectory`, their relative paths). @param {HTMLInputElement} input */
export function pickedFiles(input) {
  return [...(input.files ?? [])].map((f) => ({ path: f.webkitRelativePath || f.name, blob: f }));
}
