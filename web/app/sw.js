// peerlink's service worker: turns a stream fed by the page into a download,
// so a received file goes to disk as it arrives instead of into memory.
// The page posts { type: 'download', id, name, size } with a MessagePort,
// then navigates a hidden iframe to /dl/<id>; the response's body is pulled
// from the port a chunk at a time (the page sends one chunk per pull).

/** @type {Map<string, { name: string, size: number | null, port: MessagePort }>} */
const pending = new Map();

self.addEventListener('install', () => /** @type {any} */ (self).skipWaiting());
self.addEventListener('activate', (ev) => /** @type {any} */ (ev).waitUntil(/** @type {any} */ (self).clients.claim()));

self.addEventListener('message', (ev) => {
  const m = /** @type {MessageEvent} */ (ev).data;
  const port = /** @type {MessageEvent} */ (ev).ports[0];
  if (m?.type === 'download' && typeof m.id === 'string' && port) {
    pending.set(m.id, { name: String(m.name), size: typeof m.size === 'number' ? m.size : null, port });
    port.postMessage({ type: 'registered' });
  }
});

self.addEventListener('fetch', (ev) => {
  const fe = /** @type {any} */ (ev);
  const url = new URL(fe.request.url);
  if (url.origin !== self.location.origin || !url.pathname.startsWith('/dl/')) return;
  const id = url.pathname.slice(4);
  const d = pending.get(id);
  if (!d) {
    fe.respondWith(new Response('This download is over (or was never started from this page).', { status: 404 }));
    return;
  }
  pending.delete(id);
  const { port } = d;
  /** @type {(() => void) | null} */
  let wake = null;
  const body = new ReadableStream({
    start(ctrl) {
      port.onmessage = (m) => {
        const x = m.data;
        if (x.type === 'chunk') ctrl.enqueue(new Uint8Array(x.data));
        else if (x.type === 'end') ctrl.close();
        else if (x.type === 'abort') ctrl.error(new Error(x.reason));
        wake?.();
        wake = null;
      };
      port.postMessage({ type: 'started' });
    },
    pull() {
      // One chunk per pull: the page never runs ahead of the disk.
      port.postMessage({ type: 'pull' });
      return new Promise((r) => { wake = () => r(undefined); });
    },
    cancel(reason) {
      port.postMessage({ type: 'cancelled', reason: String(reason ?? 'the download was cancelled') });
    },
  }, { highWaterMark: 2 });
  const headers = new Headers({
    'Content-Type': 'application/octet-stream',
    'Content-Disposition': contentDisposition(d.name),
    'X-Content-Type-Options': 'nosniff',
  });
  if (d.size !== null) headers.set('Content-Length', String(d.size));
  fe.respondWith(new Response(body, { headers }));
});

/**
 * `attachment` with `name` as RFC 6266 gives it: `filename*` in UTF-8 with
 * every character outside RFC 8187's attr-char escaped (encodeURIComponent
 * leaves `'()*`, and a `'` there makes Chromium drop the name for the URL's
 * last segment), and an ASCII `filename` for clients without `filename*`.
 * @param {string} name
 */
function contentDisposition(name) {
  const ext = encodeURIComponent(name).replace(/['()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  const ascii = name.replace(/[^\x20-\x7e]/g, '_').replace(/["\\]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${ext}`;
}
