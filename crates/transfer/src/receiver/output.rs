//! What a [`Receiver`] is configured with and what it
//! hands its driver and its user.

#[cfg(doc)]
use super::Receiver;
use crate::hash::Hash;
#[cfg(doc)]
use crate::manifest::Manifest;
use crate::wire::{CancelCode, Ctl};

/// The receiver's limits and pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Bytes asked for and not yet written (in flight on the network, or
    /// verified and waiting for the disk). A single chunk larger than the
    /// window is still asked for when nothing else is outstanding. This is
    /// also the bound on chunk data the receiver and its driver hold.
    /// Default 16 MiB.
    pub window_bytes: u64,
    /// `get_hashes` requests in flight at most. Default 32.
    pub hash_pages_ahead: usize,
    /// Most manifest entries accepted (`too_large` above). Default 1,000,000.
    pub max_entries: u64,
    /// Most bytes a manifest may announce (`too_large` above); a driver may
    /// set it to the destination's free space. Default 1 TiB.
    pub max_total_bytes: u64,
    /// Most bytes of paths a manifest may carry, all entries together
    /// (`too_large` above): what collecting it holds. Default 64 MiB.
    pub max_path_bytes: u64,
    /// A chunk that fails verification this many times cancels the
    /// transfer with `protocol`. Default 3.
    pub max_chunk_attempts: u32,
    /// Chunks asked for and not yet written: in flight, or handed out in
    /// [`ReceiverOutput::Write`] and not yet acknowledged with
    /// [`Receiver::chunk_written`]. Counting in-flight chunks too is what
    /// makes the bound on pending writes hold when the disk is slow: no
    /// chunk arrives that has no write slot. Default 256.
    pub max_pending_writes: usize,
    /// Files started (hashes asked for, prepared, being received) and not
    /// finished: bounds the files a driver keeps open. Default 64.
    pub max_files_in_flight: usize,
}

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            window_bytes: 16 << 20,
            hash_pages_ahead: 32,
            max_entries: 1_000_000,
            max_total_bytes: 1 << 40,
            max_path_bytes: 64 << 20,
            max_chunk_attempts: 3,
            max_pending_writes: 256,
            max_files_in_flight: 64,
        }
    }
}

/// What the driver does next for a [`Receiver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverOutput {
    /// Send this on the control channel.
    Ctl(Ctl),
    /// Something to tell the user.
    Event(ReceiverEvent),
    /// Open or create the partial file of `file` (and its parent folders),
    /// hash the complete chunks already in it, and call
    /// [`Receiver::partial_scanned`] (with an empty list for a new file).
    /// Comes only once all of the file's hashes are known, so the driver can
    /// do both in one pass.
    Prepare {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
    },
    /// Create the folder of `dir` entry `entry` (an index into
    /// [`Manifest::entries`]).
    CreateDir {
        /// The `dir` entry's index in [`Manifest::entries`] (not a file index).
        entry: usize,
    },
    /// Write this verified chunk at `offset`, then call
    /// [`Receiver::chunk_written`] (or [`Receiver::write_failed`]).
    Write {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The chunk index, to pass back to [`Receiver::chunk_written`].
        chunk: u32,
        /// Where the chunk starts in the file, in bytes: `chunk * chunk_size`.
        offset: u64,
        /// The chunk's bytes, already checked against its hash.
        data: Vec<u8>,
    },
    /// Every chunk of `file` is written: flush it, rename it from its
    /// partial name to its final name, then call [`Receiver::file_finished`].
    /// `hash` is its file hash.
    Finish {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The file hash (`docs/TRANSFER.md`), computed from its chunk hashes.
        hash: Hash,
    },
}

/// What happened, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A complete, valid manifest ([`Receiver::manifest`]): ask the user,
    /// then call [`Receiver::accept`] or [`Receiver::decline`].
    Offered,
    /// A new session offered the manifest already accepted: the transfer
    /// continues without asking again.
    Resumed,
    /// A chunk did not match its hash; it was discarded and is asked for
    /// again. `attempt` counts its failures.
    ChunkCorrupt {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The chunk index.
        chunk: u32,
        /// This chunk's failures so far, from 1; `max_chunk_attempts` cancels the transfer.
        attempt: u32,
    },
    /// A file is complete: verified, written and renamed (or a text shown).
    FileDone {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The file hash (`docs/TRANSFER.md`), computed from its chunk hashes.
        hash: Hash,
    },
    /// A `text` entry's content, right before its `FileDone`.
    Text {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The message, checked to be valid UTF-8.
        text: String,
    },
    /// Everything is stored and `done` is queued. Final.
    Complete,
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
pub struct Progress {
    /// Files (`file` and `text` entries) in the manifest.
    pub files_total: u32,
    /// Files finished.
    pub files_done: u32,
    /// Bytes in the manifest.
    pub bytes_total: u64,
    /// Bytes verified and written (or, for text, verified), including
    /// `bytes_resumed`.
    pub bytes_done: u64,
    /// Bytes found already on disk and verified ([`Receiver::partial_scanned`]).
    pub bytes_resumed: u64,
    /// Payload bytes received in data frames since [`Receiver::start_session`].
    pub bytes_received_session: u64,
    /// Chunks that failed verification.
    pub corrupt_chunks: u64,
}

/// What is outstanding right now: the quantities the limits of
/// [`ReceiverConfig`] bound. For diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Bytes asked for and not yet received and verified.
    pub wanted_bytes: u64,
    /// Bytes asked for and not yet written (includes `wanted_bytes`); at
    /// most `window_bytes`, or one chunk.
    pub unwritten_bytes: u64,
    /// Chunks asked for and not yet written; at most `max_pending_writes`.
    pub unwritten_chunks: usize,
    /// `Write`s handed out and not yet acknowledged.
    pub pending_writes: usize,
    /// Files started and not finished.
    pub files: usize,
    /// `get_hashes` without an answer.
    pub hash_requests: usize,
}
