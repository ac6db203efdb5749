//! An in-memory driver for a Sender and a Receiver: a "disk" on each side,
//! a network of three queues, and checks of the receiver's limits after
//! every call. Deterministic; every loop is bounded.

#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use peerlink_transfer::*;

/// Suffix of a partial file on the receiver's disk.
pub const PART: &str = ".part";

/// A test file: path and content (`None` for a dir, text for a text entry).
pub enum Item {
    File(&'static str, Vec<u8>),
    /// A file whose path is built at run time.
    Named(String, Vec<u8>),
    Dir(&'static str),
    Text(&'static str, &'static str),
}

/// A manifest plus the sender's source content by file index.
pub fn source(chunk_size: u32, items: Vec<Item>) -> (Manifest, Vec<Vec<u8>>) {
    let mut entries = Vec::new();
    let mut src = Vec::new();
    for item in items {
        match item {
            Item::File(path, data) => {
                entries.push(Entry::file(RelPath::parse(path).unwrap(), data.len() as u64));
                src.push(data);
            }
            Item::Named(path, data) => {
                entries.push(Entry::file(RelPath::parse(&path).unwrap(), data.len() as u64));
                src.push(data);
            }
            Item::Dir(path) => entries.push(Entry::dir(RelPath::parse(path).unwrap())),
            Item::Text(path, text) => {
                entries.push(Entry::text(RelPath::parse(path).unwrap(), text.len() as u64));
                src.push(text.as_bytes().to_vec());
            }
        }
    }
    (Manifest::new(chunk_size, entries).unwrap(), src)
}

/// Deterministic bytes: a cheap xorshift stream.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// xorshift64*: enough randomness for tests, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Changes a frame in flight; returns whether it did.
pub type FrameHook = Box<dyn FnMut(&mut Vec<u8>) -> bool>;

/// Changes the sender's source files.
pub type SourceHook = Box<dyn FnMut(&mut Vec<Vec<u8>>)>;

pub struct Harness {
    pub sender: Sender,
    pub receiver: Receiver,
    pub config: ReceiverConfig,
    /// The sender's files, by file index.
    pub src: Vec<Vec<u8>>,
    /// The receiver's disk: final files by path, partial files by path + [`PART`].
    pub disk: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
    pub to_receiver: VecDeque<String>,
    pub to_sender: VecDeque<String>,
    pub data: VecDeque<Vec<u8>>,
    /// Largest data message, header included.
    pub max_message: usize,
    /// Deliveries a write waits before the disk acknowledges it (0: at once).
    pub write_delay: usize,
    pending: VecDeque<(usize, u32, u32, u64, Vec<u8>)>,
    pub accept: bool,
    pub frame_hook: Option<FrameHook>,
    /// Called after the sender's driver hashed a range, before anything is
    /// sent: lets a test change a source file under the sender.
    pub after_hash: Option<SourceHook>,
    pub sender_events: Vec<SenderEvent>,
    pub receiver_events: Vec<ReceiverEvent>,
    pub sender_errors: Vec<ProtocolError>,
    pub receiver_errors: Vec<ProtocolError>,
    /// Every control message each side sent.
    pub sent_by_sender: Vec<Ctl>,
    pub sent_by_receiver: Vec<Ctl>,
    pub hash_outputs: usize,
    /// Network deliveries so far: each is one trip across, everything in
    /// flight at once.
    pub deliveries: usize,
    /// Most files the receiver had started and not finished.
    pub max_files_in_flight: usize,
    pub max_unwritten_chunks: usize,
    pub max_unwritten_bytes: u64,
    /// Check the receiver's limits against the harness's own accounting.
    pub check_limits: bool,
    /// Answer `Prepare` on the next delivery, after the control messages
    /// in flight (as a slow disk scan would), instead of at once.
    pub defer_prepare: bool,
    deferred_prepares: Vec<u32>,
    /// Chunks the receiver asked for and the harness has not yet seen
    /// verified (a Write) or rejected (ChunkCorrupt).
    asked: HashMap<(u32, u32), u64>,
    /// Bytes handed to the disk and not acknowledged.
    pending_bytes: u64,
    /// Text chunks are verified without an output the harness can see, so
    /// its ledger cannot follow them.
    has_text: bool,
}

impl Harness {
    pub fn new(manifest: Manifest, src: Vec<Vec<u8>>, config: ReceiverConfig) -> Harness {
        let has_text = manifest.entries().iter().any(|e| e.kind == EntryKind::Text);
        let mut sender = Sender::new(manifest);
        let mut receiver = Receiver::new(config);
        sender.start_session();
        receiver.start_session();
        Harness {
            sender,
            receiver,
            config,
            src,
            disk: BTreeMap::new(),
            dirs: BTreeSet::new(),
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            data: VecDeque::new(),
            max_message: 16 << 10,
            write_delay: 0,
            pending: VecDeque::new(),
            accept: true,
            frame_hook: None,
            after_hash: None,
            sender_events: Vec::new(),
            receiver_events: Vec::new(),
            sender_errors: Vec::new(),
            receiver_errors: Vec::new(),
            sent_by_sender: Vec::new(),
            sent_by_receiver: Vec::new(),
            hash_outputs: 0,
            deliveries: 0,
            max_files_in_flight: 0,
            max_unwritten_chunks: 0,
            max_unwritten_bytes: 0,
            check_limits: true,
            defer_prepare: false,
            deferred_prepares: Vec::new(),
            asked: HashMap::new(),
            pending_bytes: 0,
            has_text,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        self.sender.manifest()
    }

    /// Runs until nothing is in flight and neither side has anything to do.
    /// Panics after `max_deliveries`: a test must not hang.
    pub fn run(&mut self, max_deliveries: usize) {
        for _ in 0..max_deliveries {
            self.drain();
            if self.idle() {
                return;
            }
            self.deliver();
        }
        panic!("no end after {max_deliveries} deliveries");
    }

    /// Runs `n` deliveries (or until idle).
    pub fn run_for(&mut self, n: usize) {
        for _ in 0..n {
            self.drain();
            if self.idle() {
                return;
            }
            self.deliver();
        }
        self.drain();
    }

    pub fn idle(&self) -> bool {
        self.to_receiver.is_empty()
            && self.to_sender.is_empty()
            && self.data.is_empty()
            && self.pending.is_empty()
            && self.deferred_prepares.is_empty()
    }

    /// A dropped connection: everything in flight is lost.
    pub fn drop_connection(&mut self) {
        self.to_receiver.clear();
        self.to_sender.clear();
        self.data.clear();
        // The receiver forgets its requests; so does the harness's ledger,
        // except for writes already handed to the disk.
        self.asked.clear();
    }

    /// Carries out both sides' outputs until neither has any.
    pub fn drain(&mut self) {
        for _ in 0..1_000_000 {
            let mut busy = false;
            while let Some(out) = self.sender.poll() {
                busy = true;
                self.sender_output(out);
            }
            while let Some(out) = self.receiver.poll() {
                busy = true;
                self.receiver_output(out);
                self.check();
            }
            if !busy {
                self.check_ledger();
                return;
            }
        }
        panic!("outputs without end");
    }

    fn sender_output(&mut self, out: SenderOutput) {
        match out {
            SenderOutput::Ctl(msg) => {
                let json = msg.to_json();
                assert!(json.len() <= MAX_CTL_BYTES, "control message of {} bytes", json.len());
                self.sent_by_sender.push(msg);
                self.to_receiver.push_back(json);
            }
            SenderOutput::Hash { file, from, count } => {
                self.hash_outputs += 1;
                let m = self.sender.manifest();
                let hashes = (from..from + count)
                    .map(|chunk| {
                        let (offset, len) = m.chunk_span(file, chunk).expect("asked for a real chunk");
                        chunk_hash(&self.src[file as usize][offset as usize..][..len as usize])
                    })
                    .collect();
                self.sender.hashes_computed(file, from, hashes);
                if let Some(hook) = &mut self.after_hash {
                    hook(&mut self.src);
                }
            }
            SenderOutput::Send { file, chunk, offset, len, expected } => {
                let bytes = &self.src[file as usize][offset as usize..][..len as usize];
                if chunk_hash(bytes) != expected {
                    self.sender.cancel(CancelCode::Changed, format!("file {file} chunk {chunk} changed"));
                    return;
                }
                self.data.extend(frames(file, offset, bytes, self.max_message));
            }
            SenderOutput::Event(event) => self.sender_events.push(event),
        }
    }

    fn receiver_output(&mut self, out: ReceiverOutput) {
        let chunk_size = self.receiver.manifest().map_or(0, |m| m.chunk_size());
        match out {
            ReceiverOutput::Ctl(msg) => {
                if let Ctl::Want { file, ranges } = &msg {
                    for &[start, end] in ranges {
                        for chunk in start..end {
                            let (_, len) =
                                self.receiver.manifest().unwrap().chunk_span(*file, chunk).unwrap();
                            let fresh = self.asked.insert((*file, chunk), u64::from(len)).is_none();
                            assert!(fresh, "chunk {chunk} of file {file} asked for twice");
                        }
                    }
                }
                let json = msg.to_json();
                assert!(json.len() <= MAX_CTL_BYTES);
                self.sent_by_receiver.push(msg);
                self.to_sender.push_back(json);
            }
            ReceiverOutput::Event(event) => {
                match &event {
                    ReceiverEvent::Offered if self.accept => self.receiver.accept(),
                    ReceiverEvent::ChunkCorrupt { file, chunk, .. } => {
                        assert!(self.asked.remove(&(*file, *chunk)).is_some(), "corrupt chunk was asked for");
                    }
                    _ => {}
                }
                self.receiver_events.push(event);
            }
            ReceiverOutput::Prepare { file } if self.defer_prepare => self.deferred_prepares.push(file),
            ReceiverOutput::Prepare { file } => self.prepare(file),
            ReceiverOutput::CreateDir { entry } => {
                let m = self.receiver.manifest().unwrap();
                assert_eq!(m.entries()[entry].kind, EntryKind::Dir);
                self.dirs.insert(m.entries()[entry].path.to_string());
            }
            ReceiverOutput::Write { file, chunk, offset, data } => {
                let len = self.asked.remove(&(file, chunk)).expect("written chunk was asked for");
                assert_eq!(len, data.len() as u64);
                assert_eq!(offset, u64::from(chunk) * u64::from(chunk_size));
                self.pending_bytes += len;
                self.pending.push_back((self.deliveries + self.write_delay, file, chunk, offset, data));
                if self.write_delay == 0 {
                    self.flush_writes();
                }
            }
            ReceiverOutput::Finish { file, hash } => {
                let m = self.receiver.manifest().unwrap();
                let entry = m.file(file).unwrap();
                let mut content =
                    self.disk.remove(&format!("{}{PART}", entry.path)).expect("partial file exists");
                content.truncate(entry.size as usize);
                assert_eq!(content.len() as u64, entry.size);
                assert_eq!(
                    hash,
                    file_hash_of(&content, m.chunk_size()),
                    "Finish hash matches the bytes on disk"
                );
                self.disk.insert(entry.path.to_string(), content);
                self.receiver.file_finished(file);
            }
        }
    }

    /// The driver's `Prepare`: the partial file's chunks hashed.
    fn prepare(&mut self, file: u32) {
        let m = self.receiver.manifest().unwrap();
        let entry = m.file(file).unwrap();
        assert_eq!(entry.kind, EntryKind::File, "Prepare only for files");
        for dir in entry.path.ancestors() {
            self.dirs.insert(dir.to_string());
        }
        let part = self.disk.entry(format!("{}{PART}", entry.path)).or_default();
        let chunks = m.chunk_count(file).unwrap();
        let scanned = (0..chunks)
            .map(|chunk| {
                let (offset, len) = m.chunk_span(file, chunk).unwrap();
                let end = offset as usize + len as usize;
                (part.len() >= end).then(|| chunk_hash(&part[offset as usize..end]))
            })
            .collect();
        self.receiver.partial_scanned(file, scanned);
    }

    /// Acknowledges the writes that are due.
    fn flush_writes(&mut self) {
        while self.pending.front().is_some_and(|w| w.0 <= self.deliveries) {
            let (_, file, chunk, offset, data) = self.pending.pop_front().unwrap();
            self.pending_bytes -= data.len() as u64;
            let path = self.receiver.manifest().unwrap().file(file).unwrap().path.to_string();
            let part = self.disk.entry(format!("{path}{PART}")).or_default();
            let end = offset as usize + data.len();
            if part.len() < end {
                part.resize(end, 0);
            }
            part[offset as usize..end].copy_from_slice(&data);
            self.receiver.chunk_written(file, chunk);
            self.check();
        }
    }

    /// One trip across the network for everything in flight.
    pub fn deliver(&mut self) {
        self.deliveries += 1;
        for json in std::mem::take(&mut self.to_receiver) {
            if let Err(e) = self.receiver.handle_ctl_json(&json) {
                self.receiver_errors.push(e);
            }
            self.check();
        }
        for file in std::mem::take(&mut self.deferred_prepares) {
            self.prepare(file);
        }
        for mut frame in std::mem::take(&mut self.data) {
            if let Some(hook) = &mut self.frame_hook {
                hook(&mut frame);
            }
            if let Err(e) = self.receiver.handle_data(&frame) {
                self.receiver_errors.push(e);
            }
            self.check();
        }
        for json in std::mem::take(&mut self.to_sender) {
            if let Err(e) = self.sender.handle_ctl_json(&json) {
                self.sender_errors.push(e);
            }
        }
        self.flush_writes();
    }

    /// The receiver's limits, from its own report and from the harness's
    /// independent ledger.
    fn check(&mut self) {
        let f = self.receiver.in_flight();
        self.max_files_in_flight = self.max_files_in_flight.max(f.files);
        self.max_unwritten_chunks = self.max_unwritten_chunks.max(f.unwritten_chunks);
        self.max_unwritten_bytes = self.max_unwritten_bytes.max(f.unwritten_bytes);
        if !self.check_limits {
            return;
        }
        // The engine's own numbers include requests queued and not yet
        // polled, so they are the ones to bound at every step.
        let c = &self.config;
        assert!(f.wanted_bytes <= c.window_bytes || f.unwritten_chunks == 1, "{f:?}: asked and unverified");
        assert!(f.unwritten_bytes <= c.window_bytes || f.unwritten_chunks == 1, "{f:?}: asked and unwritten");
        assert!(f.unwritten_chunks <= c.max_pending_writes, "{f:?}: chunks asked and unwritten");
        assert!(
            self.pending.len() <= c.max_pending_writes,
            "{} writes pending on the disk",
            self.pending.len()
        );
        assert!(f.hash_requests <= c.hash_pages_ahead, "{f:?}");
        assert!(f.files <= c.max_files_in_flight, "{f:?}");
    }

    /// Once every output is carried out, the harness's own ledger (from the
    /// `want`s it carried and the `Write`s it performed) must agree with
    /// what the engine reports, so the bounds above are not taken on trust.
    fn check_ledger(&self) {
        if !self.check_limits || self.has_text {
            return;
        }
        let f = self.receiver.in_flight();
        let asked: u64 = self.asked.values().sum();
        let chunks = self.asked.len() + self.pending.len();
        let bytes = asked + self.pending_bytes;
        assert_eq!(
            (f.wanted_bytes, f.unwritten_bytes, f.unwritten_chunks),
            (asked, bytes, chunks),
            "ledger agrees"
        );
        assert_eq!(f.pending_writes, self.pending.len());
    }

    pub fn receiver_cancelled(&self) -> Option<(CancelCode, bool)> {
        self.receiver_events.iter().find_map(|e| match e {
            ReceiverEvent::Cancelled { code, by_peer, .. } => Some((*code, *by_peer)),
            _ => None,
        })
    }

    pub fn sender_cancelled(&self) -> Option<(CancelCode, bool)> {
        self.sender_events.iter().find_map(|e| match e {
            SenderEvent::Cancelled { code, by_peer, .. } => Some((*code, *by_peer)),
            _ => None,
        })
    }

    /// Asserts both sides finished and every file matches its source.
    pub fn assert_complete(&self) {
        assert!(
            self.receiver_events.contains(&ReceiverEvent::Complete),
            "receiver: {:?}",
            self.receiver_events
        );
        assert!(self.sender_events.contains(&SenderEvent::Finished), "sender: {:?}", self.sender_events);
        assert!(self.receiver_errors.is_empty() && self.sender_errors.is_empty());
        let m = self.manifest();
        for (file, entry) in m.files() {
            let src = &self.src[file as usize];
            let want = file_hash_of(src, m.chunk_size());
            let done = self.receiver_events.iter().filter(
                |e| matches!(e, ReceiverEvent::FileDone { file: f, hash } if *f == file && *hash == want),
            );
            assert_eq!(done.count(), 1, "one FileDone with the source's hash for {}", entry.path);
            match entry.kind {
                EntryKind::File => {
                    assert_eq!(self.disk.get(entry.path.as_str()), Some(src), "{}", entry.path)
                }
                EntryKind::Text => {
                    let text = std::str::from_utf8(src).unwrap().to_string();
                    assert!(self.receiver_events.contains(&ReceiverEvent::Text { file, text }));
                }
                EntryKind::Dir => unreachable!(),
            }
        }
        for entry in m.entries().iter().filter(|e| e.kind == EntryKind::Dir) {
            assert!(self.dirs.contains(entry.path.as_str()), "dir {} created", entry.path);
        }
        assert!(!self.disk.keys().any(|k| k.ends_with(PART)), "no partial file left");
    }
}

/// The file hash of `content`, computed the long way.
pub fn file_hash_of(content: &[u8], chunk_size: u32) -> Hash {
    let hashes: Vec<Hash> = content.chunks(chunk_size as usize).map(chunk_hash).collect();
    file_hash(content.len() as u64, chunk_size, &hashes)
}
