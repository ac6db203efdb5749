//! Shared documents from a terminal (docs/PROTOCOL.md, "Shared documents"):
//! `peerlink keep` stays in a room, keeps each document's updates on disk
//! and serves them to peers that come later, so a room's notes outlive its
//! browsers; `peerlink doc` prints a document's text (and follows it). Y.js
//! documents on `yrs`, the messages y-protocols' (y-websocket's framing).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use peerlink_peer::{ChannelSpec, DataChannel, Event, Message, PeerId, Room, RoomConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Transact, Update};

/// Channel label prefix of a document (`peerlink-doc:NAME`).
pub const DOC_PREFIX: &str = "peerlink-doc:";
/// The document the web app's room page shares (notes and whiteboard).
const ROOM_DOC: &str = "room";

/// One message on a document's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocMsg {
    /// Sync step 1: the sender's state vector.
    Step1(Vec<u8>),
    /// Sync step 2: the updates the other side lacked.
    Step2(Vec<u8>),
    /// A change as it was made.
    Update(Vec<u8>),
    /// Awareness states (carets, pointers): relayed as they are.
    Awareness(Vec<u8>),
}

/// A message that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a document message: {0}")]
pub struct BadMessage(&'static str);

fn read_varuint(b: &[u8], at: &mut usize) -> Result<u64, BadMessage> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or(BadMessage("cut short"))?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err(BadMessage("a number too long"))
}

fn read_bytes(b: &[u8], at: &mut usize) -> Result<Vec<u8>, BadMessage> {
    let n = usize::try_from(read_varuint(b, at)?).map_err(|_| BadMessage("a length too large"))?;
    let end = at.checked_add(n).filter(|&e| e <= b.len()).ok_or(BadMessage("cut short"))?;
    let out = b[*at..end].to_vec();
    *at = end;
    Ok(out)
}

fn write_varuint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl DocMsg {
    /// Parses one channel message.
    pub fn decode(b: &[u8]) -> Result<DocMsg, BadMessage> {
        let mut at = 0;
        let msg = match read_varuint(b, &mut at)? {
            0 => match read_varuint(b, &mut at)? {
                0 => DocMsg::Step1(read_bytes(b, &mut at)?),
                1 => DocMsg::Step2(read_bytes(b, &mut at)?),
                2 => DocMsg::Update(read_bytes(b, &mut at)?),
                _ => return Err(BadMessage("an unknown sync message")),
            },
            1 => DocMsg::Awareness(read_bytes(b, &mut at)?),
            _ => return Err(BadMessage("an unknown message type")),
        };
        Ok(msg)
    }

    /// The message as a channel carries it.
    pub fn encode(&self) -> Vec<u8> {
        let (outer, inner, payload) = match self {
            DocMsg::Step1(p) => (0, Some(0), p),
            DocMsg::Step2(p) => (0, Some(1), p),
            DocMsg::Update(p) => (0, Some(2), p),
            DocMsg::Awareness(p) => (1, None, p),
        };
        let mut out = Vec::with_capacity(payload.len() + 8);
        write_varuint(&mut out, outer);
        if let Some(i) = inner {
            write_varuint(&mut out, i);
        }
        write_varuint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }
}

/// Message type of a part of a message (docs/PROTOCOL.md, "Shared documents").
const MESSAGE_PART: u64 = 16;
/// Largest channel message a document writes: longer messages go in parts.
pub const PART_LIMIT: usize = 64 * 1024;
/// Largest message a document writes or collects from parts.
pub const MAX_DOC_MESSAGE: usize = 64 << 20;
/// Smallest channel message that can carry parts (a part's header takes up
/// to 21 bytes).
const MIN_PART_LIMIT: usize = 64;

/// `msg` as the channel messages that carry it: itself if it fits in
/// `limit` bytes, else parts of at most `limit` bytes each, header included.
pub fn split_parts(msg: &[u8], limit: usize) -> Vec<Vec<u8>> {
    if msg.len() <= limit {
        return vec![msg.to_vec()];
    }
    let mut parts = Vec::new();
    let mut offset = 0;
    while offset < msg.len() {
        let mut part = Vec::with_capacity(limit);
        write_varuint(&mut part, MESSAGE_PART);
        write_varuint(&mut part, msg.len() as u64);
        write_varuint(&mut part, offset as u64);
        let take = (msg.len() - offset).min(limit - part.len());
        part.extend_from_slice(&msg[offset..offset + take]);
        parts.push(part);
        offset += take;
    }
    parts
}

/// Bytes that every channel's [`Reassembly`] of one process may hold
/// together while collecting messages in parts: two messages of the largest
/// size. A part that would pass it is refused (its channel is dropped)
/// rather than waited for: readers waiting for each other's collections to
/// finish would wait for ever.
pub const MAX_COLLECTING_BYTES: usize = 2 * MAX_DOC_MESSAGE;

/// Why a channel's message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error(transparent)]
    Bad(#[from] BadMessage),
    #[error("messages being collected in parts from every channel would pass {} MiB", .0 >> 20)]
    OverBudget(usize),
    #[error("a message in parts stalled: no part for {} s", .0.as_secs())]
    Stalled(Duration),
}

/// How long a message being collected in parts may wait for its next part
/// before its channel is dropped (and its share of the budget freed): a
/// peer that stops halfway holds nothing for long.
pub const PART_IDLE: Duration = Duration::from_secs(30);

/// A whole message, holding its share of the bytes being collected if it
/// came in parts, until it is dropped.
#[derive(Debug)]
pub struct Whole {
    pub bytes: Vec<u8>,
    _collected: Option<OwnedSemaphorePermit>,
}

/// Collects the parts of one channel's messages: [`Reassembly::push`]
/// gives each whole message as it completes. What it holds counts against
/// a budget that the reassemblies sharing it draw from together.
#[derive(Debug)]
pub struct Reassembly {
    whole: Vec<u8>,
    total: usize,
    held: Option<OwnedSemaphorePermit>,
    budget: Arc<Semaphore>,
}

impl Default for Reassembly {
    /// A reassembly with a budget of its own (one message of the largest size).
    fn default() -> Self {
        Reassembly::new(Arc::new(Semaphore::new(MAX_DOC_MESSAGE)))
    }
}

impl Reassembly {
    /// A reassembly drawing from `budget`, in bytes.
    pub fn new(budget: Arc<Semaphore>) -> Reassembly {
        Reassembly { whole: Vec::new(), total: 0, held: None, budget }
    }

    fn reset(&mut self) {
        self.whole = Vec::new();
        self.total = 0;
        self.held = None;
    }

    /// Whether a message is being collected (its first part came, its last
    /// not yet).
    pub fn collecting(&self) -> bool {
        self.total > 0
    }

    /// The whole message `m` completes, `m` itself if it is not a part, or
    /// `None` while parts are being collected. A part that breaks the rules,
    /// or that the budget cannot hold, is refused.
    pub fn push(&mut self, m: &[u8]) -> Result<Option<Whole>, Refused> {
        let mut at = 0;
        if read_varuint(m, &mut at)? != MESSAGE_PART {
            // The writer stopped the message it was sending in parts.
            self.reset();
            return Ok(Some(Whole { bytes: m.to_vec(), _collected: None }));
        }
        let total = read_varuint(m, &mut at)?;
        let offset = read_varuint(m, &mut at)?;
        let data = &m[at..];
        if data.is_empty() {
            return Err(BadMessage("an empty part").into());
        }
        if total > MAX_DOC_MESSAGE as u64 {
            return Err(BadMessage("a message in parts over 64 MiB").into());
        }
        let (total, offset) = (total as usize, offset as usize);
        if offset == 0 {
            self.reset();
            self.total = total;
        } else if self.whole.is_empty() {
            return Err(BadMessage("a part of a message whose start never came").into());
        } else if total != self.total || offset != self.whole.len() {
            return Err(BadMessage("a part that does not follow the last").into());
        }
        if offset + data.len() > total {
            return Err(BadMessage("a part running past its message").into());
        }
        // `data` is at most a channel message, far below u32::MAX.
        let Ok(share) = self.budget.clone().try_acquire_many_owned(data.len() as u32) else {
            self.reset();
            return Err(Refused::OverBudget(MAX_COLLECTING_BYTES));
        };
        match &mut self.held {
            Some(held) => held.merge(share),
            None => self.held = Some(share),
        }
        self.whole.extend_from_slice(data);
        if self.whole.len() < total {
            return Ok(None);
        }
        let whole = Whole { bytes: std::mem::take(&mut self.whole), _collected: self.held.take() };
        self.reset();
        if read_varuint(&whole.bytes, &mut 0)? == MESSAGE_PART {
            return Err(BadMessage("a part made of parts").into());
        }
        Ok(Some(whole))
    }
}

/// A document and, for `keep`, its file: updates appended as they come
/// (`u32` little-endian length, then a Y.js v1 update), compacted into one
/// update on start and every so often.
pub struct Kept {
    pub doc: Doc,
    file: Option<PathBuf>,
    appended: usize,
}

/// Updates appended before the file is compacted.
const COMPACT_AFTER: usize = 500;

impl Kept {
    /// A document in memory only.
    pub fn in_memory() -> Kept {
        Kept { doc: Doc::new(), file: None, appended: 0 }
    }

    /// The document kept in `dir` as `NAME.ydoc`: what the file holds is
    /// applied (a torn last record, from a crash, is left out) and the file
    /// compacted.
    pub fn open(dir: &Path, name: &str) -> anyhow::Result<Kept> {
        let file = dir.join(format!("{}.ydoc", sanitize(name)));
        let kept = Kept { doc: Doc::new(), file: Some(file.clone()), appended: 0 };
        if let Ok(bytes) = std::fs::read(&file) {
            let mut at = 0;
            while at + 4 <= bytes.len() {
                let n = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
                let Some(record) = bytes.get(at + 4..at + 4 + n) else { break };
                let update = Update::decode_v1(record)
                    .with_context(|| format!("{}: a record that is not an update", file.display()))?;
                kept.doc
                    .transact_mut()
                    .apply_update(update)
                    .with_context(|| format!("{}: an update that does not apply", file.display()))?;
                at += 4 + n;
            }
        }
        kept.compact()?;
        Ok(kept)
    }

    /// Rewrites the file as one update with the whole document.
    fn compact(&self) -> anyhow::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let state = self.doc.transact().encode_state_as_update_v1(&StateVector::default());
        let tmp = file.with_extension("ydoc.tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&(state.len() as u32).to_le_bytes())?;
        f.write_all(&state)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
        Ok(())
    }

    /// Applies an update from a peer and keeps it; whether it changed anything
    /// is not asked: Y.js updates apply once.
    pub fn apply(&mut self, update: &[u8]) -> anyhow::Result<()> {
        let decoded = Update::decode_v1(update).context("an update that does not parse")?;
        self.doc.transact_mut().apply_update(decoded).context("an update that does not apply")?;
        if let Some(file) = &self.file {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .with_context(|| format!("cannot append to {}", file.display()))?;
            f.write_all(&(update.len() as u32).to_le_bytes())?;
            f.write_all(update)?;
            self.appended += 1;
            if self.appended >= COMPACT_AFTER {
                self.compact()?;
                self.appended = 0;
            }
        }
        Ok(())
    }

    /// Our sync step 1.
    pub fn step1(&self) -> DocMsg {
        DocMsg::Step1(self.doc.transact().state_vector().encode_v1())
    }

    /// The answer to a peer's step 1: what it lacks.
    pub fn step2(&self, state_vector: &[u8]) -> anyhow::Result<DocMsg> {
        let sv = StateVector::decode_v1(state_vector).context("a state vector that does not parse")?;
        Ok(DocMsg::Step2(self.doc.transact().encode_state_as_update_v1(&sv)))
    }

    /// The text of the document's `Y.Text` called `name`.
    pub fn text(&self, name: &str) -> String {
        let text = self.doc.get_or_insert_text(name);
        text.get_string(&self.doc.transact())
    }
}

/// File names from document names: letters, digits, `-`, `_`, `.` kept.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

#[derive(Debug, Args)]
pub struct KeepArgs {
    /// The room to keep documents for.
    pub room: String,
    /// Folder for the documents (`NAME.ydoc` each).
    #[arg(long)]
    pub dir: PathBuf,
    /// Documents this peer opens itself when it is the later joiner
    /// (repeatable); any document a peer opens is kept too.
    #[arg(long = "doc", default_value = ROOM_DOC)]
    pub docs: Vec<String>,
    #[command(flatten)]
    pub join: JoinArgs,
}

#[derive(Debug, Args)]
pub struct DocArgs {
    /// The room.
    pub room: String,
    /// The document (the web app's room page shares `room`).
    #[arg(value_name = "NAME", default_value = ROOM_DOC)]
    pub document: String,
    /// The document's text to print (the room page's notes are `notes`).
    #[arg(long, default_value = "notes")]
    pub text: String,
    /// Keep printing: the whole text again, as a JSON line `{"text": ...}`,
    /// after every change.
    #[arg(long)]
    pub follow: bool,
    /// How long to wait for a peer that has the document.
    #[arg(long, default_value = "15s", value_parser = crate::common::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub join: JoinArgs,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Signaling server: ws://HOST:PORT/ws, http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "PEERLINK_SERVER")]
    pub server: String,
    /// Name shown to the others.
    #[arg(long)]
    pub name: Option<String>,
    /// Join token for servers that require one (`peerlink token`).
    #[arg(long, env = "PEERLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The room's secret, for an end-to-end encrypted room.
    #[arg(long, env = "PEERLINK_ROOM_SECRET", hide_env_values = true)]
    pub room_secret: Option<String>,
    #[command(flatten)]
    pub ice: crate::common::IceArgs,
}

impl JoinArgs {
    fn config(&self, room: &str, docs: &[String]) -> anyhow::Result<RoomConfig> {
        let mut c = RoomConfig::new(self.server.clone(), room);
        c.name = self.name.clone();
        c.token = self.token.clone();
        c.room_secret = self.room_secret.clone();
        c.ice = self.ice.config()?;
        c.channels = docs.iter().map(|d| ChannelSpec::reliable(format!("{DOC_PREFIX}{d}"))).collect();
        Ok(c)
    }
}

/// What a document channel's reader and the writers' tasks tell the loop.
enum Incoming {
    /// A whole message from `peer` on document `name` (parts collected), or
    /// why what came does not parse.
    Message {
        peer: PeerId,
        name: String,
        epoch: u64,
        msg: Result<Vec<u8>, Refused>,
        /// Its bytes' share of [`MAX_QUEUED_BYTES`], given back once handled.
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// What held back sending to `peer` (a full queue, a message in parts)
    /// is over. `since`: the state vector the message in parts was made
    /// from; `None` after a full queue.
    Resume { peer: PeerId, name: String, epoch: u64, since: Option<StateVector> },
}

/// One peer's channel for one document, and what is held back for it.
struct Out {
    channel: DataChannel,
    /// Tells this channel from an earlier one of the same peer and document.
    epoch: u64,
    /// Sent nothing for now: its queue was full, or a message to it is
    /// going in parts. What it misses goes in one update afterwards.
    behind: bool,
    missed: bool,
    /// Its sync step 1 (state vector), waiting for an answer until it is
    /// no longer behind.
    owed: Option<Vec<u8>>,
}

/// The documents of one room and their channels, one per peer and document.
struct Docs {
    docs: HashMap<String, Kept>,
    channels: HashMap<(PeerId, String), Out>,
    epochs: u64,
    dir: Option<PathBuf>,
    incoming: mpsc::Sender<Incoming>,
    /// Bytes of whole messages read and not yet handled, all channels together.
    queued: Arc<Semaphore>,
    /// Bytes of messages being collected in parts, all channels together.
    collecting: Arc<Semaphore>,
}

/// Bytes of messages read from document channels and waiting for the loop:
/// a reader waits beyond it (its channel's queue then fills, and its peer
/// waits). One message of the largest size always fits.
const MAX_QUEUED_BYTES: usize = MAX_DOC_MESSAGE;

impl Docs {
    fn new(dir: Option<PathBuf>, incoming: mpsc::Sender<Incoming>) -> Docs {
        let queued = Arc::new(Semaphore::new(MAX_QUEUED_BYTES));
        let collecting = Arc::new(Semaphore::new(MAX_COLLECTING_BYTES));
        Docs { docs: HashMap::new(), channels: HashMap::new(), epochs: 0, dir, incoming, queued, collecting }
    }

    fn doc(&mut self, name: &str) -> anyhow::Result<&mut Kept> {
        if !self.docs.contains_key(name) {
            let kept = match &self.dir {
                Some(dir) => Kept::open(dir, name)?,
                None => Kept::in_memory(),
            };
            self.docs.insert(name.to_string(), kept);
        }
        Ok(self.docs.get_mut(name).expect("just inserted"))
    }

    /// A document channel opened: greet with our state vector and read it.
    fn opened(&mut self, channel: DataChannel) -> anyhow::Result<()> {
        let Some(name) = channel.label().strip_prefix(DOC_PREFIX).map(str::to_string) else { return Ok(()) };
        let step1 = self.doc(&name)?.step1();
        let (peer, tx, reader) = (channel.peer().clone(), self.incoming.clone(), channel.clone());
        let (n, queued, collecting) = (name.clone(), self.queued.clone(), self.collecting.clone());
        self.epochs += 1;
        let epoch = self.epochs;
        tokio::spawn(async move {
            let mut parts = Reassembly::new(collecting);
            loop {
                let m = if parts.collecting() {
                    match tokio::time::timeout(PART_IDLE, reader.recv()).await {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => break,
                        Err(_) => Err(Refused::Stalled(PART_IDLE)),
                    }
                } else {
                    match reader.recv().await {
                        Some(m) => Ok(m),
                        None => break,
                    }
                };
                let msg = match m.and_then(|m| parts.push(m.as_bytes())) {
                    Ok(None) => continue,
                    Ok(Some(whole)) => Ok(whole),
                    Err(e) => Err(e),
                };
                let bad = msg.is_err();
                let cost = msg.as_ref().map_or(1, |w| w.bytes.len().clamp(1, MAX_QUEUED_BYTES)) as u32;
                let Ok(permit) = queued.clone().acquire_many_owned(cost).await else { break };
                // A message collected from parts holds its share of the
                // collecting budget until it has its place in the queue's.
                let msg = msg.map(|w| w.bytes);
                if tx
                    .send(Incoming::Message {
                        peer: peer.clone(),
                        name: n.clone(),
                        epoch,
                        msg,
                        _permit: Some(permit),
                    })
                    .await
                    .is_err()
                    || bad
                {
                    break;
                }
            }
        });
        let key = (channel.peer().clone(), name);
        self.channels.insert(key.clone(), Out { channel, epoch, behind: false, missed: false, owed: None });
        self.send(&key, &step1);
        Ok(())
    }

    /// Sends `msg` to the peer of channel `key`: whole, or in parts while
    /// nothing else goes to it; a peer whose queue is full is sent nothing
    /// until it has drained, then what it missed.
    fn send(&mut self, key: &(PeerId, String), msg: &DocMsg) {
        let Some(out) = self.channels.get_mut(key) else { return };
        if out.behind {
            out.missed = true;
            return;
        }
        let bytes = msg.encode();
        if bytes.len() > MAX_DOC_MESSAGE {
            tracing::warn!(peer = %key.0, "document {}: a message of {} bytes (at most {MAX_DOC_MESSAGE}); its channel is dropped", key.1, bytes.len());
            self.drop_channel(key);
            return;
        }
        let limit = PART_LIMIT.min(out.channel.max_message_size());
        let (channel, tx, epoch) = (out.channel.clone(), self.incoming.clone(), out.epoch);
        let (peer, name) = key.clone();
        if bytes.len() > limit && limit < MIN_PART_LIMIT {
            tracing::warn!(%peer, "document {name}: its channel carries at most {limit} bytes per message; dropped");
            self.drop_channel(key);
            return;
        }
        if bytes.len() > limit {
            out.behind = true;
            // `msg` was made from the document as it is now.
            let since = match self.docs.get(&key.1) {
                Some(kept) => kept.doc.transact().state_vector(),
                None => StateVector::default(),
            };
            tokio::spawn(async move {
                for part in split_parts(&bytes, limit) {
                    if let Err(e) = channel.send(Message::Binary(part)).await {
                        tracing::debug!(%peer, "document {name}: {e}");
                        return;
                    }
                }
                let _ = tx.send(Incoming::Resume { peer, name, epoch, since: Some(since) }).await;
            });
            return;
        }
        match out.channel.try_send(Message::Binary(bytes)) {
            Ok(()) => {}
            Err(peerlink_peer::SendError::Overflow { .. }) => {
                // A peer that cannot keep up: its queue stays bounded, and
                // what it missed is not lost (an update of the whole state
                // merges).
                out.behind = true;
                tokio::spawn(async move {
                    if channel.flush().await.is_ok() {
                        let _ = tx.send(Incoming::Resume { peer, name, epoch, since: None }).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(peer = %key.0, "document {}: {e}; its channel is dropped", key.1);
                self.drop_channel(key);
            }
        }
    }

    /// What held back sending to channel `key` is over: the answer to its
    /// sync step 1 if one waits (it covers everything), else what changed
    /// since `since` if it missed something (the whole state without).
    fn resume(&mut self, key: &(PeerId, String), epoch: u64, since: Option<StateVector>) {
        if let Err(e) = self.resume_unguarded(key, epoch, since) {
            tracing::warn!(peer = %key.0, "document {}: {e:#}; its channel is dropped", key.1);
            self.drop_channel(key);
        }
    }

    fn resume_unguarded(
        &mut self,
        key: &(PeerId, String),
        epoch: u64,
        since: Option<StateVector>,
    ) -> anyhow::Result<()> {
        let Some(out) = self.channels.get_mut(key).filter(|o| o.epoch == epoch) else { return Ok(()) };
        out.behind = false;
        let (owed, missed) = (out.owed.take(), std::mem::take(&mut out.missed));
        let kept = self.doc(&key.1)?;
        let msg = match (owed, since) {
            (Some(sv), _) => kept.step2(&sv)?,
            (None, None) => {
                DocMsg::Update(kept.doc.transact().encode_state_as_update_v1(&StateVector::default()))
            }
            (None, Some(since)) if missed => {
                DocMsg::Update(kept.doc.transact().encode_state_as_update_v1(&since))
            }
            (None, Some(_)) => return Ok(()),
        };
        self.send(key, &msg);
        Ok(())
    }

    /// Stops syncing with the peer of channel `key` and closes the channel,
    /// so the peer knows (it syncs again on its next channel).
    fn drop_channel(&mut self, key: &(PeerId, String)) {
        if let Some(out) = self.channels.remove(key) {
            out.channel.close();
        }
    }

    /// A message from `peer` on document `name`: answered, applied, passed
    /// on to the others. Returns whether the document changed (step 2 or
    /// an update).
    fn handle(&mut self, peer: &PeerId, name: &str, bytes: &[u8]) -> anyhow::Result<bool> {
        let msg = DocMsg::decode(bytes)?;
        let key = (peer.clone(), name.to_string());
        let changed = match &msg {
            DocMsg::Step1(sv) => {
                if let Some(out) = self.channels.get_mut(&key).filter(|o| o.behind) {
                    // Answered once it is no longer behind; checked now.
                    StateVector::decode_v1(sv).context("a state vector that does not parse")?;
                    out.owed = Some(sv.clone());
                } else {
                    let reply = self.doc(name)?.step2(sv)?;
                    self.send(&key, &reply);
                }
                false
            }
            DocMsg::Step2(u) | DocMsg::Update(u) => {
                self.doc(name)?.apply(u)?;
                // The others hear it from us too: peers without a direct
                // connection to the writer still converge.
                let update = DocMsg::Update(u.clone());
                let others: Vec<_> =
                    self.channels.keys().filter(|(p, n)| p != peer && n == name).cloned().collect();
                for other in others {
                    self.send(&other, &update);
                }
                true
            }
            DocMsg::Awareness(_) => false,
        };
        Ok(changed)
    }

    fn closed(&mut self, peer: &PeerId) {
        self.channels.retain(|(p, _), _| p != peer);
    }
}

/// `peerlink keep ROOM --dir DIR`: in the room until stopped, keeping its
/// documents on disk and serving them.
pub async fn keep(args: KeepArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let config = args.join.config(&args.room, &args.docs)?;
    let server = config.server.clone();
    let mut room = Room::join(config).await.with_context(|| format!("joining {} on {server}", args.room))?;
    let (tx, mut rx) = mpsc::channel(1024);
    let mut docs = Docs::new(Some(args.dir.clone()), tx);
    for name in &args.docs {
        docs.doc(name)?;
    }
    println!("* keeping {} in {} as {}", args.docs.join(", "), args.room, room.id());
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = room.next_event() => match ev {
                None => break,
                Some(Event::ChannelOpen { channel }) if channel.label().starts_with(DOC_PREFIX) => {
                    println!("* {} opened {}", channel.peer(), channel.label());
                    docs.opened(channel)?;
                }
                Some(Event::ChannelOpen { channel }) => crate::common::refuse_channel(&channel),
                Some(Event::PeerLeft { peer }) => docs.closed(&peer),
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
            Some(incoming) = rx.recv() => match incoming {
                Incoming::Message { peer, name, epoch, msg, _permit } => {
                    // A channel dropped for a bad message is not listened to,
                    // nor one replaced since.
                    let key = (peer, name);
                    if docs.channels.get(&key).is_some_and(|o| o.epoch == epoch)
                        && let Err(e) = msg.map_err(anyhow::Error::from).and_then(|m| docs.handle(&key.0, &key.1, &m))
                    {
                        tracing::warn!(peer = %key.0, "document {}: {e:#}; its channel is dropped", key.1);
                        docs.drop_channel(&key);
                    }
                }
                Incoming::Resume { peer, name, epoch, since } => docs.resume(&(peer, name), epoch, since),
            }
        }
    }
    room.leave().await.ok();
    Ok(())
}

/// `peerlink doc ROOM [NAME]`: prints the document's text once a peer sent
/// it; with `--follow`, every version after as a JSON line.
pub async fn doc(args: DocArgs) -> anyhow::Result<()> {
    let config = args.join.config(&args.room, std::slice::from_ref(&args.document))?;
    let server = config.server.clone();
    let mut room = Room::join(config).await.with_context(|| format!("joining {} on {server}", args.room))?;
    let (tx, mut rx) = mpsc::channel(1024);
    let mut docs = Docs::new(None, tx);
    docs.doc(&args.document)?;
    let deadline = tokio::time::sleep(args.timeout);
    tokio::pin!(deadline);
    let mut synced = false;
    loop {
        tokio::select! {
            _ = &mut deadline, if !synced => {
                anyhow::bail!("nobody in {} shared the document {:?} within {:?}", args.room, args.document, args.timeout)
            }
            ev = room.next_event() => match ev {
                None => break,
                Some(Event::ChannelOpen { channel }) if channel.label() == format!("{DOC_PREFIX}{}", args.document) => docs.opened(channel)?,
                Some(Event::ChannelOpen { channel }) => crate::common::refuse_channel(&channel),
                Some(Event::PeerLeft { peer }) => docs.closed(&peer),
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
            Some(incoming) = rx.recv() => {
                let (peer, name, m) = match incoming {
                    Incoming::Message { peer, name, epoch, .. }
                        if docs.channels.get(&(peer.clone(), name.clone())).is_none_or(|o| o.epoch != epoch) =>
                    {
                        continue;
                    }
                    Incoming::Message { peer, name, msg: Ok(m), .. } => (peer, name, m),
                    Incoming::Message { peer, name, msg: Err(e), .. } => {
                        tracing::warn!(%peer, "document {name}: {e}");
                        docs.drop_channel(&(peer, name));
                        continue;
                    }
                    Incoming::Resume { peer, name, epoch, since } => {
                        docs.resume(&(peer, name), epoch, since);
                        continue;
                    }
                };
                let step2 = matches!(DocMsg::decode(&m), Ok(DocMsg::Step2(_)));
                match docs.handle(&peer, &name, &m) {
                    Ok(changed) => {
                        let text = docs.doc(&name)?.text(&args.text);
                        if !synced && step2 {
                            synced = true;
                            if !args.follow {
                                print!("{text}");
                                if !text.ends_with('\n') {
                                    println!();
                                }
                                break;
                            }
                            println!("{}", serde_json::json!({ "text": text }));
                        } else if synced && changed && args.follow {
                            println!("{}", serde_json::json!({ "text": text }));
                        }
                    }
                    Err(e) => tracing::warn!(%peer, "document {name}: {e:#}"),
                }
            }
        }
    }
    room.leave().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::Text;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        for m in [
            DocMsg::Step1(vec![0]),
            DocMsg::Step2(vec![1, 2, 3]),
            DocMsg::Update(vec![9; 300]),
            DocMsg::Awareness(vec![]),
        ] {
            assert_eq!(DocMsg::decode(&m.encode()), Ok(m));
        }
        // Step 1 of an empty Y.js document, as y-protocols writes it.
        assert_eq!(DocMsg::Step1(StateVector::default().encode_v1()).encode(), [0, 0, 1, 0]);
        for bad in [&[][..], &[2, 0], &[0, 3, 0], &[0, 0, 5, 1], &[0xff; 12]] {
            assert!(DocMsg::decode(bad).is_err(), "{bad:?}");
        }
    }

    fn unhex(h: &serde_json::Value) -> Vec<u8> {
        let h = h.as_str().unwrap();
        (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect()
    }

    fn unhex_all(v: &serde_json::Value) -> Vec<Vec<u8>> {
        v.as_array().unwrap().iter().map(unhex).collect()
    }

    /// Collects `received` with one reassembly: the whole messages, or the first error.
    fn collect(received: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, Refused> {
        let mut r = Reassembly::default();
        let mut out = Vec::new();
        for m in received {
            out.extend(r.push(m)?.map(|w| w.bytes));
        }
        Ok(out)
    }

    #[test]
    fn messages_are_cut_and_collected_as_the_fixture_says_and_parts_that_break_the_rules_are_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/docs/parts.json");
        let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(f["max_total"], MAX_DOC_MESSAGE);
        assert_eq!(f["part_type"], MESSAGE_PART);
        for c in f["splits"].as_array().unwrap() {
            let (message, parts) = (unhex(&c["message"]), unhex_all(&c["parts"]));
            let limit = c["limit"].as_u64().unwrap() as usize;
            assert_eq!(split_parts(&message, limit), parts, "{}", c["name"]);
            assert_eq!(collect(&parts), Ok(vec![message]), "{}", c["name"]);
        }
        for c in f["streams"].as_array().unwrap() {
            assert_eq!(collect(&unhex_all(&c["received"])), Ok(unhex_all(&c["messages"])), "{}", c["name"]);
        }
        for c in f["invalid"].as_array().unwrap() {
            assert!(collect(&unhex_all(&c["received"])).is_err(), "{}", c["name"]);
        }
    }

    #[test]
    fn messages_being_collected_in_parts_share_one_budget_and_a_part_past_it_is_refused() {
        let budget = Arc::new(Semaphore::new(3000));
        let (mut a, mut b) = (Reassembly::new(budget.clone()), Reassembly::new(budget.clone()));
        let (ma, mb) = (vec![3u8; 2500], vec![3u8; 2000]);
        let (pa, pb) = (split_parts(&ma, 1000), split_parts(&mb, 1000));
        assert!(!a.collecting());
        for p in &pa[..2] {
            assert!(a.push(p).unwrap().is_none());
        }
        assert!(a.collecting(), "what the reader times out on (PART_IDLE)");
        let left = budget.available_permits();
        assert!((1000..1100).contains(&left), "{left}");
        // a holds about 2,000 bytes: b's first part fits, its second does not.
        assert!(b.push(&pb[0]).unwrap().is_none());
        assert_eq!(b.push(&pb[1]).unwrap_err(), Refused::OverBudget(MAX_COLLECTING_BYTES));
        assert_eq!(budget.available_permits(), left);
        // The refused collection gave back what it held; a's message
        // completes and keeps its share until it is dropped.
        let whole = a.push(&pa[2]).unwrap().expect("the last part");
        assert_eq!(whole.bytes, ma);
        assert!(!a.collecting());
        assert_eq!(budget.available_permits(), 3000 - 2500);
        drop(whole);
        assert_eq!(budget.available_permits(), 3000);
        // A message that is not a part ends a collection and its share.
        assert!(b.push(&pb[0]).unwrap().is_none());
        assert!(budget.available_permits() < 3000);
        assert_eq!(
            b.push(&DocMsg::Update(vec![1]).encode()).unwrap().unwrap().bytes,
            DocMsg::Update(vec![1]).encode()
        );
        assert_eq!(budget.available_permits(), 3000);
        for p in &pb {
            b.push(p).unwrap();
        }
    }

    #[test]
    fn two_documents_sync_through_step1_and_step2_and_the_file_keeps_it() {
        let dir = std::env::temp_dir().join(format!("peerlink-doc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Kept::open(&dir, "room").unwrap();
        let b = Kept::in_memory();
        b.doc.get_or_insert_text("notes").insert(&mut b.doc.transact_mut(), 0, "written apart");
        let DocMsg::Step1(sv) = a.step1() else { panic!() };
        let DocMsg::Step2(missing) = b.step2(&sv).unwrap() else { panic!() };
        a.apply(&missing).unwrap();
        assert_eq!(a.text("notes"), "written apart");
        drop(a);
        // Reopened from the file, compacted.
        let a = Kept::open(&dir, "room").unwrap();
        assert_eq!(a.text("notes"), "written apart");
        // A torn last record (a crash while appending) is left out.
        let file = dir.join("room.ydoc");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
        std::fs::write(&file, bytes).unwrap();
        assert_eq!(Kept::open(&dir, "room").unwrap().text("notes"), "written apart");
        std::fs::remove_dir_all(&dir).ok();
    }
}
