//! `bench signal-load`: a real `peerlink serve` process under N WebSocket
//! connections in pairs, each pair in its own room, relaying `send`
//! messages peer to peer through the server. Two phases: saturated (each
//! pair keeps W messages in flight, echoed back; round trip = two relays)
//! and paced (a fixed total rate, one way). The server's CPU per relayed
//! message comes from its own `/proc/PID/stat`, split into user and kernel
//! time, since on one machine the load generator competes for the same
//! cores; its RSS per idle connection from `/proc/PID/status`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as M;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{TICKS_PER_SEC, cpu_ticks};

pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const IDLE: u8 = 0;
const SATURATED: u8 = 1;
const PACED: u8 = 2;

#[derive(Debug, Clone, clap::Args)]
pub struct SignalLoadArgs {
    /// Connections (in pairs).
    #[arg(long, default_value_t = 2000)]
    conns: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Messages in flight per pair in the saturated phase.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Total messages per second in the paced phase.
    #[arg(long, default_value_t = 2000)]
    paced_rate: u64,
    /// Bytes of each message's `data`.
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Then again with two nodes sharing rooms through a `redis-server`
    /// started here (the Debian package): both peers of each pair on one
    /// node, then one on each node. Server CPU is both nodes' and Redis's.
    #[arg(long)]
    backplane: bool,
}

/// Where the two peers of each pair connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One server, rooms in memory.
    Memory,
    /// Two nodes on Redis, both peers on the first.
    SameNode,
    /// Two nodes on Redis, one peer on each.
    CrossNode,
}

/// The processes serving one run: their pids (CPU and RSS are summed) and
/// the ports the two peers of a pair use.
struct Servers {
    children: Vec<tokio::process::Child>,
    pids: Vec<u32>,
    ports: (u16, u16),
    /// Redis's pid, counted in CPU but not in RSS per connection.
    redis: Option<u32>,
}

/// A `redis-server` on a free loopback port that keeps nothing on disk.
async fn spawn_redis() -> anyhow::Result<(tokio::process::Child, u32, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("redis-server (Debian package redis-server) is needed for --backplane")?;
    let pid = child.id().context("redis pid")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("redis-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, pid, port))
}

impl Servers {
    async fn start(layout: Layout, pairs: usize) -> anyhow::Result<Servers> {
        let caps = (pairs * 2 + 64).to_string();
        let mut flags = vec![
            "--max-connections-per-ip".to_string(),
            caps.clone(),
            "--max-connections".into(),
            caps,
            "--messages-per-second".into(),
            "1000000".into(),
            "--message-burst".into(),
            "1000000".into(),
            "--idle-timeout".into(),
            "10m".into(),
        ];
        let mut children = Vec::new();
        let mut redis = None;
        if layout != Layout::Memory {
            let (child, pid, port) = spawn_redis().await?;
            children.push(child);
            redis = Some(pid);
            flags.extend(["--redis".to_string(), format!("redis://127.0.0.1:{port}/")]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut pids = Vec::new();
        let mut ports = Vec::new();
        let nodes = if layout == Layout::Memory { 1 } else { 2 };
        for _ in 0..nodes {
            let (child, pid, port) = super::signal::spawn_server(&flags).await?;
            children.push(child);
            pids.push(pid);
            ports.push(port);
        }
        if layout != Layout::Memory {
            // Joins are refused until each node's backplane is up.
            for port in &ports {
                wait_backplane(*port).await?;
            }
        }
        let ports = match layout {
            Layout::CrossNode => (ports[0], ports[1]),
            _ => (ports[0], ports[0]),
        };
        Ok(Servers { children, pids, ports, redis })
    }

    fn cpu(&self) -> anyhow::Result<(u64, u64)> {
        let mut t = (0, 0);
        for pid in self.pids.iter().chain(&self.redis) {
            let (u, s) = cpu_ticks(*pid)?;
            t = (t.0 + u, t.1 + s);
        }
        Ok(t)
    }

    /// Socket reads and writes so far, as the nodes count them
    /// (`/healthz`), all nodes together.
    async fn syscalls(&self) -> anyhow::Result<(u64, u64)> {
        let mut ports = vec![self.ports.0, self.ports.1];
        ports.dedup();
        let mut t = (0, 0);
        for port in ports {
            let health = healthz(port).await?;
            let field =
                |name: &str| health[name].as_u64().with_context(|| format!("/healthz without {name}"));
            t = (t.0 + field("socket_reads")?, t.1 + field("socket_writes")?);
        }
        Ok(t)
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let mut t = 0;
        for pid in &self.pids {
            t += super::signal::rss_kib(*pid)?;
        }
        Ok(t)
    }
}

/// A server's `/healthz`.
pub(super) async fn healthz(port: u16) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response)).await??;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).context("/healthz")
}

async fn wait_backplane(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = healthz(port).await?;
        if health["backplane"]["up"] == true {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the backplane of the node on port {port} did not come up: {health}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the receivers record during a phase.
#[derive(Default)]
struct Tally {
    phase: AtomicU8,
    relayed: AtomicU64,
    /// Microseconds: round trips (saturated) or one-way times (paced).
    latencies: std::sync::Mutex<Vec<u32>>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

pub(super) async fn run(args: SignalLoadArgs) -> anyhow::Result<()> {
    let pairs = (args.conns / 2).max(1);
    // This process holds a socket per connection too.
    if let Some(limit) = crate::common::raise_fd_limit()
        && limit < (pairs * 2 + 256) as u64
    {
        bail!("the open-file limit ({limit}) is too low for {} connections", pairs * 2);
    }
    let layouts: &[Layout] = if args.backplane {
        &[Layout::Memory, Layout::SameNode, Layout::CrossNode]
    } else {
        &[Layout::Memory]
    };
    for layout in layouts {
        let mut servers = Servers::start(*layout, pairs).await?;
        let result = load(&args, pairs, &servers, *layout).await;
        // Nodes first, then Redis (so the nodes do not log its loss).
        for child in servers.children.iter_mut().rev() {
            let _ = child.kill().await;
        }
        result?;
    }
    println!(
        "  (the PeerJS reference for the same load: ../shared/tools/refbench/sigload.sh peerlink peerjs; see the README)"
    );
    Ok(())
}

async fn load(args: &SignalLoadArgs, pairs: usize, servers: &Servers, layout: Layout) -> anyhow::Result<()> {
    let urls =
        (format!("ws://127.0.0.1:{}/ws", servers.ports.0), format!("ws://127.0.0.1:{}/ws", servers.ports.1));
    let t0 = Instant::now();
    let tally = Arc::new(Tally::default());
    let rss_before = servers.rss_kib()?;

    // Open the pairs, 64 at a time; a task per connection owns its socket.
    let mut starts = Vec::with_capacity(pairs);
    let mut opened = futures_util::stream::iter((0..pairs).map(|i| open_pair(urls.clone(), i))).buffered(64);
    let mut conns = Vec::with_capacity(pairs);
    while let Some(pair) = opened.next().await {
        conns.push(pair?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = servers.rss_kib()?;
    let per_conn = rss_after.saturating_sub(rss_before) as f64 / (pairs * 2) as f64;
    let what = match layout {
        Layout::Memory => format!("peerlink serve (pid {})", servers.pids[0]),
        Layout::SameNode => "two nodes on Redis, both peers of a pair on one node".to_string(),
        Layout::CrossNode => "two nodes on Redis, the peers of a pair on different nodes".to_string(),
    };
    println!(
        "signal load: {what}, {} connections in {pairs} pairs (a room each), {}-byte data per message",
        pairs * 2,
        args.payload
    );
    println!(
        "  idle: server RSS {:.1} -> {:.1} MiB, {per_conn:.1} KiB per connection (greeted, joined)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    let pad: Arc<str> = "x".repeat(args.payload.saturating_sub(30)).into();
    for (a, a_id, b, b_id, room) in conns {
        let (start, cmds) = tokio::sync::mpsc::channel(args.window.max(64));
        starts.push(start);
        let room: Arc<str> = room.into();
        tokio::spawn(conn_task(
            a,
            Role::A,
            room.clone(),
            b_id.into(),
            tally.clone(),
            pad.clone(),
            t0,
            Some(cmds),
        ));
        tokio::spawn(conn_task(b, Role::B, room, a_id.into(), tally.clone(), pad.clone(), t0, None));
    }

    // Saturated: every pair starts its window, then echoes keep it full.
    let phase = Duration::from_secs(args.secs);
    tally.phase.store(SATURATED, Ordering::Relaxed);
    for start in &starts {
        for _ in 0..args.window {
            let _ = start.try_send(());
        }
    }
    let (stat, relayed) = measure(&tally, servers, phase).await?;
    report(
        &format!("saturated, {} in flight per pair", args.window),
        "round trip (2 relays)",
        stat,
        relayed,
        phase,
        &tally,
    );
    tally.phase.store(IDLE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Paced: one message every 1/rate s, round-robin over the pairs.
    tally.phase.store(PACED, Ordering::Relaxed);
    let start = Instant::now();
    let rate = args.paced_rate.max(1);
    let pacer = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            tick.tick().await;
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let _ = starts[(sent % starts.len() as u64) as usize].try_send(());
                sent += 1;
            }
        }
    });
    let (stat, relayed) = measure(&tally, servers, phase).await?;
    pacer.abort();
    tally.phase.store(IDLE, Ordering::Relaxed);
    report(&format!("paced, {} msgs/s", args.paced_rate), "one way", stat, relayed, phase, &tally);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Starts messages (on command), gets the echoes back.
    A,
    /// Echoes (saturated) or records the one-way time (paced).
    B,
}

/// One connection: reads relayed messages and reacts as its role says;
/// A also sends a message for each command.
#[allow(clippy::too_many_arguments)]
async fn conn_task(
    mut ws: Ws,
    role: Role,
    room: Arc<str>,
    to: Arc<str>,
    tally: Arc<Tally>,
    pad: Arc<str>,
    t0: Instant,
    mut cmds: Option<tokio::sync::mpsc::Receiver<()>>,
) {
    let frame = |t: u64| {
        M::text(format!(r#"{{"type":"send","room":"{room}","to":"{to}","data":{{"t":{t},"p":"{pad}"}}}}"#))
    };
    let now = || t0.elapsed().as_micros() as u64;
    loop {
        let cmd = async {
            match cmds.as_mut() {
                Some(c) => c.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(M::Text(text))) = msg else {
                    if matches!(msg, None | Some(Err(_))) { return; }
                    continue;
                };
                // {"type":"message","room":..,"from":..,"data":{"t":N,..}}
                let Some(t) = text.split_once(r#""t":"#).and_then(|(_, rest)| {
                    rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u64>().ok())
                }) else {
                    continue;
                };
                match (role, tally.phase.load(Ordering::Relaxed)) {
                    (Role::A, SATURATED) => {
                        let n = now();
                        tally.relayed.fetch_add(2, Ordering::Relaxed);
                        tally.latencies.lock().expect("lock").push(n.saturating_sub(t) as u32);
                        if ws.send(frame(n)).await.is_err() { return; }
                    }
                    (Role::B, SATURATED) if ws.send(frame(t)).await.is_err() => return,
                    (Role::B, PACED) => {
                        tally.relayed.fetch_add(1, Ordering::Relaxed);
                        tally.latencies.lock().expect("lock").push(now().saturating_sub(t) as u32);
                    }
                    _ => {}
                }
            }
            Some(()) = cmd => {
                if ws.send(frame(now())).await.is_err() { return; }
            }
        }
    }
}

/// What the server spent over a phase.
struct Spent {
    /// CPU ticks: user, kernel.
    cpu: (u64, u64),
    /// Socket reads and writes.
    syscalls: (u64, u64),
}

/// What the server spent, and messages relayed, over `phase`.
async fn measure(tally: &Tally, servers: &Servers, phase: Duration) -> anyhow::Result<(Spent, u64)> {
    // Let the phase settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tally.latencies.lock().expect("lock").clear();
    let relayed0 = tally.relayed.load(Ordering::Relaxed);
    let (u0, s0) = servers.cpu()?;
    let (r0, w0) = servers.syscalls().await?;
    tokio::time::sleep(phase).await;
    let (u1, s1) = servers.cpu()?;
    let (r1, w1) = servers.syscalls().await?;
    let relayed = tally.relayed.load(Ordering::Relaxed) - relayed0;
    Ok((Spent { cpu: (u1 - u0, s1 - s0), syscalls: (r1 - r0, w1 - w0) }, relayed))
}

fn report(what: &str, latency: &str, spent: Spent, relayed: u64, phase: Duration, tally: &Tally) {
    let mut lat = std::mem::take(&mut *tally.latencies.lock().expect("lock"));
    lat.sort_unstable();
    let (user, kernel) = spent.cpu;
    let per_msg = |ticks: u64| ticks as f64 / TICKS_PER_SEC * 1e6 / relayed.max(1) as f64;
    let per = |calls: u64| calls as f64 / relayed.max(1) as f64;
    println!(
        "  {what}: {:.0} msgs/s relayed; {latency} p50 {:.2} ms, p99 {:.2} ms; server CPU {:.1} µs/msg (user {:.1}, kernel {:.1}), {:.0} % of a core; per message {:.2} reads, {:.2} writes",
        relayed as f64 / phase.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        per_msg(user + kernel),
        per_msg(user),
        per_msg(kernel),
        (user + kernel) as f64 / TICKS_PER_SEC / phase.as_secs_f64() * 100.0,
        per(spent.syscalls.0),
        per(spent.syscalls.1),
    );
}

/// Two greeted connections in room `load-i`, with their ids.
async fn open_pair(urls: (String, String), i: usize) -> anyhow::Result<(Ws, String, Ws, String, String)> {
    let room = format!("load-{i}");
    let (mut a, a_id) = greet(&urls.0).await?;
    join(&mut a, &room).await?;
    let (mut b, b_id) = greet(&urls.1).await?;
    join(&mut b, &room).await?;
    // A hears of B.
    next_text(&mut a).await?;
    Ok((a, a_id, b, b_id, room))
}

pub(super) async fn greet(url: &str) -> anyhow::Result<(Ws, String)> {
    // The native peer's settings: a small read buffer, which tungstenite
    // zero-fills before every read (the load generator's own cost).
    let config = peerlink_peer::signaling_ws_config();
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    let (mut ws, _) =
        tokio::time::timeout(Duration::from_secs(10), connect).await.context("connect timed out")??;
    ws.send(M::text(r#"{"type":"hello","version":1}"#)).await?;
    let welcome: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await?)?;
    let id = welcome["peer_id"].as_str().context("no peer_id in welcome")?.to_string();
    Ok((ws, id))
}

pub(super) async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    ws.send(M::text(format!(r#"{{"type":"join","room":"{room}"}}"#))).await?;
    let joined = next_text(ws).await?;
    if !joined.contains(r#""type":"joined""#) {
        bail!("join refused: {joined}");
    }
    Ok(())
}

pub(super) async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.context("server silent")? {
            Some(Ok(M::Text(t))) => return Ok(t.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("server closed the connection"),
        }
    }
}
