//! Running the real `peerlink` binary: processes whose stdout lines arrive
//! on a channel, a `peerlink serve` on 127.0.0.1:0, and scratch folders.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_peerlink");
pub const WAIT: Duration = Duration::from_secs(60);

/// A child process whose stdout lines arrive on a channel.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::from_command(cmd)
    }

    pub fn from_command(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let buf = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut b = buf.lock().unwrap();
                    if b.len() < 1 << 20 {
                        b.push_str(&line);
                        b.push('\n');
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Proc { child, stdin, lines, seen: Vec::new(), stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`; panics after `WAIT`.
    pub fn expect(&mut self, needle: &str) -> String {
        self.expect_line(&format!("a line with {needle:?}"), |l| l.contains(needle))
    }

    pub fn expect_line(&mut self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if cond(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what}; saw {:?}\nstderr: {}", self.seen, self.stderr()),
            }
        }
    }

    /// Waits for a JSON event `name` for which `cond` holds.
    pub fn expect_event(&mut self, name: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let line = self.expect_line(&format!("event {name:?}"), |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == name && cond(&v))
        });
        serde_json::from_str(&line).unwrap()
    }

    /// Every JSON event seen so far named `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == name)
            .collect()
    }

    pub fn type_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the exit code, reading the rest of stdout.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what the reader thread still has.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit; its output: {:?}\nstderr: {}",
                self.seen,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `peerlink serve` on a free loopback port.
pub struct Serve {
    pub proc: Proc,
    pub url: String,
}

pub fn serve() -> Serve {
    // No STUN/TURN: these tests run in parallel, and none needs a relay.
    let mut proc = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--no-turn"]);
    let line = proc.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    Serve { url: format!("ws://{addr}/ws"), proc }
}

/// A scratch folder removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("peerlink-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    pub fn str(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic bytes: `len` of them from `seed`, fast in debug builds.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a large file block by block (each 1 MiB block differs).
pub fn write_big(path: &Path, mib: usize, seed: u64) {
    let block = pattern(1 << 20, seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..mib {
        let mut b = block.clone();
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
        f.write_all(&b).unwrap();
    }
    f.flush().unwrap();
}

pub fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file and folder under `root`: relative path → SHA-256 (or "dir").
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                out.insert(rel, sha256_file(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Common options for `send`/`receive` against `url`, ICE on loopback only.
pub fn net_args(url: &str) -> Vec<String> {
    ["--server", url, "--ice-addr", "127.0.0.1", "--json"].iter().map(|s| s.to_string()).collect()
}
