//! The wire format: control messages (JSON on `peerlink-xfer-ctl`) and data
//! frames (binary on `peerlink-xfer-data`).

use serde::{Deserialize, Serialize};

use crate::manifest::{Entry, RawEntry};
use crate::{MAX_CTL_BYTES, ProtocolError};

/// Bytes of a data frame's header: `u32be file ‖ u64be offset`.
pub const FRAME_HEADER: usize = 12;

/// Hashes in one `hashes` message; fewer only at the end of a file.
pub const HASHES_PER_MESSAGE: u32 = 256;

/// A control message, either direction (`docs/TRANSFER.md` says who sends
/// which). One JSON object per data-channel text message, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Ctl {
    /// Sender → receiver, first: the manifest's header.
    Manifest {
        /// The transfer protocol version, [`crate::PROTOCOL_VERSION`]; another cancels with `protocol`.
        version: u32,
        /// Bytes per chunk: a power of two from 16 KiB to 16 MiB, 1 MiB by default.
        chunk_size: u32,
        /// Entries in all parts together.
        entries: u64,
        /// Sum of the sizes of `file` and `text` entries.
        bytes: u64,
    },
    /// Sender → receiver: the next entries of the manifest.
    ManifestPart {
        /// The next entries, in manifest order; as many as fit in one message.
        entries: Vec<Entry>,
    },
    /// Sender → receiver: the manifest is complete.
    ManifestEnd,
    /// Sender → receiver: chunk hashes of `file` from chunk `from`, 64 hex
    /// characters each ([`crate::hashes_from_hex`]).
    Hashes {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The chunk index of the first hash, as asked in `get_hashes`.
        from: u32,
        /// `min(256, chunks - from)` SHA-256 chunk hashes, lowercase hex, concatenated.
        hashes: String,
    },
    /// Receiver → sender: the manifest is accepted.
    Accept,
    /// Receiver → sender: the manifest is declined.
    Decline {
        /// Why, for the sender's user; may be empty.
        #[serde(default)]
        reason: String,
    },
    /// Receiver → sender: asks for the hashes of `file` from chunk `from`.
    GetHashes {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// The chunk index of the first hash wanted; below the file's chunk count.
        from: u32,
    },
    /// Receiver → sender: asks for chunks, as half-open index ranges.
    Want {
        /// The file index (`file` and `text` entries, in manifest order, from 0).
        file: u32,
        /// `[start, end]` pairs of chunk indices, `end` excluded; each non-empty and within the file.
        ranges: Vec<[u32; 2]>,
    },
    /// Receiver → sender: every file is stored and verified.
    Done {
        /// File indices stored (`file` and `text` entries).
        files: u64,
        /// The manifest's total bytes, repeated.
        bytes: u64,
    },
    /// Either side: the transfer is over.
    Cancel {
        /// Why; a code this side does not know still ends the transfer.
        code: CancelCode,
        /// Details for people (for `io`, which disk error); may be empty.
        #[serde(default)]
        reason: String,
    },
}

/// Why a transfer was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelCode {
    /// Someone pressed Ctrl-C or closed the window.
    User,
    /// The receiver declined.
    Declined,
    /// The manifest breaks a rule.
    BadManifest,
    /// A file changed on the sender while it was being sent.
    Changed,
    /// A disk error; the reason says which.
    Io,
    /// The receiver's disk is full.
    DiskFull,
    /// The other side broke the protocol.
    Protocol,
    /// The manifest is over the receiver's limits.
    TooLarge,
    /// A code this version does not know (from a newer peer).
    #[serde(other)]
    Unknown,
}

impl Ctl {
    /// The JSON text of this message, as sent on the control channel.
    pub fn to_json(&self) -> String {
        // Every field is a string, an integer or a list of those, and `Entry`'s
        // hand-written `Serialize` cannot fail, so serde_json has nothing to
        // refuse.
        serde_json::to_string(self).expect("control messages always serialize")
    }

    /// Parses one control message. Unknown fields are ignored; an unknown
    /// `type`, a missing field or a message over [`MAX_CTL_BYTES`] is an
    /// error. A `manifest_part` whose JSON is well formed but carries an
    /// invalid entry gives [`ProtocolError::BadManifest`], so that the
    /// receiver can answer with `bad_manifest` rather than `protocol`.
    pub fn from_json(text: &str) -> Result<Ctl, ProtocolError> {
        if text.len() > MAX_CTL_BYTES {
            return Err(ProtocolError::CtlTooLong { len: text.len(), max: MAX_CTL_BYTES });
        }
        match serde_json::from_str::<Ctl>(text) {
            Ok(msg) => Ok(msg),
            Err(error) => Err(classify_part_error(text).unwrap_or(ProtocolError::Json(error.to_string()))),
        }
    }

    /// The message's `type`, for diagnostics.
    pub fn kind(&self) -> &'static str {
        match self {
            Ctl::Manifest { .. } => "manifest",
            Ctl::ManifestPart { .. } => "manifest_part",
            Ctl::ManifestEnd => "manifest_end",
            Ctl::Hashes { .. } => "hashes",
            Ctl::Accept => "accept",
            Ctl::Decline { .. } => "decline",
            Ctl::GetHashes { .. } => "get_hashes",
            Ctl::Want { .. } => "want",
            Ctl::Done { .. } => "done",
            Ctl::Cancel { .. } => "cancel",
        }
    }
}

/// Parsing a `manifest_part` fails inside serde when an entry is invalid,
/// which loses the reason. This second, looser parse runs only on that error
/// path and recovers it.
fn classify_part_error(text: &str) -> Option<ProtocolError> {
    #[derive(Deserialize)]
    struct LoosePart {
        #[serde(rename = "type")]
        kind: String,
        entries: Vec<RawEntry>,
    }
    let part: LoosePart = serde_json::from_str(text).ok()?;
    if part.kind != "manifest_part" {
        return None;
    }
    part.entries.into_iter().find_map(|raw| raw.validate().err()).map(ProtocolError::BadManifest)
}

/// A data frame: `u32be file ‖ u64be offset ‖ payload`.
pub fn encode_frame(file: u32, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
    frame.extend_from_slice(&frame_header(file, offset));
    frame.extend_from_slice(payload);
    frame
}

/// A data frame's header: `u32be file ‖ u64be offset`.
pub fn frame_header(file: u32, offset: u64) -> [u8; FRAME_HEADER] {
    let mut header = [0; FRAME_HEADER];
    header[..4].copy_from_slice(&file.to_be_bytes());
    header[4..].copy_from_slice(&offset.to_be_bytes());
    header
}

/// Splits a data frame into `(file, offset, payload)`. The payload must be
/// at least one byte.
pub fn decode_frame(frame: &[u8]) -> Result<(u32, u64, &[u8]), ProtocolError> {
    if frame.len() <= FRAME_HEADER {
        return Err(ProtocolError::ShortFrame { len: frame.len() });
    }
    let (file, rest) = frame.split_at(4);
    let (offset, payload) = rest.split_at(8);
    // The slices are exactly 4 and 8 bytes long, by the split above.
    let file = u32::from_be_bytes(file.try_into().expect("4 bytes"));
    let offset = u64::from_be_bytes(offset.try_into().expect("8 bytes"));
    Ok((file, offset, payload))
}

/// The data frames that carry `data` (a chunk starting at byte `offset` of
/// `file`), each at most `max_message_size` bytes including the header.
/// A `max_message_size` of 12 or less still makes progress: one payload byte
/// per frame.
pub fn frames(
    file: u32,
    offset: u64,
    data: &[u8],
    max_message_size: usize,
) -> impl Iterator<Item = Vec<u8>> + '_ {
    frame_spans(offset, data.len(), max_message_size).map(move |(at, len)| {
        let start = (at - offset) as usize;
        encode_frame(file, at, &data[start..start + len])
    })
}

/// Where each of [`frames`]' frames for `len` bytes at `offset` starts and
/// how many payload bytes it carries: for a driver that reads each payload
/// straight into its frame.
pub fn frame_spans(offset: u64, len: usize, max_message_size: usize) -> impl Iterator<Item = (u64, usize)> {
    let max_payload = max_message_size.saturating_sub(FRAME_HEADER).max(1);
    (0..len).step_by(max_payload).map(move |start| (offset + start as u64, max_payload.min(len - start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let frame = encode_frame(7, 1 << 40, b"xyz");
        assert_eq!(&frame[..FRAME_HEADER], &[0, 0, 0, 7, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(decode_frame(&frame).unwrap(), (7, 1 << 40, &b"xyz"[..]));
        assert_eq!(decode_frame(&frame[..12]), Err(ProtocolError::ShortFrame { len: 12 }));
        assert_eq!(decode_frame(&[]), Err(ProtocolError::ShortFrame { len: 0 }));
    }

    #[test]
    fn frames_split_in_order() {
        let data: Vec<u8> = (0..100u8).collect();
        let out: Vec<_> = frames(3, 1000, &data, 12 + 30).collect();
        assert_eq!(out.len(), 4);
        let mut at = 1000;
        let mut joined = Vec::new();
        for f in &out {
            let (file, offset, payload) = decode_frame(f).unwrap();
            assert_eq!((file, offset), (3, at));
            assert!(payload.len() <= 30);
            at += payload.len() as u64;
            joined.extend_from_slice(payload);
        }
        assert_eq!(joined, data);
        assert_eq!(frames(0, 0, &data, 0).count(), 100);
        // The spans a driver reads into are the frames' own.
        let spans: Vec<_> = frame_spans(1000, data.len(), 12 + 30).collect();
        assert_eq!(spans, [(1000, 30), (1030, 30), (1060, 30), (1090, 10)]);
        for ((at, len), f) in spans.into_iter().zip(&out) {
            let (_, offset, payload) = decode_frame(f).unwrap();
            assert_eq!((offset, payload.len()), (at, len));
            assert_eq!(f[..FRAME_HEADER], frame_header(3, at));
        }
        assert_eq!(frame_spans(0, 0, 100).count(), 0);
    }

    #[test]
    fn unknown_cancel_code_and_type() {
        let msg = Ctl::from_json(r#"{"type":"cancel","code":"quantum","reason":"x"}"#).unwrap();
        assert_eq!(msg, Ctl::Cancel { code: CancelCode::Unknown, reason: "x".into() });
        assert!(matches!(Ctl::from_json(r#"{"type":"teleport"}"#), Err(ProtocolError::Json(_))));
        // Unknown fields are ignored.
        assert_eq!(Ctl::from_json(r#"{"type":"accept","extra":1}"#).unwrap(), Ctl::Accept);
        let long = format!(r#"{{"type":"decline","reason":"{}"}}"#, "x".repeat(MAX_CTL_BYTES));
        assert!(matches!(Ctl::from_json(&long), Err(ProtocolError::CtlTooLong { .. })));
    }
}
