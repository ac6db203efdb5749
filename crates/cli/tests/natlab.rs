//! The NAT lab: real `peerlink ping` processes in network namespaces,
//! connecting through real NATs (iptables), the embedded TURN server and
//! coturn. `scripts/natlab.sh` builds and drives the lab; this test runs the
//! cases against it and prints connect times (p50/p99) and recovery times.
//!
//! Needs root, iproute2, iptables, conntrack, iputils-ping, python3 and coturn
//! (`turnserver`); it fails, never skips, without them. Every case shares the
//! lab's namespace names, so there is exactly one `#[test]` here.
//!
//! Knobs: `NATLAB_RUNS` (runs per connect case, default 10),
//! `NATLAB_LINK_RUNS` (runs of the link-cut case, default 10),
//! `NATLAB_PREFIX` (namespace prefix, default `plabt`, so a lab brought up by
//! hand under the script's default `plab` is left alone).

mod common;

use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Proc};
use serde_json::Value;

const SERVER: &str = "ws://203.0.113.10:8080/ws";
const LISTENING: &str = "listening on 203.0.113.10:8080";
const COTURN_PORT: &str = "3479";
/// The longest a stream may stall in the link-cut case (cable out 5 s).
const MAX_LINK_CUT_STALL_MS: f64 = 6_500.0;
/// Messages each side sends in a connect case, 20 ms apart.
const COUNT: u64 = 20;

#[test]
fn natlab() {
    preflight();
    let lab = Lab::up();
    let secret = format!("natlab-{}-{}", std::process::id(), unix_secs());
    let runs = env_count("NATLAB_RUNS", 10);
    let link_runs = env_count("NATLAB_LINK_RUNS", 10);

    // The lab itself first, so a broken lab is not blamed on peerlink.
    let check = lab.sh(&["check", "fullcone", "symmetric"], Duration::from_secs(120));
    println!("{}", check.lines().last().unwrap_or("natlab.sh check printed nothing"));
    ping_exists(&lab);

    let mut cases = Vec::new();
    let mut link = LinkCase::default();
    // TURN over TLS: a certificate for the server's address, which the
    // peers are told to trust.
    let tls = TlsFiles::new();
    let tls_args =
        ["--turn-tls-listen", "203.0.113.10:5349", "--turn-tls-cert", &tls.cert, "--turn-tls-key", &tls.key];
    let trust = ["--turn-ca", tls.cert.as_str()];

    lab.sh(&["nat", "fullcone"], Duration::from_secs(20));
    let server = lab.serve(&embedded_turn_args(&secret));
    cases.push(lab.connect_case("a", "same segment, no NAT", ["h1", "h2"], "host", runs));
    cases.push(lab.connect_case("b", "both behind full-cone NAT", ["p1", "p2"], "srflx", runs));
    for run in 0..link_runs {
        link.record(run, lab.link_cut_run(run));
    }
    lab.sh(&["nat", "symmetric"], Duration::from_secs(20));
    cases.push(lab.connect_case(
        "c",
        "both behind symmetric NAT, embedded TURN",
        ["p1", "p2"],
        "relay",
        runs,
    ));
    drop(server);

    // p1's network lets no UDP out (DNS aside): p1 reaches the TURN server
    // over TCP, then over TLS when TCP is not offered either.
    lab.sh(&["udpblock", "p1", "on"], Duration::from_secs(20));
    let server = lab.serve(&[embedded_turn_args(&secret), tls_args.to_vec()].concat());
    cases.push(lab.connect_case_via("f", "p1's network blocks UDP: TURN over TCP", "tcp", &trust, runs));
    drop(server);
    let server = lab.serve(&[embedded_turn_args(&secret), tls_args.to_vec(), vec!["--no-turn-tcp"]].concat());
    cases.push(lab.connect_case_via("g", "p1's network blocks UDP: TURN over TLS", "tls", &trust, runs));
    drop(server);
    lab.sh(&["udpblock", "p1", "off"], Duration::from_secs(20));

    lab.sh(&["coturn", "start", &secret, COTURN_PORT], Duration::from_secs(30));
    let server = lab.serve(&coturn_args(&secret));
    cases.push(lab.connect_case("d", "both behind symmetric NAT, coturn", ["p1", "p2"], "relay", runs));
    drop(server);

    cases.sort_by(|x, y| x.id.cmp(y.id));
    let failures = report(&cases, &link);
    assert!(failures.is_empty(), "NAT lab: {} failure(s):\n\n{}", failures.len(), failures.join("\n\n"));
}

// --- the lab ------------------------------------------------------------------

/// The lab under one namespace prefix; torn down on drop, panics included.
struct Lab {
    script: PathBuf,
    prefix: String,
}

impl Lab {
    fn up() -> Lab {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let script = root.join("scripts/natlab.sh").canonicalize().expect("scripts/natlab.sh");
        let prefix = std::env::var("NATLAB_PREFIX").unwrap_or_else(|_| "plabt".into());
        let lab = Lab { script, prefix };
        lab.sh(&["up"], Duration::from_secs(60));
        lab
    }

    /// Runs `natlab.sh ARGS`, bounded by `limit`; panics with its output on
    /// failure, returns its stdout on success.
    fn sh(&self, args: &[&str], limit: Duration) -> String {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script).args(args).env("NATLAB_PREFIX", &self.prefix);
        let (code, out, err) = run_bounded(cmd, limit);
        assert!(code == Some(0), "natlab.sh {} failed ({code:?}):\n{out}\n{err}", args.join(" "));
        out
    }

    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// `peerlink ARGS` in namespace `node`. `ip netns exec` execs, so the
    /// child is peerlink itself and `Proc`'s kill reaches it.
    fn peerlink(&self, node: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node), BIN])
            .args(args)
            // Shown when a run fails (`tail`): what the connection did.
            .env("RUST_LOG", "info,peerlink_peer=debug,str0m=debug,is=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Proc::from_command(cmd)
    }

    fn serve(&self, args: &[&str]) -> Proc {
        let mut server = self.peerlink("srv", args);
        server.expect(LISTENING);
        server
    }

    fn ping(&self, node: &str, room: &str, extra: &[&str]) -> Proc {
        let mut args =
            vec!["ping", room, "--server", SERVER, "--json", "--expect-peers", "1", "--timeout", "30s"];
        args.extend_from_slice(extra);
        self.peerlink(node, &args)
    }

    /// `runs` fresh rooms, each with one peer on each node started together.
    fn connect_case(
        &self,
        id: &'static str,
        title: &'static str,
        nodes: [&str; 2],
        kind: &'static str,
        runs: usize,
    ) -> Case {
        self.connect_runs(id, title, nodes, kind, None, &[], runs)
    }

    /// Like [`Lab::connect_case`] between p1 and p2, where p1's path must be
    /// relayed with p1 reaching its TURN server over `transport`.
    fn connect_case_via(
        &self,
        id: &'static str,
        title: &'static str,
        transport: &'static str,
        extra: &[&str],
        runs: usize,
    ) -> Case {
        self.connect_runs(id, title, ["p1", "p2"], "relay", Some(transport), extra, runs)
    }

    #[allow(clippy::too_many_arguments)]
    fn connect_runs(
        &self,
        id: &'static str,
        title: &'static str,
        nodes: [&str; 2],
        kind: &'static str,
        first_via: Option<&'static str>,
        extra: &[&str],
        runs: usize,
    ) -> Case {
        let mut case = Case { id, title, kind, runs, connect_ms: Vec::new(), failures: Vec::new() };
        let count = COUNT.to_string();
        for run in 0..runs {
            let room = format!("natlab-{id}-{run}-{}", std::process::id());
            let outcome = catch(|| {
                let args = [&["--count", count.as_str(), "--interval", "20ms"][..], extra].concat();
                let mut peers: Vec<Proc> = nodes.iter().map(|n| self.ping(n, &room, &args)).collect();
                let mut errors = Vec::new();
                let mut times = Vec::new();
                let mut passed = Vec::new();
                for (i, (node, peer)) in nodes.iter().zip(peers.iter_mut()).enumerate() {
                    match check_ping(peer, &Expect { kind, count: Some(COUNT), final_path: true }) {
                        Ok(r) => match first_via.filter(|_| i == 0) {
                            Some(via) if r.relay_transport != via => errors.push(format!(
                                "{node}: relayed over {:?}, want {via} ({})",
                                r.relay_transport, r.path
                            )),
                            _ => {
                                times.push(r.connect_ms);
                                passed.push(i);
                            }
                        },
                        Err(e) => errors.push(format!("{node}: {e}")),
                    }
                }
                // The side that passed, too: a failure is often the other
                // side's doing (what it sent, when it left).
                if !errors.is_empty() {
                    for i in passed {
                        errors.push(format!("{} (passed):{}", nodes[i], tail(&peers[i])));
                    }
                }
                if errors.is_empty() { Ok(times) } else { Err(errors.join("\n")) }
            });
            match outcome {
                Ok(times) => case.connect_ms.extend(times),
                Err(e) => case.failures.push(format!("case {id} run {run} (room {room}): {e}")),
            }
        }
        case
    }

    /// Case e: both behind full-cone NAT, streaming; p1's cable is pulled for
    /// 5 s after ~3 s of streaming; both sides must recover without loss.
    fn link_cut_run(&self, run: usize) -> Result<Vec<PingResult>, String> {
        let room = format!("natlab-e-{run}-{}", std::process::id());
        let outcome = catch(|| {
            let stream = ["--stream-for", "20s", "--interval", "20ms"];
            let mut p1 = self.ping("p1", &room, &stream);
            let mut p2 = self.ping("p2", &room, &stream);
            let mut not_connected = Vec::new();
            for (node, peer) in [("p1", &mut p1), ("p2", &mut p2)] {
                if let Err(e) = catch(|| Ok(peer.expect_event("connected", |_| true))) {
                    not_connected.push(format!("{node} did not connect: {e}"));
                }
            }
            if !not_connected.is_empty() {
                for (node, peer) in [("p1", &p1), ("p2", &p2)] {
                    not_connected.push(format!("{node}:{}", tail(peer)));
                }
                return Err(not_connected.join("\n"));
            }
            std::thread::sleep(Duration::from_secs(3));
            self.sh(&["link", "p1", "down"], Duration::from_secs(10));
            std::thread::sleep(Duration::from_secs(5));
            self.sh(&["link", "p1", "up"], Duration::from_secs(10));
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for (node, peer) in [("p1", &mut p1), ("p2", &mut p2)] {
                match check_ping(peer, &Expect { kind: "srflx", count: None, final_path: false }) {
                    Ok(r) => results.push(r),
                    Err(e) => errors.push(format!("{node}: {e}")),
                }
            }
            if !errors.is_empty() {
                return Err(errors.join("\n"));
            }
            if results.iter().all(|r| r.ice_restarts < 1) {
                return Err(format!(
                    "no side reports an ICE restart (ice_restarts {:?})",
                    results.iter().map(|r| r.ice_restarts).collect::<Vec<_>>()
                ));
            }
            if results.iter().all(|r| r.recovered_ms.is_none()) {
                return Err("no side reports recovered_ms".into());
            }
            // The stream stalls while the cable is out, plus the time to see
            // the path back: retransmission timers back off to at most 1 s
            // and start again when the other side is heard (sctp-proto
            // change 7). Before that it stalled 6-7 s.
            if let Some(r) = results.iter().find(|r| r.longest_gap_ms > MAX_LINK_CUT_STALL_MS) {
                return Err(format!(
                    "the stream stalled {:.0} ms for a 5 s cable pull (at most {MAX_LINK_CUT_STALL_MS} ms expected)",
                    r.longest_gap_ms
                ));
            }
            Ok(results)
        });
        // Whatever happened, p1's cable goes back in before the next run.
        self.sh(&["link", "p1", "up"], Duration::from_secs(10));
        outcome.map_err(|e| format!("case e run {run} (room {room}): {e}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script).arg("down").env("NATLAB_PREFIX", &self.prefix);
        let (code, out, err) = run_bounded(cmd, Duration::from_secs(60));
        if code != Some(0) {
            eprintln!("natlab.sh down failed ({code:?}): {out}{err}");
        }
    }
}

fn embedded_turn_args(secret: &str) -> Vec<&str> {
    vec![
        "serve",
        "--listen",
        "203.0.113.10:8080",
        "--turn-listen",
        "203.0.113.10:3478",
        "--turn-external-ip",
        "203.0.113.10",
        "--turn-secret",
        secret,
    ]
}

fn coturn_args(secret: &str) -> Vec<&str> {
    vec![
        "serve",
        "--listen",
        "203.0.113.10:8080",
        "--no-turn",
        "--turn-url",
        "turn:203.0.113.10:3479",
        "--turn-secret",
        secret,
    ]
}

/// A self-signed certificate for 203.0.113.10 and its key, as PEM files
/// (removed on drop).
struct TlsFiles {
    dir: PathBuf,
    cert: String,
    key: String,
}

impl TlsFiles {
    fn new() -> TlsFiles {
        let dir = std::env::temp_dir().join(format!("natlab-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["203.0.113.10".to_string()]).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, key.cert.pem()).unwrap();
        std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
        let s = |p: PathBuf| p.to_str().unwrap().to_string();
        TlsFiles { dir, cert: s(cert_path), key: s(key_path) }
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- one ping process -----------------------------------------------------------

/// What one `peerlink ping` reported about its one peer.
#[derive(Debug)]
struct PingResult {
    connect_ms: f64,
    kind: String,
    /// How this side reaches its TURN server when its end is relayed.
    relay_transport: String,
    path: String,
    ice_restarts: u64,
    recovered_ms: Option<f64>,
    /// Longest wait between two messages of the other side's stream.
    longest_gap_ms: f64,
    states: Vec<String>,
}

/// What a run must show.
struct Expect {
    /// `path.kind` when the connection came up.
    kind: &'static str,
    /// Exactly this many messages each way (`--count`), or any number above 0.
    count: Option<u64>,
    /// Whether the final path must be of `kind` too (not after a link cut,
    /// where ICE may legitimately settle on another pair).
    final_path: bool,
}

/// Waits for `peer` to exit and checks its `result`: exit 0, ok, one peer,
/// everything arrived once and in order, and the path is what `expect` says.
fn check_ping(peer: &mut Proc, expect: &Expect) -> Result<PingResult, String> {
    let code = peer.wait_exit();
    let tail = || tail(peer);
    let Some(result) = peer.events("result").pop() else {
        return Err(format!("exit {code}, no result event{}", tail()));
    };
    let connected = peer.events("connected");
    let p = &result["peers"][0];
    let mut problems = Vec::new();
    if code != 0 {
        problems.push(format!("exit code {code}"));
    }
    if result["ok"] != true {
        problems.push("ok is not true".to_string());
    }
    if result["peers"].as_array().map(Vec::len) != Some(1) {
        problems.push("expected exactly one peer".to_string());
    }
    if !p["failure"].is_null() {
        problems.push(format!("failure: {}", p["failure"]));
    }
    let want = expect.kind;
    let first_kind = connected.first().map(|c| c["path"]["kind"].clone()).unwrap_or(Value::Null);
    if first_kind != want {
        problems.push(format!(
            "connected with path {}, want {want:?}",
            connected.first().map_or(Value::Null, |c| c["path"].clone())
        ));
    }
    if expect.final_path && p["path"]["kind"] != want {
        problems.push(format!("result path {}, want {want:?}", p["path"]));
    }
    if p["in_order"] != true {
        problems.push("in_order is not true".to_string());
    }
    for field in ["duplicates", "missing"] {
        if p[field].as_u64() != Some(0) {
            problems.push(format!("{field} = {}", p[field]));
        }
    }
    if let Some(n) = expect.count {
        for field in ["sent", "received"] {
            if p[field].as_u64() != Some(n) {
                problems.push(format!("{field} = {}, want {n}", p[field]));
            }
        }
    } else if p["received"].as_u64().unwrap_or(0) == 0 {
        problems.push("received nothing".to_string());
    }
    let connect_ms =
        p["connect_ms"].as_f64().or_else(|| connected.first().and_then(|c| c["connect_ms"].as_f64()));
    if connect_ms.is_none() {
        problems.push("no connect_ms".to_string());
    }
    if !problems.is_empty() {
        return Err(format!("{}; result: {result}{}", problems.join(", "), tail()));
    }
    Ok(PingResult {
        connect_ms: connect_ms.unwrap_or_default(),
        kind: p["path"]["kind"].as_str().unwrap_or_default().to_string(),
        relay_transport: p["path"]["relay_transport"].as_str().unwrap_or_default().to_string(),
        path: format!(
            "{} <-> {}",
            p["path"]["local"].as_str().unwrap_or("?"),
            p["path"]["remote"].as_str().unwrap_or("?")
        ),
        ice_restarts: p["ice_restarts"].as_u64().unwrap_or(0),
        recovered_ms: p["recovered_ms"].as_f64(),
        longest_gap_ms: p["longest_gap_ms"].as_f64().unwrap_or_default(),
        states: peer.events("state").iter().filter_map(|s| s["state"].as_str().map(str::to_string)).collect(),
    })
}

/// What a peer printed last: its JSON events, and its log (the peers log
/// at debug level; TURN client housekeeping left out).
fn tail(peer: &Proc) -> String {
    let stderr = peer.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("turn_client")).collect();
    format!(
        "\n  stdout (last 8 lines): {:?}\n  stderr (last 80 lines):\n    {}",
        peer.seen.iter().rev().take(8).rev().collect::<Vec<_>>(),
        lines[lines.len().saturating_sub(80)..].join("\n    ")
    )
}

// --- figures -------------------------------------------------------------------------

struct Case {
    id: &'static str,
    title: &'static str,
    kind: &'static str,
    runs: usize,
    connect_ms: Vec<f64>,
    failures: Vec<String>,
}

#[derive(Default)]
struct LinkCase {
    runs: usize,
    ok: usize,
    /// Per successful run: the largest recovered_ms either side reported.
    recovered_ms: Vec<f64>,
    /// Per successful run: the longest stall of either side's incoming stream.
    gaps: Vec<f64>,
    lines: Vec<String>,
    failures: Vec<String>,
}

impl LinkCase {
    fn record(&mut self, run: usize, outcome: Result<Vec<PingResult>, String>) {
        self.runs += 1;
        match outcome {
            Ok(results) => {
                self.ok += 1;
                let worst = results.iter().filter_map(|r| r.recovered_ms).fold(0.0_f64, f64::max);
                self.recovered_ms.push(worst);
                self.gaps.push(results.iter().map(|r| r.longest_gap_ms).fold(0.0_f64, f64::max));
                let sides: Vec<String> = ["p1", "p2"]
                    .iter()
                    .zip(&results)
                    .map(|(n, r)| {
                        format!(
                            "{n}: recovered_ms {} ice_restarts {} final {} ({}) states {:?}",
                            r.recovered_ms.map_or("-".into(), |v| format!("{v:.0}")),
                            r.ice_restarts,
                            r.kind,
                            r.path,
                            r.states
                        )
                    })
                    .collect();
                self.lines.push(format!("    run {run}: {}", sides.join(" | ")));
            }
            Err(e) => self.failures.push(e),
        }
    }
}

/// Nearest-rank percentile of an ascending slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(cases: &[Case], link: &LinkCase) -> Vec<String> {
    let mut out =
        String::from("\n== NAT lab figures (connect_ms: each side's time to a connected data channel)\n");
    out.push_str(&format!(
        "{:<2} {:<42} {:<6} {:>6} {:>7} {:>8} {:>8} {:>8}\n",
        "", "case", "path", "ok", "samples", "p50 ms", "p99 ms", "max ms"
    ));
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for c in cases {
        let mut v = c.connect_ms.clone();
        v.sort_by(f64::total_cmp);
        let ok = c.runs - c.failures.len();
        out.push_str(&format!(
            "{:<2} {:<42} {:<6} {:>6} {:>7} {:>8.1} {:>8.1} {:>8.1}\n",
            c.id,
            c.title,
            c.kind,
            format!("{ok}/{}", c.runs),
            v.len(),
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN)
        ));
        summary.push(serde_json::json!({
            "case": c.id, "kind": c.kind, "runs": c.runs, "ok": ok,
            "connect_ms_p50": percentile(&v, 50.0), "connect_ms_p99": percentile(&v, 99.0),
        }));
        failures.extend(c.failures.iter().cloned());
    }
    let mut r = link.recovered_ms.clone();
    r.sort_by(f64::total_cmp);
    out.push_str(&format!(
        "e  link cut (full-cone; p1's cable out 5 s)    srflx  {:>6} recovered_ms p50 {:.0}, p99 {:.0}, max {:.0} (worse side per run)\n",
        format!("{}/{}", link.ok, link.runs),
        percentile(&r, 50.0),
        percentile(&r, 99.0),
        r.last().copied().unwrap_or(f64::NAN)
    ));
    let mut g = link.gaps.clone();
    g.sort_by(f64::total_cmp);
    out.push_str(&format!(
        "   the stream stalled p50 {:.0} ms, p99 {:.0} ms: data flowed again {:.0} ms (p50) after the cable went back in\n",
        percentile(&g, 50.0),
        percentile(&g, 99.0),
        percentile(&g, 50.0) - 5000.0,
    ));
    for line in &link.lines {
        out.push_str(line);
        out.push('\n');
    }
    summary.push(serde_json::json!({
        "case": "e", "runs": link.runs, "ok": link.ok,
        "recovered_ms_p50": percentile(&r, 50.0), "recovered_ms_p99": percentile(&r, 99.0),
        "stall_ms_p50": percentile(&g, 50.0), "stall_ms_p99": percentile(&g, 99.0),
    }));
    failures.extend(link.failures.iter().cloned());
    println!("{out}\nNATLAB_SUMMARY {}", Value::Array(summary));
    failures
}

// --- preconditions and plumbing --------------------------------------------------

/// Fails (not skips) when the lab cannot be built here.
fn preflight() {
    let uid =
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    assert_eq!(
        uid.as_deref().unwrap_or("?"),
        "0",
        "the NAT lab needs root (it creates network namespaces, veths and iptables rules)"
    );
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("ping", "iputils-ping"),
        ("python3", "python3"),
        ("turnserver", "coturn"),
    ]
    .into_iter()
    .filter(|(tool, _)| !on_path(tool))
    .map(|(_, package)| package)
    .collect();
    assert!(missing.is_empty(), "the NAT lab needs these packages: apt-get install -y {}", missing.join(" "));
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .any(|dir| dir.join(tool).is_file())
}

/// Fails with a clear message while `peerlink ping` does not exist yet.
fn ping_exists(lab: &Lab) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns("h1"), BIN, "ping", "--help"]);
    let (code, out, err) = run_bounded(cmd, Duration::from_secs(20));
    assert!(code == Some(0), "`peerlink ping --help` failed ({code:?}): is `ping` implemented?\n{out}{err}");
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs `f`, turning a panic (e.g. a `Proc` wait running out) into an error
/// so that the other runs still happen and the figures are still printed.
fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())),
    }
}

/// Runs `cmd` to completion within `limit` (killed after it), returning its
/// exit code and output.
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}
