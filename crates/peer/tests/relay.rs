//! TURN and STUN from the native peer, on 127.0.0.1 only: a real embedded
//! TURN server (`peerlink-turn`) and a real signaling server that hands out
//! REST credentials, as `peerlink serve` does.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::{Peer, Server};
use peerlink_peer::{
    ChannelSpec, ConnState, Failure, GatherFailure, GatherOutcome, IceConfig, PathKind, RoomConfig,
    WhyRelayed,
};
use peerlink_proto::IceServer;
use tokio::sync::oneshot;

const SECRET: &str = "relay-test-secret";

struct Turn {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    stats: peerlink_turn::Stats,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn turn() -> Turn {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut config = peerlink_turn::Config::new(peerlink_turn::Auth::rest(SECRET));
    config.relay_ports = 0..=0;
    // Loopback is the only network a test may use.
    config.peer_policy.allow_loopback = true;
    let server = peerlink_turn::Server::new(socket, config).unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Turn { addr, stop: Some(stop), stats }
}

/// A signaling server that gives every peer fresh TURN credentials.
async fn signaling(turn: SocketAddr) -> Server {
    let provider = peerlink_signal::IceProvider::new(move |req| {
        let c = peerlink_turn::rest_credentials(
            SECRET,
            req.peer.as_str(),
            Duration::from_secs(600),
            SystemTime::now(),
        );
        vec![IceServer {
            urls: vec![format!("stun:{turn}"), format!("turn:{turn}?transport=udp")],
            username: Some(c.username),
            credential: Some(c.password),
        }]
    });
    Server::start_with(peerlink_signal::Config { ice_provider: Some(provider), ..Default::default() }).await
}

fn relay_only(server: &Server, room: &str) -> RoomConfig {
    let mut c = server.config(room);
    c.ice = IceConfig { relay_only: true, ..IceConfig::loopback() };
    c.channels = vec![ChannelSpec::reliable("r")];
    c
}

/// Relay-only peers (they offer no host candidate) connect through the
/// TURN server with the credentials from `welcome`; data flows both ways
/// and the path is reported as relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_peers_connect_through_turn_with_credentials_from_welcome() {
    let turn = turn().await;
    let server = signaling(turn.addr).await;
    let mut a = Peer::join(relay_only(&server, "relay")).await;
    let mut b = Peer::join(relay_only(&server, "relay")).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("channel", |p| p.has_channel(&ib, "r")).await;
    b.until("channel", |p| p.has_channel(&ia, "r")).await;
    a.channel(&ib, "r").send("through the relay").await.unwrap();
    b.channel(&ia, "r").send("and back").await.unwrap();
    b.until("message", |p| !p.texts_from(&ia, "r").is_empty()).await;
    a.until("message", |p| !p.texts_from(&ib, "r").is_empty()).await;
    assert_eq!(b.texts_from(&ia, "r"), ["through the relay"]);

    let report = a.room.gathering().await.unwrap();
    assert!(report.complete, "{report}");
    assert!(
        report.relay.iter().any(|(_, server, o)| *server == turn.addr && matches!(o, GatherOutcome::Ok(_))),
        "{report}"
    );
    // str0m reports the selected pair every 500 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let path = loop {
        if let Some(p) = a.room.stats(&ib).await.unwrap().path {
            break p;
        }
        assert!(tokio::time::Instant::now() < deadline, "no selected pair reported");
        a.pump_for(Duration::from_millis(100)).await;
    };
    assert_eq!(path.kind, PathKind::Relay, "{path}");
    let why = a.room.stats(&ib).await.unwrap().why_relayed.expect("a relayed path is explained");
    assert_eq!(why, WhyRelayed::RelayOnly, "{why}");
    let relayed = turn.stats.snapshot();
    assert!(relayed.allocations_created >= 2, "{relayed:?}");
}

/// Refused TURN credentials: the report says so, and a relay-only
/// connection fails with a reason that points at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_turn_credentials_are_reported_and_explain_the_failure() {
    let turn = turn().await;
    let refused = IceServer {
        urls: vec![format!("turn:{}", turn.addr)],
        username: Some("4102444800:mallory".into()),
        credential: Some("not-the-password".into()),
    };
    let server =
        Server::start_with(peerlink_signal::Config { ice_servers: vec![refused], ..Default::default() })
            .await;
    let cfg = || {
        let mut c = relay_only(&server, "norelay");
        c.connect_timeout = Duration::from_secs(3);
        c
    };
    let mut a = Peer::join(cfg()).await;
    let mut b = Peer::join(cfg()).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("failed", |p| p.states.get(&ib) == Some(&ConnState::Failed)).await;
    b.until("failed", |p| p.states.get(&ia) == Some(&ConnState::Failed)).await;
    let report = a.room.gathering().await.unwrap();
    assert!(
        report.relay.iter().all(|(_, _, o)| *o == GatherOutcome::Failed(GatherFailure::TurnUnauthorized)),
        "{report}"
    );
    let failure = a.room.stats(&ib).await.unwrap().failure.expect("a reason");
    assert!(matches!(failure.reason, Failure::ChecksTimedOut | Failure::NoRemoteCandidates), "{failure}");
    assert_eq!(failure.local, report, "the failure carries what gathering found");
    let text = failure.to_string();
    assert!(text.contains("refused the credentials (401)"), "{text}");
}

/// A socket on 127.0.0.1 never contacts a STUN/TURN server elsewhere: a
/// test restricted to loopback stays on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_sockets_never_contact_servers_elsewhere() {
    let elsewhere = IceServer {
        // TEST-NET-1: not routable; it must not even be tried.
        urls: vec!["stun:192.0.2.1:3478".into(), "turn:192.0.2.1:3478".into()],
        username: Some("u".into()),
        credential: Some("p".into()),
    };
    let server =
        Server::start_with(peerlink_signal::Config { ice_servers: vec![elsewhere], ..Default::default() })
            .await;
    let mut a = Peer::join(server.config("scope")).await;
    let report = a.room.gathering().await.unwrap();
    assert!(report.srflx.is_empty() && report.relay.is_empty(), "{report}");
    assert!(report.complete);
    a.pump_for(Duration::from_millis(50)).await;
}
