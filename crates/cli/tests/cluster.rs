//! Several `peerlink serve` nodes sharing rooms through one real Redis
//! (`redis-server` from Debian, started here on a loopback port), with real
//! `peerlink chat` peers spread over the nodes.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Proc;
use serde_json::Value;

/// A `redis-server` of this test, killed when dropped.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    fn start() -> Redis {
        for _ in 0..SPAWN_ATTEMPTS {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if let Some(child) = spawn_redis(port, &[], None) {
                return Redis { child, url: format!("redis://127.0.0.1:{port}/") };
            }
        }
        panic!("redis-server exited before listening {SPAWN_ATTEMPTS} times, each on a fresh port");
    }

    /// Kills it (its data is lost: nothing is saved) and starts it again on
    /// the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port: u16 = self.url.trim_end_matches('/').rsplit(':').next().unwrap().parse().unwrap();
        for _ in 0..SPAWN_ATTEMPTS {
            if let Some(child) = spawn_redis(port, &[], None) {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server exited before listening on port {port} {SPAWN_ATTEMPTS} times");
    }
}

/// Times a `redis-server` is started again when the last one exited before
/// listening.
const SPAWN_ATTEMPTS: usize = 5;

/// Starts `redis-server` on `port` (with `extra` arguments, in `dir`) and
/// waits until it answers `PING`. `None` if it exited first: a port chosen
/// free can be taken before the server binds it (other tests bind ports all
/// the time), and a server that cannot bind exits at once.
fn spawn_redis(port: u16, extra: &[&str], dir: Option<&std::path::Path>) -> Option<Child> {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command.spawn().expect("redis-server (Debian package redis-server) must be installed");
    // A process starting on a loaded 2-core machine, beside others.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers_ping(port) {
        if let Some(status) = child.try_wait().expect("redis-server status") {
            eprintln!("redis-server on port {port} exited before listening ({status}): trying again");
            return None;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server did not answer on port {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child)
}

/// Whether a Redis server answers `PING` on `port` (not merely something
/// listening there).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A Redis Cluster of three masters, each a `redis-server` of this test in a
/// scratch folder, joined with `redis-cli --cluster create`.
struct RedisCluster {
    nodes: Vec<Child>,
    dir: std::path::PathBuf,
    seeds: String,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("pl-cli-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Nodes go straight into the cluster, whose drop kills them if a
        // later one does not start or an assert below fails.
        let mut cluster = RedisCluster { nodes: Vec::new(), dir: dir.clone(), seeds: String::new() };
        let mut ports = Vec::new();
        for _ in 0..3 {
            let started = (0..SPAWN_ATTEMPTS).find_map(|_| {
                // The node's bus port is its port + 10000: both free, and
                // below 65536.
                let port = (0..1000)
                    .map(|_| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
                    .find(|p| *p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok())
                    .expect("a port for a cluster node");
                let config = format!("nodes-{port}.conf");
                let extra = ["--cluster-enabled", "yes", "--cluster-config-file", &config];
                spawn_redis(port, &extra, Some(&dir)).map(|child| (port, child))
            });
            let (port, child) = started.expect("a cluster node listening (see the attempts above)");
            ports.push(port);
            cluster.nodes.push(child);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian package redis-tools)");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        for a in &addrs {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-u", &format!("redis://{a}"), "cluster", "info"])
                    .output();
                if String::from_utf8_lossy(&info.unwrap().stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline + Duration::from_secs(10), "cluster not ok at {a}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster.seeds = addrs.iter().map(|a| format!("redis://{a}/")).collect::<Vec<_>>().join(",");
        cluster
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `peerlink serve` node on the shared Redis.
struct Node {
    proc: Proc,
    addr: String,
}

impl Node {
    fn start(redis: &Redis, extra: &[&str]) -> Node {
        // One deployment: resume tokens from one node work on the others.
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-turn",
            "--redis",
            &redis.url,
            "--resume-secret",
            "cluster-test-resume-key",
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args);
        let line = proc.expect("listening on");
        let addr = line.rsplit(' ').next().unwrap().to_string();
        let node = Node { proc, addr };
        node.wait_backplane_up();
        node
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn healthz(&self) -> Value {
        serde_json::from_str(&http_get(&self.addr, "/healthz")).unwrap()
    }

    fn wait_backplane_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.healthz();
            if v["backplane"]["up"] == true {
                return;
            }
            assert!(Instant::now() < deadline, "backplane of {} not up: {v}", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(out)
}

/// Waits for `* connected to NAME` for each of `names`, in any order.
fn connected_to_all(p: &mut Proc, names: &[&str]) {
    let mut left: Vec<String> = names.iter().map(|n| format!("* connected to {n}")).collect();
    while !left.is_empty() {
        let line = p.expect_line(&format!("one of {left:?}"), |l| left.iter().any(|x| x == l));
        left.retain(|x| *x != line);
    }
}

fn chat(room: &str, node: &Node, name: &str) -> Proc {
    Proc::spawn(&["chat", room, "--server", &node.url(), "--name", name, "--ice-addr", "127.0.0.1"])
}

/// Three nodes, one Redis: six peers spread over the nodes form a full mesh
/// and chat; a seventh is refused `room_full` (the room's limit is six)
/// whichever node it reaches; the counters at `/metrics` show the traffic
/// that went between nodes.
#[test]
fn six_peers_on_three_nodes_form_one_mesh_and_a_seventh_is_refused() {
    let redis = Redis::start();
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis, &["--max-peers-per-room", "6"])).collect();
    let names = ["n0", "n1", "n2", "n3", "n4", "n5"];
    let mut peers: Vec<Proc> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut p = chat("mesh", &nodes[i % 3], name);
        p.expect("* joined mesh");
        peers.push(p);
    }
    for (i, p) in peers.iter_mut().enumerate() {
        let others: Vec<&str> = names.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| *n).collect();
        connected_to_all(p, &others);
    }
    peers[0].type_line("hello from node 0");
    for p in &mut peers[1..] {
        assert_eq!(p.expect("hello from"), "n0: hello from node 0");
    }
    peers[4].type_line("and from node 1");
    for (i, p) in peers.iter_mut().enumerate() {
        if i != 4 {
            assert_eq!(p.expect("and from"), "n4: and from node 1");
        }
    }
    for node in &nodes {
        let mut seventh = chat("mesh", node, "late");
        assert_eq!(seventh.wait_exit(), 1);
        assert!(seventh.stderr().contains("room_full"), "{}", seventh.stderr());
    }
    // Offers, answers and candidates crossed nodes through Redis.
    for node in &nodes {
        let metrics = http_get(&node.addr, "/metrics");
        let value = |name: &str| -> u64 {
            let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| {
                panic!("{name} missing from /metrics:\n{metrics}");
            });
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value("peerlink_backplane_up"), 1);
        assert!(value("peerlink_backplane_published_total") > 0, "{metrics}");
        assert!(value("peerlink_backplane_received_total") > 0, "{metrics}");
    }
    for p in &peers {
        p.terminate();
    }
    for (i, p) in peers.iter_mut().enumerate() {
        assert_eq!(p.wait_exit(), 0, "n{i}: {}", p.stderr());
    }
}

/// Two nodes on a Redis Cluster of three masters (`serve --redis SEEDS
/// --redis-cluster`): peers on different nodes meet, connect and chat, a
/// third is refused `room_full` (the room's limit is two) on either node,
/// and one that leaves is heard to leave on the other node.
#[test]
fn nodes_share_rooms_through_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let start = || {
        let args =
            ["serve", "--listen", "127.0.0.1:0", "--no-turn", "--redis", &cluster.seeds, "--redis-cluster"];
        let mut proc =
            Proc::spawn(&[&args[..], &["--max-peers-per-room", "2", "--resume-secret", "k"]].concat());
        let line = proc.expect("listening on");
        let node = Node { proc, addr: line.rsplit(' ').next().unwrap().to_string() };
        node.wait_backplane_up();
        node
    };
    let nodes = [start(), start()];
    let mut a = chat("shards", &nodes[0], "a");
    a.expect("* joined shards");
    let mut b = chat("shards", &nodes[1], "b");
    b.expect("* joined shards");
    connected_to_all(&mut a, &["b"]);
    connected_to_all(&mut b, &["a"]);
    a.type_line("across a cluster");
    assert_eq!(b.expect("across a cluster"), "a: across a cluster");
    for node in &nodes {
        let mut third = chat("shards", node, "c");
        assert_eq!(third.wait_exit(), 1);
        assert!(third.stderr().contains("room_full"), "{}", third.stderr());
    }
    b.terminate();
    assert_eq!(b.wait_exit(), 0);
    a.expect("* b left");
    a.terminate();
}

/// Redis killed (its data lost) while peers on two nodes chat: their data
/// channels keep flowing, the nodes say they are degraded, and once Redis is
/// back (restarted on the same port) a newcomer joins and reaches both.
#[test]
fn peers_chat_on_while_redis_restarts() {
    let mut redis = Redis::start();
    let nodes: Vec<Node> = (0..2).map(|_| Node::start(&redis, &[])).collect();
    let mut a = chat("bounce", &nodes[0], "a");
    a.expect("* joined bounce");
    let mut b = chat("bounce", &nodes[1], "b");
    b.expect("* joined bounce");
    connected_to_all(&mut a, &["b"]);
    connected_to_all(&mut b, &["a"]);
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        while n.healthz()["status"] != "degraded" {
            assert!(Instant::now() < deadline, "node {} never said it was degraded", n.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    a.type_line("redis is gone");
    assert_eq!(b.expect("redis is gone"), "a: redis is gone");
    redis.restart();
    for n in &nodes {
        n.wait_backplane_up();
    }
    let mut c = chat("bounce", &nodes[1], "c");
    c.expect("* joined bounce");
    connected_to_all(&mut c, &["a", "b"]);
    c.type_line("after the restart");
    assert_eq!(a.expect("after the restart"), "c: after the restart");
    assert_eq!(b.expect("after the restart"), "c: after the restart");
    for p in [&a, &b] {
        let left: Vec<&String> = p.seen.iter().filter(|l| l.ends_with(" left")).collect();
        assert!(left.is_empty(), "someone was seen to leave: {left:?}");
    }
    for p in [&a, &b, &c] {
        p.terminate();
    }
}

/// A peer that can fall back to `fallback` when its node goes away.
fn chat_with_fallback(room: &str, node: &Node, fallback: &Node, name: &str) -> Proc {
    Proc::spawn(&[
        "chat",
        room,
        "--server",
        &node.url(),
        "--fallback-server",
        &fallback.url(),
        "--name",
        name,
        "--ice-addr",
        "127.0.0.1",
    ])
}

/// A node killed outright (SIGKILL, so nothing is said to anyone). Of its
/// peers, `b` reconnects to another node and resumes its place before the
/// node's lease runs out: nobody sees it leave, its chats never stop, and
/// its signaling works again (a newcomer connects to it). `x`, killed with
/// the node, leaves for the others once the lease (the default, 3 s) runs
/// out, and its place in the room is free again (the room allows four).
#[test]
fn a_killed_nodes_members_resume_elsewhere_or_leave_within_its_lease() {
    let redis = Redis::start();
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis, &["--max-peers-per-room", "4"])).collect();
    let mut a = chat("lease", &nodes[0], "a");
    a.expect("* joined lease");
    let mut b = chat_with_fallback("lease", &nodes[1], &nodes[2], "b");
    b.expect("* joined lease");
    let mut x = chat("lease", &nodes[1], "x");
    x.expect("* joined lease");
    let mut c = chat("lease", &nodes[2], "c");
    c.expect("* joined lease");
    for (p, others) in [(&mut a, ["b", "c", "x"]), (&mut b, ["a", "c", "x"]), (&mut c, ["a", "b", "x"])] {
        connected_to_all(p, &others);
    }
    let mut nodes = nodes;
    let mut dead = nodes.remove(1);
    dead.proc.signal("KILL");
    x.signal("KILL");
    let killed = Instant::now();
    b.expect("* reconnected to");
    eprintln!("b reconnected {:?} after its node's death", killed.elapsed());
    b.type_line("still here");
    assert_eq!(a.expect("still here"), "b: still here");
    assert_eq!(c.expect("still here"), "b: still here");
    let left = a.expect(" left");
    let a_heard = killed.elapsed();
    assert_eq!(left, "* x left", "only x leaves");
    assert_eq!(c.expect(" left"), "* x left");
    let c_heard = killed.elapsed();
    eprintln!("peer_left after the node's death: {a_heard:?} and {c_heard:?}");
    assert!(a_heard.max(c_heard) < Duration::from_secs(8), "{a_heard:?} {c_heard:?}");
    assert_eq!(dead.proc.wait_exit(), -1, "killed");

    let mut d = chat("lease", &nodes[1], "d");
    d.expect("* joined lease");
    connected_to_all(&mut d, &["a", "b", "c"]);
    d.type_line("in x's place");
    for p in [&mut a, &mut b, &mut c] {
        assert_eq!(p.expect("in x's place"), "d: in x's place");
    }
    let b_left: Vec<&String> = a.seen.iter().chain(&c.seen).filter(|l| *l == "* b left").collect();
    assert!(b_left.is_empty(), "b was seen to leave");
    for p in [&a, &b, &c, &d] {
        p.terminate();
    }
}

/// A node drained (SIGTERM): its peers are told to go elsewhere, resume
/// their places on another node within the drain grace, and keep chatting
/// without a pause; nobody sees anyone leave, and they can still be
/// reached through signaling (a newcomer connects to them).
#[test]
fn a_drained_nodes_peers_move_to_another_node_unnoticed() {
    let redis = Redis::start();
    let nodes: Vec<Node> = (0..2).map(|_| Node::start(&redis, &[])).collect();
    let mut a = chat("drain", &nodes[0], "a");
    a.expect("* joined drain");
    let mut b = chat_with_fallback("drain", &nodes[1], &nodes[0], "b");
    b.expect("* joined drain");
    connected_to_all(&mut a, &["b"]);
    connected_to_all(&mut b, &["a"]);
    let mut nodes = nodes;
    let mut drained = nodes.remove(1);
    drained.proc.signal("TERM");
    let started = Instant::now();
    assert_eq!(b.expect("* reconnected to"), format!("* reconnected to {}", nodes[0].url()));
    eprintln!("b resumed on node 0 {:?} after the SIGTERM", started.elapsed());
    // The node exits once its members have moved, well within the grace.
    assert_eq!(drained.proc.wait_exit(), 0, "{}", drained.proc.stderr());
    assert!(started.elapsed() < Duration::from_secs(8), "drain took {:?}", started.elapsed());
    b.type_line("moved");
    assert_eq!(a.expect("moved"), "b: moved");
    let mut d = chat("drain", &nodes[0], "d");
    d.expect("* joined drain");
    connected_to_all(&mut d, &["a", "b"]);
    d.type_line("hi both");
    assert_eq!(a.expect("hi both"), "d: hi both");
    assert_eq!(b.expect("hi both"), "d: hi both");
    a.type_line("done");
    assert_eq!(b.expect("done"), "a: done");
    for (p, name) in [(&a, "a"), (&b, "b")] {
        let left: Vec<&String> = p.seen.iter().filter(|l| l.ends_with(" left")).collect();
        assert!(left.is_empty(), "{name} saw someone leave: {left:?}");
    }
    for p in [&a, &b, &d] {
        p.terminate();
    }
}

/// One node, no Redis, restarted in place (SIGTERM, then a new process on
/// the same address, as behind a load balancer or a supervisor): its peers
/// are told `shutting_down`, reconnect to the new process with their resume
/// tokens (the same --resume-secret) and keep their peer ids and their
/// connections to each other; the chat carries on, and a newcomer reaches
/// them through the new process.
#[test]
fn a_restarted_server_takes_its_peers_back_without_breaking_their_connections() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        let mut p =
            Proc::spawn(&["serve", "--listen", &listen, "--no-turn", "--resume-secret", "restart-key"]);
        p.expect("listening on");
        p
    };
    let url = format!("ws://{listen}/ws");
    let chat_here = |name: &str| {
        Proc::spawn(&["chat", "again", "--server", &url, "--name", name, "--ice-addr", "127.0.0.1"])
    };
    let mut server = start();
    let mut a = chat_here("a");
    a.expect("* joined again");
    let mut b = chat_here("b");
    b.expect("* joined again");
    connected_to_all(&mut a, &["b"]);
    connected_to_all(&mut b, &["a"]);
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0, "{}", server.stderr());
    // Data channels do not need the server.
    a.type_line("while it is down");
    assert_eq!(b.expect("while it is down"), "a: while it is down");
    let server = start();
    a.expect("* reconnected to");
    b.expect("* reconnected to");
    let mut c = chat_here("c");
    c.expect("* joined again");
    connected_to_all(&mut c, &["a", "b"]);
    c.type_line("hello both");
    assert_eq!(a.expect("hello both"), "c: hello both");
    assert_eq!(b.expect("hello both"), "c: hello both");
    b.type_line("same b");
    assert_eq!(a.expect("same b"), "b: same b");
    for p in [&a, &b] {
        let left: Vec<&String> = p.seen.iter().filter(|l| l.ends_with(" left")).collect();
        assert!(left.is_empty(), "someone was seen to leave: {left:?}");
    }
    for p in [&a, &b, &c, &server] {
        p.terminate();
    }
}
