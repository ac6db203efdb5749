//! The sender's hashing thread: the pages of chunk hashes the receiver asks
//! for, in the order asked, and in between, the files' chunks in manifest
//! order ahead of any request. A receiver usually arrives seconds after the
//! code is shown; by then the hashes of the first gigabytes are known, and
//! the transfer does not spend its CPU on them.

use std::io;

use peerlink_transfer::Hash;
use tokio::sync::mpsc;

/// Most chunks hashed ahead of requests: 64 GiB of 1 MiB chunks, whose
/// hashes the sender keeps (2 MiB).
pub const AHEAD_CHUNKS: u64 = 1 << 16;

/// Chunks hashed ahead at a time: a request waits for at most this much
/// work (16 MiB at the default chunk size).
pub const AHEAD_STEP: u32 = 16;

/// Hash chunks `from..from + count` of `file` (a page of the receiver's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub file: u32,
    pub from: u32,
    pub count: u32,
}

/// Hashes computed, asked for or ahead.
#[derive(Debug)]
pub struct Done {
    pub file: u32,
    pub from: u32,
    pub count: u32,
    pub hashes: io::Result<Vec<Hash>>,
    /// Hashed ahead of any request: a failure is not the transfer's (the
    /// file is read again, and the failure reported, if it is asked for).
    pub ahead: bool,
}

/// Runs until `jobs` closes or `done` is dropped: every job, in order, and
/// while none waits, up to `budget` chunks ahead in steps of `step`.
/// `chunks[i]` is file `i`'s chunk count; `hash` reads and hashes.
pub fn run(
    chunks: &[u32],
    budget: u64,
    step: u32,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Done>,
    hash: impl Fn(u32, u32, u32) -> io::Result<Vec<Hash>>,
) {
    let mut ahead = Ahead { file: 0, next: 0, budget, prefix: vec![0; chunks.len()] };
    loop {
        let (job, is_ahead) = match jobs.try_recv() {
            Ok(job) => (job, false),
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => match ahead.next_job(chunks, step) {
                Some(job) => (job, true),
                None => match jobs.blocking_recv() {
                    Some(job) => (job, false),
                    None => return,
                },
            },
        };
        // What was hashed ahead was sent already: only the rest of a
        // request is hashed.
        let Some(job) = (if is_ahead { Some(job) } else { ahead.uncovered(job) }) else { continue };
        let hashes = hash(job.file, job.from, job.count);
        let ok = hashes.as_ref().is_ok_and(|h| h.len() == job.count as usize);
        ahead.hashed(job, chunks, ok, is_ahead);
        let out = Done { file: job.file, from: job.from, count: job.count, hashes, ahead: is_ahead };
        if done.blocking_send(out).is_err() {
            return;
        }
    }
}

/// How far hashing ahead has got.
struct Ahead {
    /// The file being hashed ahead, and its next chunk.
    file: usize,
    next: u32,
    /// Chunks still to hash ahead.
    budget: u64,
    /// Per file: the chunks below it were hashed ahead and sent.
    prefix: Vec<u32>,
}

impl Ahead {
    fn next_job(&mut self, chunks: &[u32], step: u32) -> Option<Job> {
        while self.file < chunks.len() && self.next >= chunks[self.file] {
            self.file += 1;
            self.next = 0;
        }
        if self.file == chunks.len() || self.budget == 0 {
            return None;
        }
        let count =
            (chunks[self.file] - self.next).min(step.max(1)).min(self.budget.min(u64::from(u32::MAX)) as u32);
        // The index fits: it came from `chunks`, whose length is a file count.
        Some(Job { file: self.file as u32, from: self.next, count })
    }

    fn hashed(&mut self, job: Job, chunks: &[u32], ok: bool, ahead: bool) {
        let end = job.from + job.count;
        if ahead {
            self.budget -= u64::from(job.count);
            // Unreadable now: the rest of the file is left to the requests.
            self.next = if ok { end } else { chunks[job.file as usize] };
            if ok {
                self.prefix[job.file as usize] = end;
            }
        } else if ok && job.file as usize == self.file && job.from <= self.prefix[self.file] {
            // A request that continues what was hashed ahead: ahead goes on
            // after it, not over it again. (Only from what was really sent:
            // after a failure ahead `next` is past the file, `prefix` is not.)
            self.prefix[self.file] = self.prefix[self.file].max(end);
            self.next = self.next.max(self.prefix[self.file]);
        }
    }

    /// The part of a request not yet hashed ahead, if any.
    fn uncovered(&self, job: Job) -> Option<Job> {
        let done = self.prefix.get(job.file as usize).copied().unwrap_or(0);
        let end = job.from + job.count;
        (end > done).then(|| Job {
            file: job.file,
            from: job.from.max(done),
            count: end - job.from.max(done),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(file: u32, from: u32, count: u32) -> Job {
        Job { file, from, count }
    }

    /// A hasher over `chunks` on a thread of its own, hashing ahead in
    /// steps of 4; `fail` is a file it cannot read.
    struct Running {
        jobs: Option<mpsc::Sender<Job>>,
        done: mpsc::Receiver<Done>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Running {
        fn start(chunks: Vec<u32>, budget: u64, queued: &[Job], fail: Option<u32>) -> Running {
            Running::start_slow(chunks, budget, queued, fail, std::time::Duration::ZERO)
        }

        /// Each hash call takes `pace`.
        fn start_slow(
            chunks: Vec<u32>,
            budget: u64,
            queued: &[Job],
            fail: Option<u32>,
            pace: std::time::Duration,
        ) -> Running {
            let (job_tx, job_rx) = mpsc::channel(64);
            for &j in queued {
                job_tx.try_send(j).unwrap();
            }
            let (done_tx, done) = mpsc::channel(1024);
            let thread = std::thread::spawn(move || {
                run(&chunks, budget, 4, job_rx, done_tx, move |file, from, count| {
                    std::thread::sleep(pace);
                    if fail == Some(file) {
                        return Err(io::Error::other("unreadable"));
                    }
                    Ok((from..from + count).map(|c| [c as u8; 32]).collect())
                })
            });
            Running { jobs: Some(job_tx), done, thread }
        }

        /// The next `n` reports: (job, ahead, ok).
        fn next(&mut self, n: usize) -> Vec<(Job, bool, bool)> {
            (0..n)
                .map(|_| {
                    let d = self.done.blocking_recv().expect("a report");
                    let ok = d.hashes.as_ref().is_ok_and(|h| h.len() == d.count as usize);
                    (job(d.file, d.from, d.count), d.ahead, ok)
                })
                .collect()
        }

        /// Closes the jobs; the hasher ends; returns what it reported after.
        fn finish(mut self) -> Vec<(Job, bool, bool)> {
            self.jobs = None;
            self.thread.join().unwrap();
            let mut rest = Vec::new();
            while let Ok(d) = self.done.try_recv() {
                rest.push((job(d.file, d.from, d.count), d.ahead, d.hashes.is_ok()));
            }
            rest
        }
    }

    #[test]
    fn requests_come_before_hashing_ahead() {
        let mut h = Running::start(vec![10, 3], 100, &[job(1, 0, 3), job(0, 4, 2)], None);
        assert_eq!(
            h.next(3),
            [(job(1, 0, 3), false, true), (job(0, 4, 2), false, true), (job(0, 0, 4), true, true)]
        );
        let _ = h.finish();
    }

    #[test]
    fn ahead_goes_file_by_file_in_steps_within_its_budget() {
        let mut h = Running::start(vec![10, 0, 3], 12, &[], None);
        // Ten chunks of file 0 in steps of 4, file 1 (empty) skipped, then
        // what is left of the budget of 12 from file 2.
        let ahead = [job(0, 0, 4), job(0, 4, 4), job(0, 8, 2), job(2, 0, 2)];
        assert_eq!(h.next(4), ahead.map(|j| (j, true, true)));
        // The budget is spent. A request within what was hashed ahead is
        // not hashed again; of one beyond it, only the rest is.
        let jobs = h.jobs.as_ref().unwrap();
        jobs.blocking_send(job(0, 0, 10)).unwrap();
        jobs.blocking_send(job(2, 0, 3)).unwrap();
        assert_eq!(h.next(1), [(job(2, 2, 1), false, true)]);
        assert_eq!(h.finish(), []);
    }

    #[test]
    fn a_request_overlapping_what_was_hashed_ahead_hashes_only_the_rest_and_ahead_goes_on_after_it() {
        // 50 ms a step: the request arrives while ahead is at its first
        // steps, well before it reaches 30.
        let mut h = Running::start_slow(vec![40], 100, &[], None, std::time::Duration::from_millis(50));
        assert_eq!(h.next(1), [(job(0, 0, 4), true, true)]);
        // The receiver asks for a page while hashing ahead has reached 4 or
        // a little further (it runs on); the answer starts where ahead was.
        h.jobs.as_ref().unwrap().blocking_send(job(0, 0, 30)).unwrap();
        let mut reports = Vec::new();
        for _ in 0..10 {
            let r = h.next(1)[0];
            reports.push(r);
            if !r.1 {
                break;
            }
        }
        let (asked, _, ok) = *reports.last().unwrap();
        assert!(ok);
        assert_eq!(asked.from + asked.count, 30);
        let hashed_ahead = reports.len() as u32 - 1;
        assert_eq!(asked.from, 4 + 4 * hashed_ahead, "{reports:?}");
        // Then ahead goes on from 30, not from where it was.
        assert_eq!(h.next(1), [(job(0, 30, 4), true, true)]);
        let _ = h.finish();
    }

    #[test]
    fn after_a_failure_ahead_each_request_is_hashed_in_full() {
        // File 0 fails once (ahead), then reads: every request for it is
        // hashed, none taken as sent ahead.
        let (job_tx, job_rx) = mpsc::channel::<Job>(8);
        let (done_tx, mut done) = mpsc::channel(64);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let thread = std::thread::spawn(move || {
            run(&[12], 100, 4, job_rx, done_tx, move |_, from, count| {
                if !failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    return Err(io::Error::other("busy"));
                }
                Ok((from..from + count).map(|c| [c as u8; 32]).collect())
            })
        });
        let d = done.blocking_recv().unwrap();
        assert!(d.ahead && d.hashes.is_err());
        for page in [job(0, 0, 4), job(0, 4, 4), job(0, 8, 4)] {
            job_tx.blocking_send(page).unwrap();
            let d = done.blocking_recv().unwrap();
            assert_eq!((job(d.file, d.from, d.count), d.ahead), (page, false));
            assert!(d.hashes.is_ok());
        }
        drop(job_tx);
        thread.join().unwrap();
    }

    #[test]
    fn a_file_unreadable_ahead_is_left_to_its_request() {
        let mut h = Running::start(vec![6, 2], 100, &[], Some(0));
        // One try at file 0, reported as ahead (not the transfer's failure),
        // then on to file 1.
        assert_eq!(h.next(2), [(job(0, 0, 4), true, false), (job(1, 0, 2), true, true)]);
        // Asked for, it is read again and the failure reported as such.
        h.jobs.as_ref().unwrap().blocking_send(job(0, 0, 6)).unwrap();
        assert_eq!(h.next(1), [(job(0, 0, 6), false, false)]);
        assert_eq!(h.finish(), []);
    }
}
