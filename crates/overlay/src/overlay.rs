//! The overlay state machine: HyParView views, Plumtree broadcast, and the
//! connections both ask for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::Id;
use crate::wire::{MAX_IHAVE, MAX_LISTED, Message};

#[path = "relay.rs"]
mod relay;
use relay::Route;

/// The overlay's settings. The defaults are iroh-gossip's HyParView and
/// Plumtree parameters, with timeouts stretched for WebRTC connections
/// (a new one costs a signaling round trip and a DTLS handshake).
#[derive(Debug, Clone)]
pub struct Config {
    /// Rooms of at most this many members are a full mesh: every member is
    /// everyone's neighbour.
    pub full_mesh_up_to: usize,
    /// Neighbours kept in a room larger than `full_mesh_up_to` (HyParView's
    /// active view; log10(N) + 2 for N up to 1,000).
    pub active_view: usize,
    /// Peers known beyond the neighbours, to replace them (HyParView's
    /// passive view).
    pub passive_view: usize,
    /// Length of a join's random walk (ARWL).
    pub active_walk: u8,
    /// Hop of a join's walk at which the newcomer goes to the passive view (PRWL).
    pub passive_walk: u8,
    /// How often a shuffle mixes passive views.
    pub shuffle_interval: Duration,
    /// Neighbours in a shuffle's sample.
    pub shuffle_active: usize,
    /// Spare peers in a shuffle's sample.
    pub shuffle_passive: usize,
    /// A connection not up this long after [`Output::Connect`] has failed.
    pub connect_timeout: Duration,
    /// A `Neighbor` or `Join` unanswered this long (connection included) failed.
    pub neighbor_timeout: Duration,
    /// How often views are repaired, spare connections closed and
    /// remembered ids expired.
    pub tick: Duration,
    /// `IHave`s are batched for this long.
    pub ihave_delay: Duration,
    /// How long after hearing of a broadcast it has not received a peer grafts.
    pub graft_timeout: Duration,
    /// How long after a graft it grafts the next peer that announced it.
    pub graft_retry: Duration,
    /// A broadcast announced by a neighbour at least this many hops closer
    /// than it arrived moves that neighbour into the tree (Plumtree's
    /// optimization).
    pub optimization_hops: u16,
    /// Broadcasts are kept this long to answer grafts.
    pub cache_retention: Duration,
    /// Bytes of broadcasts kept for grafts; the oldest go first.
    pub cache_bytes: usize,
    /// Broadcast ids are remembered this long to recognise duplicates.
    pub id_retention: Duration,
    /// Broadcast ids remembered at most; the oldest go first.
    pub max_ids: usize,
    /// A connection opened for messages to one peer closes after this long unused.
    pub idle_close: Duration,
    /// A connection that is neither a neighbour's nor in use closes after this long.
    pub linger: Duration,
    /// Connections at once; an on-demand one closes the least recently
    /// used spare to stay within it.
    pub max_connections: usize,
    /// Bytes queued per connection while it is being set up; messages beyond are dropped.
    pub max_queued_bytes: usize,
    /// Hops a relayed signal may cross ([`Overlay::relay`]).
    pub relay_ttl: u8,
    /// A route learned from a message is used this long (the reverse path
    /// of a join walk, a shuffle, a broadcast or a relayed signal).
    pub route_retention: Duration,
    /// Relayed signals passed on for others per second at most; beyond,
    /// they go back to their writer, who sends them through the server.
    pub max_relays_per_second: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            full_mesh_up_to: 8,
            active_view: 5,
            passive_view: 30,
            active_walk: 6,
            passive_walk: 3,
            shuffle_interval: Duration::from_secs(30),
            shuffle_active: 3,
            shuffle_passive: 4,
            connect_timeout: Duration::from_secs(15),
            neighbor_timeout: Duration::from_secs(20),
            tick: Duration::from_millis(500),
            ihave_delay: Duration::from_millis(10),
            graft_timeout: Duration::from_millis(150),
            graft_retry: Duration::from_millis(200),
            optimization_hops: 2,
            cache_retention: Duration::from_secs(30),
            cache_bytes: 16 << 20,
            id_retention: Duration::from_secs(120),
            max_ids: 200_000,
            idle_close: Duration::from_secs(30),
            linger: Duration::from_secs(2),
            max_connections: 8,
            max_queued_bytes: 256 << 10,
            relay_ttl: 8,
            route_retention: Duration::from_secs(60),
            max_relays_per_second: 200,
        }
    }
}

/// A broadcast received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<P> {
    /// Its id.
    pub id: u64,
    /// Who broadcast it.
    pub origin: P,
    /// Links it crossed to get here (1: from the origin itself).
    pub hops: u16,
    /// The application's message.
    pub payload: Vec<u8>,
}

/// What the caller carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Open a connection to this peer, and answer with
    /// [`Overlay::connected`] or [`Overlay::disconnected`].
    Connect(P),
    /// Close the connection to this peer (no [`Overlay::disconnected`] needed).
    Close(P),
    /// Send a message on the connection to this peer.
    Send(P, Message<P>),
    /// A broadcast for the application.
    Deliver(Delivery<P>),
    /// A message to us alone, for the application.
    Direct {
        /// The sender.
        from: P,
        /// The message.
        payload: Vec<u8>,
    },
    /// This peer became a neighbour.
    NeighborUp(P),
    /// This peer is no longer a neighbour.
    NeighborDown(P),
    /// `messages` sent with [`Overlay::send_direct`] to `peer` were not
    /// delivered: no connection to it could be made in three attempts.
    DirectFailed {
        /// The addressee.
        peer: P,
        /// How many messages were given up.
        messages: usize,
    },
    /// A signal relayed to us by `from` ([`Overlay::relay`] on its side).
    Relayed {
        /// Who wrote it.
        from: P,
        /// The signal.
        payload: Vec<u8>,
    },
    /// A signal we relayed to `to` did not get there (a hop had no route
    /// on, or was over its limit): send it another way (the server).
    RelayFailed {
        /// The addressee.
        to: P,
        /// The signal.
        payload: Vec<u8>,
    },
}

/// Counters, for `/metrics`-style observability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Neighbours now.
    pub neighbors: usize,
    /// Spare peers known now.
    pub passive: usize,
    /// Connections open or being opened now.
    pub connections: usize,
    /// Broadcasts delivered to the application.
    pub delivered: u64,
    /// Broadcasts received again (each leads to a prune).
    pub duplicates: u64,
    /// Broadcasts pushed to a neighbour (our own included).
    pub forwarded: u64,
    /// Ids announced lazily.
    pub announced: u64,
    /// Grafts sent: a broadcast that did not come in time was fetched (tree repairs).
    pub grafts: u64,
    /// Prunes sent.
    pub prunes: u64,
    /// Neighbours lost and replaced from the passive view.
    pub replacements: u64,
    /// Messages dropped: a connection's setup queue was full, or no
    /// connection could be opened within `max_connections`.
    pub dropped: u64,
    /// Signals we sent over the overlay ([`Overlay::relay`]).
    pub relayed: u64,
    /// Relayed signals that reached us.
    pub relays_received: u64,
    /// Relayed signals passed on for others.
    pub relays_forwarded: u64,
    /// Signals we relayed that came back unreachable.
    pub relays_failed: u64,
    /// Joins made again, alone with nobody to ask (see [`Overlay::join`]).
    pub rejoins: u64,
}

struct Conn<P> {
    up: bool,
    /// Deadline of a connection being set up.
    deadline: Instant,
    queue: VecDeque<Message<P>>,
    queued_bytes: usize,
    last_used: Instant,
    /// Carries messages to one peer: kept for `idle_close`.
    direct: bool,
}

impl<P> Conn<P> {
    /// A connection being set up, failed if not up by `deadline`.
    fn setting_up(deadline: Instant, now: Instant) -> Self {
        Conn { up: false, deadline, queue: VecDeque::new(), queued_bytes: 0, last_used: now, direct: false }
    }
}

struct Retry<P> {
    messages: VecDeque<Message<P>>,
    attempts: u8,
    at: Instant,
}

/// Broadcasts announced and not received, tracked at once.
const MAX_MISSING: usize = 4096;

/// Connection attempts for messages to one peer before they are given up.
const DIRECT_ATTEMPTS: u8 = 3;

/// A spare that turned down a neighbour request is not asked again (unless
/// we are below [`MIN_NEIGHBORS`]) for this long: each request costs it a
/// connection, and a full peer would refuse every tick.
const REFUSED_FOR: Duration = Duration::from_secs(10);

/// Fewest neighbours a peer settles for: below this it asks spares at high
/// priority, which they cannot refuse.
const MIN_NEIGHBORS: usize = 2;

/// With no neighbour, nobody to ask and no join under way, the join is
/// made again through the peers we joined by, first after this long, then
/// twice as long each time up to [`REJOIN_MAX`] (they were at their
/// connection limit, or the join was lost on the way).
const REJOIN_FIRST: Duration = Duration::from_secs(1);
const REJOIN_MAX: Duration = Duration::from_secs(30);

struct Cached<P> {
    /// The neighbour it came from (none: our own).
    from: Option<P>,
    origin: P,
    hops: u16,
    payload: Vec<u8>,
}

struct Missing<P> {
    /// Who announced it, with their hops.
    announcers: VecDeque<(P, u16)>,
    deadline: Instant,
}

/// One peer's overlay: see the crate docs.
pub struct Overlay<P: Id> {
    me: P,
    config: Config,
    rng: StdRng,
    active: Vec<P>,
    passive: Vec<P>,
    /// Neighbour requests (`Join` or `Neighbor`) awaiting an answer.
    pending: BTreeMap<P, Instant>,
    /// Contacts for a join not yet answered, tried in turn.
    contacts: Vec<P>,
    joining: Option<P>,
    /// The peers we joined through (the server's list), to join through
    /// again when we are left with nobody.
    introducers: Vec<P>,
    /// When to join again if still alone, and the last wait.
    rejoin: (Instant, Duration),
    /// Spares that turned a neighbour request down, and until when they
    /// are not asked again.
    refused: BTreeMap<P, Instant>,
    conns: BTreeMap<P, Conn<P>>,
    eager: BTreeSet<P>,
    lazy: BTreeSet<P>,
    seen: HashSet<u64>,
    seen_order: VecDeque<(Instant, u64)>,
    cache: HashMap<u64, Cached<P>>,
    cache_order: VecDeque<(Instant, u64)>,
    cache_used: usize,
    missing: HashMap<u64, Missing<P>>,
    lazy_out: BTreeMap<P, Vec<(u64, u16)>>,
    /// Duplicates in a row per neighbour.
    dup_streak: HashMap<P, u8>,
    lazy_flush: Option<Instant>,
    next_tick: Instant,
    next_shuffle: Instant,
    /// Messages to one peer whose connection failed, tried again later.
    retry: BTreeMap<P, Retry<P>>,
    /// Our broadcasts made while we had no neighbour, sent to the first one.
    unsent: VecDeque<u64>,
    /// Hops of the last broadcast delivered from each origin (bounded).
    hops_from: HashMap<P, u16>,
    /// Reverse paths to peers we are not connected to, for relayed signals.
    routes: HashMap<P, Route<P>>,
    /// Start of the current second, and relays passed on in it.
    relay_window: (Instant, u32),
    left: bool,
    out: VecDeque<Output<P>>,
    stats: Stats,
}

impl<P: Id> std::fmt::Debug for Overlay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("me", &self.me)
            .field("active", &self.active)
            .field("passive", &self.passive.len())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl<P: Id> Overlay<P> {
    /// A peer's overlay; `seed` seeds its random choices.
    pub fn new(me: P, config: Config, seed: u64, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Spread the peers' shuffles over the interval.
        let first_shuffle = config.shuffle_interval.mul_f64(0.5 + rng.random::<f64>());
        Overlay {
            me,
            rng,
            active: Vec::new(),
            passive: Vec::new(),
            pending: BTreeMap::new(),
            contacts: Vec::new(),
            joining: None,
            introducers: Vec::new(),
            rejoin: (now + REJOIN_FIRST, REJOIN_FIRST),
            refused: BTreeMap::new(),
            conns: BTreeMap::new(),
            eager: BTreeSet::new(),
            lazy: BTreeSet::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
            cache_used: 0,
            missing: HashMap::new(),
            lazy_out: BTreeMap::new(),
            dup_streak: HashMap::new(),
            lazy_flush: None,
            next_tick: now + config.tick,
            next_shuffle: now + first_shuffle,
            hops_from: HashMap::new(),
            routes: HashMap::new(),
            relay_window: (now, 0),
            unsent: VecDeque::new(),
            retry: BTreeMap::new(),
            left: false,
            out: VecDeque::new(),
            stats: Stats::default(),
            config,
        }
    }

    /// Peers whose connection is up now (a subset of [`Overlay::connections`]).
    pub fn connected_peers(&self) -> impl Iterator<Item = &P> {
        self.conns.iter().filter(|(_, c)| c.up).map(|(p, _)| p)
    }

    /// Our id.
    pub fn id(&self) -> &P {
        &self.me
    }

    /// The neighbours (the active view).
    pub fn neighbors(&self) -> &[P] {
        &self.active
    }

    /// The spare peers known (the passive view).
    pub fn passive(&self) -> &[P] {
        &self.passive
    }

    /// Peers with a connection open or being opened.
    pub fn connections(&self) -> impl Iterator<Item = &P> {
        self.conns.keys()
    }

    /// Hops the last broadcast from `origin` crossed to reach us, if one came.
    pub fn hops_from(&self, origin: &P) -> Option<u16> {
        self.hops_from.get(origin).copied()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            neighbors: self.active.len(),
            passive: self.passive.len(),
            connections: self.conns.len(),
            ..self.stats.clone()
        }
    }

    /// The next thing to carry out.
    pub fn poll_output(&mut self) -> Option<Output<P>> {
        self.out.pop_front()
    }

    /// When [`Overlay::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.left {
            return None;
        }
        let missing = self.missing.values().map(|m| m.deadline).min();
        [Some(self.next_tick), Some(self.next_shuffle), self.lazy_flush, missing].into_iter().flatten().min()
    }

    /// Joins the room through `contacts` (members the server listed, a
    /// random sample in a large room); `room_size` is how many members the
    /// room had besides us. In a room that stays a full mesh we ask every
    /// member to be a neighbour. Left with no neighbour and nobody to ask
    /// (every contact at its connection limit, or gone), the join is made
    /// again through the same contacts, after 1 s, then less often.
    pub fn join(&mut self, mut contacts: Vec<P>, room_size: usize, now: Instant) {
        contacts.retain(|c| *c != self.me);
        contacts.dedup();
        contacts.shuffle(&mut self.rng);
        for c in &contacts {
            self.add_passive(c.clone());
        }
        self.introducers = contacts.clone();
        self.rejoin = (now + REJOIN_FIRST, REJOIN_FIRST);
        if room_size < self.config.full_mesh_up_to && contacts.len() >= room_size {
            for c in contacts.clone() {
                self.request_neighbor(c, false, now);
            }
            return;
        }
        self.contacts = contacts;
        self.join_next(now);
    }

    fn join_next(&mut self, now: Instant) {
        while let Some(c) = self.contacts.pop() {
            if self.active.contains(&c) {
                continue;
            }
            self.joining = Some(c.clone());
            self.pending.insert(c.clone(), now + self.config.neighbor_timeout);
            self.send(c, Message::Join, now);
            return;
        }
        self.joining = None;
    }

    /// A member the server announced (`peer_joined`): a spare to use.
    pub fn peer_known(&mut self, peer: P) {
        if peer != self.me && !self.active.contains(&peer) {
            self.add_passive(peer);
        }
    }

    /// A member the server says left (`peer_left`).
    pub fn peer_gone(&mut self, peer: &P, now: Instant) {
        self.passive.retain(|p| p != peer);
        self.introducers.retain(|p| p != peer);
        if self.conns.contains_key(peer) {
            self.out.push_back(Output::Close(peer.clone()));
        }
        self.lost(peer, now);
    }

    /// Whether to take a connection `peer` is opening to us: within
    /// `max_connections`, closing the least recently used spare one if
    /// needed. Refused, the caller turns it down and should tell `peer`
    /// (which then calls [`Overlay::disconnected`]) rather than let it
    /// wait for its connect timeout.
    pub fn accept(&mut self, peer: P, now: Instant) -> bool {
        if self.left || peer == self.me {
            return false;
        }
        if self.conns.contains_key(&peer) {
            return true;
        }
        if !self.make_room() {
            return false;
        }
        self.conns.insert(peer, Conn::setting_up(now + self.config.connect_timeout, now));
        true
    }

    /// The connection to `peer` is up (whoever opened it). One we did not
    /// open or accept is closed if it would take us past `max_connections`.
    pub fn connected(&mut self, peer: P, now: Instant) {
        if self.left || peer == self.me {
            return;
        }
        if !self.conns.contains_key(&peer) && !self.make_room() {
            self.out.push_back(Output::Close(peer));
            return;
        }
        let conn = self.conns.entry(peer.clone()).or_insert_with(|| Conn::setting_up(now, now));
        conn.up = true;
        conn.last_used = now;
        conn.queued_bytes = 0;
        if let Some(r) = self.retry.get(&peer)
            && r.messages.is_empty()
        {
            self.retry.remove(&peer);
        }
        for msg in std::mem::take(&mut conn.queue) {
            self.out.push_back(Output::Send(peer.clone(), msg));
        }
    }

    /// The connection to `peer` failed or closed.
    pub fn disconnected(&mut self, peer: &P, now: Instant) {
        if let Some(c) = self.conns.remove(peer)
            && !c.up
        {
            self.setup_failed(peer, c, now);
        }
        self.lost(peer, now);
    }

    /// A connection that never came up: messages to its peer alone are
    /// tried again (a few times) rather than lost.
    fn setup_failed(&mut self, peer: &P, c: Conn<P>, now: Instant) {
        let direct: VecDeque<Message<P>> =
            c.queue.into_iter().filter(|m| matches!(m, Message::Direct { .. })).collect();
        if direct.is_empty() || self.left {
            return;
        }
        let r = self.retry.entry(peer.clone()).or_insert(Retry {
            messages: VecDeque::new(),
            attempts: 0,
            at: now,
        });
        r.attempts += 1;
        r.messages.extend(direct);
        r.at = now + Duration::from_secs(1);
        if r.attempts >= DIRECT_ATTEMPTS {
            let r = self.retry.remove(peer).expect("just inserted");
            self.stats.dropped += r.messages.len() as u64;
            self.out.push_back(Output::DirectFailed { peer: peer.clone(), messages: r.messages.len() });
        }
    }

    /// Broadcasts `payload` to the room; returns its id.
    pub fn broadcast(&mut self, payload: Vec<u8>, now: Instant) -> u64 {
        let id = self.rng.random::<u64>();
        self.remember(id, now);
        if self.small_room() {
            // A full mesh: straight to everyone. The links between the
            // others carry a copy at first, and are pruned by the duplicate.
            for p in self.active.clone() {
                self.stats.forwarded += 1;
                let msg = Message::Gossip {
                    id,
                    origin: self.me.clone(),
                    hops: 0,
                    all: true,
                    payload: payload.clone(),
                };
                self.send(p, msg, now);
            }
        } else {
            self.push(id, self.me.clone(), 0, &payload, None, now);
        }
        self.cache(id, None, self.me.clone(), 0, payload, now);
        if self.active.is_empty() {
            // Not connected yet (just joined, or every neighbour lost): the
            // first neighbour gets it, while it is cached.
            if self.unsent.len() >= 1024 {
                self.unsent.pop_front();
            }
            self.unsent.push_back(id);
        }
        id
    }

    /// Sends `payload` to `peer` alone, on a direct connection (opened if
    /// needed, closed after `idle_close` unused). Returns false if it was
    /// dropped: no connection can be opened within `max_connections`, or
    /// too much is queued for one being set up.
    pub fn send_direct(&mut self, peer: P, payload: Vec<u8>, now: Instant) -> bool {
        if peer == self.me || self.left {
            return false;
        }
        if !self.conns.contains_key(&peer) && !self.make_room() {
            self.stats.dropped += 1;
            return false;
        }
        let dropped = self.stats.dropped;
        self.send(peer.clone(), Message::Direct { payload }, now);
        if let Some(c) = self.conns.get_mut(&peer) {
            c.direct = true;
        }
        self.stats.dropped == dropped
    }

    /// Leaves: tells every neighbour. Nothing more goes out after this.
    pub fn leave(&mut self, now: Instant) {
        for a in self.active.clone() {
            self.send(a, Message::Disconnect { alive: false }, now);
        }
        self.left = true;
    }

    /// A message from `from`, on its connection.
    pub fn handle_message(&mut self, from: P, msg: Message<P>, now: Instant) {
        if self.left || from == self.me {
            return;
        }
        if let Some(c) = self.conns.get_mut(&from) {
            c.last_used = now;
        } else {
            self.connected(from.clone(), now);
            if !self.conns.contains_key(&from) {
                // Closed: over the limit.
                return;
            }
        }
        match msg {
            Message::Join => {
                self.add_active(from.clone(), now);
                self.send(from.clone(), Message::NeighborReply { accepted: true }, now);
                let ttl = self.config.active_walk;
                for a in self.active.clone() {
                    if a != from {
                        self.send(a, Message::ForwardJoin { peer: from.clone(), ttl }, now);
                    }
                }
            }
            Message::ForwardJoin { peer, ttl } => {
                self.learn_route(&peer, &from, now);
                self.forward_join(from, peer, ttl, now)
            }
            Message::Neighbor { high } => {
                let accepted = high || self.active.contains(&from) || self.active.len() < self.cap();
                if accepted {
                    self.add_active(from.clone(), now);
                }
                self.send(from, Message::NeighborReply { accepted }, now);
            }
            Message::NeighborReply { accepted } => {
                if self.pending.remove(&from).is_none() {
                    return;
                }
                if accepted {
                    self.add_active(from.clone(), now);
                } else {
                    self.refused.insert(from.clone(), now + REFUSED_FOR);
                    if self.conns.get(&from).is_some_and(|c| !c.direct) {
                        self.conns.remove(&from);
                        self.out.push_back(Output::Close(from.clone()));
                    }
                }
                if self.joining.as_ref() == Some(&from) {
                    if accepted {
                        self.joining = None;
                        self.contacts.clear();
                    } else {
                        self.join_next(now);
                    }
                }
            }
            Message::Disconnect { alive } => {
                let was = self.remove_active(&from);
                if alive {
                    self.add_passive(from.clone());
                } else {
                    self.passive.retain(|p| *p != from);
                }
                if let Some(c) = self.conns.get(&from)
                    && !c.direct
                {
                    self.conns.remove(&from);
                    self.out.push_back(Output::Close(from));
                }
                if was {
                    self.fill_active(now);
                }
            }
            Message::Shuffle { origin, ttl, peers } => {
                self.learn_route(&origin, &from, now);
                self.shuffle(from, origin, ttl, peers, now)
            }
            Message::ShuffleReply { peers } => self.merge(peers, &[]),
            Message::Gossip { id, origin, hops, all, payload } => {
                self.gossip(from, id, origin, hops, all, payload, now)
            }
            Message::IHave { ids } => {
                if !self.active.contains(&from) {
                    return;
                }
                for (id, hops) in ids {
                    if self.seen.contains(&id) {
                        self.maybe_optimize(&from, id, hops, now);
                        continue;
                    }
                    if self.missing.len() >= MAX_MISSING && !self.missing.contains_key(&id) {
                        // A neighbour announcing ids faster than they can be
                        // fetched: the rest wait for another announcement.
                        continue;
                    }
                    let deadline = now + self.config.graft_timeout;
                    let m = self
                        .missing
                        .entry(id)
                        .or_insert_with(|| Missing { announcers: VecDeque::new(), deadline });
                    if m.announcers.len() < 16 {
                        m.announcers.push_back((from.clone(), hops));
                    }
                }
            }
            Message::Graft { id } => {
                if self.active.contains(&from) {
                    self.lazy.remove(&from);
                    self.eager.insert(from.clone());
                }
                if let Some(c) = id.and_then(|id| self.cache.get(&id).map(|c| (id, c)))
                    && let (id, c) = c
                {
                    let msg = Message::Gossip {
                        id,
                        origin: c.origin.clone(),
                        hops: c.hops,
                        all: false,
                        payload: c.payload.clone(),
                    };
                    self.stats.forwarded += 1;
                    self.send(from, msg, now);
                }
            }
            Message::Prune => {
                if self.eager.remove(&from) {
                    self.lazy.insert(from);
                }
            }
            Message::Direct { payload } => {
                if let Some(c) = self.conns.get_mut(&from) {
                    c.direct = true;
                }
                self.out.push_back(Output::Direct { from, payload });
            }
            Message::Relay { to, from: writer, ttl, payload } => {
                self.on_relay(from, to, writer, ttl, payload, now)
            }
            Message::Unreachable { to, from: addressee, ttl, payload } => {
                self.on_unreachable(from, to, addressee, ttl, payload, now)
            }
        }
    }

    /// Timers: grafts, batched `IHave`s, shuffles, and the periodic repair.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.left {
            return;
        }
        if self.lazy_flush.is_some_and(|t| t <= now) {
            self.lazy_flush = None;
            for (peer, ids) in std::mem::take(&mut self.lazy_out) {
                if !self.active.contains(&peer) {
                    continue;
                }
                for chunk in ids.chunks(MAX_IHAVE) {
                    self.stats.announced += chunk.len() as u64;
                    self.send(peer.clone(), Message::IHave { ids: chunk.to_vec() }, now);
                }
            }
        }
        let mut due: Vec<u64> =
            self.missing.iter().filter(|(_, m)| m.deadline <= now).map(|(id, _)| *id).collect();
        due.sort_unstable();
        for id in due {
            self.graft(id, now);
        }
        if self.next_shuffle <= now {
            self.next_shuffle = now + self.config.shuffle_interval;
            self.start_shuffle(now);
        }
        if self.next_tick <= now {
            self.next_tick = now + self.config.tick;
            self.tick(now);
        }
    }

    /// Whether the room is small enough to be a full mesh.
    fn small_room(&self) -> bool {
        1 + self.active.len() + self.passive.len() <= self.config.full_mesh_up_to
    }

    /// How many neighbours to keep now.
    fn cap(&self) -> usize {
        if self.small_room() {
            self.config.full_mesh_up_to.saturating_sub(1).max(1)
        } else {
            self.config.active_view.max(1)
        }
    }

    fn add_passive(&mut self, peer: P) {
        if peer == self.me || self.passive.contains(&peer) || self.active.contains(&peer) {
            return;
        }
        if self.passive.len() >= self.config.passive_view.max(1) {
            let i = self.rng.random_range(0..self.passive.len());
            self.passive.swap_remove(i);
        }
        self.passive.push(peer);
    }

    fn add_active(&mut self, peer: P, now: Instant) {
        self.pending.remove(&peer);
        if peer == self.me || self.active.contains(&peer) {
            return;
        }
        if !self.conns.contains_key(&peer) && !self.can_open() {
            // Every connection is a neighbour's or being set up.
            return;
        }
        self.passive.retain(|p| *p != peer);
        while self.active.len() >= self.cap() {
            let victim = self.active.choose(&mut self.rng).cloned().expect("active view is not empty");
            self.evict(victim, now);
        }
        self.active.push(peer.clone());
        self.rejoin.1 = REJOIN_FIRST;
        self.eager.insert(peer.clone());
        self.lazy.remove(&peer);
        if !self.conns.contains_key(&peer) && !self.open(peer.clone(), now) {
            // Room was made by the eviction above, or was there: not reached.
            self.remove_active(&peer);
            return;
        }
        for id in std::mem::take(&mut self.unsent) {
            if let Some(c) = self.cache.get(&id) {
                let msg = Message::Gossip {
                    id,
                    origin: self.me.clone(),
                    hops: 0,
                    all: false,
                    payload: c.payload.clone(),
                };
                self.stats.forwarded += 1;
                self.send(peer.clone(), msg, now);
            }
        }
        self.out.push_back(Output::NeighborUp(peer));
    }

    /// Drops a neighbour on purpose: it stays a spare.
    fn evict(&mut self, victim: P, now: Instant) {
        self.send(victim.clone(), Message::Disconnect { alive: true }, now);
        self.remove_active(&victim);
        self.add_passive(victim);
    }

    fn remove_active(&mut self, peer: &P) -> bool {
        let Some(i) = self.active.iter().position(|a| a == peer) else { return false };
        self.active.swap_remove(i);
        self.eager.remove(peer);
        self.lazy.remove(peer);
        self.lazy_out.remove(peer);
        self.dup_streak.remove(peer);
        self.out.push_back(Output::NeighborDown(peer.clone()));
        true
    }

    /// `peer` is unreachable or gone: forget it and repair.
    fn lost(&mut self, peer: &P, now: Instant) {
        let was_active = self.remove_active(peer);
        let was_pending = self.pending.remove(peer).is_some();
        if was_pending {
            self.passive.retain(|p| p != peer);
        }
        if was_active {
            self.stats.replacements += 1;
        }
        if self.joining.as_ref() == Some(peer) {
            self.join_next(now);
        }
        if was_active || was_pending {
            self.fill_active(now);
        }
    }

    fn request_neighbor(&mut self, peer: P, high: bool, now: Instant) {
        if peer == self.me || self.active.contains(&peer) || self.pending.contains_key(&peer) {
            return;
        }
        self.pending.insert(peer.clone(), now + self.config.neighbor_timeout);
        self.send(peer, Message::Neighbor { high }, now);
    }

    /// Asks spares to become neighbours until the active view would be full.
    fn fill_active(&mut self, now: Instant) {
        let cap = self.cap();
        let mut wanted = cap.saturating_sub(self.active.len() + self.pending.len());
        if wanted == 0 || self.joining.is_some() {
            return;
        }
        // Below two neighbours we ask at high priority, which is never
        // refused: with one, every spare with a full view would turn us
        // down, and we would hang on that one link (HyParView asks so only
        // with none). Not in views of two: the peer a full one gives up
        // would then be left with one and ask the same way, and so on.
        let high = self.active.len() < MIN_NEIGHBORS.min(cap - 1).max(1);
        let mut spares: Vec<P> = self
            .passive
            .iter()
            .filter(|p| !self.pending.contains_key(*p))
            .filter(|p| high || self.refused.get(*p).is_none_or(|until| *until <= now))
            .cloned()
            .collect();
        spares.shuffle(&mut self.rng);
        for p in spares {
            if wanted == 0 || !self.can_open() {
                break;
            }
            self.request_neighbor(p, high, now);
            wanted -= 1;
        }
    }

    /// Joins again through the peers we joined by, when we are left with
    /// no neighbour, no spare and no request under way (see [`REJOIN_FIRST`]).
    fn rejoin_if_alone(&mut self, now: Instant) {
        let alone = self.active.is_empty()
            && self.pending.is_empty()
            && self.joining.is_none()
            && self.passive.is_empty()
            && !self.introducers.is_empty();
        if !alone || now < self.rejoin.0 {
            return;
        }
        let wait = (self.rejoin.1 * 2).min(REJOIN_MAX);
        self.rejoin = (now + wait, wait);
        self.stats.rejoins += 1;
        let mut contacts = self.introducers.clone();
        contacts.shuffle(&mut self.rng);
        self.contacts = contacts;
        self.join_next(now);
    }

    fn forward_join(&mut self, from: P, peer: P, ttl: u8, now: Instant) {
        if peer == self.me {
            return;
        }
        if ttl == 0 || self.active.len() <= 1 {
            if !self.active.contains(&peer) {
                self.add_active(peer.clone(), now);
                if self.active.contains(&peer) {
                    self.send(peer, Message::Neighbor { high: true }, now);
                }
            }
            return;
        }
        if ttl == self.config.passive_walk {
            self.add_passive(peer.clone());
        }
        let next: Vec<P> = self.active.iter().filter(|a| **a != from && **a != peer).cloned().collect();
        match next.choose(&mut self.rng) {
            Some(n) => self.send(n.clone(), Message::ForwardJoin { peer, ttl: ttl - 1 }, now),
            None if !self.active.contains(&peer) => {
                self.add_active(peer.clone(), now);
                if self.active.contains(&peer) {
                    self.send(peer, Message::Neighbor { high: true }, now);
                }
            }
            None => {}
        }
    }

    fn start_shuffle(&mut self, now: Instant) {
        let Some(target) = self.active.choose(&mut self.rng).cloned() else { return };
        let mut peers = vec![self.me.clone()];
        peers.extend(self.active.choose_multiple(&mut self.rng, self.config.shuffle_active).cloned());
        peers.extend(self.passive.choose_multiple(&mut self.rng, self.config.shuffle_passive).cloned());
        peers.retain(|p| *p != target);
        peers.truncate(MAX_LISTED);
        let ttl = self.config.active_walk;
        self.send(target, Message::Shuffle { origin: self.me.clone(), ttl, peers }, now);
    }

    fn shuffle(&mut self, from: P, origin: P, ttl: u8, peers: Vec<P>, now: Instant) {
        if ttl > 1 && self.active.len() > 1 {
            let next: Vec<P> = self.active.iter().filter(|a| **a != from && **a != origin).cloned().collect();
            if let Some(n) = next.choose(&mut self.rng) {
                self.send(n.clone(), Message::Shuffle { origin, ttl: ttl - 1, peers }, now);
                return;
            }
        }
        let reply: Vec<P> = self.passive.choose_multiple(&mut self.rng, peers.len()).cloned().collect();
        self.send(from, Message::ShuffleReply { peers: reply.clone() }, now);
        self.merge(peers, &reply);
    }

    /// Adds `peers` to the passive view, replacing `sent` ones first.
    fn merge(&mut self, peers: Vec<P>, sent: &[P]) {
        let mut sent: Vec<P> = sent.to_vec();
        for p in peers.into_iter().take(MAX_LISTED) {
            if p == self.me || self.active.contains(&p) || self.passive.contains(&p) {
                continue;
            }
            if self.passive.len() >= self.config.passive_view.max(1)
                && let Some(s) = sent.pop()
            {
                self.passive.retain(|x| *x != s);
            }
            self.add_passive(p);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gossip(&mut self, from: P, id: u64, origin: P, hops: u16, all: bool, payload: Vec<u8>, now: Instant) {
        if self.seen.contains(&id) {
            // The sender pushes to us eagerly: that link closes a cycle in
            // the tree, and both ends drop it (whether or not we still push
            // to it) — on the second duplicate in a row from it: a single
            // one is often two broadcasts from different origins crossing,
            // and pruning for each breaks the tree where another cycle
            // link is pruned at the same moment.
            self.stats.duplicates += 1;
            let n = self.dup_streak.entry(from.clone()).or_default();
            *n += 1;
            if *n < 2 {
                return;
            }
            self.dup_streak.remove(&from);
            if self.eager.remove(&from) {
                self.lazy.insert(from.clone());
            }
            self.stats.prunes += 1;
            self.send(from, Message::Prune, now);
            return;
        }
        self.dup_streak.remove(&from);
        self.remember(id, now);
        self.learn_route(&origin, &from, now);
        self.missing.remove(&id);
        if self.active.contains(&from) {
            self.lazy.remove(&from);
            self.eager.insert(from.clone());
        }
        let hops = hops.saturating_add(1);
        self.stats.delivered += 1;
        if self.hops_from.len() >= 4096 && !self.hops_from.contains_key(&origin) {
            self.hops_from.clear();
        }
        self.hops_from.insert(origin.clone(), hops);
        self.out.push_back(Output::Deliver(Delivery {
            id,
            origin: origin.clone(),
            hops,
            payload: payload.clone(),
        }));
        if all {
            // Its origin sent it to each of its neighbours: announce it to
            // ours, in case one is not connected to the origin.
            for p in self.active.clone() {
                if p != from && p != origin {
                    self.lazy_out.entry(p).or_default().push((id, hops));
                }
            }
            if !self.lazy_out.is_empty() && self.lazy_flush.is_none() {
                self.lazy_flush = Some(now + self.config.ihave_delay);
            }
            self.cache(id, Some(from), origin, hops, payload, now);
        } else if origin != self.me {
            self.push(id, origin.clone(), hops, &payload, Some(&from), now);
            self.cache(id, Some(from), origin, hops, payload, now);
        }
    }

    /// Eager push to the tree, ids to the rest.
    fn push(&mut self, id: u64, origin: P, hops: u16, payload: &[u8], except: Option<&P>, now: Instant) {
        let eager: Vec<P> =
            self.eager.iter().filter(|p| Some(*p) != except && **p != origin).cloned().collect();
        for p in eager {
            self.stats.forwarded += 1;
            let msg =
                Message::Gossip { id, origin: origin.clone(), hops, all: false, payload: payload.to_vec() };
            self.send(p, msg, now);
        }
        let lazy: Vec<P> =
            self.lazy.iter().filter(|p| Some(*p) != except && **p != origin).cloned().collect();
        for p in lazy {
            self.lazy_out.entry(p).or_default().push((id, hops));
        }
        if !self.lazy_out.is_empty() && self.lazy_flush.is_none() {
            self.lazy_flush = Some(now + self.config.ihave_delay);
        }
    }

    /// A broadcast we have, announced by `from` closer to its origin than
    /// it reached us: `from` joins the tree, the link it came over leaves it.
    fn maybe_optimize(&mut self, from: &P, id: u64, hops: u16, now: Instant) {
        let Some(c) = self.cache.get_mut(&id) else { return };
        if hops.saturating_add(1).saturating_add(self.config.optimization_hops) > c.hops
            || !self.lazy.contains(from)
        {
            return;
        }
        // Swap the tree link: the announcer pushes to us from now on, the
        // link the broadcast came over stops.
        let old = c.from.replace(from.clone());
        c.hops = hops.saturating_add(1);
        self.lazy.remove(from);
        self.eager.insert(from.clone());
        self.send(from.clone(), Message::Graft { id: None }, now);
        if let Some(old) = old
            && old != *from
            && self.eager.remove(&old)
        {
            self.lazy.insert(old.clone());
            self.stats.prunes += 1;
            self.send(old, Message::Prune, now);
        }
    }

    fn graft(&mut self, id: u64, now: Instant) {
        let Some(m) = self.missing.get_mut(&id) else { return };
        while let Some((peer, _)) = m.announcers.pop_front() {
            if !self.active.contains(&peer) {
                continue;
            }
            m.deadline = now + self.config.graft_retry;
            self.lazy.remove(&peer);
            self.eager.insert(peer.clone());
            self.stats.grafts += 1;
            self.send(peer, Message::Graft { id: Some(id) }, now);
            return;
        }
        self.missing.remove(&id);
    }

    fn remember(&mut self, id: u64, now: Instant) {
        if self.seen.insert(id) {
            self.seen_order.push_back((now, id));
        }
        while self.seen_order.len() > self.config.max_ids {
            let (_, old) = self.seen_order.pop_front().expect("not empty");
            self.seen.remove(&old);
        }
    }

    fn cache(&mut self, id: u64, from: Option<P>, origin: P, hops: u16, payload: Vec<u8>, now: Instant) {
        self.cache_used += payload.len();
        self.cache.insert(id, Cached { from, origin, hops, payload });
        self.cache_order.push_back((now, id));
        while self.cache_used > self.config.cache_bytes {
            let Some((_, old)) = self.cache_order.pop_front() else { break };
            if let Some(c) = self.cache.remove(&old) {
                self.cache_used -= c.payload.len();
            }
        }
    }

    /// Periodic repair: failed setups, unanswered requests, spare
    /// connections, an over-full or short active view, expired ids.
    fn tick(&mut self, now: Instant) {
        let failed: Vec<P> =
            self.conns.iter().filter(|(_, c)| !c.up && c.deadline <= now).map(|(p, _)| p.clone()).collect();
        for p in failed {
            if let Some(c) = self.conns.remove(&p) {
                self.setup_failed(&p, c, now);
            }
            self.out.push_back(Output::Close(p.clone()));
            self.lost(&p, now);
        }
        let due: Vec<P> = self.retry.iter().filter(|(_, r)| r.at <= now).map(|(p, _)| p.clone()).collect();
        for p in due {
            if self.conns.contains_key(&p) || !self.make_room() {
                continue;
            }
            let Some(r) = self.retry.get_mut(&p) else { continue };
            let messages = std::mem::take(&mut r.messages);
            for m in messages {
                self.send(p.clone(), m, now);
            }
            if let Some(c) = self.conns.get_mut(&p) {
                c.direct = true;
            }
        }
        let unanswered: Vec<P> =
            self.pending.iter().filter(|(_, d)| **d <= now).map(|(p, _)| p.clone()).collect();
        for p in unanswered {
            if self.conns.remove(&p).is_some() {
                self.out.push_back(Output::Close(p.clone()));
            }
            self.lost(&p, now);
        }
        while self.active.len() > self.cap() {
            let victim = self.active.choose(&mut self.rng).cloned().expect("active view is not empty");
            self.evict(victim, now);
        }
        let spare: Vec<P> = self
            .conns
            .iter()
            .filter(|(p, c)| {
                let keep = if c.direct { self.config.idle_close } else { self.config.linger };
                c.up && !self.active.contains(p)
                    && !self.pending.contains_key(*p)
                    && c.last_used + keep <= now
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in spare {
            self.conns.remove(&p);
            self.out.push_back(Output::Close(p));
        }
        self.fill_active(now);
        self.rejoin_if_alone(now);
        self.refused.retain(|_, until| *until > now);
        self.routes.retain(|_, r| r.live(now));
        let ids = now.checked_sub(self.config.id_retention);
        while let Some((t, id)) = self.seen_order.front().copied() {
            if ids.is_none_or(|cut| t > cut) {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&id);
        }
        let cached = now.checked_sub(self.config.cache_retention);
        while let Some((t, id)) = self.cache_order.front().copied() {
            if cached.is_none_or(|cut| t > cut) {
                break;
            }
            self.cache_order.pop_front();
            if let Some(c) = self.cache.remove(&id) {
                self.cache_used -= c.payload.len();
            }
        }
    }

    /// Closes the least recently used spare connection, if the limit needs it.
    fn make_room(&mut self) -> bool {
        if self.conns.len() < self.config.max_connections {
            return true;
        }
        let victim = self
            .conns
            .iter()
            // Not one being set up: its peer is waiting on it.
            .filter(|(p, c)| c.up && !self.active.contains(p) && !self.pending.contains_key(*p))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(p, _)| p.clone());
        match victim {
            Some(v) => {
                self.conns.remove(&v);
                self.out.push_back(Output::Close(v));
                true
            }
            None => false,
        }
    }

    /// Whether a connection can be opened within `max_connections` (after
    /// closing a spare one).
    fn can_open(&self) -> bool {
        self.conns.len() < self.config.max_connections
            || self
                .conns
                .iter()
                .any(|(p, c)| c.up && !self.active.contains(p) && !self.pending.contains_key(p))
    }

    /// Opens a connection within `max_connections`, closing the least
    /// recently used spare one if needed; false if none can be.
    fn open(&mut self, peer: P, now: Instant) -> bool {
        if !self.make_room() {
            return false;
        }
        self.conns.insert(peer.clone(), Conn::setting_up(now + self.config.connect_timeout, now));
        self.out.push_back(Output::Connect(peer));
        true
    }

    /// Sends on the connection to `to`, opening it first if needed. With
    /// no connection to be had, the message is dropped (a request counts
    /// as unanswered; the periodic repair tries others later).
    fn send(&mut self, to: P, msg: Message<P>, now: Instant) {
        if !self.conns.contains_key(&to) && !self.open(to.clone(), now) {
            self.stats.dropped += 1;
            self.pending.remove(&to);
            return;
        }
        let limit = self.config.max_queued_bytes;
        let c = self.conns.get_mut(&to).expect("opened above");
        c.last_used = now;
        if c.up {
            self.out.push_back(Output::Send(to, msg));
            return;
        }
        let size = queued_size(&msg);
        if c.queued_bytes + size > limit {
            self.stats.dropped += 1;
            return;
        }
        c.queued_bytes += size;
        c.queue.push_back(msg);
    }
}

/// Roughly what a message costs in a setup queue.
fn queued_size<P>(msg: &Message<P>) -> usize {
    match msg {
        Message::Gossip { payload, .. }
        | Message::Direct { payload }
        | Message::Relay { payload, .. }
        | Message::Unreachable { payload, .. } => payload.len() + 32,
        Message::IHave { ids } => ids.len() * 10 + 4,
        _ => 64,
    }
}
