//! Rooms and mesh over a real signaling server and real str0m connections on
//! 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Peer, Server, specs};
use peerlink_peer::{ConnState, Error, PeerId};

fn connected_to_all(p: &Peer, others: &[PeerId]) -> bool {
    others.iter().all(|o| {
        p.states.get(o) == Some(&ConnState::Connected)
            && p.has_channel(o, "reliable")
            && p.has_channel(o, "unreliable")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_mesh_then_a_fourth_joins_and_one_leaves() {
    let server = Server::start().await;
    let cfg = || {
        let mut c = server.config("mesh");
        c.channels = specs();
        c
    };
    let mut a = Peer::join(cfg()).await;
    let mut b = Peer::join(cfg()).await;
    let mut c = Peer::join(cfg()).await;
    let ids = [a.id(), b.id(), c.id()];
    let others = |me: &PeerId| ids.iter().filter(|i| *i != me).cloned().collect::<Vec<_>>();

    for p in [&mut a, &mut b, &mut c] {
        let o = others(&p.id());
        p.until("mesh of three", |p| connected_to_all(p, &o)).await;
    }

    // Every peer sends on both channels to both others.
    for p in [&a, &b, &c] {
        for o in others(&p.id()) {
            p.channel(&o, "reliable").send(format!("r from {}", p.id())).await.unwrap();
            p.channel(&o, "unreliable").send(format!("u from {}", p.id())).await.unwrap();
        }
    }
    for p in [&mut a, &mut b, &mut c] {
        let o = others(&p.id());
        p.until("messages from both others", |p| {
            o.iter().all(|x| {
                p.texts_from(x, "reliable") == vec![format!("r from {x}")]
                    && p.texts_from(x, "unreliable") == vec![format!("u from {x}")]
            })
        })
        .await;
    }

    // A fourth peer connects to all three.
    let mut d = Peer::join(cfg()).await;
    let d_id = d.id();
    d.until("d connected to all", |p| connected_to_all(p, &ids)).await;
    for p in [&mut a, &mut b, &mut c] {
        let d_id = d_id.clone();
        p.until("connected to d", |p| connected_to_all(p, std::slice::from_ref(&d_id))).await;
    }
    d.channel(&ids[0], "reliable").send("hello a").await.unwrap();
    a.until("message from d", |p| p.texts_from(&d_id, "reliable") == vec!["hello a".to_string()]).await;

    // D leaves: everyone sees peer-left, its channels close, its state is freed.
    let d_chan = a.channel(&d_id, "reliable");
    d.room.leave().await.unwrap();
    for p in [&mut a, &mut b, &mut c] {
        let d_id = d_id.clone();
        p.until("d left", |p| p.left.contains(&d_id) && !p.has_channel(&d_id, "reliable")).await;
        assert!(matches!(p.room.stats(&d_id).await, Err(Error::UnknownPeer(_))), "d's connection freed");
        assert_eq!(p.room.peers().await.unwrap().len(), 2);
    }
    assert!(d_chan.is_closed());
    assert!(d_chan.send("too late").await.is_err());

    // The remaining mesh still works.
    a.channel(&ids[1], "reliable").send("still here").await.unwrap();
    let a_id = a.id();
    b.until("message after d left", |p| p.texts_from(&a_id, "reliable").contains(&"still here".to_string()))
        .await;

    // Stats report traffic and the selected path.
    // (str0m reports RTT and the selected pair every 500 ms.)
    b.pump_for(std::time::Duration::from_millis(1200)).await;
    let st = b.room.stats(&a_id).await.unwrap();
    assert!(st.messages_received >= 2 && st.bytes_received > 0, "{st:?}");
    assert!(st.messages_sent >= 2, "{st:?}");
    assert_eq!(st.state, Some(ConnState::Connected));
    assert!(st.rtt.is_some(), "{st:?}");
    let pair = st.path.as_ref().map(|p| p.to_string()).unwrap_or_default();
    assert!(pair.contains("127.0.0.1") && pair.contains(&b.room.local_addrs()[0].to_string()), "{st:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_just_before_leaving_arrive_before_the_leave() {
    let server = Server::start().await;
    let mut a = Peer::join(server.config("last-words")).await;
    let (a_id, config) = (a.id(), server.config("last-words"));
    // B lives in a runtime of its own that is dropped as soon as leave()
    // returns, the way a process exits after a pairing abort: leave() must
    // not return before the server has been handed everything.
    let b_id = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let id = rt.block_on(async {
            let room = peerlink_peer::Room::join(config).await.expect("join");
            for i in 0..50 {
                room.send_via_server(Some(&a_id), serde_json::json!({ "n": i })).await.unwrap();
            }
            let id = room.id().clone();
            room.leave().await.unwrap();
            id
        });
        drop(rt);
        id
    })
    .await
    .unwrap();
    a.until("b left", |p| p.left.contains(&b_id)).await;
    let got: Vec<_> =
        a.server_messages.iter().filter(|(f, _)| *f == b_id).map(|(_, d)| d["n"].clone()).collect();
    assert_eq!(got, (0..50).map(|i| serde_json::json!(i)).collect::<Vec<_>>());
}

/// A server without a message rate limit: only queues and links can be
/// the bottleneck.
async fn unlimited_server() -> Server {
    let mut config = peerlink_signal::Config::default();
    config.limits.messages_per_second = 1_000_000;
    config.limits.message_burst = 1_000_000;
    Server::start_with(config).await
}

/// An application that does not take its events: what waits for it stays
/// bounded. Its room stops reading the server once its events hold 4 MiB,
/// the server's queue for it fills, and the server refuses the rest to
/// their sender (`peer_busy`) instead of the room buffering without end;
/// once the application reads again it gets what it was sent, in order,
/// minus what was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_application_does_not_take_stay_bounded() {
    use peerlink_peer::{Event, Room};
    use peerlink_proto::ErrorCode;
    const SENT: usize = 600;
    let server = unlimited_server().await;
    let mut cfg = server.config("backlog");
    cfg.channels = vec![];
    let mut reader = Room::join(cfg.clone()).await.unwrap();
    let mut writer = Peer::join(cfg).await;
    let to = reader.id().clone();
    // 60 KB each: 36 MB in all, far more than the reader's 4 MiB of events,
    // the server's 1 MiB queue for it and the sockets in between.
    let pad = "x".repeat(60_000);
    let mut not_queued = 0;
    for i in 0..SENT {
        match writer.room.send_via_server(Some(&to), serde_json::json!({ "i": i, "pad": pad })).await {
            Ok(()) => {}
            Err(peerlink_peer::Error::SignalingBusy) => not_queued += 1,
            Err(e) => panic!("{e}"),
        }
        if i % 16 == 15 {
            // Paced a little: the writer's own outgoing queue (512 messages)
            // is not what this is about.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    writer.until("peer_busy", |p| p.server_errors.contains(&ErrorCode::PeerBusy)).await;

    // Reading again: the messages, in order, until nothing more comes.
    let mut got = Vec::new();
    let (_, ()) = tokio::join!(writer.pump_for(Duration::from_secs(3)), async {
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), reader.next_event()).await {
            if let Event::ServerMessage { data, .. } = ev {
                got.push(data["i"].as_u64().unwrap() as usize);
            }
        }
    });
    let busy = writer.server_errors.iter().filter(|c| **c == ErrorCode::PeerBusy).count();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(
        got.len() + busy + not_queued,
        SENT,
        "each message either arrived or was refused to its sender ({} arrived, {busy} refused by the server, {not_queued} by the room)",
        got.len()
    );
    server.stop().await;
}

/// An application sending through the server faster than the server reads:
/// past what the signaling link keeps for the room's own signals, `send_via_server`
/// refuses with `SignalingBusy` (try again) instead of filling the link's
/// queue, which ends the room ("signaling server is not reading").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_through_the_server_faster_than_it_reads_is_refused_not_fatal() {
    use peerlink_peer::Room;
    let server = unlimited_server().await;
    let mut cfg = server.config("burst");
    cfg.channels = vec![];
    let reader = Room::join(cfg.clone()).await.unwrap();
    let mut writer = Peer::join(cfg).await;
    let to = reader.id().clone();
    let pad = "x".repeat(60_000);
    let (mut sent, mut busy) = (0, 0);
    for i in 0..1500 {
        match writer.room.send_via_server(Some(&to), serde_json::json!({ "i": i, "pad": pad })).await {
            Ok(()) => sent += 1,
            Err(Error::SignalingBusy) => busy += 1,
            Err(e) => panic!("after {sent} sent and {busy} refused: {e}"),
        }
    }
    // The room is still up: a short message goes once the link drains.
    writer.pump_for(Duration::from_millis(500)).await;
    assert_eq!(writer.closed, None, "{sent} sent, {busy} refused");
    let mut ok = false;
    for _ in 0..100 {
        if writer.room.send_via_server(Some(&to), serde_json::json!({ "last": true })).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the link took a message again");
    drop(reader);
    server.stop().await;
}
