//! Signaling between connected peers on their own channel: the room keeps
//! working while the signaling server is gone, and renegotiation (a new
//! channel, an ICE restart) goes on without it. Real server, real str0m
//! connections on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Peer, Server};
use peerlink_peer::{ChannelSpec, ConnState};

fn server_config() -> peerlink_signal::Config {
    // The same resume key before and after the restart, as a deployment
    // configures it: the peers get their places back.
    peerlink_signal::Config {
        resume_secret: Some(peerlink_signal::Secret("signal-channel-test-resume-key".into())),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_pair_renegotiates_while_the_server_restarts() {
    let server = Server::start_with(server_config()).await;
    let addr = server.addr;
    let mut a = Peer::join(server.config("outage")).await;
    let mut b = Peer::join(server.config("outage")).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("channel to b", |p| p.has_channel(&ib, "data")).await;
    b.until("channel to a", |p| p.has_channel(&ia, "data")).await;
    // The signaling channel is the library's own: the application never
    // sees it.
    for p in [&a, &b] {
        assert!(p.channels.keys().all(|(_, l)| !l.starts_with("peerlink-")), "{:?}", p.channels.keys());
    }
    let before = a.room.stats(&ib).await.unwrap();
    // Nor may it open one with that label.
    let refused = a.room.open_channel(&ib, ChannelSpec::reliable("peerlink-signal")).await;
    assert!(matches!(refused, Err(peerlink_peer::Error::ReservedLabel(_))), "{refused:?}");

    server.stop().await;

    // Channels keep flowing.
    a.channel(&ib, "data").send("while the server is down").await.unwrap();
    b.until("message during the outage", |p| {
        p.texts_from(&ia, "data").iter().any(|t| t == "while the server is down")
    })
    .await;

    // A new channel opens.
    a.room.open_channel(&ib, ChannelSpec::reliable("late")).await.unwrap();
    b.until("the new channel", |p| p.has_channel(&ia, "late")).await;
    a.until("the new channel", |p| p.has_channel(&ib, "late")).await;
    b.channel(&ia, "late").send("on the late channel").await.unwrap();
    a.until("a message on the new channel", |p| {
        p.texts_from(&ib, "late").iter().any(|t| t == "on the late channel")
    })
    .await;

    // An ICE restart: its offer and answer go on the signaling channel.
    a.room.restart_ice(&ib).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (sa, sb) = (a.room.stats(&ib).await.unwrap(), b.room.stats(&ia).await.unwrap());
        if sa.signals_received_on_channel > before.signals_received_on_channel
            && sb.signals_received_on_channel >= 1
        {
            assert_eq!(sa.ice_restarts, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no restart over the channel: {sa:?} / {sb:?}");
        a.pump_for(Duration::from_millis(20)).await;
        b.pump_for(Duration::from_millis(20)).await;
    }
    a.channel(&ib, "data").send("after the restart").await.unwrap();
    b.until("message after the restart", |p| {
        p.texts_from(&ia, "data").iter().any(|t| t == "after the restart")
    })
    .await;
    assert_eq!(a.states.get(&ib), Some(&ConnState::Connected));
    assert_eq!(b.states.get(&ia), Some(&ConnState::Connected));

    // The server comes back on its address: both take their places back,
    // and the connection they kept carries on.
    let server = Server::start_at(addr, server_config()).await;
    let c = Peer::join(server.config("outage")).await;
    let ic = c.id();
    a.until("a third member after the restart", |p| p.joined.contains(&ic)).await;
    b.until("a third member after the restart", |p| p.joined.contains(&ic)).await;
    b.channel(&ia, "data").send("after the server came back").await.unwrap();
    a.until("message after the server came back", |p| {
        p.texts_from(&ib, "data").iter().any(|t| t == "after the server came back")
    })
    .await;
    assert!(a.left.is_empty() && b.left.is_empty(), "nobody left: {:?} {:?}", a.left, b.left);
    assert!(a.closed.is_none() && b.closed.is_none());
}
