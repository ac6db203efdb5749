//! peerlink's file-transfer engine: the protocol of `docs/TRANSFER.md` as
//! two state machines without I/O, a [`Sender`] and a [`Receiver`].
//!
//! Neither touches a socket, a file or the clock. A driver (the CLI, or a
//! test) feeds each one what arrived — control messages ([`Ctl`], JSON on
//! the `peerlink-xfer-ctl` channel), data frames (binary on
//! `peerlink-xfer-data`) and the results of the disk work it was asked to
//! do — and then calls `poll` until it returns `None`, carrying out each
//! output: send a message, hash or read chunks (sender), prepare, write or
//! finish a file (receiver), show an event.
//!
//! The receiver drives: it asks for the hashes of each file's chunks,
//! checks the chunks already on disk against them, and asks for the rest
//! within a window ([`ReceiverConfig`]). Every chunk is verified before it
//! is written, so a fresh start, a resume after a crash and a reconnect are
//! the same path. The sender sends nothing it was not asked for.
//!
//! Wire format: [`Ctl`] ([`Ctl::to_json`], [`Ctl::from_json`]) and data
//! frames ([`encode_frame`], [`decode_frame`], [`frames`]), pinned by the
//! golden fixtures in `fixtures/transfer/`.
//!
//! ```
//! use std::collections::{HashMap, VecDeque};
//! use peerlink_transfer::*;
//!
//! // The sender's files (by file index), and a manifest for them; small
//! // chunks, to show several.
//! let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
//! let src = HashMap::from([(0u32, data.clone())]);
//! let entries = vec![Entry::file(RelPath::parse("docs/a.bin").unwrap(), data.len() as u64)];
//! let mut sender = Sender::new(Manifest::new(MIN_CHUNK_SIZE, entries).unwrap());
//! let mut receiver = Receiver::new(ReceiverConfig::default());
//! sender.start_session(); // both data channels are open
//! receiver.start_session();
//!
//! let mut disk: HashMap<u32, Vec<u8>> = HashMap::new(); // the receiver's partial files
//! let (mut to_receiver, mut to_sender) = (VecDeque::new(), VecDeque::new());
//! let mut data_channel = VecDeque::new();
//! let (mut complete, mut finished) = (false, false);
//! for _trip in 0..100 {
//!     while let Some(out) = sender.poll() {
//!         match out {
//!             SenderOutput::Ctl(msg) => to_receiver.push_back(msg.to_json()),
//!             SenderOutput::Hash { file, from, count } => {
//!                 let m = sender.manifest();
//!                 let hashes = (from..from + count)
//!                     .map(|c| {
//!                         let (offset, len) = m.chunk_span(file, c).unwrap();
//!                         chunk_hash(&src[&file][offset as usize..][..len as usize])
//!                     })
//!                     .collect();
//!                 sender.hashes_computed(file, from, hashes);
//!             }
//!             SenderOutput::Send { file, offset, len, expected, .. } => {
//!                 let bytes = &src[&file][offset as usize..][..len as usize];
//!                 assert_eq!(chunk_hash(bytes), expected); // else cancel(Changed, ..)
//!                 data_channel.extend(frames(file, offset, bytes, 16 * 1024));
//!             }
//!             SenderOutput::Event(SenderEvent::Finished) => finished = true,
//!             SenderOutput::Event(_) => {}
//!         }
//!     }
//!     while let Some(out) = receiver.poll() {
//!         match out {
//!             ReceiverOutput::Ctl(msg) => to_sender.push_back(msg.to_json()),
//!             ReceiverOutput::Event(ReceiverEvent::Offered) => receiver.accept(), // ask the user
//!             ReceiverOutput::Event(ReceiverEvent::Complete) => complete = true,
//!             ReceiverOutput::Event(_) => {}
//!             ReceiverOutput::Prepare { file } => {
//!                 disk.entry(file).or_default(); // a new file: no chunks to report
//!                 receiver.partial_scanned(file, Vec::new());
//!             }
//!             ReceiverOutput::Write { file, chunk, offset, data } => {
//!                 let f = disk.entry(file).or_default();
//!                 f.resize(f.len().max(offset as usize + data.len()), 0);
//!                 f[offset as usize..][..data.len()].copy_from_slice(&data);
//!                 receiver.chunk_written(file, chunk);
//!             }
//!             ReceiverOutput::Finish { file, .. } => receiver.file_finished(file), // flush, rename
//!             ReceiverOutput::CreateDir { .. } => {}
//!         }
//!     }
//!     if complete && finished {
//!         break;
//!     }
//!     // The network: one trip for everything in flight.
//!     for text in to_receiver.drain(..) {
//!         receiver.handle_ctl_json(&text).unwrap();
//!     }
//!     for frame in data_channel.drain(..) {
//!         receiver.handle_data(&frame).unwrap();
//!     }
//!     for text in to_sender.drain(..) {
//!         sender.handle_ctl_json(&text).unwrap();
//!     }
//! }
//! assert!(complete && finished);
//! assert_eq!(disk[&0], data);
//! assert_eq!(receiver.progress().bytes_done, 40_000);
//! ```

#![warn(missing_docs)]

mod announce;
mod bits;
mod error;
mod hash;
mod manifest;
mod receiver;
mod sender;
mod wire;

pub use error::{ManifestError, PathError, ProtocolError};
pub use hash::{
    FILE_HASH_TAG, HASH_HEX_LEN, Hash, chunk_hash, file_hash, hash_from_hex, hashes_from_hex, hashes_to_hex,
    to_hex,
};
pub use manifest::{
    Entry, EntryKind, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_PATH_BYTES, MAX_PATH_COMPONENTS, MAX_TEXT_BYTES,
    MIN_CHUNK_SIZE, Manifest, RelPath, chunk_count, chunk_size_for, valid_chunk_size,
};
pub use receiver::{
    HASHES_AHEAD_OF_DATA, InFlight, Progress, Receiver, ReceiverConfig, ReceiverEvent, ReceiverOutput,
};
pub use sender::{
    MAX_QUEUED_HASH_REQUESTS, MAX_QUEUED_WANT_RANGES, Sender, SenderEvent, SenderOutput, SenderStats,
};
pub use wire::{
    CancelCode, Ctl, FRAME_HEADER, HASHES_PER_MESSAGE, decode_frame, encode_frame, frame_header, frame_spans,
    frames,
};

/// The transfer protocol version, carried by `manifest`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The chunk size a sender uses unless told otherwise: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Label of the control data channel.
pub const CTL_LABEL: &str = "peerlink-xfer-ctl";
/// Label of the data channel.
pub const DATA_LABEL: &str = "peerlink-xfer-data";
/// Largest control message, in bytes of JSON.
pub const MAX_CTL_BYTES: usize = 60_000;
