//! The real `peerlink` binary: `serve` and two `chat` processes on loopback.

mod common;

use std::time::{Duration, Instant};

use common::{Proc, serve};

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

/// With `--json`, a transfer that fails before it can start still ends with
/// a `finished` event on stdout (stdout was empty: programs reading it got
/// nothing to say why).
#[test]
fn send_and_receive_with_json_report_an_early_failure_as_a_finished_event() {
    for args in [
        &[
            "receive",
            "--json",
            "--server",
            "ws://127.0.0.1:9/ws",
            "--ice-addr",
            "127.0.0.1",
            "7-lantern-zebra",
        ][..],
        &["receive", "--json", "--server", "ws://127.0.0.1:9/ws", "--ice-addr", "127.0.0.1", "not-a-code"][..],
        &[
            "send",
            "--json",
            "--server",
            "ws://127.0.0.1:9/ws",
            "--ice-addr",
            "127.0.0.1",
            "/nonexistent/peerlink-test",
        ][..],
    ] {
        let mut p = Proc::spawn(args);
        let done = p.expect_event("finished", |_| true);
        assert_eq!(done["ok"], false, "{args:?}: {done}");
        assert_eq!(done["exit_code"], 1, "{args:?}: {done}");
        assert!(done["message"].as_str().is_some_and(|m| !m.is_empty()), "{args:?}: {done}");
        assert_eq!(p.wait_exit(), 1, "{args:?}");
        assert_eq!(p.seen.iter().filter(|l| l.contains("\"finished\"")).count(), 1, "{args:?}: {:?}", p.seen);
    }
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

/// `peerlink ping --room-secret`: two pings with the room's secret connect
/// and every message arrives; a third with another secret in the same room
/// connects to nobody (its offers are refused) and says so.
#[test]
fn ping_in_a_secret_room_connects_members_only() {
    let server = serve();
    let ping = |secret: &str, timeout: &str| {
        Proc::spawn(&[
            "ping",
            "vault",
            "--server",
            &server.url,
            "--ice-addr",
            "127.0.0.1",
            "--json",
            "--room-secret",
            secret,
            "--timeout",
            timeout,
        ])
    };
    let (mut a, mut b) = (ping("right-9vQ2bYtR7mLp0sZ4A", "30s"), ping("right-9vQ2bYtR7mLp0sZ4A", "30s"));
    for p in [&mut a, &mut b] {
        let result = p.expect_event("result", |_| true);
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["peers"][0]["received"].as_u64(), Some(10), "{result}");
        assert_eq!(p.wait_exit(), 0);
    }
    // Alone with a member holding another secret.
    let mut keeper = Proc::spawn(&[
        "chat",
        "vault2",
        "--server",
        &server.url,
        "--ice-addr",
        "127.0.0.1",
        "--room-secret",
        "right-9vQ2bYtR7mLp0sZ4A",
    ]);
    keeper.expect("* joined");
    let mut wrong = Proc::spawn(&[
        "ping",
        "vault2",
        "--server",
        &server.url,
        "--ice-addr",
        "127.0.0.1",
        "--json",
        "--room-secret",
        "wrong-9vQ2bYtR7mLp0sZ4A",
        "--timeout",
        "5s",
    ]);
    let result = wrong.expect_event("result", |_| true);
    assert_eq!(result["ok"], false, "{result}");
    assert_ne!(wrong.wait_exit(), 0);
    keeper.expect_line("a refusal", |l| {
        l.starts_with("* refused") && l.contains("the offer was modified in transit")
    });
    keeper.terminate();
    keeper.wait_exit();
}

/// `peerlink ping --overlay` in a large room (the server lists a sample of
/// 2): four pings broadcast over the overlay, each answered by every other
/// over a direct connection, with the hops the broadcast crossed.
#[test]
fn ping_over_the_overlay_reports_hops_to_every_peer() {
    let mut server = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--no-turn", "--listed-peers", "2"]);
    let line = server.expect("listening on");
    let url = format!("ws://{}/ws", line.rsplit(' ').next().unwrap());
    let ping = || {
        Proc::spawn(&[
            "ping",
            "big",
            "--server",
            &url,
            "--ice-addr",
            "127.0.0.1",
            "--overlay",
            "--json",
            "--expect-peers",
            "3",
            "--count",
            "5",
            "--interval",
            "50ms",
            "--timeout",
            "30s",
        ])
    };
    let mut pings: Vec<Proc> = (0..4).map(|_| ping()).collect();
    for p in &mut pings {
        let result = p.expect_event("result", |_| true);
        assert_eq!(result["ok"], true, "{result}");
        let peers = result["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 3, "{result}");
        for peer in peers {
            assert!(peer["replies"].as_u64().unwrap() >= 5, "{peer}");
            let hops = peer["hops_min"].as_u64().unwrap();
            assert!((1..=3).contains(&hops), "{peer}");
        }
        assert!(result["overlay"]["connections"].as_u64().unwrap() <= 8, "{result}");
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

/// Checks `text` line by line against the Prometheus text exposition format
/// (0.0.4): `# HELP` / `# TYPE` lines, samples `name{label="value",...}
/// number`, each family typed once, before its samples, which are not
/// split by another family's. Returns the samples.
fn prometheus_samples(text: &str) -> Vec<(String, f64)> {
    fn name_ok(n: &str, first: fn(char) -> bool, rest: fn(char) -> bool) -> bool {
        let mut c = n.chars();
        c.next().is_some_and(first) && c.all(rest)
    }
    let metric = |n: &str| {
        name_ok(
            n,
            |c| c.is_ascii_alphabetic() || c == '_' || c == ':',
            |c| c.is_ascii_alphanumeric() || c == '_' || c == ':',
        )
    };
    let label = |n: &str| {
        name_ok(n, |c| c.is_ascii_alphabetic() || c == '_', |c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut typed: Vec<String> = Vec::new();
    let mut done: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line: {line}"));
            assert!(metric(name), "bad metric name: {line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type: {line}"
            );
            assert!(!typed.iter().any(|t| t == name), "typed twice: {line}");
            typed.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(metric(rest.split(' ').next().unwrap_or("")), "bad HELP line: {line}");
            continue;
        }
        assert!(!line.starts_with('#') || line.starts_with("# "), "bad comment: {line}");
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                (n, Some(l.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"))))
            }
            None => (series, None),
        };
        assert!(metric(name), "bad metric name: {line}");
        for pair in labels.into_iter().flat_map(|l| l.split("\",")) {
            let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
            assert!(label(k) && v.starts_with('"'), "bad label {pair:?}: {line}");
        }
        assert!(typed.iter().any(|t| t == name), "sample before its TYPE: {line}");
        if current.as_deref() != Some(name) {
            assert!(!done.iter().any(|d| d == name), "family {name} split: {line}");
            if let Some(c) = current.take() {
                done.push(c);
            }
            current = Some(name.to_string());
        }
        samples.push((series.to_string(), value));
    }
    samples
}

/// `--metrics-listen` moves GET /metrics (with the TURN server's counters)
/// off the public port; the page is valid Prometheus text and its TURN
/// counters move as clients act (a TCP client that speaks STUN, one that
/// does not).
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
    let line = server.expect("TURN on tcp");
    let turn_tcp = line.rsplit(' ').next().unwrap().to_string();
    let line = server.expect("metrics on http://");
    let metrics_addr = line.rsplit("http://").next().unwrap().trim_end_matches("/metrics").to_string();
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let text = http_get(&metrics_addr, "/metrics");
    let samples = prometheus_samples(&text);
    assert!(samples.len() >= 30, "{text}");
    // The checker itself refuses what is not the format.
    for bad in [
        "x 1",
        "# TYPE x counter\nx{a=b} 1",
        "# TYPE x counter\nx one",
        "# TYPE x counter\n# TYPE y gauge\nx 1\ny 1\nx 2",
    ] {
        assert!(std::panic::catch_unwind(|| prometheus_samples(bad)).is_err(), "accepted {bad:?}");
    }
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

    // TURN over TCP: a STUN Binding request is answered and counted; a
    // stream that is not STUN is closed and counted as refused.
    use std::io::{Read, Write};
    let mut stun = std::net::TcpStream::connect(&turn_tcp).unwrap();
    stun.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let binding = [0u8, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    stun.write_all(&binding).unwrap();
    let mut head = [0u8; 20];
    stun.read_exact(&mut head).unwrap();
    assert_eq!(&head[..2], &[0x01, 0x01], "a Binding success response over TCP");
    let mut junk = std::net::TcpStream::connect(&turn_tcp).unwrap();
    junk.write_all(b"PUT / HTTP/1.1\r\n\r\n").unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(junk.read(&mut [0u8; 16]).unwrap_or(0), 0, "closed");
    let value = |text: &str, series: &str| {
        prometheus_samples(text).into_iter().find(|(s, _)| s == series).map(|(_, v)| v)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = http_get(&metrics_addr, "/metrics");
        let moved = value(&text, "peerlink_turn_stream_connections_total") == Some(1.0)
            && value(&text, "peerlink_turn_stream_connections") == Some(1.0)
            && value(&text, "peerlink_turn_binding_requests_total") == Some(1.0)
            && value(&text, r#"peerlink_turn_refusals_total{reason="stream_not_stun"}"#) == Some(1.0);
        if moved {
            break;
        }
        assert!(Instant::now() < deadline, "TURN counters did not move:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stun);
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
}
