//! The overlay codec against `fixtures/overlay/messages.json`.

use peerlink_overlay::{DecodeError, Message};
use peerlink_proto::PeerId;
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn id(v: &Value) -> PeerId {
    PeerId::from_server(v.as_str().expect("peer id"))
}

fn u64_hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().expect("hex id"), 16).expect("hex id")
}

fn message(m: &Value) -> Message<PeerId> {
    let flag = |k: &str| m[k].as_bool().expect("flag");
    let peers = |k: &str| m[k].as_array().expect("peers").iter().map(id).collect::<Vec<_>>();
    match m["type"].as_str().expect("type") {
        "join" => Message::Join,
        "forward_join" => {
            Message::ForwardJoin { peer: id(&m["peer"]), ttl: m["ttl"].as_u64().expect("ttl") as u8 }
        }
        "neighbor" => Message::Neighbor { high: flag("high") },
        "neighbor_reply" => Message::NeighborReply { accepted: flag("accepted") },
        "disconnect" => Message::Disconnect { alive: flag("alive") },
        "shuffle" => Message::Shuffle {
            origin: id(&m["origin"]),
            ttl: m["ttl"].as_u64().expect("ttl") as u8,
            peers: peers("peers"),
        },
        "shuffle_reply" => Message::ShuffleReply { peers: peers("peers") },
        "gossip" => Message::Gossip {
            id: u64_hex(&m["id"]),
            origin: id(&m["origin"]),
            hops: m["hops"].as_u64().expect("hops") as u16,
            all: m["all"].as_bool().unwrap_or(false),
            payload: hex(m["payload"].as_str().expect("payload")),
        },
        "ihave" => Message::IHave {
            ids: m["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|e| (u64_hex(&e[0]), e[1].as_u64().expect("hops") as u16))
                .collect(),
        },
        "graft" => Message::Graft { id: m.get("id").map(u64_hex) },
        "prune" => Message::Prune,
        "direct" => Message::Direct { payload: hex(m["payload"].as_str().expect("payload")) },
        "relay" => Message::Relay {
            to: id(&m["to"]),
            from: id(&m["from"]),
            ttl: m["ttl"].as_u64().expect("ttl") as u8,
            payload: hex(m["payload"].as_str().expect("payload")),
        },
        "unreachable" => Message::Unreachable {
            to: id(&m["to"]),
            from: id(&m["from"]),
            ttl: m["ttl"].as_u64().expect("ttl") as u8,
            payload: hex(m["payload"].as_str().expect("payload")),
        },
        other => panic!("fixture type {other} not known to this test"),
    }
}

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/overlay/messages.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

#[test]
fn every_message_encodes_and_decodes_as_the_fixture_says() {
    let f = fixture();
    let valid = f["valid"].as_array().expect("valid");
    assert_eq!(valid.len(), 22, "a fixture was added or lost: update this count");
    for case in valid {
        let msg = message(&case["message"]);
        let bytes = hex(case["hex"].as_str().expect("hex"));
        assert_eq!(msg.encode(), bytes, "encoding {:?}", case["message"]);
        assert_eq!(Message::<PeerId>::decode(&bytes), Ok(msg), "decoding {}", case["hex"]);
    }
}

#[test]
fn malformed_messages_are_refused_with_the_reason() {
    let f = fixture();
    for case in f["invalid"].as_array().expect("invalid") {
        let bytes = hex(case["hex"].as_str().expect("hex"));
        let err = Message::<PeerId>::decode(&bytes).expect_err(case["why"].as_str().expect("why"));
        let why = case["why"].as_str().expect("why");
        match why {
            "version 2" => assert_eq!(err, DecodeError::Version(2)),
            "unknown type" => assert_eq!(err, DecodeError::UnknownType(0x7f)),
            _ => assert!(matches!(err, DecodeError::Malformed(_)), "{why}: {err}"),
        }
    }
}

#[test]
fn decoding_never_panics_on_prefixes_of_valid_messages() {
    let f = fixture();
    for case in f["valid"].as_array().expect("valid") {
        let bytes = hex(case["hex"].as_str().expect("hex"));
        for cut in 0..bytes.len() {
            let _ = Message::<PeerId>::decode(&bytes[..cut]);
        }
    }
}
