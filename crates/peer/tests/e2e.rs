//! End-to-end encrypted rooms: members with the room secret connect (their
//! SDP authenticated with keys derived from it) and see the same safety
//! number; a member without it cannot connect; messages through the server
//! are ciphertext to everyone else, and unsealed ones are refused. Real
//! server, real str0m connections on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Peer, Server};
use peerlink_peer::ConnState;
use serde_json::json;

const SECRET: &str = "Kx3w-9vQ2bYtR7mLp0sZ4A";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_room_authenticates_members_and_seals_what_the_server_carries() {
    let server = Server::start().await;
    let secret = |room: &str| {
        let mut c = server.config(room);
        c.room_secret = Some(SECRET.into());
        c
    };
    let mut a = Peer::join(secret("vault")).await;
    let mut b = Peer::join(secret("vault")).await;
    let (ia, ib) = (a.id(), b.id());
    b.until("channel to a", |p| p.has_channel(&ia, "data")).await;
    a.until("channel to b", |p| p.has_channel(&ib, "data")).await;
    b.channel(&ia, "data").send("members only").await.unwrap();
    a.until("message", |p| !p.texts_from(&ib, "data").is_empty()).await;

    // Both ends compute one safety number from both DTLS fingerprints.
    let na = a.room.stats(&ib).await.unwrap().safety_number.expect("a's safety number");
    let nb = b.room.stats(&ia).await.unwrap().safety_number.expect("b's safety number");
    assert_eq!(na, nb);
    assert!(regex_like_groups(&na), "{na}");

    // Someone in the room without the secret: its offers carry no valid MAC
    // and are refused; it never gets a channel.
    let mut c = Peer::join(server.config("vault")).await;
    let ic = c.id();
    a.until("c refused", |p| p.auth_failures.iter().any(|(peer, _)| peer == &ic)).await;
    b.until("c refused", |p| p.auth_failures.iter().any(|(peer, _)| peer == &ic)).await;
    c.pump_for(Duration::from_millis(300)).await;
    assert!(c.channels.is_empty(), "no channel without the secret");
    assert_ne!(a.states.get(&ic), Some(&ConnState::Connected));

    // Through the server: the member reads the message, the outsider (and
    // the server) only ciphertext.
    a.room.send_via_server(None, json!({ "note": "secret plans" })).await.unwrap();
    a.room.send_via_server(Some(&ib), json!({ "to": "b alone" })).await.unwrap();
    b.until("two messages", |p| p.server_messages.len() == 2).await;
    assert_eq!(b.server_messages[0], (ia.clone(), json!({ "note": "secret plans" })));
    assert_eq!(b.server_messages[1], (ia.clone(), json!({ "to": "b alone" })));
    // (From A the outsider gets two: A's sealed refusal of its offer, and
    // the broadcast; sealed too, and B's refusal.)
    c.until("the broadcast", |p| p.server_messages.iter().filter(|(f, _)| f == &ia).count() >= 2).await;
    for (_, seen) in &c.server_messages {
        let text = seen.to_string();
        assert!(seen.get("peerlink_e2e").is_some() && seen.as_object().unwrap().len() == 1, "{text}");
        assert!(!text.contains("secret plans") && !text.contains("refused"), "{text}");
    }

    // The outsider's message does not open: refused, never delivered.
    c.room.send_via_server(Some(&ia), json!({ "fake": true })).await.unwrap();
    a.until("refused", |p| !p.refused_server_messages.is_empty()).await;
    assert_eq!(a.refused_server_messages[0].0, ic);
    assert!(a.refused_server_messages[0].1.contains("not sealed"), "{:?}", a.refused_server_messages);
    assert!(a.server_messages.is_empty());
}

/// `NNNNN NNNNN NNNNN NNNNN NNNNN`.
fn regex_like_groups(n: &str) -> bool {
    let groups: Vec<&str> = n.split(' ').collect();
    groups.len() == 5 && groups.iter().all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
}

/// A sealed channel between two native peers: keys agreed over the channel
/// and bound to the connection's DTLS fingerprints, text and bytes both
/// ways, and the wire underneath carries no plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_channel_carries_messages_both_ways() {
    use peerlink_peer::{ChannelSpec, Event, Message, Room};
    let server = Server::start().await;
    let config = || {
        let mut c = server.config("sealed");
        c.channels = vec![ChannelSpec::reliable("notes")];
        c
    };
    let mut a = Room::join(config()).await.unwrap();
    let mut b = Room::join(config()).await.unwrap();
    async fn notes(room: &mut Room) -> peerlink_peer::DataChannel {
        loop {
            match tokio::time::timeout(common::WAIT, room.next_event()).await.expect("channel in time") {
                Some(Event::ChannelOpen { channel }) if channel.label() == "notes" => return channel,
                Some(_) => {}
                None => panic!("room closed"),
            }
        }
    }
    let (ca, cb) = tokio::join!(notes(&mut a), notes(&mut b));
    let raw = cb.clone();
    let wait = Duration::from_secs(5);
    let (sa, sb) = tokio::join!(a.seal(ca, wait), b.seal(cb, wait));
    let (mut sa, mut sb) = (sa.unwrap(), sb.unwrap());
    sa.send("kept sealed at rest").await.unwrap();
    sa.send(Message::Binary(vec![1, 2, 3])).await.unwrap();
    sb.send("and back").await.unwrap();
    assert_eq!(sb.recv().await, Some(Ok(Message::Text("kept sealed at rest".into()))));
    assert_eq!(sb.recv().await, Some(Ok(Message::Binary(vec![1, 2, 3]))));
    assert_eq!(sa.recv().await, Some(Ok(Message::Text("and back".into()))));
    // A message the channel refuses (too large once sealed) leaves no gap in
    // the sealed order: the next one opens on the other side.
    let too_large = Message::Binary(vec![7; sa.channel().max_message_size()]);
    assert!(matches!(sa.send(too_large).await, Err(peerlink_peer::SendError::TooLarge { .. })));
    sa.send("after a refused one").await.unwrap();
    assert_eq!(sb.recv().await, Some(Ok(Message::Text("after a refused one".into()))));
    // What the channel itself carried is ciphertext: seal one more and read
    // it off the raw channel before the sealed reader does.
    sa.send("not on the wire").await.unwrap();
    let wire = tokio::time::timeout(wait, raw.recv()).await.unwrap().unwrap();
    assert!(wire.is_binary() && !String::from_utf8_lossy(wire.as_bytes()).contains("not on the wire"));
    assert_eq!(wire.as_bytes()[0], 0x02, "a sealed data message");
}
