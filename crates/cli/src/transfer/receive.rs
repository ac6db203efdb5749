//! `peerlink receive CODE`: pair with the sender, look at what it offers,
//! and fetch it into a folder: verified, resumable, never outside the folder.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use peerlink_pair::{Code, Role};
use peerlink_peer::{DataChannel, Message, Room, RoomConfig, SendError};
use peerlink_transfer::{
    CancelCode, EntryKind, Hash, Manifest, Receiver, ReceiverConfig, ReceiverEvent, ReceiverOutput, RelPath,
    to_hex,
};
use serde::{Deserialize, Serialize};

use tokio::sync::{mpsc, oneshot};

use super::fsio::{self, OutDir, PartFile, Planned};
use super::link::{Link, LinkEvent};
use super::report::{Report, Side, Totals};
use super::ui::Ui;
use crate::common::humantime;

use super::{Common, Fault, Outcome};

#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// The code the sender printed, e.g. 7-lantern-zebra-acid.
    #[arg(required_unless_present = "resume")]
    code: Option<String>,
    /// Folder to put what arrives in.
    #[arg(long, short, default_value = ".")]
    out: PathBuf,
    /// Replace existing files instead of saving as `name (1).ext`.
    #[arg(long)]
    overwrite: bool,
    /// Accept without asking.
    #[arg(long, short)]
    yes: bool,
    /// Continue the interrupted transfer recorded in the output folder.
    #[arg(long, conflicts_with = "code")]
    resume: bool,
    #[command(flatten)]
    common: Common,
}

impl ReceiveArgs {
    /// Whether events go to stdout as JSON lines (`--json`).
    pub fn json(&self) -> bool {
        self.common.json
    }
}

/// What the output folder remembers about an unfinished transfer, so that
/// `receive --resume` needs no code and finished files are not fetched again.
#[derive(Debug, Serialize, Deserialize)]
struct ResumeRecord {
    code: String,
    server: String,
    /// Identity of the accepted manifest.
    manifest: Option<String>,
}

const RESUME_FILE: &str = ".peerlink-resume.json";
/// Why the output folder cannot take the offer, if its file system has less
/// space free than the offer's files still need (less what partial files
/// hold and files an earlier run finished).
fn short_of_space(out: &OutDir, m: &Manifest, resume: &Resume) -> Option<String> {
    let done = resume.done_earlier(&m.id());
    let needed = out.bytes_needed(m.entries(), |path| done.contains_key(path));
    let free = out.free_bytes()?;
    (needed > free).then(|| {
        format!(
            "not enough space in {}: the offer needs {}, and {} is free",
            out.root().display(),
            crate::common::human_bytes(needed),
            crate::common::human_bytes(free)
        )
    })
}

/// One line per finished file: manifest path, tab, path it was saved as.
const DONE_FILE: &str = ".peerlink-resume.done";

struct Resume {
    dir: PathBuf,
    record: ResumeRecord,
    /// Files finished by an earlier run of this transfer: manifest path → saved path.
    done: HashMap<String, RelPath>,
}

impl Resume {
    fn load(dir: &Path) -> Option<ResumeRecord> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(RESUME_FILE)).ok()?).ok()
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{RESUME_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.record).expect("serializes"))?;
        std::fs::rename(tmp, self.dir.join(RESUME_FILE))
    }

    /// The files an earlier run of manifest `id` finished (manifest path →
    /// where it was saved); none if the record is of another manifest.
    fn done_earlier(&self, id: &str) -> HashMap<String, RelPath> {
        if self.record.manifest.as_deref() != Some(id) {
            return HashMap::new();
        }
        let Ok(text) = std::fs::read_to_string(self.dir.join(DONE_FILE)) else { return HashMap::new() };
        // Where each was saved, as a path inside the output folder: the
        // record is a file in that folder, which a sender could have sent,
        // so a line naming anywhere else is not taken.
        text.lines()
            .filter_map(|l| l.split_once('\t'))
            .filter_map(|(a, b)| Some((a.to_string(), RelPath::parse(b).ok()?)))
            .collect()
    }

    /// Takes note of an accepted manifest; forgets a different earlier one.
    fn accepted(&mut self, id: String) {
        if self.record.manifest.as_deref() != Some(id.as_str()) {
            self.done.clear();
            let _ = std::fs::remove_file(self.dir.join(DONE_FILE));
            self.record.manifest = Some(id);
        } else {
            self.done = self.done_earlier(&id);
        }
        if let Err(e) = self.save() {
            tracing::warn!("cannot record the transfer for resume: {e}");
        }
    }

    fn file_done(&mut self, rel: &str, saved: &Path) {
        let Ok(saved_rel) = saved.strip_prefix(&self.dir) else { return };
        let Ok(saved_rel) = RelPath::parse(&saved_rel.to_string_lossy()) else { return };
        let line = format!("{rel}\t{}\n", saved_rel.as_str());
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(DONE_FILE))
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            tracing::warn!("cannot record a finished file for resume: {e}");
        }
        self.done.insert(rel.to_string(), saved_rel);
    }

    fn complete(self) {
        let _ = std::fs::remove_file(self.dir.join(RESUME_FILE));
        let _ = std::fs::remove_file(self.dir.join(DONE_FILE));
    }
}

/// A file being received.
struct Open {
    planned: Planned,
    file: Arc<PartFile>,
    size: u64,
    /// Bytes written since the last background flush was started.
    unflushed: u64,
    /// A background flush is running.
    flushing: Arc<AtomicBool>,
}

/// Written bytes after which the disk is asked to take them, in the
/// background. Without it a big file stays in the page cache until the
/// final flush (the kernel starts writing back only at a tenth of memory),
/// which then holds the end of the transfer for a second per GiB.
const FLUSH_EVERY: u64 = 64 << 20;

enum Io {
    Prepared {
        file: u32,
        result: anyhow::Result<(Planned, Arc<PartFile>, Vec<Option<Hash>>)>,
    },
    Written {
        file: u32,
        chunk: u32,
        result: std::io::Result<()>,
    },
    /// `result`: where the file was saved.
    Finished {
        file: u32,
        hash: Hash,
        result: std::io::Result<PathBuf>,
    },
}

pub async fn run(args: ReceiveArgs) -> anyhow::Result<Outcome> {
    let out = OutDir::new(args.out.clone(), args.overwrite)?;
    let (code_text, server) = if args.resume {
        let r = Resume::load(out.root()).with_context(|| {
            format!("nothing to resume in {}: no {RESUME_FILE} there", out.root().display())
        })?;
        (r.code, r.server)
    } else {
        (args.code.clone().expect("clap requires a code without --resume"), args.common.server.clone())
    };
    let code = Code::parse(&code_text).context("that code is not valid")?;
    let mut resume = Resume {
        dir: out.root().to_path_buf(),
        record: ResumeRecord { code: code.to_string(), server: server.clone(), manifest: None },
        done: HashMap::new(),
    };
    if let Some(prev) = Resume::load(out.root())
        && prev.code == code.to_string()
    {
        resume.record.manifest = prev.manifest;
    }
    let mut ui = Ui::new(args.common.json);

    let mut config = RoomConfig::new(server.clone(), code.room());
    config.auto_connect = false;
    config.channels = Vec::new();
    config.ice = args.common.ice.config()?;
    config.netem = args.common.emulate_delay.map(peerlink_peer::NetEm::delay);
    config.name = Some("peerlink-receive".into());
    config.token = args.common.token.clone();
    let room =
        Room::join(config).await.with_context(|| format!("cannot reach the signaling server at {server}"))?;
    if room.peers().await.map(|p| p.is_empty()).unwrap_or(true) {
        let _ = room.leave().await;
        bail!(
            "nobody is sending with code {} right now (it was used already, or the sender stopped or has not started)",
            code.nameplate()
        );
    }
    let mut link = Link::start(room, Role::Joiner, code, args.common.pairing_timeout);
    let mut ctl: Option<DataChannel> = None;
    let mut data: Option<DataChannel> = None;
    let mut receiver = Receiver::new(ReceiverConfig::default());
    let fault = Fault::from_env();
    // Set by the `want-all` test fault: data is no longer read.
    let mut stalled = false;
    let mut files: HashMap<u32, Open> = HashMap::new();
    let (io_tx, mut io_rx) = mpsc::channel::<Io>(512);
    let mut prompt: Option<oneshot::Receiver<bool>> = None;
    let mut waiting_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);
    let mut started = false;
    let mut declined = false;
    // Whether our last control message (done, cancel, decline) may still be in flight.
    let mut last_word = false;
    // The file data last arrived for, and how far into it.
    let mut current: Option<(u32, u64)> = None;

    // A control message that found the channel full: until it goes, the
    // loop takes nothing more from the engine but keeps answering the link,
    // the sender and Ctrl-C (a sender that stops reading cannot make the
    // receiver deaf). Dropped once the transfer is over.
    let mut held: Option<String> = None;
    let mut interrupted = false;

    let outcome = loop {
        let mut finished = None;
        if receiver.is_over() {
            held = None;
        }
        while held.is_none()
            && let Some(output) = receiver.poll()
        {
            match output {
                ReceiverOutput::Ctl(msg) => {
                    let (msg, stall) = fault.rewrite_want(msg, |f| receiver.manifest()?.chunk_count(f));
                    stalled |= stall;
                    if let Some(ctl) = &ctl {
                        let text = msg.to_json();
                        match ctl.try_send(text.as_str()) {
                            Err(SendError::Overflow { .. }) if !receiver.is_over() => held = Some(text),
                            Err(e) => tracing::debug!("control message not sent: {e}"),
                            Ok(()) => {}
                        }
                    }
                }
                ReceiverOutput::Event(ev) => match ev {
                    ReceiverEvent::Offered => {
                        let m = receiver.manifest().expect("offered means a manifest").clone();
                        describe(&ui, &m);
                        if let Some(name) = reserved_name(&m) {
                            // Written, it would be taken for our own record
                            // of a transfer, or for a partial file.
                            receiver.cancel(
                                CancelCode::BadManifest,
                                format!(
                                    "the offer's path {name:?} is a name peerlink keeps for its own files"
                                ),
                            );
                        } else if let Some(short) = short_of_space(&out, &m, &resume) {
                            // Said now, before anyone waits for a transfer
                            // that would stop when the disk fills.
                            receiver.cancel(CancelCode::DiskFull, short);
                        } else if args.yes {
                            resume.accepted(m.id());
                            receiver.accept();
                        } else if std::io::stdin().is_terminal() && !ui.is_json() {
                            // Offered again (the sender reconnected) while the
                            // question is open: the answer to it stands for
                            // this offer; a second reader would take the line
                            // typed for the first, whose answer is dropped.
                            if prompt.is_none() {
                                let (tx, rx) = oneshot::channel();
                                std::thread::spawn(move || {
                                    eprint!("Accept? [y/N] ");
                                    let mut line = String::new();
                                    let yes = std::io::stdin().read_line(&mut line).is_ok()
                                        && matches!(line.trim().to_lowercase().as_str(), "y" | "yes");
                                    let _ = tx.send(yes);
                                });
                                prompt = Some(rx);
                            } else {
                                eprint!("Accept? [y/N] ");
                            }
                        } else {
                            let why = if ui.is_json() {
                                "with --json nobody is asked; run with --yes to accept without asking"
                            } else {
                                "stdin is not a terminal to ask on; run with --yes to accept without asking"
                            };
                            receiver.decline(format!("the receiver did not accept ({why})"));
                            last_word = true;
                            finished = Some(Outcome::Declined(format!("not accepted: {why}")));
                        }
                    }
                    ReceiverEvent::Resumed => ui.show(Report::Resumed),
                    ReceiverEvent::ChunkCorrupt { file, chunk, attempt } => {
                        ui.show(Report::CorruptChunk { path: path_of(&receiver, file), chunk, attempt });
                    }
                    ReceiverEvent::FileDone { file, hash } => {
                        ui.show(Report::FileDone { path: path_of(&receiver, file), hash: to_hex(&hash) });
                    }
                    ReceiverEvent::Text { file, text } => {
                        ui.show(Report::Text { name: path_of(&receiver, file), text });
                    }
                    ReceiverEvent::Complete => {
                        last_word = true;
                        finished = Some(Outcome::Done);
                    }
                    ReceiverEvent::Cancelled { code, reason, by_peer } => {
                        last_word = !by_peer;
                        finished = Some(Outcome::from_cancel(code, reason, by_peer, "sender"));
                    }
                },
                ReceiverOutput::Prepare { file } => {
                    let Some(entry) = receiver.manifest().and_then(|m| m.file(file)).cloned() else {
                        continue;
                    };
                    let out = out.clone();
                    let chunk_size = receiver.manifest().map_or(1, |m| m.chunk_size());
                    let earlier = resume.done.get(entry.path.as_str()).cloned();
                    let tx = io_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = prepare(&out, &entry, earlier, chunk_size);
                        let _ = tx.blocking_send(Io::Prepared { file, result });
                    });
                }
                ReceiverOutput::CreateDir { entry } => {
                    let Some(e) = receiver.manifest().and_then(|m| m.entries().get(entry)).cloned() else {
                        continue;
                    };
                    if let Err(err) = out.create_dir(&e.path) {
                        let msg = format!("{err:#}");
                        receiver.cancel(cancel_code_for(&err, &msg), msg);
                    }
                }
                ReceiverOutput::Write { file, chunk, offset, data } => {
                    let Some(open) = files.get_mut(&file) else { continue };
                    let f = open.file.clone();
                    open.unflushed += data.len() as u64;
                    let flush = open.unflushed >= FLUSH_EVERY && !open.flushing.swap(true, Ordering::AcqRel);
                    if flush {
                        open.unflushed = 0;
                        let (f, flushing) = (f.clone(), open.flushing.clone());
                        tokio::task::spawn_blocking(move || {
                            // An error is kept for the final flush (the system
                            // reports it once), which fails the file with it.
                            f.flush_in_background();
                            flushing.store(false, Ordering::Release);
                        });
                    }
                    let tx = io_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = f.write_at(offset, &data);
                        let _ = tx.blocking_send(Io::Written { file, chunk, result });
                    });
                }
                ReceiverOutput::Finish { file, hash } => {
                    let Some(open) = files.get(&file) else { continue };
                    let (f, size, planned) = (open.file.clone(), open.size, open.planned.clone());
                    let (tx, replace) = (io_tx.clone(), args.overwrite);
                    tokio::task::spawn_blocking(move || {
                        let result = fsio::finish(&f, size, &planned, replace);
                        let _ = tx.blocking_send(Io::Finished { file, hash, result });
                    });
                }
            }
        }
        if declined {
            last_word = true;
            finished = Some(Outcome::Declined("you declined the offer".into()));
        }
        if let Some(o) = finished {
            break o;
        }
        let wait_over = async {
            match waiting_since {
                Some(t) => tokio::time::sleep_until(t + args.common.wait).await,
                None => std::future::pending().await,
            }
        };
        let answer = async {
            match prompt.as_mut() {
                Some(rx) => rx.await.unwrap_or(false),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                receiver.cancel(CancelCode::User, "the receiver cancelled".into());
            }
            () = super::send_held(held.as_deref(), ctl.as_ref()), if held.is_some() => held = None,
            yes = answer => {
                prompt = None;
                if yes {
                    if let Some(id) = receiver.manifest().map(Manifest::id) {
                        resume.accepted(id);
                    }
                    receiver.accept();
                } else {
                    receiver.decline("the receiver said no".into());
                    declined = true;
                }
            }
            m = super::recv_on(&ctl) => match m {
                Some(Message::Text(text)) => {
                    if let Err(e) = receiver.handle_ctl_json(&text) {
                        tracing::warn!("sender broke the protocol: {e}");
                    }
                }
                Some(Message::Binary(_)) => tracing::warn!("sender broke the protocol: binary control message"),
                None => ctl = None,
            },
            m = super::recv_on(&data), if !stalled => match m {
                Some(Message::Binary(frame)) => {
                    if let Ok((file, offset, payload)) = peerlink_transfer::decode_frame(&frame) {
                        current = Some((file, offset + payload.len() as u64));
                    }
                    if let Err(e) = receiver.handle_data(&frame) {
                        tracing::warn!("sender broke the protocol: {e}");
                    }
                }
                Some(Message::Text(_)) => tracing::warn!("sender broke the protocol: text on the data channel"),
                None => data = None,
            },
            ev = link.next() => match ev {
                Err(e) => break if e.is_security() { Outcome::Security(e.to_string()) } else { Outcome::Failed(e.to_string()) },
                Ok(LinkEvent::PeerSeen) => ui.show(Report::PeerSeen { side: Side::Receiver }),
                Ok(LinkEvent::Notice(message)) => ui.show(Report::Notice { message }),
                Ok(LinkEvent::Paired) => ui.show(Report::Paired),
                Ok(LinkEvent::Open { ctl: c, data: d }) => {
                    // What the last session held back belongs to it.
                    held = None;
                    ctl = Some(c);
                    data = Some(d);
                    waiting_since = None;
                    ui.show(Report::Connected { bytes_done: Some(receiver.progress().bytes_done) });
                    receiver.start_session();
                }
                Ok(LinkEvent::Lost(reason)) => {
                    held = None;
                    ctl = None;
                    data = None;
                    waiting_since = Some(tokio::time::Instant::now());
                    let bytes_done = Some(receiver.progress().bytes_done);
                    ui.show(Report::Lost { side: Side::Receiver, reason, wait: args.common.wait, bytes_done });
                }
            },
            Some(io) = io_rx.recv() => match io {
                Io::Prepared { file, result } => match result {
                    Ok((planned, f, on_disk)) => {
                        let size = receiver.manifest().and_then(|m| m.file(file)).map_or(0, |e| e.size);
                        files.insert(
                                file,
                                Open { planned, file: f, size, unflushed: 0, flushing: Default::default() },
                            );
                        receiver.partial_scanned(file, on_disk);
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        receiver.cancel(cancel_code_for(&e, &msg), msg);
                    }
                },
                Io::Written { file, chunk, result } => match result {
                    Ok(()) => receiver.chunk_written(file, chunk),
                    Err(e) => {
                        let path = path_of(&receiver, file);
                        let full = fsio::is_disk_full(&e);
                        let why = if full { format!("the disk is full ({e})") } else { e.to_string() };
                        receiver.write_failed(file, full, format!("cannot write {path}: {why}"));
                    }
                },
                Io::Finished { file, hash, result } => match result {
                    Ok(saved) => {
                        let rel = path_of(&receiver, file);
                        if files.remove(&file).is_some() {
                            resume.file_done(&rel, &saved);
                            ui.show(Report::Saved {
                                path: rel,
                                saved_as: saved.display().to_string(),
                                hash: to_hex(&hash),
                            });
                        }
                        receiver.file_finished(file);
                    }
                    Err(e) => {
                        let path = path_of(&receiver, file);
                        receiver.write_failed(file, fsio::is_disk_full(&e), format!("cannot finish {path}: {e}"));
                    }
                },
            },
            _ = wait_over => break Outcome::Failed(format!(
                "the sender did not come back within {}; run `peerlink receive --resume --out {}` when it does",
                humantime(args.common.wait), out.root().display()
            )),
            _ = tick.tick() => {
                let p = receiver.progress();
                if p.bytes_total > 0 || p.files_total > 0 {
                    if !started && receiver.manifest().is_some() && p.bytes_done + p.bytes_received_session > 0 {
                        started = true;
                        if !ui.is_json() {
                            ui.start("received", p.bytes_total, p.bytes_done);
                        }
                    }
                    ui.progress(p.bytes_done, p.bytes_total);
                    if let Some((file, pos)) = current
                        && let Some(e) = receiver.manifest().and_then(|m| m.file(file))
                    {
                        ui.current_file(e.path.as_str(), e.size, pos);
                    }
                }
            }
        }
    };

    if let Some(ctl) = &ctl {
        let _ = tokio::time::timeout(Duration::from_secs(2), ctl.flush()).await;
        if last_word {
            // Our `done` or `cancel` is on its way; leaving now could cut it
            // off. The other side leaves when it has it.
            super::linger(&mut link).await;
        }
    }
    let p = receiver.progress();
    if outcome == Outcome::Done {
        ui.progress(p.bytes_done, p.bytes_total);
        ui.finish();
        resume.complete();
    } else {
        ui.abandon();
    }
    ui.show(Report::Finished {
        ok: outcome == Outcome::Done,
        exit_code: outcome.exit_code(),
        message: outcome.message(),
        elapsed: ui.elapsed(),
        peak_rss_kib: super::peak_rss_kib(),
        totals: Totals::Receiver {
            files: u64::from(p.files_total),
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            bytes_resumed: p.bytes_resumed,
            bytes_received: p.bytes_received_session,
            corrupt_chunks: p.corrupt_chunks,
            out: out.root().to_path_buf(),
            declined: matches!(outcome, Outcome::Declined(_)),
        },
    });
    link.close().await;
    Ok(outcome)
}

fn path_of(receiver: &Receiver, file: u32) -> String {
    receiver.manifest().and_then(|m| m.file(file)).map(|e| e.path.as_str().to_string()).unwrap_or_default()
}

fn describe(ui: &Ui, m: &Manifest) {
    let files: Vec<_> = m.files().collect();
    let texts = files.iter().filter(|(_, e)| e.kind == EntryKind::Text).count() as u64;
    ui.show(Report::Offer {
        files: files.len() as u64 - texts,
        texts,
        bytes: m.total_bytes(),
        entries: files.iter().map(|(_, e)| (e.path.as_str().to_string(), e.size)).collect(),
    });
}

/// Why preparing a path on disk failed, as the transfer's cancel code: an
/// attempt to leave the output folder is the sender's doing
/// (`bad_manifest`, the security exit code); anything else, such as a file
/// already where a folder goes, is the disk's (`io`).
fn cancel_code_for(err: &anyhow::Error, msg: &str) -> CancelCode {
    if msg.contains("symbolic link") || msg.contains("leaves the output folder") {
        CancelCode::BadManifest
    } else if err.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(fsio::is_disk_full)) {
        // Out of space (or of inodes) creating a file or a folder: exit 6, as
        // when a write finds the disk full.
        CancelCode::DiskFull
    } else {
        CancelCode::Io
    }
}

/// An entry named like a file the receiver keeps for itself: its resume
/// record, or a partial file.
fn reserved_name(m: &Manifest) -> Option<&str> {
    m.entries()
        .iter()
        .map(|e| e.path.as_str())
        .find(|p| fsio::is_reserved_name(p.rsplit('/').next().unwrap_or(p)))
}

/// Picks where a file goes, opens its partial file and hashes what an
/// earlier attempt left there.
fn prepare(
    out: &OutDir,
    entry: &peerlink_transfer::Entry,
    earlier: Option<RelPath>,
    chunk_size: u32,
) -> anyhow::Result<(Planned, Arc<PartFile>, Vec<Option<Hash>>)> {
    // A file an earlier run finished and recorded is checked in place
    // (found inside the output folder, through no symbolic link).
    let mut planned = match earlier.and_then(|rel| out.existing_file(&rel)) {
        Some(saved) => Planned { final_path: saved.clone(), part_path: saved },
        None => out.plan(&entry.path)?,
    };
    // A name the file system takes for another file's of this transfer
    // (case, Unicode form): the next name (`name (1).ext`) is planned.
    let mut tries = 0;
    let file = loop {
        match out.open_part(&planned) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 100 => {
                tracing::debug!("{e}");
                tries += 1;
                planned = out.plan(&entry.path)?;
            }
            r => break r.with_context(|| format!("cannot open {}", planned.part_path.display()))?,
        }
    };
    let on_disk = fsio::scan_part(&file, chunk_size, entry.size)
        .with_context(|| format!("cannot read {}", planned.part_path.display()))?;
    Ok((planned, Arc::new(PartFile::new(file)), on_disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two files whose names the file system does not tell apart (case
    /// where it does not count, Unicode forms) open one partial file: the
    /// second is given the next name instead of writing into the first's
    /// (both wrote into one file, the first was saved with the other's bytes
    /// mixed in). Two names for one file are made here with a hard link.
    #[test]
    fn two_names_for_one_partial_file_are_given_two_files() {
        let dir = std::env::temp_dir().join(format!("peerlink-alias-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("README.md.peerlink-part"), b"").unwrap();
        std::fs::hard_link(dir.join("README.md.peerlink-part"), dir.join("Readme.md.peerlink-part")).unwrap();
        let out = OutDir::new(dir.clone(), false).unwrap();
        let entry = |p: &str| peerlink_transfer::Entry::file(RelPath::parse(p).unwrap(), 10);
        let (first, _, _) = prepare(&out, &entry("README.md"), None, 65536).unwrap();
        let (second, _, _) = prepare(&out, &entry("Readme.md"), None, 65536).unwrap();
        assert_eq!(first.part_path, dir.join("README.md.peerlink-part"));
        assert_eq!(second.final_path, dir.join("Readme (1).md"));
        assert_eq!(second.part_path, dir.join("Readme (1).md.peerlink-part"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The record of finished files lives in the output folder, where a
    /// sender can put a file: a line naming a place outside the folder is
    /// not taken, so resume never writes there.
    #[test]
    fn a_resume_record_naming_places_outside_the_folder_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("peerlink-resume-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(DONE_FILE),
            "a.txt\t/etc/passwd\nb.txt\t../outside.txt\nc.txt\tsub/c.txt\nd.txt\tsub/../../x\n",
        )
        .unwrap();
        let mut resume = Resume {
            dir: dir.clone(),
            record: ResumeRecord {
                code: "7-a-b-c".into(),
                server: "ws://x".into(),
                manifest: Some("id".into()),
            },
            done: HashMap::new(),
        };
        resume.accepted("id".into());
        let kept: Vec<(&str, &str)> = resume.done.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(kept, vec![("c.txt", "sub/c.txt")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
