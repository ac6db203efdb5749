//! `peerlink send` / `peerlink receive` end to end: the real binary, a real
//! `peerlink serve`, WebRTC on 127.0.0.1 only.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn send(url: &str, what: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec!["send".to_string()];
    args.extend(net_args(url));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(what.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn_env(&args, env)
}

fn receive(url: &str, code: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["receive".to_string()];
    args.extend(net_args(url));
    args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    if !code.is_empty() {
        args.push(code.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(&args)
}

fn code_of(sender: &mut Proc) -> String {
    sender.expect_event("code", |_| true)["code"].as_str().unwrap().to_string()
}

fn finished(p: &Proc) -> Value {
    p.events("finished").pop().unwrap_or_else(|| panic!("no finished event in {:?}\n{}", p.seen, p.stderr()))
}

/// No partial or bookkeeping files are left, so nothing half-written looks done.
fn assert_clean(out: &Path) {
    for (path, _) in tree(out) {
        assert!(!path.ends_with(".peerlink-part") && !path.contains(".peerlink-resume"), "leftover {path}");
    }
}

fn sends_and_receives(url: &str, src: &[&str], out: &Path, env: &[(&str, &str)]) -> (Proc, Proc) {
    let mut s = send(url, src, &[], env);
    let code = code_of(&mut s);
    let mut r = receive(url, &code, out, &["--yes"]);
    assert_eq!(r.wait_exit(), 0, "receiver: {:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 0, "sender: {:?}\n{}", s.seen, s.stderr());
    (s, r)
}

#[test]
fn files_folders_unicode_names_empty_files_and_empty_folders_arrive_intact() {
    let server = serve();
    let t = Scratch::new("roundtrip");
    let src = t.path("src/photos 2026");
    std::fs::create_dir_all(src.join("日本語/ネスト")).unwrap();
    std::fs::create_dir_all(src.join("empty folder")).unwrap();
    std::fs::write(src.join("empty.txt"), "").unwrap();
    std::fs::write(src.join("ñandú ü.txt"), "¡hola!").unwrap();
    std::fs::write(src.join("日本語/ネスト/データ.bin"), pattern(3 << 20 | 12345, 1)).unwrap();
    std::fs::write(src.join("exactly one chunk.bin"), pattern(1 << 20, 2)).unwrap();
    let single = t.path("src/single file.dat");
    std::fs::write(&single, pattern(777, 3)).unwrap();
    let out = t.path("out");

    let (s, r) = sends_and_receives(
        &server.url,
        &[&t.str("src/photos 2026"), &t.str("src/single file.dat")],
        &out,
        &[],
    );
    assert_eq!(tree(&out.join("photos 2026")), tree(&src));
    assert_eq!(sha256_file(&out.join("single file.dat")), sha256_file(&single));
    assert_clean(&out);
    assert_eq!(finished(&r)["files"], 5);
    assert_eq!(finished(&r)["corrupt_chunks"], 0);
    assert_eq!(finished(&s)["ok"], true);
    // Every file's hash was reported as it was stored.
    assert_eq!(r.events("saved").len(), 5);
}

#[test]
fn a_256_mib_file_arrives_intact() {
    let server = serve();
    let t = Scratch::new("big");
    let src = t.path("big.bin");
    write_big(&src, 256, 7);
    let out = t.path("out");
    let (s, r) = sends_and_receives(&server.url, &[&t.str("big.bin")], &out, &[]);
    assert_eq!(sha256_file(&out.join("big.bin")), sha256_file(&src));
    assert_eq!(finished(&s)["bytes_sent"], 256 << 20, "each byte sent once");
    assert_eq!(finished(&r)["bytes_received"], 256 << 20);
    assert_clean(&out);
}

#[test]
fn a_thousand_small_files_in_nested_folders_arrive_intact() {
    let server = serve();
    let t = Scratch::new("many");
    let src = t.path("tree");
    for i in 0..1000u64 {
        let dir = src.join(format!("d{}/e{}", i % 10, i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.txt")), pattern(100 + (i as usize * 37) % 4000, i)).unwrap();
    }
    let out = t.path("out");
    let (_, r) = sends_and_receives(&server.url, &[&t.str("tree")], &out, &[]);
    assert_eq!(tree(&out.join("tree")), tree(&src));
    assert_eq!(finished(&r)["files"], 1000);
    assert_clean(&out);
}

#[test]
fn a_text_message_is_shown_not_stored() {
    let server = serve();
    let t = Scratch::new("text");
    let out = t.path("out");
    let mut s = send(&server.url, &[], &["--text", "héllo from peerlink ✓"], &[]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    let text = r.expect_event("text", |_| true);
    assert_eq!(text["text"], "héllo from peerlink ✓");
    assert_eq!(r.wait_exit(), 0);
    assert_eq!(s.wait_exit(), 0);
    assert!(tree(&out).is_empty(), "a text is not written to disk: {:?}", tree(&out));
}

/// The sender dies half-way (SIGKILL); started again with the same code, it
/// serves only what the receiver does not have yet.
#[test]
fn a_killed_sender_restarted_with_the_same_code_sends_only_the_missing_bytes() {
    let server = serve();
    let t = Scratch::new("resume-sender");
    let src = t.path("data.bin");
    write_big(&src, 32, 11);
    let total = 32u64 << 20;
    let out = t.path("out");
    // Throttled so that the kill lands in the middle.
    let mut s1 =
        send(&server.url, &[&t.str("data.bin")], &[], &[("PEERLINK_TEST_FAULT", "throttle=8000000")]);
    let code = code_of(&mut s1);
    let mut r = receive(&server.url, &code, &out, &["--yes", "--wait", "60s"]);
    r.expect_event("progress", |v| v["bytes_done"].as_u64().unwrap() >= 8 << 20);
    s1.signal("KILL");
    s1.wait_exit();
    let lost = r.expect_event("lost", |_| true);
    assert!(lost["bytes_done"].as_u64().unwrap() < total, "killed before the end");

    let mut s2 = send(&server.url, &[&t.str("data.bin")], &["--code", &code], &[]);
    let resumed = r.expect_event("connected", |_| true);
    assert_eq!(r.wait_exit(), 0, "{:?}\n{}", r.seen, r.stderr());
    assert_eq!(s2.wait_exit(), 0, "{:?}\n{}", s2.seen, s2.stderr());
    assert_eq!(sha256_file(&out.join("data.bin")), sha256_file(&src));
    assert_clean(&out);

    let had = resumed["bytes_done"].as_u64().unwrap();
    let sent_again = finished(&s2)["bytes_sent"].as_u64().unwrap();
    assert!(had >= 8 << 20, "the first sender delivered at least 8 MiB: {had}");
    assert_eq!(sent_again, total - had, "the restarted sender sent exactly the missing bytes");
    assert_eq!(finished(&r)["bytes_received"].as_u64().unwrap(), sent_again);
}

/// The receiver dies half-way; `receive --resume` (no code needed) continues
/// from the verified data on disk.
#[test]
fn a_killed_receiver_resumes_from_what_is_on_disk() {
    let server = serve();
    let t = Scratch::new("resume-receiver");
    let src = t.path("data.bin");
    write_big(&src, 32, 12);
    let total = 32u64 << 20;
    let out = t.path("out");
    let mut s = send(
        &server.url,
        &[&t.str("data.bin")],
        &["--wait", "60s"],
        &[("PEERLINK_TEST_FAULT", "throttle=8000000")],
    );
    let code = code_of(&mut s);
    let mut r1 = receive(&server.url, &code, &out, &["--yes"]);
    r1.expect_event("progress", |v| v["bytes_done"].as_u64().unwrap() >= 8 << 20);
    r1.signal("KILL");
    r1.wait_exit();
    assert!(!out.join("data.bin").exists(), "an unfinished file is not presented as complete");
    assert!(out.join("data.bin.peerlink-part").exists(), "partial data is kept");
    s.expect_event("lost", |_| true);

    let mut r2 = receive(&server.url, "", &out, &["--yes", "--resume"]);
    assert_eq!(r2.wait_exit(), 0, "{:?}\n{}", r2.seen, r2.stderr());
    assert_eq!(s.wait_exit(), 0, "{:?}\n{}", s.seen, s.stderr());
    assert_eq!(sha256_file(&out.join("data.bin")), sha256_file(&src));
    assert_clean(&out);
    let f = finished(&r2);
    let resumed = f["bytes_resumed"].as_u64().unwrap();
    assert!(resumed >= 8 << 20, "verified data on disk was kept: {resumed}");
    assert_eq!(
        f["bytes_received"].as_u64().unwrap(),
        total - resumed,
        "only the missing bytes were sent again"
    );
}

#[test]
fn a_range_corrupted_in_flight_is_detected_and_fetched_again() {
    let server = serve();
    let t = Scratch::new("corrupt");
    let src = t.path("c.bin");
    std::fs::write(&src, pattern(4 << 20, 5)).unwrap();
    let out = t.path("out");
    let (_, r) = sends_and_receives(
        &server.url,
        &[&t.str("c.bin")],
        &out,
        &[("PEERLINK_TEST_FAULT", "corrupt=0:1048576")],
    );
    let bad = r.events("corrupt_chunk");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["chunk"], 1);
    assert_eq!(finished(&r)["corrupt_chunks"], 1);
    assert_eq!(finished(&r)["bytes_received"], (4 << 20) + (1 << 20), "the bad chunk came twice");
    assert_eq!(sha256_file(&out.join("c.bin")), sha256_file(&src));
}

fn refused_manifest(path: &str) {
    let server = serve();
    let t = Scratch::new(&format!("evil-{}", path.len()));
    std::fs::write(t.path("innocent.txt"), "x").unwrap();
    let out = t.path("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut s = send(
        &server.url,
        &[&t.str("innocent.txt")],
        &[],
        &[("PEERLINK_TEST_FAULT", &format!("manifest-path={path}"))],
    );
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    assert_eq!(r.wait_exit(), 4, "{:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 4, "{:?}\n{}", s.seen, s.stderr());
    assert!(finished(&r)["message"].as_str().unwrap().contains("path"), "{}", finished(&r));
    assert!(tree(&out).is_empty(), "nothing written: {:?}", tree(&out));
    assert!(!t.path("evil.txt").exists());
}

#[test]
fn a_manifest_path_with_dot_dot_is_refused() {
    refused_manifest("../evil.txt");
}

#[test]
fn an_absolute_manifest_path_is_refused() {
    refused_manifest("/tmp/evil.txt");
}

/// Names the receiver keeps for itself in the output folder: a sent file
/// named like its resume record could point a later `--resume` elsewhere.
#[test]
fn a_manifest_naming_a_resume_record_or_a_partial_file_is_refused() {
    refused_manifest("docs/.peerlink-resume.done");
    refused_manifest("notes.txt.peerlink-part");
}

/// A file already where the offer puts a folder is a conflict on the
/// receiver's disk, not the sender's attack: a plain failure (exit 1) that
/// says what is in the way, not the security exit code.
#[test]
fn a_file_where_a_folder_goes_is_a_disk_conflict_not_a_security_failure() {
    let server = serve();
    let t = Scratch::new("conflict");
    std::fs::create_dir_all(t.path("src/photos")).unwrap();
    std::fs::write(t.path("src/photos/a.txt"), "a").unwrap();
    let out = t.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("photos"), "a file, not a folder").unwrap();
    let mut s = send(&server.url, &[&t.str("src/photos")], &[], &[]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    assert_eq!(r.wait_exit(), 1, "{:?}\n{}", r.seen, r.stderr());
    let message = finished(&r)["message"].as_str().unwrap().to_string();
    assert!(message.contains("photos") && message.contains("exists"), "{message}");
    assert_eq!(std::fs::read_to_string(out.join("photos")).unwrap(), "a file, not a folder");
    s.wait_exit();
}

#[test]
fn a_symlink_in_the_output_folder_is_not_followed() {
    let server = serve();
    let t = Scratch::new("symlink");
    let outside = t.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let out = t.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("docs")).unwrap();
    std::fs::create_dir_all(t.path("src/docs")).unwrap();
    std::fs::write(t.path("src/docs/report.txt"), "data").unwrap();
    let mut s = send(&server.url, &[&t.str("src/docs")], &[], &[]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes", "--overwrite"]);
    assert_eq!(r.wait_exit(), 4, "{:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 4);
    assert!(finished(&r)["message"].as_str().unwrap().contains("symbolic link"), "{}", finished(&r));
    assert!(tree(&outside).is_empty(), "nothing written through the link: {:?}", tree(&outside));
}

#[test]
fn a_wrong_code_fails_at_once_and_burns_the_code() {
    let server = serve();
    let t = Scratch::new("wrong");
    std::fs::write(t.path("secret.txt"), "s3cret").unwrap();
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("secret.txt")], &[], &[]);
    let code = code_of(&mut s);
    // Same nameplate (same room), different words.
    let nameplate = code.split('-').next().unwrap();
    let wrong = format!("{nameplate}-zebra-zebra-zebra");
    assert_ne!(wrong, code);
    let mut r = receive(&server.url, &wrong, &out, &["--yes"]);
    assert_eq!(r.wait_exit(), 4, "{:?}\n{}", r.seen, r.stderr());
    assert!(finished(&r)["message"].as_str().unwrap().contains("code"), "{}", finished(&r));
    assert_eq!(s.wait_exit(), 4, "the sender gives the code up: {:?}", s.seen);
    // The right code is dead now too: nobody is sending under it.
    let mut again = receive(&server.url, &code, &out, &["--yes"]);
    assert_eq!(again.wait_exit(), 1);
    assert!(again.stderr().contains("nobody is sending"), "{}", again.stderr());
    assert!(tree(&out).is_empty());
}

#[test]
fn a_used_code_is_dead() {
    let server = serve();
    let t = Scratch::new("used");
    std::fs::write(t.path("once.txt"), "once").unwrap();
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("once.txt")], &[], &[]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    assert_eq!(r.wait_exit(), 0);
    assert_eq!(s.wait_exit(), 0);
    let mut again = receive(&server.url, &code, &t.path("out2"), &["--yes"]);
    assert_eq!(again.wait_exit(), 1);
    assert!(again.stderr().contains("nobody is sending"), "{}", again.stderr());
}

/// A client in the code's room that never completes pairing: a squatter,
/// a crashed receiver. Here `peerlink chat`, which ignores pairing messages.
fn squatter(url: &str, code: &str) -> Proc {
    let room = format!("pair-{}", code.split('-').next().unwrap());
    let mut p =
        Proc::spawn(&["chat", &room, "--server", url, "--name", "squatter", "--ice-addr", "127.0.0.1"]);
    p.expect(&format!("* joined {room}"));
    p
}

/// The sender starts pairing with whoever comes first; if that peer goes
/// quiet, it gives up on it after --pairing-timeout and pairs with the
/// receiver that asked meanwhile.
#[test]
fn a_quiet_peer_in_the_room_does_not_hold_the_sender_up() {
    let server = serve();
    let t = Scratch::new("squat-sender");
    std::fs::write(t.path("a.txt"), "payload").unwrap();
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("a.txt")], &["--pairing-timeout", "2s"], &[]);
    let code = code_of(&mut s);
    let _squatter = squatter(&server.url, &code);
    // The sender is pairing with the squatter before the receiver arrives.
    s.expect_event("peer", |_| true);
    let mut r = receive(&server.url, &code, &out, &["--yes", "--pairing-timeout", "20s"]);
    assert_eq!(r.wait_exit(), 0, "receiver: {:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 0, "sender: {:?}\n{}", s.seen, s.stderr());
    assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "payload");
}

/// A quiet peer that got into the room before the sender is the first one
/// the receiver tries; after --pairing-timeout it tries the next member.
#[test]
fn a_quiet_peer_ahead_of_the_sender_does_not_hold_the_receiver_up() {
    let server = serve();
    let t = Scratch::new("squat-receiver");
    std::fs::write(t.path("a.txt"), "payload").unwrap();
    let out = t.path("out");
    let code = "4242-acid-zebra-lantern";
    let _squatter = squatter(&server.url, code);
    let mut s = send(&server.url, &[&t.str("a.txt")], &["--code", code, "--pairing-timeout", "3s"], &[]);
    s.expect_event("peer", |_| true);
    let mut r = receive(&server.url, code, &out, &["--yes", "--pairing-timeout", "2s"]);
    assert_eq!(r.wait_exit(), 0, "receiver: {:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 0, "sender: {:?}\n{}", s.seen, s.stderr());
    assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "payload");
    assert!(
        r.events("notice").iter().any(|n| n["message"].as_str().unwrap().contains("trying the next")),
        "{:?}",
        r.seen
    );
}

/// With nobody but a quiet peer in the room, the receiver says so and
/// stops instead of waiting forever.
#[test]
fn a_receiver_facing_only_a_quiet_peer_gives_up_with_a_clear_error() {
    let server = serve();
    let t = Scratch::new("squat-only");
    let code = "4343-acid-zebra-lantern";
    let _squatter = squatter(&server.url, code);
    let mut r = receive(&server.url, code, &t.path("out"), &["--yes", "--pairing-timeout", "2s"]);
    assert_eq!(r.wait_exit(), 1, "{:?}\n{}", r.seen, r.stderr());
    let message = finished(&r)["message"].as_str().unwrap().to_string();
    assert!(message.contains("did not complete pairing within 2 s"), "{message}");
}

#[test]
fn a_receiver_without_a_terminal_or_yes_declines() {
    let server = serve();
    let t = Scratch::new("decline");
    std::fs::write(t.path("a.txt"), "a").unwrap();
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("a.txt")], &[], &[]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &[]);
    assert_eq!(r.wait_exit(), 5, "{:?}\n{}", r.seen, r.stderr());
    assert_eq!(s.wait_exit(), 5, "{:?}\n{}", s.seen, s.stderr());
    assert!(tree(&out).is_empty());
}

/// A file rewritten while it is being sent: the sender notices before the
/// changed bytes go out (the file was modified since the hashes the
/// receiver was given), both sides stop and say which file, and nothing is
/// presented as complete.
#[test]
fn a_file_changed_while_being_sent_stops_the_transfer() {
    let server = serve();
    let t = Scratch::new("changed");
    write_big(&t.path("live.bin"), 16, 5);
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("live.bin")], &[], &[("PEERLINK_TEST_FAULT", "throttle=4000000")]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    r.expect_event("progress", |v| v["bytes_done"].as_u64().unwrap() >= 2 << 20);
    // Same size, other bytes, written in place (never shorter, so only the
    // hashes can tell): the last 8 MiB, which have not been sent yet.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(t.path("live.bin")).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&pattern(8 << 20, 6)).unwrap();
    }
    assert_ne!(s.wait_exit(), 0, "{:?}\n{}", s.seen, s.stderr());
    assert_ne!(r.wait_exit(), 0, "{:?}\n{}", r.seen, r.stderr());
    for p in [&s, &r] {
        let message = finished(p)["message"].as_str().unwrap().to_string();
        assert!(message.contains("live.bin changed while it was being sent"), "{message}");
    }
    assert!(!out.join("live.bin").exists(), "not presented as complete");
}

/// Ctrl-C on one side: both stop with exit code 3, the other side is told
/// why, and nothing half-received looks complete.
fn cancel_from(side: &str) {
    let server = serve();
    let t = Scratch::new(&format!("cancel-{side}"));
    write_big(&t.path("slow.bin"), 16, 3);
    let out = t.path("out");
    let mut s = send(&server.url, &[&t.str("slow.bin")], &[], &[("PEERLINK_TEST_FAULT", "throttle=4000000")]);
    let code = code_of(&mut s);
    let mut r = receive(&server.url, &code, &out, &["--yes"]);
    r.expect_event("progress", |v| v["bytes_done"].as_u64().unwrap() >= 2 << 20);
    let (who, other) = if side == "sender" { (&mut s, &mut r) } else { (&mut r, &mut s) };
    who.signal("INT");
    assert_eq!(who.wait_exit(), 3, "{:?}\n{}", who.seen, who.stderr());
    assert_eq!(other.wait_exit(), 3, "{:?}\n{}", other.seen, other.stderr());
    let told = finished(other)["message"].as_str().unwrap().to_string();
    assert!(told.contains(&format!("the {side} stopped the transfer")), "{told}");
    assert!(!out.join("slow.bin").exists(), "not presented as complete");
    assert!(out.join("slow.bin.peerlink-part").exists(), "partial data kept for resume");
}

#[test]
fn ctrl_c_on_the_receiver_cancels_both_sides() {
    cancel_from("receiver");
}

#[test]
fn ctrl_c_on_the_sender_cancels_both_sides() {
    cancel_from("sender");
}

/// A receiver that asks for every chunk of a file at once and then reads
/// nothing fills the sender's data path and its queue of chunks to send;
/// the sender must still hear Ctrl-C (it used to wait on that queue and
/// ignore it until killed).
#[test]
fn a_sender_facing_a_receiver_that_asks_for_everything_and_stops_reading_still_stops_on_ctrl_c() {
    let server = serve();
    let t = Scratch::new("hostile-want");
    write_big(&t.path("big.bin"), 64, 13);
    let out = t.path("out");
    // 16 KiB chunks: 4,096 of them, far more than the sender queues.
    let mut s = send(&server.url, &[&t.str("big.bin")], &[], &[("PEERLINK_TEST_FAULT", "chunk-size=16384")]);
    let code = code_of(&mut s);
    let mut args = vec!["receive".to_string()];
    args.extend(net_args(&server.url));
    args.extend(["--out".into(), out.to_string_lossy().into_owned(), "--yes".into(), code]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut r = Proc::spawn_env(&args, &[("PEERLINK_TEST_FAULT", "want-all")]);
    s.expect_event("accepted", |_| true);
    // Long enough for the channel, the pump and its queue to fill.
    std::thread::sleep(std::time::Duration::from_secs(4));
    s.signal("INT");
    assert_eq!(s.wait_exit(), 3, "{:?}\n{}", s.seen, s.stderr());
    let f = finished(&s);
    assert!(
        f["bytes_sent"].as_u64().unwrap() < 64 << 20,
        "the receiver read nothing, so not all was sent: {f}"
    );
    r.terminate();
    let _ = r.wait_exit();
}

/// Runs `receive CODE --yes --json` in a mount namespace of its own with a
/// tmpfs of `size` on `out`, after `before` (a shell command; `$OUT` is the
/// folder) and beside `during` (run once the partial file appears); prints
/// `exit=N` and then the folder's listing.
fn receive_on_tmpfs(server: &str, code: &str, out: &Path, size: &str, during: &str) -> Proc {
    std::fs::create_dir_all(out).unwrap();
    let script = format!(
        "OUT='{out}'; mount -t tmpfs -o size={size} tmpfs \"$OUT\" || exit 99
         '{bin}' receive --server '{server}' --ice-addr 127.0.0.1 --json --yes --out \"$OUT\" {code} & pid=$!
         if [ -n '{during}' ]; then
           i=0; while [ ! -e \"$OUT/big.bin.peerlink-part\" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
           {during}
         fi
         wait $pid; echo \"exit=$?\"; ls \"$OUT\"",
        out = out.display(),
        bin = BIN,
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Proc::from_command(cmd)
}

/// An offer larger than the space left where it would go is refused at
/// once, before anything is written, and the sender is told why.
#[test]
fn an_offer_larger_than_the_free_space_is_refused_before_anything_is_written() {
    let server = serve();
    let t = Scratch::new("nospace");
    write_big(&t.path("big.bin"), 8, 9);
    let mut s = send(&server.url, &[&t.str("big.bin")], &[], &[]);
    let code = code_of(&mut s);
    let out = t.path("mnt");
    let mut r = receive_on_tmpfs(&server.url, &code, &out, "4m", "");
    r.expect("exit=6");
    r.wait_exit();
    let message = finished(&r)["message"].as_str().unwrap().to_string();
    assert!(message.contains("not enough space") && message.contains("MiB"), "{message}");
    assert!(
        !r.seen.iter().any(|l| l.contains("peerlink-part") || l.contains("\"progress\"")),
        "nothing written: {:?}",
        r.seen
    );
    assert_eq!(s.wait_exit(), 6, "the sender is told: {:?}", s.seen);
    assert!(finished(&s)["message"].as_str().unwrap().contains("not enough space"), "{}", finished(&s));
}

/// Out of room for one more file (no inode left) while the bytes fit: exit
/// 6 and `disk_full` on both sides, as when a write finds the disk full
/// (it was exit 1, `io`).
#[test]
fn no_room_for_one_more_file_is_a_full_disk() {
    let server = serve();
    let t = Scratch::new("noinodes");
    std::fs::create_dir_all(t.path("many")).unwrap();
    for i in 0..40 {
        std::fs::write(t.path(&format!("many/f{i:02}.txt")), format!("file {i}\n")).unwrap();
    }
    let mut s = send(&server.url, &[&t.str("many")], &[], &[]);
    let code = code_of(&mut s);
    let out = t.path("mnt");
    let mut r = receive_on_tmpfs(&server.url, &code, &out, "4m,nr_inodes=12", "");
    r.expect("exit=6");
    r.wait_exit();
    let message = finished(&r)["message"].as_str().unwrap().to_string();
    assert!(message.contains("No space left"), "{message}");
    assert_eq!(s.wait_exit(), 6, "the sender is told: {:?}", s.seen);
}

/// A resumed transfer counts only what is still missing against the free
/// space: a file an earlier run finished is not needed again (12 MiB free,
/// two 5 MiB files: after the first is saved, 7 MiB free covers the rest).
#[test]
fn a_resume_needs_space_only_for_what_is_missing() {
    let server = serve();
    let t = Scratch::new("resume-space");
    std::fs::create_dir_all(t.path("src")).unwrap();
    write_big(&t.path("src/a.bin"), 5, 21);
    write_big(&t.path("src/b.bin"), 5, 22);
    let mut s = send(&server.url, &[&t.str("src")], &[], &[("PEERLINK_TEST_FAULT", "throttle=4000000")]);
    let code = code_of(&mut s);
    let out = t.path("mnt");
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        "OUT='{out}'; mount -t tmpfs -o size=12m tmpfs \"$OUT\" || exit 99
         '{bin}' receive --server '{server}' --ice-addr 127.0.0.1 --json --yes --out \"$OUT\" {code} > /dev/null & pid=$!
         i=0; while [ ! -e \"$OUT/src/a.bin\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
         kill -9 $pid; wait $pid
         echo \"first run: $(ls \"$OUT/src\" | tr '\\n' ' ')\"
         '{bin}' receive --ice-addr 127.0.0.1 --json --yes --resume --out \"$OUT\"; echo \"exit=$?\"
         cmp '{src}/a.bin' \"$OUT/src/a.bin\" && cmp '{src}/b.bin' \"$OUT/src/b.bin\" && echo same",
        out = out.display(),
        bin = BIN,
        server = server.url,
        src = t.path("src").display(),
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut r = Proc::from_command(cmd);
    let first = r.expect("first run:");
    assert!(first.contains("a.bin") && first.contains("b.bin.peerlink-part"), "{first}");
    r.expect("exit=0");
    r.expect("same");
    r.wait_exit();
    assert_eq!(s.wait_exit(), 0, "{:?}", s.seen);
}

/// The disk fills during the transfer (something else wrote to it): both
/// sides stop with exit 6 and the partial file is kept for a resume.
#[test]
fn a_disk_that_fills_during_the_transfer_is_reported_and_partial_data_kept() {
    let server = serve();
    let t = Scratch::new("diskfull");
    write_big(&t.path("big.bin"), 6, 9);
    let mut s = send(&server.url, &[&t.str("big.bin")], &[], &[("PEERLINK_TEST_FAULT", "throttle=2000000")]);
    let code = code_of(&mut s);
    let out = t.path("mnt");
    // 8 MiB: the offer fits; 4 MiB written beside it once it started do not.
    let mut r = receive_on_tmpfs(
        &server.url,
        &code,
        &out,
        "8m",
        "head -c 4194304 /dev/zero > \"$OUT/other\" || true",
    );
    r.expect("exit=6");
    r.expect("big.bin.peerlink-part");
    r.wait_exit();
    assert!(finished(&r)["message"].as_str().unwrap().contains("disk"), "{}", finished(&r));
    assert_eq!(s.wait_exit(), 6, "the sender is told: {:?}", s.seen);
}
