//! The file system side of a transfer: what the sender offers, where the
//! receiver puts it, partial files for resume, and the checks that keep a
//! sender from writing outside the output folder.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use peerlink_transfer::{Entry, EntryKind, Hash, RelPath, chunk_hash};

/// Suffix of a file still being received; it is renamed when verified.
pub const PART_SUFFIX: &str = ".peerlink-part";

/// Whether a file name is one the receiver keeps for itself in the output
/// folder (a partial file, the resume record): never sent, never received.
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with(".peerlink-resume") || name.ends_with(PART_SUFFIX)
}

/// What `peerlink send` offers: manifest entries and, for each file index,
/// where to read it.
#[derive(Debug, Default)]
pub struct Source {
    pub entries: Vec<Entry>,
    /// Local path of each `file` entry, by file index (text entries: `None`).
    pub files: Vec<Option<PathBuf>>,
    /// Contents of `text` entries, by file index.
    pub texts: Vec<Option<String>>,
    /// Things left out, with why (symlinks, special files).
    pub skipped: Vec<String>,
}

impl Source {
    fn push_file(&mut self, rel: String, size: u64, local: PathBuf) -> anyhow::Result<()> {
        let path = RelPath::parse(&rel).with_context(|| format!("cannot send {}", local.display()))?;
        self.entries.push(Entry { kind: EntryKind::File, path, size });
        self.files.push(Some(local));
        self.texts.push(None);
        Ok(())
    }

    /// Adds a text message (`send --text`).
    pub fn push_text(&mut self, text: String) -> anyhow::Result<()> {
        let path = RelPath::parse("message.txt").expect("a valid name");
        self.entries.push(Entry { kind: EntryKind::Text, path, size: text.len() as u64 });
        self.files.push(None);
        self.texts.push(Some(text));
        Ok(())
    }

    /// Adds files and folders. A folder is sent with its name and everything
    /// in it; symlinks and special files are skipped and reported.
    pub fn add_paths(&mut self, paths: &[PathBuf]) -> anyhow::Result<()> {
        let mut top = HashSet::new();
        for p in paths {
            let meta = fs::symlink_metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
            let canonical = fs::canonicalize(p).with_context(|| format!("cannot read {}", p.display()))?;
            let name = canonical
                .file_name()
                .with_context(|| format!("{} has no name to send it under", p.display()))?
                .to_str()
                .with_context(|| format!("{} is not valid UTF-8", p.display()))?
                .to_string();
            if !top.insert(name.clone()) {
                bail!("two of the paths to send are named {name:?}; send them from different commands");
            }
            let meta = if meta.file_type().is_symlink() { fs::metadata(p)? } else { meta };
            if meta.is_file() {
                if is_reserved_name(&name) {
                    bail!(
                        "{} is a partial download or a transfer record of peerlink's; rename it to send it",
                        p.display()
                    );
                }
                self.push_file(name, meta.len(), canonical)?;
            } else if meta.is_dir() {
                self.walk(&canonical, name)?;
            } else {
                bail!("{} is neither a file nor a folder", p.display());
            }
        }
        Ok(())
    }

    fn walk(&mut self, dir: &Path, rel: String) -> anyhow::Result<()> {
        let path = RelPath::parse(&rel).with_context(|| format!("cannot send {}", dir.display()))?;
        self.entries.push(Entry { kind: EntryKind::Dir, path, size: 0 });
        let mut children: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let local = child.path();
            let Some(name) = child.file_name().to_str().map(str::to_string) else {
                self.skipped
                    .push(format!("{} (a name that is not UTF-8: rename it to send it)", local.display()));
                continue;
            };
            let child_rel = format!("{rel}/{name}");
            let ft = child.file_type()?;
            // A name no receiver may take (a control character, as in
            // macOS's `Icon\r`, or a backslash) is left out and said, as a
            // symbolic link is, rather than stopping the folder.
            if (ft.is_file() || ft.is_dir())
                && let Err(e) = RelPath::parse(&child_rel)
            {
                self.skipped.push(format!("{} (a name that cannot be sent: {e})", child_rel.escape_debug()));
                continue;
            }
            if ft.is_symlink() {
                self.skipped.push(format!("{child_rel} (a symbolic link)"));
            } else if ft.is_dir() {
                self.walk(&local, child_rel)?;
            } else if ft.is_file() && is_reserved_name(&name) {
                self.skipped
                    .push(format!("{child_rel} (a partial download or transfer record of peerlink's)"));
            } else if ft.is_file() {
                let size = child.metadata()?.len();
                self.push_file(child_rel, size, local)?;
            } else {
                self.skipped.push(format!("{child_rel} (not a regular file)"));
            }
        }
        Ok(())
    }
}

/// Reads `len` bytes of `path` at `offset`.
pub fn read_range(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// SHA-256 of chunks `from..from + count` of `path`.
pub fn hash_chunks(path: &Path, chunk_size: u32, size: u64, from: u32, count: u32) -> io::Result<Vec<Hash>> {
    let file = File::open(path)?;
    let cs = u64::from(chunk_size);
    let mut out = Vec::with_capacity(count as usize);
    for i in from..from + count {
        let offset = u64::from(i) * cs;
        let len = cs.min(size.saturating_sub(offset)) as usize;
        out.push(chunk_hash(&read_range(&file, offset, len)?));
    }
    Ok(out)
}

/// Where the receiver puts what it gets.
#[derive(Debug, Clone)]
pub struct OutDir {
    root: PathBuf,
    overwrite: bool,
    /// Final names planned in this transfer: files prepared at once (or one
    /// named like another's numbered copy) never share one.
    claimed: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    /// Partial files opened in this transfer (device, inode): two names
    /// that a file system does not tell apart (`README.md` and `Readme.md`
    /// where case does not count, the NFC and NFD forms of `café`) open the
    /// same file, and must not both write into it.
    opened: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(u64, u64)>>>,
}

/// Where one file goes.
#[derive(Debug, Clone)]
pub struct Planned {
    pub final_path: PathBuf,
    pub part_path: PathBuf,
}

impl OutDir {
    pub fn new(root: PathBuf, overwrite: bool) -> anyhow::Result<OutDir> {
        fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        let root = fs::canonicalize(&root).with_context(|| format!("cannot open {}", root.display()))?;
        Ok(OutDir { root, overwrite, claimed: Default::default(), opened: Default::default() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/rel`, refusing to go through a symbolic link or to leave the
    /// output folder. The manifest's paths are already relative and free of
    /// `..`; this is the second line of defence, against links already on disk.
    fn join(&self, rel: &RelPath) -> anyhow::Result<PathBuf> {
        let mut path = self.root.clone();
        for comp in Path::new(rel.as_str()).components() {
            match comp {
                Component::Normal(c) => path.push(c),
                _ => bail!("refusing {:?}: it leaves the output folder", rel.as_str()),
            }
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "refusing {:?}: {} is a symbolic link, and writing through it could leave the output folder",
                    rel.as_str(),
                    path.display()
                ),
                _ => {}
            }
        }
        Ok(path)
    }

    /// `root/rel` if it is a regular file reached through no symbolic link.
    pub fn existing_file(&self, rel: &RelPath) -> Option<PathBuf> {
        let path = self.join(rel).ok()?;
        fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()).then_some(path)
    }

    /// Creates the folder of a `dir` entry.
    pub fn create_dir(&self, rel: &RelPath) -> anyhow::Result<()> {
        let path = self.join(rel)?;
        self.create_parents(&path)?;
        match fs::create_dir(&path) {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists
                    && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    }

    /// Creates the folders above `path`, one at a time, checking each.
    fn create_parents(&self, path: &Path) -> anyhow::Result<()> {
        let parent = path.parent().context("no parent folder")?;
        let rel = parent.strip_prefix(&self.root).context("outside the output folder")?;
        let mut cur = self.root.clone();
        for comp in rel.components() {
            cur.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    bail!("refusing to write through the symbolic link {}", cur.display())
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!("{} exists and is not a folder", cur.display()),
                Err(_) => match fs::create_dir(&cur) {
                    Ok(()) => {}
                    // Created meanwhile by a write for another file.
                    Err(e)
                        if e.kind() == io::ErrorKind::AlreadyExists
                            && fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir()) => {}
                    Err(e) => return Err(e).with_context(|| format!("cannot create {}", cur.display())),
                },
            }
        }
        Ok(())
    }

    /// Picks the final and partial names for a file. Without `--overwrite`
    /// an existing file is kept and the new one is named `name (1).ext`
    /// (a partial file beside it does not change that); a partial file from
    /// an earlier attempt is picked up for resume. A name planned for
    /// another file of this transfer is not planned again.
    pub fn plan(&self, rel: &RelPath) -> anyhow::Result<Planned> {
        let base = self.join(rel)?;
        self.create_parents(&base)?;
        let candidates = std::iter::once(base.clone()).chain((1..1000).map(|n| numbered(&base, n)));
        let mut claimed = self.claimed.lock().expect("claimed names lock");
        for final_path in candidates {
            if claimed.contains(&final_path) {
                continue;
            }
            let part_path = part_of(&final_path);
            let meta = fs::symlink_metadata(&final_path);
            if let Err(e) = &meta
                && e.raw_os_error() == Some(libc::ENAMETOOLONG)
            {
                bail!("cannot save {}: the name is too long for this file system", final_path.display());
            }
            let final_exists = meta.is_ok();
            // A file this transfer saved (`README.md`, taken for `Readme.md`
            // where case does not count) is never overwritten by it.
            if let Ok(m) = &meta {
                use std::os::unix::fs::MetadataExt;
                if self.opened.lock().expect("opened files lock").contains(&(m.dev(), m.ino())) {
                    continue;
                }
            }
            if !final_exists || self.overwrite {
                for p in [&final_path, &part_path] {
                    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                        bail!("refusing to write {}: it is a symbolic link", p.display());
                    }
                }
                if final_exists && fs::metadata(&final_path).is_ok_and(|m| m.is_dir()) {
                    bail!("{} exists and is a folder", final_path.display());
                }
                claimed.insert(final_path.clone());
                return Ok(Planned { final_path, part_path });
            }
        }
        bail!("{} and 999 numbered copies of it exist already", base.display())
    }

    /// Opens (or creates) the partial file, never following a symlink.
    /// Fails with `AlreadyExists` if it is a file another file of this
    /// transfer opened (a name the file system does not tell apart from
    /// another's): plan again, and the next name is tried.
    pub fn open_part(&self, planned: &Planned) -> io::Result<File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&planned.part_path)?;
        let m = file.metadata()?;
        if !self.opened.lock().expect("opened files lock").insert((m.dev(), m.ino())) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is already another file's of this transfer (a name this file system does not tell apart from another's)",
                    planned.part_path.display()
                ),
            ));
        }
        Ok(file)
    }
}

/// Longest file name most file systems take, in bytes.
const NAME_MAX: usize = 255;

/// The partial file of `path`: `name.peerlink-part`, or, for a name too
/// long to take the suffix (a name of 242 bytes or more: some 80 CJK
/// characters), one made from a hash of it, so that the file can be
/// received (and resumed) under its own name all the same.
fn part_of(path: &Path) -> PathBuf {
    use sha2::Digest as _;
    let name = path.file_name().unwrap_or_default();
    if name.len() + PART_SUFFIX.len() <= NAME_MAX {
        let mut s = path.as_os_str().to_owned();
        s.push(PART_SUFFIX);
        return PathBuf::from(s);
    }
    let digest = sha2::Sha256::digest(name.as_encoded_bytes());
    let short: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    path.with_file_name(format!(".long-name-{short}{PART_SUFFIX}"))
}

/// `a/b.txt` → `a/b (n).txt`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem} ({n}).{}", ext.to_string_lossy()),
        None => format!("{stem} ({n})"),
    };
    path.with_file_name(name)
}

/// Hashes the complete chunks already in a partial file (for resume).
pub fn scan_part(file: &File, chunk_size: u32, size: u64) -> io::Result<Vec<Option<Hash>>> {
    let have = file.metadata()?.len().min(size);
    let cs = u64::from(chunk_size);
    let chunks = size.div_ceil(cs);
    let mut out = Vec::new();
    // Sized for what is there: most part files are new and empty, and
    // zeroing a chunk-sized buffer for each of many small files was a tenth
    // of the receiver's CPU on them.
    let mut buf = vec![0u8; cs.min(have) as usize];
    let mut reader = io::BufReader::with_capacity(1 << 16, file);
    for i in 0..chunks {
        let offset = i * cs;
        let len = cs.min(size - offset);
        if offset + len > have {
            break;
        }
        let buf = &mut buf[..len as usize];
        reader.read_exact(buf)?;
        out.push(Some(chunk_hash(buf)));
    }
    Ok(out)
}

/// Offsets, lengths and buffers of direct writes are multiples of this:
/// the largest logical block size in common use, so any filesystem that
/// takes direct I/O takes these.
const DIRECT_ALIGN: usize = 4096;

/// A partial file being received.
///
/// Whole aligned chunks are written past the page cache (`O_DIRECT`, on
/// Linux): on the VMs this was measured on, a buffered GiB cost 2.5 s of
/// kernel CPU against 0.3 s direct (`dd` of 1 GiB, `conv=fsync`), which is
/// CPU the transfer itself needs; and a received file does not push
/// everything else out of the cache. The rest (a file's last chunk,
/// filesystems that refuse direct I/O) goes through the page cache.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    /// The same file opened again for direct writes, if the filesystem
    /// takes them.
    direct: Option<File>,
    /// A direct write was refused (`EINVAL`): this filesystem wants other
    /// alignments; every later write is buffered.
    direct_refused: AtomicBool,
    /// What a flush in the background failed with: the system reports a
    /// write-back error once per open file, so the final flush would not.
    flush_failed: std::sync::Mutex<Option<io::Error>>,
}

impl PartFile {
    pub fn new(file: File) -> PartFile {
        let direct = open_direct(&file);
        PartFile { file, direct, direct_refused: AtomicBool::new(false), flush_failed: Default::default() }
    }

    /// Asks the disk to take what was written so far (blocking); an error
    /// is kept for [`finish`], which fails with it.
    pub fn flush_in_background(&self) {
        // Held while flushing: `finish` waits for a flush under way.
        let mut failed = self.flush_failed.lock().expect("flush error lock");
        if let Err(e) = self.file.sync_data() {
            failed.get_or_insert(e);
        }
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Some(direct) = &self.direct
            && !data.is_empty()
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && !self.direct_refused.load(Ordering::Relaxed)
        {
            let copy;
            let buf = if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
                data
            } else {
                copy = Aligned::copy_of(data);
                copy.as_slice()
            };
            match direct.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                // Written buffered below, whatever part went direct.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct writes refused ({e}); writing through the page cache");
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)
    }
}

/// A copy of some bytes that starts on a [`DIRECT_ALIGN`] boundary.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn copy_of(data: &[u8]) -> Aligned {
        let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_ALIGN);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        buf.resize(start, 0);
        buf.extend_from_slice(data);
        Aligned { buf, start }
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// `file` opened again, write-only, for direct I/O: through `/proc/self/fd`,
/// so it is the same file whatever happened to its path since.
#[cfg(target_os = "linux")]
fn open_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &File) -> Option<File> {
    None
}

/// Makes a verified partial file final: truncate to size, flush to disk,
/// rename to the final name, and flush the folder so the new name
/// survives a crash too (the sender is told `done` only after this).
/// Returns where it was saved: without `replace`, never over a file that
/// is there by then (one made meanwhile, or one the file system takes for
/// this name: `README.md` for `Readme.md` where case does not count), but
/// under the next free numbered name.
pub fn finish(part: &PartFile, size: u64, planned: &Planned, replace: bool) -> io::Result<PathBuf> {
    part.file.set_len(size)?;
    part.file.sync_all()?;
    // After the final flush, and waiting for one in the background: the
    // system reports a write-back error once, to whichever flush asks first.
    if let Some(e) = part.flush_failed.lock().expect("flush error lock").take() {
        return Err(e);
    }
    let saved = if planned.part_path == planned.final_path {
        // Finished by an earlier run and checked in place.
        planned.final_path.clone()
    } else if replace {
        fs::rename(&planned.part_path, &planned.final_path)?;
        planned.final_path.clone()
    } else {
        rename_to_a_free_name(&planned.part_path, &planned.final_path)?
    };
    let planned = &Planned { final_path: saved.clone(), part_path: planned.part_path.clone() };
    // Best effort: some file systems refuse to sync a folder, and the file
    // itself is complete and synced.
    if let Some(folder) = planned.final_path.parent()
        && let Err(e) = File::open(folder).and_then(|f| f.sync_all())
    {
        tracing::debug!("cannot sync {}: {e}", folder.display());
    }
    Ok(saved)
}

/// Renames `from` to `to`, or to `to`'s next free numbered name, never
/// replacing a file (`RENAME_NOREPLACE`; where the file system does not
/// take that flag, a plain rename after checking the name is free).
fn rename_to_a_free_name(from: &Path, to: &Path) -> io::Result<PathBuf> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    for candidate in std::iter::once(to.to_path_buf()).chain((1..1000).map(|n| numbered(to, n))) {
        match renameat_with(CWD, from, CWD, &candidate, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(candidate),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                if fs::symlink_metadata(&candidate).is_ok() {
                    continue;
                }
                fs::rename(from, &candidate)?;
                return Ok(candidate);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} and 999 numbered copies of it exist", to.display()),
    ))
}

impl OutDir {
    /// Bytes the files of `entries` still need here: each file's size, less
    /// what its partial file already holds, skipping files `done` says were
    /// finished by an earlier run (by manifest path).
    pub fn bytes_needed<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a Entry>,
        done: impl Fn(&str) -> bool,
    ) -> u64 {
        entries
            .into_iter()
            .filter(|e| e.kind == EntryKind::File && !done(e.path.as_str()))
            .map(|e| {
                let part = self
                    .part_to_resume(&e.path)
                    .and_then(|part| fs::symlink_metadata(part).ok())
                    .filter(|m| m.is_file())
                    .map_or(0, |m| m.len());
                e.size.saturating_sub(part)
            })
            .sum()
    }

    /// The partial file [`OutDir::plan`] would pick up for `rel` (the first
    /// name, plain or numbered, not taken by a finished file), without
    /// planning it: a file saved as `name (1).ext` resumes from
    /// `name (1).ext.peerlink-part`.
    fn part_to_resume(&self, rel: &RelPath) -> Option<PathBuf> {
        let base = self.join(rel).ok()?;
        std::iter::once(base.clone())
            .chain((1..1000).map(|n| numbered(&base, n)))
            .find(|f| self.overwrite || fs::symlink_metadata(f).is_err())
            .map(|f| part_of(&f))
    }

    /// Bytes an unprivileged process may still write in the output folder's
    /// file system; `None` if the system does not say.
    pub fn free_bytes(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.root).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Whether an I/O error means the disk is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) || e.raw_os_error() == Some(122)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peerlink-fsio-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Without `--overwrite` an existing file is kept even with a partial
    /// file beside it (a sender could have delivered that partial file),
    /// and two files of one transfer never get the same name.
    #[test]
    fn plan_keeps_existing_files_and_never_plans_one_name_twice() {
        let dir = tmp("plan");
        fs::write(dir.join("notes.txt"), "mine").unwrap();
        fs::write(dir.join("notes.txt.peerlink-part"), "planted").unwrap();
        fs::write(dir.join("a.txt"), "mine").unwrap();
        fs::write(dir.join("left.bin.peerlink-part"), "half").unwrap();
        let out = OutDir::new(dir.clone(), false).unwrap();
        let rel = |p: &str| RelPath::parse(p).unwrap();
        assert_eq!(out.plan(&rel("notes.txt")).unwrap().final_path, dir.join("notes (1).txt"));
        // `a.txt` exists: the offer's a.txt and a (1).txt each get a name of their own.
        let first = out.plan(&rel("a.txt")).unwrap().final_path;
        let second = out.plan(&rel("a (1).txt")).unwrap().final_path;
        assert_eq!(first, dir.join("a (1).txt"));
        assert_ne!(first, second, "one name planned twice");
        // A partial file with no final file is resumed.
        let left = out.plan(&rel("left.bin")).unwrap();
        assert_eq!(left.part_path, dir.join("left.bin.peerlink-part"));
        // With --overwrite the name itself.
        let over = OutDir::new(dir.clone(), true).unwrap();
        assert_eq!(over.plan(&rel("notes.txt")).unwrap().final_path, dir.join("notes.txt"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Chunks written directly and through the cache, from aligned and
    /// unaligned buffers, at aligned and unaligned offsets, over each other,
    /// read back as written: on the temp folder's filesystem and, where
    /// there is one, on tmpfs.
    #[test]
    fn a_part_file_holds_what_was_written_however_it_was_written() {
        let mut dirs = vec![tmp("part")];
        if Path::new("/dev/shm").is_dir() {
            let shm = Path::new("/dev/shm").join(format!("peerlink-fsio-part-{}", std::process::id()));
            if fs::create_dir_all(&shm).is_ok() {
                dirs.push(shm);
            }
        }
        for dir in dirs {
            let path = dir.join("f.peerlink-part");
            let file =
                OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
            let part = PartFile::new(file);
            let mut expected = vec![0u8; 5 * 65536 + 1000];
            let src: Vec<u8> = (0..expected.len() + 1).map(|i| (i * 7 + i / 251) as u8).collect();
            // (offset, length, start in `src`: 1 makes the buffer unaligned)
            let writes = [
                (65536, 65536, 0),
                (0, 65536, 1),
                (3 * 65536, 2 * 65536 + 1000, 0),
                (2 * 65536 + 100, 5000, 1),
                (2 * 65536, 65536, 1),
                (65536, 4096, 0),
            ];
            for (offset, len, from) in writes {
                let data = &src[from..from + len];
                part.write_at(offset as u64, data).unwrap();
                expected[offset..offset + len].copy_from_slice(data);
            }
            let planned = Planned { part_path: path.clone(), final_path: dir.join("f") };
            finish(&part, expected.len() as u64, &planned, false).unwrap();
            assert_eq!(fs::read(dir.join("f")).unwrap(), expected, "in {}", dir.display());
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// What a file still needs counts what its partial file holds under the
    /// name it is saved as: `backup (1).img` beside a finished `backup.img`
    /// (the check counted the whole file, and a resume into a folder with
    /// room for the rest was refused as short of space, every time).
    #[test]
    fn bytes_needed_counts_the_partial_file_of_a_numbered_name() {
        let dir = tmp("needed");
        fs::write(dir.join("backup.img"), "an older backup").unwrap();
        fs::write(dir.join("backup (1).img.peerlink-part"), vec![0u8; 3000]).unwrap();
        fs::write(dir.join("new.bin.peerlink-part"), vec![0u8; 100]).unwrap();
        let out = OutDir::new(dir.clone(), false).unwrap();
        let entries = [
            Entry::file(RelPath::parse("backup.img").unwrap(), 5000),
            Entry::file(RelPath::parse("new.bin").unwrap(), 1000),
        ];
        assert_eq!(out.bytes_needed(&entries, |_| false), 2000 + 900);
        // With --overwrite, backup.img itself is the name (its partial file is none).
        let over = OutDir::new(dir.clone(), true).unwrap();
        assert_eq!(over.bytes_needed(&entries, |_| false), 5000 + 900);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A name of 250 bytes is received: its partial file has a short name
    /// (the suffix would make it 264 bytes, over the 255 a file system
    /// takes, and the whole transfer stopped there).
    #[test]
    fn a_name_too_long_for_the_suffix_gets_a_short_partial_file() {
        let dir = tmp("long");
        let out = OutDir::new(dir.clone(), false).unwrap();
        let long = format!("{}.txt", "名".repeat(82));
        assert!(long.len() > 242 && long.len() <= 255, "{}", long.len());
        let planned = out.plan(&RelPath::parse(&long).unwrap()).unwrap();
        assert_eq!(planned.final_path, dir.join(&long));
        let part_name = planned.part_path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(part_name.len() <= 255 && is_reserved_name(&part_name), "{part_name}");
        let part = PartFile::new(out.open_part(&planned).unwrap());
        part.write_at(0, b"hello").unwrap();
        finish(&part, 5, &planned, false).unwrap();
        assert_eq!(fs::read(dir.join(&long)).unwrap(), b"hello");
        // The same name, planned again (a resume), finds the same partial file.
        assert_eq!(part_of(&dir.join(&long)), planned.part_path);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A folder with a file whose name no receiver may take (macOS's
    /// `Icon\r`, a backslash) is sent without it, and says so; the whole
    /// send stopped there.
    #[test]
    fn names_that_cannot_be_sent_are_left_out_of_a_folder_and_said() {
        let dir = tmp("badnames");
        let album = dir.join("album");
        fs::create_dir_all(album.join("sub\\dir")).unwrap();
        fs::write(album.join("ok.txt"), "ok").unwrap();
        fs::write(album.join("Icon\r"), "").unwrap();
        fs::write(album.join("back\\slash.txt"), "x").unwrap();
        fs::write(album.join("sub\\dir").join("inside.txt"), "y").unwrap();
        let mut src = Source::default();
        src.add_paths(&[album]).unwrap();
        let paths: Vec<&str> = src.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["album", "album/ok.txt"]);
        assert_eq!(src.skipped.len(), 3, "{:?}", src.skipped);
        assert!(
            src.skipped.iter().any(|s| s.contains("Icon\\r") && s.contains("cannot be sent")),
            "{:?}",
            src.skipped
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A file finished without --overwrite never replaces one that is
    /// there by then (made meanwhile, or one the file system takes for its
    /// name where case does not count): it is saved under the next name.
    /// With --overwrite, a file this transfer saved is not overwritten by
    /// another of its files. A numbered name too long to exist is refused
    /// when planned, not after the download.
    #[test]
    fn a_finished_file_never_replaces_one_that_came_meanwhile() {
        let dir = tmp("noreplace");
        let out = OutDir::new(dir.clone(), false).unwrap();
        let planned = out.plan(&RelPath::parse("a.txt").unwrap()).unwrap();
        let part = PartFile::new(out.open_part(&planned).unwrap());
        part.write_at(0, b"new").unwrap();
        fs::write(dir.join("a.txt"), "came meanwhile").unwrap();
        assert_eq!(finish(&part, 3, &planned, false).unwrap(), dir.join("a (1).txt"));
        assert_eq!(fs::read(dir.join("a.txt")).unwrap(), b"came meanwhile");
        assert_eq!(fs::read(dir.join("a (1).txt")).unwrap(), b"new");

        let over = OutDir::new(dir.clone(), true).unwrap();
        let first = over.plan(&RelPath::parse("b.txt").unwrap()).unwrap();
        let part = PartFile::new(over.open_part(&first).unwrap());
        part.write_at(0, b"first").unwrap();
        assert_eq!(finish(&part, 5, &first, true).unwrap(), dir.join("b.txt"));
        // Another file of the transfer taken for b.txt (here: the same name
        // again) does not overwrite the one just saved.
        over.claimed.lock().unwrap().clear();
        assert_eq!(over.plan(&RelPath::parse("b.txt").unwrap()).unwrap().final_path, dir.join("b (1).txt"));

        let long = format!("{}.txt", "x".repeat(250));
        fs::write(dir.join(&long), "there").unwrap();
        let err = out.plan(&RelPath::parse(&long).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("too long"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_files_get_numbered_names_unless_overwriting() {
        let dir = tmp("names");
        fs::write(dir.join("a.txt"), "old").unwrap();
        let out = OutDir::new(dir.clone(), false).unwrap();
        let p = out.plan(&RelPath::parse("a.txt").unwrap()).unwrap();
        assert_eq!(p.final_path, dir.join("a (1).txt"));
        let out = OutDir::new(dir.clone(), true).unwrap();
        assert_eq!(out.plan(&RelPath::parse("a.txt").unwrap()).unwrap().final_path, dir.join("a.txt"));
        // A partial file from an earlier attempt is picked up again.
        fs::write(dir.join("b (1).bin.peerlink-part"), "x").unwrap();
        fs::write(dir.join("b.bin"), "done before").unwrap();
        let out = OutDir::new(dir.clone(), false).unwrap();
        assert_eq!(out.plan(&RelPath::parse("b.bin").unwrap()).unwrap().final_path, dir.join("b (1).bin"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn symlinks_in_the_output_folder_are_not_followed() {
        let dir = tmp("links");
        let outside = tmp("links-outside");
        std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();
        let out = OutDir::new(dir.clone(), true).unwrap();
        let err = out.plan(&RelPath::parse("escape/x.txt").unwrap()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(out.create_dir(&RelPath::parse("escape/d").unwrap()).is_err());
        std::os::unix::fs::symlink(outside.join("target"), dir.join("f.txt")).unwrap();
        let err = out.plan(&RelPath::parse("f.txt").unwrap()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside");
        fs::remove_dir_all(dir).unwrap();
        fs::remove_dir_all(outside).unwrap();
    }
}
