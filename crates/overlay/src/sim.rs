//! Whole rooms of [`Overlay`]s on simulated time, without sockets: links
//! with latency and loss, connections that take round trips to set up,
//! joins in bursts, peers leaving (gracefully or by vanishing) and others
//! joining, and broadcasts from random peers. Used by the crate's tests and
//! by `peerlink bench overlay`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::{Config, Message, Output, Overlay};

/// What happens to a message its link loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// Retransmitted after a timeout, as on peerlink's reliable channels
    /// (SCTP): late, never lost while the connection lasts.
    Retransmit,
    /// Gone: the overlay must repair it (a harsher model than the real one).
    Drop,
}

/// One simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Peers that join in the first phase.
    pub peers: usize,
    /// Seeds every random choice: a run is reproducible.
    pub seed: u64,
    /// Chance a message is lost on its link.
    pub loss: f64,
    /// What a loss costs.
    pub loss_mode: LossMode,
    /// One-way latency between two peers: fixed per pair, uniform in this range.
    pub latency: (Duration, Duration),
    /// Peers joining at once in the first phase.
    pub join_burst: usize,
    /// Time between bursts.
    pub burst_every: Duration,
    /// Quiet time after the last burst before broadcasts start.
    pub settle: Duration,
    /// How long broadcasts (and churn) go on.
    pub measure: Duration,
    /// Fraction of the peers that leave per minute while measuring (as many
    /// join); half leave cleanly, half vanish.
    pub churn_per_minute: f64,
    /// Broadcasts per second, each from a random peer.
    pub broadcasts_per_second: f64,
    /// Bytes per broadcast.
    pub payload: usize,
    /// Members the server lists to a newcomer (a random sample).
    pub sample: usize,
    /// How long until the neighbours of a peer that vanished notice.
    pub vanish_detect: Duration,
    /// A broadcast counts as delivered to a peer within this long; peers
    /// that joined this long before it and stayed this long after must get it.
    pub window: Duration,
    /// The overlay's settings.
    pub overlay: Config,
}

impl SimConfig {
    /// The scenario: `peers` peers, 20-80 ms one-way latency, 1 %
    /// loss, joins in bursts of 50 per second, then `churn` of the peers
    /// leaving per minute (as many joining) for two minutes, with two
    /// broadcasts per second.
    pub fn scenario(peers: usize, churn: f64, loss_mode: LossMode, seed: u64) -> Self {
        SimConfig {
            peers,
            seed,
            loss: 0.01,
            loss_mode,
            latency: (Duration::from_millis(20), Duration::from_millis(80)),
            join_burst: 50,
            burst_every: Duration::from_secs(1),
            settle: Duration::from_secs(15),
            measure: Duration::from_secs(120),
            churn_per_minute: churn,
            broadcasts_per_second: 2.0,
            payload: 100,
            sample: 32,
            vanish_detect: Duration::from_secs(5),
            window: Duration::from_secs(10),
            overlay: Config::default(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Peers at the end.
    pub peers_at_end: usize,
    /// Peers that joined during the measurement.
    pub joined: usize,
    /// Peers that left during the measurement.
    pub left: usize,
    /// Broadcasts sent.
    pub broadcasts: usize,
    /// (broadcast, peer) pairs that had to be delivered.
    pub expected: u64,
    /// Of those, delivered within the window.
    pub delivered: u64,
    /// Duplicates received per broadcast delivered.
    pub duplicates_per_delivery: f64,
    /// Hops of deliveries: median, 99th percentile, most.
    pub hops_p50: u16,
    /// 99th percentile of hops.
    pub hops_p99: u16,
    /// Most hops.
    pub hops_max: u16,
    /// Delivery latency, median.
    pub latency_p50: Duration,
    /// Delivery latency, 99th percentile.
    pub latency_p99: Duration,
    /// Most connections any peer held at any sampled moment (every 100 ms).
    pub max_connections: usize,
    /// Mean connections per peer, over the samples.
    pub mean_connections: f64,
    /// Overlay messages sent per peer per broadcast (all kinds).
    pub messages_per_peer_per_broadcast: f64,
    /// Broadcast payload copies sent per broadcast, against N - 1 for a full mesh.
    pub payload_copies_per_broadcast: f64,
    /// Grafts (tree repairs) over the run.
    pub grafts: u64,
    /// Neighbours replaced over the run.
    pub replacements: u64,
    /// Simulated events processed.
    pub events: u64,
    /// Connections opened over the run.
    pub connections_opened: u64,
    /// Of those, how many had their offer relayed over the overlay (a
    /// route to the peer was known) instead of sent through the server.
    pub offers_relayed: u64,
    /// Relayed offers that reached their peer.
    pub offers_delivered: u64,
    /// Relayed offers that came back unreachable (then sent through the server).
    pub offers_bounced: u64,
}

impl SimReport {
    /// Delivered / expected.
    pub fn delivery_ratio(&self) -> f64 {
        if self.expected == 0 { 1.0 } else { self.delivered as f64 / self.expected as f64 }
    }
}

enum Ev {
    Join(u32),
    Leave(u32, bool),
    Deliver { from: u32, to: u32, epoch: u64, msg: Message<u32> },
    ConnUp { a: u32, b: u32, epoch: u64 },
    AlreadyUp { a: u32, b: u32, epoch: u64 },
    ConnFail { a: u32, b: u32 },
    Gone { to: u32, peer: u32, epoch: u64 },
    Timer(u32),
    Broadcast,
    Churn,
    Sample,
}

struct Node {
    ov: Overlay<u32>,
    alive: bool,
    joined_at: u64,
    left_at: Option<u64>,
    timer: Option<u64>,
}

struct Link {
    up: bool,
    /// Who opened it: while it is being set up only they hold it.
    opener: u32,
    epoch: u64,
    /// Last delivery time per direction (lower id → higher id, and back), for FIFO.
    last: [u64; 2],
}

struct Bcast {
    at: u64,
    origin: u32,
}

/// A running simulation.
struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    base: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    nodes: Vec<Node>,
    present: Vec<u32>,
    links: HashMap<(u32, u32), Link>,
    next_epoch: u64,
    bcasts: HashMap<u64, Bcast>,
    /// (broadcast id, peer) → delivery time.
    got: HashMap<(u64, u32), u64>,
    hops: Vec<u16>,
    latencies: Vec<u64>,
    sent_messages: u64,
    payload_copies: u64,
    conn_samples: (u64, u64),
    max_conns: usize,
    measuring: (u64, u64),
    report: SimReport,
    churn_carry: f64,
}

const MS: u64 = 1000;

/// The signal a connection's opener relays when it can.
const OFFER: &[u8] = b"offer";

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Sim {
    fn at(&self, t: u64) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn latency(&self, a: u32, b: u32) -> u64 {
        let (lo, hi) = (micros(self.cfg.latency.0), micros(self.cfg.latency.1));
        let (x, y) = if a < b { (a, b) } else { (b, a) };
        let mut h = (u64::from(x) << 32 | u64::from(y)) ^ self.cfg.seed;
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        lo + h % (hi - lo).max(1)
    }

    fn key(a: u32, b: u32) -> (u32, u32) {
        if a < b { (a, b) } else { (b, a) }
    }

    fn add_node(&mut self) -> u32 {
        let id = self.nodes.len() as u32;
        let seed = self.rng.random();
        let now = self.at(self.now);
        self.nodes.push(Node {
            ov: Overlay::new(id, self.cfg.overlay.clone(), seed, now),
            alive: true,
            joined_at: self.now,
            left_at: None,
            timer: None,
        });
        id
    }

    fn join(&mut self, id: u32) {
        let sample: Vec<u32> =
            self.present.choose_multiple(&mut self.rng, self.cfg.sample).copied().collect();
        let size = self.present.len();
        let now = self.at(self.now);
        self.nodes[id as usize].ov.join(sample, size, now);
        self.present.push(id);
        self.flush(id);
    }

    fn leave(&mut self, id: u32, graceful: bool) {
        if !self.nodes[id as usize].alive {
            return;
        }
        self.present.retain(|p| *p != id);
        if graceful {
            let now = self.at(self.now);
            self.nodes[id as usize].ov.leave(now);
            self.flush(id);
        }
        let node = &mut self.nodes[id as usize];
        node.alive = false;
        node.left_at = Some(self.now);
        // Its connections end: at once for the others' view of a clean
        // leave (a DTLS close), after `vanish_detect` for one that vanished.
        let mut peers: Vec<(u32, u64)> = self
            .links
            .iter()
            .filter(|((a, b), _)| *a == id || *b == id)
            .map(|((a, b), l)| (if *a == id { *b } else { *a }, l.epoch))
            .collect();
        peers.sort_unstable();
        for (p, epoch) in peers {
            let delay = if graceful { self.latency(id, p) + 50 * MS } else { micros(self.cfg.vanish_detect) };
            self.schedule(self.now + delay, Ev::Gone { to: p, peer: id, epoch });
        }
    }

    /// Carries out a node's outputs and reschedules its timer.
    fn flush(&mut self, id: u32) {
        while let Some(out) = self.nodes[id as usize].ov.poll_output() {
            match out {
                Output::Connect(peer) => self.connect(id, peer),
                Output::Close(peer) => self.close(id, peer),
                Output::Send(peer, msg) => self.send(id, peer, msg),
                Output::Deliver(d) => {
                    if let Some(b) = self.bcasts.get(&d.id) {
                        self.got.entry((d.id, id)).or_insert(self.now);
                        if b.at >= self.measuring.0 {
                            self.hops.push(d.hops);
                            self.latencies.push(self.now - b.at);
                        }
                    }
                }
                Output::Relayed { payload, .. } if payload == OFFER => self.report.offers_delivered += 1,
                Output::RelayFailed { payload, .. } if payload == OFFER => self.report.offers_bounced += 1,
                Output::Direct { .. }
                | Output::DirectFailed { .. }
                | Output::Relayed { .. }
                | Output::RelayFailed { .. }
                | Output::NeighborUp(_)
                | Output::NeighborDown(_) => {}
            }
        }
        let node = &mut self.nodes[id as usize];
        if !node.alive {
            return;
        }
        if let Some(t) = node.ov.poll_timeout() {
            // Rounded up: a deadline between two microseconds is due at the later one.
            let t = (t.saturating_duration_since(self.base).as_nanos().div_ceil(1000) as u64).max(self.now);
            if node.timer.is_none_or(|old| t < old) {
                node.timer = Some(t);
                self.schedule(t, Ev::Timer(id));
            }
        }
    }

    fn connect(&mut self, a: u32, b: u32) {
        let key = Self::key(a, b);
        if let Some(l) = self.links.get(&key) {
            if l.up {
                let epoch = l.epoch;
                self.schedule(self.now, Ev::AlreadyUp { a, b, epoch });
            }
            return;
        }
        // The offer goes over the overlay when a route is known; the
        // connection's timing is modelled as through the server either way.
        let now = self.at(self.now);
        self.report.connections_opened += 1;
        if self.nodes[a as usize].ov.relay(b, OFFER.to_vec(), now) {
            self.report.offers_relayed += 1;
        }
        if !self.nodes[b as usize].alive {
            self.schedule(self.now + micros(self.cfg.overlay.connect_timeout) / 2, Ev::ConnFail { a, b });
            return;
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.links.insert(key, Link { up: false, opener: a, epoch, last: [0, 0] });
        // Offer and answer through the server, then ICE, DTLS and SCTP:
        // about three round trips.
        let setup = 6 * self.latency(a, b) + 20 * MS;
        self.schedule(self.now + setup, Ev::ConnUp { a, b, epoch });
    }

    fn close(&mut self, a: u32, b: u32) {
        let key = Self::key(a, b);
        if let Some(l) = self.links.remove(&key)
            && self.nodes[b as usize].alive
        {
            let lat = self.latency(a, b);
            self.schedule(self.now + lat, Ev::Gone { to: b, peer: a, epoch: l.epoch });
        }
    }

    fn send(&mut self, from: u32, to: u32, msg: Message<u32>) {
        let key = Self::key(from, to);
        let lat = self.latency(from, to);
        let Some(link) = self.links.get_mut(&key) else { return };
        if !link.up {
            return;
        }
        self.sent_messages += 1;
        if matches!(msg, Message::Gossip { .. }) {
            self.payload_copies += 1;
        }
        let mut at = self.now + lat;
        if self.rng.random::<f64>() < self.cfg.loss {
            match self.cfg.loss_mode {
                LossMode::Drop => return,
                // SCTP's retransmission timeout: at least 200 ms, or about 3 RTTs.
                LossMode::Retransmit => at += (6 * lat).max(200 * MS),
            }
        }
        let dir = usize::from(from > to);
        at = at.max(link.last[dir]);
        link.last[dir] = at;
        let epoch = link.epoch;
        self.schedule(at, Ev::Deliver { from, to, epoch, msg });
    }

    fn link_live(&self, a: u32, b: u32, epoch: u64) -> bool {
        self.links.get(&Self::key(a, b)).is_some_and(|l| l.epoch == epoch)
    }

    fn step(&mut self, ev: Ev) {
        let now = self.at(self.now);
        match ev {
            Ev::Join(id) => self.join(id),
            Ev::Leave(id, graceful) => self.leave(id, graceful),
            Ev::Deliver { from, to, epoch, msg } => {
                if self.nodes[to as usize].alive && self.link_live(from, to, epoch) {
                    self.nodes[to as usize].ov.handle_message(from, msg, now);
                    self.flush(to);
                }
            }
            Ev::AlreadyUp { a, b, epoch } => {
                if self.nodes[a as usize].alive && self.link_live(a, b, epoch) {
                    self.nodes[a as usize].ov.connected(b, now);
                    self.flush(a);
                }
            }
            Ev::ConnUp { a, b, epoch } => {
                let key = Self::key(a, b);
                let alive = self.nodes[a as usize].alive
                    && self.nodes[b as usize].alive
                    && self.nodes[b as usize].ov.accept(a, now);
                self.flush(b);
                match self.links.get_mut(&key) {
                    Some(l) if l.epoch == epoch && alive => {
                        l.up = true;
                        for (x, y) in [(a, b), (b, a)] {
                            self.nodes[x as usize].ov.connected(y, now);
                            self.flush(x);
                        }
                    }
                    Some(l) if l.epoch == epoch => {
                        self.links.remove(&key);
                        if self.nodes[a as usize].alive {
                            self.nodes[a as usize].ov.disconnected(&b, now);
                            self.flush(a);
                        }
                    }
                    _ => {}
                }
            }
            Ev::ConnFail { a, b } => {
                if self.nodes[a as usize].alive && !self.links.contains_key(&Self::key(a, b)) {
                    self.nodes[a as usize].ov.disconnected(&b, now);
                    self.flush(a);
                }
            }
            Ev::Gone { to, peer, epoch } => {
                let key = Self::key(to, peer);
                if self.links.get(&key).is_some_and(|l| l.epoch == epoch) {
                    self.links.remove(&key);
                }
                if self.nodes[to as usize].alive && !self.links.contains_key(&key) {
                    self.nodes[to as usize].ov.disconnected(&peer, now);
                    self.flush(to);
                }
            }
            Ev::Timer(id) => {
                let node = &mut self.nodes[id as usize];
                if !node.alive || node.timer != Some(self.now) {
                    return;
                }
                node.timer = None;
                node.ov.handle_timeout(now);
                self.flush(id);
            }
            Ev::Broadcast => {
                if self.now < self.measuring.1 {
                    let origin = *self.present.choose(&mut self.rng).expect("peers present");
                    let payload = vec![0u8; self.cfg.payload];
                    let id = self.nodes[origin as usize].ov.broadcast(payload, now);
                    self.bcasts.insert(id, Bcast { at: self.now, origin });
                    self.report.broadcasts += 1;
                    self.flush(origin);
                    let gap = (1e6 / self.cfg.broadcasts_per_second) as u64;
                    self.schedule(self.now + gap, Ev::Broadcast);
                }
            }
            Ev::Churn => {
                if self.now < self.measuring.1 {
                    self.churn_carry += self.cfg.churn_per_minute * self.cfg.peers as f64 / 60.0;
                    while self.churn_carry >= 1.0 {
                        self.churn_carry -= 1.0;
                        let graceful = self.rng.random::<bool>();
                        let spread = self.rng.random_range(0..1000 * MS);
                        if let Some(victim) = self.present.choose(&mut self.rng).copied() {
                            self.schedule(self.now + spread, Ev::Leave(victim, graceful));
                            self.report.left += 1;
                        }
                        let id = self.add_node();
                        self.nodes[id as usize].alive = false;
                        let spread = self.rng.random_range(0..1000 * MS);
                        self.schedule(self.now + spread, Ev::Join(id));
                        self.report.joined += 1;
                    }
                    self.schedule(self.now + 1000 * MS, Ev::Churn);
                }
            }
            Ev::Sample => {
                let mut counts: HashMap<u32, usize> = HashMap::new();
                for ((a, b), l) in &self.links {
                    for x in [*a, *b] {
                        if l.up || l.opener == x {
                            *counts.entry(x).or_default() += 1;
                        }
                    }
                }
                for p in &self.present {
                    let c = counts.get(p).copied().unwrap_or(0);
                    self.max_conns = self.max_conns.max(c);
                    self.conn_samples.0 += c as u64;
                    self.conn_samples.1 += 1;
                }
                if self.now < self.measuring.1 + micros(self.cfg.window) {
                    self.schedule(self.now + 100 * MS, Ev::Sample);
                }
            }
        }
    }
}

/// Runs one simulation to the end and measures it.
pub fn run(cfg: SimConfig) -> SimReport {
    let bursts = cfg.peers.div_ceil(cfg.join_burst.max(1)) as u64;
    let formed = bursts * micros(cfg.burst_every);
    let start = formed + micros(cfg.settle);
    let end = start + micros(cfg.measure);
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(cfg.seed),
        base: Instant::now(),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        nodes: Vec::new(),
        present: Vec::new(),
        links: HashMap::new(),
        next_epoch: 0,
        bcasts: HashMap::new(),
        got: HashMap::new(),
        hops: Vec::new(),
        latencies: Vec::new(),
        sent_messages: 0,
        payload_copies: 0,
        conn_samples: (0, 0),
        max_conns: 0,
        measuring: (start, end),
        report: SimReport::default(),
        churn_carry: 0.0,
        cfg,
    };
    for i in 0..sim.cfg.peers {
        let id = sim.add_node();
        sim.nodes[id as usize].alive = false;
        let at = (i / sim.cfg.join_burst.max(1)) as u64 * micros(sim.cfg.burst_every);
        sim.schedule(at, Ev::Join(id));
    }
    sim.schedule(start, Ev::Broadcast);
    sim.schedule(start, Ev::Sample);
    if sim.cfg.churn_per_minute > 0.0 {
        sim.schedule(start, Ev::Churn);
    }
    let stop = end + micros(sim.cfg.window);
    let (mut sent_at_start, mut copies_at_start) = (None, 0);
    while let Some(Reverse((at, seq))) = sim.queue.pop() {
        if at > stop {
            break;
        }
        sim.now = at;
        if sent_at_start.is_none() && at >= start {
            sent_at_start = Some(sim.sent_messages);
            copies_at_start = sim.payload_copies;
        }
        let ev = sim.events.remove(&seq).expect("scheduled event");
        if let Ev::Join(id) = ev {
            sim.nodes[id as usize].alive = true;
            sim.nodes[id as usize].joined_at = sim.now;
        }
        sim.step(ev);
        sim.report.events += 1;
    }
    score(&mut sim, sent_at_start.unwrap_or(0), copies_at_start);
    sim.report
}

fn score(sim: &mut Sim, sent_at_start: u64, copies_at_start: u64) {
    let window = micros(sim.cfg.window);
    let mut expected = 0u64;
    let mut delivered = 0u64;
    let present_for =
        |n: &Node, b: &Bcast| n.joined_at + window <= b.at && n.left_at.is_none_or(|l| l >= b.at + window);
    for (id, b) in &sim.bcasts {
        for (i, n) in sim.nodes.iter().enumerate() {
            let i = i as u32;
            if i == b.origin || !present_for(n, b) {
                continue;
            }
            expected += 1;
            if sim.got.get(&(*id, i)).is_some_and(|t| *t <= b.at + window) {
                delivered += 1;
            }
        }
    }
    let (mut dups, mut delivered_all, mut grafts, mut repl) = (0, 0, 0, 0);
    for n in &sim.nodes {
        let s = n.ov.stats();
        dups += s.duplicates;
        delivered_all += s.delivered;
        grafts += s.grafts;
        repl += s.replacements;
    }
    sim.hops.sort_unstable();
    sim.latencies.sort_unstable();
    let pct = |v: &[u64], p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    let hops: Vec<u64> = sim.hops.iter().map(|h| u64::from(*h)).collect();
    let r = &mut sim.report;
    r.peers_at_end = sim.present.len();
    r.expected = expected;
    r.delivered = delivered;
    r.duplicates_per_delivery = if delivered_all == 0 { 0.0 } else { dups as f64 / delivered_all as f64 };
    r.hops_p50 = pct(&hops, 0.5) as u16;
    r.hops_p99 = pct(&hops, 0.99) as u16;
    r.hops_max = hops.last().copied().unwrap_or(0) as u16;
    r.latency_p50 = Duration::from_micros(pct(&sim.latencies, 0.5));
    r.latency_p99 = Duration::from_micros(pct(&sim.latencies, 0.99));
    r.max_connections = sim.max_conns;
    r.mean_connections =
        if sim.conn_samples.1 == 0 { 0.0 } else { sim.conn_samples.0 as f64 / sim.conn_samples.1 as f64 };
    let b = r.broadcasts.max(1) as f64;
    let n = sim.cfg.peers.max(1) as f64;
    r.messages_per_peer_per_broadcast = (sim.sent_messages - sent_at_start) as f64 / b / n;
    r.payload_copies_per_broadcast = (sim.payload_copies - copies_at_start) as f64 / b;
    r.grafts = grafts;
    r.replacements = repl;
}
