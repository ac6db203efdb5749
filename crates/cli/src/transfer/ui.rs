//! How a transfer looks: progress bars with speed and ETA for people
//! (stderr), or one JSON object per line for programs (`--json`, stdout).

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::report::Report;

/// Interval between `progress` events in JSON mode.
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub struct Ui {
    json: bool,
    bars: MultiProgress,
    total: Option<ProgressBar>,
    current: Option<ProgressBar>,
    started: Instant,
    last_json: Option<Instant>,
}

impl std::fmt::Debug for Ui {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ui").field("json", &self.json).finish()
    }
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>9} [{wide_bar:.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

impl Ui {
    pub fn new(json: bool) -> Ui {
        let bars = if json {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        };
        Ui { json, bars, total: None, current: None, started: Instant::now(), last_json: None }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Shows `report` to its audience: a line for people on stderr, or a JSON
    /// object for programs on stdout (`--json`).
    pub fn show(&self, report: Report) {
        if self.json {
            if let Some(v) = report.json() {
                if matches!(report, Report::Finished { .. }) {
                    FINISHED_WRITTEN.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                write_json(&v);
            }
        } else if let Some(text) = report.text() {
            self.bars.suspend(|| eprintln!("{text}"));
            if let Report::Text { text, .. } = &report {
                println!("{text}");
            }
        }
    }

    /// Starts the overall progress bar (`already`: bytes found on disk).
    pub fn start(&mut self, label: &str, total: u64, already: u64) {
        self.started = Instant::now();
        let bar =
            self.bars.add(ProgressBar::new(total).with_style(bytes_style()).with_prefix(label.to_string()));
        bar.set_position(already);
        bar.reset_eta();
        self.total = Some(bar);
    }

    /// Shows the file being worked on under the total.
    pub fn current_file(&mut self, name: &str, size: u64, done: u64) {
        if self.json {
            return;
        }
        let bar = self.current.get_or_insert_with(|| {
            self.bars.add(
                ProgressBar::new(size).with_style(
                    ProgressStyle::with_template(
                        "{prefix:>9} {wide_msg} {binary_bytes}/{binary_total_bytes}",
                    )
                    .expect("a valid template"),
                ),
            )
        });
        bar.set_prefix("file");
        bar.set_length(size);
        bar.set_position(done);
        bar.set_message(name.to_string());
    }

    /// Updates progress: `done` of the total bytes.
    pub fn progress(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.total {
            bar.set_position(done);
        }
        if self.json {
            let now = Instant::now();
            if self.last_json.is_none_or(|t| now.duration_since(t) >= JSON_PROGRESS_EVERY) || done >= total {
                self.last_json = Some(now);
                let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                write_json(
                    &json!({"event": "progress", "bytes_done": done, "bytes_total": total, "elapsed_s": secs}),
                );
            }
        }
    }

    /// Removes the bars (on success the totals are printed separately).
    pub fn finish(&mut self) {
        if let Some(bar) = self.current.take() {
            bar.finish_and_clear();
        }
        if let Some(bar) = self.total.take() {
            bar.finish();
        }
    }

    /// Stops the bars where they are, e.g. on cancel.
    pub fn abandon(&mut self) {
        if let Some(bar) = self.current.take() {
            bar.finish_and_clear();
        }
        if let Some(bar) = self.total.take() {
            bar.abandon();
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Whether a `finished` event went out (`--json`).
static FINISHED_WRITTEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `--json`, the `finished` event of a transfer that failed before it
/// could report (the server unreachable, a code that does not parse, an
/// output folder that cannot be made): programs reading stdout get one
/// `finished` line whatever happened.
pub fn finished_by_error(e: &anyhow::Error) {
    if !FINISHED_WRITTEN.swap(true, std::sync::atomic::Ordering::Relaxed) {
        write_json(&serde_json::json!({
            "event": "finished",
            "ok": false,
            "exit_code": crate::exit::FAILURE,
            "message": format!("{e:#}"),
        }));
    }
}

/// One JSON object, one line, flushed.
fn write_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}
