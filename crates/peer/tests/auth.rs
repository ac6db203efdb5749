//! Rooms without automatic mesh, where the application picks whom to
//! connect to, and connections whose signaling is authenticated with keys
//! from pairing: real server, real str0m connections on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Peer, Server};
use peerlink_peer::{ChannelSpec, ConnState, ConnectOptions, SignalKeys};

fn manual(server: &Server, room: &str) -> peerlink_peer::RoomConfig {
    let mut c = server.config(room);
    c.auto_connect = false;
    c.channels = vec![];
    c
}

fn keys(a: u8, b: u8) -> (SignalKeys, SignalKeys) {
    (SignalKeys { local: [a; 32], remote: [b; 32] }, SignalKeys { local: [b; 32], remote: [a; 32] })
}

/// Without auto_connect nobody connects until asked; an offer that arrives
/// before the other side calls `connect` is held, then used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rooms_connect_only_when_asked_with_authenticated_sdp() {
    let server = Server::start().await;
    let mut a = Peer::join(manual(&server, "manual")).await;
    let mut b = Peer::join(manual(&server, "manual")).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("b present", |p| p.joined.contains(&ib)).await;
    b.until("a present", |p| p.joined.contains(&ia)).await;
    a.pump_for(Duration::from_millis(300)).await;
    assert!(a.states.is_empty() && a.channels.is_empty(), "no automatic connection");

    let (ka, kb) = keys(1, 2);
    // B asks for the channel first: its offer reaches A before A connects.
    b.room
        .connect(&ia, ConnectOptions { channels: vec![ChannelSpec::reliable("files")], keys: Some(kb) })
        .await
        .unwrap();
    a.pump_for(Duration::from_millis(200)).await;
    assert!(a.channels.is_empty());
    a.room.connect(&ib, ConnectOptions { channels: vec![], keys: Some(ka) }).await.unwrap();
    a.until("channel from b", |p| p.has_channel(&ib, "files")).await;
    b.until("channel to a", |p| p.has_channel(&ia, "files")).await;
    b.channel(&ia, "files").send("signed and sealed").await.unwrap();
    a.until("message", |p| !p.texts_from(&ib, "files").is_empty()).await;
    assert_eq!(a.texts_from(&ib, "files"), ["signed and sealed"]);
    assert!(a.auth_failures.is_empty() && b.auth_failures.is_empty());

    // Connecting to someone who is not in the room is refused.
    let stranger = peerlink_peer::PeerId::from_server("p-nobody");
    assert!(a.room.connect(&stranger, ConnectOptions::default()).await.is_err());
}

/// Keys that do not match (a different pairing, or a forger) are caught
/// before any SDP is applied: no connection, and the application is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_keys_refuse_the_connection() {
    let server = Server::start().await;
    let mut a = Peer::join(manual(&server, "forged")).await;
    let mut b = Peer::join(manual(&server, "forged")).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("b present", |p| p.joined.contains(&ib)).await;
    b.until("a present", |p| p.joined.contains(&ia)).await;
    let (ka, _) = keys(1, 2);
    let (_, kb_other) = keys(3, 4);
    a.room.connect(&ib, ConnectOptions { channels: vec![], keys: Some(ka) }).await.unwrap();
    b.room
        .connect(&ia, ConnectOptions { channels: vec![ChannelSpec::reliable("x")], keys: Some(kb_other) })
        .await
        .unwrap();
    a.until("auth failure", |p| !p.auth_failures.is_empty() && p.states.get(&ib) == Some(&ConnState::Failed))
        .await;
    let (peer, reason) = &a.auth_failures[0];
    assert_eq!(peer, &ib);
    assert!(reason.contains("modified in transit"), "{reason}");
    b.pump_for(Duration::from_millis(500)).await;
    assert!(b.channels.is_empty() && a.channels.is_empty(), "no channel over a refused connection");
}

/// A keyed side refuses SDP that carries no authentication at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_sdp_is_refused_by_a_keyed_peer() {
    let server = Server::start().await;
    let mut a = Peer::join(manual(&server, "unsigned")).await;
    let mut b = Peer::join(manual(&server, "unsigned")).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("b present", |p| p.joined.contains(&ib)).await;
    let (ka, _) = keys(1, 2);
    a.room.connect(&ib, ConnectOptions { channels: vec![], keys: Some(ka) }).await.unwrap();
    b.until("a present", |p| p.joined.contains(&ia)).await;
    b.room
        .connect(&ia, ConnectOptions { channels: vec![ChannelSpec::reliable("x")], keys: None })
        .await
        .unwrap();
    a.until("auth failure", |p| !p.auth_failures.is_empty()).await;
    assert!(a.auth_failures[0].1.contains("no authentication"), "{}", a.auth_failures[0].1);
}
