//! A token bucket: the rate limiter behind bandwidth and request caps.

use std::time::Instant;

/// Holds at most `burst` tokens and refills at `rate` tokens per second.
/// Starts full. Time is passed in, so it is testable without sleeping.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_sec: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket { rate: rate_per_sec as f64, burst, tokens: burst, last: now }
    }

    /// Bandwidth bucket: `bytes_per_sec`, with a burst of one second's worth
    /// but at least 64 KiB so that one large datagram always fits.
    pub(crate) fn bandwidth(bytes_per_sec: u64, now: Instant) -> Self {
        Self::new(bytes_per_sec, bytes_per_sec.max(64 * 1024), now)
    }

    /// Takes `amount` tokens if that many are there; otherwise takes none.
    pub(crate) fn try_take(&mut self, amount: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        let amount = amount as f64;
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }

    /// How long until `amount` tokens are there (zero when they already are).
    #[cfg(test)]
    pub(crate) fn wait_for(&self, amount: u64) -> std::time::Duration {
        let missing = amount as f64 - self.tokens;
        if missing <= 0.0 || self.rate == 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(missing / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 2000, t0);
        assert!(b.try_take(1500, t0));
        assert!(!b.try_take(600, t0), "only 500 left");
        assert!(b.try_take(500, t0));
        assert!(!b.try_take(1, t0));
        assert_eq!(b.wait_for(100), Duration::from_millis(100));
        // 100 ms later: 100 tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert!(!b.try_take(101, t1));
        assert!(b.try_take(100, t1));
        // Never more than the burst, however long it sat idle.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(!b.try_take(2001, t2));
        assert!(b.try_take(2000, t2));
    }

    #[test]
    fn slow_rates_still_refill() {
        // Fractions accumulate: 10 tokens/s checked every 10 ms.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 1, t0);
        assert!(b.try_take(1, t0));
        let mut granted = 0;
        for i in 1..=100 {
            if b.try_take(1, t0 + Duration::from_millis(10 * i)) {
                granted += 1;
            }
        }
        // 100 ms of refill each; float rounding may shift one grant past the end.
        assert!((9..=10).contains(&granted), "granted {granted}");
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1000, 1000, t0);
        assert!(b.try_take(1000, t0));
        assert!(!b.try_take(1, t0 - Duration::from_secs(5)));
        assert!(b.try_take(100, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn bandwidth_burst_fits_a_datagram() {
        let t0 = Instant::now();
        let mut b = TokenBucket::bandwidth(1000, t0);
        assert!(b.try_take(60_000, t0));
    }
}
