//! The real `peerlink` binary: `serve` and two `chat` processes on loopback.

mod common;

use common::Proc;

#[test]
fn chat_between_two_processes_and_clean_shutdown() {
    let mut server = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--no-turn"]);
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let url = format!("ws://{addr}/ws");

    let chat = |name: &str| {
        Proc::spawn(&["chat", "lobby", "--server", &url, "--name", name, "--ice-addr", "127.0.0.1"])
    };
    let mut ada = chat("ada");
    ada.expect("* joined lobby");
    let mut bob = chat("bob");
    bob.expect("* joined lobby");
    bob.expect("* ada");
    ada.expect("* bob");
    bob.expect("* connected to ada");
    ada.expect("* connected to bob");

    ada.type_line("hello bob, über alles");
    assert_eq!(bob.expect("hello bob"), "ada: hello bob, über alles");
    bob.type_line("hi ada");
    assert_eq!(ada.expect("hi ada"), "bob: hi ada");

    // SIGTERM leaves the room cleanly; the other side is told.
    ada.terminate();
    assert_eq!(ada.wait_exit(), 0);
    bob.expect("* ada left");

    // The server shuts down gracefully on SIGTERM too, and tells its clients.
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
    assert_eq!(bob.wait_exit(), 1, "bob's room closed with the server");
}

#[test]
fn chat_reports_an_unreachable_server() {
    // Port 9 on loopback: nothing listens there.
    let mut p = Proc::spawn(&["chat", "lobby", "--server", "ws://127.0.0.1:9/ws", "--ice-addr", "127.0.0.1"]);
    assert_eq!(p.wait_exit(), 1);
}

/// `peerlink serve` with its embedded TURN server (on loopback for the
/// test) and two `peerlink ping --relay-only`: they connect through the
/// relay with the credentials from `welcome`, and every message arrives.
#[test]
fn ping_through_the_embedded_turn_server() {
    let mut server = Proc::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--turn-listen",
        "127.0.0.1:0",
        "--turn-allow-loopback",
    ]);
    server.expect("STUN/TURN on udp 127.0.0.1:");
    let line = server.expect("listening on");
    let url = format!("ws://{}/ws", line.rsplit(' ').next().unwrap());
    let ping = || {
        Proc::spawn(&[
            "ping",
            "relayed",
            "--server",
            &url,
            "--ice-addr",
            "127.0.0.1",
            "--relay-only",
            "--json",
            "--count",
            "20",
        ])
    };
    let (mut a, mut b) = (ping(), ping());
    for p in [&mut a, &mut b] {
        let result = p.expect_event("result", |_| true);
        assert_eq!(result["ok"], true, "{result}");
        let peer = &result["peers"][0];
        assert_eq!(peer["path"]["kind"], "relay", "{peer}");
        assert_eq!((peer["received"].as_u64(), peer["missing"].as_u64()), (Some(20), Some(0)));
        assert!(result["gathering"].as_str().unwrap().contains("relay from 127.0.0.1"), "{result}");
        assert_eq!(p.wait_exit(), 0);
    }
}

/// The limits are flags: `welcome` announces them (shown at /healthz too)
/// and the server holds them: a room of two refuses a third member.
#[test]
fn serve_takes_its_limits_from_flags_and_enforces_them() {
    let mut server = Proc::spawn_env(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-turn",
            "--max-peers-per-room",
            "2",
            "--messages-per-second",
            "7",
            "--idle-timeout",
            "30s",
            "--outbound-queue-bytes",
            "200000",
            "--max-connections",
            "500",
            "--request-timeout",
            "3s",
        ],
        &[("PEERLINK_MESSAGE_BURST", "9"), ("PEERLINK_MAX_CONNECTIONS_PER_IP", "40")],
    );
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let health = http_get(&addr, "/healthz");
    let v: serde_json::Value = serde_json::from_str(&health).unwrap_or_else(|e| panic!("{e}: {health}"));
    let limits = &v["limits"];
    assert_eq!(limits["max_peers_per_room"], 2, "{v}");
    assert_eq!(limits["messages_per_second"], 7, "{v}");
    assert_eq!(limits["message_burst"], 9, "{v}");
    assert_eq!(limits["idle_timeout_ms"], 30_000, "{v}");
    assert_eq!(limits["max_message_bytes"], 65_536, "{v}");
    assert_eq!(v["outbound_queue_bytes"], 200_000, "{v}");
    assert_eq!(v["max_connections"], 500, "{v}");
    assert_eq!(v["max_connections_per_ip"], 40, "{v}");
    assert_eq!(v["request_timeout_ms"], 3_000, "{v}");

    let url = format!("ws://{addr}/ws");
    let chat = |name: &str| {
        Proc::spawn(&["chat", "small", "--server", &url, "--name", name, "--ice-addr", "127.0.0.1"])
    };
    let mut a = chat("a");
    a.expect("* joined small");
    let mut b = chat("b");
    b.expect("* joined small");
    let mut c = chat("c");
    assert_eq!(c.wait_exit(), 1);
    assert!(c.stderr().contains("room_full"), "{}", c.stderr());

    let mut bad = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--no-turn", "--idle-timeout", "1s"]);
    assert_eq!(bad.wait_exit(), 2);
    assert!(bad.stderr().contains("too short"), "{}", bad.stderr());
    for p in [&a, &b] {
        p.terminate();
    }
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
}

/// A plain HTTP/1.1 GET on loopback; the response body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(out)
}

/// A server with a join secret: `peerlink token` signs what it accepts; a
/// chat without a token is refused with `unauthorized`, one with a token
/// joins (the server also has an origin allow-list, which native clients,
/// sending no Origin, pass).
#[test]
fn a_join_secret_lets_in_only_token_holders() {
    let mut server = Proc::spawn_env(
        &["serve", "--listen", "127.0.0.1:0", "--no-turn", "--allow-origin", "https://app.example"],
        &[("PEERLINK_JOIN_SECRET", "s3cret")],
    );
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let url = format!("ws://{addr}/ws");

    let mut no_token = Proc::spawn(&["chat", "club", "--server", &url, "--ice-addr", "127.0.0.1"]);
    assert_eq!(no_token.wait_exit(), 1);
    assert!(no_token.stderr().contains("unauthorized"), "{}", no_token.stderr());

    let mut minted = Proc::spawn_env(
        &["token", "club", "--name", "ada", "--ttl", "10m"],
        &[("PEERLINK_JOIN_SECRET", "s3cret")],
    );
    assert_eq!(minted.wait_exit(), 0);
    let token = minted.seen.last().expect("a token line").trim().to_string();
    assert!(token.contains('.'), "{token}");

    let mut wrong_name = Proc::spawn(&[
        "chat",
        "club",
        "--server",
        &url,
        "--name",
        "bob",
        "--token",
        &token,
        "--ice-addr",
        "127.0.0.1",
    ]);
    assert_eq!(wrong_name.wait_exit(), 1);
    assert!(wrong_name.stderr().contains("for the name"), "{}", wrong_name.stderr());

    let mut ada = Proc::spawn(&[
        "chat",
        "club",
        "--server",
        &url,
        "--name",
        "ada",
        "--token",
        &token,
        "--ice-addr",
        "127.0.0.1",
    ]);
    ada.expect("* joined club");
    ada.terminate();
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
}

/// `--metrics-listen` moves GET /metrics (with the TURN server's counters)
/// off the public port.
#[test]
fn metrics_are_served_on_their_own_address() {
    let mut server = Proc::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--turn-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let line = server.expect("metrics on http://");
    let metrics_addr = line.rsplit("http://").next().unwrap().trim_end_matches("/metrics").to_string();
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let text = http_get(&metrics_addr, "/metrics");
    for family in [
        "peerlink_connections 0",
        "peerlink_joins_total 0",
        "peerlink_turn_allocations 0",
        "peerlink_turn_relayed_bytes_total{direction=\"to_peers\"} 0",
    ] {
        assert!(text.lines().any(|l| l == family), "{family} in:\n{text}");
    }
    let public = http_get(&addr, "/metrics");
    assert!(!public.contains("peerlink_connections"), "not on the public port: {public}");
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
}
