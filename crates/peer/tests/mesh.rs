//! Rooms and mesh over a real signaling server and real str0m connections on
//! 127.0.0.1.

mod common;

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
