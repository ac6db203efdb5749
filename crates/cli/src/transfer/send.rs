//! `peerlink send`: offer files, folders or a text under a fresh code, then
//! serve what the receiver asks for until it has everything.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use peerlink_pair::{Code, Role};
use peerlink_peer::{DataChannel, Message, Room, RoomConfig, SendError};
use peerlink_transfer::{
    CancelCode, Ctl, FRAME_HEADER, Hash, MAX_QUEUED_HASH_REQUESTS, Manifest, Sender, SenderEvent,
    SenderOutput, chunk_size_for,
};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::fsio::{self, Source};
use super::hasher;
use super::link::{Link, LinkError, LinkEvent};
use super::report::{Report, Side, Totals};
use super::ui::Ui;
use super::{Common, Fault, Outcome};
use crate::common::humantime;

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Files and folders to send.
    #[arg(required_unless_present = "text")]
    paths: Vec<PathBuf>,
    /// Send this text instead of (or as well as) files.
    #[arg(long)]
    text: Option<String>,
    /// Use this code instead of a fresh one (to restart an interrupted
    /// send: the receiver picks up where it stopped).
    #[arg(long)]
    code: Option<String>,
    /// Words in a fresh code.
    #[arg(long, default_value_t = Code::DEFAULT_WORDS as u8, value_parser = clap::value_parser!(u8).range(2..=8))]
    words: u8,
    /// Also draw the receive link as a QR code (a phone scans it and
    /// receives in its browser).
    #[arg(long)]
    qr: bool,
    /// Where people reach the web app, for the receive link. Default: the
    /// signaling server's address (`peerlink serve` carries the app).
    #[arg(long, value_name = "URL")]
    web: Option<String>,
    #[command(flatten)]
    common: Common,
}

impl SendArgs {
    /// Whether events go to stdout as JSON lines (`--json`).
    pub fn json(&self) -> bool {
        self.common.json
    }
}

/// Where the sender reads file `i` from.
#[derive(Debug)]
enum Src {
    /// A file, and how it looked when the transfer started.
    File(PathBuf, Stamp),
    Text(Arc<str>),
}

/// What tells a file's contents changed without reading them: a write
/// moves the modification time, a replacement the inode, a truncation
/// the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stamp { len: meta.len(), modified: meta.modified().ok(), inode: meta.ino() }
    }
}

impl Src {
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        match self {
            Src::File(p, _) => fsio::read_range(&std::fs::File::open(p)?, offset, len),
            Src::Text(t) => {
                let start = offset as usize;
                t.as_bytes()
                    .get(start..start + len)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end"))
            }
        }
    }

    /// Reads a chunk of file `index` to send, as data frames of at most
    /// `frame_max` bytes, and whether the file is still as it was when the
    /// transfer started (so the bytes are those hashed for the receiver:
    /// one hash pass per chunk, not two; the receiver checks every chunk
    /// against its hash all the same). Each payload is read straight into
    /// its frame: no zeroed chunk buffer, no copy into frames.
    fn read_frames(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        frame_max: usize,
    ) -> std::io::Result<ReadChunk> {
        use std::io::{Read, Seek, SeekFrom};
        match self {
            Src::File(p, stamp) => {
                let mut file = std::fs::File::open(p)?;
                if Stamp::of(&file.metadata()?) != *stamp {
                    return Ok((Vec::new(), false));
                }
                file.seek(SeekFrom::Start(offset))?;
                let mut frames = Vec::new();
                for (at, n) in peerlink_transfer::frame_spans(offset, len, frame_max) {
                    let mut frame = Vec::with_capacity(FRAME_HEADER + n);
                    frame.extend_from_slice(&peerlink_transfer::frame_header(index, at));
                    (&mut file).take(n as u64).read_to_end(&mut frame)?;
                    if frame.len() != FRAME_HEADER + n {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the file is shorter than when it was offered",
                        ));
                    }
                    frames.push(frame);
                }
                Ok((frames, true))
            }
            Src::Text(_) => {
                let bytes = self.read(offset, len)?;
                Ok((peerlink_transfer::frames(index, offset, &bytes, frame_max).collect(), true))
            }
        }
    }

    fn hashes(&self, chunk_size: u32, size: u64, from: u32, count: u32) -> std::io::Result<Vec<Hash>> {
        match self {
            Src::File(p, _) => fsio::hash_chunks(p, chunk_size, size, from, count),
            Src::Text(_) => {
                let cs = u64::from(chunk_size);
                (from..from + count)
                    .map(|i| {
                        let off = u64::from(i) * cs;
                        self.read(off, cs.min(size - off) as usize).map(|b| peerlink_transfer::chunk_hash(&b))
                    })
                    .collect()
            }
        }
    }
}

/// A chunk to send, as the engine asked.
#[derive(Debug, Clone, Copy)]
struct Job {
    file: u32,
    offset: u64,
    len: u32,
}

/// An engine output waiting for room; see the sender's loop.
enum Held {
    Ctl(String),
    Job(Job),
    Hash(hasher::Job),
}

/// Hands `held` on once there is room; returns at once if what it was for
/// (the control channel, the pump) is gone, dropping it as a send to a closed
/// channel would.
async fn deliver(
    held: Option<&Held>,
    ctl: Option<&DataChannel>,
    pump: Option<&Pump>,
    hash_jobs: &mpsc::Sender<hasher::Job>,
) {
    match held {
        Some(Held::Ctl(text)) => super::send_held(Some(text), ctl).await,
        Some(Held::Job(job)) => {
            if let Some(p) = pump
                && let Ok(permit) = p.jobs.reserve().await
            {
                permit.send(*job);
            }
        }
        Some(Held::Hash(job)) => {
            if let Ok(permit) = hash_jobs.reserve().await {
                permit.send(*job);
            }
        }
        None => std::future::pending().await,
    }
}

/// What the data pump reports back.
#[derive(Debug)]
enum PumpReport {
    Changed { file: u32 },
    ReadFailed { file: u32, error: String },
}

/// Sends chunks on the data channel, reading ahead of the network.
struct Pump {
    jobs: mpsc::Sender<Job>,
    task: JoinHandle<()>,
}

/// A chunk read for sending, as its data frames, and whether it still
/// matches its hash.
type ReadChunk = (Vec<Vec<u8>>, bool);

/// Chunks read ahead of the one being sent.
const READ_AHEAD: usize = 2;

impl Pump {
    fn start(
        data: DataChannel,
        srcs: Arc<Vec<Src>>,
        reports: mpsc::Sender<PumpReport>,
        sent: Arc<AtomicU64>,
        position: Arc<Mutex<Option<(u32, u64)>>>,
        fault: Fault,
    ) -> Pump {
        // An honest receiver asks for at most its window of chunks, so this
        // bound is not reached in practice; when it is, the sender's loop
        // holds the next job and stops taking data from the engine.
        let (jobs, mut rx) = mpsc::channel::<Job>(256);
        let task = tokio::spawn(async move {
            let frame_max = data.max_message_size().min(64 * 1024);
            let mut reads: VecDeque<(Job, JoinHandle<std::io::Result<ReadChunk>>)> = VecDeque::new();
            let mut corrupted = false;
            loop {
                while reads.len() < READ_AHEAD {
                    let job = if reads.is_empty() {
                        match rx.recv().await {
                            Some(j) => j,
                            None => return,
                        }
                    } else {
                        match rx.try_recv() {
                            Ok(j) => j,
                            Err(_) => break,
                        }
                    };
                    let srcs = srcs.clone();
                    let (file, offset, len) = (job.file, job.offset, job.len);
                    // Read and check in the background, ahead of sending:
                    // a file modified since the transfer started no longer
                    // matches the hashes the receiver was given.
                    let read = tokio::task::spawn_blocking(move || {
                        srcs[file as usize].read_frames(file, offset, len as usize, frame_max)
                    });
                    reads.push_back((job, read));
                }
                let Some((job, read)) = reads.pop_front() else { continue };
                let (frames, unchanged) = match read.await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let _ = reports
                            .send(PumpReport::ReadFailed { file: job.file, error: e.to_string() })
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = reports
                            .send(PumpReport::ReadFailed { file: job.file, error: e.to_string() })
                            .await;
                        return;
                    }
                };
                if !unchanged {
                    let _ = reports.send(PumpReport::Changed { file: job.file }).await;
                    return;
                }
                for (i, mut frame) in frames.into_iter().enumerate() {
                    if i == 0 && !corrupted && fault.corrupts(job.file, job.offset) {
                        // Test hook: flip one payload byte once, after the
                        // hash check, as a faulty network path would.
                        corrupted = true;
                        let last = frame.len() - 1;
                        frame[last] ^= 0xff;
                    }
                    if data.send(frame).await.is_err() {
                        return;
                    }
                }
                sent.fetch_add(u64::from(job.len), Ordering::Relaxed);
                *position.lock().expect("position lock") = Some((job.file, job.offset + u64::from(job.len)));
                if let Some(rate) = fault.throttle() {
                    tokio::time::sleep(Duration::from_secs_f64(f64::from(job.len) / rate.max(1) as f64))
                        .await;
                }
            }
        });
        Pump { jobs, task }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Joins the code's room. A fresh code whose room is taken gets another
/// nameplate; a given code is used as is (the receiver may be waiting).
async fn join(args: &SendArgs) -> anyhow::Result<(Room, Code)> {
    let given = args.code.as_deref().map(Code::parse).transpose().context("the --code is not valid")?;
    for _ in 0..20 {
        let code = given.clone().unwrap_or_else(|| Code::generate(usize::from(args.words)));
        let mut config = RoomConfig::new(args.common.server.clone(), code.room());
        config.auto_connect = false;
        config.channels = Vec::new();
        config.ice = args.common.ice.config()?;
        config.netem = args.common.emulate_delay.map(peerlink_peer::NetEm::delay);
        config.name = Some("peerlink-send".into());
        config.token = args.common.token.clone();
        let room = Room::join(config)
            .await
            .with_context(|| format!("cannot reach the signaling server at {}", args.common.server))?;
        if given.is_some() || room.peers().await.map(|p| p.is_empty()).unwrap_or(false) {
            return Ok((room, code));
        }
        let _ = room.leave().await;
    }
    anyhow::bail!("could not find a free code on the server; try again")
}

pub async fn run(args: SendArgs) -> anyhow::Result<Outcome> {
    let mut source = Source::default();
    source.add_paths(&args.paths)?;
    if let Some(text) = &args.text {
        source.push_text(text.clone())?;
    }
    let fault = Fault::from_env();
    let largest = source.entries.iter().map(|e| e.size).max().unwrap_or(0);
    let chunk_size = match fault.chunk_size() {
        Some(size) => size,
        None => chunk_size_for(largest).with_context(|| {
            format!("cannot send a file of {}: at most 64 TiB", crate::common::human_bytes(largest))
        })?,
    };
    let manifest = Manifest::new(chunk_size, source.entries.clone()).context("cannot send these files")?;
    let srcs: Arc<Vec<Src>> = Arc::new(
        source
            .files
            .iter()
            .zip(&source.texts)
            .map(|(f, t)| match (f, t) {
                (Some(p), _) => match std::fs::metadata(p) {
                    Ok(meta) => Ok(Src::File(p.clone(), Stamp::of(&meta))),
                    Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
                },
                (None, Some(t)) => Ok(Src::Text(Arc::from(t.as_str()))),
                (None, None) => unreachable!("every file index has a path or a text"),
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let mut ui = Ui::new(args.common.json);
    for s in &source.skipped {
        ui.show(Report::Skipped { path: s.to_string() });
    }
    let total = manifest.total_bytes();
    let files = manifest.file_count();

    // One hasher, pages in the order asked: the first page is ready after
    // one page's work and data moves while the rest is hashed. (A task per
    // page hashed every page asked for side by side, and the first was
    // ready only when nearly all were.) Between requests, from now on, it
    // hashes ahead. The engine holds at most this many requests, so sending
    // to it does not wait.
    let (hash_tx, mut hash_rx) = mpsc::channel::<hasher::Done>(64);
    let (hash_jobs, hash_job_rx) = mpsc::channel::<hasher::Job>(MAX_QUEUED_HASH_REQUESTS);
    {
        let chunk_size = manifest.chunk_size();
        let (chunks, sizes): (Vec<u32>, Vec<u64>) = (0..files)
            .map(|i| (manifest.chunk_count(i).unwrap_or(0), manifest.file(i).map_or(0, |e| e.size)))
            .unzip();
        let srcs = srcs.clone();
        tokio::task::spawn_blocking(move || {
            hasher::run(
                &chunks,
                hasher::AHEAD_CHUNKS,
                hasher::AHEAD_STEP,
                hash_job_rx,
                hash_tx,
                |file, from, count| srcs[file as usize].hashes(chunk_size, sizes[file as usize], from, count),
            );
        });
    }

    let (room, code) = join(&args).await?;
    let link = receive_link(args.web.as_deref().unwrap_or(&args.common.server), &code.to_string());
    let qr = if args.qr { Some(qr_text(&link)?) } else { None };
    ui.show(Report::Code { code: code.to_string(), files: u64::from(files), bytes: total, link, qr });
    let mut link = Link::start(room, Role::Creator, code, args.common.pairing_timeout);
    let mut ctl: Option<DataChannel> = None;
    let mut sender = Sender::new(manifest);

    let (report_tx, mut report_rx) = mpsc::channel::<PumpReport>(8);
    let sent = Arc::new(AtomicU64::new(0));
    let position = Arc::new(Mutex::new(None));
    let mut accepted = false;
    // Whether our last control message (a cancel) may still be in flight.
    let mut last_word = false;
    let mut pump: Option<Pump> = None;
    let mut waiting_since = Some(tokio::time::Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);

    // An output the engine gave that could not be handed on without waiting
    // (the pump's queue or the control channel is full). Until it goes, the
    // loop takes nothing more from the engine but keeps answering the link,
    // the receiver and Ctrl-C: a receiver that asks for every chunk and then
    // stops reading cannot make the sender deaf.
    let mut held: Option<Held> = None;
    let mut interrupted = false;

    let outcome = loop {
        // Do what the engine asks.
        let mut finished = None;
        if sender.is_over() {
            // Data and hashes are no longer wanted, and a held control
            // message is dropped rather than waited for: the cancel behind it
            // goes only if there is room, and the receiver learns the rest
            // from the connection ending.
            held = None;
        }
        while held.is_none()
            && let Some(out) = sender.poll()
        {
            match out {
                SenderOutput::Ctl(msg) => {
                    let text = fault.rewrite_ctl(msg.to_json());
                    if let Some(ctl) = &ctl {
                        match ctl.try_send(text.as_str()) {
                            Err(SendError::Overflow { .. }) if !sender.is_over() => {
                                held = Some(Held::Ctl(text))
                            }
                            Err(e) => tracing::debug!("control message not sent: {e}"),
                            Ok(()) => {}
                        }
                    }
                }
                SenderOutput::Hash { file, from, count } => {
                    // Sized for every request the engine holds, but requests
                    // of an earlier session may still wait in it.
                    if let Err(mpsc::error::TrySendError::Full(job)) =
                        hash_jobs.try_send(hasher::Job { file, from, count })
                    {
                        held = Some(Held::Hash(job));
                    }
                }
                SenderOutput::Send { file, offset, len, .. } => {
                    if let Some(p) = &pump
                        && let Err(mpsc::error::TrySendError::Full(job)) =
                            p.jobs.try_send(Job { file, offset, len })
                    {
                        held = Some(Held::Job(job));
                    }
                }
                SenderOutput::Event(SenderEvent::Accepted) => {
                    accepted = true;
                    ui.show(Report::Accepted);
                    if !ui.is_json() {
                        ui.start("sent", total, 0);
                    }
                }
                SenderOutput::Event(SenderEvent::Declined { reason }) => {
                    finished = Some(Outcome::Declined(format!("the receiver declined: {reason}")));
                }
                SenderOutput::Event(SenderEvent::Finished) => finished = Some(Outcome::Done),
                SenderOutput::Event(SenderEvent::Cancelled { code, reason, by_peer }) => {
                    last_word = !by_peer;
                    finished = Some(Outcome::from_cancel(code, reason, by_peer, "receiver"));
                }
            }
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
        tokio::select! {
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                sender.cancel(CancelCode::User, "the sender cancelled".into());
                continue;
            }
            () = deliver(held.as_ref(), ctl.as_ref(), pump.as_ref(), &hash_jobs), if held.is_some() => held = None,
            ev = link.next() => match ev {
                Err(e) => break link_failure(e),
                Ok(LinkEvent::PeerSeen) => ui.show(Report::PeerSeen { side: Side::Sender }),
                Ok(LinkEvent::Notice(message)) => ui.show(Report::Notice { message }),
                Ok(LinkEvent::Paired) => ui.show(Report::Paired),
                Ok(LinkEvent::Open { ctl: c, data }) => {
                    // What the last session held back belongs to it.
                    held = None;
                    ctl = Some(c);
                    waiting_since = None;
                    ui.show(Report::Connected { bytes_done: None });
                    pump = Some(Pump::start(
                        data,
                        srcs.clone(),
                        report_tx.clone(),
                        sent.clone(),
                        position.clone(),
                        fault.clone(),
                    ));
                    sender.start_session();
                }
                Ok(LinkEvent::Lost(reason)) => {
                    held = None;
                    pump = None;
                    ctl = None;
                    waiting_since = Some(tokio::time::Instant::now());
                    ui.show(Report::Lost { side: Side::Sender, reason, wait: args.common.wait, bytes_done: None });
                }
            },
            m = super::recv_on(&ctl) => match m {
                Some(Message::Text(text)) => match Ctl::from_json(&text) {
                    Ok(msg) => {
                        if let Err(e) = sender.handle_ctl(msg) {
                            tracing::warn!("receiver broke the protocol: {e}");
                        }
                    }
                    Err(e) => sender.cancel(CancelCode::Protocol, format!("unreadable control message: {e}")),
                },
                Some(Message::Binary(_)) => {
                    sender.cancel(CancelCode::Protocol, "binary message on the control channel".into());
                }
                None => ctl = None,
            },
            Some(done) = hash_rx.recv() => match done.hashes {
                Ok(hashes) if hashes.len() == done.count as usize => {
                    sender.hashes_computed(done.file, done.from, hashes);
                }
                // Hashed ahead of any request: if the receiver asks, the
                // file is read again and a failure is reported then.
                _ if done.ahead => {}
                Ok(_) => sender.read_failed(done.file, "the file is shorter than when it was offered".into()),
                Err(e) => sender.read_failed(done.file, e.to_string()),
            },
            Some(report) = report_rx.recv() => match report {
                PumpReport::Changed { file } => {
                    let path = sender.manifest().file(file).map(|e| e.path.as_str().to_string()).unwrap_or_default();
                    sender.cancel(CancelCode::Changed, format!("{path} changed while it was being sent"));
                }
                PumpReport::ReadFailed { file, error } => sender.read_failed(file, error),
            },
            _ = wait_over => break Outcome::Failed(format!(
                "no receiver connected within {}; the code is no longer valid",
                humantime(args.common.wait)
            )),
            _ = tick.tick(), if accepted => {
                let done = sent.load(Ordering::Relaxed).min(total);
                ui.progress(done, total);
                let pos = *position.lock().expect("position lock");
                if let Some((file, pos)) = pos
                    && let Some(e) = sender.manifest().file(file)
                {
                    ui.current_file(e.path.as_str(), e.size, pos);
                }
            }
        }
    };

    // Let a final `cancel` or the last frames reach the receiver.
    if let Some(ctl) = &ctl {
        let _ = tokio::time::timeout(Duration::from_secs(2), ctl.flush()).await;
        if last_word {
            // Our `done` or `cancel` is on its way; leaving now could cut it
            // off. The other side leaves when it has it.
            super::linger(&mut link).await;
        }
    }
    drop(pump);
    let stats = sender.stats();
    match &outcome {
        Outcome::Done => ui.finish(),
        _ => ui.abandon(),
    }
    ui.show(Report::Finished {
        ok: matches!(outcome, Outcome::Done),
        exit_code: outcome.exit_code(),
        message: outcome.message(),
        elapsed: ui.elapsed(),
        peak_rss_kib: super::peak_rss_kib(),
        totals: Totals::Sender {
            files: u64::from(files),
            bytes_total: total,
            bytes_sent: stats.bytes_sent,
            chunks_sent: stats.chunks_sent,
        },
    });
    link.close().await;
    Ok(outcome)
}

fn link_failure(e: LinkError) -> Outcome {
    if e.is_security() { Outcome::Security(e.to_string()) } else { Outcome::Failed(e.to_string()) }
}

/// The web app's receive link for `code`: the page at `/r` with the code in
/// the fragment, which browsers never send to the server. `base` is what
/// the user typed for the server (any form `--server` takes) or the web
/// app's URL.
pub fn receive_link(base: &str, code: &str) -> String {
    let ws = peerlink_peer::signaling_url(base);
    let (scheme, rest) = ws.split_once("://").unwrap_or(("ws", &ws));
    let scheme = if scheme == "wss" { "https" } else { "http" };
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}/r#{code}")
}

/// `text` as a QR code in Unicode half blocks (two modules per character
/// cell), dark on light with the quiet zone, for a terminal.
fn qr_text(text: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_link_follows_what_was_typed_for_the_server() {
        let code = "7-lantern-zebra-orbit";
        for (typed, link) in [
            ("ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080/r#7-lantern-zebra-orbit"),
            ("wss://peerlink.example/ws", "https://peerlink.example/r#7-lantern-zebra-orbit"),
            ("https://peerlink.example", "https://peerlink.example/r#7-lantern-zebra-orbit"),
            ("host.lan:9000", "http://host.lan:9000/r#7-lantern-zebra-orbit"),
            ("http://[::1]:8080/", "http://[::1]:8080/r#7-lantern-zebra-orbit"),
        ] {
            assert_eq!(receive_link(typed, code), link, "{typed}");
        }
    }

    #[test]
    fn the_qr_code_is_a_square_of_half_blocks() {
        let q = qr_text("http://127.0.0.1:8080/r#7-lantern-zebra-orbit").unwrap();
        let lines: Vec<&str> = q.lines().collect();
        let width = lines[0].chars().count();
        // Two modules per line: a square of `width` modules is width/2 lines (rounded up).
        assert_eq!(lines.len(), width.div_ceil(2));
        assert!(lines.iter().all(|l| l.chars().count() == width));
        assert!(q.chars().all(|c| " ▀▄█\n".contains(c)), "{q}");
    }
}
