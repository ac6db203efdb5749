//! Rooms with an overlay on a real server, over real sockets on 127.0.0.1:
//! a large room (the server lists a sample and keeps presence quiet)
//! carries broadcasts to everyone with a handful of connections each,
//! heals when a member leaves, and carries messages to one peer.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use peerlink_peer::{Error, Event, MessageKind, OverlayConfig, OverlayStats, PeerId, Room};
use tokio::sync::{mpsc, oneshot};

type Inbox = Arc<Mutex<Vec<(PeerId, Vec<u8>, MessageKind)>>>;

enum Cmd {
    Broadcast(Vec<u8>, oneshot::Sender<Result<(), Error>>),
    Send(PeerId, Vec<u8>, oneshot::Sender<Result<(), Error>>),
    Stats(oneshot::Sender<Option<OverlayStats>>),
    Hops(PeerId, oneshot::Sender<Option<u16>>),
    Connected(PeerId, oneshot::Sender<bool>),
}

/// A member driven by its own task: it reads every event as it comes.
struct Member {
    id: PeerId,
    cmds: mpsc::Sender<Cmd>,
    got: Inbox,
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    async fn join(server: &Server, room: &str) -> Member {
        let mut config = server.config(room);
        config.overlay = Some(OverlayConfig::default());
        let mut room = Room::join(config).await.expect("join");
        let id = room.id().clone();
        let got: Inbox = Arc::default();
        let (cmds, mut rx) = mpsc::channel(16);
        let inbox = got.clone();
        let me = id.clone();
        let task = tokio::spawn(async move {
            let id = me;
            loop {
                tokio::select! {
                    ev = room.next_event() => match ev {
                        Some(Event::Message { from, data, kind }) => inbox.lock().unwrap().push((from, data, kind)),
                        Some(Event::SendFailed { peer, messages }) => {
                            eprintln!("{id}: {messages} message(s) to {peer} not delivered");
                        }
                        Some(Event::Closed { .. }) | None => return,
                        Some(_) => {}
                    },
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Broadcast(d, r)) => { let _ = r.send(room.broadcast(d).await); }
                        Some(Cmd::Send(p, d, r)) => { let _ = r.send(room.send(&p, d).await); }
                        Some(Cmd::Stats(r)) => { let _ = r.send(room.overlay_stats().await.unwrap()); }
                        Some(Cmd::Hops(p, r)) => { let _ = r.send(room.overlay_hops(&p).await.unwrap()); }
                        Some(Cmd::Connected(p, r)) => { let _ = r.send(room.stats(&p).await.is_ok()); }
                        None => return,
                    },
                }
            }
        });
        Member { id, cmds, got, task }
    }

    async fn broadcast(&self, data: &[u8]) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Broadcast(data.to_vec(), tx)).await.unwrap();
        rx.await.unwrap()
    }

    async fn send(&self, to: &PeerId, data: &[u8]) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Send(to.clone(), data.to_vec(), tx)).await.unwrap();
        rx.await.unwrap()
    }

    async fn stats(&self) -> OverlayStats {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Stats(tx)).await.unwrap();
        rx.await.unwrap().expect("an overlay room")
    }

    /// Whether it holds a connection to `peer` (a neighbour's or a spare).
    async fn connected_to(&self, peer: &PeerId) -> bool {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Connected(peer.clone(), tx)).await.unwrap();
        rx.await.unwrap()
    }

    async fn hops(&self, from: &PeerId) -> Option<u16> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Hops(from.clone(), tx)).await.unwrap();
        rx.await.unwrap()
    }

    fn broadcasts(&self) -> Vec<(PeerId, Vec<u8>)> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(_, _, k)| matches!(k, MessageKind::Broadcast { .. }))
            .map(|(f, d, _)| (f.clone(), d.clone()))
            .collect()
    }
}

/// Every member's id and overlay counters, one per line (for a failure).
async fn all_stats(members: &[Member]) -> String {
    let mut all = String::new();
    for (j, o) in members.iter().enumerate() {
        all += &format!("\n{j} {}: {:?}", o.id, o.stats().await);
    }
    all
}

/// Waits (bounded) until `cond` holds.
async fn until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut cond: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_broadcasts_to_everyone_with_few_connections_and_heals() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = peerlink_signal::Config { listed_peers: 4, ..Default::default() };
    config.limits.max_peers_per_room = 100;
    let server = Server::start_with(config).await;
    let n = 14;
    let mut members = Vec::new();
    for _ in 0..n {
        members.push(Member::join(&server, "big").await);
    }
    for (i, m) in members.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while m.stats().await.neighbors.is_empty() {
            if tokio::time::Instant::now() > deadline {
                panic!("member {i}: no neighbour in 30 s{}", all_stats(&members).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Joins' walks and evictions settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let senders = [0, 5, 13];
    for &s in &senders {
        for k in 0..10 {
            members[s].broadcast(format!("{s}:{k}").as_bytes()).await.unwrap();
        }
    }
    for (i, m) in members.iter().enumerate() {
        let want = senders.iter().filter(|&&s| s != i).count() * 10;
        until("every broadcast", Duration::from_secs(20), async || m.broadcasts().len() >= want).await;
        let mut got = m.broadcasts();
        assert_eq!(got.len(), want, "member {i}: each broadcast exactly once");
        got.sort();
        got.dedup();
        assert_eq!(got.len(), want, "member {i}: no duplicates");
        for (from, data) in &got {
            let s: usize = std::str::from_utf8(data).unwrap().split(':').next().unwrap().parse().unwrap();
            assert_eq!(*from, members[s].id, "sender stamped");
        }
        let st = m.stats().await;
        assert!(st.connections <= 8, "member {i}: {st:?}");
        assert!(st.neighbors.len() < n - 1, "member {i}: a large room is not a mesh: {st:?}");
        assert!(m.hops(&members[senders[0]].id).await.is_some() || i == senders[0]);
    }

    // To a member we are not connected to: the connection's offer and
    // answer go over the overlay, along the way the member's broadcasts
    // came, to the end or (a hop's route gone since) back to the writer
    // and through the server. The way may be gone altogether by now (a
    // link on it closed, and nothing came from the member since to show
    // another): then the signals go through the server from the start.
    // Each message arrives either way; of a few tries (pairs not connected
    // yet, to members that broadcast), one is signalled over the overlay.
    let mut over_the_overlay = 0;
    let mut tries = 0;
    'pairs: for b in [13, 5, 0] {
        let bid = members[b].id.clone();
        let mut from_here = 0;
        for a in 0..n {
            if a == b || members[a].connected_to(&bid).await {
                continue;
            }
            tries += 1;
            from_here += 1;
            let (before_a, before_b) = (members[a].stats().await, members[b].stats().await);
            let text = format!("over the overlay {a}->{b}").into_bytes();
            members[a].send(&bid, &text).await.unwrap();
            until("a message to a peer reached by relayed signals", Duration::from_secs(20), async || {
                members[b].got.lock().unwrap().iter().any(|(f, d, _)| *f == members[a].id && *d == text)
            })
            .await;
            let (sa, sb) = (members[a].stats().await, members[b].stats().await);
            let relayed = sa.signals_relayed > before_a.signals_relayed
                && (sb.relays_received > before_b.relays_received
                    || sa.relays_failed > before_a.relays_failed);
            eprintln!("member {a} to member {b}: signalled over the overlay: {relayed}");
            if relayed {
                over_the_overlay += 1;
                break 'pairs;
            }
            if from_here == 2 {
                break;
            }
        }
    }
    assert!(
        over_the_overlay > 0,
        "none of {tries} connections was signalled over the overlay{}",
        all_stats(&members).await
    );
    let mut total = OverlayStats::default();
    for m in &members {
        let s = m.stats().await;
        total.signals_relayed += s.signals_relayed;
        total.signals_via_server += s.signals_via_server;
        total.relays_forwarded += s.relays_forwarded;
        total.relays_received += s.relays_received;
    }
    assert!(total.relays_received > 0, "{total:?}");
    eprintln!(
        "signals relayed {}, through the server {}, passed on for others {}",
        total.signals_relayed, total.signals_via_server, total.relays_forwarded
    );

    // A member goes at once (its room dropped: connections close, and in a
    // large room nobody is told): its neighbours notice, take spares as
    // neighbours, and the room keeps carrying.
    let gone = members.remove(3);
    let gone_id = gone.id.clone();
    gone.task.abort();
    drop(gone);
    tokio::time::sleep(Duration::from_secs(1)).await;
    members[0].broadcast(b"0:after").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    for (i, m) in members.iter().enumerate().skip(1) {
        while !m.broadcasts().iter().any(|(_, d)| d == b"0:after") {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "member {i}: no broadcast after a leave in 40 s (gone: {gone_id}){}",
                    all_stats(&members).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!m.stats().await.neighbors.is_empty(), "member {i} kept a neighbour");
    }

    // To one member: a direct connection, whoever its neighbours are.
    let to = members[8].id.clone();
    members[1].send(&to, b"just you").await.unwrap();
    until("a direct message", Duration::from_secs(20), async || {
        members[8]
            .got
            .lock()
            .unwrap()
            .iter()
            .any(|(f, d, k)| *f == members[1].id && d == b"just you" && *k == MessageKind::Direct)
    })
    .await;
    // Nobody else got it.
    for (i, m) in members.iter().enumerate() {
        if i != 8 {
            assert!(!m.got.lock().unwrap().iter().any(|(_, d, _)| d == b"just you"), "member {i}");
        }
    }
    assert!(matches!(
        members[1].broadcast(&vec![0; peerlink_peer::MAX_ROOM_MESSAGE + 1]).await,
        Err(Error::TooLarge { .. })
    ));
}

/// Messages to one peer whose channel cannot take more (the peer's
/// application stopped taking its events, so its room stopped reading):
/// `send` refuses them (`NotQueued`, to try again) instead of accepting and
/// dropping them; every message accepted arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_peer_that_cannot_take_it_is_refused_not_dropped() {
    let server = Server::start().await;
    let config = || {
        let mut c = server.config("full");
        c.overlay = Some(OverlayConfig::default());
        c
    };
    let a = Room::join(config()).await.expect("join");
    let mut b = Room::join(config()).await.expect("join");
    let (aid, bid) = (a.id().clone(), b.id().clone());
    let numbered = |i: u32| {
        let mut v = vec![7u8; 60_000];
        v[..4].copy_from_slice(&i.to_be_bytes());
        v
    };
    // Connected: the first message is through.
    until("a's first message queued", Duration::from_secs(20), async || {
        a.send(&bid, numbered(0)).await.is_ok()
    })
    .await;
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(Event::Message { from, .. }) = b.next_event().await {
                break from;
            }
        }
    })
    .await
    .expect("the first message arrives");
    assert_eq!(first, aid);
    // b's application takes nothing now; a sends 24 MB.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 1..400 {
        match a.send(&bid, numbered(i)).await {
            Ok(()) => accepted.push(i),
            Err(Error::NotQueued(p)) => {
                assert_eq!(p, bid);
                refused += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "all {} accepted while the peer took nothing", accepted.len());
    // b reads again: everything accepted, in order.
    let mut got = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), b.next_event()).await {
        if let Event::Message { data, .. } = ev {
            got.push(u32::from_be_bytes(data[..4].try_into().unwrap()));
        }
    }
    assert_eq!(got, accepted, "{refused} refused");
}

#[tokio::test]
async fn broadcast_needs_an_overlay_room() {
    let server = Server::start().await;
    let room = Room::join(server.config("plain")).await.unwrap();
    assert!(matches!(room.broadcast(b"x".to_vec()).await, Err(Error::NoOverlay)));
    assert!(matches!(room.send(room.id(), b"x".to_vec()).await, Err(Error::NoOverlay)));
    assert_eq!(room.overlay_stats().await.unwrap(), None);
}
