//! TURN and STUN from the native peer, on 127.0.0.1 only: a real embedded
//! TURN server (`peerlink-turn`) and a real signaling server that hands out
//! REST credentials, as `peerlink serve` does.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::{Peer, Server};
use peerlink_peer::{
    ChannelSpec, ConnState, Failure, GatherFailure, GatherOutcome, IceConfig, PathKind, RoomConfig,
    TurnTransport, WhyRelayed,
};
use peerlink_proto::IceServer;
use tokio::sync::oneshot;

const SECRET: &str = "relay-test-secret";

struct Turn {
    addr: SocketAddr,
    /// TURN over TCP and over TLS.
    tcp: SocketAddr,
    tls: SocketAddr,
    /// The TLS certificate (self-signed, for 127.0.0.1), PEM.
    cert_pem: String,
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
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_pem = key.cert.pem();
    let tls =
        peerlink_turn::TlsConfig::from_pem(cert_pem.as_bytes(), key.signing_key.serialize_pem().as_bytes())
            .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tcp_addr, tls_addr) = (tcp.local_addr().unwrap(), tls_listener.local_addr().unwrap());
    let server =
        peerlink_turn::Server::new(socket, config).unwrap().with_tcp(tcp).with_tls(tls_listener, tls);
    let addr = server.local_addr();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Turn { addr, tcp: tcp_addr, tls: tls_addr, cert_pem, stop: Some(stop), stats }
}

/// A signaling server that hands out `urls` with fresh TURN credentials.
async fn signaling_with(urls: Vec<String>) -> Server {
    let provider = peerlink_signal::IceProvider::new(move |req| {
        let c = peerlink_turn::rest_credentials(
            SECRET,
            req.peer.as_str(),
            Duration::from_secs(600),
            SystemTime::now(),
        );
        vec![IceServer { urls: urls.clone(), username: Some(c.username), credential: Some(c.password) }]
    });
    Server::start_with(peerlink_signal::Config { ice_provider: Some(provider), ..Default::default() }).await
}

/// Waits (bounded) for the selected path to `peer`.
async fn path_to(p: &mut Peer, peer: &peerlink_peer::PeerId) -> peerlink_peer::Path {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(path) = p.room.stats(peer).await.unwrap().path {
            return path;
        }
        assert!(tokio::time::Instant::now() < deadline, "no selected pair reported");
        p.pump_for(Duration::from_millis(100)).await;
    }
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
        report.relay.iter().any(|r| r.server == turn.addr && matches!(r.outcome, GatherOutcome::Ok(_))),
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
    assert_eq!(path.relay_transport, Some(TurnTransport::Udp), "{path}");
    let why = a.room.stats(&ib).await.unwrap().why_relayed.expect("a relayed path is explained");
    assert_eq!(why, WhyRelayed::RelayOnly, "{why}");
    let relayed = turn.stats.snapshot();
    assert!(relayed.allocations_created >= 2, "{relayed:?}");

    // Once data flows, each side binds a channel to the other: the data
    // goes as ChannelData, which the server relays on its shortcut.
    for i in 0..20 {
        a.channel(&ib, "r").send(format!("more {i}")).await.unwrap();
    }
    b.until("all messages", |p| p.texts_from(&ia, "r").len() == 21).await;
    let relayed = turn.stats.snapshot();
    assert!(relayed.channel_shortcuts > 0, "{relayed:?}");
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
        report.relay.iter().all(|r| r.outcome == GatherOutcome::Failed(GatherFailure::TurnUnauthorized)),
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

/// Two relay-only peers on a network where only TCP (or TLS) reaches the
/// TURN server: `welcome` offers nothing else. They connect through TURN
/// over the stream, data flows both ways, and the path says how.
async fn relayed_over(transport: TurnTransport) {
    let turn = turn().await;
    let url = match transport {
        TurnTransport::Tcp => format!("turn:{}?transport=tcp", turn.tcp),
        TurnTransport::Tls => format!("turns:{}", turn.tls),
        TurnTransport::Udp => unreachable!(),
    };
    let server = signaling_with(vec![url]).await;
    let cfg = || {
        let mut c = relay_only(&server, "streams");
        c.ice.turn_ca = Some(turn.cert_pem.clone().into_bytes());
        c
    };
    let mut a = Peer::join(cfg()).await;
    let mut b = Peer::join(cfg()).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("channel", |p| p.has_channel(&ib, "r")).await;
    b.until("channel", |p| p.has_channel(&ia, "r")).await;
    a.channel(&ib, "r").send("over a stream").await.unwrap();
    b.channel(&ia, "r").send("and back").await.unwrap();
    b.until("message", |p| !p.texts_from(&ia, "r").is_empty()).await;
    a.until("message", |p| !p.texts_from(&ib, "r").is_empty()).await;
    assert_eq!(b.texts_from(&ia, "r"), ["over a stream"]);
    assert_eq!(a.texts_from(&ib, "r"), ["and back"]);
    let path = path_to(&mut a, &ib).await;
    assert_eq!((path.kind, path.relay_transport), (PathKind::Relay, Some(transport)), "{path}");
    assert!(path.to_string().starts_with(&format!("relay over {transport}:")), "{path}");
    let s = turn.stats.snapshot();
    assert_eq!(s.stream_connections, 2, "{s:?}");
    // Leaving gives the allocations back and closes the connections.
    a.room.leave().await.expect("a leaves");
    b.room.leave().await.expect("b leaves");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while turn.stats.snapshot().stream_connections > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", turn.stats.snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_relay_through_turn_over_tcp() {
    relayed_over(TurnTransport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_relay_through_turn_over_tls() {
    relayed_over(TurnTransport::Tls).await;
}

/// TCP is the fallback: with UDP and TCP offered and UDP working, the
/// stream is never opened; with UDP unanswered it is, after 1.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tcp_is_tried_only_when_udp_gets_no_allocation() {
    let turn = turn().await;
    let tcp_url = format!("turn:{}?transport=tcp", turn.tcp);
    let server = signaling_with(vec![format!("turn:{}", turn.addr), tcp_url.clone()]).await;
    let mut a = Peer::join(relay_only(&server, "udp-first")).await;
    let report = loop {
        let r = a.room.gathering().await.unwrap();
        if r.complete {
            break r;
        }
        a.pump_for(Duration::from_millis(50)).await;
    };
    let by = |t| report.relay.iter().find(|r| r.transport == t).unwrap().outcome.clone();
    assert!(matches!(by(TurnTransport::Udp), GatherOutcome::Ok(_)), "{report}");
    assert_eq!(by(TurnTransport::Tcp), GatherOutcome::Failed(GatherFailure::NotNeeded), "{report}");
    assert_eq!(turn.stats.snapshot().stream_connections_total, 0);
    drop(a);

    // A UDP port where nobody answers: the stream takes over.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = signaling_with(vec![format!("turn:{}", silent.local_addr().unwrap()), tcp_url]).await;
    let started = std::time::Instant::now();
    let mut b = Peer::join(relay_only(&server, "tcp-fallback")).await;
    let relayed = loop {
        let r = b.room.gathering().await.unwrap();
        if let Some(ok) = r.relay.iter().find(|r| matches!(r.outcome, GatherOutcome::Ok(_))) {
            break ok.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(8), "no relayed candidate: {r}");
        b.pump_for(Duration::from_millis(50)).await;
    };
    assert_eq!(relayed.transport, TurnTransport::Tcp);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "TCP tried after {waited:?}, before UDP had its chance");
}

/// TLS comes last: with UDP silent and TCP working, TLS is never opened;
/// with TCP refused too, TLS carries the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tls_is_tried_only_when_tcp_fails_too() {
    let turn = turn().await;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let urls = |tcp: SocketAddr| {
        vec![
            format!("turn:{}", silent.local_addr().unwrap()),
            format!("turn:{tcp}?transport=tcp"),
            format!("turns:{}", turn.tls),
        ]
    };
    for (tcp, want, tls_outcome_is_ok) in
        [(turn.tcp, TurnTransport::Tcp, false), (closed, TurnTransport::Tls, true)]
    {
        let server = signaling_with(urls(tcp)).await;
        let mut c = relay_only(&server, "tls-last");
        c.ice.turn_ca = Some(turn.cert_pem.clone().into_bytes());
        let mut p = Peer::join(c).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(12);
        let report = loop {
            let r = p.room.gathering().await.unwrap();
            if r.complete {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "gathering never completed: {r}");
            p.pump_for(Duration::from_millis(50)).await;
        };
        let by = |t| report.relay.iter().find(|r| r.transport == t).unwrap().outcome.clone();
        assert!(matches!(by(want), GatherOutcome::Ok(_)), "{report}");
        if tls_outcome_is_ok {
            assert!(
                matches!(by(TurnTransport::Tcp), GatherOutcome::Failed(GatherFailure::StreamConnect(_))),
                "{report}"
            );
        } else {
            assert_eq!(by(TurnTransport::Tls), GatherOutcome::Failed(GatherFailure::NotNeeded), "{report}");
        }
    }
}
