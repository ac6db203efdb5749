//! TURN over TCP and TLS (RFC 8656 §3.1) on the real server, 127.0.0.1
//! only: turn-client-proto's `TurnClientTcp` over a real TCP (and rustls)
//! connection, UDP peers on the relay side. Every wait is bounded.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use peerlink_proto::turn_stream::{StreamFramer, stream_padding};
use peerlink_turn::{Auth, Config, Server, Stats, StatsSnapshot, TlsConfig, rest_credentials};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::time::timeout;
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::stun::Instant as SioInstant;
use turn_client_proto::stun::auth::Feature;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};

const SECRET: &str = "test-secret";
const PROMPT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct TestServer {
    tcp: SocketAddr,
    tls: SocketAddr,
    stats: Stats,
    _stop: oneshot::Sender<()>,
    /// The certificate clients trust for `tls`.
    cert: rustls::pki_types::CertificateDer<'static>,
}

impl TestServer {
    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn wait_stats(&self, what: &str, cond: impl Fn(&StatsSnapshot) -> bool) {
        let deadline = Instant::now() + PROMPT;
        loop {
            let s = self.stats();
            if cond(&s) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn start(config: Config) -> TestServer {
    let key = rcgen::generate_simple_self_signed(vec!["turn.test".to_string()]).unwrap();
    let tls =
        TlsConfig::from_pem(key.cert.pem().as_bytes(), key.signing_key.serialize_pem().as_bytes()).unwrap();
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let tcp = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let tls_listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let (tcp_addr, tls_addr) = (tcp.local_addr().unwrap(), tls_listener.local_addr().unwrap());
    let server = Server::new(socket, config).unwrap().with_tcp(tcp).with_tls(tls_listener, tls);
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer { tcp: tcp_addr, tls: tls_addr, stats, _stop: stop, cert: key.cert.der().clone() }
}

fn test_config() -> Config {
    let mut config = Config::new(Auth::rest(SECRET));
    config.relay_ports = 0..=0;
    config.peer_policy.allow_loopback = true;
    config
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn tcp(srv: &TestServer) -> Box<dyn Io> {
    Box::new(TcpStream::connect(srv.tcp).await.unwrap())
}

async fn tls(srv: &TestServer, name: &str) -> std::io::Result<Box<dyn Io>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(srv.cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = TcpStream::connect(srv.tls).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = timeout(PROMPT, tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    Ok(Box::new(tls))
}

/// turn-client-proto's TCP client over a real stream; ChannelData goes out
/// padded, as RFC 8656 asks (the client crate leaves padding out).
struct StreamClient {
    io: Box<dyn Io>,
    local: SocketAddr,
    server: SocketAddr,
    turn: TurnClientTcp,
    framer: StreamFramer,
    base: Instant,
    events: VecDeque<TurnEvent>,
    data: VecDeque<(SocketAddr, Vec<u8>)>,
    eof: bool,
}

impl StreamClient {
    fn new(io: Box<dyn Io>, server: SocketAddr, user: &str) -> StreamClient {
        let c = rest_credentials(SECRET, user, Duration::from_secs(600), SystemTime::now());
        let mut config = TurnConfig::new(TurnCredentials::new(&c.username, &c.password));
        config.set_anonymous_username(Feature::Disabled);
        // The harness does not know the stream's local address; the client
        // uses it for nothing on the wire.
        let local = SocketAddr::from(([127, 0, 0, 1], 1));
        StreamClient {
            io,
            local,
            server,
            turn: TurnClientTcp::allocate(local, server, config),
            framer: StreamFramer::new(),
            base: Instant::now(),
            events: VecDeque::new(),
            data: VecDeque::new(),
            eof: false,
        }
    }

    fn now(&self) -> SioInstant {
        SioInstant::from_nanos(self.base.elapsed().as_nanos() as i64)
    }

    async fn write_frame(&mut self, frame: &[u8]) {
        let mut out = frame.to_vec();
        out.resize(frame.len() + stream_padding(frame), 0);
        let _ = self.io.write_all(&out).await;
    }

    async fn flush(&mut self) {
        let now = self.now();
        let _ = self.turn.poll(now);
        while let Some(t) = self.turn.poll_transmit(now) {
            let data = t.data.to_vec();
            self.write_frame(&data).await;
        }
        while let Some(event) = self.turn.poll_event() {
            self.events.push_back(event);
        }
    }

    async fn step(&mut self, limit: Duration) {
        self.flush().await;
        let mut buf = [0u8; 4096];
        if let Ok(r) = timeout(limit.min(Duration::from_millis(50)), self.io.read(&mut buf)).await {
            match r {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.framer.push(&buf[..n]),
            }
        }
        while let Some(frame) = self.framer.next_frame().expect("the server speaks STUN") {
            let now = self.now();
            let t = Transmit::new(&frame[..], TransportType::Tcp, self.server, self.local);
            if let TurnRecvRet::PeerData(pd) = self.turn.recv(t, now) {
                self.data.push_back((pd.peer, pd.data().to_vec()));
            }
        }
        self.flush().await;
    }

    async fn event(&mut self, want: impl Fn(&TurnEvent) -> bool) -> Option<TurnEvent> {
        let deadline = Instant::now() + PROMPT;
        loop {
            if let Some(i) = self.events.iter().position(&want) {
                return self.events.remove(i);
            }
            if Instant::now() >= deadline || self.eof {
                return None;
            }
            self.step(deadline - Instant::now()).await;
        }
    }

    async fn allocated(&mut self) -> SocketAddr {
        match self
            .event(|e| matches!(e, TurnEvent::AllocationCreated(..) | TurnEvent::AllocationCreateFailed(..)))
            .await
        {
            Some(TurnEvent::AllocationCreated(TransportType::Udp, relayed)) => relayed,
            other => panic!("allocation over a stream: {other:?}"),
        }
    }

    async fn permit(&mut self, ip: IpAddr) {
        let now = self.now();
        self.turn.create_permission(TransportType::Udp, ip, now).unwrap();
        let ev = self
            .event(|e| matches!(e, TurnEvent::PermissionCreated(..) | TurnEvent::PermissionCreateFailed(..)))
            .await;
        assert!(matches!(ev, Some(TurnEvent::PermissionCreated(_, p)) if p == ip), "permission: {ev:?}");
    }

    async fn bind_channel(&mut self, peer: SocketAddr) {
        let now = self.now();
        self.turn.bind_channel(TransportType::Udp, peer, now).unwrap();
        let ev = self
            .event(|e| matches!(e, TurnEvent::ChannelCreated(..) | TurnEvent::ChannelCreateFailed(..)))
            .await;
        assert!(matches!(ev, Some(TurnEvent::ChannelCreated(_, p)) if p == peer), "channel: {ev:?}");
    }

    async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let now = self.now();
        let out =
            self.turn.send_to(TransportType::Udp, peer, data, now).expect("permission").expect("a message");
        let out = out.build();
        self.write_frame(&out.data).await;
    }

    async fn recv_data(&mut self, within: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(d) = self.data.pop_front() {
                return Some(d);
            }
            if Instant::now() >= deadline || self.eof {
                return None;
            }
            self.step(deadline - Instant::now()).await;
        }
    }
}

async fn recv(sock: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 4096];
    match timeout(within, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// Allocates over `io`, then relays both ways with indications and over a
/// channel, with payload lengths that need padding.
async fn relays_both_ways(srv: &TestServer, io: Box<dyn Io>, server: SocketAddr) -> StreamClient {
    let mut client = StreamClient::new(io, server, "ada");
    let relayed = client.allocated().await;
    assert_eq!(relayed.ip(), LOCALHOST);
    let peer = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    client.permit(LOCALHOST).await;
    client.send(peer_addr, b"ping").await;
    assert_eq!(recv(&peer, PROMPT).await, Some((b"ping".to_vec(), relayed)));
    peer.send_to(b"pong!", relayed).await.unwrap();
    assert_eq!(client.recv_data(PROMPT).await, Some((peer_addr, b"pong!".to_vec())));

    client.bind_channel(peer_addr).await;
    for len in [1usize, 2, 3, 4, 1199] {
        let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
        client.send(peer_addr, &msg).await;
        assert_eq!(recv(&peer, PROMPT).await, Some((msg.clone(), relayed)), "{len} bytes to the peer");
        peer.send_to(&msg, relayed).await.unwrap();
        assert_eq!(client.recv_data(PROMPT).await, Some((peer_addr, msg)), "{len} bytes from the peer");
    }
    srv.wait_stats("one stream client", |s| s.stream_connections == 1 && s.allocations == 1).await;
    client
}

#[tokio::test]
async fn tcp_clients_allocate_and_relay_over_udp() {
    let srv = start(test_config()).await;
    let io = tcp(&srv).await;
    let client = relays_both_ways(&srv, io, srv.tcp).await;
    assert_eq!(srv.stats().stream_connections_total, 1);
    drop(client);
    srv.wait_stats("connection gone", |s| s.stream_connections == 0).await;
}

#[tokio::test]
async fn tls_clients_allocate_and_relay_over_udp() {
    let srv = start(test_config()).await;
    let io = tls(&srv, "turn.test").await.expect("TLS handshake with the configured certificate");
    let _client = relays_both_ways(&srv, io, srv.tls).await;
    // A client that checks the name and finds another refuses the server.
    assert!(tls(&srv, "other.test").await.is_err());
    srv.wait_stats("failed handshake counted", |s| s.tls_handshakes_failed == 1).await;
}

#[tokio::test]
async fn an_allocation_stops_relaying_when_its_connection_ends() {
    let srv = start(test_config()).await;
    let mut client = StreamClient::new(tcp(&srv).await, srv.tcp, "ada");
    let relayed = client.allocated().await;
    client.permit(LOCALHOST).await;
    let peer = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    client.send(peer.local_addr().unwrap(), b"hello").await;
    assert!(recv(&peer, PROMPT).await.is_some());
    drop(client);
    srv.wait_stats("allocation revoked", |s| s.allocations_revoked == 1 && s.stream_connections == 0).await;
    let before = srv.stats().bytes_to_clients;
    peer.send_to(b"anyone?", relayed).await.unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(srv.stats().bytes_to_clients, before, "nothing relayed to a closed connection");
}

#[tokio::test]
async fn connections_beyond_the_per_address_limit_are_closed() {
    let mut config = test_config();
    config.limits.max_stream_connections_per_ip = 2;
    let srv = start(config).await;
    let mut a = StreamClient::new(tcp(&srv).await, srv.tcp, "a");
    let mut b = StreamClient::new(tcp(&srv).await, srv.tcp, "b");
    a.allocated().await;
    b.allocated().await;
    let mut c = TcpStream::connect(srv.tcp).await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(PROMPT, c.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)), "third connection closed: {n:?}");
    assert_eq!(srv.stats().stream_refused, 1);
    // A place frees when a connection ends.
    drop(a);
    srv.wait_stats("place freed", |s| s.stream_connections == 1).await;
    let mut d = StreamClient::new(tcp(&srv).await, srv.tcp, "d");
    d.allocated().await;
}

#[tokio::test]
async fn a_stream_that_is_not_stun_is_closed() {
    let srv = start(test_config()).await;
    let mut s = TcpStream::connect(srv.tcp).await.unwrap();
    s.write_all(b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(PROMPT, s.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");
    let s = srv.stats();
    assert_eq!((s.stream_connections_total, s.stream_framing_errors), (0, 1), "never became a client");
    srv.wait_stats("slot released", |s| s.stream_connections == 0).await;
}
