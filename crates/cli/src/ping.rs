//! `peerlink ping ROOM`: connect to everyone in a room and report how:
//! connect time, the path taken (host, srflx, relay) and why, round-trip
//! time, and whether a stream of numbered messages arrived once and in
//! order, across outages and ICE restarts.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use peerlink_peer::{
    ChannelSpec, ConnState, DataChannel, Event, Message, PeerId, PeerStats, Room, RoomConfig,
};
use serde_json::{Value, json};

use crate::common::IceArgs;

const LABEL: &str = "ping";
/// How often each connection's stats are taken while it lasts.
const STATS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct PingArgs {
    room: String,
    /// Signaling server: ws://HOST:PORT/ws, http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "PEERLINK_SERVER")]
    server: String,
    /// Join token for servers that require one (`peerlink token`).
    #[arg(long, env = "PEERLINK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// An end-to-end encrypted room: the secret every member shares. Peers
    /// without it are refused.
    #[arg(long, env = "PEERLINK_ROOM_SECRET", hide_env_values = true)]
    room_secret: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Numbered messages to send to each peer.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Pause between messages.
    #[arg(long, default_value = "20ms", value_parser = crate::common::parse_ms)]
    interval: Duration,
    /// Keep sending for this long instead of --count messages.
    #[arg(long, value_parser = crate::common::parse_duration)]
    stream_for: Option<Duration>,
    /// Give up if the peers are not connected, or the stream not complete, by then.
    #[arg(long, default_value = "30s", value_parser = crate::common::parse_duration)]
    timeout: Duration,
    /// Peers to wait for.
    #[arg(long, default_value_t = 1)]
    expect_peers: usize,
    /// Join as a member of an overlay (a large room): broadcast numbered
    /// pings to the room (more, up to 4 × --count, until every expected
    /// peer answered --count: a broadcast reaches those connected when it
    /// is sent); every `ping --overlay` in it answers each over a direct
    /// connection with the hops the broadcast crossed to reach it. Reports
    /// the overlay path (hops) and round trip per peer.
    #[arg(long)]
    overlay: bool,
    #[command(flatten)]
    ice: IceArgs,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One peer's side of the exchange.
#[derive(Default)]
struct PeerRun {
    channel: Option<DataChannel>,
    connect_ms: Option<f64>,
    sent: u64,
    next_at: Option<Instant>,
    done_sending: bool,
    received: u64,
    last_seq: Option<u64>,
    in_order: bool,
    duplicates: u64,
    gaps: u64,
    /// Their total, from their `end` message.
    their_total: Option<u64>,
    last_msg_at: Option<Instant>,
    longest_gap: Duration,
    down_at: Option<Instant>,
    recovered: Option<Duration>,
    states: Vec<String>,
    /// The connection's view, last seen while it was there.
    stats: Option<PeerStats>,
    /// When the peer left the room (ms since we started).
    left_ms: Option<f64>,
}

fn path_json(stats: &PeerStats) -> Value {
    match &stats.path {
        Some(p) => json!({
            "kind": p.kind.as_str(),
            "local": p.local.to_string(),
            "remote": p.remote.to_string(),
            "why_relayed": stats.why_relayed.map(|w| w.to_string()),
            "relay_transport": p.relay_transport.map(|t| t.as_str()),
        }),
        None => Value::Null,
    }
}

struct Out {
    json: bool,
}

impl Out {
    fn event(&self, name: &str, mut v: Value, text: impl FnOnce() -> String) {
        if self.json {
            if let Value::Object(m) = &mut v {
                m.insert("event".into(), json!(name));
                m.insert("at_ms".into(), json!(unix_ms()));
            }
            println!("{v}");
        } else {
            println!("{}", text());
        }
    }
}

/// Waits (briefly) until str0m has reported the selected path.
async fn stats_with_path(room: &Room, peer: &PeerId) -> PeerStats {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = room.stats(peer).await.unwrap_or_default();
        if s.path.is_some() || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: PingArgs) -> anyhow::Result<bool> {
    if args.overlay {
        return overlay(args).await;
    }
    let out = Out { json: args.json };
    let mut config = RoomConfig::new(args.server.clone(), args.room.clone());
    config.ice = args.ice.config()?;
    config.token = args.token.clone();
    config.room_secret = args.room_secret.clone();
    config.channels = vec![ChannelSpec::reliable(LABEL)];
    let t0 = Instant::now();
    let mut room =
        Room::join(config).await.with_context(|| format!("joining {} on {}", args.room, args.server))?;
    out.event("joined", json!({"peer_id": room.id().as_str()}), || {
        format!("joined {} as {}", args.room, room.id())
    });

    let deadline = t0 + args.timeout;
    let stream_until = args.stream_for.map(|d| t0 + d);
    let mut peers: HashMap<PeerId, PeerRun> = HashMap::new();
    let mut gathered_reported = false;
    let mut next_stats = t0;
    // Every channel's messages, read by a task per channel.
    let (msg_tx, mut messages) = tokio::sync::mpsc::channel::<(PeerId, Message)>(256);
    let mut tick = tokio::time::interval(args.interval.max(Duration::from_millis(1)));
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);

    let finished = |peers: &HashMap<PeerId, PeerRun>| {
        peers.values().filter(|p| p.done_sending && p.their_total.is_some_and(|t| p.received >= t)).count()
            >= args.expect_peers
    };
    loop {
        if finished(&peers) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = tick.tick() => {
                let now = Instant::now();
                // The connection's view, kept while it lasts: a peer that
                // finishes first leaves, and its connection goes with it,
                // possibly before our own stream's end is counted.
                if now >= next_stats {
                    next_stats = now + STATS_EVERY;
                    for (peer, run) in peers.iter_mut() {
                        if let Ok(s) = room.stats(peer).await {
                            run.stats = Some(s);
                        }
                    }
                }
                if !gathered_reported && now > t0 + Duration::from_millis(1500) {
                    gathered_reported = true;
                    if let Ok(report) = room.gathering().await {
                        out.event("gathering", json!({"report": report.to_string()}), || format!("candidates: {report}"));
                    }
                }
                for run in peers.values_mut() {
                    let Some(ch) = &run.channel else { continue };
                    if run.done_sending || run.next_at.is_some_and(|t| now < t) {
                        continue;
                    }
                    let more = match stream_until {
                        Some(until) => now < until,
                        None => run.sent < args.count,
                    };
                    if more {
                        if ch.try_send(format!("seq:{}", run.sent)).is_ok() {
                            run.sent += 1;
                        }
                        run.next_at = Some(now + args.interval);
                    } else if ch.try_send(format!("end:{}", run.sent)).is_ok() {
                        run.done_sending = true;
                    }
                }
            }
            ev = room.next_event() => match ev {
                None => break,
                Some(Event::ChannelOpen { channel }) if channel.label() == LABEL => {
                    let peer = channel.peer().clone();
                    let run = peers.entry(peer.clone()).or_insert_with(|| PeerRun { in_order: true, ..Default::default() });
                    if run.connect_ms.is_none() {
                        run.connect_ms = Some(ms(t0.elapsed()));
                        let stats = stats_with_path(&room, &peer).await;
                        let path = path_json(&stats);
                        run.stats = Some(stats.clone());
                        out.event(
                            "connected",
                            json!({"peer": peer.as_str(), "connect_ms": run.connect_ms, "path": path}),
                            || format!("connected to {peer} in {:.1} ms via {}", run.connect_ms.unwrap_or_default(), stats.path.map(|p| p.to_string()).unwrap_or_else(|| "?".into())),
                        );
                    }
                    let (reader, tx) = (channel.clone(), msg_tx.clone());
                    tokio::spawn(async move {
                        while let Some(m) = reader.recv().await {
                            if tx.send((reader.peer().clone(), m)).await.is_err() {
                                break;
                            }
                        }
                    });
                    run.channel = Some(channel);
                }
                Some(Event::ChannelOpen { channel }) => crate::common::refuse_channel(&channel),
                Some(Event::StateChanged { peer, state }) => {
                    let run = peers.entry(peer.clone()).or_insert_with(|| PeerRun { in_order: true, ..Default::default() });
                    let name = format!("{state:?}").to_lowercase();
                    run.states.push(name.clone());
                    match state {
                        ConnState::Disconnected => { run.down_at.get_or_insert(Instant::now()); }
                        ConnState::Connected => {
                            if let Some(at) = run.down_at.take() {
                                run.recovered = Some(at.elapsed());
                            }
                        }
                        _ => {}
                    }
                    out.event("state", json!({"peer": peer.as_str(), "state": name}), || format!("{peer}: {state:?}"));
                }
                Some(Event::PeerLeft { peer }) => {
                    if let Some(run) = peers.get_mut(&peer) {
                        run.left_ms.get_or_insert(ms(t0.elapsed()));
                    }
                }
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
            Some((peer, message)) = messages.recv() => {
                if let Message::Text(t) = message {
                    let now = Instant::now();
                    let run = peers.entry(peer).or_insert_with(|| PeerRun { in_order: true, ..Default::default() });
                    if let Some(n) = t.strip_prefix("seq:").and_then(|n| n.parse::<u64>().ok()) {
                        run.received += 1;
                        match run.last_seq {
                            Some(last) if n <= last => {
                                run.duplicates += 1;
                                run.in_order = false;
                            }
                            Some(last) if n > last + 1 => {
                                run.gaps += n - last - 1;
                                run.in_order = false;
                            }
                            None if n > 0 => {
                                run.gaps += n;
                                run.in_order = false;
                            }
                            _ => {}
                        }
                        run.last_seq = Some(run.last_seq.map_or(n, |l| l.max(n)));
                        if let Some(prev) = run.last_msg_at {
                            run.longest_gap = run.longest_gap.max(now - prev);
                        }
                        run.last_msg_at = Some(now);
                    } else if let Some(n) = t.strip_prefix("end:").and_then(|n| n.parse::<u64>().ok()) {
                        run.their_total = Some(n);
                    }
                }
            }
        }
    }

    for (peer, run) in peers.iter_mut() {
        if let Ok(s) = room.stats(peer).await {
            run.stats = Some(s);
        }
    }
    // Results, with the connection's own view.
    let mut results = Vec::new();
    let mut ok = peers.len() >= args.expect_peers;
    for (peer, run) in &peers {
        let stats = run.stats.clone().unwrap_or_default();
        let missing = run.their_total.map(|t| t.saturating_sub(run.received)).unwrap_or(run.gaps);
        let peer_ok = run.connect_ms.is_some()
            && run.done_sending
            && run.their_total.is_some()
            && run.in_order
            && run.duplicates == 0
            && missing == 0;
        ok &= peer_ok;
        let failure = if peer_ok {
            None
        } else if let Some(f) = &stats.failure {
            Some(f.to_string())
        } else if run.connect_ms.is_none() {
            Some(format!("not connected within {:?}", args.timeout))
        } else if run.their_total.is_none() {
            Some(match run.left_ms {
                Some(at) => format!("the other side left at {at:.0} ms, before its stream finished"),
                None => "the other side's stream did not finish in time".into(),
            })
        } else {
            Some("messages arrived out of order, twice, or not at all".into())
        };
        results.push(json!({
            "peer": peer.as_str(),
            "connect_ms": run.connect_ms,
            "path": path_json(&stats),
            "rtt_ms": stats.rtt.map(ms),
            "sent": run.sent,
            "received": run.received,
            "in_order": run.in_order,
            "duplicates": run.duplicates,
            "missing": missing,
            "ice_restarts": stats.ice_restarts,
            "recovered_ms": run.recovered.map(ms),
            "left_ms": run.left_ms,
            "longest_gap_ms": ms(run.longest_gap),
            "states": run.states,
            "failure": failure,
        }));
    }
    if peers.is_empty() {
        ok = false;
    }
    let report = room.gathering().await.map(|r| r.to_string()).unwrap_or_default();
    out.event("result", json!({"ok": ok, "peers": results, "gathering": report}), || {
        let mut lines = vec![format!("{}: candidates {report}", if ok { "ok" } else { "FAILED" })];
        for r in &results {
            lines.push(format!("  {r}"));
        }
        lines.join("\n")
    });
    // Leaving waits (up to the room's linger) until the other side has
    // acknowledged our last messages, so its count completes.
    let _ = tokio::time::timeout(Duration::from_secs(10), room.leave()).await;
    Ok(ok)
}

/// What `ping --overlay` learned about one peer.
#[derive(Default)]
struct OverlayRun {
    /// Hops our broadcasts crossed to reach it, as it reported.
    hops: Vec<u16>,
    rtts: Vec<Duration>,
    replies: std::collections::HashSet<u64>,
}

/// `ping --overlay`: pings broadcast over the overlay, answered directly.
async fn overlay(args: PingArgs) -> anyhow::Result<bool> {
    use peerlink_peer::{MessageKind, OverlayConfig};
    let out = Out { json: args.json };
    let mut config = RoomConfig::new(args.server.clone(), args.room.clone());
    config.ice = args.ice.config()?;
    config.token = args.token.clone();
    config.room_secret = args.room_secret.clone();
    config.overlay = Some(OverlayConfig::default());
    let t0 = Instant::now();
    let mut room =
        Room::join(config).await.with_context(|| format!("joining {} on {}", args.room, args.server))?;
    out.event("joined", json!({"peer_id": room.id().as_str(), "overlay": true}), || {
        format!("joined {} as {} (overlay)", args.room, room.id())
    });
    let deadline = t0 + args.timeout;
    let mut peers: HashMap<PeerId, OverlayRun> = HashMap::new();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(args.interval.max(Duration::from_millis(1)));
    // Pings go out once we have a neighbour; peers that come later get the
    // ones after.
    let mut neighbours = false;
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);
    // Done when our pings were answered by the peers expected, and we
    // answered theirs (a ping that left early would leave others waiting).
    let mut answered: HashMap<PeerId, std::collections::HashSet<String>> = HashMap::new();
    let complete = |peers: &HashMap<PeerId, OverlayRun>,
                    answered: &HashMap<PeerId, std::collections::HashSet<String>>,
                    sent: u64| {
        sent >= args.count
            && peers.values().filter(|p| p.replies.len() as u64 >= args.count).count() >= args.expect_peers
            && answered.values().filter(|a| a.len() as u64 >= args.count).count() >= args.expect_peers
    };
    let mut answered_all = false;
    let mut stats = None;
    loop {
        if complete(&peers, &answered, sent) {
            answered_all = true;
            // As it was when the last answer came (the others leave after).
            stats = room.overlay_stats().await?;
            // Keep answering the others a moment before leaving.
            let linger = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(linger);
            loop {
                tokio::select! {
                    _ = &mut linger => break,
                    ev = room.next_event() => match ev {
                        Some(Event::Message { from, data, kind: MessageKind::Broadcast { hops } }) => {
                            answer(&room, &from, &data, hops).await;
                        }
                        None => break,
                        _ => {}
                    },
                }
            }
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = tick.tick() => {
                if !neighbours {
                    neighbours = room.overlay_stats().await?.is_some_and(|s| !s.neighbors.is_empty());
                }
                // A broadcast reaches the members connected when it is
                // sent: pings go on (at most 4 × --count) until every
                // expected peer answered --count of them.
                let short = peers.values().filter(|p| p.replies.len() as u64 >= args.count).count() < args.expect_peers;
                if neighbours && (sent < args.count || (short && sent < 4 * args.count)) {
                    room.broadcast(format!("ping:{sent}:{}", unix_ms()).into_bytes()).await?;
                    sent += 1;
                }
            }
            ev = room.next_event() => match ev {
                Some(Event::Message { from, data, kind: MessageKind::Broadcast { hops } }) => {
                    if let Some(seq) = answer(&room, &from, &data, hops).await {
                        answered.entry(from).or_default().insert(seq);
                    }
                }
                Some(Event::Message { from, data, kind: MessageKind::Direct }) => {
                    let text = String::from_utf8_lossy(&data);
                    let mut f = text.split(':');
                    if let (Some("pong"), Some(seq), Some(at), Some(hops)) = (f.next(), f.next(), f.next(), f.next())
                        && let (Ok(seq), Ok(at), Ok(hops)) = (seq.parse::<u64>(), at.parse::<u64>(), hops.parse::<u16>())
                    {
                        let p = peers.entry(from).or_default();
                        if p.replies.insert(seq) {
                            p.hops.push(hops);
                            p.rtts.push(Duration::from_millis(unix_ms().saturating_sub(at)));
                        }
                    }
                }
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                None => anyhow::bail!("room closed"),
                _ => {}
            },
        }
    }
    let stats = match stats {
        Some(s) => s,
        None => room.overlay_stats().await?.unwrap_or_default(),
    };
    let mut list: Vec<(&PeerId, &OverlayRun)> = peers.iter().collect();
    list.sort_by_key(|(id, _)| id.as_str().to_string());
    let mut rows = Vec::new();
    for (id, p) in &list {
        let mut rtts = p.rtts.clone();
        rtts.sort();
        let mut hops = p.hops.clone();
        hops.sort_unstable();
        let rtt_p50 = rtts.get(rtts.len() / 2).map(|d| ms(*d));
        let neighbour = stats.neighbors.contains(id);
        rows.push(json!({
            "peer": id.as_str(),
            "replies": p.replies.len(),
            "hops_min": hops.first(),
            "hops_max": hops.last(),
            "neighbour": neighbour,
            "rtt_p50_ms": rtt_p50,
        }));
        out.event("overlay_peer", rows.last().cloned().unwrap_or_default(), || {
            format!(
                "  {id}: {}/{} answered, {} hop(s){}, rtt p50 {}",
                p.replies.len(),
                args.count,
                hops.first().map_or("?".into(), |h| h.to_string()),
                if neighbour { " (a neighbour)" } else { "" },
                rtt_p50.map_or("?".into(), |r| format!("{r:.1} ms"))
            )
        });
    }
    let ok = answered_all;
    out.event(
        "result",
        json!({
            "ok": ok,
            "overlay": {
                "neighbors": stats.neighbors.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "connections": stats.connections,
                "delivered": stats.delivered,
                "duplicates": stats.duplicates,
                "forwarded": stats.forwarded,
                "grafts": stats.grafts,
                "prunes": stats.prunes,
                "replacements": stats.replacements,
            },
            "peers": rows,
        }),
        || {
            format!(
                "{}: {} neighbour(s), {} connection(s); {} broadcasts received, {} duplicates, {} repairs",
                if ok { "ok" } else { "incomplete" },
                stats.neighbors.len(),
                stats.connections,
                stats.delivered,
                stats.duplicates,
                stats.grafts
            )
        },
    );
    room.leave().await.ok();
    Ok(ok)
}

/// Answers a `ping:SEQ:AT` broadcast with `pong:SEQ:AT:HOPS`, to its
/// sender alone; returns SEQ.
async fn answer(room: &Room, from: &PeerId, data: &[u8], hops: u16) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let rest = text.strip_prefix("ping:")?;
    room.send(from, format!("pong:{rest}:{hops}").into_bytes()).await.ok();
    rest.split(':').next().map(str::to_string)
}
