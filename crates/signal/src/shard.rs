//! Where WebSocket connections run: a few single-threaded runtimes, each on
//! a thread of its own, a connection handed to them in turn at its upgrade.
//!
//! On the work-stealing runtime every wake-up may unpark another worker to
//! look for work, and a connection's task may move between threads. A
//! relayed message is a read on one socket and a write to another (written
//! straight to the addressee's socket: no task of the addressee wakes), so
//! that machinery costs: one message at a time at 2,000 connections on two
//! cores, 13.1 µs of server CPU per message on the two-worker runtime, 7.7-8.7
//! µs on one thread of its own (15.7 µs on two: the kernel's half of each
//! message, a receive and a send, wants the other core). Threads that each
//! own their connections keep that cost; an idle one sleeps in its poller.
//! HTTP, the upgrade itself, TURN and the backplane stay on the caller's
//! runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The threads, as long as the server lives: dropped, each ends (and drops
/// whatever connections still run on it).
#[derive(Debug)]
pub(crate) struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Shards {
    /// `n` threads; none (connections run on the caller's runtime) for 0 or
    /// when a thread cannot be started.
    pub fn start(n: usize) -> Shards {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for i in 0..n {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { break };
            let handle = rt.handle().clone();
            let (tx, rx) = oneshot::channel::<()>();
            let started = std::thread::Builder::new().name(format!("peerlink-ws-{i}")).spawn(move || {
                // Runs the connections spawned onto it until told to stop.
                let _ = rt.block_on(rx);
            });
            if let Err(e) = started {
                tracing::warn!("WebSocket thread {i}: {e}; connections run on the main runtime");
                break;
            }
            handles.push(handle);
            stop.push(tx);
        }
        Shards { handles, next: AtomicUsize::new(0), _stop: stop }
    }

    /// Runs `f` on the next thread (or here, without threads). `f` is
    /// called there, so what it builds (a socket's registration, timers)
    /// belongs to that thread's runtime.
    pub fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            tokio::spawn(async move { f().await });
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(async move { f().await });
    }
}
