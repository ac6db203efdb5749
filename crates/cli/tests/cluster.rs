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
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, url: format!("redis://127.0.0.1:{port}/") }
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
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--no-turn", "--redis", &redis.url];
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

/// A node killed outright (SIGKILL, its peers with it, so nothing is said
/// to anyone): the peers on the other nodes hear `peer_left` once its lease
/// (the default, 3 s) runs out, and its place in the room is free again (the
/// room allows three, and a new peer gets in and connects to the others).
#[test]
fn a_killed_nodes_members_leave_within_its_lease() {
    let redis = Redis::start();
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis, &["--max-peers-per-room", "3"])).collect();
    let mut a = chat("lease", &nodes[0], "a");
    a.expect("* joined lease");
    let mut b = chat("lease", &nodes[1], "b");
    b.expect("* joined lease");
    let mut c = chat("lease", &nodes[2], "c");
    c.expect("* joined lease");
    for (p, others) in [(&mut a, ["b", "c"]), (&mut b, ["a", "c"]), (&mut c, ["a", "b"])] {
        connected_to_all(p, &others);
    }
    let mut nodes = nodes;
    let mut dead = nodes.remove(1);
    dead.proc.signal("KILL");
    b.signal("KILL");
    let killed = Instant::now();
    a.expect("* b left");
    let a_heard = killed.elapsed();
    c.expect("* b left");
    let c_heard = killed.elapsed();
    eprintln!("peer_left after the node's death: {a_heard:?} and {c_heard:?}");
    assert!(a_heard.max(c_heard) < Duration::from_secs(8), "{a_heard:?} {c_heard:?}");
    assert_eq!(dead.proc.wait_exit(), -1, "killed");

    let mut d = chat("lease", &nodes[1], "d");
    d.expect("* joined lease");
    connected_to_all(&mut d, &["a", "c"]);
    d.type_line("in b's place");
    assert_eq!(a.expect("in b's place"), "d: in b's place");
    assert_eq!(c.expect("in b's place"), "d: in b's place");
    for p in [&a, &c, &d] {
        p.terminate();
    }
}
