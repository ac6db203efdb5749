//! Whole rooms: every peer runs the same [`Mesh`](crate::mesh::Mesh) the tokio driver runs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::{ClientMsg, PeerId, PeerInfo, ServerMsg};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::channel::{ChannelSpec, DataChannel, Message, RoomWake};
use crate::conn::{ConnConfig, ConnState};
use crate::event::Event;
use crate::mesh::{Mesh, MeshConfig, MeshOutput};
use crate::relay::Gatherer;

const ROOM: &str = "sim";
/// How long a leave waits for its messages to be acknowledged.
const LINGER: Duration = Duration::from_secs(5);

/// Something on its way: a datagram to a host address, or a server
/// message to a peer.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Delivery {
    Datagram { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    Server { to: usize, msg: String },
}

struct SimPeer {
    id: PeerId,
    addr: SocketAddr,
    mesh: Option<Mesh>,
    wake: Arc<RoomWake>,
    events: Vec<Event>,
    channels: HashMap<(PeerId, String), DataChannel>,
    /// Received messages per (peer, label), in arrival order.
    received: HashMap<(PeerId, String), Vec<Message>>,
}

impl SimPeer {
    fn states(&self, peer: &PeerId) -> Vec<ConnState> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::StateChanged { peer: p, state } if p == peer => Some(*state),
                _ => None,
            })
            .collect()
    }

    fn channel(&self, peer: &PeerId, label: &str) -> Option<&DataChannel> {
        self.channels.get(&(peer.clone(), label.to_string())).filter(|c| !c.is_closed())
    }

    fn got(&self, peer: &PeerId, label: &str) -> &[Message] {
        self.received.get(&(peer.clone(), label.to_string())).map_or(&[], |v| v.as_slice())
    }
}

/// Peers, an in-memory signaling server with the real one's room
/// semantics (join order, presence, relay only between members), and a
/// network with seeded loss, delay and jitter.
struct Sim {
    start: Instant,
    now: Duration,
    peers: Vec<SimPeer>,
    /// Room members in join order.
    members: Vec<usize>,
    queue: BinaryHeap<Reverse<(Duration, u64, Delivery)>>,
    seq: u64,
    rng: StdRng,
    loss: f64,
    delay: Duration,
    jitter: Duration,
    /// One-way latency of the signaling server.
    signaling_delay: Duration,
    /// Peers whose network is down, from when until when.
    cut: HashMap<usize, (Duration, Duration)>,
    /// Peers whose socket to the server is dead and not yet noticed: what
    /// the server sends them is lost.
    deaf: HashSet<usize>,
    channels: Vec<ChannelSpec>,
    /// Members join with this overlay.
    overlay: Option<crate::OverlayConfig>,
    /// Rooms with more members are large: a sample in `joined`, no presence.
    listed: usize,
    sent: u64,
    dropped: u64,
}

impl Sim {
    fn new(seed: u64, loss: f64, delay: Duration, jitter: Duration) -> Sim {
        Sim {
            start: Instant::now(),
            now: Duration::ZERO,
            peers: Vec::new(),
            members: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            loss,
            delay,
            jitter,
            signaling_delay: Duration::from_millis(5),
            cut: HashMap::new(),
            deaf: HashSet::new(),
            channels: vec![ChannelSpec::reliable("chat")],
            overlay: None,
            listed: usize::MAX,
            sent: 0,
            dropped: 0,
        }
    }

    fn instant(&self) -> Instant {
        self.start + self.now
    }

    fn id(&self, i: usize) -> PeerId {
        self.peers[i].id.clone()
    }

    fn server_send(&mut self, to: usize, msg: ServerMsg) {
        self.seq += 1;
        let at = self.now + self.signaling_delay;
        // Serialised as on the wire: what a peer gets is what parses.
        let msg = serde_json::to_string(&msg).expect("serialize");
        self.queue.push(Reverse((at, self.seq, Delivery::Server { to, msg })));
    }

    /// A new peer joins the room; returns its index.
    fn join(&mut self) -> usize {
        let i = self.peers.len();
        let id = PeerId::from_server(format!("p-{i:04}"));
        let addr = SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 5000));
        let now = self.instant();
        let mut others: Vec<PeerInfo> =
            self.members.iter().map(|&m| PeerInfo { id: self.id(m), name: None }).collect();
        let large = others.len() > self.listed;
        let size = large.then_some(others.len() as u32);
        if large {
            use rand::seq::SliceRandom;
            others.shuffle(&mut self.rng);
            others.truncate(self.listed);
        }
        for m in self.members.clone() {
            if large {
                break;
            }
            self.server_send(
                m,
                ServerMsg::PeerJoined { room: ROOM.into(), peer: PeerInfo { id: id.clone(), name: None } },
            );
        }
        self.members.push(i);
        let wake = Arc::new(RoomWake::default());
        let config = MeshConfig {
            secret: None,
            channels: self.channels.clone(),
            auto_connect: true,
            relay_only: false,
            linger: LINGER,
            send_queue_bytes: 1 << 20,
            receive_queue_bytes: 4 << 20,
            conn: ConnConfig::default(),
            overlay: self.overlay.clone(),
        };
        let mut mesh = Mesh::new(
            id.clone(),
            ROOM.into(),
            config,
            vec![addr],
            Gatherer::new(&[addr], &[], now),
            wake.clone(),
            now,
        );
        mesh.start(others, size, now);
        self.peers.push(SimPeer {
            id,
            addr,
            mesh: Some(mesh),
            wake,
            events: Vec::new(),
            channels: HashMap::new(),
            received: HashMap::new(),
        });
        i
    }

    /// Peer `i` leaves (`leave`), or its connection drops (`!leave`).
    fn depart(&mut self, i: usize, leave: bool) {
        if leave {
            let now = self.instant();
            self.peers[i].mesh.as_mut().expect("present").leave(now);
            self.run_until(self.now + Duration::from_secs(30), "leave", |s| s.peers[i].mesh.is_none());
            return;
        }
        let now = self.instant();
        if let Some(mut mesh) = self.peers[i].mesh.take() {
            mesh.close("gone".into(), now);
            while mesh.poll_output().is_some() {}
        }
        self.on_gone(i);
    }

    fn on_gone(&mut self, i: usize) {
        if let Some(pos) = self.members.iter().position(|&m| m == i) {
            let large = self.members.len() > self.listed.saturating_add(1);
            self.members.remove(pos);
            let id = self.id(i);
            for m in self.members.clone() {
                if large {
                    break;
                }
                self.server_send(m, ServerMsg::PeerLeft { room: ROOM.into(), peer_id: id.clone() });
            }
        }
    }

    /// The signaling server takes a message from peer `i`.
    fn on_client(&mut self, i: usize, msg: ClientMsg) {
        let from = self.id(i);
        let member = |s: &Sim, p: &PeerId| s.members.iter().copied().find(|&m| s.peers[m].id == *p);
        match msg {
            ClientMsg::Signal { to, signal, .. } => {
                if let Some(j) = member(self, &to) {
                    self.server_send(j, ServerMsg::Signal { room: ROOM.into(), from, signal });
                }
            }
            ClientMsg::Send { to, data, .. } => {
                let targets: Vec<usize> = match to {
                    Some(to) => member(self, &to).into_iter().collect(),
                    None => self.members.iter().copied().filter(|&m| m != i).collect(),
                };
                for j in targets {
                    self.server_send(
                        j,
                        ServerMsg::Message { room: ROOM.into(), from: from.clone(), data: data.clone() },
                    );
                }
            }
            ClientMsg::Leave { .. } => self.on_gone(i),
            _ => {}
        }
    }

    fn is_cut(&self, i: usize) -> bool {
        self.cut.get(&i).is_some_and(|(from, until)| self.now >= *from && self.now < *until)
    }

    /// Drains every peer's outputs until nothing moves.
    fn pump(&mut self) {
        let now = self.instant();
        for i in 0..self.peers.len() {
            let ready = self.peers[i].wake.take_ready();
            let Some(mesh) = self.peers[i].mesh.as_mut() else { continue };
            mesh.channels_ready(ready);
            mesh.pump(now);
            let mut outputs = Vec::new();
            while let Some(o) = mesh.poll_output() {
                outputs.push(o);
            }
            // The room ended (a leave finished): closed as the driver
            // closes it, and its socket to the server goes away.
            let ended = mesh.take_closing().map(|reason| {
                mesh.close(reason, now);
                while let Some(o) = mesh.poll_output() {
                    outputs.push(o);
                }
            });
            for o in outputs {
                match o {
                    MeshOutput::Transmit { to, data, .. } => {
                        self.sent += 1;
                        if self.is_cut(i) || self.rng.random_bool(self.loss) {
                            self.dropped += 1;
                            continue;
                        }
                        let at = self.now + self.delay + self.jitter.mul_f64(self.rng.random::<f64>());
                        self.seq += 1;
                        let from = self.peers[i].addr;
                        self.queue.push(Reverse((at, self.seq, Delivery::Datagram { from, to, data })));
                    }
                    MeshOutput::Signaling(msg) => self.on_client(i, msg),
                    // The simulation has no STUN/TURN servers.
                    MeshOutput::StreamConnect { .. }
                    | MeshOutput::StreamSend { .. }
                    | MeshOutput::StreamClose { .. } => {}
                    MeshOutput::Event(ev) => {
                        let p = &mut self.peers[i];
                        if let Event::ChannelOpen { channel } = &ev {
                            p.channels.insert(
                                (channel.peer().clone(), channel.label().to_string()),
                                channel.clone(),
                            );
                        }
                        p.events.push(ev);
                    }
                }
            }
            // The application reads every channel as messages arrive.
            let p = &mut self.peers[i];
            for ((peer, label), ch) in &p.channels {
                while let Some(m) = ch.try_recv() {
                    p.received.entry((peer.clone(), label.clone())).or_default().push(m);
                }
            }
            if ended.is_some() {
                self.peers[i].mesh = None;
                self.on_gone(i);
            }
        }
    }

    /// Advances the clock to the next delivery or timer and handles it.
    fn step(&mut self) {
        self.pump();
        let timers = self.peers.iter().filter_map(|p| p.mesh.as_ref()).filter_map(|m| m.poll_timeout());
        let next_timer = timers.min().map(|t| t.saturating_duration_since(self.start));
        let next_delivery = self.queue.peek().map(|Reverse((at, _, _))| *at);
        let next = match (next_timer, next_delivery) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(self.now + Duration::from_millis(100)),
        };
        self.now = next.max(self.now);
        let now = self.instant();
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((_, _, d)) = self.queue.pop().expect("peeked");
            match d {
                Delivery::Datagram { from, to, data } => {
                    let Some(j) = self.peers.iter().position(|p| p.addr == to) else { continue };
                    if self.is_cut(j) {
                        continue;
                    }
                    if let Some(mesh) = self.peers[j].mesh.as_mut() {
                        mesh.handle_datagram(now, 0, from, &data);
                    }
                }
                Delivery::Server { to, msg } => {
                    if self.deaf.contains(&to) {
                        continue;
                    }
                    let msg: ServerMsg = serde_json::from_str(&msg).expect("parse");
                    if let Some(mesh) = self.peers[to].mesh.as_mut() {
                        mesh.handle_server(msg, now);
                    }
                }
            }
        }
        for p in &mut self.peers {
            if let Some(mesh) = p.mesh.as_mut() {
                mesh.handle_timeout(now);
            }
        }
    }

    fn run_until(&mut self, limit: Duration, what: &str, mut cond: impl FnMut(&Sim) -> bool) {
        let mut steps = 0u64;
        loop {
            self.pump();
            if cond(self) {
                return;
            }
            assert!(self.now < limit, "{what}: simulated time ran past {limit:?}");
            steps += 1;
            assert!(steps < 2_000_000, "{what}: too many steps at {:?}", self.now);
            self.step();
        }
    }

    /// `n` members join an overlay room 200 ms apart; returns them once
    /// each has two neighbours or more (within 60 s of simulated time) and
    /// 5 s more have passed. `check` runs at every step.
    fn form_overlay(&mut self, n: usize, check: impl Fn(&Sim, &[usize])) -> Vec<usize> {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(self.join());
            let t = self.now + Duration::from_millis(200);
            self.run_until(t + Duration::from_secs(1), "join", |s| s.now >= t);
        }
        let neighbours = |s: &Sim, i: usize| {
            s.peers[i].mesh.as_ref().and_then(|m| m.overlay_stats()).map_or(0, |st| st.neighbors.len())
        };
        self.run_until(Duration::from_secs(60), "overlay formed", |s| {
            check(s, &all);
            all.iter().all(|&i| neighbours(s, i) >= 2)
        });
        let settle = self.now + Duration::from_secs(5);
        self.run_until(settle + Duration::from_secs(1), "settle", |s| {
            check(s, &all);
            s.now >= settle
        });
        all
    }

    /// Every pair of present peers has `label` open on both sides.
    fn full_mesh(&self, present: &[usize], label: &str) -> bool {
        present
            .iter()
            .all(|&a| present.iter().all(|&b| a == b || self.peers[a].channel(&self.id(b), label).is_some()))
    }
}

fn numbered(from: usize, to: usize, n: usize) -> String {
    format!("{from}->{to} #{n}")
}

/// Three peers join one after another over a lossy, jittery network:
/// every pair connects once, and numbered messages sent on every
/// channel arrive complete and in order.
#[test]
fn three_peers_form_a_mesh_and_deliver_in_order_through_loss() {
    for seed in [1, 2] {
        let mut sim = Sim::new(seed, 0.02, Duration::from_millis(20), Duration::from_millis(10));
        let all: Vec<usize> = (0..3).map(|_| sim.join()).collect();
        sim.run_until(Duration::from_secs(30), "mesh", |s| s.full_mesh(&all, "chat"));
        for &a in &all {
            for &b in &all {
                if a != b {
                    let opened = sim.peers[a]
                        .events
                        .iter()
                        .filter(
                            |e| matches!(e, Event::ChannelOpen { channel } if *channel.peer() == sim.id(b)),
                        )
                        .count();
                    assert_eq!(opened, 1, "seed {seed}: {a} has exactly one channel to {b}");
                }
            }
        }
        const N: usize = 300;
        for &a in &all {
            for &b in &all {
                if a != b {
                    let ch = sim.peers[a].channel(&sim.id(b), "chat").unwrap().clone();
                    for n in 0..N {
                        ch.try_send(numbered(a, b, n)).expect("the queue holds 300 short messages");
                    }
                }
            }
        }
        sim.run_until(Duration::from_secs(120), "delivery", |s| {
            all.iter().all(|&b| all.iter().all(|&a| a == b || s.peers[b].got(&s.id(a), "chat").len() >= N))
        });
        for &a in &all {
            for &b in &all {
                if a != b {
                    let want: Vec<Message> = (0..N).map(|n| Message::Text(numbered(a, b, n))).collect();
                    assert_eq!(
                        sim.peers[b].got(&sim.id(a), "chat"),
                        want.as_slice(),
                        "seed {seed}: {a} -> {b}"
                    );
                }
            }
        }
        assert!(sim.dropped > 0, "the network dropped datagrams");
    }
}

/// A fourth peer joins a connected room and connects to everyone; then
/// one leaves and one drops: the others see them go, with their
/// channels, and keep talking among themselves.
#[test]
fn peers_join_and_leave_a_connected_room() {
    let mut sim = Sim::new(5, 0.0, Duration::from_millis(10), Duration::from_millis(2));
    let first: Vec<usize> = (0..3).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "three", |s| s.full_mesh(&first, "chat"));
    let d = sim.join();
    let all = [0, 1, 2, d];
    sim.run_until(Duration::from_secs(40), "four", |s| s.full_mesh(&all, "chat"));
    for &a in &first {
        assert!(
            sim.peers[a]
                .events
                .iter()
                .any(|e| matches!(e, Event::PeerJoined { peer, .. } if *peer == sim.id(d)))
        );
    }
    sim.depart(1, true);
    sim.depart(2, false);
    let (id1, id2) = (sim.id(1), sim.id(2));
    sim.run_until(Duration::from_secs(60), "departures", |s| {
        [0, d].iter().all(|&p| {
            let left = |who: &PeerId| {
                s.peers[p].events.iter().any(|e| matches!(e, Event::PeerLeft { peer } if peer == who))
            };
            left(&id1) && left(&id2)
        })
    });
    for &p in &[0, d] {
        for gone in [&id1, &id2] {
            assert!(
                sim.peers[p]
                    .events
                    .iter()
                    .any(|e| matches!(e, Event::ChannelClosed { peer, .. } if peer == gone)),
                "{p} saw the channel to {gone} close"
            );
            assert!(sim.peers[p].channel(gone, "chat").is_none());
        }
    }
    let ch = sim.peers[0].channel(&sim.id(d), "chat").unwrap().clone();
    ch.try_send("still here").unwrap();
    sim.run_until(Duration::from_secs(70), "after", |s| !s.peers[d].got(&s.id(0), "chat").is_empty());
    let mesh = sim.peers[0].mesh.as_ref().unwrap();
    let mut members = mesh.members();
    members.sort();
    assert_eq!(members, vec![sim.id(d)]);
}

/// A peer queues messages and leaves at once, over a lossy link: the
/// leave waits until the other side has acknowledged all of them (lost
/// ones retransmitted), so every message arrives, in order, before the
/// other side sees the peer go.
#[test]
fn a_leave_delivers_what_was_sent_before_it_through_loss() {
    for seed in [21, 22, 23] {
        let mut sim = Sim::new(seed, 0.1, Duration::from_millis(25), Duration::from_millis(5));
        let all: Vec<usize> = (0..2).map(|_| sim.join()).collect();
        sim.run_until(Duration::from_secs(30), "mesh", |s| s.full_mesh(&all, "chat"));
        let ch = sim.peers[1].channel(&sim.id(0), "chat").unwrap().clone();
        const N: usize = 200;
        for n in 0..N {
            ch.try_send(numbered(1, 0, n)).expect("the queue holds 200 short messages");
        }
        let left_at = sim.now;
        sim.depart(1, true);
        let took = sim.now - left_at;
        assert!(
            took < LINGER,
            "seed {seed}: everything was acknowledged before the linger ran out ({took:?})"
        );
        let id1 = sim.id(1);
        sim.run_until(sim.now + Duration::from_secs(10), "peer_left", |s| {
            s.peers[0].events.iter().any(|e| matches!(e, Event::PeerLeft { peer } if *peer == id1))
        });
        let want: Vec<Message> = (0..N).map(|n| Message::Text(numbered(1, 0, n))).collect();
        assert_eq!(sim.peers[0].got(&id1, "chat"), want.as_slice(), "seed {seed}: every message, in order");
        assert!(sim.dropped > 0, "the network dropped datagrams");
    }
}

/// A leave during a short outage (the connection seen down, the path back
/// a moment later) still delivers what was queued: a connection that is
/// down may come back within the linger, so the leave waits for it.
#[test]
fn a_leave_during_a_short_outage_delivers_once_the_path_is_back() {
    let mut sim = Sim::new(41, 0.0, Duration::from_millis(10), Duration::ZERO);
    let all: Vec<usize> = (0..2).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    // Peer 0's network goes for 4 s; peer 1 notices (2.5 s of silence).
    sim.cut.insert(0, (sim.now, sim.now + Duration::from_secs(4)));
    let id0 = sim.id(0);
    sim.run_until(sim.now + Duration::from_secs(10), "disconnected", |s| {
        s.peers[1].states(&id0).last() == Some(&ConnState::Disconnected)
    });
    let ch = sim.peers[1].channel(&sim.id(0), "chat").unwrap().clone();
    ch.try_send("sent while the path was down").unwrap();
    let left_at = sim.now;
    sim.depart(1, true);
    let took = sim.now - left_at;
    assert!(took < LINGER, "the leave ended when the message was acknowledged ({took:?})");
    let id1 = sim.id(1);
    sim.run_until(sim.now + Duration::from_secs(10), "peer_left", |s| {
        s.peers[0].events.iter().any(|e| matches!(e, Event::PeerLeft { peer } if *peer == id1))
    });
    assert_eq!(sim.peers[0].got(&id1, "chat"), [Message::Text("sent while the path was down".into())]);
}

/// A leave whose messages cannot be delivered (the peer's network is
/// gone) still ends: when the connection is seen down, or at the latest
/// when the linger runs out.
#[test]
fn a_leave_ends_within_the_linger_when_nothing_can_be_delivered() {
    let mut sim = Sim::new(31, 0.0, Duration::from_millis(10), Duration::ZERO);
    let all: Vec<usize> = (0..2).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    sim.cut.insert(0, (sim.now, sim.now + Duration::from_secs(3600)));
    let ch = sim.peers[1].channel(&sim.id(0), "chat").unwrap().clone();
    ch.try_send("into the void").unwrap();
    let left_at = sim.now;
    sim.depart(1, true);
    let took = sim.now - left_at;
    assert!(took <= LINGER, "the leave waited no longer than the linger ({took:?})");
    assert!(sim.peers[1].mesh.is_none(), "the room ended");
}

/// Two connected peers of a room of three open channels to each other
/// at the same instant: perfect negotiation gives both both channels,
/// and the third peer's connections are untouched.
#[test]
fn glare_between_two_members_resolves_with_both_channels() {
    let mut sim = Sim::new(9, 0.0, Duration::from_millis(15), Duration::ZERO);
    let all: Vec<usize> = (0..3).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    let now = sim.instant();
    let (id0, id1) = (sim.id(0), sim.id(1));
    sim.peers[0].mesh.as_mut().unwrap().open_channel(&id1, ChannelSpec::reliable("from-0"), now).unwrap();
    sim.peers[1].mesh.as_mut().unwrap().open_channel(&id0, ChannelSpec::unreliable("from-1"), now).unwrap();
    sim.run_until(Duration::from_secs(40), "glare", |s| {
        s.full_mesh(&[0, 1], "from-0") && s.full_mesh(&[0, 1], "from-1")
    });
    for p in 0..3 {
        for q in 0..3 {
            if p != q {
                assert_eq!(
                    sim.peers[p].states(&sim.id(q)),
                    [ConnState::Connecting, ConnState::Connected],
                    "{p}->{q}"
                );
            }
        }
    }
}

/// Peer 2's network goes down for 8 s in the middle of a stream to peer
/// 0: the connection recovers through an ICE restart and every message
/// arrives once, in order; peers 0 and 1 never notice.
#[test]
fn an_outage_of_one_member_recovers_without_losing_messages() {
    let mut sim = Sim::new(13, 0.0, Duration::from_millis(10), Duration::from_millis(2));
    let all: Vec<usize> = (0..3).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    let ch = sim.peers[2].channel(&sim.id(0), "chat").unwrap().clone();
    let cut_at = sim.now + Duration::from_millis(300);
    sim.cut.insert(2, (cut_at, cut_at + Duration::from_secs(8)));
    let mut sent = 0usize;
    const N: usize = 2000;
    let stream_start = sim.now;
    sim.run_until(Duration::from_secs(120), "stream", |s| {
        // One message every 5 ms: the stream spans the outage.
        let due = ((s.now - stream_start).as_millis() / 5) as usize + 1;
        while sent < N.min(due) && ch.try_send(numbered(2, 0, sent)).is_ok() {
            sent += 1;
        }
        s.peers[0].got(&s.id(2), "chat").len() >= N
    });
    assert!(sim.now > cut_at + Duration::from_secs(8), "the stream outlived the outage");
    let want: Vec<Message> = (0..N).map(|n| Message::Text(numbered(2, 0, n))).collect();
    assert_eq!(sim.peers[0].got(&sim.id(2), "chat"), want.as_slice(), "every message once, in order");
    let states = sim.peers[0].states(&sim.id(2));
    assert!(states.contains(&ConnState::Disconnected), "{states:?}");
    assert_eq!(states.last(), Some(&ConnState::Connected), "{states:?}");
    assert_eq!(sim.peers[0].states(&sim.id(1)), [ConnState::Connecting, ConnState::Connected]);
}

/// A member's network drops (its socket to the server too, not yet
/// noticed) just as another joins: the newcomer's offer is lost and its
/// connection fails. The member comes back, resumes, finds the newcomer in
/// `joined` and offers: the newcomer's failed connection must not swallow
/// that offer (it did: neither side ever connected again).
#[test]
fn an_offer_after_a_failed_connection_starts_a_new_one() {
    let mut sim = Sim::new(17, 0.0, Duration::from_millis(10), Duration::from_millis(2));
    let a = sim.join();
    sim.run_until(Duration::from_secs(1), "a joined", |s| s.now >= Duration::from_millis(100));
    sim.deaf.insert(a);
    sim.cut.insert(a, (sim.now, sim.now + Duration::from_secs(3600)));
    let b = sim.join();
    let (ida, idb) = (sim.id(a), sim.id(b));
    sim.run_until(Duration::from_secs(40), "b's connection to a fails", |s| {
        s.peers[b].states(&ida).last() == Some(&ConnState::Failed)
    });
    // a is back, and resumes its place: b is new to it.
    sim.deaf.clear();
    sim.cut.clear();
    let now = sim.instant();
    sim.peers[a].mesh.as_mut().expect("present").rejoined(
        vec![PeerInfo { id: idb.clone(), name: None }],
        None,
        true,
        now,
    );
    let back = sim.now;
    sim.run_until(back + Duration::from_secs(10), "connected again", |s| {
        s.peers[a].states(&idb).last() == Some(&ConnState::Connected)
            && s.peers[b].states(&ida).last() == Some(&ConnState::Connected)
    });
    assert!(
        sim.now < back + ConnConfig::default().connect_timeout,
        "connected by a's offer, not after a timeout"
    );
}

/// A member is away (network and socket to the server down, not yet
/// noticed) while another leaves: the `peer_left` is lost with the socket.
/// Back, it resumes, and the `joined` of its resume does not list the one
/// that left: once that connection fails, the member is taken for gone (it
/// used to stay a member, and on every list, for good); the one listed
/// stays.
#[test]
fn a_member_not_listed_on_a_resume_goes_once_its_connection_fails() {
    let mut sim = Sim::new(19, 0.0, Duration::from_millis(10), Duration::from_millis(2));
    let all: Vec<usize> = (0..3).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    let (a, b, c) = (all[0], all[1], all[2]);
    let (idb, idc) = (sim.id(b), sim.id(c));
    sim.deaf.insert(a);
    sim.cut.insert(a, (sim.now, sim.now + Duration::from_secs(3600)));
    sim.depart(c, true);
    let t = sim.now + Duration::from_secs(1);
    sim.run_until(t + Duration::from_secs(1), "the peer_left on its way", |s| s.now >= t);
    assert!(!sim.peers[a].events.iter().any(|e| matches!(e, Event::PeerLeft { .. })), "a heard nothing");
    sim.deaf.clear();
    sim.cut.clear();
    let now = sim.instant();
    sim.peers[a].mesh.as_mut().expect("present").rejoined(
        vec![PeerInfo { id: idb.clone(), name: None }],
        None,
        true,
        now,
    );
    let back = sim.now;
    let left = |s: &Sim, who: &PeerId| {
        s.peers[a].events.iter().any(|e| matches!(e, Event::PeerLeft { peer } if peer == who))
    };
    sim.run_until(back + Duration::from_secs(120), "c taken for gone", |s| left(s, &idc));
    assert!(!left(&sim, &idb), "b, listed, stays");
    assert_eq!(sim.peers[a].mesh.as_ref().expect("present").members(), vec![idb.clone()]);
    assert_eq!(sim.peers[a].states(&idb).last(), Some(&ConnState::Connected));
    // Had it been there after all, a signal from it through the server
    // (which relays only between members) makes it a member again.
    let now = sim.instant();
    let seen = sim.peers[a].events.len();
    let offer = peerlink_proto::Signal::Offer { sdp: "v=0\r\n".into(), auth: None };
    sim.peers[a]
        .mesh
        .as_mut()
        .expect("present")
        .handle_server(ServerMsg::Signal { room: ROOM.into(), from: idc.clone(), signal: offer }, now);
    sim.pump();
    assert!(
        sim.peers[a].events[seen..]
            .iter()
            .any(|e| matches!(e, Event::PeerJoined { peer, .. } if *peer == idc))
    );
    let mut members = sim.peers[a].mesh.as_ref().expect("present").members();
    members.sort();
    let mut want = vec![idb, idc];
    want.sort();
    assert_eq!(members, want);
}

/// As above, but away long enough for the connection to the one that left
/// to give up first: on the resume it is taken for gone at once (no state
/// change is left to come).
#[test]
fn a_member_not_listed_on_a_resume_whose_connection_already_failed_goes_at_once() {
    let mut sim = Sim::new(23, 0.0, Duration::from_millis(10), Duration::from_millis(2));
    let all: Vec<usize> = (0..3).map(|_| sim.join()).collect();
    sim.run_until(Duration::from_secs(20), "mesh", |s| s.full_mesh(&all, "chat"));
    let (a, b, c) = (all[0], all[1], all[2]);
    let (idb, idc) = (sim.id(b), sim.id(c));
    sim.deaf.insert(a);
    sim.cut.insert(a, (sim.now, sim.now + Duration::from_secs(3600)));
    sim.depart(c, true);
    sim.run_until(sim.now + Duration::from_secs(180), "a's connection to c gives up", |s| {
        s.peers[a].states(&idc).contains(&ConnState::Failed)
    });
    let left = |s: &Sim, who: &PeerId| {
        s.peers[a].events.iter().any(|e| matches!(e, Event::PeerLeft { peer } if peer == who))
    };
    assert!(!left(&sim, &idc));
    sim.deaf.clear();
    sim.cut.clear();
    let now = sim.instant();
    sim.peers[a].mesh.as_mut().expect("present").rejoined(
        vec![PeerInfo { id: idb.clone(), name: None }],
        None,
        true,
        now,
    );
    assert!(
        left(&sim, &idc) || {
            sim.pump();
            left(&sim, &idc)
        },
        "c taken for gone on the resume itself"
    );
    assert!(!left(&sim, &idb));
    assert_eq!(sim.peers[a].mesh.as_ref().expect("present").members(), vec![idb]);
}

/// A room of 24 members joined with an overlay, the server listing a
/// sample of 8 and telling nobody of joins (a large room), on the real
/// WebRTC stack through loss: every broadcast reaches every member,
/// each member holds at most 8 connections (a mesh would need 23), and
/// a message to one peer arrives over a direct connection.
#[test]
fn an_overlay_room_carries_broadcasts_with_a_handful_of_connections() {
    use crate::event::MessageKind;
    let mut sim = Sim::new(41, 0.01, Duration::from_millis(15), Duration::from_millis(5));
    sim.overlay = Some(crate::OverlayConfig::default());
    sim.listed = 8;
    let n = 24;
    // What the overlay counts as connected has a channel to send on.
    let orphans = |s: &Sim, all: &[usize]| {
        for &i in all {
            if let Some(m) = &s.peers[i].mesh {
                let o = m.overlay_orphans();
                assert!(o.is_empty(), "peer {i} counts {o:?} connected with no channel at {:?}", s.now);
            }
        }
    };
    let all = sim.form_overlay(n, orphans);

    let senders = [0, 7, 15, 23];
    let now = sim.instant();
    for &from in &senders {
        for k in 0..5 {
            let data = format!("{from}#{k}").into_bytes();
            sim.peers[from].mesh.as_mut().expect("present").broadcast(data, now).expect("broadcast");
        }
    }
    let got = |s: &Sim, i: usize| {
        s.peers[i]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Message { kind: MessageKind::Broadcast { .. }, .. }))
            .count()
    };
    let expected = |i: usize| senders.iter().filter(|&&f| f != i).count() * 5;
    sim.run_until(sim.now + Duration::from_secs(30), "broadcasts", |s| {
        orphans(s, &all);
        all.iter().all(|&i| got(s, i) == expected(i))
    });
    for &i in &all {
        let mut texts: Vec<String> = sim.peers[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message { from, data, .. } => {
                    let text = String::from_utf8(data.clone()).expect("utf-8");
                    let index: usize = from.as_str()[2..].parse().expect("sim id");
                    assert!(text.starts_with(&format!("{index}#")), "{text} from {from}");
                    Some(text)
                }
                _ => None,
            })
            .collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), expected(i), "peer {i}: no duplicates delivered");
        let conns = sim.peers[i].mesh.as_ref().expect("present").connection_count();
        assert!(
            conns <= 8,
            "peer {i} holds {conns} connections: {}",
            sim.peers[i].mesh.as_ref().expect("present").connection_debug()
        );
    }
    let total: usize =
        all.iter().map(|&i| sim.peers[i].mesh.as_ref().expect("present").connection_count()).sum();
    assert!(total / n < 12, "mean connections {} is a mesh's", total / n);

    // To one peer that is not a neighbour: a direct connection. (The
    // overlay's shape differs from run to run: two members not connected
    // to each other, neither at its connection limit.)
    let now = sim.instant();
    let below_limit = |s: &Sim, i: usize| s.peers[i].mesh.as_ref().is_some_and(|m| m.connection_count() < 7);
    let (sender, receiver) = all
        .iter()
        .flat_map(|&a| all.iter().map(move |&b| (a, b)))
        .find(|&(a, b)| {
            a != b
                && below_limit(&sim, a)
                && below_limit(&sim, b)
                && !sim.peers[a].mesh.as_ref().expect("present").has_connection(&sim.id(b))
        })
        .expect("two members not connected to each other");
    let to = sim.id(receiver);
    sim.peers[sender].mesh.as_mut().expect("present").send_to(to, b"just you".to_vec(), now).expect("send");
    let from = sim.id(sender);
    sim.run_until(sim.now + Duration::from_secs(60), "direct", |s| {
        s.peers[receiver].events.iter().any(|e| {
            matches!(e, Event::Message { from: f, data, kind: MessageKind::Direct } if *f == from && data == b"just you")
        })
    });

    // To a peer reached through a relay hop whose network goes down
    // as the offer leaves: the offer is stuck with it, and after 3 s
    // unanswered the connection starts over through the server.
    let now = sim.instant();
    let (a, b, hop) = all
        .iter()
        .flat_map(|&a| all.iter().map(move |&b| (a, b)))
        .find_map(|(a, b)| {
            let hop = sim.peers[a].mesh.as_ref()?.overlay_relay_hop(&sim.id(b), now)?;
            // A route that still holds when the offer leaves (routes expire).
            let later =
                sim.peers[a].mesh.as_ref()?.overlay_relay_hop(&sim.id(b), now + Duration::from_secs(2))?;
            if later != hop {
                return None;
            }
            let h: usize = hop.as_str()[2..].parse().expect("sim id");
            // Not one at its connection limit (it would turn us down).
            let room = sim.peers[b].mesh.as_ref()?.connection_count() < 7;
            (a != b && h != a && h != b && room).then_some((a, b, h))
        })
        .expect("some member reaches another through a hop");
    let stats =
        |s: &Sim, i: usize| s.peers[i].mesh.as_ref().and_then(|m| m.overlay_stats()).expect("overlay");
    let before = stats(&sim, a);
    let cut = sim.now + Duration::from_millis(1);
    sim.cut.insert(hop, (cut, cut + Duration::from_secs(30)));
    let (to, from) = (sim.id(b), sim.id(a));
    sim.peers[a].mesh.as_mut().expect("present").send_to(to, b"around the hop".to_vec(), now).expect("send");
    sim.run_until(sim.now + Duration::from_secs(25), "past a lost relay", |s| {
        s.peers[b].events.iter().any(
            |e| matches!(e, Event::Message { from: f, data, .. } if *f == from && data == b"around the hop"),
        )
    });
    let after = stats(&sim, a);
    assert!(after.signals_relayed > before.signals_relayed, "{before:?} {after:?}");
    assert!(after.signals_via_server > before.signals_via_server, "{before:?} {after:?}");
}

/// Two members open connections to each other a second apart, each offer
/// relayed through a neighbour whose network goes down as the first
/// leaves: both offers are lost. The first offerer (polite) starts
/// over through the server after 3 s; the other, its own offer still out,
/// ignores that offer as a collision it wins, so its own relayed offer must
/// still start over 3 s after it left (it did not: a signal through the
/// server stopped its timer, and the two waited for each other until the
/// 15 s connect timeout).
#[test]
fn crossed_offers_both_lost_on_the_way_start_over_through_the_server() {
    let mut sim = Sim::new(7, 0.0, Duration::from_millis(15), Duration::from_millis(5));
    sim.overlay = Some(crate::OverlayConfig::default());
    sim.listed = 4;
    let all = sim.form_overlay(12, |_, _| {});
    // Everyone broadcasts once: each member learns a way to each other.
    let now = sim.instant();
    for &i in &all {
        sim.peers[i].mesh.as_mut().expect("present").broadcast(b"hi".to_vec(), now).expect("broadcast");
    }
    let heard =
        |s: &Sim, i: usize| s.peers[i].events.iter().filter(|e| matches!(e, Event::Message { .. })).count();
    sim.run_until(sim.now + Duration::from_secs(10), "broadcasts", |s| {
        all.iter().all(|&i| heard(s, i) == all.len() - 1)
    });

    // a (polite: the lower id) and b, not connected, reach each other
    // through a hop each way, routes that hold for the next 2 s.
    let now = sim.instant();
    let later = now + Duration::from_secs(2);
    let hop = |s: &Sim, from: usize, to: usize| {
        let m = s.peers[from].mesh.as_ref()?;
        let h = m.overlay_relay_hop(&s.id(to), now)?;
        let h = (m.overlay_relay_hop(&s.id(to), later)? == h).then_some(h)?;
        Some(h.as_str()[2..].parse::<usize>().expect("sim id"))
    };
    let (a, b, hops) = all
        .iter()
        .flat_map(|&a| all.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| a < b)
        .find_map(|(a, b)| Some((a, b, [hop(&sim, a, b)?, hop(&sim, b, a)?])))
        .expect("two members that reach each other through hops");
    assert!(sim.id(a) < sim.id(b), "a is the polite one");
    let cut = sim.now + Duration::from_millis(1);
    for h in hops {
        sim.cut.insert(h, (cut, cut + Duration::from_secs(30)));
    }
    let start = sim.now;
    let seen = sim.peers[b].events.len();
    let (ida, idb) = (sim.id(a), sim.id(b));
    sim.peers[a].mesh.as_mut().expect("present").send_to(idb, b"from a".to_vec(), now).expect("send");
    let t = sim.now + Duration::from_secs(1);
    sim.run_until(t + Duration::from_secs(1), "a second", |s| s.now >= t);
    let now = sim.instant();
    // (b's overlay may have opened a connection to a meanwhile: its offer
    // is relayed and lost the same way.)
    let connected = sim.peers[b].events[seen..]
        .iter()
        .any(|e| matches!(e, Event::StateChanged { peer, state: ConnState::Connected } if *peer == ida));
    assert!(!connected, "a's offer was lost");
    sim.peers[b].mesh.as_mut().expect("present").send_to(ida, b"from b".to_vec(), now).expect("send");
    let got = |s: &Sim, at: usize, from: usize, text: &[u8]| {
        let from = s.id(from);
        s.peers[at]
            .events
            .iter()
            .any(|e| matches!(e, Event::Message { from: f, data, .. } if *f == from && data == text))
    };
    // b's offer starts over 3 s after it left, 4 s after a's: well before
    // either side's 15 s connect timeout.
    sim.run_until(start + Duration::from_secs(8), "both delivered", |s| {
        got(s, b, a, b"from a") && got(s, a, b, b"from b")
    });
    for i in [a, b] {
        let st = sim.peers[i].mesh.as_ref().and_then(|m| m.overlay_stats()).expect("overlay");
        assert!(st.signals_relayed > 0 && st.signals_via_server > 0, "peer {i}: {st:?}");
    }
}

/// Two peers stream numbered messages 20 ms apart to each other over a
/// lossy link, as `peerlink ping` does, and each leaves the moment its own
/// stream is queued and the other's has arrived (or the other left):
/// whichever leaves first,
/// the other still gets every message (the leave waits for the
/// acknowledgements, retransmitting what was lost).
#[test]
fn peers_that_stream_and_leave_when_done_lose_nothing() {
    const N: usize = 20;
    for seed in 0..20u64 {
        let mut sim = Sim::new(1000 + seed, 0.0, Duration::from_millis(2), Duration::from_millis(1));
        let all: Vec<usize> = (0..2).map(|_| sim.join()).collect();
        sim.run_until(Duration::from_secs(60), "mesh", |s| s.full_mesh(&all, "chat"));
        sim.loss = 0.05;
        let start = sim.now;
        let mut sent = [0usize; 2];
        // The second stream starts up to 19 ms after the first.
        let mut next = [sim.now, sim.now + Duration::from_millis(seed % 20)];
        let mut left = [false; 2];
        while sim.peers.iter().any(|p| p.mesh.is_some()) {
            assert!(sim.now < start + Duration::from_secs(30), "seed {seed}: both left within 30 s");
            for i in 0..2 {
                if left[i] {
                    continue;
                }
                let other = sim.id(1 - i);
                if sent[i] < N && sim.now >= next[i] {
                    let ch = sim.peers[i].channel(&other, "chat").expect("open").clone();
                    ch.try_send(numbered(i, 1 - i, sent[i])).expect("queued");
                    sent[i] += 1;
                    next[i] = sim.now + Duration::from_millis(20);
                }
                // Done: the other's stream arrived, or the other left.
                let done = sim.peers[i].got(&other, "chat").len() >= N || sim.peers[1 - i].mesh.is_none();
                if sent[i] == N && done {
                    left[i] = true;
                    let now = sim.instant();
                    sim.peers[i].mesh.as_mut().expect("present").leave(now);
                }
            }
            sim.pump();
            sim.step();
        }
        for i in 0..2 {
            let want: Vec<Message> = (0..N).map(|n| Message::Text(numbered(1 - i, i, n))).collect();
            assert_eq!(sim.peers[i].got(&sim.id(1 - i), "chat"), want.as_slice(), "seed {seed}: peer {i}");
        }
        assert!(sim.dropped > 0, "seed {seed}: the network dropped datagrams");
    }
}
