//! End-to-end tests of the signaling server: the real `serve` on a loopback
//! port, spoken to over real WebSockets, the way `peerlink` and the browser
//! client speak to it. Every wait is bounded; a hung server fails a test
//! instead of hanging it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use peerlink_proto::{ErrorCode, IceServer, Limits, PeerId, PeerInfo, ServerMsg, Signal};
use peerlink_signal::{Config, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long any single expected event may take.
const WAIT: Duration = Duration::from_secs(5);

/// The defaults, with limits small enough to reach quickly in a test.
fn config() -> Config {
    Config {
        limits: Limits {
            max_message_bytes: 1024,
            max_peers_per_room: 4,
            max_rooms_per_connection: 3,
            messages_per_second: 1000,
            message_burst: 1000,
            idle_timeout_ms: 30_000,
        },
        hard_frame_limit: 16 * 1024,
        ..Config::default()
    }
}

/// Where rooms live: in the one server process, or in Redis shared by
/// several nodes (clients then spread over the nodes in turn).
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    /// A Redis Cluster of three masters.
    RedisCluster,
}

/// Nodes a Redis-backed test server runs.
const NODES: usize = 3;

/// A `redis-server` of the test's own on a loopback port, killed when dropped.
struct Redis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl Redis {
    async fn start() -> Redis {
        for _ in 0..SPAWN_ATTEMPTS {
            let port =
                TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
            if let Some(child) = Redis::spawn(port, &[], None).await {
                return Redis { port, child: Some(child) };
            }
        }
        panic!("redis-server exited before listening {SPAWN_ATTEMPTS} times, each on a fresh port");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it again on its port (after `kill`).
    async fn run(&mut self) {
        for _ in 0..SPAWN_ATTEMPTS {
            if let Some(child) = Redis::spawn(self.port, &[], None).await {
                self.child = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("redis-server exited before listening on port {} {SPAWN_ATTEMPTS} times", self.port);
    }

    /// Starts `redis-server` on `port` (with `extra` arguments, in `dir`)
    /// and waits until it listens. `None` if it exited first: a port chosen
    /// free can be taken before the server binds it (other tests bind
    /// ports all the time), and a server that cannot bind exits at once;
    /// waiting out the start timeout for it would fail the test for
    /// nothing.
    async fn spawn(
        port: u16,
        extra: &[&str],
        dir: Option<&std::path::Path>,
    ) -> Option<tokio::process::Child> {
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child =
            command.spawn().expect("redis-server (Debian package redis-server) must be installed");
        // Slower than a message under load: a process starting (several at
        // once, for a cluster, on a loaded 2-core machine).
        let start_wait = Duration::from_secs(20);
        let deadline = Instant::now() + start_wait;
        while !answers_ping(port).await {
            if let Some(status) = child.try_wait().expect("redis-server status") {
                eprintln!("redis-server on port {port} exited before listening ({status}): trying again");
                return None;
            }
            assert!(Instant::now() < deadline, "redis-server did not listen within {start_wait:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(child)
    }

    /// A Redis Cluster of `n` masters (no replicas), each a `redis-server`
    /// of this test in a scratch folder, made one with `redis-cli --cluster
    /// create`; the first is returned, the others live in `rest`.
    async fn cluster(n: usize) -> (Redis, Vec<Redis>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("pl-cluster-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let mut nodes = Vec::new();
        for _ in 0..n {
            let mut started = None;
            for _ in 0..SPAWN_ATTEMPTS {
                let port = cluster_port().await;
                let config = format!("nodes-{port}.conf");
                let extra = ["--cluster-enabled", "yes", "--cluster-config-file", &config];
                if let Some(child) = Redis::spawn(port, &extra, Some(&dir)).await {
                    started = Some(Redis { port, child: Some(child) });
                    break;
                }
            }
            nodes.push(started.expect("a cluster node listening (see the attempts above)"));
        }
        let addrs: Vec<String> = nodes.iter().map(|r| format!("127.0.0.1:{}", r.port)).collect();
        let created = timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output(),
        )
        .await
        .expect("redis-cli --cluster create in time")
        .expect("redis-cli (Debian package redis-tools) must be installed");
        assert!(created.status.success(), "cluster create: {}", String::from_utf8_lossy(&created.stdout));
        // Every node must see the cluster whole before it serves.
        let deadline = Instant::now() + Duration::from_secs(20);
        for a in &addrs {
            loop {
                let info = tokio::process::Command::new("redis-cli")
                    .args(["-u", &format!("redis://{a}"), "cluster", "info"])
                    .output()
                    .await
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok at {a}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let first = nodes.remove(0);
        (first, nodes, dir)
    }

    /// Kills it: its data is gone (nothing is saved).
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.expect("kill redis-server");
    }
}

struct TestServer {
    /// The first node.
    addr: SocketAddr,
    addrs: Vec<SocketAddr>,
    next: std::sync::atomic::AtomicUsize,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// Nodes after the first (Redis only).
    others: Vec<(oneshot::Sender<()>, JoinHandle<std::io::Result<()>>)>,
    redis: Option<Redis>,
    /// The other masters of a Redis Cluster, and its scratch folder.
    cluster: Option<(Vec<Redis>, PathBuf)>,
}

async fn start_node(config: Config) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// Waits until the node at `addr` reports its backplane up.
async fn backplane_up(addr: SocketAddr) {
    backplane_is(addr, true).await
}

/// Waits until the node at `addr` reports its backplane up (or down).
async fn backplane_is(addr: SocketAddr, up: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(addr, "/healthz").await;
        let v: Value = serde_json::from_str(&body).expect("healthz is JSON");
        if v["backplane"]["up"] == json!(up) {
            assert_eq!(v["status"], json!(if up { "ok" } else { "degraded" }), "{body}");
            return;
        }
        assert!(Instant::now() < deadline, "the backplane of {addr} was not up={up} within {WAIT:?}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestServer {
    async fn start(config: Config) -> TestServer {
        TestServer::on(Backend::Memory, config).await
    }

    async fn on(backend: Backend, config: Config) -> TestServer {
        let (redis, cluster, n) = match backend {
            Backend::Memory => (None, None, 1),
            Backend::Redis => (Some(Redis::start().await), None, NODES),
            Backend::RedisCluster => {
                let (first, rest, dir) = Redis::cluster(3).await;
                (Some(first), Some((rest, dir)), NODES)
            }
        };
        let mut config = config;
        if let Some(r) = &redis {
            let mut bp = match &cluster {
                None => peerlink_signal::BackplaneConfig::redis(r.url()),
                // Seeds: every master (the client learns the slots itself).
                Some((rest, _)) => peerlink_signal::BackplaneConfig::redis_cluster(
                    std::iter::once(r).chain(rest).map(Redis::url).collect::<Vec<_>>().join(","),
                ),
            };
            bp.lease = Duration::from_millis(1500);
            config.backplane = Some(bp);
            // Nodes of one deployment sign resume tokens alike.
            config.resume_secret = Some(peerlink_signal::Secret("deployment resume key".into()));
        }
        let (addr, stop, task) = start_node(config.clone()).await;
        let mut addrs = vec![addr];
        let mut others = Vec::new();
        for _ in 1..n {
            let (a, s, t) = start_node(config.clone()).await;
            addrs.push(a);
            others.push((s, t));
        }
        if redis.is_some() {
            for a in &addrs {
                backplane_up(*a).await;
            }
        }
        TestServer {
            addr,
            addrs,
            next: Default::default(),
            stop: Some(stop),
            task: Some(task),
            others,
            redis,
            cluster,
        }
    }

    /// A client of the next node in turn.
    async fn client(&self) -> Client {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Client::connect(self.addrs[i % self.addrs.len()]).await
    }

    /// A client of node `i`.
    async fn client_on(&self, i: usize) -> Client {
        Client::connect(self.addrs[i % self.addrs.len()]).await
    }

    /// A client that has said hello, with the id the server gave it.
    async fn greeted(&self) -> (Client, PeerId) {
        let mut c = self.client().await;
        let id = c.hello().await;
        (c, id)
    }

    /// A greeted client that joined `room` as `name`.
    async fn member(&self, room: &str, name: &str) -> (Client, PeerId) {
        let (mut c, id) = self.greeted().await;
        c.join(room, Some(name)).await;
        (c, id)
    }

    /// Triggers shutdown and returns how long `serve` took to return.
    async fn shut_down(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        self.stop.take().expect("not yet stopped").send(()).expect("server still running");
        let task = self.task.take().expect("not yet stopped");
        let result = timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("serve did not return within {limit:?} of shutdown"));
        result.expect("serve task panicked").expect("serve returned an error");
        start.elapsed()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for (stop, _) in self.others.drain(..) {
            let _ = stop.send(());
        }
        if let Some((_, dir)) = &self.cluster {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket client. It only reads when a test asks it to, so a test can
/// make it a client that stopped reading (and does not answer pings) by simply
/// not calling it.
struct Client {
    ws: Ws,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let (ws, _) = timeout(WAIT, connect_async(format!("ws://{addr}/ws")))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client { ws }
    }

    async fn send_msg(&mut self, msg: Message) {
        timeout(WAIT, self.ws.send(msg)).await.expect("send timed out").expect("send");
    }

    async fn send_json(&mut self, value: Value) {
        self.send_raw(&value.to_string()).await;
    }

    async fn send_raw(&mut self, text: &str) {
        self.send_msg(Message::text(text)).await;
    }

    /// The next frame that is not a ping or pong, or `None` if the socket
    /// ended (with an error or without a close frame).
    async fn next_frame(&mut self, deadline: Instant) -> Option<Message> {
        loop {
            match timeout_at(deadline, self.ws.next()).await.expect("timed out waiting for the server") {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(msg)) => return Some(msg),
            }
        }
    }

    fn parse(msg: Message) -> ServerMsg {
        let Message::Text(text) = msg else { panic!("expected a text frame, got {msg:?}") };
        let parsed: ServerMsg =
            serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("unparseable {text}: {e}"));
        assert_ne!(parsed, ServerMsg::Unknown, "server sent a type this version does not know: {text}");
        parsed
    }

    /// The next protocol message, within [`WAIT`].
    async fn recv(&mut self) -> ServerMsg {
        match self.next_frame(Instant::now() + WAIT).await {
            Some(msg) => Self::parse(msg),
            None => panic!("connection ended while waiting for a message"),
        }
    }

    /// The next protocol message if one arrives within `wait`.
    async fn try_recv(&mut self, wait: Duration) -> Option<ServerMsg> {
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None | Some(Err(_))) => panic!("connection ended while waiting for a message"),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(msg))) => return Some(Self::parse(msg)),
            }
        }
    }

    /// Asserts the next message is `error` with `code`; returns its text.
    async fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.recv().await {
            ServerMsg::Error { code: got, message } => {
                assert_eq!(got, code, "error message: {message}");
                assert!(!message.is_empty(), "errors carry a human-readable message");
                message
            }
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    /// Asserts the server closes the connection next (no more messages).
    /// Returns the close frame, `None` if the socket just ended.
    async fn expect_close(&mut self) -> Option<CloseFrame> {
        match self.next_frame(Instant::now() + WAIT).await {
            None => None,
            Some(Message::Close(frame)) => {
                // After a close frame the stream ends.
                assert!(self.next_frame(Instant::now() + WAIT).await.is_none(), "frames after close");
                frame
            }
            Some(other) => panic!("expected the connection to close, got {other:?}"),
        }
    }

    /// Asserts `error` with `code` followed by a close frame with `close`.
    async fn expect_fatal(&mut self, code: ErrorCode, close: CloseCode) {
        self.expect_error(code).await;
        let frame = self.expect_close().await.expect("a close frame, not a dropped socket");
        assert_eq!(frame.code, close);
        assert_eq!(frame.reason.as_str(), code.as_str());
    }

    /// Says hello with the current version; returns the assigned peer id.
    async fn hello(&mut self) -> PeerId {
        self.hello_resuming(None).await.0
    }

    /// Says hello, presenting `resume` if given; returns the peer id and
    /// the resume token the server handed out.
    async fn hello_resuming(&mut self, resume: Option<&str>) -> (PeerId, String) {
        let mut hello = json!({"type": "hello", "version": 1, "client": "peerlink-signal-tests"});
        if let Some(token) = resume {
            hello["resume"] = json!(token);
        }
        self.send_json(hello).await;
        match self.recv().await {
            ServerMsg::Welcome { version, peer_id, resume, .. } => {
                assert_eq!(version, 1);
                (peer_id, resume.expect("welcome carries a resume token"))
            }
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Joins `room`; returns the members that were already there.
    async fn join(&mut self, room: &str, name: Option<&str>) -> Vec<PeerInfo> {
        let (peers, resumed) = self.join_resuming(room, name).await;
        assert!(!resumed, "a plain join resumed nothing");
        peers
    }

    /// Joins `room`; returns the members there and `joined.resumed`.
    async fn join_resuming(&mut self, room: &str, name: Option<&str>) -> (Vec<PeerInfo>, bool) {
        let mut msg = json!({"type": "join", "room": room});
        if let Some(name) = name {
            msg["name"] = json!(name);
        }
        self.send_json(msg).await;
        match self.recv().await {
            ServerMsg::Joined { room: r, peers, resumed, .. } => {
                assert_eq!(r, room);
                (peers, resumed)
            }
            other => panic!("expected joined {room}, got {other:?}"),
        }
    }

    /// Application-level ping; asserts the matching pong is the next message.
    async fn ping(&mut self, nonce: u64) {
        self.send_json(json!({"type": "ping", "nonce": nonce})).await;
        assert_eq!(self.recv().await, ServerMsg::Pong { nonce: Some(nonce) });
    }

    async fn signal(&mut self, room: &str, to: &PeerId, signal: Value) {
        self.send_json(json!({"type": "signal", "room": room, "to": to, "signal": signal})).await;
    }

    /// Asserts the next message is a signal from `from` in `room`.
    async fn expect_signal(&mut self, room: &str, from: &PeerId) -> Signal {
        match self.recv().await {
            ServerMsg::Signal { room: r, from: f, signal } => {
                assert_eq!((r.as_str(), &f), (room, from), "signal stamped with room and sender");
                signal
            }
            other => panic!("expected a signal from {from}, got {other:?}"),
        }
    }

    /// Pings every 50 ms (so this client is never idle) until `peer_left`
    /// for `gone` arrives; returns how long that took.
    async fn chat_until_left(&mut self, gone: &PeerId) -> Duration {
        let start = Instant::now();
        let mut left = None;
        for n in 0.. {
            assert!(start.elapsed() < WAIT, "no peer_left for {gone}");
            self.send_json(json!({"type": "ping", "nonce": n})).await;
            loop {
                match self.recv().await {
                    ServerMsg::Pong { nonce } if nonce == Some(n) => break,
                    ServerMsg::PeerLeft { peer_id, .. } if &peer_id == gone => {
                        left = Some(start.elapsed());
                    }
                    // Messages still on their way to `gone` when it left (a
                    // slow machine can take longer to send them than the
                    // idle timeout) are refused as addressed to nobody.
                    ServerMsg::Error { code: ErrorCode::UnknownPeer, .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            if let Some(left) = left {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!()
    }

    /// Reads (and discards) until the server ends the connection.
    async fn drain_until_closed(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Some(msg) = self.next_frame(deadline).await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    }
}

fn fixture(rel: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/protocol").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A client fixture addressed to `to` instead of the fixture's made-up id.
fn fixture_to(rel: &str, to: &PeerId) -> Value {
    let mut v = fixture(rel);
    v["to"] = json!(to);
    v
}

/// Asserts that `a` and `b` (members of `room`) are still served: both get
/// pongs, and a signal from `a` is the very next thing `b` receives (so
/// nothing from a refused message reached `b` before it).
async fn still_served(a: &mut Client, a_id: &PeerId, b: &mut Client, b_id: &PeerId, room: &str, n: u64) {
    a.ping(n).await;
    a.signal(room, b_id, json!({"kind": "candidate", "candidate": format!("candidate:{n}")})).await;
    let got = b.expect_signal(room, a_id).await;
    assert_eq!(got, Signal::Candidate { candidate: format!("candidate:{n}"), mid: None });
    b.ping(n).await;
}

/// Returns once node `node` (A's, in the tests) has seen every change made
/// before to the room that `join` joins. Across nodes a change reaches a
/// node through its channel some time after the client that made it was
/// answered, and a message sent meanwhile may still go to where a resumed
/// member was (PROTOCOL.md, Resume). A newcomer on `node` is answered once
/// that node has read past its own join, so past every change before it.
/// The members in `told` get its `peer_joined`; the newcomer is returned.
async fn caught_up(server: &TestServer, node: usize, join: Value, told: &mut [&mut Client]) -> Client {
    let mut c = Client::connect(server.addrs[node]).await;
    c.hello().await;
    c.send_json(join).await;
    assert!(matches!(c.recv().await, ServerMsg::Joined { .. }));
    for m in told {
        assert!(matches!(m.recv().await, ServerMsg::PeerJoined { .. }));
    }
    c
}

/// Runs a hub test on both backends: the memory hub of one process, and
/// three nodes sharing rooms through Redis (clients spread over them in
/// turn, so members of one room sit on different nodes), once on a single
/// Redis and once on a Redis Cluster of three masters.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Backend::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$name(super::Backend::RedisCluster).await
            }
        }
    )*};
}

/// A client that reconnects with its resume token gets its peer id back,
/// and joining a room it is still a member of takes its place back: the
/// others see nobody leave or join, and its old connection's end changes
/// nothing. A token from elsewhere, or tampered with, gets a new id.
async fn a_resumed_client_takes_its_place_back_unnoticed(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let mut b = server.client().await;
    let (b_id, token) = b.hello_resuming(None).await;
    b.join("lobby", Some("bob")).await;
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == b_id));

    // B comes back on another connection (another node, with Redis).
    let mut b2 = server.client().await;
    let (id, _) = b2.hello_resuming(Some(&token)).await;
    assert_eq!(id, b_id, "the same peer id");
    let (peers, resumed) = b2.join_resuming("lobby", Some("bob")).await;
    let peers: Vec<PeerId> = peers.into_iter().map(|p| p.id).collect();
    assert_eq!(peers, std::slice::from_ref(&a_id));
    assert!(resumed, "joined says the place was kept");
    drop(b);
    assert_eq!(a.try_recv(Duration::from_millis(700)).await, None, "A saw no one leave or join");
    let _c = caught_up(&server, 0, json!({"type": "join", "room": "lobby"}), &mut [&mut a, &mut b2]).await;
    still_served(&mut a, &a_id, &mut b2, &b_id, "lobby", 1).await;
    still_served(&mut b2, &b_id, &mut a, &a_id, "lobby", 2).await;

    // A resumed id whose place is gone (it left) joins as a newcomer: the
    // others are told, and `joined` does not say resumed.
    b2.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert!(matches!(b2.recv().await, ServerMsg::Left { .. }));
    assert!(matches!(a.recv().await, ServerMsg::PeerLeft { peer_id, .. } if peer_id == b_id));
    let (peers, resumed) = b2.join_resuming("lobby", Some("bob")).await;
    assert_eq!((peers.len(), resumed), (2, false), "A and the newcomer, not resumed");
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == b_id));

    // Someone else's token, tampered with: a fresh id, and no place.
    let forged = token.replacen(b_id.as_str(), a_id.as_str(), 1);
    let mut m = server.client().await;
    let (m_id, _) = m.hello_resuming(Some(&forged)).await;
    assert!(m_id != a_id && m_id != b_id, "{m_id}");
}

/// A client resumes at the moment its old connection ends (a network
/// switch: the old socket closes as the new one joins), on another node or
/// on the same one. Which reaches Redis first decides: the place is taken
/// back (`resumed`) and a member on the old node sees nobody leave or join,
/// or the old end came first and that member sees the peer leave and join
/// again. Never the mix the old node's cleanup made of it: resumed, yet
/// reported gone (and so never reconnected to), or removed from Redis
/// while its new connection holds it. 20 tries each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_racing_with_the_old_connections_end_is_seen_consistently() {
    let server = TestServer::on(Backend::Redis, config()).await;
    for (place, node) in [("another node", 1), ("the same node", 0)] {
        let resumed = resume_races(&server, node, &format!("n{node}")).await;
        eprintln!("on {place}: {resumed} of 20 tries resumed the place");
    }
}

/// 20 tries of the race above with the resume on node `node`; how many
/// took the place back.
async fn resume_races(server: &TestServer, node: usize, tag: &str) -> usize {
    let mut resumed_tries = 0;
    for i in 0..20 {
        let room = format!("race-{tag}-{i}");
        let mut a = server.client_on(0).await;
        a.hello().await;
        a.join(&room, Some("ada")).await;
        let mut b = server.client_on(0).await;
        let (b_id, token) = b.hello_resuming(None).await;
        b.join(&room, Some("bob")).await;
        assert!(matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == b_id));
        let mut b2 = server.client_on(node).await;
        assert_eq!(b2.hello_resuming(Some(&token)).await.0, b_id);
        b2.send_json(json!({"type": "join", "room": room, "name": "bob"})).await;
        drop(b);
        let resumed = match b2.recv().await {
            ServerMsg::Joined { resumed, .. } => resumed,
            other => panic!("try {i}: expected joined, got {other:?}"),
        };
        if resumed {
            resumed_tries += 1;
            let seen = a.try_recv(Duration::from_millis(300)).await;
            assert_eq!(seen, None, "try {i}: resumed, yet a member of the old node was told");
        } else {
            assert!(
                matches!(a.recv().await, ServerMsg::PeerLeft { peer_id, .. } if peer_id == b_id),
                "try {i}"
            );
            assert!(
                matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == b_id),
                "try {i}"
            );
        }
        // Whatever the order, the peer is a member everywhere: a newcomer
        // on a third node is told of it.
        let mut c = server.client_on(2).await;
        c.hello().await;
        let peers: Vec<PeerId> = c.join(&room, Some("cy")).await.into_iter().map(|p| p.id).collect();
        assert!(peers.contains(&b_id), "try {i}: the resumed peer is in the room for a newcomer: {peers:?}");
        assert!(matches!(a.recv().await, ServerMsg::PeerJoined { .. }), "try {i}: a hears of the newcomer");
    }
    resumed_tries
}

/// With a join secret, a resumed client takes back a place it still holds
/// although its (short-lived) join token has expired meanwhile; a room it
/// is not in still needs a valid token.
async fn a_resume_needs_no_fresh_join_token_for_a_place_it_holds(backend: Backend) {
    use peerlink_signal::{JoinClaims, Secret, join_token};
    let secret = "backend secret";
    let server =
        TestServer::on(backend, Config { join_secret: Some(Secret(secret.into())), ..config() }).await;
    let token = |room: &str| {
        join_token(secret.as_bytes(), &JoinClaims { room: room.into(), name: None, exp: unix_now() + 60 })
    };
    let mut a = server.client().await;
    let a_id = a.hello().await;
    a.send_json(json!({"type": "join", "room": "lobby", "token": token("lobby")})).await;
    assert!(matches!(a.recv().await, ServerMsg::Joined { .. }));
    let mut b = server.client().await;
    let (b_id, resume) = b.hello_resuming(None).await;
    b.send_json(json!({"type": "join", "room": "lobby", "token": token("lobby")})).await;
    assert!(matches!(b.recv().await, ServerMsg::Joined { .. }));
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { .. }));

    let mut b2 = server.client().await;
    assert_eq!(b2.hello_resuming(Some(&resume)).await.0, b_id);
    let expired = join_token(secret.as_bytes(), &JoinClaims { room: "lobby".into(), name: None, exp: 1 });
    b2.send_json(json!({"type": "join", "room": "lobby", "token": expired})).await;
    assert!(matches!(b2.recv().await, ServerMsg::Joined { resumed: true, .. }), "place taken back");
    b2.send_json(json!({"type": "join", "room": "other", "token": expired})).await;
    let why = b2.expect_error(ErrorCode::Unauthorized).await;
    assert!(why.contains("expired"), "{why}");
    let join = json!({"type": "join", "room": "lobby", "token": token("lobby")});
    let _c = caught_up(&server, 0, join, &mut [&mut a, &mut b2]).await;
    still_served(&mut a, &a_id, &mut b2, &b_id, "lobby", 1).await;
}

/// A room of more members than `listed_peers` is large: a newcomer gets a
/// random sample and the room's size, and nobody hears of joins or leaves.
async fn a_large_room_lists_a_sample_and_keeps_presence_quiet(backend: Backend) {
    let mut cfg = Config { listed_peers: 3, ..config() };
    cfg.limits.max_peers_per_room = 100;
    let server = TestServer::on(backend, cfg).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let mut ids = vec![a_id.clone()];
    let mut others = Vec::new();
    for _ in 0..3 {
        let (mut c, c_id) = server.greeted().await;
        let peers = c.join("lobby", None).await;
        // Up to `listed_peers` others: everyone, and everyone is told.
        assert_eq!(peers.len(), ids.len());
        assert!(matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == c_id));
        ids.push(c_id);
        others.push(c);
    }
    for c in &mut others {
        while c.try_recv(Duration::from_millis(100)).await.is_some() {}
    }
    // The fifth member: 4 others, more than 3.
    let (mut e, e_id) = server.greeted().await;
    e.send_json(json!({"type": "join", "room": "lobby"})).await;
    match e.recv().await {
        ServerMsg::Joined { peers, size, resumed: false, .. } => {
            assert_eq!(size, Some(4));
            assert_eq!(peers.len(), 3);
            assert!(peers.iter().all(|p| ids.contains(&p.id)), "{peers:?}");
        }
        other => panic!("expected joined, got {other:?}"),
    }
    assert_eq!(a.try_recv(Duration::from_millis(300)).await, None, "a large room's join is quiet");
    // Members still reach each other through the server.
    still_served(&mut a, &a_id, &mut e, &e_id, "lobby", 1).await;
    // Its leave is quiet too (counted with the leaver, as the join was).
    e.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert!(matches!(e.recv().await, ServerMsg::Left { .. }));
    assert_eq!(a.try_recv(Duration::from_millis(300)).await, None, "a large room's leave is quiet");
    // Back to 4 members: presence again.
    let mut d = others.pop().expect("member");
    d.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert!(matches!(d.recv().await, ServerMsg::Left { .. }));
    assert!(matches!(a.recv().await, ServerMsg::PeerLeft { .. }));
}

on_both_backends!(
    a_large_room_lists_a_sample_and_keeps_presence_quiet,
    a_resume_needs_no_fresh_join_token_for_a_place_it_holds,
    a_resumed_client_takes_its_place_back_unnoticed,
    joined_comes_before_any_peer_joined_even_when_joins_race,
    messages_before_hello_are_refused,
    presence_join_leave_and_drop,
    joined_lists_members_longest_present_first,
    join_errors,
    signals_are_relayed_with_the_sender_stamped,
    send_to_one_and_broadcast,
    repeated_sends_follow_every_change_of_the_room,
);

/// Redis restarted, its data lost: the nodes put their members back and
/// the members hear nothing of it (no `peer_left`); while it is away a
/// join is refused `unavailable` and members on one node still reach each
/// other; once it is back, relaying across nodes and joins work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_member() {
    let mut server = TestServer::on(Backend::Redis, config()).await;
    // Clients go to nodes 0, 1, 2, 0 in turn.
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.member("lobby", "bob").await;
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { .. }));
    let (mut c, c_id) = server.greeted().await;
    let (mut d, d_id) = server.member("lobby", "dan").await;
    for x in [&mut a, &mut b] {
        assert!(matches!(x.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == d_id));
    }
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 1).await;

    let redis = server.redis.as_mut().expect("redis");
    redis.kill().await;
    for addr in &server.addrs {
        backplane_is(*addr, false).await;
    }
    c.send_json(json!({"type": "join", "room": "lobby"})).await;
    let why = c.expect_error(ErrorCode::Unavailable).await;
    assert!(why.contains("lobby"), "{why}");
    // A and D share node 0: served without Redis.
    still_served(&mut a, &a_id, &mut d, &d_id, "lobby", 2).await;

    redis.run().await;
    for addr in &server.addrs {
        backplane_up(*addr).await;
    }
    // A lease and a half: the nodes have put their members back and
    // compared each room with Redis; nobody was told anyone left.
    for x in [&mut a, &mut b, &mut d] {
        assert_eq!(x.try_recv(Duration::from_millis(2500)).await, None, "no presence change");
    }
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 3).await;
    still_served(&mut b, &b_id, &mut d, &d_id, "lobby", 4).await;
    let peers: Vec<PeerId> = c.join("lobby", None).await.into_iter().map(|p| p.id).collect();
    assert_eq!(peers.len(), 3, "{peers:?}");
    for id in [&a_id, &b_id, &d_id] {
        assert!(peers.contains(id), "{id} listed after the restart: {peers:?}");
    }
    for x in [&mut a, &mut b, &mut d] {
        assert!(matches!(x.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == c_id));
    }
    still_served(&mut c, &c_id, &mut a, &a_id, "lobby", 5).await;
}

/// A node shut down drains: its members are told `shutting_down` at once
/// and keep their places for the drain grace. One that resumes on another
/// node within it is never seen to leave; one that does not leaves when
/// the grace is over (the others are told `peer_left` then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_drains_its_members_to_the_others() {
    let grace = Duration::from_millis(1500);
    let mut server = TestServer::on(Backend::Redis, Config { drain_grace: grace, ..config() }).await;
    // Clients go to nodes 0, 1, 2, 0, 1 in turn.
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let mut b = server.client().await;
    let (b_id, token) = b.hello_resuming(None).await;
    b.join("lobby", Some("bob")).await;
    let (_c, _) = server.member("other", "cy").await;
    let (_d, _) = server.member("other", "di").await;
    let (mut e, e_id) = server.member("lobby", "eve").await;
    for _ in 0..2 {
        assert!(matches!(a.recv().await, ServerMsg::PeerJoined { .. }));
    }
    assert!(matches!(b.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == e_id));

    // Node 1 (B and E) stops: both are told to go elsewhere.
    let (stop, task) = server.others.remove(0);
    let stopped_at = Instant::now();
    stop.send(()).expect("node 1 running");
    for x in [&mut b, &mut e] {
        let ServerMsg::Error { code, .. } = x.recv().await else { panic!("expected shutting_down") };
        assert_eq!(code, ErrorCode::ShuttingDown);
    }
    // B resumes on node 2; E does not.
    let mut b2 = Client::connect(server.addrs[2]).await;
    assert_eq!(b2.hello_resuming(Some(&token)).await.0, b_id);
    let (listed, resumed) = b2.join_resuming("lobby", Some("bob")).await;
    let listed: Vec<PeerId> = listed.into_iter().map(|p| p.id).collect();
    assert_eq!(listed, [a_id.clone(), e_id.clone()], "E keeps its place during the grace");
    assert!(resumed);
    timeout(WAIT, task).await.expect("node 1 stopped in time").unwrap().unwrap();
    // Only E leaves, once the grace is over.
    assert_eq!(a.recv().await, ServerMsg::PeerLeft { room: "lobby".into(), peer_id: e_id.clone() });
    assert!(stopped_at.elapsed() >= grace, "E left {:?} after the stop", stopped_at.elapsed());
    assert_eq!(b2.recv().await, ServerMsg::PeerLeft { room: "lobby".into(), peer_id: e_id });
    assert_eq!(a.try_recv(Duration::from_millis(500)).await, None, "nothing about B");
    still_served(&mut a, &a_id, &mut b2, &b_id, "lobby", 1).await;
    still_served(&mut b2, &b_id, &mut a, &a_id, "lobby", 2).await;
}

// ---------------------------------------------------------------- greeting

#[tokio::test]
async fn welcome_carries_version_peer_id_limits_and_ice_servers() {
    let ice = IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: None, credential: None };
    let cfg = Config { ice_servers: vec![ice.clone()], ..config() };
    let limits = cfg.limits;
    let server = TestServer::start(cfg).await;

    let mut a = server.client().await;
    a.send_json(fixture("client/hello.json")).await;
    let ServerMsg::Welcome { version, peer_id, ice_servers, limits: announced, .. } = a.recv().await else {
        panic!("expected welcome")
    };
    assert_eq!(version, 1);
    assert!(!peer_id.as_str().is_empty());
    assert_eq!(announced, limits, "welcome announces the limits the server enforces");
    assert_eq!(ice_servers, vec![ice]);

    let (_b, b_id) = server.greeted().await;
    assert_ne!(peer_id, b_id, "every connection gets its own id");
}

/// A provider makes ICE servers per peer (short-lived TURN credentials
/// named after the peer) and sees the host the client connected to.
#[tokio::test]
async fn welcome_carries_ice_servers_made_for_each_peer() {
    let stat = IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: None, credential: None };
    let provider = peerlink_signal::IceProvider::new(|req| {
        vec![IceServer {
            urls: vec![format!("turn:{}:3478", req.host.unwrap_or("?"))],
            username: Some(format!("4102444800:{}", req.peer)),
            credential: Some("secret-derived".into()),
        }]
    });
    let cfg = Config { ice_servers: vec![stat.clone()], ice_provider: Some(provider), ..config() };
    let server = TestServer::start(cfg).await;
    for _ in 0..2 {
        let mut c = server.client().await;
        c.send_json(fixture("client/hello.json")).await;
        let ServerMsg::Welcome { peer_id, ice_servers, .. } = c.recv().await else {
            panic!("expected welcome")
        };
        assert_eq!(ice_servers[0], stat, "the static servers come first");
        assert_eq!(ice_servers[1].urls, ["turn:127.0.0.1:3478"], "the host the client used");
        assert_eq!(ice_servers[1].username.as_deref(), Some(format!("4102444800:{peer_id}").as_str()));
    }
}

/// Peers joining one room at the same moment: each gets its `joined` before
/// any `peer_joined` about the others (a client may treat anything else
/// before `joined` as a broken server).
async fn joined_comes_before_any_peer_joined_even_when_joins_race(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    for round in 0..40 {
        let mut clients = Vec::new();
        // The test config allows 4 members per room.
        for _ in 0..4 {
            clients.push(server.greeted().await.0);
        }
        let room = format!("race-{round}");
        let joins = clients.into_iter().map(|mut c| {
            let room = room.clone();
            tokio::spawn(async move {
                c.send_json(json!({"type": "join", "room": room})).await;
                let first = c.recv().await;
                assert!(matches!(first, ServerMsg::Joined { .. }), "first answer to join: {first:?}");
                c
            })
        });
        for j in joins.collect::<Vec<_>>() {
            j.await.unwrap();
        }
    }
}

#[tokio::test]
async fn wrong_version_is_refused_and_closed() {
    let server = TestServer::start(config()).await;
    let mut c = server.client().await;
    c.send_json(json!({"type": "hello", "version": 2})).await;
    c.expect_fatal(ErrorCode::UnsupportedVersion, CloseCode::Protocol).await;

    // The server itself is fine.
    server.greeted().await;
}

async fn messages_before_hello_are_refused(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let mut early = server.client().await;
    early.send_json(json!({"type": "join", "room": "lobby"})).await;
    early.expect_error(ErrorCode::HelloRequired).await;
    early.send_json(json!({"type": "ping", "nonce": 1})).await;
    early.expect_error(ErrorCode::HelloRequired).await;

    // The connection stays usable, and the early join had no effect.
    let early_id = early.hello().await;
    let (mut other, _) = server.greeted().await;
    assert_eq!(other.join("lobby", None).await, vec![], "a join before hello must not join");
    let peers = early.join("lobby", None).await;
    assert_eq!(peers.len(), 1);
    assert_ne!(peers[0].id, early_id);

    early.send_json(json!({"type": "hello", "version": 1})).await;
    early.expect_error(ErrorCode::AlreadyGreeted).await;
    early.ping(2).await;
}

#[tokio::test]
async fn no_hello_in_time_closes_the_connection() {
    let cfg = Config { hello_timeout: Duration::from_millis(200), ..config() };
    let server = TestServer::start(cfg).await;
    let mut c = server.client().await;
    c.expect_fatal(ErrorCode::HelloRequired, CloseCode::Protocol).await;
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let server = TestServer::start(config()).await;
    let mut c = server.client().await;
    c.send_json(json!({"type": "hello", "version": 1, "features": ["x"]})).await;
    assert!(matches!(c.recv().await, ServerMsg::Welcome { .. }));
    c.send_json(json!({"type": "ping", "nonce": 9, "priority": "high"})).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { nonce: Some(9) });
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { nonce: None });
}

// ---------------------------------------------------------------- presence

async fn presence_join_leave_and_drop(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let (mut a, a_id) = server.greeted().await;
    assert_eq!(a.join("lobby", Some("ada")).await, vec![]);

    let (mut b, b_id) = server.greeted().await;
    let peers = b.join("lobby", Some("bob")).await;
    assert_eq!(peers, vec![PeerInfo { id: a_id.clone(), name: Some("ada".into()) }]);
    assert_eq!(
        a.recv().await,
        ServerMsg::PeerJoined {
            room: "lobby".into(),
            peer: PeerInfo { id: b_id.clone(), name: Some("bob".into()) }
        }
    );

    b.send_json(fixture("client/leave.json")).await;
    assert_eq!(b.recv().await, ServerMsg::Left { room: "lobby".into() });
    assert_eq!(a.recv().await, ServerMsg::PeerLeft { room: "lobby".into(), peer_id: b_id.clone() });
    b.send_json(json!({"type": "leave", "room": "lobby"})).await;
    b.expect_error(ErrorCode::NotInRoom).await;

    // Without a name, and then gone without a word.
    let peers = b.join("lobby", None).await;
    assert_eq!(peers, vec![PeerInfo { id: a_id.clone(), name: Some("ada".into()) }]);
    assert_eq!(
        a.recv().await,
        ServerMsg::PeerJoined { room: "lobby".into(), peer: PeerInfo { id: b_id.clone(), name: None } }
    );
    drop(b);
    assert_eq!(a.recv().await, ServerMsg::PeerLeft { room: "lobby".into(), peer_id: b_id });

    // A third peer sees only A.
    let (mut c, _) = server.greeted().await;
    assert_eq!(c.join("lobby", None).await, vec![PeerInfo { id: a_id, name: Some("ada".into()) }]);
}

/// `joined` lists members longest present first: whoever created a room
/// (the sender of a code, say) is first, however many joined after.
async fn joined_lists_members_longest_present_first(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    // The test config allows four members: three, then one more later.
    for i in 0..3 {
        let (mut c, id) = server.greeted().await;
        let before = c.join("order", Some(&format!("m{i}"))).await;
        let listed: Vec<PeerId> = before.into_iter().map(|p| p.id).collect();
        assert_eq!(listed, ids, "member {i} sees the others in join order");
        ids.push(id);
        clients.push(c);
    }
    // The second leaves and comes back: it is now the newest.
    let mut back = clients.remove(1);
    back.send_json(json!({"type": "leave", "room": "order"})).await;
    // It first hears of the third joining.
    assert!(matches!(back.recv().await, ServerMsg::PeerJoined { .. }));
    assert_eq!(back.recv().await, ServerMsg::Left { room: "order".into() });
    let returning = ids.remove(1);
    back.join("order", None).await;
    ids.push(returning);
    let (mut last, _) = server.greeted().await;
    let listed: Vec<PeerId> = last.join("order", None).await.into_iter().map(|p| p.id).collect();
    assert_eq!(listed, ids);
}

async fn join_errors(backend: Backend) {
    let cfg = Config {
        limits: Limits { max_peers_per_room: 2, max_rooms_per_connection: 2, ..config().limits },
        ..config()
    };
    let server = TestServer::on(backend, cfg).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await; // peer_joined

    // room_full: refused, and nobody hears about it.
    let (mut c, c_id) = server.greeted().await;
    c.send_json(json!({"type": "join", "room": "lobby"})).await;
    c.expect_error(ErrorCode::RoomFull).await;
    still_served(&mut b, &b_id, &mut a, &a_id, "lobby", 1).await;
    c.signal("lobby", &a_id, json!({"kind": "end_of_candidates"})).await;
    c.expect_error(ErrorCode::NotInRoom).await;
    // A freed slot can be taken.
    b.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(b.recv().await, ServerMsg::Left { room: "lobby".into() });
    assert_eq!(a.recv().await, ServerMsg::PeerLeft { room: "lobby".into(), peer_id: b_id.clone() });
    assert_eq!(c.join("lobby", None).await, vec![PeerInfo { id: a_id.clone(), name: Some("ada".into()) }]);
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { peer, .. } if peer.id == c_id));

    // already_joined.
    a.send_json(json!({"type": "join", "room": "lobby"})).await;
    a.expect_error(ErrorCode::AlreadyJoined).await;

    // too_many_rooms: A is in lobby; one more is fine, a third is not.
    a.join("second", None).await;
    a.send_json(json!({"type": "join", "room": "third"})).await;
    a.expect_error(ErrorCode::TooManyRooms).await;
    a.send_json(json!({"type": "leave", "room": "second"})).await;
    assert_eq!(a.recv().await, ServerMsg::Left { room: "second".into() });
    a.join("third", None).await;

    // invalid_room and invalid_name.
    for room in [json!(""), json!("a b"), json!("../x"), json!("x".repeat(65)), json!("lobby/1"), json!("é")]
    {
        b.send_json(json!({"type": "join", "room": room})).await;
        b.expect_error(ErrorCode::InvalidRoom).await;
    }
    b.join(&"x".repeat(64), None).await;
    b.send_json(json!({"type": "join", "room": "named", "name": "n".repeat(65)})).await;
    b.expect_error(ErrorCode::InvalidName).await;
    b.join("named", Some(&"n".repeat(64))).await;

    // Everybody is still served.
    still_served(&mut a, &a_id, &mut c, &c_id, "lobby", 2).await;
    b.ping(3).await;
}

// ---------------------------------------------------------------- relay

async fn signals_are_relayed_with_the_sender_stamped(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", Some("bob")).await;
    a.recv().await; // peer_joined
    let (mut c, c_id) = server.greeted().await;
    c.join("lobby", None).await;
    a.recv().await;
    b.recv().await;

    // A full trickle-ICE exchange between A and B, from the golden fixtures.
    for rel in
        ["client/signal_offer.json", "client/signal_candidate.json", "client/signal_end_of_candidates.json"]
    {
        let msg = fixture_to(rel, &b_id);
        a.send_json(msg.clone()).await;
        let expected: Signal = serde_json::from_value(msg["signal"].clone()).unwrap();
        assert_eq!(b.expect_signal("lobby", &a_id).await, expected, "{rel}");
    }
    let answer = fixture_to("client/signal_answer.json", &a_id);
    b.send_json(answer.clone()).await;
    let expected: Signal = serde_json::from_value(answer["signal"].clone()).unwrap();
    assert!(matches!(expected, Signal::Answer { .. }));
    assert_eq!(a.expect_signal("lobby", &b_id).await, expected);

    // C was not addressed: the next thing it gets is from B.
    still_served(&mut b, &b_id, &mut c, &c_id, "lobby", 1).await;
    // And nothing more reached B or A.
    still_served(&mut c, &c_id, &mut a, &a_id, "lobby", 2).await;
    still_served(&mut c, &c_id, &mut b, &b_id, "lobby", 3).await;
}

async fn send_to_one_and_broadcast(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;
    let (mut c, c_id) = server.greeted().await;
    c.join("lobby", None).await;
    a.recv().await;
    b.recv().await;

    // To one peer; `from` nested inside the application data is just data.
    let data = json!({"type": "hello", "name": "ada", "from": "whoever", "n": [1, 2.5, null]});
    a.send_json(json!({"type": "send", "room": "lobby", "to": b_id, "data": data})).await;
    assert_eq!(b.recv().await, ServerMsg::Message { room: "lobby".into(), from: a_id.clone(), data });

    // To the room: everyone but the sender.
    a.send_json(fixture("client/send_room.json")).await;
    let all = ServerMsg::Message { room: "lobby".into(), from: a_id.clone(), data: json!("hi all") };
    assert_eq!(b.recv().await, all);
    assert_eq!(c.recv().await, all);
    // The sender's next message is the pong, not its own broadcast; C got
    // only the broadcast, not the message to B.
    a.ping(1).await;
    still_served(&mut b, &b_id, &mut c, &c_id, "lobby", 2).await;
    still_served(&mut c, &c_id, &mut a, &a_id, "lobby", 3).await;

    // Sending needs membership and a member addressee.
    let (mut d, d_id) = server.member("elsewhere", "dan").await;
    d.send_json(json!({"type": "send", "room": "lobby", "data": 1})).await;
    d.expect_error(ErrorCode::NotInRoom).await;
    a.send_json(json!({"type": "send", "room": "lobby", "to": d_id, "data": 1})).await;
    a.expect_error(ErrorCode::UnknownPeer).await;
    still_served(&mut c, &c_id, &mut a, &a_id, "lobby", 4).await;
    d.ping(5).await;
}

/// A sender remembers where its last message to a peer went (the
/// server's route cache); every change to the rooms since is seen by its
/// next message: the addressee resuming on another connection, leaving,
/// joining again, and the sender itself leaving.
async fn repeated_sends_follow_every_change_of_the_room(backend: Backend) {
    let server = TestServer::on(backend, config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let mut b = server.client().await;
    let (b_id, token) = b.hello_resuming(None).await;
    b.join("lobby", Some("bob")).await;
    a.recv().await;
    let send = |n: u64| json!({"type": "send", "room": "lobby", "to": b_id, "data": n});
    let got = |n: u64| ServerMsg::Message { room: "lobby".into(), from: a_id.clone(), data: json!(n) };
    for n in 0..3 {
        a.send_json(send(n)).await;
        assert_eq!(b.recv().await, got(n));
    }
    // B on another connection: the next message goes there.
    let mut b2 = server.client().await;
    assert_eq!(b2.hello_resuming(Some(&token)).await.0, b_id);
    b2.join_resuming("lobby", Some("bob")).await;
    let _c = caught_up(&server, 0, json!({"type": "join", "room": "lobby"}), &mut [&mut a, &mut b2]).await;
    a.send_json(send(3)).await;
    assert_eq!(b2.recv().await, got(3));
    assert_eq!(b.try_recv(Duration::from_millis(200)).await, None, "nothing on B's old connection");
    // B leaves: refused, and B hears nothing after its `left`.
    b2.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert!(matches!(b2.recv().await, ServerMsg::Left { .. }));
    assert!(matches!(a.recv().await, ServerMsg::PeerLeft { .. }));
    a.send_json(send(4)).await;
    a.expect_error(ErrorCode::UnknownPeer).await;
    // Back in: delivered again.
    b2.join("lobby", Some("bob")).await;
    assert!(matches!(a.recv().await, ServerMsg::PeerJoined { .. }));
    a.send_json(send(5)).await;
    assert_eq!(b2.recv().await, got(5));
    // A leaves: its messages to the room are refused.
    a.send_json(json!({"type": "leave", "room": "lobby"})).await;
    assert!(matches!(a.recv().await, ServerMsg::Left { .. }));
    a.send_json(send(6)).await;
    a.expect_error(ErrorCode::NotInRoom).await;
    assert!(matches!(b2.recv().await, ServerMsg::PeerLeft { .. }));
    assert_eq!(b2.try_recv(Duration::from_millis(200)).await, None, "B got nothing after A left");
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_input_is_refused_with_the_right_code_and_the_connection_survives() {
    let server = TestServer::start(config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;
    let (mut d, d_id) = server.member("other", "dan").await;
    let offer = json!({"kind": "offer", "sdp": "v=0\r\n"});

    let cases: Vec<(&str, String, ErrorCode)> = vec![
        ("malformed JSON", "{\"type\": \"ping\",".into(), ErrorCode::BadJson),
        ("not JSON at all", "hello".into(), ErrorCode::BadJson),
        ("a JSON array", "[1, 2, 3]".into(), ErrorCode::BadJson),
        ("a JSON string", "\"ping\"".into(), ErrorCode::BadJson),
        ("unknown type", json!({"type": "teleport", "to": "mars"}).to_string(), ErrorCode::UnknownType),
        ("no type", json!({"room": "lobby"}).to_string(), ErrorCode::BadMessage),
        ("join without room", json!({"type": "join"}).to_string(), ErrorCode::BadMessage),
        (
            "signal without signal",
            json!({"type": "signal", "room": "lobby", "to": b_id}).to_string(),
            ErrorCode::BadMessage,
        ),
        ("ill-typed field", json!({"type": "ping", "nonce": "seven"}).to_string(), ErrorCode::BadMessage),
        (
            "spoofed signal",
            json!({"type": "signal", "room": "lobby", "to": b_id, "from": b_id, "signal": offer}).to_string(),
            ErrorCode::SpoofedSender,
        ),
        (
            "spoofed send",
            json!({"type": "send", "room": "lobby", "to": b_id, "from": "p-0", "data": 1}).to_string(),
            ErrorCode::SpoofedSender,
        ),
        (
            "signal to a peer in another room",
            json!({"type": "signal", "room": "lobby", "to": d_id, "signal": offer}).to_string(),
            ErrorCode::UnknownPeer,
        ),
        (
            "signal into a room the sender is not in",
            json!({"type": "signal", "room": "other", "to": d_id, "signal": offer}).to_string(),
            ErrorCode::NotInRoom,
        ),
        (
            "signal to a made-up peer",
            json!({"type": "signal", "room": "lobby", "to": "p-0000000000000000", "signal": offer})
                .to_string(),
            ErrorCode::UnknownPeer,
        ),
        (
            "oversized frame",
            json!({"type": "send", "room": "lobby", "to": b_id, "data": "x".repeat(2000)}).to_string(),
            ErrorCode::TooLarge,
        ),
        ("invalid room", json!({"type": "join", "room": "no spaces"}).to_string(), ErrorCode::InvalidRoom),
    ];
    for (n, (what, text, code)) in cases.into_iter().enumerate() {
        a.send_raw(&text).await;
        let message = a.expect_error(code).await;
        assert!(!message.is_empty(), "{what}");
        // Same connection, the room-mate and the target: all still served,
        // and nothing from the refused message reached anyone.
        still_served(&mut a, &a_id, &mut b, &b_id, "lobby", n as u64).await;
        d.ping(n as u64).await;
    }

    a.send_msg(Message::binary(b"{\"type\":\"ping\"}".to_vec())).await;
    a.expect_error(ErrorCode::BinaryFrame).await;
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 100).await;
}

#[tokio::test]
async fn max_message_bytes_is_inclusive() {
    let server = TestServer::start(config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;

    let envelope = json!({"type": "send", "room": "lobby", "to": b_id, "data": ""}).to_string().len();
    let frame = |len: usize| {
        let text = json!({"type": "send", "room": "lobby", "to": b_id, "data": "x".repeat(len - envelope)});
        let text = text.to_string();
        assert_eq!(text.len(), len);
        text
    };
    a.send_raw(&frame(1024)).await;
    let ServerMsg::Message { from, data, .. } = b.recv().await else { panic!("expected the message") };
    assert_eq!((from, data.as_str().map(str::len)), (a_id.clone(), Some(1024 - envelope)));
    a.send_raw(&frame(1025)).await;
    a.expect_error(ErrorCode::TooLarge).await;
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 1).await;
}

#[tokio::test]
async fn frame_above_the_hard_limit_closes_only_that_connection() {
    let server = TestServer::start(config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;
    let (mut big, big_id) = server.greeted().await;
    big.join("lobby", None).await;
    a.recv().await;
    b.recv().await;

    let text = json!({"type": "send", "room": "lobby", "data": "x".repeat(20 * 1024)}).to_string();
    // The server may hang up before the whole frame is written.
    let _ = timeout(WAIT, big.ws.send(Message::text(text))).await.expect("send timed out");
    big.drain_until_closed(WAIT).await;

    // Nothing of it was delivered; the others see the peer go.
    let gone = ServerMsg::PeerLeft { room: "lobby".into(), peer_id: big_id };
    assert_eq!(a.recv().await, gone);
    assert_eq!(b.recv().await, gone);
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 1).await;
    let (mut c, _) = server.greeted().await;
    assert_eq!(c.join("lobby", None).await.len(), 2);
}

// ---------------------------------------------------------------- rate limit

#[tokio::test]
async fn flood_above_the_rate_limit_is_dropped() {
    let cfg = Config {
        limits: Limits { messages_per_second: 2, message_burst: 10, ..config().limits },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let t0 = Instant::now();
    let (mut a, a_id) = server.member("lobby", "ada").await; // 2 of A's 10 tokens
    let (mut b, b_id) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;

    for seq in 0..30 {
        a.send_json(json!({"type": "send", "room": "lobby", "to": b_id, "data": seq})).await;
    }
    a.expect_error(ErrorCode::RateLimited).await;
    // 8 tokens were left, plus what 2/s refilled since the connection opened
    // (and one for frames still being processed on a slow machine).
    let allowed = 9 + (2.0 * t0.elapsed().as_secs_f64()).ceil() as usize;

    // B got the burst, in order, and nothing past it. The marker below
    // proves the rest are not merely late.
    tokio::time::sleep(Duration::from_millis(1100)).await; // refill 2 tokens
    a.send_json(json!({"type": "send", "room": "lobby", "to": b_id, "data": "marker"})).await;
    let mut got = Vec::new();
    loop {
        let ServerMsg::Message { from, data, .. } = b.recv().await else { panic!("expected messages") };
        assert_eq!(from, a_id);
        if data == "marker" {
            break;
        }
        got.push(data.as_u64().expect("a sequence number"));
    }
    assert!((8..=allowed).contains(&got.len()), "expected 8 to {allowed} messages, got {got:?}");
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>(), "the first ones pass, in order");

    // At most one notice per second: no second rate_limited is queued for A,
    // and A is served again.
    a.ping(1).await;
    // B has its own allowance and was served all along.
    b.ping(2).await;
    b.signal("lobby", &a_id, json!({"kind": "end_of_candidates"})).await;
    assert_eq!(a.expect_signal("lobby", &b_id).await, Signal::EndOfCandidates);
}

#[tokio::test]
async fn binary_frames_count_against_the_rate_limit() {
    let cfg = Config {
        limits: Limits { messages_per_second: 2, message_burst: 10, ..config().limits },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let (mut a, _) = server.greeted().await; // 1 of A's 10 tokens
    for _ in 0..3000 {
        a.send_msg(Message::binary(vec![0u8; 16])).await;
    }
    // A refusal for each frame a token let through, a rate_limited notice
    // (at most one a second), and nothing for the rest: the burst does not
    // turn into 3,000 replies (which would overflow A's own queue and get
    // it kicked as a slow consumer). Once over its rate, A is read again
    // only when it may send (every 500 ms here): silence is 700 ms.
    let mut refusals = 0;
    let mut notices = 0;
    while let Some(msg) = a.try_recv(Duration::from_millis(700)).await {
        match msg {
            ServerMsg::Error { code: ErrorCode::BinaryFrame, .. } => refusals += 1,
            ServerMsg::Error { code: ErrorCode::RateLimited, .. } => notices += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((9..=16).contains(&refusals), "{refusals} binary_frame refusals");
    assert!((1..=3).contains(&notices), "{notices} rate_limited notices");
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.ping(7).await;
}

/// A client over its rate is not read again until a token is due: what it
/// sends meanwhile waits in its socket, so a flooder costs the server a
/// read per token, not a read (and a core) for everything it writes.
#[tokio::test]
async fn a_client_over_its_rate_is_read_only_when_it_may_send() {
    let cfg = Config {
        limits: Limits { messages_per_second: 2, message_burst: 10, ..config().limits },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let (mut a, _) = server.greeted().await; // 1 of A's 10 tokens
    let reads = || async {
        let body = http_get(server.addr, "/healthz").await.1;
        serde_json::from_str::<Value>(&body).expect("healthz is JSON")["socket_reads"]
            .as_u64()
            .expect("reads")
    };
    let before = reads().await;
    // 300 pings, one every 2 ms or so (under a second: a burst, not yet a
    // flood): read as they come, that would be ~300 reads.
    for i in 0..300 {
        a.send_json(json!({"type": "ping", "nonce": i})).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let taken = reads().await - before;
    // The 9 tokens left go to the first pings (a read each), then one read
    // per 500 ms token.
    assert!(taken <= 20, "{taken} reads for 300 pings at 2 per second");
    let mut pongs = 0;
    while let Some(msg) = a.try_recv(Duration::from_millis(700)).await {
        match msg {
            ServerMsg::Pong { .. } => pongs += 1,
            ServerMsg::Error { code: ErrorCode::RateLimited, .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((9..=16).contains(&pongs), "{pongs} pings answered");
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.ping(7).await;
}

#[tokio::test]
async fn a_connection_flooding_for_seconds_is_closed_and_others_are_served() {
    let cfg = Config {
        limits: Limits { messages_per_second: 20, message_burst: 20, ..config().limits },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let (mut flooder, flooder_id) = server.member("lobby", "flood").await;
    let (mut b, b_id) = server.member("lobby", "b").await;
    assert!(matches!(flooder.recv().await, ServerMsg::PeerJoined { .. }));
    // One legal burst over the rate for a second is not a flood...
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(900) {
        flooder.send_json(json!({"type": "ping"})).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // (its pings were answered, one notice came, and it is still served)
    let mut pongs = 0;
    while let Some(msg) = flooder.try_recv(Duration::from_millis(200)).await {
        match msg {
            ServerMsg::Pong { .. } => pongs += 1,
            ServerMsg::Error { code: ErrorCode::RateLimited, .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs >= 20, "{pongs} pongs");
    flooder.ping(1).await;
    // ...but four seconds at ten times the rate are.
    let t1 = Instant::now();
    let mut closed = false;
    while t1.elapsed() < Duration::from_secs(6) && !closed {
        flooder.send_json(json!({"type": "ping"})).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        while let Some(msg) = flooder.try_recv(Duration::from_millis(0)).await {
            if let ServerMsg::Error { code: ErrorCode::Flooding, message } = msg {
                assert!(message.contains("3 seconds in a row"), "{message}");
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the flooder was not closed");
    let flooded_for = t1.elapsed();
    assert!(flooded_for >= Duration::from_secs(1), "closed after only {flooded_for:?}");
    let frame = flooder.expect_close().await.expect("a close frame");
    assert_eq!(frame.reason.as_str(), "flooding");
    // The room is told it left; B is served throughout.
    b.chat_until_left(&flooder_id).await;
    b.ping(9).await;
    let _ = b_id;
}

// ---------------------------------------------------------------- liveness

#[tokio::test]
async fn idle_connection_is_closed_and_its_rooms_told() {
    let cfg = Config { limits: Limits { idle_timeout_ms: 300, ..config().limits }, ..config() };
    let server = TestServer::start(cfg).await;
    let (mut idle, idle_id) = server.member("lobby", "ada").await;
    let (mut b, _) = server.greeted().await;
    b.join("lobby", None).await;
    let since = Instant::now();

    // B keeps talking; `idle` is not read from or written to, so it does not
    // even answer the server's pings.
    let left_after = b.chat_until_left(&idle_id).await;
    assert!(left_after >= Duration::from_millis(250), "timed out early: {left_after:?}");
    // B, talking every 50 ms, outlives several idle periods.
    let mut n = 1000;
    while since.elapsed() < Duration::from_millis(1000) {
        n += 1;
        b.ping(n).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The idle client finds B's arrival, then the notice and the close.
    assert!(matches!(idle.recv().await, ServerMsg::PeerJoined { .. }));
    idle.expect_fatal(ErrorCode::IdleTimeout, CloseCode::Policy).await;
}

#[tokio::test]
async fn answering_server_pings_keeps_a_quiet_client_alive() {
    let cfg = Config {
        heartbeat: Duration::from_millis(100),
        limits: Limits { idle_timeout_ms: 400, ..config().limits },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let (mut quiet, _) = server.member("lobby", "ada").await;

    // Keep reading (tungstenite answers pings while read) but send nothing.
    let until = Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    while let Ok(frame) = timeout_at(until, quiet.ws.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert!(pings >= 5, "the server pings every heartbeat; saw {pings}");
    quiet.ping(1).await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_the_flooder_still_served() {
    // A queue of 64: small enough to fill quickly, large enough that the
    // flooder, which reads its own replies only between batches, never
    // overflows its own queue with the refusals of sends in flight.
    let server = TestServer::start(Config {
        slow_consumer_timeout: Duration::from_secs(1),
        ..flood_config(64, 30_000)
    })
    .await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut slow, slow_id) = server.greeted().await;
    slow.join("lobby", None).await;
    a.recv().await;

    // `slow` never reads from here on: once the socket buffers are full the
    // server's queue for it fills up, the sender is told, and a second
    // later `slow` is closed.
    let refused = send_until_dropped(&mut a, &slow_id).await;
    assert!(refused > 0, "the sender was told its messages did not fit");

    // The flooder is still served (after refusals for sends already in flight).
    a.send_json(json!({"type": "ping", "nonce": 1})).await;
    loop {
        match a.recv().await {
            ServerMsg::Pong { nonce: Some(1) } => break,
            ServerMsg::Error { code: ErrorCode::UnknownPeer, .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (mut c, c_id) = server.greeted().await;
    c.join("lobby", None).await;
    a.recv().await;
    still_served(&mut a, &a_id, &mut c, &c_id, "lobby", 2).await;

    // The slow client, when it finally reads, finds its connection ended.
    slow.drain_until_closed(Duration::from_secs(20)).await;
}

fn flood_config(outbound_queue: usize, idle_timeout_ms: u64) -> Config {
    Config {
        outbound_queue,
        // Bounded by the message count alone here; the byte bound has its own test.
        outbound_queue_bytes: 1 << 30,
        queue_budget_bytes: 1 << 40,
        limits: Limits {
            max_message_bytes: 64 * 1024,
            messages_per_second: 100_000,
            message_burst: 100_000,
            idle_timeout_ms,
            ..config().limits
        },
        hard_frame_limit: 256 * 1024,
        ..config()
    }
}

/// The queue is bounded in bytes too: with room for 100,000 messages, a
/// client that stops reading has at most 256 KiB waiting for it (beyond
/// what the socket buffers hold), not gigabytes: what does not fit is
/// refused to the sender, and the client is closed once it has read
/// nothing for the slow-consumer timeout.
#[tokio::test]
async fn a_client_that_stops_reading_pins_at_most_its_byte_budget() {
    let cfg = Config {
        outbound_queue_bytes: 256 * 1024,
        slow_consumer_timeout: Duration::from_secs(1),
        ..flood_config(100_000, 30_000)
    };
    let server = TestServer::start(cfg).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    let (mut slow, slow_id) = server.greeted().await;
    slow.join("lobby", None).await;
    a.recv().await;
    let refused = send_until_dropped(&mut a, &slow_id).await;
    assert!(refused > 0, "the sender was told its messages did not fit");
    slow.drain_until_closed(Duration::from_secs(20)).await;
}

/// All queues together are bounded by the server's budget: two clients
/// that stop reading, each with room for 256 KiB, share a budget of
/// 320 KiB. Past it senders get `peer_busy` saying so, and `/healthz`
/// never shows more queued than the budget. (Messages of 30 kB: each queue
/// fills to within one message of its 192 KiB share for relayed messages,
/// so two of them pass the budget.)
#[tokio::test]
async fn all_queues_together_stay_within_the_server_budget() {
    let budget = 320 * 1024;
    let cfg = Config {
        outbound_queue_bytes: 256 * 1024,
        queue_budget_bytes: budget,
        slow_consumer_timeout: Duration::from_secs(30),
        ..flood_config(100_000, 60_000)
    };
    let server = TestServer::start(cfg).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let (mut s, id) = server.greeted().await;
        s.join("lobby", None).await;
        a.recv().await;
        stuck.push((s, id));
    }
    let payload = "x".repeat(30_000);
    let mut server_full = false;
    for round in 0..400 {
        for (_, id) in &stuck {
            a.send_json(json!({"type": "send", "room": "lobby", "to": id, "data": payload})).await;
        }
        while let Some(msg) = a.try_recv(Duration::from_millis(1)).await {
            match msg {
                ServerMsg::Error { code: ErrorCode::PeerBusy, message } => {
                    server_full |= message.contains("the server's queue budget is used up");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if server_full && round % 10 == 0 {
            break;
        }
    }
    assert!(server_full, "the budget was never reached");
    let (_, body) = http_get(server.addr, "/healthz").await;
    let health: Value = serde_json::from_str(&body).expect("json");
    let queued = health["queued_bytes"].as_u64().expect("queued_bytes");
    assert!(queued <= budget as u64 && queued > 200 * 1024, "{health}");
    assert_eq!(health["queue_budget_bytes"], budget as u64);
    // When the stuck clients go, their queues leave the budget.
    drop(stuck);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(server.addr, "/healthz").await;
        let health: Value = serde_json::from_str(&body).expect("json");
        if health["queued_bytes"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "queued bytes not given back: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ten members each send one legal burst of 200 messages to one member
/// that reads as fast as it can: it gets all 2,000, in order per sender,
/// and nobody is refused or closed.
#[tokio::test]
async fn an_honest_reader_takes_a_whole_rooms_burst() {
    let cfg = Config {
        limits: Limits {
            max_peers_per_room: 32,
            messages_per_second: 50,
            message_burst: 200,
            ..config().limits
        },
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let (mut reader, reader_id) = server.member("lobby", "reader").await;
    let mut senders = Vec::new();
    for i in 0..10 {
        let (c, id) = server.member("lobby", &format!("s{i}")).await;
        senders.push((c, id));
    }
    // Each sender hears of those who joined after it.
    for (i, (c, _)) in senders.iter_mut().enumerate() {
        for _ in i + 1..10 {
            assert!(matches!(c.recv().await, ServerMsg::PeerJoined { .. }));
        }
    }
    // The reader's presence news, read now so only the burst follows.
    for _ in 0..10 {
        assert!(matches!(reader.recv().await, ServerMsg::PeerJoined { .. }));
    }
    let bursts = senders.iter_mut().map(|(c, _)| {
        let to = reader_id.clone();
        async move {
            for n in 0..200 {
                c.send_json(json!({"type": "send", "room": "lobby", "to": to, "data": n})).await;
            }
        }
    });
    let reading = async {
        let mut next: std::collections::HashMap<PeerId, u64> = Default::default();
        for _ in 0..2000 {
            match reader.recv().await {
                ServerMsg::Message { from, data, .. } => {
                    let want = next.entry(from.clone()).or_default();
                    assert_eq!(data, json!(*want), "in order from {from}");
                    *want += 1;
                }
                other => panic!("the reader got {other:?}"),
            }
        }
        next
    };
    let (_, got) = tokio::join!(futures_util::future::join_all(bursts), reading);
    assert_eq!(got.len(), 10);
    assert!(got.values().all(|&n| n == 200), "{got:?}");
    for (c, _) in &mut senders {
        assert!(c.try_recv(Duration::from_millis(20)).await.is_none(), "a sender was refused something");
    }
}

/// Sends 60 kB messages from `a` to `slow`, which does not read, until the
/// server drops `slow` (a `peer_left`); returns how many were refused with
/// `peer_busy` meanwhile. Socket buffers on loopback hold a few MB; 2,000
/// messages are 120 MB.
async fn send_until_dropped(a: &mut Client, slow_id: &PeerId) -> usize {
    let payload = "x".repeat(60_000);
    let mut sent = 0;
    let mut refused = 0;
    let mut gone = false;
    while !gone {
        assert!(sent < 2000, "slow consumer still connected after {sent} messages of 60 kB");
        for _ in 0..4 {
            a.send_json(json!({"type": "send", "room": "lobby", "to": slow_id, "data": payload})).await;
            sent += 1;
        }
        // Read everything the server has for the sender, so that it is not
        // the slow consumer itself.
        while let Some(msg) = a.try_recv(Duration::from_millis(1)).await {
            match msg {
                ServerMsg::PeerLeft { peer_id, .. } if peer_id == *slow_id => gone = true,
                ServerMsg::Error { code: ErrorCode::PeerBusy, message } if !gone => {
                    assert!(message.contains(slow_id.as_str()), "{message}");
                    refused += 1;
                }
                // Sends already in flight when `slow` was dropped.
                ServerMsg::Error { code: ErrorCode::UnknownPeer | ErrorCode::PeerBusy, .. } if gone => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if refused > 0 {
            // Full: wait for the slow-consumer timeout rather than spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    refused
}

/// Queues ~36 MB for `to`: more than the socket buffers between the server
/// and a client that does not read hold, less than a 4096-message queue.
async fn fill_socket(from: &mut Client, to: &PeerId) {
    let payload = "x".repeat(60_000);
    for _ in 0..600 {
        from.send_json(json!({"type": "send", "room": "lobby", "to": to, "data": payload})).await;
    }
}

/// A client that stopped reading, with room left in its queue (so no
/// slow_consumer kick): the server's write to it blocks. That must not exempt
/// it from the idle timeout.
#[tokio::test]
async fn a_client_blocking_the_server_write_is_still_timed_out() {
    let server = TestServer::start(flood_config(4096, 1500)).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    let (mut stuck, stuck_id) = server.greeted().await;
    stuck.join("lobby", None).await;
    a.recv().await;

    fill_socket(&mut a, &stuck_id).await;
    // A stays active; `stuck` is silent, so it must time out.
    a.chat_until_left(&stuck_id).await;
    stuck.drain_until_closed(Duration::from_secs(20)).await;
}

/// Likewise, a client blocking the server's write must not hold up shutdown.
#[tokio::test]
async fn a_client_blocking_the_server_write_does_not_hold_up_shutdown() {
    let mut server = TestServer::start(flood_config(4096, 30_000)).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    let (mut stuck, stuck_id) = server.greeted().await;
    stuck.join("lobby", None).await;
    a.recv().await;

    fill_socket(&mut a, &stuck_id).await;
    a.ping(1).await;
    let took = server.shut_down(Duration::from_secs(8)).await;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    stuck.drain_until_closed(Duration::from_secs(20)).await;
}

// ---------------------------------------------------------------- shutdown

/// A client that closes gets the server's close frame back: the close
/// handshake completes (browsers otherwise report 1006, "no close frame").
#[tokio::test]
async fn a_clients_close_is_answered_with_a_close() {
    let server = TestServer::start(config()).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    a.send_msg(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await;
    match a.next_frame(Instant::now() + WAIT).await {
        Some(Message::Close(frame)) => assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal)),
        other => panic!("expected the server's close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_and_returns() {
    let mut server = TestServer::start(config()).await;
    let (mut a, _) = server.member("lobby", "ada").await;
    let (mut b, _) = server.greeted().await;
    b.join("lobby", None).await;
    a.recv().await;
    let mut ungreeted = server.client().await;

    let took = server.shut_down(WAIT).await;
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");

    for c in [&mut a, &mut b, &mut ungreeted] {
        // No `peer_left`: the room ends with the process, and its members
        // will take their places back (resume) wherever they reconnect.
        let msg = c.recv().await;
        let ServerMsg::Error { code, .. } = msg else { panic!("expected shutting_down, got {msg:?}") };
        assert_eq!(code, ErrorCode::ShuttingDown);
        let frame = c.expect_close().await.expect("a close frame");
        assert_eq!(frame.code, CloseCode::Away);
    }

    // Nobody is listening any more.
    let refused = timeout(WAIT, connect_async(format!("ws://{}/ws", server.addr))).await.expect("timed out");
    assert!(refused.is_err(), "the server still accepts connections");
}

// ---------------------------------------------------------------- health

async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = timeout(WAIT, TcpStream::connect(addr)).await.expect("timed out").expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    timeout(WAIT, stream.write_all(request.as_bytes())).await.expect("timed out").expect("write");
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response)).await.expect("timed out").expect("read");
    let response = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header/body separator");
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn healthz_reports_ok_and_counts() {
    let server = TestServer::start(config()).await;
    let (head, body) = http_get(server.addr, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["status"], "ok");
    assert_eq!((v["connections"].as_u64(), v["rooms"].as_u64()), (Some(0), Some(0)), "{v}");

    let (_a, _) = server.member("lobby", "ada").await;
    let (_b, _) = server.member("other", "bob").await;
    let (_, body) = http_get(server.addr, "/healthz").await;
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!((v["connections"].as_u64(), v["rooms"].as_u64()), (Some(2), Some(2)), "{v}");

    let (head, _) = http_get(server.addr, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Reads until the server closes the connection; how long that took, or
/// `None` if it was still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match timeout_at(start + within, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Slowloris: connections that send half a request and then trickle
/// nothing more are closed at the request timeout, and meanwhile normal
/// clients connect and are served.
#[tokio::test]
async fn half_sent_requests_are_closed_at_the_request_timeout() {
    let server = TestServer::start(Config { request_timeout: Duration::from_secs(1), ..config() }).await;
    let mut loris = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n").await.expect("write");
        loris.push(s);
    }
    // A byte now and then does not keep a request alive.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for s in &mut loris {
        s.write_all(b"X").await.expect("write");
    }
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.member("lobby", "bob").await;
    a.recv().await; // bob's peer_joined
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 3).await;
    for s in &mut loris {
        let took = closed_within(s, Duration::from_secs(3)).await;
        assert!(took.is_some(), "a half-sent request was still open 3 s later");
    }
    let (_, body) = http_get(server.addr, "/healthz").await;
    let health: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["requests_timed_out"], 50, "{health}");
    assert_eq!(health["tcp_connections"], 3, "two clients and this request: {health}");
}

/// The request timeout is for HTTP only: a WebSocket that stays quiet for
/// longer than it is still served.
#[tokio::test]
async fn websockets_outlive_the_request_timeout() {
    let server = TestServer::start(Config { request_timeout: Duration::from_secs(1), ..config() }).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.member("lobby", "bob").await;
    a.recv().await; // bob's peer_joined
    tokio::time::sleep(Duration::from_millis(1800)).await;
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 3).await;
}

/// ... but a frame (or a fragmented message) must be whole within it: a
/// client trickling a byte now and then, which keeps the idle timer happy,
/// does not pin the server's buffers for its frame for ever.
#[tokio::test]
async fn a_frame_trickled_in_is_closed_at_the_request_timeout() {
    let server = TestServer::start(Config { request_timeout: Duration::from_millis(800), ..config() }).await;
    let mut c =
        RawClient::connect(server.addr, &RawClient::text(&json!({"type": "hello", "version": 1}))).await;
    let frame = RawClient::text(&json!({"type": "join", "room": "lobby", "pad": "x".repeat(200)}));
    let started = Instant::now();
    let mut sent = 0;
    let closed = loop {
        if sent < frame.len() {
            // A byte every 100 ms: 2 s for the frame.
            c.tcp.write_all(&frame[sent..sent + 1]).await.expect("write");
            sent += 1;
        }
        match timeout(Duration::from_millis(100), c.next()).await {
            Ok(None) => break true,
            Ok(Some((0x8, _))) => break true,
            Ok(Some(_)) | Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(closed, "still open after 5 s with {sent} of {} bytes of a frame", frame.len());
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
}

/// Over a connection cap a connection is answered 503 and closed; the slot
/// of a connection that closes is given back.
#[tokio::test]
async fn connections_over_the_caps_are_refused_with_503() {
    async fn refused(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut response = Vec::new();
        timeout(WAIT, s.read_to_end(&mut response)).await.expect("closed in time").expect("read");
        String::from_utf8(response).expect("utf-8")
    }
    for (total, per_ip) in [(3, 100), (100, 3)] {
        let server =
            TestServer::start(Config { max_connections: total, max_connections_per_ip: per_ip, ..config() })
                .await;
        let (mut a, a_id) = server.member("lobby", "ada").await;
        let (mut b, b_id) = server.member("lobby", "bob").await;
        a.recv().await; // bob's peer_joined
        let c = server.greeted().await;
        let answer = refused(server.addr).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "caps {total}/{per_ip}: {answer}");
        assert!(answer.contains("too many connections"), "{answer}");
        still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 2).await;
        drop(c);
        // The slot comes back once the server has seen the close.
        let deadline = Instant::now() + WAIT;
        let (head, body) = loop {
            let mut s = TcpStream::connect(server.addr).await.expect("connect");
            let request = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            s.write_all(request.as_bytes()).await.expect("write");
            let mut response = Vec::new();
            timeout(WAIT, s.read_to_end(&mut response)).await.expect("timed out").expect("read");
            let response = String::from_utf8(response).expect("utf-8");
            if response.starts_with("HTTP/1.1 200") {
                let (h, b) = response.split_once("\r\n\r\n").expect("separator");
                break (h.to_string(), b.to_string());
            }
            assert!(Instant::now() < deadline, "the closed connection's slot never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(head.starts_with("HTTP/1.1 200"));
        let health: Value = serde_json::from_str(&body).expect("json");
        assert!(health["connections_refused"].as_u64() >= Some(1), "{health}");
        assert_eq!(health["max_connections"], total);
        assert_eq!(health["max_connections_per_ip"], per_ip);
    }
}

/// A refused client that had already sent its request still reads the
/// 503: the server reads what it sent before closing, so the close is not
/// a reset that hides the answer.
#[tokio::test]
async fn a_refused_client_that_sent_its_request_reads_the_503_not_a_reset() {
    let server = TestServer::start(Config { max_connections: 1, ..config() }).await;
    let _held = server.greeted().await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let request = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        s.write_all(request.as_bytes()).await.expect("write");
        // Long enough for the server to have answered and closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut response = Vec::new();
        timeout(WAIT, s.read_to_end(&mut response)).await.expect("closed in time").expect("read, not reset");
        let response = String::from_utf8(response).expect("utf-8");
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }
}

// ------------------------------------------------------------ access control

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// With a join secret, a join needs a token for its room (and name, if
/// the token names one) that has not expired; each refusal is
/// `unauthorized` with the reason, and the connection may try again.
#[tokio::test]
async fn a_join_secret_admits_only_valid_tokens() {
    use peerlink_signal::{JoinClaims, Secret, join_token};
    let secret = "backend secret";
    let server = TestServer::start(Config { join_secret: Some(Secret(secret.into())), ..config() }).await;
    let token = |room: &str, name: Option<&str>, exp: u64| {
        join_token(secret.as_bytes(), &JoinClaims { room: room.into(), name: name.map(Into::into), exp })
    };
    let now = unix_now();
    let (mut c, _) = server.greeted().await;
    let attempts = [
        (None, "requires one"),
        (Some(token("other", None, now + 60)), "for room other"),
        (Some(token("lobby", Some("bob"), now + 60)), "for the name"),
        (Some(token("lobby", None, now - 1)), "expired"),
        (
            Some(join_token(
                b"wrong secret",
                &JoinClaims { room: "lobby".into(), name: None, exp: now + 60 },
            )),
            "secret",
        ),
        (Some("garbage".to_string()), "PAYLOAD.MAC"),
    ];
    for (tok, why) in attempts {
        c.send_json(json!({"type": "join", "room": "lobby", "name": "ada", "token": tok})).await;
        let message = c.expect_error(ErrorCode::Unauthorized).await;
        assert!(message.contains(why), "{why}: {message}");
    }
    c.send_json(json!({"type": "join", "room": "lobby", "name": "ada", "token": token("lobby", Some("ada"), now + 60)}))
        .await;
    assert!(matches!(c.recv().await, ServerMsg::Joined { .. }));
    // A wildcard token lets its holder into any room.
    c.send_json(json!({"type": "join", "room": "elsewhere", "token": token("*", None, now + 60)})).await;
    assert!(matches!(c.recv().await, ServerMsg::Joined { .. }));
}

/// Connects with `Origin: origin` (and the given Host); the first message.
async fn first_message_with_origin(
    addr: SocketAddr,
    origin: &str,
    host: Option<&str>,
) -> (ServerMsg, Option<CloseCode>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("Origin", origin.parse().unwrap());
    if let Some(h) = host {
        req.headers_mut().insert("Host", h.parse().unwrap());
    }
    let (ws, _) =
        timeout(WAIT, tokio_tungstenite::connect_async(req)).await.expect("timed out").expect("connect");
    let mut c = Client { ws };
    c.send_json(json!({"type": "hello", "version": 1})).await;
    let first = c.recv().await;
    let mut close = None;
    if matches!(first, ServerMsg::Error { .. }) {
        let deadline = Instant::now() + WAIT;
        while let Some(msg) = c.next_frame(deadline).await {
            if let Message::Close(frame) = msg {
                close = frame.map(|f| f.code);
                break;
            }
        }
    }
    (first, close)
}

/// With an origin allow-list, pages from other origins are told
/// `origin_not_allowed` and closed (cross-site WebSocket hijacking); listed
/// origins, the server's own pages and clients without an Origin are served.
#[tokio::test]
async fn pages_from_other_origins_are_refused() {
    let server =
        TestServer::start(Config { allowed_origins: vec!["https://app.example".into()], ..config() }).await;
    let (first, close) = first_message_with_origin(server.addr, "https://evil.example", None).await;
    match first {
        ServerMsg::Error { code: ErrorCode::OriginNotAllowed, message } => {
            assert!(message.contains("https://evil.example"), "{message}")
        }
        other => panic!("expected origin_not_allowed, got {other:?}"),
    }
    assert_eq!(close, Some(CloseCode::Policy));
    for (origin, host) in
        [("https://app.example", None), ("http://chat.example:8080", Some("chat.example:8080"))]
    {
        let (first, _) = first_message_with_origin(server.addr, origin, host).await;
        assert!(matches!(first, ServerMsg::Welcome { .. }), "{origin}: {first:?}");
    }
    // Native clients send no Origin.
    let (mut a, _) = server.greeted().await;
    a.join("lobby", None).await;
}

// ---------------------------------------------------------------- metrics

/// The value of the sample `name` (with its labels, as written) in a
/// Prometheus exposition.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /metrics` counts what happened, in the Prometheus text format:
/// connections, rooms, joins, relayed messages by type, errors by code,
/// kicks by reason.
#[tokio::test]
async fn metrics_count_connections_relays_errors_and_kicks() {
    let server = TestServer::start(config()).await;
    let (mut a, a_id) = server.member("lobby", "ada").await;
    let (mut b, b_id) = server.member("lobby", "bob").await;
    a.recv().await;
    still_served(&mut a, &a_id, &mut b, &b_id, "lobby", 1).await;
    a.send_json(json!({"type": "send", "room": "lobby", "data": "hi"})).await;
    b.recv().await;
    a.send_raw("{not json").await;
    a.expect_error(ErrorCode::BadJson).await;
    // One kicked: no hello in time.
    let quiet_config = Config { hello_timeout: Duration::from_millis(200), ..config() };
    let quiet_server = TestServer::start(quiet_config).await;
    let mut quiet = quiet_server.client().await;
    quiet.drain_until_closed(WAIT).await;

    let (head, text) = http_get(server.addr, "/metrics").await;
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(text.contains("# TYPE peerlink_relayed_messages_total counter"), "{text}");
    assert_eq!(sample(&text, "peerlink_connections"), Some(2), "{text}");
    assert_eq!(sample(&text, "peerlink_rooms"), Some(1));
    assert_eq!(sample(&text, "peerlink_joins_total"), Some(2));
    assert_eq!(sample(&text, r#"peerlink_relayed_messages_total{type="signal"}"#), Some(1));
    assert_eq!(sample(&text, r#"peerlink_relayed_messages_total{type="send"}"#), Some(1));
    assert_eq!(sample(&text, r#"peerlink_errors_total{code="bad_json"}"#), Some(1));
    let (_, quiet_text) = http_get(quiet_server.addr, "/metrics").await;
    assert_eq!(
        sample(&quiet_text, r#"peerlink_kicks_total{reason="hello_required"}"#),
        Some(1),
        "{quiet_text}"
    );
    assert_eq!(sample(&quiet_text, r#"peerlink_errors_total{code="hello_required"}"#), Some(1));
    assert_eq!(sample(&text, r#"peerlink_kicks_total{reason="hello_required"}"#), None, "the other server's");
}

/// A free port for a cluster node whose bus port (port + 10000) is free too
/// and exists: ephemeral ports go up to 60999.
/// Whether a Redis server answers `PING` on `port` (not merely something
/// listening there).
async fn answers_ping(port: u16) -> bool {
    let asked = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        tcp.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        tcp.read_exact(&mut reply).await.ok()?;
        Some(&reply == b"+PONG\r\n")
    };
    timeout(Duration::from_secs(1), asked).await.ok().flatten().unwrap_or(false)
}

/// Times a `redis-server` is started on a fresh port when the last one
/// exited before listening.
const SPAWN_ATTEMPTS: usize = 5;

async fn cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).await.is_ok() {
            return port;
        }
    }
    panic!("no port for a cluster node");
}

/// A suffix that keeps two tests' scratch folders apart.
fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

// ------------------------------------------------- the WebSocket wire itself

/// A client speaking the WebSocket wire by hand over TCP, to send what a
/// library would not (unmasked, fragmented, split, broken frames).
struct RawClient {
    tcp: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects, with `first` (frames) in the same write as the request.
    async fn connect(addr: SocketAddr, first: &[u8]) -> RawClient {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(first);
        tcp.write_all(&request).await.expect("request");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = timeout(WAIT, tcp.read(&mut chunk)).await.expect("response in time").expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        // RFC 6455's example key and its answer.
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        RawClient { tcp, buf: buf[head_end..].to_vec() }
    }

    /// One frame as a client sends it: masked unless `unmasked`.
    fn frame(first: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let bit = if unmasked { 0 } else { 0x80 };
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(bit | payload.len() as u8);
        } else {
            out.push(bit | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        if unmasked {
            out.extend_from_slice(payload);
        } else {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        out
    }

    fn text(json: &Value) -> Vec<u8> {
        Self::frame(0x81, json.to_string().as_bytes(), false)
    }

    async fn write(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.tcp.write_all(bytes)).await.expect("write in time").expect("write");
    }

    /// The next frame from the server: opcode and payload (`None`: closed).
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    126 => (usize::MAX, 0),
                    127 => panic!("no server frame here is that large"),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    assert_ne!(self.buf[0] & 0x80, 0, "the server does not fragment");
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match timeout(WAIT, self.tcp.read(&mut chunk)).await.expect("server frame in time") {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next protocol message (pings skipped).
    async fn recv(&mut self) -> ServerMsg {
        loop {
            match self.next().await {
                Some((0x1, text)) => return serde_json::from_slice(&text).expect("a server message"),
                Some((0x9, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The server's close frame: its code (then the socket ends).
    async fn expect_close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some((0x8, payload)) => {
                    assert!(self.next().await.is_none(), "frames after the close frame");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some((0x9, _)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// A client that pings without reading what comes back: one pong waits at
/// a time (RFC 6455 lets one answer the pings before it), so what the
/// server holds for it stays small however many pings it sends; once it
/// reads, a pong with the last ping's payload comes.
#[tokio::test]
async fn pings_from_a_client_that_does_not_read_queue_one_pong() {
    let server = TestServer::start(config()).await;
    let mut c =
        RawClient::connect(server.addr, &RawClient::text(&json!({"type": "hello", "version": 1}))).await;
    // 200,000 pings of 125 bytes: 25 MB of pongs, far more than the
    // sockets between can hold.
    let pings: Vec<u8> =
        (0..1000).flat_map(|i: u32| RawClient::frame(0x89, &[(i % 251) as u8; 125], false)).collect();
    for _ in 0..200 {
        c.write(&pings).await;
    }
    let (_, text) = http_get(server.addr, "/metrics").await;
    let queued = sample(&text, "peerlink_queued_bytes").expect("queued bytes in /metrics");
    assert!(queued < 64 * 1024, "the server holds {queued} bytes for a client that only pings");
    // Reading now: the welcome, then pongs, the last one answering the last ping.
    let mut last_pong = None;
    while let Ok(Some((opcode, payload))) = timeout(Duration::from_millis(500), c.next()).await {
        if opcode == 0xA {
            last_pong = Some(payload);
        }
    }
    assert_eq!(last_pong, Some(vec![(999 % 251) as u8; 125]));
}

/// What browsers and libraries may legally send arrives whole: a message
/// split into fragments with a ping between them (answered with its
/// payload), frames cut at every byte across writes, many frames in one
/// write, and a frame that came in the same packet as the upgrade request.
#[tokio::test]
async fn fragmented_split_and_coalesced_frames_are_read_as_sent() {
    let server = TestServer::start(config()).await;
    let (mut b, b_id) = server.member("lobby", "bob").await;

    // hello in the upgrade request's packet; join cut into single bytes,
    // each its own write.
    let mut a =
        RawClient::connect(server.addr, &RawClient::text(&json!({"type": "hello", "version": 1}))).await;
    for byte in RawClient::text(&json!({"type": "join", "room": "lobby", "name": "ada"})) {
        a.write(&[byte]).await;
        tokio::task::yield_now().await;
    }
    let ServerMsg::Welcome { peer_id: a_id, .. } = a.recv().await else { panic!("expected welcome") };
    assert!(matches!(a.recv().await, ServerMsg::Joined { .. }));
    assert!(matches!(b.recv().await, ServerMsg::PeerJoined { .. }));

    // One message in three fragments, a ping in the middle.
    let whole = json!({"type": "send", "room": "lobby", "to": b_id, "data": "fragmented über"}).to_string();
    let (one, rest) = whole.as_bytes().split_at(10);
    let (two, three) = rest.split_at(20);
    let mut wire = RawClient::frame(0x01, one, false);
    wire.extend(RawClient::frame(0x00, two, false));
    wire.extend(RawClient::frame(0x89, b"are you there", false));
    wire.extend(RawClient::frame(0x80, three, false));
    a.write(&wire).await;
    assert_eq!(a.next().await, Some((0xA, b"are you there".to_vec())), "the ping's payload comes back");
    let ServerMsg::Message { from, data, .. } = b.recv().await else { panic!("expected the message") };
    assert_eq!((from, data), (a_id.clone(), json!("fragmented über")));

    // Fifty messages in one write arrive in order.
    let burst: Vec<u8> = (0..50)
        .flat_map(|i| RawClient::text(&json!({"type": "send", "room": "lobby", "to": b_id, "data": i})))
        .collect();
    a.write(&burst).await;
    for i in 0..50 {
        let ServerMsg::Message { data, .. } = b.recv().await else { panic!("expected message {i}") };
        assert_eq!(data, json!(i));
    }
}

/// Frames that break RFC 6455 close the connection with the code the RFC
/// gives (1002 protocol error, 1007 invalid data, 1009 too big), and the
/// others in the room see the member leave.
#[tokio::test]
async fn frames_that_break_the_websocket_rules_close_with_their_code() {
    let server = TestServer::start(config()).await;
    let (mut b, _) = server.member("lobby", "bob").await;
    let hello = RawClient::text(&json!({"type": "hello", "version": 1}));
    let join = RawClient::text(&json!({"type": "join", "room": "lobby"}));
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("unmasked", RawClient::frame(0x81, b"{}", true), 1002),
        ("invalid UTF-8", RawClient::frame(0x81, b"{\"type\":\"\xff\"}", false), 1007),
        ("continuation without a message", RawClient::frame(0x80, b"{}", false), 1002),
        ("opcode 3", RawClient::frame(0x83, b"{}", false), 1002),
        ("over the hard frame limit", RawClient::frame(0x81, &[b' '; 16 * 1024 + 1], false), 1009),
    ];
    for (what, frame, code) in cases {
        let mut c = RawClient::connect(server.addr, &[]).await;
        c.write(&hello).await;
        c.write(&join).await;
        assert!(matches!(c.recv().await, ServerMsg::Welcome { .. }));
        let ServerMsg::Joined { .. } = c.recv().await else { panic!("expected joined") };
        assert!(matches!(b.recv().await, ServerMsg::PeerJoined { .. }), "{what}");
        // The server may close before the whole frame is written.
        let _ = timeout(WAIT, c.tcp.write_all(&frame)).await;
        assert_eq!(c.expect_close_code().await, code, "{what}");
        assert!(matches!(b.recv().await, ServerMsg::PeerLeft { .. }), "{what}");
    }
}

/// A plain GET of the WebSocket path is told to upgrade, not hung up on.
#[tokio::test]
async fn a_plain_request_for_the_websocket_is_told_to_upgrade() {
    let server = TestServer::start(config()).await;
    let (head, _) = http_get(server.addr, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
}
