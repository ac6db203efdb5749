//! The crate's errors: what a peer did wrong ([`ProtocolError`]) and what is
//! wrong with a manifest ([`ManifestError`], [`PathError`]).

use crate::wire::CancelCode;

/// Why a path is not an acceptable manifest path (`docs/TRANSFER.md`).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty")]
    Empty,
    /// Longer than the byte limit.
    #[error("path is {len} bytes, more than {max}")]
    TooLong {
        /// The path's length in bytes.
        len: usize,
        /// The limit, [`crate::MAX_PATH_BYTES`] (4096).
        max: usize,
    },
    /// More components than the limit.
    #[error("path has {count} components, more than {max}")]
    TooManyComponents {
        /// The path's `/`-separated components.
        count: usize,
        /// The limit, [`crate::MAX_PATH_COMPONENTS`] (64).
        max: usize,
    },
    /// Starts with `/`.
    #[error("path is absolute")]
    Absolute,
    /// Starts with a drive letter (`C:`).
    #[error("path starts with a drive letter")]
    DriveLetter,
    /// Has an empty component (`a//b`, a trailing `/`).
    #[error("path has an empty component")]
    EmptyComponent,
    /// Has a `.` or `..` component.
    #[error("path has a `.` or `..` component")]
    DotComponent,
    /// Contains `\`, a path separator on Windows.
    #[error("path contains a backslash")]
    Backslash,
    /// Contains NUL or another control character.
    #[error("path contains a control character")]
    ControlChar,
}

/// Why a manifest breaks the rules of `docs/TRANSFER.md`. A receiver answers
/// it with `cancel` code `bad_manifest`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// An entry's path breaks a rule.
    #[error("bad path {path:?}: {source}")]
    Path {
        /// The path as the manifest gave it.
        path: String,
        /// The rule it breaks.
        source: PathError,
    },
    /// An entry's `kind` is not `file`, `dir` or `text`.
    #[error("unknown entry kind {kind:?} for {path:?}")]
    UnknownKind {
        /// The entry's path.
        path: String,
        /// The `kind` it carried.
        kind: String,
    },
    /// A `file` or `text` entry without `size`.
    #[error("{path:?} is a file or text entry without a size")]
    MissingSize {
        /// The entry's path.
        path: String,
    },
    /// A `dir` entry with a non-zero `size`.
    #[error("{path:?} is a dir entry with a size ({size})")]
    DirWithSize {
        /// The entry's path.
        path: String,
        /// The `size` it carried, in bytes.
        size: u64,
    },
    /// A `text` entry over 1 MiB.
    #[error("text entry {path:?} is {size} bytes, more than {max}")]
    TextTooLarge {
        /// The entry's display name.
        path: String,
        /// Its announced size, in bytes.
        size: u64,
        /// The limit, [`crate::MAX_TEXT_BYTES`] (1 MiB).
        max: u64,
    },
    /// Two entries with the same path.
    #[error("{path:?} appears twice")]
    Duplicate {
        /// The path that appears twice.
        path: String,
    },
    /// A `file` entry is also a folder of another entry.
    #[error("{file:?} is a file, but {inside:?} would be inside it")]
    FileIsFolder {
        /// The `file` entry's path.
        file: String,
        /// An entry whose path puts it inside `file`.
        inside: String,
    },
    /// The chunk size is not a power of two from 16 KiB to 16 MiB.
    #[error("chunk size {chunk_size} is not a power of two from 16 KiB to 16 MiB")]
    ChunkSize {
        /// The chunk size announced, in bytes.
        chunk_size: u32,
    },
    /// A file would need more than [`crate::manifest::MAX_CHUNKS`] chunks.
    #[error("{path:?} ({size} bytes) needs more than 2^22 chunks of this size")]
    TooManyChunks {
        /// The file's path.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// More files than a u32 index can number.
    #[error("{count} files, more than a u32 file index can number")]
    TooManyFiles {
        /// The `file` and `text` entries in the manifest.
        count: usize,
    },
    /// The sizes add up past u64.
    #[error("the sizes add up to more than 2^64 - 1 bytes")]
    TotalOverflow,
    /// The parts carried another number of entries than the header announced.
    #[error("manifest announced {announced} entries but carried {got}")]
    EntryCount {
        /// `entries` in the `manifest` header.
        announced: u64,
        /// Entries carried by the `manifest_part`s received so far.
        got: u64,
    },
    /// The sizes add up to another total than the header announced.
    #[error("manifest announced {announced} bytes but its sizes add up to {got}")]
    ByteCount {
        /// `bytes` in the `manifest` header.
        announced: u64,
        /// The sum of the `file` and `text` entries' sizes.
        got: u64,
    },
}

/// The peer broke the protocol, or sent something this side refuses. The
/// engine that returns it has already queued a `cancel` with
/// [`ProtocolError::cancel_code`] for the peer and a `Cancelled` event.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A control message over [`crate::MAX_CTL_BYTES`].
    #[error("control message is {len} bytes, more than the {max}-byte limit")]
    CtlTooLong {
        /// The message's length in bytes of JSON.
        len: usize,
        /// The limit, [`crate::MAX_CTL_BYTES`].
        max: usize,
    },
    /// A control message that is not valid JSON of a known `type` and shape.
    #[error("malformed control message: {0}")]
    Json(String),
    /// A data frame without a header and at least one payload byte.
    #[error("data frame of {len} bytes: needs a 12-byte header and at least one payload byte")]
    ShortFrame {
        /// The frame's length in bytes.
        len: usize,
    },
    /// The manifest breaks a rule (`bad_manifest`).
    #[error("bad manifest: {0}")]
    BadManifest(#[from] ManifestError),
    /// The manifest is over the receiver's limits (`too_large`).
    #[error("manifest has {value} {what}, more than this receiver's limit of {limit}")]
    TooLarge {
        /// What is over the limit: `entries` or `bytes`.
        what: &'static str,
        /// The amount the `manifest` header announced.
        value: u64,
        /// This receiver's limit ([`crate::ReceiverConfig`]).
        limit: u64,
    },
    /// A protocol version this side does not speak.
    #[error("protocol version {version} is not supported (this side speaks {supported})")]
    Version {
        /// The version the peer's `manifest` carried.
        version: u32,
        /// The version this side speaks, [`crate::PROTOCOL_VERSION`].
        supported: u32,
    },
    /// A message this side does not take in its current state.
    #[error("unexpected `{msg}` while {state}")]
    Unexpected {
        /// The message's `type`, or `data frame`.
        msg: &'static str,
        /// What this side was doing, e.g. `waiting for a manifest`.
        state: &'static str,
    },
    /// A file index beyond the manifest.
    #[error("file index {file} is out of range (the manifest has {files} files)")]
    NoSuchFile {
        /// The file index the message named.
        file: u32,
        /// File indices in the manifest (`file` and `text` entries).
        files: u32,
    },
    /// A chunk range that is empty or beyond the file.
    #[error("chunks {start}..{end} of file {file} are not a valid range (the file has {chunks} chunks)")]
    BadRange {
        /// The file index.
        file: u32,
        /// First chunk index of the range.
        start: u32,
        /// Chunk index just past the range (half-open).
        end: u32,
        /// The file's chunk count.
        chunks: u32,
    },
    /// A `hashes` that answers no outstanding `get_hashes`, or not the first one.
    #[error("`hashes` for file {file} from {from} was not asked for (expected {expected:?})")]
    UnaskedHashes {
        /// The file index the `hashes` named.
        file: u32,
        /// Its first chunk index.
        from: u32,
        /// The file and first chunk of the page expected next; `None` if none was asked for.
        expected: Option<(u32, u32)>,
    },
    /// A `hashes` page with the wrong number of hashes.
    #[error("`hashes` for file {file} from {from} carries {got} hashes, expected {expected}")]
    HashCount {
        /// The file index.
        file: u32,
        /// The page's first chunk index.
        from: u32,
        /// Hashes the message carried.
        got: usize,
        /// `min(256, chunks - from)`, the count it must carry.
        expected: u32,
    },
    /// A `hashes` field that is not whole 64-digit hex hashes.
    #[error("bad `hashes` field: {reason}")]
    BadHashes {
        /// What is wrong with the hex string.
        reason: &'static str,
    },
    /// A data frame that does not continue the chunk asked for first.
    #[error("data frame for file {file} at offset {offset} was not asked for (expected {expected:?})")]
    UnaskedFrame {
        /// The file index in the frame's header.
        file: u32,
        /// The byte offset in the frame's header.
        offset: u64,
        /// The file and byte offset expected next; `None` if no chunk is asked for.
        expected: Option<(u32, u64)>,
    },
    /// A data frame that runs past the end of its chunk.
    #[error("data frame for file {file} at offset {offset} with {len} bytes crosses the end of its chunk")]
    FrameCrossesChunk {
        /// The file index in the frame's header.
        file: u32,
        /// The byte offset in the frame's header.
        offset: u64,
        /// The frame's payload length in bytes.
        len: usize,
    },
    /// A chunk failed verification too many times.
    #[error("chunk {chunk} of file {file} failed verification {attempts} times")]
    ChunkRetries {
        /// The file index.
        file: u32,
        /// The chunk index.
        chunk: u32,
        /// Times it arrived with the wrong hash ([`crate::ReceiverConfig::max_chunk_attempts`]).
        attempts: u32,
    },
    /// A file's hashes differ from an earlier session's (`changed`).
    #[error("file {file} ({path:?}) changed on the sender since the last session")]
    Changed {
        /// The file index.
        file: u32,
        /// The file's path in the manifest.
        path: String,
    },
    /// A `text` entry's bytes are not UTF-8.
    #[error("text entry {file} is not valid UTF-8")]
    TextNotUtf8 {
        /// The `text` entry's file index.
        file: u32,
    },
    /// `done` does not match the manifest.
    #[error("`done` says {files} files and {bytes} bytes, the manifest has {want_files} and {want_bytes}")]
    DoneMismatch {
        /// `files` in the `done`.
        files: u64,
        /// `bytes` in the `done`.
        bytes: u64,
        /// File indices in the manifest (`file` and `text` entries).
        want_files: u64,
        /// The manifest's total bytes.
        want_bytes: u64,
    },
    /// The receiver queued more requests than the sender keeps.
    #[error("more than {limit} {what} queued")]
    TooManyRequests {
        /// What piled up: `get_hashes requests` or `want ranges`.
        what: &'static str,
        /// The limit: [`crate::MAX_QUEUED_HASH_REQUESTS`] or [`crate::MAX_QUEUED_WANT_RANGES`].
        limit: usize,
    },
}

impl ProtocolError {
    /// The `cancel` code that tells the peer about this error.
    pub fn cancel_code(&self) -> CancelCode {
        match self {
            ProtocolError::BadManifest(_) => CancelCode::BadManifest,
            ProtocolError::TooLarge { .. } => CancelCode::TooLarge,
            ProtocolError::Changed { .. } => CancelCode::Changed,
            _ => CancelCode::Protocol,
        }
    }
}
