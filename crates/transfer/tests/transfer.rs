//! A Sender and a Receiver against each other over the in-memory harness:
//! round trips, pipelining, resume, reconnects, corruption, cancellation
//! and the receiver's flow-control bounds.

mod harness;

use harness::{Harness, Item, PART, file_hash_of, pattern, source};
use peerlink_transfer::*;

const K16: usize = 16 << 10;

fn small_chunks() -> ReceiverConfig {
    ReceiverConfig::default()
}

fn mixed_items() -> Vec<Item> {
    vec![
        Item::File("empty.txt", Vec::new()),
        Item::File("docs/one chunk.bin", pattern(K16, 1)),
        Item::File("docs/chunk plus one.bin", pattern(K16 + 1, 2)),
        Item::Dir("deep/a"),
        Item::File("deep/a/b/c/multi.bin", pattern(5 * K16 + 123, 3)),
        Item::Dir("empty dir"),
        Item::File("ünïcødé/日本語 ファイル.txt", "こんにちは, world".as_bytes().to_vec()),
        Item::File("deep/empty too", Vec::new()),
        Item::Text("message for you", "héllo wörld ✓"),
        Item::Text("empty note", ""),
        Item::File("tiny", vec![7]),
    ]
}

/// (1) Every kind of entry arrives byte-identical, with the source's file hash.
#[test]
fn round_trip_mixed_entries() {
    for max_message in [16 << 10, 64 << 10, 1000] {
        let (manifest, src) = source(MIN_CHUNK_SIZE, mixed_items());
        let mut h = Harness::new(manifest, src, small_chunks());
        h.max_message = max_message;
        h.run(200);
        h.assert_complete();
        assert!(h.dirs.contains("empty dir") && h.dirs.contains("deep/a/b/c"));
        let p = h.receiver.progress();
        assert_eq!((p.files_done, p.files_total), (9, 9));
        assert_eq!(p.bytes_done, p.bytes_total);
        assert_eq!(p.bytes_resumed, 0);
        assert_eq!(h.sender.stats().bytes_sent, p.bytes_total, "each byte sent once");
        // Frames never exceed the message size.
        assert!(h.receiver_events.contains(&ReceiverEvent::Text { file: 6, text: "héllo wörld ✓".into() }));
    }
}

/// (1) The default chunk size, with a file of several MiB.
#[test]
fn round_trip_default_chunks() {
    let (manifest, src) = source(
        DEFAULT_CHUNK_SIZE,
        vec![
            Item::File("big.bin", pattern(3 * (1 << 20) + 17, 9)),
            Item::File("exact", pattern(1 << 20, 10)),
        ],
    );
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.max_message = 64 << 10;
    h.run(100);
    h.assert_complete();
}

/// (2) Many small files pipeline: far fewer network trips than files.
#[test]
fn many_small_files_pipeline() {
    let items =
        (0..1000).map(|i| Item::Named(format!("dir{}/file {i}.bin", i % 10), pattern(20 << 10, i))).collect();
    let (manifest, src) = source(MIN_CHUNK_SIZE, items);
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.run(1000);
    h.assert_complete();
    // Sequential files would need at least three trips each (hashes,
    // chunks, and the next request).
    assert!(h.deliveries < 100, "{} deliveries for 1000 files", h.deliveries);
    assert!(h.max_files_in_flight >= 32, "at most {} files in flight", h.max_files_in_flight);
    eprintln!("1000 files: {} deliveries, up to {} files in flight", h.deliveries, h.max_files_in_flight);
}

/// (3) A new Receiver finds partial files on disk: only missing or bad
/// chunks are asked for and sent.
#[test]
fn resume_from_partial_files() {
    let c = K16;
    let size = 8 * c + 5000; // 9 chunks, the last one 5000 bytes
    let (manifest, src) = source(
        MIN_CHUNK_SIZE,
        vec![
            Item::File("partial.bin", pattern(size, 1)),
            Item::File("whole.bin", pattern(3 * c, 2)),
            Item::File("absent.bin", pattern(c + 10, 3)),
        ],
    );
    let mut h = Harness::new(manifest, src.clone(), ReceiverConfig::default());
    // partial.bin: chunks 0-2, 4 and 7 good; 3 corrupted; 5-6 zeros (a
    // sparse hole); the last one cut at 2000 of its 5000 bytes.
    let mut part = src[0][..8 * c + 2000].to_vec();
    part[3 * c + 100] ^= 0x40;
    part[5 * c..7 * c].fill(0);
    h.disk.insert(format!("partial.bin{PART}"), part);
    h.disk.insert(format!("whole.bin{PART}"), src[1].clone());
    h.run(100);
    h.assert_complete();

    let missing = (3 * c + 5000) + (c + 10);
    assert_eq!(h.sender.stats().bytes_sent, missing as u64, "only the missing bytes were sent");
    let p = h.receiver.progress();
    assert_eq!(p.bytes_resumed, (5 * c + 3 * c) as u64);
    assert_eq!(p.bytes_done, p.bytes_total);
    let wanted: Vec<(u32, [u32; 2])> = h
        .sent_by_receiver
        .iter()
        .filter_map(|m| match m {
            Ctl::Want { file, ranges } => Some(ranges.iter().map(move |r| (*file, *r))),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(wanted, [(0, [3, 4]), (0, [5, 7]), (0, [8, 9]), (2, [0, 2])]);
}

/// Data starts to move once the first page of hashes is in, not after the
/// sender has hashed the whole file (a pass over a big file before the
/// first byte moves); chunks already on disk whose hashes come in later
/// pages are still kept, whether the disk scan ends before or after the
/// first pages arrive.
#[test]
fn chunks_move_before_the_last_hash_page_and_resume_spans_pages() {
    let c = K16;
    let chunks = 600; // three pages of hashes
    let size = chunks * c;
    for defer_prepare in [false, true] {
        let (manifest, src) = source(MIN_CHUNK_SIZE, vec![Item::File("big.bin", pattern(size, 7))]);
        let config = ReceiverConfig { hash_pages_ahead: 1, window_bytes: 64 * c as u64, ..small_chunks() };
        let mut h = Harness::new(manifest, src.clone(), config);
        h.defer_prepare = defer_prepare;
        // On disk: chunks 0-9, 300-309 (305 corrupted) and 590-599; zeros
        // elsewhere.
        let mut part = vec![0u8; size];
        for r in [0..10, 300..310, 590..600] {
            part[r.start * c..r.end * c].copy_from_slice(&src[0][r.start * c..r.end * c]);
        }
        part[305 * c + 1] ^= 1;
        h.disk.insert(format!("big.bin{PART}"), part);
        h.run(10_000);
        h.assert_complete();

        let kept = (10 + 9 + 10) * c;
        assert_eq!(h.receiver.progress().bytes_resumed, kept as u64, "defer_prepare {defer_prepare}");
        assert_eq!(h.sender.stats().bytes_sent, (size - kept) as u64, "defer_prepare {defer_prepare}");
        let position = |f: &dyn Fn(&Ctl) -> bool| h.sent_by_receiver.iter().position(f).unwrap();
        let first_want = position(&|m| matches!(m, Ctl::Want { .. }));
        let last_page = position(&|m| matches!(m, Ctl::GetHashes { from: 512, .. }));
        assert!(
            first_want < last_page,
            "chunks were asked for only after the last page of hashes (defer_prepare {defer_prepare}): {:?}",
            h.sent_by_receiver
        );
    }
}

fn restart_items() -> (Manifest, Vec<Vec<u8>>) {
    source(
        MIN_CHUNK_SIZE,
        vec![
            Item::File("a.bin", pattern(20 * K16 + 1, 1)),
            Item::Dir("empty"),
            Item::File("b/b.bin", pattern(7 * K16, 2)),
            Item::Text("note", "still here"),
            Item::File("c.bin", pattern(33 * K16 - 5, 3)),
        ],
    )
}

fn tight() -> ReceiverConfig {
    ReceiverConfig { window_bytes: 4 * K16 as u64, ..ReceiverConfig::default() }
}

/// Runs until the receiver holds at least `numerator / denominator` of the
/// bytes and `also` holds.
fn run_until(h: &mut Harness, numerator: u64, denominator: u64, also: impl Fn(&Harness) -> bool) {
    for _ in 0..500 {
        h.drain();
        let p = h.receiver.progress();
        if p.bytes_total > 0 && p.bytes_done * denominator >= p.bytes_total * numerator && also(h) {
            return;
        }
        h.deliver();
    }
    panic!("no progress");
}

fn data_in_flight(h: &Harness) -> bool {
    h.receiver.in_flight().wanted_bytes > 0 && !h.data.is_empty()
}

/// (4) The connection drops mid-transfer and the sender process restarts:
/// the same Receiver continues without asking the user, and no verified
/// chunk is sent again.
#[test]
fn session_restart_with_new_sender() {
    let (manifest, src) = restart_items();
    let total = manifest.total_bytes();
    let mut h = Harness::new(manifest.clone(), src, tight());
    run_until(&mut h, 1, 3, data_in_flight);
    let done_before = h.receiver.progress().bytes_done;
    assert!(done_before < total && h.receiver.in_flight().wanted_bytes > 0, "dropped mid-transfer");

    h.drop_connection();
    h.receiver.start_session();
    h.sender = Sender::new(manifest);
    h.sender.start_session();
    h.run(500);
    h.assert_complete();
    assert_eq!(h.sender.stats().bytes_sent, total - done_before, "the new sender sent only what was missing");
    let offered = h.receiver_events.iter().filter(|e| **e == ReceiverEvent::Offered).count();
    assert_eq!(offered, 1, "asked the user once");
    assert!(h.receiver_events.contains(&ReceiverEvent::Resumed));
}

/// (4) Same Sender instance, reconnect with writes still pending on a slow
/// disk: hashes are answered from the sender's cache, pending writes land
/// and count, and nothing verified is sent again.
#[test]
fn session_restart_same_sender_slow_disk() {
    let (manifest, src) = restart_items();
    let total = manifest.total_bytes();
    let mut h = Harness::new(manifest, src, tight());
    h.write_delay = 2;
    run_until(&mut h, 1, 2, |h| data_in_flight(h) && h.receiver.in_flight().pending_writes > 0);
    let f = h.receiver.in_flight();
    let held = h.receiver.progress().bytes_done + (f.unwritten_bytes - f.wanted_bytes);
    assert!(f.pending_writes > 0, "some writes were pending at the drop");
    let hashed = h.hash_outputs;

    h.drop_connection();
    h.receiver.start_session();
    h.sender.start_session();
    h.run(500);
    h.assert_complete();
    assert_eq!(h.sender.stats().bytes_sent_session, total - held);
    assert_eq!(h.hash_outputs, hashed, "every hash came from the sender's cache");
}

/// (4) The drop happens while the manifest itself is in flight.
#[test]
fn session_restart_during_manifest() {
    let (manifest, src) = restart_items();
    let mut h = Harness::new(manifest, src, tight());
    h.drain();
    h.deliver(); // the manifest arrives
    h.drain(); // accepted; the accept is in flight
    assert!(h.to_sender.iter().any(|m| m.contains("accept")));
    h.drop_connection();
    h.receiver.start_session();
    h.sender.start_session();
    h.run(500);
    h.assert_complete();
    assert_eq!(h.receiver_events.iter().filter(|e| **e == ReceiverEvent::Offered).count(), 1);
}

/// (5) One corrupted frame: the chunk is discarded, reported and fetched
/// again; the file ends up right.
#[test]
fn corrupted_frame_is_refetched() {
    let (manifest, src) = restart_items();
    let total = manifest.total_bytes();
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    let target = 2 * K16 as u64; // chunk 2 of file 1
    let mut armed = true;
    h.frame_hook = Some(Box::new(move |frame: &mut Vec<u8>| {
        let (file, offset, _) = decode_frame(frame).unwrap();
        if armed && file == 1 && offset == target {
            armed = false;
            frame[FRAME_HEADER + 5] ^= 1;
            return true;
        }
        false
    }));
    h.run(200);
    h.assert_complete();
    assert!(h.receiver_events.contains(&ReceiverEvent::ChunkCorrupt { file: 1, chunk: 2, attempt: 1 }));
    assert_eq!(h.receiver.progress().corrupt_chunks, 1);
    assert_eq!(h.sender.stats().bytes_sent, total + K16 as u64, "the bad chunk was sent twice");
}

/// (5) A chunk that is corrupted every time cancels with `protocol` after
/// three attempts.
#[test]
fn persistent_corruption_cancels() {
    let (manifest, src) = restart_items();
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.frame_hook = Some(Box::new(|frame: &mut Vec<u8>| {
        let (file, offset, _) = decode_frame(frame).unwrap();
        if file == 0 && offset == K16 as u64 {
            frame[FRAME_HEADER] ^= 0xff;
        }
        true
    }));
    h.run(200);
    let corrupt: Vec<u32> = h
        .receiver_events
        .iter()
        .filter_map(|e| match e {
            ReceiverEvent::ChunkCorrupt { file: 0, chunk: 1, attempt } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(corrupt, [1, 2, 3]);
    assert_eq!(h.receiver_cancelled(), Some((CancelCode::Protocol, false)));
    assert_eq!(h.sender_cancelled(), Some((CancelCode::Protocol, true)));
    assert!(matches!(
        h.receiver_errors[..],
        [ProtocolError::ChunkRetries { file: 0, chunk: 1, attempts: 3 }]
    ));
}

/// (7) A source file changes after it was hashed: the sender's re-check
/// catches it and both sides end with `changed`.
#[test]
fn source_change_cancels_with_changed() {
    let (manifest, src) = restart_items();
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.after_hash = Some(Box::new(|src: &mut Vec<Vec<u8>>| src[1][100] ^= 1));
    h.run(200);
    assert_eq!(h.sender_cancelled(), Some((CancelCode::Changed, false)));
    assert_eq!(h.receiver_cancelled(), Some((CancelCode::Changed, true)));
    assert!(!h.receiver_events.contains(&ReceiverEvent::Complete));
}

/// (7) Between sessions the sender restarts with a file changed in place
/// (same size): the receiver's hash re-check catches it before any data.
#[test]
fn source_change_between_sessions_cancels() {
    let (manifest, mut src) = restart_items();
    let mut h = Harness::new(manifest.clone(), src.clone(), tight());
    run_until(&mut h, 1, 10, data_in_flight);
    h.drop_connection();
    src[0][20 * K16] ^= 1; // the last byte of a.bin, which is being received
    h.src = src;
    h.receiver.start_session();
    h.sender = Sender::new(manifest);
    h.sender.start_session();
    h.run(200);
    assert_eq!(h.receiver_cancelled(), Some((CancelCode::Changed, false)));
    assert_eq!(h.sender_cancelled(), Some((CancelCode::Changed, true)));
    assert!(matches!(h.receiver_errors[..], [ProtocolError::Changed { file: 0, .. }]));
}

/// (8) Decline reaches the sender with its reason.
#[test]
fn decline() {
    let (manifest, src) = restart_items();
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.accept = false;
    h.run(10);
    assert_eq!(h.receiver_events, [ReceiverEvent::Offered]);
    assert_eq!(h.receiver.manifest().map(|m| m.entries().len()), Some(5));
    h.receiver.decline("not today".into());
    h.run(10);
    assert_eq!(h.sender_events, [SenderEvent::Declined { reason: "not today".into() }]);
    assert!(h.sender.poll().is_none());
}

/// (8) Either side cancels mid-transfer: both see `Cancelled` with the code,
/// and the right `by_peer`; what is still in flight is ignored.
#[test]
fn cancel_from_either_side() {
    for receiver_cancels in [true, false] {
        let (manifest, src) = restart_items();
        let mut h = Harness::new(manifest, src, tight());
        run_until(&mut h, 1, 4, data_in_flight);
        if receiver_cancels {
            h.receiver.cancel(CancelCode::User, "ctrl-c".into());
        } else {
            h.sender.cancel(CancelCode::User, "ctrl-c".into());
        }
        h.run(50);
        let (mine, theirs) = if receiver_cancels {
            (h.receiver_cancelled(), h.sender_cancelled())
        } else {
            (h.sender_cancelled(), h.receiver_cancelled())
        };
        assert_eq!(mine, Some((CancelCode::User, false)));
        assert_eq!(theirs, Some((CancelCode::User, true)));
        assert!(h.receiver_errors.is_empty() && h.sender_errors.is_empty(), "late input is ignored");
        // Ended means ended.
        h.receiver.start_session();
        h.sender.start_session();
        h.drain();
        assert!(h.idle());
    }
}

/// (9) A slow disk: at every step, bytes asked for and not yet written stay
/// within the window and chunks asked for and not yet written within the
/// write limit (the harness checks after every call); and each limit is
/// actually reached, so the check can fail.
#[test]
fn flow_control_bounds_hold() {
    let cases = [
        // (window, max_pending_writes, which limit binds)
        (4 * K16 as u64, 64, "window"),
        (1 << 20, 3, "writes"),
        (K16 as u64 / 2, 64, "chunk larger than the window"),
    ];
    for (window_bytes, max_pending_writes, binds) in cases {
        let names = ["a", "b/c", "d", "e/f/g", "h", "i"];
        let items =
            names.iter().enumerate().map(|(i, n)| Item::File(n, pattern(K16 * (i + 1) + i, i as u64)));
        let (manifest, src) = source(MIN_CHUNK_SIZE, items.collect());
        let config = ReceiverConfig { window_bytes, max_pending_writes, ..ReceiverConfig::default() };
        let mut h = Harness::new(manifest, src, config);
        h.write_delay = 3;
        h.run(2000);
        h.assert_complete();
        match binds {
            "window" => assert_eq!(h.max_unwritten_bytes, window_bytes, "{binds}"),
            "writes" => assert_eq!(h.max_unwritten_chunks, max_pending_writes, "{binds}"),
            _ => assert_eq!((h.max_unwritten_chunks, h.max_unwritten_bytes), (1, K16 as u64), "{binds}"),
        }
    }
}

/// Hashes for a big file are fetched page by page (256 per message), a
/// bounded number in flight.
#[test]
fn hash_pages_are_bounded() {
    // 1000 chunks of 16 KiB: four pages.
    let (manifest, src) = source(MIN_CHUNK_SIZE, vec![Item::File("big", pattern(1000 * K16, 5))]);
    let config = ReceiverConfig { hash_pages_ahead: 2, window_bytes: 1 << 20, ..ReceiverConfig::default() };
    let mut h = Harness::new(manifest, src, config);
    h.run(200);
    h.assert_complete();
    let pages: Vec<u32> = h
        .sent_by_receiver
        .iter()
        .filter_map(|m| match m {
            Ctl::GetHashes { file: 0, from } => Some(*from),
            _ => None,
        })
        .collect();
    assert_eq!(pages, [0, 256, 512, 768]);
    for m in &h.sent_by_sender {
        if let Ctl::Hashes { from, hashes, .. } = m {
            let n = if *from == 768 { 232 } else { 256 };
            assert_eq!(hashes.len(), n * HASH_HEX_LEN);
        }
    }
    assert_eq!(h.receiver.progress().files_done, 1);
    let want = file_hash_of(&h.src[0], MIN_CHUNK_SIZE);
    assert!(h.receiver_events.contains(&ReceiverEvent::FileDone { file: 0, hash: want }));
}

/// An empty manifest completes at once; a manifest of only empty things
/// needs no data at all.
#[test]
fn empty_things() {
    let (manifest, src) = source(DEFAULT_CHUNK_SIZE, vec![]);
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.run(10);
    h.assert_complete();

    let (manifest, src) =
        source(DEFAULT_CHUNK_SIZE, vec![Item::Dir("x/y"), Item::File("x/e", vec![]), Item::Text("t", "")]);
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.run(10);
    h.assert_complete();
    assert_eq!(h.sender.stats().chunks_sent, 0);
    assert!(!h.sent_by_receiver.iter().any(|m| matches!(m, Ctl::GetHashes { .. } | Ctl::Want { .. })));
    let empty_hash = file_hash(0, DEFAULT_CHUNK_SIZE, &[]);
    assert!(h.receiver_events.contains(&ReceiverEvent::FileDone { file: 0, hash: empty_hash }));
}
