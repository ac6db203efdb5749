//! peerlink's fuzz targets: every decoder that reads bytes from the network,
//! as a plain function of those bytes that panics only on a bug.
//!
//! - [`signaling`]: a client's text frame as the server checks it, and the
//!   server's messages as a client reads them;
//! - [`transfer_ctl`] and [`transfer_frame`]: the transfer protocol's
//!   control messages and data frames, fed to both engines mid-transfer;
//! - [`pairing`]: pairing messages, fed to an exchange and a session;
//! - [`turn`]: a datagram to the embedded STUN/TURN server.
//!
//! The same functions run two ways: `fuzz/` is a cargo-fuzz crate (libFuzzer,
//! coverage-guided: `cargo fuzz run signaling`), and `tests/bounded.rs` runs
//! each on mutations of the fixtures for a bounded count in every test run,
//! on a stable toolchain. Both check properties, not just "no panic": what
//! parses serialises back to the same message.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use peerlink_pair::{Code, PairMsg, Pairing, Role, Session};
use peerlink_proto::{ClientMsg, ServerMsg, Signal};
use peerlink_transfer::{
    Ctl, Entry, MIN_CHUNK_SIZE, Manifest, Receiver, ReceiverConfig, ReceiverEvent, ReceiverOutput, RelPath,
    Sender, SenderOutput, chunk_hash, decode_frame, encode_frame, frames,
};

/// A text frame from a client, as `peerlink serve` checks it; and the same
/// bytes read as a server message by a client. What parses must write back
/// as the same message.
pub fn signaling(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok((msg, _ty)) = peerlink_signal::parse_client_frame(text)
        && !matches!(msg, ClientMsg::Unknown)
        && !matches!(msg, ClientMsg::Signal { signal: Signal::Unknown, .. })
    {
        let again = serde_json::to_string(&msg).expect("client messages serialise");
        let (back, _) = peerlink_signal::parse_client_frame(&again).expect("what we wrote parses");
        assert_eq!(back, msg, "client message round trip");
    }
    if let Some(r) = peerlink_signal::relay_frame(text, "p-fuzz") {
        // The fast path delivers what the full path would.
        let from = peerlink_proto::PeerId::from_server("p-fuzz");
        let want = match peerlink_signal::parse_client_frame(text).expect("the fast path took it: valid").0 {
            ClientMsg::Signal { room, signal, .. } => ServerMsg::Signal { room, from, signal },
            ClientMsg::Send { room, data, .. } => ServerMsg::Message { room, from, data },
            other => panic!("the fast path took a {other:?}"),
        };
        let got: ServerMsg = serde_json::from_str(&r.frame).expect("the fast path writes a server message");
        assert_eq!(got, want, "fast and full paths");
    }
    if let Ok(msg) = serde_json::from_str::<ServerMsg>(text)
        && !matches!(msg, ServerMsg::Unknown)
        && !matches!(msg, ServerMsg::Signal { signal: Signal::Unknown, .. })
    {
        let again = serde_json::to_string(&msg).expect("server messages serialise");
        assert_eq!(serde_json::from_str::<ServerMsg>(&again).expect("what we wrote parses"), msg);
    }
}

/// The files of [`transfer_ctl`] and [`transfer_frame`]: two small ones.
fn files() -> Vec<Vec<u8>> {
    let a: Vec<u8> = (0..(MIN_CHUNK_SIZE as usize * 2 + 100)).map(|i| (i * 7) as u8).collect();
    vec![a, b"hello".to_vec()]
}

fn manifest(files: &[Vec<u8>]) -> Manifest {
    let entries = vec![
        Entry::file(RelPath::parse("a.bin").expect("a valid path"), files[0].len() as u64),
        Entry::file(RelPath::parse("d/b.txt").expect("a valid path"), files[1].len() as u64),
    ];
    Manifest::new(MIN_CHUNK_SIZE, entries).expect("a valid manifest")
}

/// A sender and a receiver in memory, carried `trips` round trips into a
/// transfer of [`files`], with the disk work done at once.
struct Transfer {
    files: Vec<Vec<u8>>,
    sender: Sender,
    receiver: Receiver,
    /// What each side would send next; fuzz input is mixed into these.
    to_receiver: Vec<String>,
    to_sender: Vec<String>,
    frames: Vec<Vec<u8>>,
}

impl Transfer {
    fn new(trips: usize) -> Transfer {
        let files = files();
        let mut t = Transfer {
            sender: Sender::new(manifest(&files)),
            receiver: Receiver::new(ReceiverConfig::default()),
            files,
            to_receiver: Vec::new(),
            to_sender: Vec::new(),
            frames: Vec::new(),
        };
        t.sender.start_session();
        t.receiver.start_session();
        for _ in 0..trips {
            t.poll();
            t.deliver();
        }
        t.poll();
        t
    }

    /// Carries out both engines' outputs (bounded: a bug that loops is caught
    /// by the bound, not hung on).
    fn poll(&mut self) {
        for _ in 0..10_000 {
            let Some(out) = self.sender.poll() else { break };
            match out {
                SenderOutput::Ctl(msg) => self.to_receiver.push(msg.to_json()),
                SenderOutput::Hash { file, from, count } => {
                    let m = self.sender.manifest().clone();
                    let hashes = (from..from + count)
                        .filter_map(|c| m.chunk_span(file, c))
                        .map(|(o, l)| chunk_hash(&self.files[file as usize][o as usize..][..l as usize]))
                        .collect();
                    self.sender.hashes_computed(file, from, hashes);
                }
                SenderOutput::Send { file, offset, len, .. } => {
                    let bytes = &self.files[file as usize][offset as usize..][..len as usize];
                    self.frames.extend(frames(file, offset, bytes, 16 * 1024));
                }
                SenderOutput::Event(_) => {}
            }
        }
        for _ in 0..10_000 {
            let Some(out) = self.receiver.poll() else { break };
            match out {
                ReceiverOutput::Ctl(msg) => self.to_sender.push(msg.to_json()),
                ReceiverOutput::Event(ReceiverEvent::Offered) => self.receiver.accept(),
                ReceiverOutput::Event(_) => {}
                ReceiverOutput::Prepare { file } => self.receiver.partial_scanned(file, Vec::new()),
                ReceiverOutput::Write { file, chunk, .. } => self.receiver.chunk_written(file, chunk),
                ReceiverOutput::Finish { file, .. } => self.receiver.file_finished(file),
                ReceiverOutput::CreateDir { .. } => {}
            }
        }
    }

    fn deliver(&mut self) {
        for text in std::mem::take(&mut self.to_receiver) {
            let _ = self.receiver.handle_ctl_json(&text);
        }
        for frame in std::mem::take(&mut self.frames) {
            let _ = self.receiver.handle_data(&frame);
        }
        for text in std::mem::take(&mut self.to_sender) {
            let _ = self.sender.handle_ctl_json(&text);
        }
    }
}

/// Control messages (one per line) to both engines, at a point in a
/// transfer the first byte picks. A message that parses must write back as
/// the same message.
pub fn transfer_ctl(data: &[u8]) {
    let Some((&when, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut t = Transfer::new(usize::from(when % 6));
    for line in text.lines() {
        if let Ok(msg) = Ctl::from_json(line) {
            assert_eq!(Ctl::from_json(&msg.to_json()).expect("what we wrote parses"), msg, "ctl round trip");
        }
        let _ = t.receiver.handle_ctl_json(line);
        let _ = t.sender.handle_ctl_json(line);
        t.poll();
    }
    t.deliver();
    t.poll();
}

/// A data frame to a receiver at a point in a transfer the first byte
/// picks. A frame that decodes must encode back to the same bytes.
pub fn transfer_frame(data: &[u8]) {
    let Some((&when, frame)) = data.split_first() else { return };
    if let Ok((file, offset, payload)) = decode_frame(frame) {
        assert_eq!(encode_frame(file, offset, payload), frame, "frame round trip");
    }
    let mut t = Transfer::new(usize::from(when % 6));
    let _ = t.receiver.handle_data(frame);
    t.poll();
    t.deliver();
    t.poll();
}

/// A pairing message (JSON) to an exchange of either side and to a session
/// that is pairing with its sender, and to one that is not.
pub fn pairing(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Some(msg) = PairMsg::from_json(&value) else { return };
    let opening = matches!(msg, PairMsg::PairPake { .. });
    assert_eq!(PairMsg::from_json(&msg.to_json()), Some(msg.clone()), "pairing message round trip");
    let code = Code::parse("7-lantern-zebra-acid").expect("a valid code");
    for role in [Role::Creator, Role::Joiner] {
        let (mut pairing, _) = Pairing::start(role, &code);
        let _ = pairing.handle(msg.clone());
        let _ = pairing.handle(msg.clone());
    }
    let now = Instant::now();
    let mut session: Session<&str> = Session::new(Role::Joiner, code, Duration::from_secs(30));
    session.peer_joined("p-creator", now);
    session.handle_message("p-creator", msg.clone(), now);
    session.handle_message("p-other", msg, now);
    session.handle_timeout(now + Duration::from_secs(31));
    let mut sent: HashMap<&str, usize> = HashMap::new();
    while let Some(out) = session.poll_output() {
        if let peerlink_pair::SessionOutput::Send { to, .. } = out {
            *sent.entry(to).or_default() += 1;
        }
    }
    if !opening {
        assert!(!sent.contains_key("p-other"), "only a peer that asked to pair is ever answered");
    }
}

/// A datagram to the embedded STUN/TURN server; the first byte picks the
/// source (two clients, or a peer sending to a relayed address).
pub fn turn(data: &[u8]) {
    peerlink_turn::fuzzing::datagram(data);
}
