//! Helpers every command uses: durations and sizes as people write and
//! read them, where ICE may gather, and Ctrl-C.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;

use peerlink_peer::IceConfig;

/// Parses `90s`, `10m`, `1h` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// Parses `20ms`, or anything [`parse_duration`] takes.
pub fn parse_ms(s: &str) -> Result<Duration, String> {
    match s.strip_suffix("ms") {
        Some(n) => n.parse().map(Duration::from_millis).map_err(|_| format!("{s:?} is not like 20ms")),
        None => parse_duration(s),
    }
}

/// `90 s`, `10 min`, `1 h`.
pub fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// Where ICE may gather candidates.
#[derive(Debug, Clone, clap::Args)]
pub struct IceArgs {
    /// Gather only on this local address (repeatable).
    #[arg(long = "ice-addr")]
    addrs: Vec<IpAddr>,
    /// Gather only on this interface (repeatable).
    #[arg(long = "ice-interface")]
    interfaces: Vec<String>,
    /// Offer only relayed (TURN) candidates: the other side never learns
    /// this machine's addresses.
    #[arg(long)]
    relay_only: bool,
    /// PEM certificates to trust for `turns:` (TURN over TLS) servers
    /// besides the system's: a private CA or a self-signed certificate.
    #[arg(long, env = "PEERLINK_TURN_CA")]
    turn_ca: Option<std::path::PathBuf>,
}

impl IceArgs {
    pub fn config(&self) -> anyhow::Result<IceConfig> {
        let turn_ca = match &self.turn_ca {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
            }
            None => None,
        };
        Ok(IceConfig {
            addrs: self.addrs.clone(),
            interfaces: self.interfaces.clone(),
            relay_only: self.relay_only,
            turn_ca,
            ..IceConfig::default()
        })
    }
}

/// Completes on the first Ctrl-C or SIGTERM; a second Ctrl-C exits with 130.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("interrupted");
        std::process::exit(i32::from(crate::exit::INTERRUPTED));
    });
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns the
/// limit now in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = rustix::process::Rlimit { current: lim.maximum, maximum: lim.maximum };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return lim.maximum,
            Err(e) => tracing::debug!("raising RLIMIT_NOFILE: {e}"),
        }
    }
    lim.current
}

/// Closes a channel the running command does not use, so that the peer that
/// opened it hears at once that nobody here takes it: a browser's file offer
/// in the room would otherwise wait for an answer that never comes.
pub fn refuse_channel(channel: &peerlink_peer::DataChannel) {
    tracing::debug!(peer = %channel.peer(), label = channel.label(), "closing a channel this command does not use");
    channel.close();
}
