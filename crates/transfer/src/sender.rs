//! The sending side: offers a manifest, answers `get_hashes` and `want`,
//! and asks its driver to hash and read chunks.

use std::collections::VecDeque;

use crate::ProtocolError;
use crate::announce::ManifestCursor;
use crate::bits::Bits;
use crate::hash::{Hash, hashes_to_hex};
use crate::manifest::Manifest;
use crate::wire::{CancelCode, Ctl, HASHES_PER_MESSAGE};

/// Most `get_hashes` a sender queues; a receiver keeps only a few in flight.
pub const MAX_QUEUED_HASH_REQUESTS: usize = 4096;
/// Most `want` ranges a sender queues; a receiver's window keeps far fewer
/// in flight.
pub const MAX_QUEUED_WANT_RANGES: usize = 1 << 16;

/// What the driver does next for a [`Sender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderOutput {
    /// Send this on the control channel.
    Ctl(Ctl),
    /// Read chunks `from..from + count` of `file`, hash each
    /// ([`crate::chunk_hash`]) and hand them to [`Sender::hashes_computed`]
    /// (or [`Sender::read_failed`]).
    Hash {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The first chunk index to hash.
        from: u32,
        /// How many consecutive chunks to hash, at most [`HASHES_PER_MESSAGE`] (256).
        count: u32,
    },
    /// Read `len` bytes of `file` at `offset`, make sure they are the bytes
    /// that were hashed (their [`crate::chunk_hash`] is `expected`, or the
    /// file has not been modified since; if not, the file changed: call
    /// [`Sender::cancel`] with [`CancelCode::Changed`]), and send them as
    /// data frames ([`crate::frames`]), in order, before the next `Send`.
    Send {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The chunk index.
        chunk: u32,
        /// Where the chunk starts in the file, in bytes.
        offset: u64,
        /// The chunk's length in bytes: `chunk_size`, or less for a file's last chunk.
        len: u32,
        /// The chunk's hash from [`Sender::hashes_computed`]; the bytes read must match it.
        expected: Hash,
    },
    /// Something to tell the user.
    Event(SenderEvent),
}

/// What happened, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The receiver accepted the manifest (once per session).
    Accepted,
    /// The receiver declined. Final.
    Declined {
        /// The reason the receiver gave in `decline`; may be empty.
        reason: String,
    },
    /// The receiver stored and verified everything. Final.
    Finished,
    /// The transfer is over. Final.
    Cancelled {
        /// The `cancel` code sent or received.
        code: CancelCode,
        /// The `cancel`'s explanation for people; may be empty.
        reason: String,
        /// Whether the peer sent the `cancel` (`false`: this side cancelled).
        by_peer: bool,
    },
}

/// Counters for progress displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Chunks handed out in `Send` outputs, all sessions.
    pub chunks_sent: u64,
    /// Chunk bytes handed out in `Send` outputs, all sessions.
    pub bytes_sent: u64,
    /// Chunk bytes handed out in `Send` outputs since the last
    /// [`Sender::start_session`].
    pub bytes_sent_session: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No session yet.
    Idle,
    /// Manifest announced (or being announced); waiting for the answer.
    Offering,
    Accepted,
    Finished,
    Declined,
    Cancelled,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Idle => "no session has started",
            State::Offering => "waiting for accept or decline",
            State::Accepted => "sending",
            State::Finished => "finished",
            State::Declined => "declined",
            State::Cancelled => "cancelled",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, State::Finished | State::Declined | State::Cancelled)
    }
}

/// Chunk hashes of one file: computed by the driver, kept for every later
/// `get_hashes` and `Send` (32 bytes per chunk).
#[derive(Debug, Default)]
struct FileHashes {
    /// Empty until the file is first needed, then one slot per chunk.
    hashes: Vec<Option<Hash>>,
    /// Chunks whose hash the driver was asked for and has not delivered.
    requested: Bits,
}

/// A run of chunks a `want` asked for, not yet handed out.
#[derive(Debug, Clone, Copy)]
struct Span {
    file: u32,
    next: u32,
    end: u32,
}

/// The sending side of one transfer. Feed it the receiver's control
/// messages and the driver's results; [`Sender::poll`] says what to do next.
/// It never sends anything the receiver did not ask for, and it produces
/// `Send`s one at a time, so a driver that polls only when its data channel
/// has room gets backpressure for free.
#[derive(Debug)]
pub struct Sender {
    manifest: Manifest,
    state: State,
    announce: Option<ManifestCursor>,
    /// Control messages and events, ahead of hash requests and data.
    out: VecDeque<SenderOutput>,
    /// `get_hashes` to answer, in the order asked.
    hash_jobs: VecDeque<(u32, u32)>,
    /// How many of the front `hash_jobs` have had their hashing requested.
    hash_jobs_issued: usize,
    /// Chunks to send, in the order asked.
    wants: VecDeque<Span>,
    cache: Vec<FileHashes>,
    stats: SenderStats,
}

impl Sender {
    /// A sender offering `manifest`. Nothing happens until
    /// [`Sender::start_session`].
    pub fn new(manifest: Manifest) -> Sender {
        let cache = (0..manifest.file_count()).map(|_| FileHashes::default()).collect();
        Sender {
            manifest,
            state: State::Idle,
            announce: None,
            out: VecDeque::new(),
            hash_jobs: VecDeque::new(),
            hash_jobs_issued: 0,
            wants: VecDeque::new(),
            cache,
            stats: SenderStats::default(),
        }
    }

    /// The manifest being offered.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether the transfer has ended (finished, declined or cancelled):
    /// no more data will be asked for.
    pub fn is_over(&self) -> bool {
        self.state.is_final()
    }

    /// A receiver (re)connected: announce the manifest again and forget the
    /// previous session's requests, including `Hash` requests still with the
    /// driver (their results are still welcome, but nothing waits for them,
    /// so a driver that drops its jobs on a reconnect cannot stall the
    /// transfer). Computed hashes and stats are kept. Ignored once the
    /// transfer has ended.
    pub fn start_session(&mut self) {
        if self.state.is_final() {
            return;
        }
        for cache in &mut self.cache {
            cache.requested.clear_all();
        }
        self.state = State::Offering;
        self.announce = Some(ManifestCursor::default());
        self.hash_jobs.clear();
        self.hash_jobs_issued = 0;
        self.wants.clear();
        // Messages for the old connection are moot; events are still news.
        self.out.retain(|o| matches!(o, SenderOutput::Event(_)));
        self.stats.bytes_sent_session = 0;
    }

    /// One control message from the receiver. An error has already queued
    /// a `cancel` for the receiver and a `Cancelled` event. Input after the
    /// transfer ended is ignored.
    pub fn handle_ctl(&mut self, msg: Ctl) -> Result<(), ProtocolError> {
        if self.state.is_final() {
            return Ok(());
        }
        let result = self.apply(msg);
        if let Err(error) = &result {
            self.fail(error);
        }
        result
    }

    /// [`Sender::handle_ctl`] for the JSON text of a message: a message that
    /// does not parse cancels with `protocol` too.
    pub fn handle_ctl_json(&mut self, text: &str) -> Result<(), ProtocolError> {
        if self.state.is_final() {
            return Ok(());
        }
        match Ctl::from_json(text) {
            Ok(msg) => self.handle_ctl(msg),
            Err(error) => {
                self.fail(&error);
                Err(error)
            }
        }
    }

    fn apply(&mut self, msg: Ctl) -> Result<(), ProtocolError> {
        let unexpected =
            |msg: &Ctl, state: State| ProtocolError::Unexpected { msg: msg.kind(), state: state.name() };
        match (&msg, self.state) {
            (Ctl::Cancel { code, reason }, _) => {
                self.end(State::Cancelled);
                self.out.push_back(SenderOutput::Event(SenderEvent::Cancelled {
                    code: *code,
                    reason: reason.clone(),
                    by_peer: true,
                }));
            }
            // Accepting before the whole manifest went out cannot be an
            // answer to it.
            (Ctl::Accept, State::Offering) if self.announce.is_none() => {
                self.state = State::Accepted;
                self.out.push_back(SenderOutput::Event(SenderEvent::Accepted));
            }
            (Ctl::Decline { reason }, State::Offering) if self.announce.is_none() => {
                let reason = reason.clone();
                self.end(State::Declined);
                self.out.push_back(SenderOutput::Event(SenderEvent::Declined { reason }));
            }
            (&Ctl::GetHashes { file, from }, State::Accepted) => {
                let chunks = self.chunks(file)?;
                if from >= chunks {
                    return Err(ProtocolError::BadRange { file, start: from, end: from, chunks });
                }
                if self.hash_jobs.len() >= MAX_QUEUED_HASH_REQUESTS {
                    return Err(ProtocolError::TooManyRequests {
                        what: "get_hashes requests",
                        limit: MAX_QUEUED_HASH_REQUESTS,
                    });
                }
                self.hash_jobs.push_back((file, from));
            }
            (Ctl::Want { file, ranges }, State::Accepted) => {
                let file = *file;
                let chunks = self.chunks(file)?;
                for &[start, end] in ranges {
                    if start >= end || end > chunks {
                        return Err(ProtocolError::BadRange { file, start, end, chunks });
                    }
                }
                if self.wants.len() + ranges.len() > MAX_QUEUED_WANT_RANGES {
                    return Err(ProtocolError::TooManyRequests {
                        what: "want ranges",
                        limit: MAX_QUEUED_WANT_RANGES,
                    });
                }
                self.wants.extend(ranges.iter().map(|&[start, end]| Span { file, next: start, end }));
            }
            (&Ctl::Done { files, bytes }, State::Accepted) => {
                let (want_files, want_bytes) =
                    (u64::from(self.manifest.file_count()), self.manifest.total_bytes());
                if (files, bytes) != (want_files, want_bytes) {
                    return Err(ProtocolError::DoneMismatch { files, bytes, want_files, want_bytes });
                }
                self.end(State::Finished);
                self.out.push_back(SenderOutput::Event(SenderEvent::Finished));
            }
            _ => return Err(unexpected(&msg, self.state)),
        }
        Ok(())
    }

    /// The driver hashed chunks `from..from + hashes.len()` of `file` (after
    /// a [`SenderOutput::Hash`], or on its own). They are kept for the rest of
    /// the transfer. Hashes for chunks that do not exist are ignored.
    pub fn hashes_computed(&mut self, file: u32, from: u32, hashes: Vec<Hash>) {
        let Some(chunks) = self.manifest.chunk_count(file) else { return };
        let fits = u32::try_from(hashes.len())
            .ok()
            .and_then(|n| from.checked_add(n))
            .is_some_and(|end| end <= chunks);
        if !fits {
            return;
        }
        let cache = self.cache_mut(file);
        for (at, hash) in (from..).zip(hashes) {
            cache.hashes[at as usize] = Some(hash);
            cache.requested.clear(at);
        }
    }

    /// The driver could not read `file`: cancels with [`CancelCode::Io`].
    pub fn read_failed(&mut self, file: u32, error: String) {
        let path = self.manifest.file(file).map_or_else(|| format!("file {file}"), |e| e.path.to_string());
        self.cancel(CancelCode::Io, format!("reading {path}: {error}"));
    }

    /// Ends the transfer from this side: queues a `cancel` for the receiver
    /// (if a session started) and a `Cancelled` event. Ignored once ended.
    pub fn cancel(&mut self, code: CancelCode, reason: String) {
        if self.state.is_final() {
            return;
        }
        let tell_peer = self.state != State::Idle;
        self.end(State::Cancelled);
        if tell_peer {
            self.out.push_back(SenderOutput::Ctl(Ctl::Cancel { code, reason: reason.clone() }));
        }
        self.out.push_back(SenderOutput::Event(SenderEvent::Cancelled { code, reason, by_peer: false }));
    }

    /// The next thing to do, or `None` until more input arrives. Control
    /// messages and events come first, then hash requests, then `Send`s.
    #[must_use]
    pub fn poll(&mut self) -> Option<SenderOutput> {
        if let Some(output) = self.out.pop_front() {
            return Some(output);
        }
        if let Some(cursor) = &mut self.announce {
            if let Some(msg) = cursor.next(&self.manifest) {
                return Some(SenderOutput::Ctl(msg));
            }
            self.announce = None;
        }
        if self.state != State::Accepted {
            return None;
        }
        // Answer `get_hashes` in the order asked.
        if let Some(&(file, from)) = self.hash_jobs.front() {
            let count = self.page_len(file, from);
            if let Some(hashes) = self.cached(file, from, count) {
                self.hash_jobs.pop_front();
                self.hash_jobs_issued = self.hash_jobs_issued.saturating_sub(1);
                return Some(SenderOutput::Ctl(Ctl::Hashes { file, from, hashes: hashes_to_hex(&hashes) }));
            }
        }
        // Ask the driver for every queued page at once, so it can hash ahead.
        while self.hash_jobs_issued < self.hash_jobs.len() {
            let (file, from) = self.hash_jobs[self.hash_jobs_issued];
            self.hash_jobs_issued += 1;
            let count = self.page_len(file, from);
            if let Some(request) = self.request_missing(file, from, count) {
                return Some(request);
            }
        }
        // Data, in the order asked.
        while let Some(span) = self.wants.front_mut() {
            let Span { file, next: chunk, end } = *span;
            if chunk >= end {
                self.wants.pop_front();
                continue;
            }
            let Some(expected) =
                self.cache.get(file as usize).and_then(|c| c.hashes.get(chunk as usize).copied().flatten())
            else {
                // A receiver asked before it asked for the hashes (allowed:
                // it may know them from an earlier session). Hash what this
                // range needs, then send.
                let count = (end - chunk).min(HASHES_PER_MESSAGE);
                return self.request_missing(file, chunk, count);
            };
            span.next += 1;
            // `want` ranges were checked against the manifest, so the span exists.
            let Some((offset, len)) = self.manifest.chunk_span(file, chunk) else { continue };
            self.stats.chunks_sent += 1;
            self.stats.bytes_sent += u64::from(len);
            self.stats.bytes_sent_session += u64::from(len);
            return Some(SenderOutput::Send { file, chunk, offset, len, expected });
        }
        None
    }

    /// Counters for progress displays.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    fn chunks(&self, file: u32) -> Result<u32, ProtocolError> {
        self.manifest
            .chunk_count(file)
            .ok_or(ProtocolError::NoSuchFile { file, files: self.manifest.file_count() })
    }

    /// Hashes in the `hashes` answer to `get_hashes { file, from }`.
    fn page_len(&self, file: u32, from: u32) -> u32 {
        self.manifest.chunk_count(file).unwrap_or(0).saturating_sub(from).min(HASHES_PER_MESSAGE)
    }

    fn cache_mut(&mut self, file: u32) -> &mut FileHashes {
        let chunks = self.manifest.chunk_count(file).unwrap_or(0);
        let cache = &mut self.cache[file as usize];
        if cache.hashes.is_empty() && chunks > 0 {
            cache.hashes = vec![None; chunks as usize];
            cache.requested = Bits::new(chunks);
        }
        cache
    }

    fn cached(&self, file: u32, from: u32, count: u32) -> Option<Vec<Hash>> {
        let hashes = &self.cache.get(file as usize)?.hashes;
        hashes.get(from as usize..(from + count) as usize)?.iter().copied().collect()
    }

    /// A `Hash` request for the first run of chunks in `from..from + count`
    /// that is neither known nor already requested.
    fn request_missing(&mut self, file: u32, from: u32, count: u32) -> Option<SenderOutput> {
        let cache = self.cache_mut(file);
        let end = from + count;
        let wanted = |c: &FileHashes, at: u32| {
            c.hashes.get(at as usize).is_some_and(Option::is_none) && !c.requested.get(at)
        };
        let start = (from..end).find(|&at| wanted(cache, at))?;
        let mut stop = start;
        while stop < end && wanted(cache, stop) {
            cache.requested.set(stop);
            stop += 1;
        }
        Some(SenderOutput::Hash { file, from: start, count: stop - start })
    }

    /// Moves to a final state and drops all queued work except events.
    fn end(&mut self, state: State) {
        self.state = state;
        self.announce = None;
        self.hash_jobs.clear();
        self.hash_jobs_issued = 0;
        self.wants.clear();
        self.out.retain(|o| matches!(o, SenderOutput::Event(_)));
    }

    fn fail(&mut self, error: &ProtocolError) {
        let code = error.cancel_code();
        let reason = error.to_string();
        self.end(State::Cancelled);
        self.out.push_back(SenderOutput::Ctl(Ctl::Cancel { code, reason: reason.clone() }));
        self.out.push_back(SenderOutput::Event(SenderEvent::Cancelled { code, reason, by_peer: false }));
    }
}
