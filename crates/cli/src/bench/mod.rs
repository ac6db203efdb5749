//! `peerlink bench`: native peers through a real in-process signaling
//! server, ICE on 127.0.0.1 only. Prints figures; run it in a network
//! namespace with only loopback (see the README).
//!
//! - `peer.rs`: connect time, round trips, throughput, the TURN relay;
//! - `raw.rs`: the raw str0m reference the throughput is compared with;
//! - `signal.rs`: the signaling server's memory per connection;
//! - `sigload.rs`: the signaling server under load (CPU per message, latency);
//! - `abuse.rs`: the signaling server under attack, beside honest clients;
//! - `transfer.rs`: `peerlink send` to `peerlink receive`, disk to disk;
//! - `room.rs`: a large room (overlay) beside a full mesh, in worker
//!   processes, and the overlay's simulation table.

mod abuse;
mod peer;
mod raw;
mod room;
mod sigload;
mod signal;
mod transfer;

use std::time::Duration;

use anyhow::{Context, bail};
use peerlink_peer::{ChannelSpec, DataChannel, Event, IceConfig, Room, RoomConfig};
use tokio::sync::oneshot;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Join to channel open (both sides), through the server.
    Connect {
        #[arg(long, default_value_t = 50)]
        iterations: usize,
    },
    /// Round-trip time of small messages on a reliable channel.
    Rtt {
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Bytes per message, at least 8 (its send time; the echo adds
        /// eight more, its arrival: the round trip is also split one way).
        #[arg(long, default_value_t = 16)]
        size: usize,
        /// Meanwhile, a bulk transfer of 64 KiB messages runs on another
        /// reliable channel of the same connection.
        #[arg(long)]
        bulk: bool,
    },
    /// Bulk throughput on a reliable ordered channel.
    Throughput {
        /// Total MiB to move.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 65536)]
        size: usize,
        /// Skip the raw str0m reference runs (so that an outside harness can
        /// attribute CPU time and drops to peerlink alone).
        #[arg(long)]
        no_reference: bool,
    },
    /// Bulk throughput over an emulated WAN: round trips of 0, 10, 20, 50
    /// and 100 ms and 50 ms with 1 % loss, delay and loss applied in both
    /// peers' drivers, beside what 64 KiB per round trip allows.
    Wan {
        /// MiB to move per case (a quarter of it with loss).
        #[arg(long, default_value_t = 32)]
        mib: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 65536)]
        size: usize,
        /// A bottleneck in each direction, Mbit/s (0: none), with a queue of
        /// 100 ms.
        #[arg(long, default_value_t = 0)]
        rate_mbit: u64,
        /// Extra random delay per datagram, up to this many ms.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
    },
    /// Disk to disk with `peerlink send` and `peerlink receive` processes: one
    /// big file, then many small ones, beside the raw channel throughput.
    Transfer {
        /// Size of the big file, MiB.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Number of small files.
        #[arg(long, default_value_t = 1000)]
        files: usize,
        /// Size of each small file, KiB.
        #[arg(long, default_value_t = 100)]
        file_kib: usize,
        /// Folder for the test files (default: under the system temp folder).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Emulate this round trip (ms) in both processes' drivers, half of
        /// it each way, beside the channel at the same round trip.
        #[arg(long, default_value_t = 0)]
        rtt_ms: u64,
    },
    /// Bulk throughput and connect time through the embedded TURN server
    /// (both peers relay-only) over UDP, TCP and TLS, beside the direct
    /// path in the same run.
    Relay {
        #[arg(long, default_value_t = 128)]
        mib: usize,
        #[arg(long, default_value_t = 65536)]
        size: usize,
    },
    /// Signaling server memory per idle (greeted, joined) connection.
    SignalMemory {
        #[arg(long, default_value_t = 500)]
        conns: usize,
    },
    /// The signaling server under N connections in pairs relaying
    /// messages: msgs/s, latency p50/p99, the server's CPU per message
    /// (user, kernel) and RSS per connection.
    SignalLoad(sigload::SignalLoadArgs),
    /// The signaling server under attack with its default limits, beside
    /// honest clients: half-sent requests (slowloris), clients that stop
    /// reading, a flooder. What it holds, what it costs, what the honest
    /// clients see.
    SignalAbuse(abuse::SignalAbuseArgs),
    /// A large room: N native peers in several processes against a real
    /// `peerlink serve`, joined with the overlay, broadcasting numbered
    /// messages; beside a full mesh of --mesh-peers in the same run.
    /// Delivery, latency p50/p99, connections per peer, bytes sent per
    /// peer against a full mesh of the same size.
    Room(room::RoomArgs),
    #[command(hide = true)]
    RoomWorker(room::WorkerArgs),
    /// The overlay on simulated time (no sockets): delivery, duplicates,
    /// hops, connections for rooms of each size, with and without churn.
    Overlay {
        /// Room sizes.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        sizes: Vec<usize>,
    },
    /// Everything above with default settings.
    All,
}

pub struct Server {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    /// Peers offer relayed candidates only.
    pub(crate) relay_only: bool,
    /// PEM certificates peers trust for `turns:`.
    pub(crate) turn_ca: Option<Vec<u8>>,
}

impl Server {
    pub async fn start() -> anyhow::Result<Server> {
        Self::start_with(peerlink_signal::Config::default()).await
    }

    pub(crate) async fn start_with(config: peerlink_signal::Config) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws", listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(peerlink_signal::serve(listener, config, async move {
            let _ = rx.await;
        }));
        Ok(Server { url, stop: Some(tx), relay_only: false, turn_ca: None })
    }

    pub(crate) fn config(&self, room: &str, channels: Vec<ChannelSpec>) -> RoomConfig {
        let mut c = RoomConfig::new(self.url.clone(), room);
        c.ice =
            IceConfig { relay_only: self.relay_only, turn_ca: self.turn_ca.clone(), ..IceConfig::loopback() };
        c.channels = channels;
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Waits for the channel `label` to open on `room`.
pub(crate) async fn channel(room: &mut Room, label: &str) -> anyhow::Result<DataChannel> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, room.next_event())
            .await
            .context("channel did not open in 30 s")?
        {
            Some(Event::ChannelOpen { channel }) if channel.label() == label => return Ok(channel),
            Some(Event::Closed { reason }) | Some(Event::ServerError { message: reason, .. }) => {
                bail!("room failed: {reason}")
            }
            Some(_) => {}
            None => bail!("room closed"),
        }
    }
}

/// `/proc` reports CPU time in USER_HZ ticks, 100 per second on Linux.
pub(crate) const TICKS_PER_SEC: f64 = 100.0;

/// A process's CPU time so far in ticks: (user, kernel).
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(") ").context("unreadable /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok((f[11].parse()?, f[12].parse()?))
}

/// This process's CPU time so far, user and kernel, in seconds.
pub(crate) fn own_cpu_seconds() -> f64 {
    cpu_ticks(std::process::id()).map_or(f64::NAN, |(u, k)| (u + k) as f64 / TICKS_PER_SEC)
}

pub(crate) fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub async fn run(what: Bench) -> anyhow::Result<()> {
    match what {
        Bench::Connect { iterations } => peer::connect(iterations).await,
        Bench::Rtt { count, size, bulk } => peer::rtt(count, size, bulk).await,
        Bench::Throughput { mib, size, no_reference } => {
            peer::throughput(mib, size, !no_reference).await.map(|_| ())
        }
        Bench::Wan { mib, size, rate_mbit, jitter_ms } => peer::wan(mib, size, rate_mbit, jitter_ms).await,
        Bench::Transfer { mib, files, file_kib, dir, rtt_ms } => {
            transfer::run(mib, files, file_kib, dir, rtt_ms).await
        }
        Bench::SignalMemory { conns } => signal::signal_memory(conns).await,
        Bench::SignalLoad(args) => sigload::run(args).await,
        Bench::SignalAbuse(args) => abuse::run(args).await,
        Bench::Relay { mib, size } => peer::relay(mib, size).await,
        Bench::Room(args) => room::run(args).await,
        Bench::RoomWorker(args) => room::worker(args).await,
        Bench::Overlay { sizes } => {
            room::overlay(&sizes);
            Ok(())
        }
        Bench::All => {
            peer::connect(50).await?;
            peer::rtt(5000, 16, false).await?;
            peer::rtt(2000, 16, true).await?;
            peer::throughput(256, 65536, true).await?;
            signal::signal_memory(500).await?;
            peer::relay(128, 65536).await?;
            transfer::run(1024, 1000, 100, None, 0).await
        }
    }
}
