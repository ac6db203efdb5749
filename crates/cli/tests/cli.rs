//! The real `peerlink` binary: `serve` and two `chat` processes on loopback.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_peerlink");
const WAIT: Duration = Duration::from_secs(20);

/// A child process whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn peerlink");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc { child, stdin, lines, seen: Vec::new() }
    }

    /// Waits for a line containing `needle`; panics after `WAIT`.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; saw {:?}", self.seen),
            }
        }
    }

    fn type_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "process did not exit; its output: {:?}", self.seen);
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

#[test]
fn chat_between_two_processes_and_clean_shutdown() {
    let mut server = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let url = format!("ws://{addr}/ws");

    let chat = |name: &str| {
        Proc::spawn(&["chat", "lobby", "--server", &url, "--name", name, "--ice-addr", "127.0.0.1"])
    };
    let mut ada = chat("ada");
    ada.expect("* joined lobby");
    let mut bob = chat("bob");
    bob.expect("* joined lobby");
    bob.expect("* ada");
    ada.expect("* bob");
    bob.expect("* connected to ada");
    ada.expect("* connected to bob");

    ada.type_line("hello bob, über alles");
    assert_eq!(bob.expect("hello bob"), "ada: hello bob, über alles");
    bob.type_line("hi ada");
    assert_eq!(ada.expect("hi ada"), "bob: hi ada");

    // SIGTERM leaves the room cleanly; the other side is told.
    ada.terminate();
    assert_eq!(ada.wait_exit(), 0);
    bob.expect("* ada left");

    // The server shuts down gracefully on SIGTERM too, and tells its clients.
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
    assert_eq!(bob.wait_exit(), 1, "bob's room closed with the server");
}

#[test]
fn chat_reports_an_unreachable_server() {
    // Port 9 on loopback: nothing listens there.
    let mut p = Proc::spawn(&["chat", "lobby", "--server", "ws://127.0.0.1:9/ws", "--ice-addr", "127.0.0.1"]);
    assert_eq!(p.wait_exit(), 1);
}
