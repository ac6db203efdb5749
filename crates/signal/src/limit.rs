//! Token-bucket rate limiting of messages per connection, and telling a
//! flood (a client that keeps sending far above its rate) from a burst.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(per_second.max(1)), burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until one token is available again.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }
}

/// Seconds in a row a connection may have more frames dropped than its rate
/// before it is closed as a flood.
pub(crate) const FLOOD_SECONDS: u32 = 3;

/// Counts the frames the rate limit drops, per one-second window. More drops
/// than the rate itself means the client sends at over twice its rate; doing
/// so for [`FLOOD_SECONDS`] windows in a row is a flood. A quiet second (at
/// or under the rate) starts the count again.
#[derive(Debug)]
pub(crate) struct FloodMeter {
    per_second: u32,
    window_start: Instant,
    dropped: u32,
    /// Completed windows in a row over the rate.
    strikes: u32,
}

impl FloodMeter {
    pub fn new(per_second: u32, now: Instant) -> Self {
        FloodMeter { per_second: per_second.max(1), window_start: now, dropped: 0, strikes: 0 }
    }

    /// A frame was dropped at `now`: whether the connection is now flooding.
    pub fn dropped(&mut self, now: Instant) -> bool {
        let windows = now.saturating_duration_since(self.window_start).as_secs();
        if windows > 0 {
            self.strikes = if self.dropped > self.per_second { self.strikes + 1 } else { 0 };
            if windows > 1 {
                // A whole second went by without a drop.
                self.strikes = 0;
            }
            self.window_start += Duration::from_secs(windows);
            self.dropped = 0;
        }
        self.dropped += 1;
        self.strikes + 1 >= FLOOD_SECONDS && self.dropped > self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` drops spread over the second starting at `t`.
    fn second(m: &mut FloodMeter, t: Instant, n: u32) -> bool {
        (0..n).any(|i| m.dropped(t + Duration::from_millis(u64::from(i) * 999 / u64::from(n.max(1)))))
    }

    #[test]
    fn a_flood_is_three_seconds_over_twice_the_rate_and_a_burst_is_not() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        // A burst: one second far over, then calm.
        let mut m = FloodMeter::new(50, t0);
        assert!(!second(&mut m, s(0), 3000));
        assert!(!second(&mut m, s(1), 10));
        assert!(!second(&mut m, s(2), 3000));
        assert!(!second(&mut m, s(3), 3000));
        // The third second in a row over the rate.
        assert!(second(&mut m, s(4), 3000));

        // Just at the rate every second is never a flood.
        let mut m = FloodMeter::new(50, t0);
        assert!(!(0..10).any(|n| second(&mut m, s(n), 50)));

        // A silent second in between starts the count again.
        let mut m = FloodMeter::new(50, t0);
        assert!(!second(&mut m, s(0), 100));
        assert!(!second(&mut m, s(1), 100));
        assert!(!second(&mut m, s(3), 100));
        assert!(!second(&mut m, s(4), 100));
        assert!(second(&mut m, s(5), 100));
    }

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "burst allowance");
        assert!(!b.take(t0));
        // 1 s later: 10 more tokens, capped at the burst of 5.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..8).filter(|_| b.take(t1)).count(), 5);
        // 100 ms later: one token.
        let t2 = t1 + Duration::from_millis(100);
        assert!(b.take(t2));
        assert!(!b.take(t2));
        assert!(b.retry_after() > Duration::ZERO);
    }
}
