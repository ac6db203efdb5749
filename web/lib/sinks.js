// Where a browser puts received files (the {@link Sink} of xfer.js):
// - `downloadSink`: a download per file, streamed through the service worker
//   (app/sw.js) so memory stays bounded whatever the size;
// - `fileSystemSink`: straight into files the user picked (File System
//   Access: showSaveFilePicker / showDirectoryPicker), where it exists;
// - `memorySink`: small things, and tests.

/** @typedef {import('./xfer.js').Sink} Sink */
/** @typedef {import('./xfer.js').FileWriter} FileWriter */

/** A folder path as one file name (a download cannot make folders). @param {string} path */
export function flatName(path) {
  return path.split('/').join(' - ');
}

/**
 * Streams each file to the browser's downloads through the service worker
 * registered at `/sw.js`.
 * @param {{ registration: ServiceWorkerRegistration, document?: Document }} opts
 * @returns {Sink}
 */
export function downloadSink({ registration, document = globalThis.document }) {
  return {
    async open(path, size) {
      const worker = registration.active;
      if (!worker) throw new Error('the download helper (service worker) is not running; reload the page');
      const id = crypto.randomUUID();
      const ch = new MessageChannel();
      const port = ch.port1;
      let credit = 0;
      /** @type {(() => void) | null} */
      let wake = null;
      /** @type {string | null} */
      let cancelled = null;
      const registered = new Promise((ok) => {
        port.onmessage = (m) => {
          const x = m.data;
          if (x.type === 'registered') ok(undefined);
          else if (x.type === 'pull') credit++;
          else if (x.type === 'cancelled') cancelled = x.reason;
          wake?.();
          wake = null;
        };
      });
      worker.postMessage({ type: 'download', id, name: flatName(path), size }, [ch.port2]);
      await registered;
      const frame = document.createElement('iframe');
      frame.hidden = true;
      frame.src = `/dl/${id}`;
      document.body.appendChild(frame);
      const until = async (/** @type {() => boolean} */ cond) => {
        while (!cond() && cancelled === null) await new Promise((r) => { wake = () => r(undefined); });
        if (cancelled !== null) throw new Error(`the download of ${path} was cancelled (${cancelled})`);
      };
      const done = () => setTimeout(() => frame.remove(), 60_000);
      return {
        async write(data) {
          await until(() => credit > 0);
          credit--;
          const copy = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data.buffer : data.slice().buffer;
          port.postMessage({ type: 'chunk', data: copy }, [copy]);
        },
        async close() {
          port.postMessage({ type: 'end' });
          done();
        },
        async abort(reason) {
          port.postMessage({ type: 'abort', reason });
          done();
        },
      };
    },
  };
}

/**
 * Writes into a folder the user picked (`showDirectoryPicker`), making
 * subfolders as the paths say, or into one file (`showSaveFilePicker`,
 * for a single-file transfer: `file` is the handle it returned).
 * @param {{ dir?: FileSystemDirectoryHandle, file?: FileSystemFileHandle }} target
 * @returns {Sink}
 */
export function fileSystemSink(target) {
  /** @param {string} path */
  const parentOf = async (path) => {
    const parts = path.split('/');
    const name = /** @type {string} */ (parts.pop());
    let dir = /** @type {FileSystemDirectoryHandle} */ (target.dir);
    for (const p of parts) dir = await dir.getDirectoryHandle(p, { create: true });
    return { dir, name };
  };
  return {
    async open(path) {
      let handle = target.file;
      if (!handle) {
        const { dir, name } = await parentOf(path);
        handle = await dir.getFileHandle(name, { create: true });
      }
      const w = await /** @type {any} */ (handle).createWritable({ keepExistingData: false });
      return {
        write: (data) => w.write(data),
        close: () => w.close(),
        abort: (reason) => w.abort(reason).catch(() => {}),
      };
    },
    async dir(path) {
      let dir = target.dir;
      if (!dir) return;
      for (const p of path.split('/')) dir = await dir.getDirectoryHandle(p, { create: true });
    },
  };
}

/**
 * Keeps files in memory as Blobs (`files` maps path to Blob once closed).
 * @returns {Sink & { files: Map<string, Blob> }}
 */
export function memorySink() {
  /** @type {Map<string, Blob>} */
  const files = new Map();
  return {
    files,
    async open(path) {
      /** @type {BlobPart[]} */
      const parts = [];
      return {
        async write(data) { parts.push(data.slice()); },
        async close() { files.set(path, new Blob(parts)); },
        async abort() { parts.length = 0; },
      };
    },
  };
}
