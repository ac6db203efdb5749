//! A WAN in the driver's datagram path, for benchmarks and tests: every
//! datagram this peer sends is delayed (and some are dropped) before it
//! reaches the socket, so one binary reproduces figures at 10-100 ms round
//! trips without a kernel emulator. Give both peers half the round trip.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the emulated network does to the datagrams a peer sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetEm {
    /// Added to every datagram: half the round trip when both peers
    /// emulate.
    pub one_way_delay: Duration,
    /// Share of datagrams dropped at random, 0.0 to 1.0.
    pub loss: f64,
    /// Up to this much more delay, uniformly at random per datagram (which
    /// reorders datagrams, as real jitter does).
    pub jitter: Duration,
    /// A bottleneck of this many bytes per second (`None`: none): datagrams
    /// leave one after another at that rate, and a queue of more than
    /// `queue_delay` worth of them drops the newest (a tail-drop router).
    pub rate: Option<u64>,
    /// Longest queue at the bottleneck, as time to drain it.
    pub queue_delay: Duration,
    /// Seed of the loss and jitter pattern.
    pub seed: u64,
}

impl NetEm {
    /// A link adding `one_way_delay` and nothing else.
    pub fn delay(one_way_delay: Duration) -> Self {
        NetEm {
            one_way_delay,
            loss: 0.0,
            jitter: Duration::ZERO,
            rate: None,
            queue_delay: Duration::from_millis(100),
            seed: 1,
        }
    }
}

/// Datagrams waiting for their time, beyond which more are dropped (a
/// router's queue): 16 MiB at 1,200 bytes each is far more than any window.
const MAX_HELD: usize = 16 * 1024;

/// A held datagram: when it leaves, in which order, from which socket, to
/// where, what.
type Held = Reverse<(Instant, u64, usize, SocketAddr, Vec<u8>)>;

/// Datagrams in flight on the emulated link.
pub(crate) struct Link {
    em: NetEm,
    rng: StdRng,
    seq: u64,
    /// When the bottleneck is free again.
    busy_until: Option<Instant>,
    held: BinaryHeap<Held>,
}

impl Link {
    pub fn new(em: NetEm) -> Self {
        Link { em, rng: StdRng::seed_from_u64(em.seed), seq: 0, busy_until: None, held: BinaryHeap::new() }
    }

    /// A datagram to send from socket `socket`: held for the delay (and its
    /// turn at the bottleneck), or lost.
    pub fn send(&mut self, now: Instant, socket: usize, to: SocketAddr, data: Vec<u8>) {
        if self.held.len() >= MAX_HELD || (self.em.loss > 0.0 && self.rng.random_bool(self.em.loss.min(1.0)))
        {
            return;
        }
        let mut leaves = now;
        if let Some(rate) = self.em.rate {
            let start = self.busy_until.map_or(now, |b| b.max(now));
            if start > now + self.em.queue_delay {
                return; // the bottleneck's queue is full
            }
            let done = start + Duration::from_secs_f64(data.len() as f64 / rate.max(1) as f64);
            self.busy_until = Some(done);
            leaves = done;
        }
        let jitter = if self.em.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.em.jitter.mul_f64(self.rng.random::<f64>())
        };
        self.seq += 1;
        self.held.push(Reverse((leaves + self.em.one_way_delay + jitter, self.seq, socket, to, data)));
    }

    /// When the next held datagram is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.peek().map(|Reverse((at, ..))| *at)
    }

    /// The next datagram due at `now`, in the order they were sent.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, SocketAddr, Vec<u8>)> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse((_, _, socket, to, data)) = self.held.pop()?;
        Some((socket, to, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_leave_after_the_delay_in_order_and_some_are_lost() {
        let t0 = Instant::now();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut link = Link::new(NetEm::delay(Duration::from_millis(25)));
        for i in 0..5u8 {
            link.send(t0 + Duration::from_millis(u64::from(i)), 0, to, vec![i]);
        }
        assert_eq!(link.next_due(), Some(t0 + Duration::from_millis(25)));
        assert!(link.pop_due(t0 + Duration::from_millis(24)).is_none());
        let due: Vec<u8> = std::iter::from_fn(|| link.pop_due(t0 + Duration::from_millis(27)))
            .map(|(_, _, d)| d[0])
            .collect();
        assert_eq!(due, [0, 1, 2]);

        let mut lossy = Link::new(NetEm { loss: 0.1, seed: 7, ..NetEm::delay(Duration::ZERO) });
        for _ in 0..10_000 {
            lossy.send(t0, 0, to, vec![0]);
        }
        let kept = lossy.held.len();
        assert!((8_800..9_200).contains(&kept), "{kept} of 10,000 kept at 10 % loss");
    }

    #[test]
    fn a_bottleneck_spaces_datagrams_and_drops_past_its_queue() {
        let t0 = Instant::now();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // 1 MB/s, a 10 ms queue: 1,000-byte datagrams leave 1 ms apart, and
        // a burst of 50 keeps the first 11 or so.
        let em = NetEm {
            rate: Some(1_000_000),
            queue_delay: Duration::from_millis(10),
            ..NetEm::delay(Duration::from_millis(5))
        };
        let mut link = Link::new(em);
        for _ in 0..50 {
            link.send(t0, 0, to, vec![0; 1000]);
        }
        let kept = link.held.len();
        assert!((10..=12).contains(&kept), "{kept} kept");
        assert_eq!(link.next_due(), Some(t0 + Duration::from_millis(6)));
        let mut at = Vec::new();
        while let Some(due) = link.next_due() {
            at.push(due.duration_since(t0).as_millis());
            link.pop_due(due);
        }
        assert_eq!(at[..3], [6, 7, 8]);
    }
}
