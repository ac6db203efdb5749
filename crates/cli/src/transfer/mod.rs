//! `peerlink send` and `peerlink receive`: the transfer engine
//! (`peerlink-transfer`) driven over a paired, authenticated connection,
//! with disk I/O, progress and Ctrl-C handling.

mod fsio;
mod hasher;
mod link;
pub mod receive;
mod report;
pub mod send;
mod ui;
pub use ui::finished_by_error;

use std::time::Duration;

use peerlink_transfer::{CancelCode, Ctl};

use crate::common::IceArgs;

/// Options both commands take.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Signaling server: ws://HOST:PORT/ws, http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "PEERLINK_SERVER")]
    pub server: String,
    /// Print one JSON object per line on stdout instead of progress bars.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the other side to (re)connect, e.g. 90s, 10m, 1h.
    #[arg(long, default_value = "1h", value_parser = crate::common::parse_duration)]
    pub wait: Duration,
    /// How long a peer in the code's room may take to complete pairing
    /// before it is given up on (someone else who asked is tried next).
    #[arg(long, default_value = "30s", value_parser = crate::common::parse_duration)]
    pub pairing_timeout: Duration,
    /// Join token for servers that require one (`peerlink token`); a code's
    /// room is random, so the token must grant any room (`*`).
    #[arg(long, env = "PEERLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub ice: IceArgs,
    /// For `peerlink bench transfer --rtt-ms` only: hold every datagram this
    /// process sends for this long (half the emulated round trip), in the
    /// peer's own driver.
    #[arg(long, hide = true, value_parser = crate::common::parse_ms)]
    pub emulate_delay: Option<Duration>,
}

/// This process's peak resident memory (`VmHWM`), for `--json` reports.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// How a transfer ended; each has its own exit code (see the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Someone pressed Ctrl-C (here or on the other side).
    Cancelled(String),
    /// Wrong code, tampering detected, or a manifest that would write
    /// outside the output folder.
    Security(String),
    /// The receiver said no.
    Declined(String),
    DiskFull(String),
    /// Anything else: network, disk, protocol.
    Failed(String),
}

/// The next message on `channel`; waits forever while there is no channel.
async fn recv_on(channel: &Option<peerlink_peer::DataChannel>) -> Option<peerlink_peer::Message> {
    match channel {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends a control message that found the channel full once there is room;
/// returns at once (dropping it) if the channel is gone or closes.
async fn send_held(text: Option<&str>, ctl: Option<&peerlink_peer::DataChannel>) {
    match (text, ctl) {
        (Some(text), Some(ctl)) => {
            if let Err(e) = ctl.send(text).await {
                tracing::debug!("control message not sent: {e}");
            }
        }
        (Some(_), None) => {}
        (None, _) => std::future::pending().await,
    }
}

/// Waits (briefly) for the other side to leave after our final message.
async fn linger(link: &mut link::Link) {
    let gone = async {
        loop {
            match link.next().await {
                Ok(link::LinkEvent::Lost(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), gone).await;
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Done => crate::exit::OK,
            Outcome::Failed(_) => crate::exit::FAILURE,
            Outcome::Cancelled(_) => crate::exit::CANCELLED,
            Outcome::Security(_) => crate::exit::SECURITY,
            Outcome::Declined(_) => crate::exit::DECLINED,
            Outcome::DiskFull(_) => crate::exit::DISK_FULL,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Outcome::Done => "done".into(),
            Outcome::Cancelled(m)
            | Outcome::Security(m)
            | Outcome::Declined(m)
            | Outcome::DiskFull(m)
            | Outcome::Failed(m) => m.clone(),
        }
    }

    /// The outcome of a `cancel`, ours or the other side's (`other` names it).
    pub fn from_cancel(code: CancelCode, reason: String, by_peer: bool, other: &str) -> Outcome {
        let why = if by_peer { format!("the {other} stopped the transfer: {reason}") } else { reason };
        match code {
            CancelCode::User => Outcome::Cancelled(why),
            CancelCode::Declined => Outcome::Declined(why),
            CancelCode::DiskFull => Outcome::DiskFull(why),
            CancelCode::BadManifest => Outcome::Security(why),
            _ => Outcome::Failed(why),
        }
    }
}

/// Faults for tests, from `PEERLINK_TEST_FAULT` (debug builds only):
/// `corrupt=FILE:OFFSET` flips a byte of the chunk at OFFSET of file FILE
/// once, after the sender checked it; `manifest-path=PATH` replaces the first
/// file's path in the manifest the sender announces; `throttle=BYTES` caps
/// the sender at BYTES per second; `chunk-size=BYTES` offers chunks of that
/// size; `want-all` makes the receiver ask for every chunk of the file in
/// its first `want` and then read no more data, as a hostile receiver would.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    corrupt: Option<(u32, u64)>,
    manifest_path: Option<String>,
    throttle: Option<u64>,
    chunk_size: Option<u32>,
    want_all: bool,
}

impl Fault {
    pub fn from_env() -> Fault {
        if !cfg!(debug_assertions) {
            return Fault::default();
        }
        let Ok(spec) = std::env::var("PEERLINK_TEST_FAULT") else { return Fault::default() };
        let mut f = Fault::default();
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("corrupt", v)) => {
                    f.corrupt = v.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                }
                Some(("manifest-path", v)) => f.manifest_path = Some(v.to_string()),
                Some(("throttle", v)) => f.throttle = v.parse().ok(),
                Some(("chunk-size", v)) => f.chunk_size = v.parse().ok(),
                None if part == "want-all" => f.want_all = true,
                _ => {}
            }
        }
        tracing::warn!(?f, "test faults enabled");
        f
    }

    fn corrupts(&self, file: u32, offset: u64) -> bool {
        self.corrupt == Some((file, offset))
    }

    fn throttle(&self) -> Option<u64> {
        self.throttle
    }

    fn chunk_size(&self) -> Option<u32> {
        self.chunk_size
    }

    /// With `want-all`, a `want` becomes one range from its first chunk to
    /// the file's last, and the receiver stops reading data (`true`).
    fn rewrite_want(&self, msg: Ctl, chunks: impl Fn(u32) -> Option<u32>) -> (Ctl, bool) {
        match msg {
            Ctl::Want { file, ranges } if self.want_all => {
                let start = ranges.first().map_or(0, |r| r[0]);
                let end = chunks(file).unwrap_or(start + 1);
                (Ctl::Want { file, ranges: vec![[start, end]] }, true)
            }
            other => (other, false),
        }
    }

    /// Rewrites the first `file` entry's path of a `manifest_part`.
    fn rewrite_ctl(&self, json: String) -> String {
        let Some(path) = &self.manifest_path else { return json };
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&json) else { return json };
        if v["type"] != "manifest_part" {
            return json;
        }
        if let Some(entry) =
            v["entries"].as_array_mut().and_then(|es| es.iter_mut().find(|e| e["kind"] == "file"))
        {
            entry["path"] = serde_json::Value::String(path.clone());
        }
        v.to_string()
    }
}
