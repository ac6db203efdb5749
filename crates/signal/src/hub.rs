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
    /// Bytes queued for every connection of the server, and their bound.
    pub budget: Arc<Budget>,
}

/// The server-wide bound on queued bytes.
#[derive(Debug)]
pub(crate) struct Budget {
    pub queued: AtomicUsize,
    pub max_bytes: usize,
}

/// Notified when the hub gives up on a connection (its queue overflowed).
#[derive(Debug, Default)]
pub(crate) struct Kick {
    pub notify: Notify,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The connection's own queue (messages or bytes) is full.
    Connection,
    /// The server's budget for all queues is used up.
    Server,
    /// The connection is closing.
    Closed,
}

impl Outbox {
    /// Queues a frame without waiting, or says why not. The queue is
    /// bounded in messages and bytes, and all queues together by the
    /// server's budget: a client that stops reading pins at most
    /// `max_bytes`, all of them together at most the budget.
    ///
    /// Relayed frames may fill three quarters of the queue (bytes and
    /// slots): the rest is kept for the server's own messages (presence,
    /// replies), so a client that keeps up is never closed because others
    /// filled its queue.
    pub fn try_deliver(&self, frame: Utf8Bytes) -> Result<(), Full> {
        let n = frame.len();
        let relay_max = self.max_bytes - self.max_bytes / 4;
        if self.tx.capacity() <= self.tx.max_capacity() / 4 {
            return Err(Full::Connection);
        }
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > relay_max {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(Full::Connection);
        }
        if self.budget.queued.fetch_add(n, Ordering::Relaxed) + n > self.budget.max_bytes {
            self.budget.queued.fetch_sub(n, Ordering::Relaxed);
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(Full::Server);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                self.budget.queued.fetch_sub(n, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => Full::Connection,
                    mpsc::error::TrySendError::Closed(_) => Full::Closed,
                })
            }
        }
    }

    /// Queues a frame the server itself sends (presence, replies): these
    /// must not be lost, so a connection whose queue cannot take one is
    /// closed as a slow consumer. They are exempt from the server budget
    /// (each is small, and bounded by the connection's own queue).
    pub fn deliver(&self, frame: Utf8Bytes) -> bool {
        let n = frame.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.kick.notify.notify_one();
            return false;
        }
        self.budget.queued.fetch_add(n, Ordering::Relaxed);
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                self.budget.queued.fetch_sub(n, Ordering::Relaxed);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.kick.notify.notify_one();
                }
                false
            }
        }
    }

    /// The writer took `frame` off the queue.
    pub fn taken(&self, frame: &Utf8Bytes) {
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        self.budget.queued.fetch_sub(frame.len(), Ordering::Relaxed);
    }

    /// Frames still queued when the connection ends leave the budget.
    pub fn drain(&self, rx: &mut mpsc::Receiver<Utf8Bytes>) {
        rx.close();
        while let Ok(frame) = rx.try_recv() {
            self.taken(&frame);
        }
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
    /// `error`s sent, by code.
    errors: Mutex<HashMap<ErrorCode, u64>>,
    /// Connections the server closed, by the code it closed them with.
    kicks: Mutex<HashMap<ErrorCode, u64>>,
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

/// The refusal of a relayed frame that `peers` (of `addressed`) could not take.
fn busy(peers: &[&PeerId], addressed: usize, why: Full) -> Refused {
    let names: Vec<&str> = peers.iter().take(8).map(|p| p.as_str()).collect();
    let more = if peers.len() > names.len() {
        format!(" and {} more", peers.len() - names.len())
    } else {
        String::new()
    };
    let reason = match why {
        Full::Server => "the server's queue budget is used up",
        _ => "its queue is full: it reads slower than messages arrive for it",
    };
    let whom = if addressed == 1 {
        format!("peer {}{more}", names.join(", "))
    } else {
        format!("{} of {addressed} members ({}{more})", peers.len(), names.join(", "))
    };
    Refused(ErrorCode::PeerBusy, format!("not delivered to {whom}: {reason}; retry later"))
}

fn sorted(counts: &Mutex<HashMap<ErrorCode, u64>>) -> Vec<(ErrorCode, u64)> {
    let mut v: Vec<(ErrorCode, u64)> =
        counts.lock().expect("hub lock").iter().map(|(c, n)| (*c, *n)).collect();
    v.sort_by_key(|(c, _)| c.as_str());
    v
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

    /// An `error` with `code` went to a client.
    pub fn count_error(&self, code: ErrorCode) {
        *self.errors.lock().expect("hub lock").entry(code).or_default() += 1;
    }

    /// The server closed a connection with `code`.
    pub fn count_kick(&self, code: ErrorCode) {
        *self.kicks.lock().expect("hub lock").entry(code).or_default() += 1;
    }

    /// `error`s sent so far, by code.
    pub fn errors(&self) -> Vec<(ErrorCode, u64)> {
        sorted(&self.errors)
    }

    /// Connections closed by the server so far, by code.
    pub fn kicks(&self) -> Vec<(ErrorCode, u64)> {
        sorted(&self.kicks)
    }

    /// Joins accepted since the start.
    pub fn joins(&self) -> u64 {
        self.joins.load(Ordering::Relaxed)
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

    /// Delivers `frame` to `to` if both `from` and `to` are in `room`. A
    /// frame the addressee's queue (or the server's budget) cannot take is
    /// refused to the sender with `peer_busy`: the addressee, which may be
    /// reading as fast as it can, is not punished for what others send it.
    pub fn send_to(&self, room: &str, from: &PeerId, to: &PeerId, frame: Utf8Bytes) -> Result<(), Refused> {
        let rooms = self.rooms.lock().expect("hub lock");
        let members = rooms
            .get(room)
            .filter(|m| m.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        let target = members
            .get(to)
            .ok_or_else(|| Refused(ErrorCode::UnknownPeer, format!("no peer {to} in room {room}")))?;
        match target.outbox.try_deliver(frame) {
            Ok(()) => Ok(()),
            Err(Full::Closed) => {
                Err(Refused(ErrorCode::UnknownPeer, format!("peer {to} is leaving room {room}")))
            }
            Err(full) => Err(busy(&[to], 1, full)),
        }
    }

    /// Delivers `frame` to every member of `room` but `from`; members whose
    /// queue cannot take it are named in one `peer_busy` refusal.
    pub fn broadcast(&self, room: &str, from: &PeerId, frame: Utf8Bytes) -> Result<(), Refused> {
        let rooms = self.rooms.lock().expect("hub lock");
        let members = rooms
            .get(room)
            .filter(|m| m.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        let mut busy_peers = Vec::new();
        let mut why = Full::Connection;
        for (pid, m) in members {
            if pid != from {
                match m.outbox.try_deliver(frame.clone()) {
                    Ok(()) => {
                        self.messages_relayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Full::Closed) => {}
                    Err(full) => {
                        busy_peers.push(pid);
                        why = full;
                    }
                }
            }
        }
        if busy_peers.is_empty() { Ok(()) } else { Err(busy(&busy_peers, members.len() - 1, why)) }
    }
}
