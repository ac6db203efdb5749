//! `peerlink bench transfer`: real `peerlink send` and `peerlink receive`
//! processes moving files disk to disk through an in-process signaling
//! server, beside the raw channel throughput measured in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Longest a single case may take.
const CASE_LIMIT: Duration = Duration::from_secs(600);

struct Case {
    label: String,
    path: PathBuf,
    bytes: u64,
}

/// Fast, incompressible-looking contents: a random 1 MiB block with each
/// copy stamped with its index, so no two chunks are alike. Flushed to disk.
fn write_file(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    let mut block = vec![0u8; 1 << 20];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = len;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        block[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block[..n])?;
        left -= n as u64;
        i += 1;
    }
    // On disk before the clock starts: the kernel writing back the test
    // files during a transfer would be measured as the transfer's cost.
    f.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
}

fn sha256(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A child's result, and when its data phase began and ended.
struct Outcome {
    finished: Value,
    /// When the offer arrived (the receiver): pairing, ICE, DTLS and SCTP
    /// are done, and the data follows.
    offered: Option<Instant>,
    /// When `finished` arrived: the last file verified and on disk.
    done: Instant,
}

/// Reads a child's JSON lines until `finished`; sends the `code` on the way.
async fn events(child: &mut Child, mut code: Option<oneshot::Sender<String>>) -> anyhow::Result<Outcome> {
    let out = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(out).lines();
    let mut offered = None;
    while let Some(line) = lines.next_line().await? {
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        match v["event"].as_str() {
            Some("code") => {
                if let (Some(tx), Some(c)) = (code.take(), v["code"].as_str()) {
                    let _ = tx.send(c.to_string());
                }
            }
            Some("offer") => offered = offered.or(Some(Instant::now())),
            Some("finished") => return Ok(Outcome { finished: v, offered, done: Instant::now() }),
            _ => {}
        }
    }
    bail!("the process ended without a result")
}

fn mib(kib: &Value) -> String {
    kib.as_u64().map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

/// One case's times: from `receive`'s start to its exit, and its data
/// phase (offer to last file on disk).
struct Timing {
    whole: Duration,
    data: Option<Duration>,
}

async fn one(
    exe: &Path,
    url: &str,
    case: &Case,
    out: &Path,
    rtt_ms: u64,
) -> anyhow::Result<(Timing, Value, Value)> {
    let delay = format!("{}ms", rtt_ms / 2);
    let mut common = vec!["--json", "--server", url, "--ice-addr", "127.0.0.1"];
    if rtt_ms > 0 {
        common.extend(["--emulate-delay", &delay]);
    }
    let mut sender = Command::new(exe)
        .arg("send")
        .args(&common)
        .arg(&case.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let (tx, rx) = oneshot::channel();
    let sender_events = tokio::spawn(async move {
        let r = events(&mut sender, Some(tx)).await;
        let _ = sender.wait().await;
        r
    });
    let code =
        tokio::time::timeout(Duration::from_secs(30), rx).await.context("no code from the sender")??;
    let t0 = Instant::now();
    let mut receiver = Command::new(exe)
        .arg("receive")
        .args(&common)
        .args(["--yes", "--out"])
        .arg(out)
        .arg(&code)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let received =
        tokio::time::timeout(CASE_LIMIT, events(&mut receiver, None)).await.context("timed out")??;
    receiver.wait().await?;
    let whole = t0.elapsed();
    let data = received.offered.map(|at| received.done.duration_since(at));
    let (received, sent) = (
        received.finished,
        tokio::time::timeout(Duration::from_secs(30), sender_events).await.context("sender hung")???.finished,
    );
    if received["ok"] != true || sent["ok"] != true {
        bail!("transfer failed: receiver {received}, sender {sent}");
    }
    Ok((Timing { whole, data }, sent, received))
}

pub async fn run(
    big_mib: usize,
    files: usize,
    file_kib: usize,
    dir: Option<PathBuf>,
    rtt_ms: u64,
) -> anyhow::Result<()> {
    let root = dir.unwrap_or_else(std::env::temp_dir).join(format!("peerlink-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("many"))?;
    let result = async {
        let big = root.join("big.bin");
        write_file(&big, big_mib as u64 * (1 << 20), 1)?;
        for i in 0..files {
            let sub = root.join("many").join(format!("d{}", i % 20));
            std::fs::create_dir_all(&sub)?;
            write_file(&sub.join(format!("f{i}.bin")), file_kib as u64 * 1024, i as u64 + 2)?;
        }
        let cases = [
            Case { label: format!("{big_mib} MiB file"), path: big.clone(), bytes: big_mib as u64 * (1 << 20) },
            Case {
                label: format!("{files} x {file_kib} KiB files"),
                path: root.join("many"),
                bytes: (files * file_kib * 1024) as u64,
            },
        ];

        let raw = if rtt_ms > 0 {
            super::peer::throughput_at_rtt(256, 65536, Duration::from_millis(rtt_ms / 2 * 2)).await?
        } else {
            super::peer::throughput(256, 65536, false).await?
        };
        let server = super::Server::start().await?;
        let exe = std::env::current_exe()?;
        for (i, case) in cases.iter().enumerate() {
            if case.bytes == 0 {
                continue; // --mib 0 or --files 0: that case is not wanted
            }
            let out = root.join(format!("out-{i}"));
            std::fs::create_dir_all(&out)?;
            let (timing, sent, received) = one(&exe, &server.url, case, &out, rtt_ms).await?;
            if i == 0 {
                let (a, b) = (sha256(&case.path)?, sha256(&out.join("big.bin"))?);
                if a != b {
                    bail!("the received file differs from the original");
                }
            }
            let mbs = case.bytes as f64 / timing.whole.as_secs_f64() / 1e6;
            // The channel's figure leaves its connection's setup out; so
            // does the data phase's.
            let data = timing.data.map_or("?".into(), |d| {
                let mbs = case.bytes as f64 / d.as_secs_f64() / 1e6;
                format!("{mbs:.1} MB/s = {:.2} x the channel", mbs / raw)
            });
            println!(
                "transfer ({}, disk to disk, send + receive processes): {mbs:.1} MB/s ({:.2} s from `receive` start to its exit, with pairing and connecting); transfer/channel = {:.2}; data phase (offer to last file verified and on disk) {data}; peak RSS sender {}, receiver {}",
                case.label,
                timing.whole.as_secs_f64(),
                mbs / raw,
                mib(&sent["peak_rss_kib"]),
                mib(&received["peak_rss_kib"]),
            );
            std::fs::remove_dir_all(&out)?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&root);
    result
}
