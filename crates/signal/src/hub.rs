//! Room membership and delivery between connections.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::extract::ws::Utf8Bytes;
use peerlink_proto::{ErrorCode, PeerId, PeerInfo, ServerMsg};

use crate::backplane::{Backplane, Entry, Event, JoinMode, JoinOutcome, LeaveOutcome};

pub(crate) use crate::outbox::{Full, Outbox};

/// Where a member's connection is.
#[derive(Debug)]
enum At {
    /// On this node: its queue.
    Local(Outbox),
    /// On another node of a Redis backplane, by node id.
    Remote(Arc<str>),
}

#[derive(Debug)]
struct Member {
    name: Option<String>,
    at: At,
    /// Join order, so `joined` can list members longest present first.
    since: u64,
}

/// One room as this node sees it: with the memory backend every member;
/// with a backplane, a replica kept for the rooms that have members here
/// (every member, each with its node), updated from the node's one ordered
/// stream of events.
#[derive(Debug, Default)]
struct Room {
    members: HashMap<PeerId, Member>,
}

impl Room {
    fn locals(&self) -> impl Iterator<Item = (&PeerId, &Outbox)> {
        self.members.iter().filter_map(|(id, m)| match &m.at {
            At::Local(o) => Some((id, o)),
            At::Remote(_) => None,
        })
    }

    fn has_local(&self) -> bool {
        self.locals().next().is_some()
    }

    /// Tells every member here but `except` (the memory backend: everyone).
    fn tell_locals(&self, except: &PeerId, frame: &Utf8Bytes) {
        for (id, o) in self.locals() {
            if id != except {
                o.deliver(frame.clone());
            }
        }
    }

    /// Members other than `except`, longest present first: all of them,
    /// or in a room of more than `listed` others a random sample of
    /// `listed`, with the number of others.
    fn listing(&self, except: &PeerId, listed: usize) -> (Vec<PeerInfo>, Option<u32>) {
        let others = self.members.len() - usize::from(self.members.contains_key(except));
        let mut present: Vec<(u64, PeerInfo)> = if others > listed {
            use rand::seq::IteratorRandom;
            self.members
                .iter()
                .filter(|(id, _)| *id != except)
                .choose_multiple(&mut rand::rng(), listed)
                .into_iter()
                .map(|(id, m)| (m.since, PeerInfo { id: id.clone(), name: m.name.clone() }))
                .collect()
        } else {
            self.members
                .iter()
                .filter(|(id, _)| *id != except)
                .map(|(id, m)| (m.since, PeerInfo { id: id.clone(), name: m.name.clone() }))
                .collect()
        };
        present.sort_unstable_by_key(|(since, _)| *since);
        let size = (others > listed).then_some(others as u32);
        (present.into_iter().map(|(_, p)| p).collect(), size)
    }
}

/// Every room, and a count of the changes made to any of them. A
/// connection remembers where its last frame to one peer went (a
/// [`Route`]) and delivers the next one there without looking it up while
/// the count stays the same: a signaling exchange, or a stream of messages
/// to one peer, is many frames to the same addressee, and at 10,000
/// connections the lookups (a room's table, its members', their ids, each
/// elsewhere in memory) were the largest part of relaying one.
#[derive(Debug, Default)]
struct Rooms {
    map: Mutex<HashMap<String, Room>>,
    changes: AtomicU64,
}

impl Rooms {
    fn read(&self) -> Read<'_> {
        Read(self.map.lock().expect("hub lock"))
    }

    /// For a change, counted when the guard is dropped, before the lock is
    /// released: whoever holds the lock later reads the new count.
    fn write(&self) -> Write<'_> {
        Write { map: self.map.lock().expect("hub lock"), changes: &self.changes }
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }
}

/// The rooms, read.
struct Read<'a>(MutexGuard<'a, HashMap<String, Room>>);

impl Deref for Read<'_> {
    type Target = HashMap<String, Room>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The rooms, changed.
struct Write<'a> {
    map: MutexGuard<'a, HashMap<String, Room>>,
    changes: &'a AtomicU64,
}

impl Deref for Write<'_> {
    type Target = HashMap<String, Room>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        self.changes.fetch_add(1, Ordering::Release);
    }
}

/// Where a connection's last frame to one peer went: the addressee's
/// queue on this node, valid while no room has changed since. Checked
/// under the addressee's queue lock, so a frame never lands behind
/// something the addressee was sent after a change (its `left`, say) that
/// the frame should have seen.
#[derive(Debug)]
pub(crate) struct Route {
    /// The room, then the addressee's id: one place in memory to compare.
    key: Box<str>,
    room_len: usize,
    outbox: Outbox,
    changes: u64,
}

impl Route {
    fn is(&self, room: &str, to: &str) -> bool {
        self.room_len == room.len()
            && self.key.len() == room.len() + to.len()
            && self.key.starts_with(room)
            && self.key.ends_with(to)
    }
}

/// How a join treats a place the joining id may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resume {
    /// A newcomer.
    No,
    /// A resumed id: a place it still holds is taken back silently.
    IfPresent,
    /// The same, but the join is refused `unauthorized` (with this reason)
    /// unless the place is still held: its join token did not verify.
    OnlyPresent(String),
    /// A resumed id whose server restarted (memory backend): the room was
    /// lost with the process and nobody was told the id left, so `joined`
    /// says resumed even when the place is new (the others, who still know
    /// the id, ignore its `peer_joined`).
    Always,
}

/// A joiner on this node waiting for its place in the backplane's stream.
#[derive(Debug)]
struct Pending {
    outbox: Outbox,
}

#[derive(Debug)]
pub(crate) struct Hub {
    rooms: Rooms,
    /// Backplane joins sent and not yet seen in the stream, by (room, peer).
    pending: Mutex<HashMap<(String, PeerId), Pending>>,
    /// Set once, when the server runs with a backplane.
    backplane: OnceLock<Arc<Backplane>>,
    connections: AtomicUsize,
    /// Open connections by key, and the last key given.
    open: Mutex<(HashMap<u64, Outbox>, u64)>,
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
    /// Rooms with more members are large (see `Config::listed_peers`).
    listed: usize,
}

/// A snapshot for `/healthz` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Open WebSocket connections.
    pub connections: usize,
    /// Rooms with at least one member (on this node, with a backplane).
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
pub(crate) fn busy(peers: &[impl AsRef<str>], addressed: usize, why: Full) -> Refused {
    let names: Vec<&str> = peers.iter().take(8).map(|p| p.as_ref()).collect();
    let more = if peers.len() > names.len() {
        format!(" and {} more", peers.len() - names.len())
    } else {
        String::new()
    };
    let reason = match why {
        Full::Server => "the server's queue budget is used up",
        Full::Backplane => "the server's queue towards other nodes is full",
        _ => "its queue is full: it reads slower than messages arrive for it",
    };
    let whom = if addressed == 1 {
        format!("peer {}{more}", names.join(", "))
    } else {
        format!("{} of {addressed} members ({}{more})", peers.len(), names.join(", "))
    };
    Refused(ErrorCode::PeerBusy, format!("not delivered to {whom}: {reason}; retry later"))
}

/// What the sender of a frame to `to` is told.
fn sent_to(room: &str, to: &str, sent: Result<(), Full>) -> Result<(), Refused> {
    match sent {
        Ok(()) => Ok(()),
        Err(Full::Closed) => {
            Err(Refused(ErrorCode::UnknownPeer, format!("peer {to} is leaving room {room}")))
        }
        Err(Full::Down) => Err(unavailable(&format!("not delivered to peer {to}"))),
        Err(full) => Err(busy(&[to], 1, full)),
    }
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

fn unavailable(what: &str) -> Refused {
    Refused(
        ErrorCode::Unavailable,
        format!("{what}: this server cannot reach the room store shared by its nodes; retry shortly"),
    )
}

impl Hub {
    pub fn new(listed: usize) -> Self {
        Hub {
            rooms: Default::default(),
            pending: Default::default(),
            backplane: Default::default(),
            connections: Default::default(),
            open: Default::default(),
            joins: Default::default(),
            signals_relayed: Default::default(),
            messages_relayed: Default::default(),
            errors: Default::default(),
            kicks: Default::default(),
            listed: listed.max(1),
        }
    }

    /// Runs the hub over `backplane` (once, before any connection).
    pub fn attach(&self, backplane: Arc<Backplane>) {
        let _ = self.backplane.set(backplane);
    }

    pub fn backplane(&self) -> Option<&Arc<Backplane>> {
        self.backplane.get()
    }

    /// A connection opened: it is told when the server shuts down. Its
    /// key for [`Hub::disconnected`].
    pub fn connected(&self, outbox: &Outbox) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let mut open = self.open.lock().expect("hub lock");
        open.1 += 1;
        let key = open.1;
        open.0.insert(key, outbox.clone());
        key
    }

    pub fn disconnected(&self, key: u64) {
        self.open.lock().expect("hub lock").0.remove(&key);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Tells every open connection the server is shutting down.
    pub fn shut_down(&self) {
        for outbox in self.open.lock().expect("hub lock").0.values() {
            outbox.shut_down();
        }
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

    /// Joins accepted since the start (on this node).
    pub fn joins(&self) -> u64 {
        self.joins.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            connections: self.connections.load(Ordering::Relaxed),
            rooms: self.rooms.read().len(),
            signals_relayed: self.signals_relayed.load(Ordering::Relaxed),
            messages_relayed: self.messages_relayed.load(Ordering::Relaxed),
        }
    }

    /// Adds `id` to `room` and tells the others; `id` gets `joined` (the
    /// members before it) ahead of any `peer_joined`. With `resume` (a
    /// client that reconnected with its resume token), a member `id`
    /// already is takes its place back on this connection and no one is
    /// told.
    pub async fn join(
        &self,
        room: &str,
        id: &PeerId,
        name: Option<String>,
        outbox: Outbox,
        max_peers: usize,
        resume: Resume,
    ) -> Result<(), Refused> {
        let Some(bp) = self.backplane.get() else {
            return self.join_here(room, id, name, outbox, max_peers, resume);
        };
        let only_present = match &resume {
            Resume::OnlyPresent(why) => Some(why.clone()),
            _ => None,
        };
        let resume = resume != Resume::No;
        if !bp.is_up() {
            return Err(unavailable(&format!("cannot join {room} now")));
        }
        let key = (room.to_string(), id.clone());
        let conn = outbox.token();
        self.pending.lock().expect("hub lock").insert(key.clone(), Pending { outbox });
        let mode = match (resume, only_present.is_some()) {
            (_, true) => JoinMode::ResumeOnly,
            (true, false) => JoinMode::Resume,
            (false, false) => JoinMode::Join,
        };
        let outcome = bp.join(room, id, name, max_peers, mode, conn).await;
        if !matches!(outcome, JoinOutcome::Joined) {
            self.pending.lock().expect("hub lock").remove(&key);
        }
        match outcome {
            // `joined` is sent when the join's event comes through the stream.
            JoinOutcome::Joined => Ok(()),
            JoinOutcome::Already => Err(Refused(ErrorCode::AlreadyJoined, format!("already in room {room}"))),
            JoinOutcome::Gone => Err(Refused(ErrorCode::Unauthorized, only_present.unwrap_or_default())),
            JoinOutcome::Full(n) => {
                Err(Refused(ErrorCode::RoomFull, format!("room {room} has {n} members, the limit")))
            }
            JoinOutcome::Failed => {
                // It may have happened: take it back (a no-op otherwise; a
                // resumed member stays, as it would have without us).
                if !resume {
                    bp.leave(room, id);
                }
                Err(unavailable(&format!("joining {room} failed")))
            }
        }
    }

    fn join_here(
        &self,
        room: &str,
        id: &PeerId,
        name: Option<String>,
        outbox: Outbox,
        max_peers: usize,
        resume: Resume,
    ) -> Result<(), Refused> {
        let mut rooms = self.rooms.write();
        let members = rooms.entry(room.to_string()).or_default();
        if let Resume::OnlyPresent(why) = &resume
            && !members.members.contains_key(id)
        {
            if members.members.is_empty() {
                rooms.remove(room);
            }
            return Err(Refused(ErrorCode::Unauthorized, why.clone()));
        }
        if let Some(m) = members.members.get_mut(id) {
            if resume == Resume::No {
                return Err(Refused(ErrorCode::AlreadyJoined, format!("already in room {room}")));
            }
            // Back on a new connection: same place, nobody told.
            m.at = At::Local(outbox.clone());
            let (peers, size) = members.listing(id, self.listed);
            outbox.deliver(encode(&ServerMsg::Joined { room: room.to_string(), peers, resumed: true, size }));
            return Ok(());
        }
        if members.members.len() >= max_peers {
            return Err(Refused(
                ErrorCode::RoomFull,
                format!("room {room} has {} members, the limit", members.members.len()),
            ));
        }
        let me = PeerInfo { id: id.clone(), name: name.clone() };
        if members.members.len() < self.listed + 1 {
            members.tell_locals(id, &encode(&ServerMsg::PeerJoined { room: room.to_string(), peer: me }));
        }
        // `joined` goes out under the lock, before the joiner is visible:
        // a `peer_joined` from someone joining right after can only follow it.
        let (present, size) = members.listing(id, self.listed);
        let resumed = resume == Resume::Always;
        outbox.deliver(encode(&ServerMsg::Joined { room: room.to_string(), peers: present, resumed, size }));
        let since = self.joins.fetch_add(1, Ordering::Relaxed);
        members.members.insert(id.clone(), Member { name, at: At::Local(outbox), since });
        Ok(())
    }

    /// Whether `id` is a member of `room` on the connection of `outbox`
    /// (not resumed on another connection or node since).
    pub fn is_ours(&self, room: &str, id: &PeerId, outbox: &Outbox) -> bool {
        let rooms = self.rooms.read();
        matches!(
            rooms.get(room).and_then(|r| r.members.get(id)).map(|m| &m.at),
            Some(At::Local(o)) if o.same(outbox)
        )
    }

    /// Removes `id` from `room` and tells the others, if it is a member on
    /// the connection of `outbox` (a member that resumed elsewhere stays).
    /// Returns whether it was. With a backplane, returns once Redis has the
    /// change (bounded), so that a join anywhere after it does not find `id`.
    pub async fn leave(&self, room: &str, id: &PeerId, outbox: &Outbox) -> bool {
        let bp = self.backplane.get();
        let pending = || self.pending.lock().expect("hub lock").contains_key(&(room.to_string(), id.clone()));
        let member = {
            let rooms = self.rooms.read();
            rooms.get(room).and_then(|r| r.members.get(id)).map(|m| match &m.at {
                At::Local(o) => o.same(outbox),
                At::Remote(_) => false,
            })
        };
        if member == Some(false) {
            return false;
        }
        let known = member == Some(true) || pending();
        let outcome = match (known, bp) {
            (true, Some(bp)) => Some(bp.leave_and_wait(room, id, outbox.token()).await),
            _ => None,
        };
        let mut rooms = self.rooms.write();
        let mut was = false;
        let Some(members) = rooms.get_mut(room) else {
            drop(rooms);
            return self.drop_pending(room, id, outbox);
        };
        // While Redis was asked, the member may have resumed on another
        // node. Redis says whose it is (moved: it has not left, and nobody
        // is told), and the event saying so may already be here (it is
        // Remote now): if Redis removed it first, it left and joined again
        // elsewhere since, and the members here hear both.
        let at = members.members.get(id).map(|m| match &m.at {
            At::Local(o) => o.same(outbox),
            At::Remote(_) => false,
        });
        let stays = match (&outcome, at) {
            (Some(LeaveOutcome::Moved(node)), Some(true)) => {
                if let Some(m) = members.members.get_mut(id) {
                    m.at = At::Remote(node.as_str().into());
                }
                true
            }
            (Some(LeaveOutcome::Moved(_)), _) => true,
            (Some(LeaveOutcome::Removed), Some(false)) => {
                if let Some(m) = members.members.get(id)
                    && matches!(m.at, At::Remote(_))
                    && members.members.len() <= self.listed + 1
                {
                    let left = encode(&ServerMsg::PeerLeft { room: room.to_string(), peer_id: id.clone() });
                    members.tell_locals(id, &left);
                    let info = PeerInfo { id: id.clone(), name: m.name.clone() };
                    let joined = encode(&ServerMsg::PeerJoined { room: room.to_string(), peer: info });
                    members.tell_locals(id, &joined);
                }
                true
            }
            (_, Some(false)) => true,
            _ => false,
        };
        if stays {
            if !members.has_local() {
                rooms.remove(room);
            }
            drop(rooms);
            self.drop_pending(room, id, outbox);
            return false;
        }
        if members.members.remove(id).is_some() {
            // Counted with the leaver, as its join was.
            if members.members.len() <= self.listed {
                let frame = encode(&ServerMsg::PeerLeft { room: room.to_string(), peer_id: id.clone() });
                members.tell_locals(id, &frame);
            }
            if !members.has_local() {
                rooms.remove(room);
            }
            was = true;
        }
        drop(rooms);
        was | self.drop_pending(room, id, outbox)
    }

    /// Forgets a join of `id` to `room` still waiting on the connection of
    /// `outbox` (one another connection of `id` made since stays); whether
    /// there was one.
    fn drop_pending(&self, room: &str, id: &PeerId, outbox: &Outbox) -> bool {
        let mut pending = self.pending.lock().expect("hub lock");
        let key = (room.to_string(), id.clone());
        if pending.get(&key).is_some_and(|p| p.outbox.same(outbox)) {
            pending.remove(&key);
            return true;
        }
        false
    }

    /// Delivers `frame` to `to` if both `from` and `to` are in `room`. A
    /// frame the addressee's queue (or the server's budget) cannot take is
    /// refused to the sender with `peer_busy`: the addressee, which may be
    /// reading as fast as it can, is not punished for what others send it.
    /// `route` is the sender's: used when it still holds, updated when the
    /// addressee is looked up.
    pub fn send_to(
        &self,
        room: &str,
        from: &PeerId,
        to: &str,
        frame: Utf8Bytes,
        route: &mut Option<Route>,
    ) -> Result<(), Refused> {
        let mut frame = frame;
        if let Some(r) = route
            && r.is(room, to)
        {
            match r.outbox.try_deliver_if(frame, || self.rooms.changes() == r.changes) {
                Ok(sent) => return sent_to(room, to, sent),
                Err(back) => frame = back,
            }
        }
        let rooms = self.rooms.read();
        let members = rooms
            .get(room)
            .filter(|m| m.members.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        let target = members
            .members
            .get(to)
            .ok_or_else(|| Refused(ErrorCode::UnknownPeer, format!("no peer {to} in room {room}")))?;
        let sent = match &target.at {
            At::Local(outbox) => {
                // Changes are made under the lock held here: the count is this lookup's.
                let changes = self.rooms.changes();
                *route = Some(Route {
                    key: [room, to].concat().into(),
                    room_len: room.len(),
                    outbox: outbox.clone(),
                    changes,
                });
                outbox.try_deliver(frame)
            }
            At::Remote(node) => match self.backplane.get() {
                Some(bp) => bp.forward(node, room, Some(&PeerId::from_server(to)), from, &frame),
                None => Err(Full::Closed),
            },
        };
        sent_to(room, to, sent)
    }

    /// Delivers `frame` to every member of `room` but `from`; members whose
    /// queue cannot take it are named in one `peer_busy` refusal. Members on
    /// other nodes get it through their node (one copy per node), which
    /// refuses on their behalf the same way.
    pub fn broadcast(&self, room: &str, from: &PeerId, frame: Utf8Bytes) -> Result<(), Refused> {
        let rooms = self.rooms.read();
        let members = rooms
            .get(room)
            .filter(|m| m.members.contains_key(from))
            .ok_or_else(|| Refused(ErrorCode::NotInRoom, format!("you are not in room {room}")))?;
        let mut busy_peers = Vec::new();
        let mut why = Full::Connection;
        let mut nodes: Vec<&Arc<str>> = Vec::new();
        for (pid, m) in &members.members {
            if pid == from {
                continue;
            }
            match &m.at {
                At::Local(outbox) => match outbox.try_deliver(frame.clone()) {
                    Ok(()) => {
                        self.messages_relayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Full::Closed) => {}
                    Err(full) => {
                        busy_peers.push(pid);
                        why = full;
                    }
                },
                At::Remote(node) => {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
            }
        }
        if let Some(bp) = self.backplane.get() {
            for node in nodes {
                if let Err(full) = bp.forward(node, room, None, from, &frame) {
                    if full == Full::Down {
                        return Err(unavailable("not delivered to the members on other nodes"));
                    }
                    // Name those the copy was for.
                    busy_peers.extend(members.members.iter().filter_map(|(pid, m)| match &m.at {
                        At::Remote(n) if n == node => Some(pid),
                        _ => None,
                    }));
                    why = full;
                }
            }
        }
        if busy_peers.is_empty() { Ok(()) } else { Err(busy(&busy_peers, members.members.len() - 1, why)) }
    }

    /// Members on this node, by room, with their names and their
    /// connections' tokens: what a node puts back after Redis lost them.
    pub fn local_members(&self) -> Vec<(String, PeerId, Option<String>, u64)> {
        let rooms = self.rooms.read();
        let mut out = Vec::new();
        for (room, members) in rooms.iter() {
            for (id, m) in &members.members {
                if let At::Local(o) = &m.at {
                    out.push((room.clone(), id.clone(), m.name.clone(), o.token()));
                }
            }
        }
        out
    }

    /// Rooms with members (or joiners) on this node.
    pub fn local_rooms(&self) -> Vec<String> {
        let mut out: Vec<String> = self.rooms.read().keys().cloned().collect();
        for (room, _) in self.pending.lock().expect("hub lock").keys() {
            if !out.contains(room) {
                out.push(room.clone());
            }
        }
        out
    }

    /// Applies one event from the backplane's stream for this node.
    pub fn apply(&self, me: &str, event: Event) {
        match event {
            Event::Members { room, members, kept } => self.resync(me, &room, members, kept.as_deref()),
            Event::Joined { room, member } => {
                let mut rooms = self.rooms.write();
                let Some(r) = rooms.get_mut(&room) else { return };
                let id = PeerId::from_server(member.id);
                if let Some(m) = r.members.get_mut(&id) {
                    // Known already: put back after Redis lost it, or moved
                    // to another node (a resume; from here if it was ours,
                    // and its old connection's leave will find it gone).
                    match &mut m.at {
                        At::Remote(node) => *node = member.node.into(),
                        At::Local(_) if *member.node != *me => m.at = At::Remote(member.node.into()),
                        At::Local(_) => {}
                    }
                    // As Redis has it now (after a leave and a join again
                    // elsewhere: the new join's order and name).
                    m.since = member.s;
                    if member.n.is_some() {
                        m.name = member.n;
                    }
                    if !r.has_local() {
                        rooms.remove(&room);
                    }
                    return;
                }
                let info = PeerInfo { id: id.clone(), name: member.n.clone() };
                if r.members.len() < self.listed + 1 {
                    r.tell_locals(&id, &encode(&ServerMsg::PeerJoined { room: room.clone(), peer: info }));
                }
                r.members.insert(
                    id,
                    Member { name: member.n, at: At::Remote(member.node.into()), since: member.s },
                );
            }
            Event::Left { room, peer } => {
                let mut rooms = self.rooms.write();
                let Some(r) = rooms.get_mut(&room) else { return };
                let id = PeerId::from_server(peer);
                // A member of ours is never removed by another node (a
                // sweep after a partition): it is put back instead.
                if !matches!(r.members.get(&id), Some(Member { at: At::Remote(_), .. })) {
                    return;
                }
                r.members.remove(&id);
                if r.members.len() <= self.listed {
                    r.tell_locals(&id, &encode(&ServerMsg::PeerLeft { room, peer_id: id.clone() }));
                }
            }
            Event::Frame { room, to, from, from_node, frame } => {
                let rooms = self.rooms.read();
                let Some(r) = rooms.get(&room) else { return };
                let targets: Vec<(&PeerId, &Outbox)> = match &to {
                    Some(to) => r.locals().filter(|(id, _)| *id == to).collect(),
                    None => r.locals().filter(|(id, _)| *id != &from).collect(),
                };
                let mut refused = Vec::new();
                let mut why = Full::Connection;
                for (id, outbox) in &targets {
                    match outbox.try_deliver(frame.clone()) {
                        Ok(()) => {
                            if to.is_none() {
                                self.messages_relayed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(Full::Closed) => {}
                        Err(full) => {
                            refused.push(*id);
                            why = full;
                        }
                    }
                }
                let refusal = if let Some(to) = &to
                    && targets.is_empty()
                {
                    Some(Refused(ErrorCode::UnknownPeer, format!("peer {to} left room {room}")))
                } else if refused.is_empty() {
                    None
                } else {
                    Some(busy(&refused, targets.len(), why))
                };
                if let (Some(Refused(code, message)), Some(bp)) = (refusal, self.backplane.get()) {
                    bp.refuse(&from_node, &room, &from, &encode(&ServerMsg::Error { code, message }));
                }
            }
            Event::Refused { room, to, frame } => {
                let rooms = self.rooms.read();
                if let Some(At::Local(outbox)) =
                    rooms.get(&room).and_then(|r| r.members.get(&to)).map(|m| &m.at)
                {
                    outbox.deliver(frame);
                }
            }
        }
    }

    /// Makes the replica of `room` what the store says (`members`, in
    /// stream order), telling the members here what changed; a joiner here
    /// that the store lists gets its `joined`.
    fn resync(&self, me: &str, room: &str, members: Vec<Entry>, kept: Option<&str>) {
        let mut rooms = self.rooms.write();
        let mut pending = self.pending.lock().expect("hub lock");
        let mut old = rooms.remove(room).unwrap_or_default();
        let old_len = old.members.len();
        let mut new = Room::default();
        let mut joiners = Vec::new();
        let mut added = Vec::new();
        for e in members {
            let id = PeerId::from_server(e.id);
            let at = if e.node == me {
                let was = old.members.remove(&id);
                if let Some(p) = pending.remove(&(room.to_string(), id.clone())) {
                    // A joiner here, or a member resuming here (known
                    // before: not news to anyone).
                    joiners.push(id.clone());
                    if was.is_none() {
                        added.push(id.clone());
                    }
                    At::Local(p.outbox)
                } else if let Some(m) = was.filter(|m| matches!(m.at, At::Local(_))) {
                    m.at
                } else {
                    // Ours in the store but gone here: a join its connection
                    // gave up on, or a leave lost with a broken connection
                    // to Redis. Take it out (a repeated leave does nothing).
                    if let Some(bp) = self.backplane.get() {
                        bp.leave(room, &id);
                    }
                    continue;
                }
            } else {
                if old.members.remove(&id).is_none() {
                    added.push(id.clone());
                }
                At::Remote(e.node.into())
            };
            new.members.insert(id, Member { name: e.n, at, since: e.s });
        }
        // Ours that the store does not list yet (being put back) stay.
        let mut gone = Vec::new();
        for (id, m) in old.members.drain() {
            match m.at {
                At::Local(_) => {
                    new.members.insert(id, m);
                }
                At::Remote(_) => gone.push(id),
            }
        }
        let presence = new.members.len().max(old_len) <= self.listed + 1;
        for (id, outbox) in new.locals() {
            if joiners.contains(id) || !presence {
                continue;
            }
            for g in &gone {
                outbox.deliver(encode(&ServerMsg::PeerLeft { room: room.to_string(), peer_id: g.clone() }));
            }
            for a in &added {
                let peer = PeerInfo { id: a.clone(), name: new.members[a].name.clone() };
                outbox.deliver(encode(&ServerMsg::PeerJoined { room: room.to_string(), peer }));
            }
        }
        for j in &joiners {
            self.joins.fetch_add(1, Ordering::Relaxed);
            let At::Local(outbox) = &new.members[j].at else { continue };
            let resumed = kept == Some(j.as_str());
            let (peers, size) = new.listing(j, self.listed);
            outbox.deliver(encode(&ServerMsg::Joined { room: room.to_string(), peers, resumed, size }));
        }
        if new.has_local() {
            rooms.insert(room.to_string(), new);
        }
    }
}
