//! One overlay's answers to single inputs.

use std::time::{Duration, Instant};

use peerlink_overlay::{Config, Message, Output, Overlay};

fn drain(o: &mut Overlay<u32>) -> Vec<Output<u32>> {
    std::iter::from_fn(|| o.poll_output()).collect()
}

fn sends(out: &[Output<u32>]) -> Vec<(u32, Message<u32>)> {
    out.iter().filter_map(|o| if let Output::Send(p, m) = o { Some((*p, m.clone())) } else { None }).collect()
}

/// Peer `me` with neighbours `ns` (they joined through us), in a large room.
fn with_neighbors(me: u32, ns: &[u32], now: Instant) -> Overlay<u32> {
    with_neighbors_in(Config::default(), me, ns, now)
}

fn with_neighbors_in(config: Config, me: u32, ns: &[u32], now: Instant) -> Overlay<u32> {
    let mut o = Overlay::new(me, config, 9, now);
    // Spares so that the room counts as large (no full mesh).
    for p in 100..120 {
        o.peer_known(p);
    }
    for &n in ns {
        assert!(o.accept(n, now));
        o.connected(n, now);
        o.handle_message(n, Message::Join, now);
    }
    drain(&mut o);
    o
}

#[test]
fn a_contact_takes_the_newcomer_and_walks_it_to_its_neighbours() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    o.connected(4, now);
    o.handle_message(4, Message::Join, now);
    let out = drain(&mut o);
    assert!(out.contains(&Output::NeighborUp(4)));
    let s = sends(&out);
    assert!(s.contains(&(4, Message::NeighborReply { accepted: true })));
    assert!(s.contains(&(2, Message::ForwardJoin { peer: 4, ttl: 6 })));
    assert!(s.contains(&(3, Message::ForwardJoin { peer: 4, ttl: 6 })));
    assert_eq!(o.neighbors().len(), 3);
}

#[test]
fn the_end_of_a_join_walk_connects_to_the_newcomer() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    o.handle_message(2, Message::ForwardJoin { peer: 9, ttl: 0 }, now);
    let out = drain(&mut o);
    assert!(out.contains(&Output::Connect(9)));
    assert!(out.contains(&Output::NeighborUp(9)));
    // The request waits for the connection, then goes out first.
    assert!(sends(&out).is_empty());
    o.connected(9, now);
    assert_eq!(sends(&drain(&mut o)), vec![(9, Message::Neighbor { high: true })]);
}

#[test]
fn the_active_view_stays_bounded_and_evicted_peers_become_spares() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3, 4, 5, 6], now);
    assert_eq!(o.neighbors().len(), 5);
    o.accept(7, now);
    o.connected(7, now);
    o.handle_message(7, Message::Neighbor { high: true }, now);
    let out = drain(&mut o);
    assert_eq!(o.neighbors().len(), 5);
    assert!(o.neighbors().contains(&7));
    let evicted: Vec<u32> = sends(&out)
        .into_iter()
        .filter_map(|(p, m)| (m == Message::Disconnect { alive: true }).then_some(p))
        .collect();
    assert_eq!(evicted.len(), 1);
    assert!(o.passive().contains(&evicted[0]));
    // A low-priority request to a full view is turned down.
    o.accept(8, now);
    o.connected(8, now);
    o.handle_message(8, Message::Neighbor { high: false }, now);
    assert!(sends(&drain(&mut o)).contains(&(8, Message::NeighborReply { accepted: false })));
    assert!(!o.neighbors().contains(&8));
}

#[test]
fn a_lost_neighbour_is_replaced_from_the_passive_view() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2], now);
    o.disconnected(&2, now);
    let out = drain(&mut o);
    assert!(out.contains(&Output::NeighborDown(2)));
    // No neighbour left: the requests are high priority.
    let asked: Vec<u32> =
        out.iter().filter_map(|x| if let Output::Connect(p) = x { Some(*p) } else { None }).collect();
    assert_eq!(asked.len(), 5, "{out:?}");
    assert!(asked.iter().all(|p| (100..120).contains(p)));
    o.connected(asked[0], now);
    assert_eq!(sends(&drain(&mut o)), vec![(asked[0], Message::Neighbor { high: true })]);
    assert_eq!(o.stats().replacements, 1);
}

#[test]
fn a_duplicate_prunes_its_link_and_a_missing_broadcast_is_grafted() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3, 4], now);
    let g = |hops| Message::Gossip { id: 77, origin: 50, hops, all: false, payload: b"hi".to_vec() };
    o.handle_message(2, g(1), now);
    let out = drain(&mut o);
    assert!(
        out.iter()
            .any(|x| matches!(x, Output::Deliver(d) if d.id == 77 && d.hops == 2 && d.payload == b"hi"))
    );
    // Pushed on to the other neighbours, eagerly (they are in the tree).
    assert!(sends(&out).contains(&(3, g(2))));
    o.handle_message(3, g(1), now);
    let out = drain(&mut o);
    assert!(!out.iter().any(|x| matches!(x, Output::Deliver(_))), "delivered twice");
    // One duplicate may be two broadcasts crossing: the second in a row
    // from the same neighbour prunes its link.
    assert!(sends(&out).is_empty());
    let g2 = |hops| Message::Gossip { id: 78, origin: 50, hops, all: false, payload: b"ho".to_vec() };
    o.handle_message(2, g2(1), now);
    drain(&mut o);
    o.handle_message(3, g2(1), now);
    assert_eq!(sends(&drain(&mut o)), vec![(3, Message::Prune)]);
    assert_eq!(o.stats().duplicates, 2);

    // An id announced but not received within graft_timeout is grafted.
    o.handle_message(4, Message::IHave { ids: vec![(88, 3)] }, now);
    assert!(sends(&drain(&mut o)).is_empty());
    let later = now + Config::default().graft_timeout;
    o.handle_timeout(later);
    assert!(sends(&drain(&mut o)).contains(&(4, Message::Graft { id: Some(88) })));
    // A graft is answered from the cache.
    o.handle_message(2, Message::Graft { id: Some(77) }, later);
    assert!(sends(&drain(&mut o)).contains(&(2, g(2))));
}

#[test]
fn direct_messages_open_a_connection_that_closes_when_idle() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2], now);
    assert!(o.send_direct(40, b"x".to_vec(), now));
    assert!(drain(&mut o).contains(&Output::Connect(40)));
    o.connected(40, now);
    assert_eq!(sends(&drain(&mut o)), vec![(40, Message::Direct { payload: b"x".to_vec() })]);
    o.handle_timeout(now + Duration::from_secs(10));
    assert!(!drain(&mut o).contains(&Output::Close(40)), "closed while in use");
    o.handle_timeout(now + Config::default().idle_close + Duration::from_secs(1));
    assert!(drain(&mut o).contains(&Output::Close(40)));
}

#[test]
fn a_connection_being_set_up_queues_up_to_its_bytes_and_refuses_beyond() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2], now);
    // 64 KiB messages: three fit in the 256 KiB setup queue, the fourth not.
    let big = vec![7u8; 64 << 10];
    for _ in 0..3 {
        assert!(o.send_direct(40, big.clone(), now));
    }
    let dropped = o.stats().dropped;
    assert!(!o.send_direct(40, big.clone(), now), "refused: the queue holds its bytes");
    assert_eq!(o.stats().dropped, dropped + 1);
    assert!(o.send_direct(40, vec![1], now), "a small one still fits");
    drain(&mut o);
    o.connected(40, now);
    let sent = sends(&drain(&mut o));
    assert_eq!(sent.len(), 4, "what was queued goes out once connected");
    // Up: nothing is held any more, so nothing is refused.
    assert!(o.send_direct(40, big, now));
}

#[test]
fn connections_stay_within_the_limit() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3, 4, 5, 6], now);
    for p in 40..43 {
        assert!(o.send_direct(p, vec![1], now));
        o.connected(p, now);
    }
    assert_eq!(o.connections().count(), 8);
    // A fourth direct peer closes the least recently used direct connection.
    assert!(o.send_direct(43, vec![1], now + Duration::from_millis(1)));
    let out = drain(&mut o);
    assert!(out.contains(&Output::Close(40)), "{out:?}");
    assert_eq!(o.connections().count(), 8);
}

#[test]
fn connections_being_set_up_are_not_closed_to_make_room() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3, 4, 5, 6], now);
    for p in 40..43 {
        assert!(o.send_direct(p, vec![1], now));
    }
    // Every connection is a neighbour's or being set up (their peers wait
    // on them): an offer is refused, a message to a fourth peer dropped.
    assert!(!o.accept(50, now));
    assert!(!o.send_direct(51, vec![1], now));
    assert_eq!(o.connections().count(), 8);
}

#[test]
fn leaving_tells_every_neighbour() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    o.leave(now);
    let s = sends(&drain(&mut o));
    assert!(s.contains(&(2, Message::Disconnect { alive: false })));
    assert!(s.contains(&(3, Message::Disconnect { alive: false })));
    assert_eq!(o.poll_timeout(), None);
}

#[test]
fn a_small_room_asks_every_member() {
    let now = Instant::now();
    let mut o = Overlay::new(1u32, Config::default(), 1, now);
    o.join(vec![2, 3, 4], 3, now);
    let out = drain(&mut o);
    let mut asked: Vec<u32> =
        out.iter().filter_map(|x| if let Output::Connect(p) = x { Some(*p) } else { None }).collect();
    asked.sort();
    assert_eq!(asked, vec![2, 3, 4]);
}

#[test]
fn a_message_to_one_peer_is_retried_then_reported_not_lost() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2], now);
    assert!(o.send_direct(40, b"x".to_vec(), now));
    let mut t = now;
    for attempt in 1..=3 {
        assert!(drain(&mut o).contains(&Output::Connect(40)), "attempt {attempt}");
        // Refused (the peer holds all the connections it may).
        o.disconnected(&40, t);
        t += Duration::from_millis(1500);
        o.handle_timeout(t);
    }
    let out = drain(&mut o);
    assert!(out.contains(&Output::DirectFailed { peer: 40, messages: 1 }), "{out:?}");
    assert!(!out.contains(&Output::Connect(40)));

    // A retry that connects delivers what waited.
    assert!(o.send_direct(41, b"y".to_vec(), t));
    drain(&mut o);
    o.disconnected(&41, t);
    o.handle_timeout(t + Duration::from_millis(1500));
    assert!(drain(&mut o).contains(&Output::Connect(41)));
    o.connected(41, t + Duration::from_millis(1600));
    assert_eq!(sends(&drain(&mut o)), vec![(41, Message::Direct { payload: b"y".to_vec() })]);
}

#[test]
fn announcements_faster_than_they_can_be_fetched_are_bounded() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    // 20 × 256 ids announced that never come: 4,096 are tracked (and
    // fetched), the rest wait for another announcement.
    for chunk in 0..20u64 {
        let ids = (0..256u64).map(|i| (1_000_000 + chunk * 256 + i, 1)).collect();
        o.handle_message(2, Message::IHave { ids }, now);
    }
    o.handle_timeout(now + Config::default().graft_timeout);
    let grafts =
        sends(&drain(&mut o)).into_iter().filter(|(_, m)| matches!(m, Message::Graft { .. })).count();
    assert_eq!(grafts, 4096);
}

/// Messages `from` sends to `to`, handed over; `from`'s other outputs
/// are returned.
fn hand(from: &mut Overlay<u32>, to: &mut Overlay<u32>, now: Instant) -> Vec<Output<u32>> {
    let me = *from.id();
    let theirs = *to.id();
    let mut rest = Vec::new();
    for o in drain(from) {
        match o {
            Output::Send(p, m) if p == theirs => to.handle_message(me, m, now),
            other => rest.push(other),
        }
    }
    rest
}

#[test]
fn signals_go_back_along_a_join_walk_and_the_answer_comes_back() {
    // 9 joined through 3; the walk went 3 → 2 → 1, and ends at 1, which
    // connects to 9: its offer goes 1 → 2 → 3 → 9, the answer back.
    let now = Instant::now();
    let mut o1 = with_neighbors(1, &[2], now);
    let mut o2 = with_neighbors(2, &[1, 3], now);
    let mut o3 = with_neighbors(3, &[2, 9], now);
    let mut o9 = with_neighbors(9, &[3], now);
    o2.handle_message(3, Message::ForwardJoin { peer: 9, ttl: 1 }, now);
    hand(&mut o2, &mut o1, now);
    assert!(o1.neighbors().contains(&9), "the walk's end takes the newcomer");
    drain(&mut o1);
    assert!(o1.relay(9, b"offer".to_vec(), now));
    hand(&mut o1, &mut o2, now);
    hand(&mut o2, &mut o3, now);
    hand(&mut o3, &mut o9, now);
    let out = drain(&mut o9);
    assert!(out.contains(&Output::Relayed { from: 1, payload: b"offer".to_vec() }), "{out:?}");
    // The answer follows the way the offer came.
    assert!(o9.relay(1, b"answer".to_vec(), now));
    hand(&mut o9, &mut o3, now);
    hand(&mut o3, &mut o2, now);
    hand(&mut o2, &mut o1, now);
    let out = drain(&mut o1);
    assert!(out.contains(&Output::Relayed { from: 9, payload: b"answer".to_vec() }), "{out:?}");
    assert_eq!(o1.stats().relayed, 1);
    assert_eq!(o1.stats().relays_received, 1);
    assert_eq!(o2.stats().relays_forwarded, 2);
    assert_eq!(o3.stats().relays_forwarded, 2);
}

#[test]
fn without_a_route_a_signal_goes_through_the_server() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    assert!(!o.relay(42, b"offer".to_vec(), now), "no route to 42");
    assert!(!o.relay(1, b"offer".to_vec(), now), "not to ourselves");
    o.handle_message(2, Message::ForwardJoin { peer: 42, ttl: 3 }, now);
    drain(&mut o);
    let big = vec![0; peerlink_overlay::MAX_RELAY + 1];
    assert!(!o.relay(42, big, now), "over MAX_RELAY");
    assert!(o.relay(42, b"offer".to_vec(), now));
    assert!(sends(&drain(&mut o)).iter().any(|(p, m)| *p == 2 && matches!(m, Message::Relay { to: 42, .. })));
    // Routes expire.
    let later = now + Config::default().route_retention + Duration::from_secs(1);
    o.handle_timeout(later);
    assert!(!o.relay(42, b"offer".to_vec(), later));
}

#[test]
fn a_relay_that_cannot_go_on_comes_back_to_its_writer() {
    let now = Instant::now();
    // 2 knows no way to 42: the relay from 1 goes back to 1, who hears it
    // failed (and sends it through the server).
    let mut o1 = with_neighbors(1, &[2], now);
    let mut o2 = with_neighbors(2, &[1, 3], now);
    o1.handle_message(2, Message::ForwardJoin { peer: 42, ttl: 3 }, now);
    drain(&mut o1);
    assert!(o1.relay(42, b"offer".to_vec(), now));
    hand(&mut o1, &mut o2, now);
    hand(&mut o2, &mut o1, now);
    let out = drain(&mut o1);
    assert!(out.contains(&Output::RelayFailed { to: 42, payload: b"offer".to_vec() }), "{out:?}");
    assert_eq!(o1.stats().relays_failed, 1);
    assert!(!o1.relay(42, b"again".to_vec(), now), "the broken route is forgotten");

    // Hops left 0: back too.
    o2.handle_message(3, Message::Relay { to: 99, from: 3, ttl: 0, payload: b"x".to_vec() }, now);
    assert!(
        sends(&drain(&mut o2))
            .contains(&(3, Message::Unreachable { to: 3, from: 99, ttl: 8, payload: b"x".to_vec() }))
    );

    // Back to its writer by a loop of routes: failed, not lost.
    o1.handle_message(2, Message::Relay { to: 42, from: 1, ttl: 5, payload: b"looped".to_vec() }, now);
    assert!(drain(&mut o1).contains(&Output::RelayFailed { to: 42, payload: b"looped".to_vec() }));
}

#[test]
fn relays_passed_on_for_others_are_limited_per_second() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3], now);
    let limit = Config::default().max_relays_per_second;
    let mut forwarded = 0;
    let mut bounced = 0;
    for i in 0..limit + 10 {
        o.handle_message(2, Message::Relay { to: 3, from: 1000 + i, ttl: 4, payload: b"s".to_vec() }, now);
        for (p, m) in sends(&drain(&mut o)) {
            match m {
                Message::Relay { .. } if p == 3 => forwarded += 1,
                Message::Unreachable { .. } if p == 2 => bounced += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!((forwarded, bounced), (limit, 10));
    // A second later there is room again.
    let later = now + Duration::from_secs(1);
    o.handle_message(2, Message::Relay { to: 3, from: 7, ttl: 4, payload: b"s".to_vec() }, later);
    assert!(matches!(sends(&drain(&mut o))[..], [(3, Message::Relay { .. })]));
}

#[test]
fn a_connection_we_did_not_ask_for_stays_within_the_limit() {
    let now = Instant::now();
    let mut o = with_neighbors(1, &[2, 3, 4, 5, 6], now);
    for p in 7..10 {
        assert!(o.accept(p, now));
    }
    assert_eq!(o.stats().connections, 8);
    // Neighbours' or being set up: none can go, so the newcomer's is closed.
    o.connected(50, now);
    assert!(drain(&mut o).contains(&Output::Close(50)));
    o.handle_message(51, Message::Join, now);
    assert!(drain(&mut o).contains(&Output::Close(51)));
    assert!(o.stats().connections <= 8);
}

/// Peers `o` asked to connect to (a request or a join waits for the connection).
fn connects(out: &[Output<u32>]) -> Vec<u32> {
    out.iter().filter_map(|x| if let Output::Connect(p) = x { Some(*p) } else { None }).collect()
}

#[test]
fn a_spare_that_turned_us_down_is_not_asked_again_every_tick() {
    let t0 = Instant::now();
    let mut o = Overlay::new(1, Config::default(), 9, t0);
    for p in 100..103 {
        o.peer_known(p);
    }
    for n in [2, 3] {
        assert!(o.accept(n, t0));
        o.connected(n, t0);
        o.handle_message(n, Message::Join, t0);
    }
    drain(&mut o);
    // The first repair asks every spare; each is full and says no.
    let mut now = t0 + Duration::from_millis(500);
    o.handle_timeout(now);
    let mut asked = connects(&drain(&mut o));
    asked.sort();
    assert_eq!(asked, vec![100, 101, 102]);
    for &p in &asked {
        o.connected(p, now);
        assert_eq!(sends(&drain(&mut o)), vec![(p, Message::Neighbor { high: false })]);
        o.handle_message(p, Message::NeighborReply { accepted: false }, now);
        assert_eq!(drain(&mut o), vec![Output::Close(p)], "the connection made for the request closes");
    }
    // Not asked again at every repair (each time a connection for nothing) ...
    while now < t0 + Duration::from_secs(10) {
        now += Duration::from_millis(100);
        o.handle_timeout(now);
        assert_eq!(connects(&drain(&mut o)), Vec::<u32>::new(), "at {:?}", now - t0);
    }
    // ... but after a while (a neighbour of theirs may have gone).
    let mut again = Vec::new();
    while now < t0 + Duration::from_secs(12) {
        now += Duration::from_millis(100);
        o.handle_timeout(now);
        again.extend(connects(&drain(&mut o)));
    }
    again.sort();
    assert_eq!(again, vec![100, 101, 102]);
}

#[test]
fn a_peer_left_with_one_neighbour_asks_at_high_priority_and_is_taken() {
    let t0 = Instant::now();
    let mut o = with_neighbors(1, &[2], t0);
    // One link is one failure from alone: the spares are asked at high
    // priority, which a full peer cannot refuse.
    let now = t0 + Duration::from_millis(500);
    o.handle_timeout(now);
    let asked = connects(&drain(&mut o));
    assert!(!asked.is_empty());
    for &p in &asked {
        o.connected(p, now);
        assert_eq!(sends(&drain(&mut o)), vec![(p, Message::Neighbor { high: true })]);
    }
    // A full peer takes it, giving up a neighbour of its own; at low
    // priority it would not.
    for high in [true, false] {
        let mut full = with_neighbors(100, &[10, 11, 12, 13, 14], t0);
        assert!(full.accept(1, now));
        full.connected(1, now);
        full.handle_message(1, Message::Neighbor { high }, now);
        let out = drain(&mut full);
        assert!(sends(&out).contains(&(1, Message::NeighborReply { accepted: high })), "{out:?}");
        assert_eq!(out.contains(&Output::NeighborUp(1)), high, "{out:?}");
    }
}

#[test]
fn with_views_of_two_one_neighbour_is_asked_for_at_low_priority() {
    // A full view of two that took a high-priority request would leave the
    // neighbour it gave up with one, asking the same way: a chain.
    let t0 = Instant::now();
    let mut o = with_neighbors_in(Config { active_view: 2, ..Config::default() }, 1, &[2], t0);
    let now = t0 + Duration::from_millis(500);
    o.handle_timeout(now);
    let asked = connects(&drain(&mut o));
    assert_eq!(asked.len(), 1, "{asked:?}");
    o.connected(asked[0], now);
    assert_eq!(sends(&drain(&mut o)), vec![(asked[0], Message::Neighbor { high: false })]);
}

#[test]
fn a_newcomer_whose_contacts_were_all_full_joins_again_through_them() {
    let t0 = Instant::now();
    let mut o = Overlay::new(50, Config::default(), 9, t0);
    o.join(vec![1, 2, 3, 4], 20, t0);
    // Each contact in turn turns the connection down (at its limit): the
    // next is tried, until none is left.
    let mut tried = Vec::new();
    for _ in 0..4 {
        let c = connects(&drain(&mut o));
        assert_eq!(c.len(), 1, "one contact at a time: {c:?}");
        tried.push(c[0]);
        o.disconnected(&c[0], t0);
    }
    tried.sort();
    assert_eq!(tried, vec![1, 2, 3, 4]);
    assert!(drain(&mut o).is_empty());
    assert!(o.neighbors().is_empty() && o.passive().is_empty());
    // Alone: after a second the join is made again through them, and a
    // second refusal waits twice as long.
    let mut now = t0;
    let mut rejoins = Vec::new();
    while now < t0 + Duration::from_secs(4) {
        now += Duration::from_millis(100);
        o.handle_timeout(now);
        for c in connects(&drain(&mut o)) {
            rejoins.push(now - t0);
            if rejoins.len() < 5 {
                o.disconnected(&c, now);
            } else {
                o.connected(c, now);
                assert_eq!(sends(&drain(&mut o)), vec![(c, Message::Join)]);
                o.handle_message(c, Message::NeighborReply { accepted: true }, now);
                assert!(drain(&mut o).contains(&Output::NeighborUp(c)));
            }
        }
    }
    // A round through the four contacts 1 s in, the next 2 s after it.
    assert_eq!(rejoins.len(), 5, "{rejoins:?}");
    assert_eq!(rejoins[0], Duration::from_secs(1));
    assert!(rejoins[3] < Duration::from_secs(2), "{rejoins:?}");
    assert_eq!(rejoins[4], Duration::from_secs(3));
    assert_eq!(o.neighbors().len(), 1);
    assert_eq!(o.stats().rejoins, 2);
}
