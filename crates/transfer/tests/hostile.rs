//! Hostile input: bad manifests, manifests over the limits, every kind of
//! protocol violation on both sides, and a seeded random barrage that must
//! produce errors and cancels, never a panic.

mod harness;

use harness::{Harness, Item, Rng, pattern, source};
use peerlink_transfer::*;
use serde_json::{Value, json};

const K16: usize = 16 << 10;

/// Everything the receiver has queued (bounded).
fn outputs(r: &mut Receiver) -> Vec<ReceiverOutput> {
    std::iter::from_fn(|| r.poll()).take(10_000).collect()
}

fn sender_outputs(s: &mut Sender) -> Vec<SenderOutput> {
    std::iter::from_fn(|| s.poll()).take(10_000).collect()
}

/// Feeds `msgs` to a fresh receiver and returns the first error.
fn offer(config: ReceiverConfig, msgs: &[String]) -> (Receiver, Option<ProtocolError>) {
    let mut r = Receiver::new(config);
    r.start_session();
    for msg in msgs {
        if let Err(e) = r.handle_ctl_json(msg) {
            return (r, Some(e));
        }
    }
    (r, None)
}

/// The receiver told the peer (`cancel`) and the user (`Cancelled`), with `code`.
fn assert_cancelled(r: &mut Receiver, code: CancelCode) {
    let outs = outputs(r);
    assert!(
        outs.iter().any(|o| matches!(o, ReceiverOutput::Ctl(Ctl::Cancel { code: c, .. }) if *c == code)),
        "cancel {code:?} queued: {outs:?}"
    );
    assert!(
        outs.iter().any(
            |o| matches!(o, ReceiverOutput::Event(ReceiverEvent::Cancelled { code: c, by_peer: false, .. }) if *c == code)
        ),
        "Cancelled {code:?} event: {outs:?}"
    );
    assert!(!outs.iter().any(|o| matches!(o, ReceiverOutput::Event(ReceiverEvent::Offered))));
}

fn assert_sender_cancelled(s: &mut Sender, code: CancelCode) {
    let outs = sender_outputs(s);
    assert!(
        outs.iter().any(|o| matches!(o, SenderOutput::Ctl(Ctl::Cancel { code: c, .. }) if *c == code)),
        "{outs:?}"
    );
    assert!(
        outs.iter().any(
            |o| matches!(o, SenderOutput::Event(SenderEvent::Cancelled { code: c, by_peer: false, .. }) if *c == code)
        ),
        "{outs:?}"
    );
}

/// The three messages of a manifest with these raw entries; `bytes` and
/// `entries` in the header are computed unless given.
fn manifest_msgs(chunk_size: u64, entries: Vec<Value>) -> Vec<String> {
    let bytes: u64 =
        entries.iter().filter(|e| e["kind"] != "dir").map(|e| e["size"].as_u64().unwrap_or(0)).sum();
    let header = json!({"type": "manifest", "version": 1, "chunk_size": chunk_size, "entries": entries.len(), "bytes": bytes});
    vec![
        header.to_string(),
        json!({"type": "manifest_part", "entries": entries}).to_string(),
        r#"{"type":"manifest_end"}"#.into(),
    ]
}

fn file(path: &str, size: u64) -> Value {
    json!({"kind": "file", "path": path, "size": size})
}

/// (6) Every path rule, each alone in an otherwise fine manifest.
#[test]
fn bad_paths_are_refused() {
    let bad = [
        "../x",
        "a/../../x",
        "..",
        "/etc/passwd",
        "C:\\x",
        "C:/x",
        "c:x",
        "a\\b",
        "a//b",
        "a/",
        ".",
        "a/./b",
        "",
        "a\0b",
        "a\u{1}b",
        "line\nbreak",
        "del\u{7f}",
    ];
    for path in bad {
        let msgs = manifest_msgs(16384, vec![file("ok", 1), file(path, 1)]);
        let (mut r, error) = offer(ReceiverConfig::default(), &msgs);
        assert!(
            matches!(error, Some(ProtocolError::BadManifest(ManifestError::Path { .. }))),
            "{path:?}: {error:?}"
        );
        assert_cancelled(&mut r, CancelCode::BadManifest);
    }
    let long = "a/".repeat(64) + "b";
    let too_long = "x".repeat(4097);
    for path in [long.as_str(), too_long.as_str()] {
        let (mut r, error) = offer(ReceiverConfig::default(), &manifest_msgs(16384, vec![file(path, 1)]));
        assert!(matches!(error, Some(ProtocolError::BadManifest(ManifestError::Path { .. }))));
        assert_cancelled(&mut r, CancelCode::BadManifest);
    }
}

/// (6) The rules between entries, sizes and the header.
#[test]
fn bad_manifests_are_refused() {
    let text_too_big = json!({"kind": "text", "path": "t", "size": (1 << 20) + 1});
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("duplicate", manifest_msgs(16384, vec![file("a", 1), file("a", 2)])),
        ("duplicate dir", manifest_msgs(16384, vec![file("a", 1), json!({"kind": "dir", "path": "a"})])),
        ("file used as folder", manifest_msgs(16384, vec![file("a", 1), file("a/b", 1)])),
        ("file used as folder, later", manifest_msgs(16384, vec![file("x/a/b", 1), file("x/a", 1)])),
        ("text over 1 MiB", manifest_msgs(16384, vec![text_too_big])),
        ("dir with a size", manifest_msgs(16384, vec![json!({"kind": "dir", "path": "d", "size": 5})])),
        ("unknown kind", manifest_msgs(16384, vec![json!({"kind": "symlink", "path": "l", "size": 0})])),
        ("file without size", manifest_msgs(16384, vec![json!({"kind": "file", "path": "f"})])),
        ("chunk size 0", manifest_msgs(0, vec![file("a", 1)])),
        ("chunk size not a power of two", manifest_msgs(16385, vec![file("a", 1)])),
        ("chunk size too small", manifest_msgs(8192, vec![file("a", 1)])),
        ("chunk size too big", manifest_msgs(32 << 20, vec![file("a", 1)])),
        ("chunk size beyond u32", manifest_msgs(1 << 32, vec![file("a", 1)])),
        ("a file of 2^22 + 1 chunks", manifest_msgs(16384, vec![file("big", (16384 << 22) + 1)])),
    ];
    for (name, msgs) in cases {
        let (mut r, error) = offer(ReceiverConfig::default(), &msgs);
        match error {
            Some(ProtocolError::BadManifest(_)) => assert_cancelled(&mut r, CancelCode::BadManifest),
            // A chunk size that is not a u32 does not even parse.
            Some(ProtocolError::Json(_)) if name == "chunk size beyond u32" => {
                assert_cancelled(&mut r, CancelCode::Protocol)
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    // Counts that do not match the header.
    let mut msgs = manifest_msgs(16384, vec![file("a", 1), file("b", 1)]);
    msgs[0] =
        json!({"type": "manifest", "version": 1, "chunk_size": 16384, "entries": 1, "bytes": 2}).to_string();
    let (mut r, error) = offer(ReceiverConfig::default(), &msgs);
    assert!(matches!(
        error,
        Some(ProtocolError::BadManifest(ManifestError::EntryCount { announced: 1, got: 2 }))
    ));
    assert_cancelled(&mut r, CancelCode::BadManifest);
    msgs[0] =
        json!({"type": "manifest", "version": 1, "chunk_size": 16384, "entries": 3, "bytes": 2}).to_string();
    let (_, error) = offer(ReceiverConfig::default(), &msgs);
    assert!(matches!(
        error,
        Some(ProtocolError::BadManifest(ManifestError::EntryCount { announced: 3, got: 2 }))
    ));
    msgs[0] =
        json!({"type": "manifest", "version": 1, "chunk_size": 16384, "entries": 2, "bytes": 7}).to_string();
    let (_, error) = offer(ReceiverConfig::default(), &msgs);
    assert!(matches!(
        error,
        Some(ProtocolError::BadManifest(ManifestError::ByteCount { announced: 7, got: 2 }))
    ));

    // And a good one is offered.
    let (mut r, error) =
        offer(ReceiverConfig::default(), &manifest_msgs(16384, vec![file("a", 1), file("b/c", 1)]));
    assert_eq!(error, None);
    assert_eq!(outputs(&mut r), [ReceiverOutput::Event(ReceiverEvent::Offered)]);
}

/// A sender that answers every `get_hashes` at once cannot make the receiver
/// hold the hashes of a whole huge file before any data came: it asks no
/// further than HASHES_AHEAD_OF_DATA chunks ahead of its data.
#[test]
fn hashes_are_asked_no_further_ahead_than_the_data_allows() {
    // 64 GiB in 16 KiB chunks: 2^22 chunks, 16,384 pages of hashes.
    let size = 16384u64 << 22;
    let (mut r, error) = offer(ReceiverConfig::default(), &manifest_msgs(16384, vec![file("big", size)]));
    assert_eq!(error, None);
    assert_eq!(outputs(&mut r), [ReceiverOutput::Event(ReceiverEvent::Offered)]);
    r.accept();
    let mut asked = 0u64;
    for _ in 0..100_000 {
        let mut answered = false;
        for out in outputs(&mut r) {
            match out {
                ReceiverOutput::Prepare { file } => {
                    r.partial_scanned(file, Vec::new());
                    answered = true;
                }
                ReceiverOutput::Ctl(Ctl::GetHashes { file, from }) => {
                    let n = (HASHES_PER_MESSAGE as u64).min((1 << 22) - u64::from(from));
                    asked += n;
                    let hashes = hashes_to_hex(&vec![[7u8; 32]; n as usize]);
                    r.handle_ctl(Ctl::Hashes { file, from, hashes }).unwrap();
                    answered = true;
                }
                _ => {}
            }
        }
        if !answered {
            break;
        }
    }
    assert!(asked > 0, "hashes were asked for");
    assert!(
        asked <= u64::from(HASHES_AHEAD_OF_DATA) + u64::from(HASHES_PER_MESSAGE),
        "{asked} chunks' hashes asked for before any data"
    );
}

/// A resumed file with more chunks on disk than hashes are asked for ahead,
/// whose hash pages all arrive before its partial file is scanned: the
/// chunks on disk are taken, and the hashes beyond them still asked for (it
/// used to stop there, nothing in flight and nothing to wake it).
#[test]
fn a_resume_with_more_on_disk_than_the_hash_window_goes_on() {
    const CHUNKS: u32 = HASHES_AHEAD_OF_DATA + 3000;
    let size = 16384 * u64::from(CHUNKS);
    let (mut r, error) = offer(ReceiverConfig::default(), &manifest_msgs(16384, vec![file("big", size)]));
    assert_eq!(error, None);
    r.accept();
    let hash = [7u8; 32];
    let mut prepared = None;
    let mut answered_pages = 0;
    let mut finished = false;
    for _ in 0..10_000 {
        let mut progress = false;
        for out in outputs(&mut r) {
            match out {
                ReceiverOutput::Prepare { file } => prepared = Some(file),
                ReceiverOutput::Ctl(Ctl::GetHashes { file, from }) => {
                    let n = HASHES_PER_MESSAGE.min(CHUNKS - from) as usize;
                    r.handle_ctl(Ctl::Hashes { file, from, hashes: hashes_to_hex(&vec![hash; n]) }).unwrap();
                    answered_pages += 1;
                    progress = true;
                }
                ReceiverOutput::Finish { .. } => finished = true,
                _ => {}
            }
        }
        if !progress && let Some(file) = prepared.take() {
            // Scanned only now: every chunk is on disk and matches.
            r.partial_scanned(file, vec![Some(hash); CHUNKS as usize]);
            progress = true;
        }
        if !progress {
            break;
        }
    }
    assert!(finished, "the file was finished from disk after {answered_pages} pages of hashes");
    assert_eq!(answered_pages, CHUNKS.div_ceil(HASHES_PER_MESSAGE));
}

/// (6) A header over the receiver's limits is refused with `too_large`
/// before any part arrives; another version with `protocol`.
#[test]
fn manifest_over_limits() {
    let config = ReceiverConfig { max_entries: 10, max_total_bytes: 1000, ..ReceiverConfig::default() };
    let header = |entries: u64, bytes: u64| {
        json!({"type": "manifest", "version": 1, "chunk_size": 16384, "entries": entries, "bytes": bytes})
            .to_string()
    };
    for (entries, bytes) in [(11, 0), (1, 1001), (u64::MAX, u64::MAX)] {
        let (mut r, error) = offer(config, &[header(entries, bytes)]);
        assert!(matches!(error, Some(ProtocolError::TooLarge { .. })), "{error:?}");
        assert_cancelled(&mut r, CancelCode::TooLarge);
    }
    let (_, error) = offer(config, &[header(10, 1000)]);
    assert_eq!(error, None, "at the limits is fine");

    // The paths' bytes are counted as the parts arrive: what collecting
    // the manifest holds stays within the limit.
    let config = ReceiverConfig { max_path_bytes: 11, ..ReceiverConfig::default() };
    let msgs = manifest_msgs(16384, vec![file("abcdef", 1), file("ghijkl", 1)]);
    let (mut r, error) = offer(config, &msgs);
    assert!(
        matches!(error, Some(ProtocolError::TooLarge { what: "path bytes", value: 12, limit: 11 })),
        "{error:?}"
    );
    assert_cancelled(&mut r, CancelCode::TooLarge);
    let (_, error) = offer(ReceiverConfig { max_path_bytes: 12, ..config }, &msgs);
    assert_eq!(error, None, "at the limit is fine");

    let v2 =
        json!({"type": "manifest", "version": 2, "chunk_size": 16384, "entries": 0, "bytes": 0}).to_string();
    let (mut r, error) = offer(config, &[v2]);
    assert_eq!(error, Some(ProtocolError::Version { version: 2, supported: 1 }));
    assert_cancelled(&mut r, CancelCode::Protocol);
}

/// A harness stopped with chunk data in flight (several frames per chunk).
fn mid_transfer() -> Harness {
    let (manifest, src) = source(
        MIN_CHUNK_SIZE,
        vec![Item::File("a", pattern(3 * K16 + 7, 1)), Item::File("b", pattern(2 * K16, 2))],
    );
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.max_message = 1000;
    for _ in 0..20 {
        h.drain();
        if h.data.len() > 2 {
            return h;
        }
        h.deliver();
    }
    panic!("no data in flight");
}

/// Injects a bad frame or message into the receiver mid-transfer and checks
/// the error, the cancel, and that the sender hears of it.
fn receiver_rejects(
    inject: impl FnOnce(&mut Harness) -> Result<(), ProtocolError>,
    check: impl FnOnce(&ProtocolError),
) {
    let mut h = mid_transfer();
    let error = inject(&mut h).expect_err("refused");
    check(&error);
    assert_eq!(error.cancel_code(), CancelCode::Protocol);
    assert_cancelled(&mut h.receiver, CancelCode::Protocol);
    // The receiver's `cancel` went to the peer with its outputs above; tell the sender.
    h.sender.handle_ctl(Ctl::Cancel { code: CancelCode::Protocol, reason: error.to_string() }).unwrap();
    h.drain();
    assert_eq!(h.sender_cancelled(), Some((CancelCode::Protocol, true)));
    // Whatever is still in flight is ignored, without errors.
    h.receiver_errors.clear();
    h.run(50);
    assert!(h.receiver_errors.is_empty());
}

/// (10) Frames the receiver did not ask for, out of order, crossing a chunk,
/// too short; messages in the wrong state or of an unknown type.
#[test]
fn receiver_protocol_errors() {
    receiver_rejects(
        |h| h.receiver.handle_data(&encode_frame(1, 0, b"x")),
        |e| {
            assert!(
                matches!(e, ProtocolError::UnaskedFrame { file: 1, offset: 0, expected: Some((0, 0)) }),
                "{e}"
            )
        },
    );
    receiver_rejects(
        |h| h.receiver.handle_data(&encode_frame(99, 0, b"x")),
        |e| assert!(matches!(e, ProtocolError::UnaskedFrame { file: 99, .. }), "{e}"),
    );
    receiver_rejects(
        |h| {
            let second = h.data[1].clone();
            h.receiver.handle_data(&second)
        },
        |e| assert!(matches!(e, ProtocolError::UnaskedFrame { file: 0, expected: Some((0, 0)), .. }), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_data(&encode_frame(0, 0, &vec![0; K16 + 1])),
        |e| {
            assert!(
                matches!(e, ProtocolError::FrameCrossesChunk { file: 0, offset: 0, len } if *len == K16 + 1),
                "{e}"
            )
        },
    );
    receiver_rejects(
        |h| {
            let first = h.data[0].clone();
            h.receiver.handle_data(&first).unwrap();
            // The same frame again: the offset no longer fits.
            h.receiver.handle_data(&first)
        },
        |e| assert!(matches!(e, ProtocolError::UnaskedFrame { .. }), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_data(&[1, 2, 3]),
        |e| assert_eq!(*e, ProtocolError::ShortFrame { len: 3 }),
    );
    receiver_rejects(
        |h| h.receiver.handle_data(&[0; 12]),
        |e| assert_eq!(*e, ProtocolError::ShortFrame { len: 12 }),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl_json(r#"{"type":"teleport","to":"mars"}"#),
        |e| assert!(matches!(e, ProtocolError::Json(_)), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl_json("\u{0}garbage{"),
        |e| assert!(matches!(e, ProtocolError::Json(_))),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl(Ctl::Done { files: 2, bytes: 1 }),
        |e| assert!(matches!(e, ProtocolError::Unexpected { msg: "done", .. }), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl(Ctl::Accept),
        |e| assert!(matches!(e, ProtocolError::Unexpected { msg: "accept", .. }), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl(Ctl::ManifestEnd),
        |e| assert!(matches!(e, ProtocolError::Unexpected { msg: "manifest_end", .. }), "{e}"),
    );
    receiver_rejects(
        |h| h.receiver.handle_ctl(Ctl::Hashes { file: 0, from: 256, hashes: String::new() }),
        |e| assert!(matches!(e, ProtocolError::UnaskedHashes { file: 0, from: 256, expected: None }), "{e}"),
    );
}

/// (10) A `hashes` page with the wrong number of hashes, or bad hex.
#[test]
fn bad_hashes_pages() {
    for mangle in [0, 1, 2] {
        let (manifest, src) = source(MIN_CHUNK_SIZE, vec![Item::File("a", pattern(3 * K16, 1))]);
        let mut h = Harness::new(manifest, src, ReceiverConfig::default());
        let mut hashes_msg = None;
        for _ in 0..10 {
            h.drain();
            if let Some(at) = h.to_receiver.iter().position(|m| m.contains("\"hashes\"")) {
                hashes_msg = h.to_receiver.remove(at);
                break;
            }
            h.deliver();
        }
        let Ctl::Hashes { file, from, mut hashes } =
            Ctl::from_json(&hashes_msg.expect("a hashes message")).unwrap()
        else {
            panic!("hashes")
        };
        match mangle {
            0 => hashes.truncate(2 * HASH_HEX_LEN),
            1 => hashes.push_str(&"0".repeat(HASH_HEX_LEN)),
            _ => hashes.replace_range(0..1, "z"),
        }
        let error = h.receiver.handle_ctl(Ctl::Hashes { file, from, hashes }).unwrap_err();
        match mangle {
            0 => assert_eq!(error, ProtocolError::HashCount { file: 0, from: 0, got: 2, expected: 3 }),
            1 => assert_eq!(error, ProtocolError::HashCount { file: 0, from: 0, got: 4, expected: 3 }),
            _ => assert!(matches!(error, ProtocolError::BadHashes { .. })),
        }
        assert_cancelled(&mut h.receiver, CancelCode::Protocol);
    }
}

/// (10) The sender refuses requests for files or chunks that do not exist,
/// requests before `accept`, a second `accept`, a wrong `done`, and
/// messages only a receiver should get.
#[test]
fn sender_protocol_errors() {
    type Expect = fn(&ProtocolError) -> bool;
    let cases: Vec<(Ctl, Expect)> = vec![
        (Ctl::Want { file: 9, ranges: vec![[0, 1]] }, |e| {
            matches!(e, ProtocolError::NoSuchFile { file: 9, files: 2 })
        }),
        (Ctl::Want { file: 0, ranges: vec![[0, 1], [3, 5]] }, |e| {
            matches!(e, ProtocolError::BadRange { file: 0, start: 3, end: 5, chunks: 4 })
        }),
        (Ctl::Want { file: 0, ranges: vec![[2, 2]] }, |e| matches!(e, ProtocolError::BadRange { .. })),
        (Ctl::Want { file: 0, ranges: vec![[3, 1]] }, |e| matches!(e, ProtocolError::BadRange { .. })),
        (Ctl::GetHashes { file: 0, from: 4 }, |e| matches!(e, ProtocolError::BadRange { .. })),
        (Ctl::GetHashes { file: 2, from: 0 }, |e| matches!(e, ProtocolError::NoSuchFile { .. })),
        (Ctl::Accept, |e| matches!(e, ProtocolError::Unexpected { msg: "accept", .. })),
        (Ctl::Decline { reason: String::new() }, |e| {
            matches!(e, ProtocolError::Unexpected { msg: "decline", .. })
        }),
        (Ctl::Done { files: 2, bytes: 5 }, |e| matches!(e, ProtocolError::DoneMismatch { .. })),
        (Ctl::Hashes { file: 0, from: 0, hashes: String::new() }, |e| {
            matches!(e, ProtocolError::Unexpected { msg: "hashes", .. })
        }),
        (Ctl::ManifestPart { entries: vec![] }, |e| matches!(e, ProtocolError::Unexpected { .. })),
    ];
    for (msg, expected) in cases {
        let (manifest, src) = source(
            MIN_CHUNK_SIZE,
            vec![Item::File("a", pattern(3 * K16 + 7, 1)), Item::Dir("d"), Item::File("b", vec![1])],
        );
        let mut h = Harness::new(manifest, src, ReceiverConfig::default());
        h.run_for(2); // manifest there, accept back
        assert!(h.sender_events.contains(&SenderEvent::Accepted));
        let error = h.sender.handle_ctl(msg.clone()).unwrap_err();
        assert!(expected(&error), "{msg:?}: {error}");
        assert_sender_cancelled(&mut h.sender, CancelCode::Protocol);
    }

    // Before `accept`, and garbage.
    let (manifest, _) = source(MIN_CHUNK_SIZE, vec![Item::File("a", vec![1])]);
    let mut s = Sender::new(manifest.clone());
    assert!(matches!(s.handle_ctl(Ctl::Accept), Err(ProtocolError::Unexpected { .. })), "no session yet");
    let mut s = Sender::new(manifest.clone());
    s.start_session();
    let error = s.handle_ctl(Ctl::GetHashes { file: 0, from: 0 }).unwrap_err();
    assert!(matches!(error, ProtocolError::Unexpected { msg: "get_hashes", .. }));
    assert_sender_cancelled(&mut s, CancelCode::Protocol);
    let mut s = Sender::new(manifest);
    s.start_session();
    assert!(matches!(s.handle_ctl_json("{]"), Err(ProtocolError::Json(_))));
    assert_sender_cancelled(&mut s, CancelCode::Protocol);
}

/// The sender bounds what a receiver can queue.
#[test]
fn sender_queues_are_bounded() {
    let (manifest, src) = source(MIN_CHUNK_SIZE, vec![Item::File("a", pattern(300 * K16, 1))]);
    let mut h = Harness::new(manifest, src, ReceiverConfig::default());
    h.run_for(2);
    let ranges: Vec<[u32; 2]> =
        (0..MAX_QUEUED_WANT_RANGES as u32 + 1).map(|i| [i % 300, i % 300 + 1]).collect();
    let error = h.sender.handle_ctl(Ctl::Want { file: 0, ranges }).unwrap_err();
    assert!(matches!(error, ProtocolError::TooManyRequests { .. }));
}

// ---- the random barrage ----

/// Seeds per run; raise it locally to search longer.
const FUZZ_SEEDS: u64 = 150;

fn pick<T: Clone>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize].clone()
}

fn number(rng: &mut Rng) -> Value {
    let n: [Value; 14] = [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(255),
        json!(256),
        json!(16384),
        json!(1 << 20),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(-1),
        json!(1.5),
        json!("7"),
        Value::Null,
    ];
    pick(rng, &n)
}

fn random_entry(rng: &mut Rng) -> Value {
    let kind = pick(rng, &["file", "dir", "text", "link", ""]);
    let path = pick(rng, &["a", "b/c", "a/b", "../x", "", "ü n", "a\u{0}", "C:/x", "d"]);
    match rng.below(3) {
        0 => json!({"kind": kind, "path": path}),
        _ => json!({"kind": kind, "path": path, "size": number(rng)}),
    }
}

fn random_ctl(rng: &mut Rng) -> String {
    let v = match rng.below(16) {
        0 => {
            json!({"type": "manifest", "version": number(rng), "chunk_size": number(rng), "entries": number(rng), "bytes": number(rng)})
        }
        1 => {
            let n = rng.below(4);
            json!({"type": "manifest_part", "entries": (0..n).map(|_| random_entry(rng)).collect::<Vec<_>>()})
        }
        2 => json!({"type": "manifest_end"}),
        3 => {
            let hashes = match rng.below(3) {
                0 => "ab".repeat(32 * rng.below(5) as usize),
                1 => "x".repeat(rng.below(200) as usize),
                _ => String::new(),
            };
            json!({"type": "hashes", "file": number(rng), "from": number(rng), "hashes": hashes})
        }
        4 => json!({"type": "accept"}),
        5 => json!({"type": "decline", "reason": number(rng)}),
        6 => json!({"type": "get_hashes", "file": number(rng), "from": number(rng)}),
        7 => {
            let ranges: Vec<Value> = (0..rng.below(4)).map(|_| json!([number(rng), number(rng)])).collect();
            json!({"type": "want", "file": number(rng), "ranges": ranges})
        }
        8 => json!({"type": "done", "files": number(rng), "bytes": number(rng)}),
        9 => json!({"type": "cancel", "code": pick(rng, &["user", "io", "zzz", ""]), "reason": "r"}),
        10 => {
            let bytes: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        11 => json!({"type": pick(rng, &["", "Manifest", "wants", "x"])}),
        12 => pick(rng, &[json!([1, 2]), json!("manifest"), json!(3), Value::Null, json!({})]),
        13 => {
            let text = json!({"type": "want", "file": 0, "ranges": [[0, 1]]}).to_string();
            let cut = rng.below(text.len() as u64) as usize;
            return text[..cut].to_string();
        }
        _ => json!({"type": "want", "file": rng.below(3), "ranges": [[rng.below(5), rng.below(6)]]}),
    };
    v.to_string()
}

fn random_frame(rng: &mut Rng, h: &Harness) -> Vec<u8> {
    match rng.below(4) {
        0 => (0..rng.below(30)).map(|_| rng.next() as u8).collect(),
        1 if !h.data.is_empty() => {
            // A real frame in flight, mangled.
            let mut frame = h.data[rng.below(h.data.len() as u64) as usize].clone();
            match rng.below(3) {
                0 => frame.truncate(rng.below(frame.len() as u64 + 1) as usize),
                1 => frame.extend((0..rng.below(100)).map(|_| rng.next() as u8)),
                _ => {
                    let at = rng.below(frame.len() as u64) as usize;
                    frame[at] ^= 1 << rng.below(8);
                }
            }
            frame
        }
        _ => {
            let payload: Vec<u8> = (0..1 + rng.below(2 * K16 as u64)).map(|_| rng.next() as u8).collect();
            let offset = pick(rng, &[0, 1000, K16 as u64, u64::MAX, u64::MAX - 5]);
            encode_frame(rng.below(3) as u32, offset, &payload)
        }
    }
}

/// (10) Seeded random messages, frames and driver calls against both sides
/// at random points of a real transfer: errors, never a panic.
#[test]
fn random_input_never_panics() {
    let mut errors = 0;
    for seed in 1..=FUZZ_SEEDS {
        let mut rng = Rng(seed * 0x9e37_79b9);
        let (manifest, src) = source(
            MIN_CHUNK_SIZE,
            vec![
                Item::File("a", pattern(3 * K16 + 7, seed)),
                Item::Dir("d"),
                Item::Text("t", "text"),
                Item::File("b/c", pattern(100, seed)),
            ],
        );
        let mut h = Harness::new(manifest, src, ReceiverConfig::default());
        h.max_message = 4000;
        h.check_limits = false;
        h.run_for(rng.below(6) as usize);
        for _ in 0..40 {
            let result = match rng.below(12) {
                0 | 1 => h.receiver.handle_ctl_json(&random_ctl(&mut rng)),
                2 | 3 => h.sender.handle_ctl_json(&random_ctl(&mut rng)),
                4 | 5 => {
                    let frame = random_frame(&mut rng, &h);
                    h.receiver.handle_data(&frame)
                }
                6 => {
                    let (file, chunk) = (rng.below(5) as u32, rng.below(5) as u32);
                    match rng.below(4) {
                        0 => h.receiver.chunk_written(file, chunk),
                        1 => h.receiver.file_finished(file),
                        2 => {
                            let hashes = (0..rng.below(6))
                                .map(|i| (i % 2 == 0).then(|| [rng.next() as u8; 32]))
                                .collect();
                            h.receiver.partial_scanned(file, hashes)
                        }
                        _ => h.receiver.write_failed(file, rng.below(2) == 0, "boom".into()),
                    }
                    Ok(())
                }
                7 => {
                    let hashes = (0..rng.below(300)).map(|_| [rng.next() as u8; 32]).collect();
                    h.sender.hashes_computed(
                        rng.below(5) as u32,
                        pick(&mut rng, &[0, 1, 3, u32::MAX]),
                        hashes,
                    );
                    Ok(())
                }
                8 => {
                    match rng.below(5) {
                        0 => h.receiver.accept(),
                        1 => h.receiver.decline("no".into()),
                        2 => h.receiver.start_session(),
                        3 => h.sender.start_session(),
                        _ => h.sender.read_failed(rng.below(5) as u32, "eio".into()),
                    }
                    Ok(())
                }
                _ => {
                    // Carry on normally for a while, without the harness's
                    // checks (random calls above break its bookkeeping).
                    outputs(&mut h.receiver);
                    sender_outputs(&mut h.sender);
                    Ok(())
                }
            };
            if result.is_err() {
                errors += 1;
            }
            // Whatever they produce must be producible.
            for out in outputs(&mut h.receiver) {
                if let ReceiverOutput::Ctl(msg) = out {
                    assert!(msg.to_json().len() <= MAX_CTL_BYTES);
                }
            }
            for out in sender_outputs(&mut h.sender) {
                if let SenderOutput::Ctl(msg) = out {
                    assert!(msg.to_json().len() <= MAX_CTL_BYTES);
                }
            }
            let _ = (h.receiver.progress(), h.receiver.in_flight(), h.sender.stats());
        }
    }
    assert!(errors > 150, "the barrage hit errors ({errors})");
}
