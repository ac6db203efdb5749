//! The receiving side: checks and accepts a manifest, then drives the
//! transfer: asks for hashes and chunks within a window, verifies every
//! chunk, and tells its driver what to write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::mem;

use crate::bits::Bits;
use crate::hash::{Hash, chunk_hash, file_hash, hashes_from_hex};
use crate::manifest::{Entry, EntryKind, Manifest, valid_chunk_size};
use crate::wire::{CancelCode, Ctl, HASHES_PER_MESSAGE};
use crate::{ManifestError, PROTOCOL_VERSION, ProtocolError};

mod output;
pub use output::{InFlight, Progress, ReceiverConfig, ReceiverEvent, ReceiverOutput};

/// How far ahead of the data (chunks past the first one missing) hashes are
/// asked for: 64 pages.
pub const HASHES_AHEAD_OF_DATA: u32 = 64 * crate::wire::HASHES_PER_MESSAGE;

/// Most ranges in one `want`, which keeps it well under the control
/// message limit (a range is at most 24 bytes of JSON).
const MAX_RANGES_PER_WANT: usize = 2048;

#[derive(Debug)]
enum Phase {
    /// Waiting for this session's `manifest`.
    Idle,
    /// Receiving the manifest's parts.
    Collecting {
        chunk_size: u32,
        entries: u64,
        bytes: u64,
        got: Vec<Entry>,
        /// Bytes of the paths in `got`.
        path_bytes: u64,
    },
    /// Waiting for the user's answer.
    Offered(Manifest),
    Transferring,
    Complete,
    Declined,
    Cancelled,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "waiting for a manifest",
            Phase::Collecting { .. } => "receiving a manifest",
            Phase::Offered(_) => "waiting for the user to accept",
            Phase::Transferring => "transferring",
            Phase::Complete => "complete",
            Phase::Declined => "declined",
            Phase::Cancelled => "cancelled",
        }
    }

    fn is_final(&self) -> bool {
        matches!(self, Phase::Complete | Phase::Declined | Phase::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// `Prepare` handed out; waiting for `partial_scanned`. Hashes are
    /// asked for meanwhile.
    Preparing,
    /// Asking for and receiving chunks whose hashes are confirmed, while
    /// the rest of the hashes arrive.
    Transferring,
    /// `Finish` handed out; waiting for `file_finished`.
    Finishing,
}

/// A file that is started and not finished.
#[derive(Debug)]
struct Active {
    size: u64,
    chunks: u32,
    text: bool,
    stage: Stage,
    /// The hashes known so far, a prefix of the file's; kept across
    /// sessions.
    hashes: Vec<Hash>,
    /// Hashes asked for in this session (chunk index reached).
    asked: u32,
    /// Hashes received in this session; pages arrive in the order asked.
    /// Only chunks below it are asked for: data starts to move once the
    /// first page is in, not after a pass over the whole file, and a sender
    /// whose file changed between sessions is caught at the first page that
    /// differs (chunks before it matched their hashes, so they are good).
    confirmed: u32,
    /// The hashes of the chunks already on disk when the file was prepared
    /// (`None` where missing or short), until every hash is known: a chunk
    /// whose hash arrives later is checked against it then.
    on_disk: Vec<Option<Hash>>,
    /// Verified and written (or in `text_buf`).
    have: Bits,
    /// In flight or waiting for the disk.
    busy: Bits,
    have_count: u32,
    have_bytes: u64,
    busy_bytes: u64,
    /// Every chunk below it is `have` or `busy`.
    cursor: u32,
    /// Failures per chunk; a handful at most.
    attempts: Vec<(u32, u32)>,
    /// A text entry's content (at most 1 MiB).
    text_buf: Vec<u8>,
    /// Set with `Finish`.
    file_hash: Hash,
}

/// A chunk asked for; the sender answers in this order.
#[derive(Debug, Clone, Copy)]
struct Requested {
    file: u32,
    chunk: u32,
    offset: u64,
    len: u32,
}

/// An accepted manifest and everything learned about it. Survives sessions.
#[derive(Debug)]
struct Transfer {
    manifest: Manifest,
    /// The next file not yet started.
    next_file: u32,
    active: BTreeMap<u32, Active>,
    files_done: u32,
    /// The next entry to look at for `CreateDir`.
    next_dir: usize,
    /// `get_hashes` in flight, in order (this session).
    hash_requests: VecDeque<(u32, u32)>,
    /// Chunks in flight, in order (this session).
    requested: VecDeque<Requested>,
    /// The bytes of the front of `requested` received so far.
    assembling: Vec<u8>,
    /// `Write`s not yet acknowledged: (file, chunk) → length. Survives
    /// sessions: the driver's disk does not care about the network.
    pending_writes: HashMap<(u32, u32), u32>,
    wanted_bytes: u64,
    unwritten_bytes: u64,
    bytes_done: u64,
    bytes_resumed: u64,
    corrupt_chunks: u64,
}

/// The receiving side of one transfer. Feed it control messages, data
/// frames and the driver's results; [`Receiver::poll`] says what to do
/// next. It is the side that drives: every hash and chunk is asked for by
/// it, and a frame it did not ask for is a protocol error.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    phase: Phase,
    transfer: Option<Transfer>,
    out: VecDeque<ReceiverOutput>,
    bytes_received_session: u64,
}

impl Receiver {
    /// A receiver waiting for a manifest.
    pub fn new(config: ReceiverConfig) -> Receiver {
        Receiver {
            config,
            phase: Phase::Idle,
            transfer: None,
            out: VecDeque::new(),
            bytes_received_session: 0,
        }
    }

    /// A new or reconnected sender: forget what was in flight (requests,
    /// the half-assembled chunk, a partly received manifest) and wait for
    /// its manifest. The accepted manifest, its hashes and the verified
    /// chunks are kept: if the new manifest equals the accepted one, the
    /// transfer continues without asking the user ([`ReceiverEvent::Resumed`]),
    /// after checking the hashes of unfinished files again (a file that
    /// changed on the sender cancels with `changed`). Ignored once the
    /// transfer has ended.
    ///
    /// Disk work does not belong to a session: the driver finishes the
    /// `Prepare`, `Write` and `Finish` it was given and reports them as
    /// usual, before or after this call. Only when a different manifest is
    /// offered ([`ReceiverEvent::Offered`] again) are the old outputs void,
    /// and their results must not be reported.
    pub fn start_session(&mut self) {
        if self.phase.is_final() {
            return;
        }
        self.phase = Phase::Idle;
        self.bytes_received_session = 0;
        self.out.retain(|o| !matches!(o, ReceiverOutput::Ctl(_)));
        if let Some(t) = &mut self.transfer {
            t.reset_session();
        }
    }

    /// One control message from the sender. An error has already queued a
    /// `cancel` for the sender and a `Cancelled` event. Input after the
    /// transfer ended is ignored.
    pub fn handle_ctl(&mut self, msg: Ctl) -> Result<(), ProtocolError> {
        if self.phase.is_final() {
            return Ok(());
        }
        let result = self.apply_ctl(msg).and_then(|()| self.pump());
        self.check(result)
    }

    /// [`Receiver::handle_ctl`] for the JSON text of a message: a message
    /// that does not parse cancels too (`bad_manifest` for an invalid entry,
    /// else `protocol`).
    pub fn handle_ctl_json(&mut self, text: &str) -> Result<(), ProtocolError> {
        if self.phase.is_final() {
            return Ok(());
        }
        match Ctl::from_json(text) {
            Ok(msg) => self.handle_ctl(msg),
            Err(error) => self.check(Err(error)),
        }
    }

    /// One data frame from the sender. It must continue the chunk asked for
    /// first and not yet complete; the chunk is checked once complete.
    pub fn handle_data(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        if self.phase.is_final() {
            return Ok(());
        }
        let result = self.apply_data(frame).and_then(|()| self.pump());
        self.check(result)
    }

    /// The user accepts the offered manifest. Ignored unless one is offered.
    pub fn accept(&mut self) {
        if !matches!(self.phase, Phase::Offered(_)) {
            return;
        }
        let Phase::Offered(manifest) = mem::replace(&mut self.phase, Phase::Transferring) else { return };
        self.transfer = Some(Transfer::new(manifest));
        self.out.push_back(ReceiverOutput::Ctl(Ctl::Accept));
        let result = self.pump();
        let _ = self.check(result);
    }

    /// The user declines the offered manifest; final. Ignored unless one is
    /// offered.
    pub fn decline(&mut self, reason: String) {
        if matches!(self.phase, Phase::Offered(_)) {
            self.phase = Phase::Declined;
            self.out.push_back(ReceiverOutput::Ctl(Ctl::Decline { reason }));
        }
    }

    /// The driver hashed the complete chunks of `file`'s partial file
    /// (`on_disk[i]` is chunk `i`, `None` where it is missing or short).
    /// Chunks that match are kept; the rest are asked for.
    pub fn partial_scanned(&mut self, file: u32, on_disk: Vec<Option<Hash>>) {
        if self.phase.is_final() {
            return;
        }
        let Some(t) = &mut self.transfer else { return };
        let chunk_size = t.manifest.chunk_size();
        let Some(a) = t.active.get_mut(&file) else { return };
        if a.stage != Stage::Preparing {
            return;
        }
        // As found (chunks past it are missing): not one slot per chunk of
        // a file that may have millions.
        a.on_disk = on_disk;
        a.on_disk.truncate(a.chunks as usize);
        // Chunks whose hashes are in already; the rest as their hashes come.
        for chunk in 0..a.hashes.len() as u32 {
            let len = chunk_len(a.size, chunk_size, chunk);
            a.take_from_disk(chunk, len, &mut t.bytes_done, &mut t.bytes_resumed);
        }
        if a.hashes.len() == a.chunks as usize {
            a.on_disk = Vec::new();
        }
        a.stage = Stage::Transferring;
        let result = t.maybe_finish(file, &mut self.out).and_then(|()| self.pump());
        let _ = self.check(result);
    }

    /// The driver wrote a chunk handed out in [`ReceiverOutput::Write`].
    pub fn chunk_written(&mut self, file: u32, chunk: u32) {
        if self.phase.is_final() {
            return;
        }
        let Some(t) = &mut self.transfer else { return };
        let Some(len) = t.pending_writes.remove(&(file, chunk)) else { return };
        let len = u64::from(len);
        t.unwritten_bytes -= len;
        if let Some(a) = t.active.get_mut(&file) {
            a.busy.clear(chunk);
            a.busy_bytes -= len;
            if a.have.set(chunk) {
                a.have_count += 1;
                a.have_bytes += len;
                t.bytes_done += len;
            }
        }
        let result = t.maybe_finish(file, &mut self.out).and_then(|()| self.pump());
        let _ = self.check(result);
    }

    /// The driver could not write `file`: cancels with `disk_full` or `io`.
    /// Chunks already written stay valid for a later resume.
    pub fn write_failed(&mut self, file: u32, disk_full: bool, error: String) {
        let path = self
            .manifest()
            .and_then(|m| m.file(file))
            .map_or_else(|| format!("file {file}"), |e| e.path.to_string());
        let code = if disk_full { CancelCode::DiskFull } else { CancelCode::Io };
        self.cancel(code, format!("writing {path}: {error}"));
    }

    /// The driver flushed and renamed `file` after [`ReceiverOutput::Finish`].
    pub fn file_finished(&mut self, file: u32) {
        if self.phase.is_final() {
            return;
        }
        let Some(t) = &mut self.transfer else { return };
        if t.active.get(&file).is_none_or(|a| a.stage != Stage::Finishing) {
            return;
        }
        if let Some(a) = t.active.remove(&file) {
            t.files_done += 1;
            self.out.push_back(ReceiverOutput::Event(ReceiverEvent::FileDone { file, hash: a.file_hash }));
        }
        let result = self.pump();
        let _ = self.check(result);
    }

    /// Whether the transfer has ended (complete, declined or cancelled).
    pub fn is_over(&self) -> bool {
        self.phase.is_final()
    }

    /// Ends the transfer from this side: queues a `cancel` for the sender
    /// and a `Cancelled` event. Ignored once ended.
    pub fn cancel(&mut self, code: CancelCode, reason: String) {
        if self.phase.is_final() {
            return;
        }
        self.end_cancelled();
        self.out.push_back(ReceiverOutput::Ctl(Ctl::Cancel { code, reason: reason.clone() }));
        self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Cancelled { code, reason, by_peer: false }));
    }

    /// The next thing to do, or `None` until more input arrives.
    #[must_use]
    pub fn poll(&mut self) -> Option<ReceiverOutput> {
        if let Some(output) = self.out.pop_front() {
            return Some(output);
        }
        let Phase::Transferring = self.phase else { return None };
        let t = self.transfer.as_mut()?;
        // Folders one at a time rather than all at accept: a manifest may
        // hold a million of them.
        if let Some(entry) = t.next_dir() {
            return Some(ReceiverOutput::CreateDir { entry });
        }
        if t.files_done == t.manifest.file_count() {
            let done = Ctl::Done { files: u64::from(t.files_done), bytes: t.manifest.total_bytes() };
            self.phase = Phase::Complete;
            self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Complete));
            return Some(ReceiverOutput::Ctl(done));
        }
        None
    }

    /// Counters for progress displays.
    pub fn progress(&self) -> Progress {
        let mut progress =
            Progress { bytes_received_session: self.bytes_received_session, ..Progress::default() };
        if let Some(m) = self.manifest() {
            progress.files_total = m.file_count();
            progress.bytes_total = m.total_bytes();
        }
        if let Some(t) = &self.transfer {
            progress.files_done = t.files_done;
            progress.bytes_done = t.bytes_done;
            progress.bytes_resumed = t.bytes_resumed;
            progress.corrupt_chunks = t.corrupt_chunks;
        }
        progress
    }

    /// What is outstanding right now.
    pub fn in_flight(&self) -> InFlight {
        let Some(t) = &self.transfer else { return InFlight::default() };
        InFlight {
            wanted_bytes: t.wanted_bytes,
            unwritten_bytes: t.unwritten_bytes,
            unwritten_chunks: t.requested.len() + t.pending_writes.len(),
            pending_writes: t.pending_writes.len(),
            files: t.active.len(),
            hash_requests: t.hash_requests.len(),
        }
    }

    /// The manifest offered or accepted, once complete and valid.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.phase {
            Phase::Offered(manifest) => Some(manifest),
            _ => self.transfer.as_ref().map(|t| &t.manifest),
        }
    }

    fn apply_ctl(&mut self, msg: Ctl) -> Result<(), ProtocolError> {
        let limits = self.config;
        match (msg, &mut self.phase) {
            (Ctl::Cancel { code, reason }, _) => {
                self.end_cancelled();
                self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Cancelled {
                    code,
                    reason,
                    by_peer: true,
                }));
            }
            (Ctl::Manifest { version, chunk_size, entries, bytes }, Phase::Idle) => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version { version, supported: PROTOCOL_VERSION });
                }
                // The limits are checked here, before any part arrives, so a
                // huge manifest costs nothing.
                if entries > limits.max_entries {
                    return Err(ProtocolError::TooLarge {
                        what: "entries",
                        value: entries,
                        limit: limits.max_entries,
                    });
                }
                if bytes > limits.max_total_bytes {
                    return Err(ProtocolError::TooLarge {
                        what: "bytes",
                        value: bytes,
                        limit: limits.max_total_bytes,
                    });
                }
                if !valid_chunk_size(chunk_size) {
                    return Err(ManifestError::ChunkSize { chunk_size }.into());
                }
                self.phase = Phase::Collecting { chunk_size, entries, bytes, got: Vec::new(), path_bytes: 0 };
            }
            (Ctl::ManifestPart { entries: part }, Phase::Collecting { entries, got, path_bytes, .. }) => {
                let total = got.len() as u64 + part.len() as u64;
                if total > *entries {
                    return Err(ManifestError::EntryCount { announced: *entries, got: total }.into());
                }
                *path_bytes += part.iter().map(|e| e.path.as_str().len() as u64).sum::<u64>();
                if *path_bytes > limits.max_path_bytes {
                    return Err(ProtocolError::TooLarge {
                        what: "path bytes",
                        value: *path_bytes,
                        limit: limits.max_path_bytes,
                    });
                }
                got.extend(part);
            }
            (Ctl::ManifestEnd, Phase::Collecting { chunk_size, entries, bytes, got, .. }) => {
                let (chunk_size, announced_entries, announced_bytes) = (*chunk_size, *entries, *bytes);
                let got = mem::take(got);
                if got.len() as u64 != announced_entries {
                    return Err(ManifestError::EntryCount {
                        announced: announced_entries,
                        got: got.len() as u64,
                    }
                    .into());
                }
                let manifest = Manifest::new(chunk_size, got)?;
                if manifest.total_bytes() != announced_bytes {
                    return Err(ManifestError::ByteCount {
                        announced: announced_bytes,
                        got: manifest.total_bytes(),
                    }
                    .into());
                }
                if self.transfer.as_ref().is_some_and(|t| t.manifest == manifest) {
                    self.phase = Phase::Transferring;
                    self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Resumed));
                    self.out.push_back(ReceiverOutput::Ctl(Ctl::Accept));
                } else {
                    // Another offer: what was learned about the old one no
                    // longer applies.
                    self.transfer = None;
                    self.phase = Phase::Offered(manifest);
                    self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Offered));
                }
            }
            (Ctl::Hashes { file, from, hashes }, Phase::Transferring) => {
                if let Some(t) = &mut self.transfer {
                    t.on_hashes(file, from, &hashes, &mut self.out)?;
                }
            }
            (msg, phase) => return Err(ProtocolError::Unexpected { msg: msg.kind(), state: phase.name() }),
        }
        Ok(())
    }

    fn apply_data(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        let (file, offset, payload) = crate::wire::decode_frame(frame)?;
        let (Phase::Transferring, Some(t)) = (&self.phase, &mut self.transfer) else {
            return Err(ProtocolError::Unexpected { msg: "data frame", state: self.phase.name() });
        };
        self.bytes_received_session += payload.len() as u64;
        t.on_frame(file, offset, payload, &self.config, &mut self.out)
    }

    /// Asks for whatever the limits allow. Only while transferring: between
    /// sessions there is nobody to ask.
    fn pump(&mut self) -> Result<(), ProtocolError> {
        match (&self.phase, &mut self.transfer) {
            (Phase::Transferring, Some(t)) => t.pump(&self.config, &mut self.out),
            _ => Ok(()),
        }
    }

    /// Turns an error into a cancel for the peer and an event.
    fn check(&mut self, result: Result<(), ProtocolError>) -> Result<(), ProtocolError> {
        if let Err(error) = &result
            && !self.phase.is_final()
        {
            let code = error.cancel_code();
            let reason = error.to_string();
            self.end_cancelled();
            self.out.push_back(ReceiverOutput::Ctl(Ctl::Cancel { code, reason: reason.clone() }));
            self.out.push_back(ReceiverOutput::Event(ReceiverEvent::Cancelled {
                code,
                reason,
                by_peer: false,
            }));
        }
        result
    }

    fn end_cancelled(&mut self) {
        self.phase = Phase::Cancelled;
        // Requests are moot now; writes, finishes and events are not: a
        // verified chunk on disk is worth keeping for a later attempt.
        self.out.retain(|o| !matches!(o, ReceiverOutput::Ctl(_)));
    }
}

/// Bytes of `chunk` in a file of `size` bytes (0 past the end).
fn chunk_len(size: u64, chunk_size: u32, chunk: u32) -> u64 {
    let start = u64::from(chunk) * u64::from(chunk_size);
    size.saturating_sub(start).min(u64::from(chunk_size))
}

impl Active {
    fn new(size: u64, chunks: u32, text: bool) -> Active {
        Active {
            size,
            chunks,
            text,
            stage: Stage::Preparing,
            hashes: Vec::new(),
            asked: 0,
            confirmed: 0,
            on_disk: Vec::new(),
            have: Bits::new(chunks),
            busy: Bits::new(chunks),
            have_count: 0,
            have_bytes: 0,
            busy_bytes: 0,
            cursor: 0,
            attempts: Vec::new(),
            text_buf: Vec::new(),
            file_hash: [0; 32],
        }
    }

    /// Counts `chunk` as had if the copy found on disk matches its hash.
    fn take_from_disk(&mut self, chunk: u32, len: u64, bytes_done: &mut u64, bytes_resumed: &mut u64) {
        let found = self.on_disk.get(chunk as usize).copied().flatten();
        if found.is_some()
            && found.as_ref() == self.hashes.get(chunk as usize)
            && !self.busy.get(chunk)
            && self.have.set(chunk)
        {
            self.have_count += 1;
            self.have_bytes += len;
            *bytes_done += len;
            *bytes_resumed += len;
        }
    }

    /// Bytes neither held nor in flight: what is still ahead for this file.
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.have_bytes + self.busy_bytes)
    }
}

impl Transfer {
    fn new(manifest: Manifest) -> Transfer {
        Transfer {
            manifest,
            next_file: 0,
            active: BTreeMap::new(),
            files_done: 0,
            next_dir: 0,
            hash_requests: VecDeque::new(),
            requested: VecDeque::new(),
            assembling: Vec::new(),
            pending_writes: HashMap::new(),
            wanted_bytes: 0,
            unwritten_bytes: 0,
            bytes_done: 0,
            bytes_resumed: 0,
            corrupt_chunks: 0,
        }
    }

    fn next_dir(&mut self) -> Option<usize> {
        let entries = self.manifest.entries();
        while let Some(entry) = entries.get(self.next_dir) {
            self.next_dir += 1;
            if entry.kind == EntryKind::Dir {
                return Some(self.next_dir - 1);
            }
        }
        None
    }

    /// Forgets the session's requests; every unfinished file has its hashes
    /// asked for (and compared) again.
    fn reset_session(&mut self) {
        for r in self.requested.drain(..) {
            if let Some(a) = self.active.get_mut(&r.file) {
                a.busy.clear(r.chunk);
                a.busy_bytes -= u64::from(r.len);
                a.cursor = a.cursor.min(r.chunk);
            }
            self.unwritten_bytes -= u64::from(r.len);
        }
        self.wanted_bytes = 0;
        self.assembling = Vec::new();
        self.hash_requests.clear();
        for a in self.active.values_mut() {
            // A file with every chunk has nothing to fetch; any other asks
            // for its hashes again, which also checks the sender's file is
            // the one it had.
            let start = if a.have_count == a.chunks { a.chunks } else { 0 };
            a.asked = start;
            a.confirmed = start;
        }
    }

    fn pump(
        &mut self,
        config: &ReceiverConfig,
        out: &mut VecDeque<ReceiverOutput>,
    ) -> Result<(), ProtocolError> {
        self.start_files(config, out)?;
        self.ask_hashes(config, out);
        self.ask_chunks(config, out);
        // Asking for chunks moves each file's cursor past what is on disk:
        // hashes further ahead may be due now, and nothing else would ask.
        self.ask_hashes(config, out);
        Ok(())
    }

    /// Starts files in order while fewer than `max_files_in_flight` are
    /// active and the bytes still ahead in started files are under a window:
    /// enough to keep many small files in flight, without hashing far ahead
    /// of a big one.
    fn start_files(
        &mut self,
        config: &ReceiverConfig,
        out: &mut VecDeque<ReceiverOutput>,
    ) -> Result<(), ProtocolError> {
        while self.next_file < self.manifest.file_count()
            && self.active.len() < config.max_files_in_flight.max(1)
            && self.active.values().map(Active::remaining).sum::<u64>() < config.window_bytes.max(1)
        {
            let file = self.next_file;
            self.next_file += 1;
            let (Some(entry), Some(chunks)) = (self.manifest.file(file), self.manifest.chunk_count(file))
            else {
                continue;
            };
            let text = entry.kind == EntryKind::Text;
            let mut a = Active::new(entry.size, chunks, text);
            if text {
                // Text is kept in memory: nothing on disk to prepare.
                a.stage = Stage::Transferring;
                self.active.insert(file, a);
                self.maybe_finish(file, out)?;
            } else {
                // Hashes are asked for while the driver prepares the file.
                self.active.insert(file, a);
                out.push_back(ReceiverOutput::Prepare { file });
            }
        }
        Ok(())
    }

    fn ask_hashes(&mut self, config: &ReceiverConfig, out: &mut VecDeque<ReceiverOutput>) {
        for (&file, a) in self.active.iter_mut() {
            // No further ahead of the data than HASHES_AHEAD_OF_DATA: the
            // hashes kept grow with what arrived, not with what the sender
            // claims.
            while self.hash_requests.len() < config.hash_pages_ahead.max(1)
                && a.asked < a.chunks
                && a.asked < a.cursor.saturating_add(HASHES_AHEAD_OF_DATA)
            {
                let from = a.asked;
                a.asked += (a.chunks - from).min(HASHES_PER_MESSAGE);
                self.hash_requests.push_back((file, from));
                out.push_back(ReceiverOutput::Ctl(Ctl::GetHashes { file, from }));
            }
        }
    }

    /// Asks for missing chunks, files in order, while the window and the
    /// write slots allow.
    fn ask_chunks(&mut self, config: &ReceiverConfig, out: &mut VecDeque<ReceiverOutput>) {
        let chunk_size = self.manifest.chunk_size();
        'files: for (&file, a) in self.active.iter_mut() {
            if a.stage != Stage::Transferring {
                continue;
            }
            let mut ranges: Vec<[u32; 2]> = Vec::new();
            loop {
                while a.cursor < a.confirmed && (a.have.get(a.cursor) || a.busy.get(a.cursor)) {
                    a.cursor += 1;
                }
                if a.cursor >= a.confirmed {
                    break; // the rest waits for its hashes
                }
                let chunk = a.cursor;
                let len = chunk_len(a.size, chunk_size, chunk);
                let slots = self.requested.len() + self.pending_writes.len();
                let fits = self.unwritten_bytes == 0 || self.unwritten_bytes + len <= config.window_bytes;
                if slots >= config.max_pending_writes.max(1) || !fits {
                    flush_want(file, &mut ranges, out);
                    break 'files;
                }
                a.busy.set(chunk);
                a.busy_bytes += len;
                self.wanted_bytes += len;
                self.unwritten_bytes += len;
                let offset = u64::from(chunk) * u64::from(chunk_size);
                // `len` is at most chunk_size, a u32.
                self.requested.push_back(Requested { file, chunk, offset, len: len as u32 });
                match ranges.last_mut() {
                    Some(last) if last[1] == chunk => last[1] += 1,
                    _ => ranges.push([chunk, chunk + 1]),
                }
                if ranges.len() == MAX_RANGES_PER_WANT {
                    flush_want(file, &mut ranges, out);
                }
            }
            flush_want(file, &mut ranges, out);
        }
    }

    fn on_hashes(
        &mut self,
        file: u32,
        from: u32,
        hex: &str,
        out: &mut VecDeque<ReceiverOutput>,
    ) -> Result<(), ProtocolError> {
        let expected = self.hash_requests.front().copied();
        if expected != Some((file, from)) {
            return Err(ProtocolError::UnaskedHashes { file, from, expected });
        }
        self.hash_requests.pop_front();
        let chunks = self.manifest.chunk_count(file).unwrap_or(0);
        let count = chunks.saturating_sub(from).min(HASHES_PER_MESSAGE);
        let hashes = hashes_from_hex(hex)?;
        if hashes.len() != count as usize {
            return Err(ProtocolError::HashCount { file, from, got: hashes.len(), expected: count });
        }
        // The file may have finished since (its refetch was not needed).
        let Some(a) = self.active.get_mut(&file) else { return Ok(()) };
        if from != a.confirmed {
            return Err(ProtocolError::UnaskedHashes { file, from, expected: Some((file, a.confirmed)) });
        }
        let chunk_size = self.manifest.chunk_size();
        for (at, hash) in (from..).zip(hashes) {
            match a.hashes.get(at as usize) {
                Some(known) if *known != hash => {
                    let path = self.manifest.file(file).map(|e| e.path.to_string()).unwrap_or_default();
                    return Err(ProtocolError::Changed { file, path });
                }
                Some(_) => {}
                None => {
                    a.hashes.push(hash);
                    if a.stage == Stage::Transferring {
                        let len = chunk_len(a.size, chunk_size, at);
                        a.take_from_disk(at, len, &mut self.bytes_done, &mut self.bytes_resumed);
                    }
                }
            }
        }
        a.confirmed = from + count;
        if a.hashes.len() == a.chunks as usize {
            a.on_disk = Vec::new();
        }
        self.maybe_finish(file, out)
    }

    fn on_frame(
        &mut self,
        file: u32,
        offset: u64,
        payload: &[u8],
        config: &ReceiverConfig,
        out: &mut VecDeque<ReceiverOutput>,
    ) -> Result<(), ProtocolError> {
        let Some(head) = self.requested.front().copied() else {
            return Err(ProtocolError::UnaskedFrame { file, offset, expected: None });
        };
        let at = head.offset + self.assembling.len() as u64;
        if file != head.file || offset != at {
            return Err(ProtocolError::UnaskedFrame { file, offset, expected: Some((head.file, at)) });
        }
        if payload.len() > head.len as usize - self.assembling.len() {
            return Err(ProtocolError::FrameCrossesChunk { file, offset, len: payload.len() });
        }
        if self.assembling.is_empty() {
            // Our own request's length, at most the validated chunk size.
            self.assembling.reserve_exact(head.len as usize);
        }
        self.assembling.extend_from_slice(payload);
        if self.assembling.len() < head.len as usize {
            return Ok(());
        }
        self.requested.pop_front();
        let data = mem::take(&mut self.assembling);
        let len = u64::from(head.len);
        self.wanted_bytes -= len;
        let Some(a) = self.active.get_mut(&file) else {
            // Cannot happen: a file with chunks in flight is not finished.
            self.unwritten_bytes -= len;
            return Ok(());
        };
        let chunk = head.chunk;
        // Chunks are asked for only once all hashes are known, so `get` finds it.
        if a.hashes.get(chunk as usize) != Some(&chunk_hash(&data)) {
            self.corrupt_chunks += 1;
            self.unwritten_bytes -= len;
            a.busy.clear(chunk);
            a.busy_bytes -= len;
            a.cursor = a.cursor.min(chunk);
            let attempt = match a.attempts.iter_mut().find(|(c, _)| *c == chunk) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    a.attempts.push((chunk, 1));
                    1
                }
            };
            out.push_back(ReceiverOutput::Event(ReceiverEvent::ChunkCorrupt { file, chunk, attempt }));
            if attempt >= config.max_chunk_attempts {
                return Err(ProtocolError::ChunkRetries { file, chunk, attempts: attempt });
            }
            return Ok(());
        }
        if a.text {
            let end = head.offset as usize + data.len();
            if a.text_buf.len() < end {
                // At most 1 MiB: text sizes are checked in the manifest.
                a.text_buf.resize(a.size as usize, 0);
            }
            a.text_buf[head.offset as usize..end].copy_from_slice(&data);
            self.unwritten_bytes -= len;
            a.busy.clear(chunk);
            a.busy_bytes -= len;
            if a.have.set(chunk) {
                a.have_count += 1;
                a.have_bytes += len;
                self.bytes_done += len;
            }
            return self.maybe_finish(file, out);
        }
        self.pending_writes.insert((file, chunk), head.len);
        out.push_back(ReceiverOutput::Write { file, chunk, offset: head.offset, data });
        Ok(())
    }

    /// Hands out `Finish` (or the text) once every chunk of `file` is held.
    fn maybe_finish(&mut self, file: u32, out: &mut VecDeque<ReceiverOutput>) -> Result<(), ProtocolError> {
        let chunk_size = self.manifest.chunk_size();
        let Some(a) = self.active.get_mut(&file) else { return Ok(()) };
        if a.stage != Stage::Transferring || a.have_count != a.chunks {
            return Ok(());
        }
        a.file_hash = file_hash(a.size, chunk_size, &a.hashes);
        if a.text {
            let hash = a.file_hash;
            let text = String::from_utf8(mem::take(&mut a.text_buf))
                .map_err(|_| ProtocolError::TextNotUtf8 { file })?;
            self.active.remove(&file);
            self.files_done += 1;
            out.push_back(ReceiverOutput::Event(ReceiverEvent::Text { file, text }));
            out.push_back(ReceiverOutput::Event(ReceiverEvent::FileDone { file, hash }));
        } else {
            a.stage = Stage::Finishing;
            out.push_back(ReceiverOutput::Finish { file, hash: a.file_hash });
        }
        Ok(())
    }
}

fn flush_want(file: u32, ranges: &mut Vec<[u32; 2]>, out: &mut VecDeque<ReceiverOutput>) {
    if !ranges.is_empty() {
        out.push_back(ReceiverOutput::Ctl(Ctl::Want { file, ranges: mem::take(ranges) }));
    }
}
