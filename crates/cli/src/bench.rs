//! `peerlink bench`: two native peers through a real in-process signaling
//! server, ICE on 127.0.0.1 only. Prints figures; run it in a network
//! namespace with only loopback (see the README).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use peerlink_peer::{ChannelSpec, DataChannel, Event, IceConfig, Message, Room, RoomConfig};
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
        #[arg(long, default_value_t = 16)]
        size: usize,
    },
    /// Bulk throughput on a reliable ordered channel.
    Throughput {
        /// Total MiB to move.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 65536)]
        size: usize,
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
    },
    /// Bulk throughput through the embedded TURN server (both peers
    /// relay-only), beside the direct path in the same run.
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
    /// Everything above with default settings.
    All,
}

pub struct Server {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    /// Peers offer relayed candidates only.
    relay_only: bool,
}

impl Server {
    pub async fn start() -> anyhow::Result<Server> {
        Self::start_with(peerlink_signal::Config::default()).await
    }

    async fn start_with(config: peerlink_signal::Config) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws", listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(peerlink_signal::serve(listener, config, async move {
            let _ = rx.await;
        }));
        Ok(Server { url, stop: Some(tx), relay_only: false })
    }

    fn config(&self, room: &str, channels: Vec<ChannelSpec>) -> RoomConfig {
        let mut c = RoomConfig::new(self.url.clone(), room);
        c.ice = IceConfig { relay_only: self.relay_only, ..IceConfig::loopback() };
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

const WAIT: Duration = Duration::from_secs(30);

/// Waits for the channel `label` to open on `room`.
async fn channel(room: &mut Room, label: &str) -> anyhow::Result<DataChannel> {
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

/// Two rooms connected with one channel; returns both ends.
async fn pair(
    server: &Server,
    room: &str,
    spec: ChannelSpec,
) -> anyhow::Result<(Room, DataChannel, Room, DataChannel)> {
    let label = spec.label.clone();
    let mut a = Room::join(server.config(room, vec![])).await?;
    let mut b = Room::join(server.config(room, vec![spec])).await?;
    let (ca, cb) = tokio::join!(channel(&mut a, &label), channel(&mut b, &label));
    Ok((a, ca?, b, cb?))
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub async fn run(what: Bench) -> anyhow::Result<()> {
    match what {
        Bench::Connect { iterations } => connect(iterations).await,
        Bench::Rtt { count, size } => rtt(count, size).await,
        Bench::Throughput { mib, size } => throughput(mib, size).await.map(|_| ()),
        Bench::Transfer { mib, files, file_kib, dir } => {
            crate::bench_transfer::run(mib, files, file_kib, dir).await
        }
        Bench::SignalMemory { conns } => signal_memory(conns).await,
        Bench::Relay { mib, size } => relay(mib, size).await,
        Bench::All => {
            connect(50).await?;
            rtt(5000, 16).await?;
            throughput(256, 65536).await?;
            signal_memory(500).await?;
            relay(128, 65536).await?;
            crate::bench_transfer::run(1024, 1000, 100, None).await
        }
    }
}

async fn connect(iterations: usize) -> anyhow::Result<()> {
    let server = Server::start().await?;
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let room = format!("connect-{i}");
        let mut a = Room::join(server.config(&room, vec![])).await?;
        let t0 = Instant::now();
        let mut b = Room::join(server.config(&room, vec![ChannelSpec::reliable("c")])).await?;
        let (ca, cb) = tokio::join!(channel(&mut a, "c"), channel(&mut b, "c"));
        ca?;
        cb?;
        times.push(t0.elapsed());
        a.leave().await?;
        b.leave().await?;
    }
    times.sort();
    println!(
        "connect (join -> channel open on both sides, {iterations} runs): p50 {:.2} ms  p99 {:.2} ms  min {:.2} ms  max {:.2} ms",
        ms(pct(&times, 0.5)),
        ms(pct(&times, 0.99)),
        ms(times[0]),
        ms(*times.last().expect("runs")),
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn rtt(count: usize, size: usize) -> anyhow::Result<()> {
    let server = Server::start().await?;
    let (mut a, ca, b, cb) = pair(&server, "rtt", ChannelSpec::reliable("rtt")).await?;
    // B echoes everything back.
    let echo = tokio::spawn(async move {
        let _room = b;
        while let Some(message) = cb.recv().await {
            if cb.send(message).await.is_err() {
                break;
            }
        }
    });
    let warmup = 200;
    let mut times = Vec::with_capacity(count);
    let payload = vec![7u8; size.max(1)];
    for i in 0..warmup + count {
        let t0 = Instant::now();
        ca.send(payload.clone()).await?;
        match tokio::time::timeout(WAIT, ca.recv()).await.context("echo did not come back")? {
            Some(Message::Binary(_)) => {}
            other => bail!("expected the echo, got {other:?}"),
        }
        if i >= warmup {
            times.push(t0.elapsed());
        }
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "rtt ({size}-byte messages, reliable ordered, {count} round trips): p50 {:.0} us  p99 {:.0} us  min {:.0} us",
        us(pct(&times, 0.5)),
        us(pct(&times, 0.99)),
        us(times[0]),
    );
    // str0m reports stats every 500 ms.
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::timeout_at(until, a.next_event()).await.is_ok() {}
    let stats = a.stats(ca.peer()).await?;
    println!(
        "  ICE consent-check rtt {:?}, selected pair {}",
        stats.rtt,
        stats.path.map(|p| p.to_string()).unwrap_or_default()
    );
    echo.abort();
    Ok(())
}

/// Sends `count` messages of `size` bytes, waiting whenever the queue is full.
async fn give_messages(channel: DataChannel, count: usize, size: usize) -> anyhow::Result<()> {
    let msg = vec![0x5au8; size];
    for _ in 0..count {
        channel.send(msg.clone()).await?;
    }
    Ok(())
}

/// Reads `channel` until `total` bytes of messages arrived.
async fn take_bytes(channel: &DataChannel, total: usize) -> anyhow::Result<()> {
    let mut got = 0usize;
    while got < total {
        match tokio::time::timeout(WAIT, channel.recv()).await.context("data stalled for 30 s")? {
            Some(message) => got += message.len(),
            None => bail!("channel closed"),
        }
    }
    Ok(())
}

/// Prints peerlink's and raw str0m's bulk throughput; returns peerlink's MB/s.
pub async fn throughput(mib: usize, size: usize) -> anyhow::Result<f64> {
    let server = Server::start().await?;
    let total = mib * 1024 * 1024;
    let count = total.div_ceil(size);
    let a_cfg = server.config("tput", vec![]);
    let b_cfg = server.config("tput", vec![ChannelSpec::reliable("bulk")]);
    // The sender joins first; the receiver, joining second, opens the channel.
    let mut a = Room::join(a_cfg).await?;
    // The receiving peer on its own thread and runtime, as it would be in
    // another process: two peers on one runtime share one I/O driver, and
    // each waits for the other to park before its datagrams are seen.
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let receiver = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let mut b = Room::join(b_cfg).await?;
            let cb = channel(&mut b, "bulk").await?;
            let _ = ready_tx.send(());
            let _ = go_rx.await;
            take_bytes(&cb, count * size).await
        })
    });
    let ca = channel(&mut a, "bulk").await?;
    if ready_rx.await.is_err() {
        // The receiver gave up before its channel opened: say why.
        let why = tokio::task::spawn_blocking(move || receiver.join()).await?;
        return Err(match why {
            Ok(Err(e)) => e.context("receiving peer"),
            _ => anyhow::anyhow!("the receiving peer stopped"),
        });
    }
    let t0 = Instant::now();
    let _ = go_tx.send(());
    let sender = tokio::spawn(give_messages(ca, count, size));
    tokio::task::spawn_blocking(move || receiver.join())
        .await?
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let elapsed = t0.elapsed();
    sender.await??;
    let mbs = (count * size) as f64 / elapsed.as_secs_f64() / 1e6;
    println!(
        "throughput ({mib} MiB in {size}-byte messages, reliable ordered): peerlink {mbs:.1} MB/s ({:.2} s)",
        elapsed.as_secs_f64()
    );
    drop((a, server));
    // The reference varies run to run more than peerlink does on this
    // machine: take the median of three.
    let mut raws = Vec::with_capacity(3);
    for _ in 0..3 {
        raws.push(tokio::task::spawn_blocking(move || crate::raw::throughput(total, size)).await??);
    }
    raws.sort_by(f64::total_cmp);
    let raw = raws[1];
    println!(
        "  raw str0m, blocking reference driver, same run: {raw:.1} MB/s (median of {:.1}, {:.1}, {:.1}); peerlink/raw = {:.2}",
        raws[0],
        raws[1],
        raws[2],
        mbs / raw
    );
    Ok(mbs)
}

/// Moves `mib` MiB in `size`-byte messages between two peers of `server`;
/// returns MB/s and the path kind.
async fn bulk(server: &Server, room: &str, mib: usize, size: usize) -> anyhow::Result<(f64, String)> {
    let (_a, ca, _b, cb) = pair(server, room, ChannelSpec::reliable("bulk")).await?;
    let total = mib * 1024 * 1024;
    let count = total.div_ceil(size);
    let t0 = Instant::now();
    let peer = ca.peer().clone();
    let sender = tokio::spawn(give_messages(ca, count, size));
    let got = count * size;
    take_bytes(&cb, got).await?;
    let elapsed = t0.elapsed();
    sender.await??;
    let path = _a.stats(&peer).await?.path.map_or("?".to_string(), |p| p.to_string());
    Ok((got as f64 / elapsed.as_secs_f64() / 1e6, path))
}

async fn relay(mib: usize, size: usize) -> anyhow::Result<()> {
    const SECRET: &str = "bench-secret";
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut config = peerlink_turn::Config::new(peerlink_turn::Auth::rest(SECRET));
    config.relay_ports = 0..=0;
    config.peer_policy.allow_loopback = true;
    config.limits.bandwidth_bytes_per_sec = None;
    let turn = peerlink_turn::Server::new(socket, config)?;
    let turn_addr = turn.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(turn.run(async {
        let _ = stopped.await;
    }));
    let provider = peerlink_signal::IceProvider::new(move |req| {
        let c = peerlink_turn::rest_credentials(
            SECRET,
            req.peer.as_str(),
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        );
        vec![peerlink_proto::IceServer {
            urls: vec![format!("turn:{turn_addr}?transport=udp")],
            username: Some(c.username),
            credential: Some(c.password),
        }]
    });
    let mut server =
        Server::start_with(peerlink_signal::Config { ice_provider: Some(provider), ..Default::default() })
            .await?;
    let (direct, direct_path) = bulk(&server, "direct", mib, size).await?;
    server.relay_only = true;
    let (relayed, relay_path) = bulk(&server, "relayed", mib, size).await?;
    let _ = stop.send(());
    println!(
        "relay ({mib} MiB in {size}-byte messages): through the embedded TURN server {relayed:.1} MB/s [{relay_path}]; direct {direct:.1} MB/s [{direct_path}]; relayed/direct = {:.2}",
        relayed / direct
    );
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

async fn signal_memory(conns: usize) -> anyhow::Result<()> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--no-turn"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("server pid")?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let result = async {
        // Wait for the server to listen.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = |i: usize| {
            let url = url.clone();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                use tokio_tungstenite::tungstenite::Message as M;
                ws.send(M::Text(r#"{"type":"hello","version":1}"#.into())).await?;
                ws.send(M::Text(format!(r#"{{"type":"join","room":"idle-{}"}}"#, i / 16).into())).await?;
                // welcome + joined
                for _ in 0..2 {
                    ws.next().await.context("server closed")??;
                }
                anyhow::Ok(ws)
            }
        };
        let mut held = Vec::new();
        for i in 0..16 {
            held.push(open(i).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid)?;
        for i in 16..16 + conns {
            held.push(open(i).await?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid)?;
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / conns as f64;
        println!(
            "signal server memory: {conns} idle connections (greeted, in rooms of 16) add {} KiB RSS: {:.1} KiB per connection",
            after.saturating_sub(before),
            per / 1024.0
        );
        drop(held);
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}
