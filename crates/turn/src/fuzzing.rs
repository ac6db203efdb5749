//! The server's handling of one datagram without sockets, for fuzzing
//! (feature `fuzzing`): what `server.rs` does with bytes from a client
//! (Binding answered directly, credentials read from ALLOCATE, everything
//! fed to the protocol and its answers built), and with bytes a peer sends
//! to a relayed address.

use std::cell::RefCell;
use std::net::SocketAddr;

use stun_proto::Instant as SioInstant;
use stun_proto::types::TransportType;
use stun_proto::types::attribute::{Nonce, Userhash, Username};
use stun_proto::types::message::{BINDING, Message, MessageClass};
use turn_server_proto::api::{Transmit, TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer;
use turn_server_proto::types::message::ALLOCATE;

use crate::rest::{rest_expiry, rest_password};
use crate::stun;

const SECRET: &str = "fuzzing-secret";

struct World {
    server: TurnServer,
    steps: u64,
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a literal address")
}

/// Feeds `data` to the server: the first byte picks the source (a client,
/// another client, or a peer towards the relayed address), the rest is the
/// datagram. Panics only on a bug.
pub fn datagram(data: &[u8]) {
    let Some((&which, data)) = data.split_first() else { return };
    WORLD.with(|w| {
        let mut w = w.borrow_mut();
        let world = w.get_or_insert_with(|| World {
            server: TurnServer::new(TransportType::Udp, addr("192.0.2.10:3478"), "peerlink".into()),
            steps: 0,
        });
        world.steps += 1;
        // Fresh state now and then, so that tables do not only grow.
        if world.steps.is_multiple_of(10_000) {
            world.server = TurnServer::new(TransportType::Udp, addr("192.0.2.10:3478"), "peerlink".into());
        }
        let now = SioInstant::from_nanos((world.steps * 10_000_000) as i64);
        let local = addr("192.0.2.10:3478");
        let (from, to) = match which % 3 {
            0 => (addr("198.51.100.1:40000"), local),
            1 => (addr("198.51.100.2:40001"), local),
            _ => (addr("203.0.113.5:9"), addr("192.0.2.10:50000")),
        };
        if to == local
            && let Ok(msg) = Message::from_bytes(data)
            && msg.has_class(MessageClass::Request)
        {
            if msg.has_method(BINDING) {
                let _ = stun::binding_response(&msg, from);
                return;
            }
            if msg.has_method(ALLOCATE) {
                if let Ok(user) = msg.attribute::<Username>()
                    && rest_expiry(user.username()).is_some()
                {
                    let name = user.username().to_owned();
                    world.server.add_user(name.clone(), rest_password(SECRET, &name));
                }
                let _ = msg.attribute::<Userhash>();
                let nonce = msg.attribute::<Nonce>().ok();
                let _ = stun::error_response(&msg, 401, Some("peerlink"), nonce.as_ref().map(|n| n.nonce()));
            }
        }
        if let Some(reply) = world.server.recv(Transmit::new(data, TransportType::Udp, from, to), now) {
            let _ = reply.build();
        }
        for _ in 0..64 {
            match world.server.poll(now) {
                TurnServerPollRet::AllocateSocket {
                    transport,
                    listen_addr,
                    client_addr,
                    allocation_transport,
                    family,
                } => world.server.allocated_socket(
                    transport,
                    listen_addr,
                    client_addr,
                    allocation_transport,
                    family,
                    Ok(addr("192.0.2.10:50000")),
                    now,
                ),
                _ => break,
            }
        }
        while world.server.poll_transmit(now).is_some() {}
    });
}
