//! What people see: the human output of the main commands, compared with
//! reviewed snapshots in `tests/snapshots/` (insta). Codes, times, sizes
//! that vary and scratch paths are replaced by placeholders.
//!
//! After an intended change: `cargo insta review` (or run with
//! `INSTA_UPDATE=always` and read the diff) and commit the snapshots.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Proc, Scratch, WAIT, serve};

/// Placeholders for what changes from run to run.
fn settings(scratch: &Scratch) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(&regex_escape(&scratch.0.to_string_lossy()), "[DIR]");
    s.add_filter(r"\b\d{1,3}-[a-z]+-[a-z]+-[a-z]+\b", "[CODE]");
    s.add_filter(r"in \d+\.\d s", "in [T] s");
    s.add_filter(r"ws://127\.0\.0\.1:\d+/ws", "[SERVER]");
    s.add_filter(r"http://127\.0\.0\.1:\d+", "[WEB]");
    s.set_prepend_module_to_snapshot(false);
    s
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if "\\.+*?()|[]{}^$".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
}

fn human(url: &str) -> Vec<String> {
    ["--server", url, "--ice-addr", "127.0.0.1"].iter().map(|s| s.to_string()).collect()
}

/// Waits until `p`'s stderr holds `needle`; returns the line.
fn stderr_line(p: &Proc, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(line) = p.stderr().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no {needle:?} in stderr: {}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn code_of(sender: &Proc) -> String {
    stderr_line(sender, "Code: ").trim_start_matches("Code: ").trim().to_string()
}

#[test]
fn a_transfer_as_people_see_it() {
    let server = serve();
    let dir = Scratch::new("snap-ok");
    std::fs::create_dir_all(dir.path("photos/trip")).unwrap();
    std::fs::write(dir.path("photos/a.txt"), b"hello").unwrap();
    std::fs::write(dir.path("photos/trip/b.txt"), b"bonjour").unwrap();
    let mut args = vec!["send".to_string()];
    args.extend(human(&server.url));
    args.push(dir.str("photos"));
    let mut sender = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let code = code_of(&sender);
    let out = dir.str("in");
    let mut args = vec!["receive".to_string()];
    args.extend(human(&server.url));
    args.extend(["--yes".into(), "--out".into(), out, code]);
    let mut receiver = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(receiver.wait_exit(), 0, "{}", receiver.stderr());
    assert_eq!(sender.wait_exit(), 0, "{}", sender.stderr());
    settings(&dir).bind(|| {
        insta::assert_snapshot!("send", sender.stderr());
        insta::assert_snapshot!("receive", receiver.stderr());
    });
}

#[test]
fn a_wrong_code_as_people_see_it() {
    let server = serve();
    let dir = Scratch::new("snap-wrong");
    std::fs::write(dir.path("a.txt"), b"hello").unwrap();
    let mut args = vec!["send".to_string()];
    args.extend(human(&server.url));
    args.push(dir.str("a.txt"));
    let mut sender = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let code = code_of(&sender);
    let nameplate = code.split('-').next().unwrap();
    let wrong = format!("{nameplate}-yoyo-zebra-acid");
    assert_ne!(wrong, code);
    let mut args = vec!["receive".to_string()];
    args.extend(human(&server.url));
    args.extend(["--yes".into(), "--out".into(), dir.str("in"), wrong]);
    let mut receiver = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(receiver.wait_exit(), 4);
    assert_eq!(sender.wait_exit(), 4);
    settings(&dir).bind(|| {
        insta::assert_snapshot!("wrong_code_send", sender.stderr());
        insta::assert_snapshot!("wrong_code_receive", receiver.stderr());
    });
}

#[test]
fn mistyped_codes_and_help_as_people_see_them() {
    let dir = Scratch::new("snap-typo");
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        format!(
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    settings(&dir).bind(|| {
        insta::assert_snapshot!(
            "typo",
            run(&["receive", "--server", "ws://127.0.0.1:9/ws", "7-lanturn-zebra-acid"])
        );
        insta::assert_snapshot!(
            "no_number",
            run(&["receive", "--server", "ws://127.0.0.1:9/ws", "lantern-zebra-acid"])
        );
        insta::assert_snapshot!("help", run(&["--help"]));
    });
}
