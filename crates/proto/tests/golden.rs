//! Golden fixtures: every message of the protocol, as the JSON on the wire.
//! The browser client's tests read the same files.

use std::path::PathBuf;

use peerlink_proto::*;
use serde_json::{Value, json};

fn fixture(rel: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/protocol").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn peer(id: &str) -> PeerId {
    PeerId::from_server(id)
}

/// Parses the fixture into `expected`'s type, compares, and checks that
/// serializing gives back exactly the fixture's JSON.
fn check<T>(rel: &str, expected: T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wire = fixture(rel);
    let parsed: T = serde_json::from_value(wire.clone()).unwrap();
    assert_eq!(parsed, expected, "{rel} parses to the expected value");
    assert_eq!(serde_json::to_value(&expected).unwrap(), wire, "{rel} round-trips");
}

/// An opaque resume token (its format is the server's business).
const RESUME: &str = "p-9b71e0aa.1767225600.Qm9ndXMgTUFDIGZvciB0aGUgZml4dHVyZSBvbmx5IQ";

fn sdp(n: u32, m: u32) -> String {
    format!("v=0\r\no=- {n} {m} IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
}

#[test]
fn client_messages() {
    let room = || "lobby".to_string();
    let to = || peer("p-4f2a9c1d");
    check(
        "client/hello.json",
        ClientMsg::Hello { version: 1, client: Some("peerlink-cli/0.1.0".into()), resume: None },
    );
    check(
        "client/hello_resume.json",
        ClientMsg::Hello {
            version: 1,
            client: Some("peerlink-cli/0.1.0".into()),
            resume: Some(RESUME.into()),
        },
    );
    check("client/join.json", ClientMsg::Join { room: room(), name: Some("ada".into()), token: None });
    check(
        "client/join_token.json",
        ClientMsg::Join {
            room: room(),
            name: Some("ada".into()),
            token: Some("eyJyb29tIjoibG9iYnkiLCJuYW1lIjoiYWRhIiwiZXhwIjoxNzY3MjI1NjAwfQ.y3_4jLKoyBDRSULMcDf_klyNETm9LxrvKkYHM-h_4q0".into()),
        },
    );
    check("client/leave.json", ClientMsg::Leave { room: room() });
    check(
        "client/signal_offer.json",
        ClientMsg::Signal { room: room(), to: to(), signal: Signal::Offer { sdp: sdp(1, 2), auth: None } },
    );
    check(
        "client/signal_answer.json",
        ClientMsg::Signal { room: room(), to: to(), signal: Signal::Answer { sdp: sdp(3, 4), auth: None } },
    );
    check(
        "client/signal_offer_auth.json",
        ClientMsg::Signal {
            room: room(),
            to: to(),
            signal: Signal::Offer {
                // The SDP and tag of fixtures/pairing/peerlink-pair-v1.json
                // (`sdp_tag_A_offer_seq0_hex`, keyed with `k_sdp_A_hex`).
                sdp: "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\na=fingerprint:sha-256 AB:CD\r\n".into(),
                auth: Some(SignalAuth {
                    seq: 0,
                    mac: "8eaad41fefd4d5a4bddceba19ea55c8605da1cb3522c23b282dcabb7c9e90965".into(),
                }),
            },
        },
    );
    check(
        "client/signal_candidate.json",
        ClientMsg::Signal {
            room: room(),
            to: to(),
            signal: Signal::Candidate {
                candidate: "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host".into(),
                mid: Some("0".into()),
            },
        },
    );
    check(
        "client/signal_end_of_candidates.json",
        ClientMsg::Signal { room: room(), to: to(), signal: Signal::EndOfCandidates },
    );
    check(
        "client/send_one.json",
        ClientMsg::Send { room: room(), to: Some(to()), data: json!({"type": "hello", "name": "ada"}) },
    );
    check("client/send_room.json", ClientMsg::Send { room: room(), to: None, data: json!("hi all") });
    check("client/ping.json", ClientMsg::Ping { nonce: Some(42) });
}

#[test]
fn server_messages() {
    let room = || "lobby".to_string();
    let bob = || peer("p-4f2a9c1d");
    check(
        "server/welcome.json",
        ServerMsg::Welcome {
            version: 1,
            peer_id: peer("p-9b71e0aa"),
            ice_servers: vec![
                IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: None, credential: None },
                IceServer {
                    urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
                    username: Some("1700000000:p-9b71e0aa".into()),
                    credential: Some("bm90LWEtcmVhbC1zZWNyZXQ=".into()),
                },
            ],
            limits: Limits {
                max_message_bytes: 65536,
                max_peers_per_room: 32,
                max_rooms_per_connection: 8,
                messages_per_second: 50,
                message_burst: 200,
                idle_timeout_ms: 45_000,
            },
            resume: None,
        },
    );
    check(
        "server/welcome_resume.json",
        ServerMsg::Welcome {
            version: 1,
            peer_id: peer("p-9b71e0aa"),
            ice_servers: vec![
                IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: None, credential: None },
                IceServer {
                    urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
                    username: Some("1700000000:p-9b71e0aa".into()),
                    credential: Some("bm90LWEtcmVhbC1zZWNyZXQ=".into()),
                },
            ],
            limits: Limits {
                max_message_bytes: 65536,
                max_peers_per_room: 32,
                max_rooms_per_connection: 8,
                messages_per_second: 50,
                message_burst: 200,
                idle_timeout_ms: 45_000,
            },
            resume: Some(RESUME.into()),
        },
    );
    check(
        "server/joined.json",
        ServerMsg::Joined {
            room: room(),
            peers: vec![
                PeerInfo { id: bob(), name: Some("bob".into()) },
                PeerInfo { id: peer("p-0c0ffee0"), name: None },
            ],
            resumed: false,
            size: None,
        },
    );
    check(
        "server/joined_sample.json",
        ServerMsg::Joined {
            room: room(),
            peers: vec![
                PeerInfo { id: bob(), name: Some("bob".into()) },
                PeerInfo { id: peer("p-0c0ffee0"), name: None },
            ],
            resumed: false,
            size: Some(1500),
        },
    );
    check(
        "server/joined_resumed.json",
        ServerMsg::Joined {
            room: room(),
            peers: vec![PeerInfo { id: bob(), name: Some("bob".into()) }],
            resumed: true,
            size: None,
        },
    );
    check("server/left.json", ServerMsg::Left { room: room() });
    check(
        "server/peer_joined.json",
        ServerMsg::PeerJoined { room: room(), peer: PeerInfo { id: bob(), name: Some("bob".into()) } },
    );
    check("server/peer_left.json", ServerMsg::PeerLeft { room: room(), peer_id: bob() });
    check(
        "server/signal.json",
        ServerMsg::Signal {
            room: room(),
            from: bob(),
            signal: Signal::Candidate {
                candidate: "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host".into(),
                mid: None,
            },
        },
    );
    check(
        "server/message.json",
        ServerMsg::Message { room: room(), from: bob(), data: json!({"type": "hello", "name": "bob"}) },
    );
    check(
        "server/error.json",
        ServerMsg::Error {
            code: ErrorCode::RoomFull,
            message: "room lobby has 32 members, the limit".into(),
        },
    );
    check(
        "server/error_flooding.json",
        ServerMsg::Error {
            code: ErrorCode::Flooding,
            message:
                "over the rate limit for 3 seconds in a row (50 messages per second, burst 200); closing"
                    .into(),
        },
    );
    check(
        "server/error_peer_busy.json",
        ServerMsg::Error {
            code: ErrorCode::PeerBusy,
            message: "not delivered to peer p-9b71e0aa: its queue is full: it reads slower than messages arrive for it; retry later".into(),
        },
    );
    check(
        "server/error_unavailable.json",
        ServerMsg::Error {
            code: ErrorCode::Unavailable,
            message: "cannot join lobby now: this server cannot reach the room store shared by its nodes; retry shortly".into(),
        },
    );
    check(
        "server/error_unauthorized.json",
        ServerMsg::Error {
            code: ErrorCode::Unauthorized,
            message: "joining lobby needs a valid token: the token expired 12 s ago".into(),
        },
    );
    check(
        "server/error_origin_not_allowed.json",
        ServerMsg::Error {
            code: ErrorCode::OriginNotAllowed,
            message: "pages from https://evil.example may not use this server".into(),
        },
    );
    check("server/pong.json", ServerMsg::Pong { nonce: Some(42) });
}

/// Every fixture file is covered by a check above, so a new message type
/// cannot ship without its golden file being pinned.
#[test]
fn every_fixture_is_checked() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/protocol");
    let mut names = Vec::new();
    for dir in ["client", "server"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            names.push(format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy()));
        }
    }
    names.sort();
    let this = include_str!("golden.rs");
    for name in &names {
        assert!(this.contains(&format!("\"{name}\"")), "fixture {name} has no check");
    }
    assert_eq!(names.len(), 30);
}
