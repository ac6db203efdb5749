//! Shared documents from a terminal (docs/PROTOCOL.md, "Shared documents"):
//! `peerlink keep` stays in a room, keeps each document's updates on disk
//! and serves them to peers that come later, so a room's notes outlive its
//! browsers; `peerlink doc` prints a document's text (and follows it). Y.js
//! documents on `yrs`, the messages y-protocols' (y-websocket's framing).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use peerlink_peer::{ChannelSpec, DataChannel, Event, Message, PeerId, Room, RoomConfig};
use tokio::sync::mpsc;
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

/// The documents of one room and their channels, one per peer and document.
struct Docs {
    docs: HashMap<String, Kept>,
    channels: HashMap<(PeerId, String), DataChannel>,
    dir: Option<PathBuf>,
    incoming: mpsc::Sender<(PeerId, String, Message)>,
}

impl Docs {
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
        Self::send(&channel, &step1);
        let (peer, tx, reader) = (channel.peer().clone(), self.incoming.clone(), channel.clone());
        let n = name.clone();
        tokio::spawn(async move {
            while let Some(m) = reader.recv().await {
                if tx.send((peer.clone(), n.clone(), m)).await.is_err() {
                    break;
                }
            }
        });
        self.channels.insert((channel.peer().clone(), name), channel);
        Ok(())
    }

    /// Queues `msg`; a peer whose queue is full loses the channel (it syncs
    /// again from its state vector when it comes back).
    fn send(channel: &DataChannel, msg: &DocMsg) {
        if let Err(e) = channel.try_send(Message::Binary(msg.encode())) {
            tracing::warn!(peer = %channel.peer(), "document channel dropped: {e}");
        }
    }

    /// A message from `peer` on document `name`: answered, applied, passed
    /// on to the others. Returns whether the document changed (step 2 or
    /// an update).
    fn handle(&mut self, peer: &PeerId, name: &str, m: &Message) -> anyhow::Result<bool> {
        let msg = DocMsg::decode(m.as_bytes())?;
        let changed = match &msg {
            DocMsg::Step1(sv) => {
                let reply = self.doc(name)?.step2(sv)?;
                if let Some(ch) = self.channels.get(&(peer.clone(), name.to_string())) {
                    Self::send(ch, &reply);
                }
                false
            }
            DocMsg::Step2(u) | DocMsg::Update(u) => {
                self.doc(name)?.apply(u)?;
                // The others hear it from us too: peers without a direct
                // connection to the writer still converge.
                let update = DocMsg::Update(u.clone());
                for ((p, n), ch) in &self.channels {
                    if p != peer && n == name {
                        Self::send(ch, &update);
                    }
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
    let mut docs =
        Docs { docs: HashMap::new(), channels: HashMap::new(), dir: Some(args.dir.clone()), incoming: tx };
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
                Some(Event::PeerLeft { peer }) => docs.closed(&peer),
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
            Some((peer, name, m)) = rx.recv() => {
                // A channel dropped for a bad message is not listened to.
                if docs.channels.contains_key(&(peer.clone(), name.clone()))
                    && let Err(e) = docs.handle(&peer, &name, &m)
                {
                    tracing::warn!(%peer, "document {name}: {e:#}; its channel is no longer read");
                    docs.channels.remove(&(peer, name));
                }
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
    let mut docs = Docs { docs: HashMap::new(), channels: HashMap::new(), dir: None, incoming: tx };
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
                Some(Event::PeerLeft { peer }) => docs.closed(&peer),
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
            Some((peer, name, m)) = rx.recv() => {
                let step2 = matches!(DocMsg::decode(m.as_bytes()), Ok(DocMsg::Step2(_)));
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
