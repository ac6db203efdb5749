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

#[derive(Debug, clap::Args)]
pub struct PingArgs {
    room: String,
    /// Signaling server: ws://HOST:PORT/ws, http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "PEERLINK_SERVER")]
    server: String,
    /// Join token for servers that require one (`peerlink token`).
    #[arg(long, env = "PEERLINK_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    let out = Out { json: args.json };
    let mut config = RoomConfig::new(args.server.clone(), args.room.clone());
    config.ice = args.ice.config()?;
    config.token = args.token.clone();
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
            Some("the other side's stream did not finish in time".into())
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
