//! Pacing new DATA over the round trip (peerlink's change, PATCHES.md §11).
//!
//! Without pacing a sender whose SACKs arrive together sends its window
//! in one burst. Where the SACKs then queue behind that burst (one queue
//! for both directions, links that aggregate), the next SACKs arrive
//! together again: the burst repeats every round, and between bursts the
//! bottleneck idles for a one-way delay. Paced, new DATA leaves at
//! `2 × cwnd / srtt` in bursts of at most `BURST` of that rate, so SACKs mix
//! with data on the path and return spread out. The window stays the
//! limit: the rate lets out a window in half a round trip; on a path of a
//! millisecond or less the burst allowance covers the whole window. Fast
//! recovery is not paced (its retransmissions never were).

use std::time::{Duration, Instant};

/// Most data let out at once: this long at the pacing rate (at least one
/// packet). Two ticks of the usual 1 ms runtime timers, so a wake-up that
/// comes a tick late loses nothing.
const BURST: Duration = Duration::from_millis(2);
/// Rate over `cwnd / srtt`. In slow start the window doubles each round
/// trip and must leave within the first half of it (Linux paces TCP at 2×
/// there and 1.2× after it); after slow start 1.25× held a sender under 1 %
/// random loss to half of what it moved unpaced, 2× did not (PATCHES.md §11).
const GAIN: f64 = 2.0;

#[derive(Debug, Default)]
pub(crate) struct Pacer {
    /// Bytes that may leave now (negative: owed by the last packet).
    tokens: f64,
    stamp: Option<Instant>,
    /// Bytes per second, while pacing (a round trip is known).
    rate: Option<f64>,
    /// Smoothed round trip, full precision (RFC 6298's 1/8 weight).
    srtt: Option<Duration>,
    /// When data held back may leave.
    wake: Option<Instant>,
}

impl Pacer {
    /// A round-trip sample.
    pub(crate) fn on_rtt(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
    }

    /// Tops the bucket up before new data is considered.
    pub(crate) fn refill(&mut self, now: Instant, cwnd: u32, recovering: bool, mtu: u32) {
        self.wake = None;
        self.rate = self
            .srtt
            .filter(|_| !recovering)
            .filter(|s| !s.is_zero())
            .map(|s| GAIN * f64::from(cwnd) / s.as_secs_f64());
        let Some(rate) = self.rate else {
            return;
        };
        let depth = (rate * BURST.as_secs_f64()).max(f64::from(mtu));
        self.tokens = match self.stamp {
            None => depth,
            Some(t) => {
                (self.tokens + rate * now.saturating_duration_since(t).as_secs_f64()).min(depth)
            }
        };
        self.stamp = Some(now);
    }

    /// Whether `bytes` of new data may leave now; if not, `wake` says when.
    pub(crate) fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        if self.tokens >= 0.0 {
            self.tokens -= bytes as f64;
            return true;
        }
        // At least a microsecond: a debt that rounds to no time at all
        // would ask to be woken now, over and over.
        let wait = Duration::from_secs_f64(-self.tokens / rate).max(Duration::from_micros(1));
        self.wake = Some(now + wait);
        false
    }

    /// When the data held back may leave (for `poll_timeout`).
    pub(crate) fn wake(&self) -> Option<Instant> {
        self.wake
    }

    /// The wake-up has come: the next poll sends.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.wake.is_some_and(|w| w <= now) {
            self.wake = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u32 = 1200;

    #[test]
    fn without_a_round_trip_nothing_is_held() {
        let mut p = Pacer::default();
        let now = Instant::now();
        p.refill(now, 100_000, false, MTU);
        for _ in 0..1000 {
            assert!(p.take(1200, now));
        }
        assert_eq!(p.wake(), None);
    }

    #[test]
    fn data_leaves_at_the_rate_in_bursts_of_two_milliseconds() {
        let mut p = Pacer::default();
        p.on_rtt(Duration::from_millis(100));
        // 2 × 1 MB / 100 ms = 20 MB/s: 40 kB per 2 ms.
        let t0 = Instant::now();
        p.refill(t0, 1_000_000, false, MTU);
        let mut burst = 0;
        while p.take(1200, t0) {
            burst += 1200;
        }
        assert!((40_000..=41_200).contains(&burst), "first burst {burst}");
        let wake = p.wake().expect("a wake-up");
        assert!(
            wake > t0 && wake <= t0 + Duration::from_micros(60),
            "{wake:?}"
        );
        // Over the next second, polled every millisecond: the rate.
        let mut sent = 0;
        for ms in 1..=1000 {
            let now = t0 + Duration::from_millis(ms);
            p.on_timeout(now);
            p.refill(now, 1_000_000, false, MTU);
            while p.take(1200, now) {
                sent += 1200;
            }
        }
        assert!(
            (19_900_000..=20_100_000).contains(&sent),
            "sent {sent} in 1 s"
        );
    }

    #[test]
    fn a_window_leaves_in_half_a_round_trip() {
        let mut p = Pacer::default();
        p.on_rtt(Duration::from_millis(50));
        let t0 = Instant::now();
        let mut sent = 0;
        for ms in 0..25 {
            let now = t0 + Duration::from_millis(ms);
            p.refill(now, 100_000, false, MTU);
            while p.take(1200, now) {
                sent += 1200;
            }
        }
        // The window leaves in the first half of the round trip.
        assert!((100_000..=110_000).contains(&sent), "sent {sent} in 25 ms");
    }

    #[test]
    fn a_late_wake_up_loses_no_more_than_the_burst_allows() {
        let mut p = Pacer::default();
        p.on_rtt(Duration::from_millis(20));
        let t0 = Instant::now();
        p.refill(t0, 250_000, false, MTU);
        while p.take(1200, t0) {}
        // 2 × 250 kB / 20 ms = 25 MB/s; ten seconds idle refill only one
        // burst (2 ms of it).
        let later = t0 + Duration::from_secs(10);
        p.refill(later, 250_000, false, MTU);
        let mut burst = 0;
        while p.take(1200, later) {
            burst += 1200;
        }
        assert!((50_000..=51_200).contains(&burst), "burst {burst}");
    }

    #[test]
    fn fast_recovery_is_not_paced() {
        let mut p = Pacer::default();
        p.on_rtt(Duration::from_millis(100));
        let now = Instant::now();
        p.refill(now, 100_000, true, MTU);
        for _ in 0..1000 {
            assert!(p.take(1200, now));
        }
        assert_eq!(p.wake(), None);
    }

    #[test]
    fn the_round_trip_is_smoothed() {
        let mut p = Pacer::default();
        p.on_rtt(Duration::from_millis(80));
        p.on_rtt(Duration::from_millis(160));
        assert_eq!(p.srtt, Some(Duration::from_millis(90)));
    }
}
