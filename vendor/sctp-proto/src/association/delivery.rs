//! A cap on the data in flight from the path's measured delivery rate and
//! round-trip time (peerlink's change, PATCHES.md §4).
//!
//! RFC 4960's congestion control grows the window until a packet is lost.
//! When the bottleneck holds a deep queue (a receiving socket buffer, a
//! router with large buffers) nothing is lost for a long time: the window
//! grows to the peer's receive window and everything written later, on
//! every stream, waits behind that queue. A small message sent beside a
//! bulk transfer then takes tens of milliseconds on loopback.
//!
//! The model here measures what the path delivers: the most bytes
//! acknowledged per round trip over the last few round trips (`bw`) and the
//! smallest round-trip time seen in the last ten seconds (`min_rtt`), as BBR
//! does. Data in flight is capped at `bw × (2 × min_rtt + target)`: twice
//! the bandwidth-delay product (room for acknowledgements that arrive in
//! bursts) plus `target` of queueing. While the queue stays below that the
//! cap does not bind and each round trip may deliver more than the last, so
//! the estimate, and the cap, keep growing with the window; once the round
//! trip grows past `2 × min_rtt + target` the cap holds the queue there.
//!
//! Where SACKs are held back and then arrive together (a link whose one
//! queue carries both directions, Wi-Fi, a receiver that acknowledges in
//! batches) round trips grow by the hold though no data queue stands, and
//! the link idles during it unless the window covers it: the model measures
//! that aggregation as BBR does (`extra_acked`), adds it to the cap and
//! allows for it before calling a queue standing.
//!
//! The same estimate makes loss recovery keep what the path has shown it
//! can carry: after a fast retransmit the window is not cut below one
//! bandwidth-delay product, so random loss that is not congestion does not
//! halve the rate each time (a timeout still resets the window).

use alloc::collections::VecDeque;
use core::time::Duration;
use std::time::Instant;

use crate::util::sna32gte;

/// Round trips over which the delivery rate's maximum is kept.
const BW_ROUNDS: usize = 10;
/// How long a minimum round-trip time is kept before it is measured again.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

/// One round trip's measurement in progress.
#[derive(Debug, Clone, Copy)]
struct Round {
    start: Instant,
    delivered: u64,
    /// The round ends when this TSN (the next one sent after the round
    /// began) is cumulatively acknowledged.
    end_tsn: u32,
    /// Whether data waited for the window during the round: if never, the
    /// round measured the application's rate, not the path's.
    limited: bool,
}

#[derive(Debug)]
pub(crate) struct DeliveryModel {
    /// Queueing allowed on top of twice the bandwidth-delay product; `None`
    /// turns the cap off (RFC 4960 behaviour).
    target: Option<Duration>,
    /// Bytes acknowledged for the first time, in total.
    delivered: u64,
    round: Option<Round>,
    /// Delivery rate of each recent round, bytes per second, and whether
    /// the window limited it.
    rates: VecDeque<(f64, bool)>,
    min_rtt: Option<Duration>,
    /// When `min_rtt` was last lowered or renewed.
    min_rtt_stamp: Option<Instant>,
    /// The smallest round trip since `min_rtt_stamp`.
    window_min: Option<Duration>,
    /// The smallest round trip reported by a SACK of the round in progress.
    round_min_rtt: Option<Duration>,
    /// The last round ended with even its smallest round trip above
    /// `2 × min_rtt + target`: a standing queue, not a burst's tail.
    standing_queue: bool,
    /// The acknowledgement epoch in progress: since when SACKs have
    /// acknowledged more than the rate estimate explains, and how much.
    ack_epoch: Option<(Instant, u64)>,
    /// The most each recent round's SACKs acknowledged beyond the rate
    /// estimate (bytes), newest last: see `extra_acked`.
    extra_acked: VecDeque<u64>,
    /// The last round found room: the window limited it, it delivered at
    /// least the best rate of the rounds before, and even its smallest
    /// round trip showed no queue. See `probing`.
    room: bool,
}

impl DeliveryModel {
    pub(crate) fn new(target: Option<Duration>) -> Self {
        DeliveryModel {
            target,
            delivered: 0,
            round: None,
            rates: VecDeque::with_capacity(BW_ROUNDS),
            min_rtt: None,
            min_rtt_stamp: None,
            window_min: None,
            round_min_rtt: None,
            standing_queue: false,
            ack_epoch: None,
            extra_acked: VecDeque::with_capacity(BW_ROUNDS),
            room: false,
        }
    }

    /// A round-trip time measured on a chunk sent once.
    pub(crate) fn on_rtt(&mut self, rtt: Duration, now: Instant) {
        if self.target.is_none() {
            return;
        }
        self.window_min = Some(self.window_min.map_or(rtt, |m| m.min(rtt)));
        let stale = self
            .min_rtt_stamp
            .is_none_or(|at| now.saturating_duration_since(at) >= MIN_RTT_WINDOW);
        if self.min_rtt.is_none_or(|m| rtt <= m) {
            self.min_rtt = Some(rtt);
            self.min_rtt_stamp = Some(now);
            self.window_min = None;
        } else if stale {
            // No round trip as short for ten seconds: the path changed.
            self.min_rtt = self.window_min.take();
            self.min_rtt_stamp = Some(now);
        }
    }

    /// A SACK acknowledged `bytes` for the first time and left the
    /// cumulative ack at `cum_tsn`; `next_tsn` is the next TSN to be sent;
    /// `waiting`: data is queued that the window has not let out; `rtt`:
    /// the round trip of the newest chunk it acknowledged that was sent
    /// once.
    pub(crate) fn on_sack(
        &mut self,
        bytes: u64,
        cum_tsn: u32,
        next_tsn: u32,
        waiting: bool,
        rtt: Option<Duration>,
        now: Instant,
    ) {
        if self.target.is_none() {
            return;
        }
        if let Some(rtt) = rtt {
            self.on_rtt(rtt, now);
            self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        self.delivered += bytes;
        self.aggregate(bytes, now);
        let fresh = Round {
            start: now,
            delivered: self.delivered,
            end_tsn: next_tsn,
            limited: waiting,
        };
        let Some(round) = &mut self.round else {
            self.round = Some(fresh);
            return;
        };
        round.limited |= waiting;
        if !sna32gte(cum_tsn, round.end_tsn) {
            return;
        }
        let round = *round;
        self.round = Some(fresh);
        // A sender that does not pace sends in bursts, and the last chunks
        // of a burst wait behind the rest: single round trips spike while
        // the link still idles between bursts. Only a round whose every
        // round trip was long shows a queue that stands.
        let round_min = self.round_min_rtt.take();
        self.standing_queue = match (round_min, self.min_rtt, self.target) {
            (Some(round_min), Some(min), Some(target)) => {
                round_min > min * 2 + target + self.aggregation_delay()
            }
            _ => false,
        };
        if self.extra_acked.len() == BW_ROUNDS {
            self.extra_acked.pop_front();
        }
        self.extra_acked.push_back(0);
        log::trace!(
            "round: {} bytes in {:?}, smallest rtt {:?} (min_rtt {:?}), limited {}, extra acked {}, standing queue {}",
            self.delivered - round.delivered,
            now.saturating_duration_since(round.start),
            round_min,
            self.min_rtt,
            round.limited,
            self.extra_acked(),
            self.standing_queue
        );
        let elapsed = now.saturating_duration_since(round.start).as_secs_f64();
        if elapsed <= 0.0 {
            return;
        }
        let rate = (self.delivered - round.delivered) as f64 / elapsed;
        self.room = round.limited
            && self.bw().is_some_and(|bw| rate >= bw)
            && match (round_min, self.min_rtt) {
                (Some(round_min), Some(min)) => {
                    round_min <= min + min / 8 + self.aggregation_delay()
                }
                _ => false,
            };
        // A round the application limited says the path carries at least
        // that much, not at most: it counts only if it raises the estimate
        // (as in BBR).
        if !round.limited && self.bw().is_some_and(|bw| rate < bw) {
            return;
        }
        if self.rates.len() == BW_ROUNDS {
            self.rates.pop_front();
        }
        self.rates.push_back((rate, round.limited));
    }

    /// The delivery rate estimate, bytes per second, once a round limited
    /// by the window measured it: before that (an application that never
    /// fills the window) there is no queue to keep short.
    fn bw(&self) -> Option<f64> {
        if !self.rates.iter().any(|(_, limited)| *limited) {
            return None;
        }
        self.rates.iter().map(|(rate, _)| *rate).reduce(f64::max)
    }

    /// Acknowledgement aggregation, as BBR measures it: SACKs that were
    /// held up somewhere (behind data on a link that carries both
    /// directions in one queue, a receiver that acknowledges in batches)
    /// arrive together after a gap. During the gap the sender, its window
    /// full, sends nothing; the link idles unless the window also covers
    /// the gap. An epoch starts when SACKs fall behind the rate estimate;
    /// what they acknowledge beyond `bw × elapsed` since then is the data
    /// the window must hold on top of the bandwidth-delay product. The
    /// most of it in each of the last rounds is kept, at most one
    /// bandwidth-delay product (in slow start every SACK outruns the
    /// estimate of the round before, as in BBR's startup: the window that
    /// ends slow start keeps that room for ten rounds).
    fn aggregate(&mut self, bytes: u64, now: Instant) {
        let Some(bw) = self.bw() else {
            return;
        };
        let (start, acked) = self.ack_epoch.get_or_insert((now, 0));
        let expected = bw * now.saturating_duration_since(*start).as_secs_f64();
        if *acked as f64 <= expected {
            // Acknowledgements at or below the rate: a new epoch.
            (*start, *acked) = (now, 0);
        }
        *acked += bytes;
        let expected = bw * now.saturating_duration_since(*start).as_secs_f64();
        let extra = (*acked as f64 - expected).max(0.0) as u64;
        let extra = extra.min(self.bdp().map_or(0, u64::from));
        match self.extra_acked.back_mut() {
            Some(max) => *max = (*max).max(extra),
            None => self.extra_acked.push_back(extra),
        }
    }

    /// The most acknowledged beyond the rate in any recent round, bytes.
    fn extra_acked(&self) -> u64 {
        self.extra_acked.iter().copied().max().unwrap_or(0)
    }

    /// How long the path holds acknowledgements back (`extra_acked` at the
    /// estimated rate): that much longer a round trip is not a queue the
    /// window built.
    fn aggregation_delay(&self) -> Duration {
        match self.bw() {
            Some(bw) if bw > 0.0 => Duration::from_secs_f64(self.extra_acked() as f64 / bw),
            _ => Duration::ZERO,
        }
    }

    /// One bandwidth-delay product, in bytes, once both are measured.
    pub(crate) fn bdp(&self) -> Option<u32> {
        let (bw, rtt) = (self.bw()?, self.min_rtt?);
        Some((bw * rtt.as_secs_f64()).min(u32::MAX as f64) as u32)
    }

    /// Whether the window may grow faster than by one MTU per round trip:
    /// the last round, limited by the window, delivered as much as any
    /// recent round and its round trips stayed within an eighth of the
    /// minimum. A larger window keeps delivering more and builds no queue,
    /// so the path has room the window has not found (after losses that
    /// were not congestion, random loss); where the rate stops following
    /// the window, or a queue forms, growth is Reno's again.
    pub(crate) fn probing(&self) -> bool {
        // `room` is only ever set with the cap on (`on_sack` returns first
        // without a target).
        self.room
    }

    /// Whether the round that just ended showed a standing queue longer
    /// than the cap allows (every round trip in it above `2 × min_rtt +
    /// target`); answers once per such round.
    pub(crate) fn take_standing_queue(&mut self) -> bool {
        core::mem::take(&mut self.standing_queue)
    }

    /// The delivery rate at `now`: the recent rounds' maximum, raised by the
    /// round in progress once that has run for a minimum round trip. In
    /// slow start the window doubles every round, so when a queue first
    /// shows, the last finished round measured half (or less) of what the
    /// path carries; the round under way, during which the queue built,
    /// measures the path itself.
    fn bw_at(&self, now: Instant) -> Option<f64> {
        let bw = self.bw()?;
        let current = self.round.and_then(|round| {
            let elapsed = now.saturating_duration_since(round.start);
            (elapsed >= self.min_rtt? && !elapsed.is_zero())
                .then(|| (self.delivered - round.delivered) as f64 / elapsed.as_secs_f64())
        });
        Some(current.map_or(bw, |rate| rate.max(bw)))
    }

    /// The most data that should be in flight at `now`, once the path is
    /// measured; never below `floor`.
    pub(crate) fn cap(&self, floor: u32, now: Instant) -> Option<u32> {
        let target = self.target?;
        let (bw, rtt) = (self.bw_at(now)?, self.min_rtt?);
        let allowed =
            bw * (2.0 * rtt.as_secs_f64() + target.as_secs_f64()) + self.extra_acked() as f64;
        Some((allowed.min(u32::MAX as f64) as u32).max(floor))
    }
}

/// Fewest RTT samples in a round before HyStart++ compares it with the last.
const HYSTART_SAMPLES: u32 = 8;
const HYSTART_MIN_THRESH: Duration = Duration::from_millis(4);
const HYSTART_MAX_THRESH: Duration = Duration::from_millis(16);
/// Rounds of conservative slow start before congestion avoidance.
const CSS_ROUNDS: u32 = 5;
/// In conservative slow start the window grows by a quarter of what is acknowledged.
pub(crate) const CSS_GROWTH_DIVISOR: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    SlowStart,
    /// Conservative slow start: the round's minimum RTT rose to `floor` or
    /// above (the last round's minimum plus the threshold), and `rounds`
    /// rounds are left before the window stops growing exponentially.
    /// `fresh` while the round in which it started is under way.
    Conservative {
        floor: Duration,
        rounds: u32,
        fresh: bool,
    },
}

/// Slow start that ends when the round trip starts growing, before the
/// bottleneck's queue overflows (HyStart++, RFC 9406; peerlink's change,
/// PATCHES.md §5).
///
/// Slow start doubles the window every round trip until a packet is lost.
/// Behind a bottleneck with a finite queue, the loss comes a round trip
/// after the queue overflowed, with the window twice too large, and a burst
/// of losses follows that sctp-proto repairs one hole per round trip. Here
/// each round's smallest RTT is compared with the previous round's: when it
/// grew by an eighth (4 to 16 ms), the window grows a quarter as fast for
/// five rounds (conservative slow start) and then by congestion avoidance;
/// if a whole round's RTT falls back meanwhile, the rise was noise and slow
/// start goes on. Once the RTT has risen, slow start also ends at the end
/// of a round whose delivery rate did not grow with the window: behind a
/// queue of one bandwidth-delay product, the rise shows only once the
/// window is past the product, and one more doubling overflows the queue.
#[derive(Debug)]
pub(crate) struct SlowStartExit {
    phase: Phase,
    /// The round ends when this TSN is cumulatively acknowledged.
    round_end: Option<u32>,
    last_round_min: Option<Duration>,
    round_min: Option<Duration>,
    samples: u32,
    /// When the round began (the SACK that ended the last one).
    round_start: Option<Instant>,
    /// Bytes acknowledged in the round so far.
    round_bytes: u64,
    /// A SACK of the round was not seen here (nothing was queued, or fast
    /// recovery): its delivery rate is not measured.
    round_unseen: bool,
    /// Bytes per second acknowledged in the last round that ran long
    /// enough to measure.
    last_rate: Option<f64>,
    /// A round's round trip has risen past the threshold in this slow
    /// start, even if it fell back since: the window has reached the
    /// path's bottleneck at least once.
    rose: bool,
}

/// What the window should do after a SACK in slow start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Growth {
    /// Grow by what was acknowledged divided by this.
    By(u32),
    /// Slow start is over: the window as it stands is the threshold.
    Exit,
}

impl SlowStartExit {
    pub(crate) fn new() -> Self {
        SlowStartExit {
            phase: Phase::SlowStart,
            round_end: None,
            last_round_min: None,
            round_min: None,
            samples: 0,
            round_start: None,
            round_bytes: 0,
            round_unseen: false,
            last_rate: None,
            rose: false,
        }
    }

    /// Slow start begins again (after a timeout).
    pub(crate) fn restart(&mut self) {
        *self = SlowStartExit::new();
    }

    /// A SACK in slow start that `on_sack` does not see (the window did not
    /// limit the sender, or fast recovery): the round's delivery rate says
    /// nothing about the path.
    pub(crate) fn unseen(&mut self) {
        self.round_unseen = true;
    }

    /// A SACK in slow start left the cumulative ack at `cum_tsn`,
    /// acknowledging `acked` bytes; `next_tsn` is the next TSN to be sent;
    /// `rtt` is the round trip of the newest chunk it acknowledged that was
    /// sent once.
    pub(crate) fn on_sack(
        &mut self,
        cum_tsn: u32,
        next_tsn: u32,
        rtt: Option<Duration>,
        acked: u32,
        now: Instant,
    ) -> Growth {
        self.round_bytes += u64::from(acked);
        if self.round_end.is_none_or(|end| sna32gte(cum_tsn, end)) {
            self.round_end = Some(next_tsn);
            // The round ran long enough to judge it.
            let full = self.samples >= HYSTART_SAMPLES;
            // The delivery rate of the round that ended. Once the round
            // trip has risen, a round that did not deliver more than the
            // one before, though the window grew by a quarter (conservative
            // slow start), or by less than a quarter more though it doubled
            // (slow start), found the pipe full: the window only fills the
            // queue from here (BBR's full-pipe test, over one round, and
            // only after the round trip said so).
            let rate = self.round_start.and_then(|start| {
                let secs = now.saturating_duration_since(start).as_secs_f64();
                (secs > 0.0 && full && !self.round_unseen).then(|| self.round_bytes as f64 / secs)
            });
            self.round_start = Some(now);
            self.round_bytes = 0;
            self.round_unseen = false;
            if let Some(rate) = rate {
                let growth = match self.phase {
                    Phase::SlowStart => 1.25,
                    Phase::Conservative { .. } => 1.0,
                };
                let plateau = self.last_rate.is_some_and(|last| rate <= last * growth);
                self.last_rate = Some(rate);
                if self.rose && plateau {
                    return Growth::Exit;
                }
            }
            if let Phase::Conservative {
                floor,
                rounds,
                fresh,
            } = self.phase
            {
                // A whole round back below the rise that started it: the
                // rise was noise. (RFC 9406 compares each sample with the
                // minimum at entry; with paced rounds the first samples of
                // a round behind a queue are its lowest, and a queue that
                // shrinks a little is still a queue.) The round in which
                // the rise was seen is not judged again.
                if !fresh && full && self.round_min.is_some_and(|m| m < floor) {
                    self.phase = Phase::SlowStart;
                } else if rounds <= 1 {
                    return Growth::Exit;
                } else {
                    self.phase = Phase::Conservative {
                        floor,
                        rounds: rounds - 1,
                        fresh: false,
                    };
                }
            }
            if full || self.last_round_min.is_none() {
                self.last_round_min = self.round_min;
            }
            self.round_min = None;
            self.samples = 0;
        }
        if let Some(rtt) = rtt {
            self.round_min = Some(self.round_min.map_or(rtt, |m| m.min(rtt)));
            self.samples += 1;
        }
        if self.samples >= HYSTART_SAMPLES && self.phase == Phase::SlowStart {
            if let (Some(min), Some(last)) = (self.round_min, self.last_round_min) {
                let thresh = (last / 8).clamp(HYSTART_MIN_THRESH, HYSTART_MAX_THRESH);
                let floor = last + thresh;
                if min >= floor {
                    self.rose = true;
                    self.phase = Phase::Conservative {
                        floor,
                        rounds: CSS_ROUNDS,
                        fresh: true,
                    };
                }
            }
        }
        match self.phase {
            Phase::SlowStart => Growth::By(1),
            Phase::Conservative { .. } => Growth::By(CSS_GROWTH_DIVISOR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A sender whose every round trip takes `rtt` and delivers `per_round`.
    fn run_rounds(m: &mut DeliveryModel, t0: Instant, rounds: u32, rtt: Duration, per_round: u64) {
        rounds_of(m, t0, rounds, rtt, per_round, true);
    }

    fn rounds_of(
        m: &mut DeliveryModel,
        t0: Instant,
        rounds: u32,
        rtt: Duration,
        per_round: u64,
        limited: bool,
    ) {
        // Carry on from the round in progress; ten SACKs a round, evenly
        // spaced over the round trip that ends at `t0 + rtt × i`.
        let mut tsn = m.round.map_or(0, |r| r.end_tsn);
        for i in 0..rounds {
            for k in 1..=10 {
                let now = t0 + rtt * i - rtt + rtt * k / 10;
                let cum = tsn.wrapping_add(k).wrapping_sub(10);
                m.on_sack(
                    per_round / 10,
                    cum,
                    tsn.wrapping_add(k),
                    limited,
                    Some(rtt),
                    now,
                );
            }
            tsn += 10;
        }
    }

    #[test]
    fn an_application_that_never_fills_the_window_is_not_capped() {
        let t0 = Instant::now();
        let mut m = DeliveryModel::new(Some(Duration::from_millis(2)));
        rounds_of(&mut m, t0, 20, Duration::from_millis(10), 1_000, false);
        assert_eq!(m.cap(0, t0), None);
        // Once data waits for the window, the rate is the path's.
        rounds_of(
            &mut m,
            t0 + Duration::from_secs(1),
            3,
            Duration::from_millis(10),
            100_000,
            true,
        );
        assert!(m.cap(0, t0).is_some_and(|cap| cap > 200_000));
    }

    #[test]
    fn the_cap_is_twice_the_bdp_plus_the_target() {
        let t0 = Instant::now();
        let mut m = DeliveryModel::new(Some(Duration::from_millis(2)));
        assert_eq!(m.cap(0, t0), None, "nothing measured yet");
        // 100 kB per 10 ms round trip: 10 MB/s.
        run_rounds(&mut m, t0, 20, Duration::from_millis(10), 100_000);
        let cap = m.cap(0, t0).expect("measured");
        // 10 MB/s × (20 ms + 2 ms) = 220 kB, and the 10 kB each SACK
        // acknowledges at once.
        assert_eq!(m.extra_acked(), 10_000);
        assert!((229_000..=231_000).contains(&cap), "cap {cap}");
        assert!((99_000..=101_000).contains(&m.bdp().unwrap()));
        assert_eq!(m.cap(500_000, t0), Some(500_000), "the floor holds");
    }

    #[test]
    fn in_slow_start_the_cap_counts_the_round_in_progress() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(20);
        let mut m = DeliveryModel::new(Some(Duration::from_millis(1)));
        // Slow start: each 20 ms round delivers twice the last, up to 80 kB
        // (4 MB/s) in the last round that ended.
        for (i, bytes) in [10_000, 20_000, 40_000, 80_000].into_iter().enumerate() {
            rounds_of(&mut m, t0 + rtt * i as u32, 1, rtt, bytes, true);
        }
        let ended = t0 + rtt * 3;
        // Beside the acknowledgements that outran the last estimate (in
        // slow start, all of them; see `aggregate`):
        // (What SACKs acknowledged beyond the last estimate comes on top;
        // in slow start that is all of them: see `aggregate`.)
        let before = m.cap(0, ended).expect("measured") - m.extra_acked() as u32;
        // 4 MB/s × 41 ms.
        assert!((160_000..=170_000).contains(&before), "cap {before}");
        // The link fills: the round under way delivers 250 kB in its first
        // 20 ms (12.5 MB/s) while the queue builds.
        let end_tsn = m.round.expect("a round").end_tsn;
        for k in 1..=10u32 {
            m.on_sack(
                25_000,
                end_tsn - 1,
                end_tsn + 100,
                true,
                None,
                ended + rtt * k / 10,
            );
        }
        let now = ended + rtt;
        let cap = m.cap(0, now).expect("measured") - m.extra_acked() as u32;
        // 12.5 MB/s × 41 ms = 512 kB: the queue's cap, not a third of it.
        assert!((500_000..=520_000).contains(&cap), "cap {cap}");
        // Before a whole round trip has passed the round in progress is not
        // trusted (a burst of acknowledgements is not a rate).
        let half = m.cap(0, ended + rtt / 2).expect("measured") - m.extra_acked() as u32;
        assert_eq!(half, before);
    }

    /// Rounds of 45 ms on a 20 ms path that delivers 10 MB/s: SACKs arrive
    /// steadily for 35 ms and then, if `held`, stop for 10 ms and the next
    /// round begins with the 100 kB they acknowledge at once (a link whose
    /// one queue holds SACKs behind data); if not, they arrive steadily all
    /// through (a queue of data standing in front of the receiver). Every
    /// round trip measures 45 ms either way. Answers whether the last
    /// round showed a standing queue, and the cap.
    fn rounds_with_acknowledgements(held: bool) -> (bool, u32) {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = DeliveryModel::new(Some(ms(1)));
        run_rounds(&mut m, t0, 10, ms(20), 200_000);
        let mut at = t0 + ms(200);
        let mut tsn = m.round.expect("a round").end_tsn;
        let mut standing = false;
        for _ in 0..10 {
            // One round: 45 SACKs of 10 kB, the round ending on the last.
            for k in 0..45u32 {
                let now = if held && k < 10 {
                    at
                } else {
                    at + ms(k as u64)
                };
                let next = tsn.wrapping_add(k + 1);
                m.on_sack(10_000, next.wrapping_sub(45), next, true, Some(ms(45)), now);
                standing = m.take_standing_queue();
            }
            tsn += 45;
            at += ms(45);
        }
        (standing, m.cap(0, at).expect("measured"))
    }

    #[test]
    fn acknowledgements_held_back_are_not_a_standing_queue() {
        let (standing, cap) = rounds_with_acknowledgements(true);
        assert!(!standing, "a round trip long by the time SACKs were held");
        // 10 MB/s × 41 ms, and the 100 kB held back.
        assert!((500_000..=520_000).contains(&cap), "cap {cap}");
        let (standing, cap) = rounds_with_acknowledgements(false);
        assert!(standing, "a round trip long by a queue of data");
        // 10 MB/s × 41 ms, and the 10 kB of one SACK.
        assert!((415_000..=425_000).contains(&cap), "cap {cap}");
    }

    #[test]
    fn the_window_probes_while_more_of_it_delivers_more_without_a_queue() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(50);
        let mut m = DeliveryModel::new(Some(Duration::from_millis(1)));
        assert!(!m.probing(), "nothing measured");
        // A window cut by losses that were not congestion: each round
        // delivers a little more at the path's round trip.
        let mut end = t0;
        for bytes in [100_000, 110_000, 120_000] {
            end += rtt;
            rounds_of(&mut m, end, 1, rtt, bytes, true);
        }
        assert!(m.probing(), "more window, more delivered, no queue");
        // The next rounds' round trips are longer by a queue (75 ms on a
        // 50 ms path), though they deliver more: growth is Reno's again.
        let queued = Duration::from_millis(75);
        end += queued;
        rounds_of(&mut m, end, 1, queued, 200_000, true);
        assert!(!m.probing(), "the round trip shows a queue");
        // Back at the path's round trip but delivering less than the best
        // recent round: the window has found what the path carries.
        end += rtt;
        rounds_of(&mut m, end, 1, rtt, 110_000, true);
        assert!(!m.probing(), "the rate did not follow the window");
        // A round the application limited says nothing about room (the
        // first one still began with data waiting).
        end += rtt;
        rounds_of(&mut m, end, 2, rtt, 200_000, false);
        end += rtt;
        assert!(!m.probing(), "the window did not limit the round");
        end += rtt;
        rounds_of(&mut m, end, 1, rtt, 200_000, true);
        assert!(m.probing());
        // Off means RFC 4960's growth.
        let mut off = DeliveryModel::new(None);
        rounds_of(&mut off, t0 + rtt, 3, rtt, 100_000, true);
        assert!(!off.probing());
    }

    #[test]
    fn a_longer_path_is_learned_after_the_window() {
        let t0 = Instant::now();
        let mut m = DeliveryModel::new(Some(Duration::ZERO));
        run_rounds(&mut m, t0, 5, Duration::from_millis(10), 100_000);
        // The route changes: every round trip now takes 50 ms.
        let later = t0 + Duration::from_secs(1);
        run_rounds(&mut m, later, 5, Duration::from_millis(50), 100_000);
        assert_eq!(
            m.min_rtt,
            Some(Duration::from_millis(10)),
            "kept inside the window"
        );
        let after = t0 + MIN_RTT_WINDOW + Duration::from_secs(1);
        run_rounds(&mut m, after, 2, Duration::from_millis(50), 100_000);
        assert_eq!(m.min_rtt, Some(Duration::from_millis(50)));
    }

    #[test]
    fn off_means_no_cap() {
        let t0 = Instant::now();
        let mut m = DeliveryModel::new(None);
        run_rounds(&mut m, t0, 20, Duration::from_millis(10), 100_000);
        assert_eq!(m.cap(0, t0), None);
        assert_eq!(m.bdp(), None);
    }

    /// A slow-starting sender: its SACKs, ten a round, each acknowledging
    /// a tenth of the window, which grows as the returned growth says.
    struct Flow {
        h: SlowStartExit,
        tsn: u32,
        now: Instant,
        cwnd: u32,
        /// Bytes each SACK of the round acknowledges.
        acked: u32,
    }

    impl Flow {
        fn new() -> Self {
            Flow {
                h: SlowStartExit::new(),
                tsn: 0,
                now: Instant::now(),
                cwnd: 12_000,
                acked: 0,
            }
        }

        /// One SACK with an RTT of `rtt`, the path carrying at most `cap`
        /// bytes per round.
        fn sack(&mut self, rtt: Duration, cap: u32) -> Growth {
            if self.tsn % 10 == 0 {
                self.acked = self.cwnd.min(cap) / 10;
            }
            self.tsn += 1;
            self.now += rtt / 10;
            let g = self
                .h
                .on_sack(self.tsn, self.tsn + 10, Some(rtt), self.acked, self.now);
            if let Growth::By(d) = g {
                self.cwnd = self.cwnd.saturating_add(self.acked / d);
            }
            g
        }

        /// `n` rounds, or until slow start ends.
        fn rounds_capped(&mut self, n: u32, rtt: Duration, cap: u32) -> Vec<Growth> {
            let mut out = Vec::new();
            for _ in 0..n * 10 {
                out.push(self.sack(rtt, cap));
                if out.last() == Some(&Growth::Exit) {
                    break;
                }
            }
            out
        }

        fn rounds(&mut self, n: u32, rtt: Duration) -> Vec<Growth> {
            self.rounds_capped(n, rtt, u32::MAX)
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slow_start_goes_on_while_the_round_trip_is_flat() {
        let mut f = Flow::new();
        let g = f.rounds(20, ms(50));
        assert!(g.iter().all(|g| *g == Growth::By(1)), "{g:?}");
        // A rise below the threshold (50 ms / 8 = 6.25 ms) is not a queue.
        let g = f.rounds(5, ms(55));
        assert!(g.iter().all(|g| *g == Growth::By(1)), "{g:?}");
    }

    #[test]
    fn a_growing_round_trip_slows_growth_then_ends_slow_start() {
        let mut f = Flow::new();
        f.rounds(3, ms(50));
        let g = f.rounds(1, ms(57));
        assert_eq!(g.last(), Some(&Growth::By(CSS_GROWTH_DIVISOR)), "{g:?}");
        // The delivery rate keeps growing with the window: five rounds of
        // conservative slow start, then the end.
        let g = f.rounds(CSS_ROUNDS - 1, ms(58));
        assert!(
            g.iter().all(|g| *g == Growth::By(CSS_GROWTH_DIVISOR)),
            "{g:?}"
        );
        let g = f.rounds(1, ms(58));
        assert_eq!(g[0], Growth::Exit, "{g:?}");
    }

    #[test]
    fn a_rise_that_falls_back_was_noise() {
        let mut f = Flow::new();
        f.rounds(3, ms(20));
        let g = f.rounds(1, ms(30));
        assert_eq!(g.last(), Some(&Growth::By(CSS_GROWTH_DIVISOR)));
        let g = f.rounds(2, ms(21));
        assert_eq!(g.last(), Some(&Growth::By(1)), "{g:?}");
    }

    #[test]
    fn a_queue_that_shrinks_a_little_is_still_a_queue() {
        // 100 ms, then a round at 131 ms: conservative slow start. The next
        // round's minimum is 123 ms, below the entry's but far above the
        // 112.5 ms that counts as a rise: the queue is still there.
        let mut f = Flow::new();
        f.rounds(3, ms(100));
        let g = f.rounds(1, ms(131));
        assert_eq!(g.last(), Some(&Growth::By(CSS_GROWTH_DIVISOR)), "{g:?}");
        let g = f.rounds(2, ms(123));
        assert!(
            g.iter().all(|g| *g == Growth::By(CSS_GROWTH_DIVISOR)),
            "{g:?}"
        );
    }

    #[test]
    fn the_round_that_starts_conservative_slow_start_keeps_it() {
        // Within the round that crosses the threshold the samples keep
        // falling (the round began behind the last one's burst): the
        // window must not flip between the two growth rates, and the
        // round is not judged noise at its end.
        let mut f = Flow::new();
        f.rounds(3, ms(100));
        let g: Vec<_> = (0..20u64)
            .map(|i| f.sack(Duration::from_micros(132_000 - 300 * i), u32::MAX))
            .collect();
        let first = g.iter().position(|g| *g == Growth::By(CSS_GROWTH_DIVISOR));
        assert!(first.is_some(), "{g:?}");
        assert!(
            g[first.unwrap()..]
                .iter()
                .all(|g| *g == Growth::By(CSS_GROWTH_DIVISOR)),
            "{g:?}"
        );
    }

    #[test]
    fn after_a_rise_slow_start_ends_when_the_pipe_is_full() {
        // Behind a queue of one bandwidth-delay product (100 ms, 120 kB
        // per round, so 240 kB in flight overflow it): the round trip
        // rises once the window passes the product; the first round that
        // then delivers no more than the one before ends slow start,
        // before the queue overflows. (Five rounds of conservative slow
        // start would take the window to 1.25^5 times the product.)
        let mut f = Flow::new();
        f.rounds_capped(3, ms(100), 120_000);
        assert_eq!(f.cwnd, 96_000);
        let g = f.rounds_capped(1, ms(131), 120_000);
        assert_eq!(g.last(), Some(&Growth::By(CSS_GROWTH_DIVISOR)), "{g:?}");
        let g = f.rounds_capped(CSS_ROUNDS, ms(118), 120_000);
        assert_eq!(g.len(), 21, "{g:?}");
        assert_eq!(g.last(), Some(&Growth::Exit), "{g:?}");
        assert!(f.cwnd < 240_000, "cwnd {}", f.cwnd);
        // Without the rise the same plateau is not a reason to stop: on
        // a path without a queue the rate is limited elsewhere (the
        // receiver, the CPU) and the window must keep up with it.
        let mut f = Flow::new();
        let g = f.rounds_capped(8, ms(100), 120_000);
        assert!(g.iter().all(|g| *g == Growth::By(1)), "{g:?}");
    }

    #[test]
    fn a_round_the_application_paused_is_not_a_full_pipe() {
        // After a rise, a round in which the sender ran out of data (its
        // SACKs not seen here) delivers less than the round before: that is
        // the application, not the path, and slow start goes on.
        let mut f = Flow::new();
        f.rounds(3, ms(100));
        f.rounds(1, ms(131));
        let g = f.rounds(1, ms(118));
        assert!(!g.contains(&Growth::Exit), "{g:?}");
        // A round delivering a tenth as much, half of its SACKs unseen (the
        // first SACK of the next round ends it).
        let mut g: Vec<_> = (0..5).map(|_| f.sack(ms(118), 10_000)).collect();
        f.h.unseen();
        g.extend((0..6).map(|_| f.sack(ms(118), 10_000)));
        assert!(!g.contains(&Growth::Exit), "{g:?}");
        // The round after, seen whole and as small, does end it.
        let g = f.rounds_capped(1, ms(118), 10_000);
        assert_eq!(g.last(), Some(&Growth::Exit), "{g:?}");
    }

    #[test]
    fn thresholds_are_clamped_to_4_and_16_ms() {
        // 1 ms round trips: a 3 ms rise is below the 4 ms floor.
        let mut f = Flow::new();
        f.rounds(3, ms(1));
        let g = f.rounds(1, ms(4));
        assert_eq!(g.last(), Some(&Growth::By(1)));
        // 200 ms round trips: 16 ms is enough (an eighth would be 25).
        let mut f = Flow::new();
        f.rounds(3, ms(200));
        let g = f.rounds(1, ms(216));
        assert_eq!(g.last(), Some(&Growth::By(CSS_GROWTH_DIVISOR)));
    }
}
