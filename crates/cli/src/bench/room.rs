//! `peerlink bench room`: a large room of native peers in several worker
//! processes against a real `peerlink serve`, broadcasting numbered
//! messages; beside a full mesh of fewer peers in the same run. And
//! `peerlink bench overlay`: the overlay's simulation table.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use peerlink_peer::{ChannelSpec, DataChannel, Event, IceConfig, OverlayConfig, Room, RoomConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

#[derive(Debug, Clone, clap::Args)]
pub struct RoomArgs {
    /// Peers in the overlay room.
    #[arg(long, default_value_t = 200)]
    pub peers: usize,
    /// Peers in the full-mesh room run beside it (0: none).
    #[arg(long, default_value_t = 30)]
    pub mesh_peers: usize,
    /// Worker processes the peers are spread over.
    #[arg(long, default_value_t = 4)]
    pub procs: usize,
    /// Peers that broadcast.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Broadcasts per sender.
    #[arg(long, default_value_t = 50)]
    pub messages: usize,
    /// Bytes per broadcast.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Broadcasts per second per sender.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Members the server lists in `joined` (the room is large beyond).
    #[arg(long, default_value_t = 16)]
    pub listed: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    server: String,
    #[arg(long)]
    room: String,
    /// Global index of this worker's first peer.
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    /// Global indices below this broadcast.
    #[arg(long)]
    senders: usize,
    #[arg(long)]
    messages: usize,
    #[arg(long)]
    size: usize,
    #[arg(long)]
    rate: u32,
    /// A full mesh of `mesh_of` peers (channels to everyone) instead of an overlay.
    #[arg(long)]
    mesh_of: Option<usize>,
}

/// What one peer measured.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PeerReport {
    index: usize,
    /// (sender index, sequence) pairs received, distinct.
    received: usize,
    /// Copies received beyond the first.
    duplicates: usize,
    /// Delivery latencies, µs.
    latencies: Vec<u32>,
    connections: usize,
    bytes_sent: u64,
    /// The overlay's tree repairs and duplicates.
    grafts: u64,
    overlay_duplicates: u64,
    /// Signals for its connections relayed over the overlay, and sent
    /// through the server.
    #[serde(default)]
    signals_relayed: u64,
    #[serde(default)]
    signals_via_server: u64,
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn payload(from: usize, seq: usize, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(16));
    p.extend((from as u32).to_be_bytes());
    p.extend((seq as u32).to_be_bytes());
    p.extend(unix_micros().to_be_bytes());
    p.resize(size.max(16), 0xab);
    p
}

fn parse(p: &[u8]) -> Option<(usize, usize, u64)> {
    if p.len() < 16 {
        return None;
    }
    let from = u32::from_be_bytes(p[0..4].try_into().ok()?) as usize;
    let seq = u32::from_be_bytes(p[4..8].try_into().ok()?) as usize;
    let at = u64::from_be_bytes(p[8..16].try_into().ok()?);
    Some((from, seq, at))
}

#[derive(Default)]
struct Tally {
    seen: HashSet<(usize, usize)>,
    duplicates: usize,
    latencies: Vec<u32>,
}

impl Tally {
    fn record(&mut self, data: &[u8]) {
        let Some((from, seq, at)) = parse(data) else { return };
        if self.seen.insert((from, seq)) {
            self.latencies.push(unix_micros().saturating_sub(at).min(u64::from(u32::MAX)) as u32);
        } else {
            self.duplicates += 1;
        }
    }
}

/// One peer of a worker: joins, says when it is connected, broadcasts on
/// `go`, and reports after `stop`.
async fn peer(
    index: usize,
    args: WorkerArgs,
    ready: mpsc::Sender<()>,
    mut control: tokio::sync::watch::Receiver<u8>,
) -> anyhow::Result<PeerReport> {
    let mut cfg = RoomConfig::new(args.server.clone(), args.room.clone());
    cfg.ice = IceConfig::loopback();
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.signaling_timeout = Duration::from_secs(30);
    match args.mesh_of {
        Some(_) => cfg.channels = vec![ChannelSpec::reliable("data")],
        None => cfg.overlay = Some(OverlayConfig::default()),
    }
    let mut room = Room::join(cfg).await.with_context(|| format!("peer {index} joining"))?;
    let tally = std::sync::Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut channels: Vec<DataChannel> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut is_ready = false;
    let sender = index < args.senders;
    let gap = Duration::from_secs(1) / args.rate.max(1);
    let mut next_send: Option<tokio::time::Instant> = None;
    let mut sent = 0;
    loop {
        tokio::select! {
            ev = room.next_event() => match ev {
                Some(Event::Message { data, .. }) => tally.lock().expect("tally").record(&data),
                Some(Event::ChannelOpen { channel }) => {
                    let t = tally.clone();
                    let c = channel.clone();
                    tokio::spawn(async move {
                        while let Some(m) = c.recv().await {
                            t.lock().expect("tally").record(m.as_bytes());
                        }
                    });
                    channels.push(channel);
                }
                Some(Event::Closed { reason }) => bail!("peer {index}: room closed: {reason}"),
                None => bail!("peer {index}: room closed"),
                Some(_) => {}
            },
            _ = tick.tick() => {
                if !is_ready {
                    let up = match args.mesh_of {
                        Some(n) => channels.iter().filter(|c| !c.is_closed()).count() + 1 >= n,
                        None => room.overlay_stats().await?.is_some_and(|s| !s.neighbors.is_empty()),
                    };
                    if up {
                        is_ready = true;
                        let _ = ready.send(()).await;
                    }
                }
            }
            _ = async {
                match next_send {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let data = payload(index, sent, args.size);
                if args.mesh_of.is_some() {
                    for c in &channels {
                        c.send(data.clone()).await.ok();
                    }
                } else {
                    room.broadcast(data).await?;
                }
                sent += 1;
                next_send = (sent < args.messages).then(|| tokio::time::Instant::now() + gap);
            }
            changed = control.changed() => {
                if changed.is_err() { break; }
                match *control.borrow() {
                    1 if sender => next_send = Some(tokio::time::Instant::now()),
                    2 => break,
                    _ => {}
                }
            }
        }
    }
    let (connections, neighbours, grafts, overlay_duplicates, signals) = match room.overlay_stats().await? {
        Some(s) => {
            (s.connections, s.neighbors, s.grafts, s.duplicates, (s.signals_relayed, s.signals_via_server))
        }
        None => (channels.iter().filter(|c| !c.is_closed()).count(), room.peers().await?, 0, 0, (0, 0)),
    };
    let mut bytes_sent = 0;
    for p in &neighbours {
        if let Ok(st) = room.stats(p).await {
            bytes_sent += st.bytes_sent;
        }
    }
    let t = tally.lock().expect("tally");
    let report = PeerReport {
        index,
        received: t.seen.len(),
        duplicates: t.duplicates,
        latencies: t.latencies.clone(),
        connections,
        bytes_sent,
        grafts,
        overlay_duplicates,
        signals_relayed: signals.0,
        signals_via_server: signals.1,
    };
    drop(t);
    drop(room);
    Ok(report)
}

/// A worker process: its peers, driven by lines on stdin (`go`, `stop`),
/// answering on stdout (`ready`, then one `report` line of JSON).
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let (ready_tx, mut ready_rx) = mpsc::channel(args.count.max(1));
    let (control, control_rx) = tokio::sync::watch::channel(0u8);
    let mut tasks = Vec::new();
    for i in 0..args.count {
        tasks.push(tokio::spawn(peer(args.first + i, args.clone(), ready_tx.clone(), control_rx.clone())));
        // Joins spread out a little, as people arrive.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut out = tokio::io::stdout();
    for _ in 0..args.count {
        ready_rx.recv().await.context("a peer failed before it was connected")?;
    }
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "go" => {
                let _ = control.send(1);
            }
            "stop" => {
                let _ = control.send(2);
                break;
            }
            _ => {}
        }
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await??);
    }
    let line = serde_json::to_string(&reports)?;
    out.write_all(format!("report {line}\n").as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

struct Figures {
    peers: usize,
    expected: u64,
    received: u64,
    duplicates: u64,
    p50: Duration,
    p99: Duration,
    max_conns: usize,
    mean_conns: f64,
    bytes_per_peer: f64,
    bytes_max: u64,
    grafts: u64,
    overlay_duplicates: u64,
    signals_relayed: u64,
    signals_via_server: u64,
    form: Duration,
}

/// Runs one room of `peers` peers over `procs` workers.
async fn run_room(
    server: &str,
    room: &str,
    peers: usize,
    args: &RoomArgs,
    mesh: bool,
) -> anyhow::Result<Figures> {
    let exe = std::env::current_exe()?;
    let procs = args.procs.clamp(1, peers.max(1));
    let per = peers.div_ceil(procs);
    let senders = args.senders.min(peers);
    let started = Instant::now();
    let mut workers = Vec::new();
    let mut first = 0;
    while first < peers {
        let count = per.min(peers - first);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["bench", "room-worker", "--server", server, "--room", room])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--senders", &senders.to_string(), "--messages", &args.messages.to_string()])
            .args(["--size", &args.size.to_string(), "--rate", &args.rate.to_string()])
            .env("RUST_LOG", std::env::var("PEERLINK_BENCH_LOG").unwrap_or_else(|_| "error".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if mesh {
            cmd.args(["--mesh-of", &peers.to_string()]);
        }
        let mut child = cmd.spawn().context("starting a worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        workers.push((child, stdin, stdout));
        first += count;
    }
    let deadline = Duration::from_secs(60 + peers as u64 / 2);
    for (_, _, out) in &mut workers {
        let line = tokio::time::timeout(deadline, out.next_line())
            .await
            .context("a worker's peers did not connect in time")??;
        if line.as_deref() != Some("ready") {
            bail!("worker: {line:?}");
        }
    }
    let form = started.elapsed();
    // Let the overlay settle (joins' random walks, evictions) before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, stdin, _) in &mut workers {
        stdin.write_all(b"go\n").await?;
    }
    let sending = Duration::from_secs_f64(args.messages as f64 / f64::from(args.rate.max(1)));
    tokio::time::sleep(sending + Duration::from_secs(5)).await;
    let mut reports: Vec<PeerReport> = Vec::new();
    for (_, stdin, _) in &mut workers {
        stdin.write_all(b"stop\n").await?;
    }
    for (child, _, out) in &mut workers {
        let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
            .await
            .context("a worker did not report")??
            .context("a worker ended without a report")?;
        let json = line.strip_prefix("report ").with_context(|| format!("worker said {line}"))?;
        reports.extend(serde_json::from_str::<Vec<PeerReport>>(json)?);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    let mut lat: Vec<u32> = reports.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(Duration::ZERO, |us| Duration::from_micros(u64::from(*us)))
    };
    let expected: u64 = reports
        .iter()
        .map(|r| (senders * args.messages - if r.index < senders { args.messages } else { 0 }) as u64)
        .sum();
    Ok(Figures {
        peers,
        expected,
        received: reports.iter().map(|r| r.received as u64).sum(),
        duplicates: reports.iter().map(|r| r.duplicates as u64).sum(),
        p50: q(0.5),
        p99: q(0.99),
        max_conns: reports.iter().map(|r| r.connections).max().unwrap_or(0),
        mean_conns: reports.iter().map(|r| r.connections).sum::<usize>() as f64 / reports.len().max(1) as f64,
        bytes_per_peer: reports.iter().map(|r| r.bytes_sent).sum::<u64>() as f64
            / reports.len().max(1) as f64,
        bytes_max: reports.iter().map(|r| r.bytes_sent).max().unwrap_or(0),
        grafts: reports.iter().map(|r| r.grafts).sum(),
        overlay_duplicates: reports.iter().map(|r| r.overlay_duplicates).sum(),
        signals_relayed: reports.iter().map(|r| r.signals_relayed).sum(),
        signals_via_server: reports.iter().map(|r| r.signals_via_server).sum(),
        form,
    })
}

pub async fn run(args: RoomArgs) -> anyhow::Result<()> {
    println!(
        "bench room: {} senders x {} broadcasts of {} B at {}/s each, peers in {} processes, server lists {}",
        args.senders, args.messages, args.size, args.rate, args.procs, args.listed
    );
    println!(
        "{:<10} {:>5} {:>10} {:>5} {:>8} {:>8} {:>6} {:>6} {:>12} {:>12} {:>14}",
        "topology",
        "peers",
        "delivered",
        "dups",
        "p50",
        "p99",
        "conns",
        "mean",
        "KB sent mean",
        "KB sent max",
        "max vs mesh max"
    );
    let mut rooms = vec![("overlay", args.peers, false)];
    if args.mesh_peers > 0 {
        rooms.push(("full mesh", args.mesh_peers, true));
    }
    for (i, (name, n, mesh)) in rooms.into_iter().enumerate() {
        // A server per room: the mesh's must list every member (a full
        // mesh needs everyone's presence), the overlay's only a sample.
        let listed = if mesh { n + 1 } else { args.listed };
        let (mut server, _pid, port) = super::signal::spawn_server(&[
            "--max-peers-per-room",
            &(n + 16).to_string(),
            "--listed-peers",
            &listed.to_string(),
            "--max-connections-per-ip",
            &(n * 2 + 64).to_string(),
            "--messages-per-second",
            "1000",
            "--message-burst",
            "2000",
        ])
        .await?;
        let url = format!("ws://127.0.0.1:{port}/ws");
        let result = run_room(&url, &format!("bench-{i}"), n, &args, mesh).await;
        let _ = server.kill().await;
        let f = match result {
            Ok(f) => f,
            Err(e) => {
                println!("{name:<10} {n:>5}   did not form: {e:#}");
                continue;
            }
        };
        // What a full mesh of the same N makes a sender send: every
        // broadcast to N - 1 peers (the mean per peer is the same for both:
        // each peer receives each broadcast once).
        let mesh_max = (args.messages * args.size * (n - 1)) as f64;
        println!(
            "{:<10} {:>5} {:>9.3}% {:>5} {:>6.1}ms {:>6.1}ms {:>6} {:>6.1} {:>12.1} {:>12.1} {:>14.2}   (formed in {:.1} s; overlay: {} grafts, {} duplicates; signals: {} over the overlay, {} through the server)",
            name,
            f.peers,
            100.0 * f.received as f64 / f.expected.max(1) as f64,
            f.duplicates,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.max_conns,
            f.mean_conns,
            f.bytes_per_peer / 1e3,
            f.bytes_max as f64 / 1e3,
            f.bytes_max as f64 / mesh_max.max(1.0),
            f.form.as_secs_f64(),
            f.grafts,
            f.overlay_duplicates,
            f.signals_relayed,
            f.signals_via_server,
        );
    }
    Ok(())
}

/// `peerlink bench overlay`: the simulation table.
pub fn overlay(sizes: &[usize]) {
    use peerlink_overlay::sim::{LossMode, SimConfig, run};
    println!(
        "overlay simulation: 20-80 ms one-way latency, 1 % loss, joins in bursts of 50/s, 2 broadcasts/s for 120 s"
    );
    println!(
        "{:>6} {:>6} {:>10} {:>11} {:>6} {:>6} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "peers",
        "churn",
        "loss",
        "delivered",
        "dup/d",
        "hops99",
        "2log2N",
        "lat p99",
        "conns max",
        "conns mean",
        "copies",
        "sig ovl",
        "arrived",
        "back",
        "wall"
    );
    for &n in sizes {
        for churn in [0.0, 0.10] {
            for mode in [LossMode::Retransmit, LossMode::Drop] {
                let t = Instant::now();
                let r = run(SimConfig::scenario(n, churn, mode, 1));
                println!(
                    "{:>6} {:>5.0}% {:>10} {:>10.3}% {:>6.2} {:>6} {:>9.1} {:>7.0}ms {:>10} {:>10.2} {:>8.2} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}s",
                    n,
                    churn * 100.0,
                    if mode == LossMode::Retransmit { "retransmit" } else { "drop" },
                    100.0 * r.delivery_ratio(),
                    r.duplicates_per_delivery,
                    r.hops_p99,
                    2.0 * (n as f64).log2(),
                    r.latency_p99.as_secs_f64() * 1e3,
                    r.max_connections,
                    r.mean_connections,
                    r.payload_copies_per_broadcast / (n as f64 - 1.0),
                    100.0 * r.offers_relayed as f64 / r.connections_opened.max(1) as f64,
                    100.0 * r.offers_delivered as f64 / r.offers_relayed.max(1) as f64,
                    100.0 * r.offers_bounced as f64 / r.offers_relayed.max(1) as f64,
                    t.elapsed().as_secs_f64(),
                );
            }
        }
    }
    println!(
        "copies: broadcast payloads sent per broadcast, per receiving peer (a full mesh sends 1.00 from the origin alone)"
    );
    println!(
        "sig ovl: connections whose offer went over the overlay instead of the server; arrived: of those, reached the peer; back: came back to be sent through the server (the rest was lost with a link that closed)"
    );
}
