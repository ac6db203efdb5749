//! The manifest: validated paths, entries, chunk geometry, and its split
//! into control messages.

use std::collections::HashSet;
use std::fmt;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::{ManifestError, PathError};

/// Longest path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most components in one path.
pub const MAX_PATH_COMPONENTS: usize = 64;
/// Largest `text` entry, in bytes.
pub const MAX_TEXT_BYTES: u64 = 1 << 20;
/// Smallest valid chunk size.
pub const MIN_CHUNK_SIZE: u32 = 16 << 10;
/// Largest valid chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Whether `chunk_size` is a power of two from 16 KiB to 16 MiB.
pub fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// Most chunks a file may have: a receiver keeps every chunk hash of a file
/// (32 bytes each, so at most 128 MiB).
pub const MAX_CHUNKS: u64 = 1 << 22;

/// The chunk size a sender picks for files of at most `largest` bytes: the
/// smallest power of two from [`crate::DEFAULT_CHUNK_SIZE`] up that keeps
/// them within [`MAX_CHUNKS`]; `None` above 64 TiB.
pub fn chunk_size_for(largest: u64) -> Option<u32> {
    let mut size = crate::DEFAULT_CHUNK_SIZE;
    while chunk_count(largest, size) > MAX_CHUNKS {
        size = size.checked_mul(2).filter(|&s| s <= MAX_CHUNK_SIZE)?;
    }
    Some(size)
}

/// `ceil(size / chunk_size)`: the chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// A manifest path: relative, `/`-separated, every rule of
/// `docs/TRANSFER.md` checked, so joining it under a destination folder
/// cannot escape that folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Checks `path` against the rules and wraps it.
    pub fn parse(path: &str) -> Result<RelPath, PathError> {
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong { len: path.len(), max: MAX_PATH_BYTES });
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute);
        }
        let bytes = path.as_bytes();
        if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
            return Err(PathError::DriveLetter);
        }
        let mut count = 0;
        for component in path.split('/') {
            count += 1;
            if count > MAX_PATH_COMPONENTS {
                return Err(PathError::TooManyComponents {
                    count: path.split('/').count(),
                    max: MAX_PATH_COMPONENTS,
                });
            }
            if component.is_empty() {
                return Err(PathError::EmptyComponent);
            }
            if component == "." || component == ".." {
                return Err(PathError::DotComponent);
            }
            if component.contains('\\') {
                return Err(PathError::Backslash);
            }
            if component.chars().any(char::is_control) {
                return Err(PathError::ControlChar);
            }
        }
        Ok(RelPath(path.to_owned()))
    }

    /// The path as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, in order; none is empty, `.` or `..`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The folders that contain this path, shortest first: `a/b/c` gives `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(at, _)| &self.0[..at])
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(path: String) -> Result<RelPath, PathError> {
        RelPath::parse(&path)
    }
}

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<RelPath, D::Error> {
        let path = String::deserialize(deserializer)?;
        RelPath::parse(&path).map_err(serde::de::Error::custom)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A file to store; it has a file index.
    File,
    /// A folder to create (an empty or explicit one); no file index.
    Dir,
    /// A message to show, not to store; `path` is its display name. It has a
    /// file index and travels like a file.
    Text,
}

impl EntryKind {
    fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Text => "text",
        }
    }
}

/// One manifest entry. On the wire: `{"kind":"file","path":"a/b","size":3}`;
/// a `dir` has no `size`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawEntry")]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Where it goes under the destination (a display name for `text`).
    pub path: RelPath,
    /// Bytes; 0 for a `dir`.
    pub size: u64,
}

impl Entry {
    /// A file of `size` bytes.
    pub fn file(path: RelPath, size: u64) -> Entry {
        Entry { kind: EntryKind::File, path, size }
    }

    /// A folder.
    pub fn dir(path: RelPath) -> Entry {
        Entry { kind: EntryKind::Dir, path, size: 0 }
    }

    /// A text message of `size` UTF-8 bytes shown under the name `path`.
    pub fn text(path: RelPath, size: u64) -> Entry {
        Entry { kind: EntryKind::Text, path, size }
    }

    /// Whether this entry has a file index (a `file` or `text`).
    pub fn has_data(&self) -> bool {
        self.kind != EntryKind::Dir
    }
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let with_size = self.kind != EntryKind::Dir;
        let mut s = serializer.serialize_struct("Entry", if with_size { 3 } else { 2 })?;
        s.serialize_field("kind", self.kind.as_str())?;
        s.serialize_field("path", self.path.as_str())?;
        if with_size {
            s.serialize_field("size", &self.size)?;
        }
        s.end()
    }
}

/// An entry as it is on the wire, before any rule is checked.
#[derive(Debug, Deserialize)]
pub(crate) struct RawEntry {
    kind: String,
    path: String,
    #[serde(default)]
    size: Option<u64>,
}

impl RawEntry {
    /// The per-entry rules; the rules between entries are
    /// [`Manifest::new`]'s.
    pub(crate) fn validate(self) -> Result<Entry, ManifestError> {
        let kind = match self.kind.as_str() {
            "file" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "text" => EntryKind::Text,
            _ => return Err(ManifestError::UnknownKind { path: self.path, kind: self.kind }),
        };
        let path = match RelPath::parse(&self.path) {
            Ok(path) => path,
            Err(source) => return Err(ManifestError::Path { path: self.path, source }),
        };
        let size = match (kind, self.size) {
            (EntryKind::Dir, None | Some(0)) => 0,
            (EntryKind::Dir, Some(size)) => return Err(ManifestError::DirWithSize { path: self.path, size }),
            (_, Some(size)) => size,
            (_, None) => return Err(ManifestError::MissingSize { path: self.path }),
        };
        Ok(Entry { kind, path, size })
    }
}

impl TryFrom<RawEntry> for Entry {
    type Error = ManifestError;
    fn try_from(raw: RawEntry) -> Result<Entry, ManifestError> {
        raw.validate()
    }
}

/// A validated manifest: what the sender offers and the receiver accepted.
/// Immutable once built, so the file indices it hands out stay valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u32,
    entries: Vec<Entry>,
    /// Entry index of each file index.
    files: Vec<usize>,
    total_bytes: u64,
}

impl Manifest {
    /// Checks every rule of `docs/TRANSFER.md`: the chunk size, each path,
    /// uniqueness, no file used as a folder, sizes (`text` ≤ 1 MiB, a `dir`
    /// has none, fewer than 2^32 chunks per file, a total that fits in u64).
    pub fn new(chunk_size: u32, entries: Vec<Entry>) -> Result<Manifest, ManifestError> {
        if !valid_chunk_size(chunk_size) {
            return Err(ManifestError::ChunkSize { chunk_size });
        }
        let mut files = Vec::new();
        let mut total_bytes = 0u64;
        let mut paths = HashSet::with_capacity(entries.len());
        let mut folders = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            let path = entry.path.as_str();
            match entry.kind {
                EntryKind::Dir if entry.size != 0 => {
                    return Err(ManifestError::DirWithSize { path: path.into(), size: entry.size });
                }
                EntryKind::Text if entry.size > MAX_TEXT_BYTES => {
                    return Err(ManifestError::TextTooLarge {
                        path: path.into(),
                        size: entry.size,
                        max: MAX_TEXT_BYTES,
                    });
                }
                _ => {}
            }
            if chunk_count(entry.size, chunk_size) > MAX_CHUNKS {
                return Err(ManifestError::TooManyChunks { path: path.into(), size: entry.size });
            }
            if !paths.insert(path) {
                return Err(ManifestError::Duplicate { path: path.into() });
            }
            // Slices of the paths themselves: no allocation per ancestor.
            folders.extend(entry.path.ancestors());
            if entry.has_data() {
                files.push(index);
                total_bytes = total_bytes.checked_add(entry.size).ok_or(ManifestError::TotalOverflow)?;
            }
        }
        if u32::try_from(files.len()).is_err() {
            return Err(ManifestError::TooManyFiles { count: files.len() });
        }
        // A `file` entry that is also some entry's folder cannot be stored.
        // Text entries are never stored, so their names cannot conflict.
        for entry in entries.iter().filter(|e| e.kind == EntryKind::File) {
            if folders.contains(entry.path.as_str()) {
                let prefix = format!("{}/", entry.path);
                let inside = entries.iter().find(|e| e.path.as_str().starts_with(&prefix));
                return Err(ManifestError::FileIsFolder {
                    file: entry.path.to_string(),
                    inside: inside.map(|e| e.path.to_string()).unwrap_or_default(),
                });
            }
        }
        Ok(Manifest { chunk_size, entries, files, total_bytes })
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Every entry, in manifest order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of file indices (`file` and `text` entries).
    pub fn file_count(&self) -> u32 {
        // Checked in `new`.
        self.files.len() as u32
    }

    /// The `file` and `text` entries with their file indices.
    pub fn files(&self) -> impl Iterator<Item = (u32, &Entry)> + '_ {
        self.files.iter().enumerate().map(|(file, &entry)| (file as u32, &self.entries[entry]))
    }

    /// The entry of file index `file`.
    pub fn file(&self, file: u32) -> Option<&Entry> {
        self.files.get(file as usize).map(|&entry| &self.entries[entry])
    }

    /// The index into [`Manifest::entries`] of file index `file`.
    pub fn entry_index(&self, file: u32) -> Option<usize> {
        self.files.get(file as usize).copied()
    }

    /// Sum of the sizes of `file` and `text` entries.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Chunks of file index `file`; `None` for an index out of range.
    pub fn chunk_count(&self, file: u32) -> Option<u32> {
        // Fits: checked in `new`.
        self.file(file).map(|entry| chunk_count(entry.size, self.chunk_size) as u32)
    }

    /// Byte offset and length of `chunk` of `file`; `None` if there is no
    /// such chunk.
    pub fn chunk_span(&self, file: u32, chunk: u32) -> Option<(u64, u32)> {
        let size = self.file(file)?.size;
        let offset = u64::from(chunk) * u64::from(self.chunk_size);
        if offset >= size {
            return None;
        }
        // At most chunk_size, which is a u32.
        Some((offset, (size - offset).min(u64::from(self.chunk_size)) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn chunk_limits_and_the_senders_chunk_size_match_the_fixture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/transfer/chunks.json");
        let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(f["max_chunks"], MAX_CHUNKS);
        for c in f["files"].as_array().unwrap() {
            let chunk_size = c["chunk_size"].as_u64().unwrap() as u32;
            let m = Manifest::new(chunk_size, vec![Entry::file(p("f"), c["size"].as_u64().unwrap())]);
            assert_eq!(m.is_ok(), c["valid"], "{}", c["why"]);
            if let Err(e) = m {
                assert!(matches!(e, ManifestError::TooManyChunks { .. }), "{}: {e}", c["why"]);
            }
        }
        for c in f["sender_chunk_size"].as_array().unwrap() {
            let picked = chunk_size_for(c["largest_file"].as_u64().unwrap());
            assert_eq!(picked.map(u64::from), c["chunk_size"].as_u64(), "{}", c["why"]);
        }
    }

    #[test]
    fn paths() {
        for good in ["a", "a b/c d.txt", "ü/日本/x", "ab:c", ".hidden", "a/..b", "x\"y"] {
            assert!(RelPath::parse(good).is_ok(), "{good}");
        }
        let cases = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("C:\\x", PathError::DriveLetter),
            ("C:/x", PathError::DriveLetter),
            ("c:", PathError::DriveLetter),
            ("a\\b", PathError::Backslash),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            (".", PathError::DotComponent),
            ("../x", PathError::DotComponent),
            ("a/../../x", PathError::DotComponent),
            ("a\0b", PathError::ControlChar),
            ("a\nb", PathError::ControlChar),
            ("a\u{7f}", PathError::ControlChar),
            ("a\u{85}", PathError::ControlChar),
        ];
        for (bad, error) in cases {
            assert_eq!(RelPath::parse(bad), Err(error), "{bad:?}");
        }
        assert!(matches!(RelPath::parse(&"a".repeat(4097)), Err(PathError::TooLong { .. })));
        assert!(RelPath::parse(&"a".repeat(4096)).is_ok());
        assert!(RelPath::parse(&vec!["a"; 64].join("/")).is_ok());
        assert!(matches!(RelPath::parse(&vec!["a"; 65].join("/")), Err(PathError::TooManyComponents { .. })));
        assert_eq!(p("a/b/c").ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(p("a/b/c").components().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn manifest_rules() {
        let ok = Manifest::new(
            MIN_CHUNK_SIZE,
            vec![
                Entry::dir(p("d")),
                Entry::file(p("d/a"), 5),
                Entry::text(p("msg"), 3),
                Entry::file(p("b"), 0),
            ],
        )
        .unwrap();
        assert_eq!(ok.file_count(), 3);
        assert_eq!(ok.total_bytes(), 8);
        assert_eq!(ok.entry_index(1), Some(2));
        assert_eq!(ok.chunk_count(2), Some(0));
        assert_eq!(ok.chunk_count(3), None);
        let bad = |chunk_size, entries| Manifest::new(chunk_size, entries).unwrap_err();
        assert!(matches!(
            bad(MIN_CHUNK_SIZE, vec![Entry::file(p("a"), 1), Entry::dir(p("a"))]),
            ManifestError::Duplicate { .. }
        ));
        assert!(matches!(
            bad(MIN_CHUNK_SIZE, vec![Entry::file(p("a"), 1), Entry::file(p("a/b"), 1)]),
            ManifestError::FileIsFolder { .. }
        ));
        assert!(matches!(
            bad(MIN_CHUNK_SIZE, vec![Entry::dir(p("a/b/c")), Entry::file(p("a/b"), 1)]),
            ManifestError::FileIsFolder { .. }
        ));
        assert!(matches!(
            bad(MIN_CHUNK_SIZE, vec![Entry::text(p("t"), MAX_TEXT_BYTES + 1)]),
            ManifestError::TextTooLarge { .. }
        ));
        assert!(matches!(bad(MIN_CHUNK_SIZE + 1, vec![]), ManifestError::ChunkSize { .. }));
        assert!(matches!(bad(MAX_CHUNK_SIZE * 2, vec![]), ManifestError::ChunkSize { .. }));
        assert!(matches!(
            bad(MIN_CHUNK_SIZE, vec![Entry::file(p("a"), u64::MAX)]),
            ManifestError::TooManyChunks { .. }
        ));
        // The largest file has 2^22 chunks of 16 MiB (2^46 bytes): 2^18 of them overflow u64.
        let biggest = MAX_CHUNKS * u64::from(MAX_CHUNK_SIZE);
        let huge: Vec<Entry> = (0..=(1 << 18)).map(|i| Entry::file(p(&i.to_string()), biggest)).collect();
        assert!(matches!(bad(MAX_CHUNK_SIZE, huge), ManifestError::TotalOverflow));
        let mut dir = Entry::dir(p("d"));
        dir.size = 1;
        assert!(matches!(bad(MIN_CHUNK_SIZE, vec![dir]), ManifestError::DirWithSize { .. }));
        // A text entry's name may look like a folder of a file: it is never stored.
        assert!(
            Manifest::new(MIN_CHUNK_SIZE, vec![Entry::text(p("a"), 1), Entry::file(p("a/b"), 1)]).is_ok()
        );
    }

    #[test]
    fn chunk_geometry() {
        let m =
            Manifest::new(MIN_CHUNK_SIZE, vec![Entry::file(p("a"), u64::from(MIN_CHUNK_SIZE) + 1)]).unwrap();
        assert_eq!(m.chunk_count(0), Some(2));
        assert_eq!(m.chunk_span(0, 0), Some((0, MIN_CHUNK_SIZE)));
        assert_eq!(m.chunk_span(0, 1), Some((u64::from(MIN_CHUNK_SIZE), 1)));
        assert_eq!(m.chunk_span(0, 2), None);
        assert_eq!(m.chunk_span(1, 0), None);
    }
}
