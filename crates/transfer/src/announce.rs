//! How a manifest is announced on the control channel: `manifest`, parts
//! that each fit a control message, `manifest_end`; and the manifest's
//! identity, derived from those messages.

use sha2::{Digest, Sha256};

use crate::hash::to_hex;
use crate::manifest::Manifest;
use crate::wire::Ctl;
use crate::{MAX_CTL_BYTES, PROTOCOL_VERSION};

impl Manifest {
    /// The messages that announce this manifest: `manifest`, parts each at
    /// most [`MAX_CTL_BYTES`] of JSON, `manifest_end`.
    pub fn to_ctl_messages(&self) -> Vec<Ctl> {
        let mut cursor = ManifestCursor::default();
        std::iter::from_fn(|| cursor.next(self)).collect()
    }

    /// A stable identity for this manifest (lowercase hex SHA-256 of its
    /// announcement, one JSON message per line): the same files, sizes and
    /// chunk size give the same id on both sides, so a resumed transfer can
    /// tell it is the same one.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        for msg in self.to_ctl_messages() {
            h.update(msg.to_json().as_bytes());
            h.update(b"\n");
        }
        to_hex(&h.finalize())
    }
}

/// Where a sender is in announcing a manifest, so that the parts can be
/// produced one at a time instead of all at once.
#[derive(Debug, Clone, Default)]
pub(crate) struct ManifestCursor {
    header_sent: bool,
    next_entry: usize,
    end_sent: bool,
}

impl ManifestCursor {
    pub(crate) fn next(&mut self, manifest: &Manifest) -> Option<Ctl> {
        if !self.header_sent {
            self.header_sent = true;
            return Some(Ctl::Manifest {
                version: PROTOCOL_VERSION,
                chunk_size: manifest.chunk_size(),
                entries: manifest.entries().len() as u64,
                bytes: manifest.total_bytes(),
            });
        }
        let entries = manifest.entries();
        if self.next_entry < entries.len() {
            // `{"type":"manifest_part","entries":[` … `]}` plus a comma between entries.
            let mut len = Ctl::ManifestPart { entries: Vec::new() }.to_json().len();
            let mut part = Vec::new();
            for entry in &entries[self.next_entry..] {
                let entry_len =
                    serde_json::to_string(entry).map_or(0, |json| json.len()) + usize::from(!part.is_empty());
                // A single entry is at most about 8 KiB of JSON (a 4096-byte path,
                // escaped), so the first entry of a part always fits.
                if !part.is_empty() && len + entry_len > MAX_CTL_BYTES {
                    break;
                }
                len += entry_len;
                part.push(entry.clone());
            }
            self.next_entry += part.len();
            return Some(Ctl::ManifestPart { entries: part });
        }
        if !self.end_sent {
            self.end_sent = true;
            return Some(Ctl::ManifestEnd);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, MIN_CHUNK_SIZE, RelPath};

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn parts_stay_under_the_limit() {
        let long = "x".repeat(200);
        let entries: Vec<Entry> = (0..2000).map(|i| Entry::file(p(&format!("{long}/{i}")), i)).collect();
        let m = Manifest::new(MIN_CHUNK_SIZE, entries.clone()).unwrap();
        let msgs = m.to_ctl_messages();
        assert!(msgs.len() > 4, "split into several parts");
        assert!(matches!(msgs[0], Ctl::Manifest { entries: 2000, .. }));
        assert_eq!(msgs.last(), Some(&Ctl::ManifestEnd));
        let mut back = Vec::new();
        for msg in &msgs[1..msgs.len() - 1] {
            assert!(msg.to_json().len() <= MAX_CTL_BYTES);
            let Ctl::ManifestPart { entries } = Ctl::from_json(&msg.to_json()).unwrap() else {
                panic!("part")
            };
            back.extend(entries);
        }
        assert_eq!(back, entries);
        let empty = Manifest::new(MIN_CHUNK_SIZE, vec![]).unwrap().to_ctl_messages();
        assert_eq!(empty.len(), 2);
    }

    #[test]
    fn the_id_follows_the_content() {
        let m = |size| Manifest::new(MIN_CHUNK_SIZE, vec![Entry::file(p("a.txt"), size)]).unwrap();
        assert_eq!(m(5).id(), m(5).id());
        assert_ne!(m(5).id(), m(6).id());
        assert_eq!(m(5).id().len(), 64);
    }
}
