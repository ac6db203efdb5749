//! Replays `fixtures/pairing/session.json`: the pairing session's rules,
//! step by step, as every implementation must follow them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use peerlink_pair::{
    Abort, AbortCode, Code, Notice, PairMsg, Pairing, Role, Session, SessionEvent, SessionOutput,
};
use serde_json::{Value, json};

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pairing/session.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn role(s: &str) -> Role {
    match s {
        "creator" => Role::Creator,
        "joiner" => Role::Joiner,
        other => panic!("role {other}"),
    }
}

fn other(r: Role) -> Role {
    match r {
        Role::Creator => Role::Joiner,
        Role::Joiner => Role::Creator,
    }
}

fn code_name(c: AbortCode) -> &'static str {
    match c {
        AbortCode::WrongCode => "wrong_code",
        AbortCode::Tampered => "tampered",
        AbortCode::Timeout => "timeout",
        AbortCode::Failed => "failed",
        _ => "unknown",
    }
}

/// An output as the fixture writes it.
fn describe(out: &SessionOutput<String>) -> Value {
    match out {
        SessionOutput::Send { to, msg } => {
            let mut v = json!({"to": to, "type": msg.to_json()["type"]});
            if let PairMsg::PairAbort { code: Some(c), .. } = msg {
                v["code"] = json!(code_name(*c));
            }
            json!({ "send": v })
        }
        SessionOutput::Connect { peer, .. } => json!({ "connect": peer }),
        SessionOutput::Event(ev) => match ev {
            SessionEvent::PeerSeen { peer } => json!({"event": "peer_seen", "peer": peer}),
            SessionEvent::Paired { peer } => json!({"event": "paired", "peer": peer}),
            SessionEvent::Notice(n) => json!({"event": "notice", "notice": match n {
                Notice::QuietPeerTryingNext { .. } => "quiet_peer_trying_next",
                Notice::QuietPeerStillWaiting { .. } => "quiet_peer_still_waiting",
                _ => "other",
            }}),
            SessionEvent::PeerGone { peer, was_paired } => {
                json!({"event": "peer_gone", "peer": peer, "was_paired": was_paired})
            }
            SessionEvent::Ended { reason, by_peer } => {
                json!({"event": "ended", "reason": code_name(reason.code()), "by_peer": by_peer})
            }
            _ => json!({"event": "other"}),
        },
    }
}

/// The other side of a pairing, as the fixture's `counterpart` inputs drive it.
struct Counterpart {
    pairing: Pairing,
    confirm: Option<PairMsg>,
}

#[test]
fn every_scenario_of_the_session_fixture() {
    let fixture = fixture();
    let scenarios = fixture["scenarios"].as_array().unwrap();
    assert!(scenarios.len() >= 10, "the fixture covers the rules");
    for sc in scenarios {
        let name = sc["name"].as_str().unwrap();
        let our_role = role(sc["role"].as_str().unwrap());
        let code = Code::parse(sc["code"].as_str().unwrap()).unwrap();
        let timeout = Duration::from_millis(sc["timeout_ms"].as_u64().unwrap());
        let mut session: Session<String> = Session::new(our_role, code, timeout);
        let t0 = Instant::now();
        let mut counterparts: HashMap<String, Counterpart> = HashMap::new();
        // The last pair_pake the session sent each peer: a counterpart made
        // after it was sent still gets it.
        let mut last_pake: HashMap<String, PairMsg> = HashMap::new();
        for (i, step) in sc["steps"].as_array().unwrap().iter().enumerate() {
            let now = t0 + Duration::from_millis(step["at_ms"].as_u64().unwrap());
            let input = &step["input"];
            // A counterpart made in this step that the session sends no
            // fresh pake gets the last one it sent that peer.
            let mut late: Option<(String, PairMsg)> = None;
            let peer = |k: &str| input[k].as_str().map(str::to_string);
            if let Some(p) = peer("peer_joined") {
                session.peer_joined(p, now);
            } else if let Some(p) = peer("peer_left") {
                session.peer_left(&p, now);
            } else if let Some(p) = peer("connection_lost") {
                session.connection_lost(&p);
            } else if input.get("timeout").is_some() {
                session.handle_timeout(now);
            } else if let Some(a) = input.get("abort") {
                let code = serde_json::from_value(a["code"].clone()).unwrap();
                session.abort(Abort::from_msg(Some(code), a["reason"].as_str().unwrap()));
            } else if let Some(m) = input.get("message") {
                let from = m["from"].as_str().unwrap().to_string();
                let msg = match m["counterpart"].as_str() {
                    Some("pake") => {
                        let theirs = Code::parse(m["code"].as_str().unwrap()).unwrap();
                        let (pairing, first) = Pairing::start(other(our_role), &theirs);
                        counterparts.insert(from.clone(), Counterpart { pairing, confirm: None });
                        late = last_pake.get(&from).map(|p| (from.clone(), p.clone()));
                        first
                    }
                    Some("confirm") => counterparts
                        .get_mut(&from)
                        .and_then(|c| c.confirm.take())
                        .unwrap_or_else(|| panic!("{name} step {i}: the counterpart has no confirmation")),
                    _ => PairMsg::from_json(&m["msg"]).expect("a pairing message"),
                };
                session.handle_message(from, msg, now);
            } else {
                panic!("{name} step {i}: unknown input {input}");
            }
            let mut got = Vec::new();
            while let Some(out) = session.poll_output() {
                if let SessionOutput::Send { to, msg: msg @ PairMsg::PairPake { .. } } = &out {
                    last_pake.insert(to.clone(), msg.clone());
                    late.take_if(|(p, _)| p == to);
                }
                if let SessionOutput::Send { to, msg } = &out
                    && let Some(c) = counterparts.get_mut(to)
                    && !matches!(msg, PairMsg::PairAbort { .. })
                    && let Ok(Some(reply)) = c.pairing.handle(msg.clone())
                {
                    c.confirm = Some(reply);
                }
                got.push(describe(&out));
            }
            if let Some((peer, pake)) = late
                && let Some(c) = counterparts.get_mut(&peer)
            {
                c.confirm = c.pairing.handle(pake).ok().flatten();
            }
            assert_eq!(Value::Array(got), step["expect"], "{name}, step {i}");
        }
    }
}

/// Two real sessions and a quiet squatter, wired together: the squatter
/// joined the code's room first, the receiver tries it, gives up after the
/// timeout and pairs with the sender; both end with matching keys.
#[test]
fn two_sessions_pair_past_a_squatter() {
    let code = Code::generate(3);
    let timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let mut creator: Session<&str> = Session::new(Role::Creator, code.clone(), timeout);
    let mut joiner: Session<&str> = Session::new(Role::Joiner, code, timeout);
    // The room: the squatter (silent), the creator, then the joiner.
    creator.peer_joined("squatter", t0);
    joiner.peer_joined("squatter", t0);
    joiner.peer_joined("creator", t0);
    creator.peer_joined("joiner", t0);
    let mut now = t0;
    let mut keys = HashMap::new();
    for _ in 0..50 {
        let mut mail = Vec::new();
        for (me, session) in [("creator", &mut creator), ("joiner", &mut joiner)] {
            while let Some(out) = session.poll_output() {
                match out {
                    SessionOutput::Send { to: "squatter", .. } | SessionOutput::Event(_) => {}
                    SessionOutput::Send { to, msg } => mail.push((me, to, msg)),
                    SessionOutput::Connect { peer, keys: k } => {
                        keys.insert(me, (peer, k));
                    }
                }
            }
        }
        if mail.is_empty() {
            if keys.len() == 2 {
                break;
            }
            now += Duration::from_millis(500);
            creator.handle_timeout(now);
            joiner.handle_timeout(now);
        }
        for (from, to, msg) in mail {
            match to {
                "creator" => creator.handle_message(from, msg, now),
                _ => joiner.handle_message(from, msg, now),
            }
        }
    }
    let (to_joiner, ck) = &keys["creator"];
    let (to_creator, jk) = &keys["joiner"];
    assert_eq!((*to_joiner, *to_creator), ("joiner", "creator"));
    assert_eq!(ck.sdp_local, jk.sdp_remote);
    assert_eq!(ck.sdp_remote, jk.sdp_local);
    assert!(now >= t0 + timeout, "the joiner waited out the squatter first");
}
