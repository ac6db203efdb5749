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
    TooLong { len: usize, max: usize },
    /// More components than the limit.
    #[error("path has {count} components, more than {max}")]
    TooManyComponents { count: usize, max: usize },
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
    Path { path: String, source: PathError },
    /// An entry's `kind` is not `file`, `dir` or `text`.
    #[error("unknown entry kind {kind:?} for {path:?}")]
    UnknownKind { path: String, kind: String },
    /// A `file` or `text` entry without `size`.
    #[error("{path:?} is a file or text entry without a size")]
    MissingSize { path: String },
    /// A `dir` entry with a non-zero `size`.
    #[error("{path:?} is a dir entry with a size ({size})")]
    DirWithSize { path: String, size: u64 },
    /// A `text` entry over 1 MiB.
    #[error("text entry {path:?} is {size} bytes, more than {max}")]
    TextTooLarge { path: String, size: u64, max: u64 },
    /// Two entries with the same path.
    #[error("{path:?} appears twice")]
    Duplicate { path: String },
    /// A `file` entry is also a folder of another entry.
    #[error("{file:?} is a file, but {inside:?} would be inside it")]
    FileIsFolder { file: String, inside: String },
    /// The chunk size is not a power of two from 16 KiB to 16 MiB.
    #[error("chunk size {chunk_size} is not a power of two from 16 KiB to 16 MiB")]
    ChunkSize { chunk_size: u32 },
    /// A file would need 2^32 or more chunks.
    #[error("{path:?} ({size} bytes) needs 2^32 or more chunks")]
    TooManyChunks { path: String, size: u64 },
    /// More files than a u32 index can number.
    #[error("{count} files, more than a u32 file index can number")]
    TooManyFiles { count: usize },
    /// The sizes add up past u64.
    #[error("the sizes add up to more than 2^64 - 1 bytes")]
    TotalOverflow,
    /// The parts carried another number of entries than the header announced.
    #[error("manifest announced {announced} entries but carried {got}")]
    EntryCount { announced: u64, got: u64 },
    /// The sizes add up to another total than the header announced.
    #[error("manifest announced {announced} bytes but its sizes add up to {got}")]
    ByteCount { announced: u64, got: u64 },
}

/// The peer broke the protocol, or sent something this side refuses. The
/// engine that returns it has already queued a `cancel` with
/// [`ProtocolError::cancel_code`] for the peer and a `Cancelled` event.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A control message over [`crate::MAX_CTL_BYTES`].
    #[error("control message is {len} bytes, more than the {max}-byte limit")]
    CtlTooLong { len: usize, max: usize },
    /// A control message that is not valid JSON of a known `type` and shape.
    #[error("malformed control message: {0}")]
    Json(String),
    /// A data frame without a header and at least one payload byte.
    #[error("data frame of {len} bytes: needs a 12-byte header and at least one payload byte")]
    ShortFrame { len: usize },
    /// The manifest breaks a rule (`bad_manifest`).
    #[error("bad manifest: {0}")]
    BadManifest(#[from] ManifestError),
    /// The manifest is over the receiver's limits (`too_large`).
    #[error("manifest has {value} {what}, more than this receiver's limit of {limit}")]
    TooLarge { what: &'static str, value: u64, limit: u64 },
    /// A protocol version this side does not speak.
    #[error("protocol version {version} is not supported (this side speaks {supported})")]
    Version { version: u32, supported: u32 },
    /// A message this side does not take in its current state.
    #[error("unexpected `{msg}` while {state}")]
    Unexpected { msg: &'static str, state: &'static str },
    /// A file index beyond the manifest.
    #[error("file index {file} is out of range (the manifest has {files} files)")]
    NoSuchFile { file: u32, files: u32 },
    /// A chunk range that is empty or beyond the file.
    #[error("chunks {start}..{end} of file {file} are not a valid range (the file has {chunks} chunks)")]
    BadRange { file: u32, start: u32, end: u32, chunks: u32 },
    /// A `hashes` that answers no outstanding `get_hashes`, or not the first one.
    #[error("`hashes` for file {file} from {from} was not asked for (expected {expected:?})")]
    UnaskedHashes { file: u32, from: u32, expected: Option<(u32, u32)> },
    /// A `hashes` page with the wrong number of hashes.
    #[error("`hashes` for file {file} from {from} carries {got} hashes, expected {expected}")]
    HashCount { file: u32, from: u32, got: usize, expected: u32 },
    /// A `hashes` field that is not whole 64-digit hex hashes.
    #[error("bad `hashes` field: {reason}")]
    BadHashes { reason: &'static str },
    /// A data frame that does not continue the chunk asked for first.
    #[error("data frame for file {file} at offset {offset} was not asked for (expected {expected:?})")]
    UnaskedFrame { file: u32, offset: u64, expected: Option<(u32, u64)> },
    /// A data frame that runs past the end of its chunk.
    #[error("data frame for file {file} at offset {offset} with {len} bytes crosses the end of its chunk")]
    FrameCrossesChunk { file: u32, offset: u64, len: usize },
    /// A chunk failed verification too many times.
    #[error("chunk {chunk} of file {file} failed verification {attempts} times")]
    ChunkRetries { file: u32, chunk: u32, attempts: u32 },
    /// A file's hashes differ from an earlier session's (`changed`).
    #[error("file {file} ({path:?}) changed on the sender since the last session")]
    Changed { file: u32, path: String },
    /// A `text` entry's bytes are not UTF-8.
    #[error("text entry {file} is not valid UTF-8")]
    TextNotUtf8 { file: u32 },
    /// `done` does not match the manifest.
    #[error("`done` says {files} files and {bytes} bytes, the manifest has {want_files} and {want_bytes}")]
    DoneMismatch { files: u64, bytes: u64, want_files: u64, want_bytes: u64 },
    /// The receiver queued more requests than the sender keeps.
    #[error("more than {limit} {what} queued")]
    TooManyRequests { what: &'static str, limit: usize },
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
