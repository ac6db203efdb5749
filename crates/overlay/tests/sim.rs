//! Whole rooms on simulated time (the scenario): every broadcast
//! reaches every peer present for its lifetime, with few duplicates, short
//! paths and a handful of connections per peer.

use peerlink_overlay::sim::{LossMode, SimConfig, SimReport, run};

fn check(r: &SimReport, peers: usize, min_ratio: f64) {
    let bound = 2.0 * (peers as f64).log2();
    assert!(r.broadcasts >= 200, "{r:#?}");
    assert!(r.expected > (r.broadcasts as u64) * (peers as u64) * 8 / 10, "few peers counted: {r:#?}");
    assert!(r.delivery_ratio() >= min_ratio, "delivery {:.5} < {min_ratio}: {r:#?}", r.delivery_ratio());
    assert!(r.duplicates_per_delivery <= 1.5, "{r:#?}");
    assert!(f64::from(r.hops_p99) <= bound, "p99 hops {} > 2·log2(N) = {bound:.1}: {r:#?}", r.hops_p99);
    assert!(r.max_connections <= 8, "{r:#?}");
    // Each broadcast is carried about once per peer, not once per pair.
    assert!(r.payload_copies_per_broadcast < 2.0 * peers as f64, "{r:#?}");
}

#[test]
fn a_thousand_peers_without_loss_get_every_broadcast() {
    let mut cfg = SimConfig::scenario(1000, 0.0, LossMode::Retransmit, 1);
    cfg.loss = 0.0;
    let r = run(cfg);
    check(&r, 1000, 1.0);
}

#[test]
fn a_thousand_peers_with_loss_and_churn_get_every_broadcast() {
    // 1 % loss on reliable channels (late, not lost), 10 % of the peers
    // leaving per minute (half vanishing) and as many joining.
    let r = run(SimConfig::scenario(1000, 0.10, LossMode::Retransmit, 2));
    assert!(r.left >= 150 && r.joined >= 150, "{r:#?}");
    check(&r, 1000, 0.999);
}

#[test]
fn dropped_messages_are_repaired_by_the_lazy_links() {
    // Harsher than the real transport: 1 % of overlay messages vanish.
    let r = run(SimConfig::scenario(1000, 0.10, LossMode::Drop, 3));
    assert!(r.grafts > 0, "{r:#?}");
    check(&r, 1000, 0.999);
}

#[test]
fn a_hundred_peers_with_churn() {
    let r = run(SimConfig::scenario(100, 0.10, LossMode::Retransmit, 4));
    check(&r, 100, 0.999);
}

#[test]
fn a_small_room_is_a_full_mesh() {
    let mut cfg = SimConfig::scenario(8, 0.0, LossMode::Retransmit, 5);
    cfg.join_burst = 1;
    cfg.loss = 0.0;
    cfg.measure = std::time::Duration::from_secs(100);
    let r = run(cfg);
    assert_eq!(r.delivery_ratio(), 1.0, "{r:#?}");
    // Every peer holds a connection to each of the 7 others, and every
    // broadcast comes straight from its origin; the others only announce it.
    assert_eq!(r.max_connections, 7, "{r:#?}");
    assert!(r.mean_connections > 6.9, "{r:#?}");
    assert_eq!(r.hops_max, 1, "{r:#?}");
    assert!(r.duplicates_per_delivery < 0.1, "{r:#?}");
}
