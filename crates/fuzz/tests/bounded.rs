//! Every fuzz target on mutations of the fixtures, a bounded number of
//! times per run (seeded, so a failure is reproducible): the stable-toolchain
//! counterpart of `cargo fuzz run`. Prints executions per target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn files_in(dir: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(fixtures().join(dir)).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.push(std::fs::read(p).unwrap());
        }
    }
    assert!(!out.is_empty(), "fixtures in {dir}");
    out
}

/// Values that tend to break parsers, spliced into inputs.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"-1",
    b"18446744073709551616",
    b"1e999",
    b"\\u0000",
    b"\xff",
    b"\x00",
    b"\"type\":\"",
    b"\"from\":1",
    b"{\"type\":\"manifest\"}",
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..=6) {
        match rng.random_range(0..7) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            2 if !v.is_empty() => {
                let a = rng.random_range(0..v.len());
                let b = (a + rng.random_range(0..16)).min(v.len());
                v.drain(a..b);
            }
            3 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                let at = rng.random_range(0..=v.len());
                v.splice(at..at, t.iter().copied());
            }
            4 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let at = rng.random_range(0..=v.len());
                let from = rng.random_range(0..=other.len());
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            5 if !v.is_empty() => {
                let a = rng.random_range(0..v.len());
                let b = (a + rng.random_range(1..32)).min(v.len());
                let piece = v[a..b].to_vec();
                v.splice(a..a, piece);
            }
            _ => v.truncate(rng.random_range(0..=v.len())),
        }
    }
    v
}

/// Runs `target` on the seeds, then on mutations until `count` inputs or
/// `limit` time, whichever first.
fn run(name: &str, seeds: &[Vec<u8>], count: usize, limit: Duration, target: fn(&[u8])) {
    let start = Instant::now();
    for s in seeds {
        target(s);
    }
    let mut rng = StdRng::seed_from_u64(0x5eed ^ name.len() as u64);
    let mut n = seeds.len();
    while n < count && start.elapsed() < limit {
        let input = mutate(&mut rng, seeds);
        target(&input);
        n += 1;
    }
    println!("{name}: {n} executions in {:.1} s, no crash", start.elapsed().as_secs_f64());
    assert!(n >= count.min(1000), "{name}: only {n} executions in {limit:?}");
}

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn signaling() {
    let mut seeds = files_in("protocol/client");
    seeds.extend(files_in("protocol/server"));
    run("signaling", &seeds, 200_000, LIMIT, peerlink_fuzz::signaling);
}

#[test]
fn transfer_ctl() {
    let seeds: Vec<Vec<u8>> = files_in("transfer/ctl")
        .into_iter()
        .enumerate()
        .map(|(i, text)| [vec![i as u8], text].concat())
        .collect();
    run("transfer_ctl", &seeds, 5_000, LIMIT, peerlink_fuzz::transfer_ctl);
}

#[test]
fn transfer_frame() {
    let frames: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("transfer/frames.json")).unwrap()).unwrap();
    let mut seeds = Vec::new();
    for (i, ex) in frames["examples"].as_array().unwrap().iter().enumerate() {
        let hex = ex["frame"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap()).collect();
        seeds.push([vec![i as u8], bytes].concat());
    }
    // Frames of the fuzzed transfer itself: file 0 at 0, file 1 at 0.
    seeds.push([vec![3], peerlink_transfer::encode_frame(0, 0, &[0u8; 64])].concat());
    seeds.push([vec![4], peerlink_transfer::encode_frame(1, 0, b"hello")].concat());
    run("transfer_frame", &seeds, 5_000, LIMIT, peerlink_fuzz::transfer_frame);
}

#[test]
fn pairing() {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pairing/messages.json")).unwrap()).unwrap();
    let seeds: Vec<Vec<u8>> =
        v["messages"].as_array().unwrap().iter().map(|m| m["json"].to_string().into_bytes()).collect();
    run("pairing", &seeds, 50_000, LIMIT, peerlink_fuzz::pairing);
}

#[test]
fn turn() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len()).step_by(2).map(|j| u8::from_str_radix(&s[j..j + 2], 16).unwrap()).collect()
    };
    let seeds = vec![
        // Binding request.
        [vec![0], hex("000100002112a442000102030405060708090a0b")].concat(),
        // Allocate, REQUESTED-TRANSPORT UDP, no credentials (answered 401).
        [vec![0], hex("000300082112a4420102030405060708090a0b0c0019000411000000")].concat(),
        // Allocate with a REST username and a realm and nonce.
        [vec![1], hex("000300302112a4420a0b0c0d0e0f101112131415001900041100000000060010343130323434343830303a70656572000014000870656572")].concat(),
        // Data from a peer to a relayed address.
        [vec![2], b"\x17\xfe\xfdsome dtls".to_vec()].concat(),
    ];
    run("turn", &seeds, 200_000, LIMIT, peerlink_fuzz::turn);
}
