//! Prints one simulated run: `cargo run --release -p peerlink-overlay --example sim -- PEERS CHURN drop|retransmit`.
use peerlink_overlay::sim::{LossMode, SimConfig, run};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peers = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let churn = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let mode =
        if args.get(3).map(String::as_str) == Some("drop") { LossMode::Drop } else { LossMode::Retransmit };
    let t = std::time::Instant::now();
    let r = run(SimConfig::scenario(peers, churn, mode, 1));
    println!("{r:#?}\nratio {:.5} wall {:?}", r.delivery_ratio(), t.elapsed());
}
