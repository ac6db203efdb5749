// The room page (`/room/NAME`): who is here and how each connection runs,
// chat over the `chat` channel (the same as `peerlink chat`), a call
// (camera, microphone, screen: a tile per stream with its connection's
// path), and files dropped to one peer or everyone (the transfer protocol
// on a pair of channels per transfer, docs/PROTOCOL.md "Peers").

import * as Y from 'yjs';
import { Room } from '../lib/room.js';
import { SharedDoc, docChannel } from '../lib/doc.js';
import { reliable } from '../lib/channel.js';
import { SendTransfer, ReceiveTransfer, ChannelLink } from '../lib/xfer.js';
import { CTL_LABEL } from '../lib/transfer/wire.js';
import { $, h, bytes, progressText, chooseSink, droppedFiles, pickedFiles } from './ui.js';

/** @typedef {import('../lib/channel.js').Channel} Channel */

const roomName = decodeURIComponent(location.pathname.slice('/room/'.length));
$('room-name').textContent = roomName;
document.title = `${roomName} · peerlink`;
const myName = new URLSearchParams(location.search).get('name')?.slice(0, 64) || localStorage.getItem('peerlink-name') || `guest-${Math.floor(Math.random() * 9000 + 1000)}`;
localStorage.setItem('peerlink-name', myName);

// A server run with --join-secret needs a token: the link carries it (`?token=`).
const token = new URLSearchParams(location.search).get('token') ?? undefined;
// An end-to-end encrypted room: the secret is in the fragment (`#k=`),
// which browsers never send to the server.
const roomSecret = new URLSearchParams(location.hash.slice(1)).get('k') || undefined;
$('e2e').hidden = !roomSecret;
// `?relay=1`: offer relayed candidates only, so the other peers never learn
// this machine's addresses (as the native `--relay-only`).
const iceTransportPolicy = new URLSearchParams(location.search).get('relay') === '1' ? 'relay' : 'all';
const room = new Room({ server: location.origin, room: roomName, name: myName, token, roomSecret, iceTransportPolicy, channels: [reliable('chat'), docChannel('room')] });
// The room's notes and whiteboard: one Y.js document shared over its own channel.
const shared = new SharedDoc('room');
shared.attach(room);
// For the browser console (and the tests): the room and document this page runs.
Object.assign(globalThis, { peerlinkRoom: room, peerlinkShared: shared, Y });
/** @type {Map<string, Channel>} */
const chats = new Map();
/** @type {Map<string, { li: HTMLElement, state: string, path: string, safety: string }>} */
const peers = new Map();

/** @param {string} text */
function status(text) {
  $('status').textContent = text;
}
/** @param {string} text */
function error(text) {
  $('error').textContent = text;
  $('error').hidden = !text;
}

/** Names of members seen, kept after they leave (to say who left). @type {Map<string, string>} */
const names = new Map();

/** @param {string} peer */
function nameOf(peer) {
  return room.members.get(peer)?.name || names.get(peer) || peer;
}

/** @param {string} who @param {string} text @param {string} [cls] */
function log(who, text, cls = '') {
  const li = h('li', { class: cls }, [h('b', {}, [who]), ' ', text]);
  $('log').append(li);
  li.scrollIntoView({ block: 'nearest' });
}

const PATHS = { host: 'direct', srflx: 'direct, through a NAT', relay: 'relayed by the TURN server' };

function renderPeers() {
  const select = /** @type {HTMLSelectElement} */ ($('to'));
  const chosen = select.value;
  select.replaceChildren(h('option', { value: '' }, ['everyone']));
  for (const [peer, p] of peers) {
    p.li.replaceChildren(
      h('span', { class: 'name' }, [nameOf(peer)]),
      h('span', { class: `state ${p.state}` }, [p.state]),
      h('span', { class: 'path' }, [p.path]),
      h('span', { class: 'safety' }, [p.safety ? `safety number ${p.safety}` : '']),
    );
    p.li.dataset.peer = peer;
    p.li.dataset.state = p.state;
    select.append(h('option', { value: peer }, [nameOf(peer)]));
  }
  for (const t of tiles.values()) if (t.peer) caption(t);
  // Someone chosen who left stays chosen (marked): falling back to
  // everyone would offer the next file to people it was not meant for.
  if (chosen && !peers.has(chosen)) select.append(h('option', { value: chosen }, [`${nameOf(chosen)} (left)`]));
  select.value = chosen;
  $('peers').dataset.count = String(peers.size);
}

room.on('peer_joined', ({ peer, name }) => {
  if (name) names.set(peer, name);
  const li = h('li', {});
  $('peers').append(li);
  peers.set(peer, { li, state: 'connecting', path: '', safety: '' });
  renderPeers();
  log('·', `${nameOf(peer)} joined`, 'notice');
});
room.on('peer_left', ({ peer }) => {
  for (const [key, t] of tiles) if (t.peer === peer) dropTile(key);
  peers.get(peer)?.li.remove();
  peers.delete(peer);
  chats.delete(peer);
  renderPeers();
  log('·', `${nameOf(peer)} left`, 'notice');
});
room.on('state', ({ peer, state }) => {
  const p = peers.get(peer);
  if (!p) return;
  p.state = state;
  renderPeers();
  if (state === 'failed') {
    room.stats(peer).then((s) => log('·', `no path to ${nameOf(peer)}: ${s?.failure ?? 'the connection checks failed'}`, 'notice'));
  }
});
room.on('channel_open', (ch) => {
  if (ch.label === 'chat') {
    chats.set(ch.peer, ch);
    ch.on('message', (m) => {
      if (typeof m === 'string') log(nameOf(ch.peer), m);
    });
    ch.on('close', () => {
      if (chats.get(ch.peer) === ch) chats.delete(ch.peer);
    });
  } else if (ch.label.startsWith(`${CTL_LABEL}:`) && !ch.label.startsWith(`${CTL_LABEL}:${room.id}-`)) {
    // Transfers we start are named after our id; the rest are offers to us.
    incoming(ch);
  }
});
room.on('auth_failed', ({ peer }) => log('·', `${nameOf(peer)} is not connected: their signaling did not carry this room's secret (a wrong link, or a server that changed it)`, 'notice'));
room.on('server_message_refused', ({ from }) => log('·', `a message from ${nameOf(from)} through the server was refused: not sealed with this room's secret`, 'notice'));
room.on('reconnecting', ({ inMs, reason }) => status(`Lost the server (${reason}); trying again in ${Math.round(inMs / 1000)} s…`));
room.on('rejoined', () => status(''));
room.on('closed', ({ reason }) => {
  error(`Left the room: ${reason}`);
  // Nobody receives them any more: camera, microphone and sharing go off.
  for (const what of /** @type {const} */ (['camera', 'microphone', 'screen'])) stopLocal(what);
});
room.on('server_error', ({ code, message }) => {
  // The server is restarting or draining: the room carries on meanwhile.
  if (code === 'shutting_down') status('The server is going away; reconnecting…');
  else error(message);
});

// Each connection's path, from getStats, every two seconds.
setInterval(async () => {
  for (const [peer, p] of peers) {
    const s = await room.stats(peer);
    const path = s?.path ? `${PATHS[s.path.kind]}${s.rttMs != null ? ` · ${Math.round(s.rttMs)} ms` : ''}` : '';
    // Only in a secret room is the connection authenticated end to end.
    const safety = roomSecret && s?.state === 'connected' ? s.safetyNumber ?? '' : '';
    if (path !== p.path || safety !== p.safety) {
      p.path = path;
      p.safety = safety;
      renderPeers();
    }
  }
}, 2000);

$('chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($('chat-input'));
  const text = input.value.replace(/[\r\n]+/g, ' ').trim();
  if (!text) return;
  input.value = '';
  log(myName, text, 'mine');
  for (const ch of chats.values()) ch.send(text).catch((e) => log('·', `not delivered to ${nameOf(ch.peer)}: ${e.message}`, 'notice'));
  if (chats.size === 0) log('·', 'nobody is connected yet', 'notice');
});

// ---- call ----

/** Our camera and microphone go in one stream (they play together), the screen in another. */
const mine = { av: new MediaStream(), screen: new MediaStream() };
/** @type {Map<'camera' | 'microphone' | 'screen', MediaStreamTrack>} */
const local = new Map();
/**
 * A tile per stream: ours (`me|av`, `me|screen`) and each peer's (`PEER|STREAM`).
 * @typedef {{ fig: HTMLElement, video: HTMLVideoElement, label: HTMLElement, stream: MediaStream, peer: string | null, tracks: Set<MediaStreamTrack> }} Tile
 * @type {Map<string, Tile>}
 */
const tiles = new Map();

/** @param {string} key @param {MediaStream} stream @param {string | null} peer */
function tileFor(key, stream, peer) {
  let t = tiles.get(key);
  if (!t) {
    const video = /** @type {HTMLVideoElement} */ (h('video', { autoplay: '', playsinline: '' }));
    video.srcObject = stream;
    video.muted = peer === null; // no echo of our own microphone
    const label = h('figcaption');
    const fig = h('figure', { class: 'tile', 'data-peer': peer ?? 'me', 'data-key': key }, [video, label]);
    $('tiles').append(fig);
    t = { fig, video, label, stream, peer, tracks: new Set() };
    tiles.set(key, t);
  }
  return t;
}

/** @param {string} key */
function dropTile(key) {
  tiles.get(key)?.fig.remove();
  tiles.delete(key);
}

/** @param {Tile} t */
function caption(t) {
  const audioOnly = t.stream.getVideoTracks().length === 0 ? ' (audio only)' : '';
  if (!t.peer) {
    t.label.textContent = `${t.stream === mine.screen ? 'Your screen' : 'You'}${audioOnly}`;
    return;
  }
  const path = peers.get(t.peer)?.path;
  t.label.textContent = `${nameOf(t.peer)}${audioOnly}${path ? ` · ${path}` : ''}`;
}

room.on('track', ({ peer, track, stream }) => {
  const t = tileFor(`${peer}|${stream.id}`, stream, peer);
  t.tracks.add(track);
  caption(t);
});
room.on('track_removed', ({ peer, track, stream }) => {
  const key = `${peer}|${stream.id}`;
  const t = tiles.get(key);
  if (!t) return;
  t.tracks.delete(track);
  if (t.tracks.size === 0) dropTile(key);
  else caption(t);
});

/** Our own tiles: a preview of what we send, when it has video. */
function showMine() {
  for (const [key, stream] of /** @type {const} */ ([['me|av', mine.av], ['me|screen', mine.screen]])) {
    if (stream.getVideoTracks().length === 0) dropTile(key);
    else caption(tileFor(key, stream, null));
  }
}

const DEVICE = { camera: 'camera', microphone: 'microphone', screen: 'screen sharing' };

/** Turns a camera, microphone or screen share on (sent to everyone, renegotiating) or off. @param {'camera' | 'microphone' | 'screen'} what */
async function toggle(what) {
  if (local.has(what)) {
    stopLocal(what);
    return;
  }
  const button = $(what);
  button.setAttribute('disabled', '');
  try {
    const media = navigator.mediaDevices;
    if (!media) throw new Error('this page is not a secure context (open it over https or on localhost)');
    const got = what === 'screen' ? await media.getDisplayMedia({ video: true })
      : await media.getUserMedia(what === 'camera' ? { video: true } : { audio: true });
    const track = got.getTracks()[0];
    const stream = what === 'screen' ? mine.screen : mine.av;
    stream.addTrack(track);
    local.set(what, track);
    // Sharing stopped from the browser's own bar, or the device unplugged.
    track.addEventListener('ended', () => stopLocal(what));
    room.addTrack(track, stream);
    button.setAttribute('aria-pressed', 'true');
    error('');
    showMine();
  } catch (e) {
    const why = /** @type {Error} */ (e);
    error(`No ${DEVICE[what]}: ${why.name === 'NotAllowedError' ? 'permission was refused' : why.name === 'NotFoundError' ? 'none was found' : why.message}`);
  } finally {
    button.removeAttribute('disabled');
  }
}

/** @param {'camera' | 'microphone' | 'screen'} what */
function stopLocal(what) {
  const track = local.get(what);
  if (!track) return;
  local.delete(what);
  room.removeTrack(track);
  track.stop();
  (what === 'screen' ? mine.screen : mine.av).removeTrack(track);
  $(what).setAttribute('aria-pressed', 'false');
  showMine();
}

for (const what of /** @type {const} */ (['camera', 'microphone', 'screen'])) {
  $(what).addEventListener('click', () => toggle(what));
}

// ---- notes and whiteboard (a Y.js document: Y.Text 'notes', Y.Array 'strokes') ----

const COLORS = ['#0b66d6', '#c62828', '#1a7f37', '#8e24aa', '#ef6c00', '#00838f'];
const myColor = COLORS[[...myName].reduce((n, c) => n + c.charCodeAt(0), 0) % COLORS.length];
shared.awareness.setLocalState({ name: myName, color: myColor, cursor: null, pointer: null });
const notes = shared.doc.getText('notes');
const notesBox = /** @type {HTMLTextAreaElement} */ ($('notes'));
let notesValue = '';

// Local edits: the difference from what the box showed, as one change.
notesBox.addEventListener('input', () => {
  const next = notesBox.value;
  let start = 0;
  while (start < notesValue.length && start < next.length && notesValue[start] === next[start]) start++;
  let endOld = notesValue.length;
  let endNew = next.length;
  while (endOld > start && endNew > start && notesValue[endOld - 1] === next[endNew - 1]) { endOld--; endNew--; }
  shared.doc.transact(() => {
    if (endOld > start) notes.delete(start, endOld - start);
    if (endNew > start) notes.insert(start, next.slice(start, endNew));
  }, 'local');
  notesValue = next;
});
for (const ev of ['input', 'keyup', 'click', 'select']) {
  notesBox.addEventListener(ev, () => shared.awareness.setLocalStateField('cursor', notesBox.selectionStart));
}

/** An index in the old text, moved by a change (`delta`) to the same place in the new. @param {number} i @param {any[]} delta */
function moved(i, delta) {
  let at = 0;
  let shift = 0;
  for (const d of delta) {
    if (d.retain) at += d.retain;
    else if (d.insert) { if (at < i) shift += typeof d.insert === 'string' ? d.insert.length : 1; }
    else if (d.delete) { if (at < i) shift -= Math.min(d.delete, i - at); at += d.delete; }
  }
  return i + shift;
}

// Others' edits: shown without moving our caret off the text it was in.
notes.observe((ev) => {
  if (ev.transaction.origin === 'local') return;
  const [a, b] = [moved(notesBox.selectionStart, ev.delta), moved(notesBox.selectionEnd, ev.delta)];
  notesValue = notes.toString();
  notesBox.value = notesValue;
  if (document.activeElement === notesBox) notesBox.setSelectionRange(a, b);
});

/** Who else is here in the document, and where their caret is. */
function renderEditors() {
  const list = $('editors');
  list.replaceChildren();
  for (const [client, s] of shared.awareness.getStates()) {
    if (client === shared.doc.clientID || !s?.name) continue;
    const line = typeof s.cursor === 'number' ? notesValue.slice(0, s.cursor).split('\n').length : null;
    const li = h('li', {}, [`${s.name}${line ? `, line ${line}` : ''}`]);
    li.style.setProperty('--dot', s.color ?? '#888');
    list.append(li);
  }
}

const strokes = /** @type {Y.Array<{ c: string, p: number[] }>} */ (shared.doc.getArray('strokes'));
const board = /** @type {HTMLCanvasElement} */ ($('board'));
const pen = /** @type {CanvasRenderingContext2D} */ (board.getContext('2d'));
/** @type {{ c: string, p: number[] } | null} the stroke being drawn (0..1 coordinates) */
let drawing = null;

/** @param {{ c: string, p: number[] }} s */
function drawStroke(s) {
  pen.strokeStyle = s.c;
  pen.lineWidth = 3;
  pen.lineCap = pen.lineJoin = 'round';
  pen.beginPath();
  for (let i = 0; i + 1 < s.p.length; i += 2) {
    const [x, y] = [s.p[i] * board.width, s.p[i + 1] * board.height];
    if (i === 0) pen.moveTo(x, y);
    else pen.lineTo(x, y);
  }
  if (s.p.length === 2) pen.lineTo(s.p[0] * board.width + 0.1, s.p[1] * board.height);
  pen.stroke();
}

function renderBoard() {
  pen.clearRect(0, 0, board.width, board.height);
  for (const s of strokes.toArray()) drawStroke(s);
  if (drawing) drawStroke(drawing);
  // Others' pointers.
  for (const [client, s] of shared.awareness.getStates()) {
    if (client === shared.doc.clientID || !s?.pointer) continue;
    const [x, y] = [s.pointer.x * board.width, s.pointer.y * board.height];
    pen.fillStyle = s.color ?? '#888';
    pen.beginPath();
    pen.arc(x, y, 5, 0, 2 * Math.PI);
    pen.fill();
    pen.font = '12px sans-serif';
    pen.fillText(s.name ?? '', x + 8, y + 4);
  }
  board.dataset.strokes = String(strokes.length);
}

/** @param {PointerEvent} ev */
const at = (ev) => {
  const r = board.getBoundingClientRect();
  return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
};
let lastPointer = 0;
board.addEventListener('pointerdown', (ev) => {
  board.setPointerCapture(ev.pointerId);
  drawing = { c: myColor, p: at(ev) };
  renderBoard();
});
board.addEventListener('pointermove', (ev) => {
  const [x, y] = at(ev);
  if (drawing) {
    drawing.p.push(x, y);
    renderBoard();
  }
  if (performance.now() - lastPointer > 50) {
    lastPointer = performance.now();
    shared.awareness.setLocalStateField('pointer', { x, y });
  }
});
const endStroke = () => {
  if (!drawing) return;
  const done = drawing;
  drawing = null;
  strokes.push([{ c: done.c, p: done.p.map((v) => Math.round(v * 10000) / 10000) }]);
};
board.addEventListener('pointerup', endStroke);
board.addEventListener('pointercancel', endStroke);
board.addEventListener('pointerleave', () => shared.awareness.setLocalStateField('pointer', null));
$('board-clear').addEventListener('click', () => strokes.delete(0, strokes.length));
strokes.observe(renderBoard);
shared.awareness.on('change', () => {
  renderEditors();
  renderBoard();
});
renderBoard();

// ---- files ----

let transferSeq = 0;

/** @param {string} title */
function transferRow(title) {
  const bar = /** @type {HTMLProgressElement} */ (h('progress', { max: '1', value: '0' }));
  const text = h('span', { class: 'detail' }, ['waiting']);
  const actions = h('span', { class: 'actions' });
  const li = h('li', { class: 'transfer' }, [h('span', { class: 'title' }, [title]), bar, text, actions]);
  $('transfers').prepend(li);
  return { li, bar, text, actions };
}

/** @param {{ path: string, blob: File }[]} items */
function send(items) {
  if (!items.length) return;
  const to = /** @type {HTMLSelectElement} */ ($('to')).value;
  if (to && !peers.has(to)) {
    error(`${nameOf(to)} left the room: choose who to send to.`);
    return;
  }
  const targets = to ? [to] : [...peers.keys()].filter((p) => peers.get(p)?.state === 'connected');
  if (!targets.length) {
    error('Nobody to send to yet: wait until someone is connected.');
    return;
  }
  error('');
  const total = items.reduce((n, i) => n + i.blob.size, 0);
  for (const peer of targets) {
    const id = `${room.id}-${++transferSeq}`;
    const row = transferRow(`${items.length === 1 ? items[0].path : `${items.length} files`} (${bytes(total)}) → ${nameOf(peer)}`);
    row.li.dataset.direction = 'out';
    // Hashing waits for a yes: an offer to everyone may go to people who never answer.
    const tx = new SendTransfer({ server: location.origin, items, link: new ChannelLink(room, peer, id, { open: true }), hashAheadOnAccept: true });
    const cancel = h('button', { class: 'cancel' }, ['Cancel']);
    cancel.addEventListener('click', () => tx.cancel('the sender cancelled'));
    row.actions.replaceChildren(cancel);
    tx.on('connected', () => { row.text.textContent = 'waiting for them to accept'; });
    tx.on('progress', (p) => {
      row.bar.value = p.bytesTotal ? p.bytesDone / p.bytesTotal : 1;
      row.text.textContent = progressText(p);
    });
    tx.run().then(
      () => { row.bar.value = 1; row.text.textContent = 'delivered and verified'; row.li.dataset.state = 'done'; },
      (e) => { row.text.textContent = e.message; row.li.dataset.state = 'failed'; },
    ).finally(() => row.actions.replaceChildren());
  }
}

/** @param {Channel} ctl */
function incoming(ctl) {
  const peer = ctl.peer;
  const id = ctl.label.slice(CTL_LABEL.length + 1);
  const row = transferRow(`from ${nameOf(peer)}`);
  row.li.dataset.direction = 'in';
  /** @type {import('../lib/xfer.js').Sink | null} */
  let real = null;
  const rx = new ReceiveTransfer({
    server: location.origin,
    link: new ChannelLink(room, peer, id, { first: ctl }),
    sink: { open: (p, s) => /** @type {import('../lib/xfer.js').Sink} */ (real).open(p, s), dir: (p) => real?.dir?.(p) ?? Promise.resolve() },
  });
  rx.on('offered', ({ manifest }) => {
    const files = manifest.files();
    row.li.querySelector('.title')?.replaceChildren(`${files.length === 1 ? files[0][1].path : `${files.length} files`} (${bytes(manifest.totalBytes)}) from ${nameOf(peer)}`);
    row.text.textContent = 'offered';
    const yes = h('button', { class: 'primary accept' }, ['Save']);
    const no = h('button', { class: 'decline' }, ['No thanks']);
    row.actions.replaceChildren(yes, no);
    yes.addEventListener('click', async () => {
      row.actions.replaceChildren();
      try {
        real = await chooseSink({ pick: false, files: files.length, firstName: files[0]?.[1].path ?? 'download' });
      } catch (e) {
        rx.decline(`could not save: ${/** @type {Error} */ (e).message}`);
        return;
      }
      // Accepting does nothing if the transfer ended meanwhile (the peer left).
      if (rx.ended) return;
      const stop = h('button', { class: 'cancel' }, ['Cancel']);
      stop.addEventListener('click', () => rx.cancel('the receiver cancelled'));
      row.actions.replaceChildren(stop);
      rx.accept();
    });
    no.addEventListener('click', () => {
      row.actions.replaceChildren();
      rx.decline('they said no');
    });
  });
  rx.on('progress', (p) => {
    row.bar.value = p.bytesTotal ? p.bytesDone / p.bytesTotal : 1;
    row.text.textContent = progressText(p);
  });
  rx.run().then(
    () => { row.bar.value = 1; row.text.textContent = 'received, every chunk verified'; row.li.dataset.state = 'done'; },
    (e) => { row.text.textContent = e.message; row.li.dataset.state = 'failed'; row.actions.replaceChildren(); },
  );
}

const drop = $('drop');
drop.addEventListener('dragover', (ev) => { ev.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', async (ev) => {
  ev.preventDefault();
  drop.classList.remove('over');
  if (ev.dataTransfer) send(await droppedFiles(ev.dataTransfer));
});
$('pick-files').addEventListener('change', (ev) => {
  const input = /** @type {HTMLInputElement} */ (ev.target);
  send(pickedFiles(input));
  input.value = '';
});

room.join().then(
  () => {
    $('me').textContent = `You are ${myName}`;
    document.body.dataset.joined = room.id;
  },
  (e) => error(`Cannot join the room: ${e.message}`),
);
