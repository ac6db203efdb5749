//! Tests without sockets on simulated time: two connections
//! ([`crate::conn::PeerConn`]) over an in-memory link, and whole rooms
//! ([`crate::mesh::Mesh`]) of three and more peers with an in-memory
//! signaling server, seeded loss, delay and jitter.

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use peerlink_proto::{PeerId, Signal};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use str0m::channel::ChannelId;

    use crate::channel::ChannelSpec;
    use crate::conn::{ConnConfig, ConnEvent, ConnOutput, ConnState, PeerConn};

    /// A datagram in flight, ordered by arrival time.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct InFlight {
        at: Duration,
        seq: u64,
        to: usize,
        source: SocketAddr,
        destination: SocketAddr,
        data: Vec<u8>,
    }

    struct Side {
        conn: PeerConn,
        timeout: Instant,
        events: Vec<ConnEvent>,
        signals: Vec<Signal>,
    }

    /// Two peers, a lossy link and a clock that jumps to the next event.
    struct World {
        start: Instant,
        now: Duration,
        sides: [Side; 2],
        link: BinaryHeap<Reverse<InFlight>>,
        rng: StdRng,
        loss: f64,
        delay: Duration,
        jitter: Duration,
        seq: u64,
        sent: u64,
        dropped: u64,
        /// Every datagram sent in this window is lost: a cut link.
        cut: Option<(Duration, Duration)>,
        /// The largest datagram sent (either side) since this was last reset.
        largest: usize,
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i as u8 + 1], 5000))
    }

    impl World {
        fn new(seed: u64, loss: f64, delay: Duration, jitter: Duration) -> World {
            let start = Instant::now();
            let cfg = ConnConfig::default();
            let ids = [PeerId::from_server("p-a"), PeerId::from_server("p-b")];
            let side = |i: usize| {
                let mut conn =
                    PeerConn::new(ids[1 - i].clone(), ids[i] < ids[1 - i], &[addr(i)], &cfg, start);
                // Host candidates only: gathering is over at once.
                conn.gathering_complete();
                Side { conn, timeout: start, events: Vec::new(), signals: Vec::new() }
            };
            World {
                start,
                now: Duration::ZERO,
                sides: [side(0), side(1)],
                link: BinaryHeap::new(),
                rng: StdRng::seed_from_u64(seed),
                loss,
                delay,
                jitter,
                seq: 0,
                sent: 0,
                dropped: 0,
                cut: None,
                largest: 0,
            }
        }

        fn instant(&self) -> Instant {
            self.start + self.now
        }

        /// Drains both sides' outputs; signals are delivered at once (the
        /// signaling path is reliable), datagrams go on the lossy link.
        fn pump(&mut self) {
            loop {
                let mut progressed = false;
                for i in 0..2 {
                    loop {
                        match self.sides[i].conn.poll_output() {
                            ConnOutput::Transmit { source, destination, contents } => {
                                self.sent += 1;
                                self.largest = self.largest.max(contents.len());
                                let in_cut = self.cut.is_some_and(|(a, b)| self.now >= a && self.now < b);
                                if in_cut || self.rng.random_bool(self.loss) {
                                    self.dropped += 1;
                                    continue;
                                }
                                let jitter = self.jitter.mul_f64(self.rng.random::<f64>());
                                self.seq += 1;
                                self.link.push(Reverse(InFlight {
                                    at: self.now + self.delay + jitter,
                                    seq: self.seq,
                                    to: 1 - i,
                                    source,
                                    destination,
                                    data: contents,
                                }));
                            }
                            ConnOutput::Signal(s) => {
                                self.sides[i].signals.push(s.clone());
                                let now = self.instant();
                                self.sides[1 - i].conn.handle_signal(s, now).expect("signal applies");
                                progressed = true;
                            }
                            ConnOutput::Event(e) => self.sides[i].events.push(e),
                            ConnOutput::Timeout(t) => {
                                self.sides[i].timeout = t;
                                break;
                            }
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }

        /// Advances the clock to the next datagram or timer and handles it.
        fn step(&mut self) {
            self.pump();
            let next_timer = self.sides.iter().map(|s| s.timeout).min().expect("two sides");
            let next_packet = self.link.peek().map(|Reverse(p)| self.start + p.at);
            let next = next_packet.map_or(next_timer, |p| p.min(next_timer)).max(self.instant());
            self.now = next - self.start;
            let now = self.instant();
            while let Some(Reverse(p)) = self.link.peek() {
                if self.start + p.at > now {
                    break;
                }
                let Reverse(p) = self.link.pop().expect("peeked");
                let _ = self.sides[p.to].conn.handle_datagram(now, p.source, p.destination, &p.data);
            }
            for s in &mut self.sides {
                if s.timeout <= now {
                    let _ = s.conn.handle_timeout(now);
                }
            }
        }

        fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut World) -> bool) {
            // A timer that never moves forward would spin here without
            // simulated time advancing: bound the steps too.
            let mut stalled = 0u32;
            while !cond(self) {
                assert!(self.now < limit, "simulated time ran past {limit:?}");
                let before = self.now;
                self.step();
                stalled = if self.now == before { stalled + 1 } else { 0 };
                assert!(stalled < 10_000, "simulated time stuck at {before:?}");
            }
        }

        fn open_channels(&self, i: usize) -> Vec<(ChannelId, String)> {
            self.sides[i]
                .events
                .iter()
                .filter_map(|e| match e {
                    ConnEvent::ChannelOpen { id, label, .. } => Some((*id, label.clone())),
                    _ => None,
                })
                .collect()
        }

        fn connected(&self, i: usize) -> bool {
            self.sides[i].events.iter().any(|e| matches!(e, ConnEvent::State(ConnState::Connected)))
        }

        /// Writes `payload` from side 0 on channel `id` in messages of
        /// `piece` bytes, as fast as SCTP takes them, and runs until side 1
        /// has received as many bytes (or `limit` of simulated time passes).
        fn send_all(&mut self, id: ChannelId, payload: &[u8], piece: usize, limit: Duration) {
            let mut offset = 0;
            self.run_until(limit, |w| {
                while offset < payload.len() {
                    let end = (offset + piece).min(payload.len());
                    match w.sides[0].conn.write(id, true, &payload[offset..end]) {
                        Ok(true) => offset = end,
                        Ok(false) => break,
                        Err(e) => panic!("write: {e}"),
                    }
                }
                w.received(1).len() >= payload.len()
            });
        }

        fn received(&self, i: usize) -> Vec<u8> {
            let mut out = Vec::new();
            for e in &self.sides[i].events {
                if let ConnEvent::ChannelData { data, .. } = e {
                    out.extend_from_slice(data);
                }
            }
            out
        }
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random()).collect()
    }

    /// Connects at 5 % loss with 20-30 ms one-way delay and moves 1 MiB
    /// reliably: every byte arrives, in order.
    #[test]
    fn reliable_stream_survives_five_percent_loss() {
        for seed in [1, 2, 3] {
            let mut w = World::new(seed, 0.05, Duration::from_millis(20), Duration::from_millis(10));
            w.sides[0].conn.open_channel(ChannelSpec::reliable("bulk"));
            w.run_until(Duration::from_secs(30), |w| w.connected(0) && !w.open_channels(0).is_empty());
            let (id, _) = w.open_channels(0)[0].clone();

            let payload = pattern(1024 * 1024, seed);
            w.send_all(id, &payload, 16 * 1024, Duration::from_secs(600));
            assert!(w.dropped > 0, "the link dropped packets (seed {seed})");
            assert_eq!(w.received(1), payload, "stream intact (seed {seed})");
            let loss = w.dropped as f64 / w.sent as f64;
            assert!((0.02..0.10).contains(&loss), "loss {loss} near 5 %");
        }
    }

    /// Every datagram, the DTLS handshake's included, fits the smallest
    /// path IPv6 allows even relayed through a TURN channel (1,280 bytes
    /// less 40 of IPv6, 8 of UDP and 4 of ChannelData), and bulk data fills
    /// that size: fewer packets per byte, less CPU on both sides.
    #[test]
    fn datagrams_fit_the_ipv6_minimum_path_and_bulk_data_fills_them() {
        const PATH: usize = 1280 - 40 - 8 - 4;
        let mut w = World::new(5, 0.0, Duration::from_millis(5), Duration::ZERO);
        w.sides[0].conn.open_channel(ChannelSpec::reliable("bulk"));
        w.run_until(Duration::from_secs(30), |w| w.connected(0) && !w.open_channels(0).is_empty());
        assert!(w.largest <= PATH, "handshake datagram of {} bytes, more than {PATH}", w.largest);
        let (id, _) = w.open_channels(0)[0].clone();
        w.largest = 0;
        let payload = pattern(256 * 1024, 5);
        w.send_all(id, &payload, 64 * 1024, Duration::from_secs(60));
        assert_eq!(w.received(1), payload);
        assert!(w.largest <= PATH, "data datagram of {} bytes, more than {PATH}", w.largest);
        // str0m's default MTU made 1,129-byte datagrams of bulk data.
        assert!(w.largest >= 1200, "bulk data in datagrams of at most {} bytes", w.largest);
    }

    /// The link is cut for 20 s in the middle of a reliable stream: ICE
    /// reports the outage, the impolite side restarts ICE, the connection
    /// comes back and every byte arrives once and in order.
    #[test]
    fn ice_restart_recovers_a_cut_link_without_losing_data() {
        let mut w = World::new(11, 0.0, Duration::from_millis(10), Duration::from_millis(2));
        w.sides[0].conn.open_channel(ChannelSpec::reliable("bulk"));
        w.run_until(Duration::from_secs(10), |w| w.connected(0) && !w.open_channels(0).is_empty());
        let (id, _) = w.open_channels(0)[0].clone();
        let cut_start = w.now + Duration::from_millis(200);
        w.cut = Some((cut_start, cut_start + Duration::from_secs(20)));

        let payload = pattern(2 * 1024 * 1024, 11);
        w.send_all(id, &payload, 16 * 1024, Duration::from_secs(300));
        assert!(w.now > cut_start + Duration::from_secs(20), "the stream outlived the cut");
        assert_eq!(w.received(1), payload, "every byte once, in order");
        let states: Vec<ConnState> = w.sides[1]
            .events
            .iter()
            .filter_map(|e| match e {
                ConnEvent::State(s) => Some(*s),
                _ => None,
            })
            .collect();
        assert_eq!(
            states,
            [ConnState::Connecting, ConnState::Connected, ConnState::Disconnected, ConnState::Connected],
            "the application saw the outage and the recovery"
        );
        assert!(w.sides[1].conn.restarts() >= 1, "the impolite side restarted ICE");
        assert_eq!(w.sides[0].conn.restarts(), 0, "the polite side left it to the other");
    }

    /// Both sides offer at the same moment: the polite side rolls back, and
    /// both end up with both channels.
    #[test]
    fn glare_on_the_first_offer_resolves_with_all_channels() {
        let mut w = World::new(7, 0.0, Duration::from_millis(5), Duration::ZERO);
        // Queue both offers before either is delivered.
        w.sides[0].conn.open_channel(ChannelSpec::reliable("from-a"));
        w.sides[1].conn.open_channel(ChannelSpec::unreliable("from-b"));
        w.run_until(Duration::from_secs(20), |w| {
            w.open_channels(0).len() == 2 && w.open_channels(1).len() == 2
        });
        let offers = |w: &World, i: usize| {
            w.sides[i].signals.iter().filter(|s| matches!(s, Signal::Offer { .. })).count()
        };
        assert!(offers(&w, 0) >= 1 && offers(&w, 1) >= 1, "both sides offered: a real collision");
        for i in 0..2 {
            let sig = &w.sides[i].signals;
            let cand = sig.iter().filter(|s| matches!(s, Signal::Candidate { .. })).count();
            let eoc = sig.iter().filter(|s| matches!(s, Signal::EndOfCandidates)).count();
            assert_eq!(
                (cand, eoc),
                (1, 1),
                "side {i} trickles its one host candidate, then end-of-candidates"
            );
        }
        for i in 0..2 {
            let mut labels: Vec<_> = w.open_channels(i).into_iter().map(|(_, l)| l).collect();
            labels.sort();
            assert_eq!(labels, ["from-a", "from-b"], "side {i}");
        }
        // Channels added on both sides at once after connecting (in-band).
        w.sides[0].conn.open_channel(ChannelSpec::reliable("late-a"));
        w.sides[1].conn.open_channel(ChannelSpec::max_lifetime("late-b", 100));
        w.run_until(Duration::from_secs(40), |w| {
            w.open_channels(0).len() == 4 && w.open_channels(1).len() == 4
        });
    }

    /// A lost connection is reported as failed within the connect timeout.
    #[test]
    fn total_loss_fails_within_the_connect_timeout() {
        let mut w = World::new(3, 1.0, Duration::from_millis(5), Duration::ZERO);
        w.sides[0].conn.open_channel(ChannelSpec::reliable("x"));
        w.run_until(Duration::from_secs(60), |w| {
            w.sides[0].events.iter().any(|e| matches!(e, ConnEvent::State(ConnState::Failed)))
        });
        assert!(w.now >= ConnConfig::default().connect_timeout);
        assert!(!w.connected(0));
    }
}

#[cfg(test)]
mod rooms;
