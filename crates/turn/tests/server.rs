//! The real server on 127.0.0.1 against turn-client-proto's `TurnClientUdp`,
//! hand-built STUN requests and plain UDP peers. Loopback only; every wait is
//! bounded.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerlink_turn::{Auth, Config, Error, Server, Stats, StatsSnapshot, rest_credentials};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::stun::Instant as SioInstant;
use turn_client_proto::stun::auth::Feature;
use turn_client_proto::stun::types::attribute::{ErrorCode, Nonce, Realm, Username, XorMappedAddress};
use turn_client_proto::stun::types::message::{
    BINDING, IntegrityAlgorithm, LongTermCredentials, Message, MessageClass, MessageWriteVec,
};
use turn_client_proto::stun::types::prelude::*;
use turn_client_proto::types::attribute::{RequestedTransport, XorRelayedAddress};
use turn_client_proto::types::message::{ALLOCATE, REFRESH};
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

const SECRET: &str = "test-secret";
/// Upper bound for anything that should happen promptly on loopback.
const PROMPT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------- server harness ----------

struct TestServer {
    addr: SocketAddr,
    stats: Stats,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), Error>>,
}

impl TestServer {
    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits (bounded) until the counters satisfy `cond`.
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

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        timeout(PROMPT, self.handle).await.expect("serve returns after shutdown").unwrap().unwrap();
    }
}

/// REST auth, ephemeral relay ports, loopback peers allowed (the data tests
/// need a peer somewhere, and loopback is the only network they may use).
fn test_config() -> Config {
    let mut config = Config::new(Auth::rest(SECRET));
    config.relay_ports = 0..=0;
    config.peer_policy.allow_loopback = true;
    config
}

async fn start(config: Config) -> TestServer {
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let server = Server::new(socket, config).unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer { addr, stats, stop: Some(stop), handle }
}

fn creds(user: &str) -> (String, String) {
    let c = rest_credentials(SECRET, user, Duration::from_secs(600), SystemTime::now());
    (c.username, c.password)
}

async fn udp() -> UdpSocket {
    UdpSocket::bind((LOCALHOST, 0)).await.unwrap()
}

/// Receives one datagram within `within`, or `None`.
async fn recv(sock: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 4096];
    match timeout(within, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

// ---------- TURN client harness (turn-client-proto over a real socket) ----------

struct Client {
    sock: UdpSocket,
    local: SocketAddr,
    turn: TurnClientUdp,
    base: Instant,
    events: VecDeque<TurnEvent>,
    data: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The client gave up (turn-client-proto reports some failures only so).
    closed: bool,
}

impl Client {
    async fn new(server: SocketAddr, user: &str, password: &str) -> Client {
        let sock = udp().await;
        let local = sock.local_addr().unwrap();
        let mut config = TurnConfig::new(TurnCredentials::new(user, password));
        // USERHASH would hide the REST username from the server.
        config.set_anonymous_username(Feature::Disabled);
        config.set_request_retransmits(
            Duration::from_millis(100),
            Duration::from_millis(400),
            4,
            Duration::from_millis(400),
        );
        Client {
            sock,
            local,
            turn: TurnClientUdp::allocate(local, server, config),
            base: Instant::now(),
            events: VecDeque::new(),
            data: VecDeque::new(),
            closed: false,
        }
    }

    fn now(&self) -> SioInstant {
        SioInstant::from_nanos(self.base.elapsed().as_nanos() as i64)
    }

    /// Sends what the client has queued and collects its events; returns
    /// when it next wants to be polled.
    async fn flush(&mut self) -> Option<SioInstant> {
        let now = self.now();
        let wait = match self.turn.poll(now) {
            TurnPollRet::WaitUntil(at) => Some(at),
            TurnPollRet::Closed => {
                self.closed = true;
                None
            }
            _ => None,
        };
        while let Some(t) = self.turn.poll_transmit(now) {
            self.sock.send_to(&t.data, t.to).await.unwrap();
        }
        while let Some(event) = self.turn.poll_event() {
            self.events.push_back(event);
        }
        wait
    }

    /// One step: send what is due, then wait for a datagram or the client's
    /// next timer, at most `limit` (and 50 ms: turn-client-proto sometimes
    /// changes state without asking to be polled again soon).
    async fn step(&mut self, limit: Duration) {
        let wait = self.flush().await;
        let nap = wait
            .map(|at| Duration::from_nanos((at.as_nanos() - self.now().as_nanos()).max(0) as u64))
            .unwrap_or(limit)
            .min(limit)
            .min(Duration::from_millis(50));
        if let Some((data, from)) = recv(&self.sock, nap).await {
            let now = self.now();
            let transmit = Transmit::new(&data[..], TransportType::Udp, from, self.local);
            if let TurnRecvRet::PeerData(peer_data) = self.turn.recv(transmit, now) {
                self.data.push_back((peer_data.peer, peer_data.data().to_vec()));
            }
        }
        self.flush().await;
    }

    async fn event(&mut self, within: Duration, want: impl Fn(&TurnEvent) -> bool) -> Option<TurnEvent> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.events.iter().position(&want) {
                return self.events.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.closed {
                return None;
            }
            self.step(left).await;
        }
    }

    /// Waits for the allocation's outcome.
    async fn allocation(&mut self, within: Duration) -> Option<Result<SocketAddr, ()>> {
        let outcome = self
            .event(within, |e| {
                matches!(e, TurnEvent::AllocationCreated(..) | TurnEvent::AllocationCreateFailed(..))
            })
            .await;
        match outcome {
            Some(TurnEvent::AllocationCreated(_, relayed)) => Some(Ok(relayed)),
            Some(_) => Some(Err(())),
            // A timed-out authenticated ALLOCATE only shows as `Closed`.
            None if self.closed => Some(Err(())),
            None => None,
        }
    }

    async fn allocated(&mut self) -> SocketAddr {
        self.allocation(PROMPT).await.expect("allocation answered in time").expect("allocation succeeds")
    }

    async fn permit(&mut self, ip: IpAddr) {
        let now = self.now();
        self.turn.create_permission(TransportType::Udp, ip, now).unwrap();
        let ev = self
            .event(PROMPT, |e| {
                matches!(e, TurnEvent::PermissionCreated(..) | TurnEvent::PermissionCreateFailed(..))
            })
            .await;
        assert!(
            matches!(ev, Some(TurnEvent::PermissionCreated(_, p)) if p == ip),
            "permission for {ip}: {ev:?}"
        );
    }

    async fn bind_channel(&mut self, peer: SocketAddr) {
        let now = self.now();
        self.turn.bind_channel(TransportType::Udp, peer, now).unwrap();
        let ev = self
            .event(PROMPT, |e| {
                matches!(e, TurnEvent::ChannelCreated(..) | TurnEvent::ChannelCreateFailed(..))
            })
            .await;
        assert!(
            matches!(ev, Some(TurnEvent::ChannelCreated(_, p)) if p == peer),
            "channel to {peer}: {ev:?}"
        );
    }

    /// Sends `data` to `peer` through the relay (needs a permission).
    async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let now = self.now();
        let out = self
            .turn
            .send_to(TransportType::Udp, peer, data, now)
            .expect("permission exists")
            .expect("UDP sends produce a datagram");
        let out = out.build();
        self.sock.send_to(&out.data, out.to).await.unwrap();
    }

    /// The next datagram a peer sent us through the relay.
    async fn recv_data(&mut self, within: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(d) = self.data.pop_front() {
                return Some(d);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.step(left).await;
        }
    }

    /// Deletes the allocation (REFRESH with LIFETIME 0) and drives the client
    /// until the server has freed it.
    async fn delete(&mut self, srv: &TestServer) {
        let before = srv.stats().allocations;
        let now = self.now();
        self.turn.delete(now).unwrap();
        let deadline = Instant::now() + PROMPT;
        while srv.stats().allocations >= before {
            assert!(Instant::now() < deadline, "allocation not freed: {:?}", srv.stats());
            self.step(Duration::from_millis(20)).await;
        }
    }
}

// ---------- raw STUN helpers (exact error codes) ----------

/// Sends `msg` to `server` and returns the response with the same
/// transaction, if one comes within `within`.
async fn exchange(sock: &UdpSocket, server: SocketAddr, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
    let tid = Message::from_bytes(msg).unwrap().transaction_id();
    sock.send_to(msg, server).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (data, from) = recv(sock, left).await?;
        if from == server && Message::from_bytes(&data).is_ok_and(|m| m.transaction_id() == tid) {
            return Some(data);
        }
    }
}

fn unauthenticated_allocate() -> Vec<u8> {
    let mut req = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    req.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
    req.finish()
}

fn error_code(data: &[u8]) -> Option<u16> {
    let msg = Message::from_bytes(data).unwrap();
    msg.has_class(MessageClass::Error).then(|| msg.attribute::<ErrorCode>().unwrap().code())
}

/// The long-term-credential ALLOCATE dance by hand: `Ok(relayed)` or
/// `Err(error code)`.
async fn raw_allocate(
    sock: &UdpSocket,
    server: SocketAddr,
    user: &str,
    password: &str,
) -> Result<SocketAddr, u16> {
    let challenge = exchange(sock, server, &unauthenticated_allocate(), PROMPT).await.expect("401 challenge");
    assert_eq!(error_code(&challenge), Some(401));
    let challenge = Message::from_bytes(&challenge).unwrap();
    let realm = challenge.attribute::<Realm>().unwrap();
    let nonce = challenge.attribute::<Nonce>().unwrap();

    let mut req = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    req.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
    req.add_attribute(&Username::new(user).unwrap()).unwrap();
    req.add_attribute(&realm).unwrap();
    req.add_attribute(&nonce).unwrap();
    let key = LongTermCredentials::new(user.to_owned(), password.to_owned()).to_key(realm.realm().to_owned());
    req.add_message_integrity(&key.clone().into(), IntegrityAlgorithm::Sha1).unwrap();
    let reply = exchange(sock, server, &req.finish(), PROMPT).await.expect("ALLOCATE answered");
    if let Some(code) = error_code(&reply) {
        if code == 486 {
            // The answer to an authenticated request is authenticated.
            let msg = Message::from_bytes(&reply).unwrap();
            assert!(msg.validate_integrity(&key.into()).is_ok(), "486 signed with the user's key");
        }
        return Err(code);
    }
    let reply = Message::from_bytes(&reply).unwrap();
    Ok(reply.attribute::<XorRelayedAddress>().unwrap().addr(reply.transaction_id()))
}

// ---------- tests ----------

#[tokio::test]
async fn binding_request_gets_the_source_address() {
    let srv = start(test_config()).await;
    let sock = udp().await;
    let req = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
    let reply = exchange(&sock, srv.addr, &req, PROMPT)
        .await
        .expect("binding answered (and sent to us, not to the server itself)");
    let reply = Message::from_bytes(&reply).unwrap();
    assert!(reply.has_class(MessageClass::Success));
    assert!(reply.has_method(BINDING));
    let mapped = reply.attribute::<XorMappedAddress>().unwrap();
    assert_eq!(mapped.addr(reply.transaction_id()), sock.local_addr().unwrap());
    assert_eq!(srv.stats().binding_requests, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn rest_allocation_relays_both_ways_once_permitted() {
    let srv = start(test_config()).await;
    let (user, password) = creds("ada");
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;
    assert_eq!(relayed.ip(), LOCALHOST);
    assert_eq!(srv.stats().allocations, 1);

    let peer = udp().await;
    let peer_addr = peer.local_addr().unwrap();

    // No permission yet: the peer's datagram is dropped at the server.
    peer.send_to(b"too early", relayed).await.unwrap();
    srv.wait_stats("unpermitted datagram dropped", |s| s.dropped_no_permission >= 1).await;
    assert_eq!(client.recv_data(QUIET).await, None);

    // With a permission, data flows both ways (SEND / DATA indications).
    client.permit(LOCALHOST).await;
    client.send(peer_addr, b"ping").await;
    let (data, from) = recv(&peer, PROMPT).await.expect("peer gets ping");
    assert_eq!((&data[..], from), (&b"ping"[..], relayed));
    peer.send_to(b"pong", relayed).await.unwrap();
    assert_eq!(client.recv_data(PROMPT).await, Some((peer_addr, b"pong".to_vec())));

    // And over a channel (ChannelData framing).
    client.bind_channel(peer_addr).await;
    client.send(peer_addr, b"channel ping").await;
    let (data, from) = recv(&peer, PROMPT).await.expect("peer gets channel ping");
    assert_eq!((&data[..], from), (&b"channel ping"[..], relayed));
    peer.send_to(b"channel pong", relayed).await.unwrap();
    assert_eq!(client.recv_data(PROMPT).await, Some((peer_addr, b"channel pong".to_vec())));

    let s = srv.stats();
    assert_eq!(s.bytes_to_peers, (4 + 12) as u64);
    assert_eq!(s.bytes_to_clients, (4 + 12) as u64);
    assert_eq!(s.allocations_created, 1);

    // Deleting the allocation frees the relay socket.
    client.delete(&srv).await;
    srv.wait_stats("allocation freed", |s| s.allocations == 0).await;
    let deadline = Instant::now() + PROMPT;
    while UdpSocket::bind(relayed).await.is_err() {
        assert!(Instant::now() < deadline, "relay port {relayed} still bound");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.shutdown().await;
}

/// Two clients of `srv` (users ada and bob), each with an allocation, and
/// their relayed addresses.
async fn two_relayed(srv: &TestServer) -> (Client, SocketAddr, Client, SocketAddr) {
    let (ua, pa) = creds("ada");
    let (ub, pb) = creds("bob");
    let mut a = Client::new(srv.addr, &ua, &pa).await;
    let mut b = Client::new(srv.addr, &ub, &pb).await;
    let relay_a = a.allocated().await;
    let relay_b = b.allocated().await;
    assert_ne!(relay_a, relay_b);
    (a, relay_a, b, relay_b)
}

#[tokio::test]
async fn two_clients_talk_through_their_relays() {
    let srv = start(test_config()).await;
    let (mut a, relay_a, mut b, relay_b) = two_relayed(&srv).await;
    a.permit(relay_b.ip()).await;
    b.permit(relay_a.ip()).await;
    a.send(relay_b, b"hello bob").await;
    assert_eq!(b.recv_data(PROMPT).await, Some((relay_a, b"hello bob".to_vec())));
    b.send(relay_a, b"hello ada").await;
    assert_eq!(a.recv_data(PROMPT).await, Some((relay_b, b"hello ada".to_vec())));
    let s = srv.stats();
    assert_eq!(s.allocations, 2);
    // Both relays are this server's: the datagrams went from one allocation
    // to the other inside it, not out through the kernel and back.
    assert_eq!(s.hairpinned, 2);
    assert_eq!((s.bytes_to_peers, s.bytes_to_clients), (18, 18));
    srv.shutdown().await;
}

/// Handed over inside the server, a datagram between two allocations still
/// needs the receiving one's permission, and channels work as with any peer.
#[tokio::test]
async fn relay_to_relay_needs_the_receivers_permission() {
    let srv = start(test_config()).await;
    let (mut a, relay_a, mut b, relay_b) = two_relayed(&srv).await;
    a.permit(relay_b.ip()).await;
    a.send(relay_b, b"unasked").await;
    srv.wait_stats("dropped at the receiving allocation", |s| s.dropped_no_permission >= 1).await;
    assert_eq!(b.recv_data(QUIET).await, None);
    b.permit(relay_a.ip()).await;
    a.bind_channel(relay_b).await;
    b.bind_channel(relay_a).await;
    a.send(relay_b, b"over channels").await;
    assert_eq!(b.recv_data(PROMPT).await, Some((relay_a, b"over channels".to_vec())));
    b.send(relay_a, b"and back").await;
    assert_eq!(a.recv_data(PROMPT).await, Some((relay_b, b"and back".to_vec())));
    assert_eq!(srv.stats().hairpinned, 3);
    srv.shutdown().await;
}

/// Two relayed clients of `srv` that permitted each other and bound a
/// channel each to the other's relayed address.
async fn two_on_channels(srv: &TestServer) -> (Client, SocketAddr, Client, SocketAddr) {
    let (mut a, relay_a, mut b, relay_b) = two_relayed(srv).await;
    a.permit(relay_b.ip()).await;
    b.permit(relay_a.ip()).await;
    a.bind_channel(relay_b).await;
    b.bind_channel(relay_a).await;
    (a, relay_a, b, relay_b)
}

/// Channel data takes the protocol's path once per route, then a shortcut
/// (`routes.rs`): everything still arrives, in order, counted as before,
/// between two allocations of the server and with a peer outside it.
#[tokio::test]
async fn channel_data_flows_in_order_on_the_shortcut_and_counts_the_same() {
    const N: usize = 100;
    let srv = start(test_config()).await;
    let (mut a, relay_a, mut b, relay_b) = two_on_channels(&srv).await;
    for i in 0..N {
        a.send(relay_b, format!("a->b {i}").as_bytes()).await;
    }
    for i in 0..N {
        let got = b.recv_data(PROMPT).await;
        assert_eq!(got, Some((relay_a, format!("a->b {i}").into_bytes())), "datagram {i}");
        b.send(relay_a, format!("b->a {i}").as_bytes()).await;
        assert_eq!(a.recv_data(PROMPT).await, Some((relay_b, format!("b->a {i}").into_bytes())));
    }
    let s = srv.stats();
    let bytes: u64 = (0..N).map(|i| format!("a->b {i}").len() as u64 * 2).sum();
    assert_eq!((s.hairpinned, s.bytes_to_peers, s.bytes_to_clients), (2 * N as u64, bytes, bytes));
    // Each direction's first datagram finds no route: the rest take the
    // shortcut at least on the way out.
    assert!(s.channel_shortcuts >= 2 * (N as u64 - 1), "{s:?}");

    // A peer outside the server, both ways over a channel.
    let peer = udp().await;
    let peer_addr = peer.local_addr().unwrap();
    // (The permission for 127.0.0.1 is the one for relay_b.)
    a.bind_channel(peer_addr).await;
    let before = srv.stats();
    for i in 0..N {
        a.send(peer_addr, format!("out {i}").as_bytes()).await;
        let (data, from) = recv(&peer, PROMPT).await.expect("the peer gets it");
        assert_eq!((data, from), (format!("out {i}").into_bytes(), relay_a));
        peer.send_to(format!("in {i}").as_bytes(), relay_a).await.unwrap();
        assert_eq!(a.recv_data(PROMPT).await, Some((peer_addr, format!("in {i}").into_bytes())));
    }
    let s = srv.stats();
    assert!(s.channel_shortcuts - before.channel_shortcuts >= 2 * (N as u64 - 1), "{s:?}");
    assert_eq!(s.hairpinned, before.hairpinned);
    srv.shutdown().await;
}

/// A route learned from the protocol does not outlive the allocation: once
/// one side deletes its allocation, nothing more is relayed to it or from it.
#[tokio::test]
async fn a_deleted_allocation_gets_nothing_more_on_its_channels() {
    let srv = start(test_config()).await;
    let (mut a, relay_a, mut b, relay_b) = two_on_channels(&srv).await;
    for i in 0..10 {
        a.send(relay_b, &[i]).await;
        assert_eq!(b.recv_data(PROMPT).await, Some((relay_a, vec![i])));
    }
    assert!(srv.stats().channel_shortcuts > 0);
    b.delete(&srv).await;
    let before = srv.stats();
    a.send(relay_b, b"anyone?").await;
    assert_eq!(recv(&b.sock, QUIET).await, None, "b's address gets nothing");
    let s = srv.stats();
    assert_eq!((s.bytes_to_clients, s.hairpinned), (before.bytes_to_clients, before.hairpinned));
    srv.shutdown().await;
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let srv = start(test_config()).await;
    let (user, _) = creds("ada");
    let sock = udp().await;
    assert_eq!(raw_allocate(&sock, srv.addr, &user, "not the password").await, Err(401));

    // turn-client-proto does not retry the same nonce and gives up.
    let mut client = Client::new(srv.addr, &user, "not the password").await;
    assert_eq!(client.allocation(PROMPT).await, Some(Err(())));
    assert_eq!(srv.stats().allocations_created, 0);
    srv.shutdown().await;
}

#[tokio::test]
async fn expired_rest_usernames_are_refused() {
    let srv = start(test_config()).await;
    let sock = udp().await;

    // Expired before it was ever seen.
    let past = rest_credentials(SECRET, "ada", Duration::ZERO, SystemTime::now() - Duration::from_secs(60));
    assert_eq!(raw_allocate(&sock, srv.addr, &past.username, &past.password).await, Err(401));
    assert_eq!(srv.stats().expired_credentials, 1);

    // A bare `<expiry>` username is accepted while valid.
    let bare = rest_credentials(SECRET, "", Duration::from_secs(600), SystemTime::now());
    assert!(!bare.username.contains(':'));
    assert!(raw_allocate(&udp().await, srv.addr, &bare.username, &bare.password).await.is_ok());

    // Valid when first used, expired later: the protocol still knows the user,
    // but a new allocation is refused.
    let short = rest_credentials(SECRET, "bob", Duration::from_secs(1), SystemTime::now());
    assert!(raw_allocate(&udp().await, srv.addr, &short.username, &short.password).await.is_ok());
    let expiry: u64 = short.username.split(':').next().unwrap().parse().unwrap();
    let expired_at = UNIX_EPOCH + Duration::from_secs(expiry + 1);
    let wait = expired_at.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(wait <= Duration::from_secs(3));
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert_eq!(raw_allocate(&udp().await, srv.addr, &short.username, &short.password).await, Err(401));
    assert_eq!(srv.stats().expired_credentials, 2);
    assert_eq!(srv.stats().allocations, 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn static_users_authenticate() {
    let mut config = test_config();
    config.auth = Auth::users([("ada", "lovelace")]);
    let srv = start(config).await;
    assert!(raw_allocate(&udp().await, srv.addr, "ada", "lovelace").await.is_ok());
    assert_eq!(raw_allocate(&udp().await, srv.addr, "ada", "babbage").await, Err(401));
    // No REST secret configured: REST-shaped names mean nothing.
    let (user, password) = creds("ada");
    assert_eq!(raw_allocate(&udp().await, srv.addr, &user, &password).await, Err(401));
    srv.shutdown().await;
}

#[tokio::test]
async fn quotas_refuse_the_extra_allocation_486_per_user_and_address_508_when_full() {
    // Per user: 486 (Allocation Quota Reached), signed with the user's key.
    let mut config = test_config();
    config.limits.max_allocations_per_user = 2;
    let srv = start(config).await;
    let (user, password) = creds("ada");
    for _ in 0..2 {
        assert!(raw_allocate(&udp().await, srv.addr, &user, &password).await.is_ok());
    }
    assert_eq!(raw_allocate(&udp().await, srv.addr, &user, &password).await, Err(486));
    let (other, other_password) = creds("bob");
    assert!(raw_allocate(&udp().await, srv.addr, &other, &other_password).await.is_ok());
    let s = srv.stats();
    assert_eq!((s.allocations, s.allocations_refused), (3, 1));
    srv.shutdown().await;

    // The whole server full: 508 (Insufficient Capacity); turn-client-proto
    // sees it as a failed allocation.
    let mut config = test_config();
    config.limits.max_allocations = 1;
    let srv = start(config).await;
    let (ua, pa) = creds("ada");
    let (ub, pb) = creds("bob");
    let mut a = Client::new(srv.addr, &ua, &pa).await;
    a.allocated().await;
    let mut b = Client::new(srv.addr, &ub, &pb).await;
    assert_eq!(b.allocation(PROMPT).await, Some(Err(())));
    assert_eq!(raw_allocate(&udp().await, srv.addr, &ub, &pb).await, Err(508));
    srv.shutdown().await;

    // Per client IP (every test client is 127.0.0.1).
    let mut config = test_config();
    config.limits.max_allocations_per_ip = 1;
    let srv = start(config).await;
    assert!(raw_allocate(&udp().await, srv.addr, &ua, &pa).await.is_ok());
    assert_eq!(raw_allocate(&udp().await, srv.addr, &ub, &pb).await, Err(486));
    srv.shutdown().await;
}

#[tokio::test]
async fn relay_ports_come_from_the_configured_range() {
    // A port that was free a moment ago is the whole range.
    let probe = std::net::UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut config = test_config();
    config.relay_ports = port..=port;
    let srv = start(config).await;
    let (user, password) = creds("ada");
    let relayed = raw_allocate(&udp().await, srv.addr, &user, &password).await;
    assert_eq!(relayed, Ok(SocketAddr::new(LOCALHOST, port)));
    // Range exhausted: 508, and the refusal is counted.
    assert_eq!(raw_allocate(&udp().await, srv.addr, &user, &password).await, Err(508));
    assert_eq!(srv.stats().allocations_refused, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn loopback_peers_are_refused_by_default() {
    let mut config = test_config();
    config.peer_policy.allow_loopback = false;
    let srv = start(config).await;
    let (user, password) = creds("ada");
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;
    let peer = udp().await;
    let peer_addr = peer.local_addr().unwrap();
    // The permission itself is granted; the data is not relayed.
    client.permit(LOCALHOST).await;
    client.send(peer_addr, b"to loopback").await;
    srv.wait_stats("outbound refused", |s| s.dropped_policy >= 1).await;
    assert_eq!(recv(&peer, QUIET).await, None);
    peer.send_to(b"from loopback", relayed).await.unwrap();
    srv.wait_stats("inbound refused", |s| s.dropped_policy >= 2).await;
    assert_eq!(client.recv_data(QUIET).await, None);
    let s = srv.stats();
    assert_eq!((s.bytes_to_peers, s.bytes_to_clients), (0, 0));
    srv.shutdown().await;
}

#[tokio::test]
async fn the_server_never_relays_to_itself() {
    let srv = start(test_config()).await;
    let (user, password) = creds("ada");
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;
    client.permit(LOCALHOST).await;
    client.send(srv.addr, b"to the listen socket").await;
    client.send(relayed, b"to my own relay").await;
    srv.wait_stats("both refused", |s| s.dropped_policy >= 2).await;
    // Other loopback peers still work: the refusal is about our own sockets.
    let peer = udp().await;
    client.send(peer.local_addr().unwrap(), b"to a peer").await;
    assert_eq!(recv(&peer, PROMPT).await.map(|(d, _)| d), Some(b"to a peer".to_vec()));
    assert_eq!(srv.stats().dropped_policy, 2);
    srv.shutdown().await;
}

/// Allowing a network (here all of loopback) for LAN peers does not open
/// the server's own host: at its own address only other allocations'
/// relays are reachable, not the services listening there.
#[tokio::test]
async fn an_allocation_reaches_no_service_on_the_servers_host() {
    let mut config = test_config();
    config.peer_policy.allow_loopback = false;
    config.peer_policy.allowed = vec!["127.0.0.0/8".parse().unwrap()];
    let srv = start(config).await;
    let (ua, pa) = creds("ada");
    let (ub, pb) = creds("bob");
    let mut a = Client::new(srv.addr, &ua, &pa).await;
    let mut b = Client::new(srv.addr, &ub, &pb).await;
    let relay_a = a.allocated().await;
    let relay_b = b.allocated().await;
    let lan_ip: IpAddr = "127.0.0.2".parse().unwrap();
    a.permit(LOCALHOST).await;
    a.permit(lan_ip).await;
    b.permit(LOCALHOST).await;

    let service = udp().await;
    a.send(service.local_addr().unwrap(), b"to a service on the server's host").await;
    a.send(relay_b, b"hello bob").await;
    assert_eq!(b.recv_data(PROMPT).await, Some((relay_a, b"hello bob".to_vec())), "relay to relay");
    let lan = UdpSocket::bind((lan_ip, 0)).await.unwrap();
    a.send(lan.local_addr().unwrap(), b"to a LAN peer").await;
    assert_eq!(recv(&lan, PROMPT).await.map(|(d, _)| d), Some(b"to a LAN peer".to_vec()), "allowed network");
    assert_eq!(recv(&service, QUIET).await, None, "nothing reached the service");
    assert_eq!(srv.stats().dropped_policy, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn bandwidth_limit_drops_the_excess() {
    let mut config = test_config();
    // 1 kB/s with the minimum burst of 64 KiB.
    config.limits.bandwidth_bytes_per_sec = Some(1000);
    let srv = start(config).await;
    let (user, password) = creds("ada");
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;
    let peer = udp().await;
    let peer_addr = peer.local_addr().unwrap();
    client.permit(LOCALHOST).await;

    let payload = vec![7u8; 1000];
    for _ in 0..100 {
        client.send(peer_addr, &payload).await;
        // Let the server drain its socket: kernel drops would blur the count.
        tokio::task::yield_now().await;
    }
    let mut delivered = 0;
    while recv(&peer, QUIET).await.is_some() {
        delivered += 1;
        assert!(delivered <= 100);
    }
    assert!((60..=70).contains(&delivered), "client to peer: {delivered} of 100");

    for _ in 0..100 {
        peer.send_to(&payload, relayed).await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut received = 0;
    while client.recv_data(QUIET).await.is_some() {
        received += 1;
        assert!(received <= 100);
    }
    assert!((60..=70).contains(&received), "peer to client: {received} of 100");
    // About 70 dropped in all; exactly 200 - delivered - received unless the
    // kernel dropped some too.
    let dropped = srv.stats().dropped_bandwidth;
    assert!(
        (60..=80).contains(&dropped),
        "{dropped} dropped, {delivered} delivered, {received} received: {:?}",
        srv.stats()
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn allocations_end_at_max_lifetime() {
    let mut config = test_config();
    config.limits.max_lifetime = Duration::from_millis(500);
    let srv = start(config).await;
    let (user, password) = creds("ada");
    let sock = udp().await;
    let relayed = raw_allocate(&sock, srv.addr, &user, &password).await.unwrap();
    srv.wait_stats("allocation revoked", |s| s.allocations_revoked == 1).await;
    // The client's further requests are told the allocation is gone.
    let refresh = Message::builder_request(REFRESH, MessageWriteVec::new()).finish();
    let reply = exchange(&sock, srv.addr, &refresh, PROMPT).await.expect("refresh answered");
    assert_eq!(error_code(&reply), Some(437));
    // Peer data to the old relayed address goes nowhere.
    let peer = udp().await;
    peer.send_to(b"anyone?", relayed).await.unwrap();
    assert_eq!(recv(&sock, QUIET).await, None);
    srv.shutdown().await;
}

#[tokio::test]
async fn full_auth_tables_rotate_without_cutting_live_allocations() {
    let mut config = test_config();
    config.limits.max_auth_entries = 4;
    let srv = start(config).await;
    let (user, password) = creds("ada");
    // Costs 2 entries: its address (a nonce) and its REST user.
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;

    let addr = srv.addr;
    let challenge = |sock: UdpSocket| async move {
        let reply = exchange(&sock, addr, &unauthenticated_allocate(), QUIET).await;
        reply.map(|r| error_code(&r))
    };
    // Entries 3 and 4 fill the first protocol state, the next one starts a
    // second, and four fill that.
    for _ in 0..6 {
        assert_eq!(challenge(udp().await).await, Some(Some(401)));
    }
    assert_eq!(srv.stats().auth_table_rotations, 1);
    // Second state full while the first still holds an allocation: new
    // clients are dropped, not answered.
    assert_eq!(challenge(udp().await).await, None);
    assert_eq!(srv.stats().dropped_tables_full, 1);

    // The allocation in the first state keeps working.
    let peer = udp().await;
    let peer_addr = peer.local_addr().unwrap();
    client.permit(LOCALHOST).await;
    client.send(peer_addr, b"still here").await;
    assert_eq!(recv(&peer, PROMPT).await, Some((b"still here".to_vec(), relayed)));

    // Once it ends, the first state is dropped and new clients get in again.
    client.delete(&srv).await;
    srv.wait_stats("allocation freed", |s| s.allocations == 0).await;
    assert_eq!(challenge(udp().await).await, Some(Some(401)));
    assert_eq!(srv.stats().auth_table_rotations, 2);
    srv.shutdown().await;
}

/// A client with an allocation is past the rate limit for new addresses:
/// ALLOCATEs naming usernames it made up (a future expiry, no valid
/// MESSAGE-INTEGRITY) must not each take an entry in the authentication
/// tables, or one client could fill them, and memory, without end.
#[tokio::test]
async fn made_up_usernames_take_no_room_in_the_authentication_tables() {
    let mut config = test_config();
    config.limits.max_auth_entries = 8;
    let realm = config.realm.clone();
    let srv = start(config).await;
    let (user, password) = creds("ada");
    let sock = udp().await;
    raw_allocate(&sock, srv.addr, &user, &password).await.expect("allocated");
    for i in 0..20 {
        let name = format!("9999999999:mallory-{i}");
        let mut req = Message::builder_request(ALLOCATE, MessageWriteVec::new());
        req.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
        req.add_attribute(&Username::new(&name).unwrap()).unwrap();
        req.add_attribute(&Realm::new(&realm).unwrap()).unwrap();
        req.add_attribute(&Nonce::new("made-up").unwrap()).unwrap();
        let key = LongTermCredentials::new(name.clone(), "not the password".into()).to_key(realm.clone());
        req.add_message_integrity(&key.into(), IntegrityAlgorithm::Sha1).unwrap();
        sock.send_to(&req.finish(), srv.addr).await.unwrap();
    }
    // A newcomer still gets its challenge from the first tables.
    let challenge = exchange(&udp().await, srv.addr, &unauthenticated_allocate(), PROMPT).await;
    assert_eq!(challenge.as_deref().map(error_code), Some(Some(401)));
    assert_eq!(srv.stats().auth_table_rotations, 0, "the tables did not fill");
    srv.shutdown().await;
}

#[tokio::test]
async fn requests_from_new_addresses_are_rate_limited() {
    let mut config = test_config();
    config.limits.new_client_requests_per_sec = 3;
    let srv = start(config).await;
    let mut socks = Vec::new();
    for _ in 0..8 {
        let sock = udp().await;
        sock.send_to(&unauthenticated_allocate(), srv.addr).await.unwrap();
        socks.push(sock);
    }
    let mut answered = 0;
    for sock in &socks {
        if recv(sock, QUIET).await.is_some() {
            answered += 1;
        }
    }
    assert!((3..=4).contains(&answered), "{answered} of 8 answered");
    assert_eq!(srv.stats().dropped_rate_limited, 8 - answered);
    // Binding requests are not limited.
    let req = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
    assert!(exchange(&socks[7], srv.addr, &req, PROMPT).await.is_some());
    srv.shutdown().await;
}

#[tokio::test]
async fn shutdown_returns_and_closes_every_socket() {
    let srv = start(test_config()).await;
    let (user, password) = creds("ada");
    let mut client = Client::new(srv.addr, &user, &password).await;
    let relayed = client.allocated().await;
    let listen = srv.addr;
    srv.shutdown().await;
    // Both the listen socket and the relay socket are closed by then.
    UdpSocket::bind(listen).await.expect("listen port free");
    UdpSocket::bind(relayed).await.expect("relay port free");
}

#[tokio::test]
async fn unusable_configs_are_refused() {
    let sock = || async { UdpSocket::bind((LOCALHOST, 0)).await.unwrap() };
    let mut no_auth = test_config();
    no_auth.auth = Auth::default();
    assert!(matches!(Server::new(sock().await, no_auth), Err(Error::Config(_))));

    // Relays on 0.0.0.0 with nothing to advertise.
    let mut unspecified = test_config();
    unspecified.relay_ip = Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert!(matches!(Server::new(sock().await, unspecified), Err(Error::Config(_))));
    let mut advertised = test_config();
    advertised.relay_ip = Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    advertised.external_ip = Some("203.0.113.7".parse().unwrap());
    assert!(Server::new(sock().await, advertised).is_ok());

    let mut mixed = test_config();
    mixed.external_ip = Some("2001:db8::1".parse().unwrap());
    assert!(matches!(Server::new(sock().await, mixed), Err(Error::Config(_))));

    let mut ports = test_config();
    ports.relay_ports = 0..=100;
    assert!(matches!(Server::new(sock().await, ports), Err(Error::Config(_))));
}
