//! Room membership and delivery between connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use peerlink_proto::{ErrorCode, PeerId, PeerInfo, ServerMsg};
use tokio::sync::{Notify, mpsc};

/// The sending half of one connection, as the hub sees it.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    pub tx: mpsc::Sender<Utf8Bytes>,
    pub kick: Arc<Kick>,
    /// Bytes queued and not yet taken by the connection's writer.
    pub queued: Arc<AtomicUsize>,
    /// Most bytes that may wait for this connection.
    pub max_bytes: usize,
}

/// Notified when the hub gives up on a connection (its queue overflowed).
#[derive(Debug, Default)]
pub(crate) struct Kick {
    pub notify: Notify,
}

impl Outbox {
    /// Queues a frame without waiting. A connection that cannot keep up is
    /// kicked rather than allowed to grow memory or stall its sender.
    /// The queue is bounded in messages and in bytes: a client that stops
    /// reading pins at most `max_bytes` of server memory.
    pub fn deliver(&self, frame: Utf8Bytes) -> bool {
        let n = frame.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.kick.notify.notify_one();
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                self.kick.notify.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                false
            }
        }
    }

    /// The writer took `frame` off the queue.
    pub fn taken(&self, frame: &Utf8Bytes) {
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Member {
    name: Option<String>,
    outbox: Outbox,
    /// Join order, so `joined` can list members longest present first.
    since: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Hub {
    rooms: Mutex<HashMap<String, HashMap<PeerId, Member>>>,
    connections: AtomicUsize,
    joins: AtomicU64,
    /// `signal`s relayed (offers, answers, candidates).
    pub(crate) signals_relayed: AtomicU64,
    /// Server-routed application messages delivered (a broadcast counts
    /// once per addressee).
    pub(crate) messages_relayed: AtomicU64,
}

/// A snapshot for `/healthz` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Open WebSocket connections.
    pub connections: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// `signal`s relayed since the start.
    pub signals_relayed: u64,
    /// Server-routed application messages delivered since the start.
    pub messages_relayed: u64,
}

pub(crate) fn encode(msg: &ServerMsg) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(msg).expect("server messages always serialize"))
}

/// Why a join was refused.
#[derive(Debug)]
pub(crate) struct Refused(pub ErrorCode, pub String);

impl Hub {
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            connections: self.connections.load(Ordering::Relaxed),
            rooms: self.rooms.lock().expect("hub lock").len(),
            signals_relayed: self.signals_relayed.load(Ordering::Relaxed),
            messages_relayed: self.messages_relayed.load(Ordering::Relaxed),
        }
    }

    /// Adds `id` to `room`, tells the others, and returns who was there.
    pub fn join(
        &self,
        room: &str,
        id: &PeerId,
        name: Option<String>,
        outbox: Outbox,
        max_peers: usize,
    ) -> Result<Vec<PeerInfo>, Refused> {
        let mut rooms = self.rooms.lock().expect("hub lock");
        let members = rooms.entry(room.to_string()).or_default();
        if members.contains_key(id) {
            return Err(Refused(ErrorCode::AlreadyJoined, format!("already in room {room}")));
        }
        if members.len() >= max_peers {
            return Err(Refused(
                ErrorCode::RoomFull,
                format!("room {room} has {} members, the limit", members.len()),
            ));
        }
        let me = PeerInfo { id: id.clone(), name: name.clone() };
        let frame = encode(&ServerMsg::PeerJoined { room: room.to_string(), peer: me });
        let mut present: Vec<(u64, PeerInfo)> = members
            .iter()
            .map(|(pid, m)| {
                m.outbox.deliver(frame.clone());
                (m.since, PeerInfo { id: pid.clone(), name: m.name.clone() })
            })
            .collect();
        present.sort_unstable_by_key(|(since, _)| *since);
        let present: Vec<PeerInfo> = present.into_iter().map(|(_, p)| p).collect();
        // `joined` goes out under the lock, before the joiner is visible:
        // a `peer_joined` from someone joining right after can only follow it.
        outbox.deliver(encode(&ServerMsg::Joined { room: room.to_string(), peers: present.clone() }));
        let since = self.joins.fetch_add(1, Ordering::Relaxed);
        members.insert(id.clone(), Member { name, outbox, since });
        Ok(present)
    }

    /// Removes `id` from `room` and tells the others. Returns whether it was a member.
    pub fn leave(&self, room: &str, id: &PeerId) -> bool {
        let mut rooms = self.rooms.lock().expect("hub lock");
        let Some(members) = rooms.get_mut(room) else { return false };
        if members.remove(id).is_none() {
            return false;
        }
        if members.is_empty() {
            rooms.remove(room);
        } else {
            let frame = encode(&ServerMsg::PeerLeft { room: room.to_string(), peer_id: id.clone() });
            for m in members.values() {
                m.outbox.deliver(frame.clone());
            }
        }
        true
    }

    /// Delivers `frame` to `to` if both `from` and `to` are in `room`.
    pub fn send_to(&self, room: &str, from: &PeerId, to: &PeerId, frame: Utf8Bytes) -> Result<(), Refused> {
        let rooms = self.rooms.lock().expect("hub lock");
        let members = rooms
            .get(room)
            .filter(|m| m.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        let target = members
            .get(to)
            .ok_or_else(|| Refused(ErrorCode::UnknownPeer, format!("no peer {to} in room {room}")))?;
        target.outbox.deliver(frame);
        Ok(())
    }

    /// Delivers `frame` to every member of `room` but `from`.
    pub fn broadcast(&self, room: &str, from: &PeerId, frame: Utf8Bytes) -> Result<(), Refused> {
        let rooms = self.rooms.lock().expect("hub lock");
        let members = rooms
            .get(room)
            .filter(|m| m.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        for (pid, m) in members {
            if pid != from {
                m.outbox.deliver(frame.clone());
                self.messages_relayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
