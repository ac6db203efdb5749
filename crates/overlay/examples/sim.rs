//! Prints one simulated run: `cargo run --release -p peerlink-overlay --example sim -- PEERS CHURN drop|retransmit`.
use peerlink_overlay::sim::{LossMode, SimConfig, run};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peers = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let churn = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let mode =
        if args.get(3).map(String::as_str) == Some("drop") { LossMode::Drop } else { LossMode::Retransmit };
    let t = std::time::Instant::now();
    let mut cfg = SimConfig::scenario(peers, churn, mode, 1);
    if let Some(bps) = args.get(4).and_then(|s| s.parse().ok()) {
        cfg.broadcasts_per_second = bps;
    }
    if let Some(ms) = args.get(5).and_then(|s| s.parse::<u64>().ok()) {
        cfg.latency = (std::time::Duration::from_millis(ms), std::time::Duration::from_millis(ms * 4));
    }
    let r = run(cfg);
    println!("{r:#?}\nratio {:.5} wall {:?}", r.delivery_ratio(), t.elapsed());
}
