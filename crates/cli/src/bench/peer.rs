//! Two native peers: connect time, round trips, bulk throughput beside the
//! raw str0m reference, and bulk through the embedded TURN relay.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use peerlink_peer::{ChannelSpec, DataChannel, Message, Room};
use tokio::sync::oneshot;

use super::{Server, WAIT, channel, pct};

pub(super) async fn connect(iterations: usize) -> anyhow::Result<()> {
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

pub(super) async fn rtt(count: usize, size: usize, bulk: bool) -> anyhow::Result<()> {
    let size = size.max(8);
    let server = Server::start().await?;
    let mut specs = vec![ChannelSpec::reliable("rtt")];
    if bulk {
        specs.push(ChannelSpec::reliable("bulk"));
    }
    let mut a = Room::join(server.config("rtt", vec![])).await?;
    let b_cfg = server.config("rtt", specs);
    // Both peers read one clock: each message carries when it was sent and
    // its echo when it arrived, so a round trip splits into its two legs.
    let epoch = Instant::now();
    // B on its own thread and runtime, as it would be in another process:
    // it echoes "rtt" back and reads "bulk", counting the bytes.
    let moved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let counter = moved.clone();
    let peer_b = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let mut b = Room::join(b_cfg).await?;
            let cb = channel(&mut b, "rtt").await?;
            if bulk {
                let bb = channel(&mut b, "bulk").await?;
                tokio::spawn(async move {
                    while let Some(m) = bb.recv().await {
                        counter.fetch_add(m.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
            let _ = ready_tx.send(());
            while let Some(message) = cb.recv().await {
                // The echo carries when it arrived, for the one-way split.
                let mut echo = message.as_bytes().to_vec();
                echo.extend_from_slice(&nanos_since(epoch).to_le_bytes());
                if cb.send(echo).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
    });
    let ca = channel(&mut a, "rtt").await?;
    // A sends 64 KiB messages on "bulk" as fast as it can while the round
    // trips run.
    let mut bulk_task = None;
    if bulk {
        let ba = channel(&mut a, "bulk").await?;
        let msg = vec![0x5au8; 65536];
        bulk_task = Some(tokio::spawn(async move { while ba.send(msg.clone()).await.is_ok() {} }));
    }
    if ready_rx.await.is_err() {
        let why = tokio::task::spawn_blocking(move || peer_b.join()).await?;
        return Err(match why {
            Ok(Err(e)) => e.context("echoing peer"),
            _ => anyhow::anyhow!("the echoing peer stopped"),
        });
    }
    let warmup = 200;
    let mut times = Vec::with_capacity(count);
    let (mut there, mut back) = (Vec::with_capacity(count), Vec::with_capacity(count));
    // `size` bytes in all, the last eight of them the send time.
    let padding = vec![7u8; size - 8];
    let mut started = (Instant::now(), 0);
    for i in 0..warmup + count {
        if i == warmup {
            started = (Instant::now(), moved.load(std::sync::atomic::Ordering::Relaxed));
        }
        let t0 = Instant::now();
        let mut msg = padding.clone();
        msg.extend_from_slice(&nanos_since(epoch).to_le_bytes());
        ca.send(msg).await?;
        let echo = match tokio::time::timeout(WAIT, ca.recv()).await.context("echo did not come back")? {
            Some(Message::Binary(echo)) => echo,
            other => bail!("expected the echo, got {other:?}"),
        };
        let returned = nanos_since(epoch);
        // The send time, then the arrival, are the echo's last 16 bytes.
        let stamp = |from_end: usize| {
            let at = echo.len().checked_sub(from_end)?;
            Some(u64::from_le_bytes(echo.get(at..at + 8)?.try_into().ok()?))
        };
        let (Some(sent), Some(arrived)) = (stamp(16), stamp(8)) else {
            bail!("the echo lost its timestamps ({} bytes)", echo.len());
        };
        if i >= warmup {
            times.push(t0.elapsed());
            there.push(Duration::from_nanos(arrived.saturating_sub(sent)));
            back.push(Duration::from_nanos(returned.saturating_sub(arrived)));
        }
    }
    let bulk_mbs = (moved.load(std::sync::atomic::Ordering::Relaxed) - started.1) as f64
        / started.0.elapsed().as_secs_f64()
        / 1e6;
    times.sort();
    there.sort();
    back.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let during = if bulk {
        format!(", while 64 KiB messages move at {bulk_mbs:.1} MB/s on another channel")
    } else {
        String::new()
    };
    println!(
        "rtt ({size}-byte messages, reliable ordered, {count} round trips{during}): p50 {:.0} us  p99 {:.0} us  min {:.0} us",
        us(pct(&times, 0.5)),
        us(pct(&times, 0.99)),
        us(times[0]),
    );
    println!(
        "  one way: there{} p50 {:.0} us  p99 {:.0} us; back p50 {:.0} us  p99 {:.0} us",
        if bulk { " (the bulk's direction)" } else { "" },
        us(pct(&there, 0.5)),
        us(pct(&there, 0.99)),
        us(pct(&back, 0.5)),
        us(pct(&back, 0.99)),
    );
    if let Some(task) = bulk_task {
        task.abort();
    }
    // str0m reports stats every 500 ms.
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::timeout_at(until, a.next_event()).await.is_ok() {}
    let stats = a.stats(ca.peer()).await?;
    println!(
        "  ICE consent-check rtt {:?}, selected pair {}",
        stats.rtt,
        stats.path.map(|p| p.to_string()).unwrap_or_default()
    );
    // A leaves: B's channel closes and its thread ends.
    drop(ca);
    tokio::time::timeout(Duration::from_secs(10), a.leave()).await.context("leave")??;
    tokio::task::spawn_blocking(move || peer_b.join())
        .await?
        .map_err(|_| anyhow::anyhow!("echoing peer panicked"))??;
    Ok(())
}

fn nanos_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
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
pub async fn throughput(mib: usize, size: usize, reference: bool) -> anyhow::Result<f64> {
    let total = mib * 1024 * 1024;
    let t0 = Instant::now();
    let (mbs, cpu) = peerlink_throughput(mib, size, None).await?;
    println!(
        "throughput ({mib} MiB in {size}-byte messages, reliable ordered): peerlink {mbs:.1} MB/s ({:.2} s with setup), {cpu:.1} CPU-s per GB (both peers)",
        t0.elapsed().as_secs_f64()
    );
    if !reference {
        return Ok(mbs);
    }
    // The reference varies run to run more than peerlink does on this
    // machine: take the median of three.
    let mut raws = Vec::with_capacity(3);
    let cpu0 = super::own_cpu_seconds();
    for _ in 0..3 {
        raws.push(tokio::task::spawn_blocking(move || super::raw::throughput(total, size)).await??);
    }
    let raw_cpu = (super::own_cpu_seconds() - cpu0) / (3.0 * total as f64 / 1e9);
    raws.sort_by(f64::total_cmp);
    let raw = raws[1];
    println!(
        "  raw str0m, blocking reference driver, same run: {raw:.1} MB/s (median of {:.1}, {:.1}, {:.1}), {raw_cpu:.1} CPU-s per GB (setup included); peerlink/raw = {:.2}, CPU peerlink/raw = {:.2}",
        raws[0],
        raws[1],
        raws[2],
        mbs / raw,
        cpu / raw_cpu
    );
    Ok(mbs)
}

/// Bulk throughput over an emulated WAN (both peers' datagrams delayed by
/// half of each round trip, some lost), for each case in one run, beside
/// what a 64 KiB-per-round-trip window allows.
pub async fn wan(mib: usize, size: usize, rate_mbit: u64, jitter_ms: u64) -> anyhow::Result<()> {
    let cases: [(u64, f64); 6] = [(0, 0.0), (10, 0.0), (20, 0.0), (50, 0.0), (100, 0.0), (50, 0.01)];
    let rate = (rate_mbit > 0).then_some(rate_mbit * 1_000_000 / 8);
    let jitter = Duration::from_millis(jitter_ms);
    println!(
        "throughput over an emulated WAN ({size}-byte messages, reliable ordered; delay, jitter {jitter_ms} ms, loss{} in both drivers' datagram paths):",
        rate.map(|_| format!(" and a {rate_mbit} Mbit/s bottleneck")).unwrap_or_default()
    );
    for (rtt_ms, loss) in cases {
        let rtt = Duration::from_millis(rtt_ms);
        let em = |seed| peerlink_peer::NetEm {
            loss: loss / 2.0,
            seed,
            rate,
            jitter,
            ..peerlink_peer::NetEm::delay(rtt / 2)
        };
        // Lossy links are slow: move less.
        let mib = if loss > 0.0 { (mib / 4).max(1) } else { mib };
        let netem = (rtt_ms > 0 || loss > 0.0 || rate.is_some() || jitter_ms > 0).then(|| (em(1), em(2)));
        let (mbs, _) = peerlink_throughput(mib, size, netem).await?;
        let bound =
            if rtt_ms > 0 { format!("{:.2} MB/s", 65536.0 / rtt.as_secs_f64() / 1e6) } else { "-".into() };
        println!(
            "  RTT {rtt_ms:>3} ms, loss {:>3.1} %: {mbs:>6.2} MB/s   (64 KiB per round trip: {bound})",
            loss * 100.0
        );
    }
    Ok(())
}

/// The channel with both drivers holding every datagram for half of `rtt`
/// (the reference beside `bench transfer --rtt-ms`): prints and returns
/// MB/s.
pub async fn throughput_at_rtt(mib: usize, size: usize, rtt: Duration) -> anyhow::Result<f64> {
    let em = |seed| peerlink_peer::NetEm { seed, ..peerlink_peer::NetEm::delay(rtt / 2) };
    let (mbs, cpu) = peerlink_throughput(mib, size, Some((em(1), em(2)))).await?;
    println!(
        "throughput ({mib} MiB in {size}-byte messages, reliable ordered, RTT {} ms in both drivers): peerlink {mbs:.1} MB/s, {cpu:.1} CPU-s per GB (both peers)",
        rtt.as_millis()
    );
    Ok(mbs)
}

/// peerlink's bulk throughput between two peers, optionally each behind an
/// emulated WAN: MB/s, and CPU seconds per GB moved (both peers, which run
/// in this process beside an idle signaling server; from the first message
/// to the last).
async fn peerlink_throughput(
    mib: usize,
    size: usize,
    netem: Option<(peerlink_peer::NetEm, peerlink_peer::NetEm)>,
) -> anyhow::Result<(f64, f64)> {
    let server = Server::start().await?;
    let run = bulk(&server, "tput", mib, size, netem).await?;
    Ok((run.mbs, run.cpu_per_gb))
}

/// What one [`bulk`] run measured.
struct BulkRun {
    mbs: f64,
    /// CPU seconds per GB, this process (both peers), first message to last.
    cpu_per_gb: f64,
    /// Join to the channel open on both sides.
    connect: Duration,
    /// The sender's path to the receiver when the channel opened (direct,
    /// relayed, ...).
    path: String,
}

/// Moves `mib` MiB in `size`-byte messages between two peers of `server`.
/// The receiving peer runs on a thread and runtime of its own, as it would
/// in another process: two peers on one runtime share one I/O driver, and
/// each waits for the other to park before its datagrams are seen.
async fn bulk(
    server: &Server,
    room: &str,
    mib: usize,
    size: usize,
    netem: Option<(peerlink_peer::NetEm, peerlink_peer::NetEm)>,
) -> anyhow::Result<BulkRun> {
    let total = mib * 1024 * 1024;
    let count = total.div_ceil(size);
    let mut a_cfg = server.config(room, vec![]);
    let mut b_cfg = server.config(room, vec![ChannelSpec::reliable("bulk")]);
    if let Some((a, b)) = netem {
        a_cfg.netem = Some(a);
        b_cfg.netem = Some(b);
    }
    // The sender joins first; the receiver, joining second, opens the channel.
    let joined = Instant::now();
    let mut a = Room::join(a_cfg).await?;
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (leave_tx, leave_rx) = oneshot::channel::<()>();
    let receiver = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-receiver")
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut b = Room::join(b_cfg).await?;
            let cb = channel(&mut b, "bulk").await?;
            let _ = ready_tx.send(());
            let _ = go_rx.await;
            take_bytes(&cb, count * size).await?;
            // Stay in the room until the sender has read the path's stats.
            let _ = done_tx.send(());
            let _ = leave_rx.await;
            anyhow::Ok(())
        })
    });
    let ca = channel(&mut a, "bulk").await?;
    let stopped = |receiver: std::thread::JoinHandle<anyhow::Result<()>>| async move {
        match tokio::task::spawn_blocking(move || receiver.join()).await? {
            Ok(Err(e)) => Err(e.context("receiving peer")),
            Ok(Ok(())) => Err(anyhow::anyhow!("the receiving peer stopped")),
            Err(_) => Err(anyhow::anyhow!("the receiving peer panicked")),
        }
    };
    if ready_rx.await.is_err() {
        // The receiver gave up before its channel opened: say why.
        return stopped(receiver).await;
    }
    let connect = joined.elapsed();
    let peer = ca.peer().clone();
    let t0 = Instant::now();
    let cpu0 = super::own_cpu_seconds();
    let _ = go_tx.send(());
    let sender = tokio::spawn(give_messages(ca, count, size));
    if done_rx.await.is_err() {
        return stopped(receiver).await;
    }
    let elapsed = t0.elapsed();
    let cpu = super::own_cpu_seconds() - cpu0;
    sender.await??;
    let path = a.stats(&peer).await?.path.map_or("?".to_string(), |p| p.to_string());
    let _ = leave_tx.send(());
    tokio::task::spawn_blocking(move || receiver.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the receiving peer panicked"))??;
    let bytes = (count * size) as f64;
    Ok(BulkRun { mbs: bytes / elapsed.as_secs_f64() / 1e6, cpu_per_gb: cpu / (bytes / 1e9), connect, path })
}

/// The embedded TURN server on a thread and runtime of its own, as it is
/// in `peerlink serve`, another process than the peers': its UDP, TCP and
/// TLS addresses and its self-signed certificate. Dropping `stop` ends it.
struct Turn {
    udp: std::net::SocketAddr,
    tcp: std::net::SocketAddr,
    tls: std::net::SocketAddr,
    cert: String,
    stop: oneshot::Sender<()>,
}

impl Turn {
    fn start(secret: &'static str) -> anyhow::Result<Turn> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let started = (|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("bench-turn")
                    .enable_all()
                    .build()?;
                let (turn, udp, tcp, tls, cert) = rt.block_on(async {
                    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                    let mut config = peerlink_turn::Config::new(peerlink_turn::Auth::rest(secret));
                    config.relay_ports = 0..=0;
                    config.peer_policy.allow_loopback = true;
                    config.limits.bandwidth_bytes_per_sec = None;
                    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
                    let cert = key.cert.pem();
                    let tls = peerlink_turn::TlsConfig::from_pem(
                        cert.as_bytes(),
                        key.signing_key.serialize_pem().as_bytes(),
                    )?;
                    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let (tcp_addr, tls_addr) = (tcp.local_addr()?, tls_listener.local_addr()?);
                    let turn =
                        peerlink_turn::Server::new(socket, config)?.with_tcp(tcp).with_tls(tls_listener, tls);
                    let udp = turn.local_addr();
                    anyhow::Ok((turn, udp, tcp_addr, tls_addr, cert))
                })?;
                anyhow::Ok((rt, turn, udp, tcp, tls, cert))
            })();
            match started {
                Ok((rt, turn, udp, tcp, tls, cert)) => {
                    let _ = tx.send(Ok((udp, tcp, tls, cert)));
                    // A task on the runtime's workers, as `serve` runs it (a
                    // `block_on` thread would be woken by a worker for every
                    // datagram).
                    let run = turn.run(async {
                        let _ = stopped.await;
                    });
                    match rt.block_on(rt.spawn(run)) {
                        Ok(Err(e)) => eprintln!("TURN server stopped: {e}"),
                        Err(e) => eprintln!("TURN server task: {e}"),
                        Ok(Ok(())) => {}
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let (udp, tcp, tls, cert) = rx.recv().context("the TURN thread stopped")??;
        Ok(Turn { udp, tcp, tls, cert, stop })
    }
}

/// Bulk throughput and connect time through the embedded TURN server with
/// both peers relay-only, reaching it over UDP, TCP and TLS in turn, beside
/// the direct path, all in one run (each transport offered alone, so no
/// fallback wait is counted).
pub(super) async fn relay(mib: usize, size: usize) -> anyhow::Result<()> {
    const SECRET: &str = "bench-secret";
    let turn = Turn::start(SECRET)?;
    let with_url = |url: String| {
        peerlink_signal::IceProvider::new(move |req| {
            let c = peerlink_turn::rest_credentials(
                SECRET,
                req.peer.as_str(),
                Duration::from_secs(600),
                std::time::SystemTime::now(),
            );
            vec![peerlink_proto::IceServer {
                urls: vec![url.clone()],
                username: Some(c.username),
                credential: Some(c.password),
            }]
        })
    };
    println!(
        "relay ({mib} MiB in {size}-byte messages, 127.0.0.1; connect = join to open channel, both peers; the receiving peer and the TURN server each on a runtime of their own, as in other processes; CPU = both peers and the TURN server):"
    );
    let direct_server = Server::start().await?;
    let direct = bulk(&direct_server, "direct", mib, size, None).await?;
    println!(
        "  direct          {:>7.1} MB/s   {:.1} CPU-s per GB   [{}]",
        direct.mbs, direct.cpu_per_gb, direct.path
    );
    let mut udp = None;
    for (name, url) in [
        ("TURN over UDP", format!("turn:{}?transport=udp", turn.udp)),
        ("TURN over TCP", format!("turn:{}?transport=tcp", turn.tcp)),
        ("TURN over TLS", format!("turns:{}", turn.tls)),
    ] {
        let mut server = Server::start_with(peerlink_signal::Config {
            ice_provider: Some(with_url(url)),
            ..Default::default()
        })
        .await?;
        server.relay_only = true;
        server.turn_ca = Some(turn.cert.clone().into_bytes());
        let run = bulk(&server, "relayed", mib, size, None).await?;
        let base = *udp.get_or_insert(run.mbs);
        println!(
            "  {name}   {:>7.1} MB/s   {:.1} CPU-s per GB   connect {:>6.1} ms   {:.2} of UDP-relayed, {:.2} of direct [{}]",
            run.mbs,
            run.cpu_per_gb,
            run.connect.as_secs_f64() * 1e3,
            run.mbs / base,
            run.mbs / direct.mbs,
            run.path
        );
    }
    let _ = turn.stop.send(());
    Ok(())
}
