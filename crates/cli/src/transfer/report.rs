//! What a transfer tells its user, as typed events: each renders as a line
//! for people (stderr) or as one JSON object for programs (`--json`,
//! stdout), so the two never drift apart. Some events are for one audience
//! only.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{human_bytes, humantime};

/// Which end of the transfer this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Sender,
    Receiver,
}

/// How a finished transfer went, by side.
#[derive(Debug, Clone)]
pub enum Totals {
    Sender {
        files: u64,
        bytes_total: u64,
        bytes_sent: u64,
        chunks_sent: u64,
    },
    Receiver {
        files: u64,
        bytes_total: u64,
        bytes_done: u64,
        bytes_resumed: u64,
        bytes_received: u64,
        corrupt_chunks: u64,
        /// Where the files went.
        out: PathBuf,
        /// The offer was declined (no partial data to speak of).
        declined: bool,
    },
}

/// One thing a transfer reports.
#[derive(Debug, Clone)]
pub enum Report {
    /// The sender leaves out something it cannot send.
    Skipped {
        path: String,
    },
    /// The sender's code, to give to the receiver.
    Code {
        code: String,
        files: u64,
        bytes: u64,
        /// The web app's receive link (`http://HOST/r#CODE`).
        link: String,
        /// The link as a QR code drawn in text, with `--qr`.
        qr: Option<String>,
    },
    /// A peer is in the code's room; pairing started.
    PeerSeen {
        side: Side,
    },
    Notice {
        message: String,
    },
    /// Both sides proved they have the same code.
    Paired,
    /// The data channels are open (`bytes_done`: the receiver's verified bytes).
    Connected {
        bytes_done: Option<u64>,
    },
    /// The connection went; both sides wait for the other to come back.
    Lost {
        side: Side,
        reason: String,
        wait: Duration,
        bytes_done: Option<u64>,
    },
    /// The receiver accepted the offer.
    Accepted,
    /// The receiver recognised an earlier, interrupted transfer.
    Resumed,
    /// What the sender offers.
    Offer {
        files: u64,
        texts: u64,
        bytes: u64,
        entries: Vec<(String, u64)>,
    },
    CorruptChunk {
        path: String,
        chunk: u32,
        attempt: u32,
    },
    FileDone {
        path: String,
        hash: String,
    },
    Saved {
        path: String,
        saved_as: String,
        hash: String,
    },
    /// A `--text` message (people get it on stdout).
    Text {
        name: String,
        text: String,
    },
    Finished {
        ok: bool,
        exit_code: u8,
        message: String,
        elapsed: Duration,
        peak_rss_kib: Option<u64>,
        totals: Totals,
    },
}

/// Entries listed in an offer: in the JSON event, and for people.
const OFFER_JSON_ENTRIES: usize = 100;
const OFFER_TEXT_ENTRIES: usize = 10;

impl Report {
    /// The line(s) for people, if this event is for them.
    pub fn text(&self) -> Option<String> {
        Some(match self {
            Report::Skipped { path } => format!("skipping {path}"),
            Report::Code { code, files, bytes, link, qr } => format!(
                "Sending {files} file(s), {}.\nCode: {code}\nOn the other device run:\n\n    peerlink receive {code}\n\n\
                 or open this link in a browser{}:\n\n    {link}\n{}",
                human_bytes(*bytes),
                if qr.is_some() { " (or scan the QR code)" } else { "" },
                qr.as_deref().map(|q| format!("\n{q}")).unwrap_or_default(),
            ),
            Report::PeerSeen { side: Side::Sender } => "A receiver is here; checking the code...".into(),
            Report::PeerSeen { side: Side::Receiver } => "Found the sender; checking the code...".into(),
            Report::Notice { message } => message.clone(),
            Report::Paired => "Code confirmed; connecting directly...".into(),
            Report::Connected { .. } | Report::FileDone { .. } | Report::Saved { .. } => return None,
            Report::Lost { side: Side::Sender, reason, wait, .. } => format!(
                "Connection lost ({reason}); waiting up to {} for the receiver to come back with the same code.",
                humantime(*wait)
            ),
            Report::Lost { side: Side::Receiver, reason, wait, .. } => format!(
                "Connection lost ({reason}); verified data is kept. Waiting up to {} for the sender to come back (or run `peerlink receive --resume` later).",
                humantime(*wait)
            ),
            Report::Accepted => "The receiver accepted; sending.".into(),
            Report::Resumed => "Same transfer as before: continuing.".into(),
            Report::Offer { files, bytes, entries, .. } => {
                let mut lines = vec![format!("The sender offers {files} file(s), {}:", human_bytes(*bytes))];
                for (path, size) in entries.iter().take(OFFER_TEXT_ENTRIES) {
                    lines.push(format!("  {path} ({})", human_bytes(*size)));
                }
                if entries.len() > OFFER_TEXT_ENTRIES {
                    lines.push(format!("  ... and {} more", entries.len() - OFFER_TEXT_ENTRIES));
                }
                lines.join("\n")
            }
            Report::CorruptChunk { path, chunk, attempt } => {
                format!("chunk {chunk} of {path} arrived damaged (attempt {attempt}); fetching it again")
            }
            Report::Text { .. } => "Message:".into(),
            Report::Finished { ok, elapsed, totals, .. } => match totals {
                Totals::Sender { files, bytes_total, bytes_sent, .. } if *ok => format!(
                    "Sent {files} file(s), {} in {:.1} s ({} this run).",
                    human_bytes(*bytes_total),
                    elapsed.as_secs_f64(),
                    human_bytes(*bytes_sent)
                ),
                Totals::Receiver { files, bytes_total, bytes_resumed, out, .. } if *ok => format!(
                    "Received {files} file(s), {} in {:.1} s into {} ({} were already here and verified).",
                    human_bytes(*bytes_total),
                    elapsed.as_secs_f64(),
                    out.display(),
                    human_bytes(*bytes_resumed)
                ),
                Totals::Receiver { bytes_done, out, declined: false, .. } if *bytes_done > 0 => format!(
                    "Partial data is kept in {} ({} verified); `peerlink receive --resume --out {}` continues.",
                    out.display(),
                    human_bytes(*bytes_done),
                    out.display()
                ),
                _ => return None,
            },
        })
    }

    /// The JSON object for programs, if this event is for them.
    pub fn json(&self) -> Option<Value> {
        Some(match self {
            Report::Skipped { path } => json!({"event": "skipped", "path": path}),
            Report::Code { code, files, bytes, link, qr: _ } => {
                json!({"event": "code", "code": code, "files": files, "bytes": bytes, "link": link})
            }
            Report::PeerSeen { side: Side::Sender } => json!({"event": "peer"}),
            Report::PeerSeen { side: Side::Receiver } | Report::Resumed => return None,
            Report::Notice { message } => json!({"event": "notice", "message": message}),
            Report::Paired => json!({"event": "paired"}),
            Report::Connected { bytes_done: None } => json!({"event": "connected"}),
            Report::Connected { bytes_done: Some(done) } => json!({"event": "connected", "bytes_done": done}),
            Report::Lost { reason, bytes_done: None, .. } => json!({"event": "lost", "reason": reason}),
            Report::Lost { reason, bytes_done: Some(done), .. } => {
                json!({"event": "lost", "reason": reason, "bytes_done": done})
            }
            Report::Accepted => json!({"event": "accepted"}),
            Report::Offer { files, texts, bytes, entries } => json!({
                "event": "offer",
                "files": files,
                "texts": texts,
                "bytes": bytes,
                "entries": entries
                    .iter()
                    .take(OFFER_JSON_ENTRIES)
                    .map(|(path, size)| json!({"path": path, "size": size}))
                    .collect::<Vec<_>>(),
            }),
            Report::CorruptChunk { path, chunk, attempt } => {
                json!({"event": "corrupt_chunk", "path": path, "chunk": chunk, "attempt": attempt})
            }
            Report::FileDone { path, hash } => json!({"event": "file_done", "path": path, "hash": hash}),
            Report::Saved { path, saved_as, hash } => {
                json!({"event": "saved", "path": path, "saved_as": saved_as, "hash": hash})
            }
            Report::Text { name, text } => json!({"event": "text", "name": name, "text": text}),
            Report::Finished { ok, exit_code, message, elapsed, peak_rss_kib, totals } => {
                let mut v = json!({
                    "event": "finished",
                    "ok": ok,
                    "exit_code": exit_code,
                    "message": message,
                    "elapsed_s": elapsed.as_secs_f64(),
                    "peak_rss_kib": peak_rss_kib,
                });
                let more = match totals {
                    Totals::Sender { bytes_total, bytes_sent, chunks_sent, .. } => json!({
                        "bytes_total": bytes_total,
                        "bytes_sent": bytes_sent,
                        "chunks_sent": chunks_sent,
                    }),
                    Totals::Receiver {
                        files,
                        bytes_total,
                        bytes_done,
                        bytes_resumed,
                        bytes_received,
                        corrupt_chunks,
                        ..
                    } => json!({
                        "files": files,
                        "bytes_total": bytes_total,
                        "bytes_done": bytes_done,
                        "bytes_resumed": bytes_resumed,
                        "bytes_received": bytes_received,
                        "corrupt_chunks": corrupt_chunks,
                    }),
                };
                if let (Value::Object(v), Value::Object(more)) = (&mut v, more) {
                    v.extend(more);
                }
                v
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event has at least one audience, and its JSON names it.
    #[test]
    fn every_event_renders_for_someone() {
        let all = [
            Report::Skipped { path: "a".into() },
            Report::Code {
                code: "7-a-b-c".into(),
                files: 1,
                bytes: 2,
                link: "http://h/r#7-a-b-c".into(),
                qr: None,
            },
            Report::PeerSeen { side: Side::Sender },
            Report::PeerSeen { side: Side::Receiver },
            Report::Notice { message: "m".into() },
            Report::Paired,
            Report::Connected { bytes_done: Some(3) },
            Report::Lost {
                side: Side::Receiver,
                reason: "r".into(),
                wait: Duration::from_secs(3600),
                bytes_done: None,
            },
            Report::Accepted,
            Report::Resumed,
            Report::Offer { files: 1, texts: 0, bytes: 5, entries: vec![("a".into(), 5)] },
            Report::CorruptChunk { path: "a".into(), chunk: 0, attempt: 1 },
            Report::FileDone { path: "a".into(), hash: "00".into() },
            Report::Saved { path: "a".into(), saved_as: "/x/a".into(), hash: "00".into() },
            Report::Text { name: "t".into(), text: "hi".into() },
        ];
        for r in &all {
            assert!(r.text().is_some() || r.json().is_some(), "{r:?}");
            if let Some(v) = r.json() {
                assert!(v["event"].is_string(), "{r:?}");
            }
        }
        let lost = Report::Lost {
            side: Side::Sender,
            reason: "r".into(),
            wait: Duration::from_secs(90),
            bytes_done: None,
        };
        assert_eq!(
            lost.text().unwrap(),
            "Connection lost (r); waiting up to 90 s for the receiver to come back with the same code."
        );
    }
}
