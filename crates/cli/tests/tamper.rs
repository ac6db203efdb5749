//! A signaling server that tampers with the session: a WebSocket proxy in
//! front of a real `peerlink serve` that swaps the DTLS fingerprints in the
//! offer and answer between the two peers, as a server putting itself in the
//! middle would. Pairing catches it and both sides refuse the transfer.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Fingerprint lines seen so far, by connection; the swap puts the other
/// side's (or, before there is one, a made-up one) in place of each.
#[derive(Default)]
struct Swapper {
    seen: Vec<(usize, String)>,
    swapped: usize,
}

const FAKE: &str = "a=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99";

impl Swapper {
    fn tamper(&mut self, conn: usize, text: &str) -> String {
        let Ok(mut v) = serde_json::from_str::<Value>(text) else { return text.to_string() };
        let kind = v["signal"]["kind"].as_str().unwrap_or_default().to_string();
        if v["type"] != "signal" || !(kind == "offer" || kind == "answer") {
            return text.to_string();
        }
        let sdp = v["signal"]["sdp"].as_str().unwrap().to_string();
        let Some(line) = sdp.lines().find(|l| l.starts_with("a=fingerprint:")).map(str::to_string) else {
            return text.to_string();
        };
        self.seen.push((conn, line.clone()));
        let other = self.seen.iter().rev().find(|(c, _)| *c != conn).map(|(_, l)| l.clone());
        let replacement = other.unwrap_or_else(|| FAKE.to_string());
        v["signal"]["sdp"] = Value::String(sdp.replace(&line, &replacement));
        self.swapped += 1;
        v.to_string()
    }
}

async fn proxy(listener: TcpListener, upstream: String, swapper: Arc<Mutex<Swapper>>) {
    let mut n = 0;
    while let Ok((tcp, _)) = listener.accept().await {
        n += 1;
        let conn = n;
        let upstream = upstream.clone();
        let swapper = swapper.clone();
        tokio::spawn(async move {
            let Ok(client) = tokio_tungstenite::accept_async(tcp).await else { return };
            let Ok((server, _)) = tokio_tungstenite::connect_async(upstream.as_str()).await else { return };
            let (mut to_client, mut from_client) = client.split();
            let (mut to_server, mut from_server) = server.split();
            let up = async {
                while let Some(Ok(m)) = from_client.next().await {
                    let m = match m {
                        Message::Text(t) => {
                            Message::Text(swapper.lock().unwrap().tamper(conn, t.as_str()).into())
                        }
                        other => other,
                    };
                    if to_server.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let down = async {
                while let Some(Ok(m)) = from_server.next().await {
                    if to_client.send(m).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! { _ = up => {}, _ = down => {} }
        });
    }
}

#[test]
fn a_server_that_swaps_the_dtls_fingerprints_is_caught() {
    let server = serve();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let swapper = Arc::new(Mutex::new(Swapper::default()));
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let evil = format!("ws://{}/ws", listener.local_addr().unwrap());
    rt.spawn(proxy(listener, server.url.clone(), swapper.clone()));

    let t = Scratch::new("tamper");
    std::fs::write(t.path("secret.txt"), "for your eyes only").unwrap();
    let out = t.path("out");
    let net = |url: &str| {
        vec![
            "--server".to_string(),
            url.to_string(),
            "--ice-addr".into(),
            "127.0.0.1".into(),
            "--json".into(),
        ]
    };
    let mut sargs = vec!["send".to_string()];
    sargs.extend(net(&evil));
    sargs.push(t.str("secret.txt"));
    let mut s = Proc::spawn(&sargs.iter().map(String::as_str).collect::<Vec<_>>());
    let code = s.expect_event("code", |_| true)["code"].as_str().unwrap().to_string();
    let mut rargs = vec!["receive".to_string()];
    rargs.extend(net(&evil));
    rargs.extend(["--yes".into(), "--out".into(), out.to_string_lossy().into_owned(), code]);
    let mut r = Proc::spawn(&rargs.iter().map(String::as_str).collect::<Vec<_>>());

    assert_eq!(r.wait_exit(), 4, "{:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 4, "{:?}\n{}", s.seen, s.stderr());
    assert!(swapper.lock().unwrap().swapped >= 1, "the proxy did tamper");
    for p in [&r, &s] {
        let msg = p.events("finished").pop().unwrap()["message"].as_str().unwrap().to_string();
        assert!(msg.contains("tamper"), "{msg}");
    }
    assert!(!out.join("secret.txt").exists(), "nothing was received");
}

/// The same server in front of an end-to-end encrypted room: every member
/// of `peerlink chat --room-secret` refuses the swapped offers and answers,
/// and nobody connects. Without tampering the same two connect (the
/// control: the refusal is the proxy's doing).
#[test]
fn a_server_that_swaps_fingerprints_in_a_secret_room_is_caught_by_every_member() {
    let server = serve();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let swapper = Arc::new(Mutex::new(Swapper::default()));
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let evil = format!("ws://{}/ws", listener.local_addr().unwrap());
    rt.spawn(proxy(listener, server.url.clone(), swapper.clone()));
    let secret = "Kx3w-9vQ2bYtR7mLp0sZ4A";
    let chat = |url: &str, name: &str| {
        Proc::spawn(&[
            "chat",
            "vault",
            "--server",
            url,
            "--name",
            name,
            "--ice-addr",
            "127.0.0.1",
            "--room-secret",
            secret,
        ])
    };

    let mut a = chat(&evil, "ann");
    a.expect("* joined");
    let mut b = chat(&evil, "ben");
    // Ben joined later and offered: Ann finds his offer changed; Ben hears
    // it from her, sealed (the server cannot forge that notice).
    let line = a.expect_line("a refusal", |l| l.starts_with("* refused") || l.starts_with("* connected"));
    assert!(line.starts_with("* refused ben: the offer was modified in transit"), "{line}");
    let line = b.expect_line("a refusal", |l| l.starts_with("* refused") || l.starts_with("* connected"));
    assert!(
        line.starts_with("* refused ann: it refused our signaling: the offer was modified in transit"),
        "{line}"
    );
    assert!(swapper.lock().unwrap().swapped >= 1, "the proxy did tamper");
    a.terminate();
    b.terminate();
    a.wait_exit();
    b.wait_exit();

    // Straight to the server: the same secret, connected end to end, one
    // safety number at both ends.
    let mut a = chat(&server.url, "ann");
    a.expect("* joined");
    let mut b = chat(&server.url, "ben");
    let la = a.expect_line("connected", |l| l.starts_with("* connected to ben"));
    let lb = b.expect_line("connected", |l| l.starts_with("* connected to ann"));
    let number = |l: &str| l.split("safety number ").nth(1).map(str::to_string);
    assert!(number(&la).is_some(), "{la}");
    assert_eq!(number(&la), number(&lb));
    a.terminate();
    b.terminate();
    a.wait_exit();
    b.wait_exit();
}
