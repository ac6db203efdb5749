//! `bench signal-abuse`: a real `peerlink serve` process with its default
//! limits under three attacks, each beside honest clients:
//!
//! - **half-sent requests** (slowloris): many TCP connections from
//!   127.0.x.y that send part of an upgrade request and stop, while normal
//!   clients greet and join; how many the server holds, what it costs, that
//!   the normal clients still get in, and when the server closes the rest;
//! - **clients that stop reading**: each is sent 200 messages of 60 KB (a
//!   legal burst) by another member of its room; the server's peak RSS and
//!   queued bytes, what the senders are told, when the readers are closed;
//! - **a flooder**: one connection writing frames as fast as its socket
//!   takes them, beside pairs relaying paced messages; their one-way p99
//!   before, during and after, and when the flooder is cut off.
//!
//! The attackers speak WebSocket by hand (masked frames written in bulk),
//! as a hostile client would.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as M;

use super::sigload::{greet, healthz, join, next_text};
use super::signal::{rss_kib, spawn_server};
use super::{TICKS_PER_SEC, cpu_ticks};

#[derive(Debug, Clone, clap::Args)]
pub struct SignalAbuseArgs {
    /// Half-sent requests held open at once, 200 from each of 127.0.x.y.
    #[arg(long, default_value_t = 10_000)]
    half_open: usize,
    /// Normal clients that greet and join before and during that attack.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Clients that stop reading.
    #[arg(long, default_value_t = 20)]
    stuck: usize,
    /// Pairs relaying paced messages beside the flooder.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Seconds of paced traffic measured before and after the flood.
    #[arg(long, default_value_t = 3)]
    secs: u64,
}

pub(super) async fn run(args: SignalAbuseArgs) -> anyhow::Result<()> {
    if let Some(limit) = crate::common::raise_fd_limit()
        && limit < (args.half_open + args.clients + 256) as u64
    {
        bail!("the open-file limit ({limit}) is too low for {} half-sent requests", args.half_open);
    }
    println!("signal abuse: peerlink serve with its default limits, one attack at a time");
    half_open(&args).await?;
    stuck_readers(&args).await?;
    flood(&args).await
}

/// A masked client text frame (mask key zero: the payload is sent as is).
fn frame(text: &str) -> Vec<u8> {
    let p = text.as_bytes();
    let mut f = vec![0x81];
    match p.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend([0; 4]);
    f.extend(p);
    f
}

/// A TCP connection from `src` to the server, with a small receive buffer
/// when `rcvbuf` says so.
async fn connect_from(src: Ipv4Addr, port: u16, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    s.bind(SocketAddr::new(src.into(), 0))?;
    s.connect(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).await
}

/// A WebSocket by hand from `src`: upgraded, greeted and joined to `room`,
/// with nothing read after the upgrade response.
async fn raw_member(src: Ipv4Addr, port: u16, room: &str, rcvbuf: Option<u32>) -> anyhow::Result<TcpStream> {
    let mut s = connect_from(src, port, rcvbuf).await?;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .context("upgrade timed out")??
            == 0
        {
            bail!("closed during the upgrade");
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    let mut hello = frame(r#"{"type":"hello","version":1}"#);
    hello.extend(frame(&format!(r#"{{"type":"join","room":"{room}"}}"#)));
    s.write_all(&hello).await?;
    Ok(s)
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    super::pct(sorted, q).as_secs_f64() * 1000.0
}

/// `n` normal clients, 50 at a time, greeted and joined: how many got in
/// and how long each took.
async fn normal_clients(port: u16, n: usize, tag: &str) -> (usize, Vec<Duration>) {
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut took = Vec::new();
    let mut ok = 0;
    let mut done = futures_util::stream::iter((0..n).map(|i| {
        let url = url.clone();
        let room = format!("{tag}-{}", i / 10);
        async move {
            let t = Instant::now();
            let (mut ws, _) = greet(&url).await?;
            join(&mut ws, &room).await?;
            let took = t.elapsed();
            let _ = ws.close(None).await;
            anyhow::Ok(took)
        }
    }))
    .buffer_unordered(50);
    while let Some(r) = done.next().await {
        if let Ok(t) = r {
            ok += 1;
            took.push(t);
        }
    }
    took.sort_unstable();
    (ok, took)
}

async fn half_open(args: &SignalAbuseArgs) -> anyhow::Result<()> {
    let (mut child, pid, port) = spawn_server(&[]).await?;
    let result = async {
        let health = healthz(port).await?;
        let timeout = Duration::from_millis(health["request_timeout_ms"].as_u64().context("request_timeout_ms")?);
        let (ok, took) = normal_clients(port, args.clients, "calm").await;
        println!(
            "  half-sent requests: before, {ok}/{} normal clients greeted and joined, p50 {:.2} ms, p99 {:.2} ms; server RSS {:.1} MiB",
            args.clients,
            pct(&took, 0.5),
            pct(&took, 0.99),
            rss_kib(pid)? as f64 / 1024.0
        );
        // 200 per source address, under the per-address cap.
        let t0 = Instant::now();
        let mut opening = futures_util::stream::iter((0..args.half_open).map(|i| async move {
            let a = i / 200;
            let src = Ipv4Addr::new(127, 1 + (a / 250) as u8, 1 + (a % 250) as u8, 1);
            let mut s = connect_from(src, port, Some(4096)).await?;
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n").await?;
            anyhow::Ok((s, Instant::now()))
        }))
        .buffer_unordered(256);
        let mut held = Vec::with_capacity(args.half_open);
        let mut failed = 0;
        while let Some(r) = opening.next().await {
            match r {
                Ok(s) => held.push(s),
                Err(_) => failed += 1,
            }
        }
        drop(opening);
        let opened_in = t0.elapsed();
        let open_now = healthz(port).await?["tcp_connections"].as_u64().unwrap_or(0);
        let rss = rss_kib(pid)?;
        let (ok, took) = normal_clients(port, args.clients, "attacked").await;
        let during = t0.elapsed();
        println!(
            "  half-sent requests: {} held open ({failed} failed to connect) in {:.1} s; the server counts {open_now} TCP connections, RSS {:.1} MiB; meanwhile {ok}/{} normal clients greeted and joined, p50 {:.2} ms, p99 {:.2} ms (all within {:.1} s of the attack's start)",
            held.len(),
            opened_in.as_secs_f64(),
            rss as f64 / 1024.0,
            args.clients,
            pct(&took, 0.5),
            pct(&took, 0.99),
            during.as_secs_f64(),
        );
        // Each ends when the server closes it: how long after it was sent.
        let deadline = timeout + Duration::from_secs(10);
        let mut ends = futures_util::stream::iter(held.into_iter().map(|(mut s, opened)| async move {
            let mut buf = [0u8; 512];
            let left = deadline.saturating_sub(opened.elapsed());
            loop {
                match tokio::time::timeout(left, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(opened.elapsed()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        }))
        .buffer_unordered(args.half_open.max(1));
        let mut closed = Vec::new();
        let mut still = 0;
        while let Some(r) = ends.next().await {
            match r {
                Some(t) => closed.push(t),
                None => still += 1,
            }
        }
        closed.sort_unstable();
        let health = healthz(port).await?;
        println!(
            "  half-sent requests: {} closed by the server {:.1}-{:.1} s after they were sent (request timeout {:.0} s), {still} still open; it counted {} timed-out requests and now {} TCP connections; RSS {:.1} MiB",
            closed.len(),
            closed.first().map_or(f64::NAN, Duration::as_secs_f64),
            closed.last().map_or(f64::NAN, Duration::as_secs_f64),
            timeout.as_secs_f64(),
            health["requests_timed_out"],
            health["tcp_connections"],
            rss_kib(pid)? as f64 / 1024.0,
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}

async fn stuck_readers(args: &SignalAbuseArgs) -> anyhow::Result<()> {
    let (mut child, pid, port) = spawn_server(&[]).await?;
    let result = async {
        let health = healthz(port).await?;
        let budget = health["queue_budget_bytes"].as_u64().unwrap_or(0);
        let per_conn = health["outbound_queue_bytes"].as_u64().unwrap_or(0);
        let url = format!("ws://127.0.0.1:{port}/ws");
        const MESSAGES: usize = 200;
        const DATA: usize = 60_000;
        let mut stuck = Vec::new();
        let mut senders = Vec::new();
        for i in 0..args.stuck {
            let room = format!("pin-{i}");
            // A 4 KiB receive buffer: the kernel holds little for it.
            stuck.push(raw_member(Ipv4Addr::new(127, 0, 0, 2), port, &room, Some(4096)).await?);
            let (mut ws, _) = greet(&url).await?;
            join(&mut ws, &room).await?;
            senders.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = rss_kib(pid)?;
        let members = healthz(port).await?["connections"].as_u64().unwrap_or(0);

        // Sample RSS and queued bytes until the stuck clients are gone.
        let t0 = Instant::now();
        let n_stuck = args.stuck as u64;
        let sampler = tokio::spawn(async move {
            let (mut peak_rss, mut peak_queued, mut gone_at) = (0, 0, None);
            let limit = Duration::from_secs(60);
            while t0.elapsed() < limit {
                peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
                if let Ok(h) = healthz(port).await {
                    peak_queued = peak_queued.max(h["queued_bytes"].as_u64().unwrap_or(0));
                    let conns = h["connections"].as_u64().unwrap_or(u64::MAX);
                    if gone_at.is_none() && conns + n_stuck <= members {
                        gone_at = Some(t0.elapsed());
                    }
                    if gone_at.is_some_and(|g| t0.elapsed() > g + Duration::from_secs(1)) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (peak_rss, peak_queued, gone_at)
        });

        // Each sender: one legal burst of 200, then reads its replies.
        let data = "x".repeat(DATA);
        let mut tasks = Vec::new();
        for (i, mut ws) in senders.into_iter().enumerate() {
            let msg = format!(r#"{{"type":"send","room":"pin-{i}","data":"{data}"}}"#);
            tasks.push(tokio::spawn(async move {
                for _ in 0..MESSAGES {
                    ws.feed(M::text(msg.clone())).await?;
                }
                ws.flush().await?;
                let mut busy = 0;
                let mut other = 0;
                let end = Instant::now() + Duration::from_secs(30);
                while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end.into(), ws.next()).await {
                    if let M::Text(t) = m {
                        if t.contains(r#""peer_busy""#) {
                            busy += 1;
                        } else if t.contains(r#""peer_left""#) {
                            break;
                        } else if t.contains(r#""error""#) {
                            other += 1;
                        }
                    }
                }
                anyhow::Ok((busy, other))
            }));
        }
        let (mut busy, mut other) = (0, 0);
        for t in tasks {
            let (b, o) = t.await??;
            busy += b;
            other += o;
        }
        let (peak_rss, peak_queued, gone_at) = sampler.await?;
        // The senders have gone too: every queued byte comes back.
        let drained = Instant::now();
        let mut queued = u64::MAX;
        while drained.elapsed() < Duration::from_secs(5) {
            queued = healthz(port).await?["queued_bytes"].as_u64().unwrap_or(u64::MAX);
            if queued == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let offered = args.stuck * MESSAGES * DATA;
        println!(
            "  clients that stop reading: {} of them, each sent {MESSAGES} x {} KB by a member of its room ({:.0} MB offered); server RSS {:.1} MiB before, peak {:.1} MiB; queued at most {:.1} MiB ({:.1} MiB per client allowed, {:.0} MiB for all); senders told peer_busy {busy} times ({other} other errors); the readers closed {} after the burst; RSS after {:.1} MiB, queued {queued} bytes {:.1} s later",
            args.stuck,
            DATA / 1000,
            offered as f64 / 1e6,
            rss0 as f64 / 1024.0,
            peak_rss as f64 / 1024.0,
            peak_queued as f64 / (1 << 20) as f64,
            per_conn as f64 / (1 << 20) as f64,
            budget as f64 / (1 << 20) as f64,
            gone_at.map_or("never (60 s)".to_string(), |g| format!("{:.1} s", g.as_secs_f64())),
            rss_kib(pid)? as f64 / 1024.0,
            drained.elapsed().as_secs_f64(),
        );
        drop(stuck);
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}

async fn flood(args: &SignalAbuseArgs) -> anyhow::Result<()> {
    let (mut child, pid, port) = spawn_server(&[]).await?;
    let result = async {
        let url = format!("ws://127.0.0.1:{port}/ws");
        let t0 = Instant::now();
        // (received at, one-way time) for every paced message.
        let seen: Arc<Mutex<Vec<(Duration, Duration)>>> = Arc::default();
        let mut tasks = Vec::new();
        // Ten messages a second per pair, a fifth of the rate limit.
        for i in 0..args.pairs {
            let room = format!("calm-{i}");
            let (mut a, _) = greet(&url).await?;
            join(&mut a, &room).await?;
            let (mut b, _) = greet(&url).await?;
            join(&mut b, &room).await?;
            next_text(&mut a).await?; // peer_joined
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(m)) = b.next().await {
                    let M::Text(t) = m else { continue };
                    let Some(sent) = t.split_once(r#""data":"#).and_then(|(_, r)| {
                        r.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u64>().ok())
                    }) else {
                        continue;
                    };
                    let now = t0.elapsed();
                    seen.lock().expect("lock").push((now, now.saturating_sub(Duration::from_micros(sent))));
                }
            }));
            let offset = Duration::from_millis((i * 100 / args.pairs.max(1)) as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let t = t0.elapsed().as_micros();
                    let msg = format!(r#"{{"type":"send","room":"{room}","data":{t}}}"#);
                    if a.send(M::text(msg)).await.is_err() {
                        return;
                    }
                    // Drain anything for A (nothing is expected).
                    while let Some(Some(_)) = a.next().now_or_never() {}
                }
            }));
        }
        let secs = Duration::from_secs(args.secs);
        tokio::time::sleep(secs + Duration::from_millis(500)).await;

        // The flooder: frames as fast as the socket takes them.
        let flood_start = t0.elapsed();
        let cpu0 = cpu_ticks(pid)?;
        let mut f = raw_member(Ipv4Addr::new(127, 0, 0, 3), port, "flood", None).await?;
        let (mut rd, mut wr) = f.split();
        let one = frame(r#"{"type":"send","room":"flood","data":"flood"}"#);
        let bulk: Vec<u8> = one.iter().copied().cycle().take(one.len() * (65536 / one.len())).collect();
        let mut frames_sent = 0u64;
        let mut told = Vec::new();
        let reader = async {
            let mut buf = vec![0u8; 65536];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        // Keep the tail: the close reason comes last.
                        told.extend_from_slice(&buf[..n]);
                        let keep = told.len().saturating_sub(4096);
                        told.drain(..keep);
                    }
                }
            }
            t0.elapsed()
        };
        let writer = async {
            while wr.write_all(&bulk).await.is_ok() {
                frames_sent += (bulk.len() / one.len()) as u64;
            }
            std::future::pending::<()>().await
        };
        let cut_off = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                at = reader => at,
                _ = writer => unreachable!(),
            }
        })
        .await;
        let flood_end = t0.elapsed();
        let cpu1 = cpu_ticks(pid)?;
        let reason = if String::from_utf8_lossy(&told).contains("flooding") { "flooding" } else { "no reason seen" };
        tokio::time::sleep(secs + Duration::from_millis(500)).await;
        let after_end = t0.elapsed();
        for t in &tasks {
            t.abort();
        }
        let seen = std::mem::take(&mut *seen.lock().expect("lock"));
        let window = |from: Duration, to: Duration| {
            let mut v: Vec<Duration> = seen.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, d)| *d).collect();
            v.sort_unstable();
            v
        };
        let before = window(flood_start.saturating_sub(secs), flood_start);
        let during = window(flood_start, flood_end);
        let after = window(flood_end + Duration::from_millis(500), after_end);
        let flood_cpu = (cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1) as f64 / TICKS_PER_SEC;
        let flood_secs = (flood_end - flood_start).as_secs_f64();
        println!(
            "  flooder: {} frames written in {flood_secs:.1} s; {}, closed by the server ({reason}) after {:.1} s; the server spent {:.0} % of a core meanwhile",
            frames_sent,
            if cut_off.is_ok() { "cut off" } else { "NOT cut off within 30 s" },
            flood_secs,
            flood_cpu / flood_secs * 100.0,
        );
        let line = |what: &str, v: &[Duration]| {
            println!(
                "  flooder: {what}: {} paced messages ({} pairs, 10/s each), one way p50 {:.2} ms, p99 {:.2} ms",
                v.len(),
                args.pairs,
                pct(v, 0.5),
                pct(v, 0.99)
            );
        };
        line("before", &before);
        line("during the flood", &during);
        line("after", &after);
        if cut_off.is_err() {
            bail!("the flooder was not disconnected");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}
