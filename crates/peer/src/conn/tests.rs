//! PeerConn without I/O: signals in, signals and events out.

use super::*;

/// A connection to `p-remote` on the impolite side, with one host address.
fn impolite_conn(now: Instant) -> PeerConn {
    PeerConn::new(
        PeerId::from_server("p-remote"),
        false,
        &["127.0.0.1:9".parse().unwrap()],
        &ConnConfig::default(),
        now,
    )
}

/// An authentic SDP older than one applied is ignored (it came the slow
/// way, or was replayed); one that is not authentic fails the connection.
#[test]
fn a_stale_authentic_sdp_is_ignored_and_a_forged_one_fails() {
    let now = Instant::now();
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let theirs = SignalKeys { local: k2, remote: k1 };
    let mut conn = impolite_conn(now);
    conn.set_keys(SignalKeys { local: k1, remote: k2 });
    let sdp = "v=0\r\n";
    let newer = theirs.sign("offer", 5, sdp);
    let Auth::Apply(seq) = conn.check_auth("offer", sdp, Some(&newer)).unwrap() else { panic!("fresh") };
    assert_eq!(seq, Some(5));
    // Not applied (ignored in a collision): an older one still counts.
    let older = theirs.sign("answer", 4, sdp);
    assert!(matches!(conn.check_auth("answer", sdp, Some(&older)).unwrap(), Auth::Apply(Some(4))));
    conn.applied(seq);
    assert!(matches!(conn.check_auth("answer", sdp, Some(&older)).unwrap(), Auth::Stale));
    assert!(
        matches!(conn.check_auth("offer", sdp, Some(&newer)).unwrap(), Auth::Stale),
        "the same one again"
    );
    assert_ne!(conn.state(), ConnState::Failed);
    let mut forged = theirs.sign("offer", 6, sdp);
    forged.mac = "00".repeat(32);
    assert!(conn.check_auth("offer", sdp, Some(&forged)).is_err());
    assert_eq!(conn.state(), ConnState::Failed);
}

/// Answers come back the way their offer went: one that comes the other
/// way answers an offer given up on, and is not applied to ours.
#[test]
fn an_answer_from_another_way_than_the_offer_went_is_ignored() {
    let now = Instant::now();
    let mut conn = impolite_conn(now);
    conn.open_channel(ChannelSpec::reliable("x"));
    let (_, added) = conn.pending.as_ref().expect("an offer is out");
    assert_eq!(added[0].1.label, SIGNAL_LABEL, "the first offer opens the signaling channel");
    assert_eq!(conn.pending_via, Via::Server, "not connected: through the server");
    let channel = Via::Channel(added[0].0);
    let answer = Signal::Answer { sdp: "not even an SDP".into(), auth: None };
    conn.handle_signal_via(answer.clone(), now, channel).unwrap();
    assert!(conn.pending.is_some(), "still waiting for the answer through the server");
    assert!(conn.handle_signal_via(answer, now, Via::Server).is_err(), "this one is read (and is no SDP)");
}

/// The signaling channel's messages as the fixture pins them: each is
/// read as the fixture says, and a signal written back is the same text.
#[test]
fn signal_channel_messages_match_the_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/peer/signal-channel.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(fixture["label"], SIGNAL_LABEL);
    let messages = fixture["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 6);
    for m in messages {
        let (name, text) = (m["name"].as_str().unwrap(), m["text"].as_str().unwrap());
        match ChannelSignal::parse(text.as_bytes()) {
            ChannelSignal::Hello => {
                assert_eq!(name, "hello");
                assert_eq!(text.as_bytes(), ChannelSignal::HELLO);
            }
            ChannelSignal::Signal(signal) => {
                assert_eq!(serde_json::to_string(&signal).unwrap(), text, "{name}");
            }
            ChannelSignal::Ignored(why) => assert_eq!(m["ignored"], true, "{name}: {why}"),
        }
    }
    assert!(matches!(ChannelSignal::parse(b"not json"), ChannelSignal::Ignored(_)));
}

#[test]
fn candidates_in_either_form_and_mdns_names() {
    let sdp = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:i0n\r\na=sctp-port:5000\r\n";
    assert_eq!(first_mid(sdp).as_deref(), Some("i0n"));
    assert!(is_mdns(
        "candidate:1 1 udp 2122260223 6f8a5e1c-91b2-4c1e-9d1a-2b3c4d5e6f70.local 54321 typ host"
    ));
    assert!(!is_mdns("candidate:1 1 udp 2122260223 192.0.2.7 54321 typ host"));
    let now = Instant::now();
    let mut c = PeerConn::new(PeerId::from_server("p-b"), true, &[], &ConnConfig::default(), now);
    for form in [
        "a=candidate:1 1 udp 2122260223 192.0.2.7 54321 typ host",
        "candidate:2 1 udp 2122260223 192.0.2.8 54321 typ host",
        "candidate:3 1 udp 2122260223 6f8a5e1c-91b2-4c1e-9d1a-2b3c4d5e6f70.local 54321 typ host",
    ] {
        c.handle_signal(Signal::Candidate { candidate: form.into(), mid: Some("0".into()) }, now).unwrap();
    }
    let remote: Vec<String> = c.remote_candidates().iter().map(|e| e.to_string()).collect();
    assert_eq!(remote, ["host 192.0.2.7:54321", "host 192.0.2.8:54321"]);
}

#[test]
fn media_in_an_offer_is_declined_and_the_data_channels_kept() {
    // What Chromium offers once a page adds a microphone and a camera.
    let offer = include_str!("../../../../fixtures/sdp/chromium-offer-audio-video-data.sdp");
    let now = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let mut c = PeerConn::new(PeerId::from_server("p-b"), true, &[addr], &ConnConfig::default(), now);
    c.handle_signal(Signal::Offer { sdp: offer.into(), auth: None }, now).unwrap();
    let answer = loop {
        match c.poll_output() {
            ConnOutput::Signal(Signal::Answer { sdp, .. }) => break sdp,
            ConnOutput::Timeout(_) => panic!("no answer"),
            _ => {}
        }
    };
    let m_lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
    assert_eq!(m_lines.len(), 3, "{answer}");
    assert!(m_lines[0].starts_with("m=audio 0 "), "audio rejected: {answer}");
    assert!(m_lines[1].starts_with("m=video 0 "), "video rejected: {answer}");
    assert!(m_lines[2].starts_with("m=application 9 "), "data kept: {answer}");
    assert!(answer.contains("a=group:BUNDLE 2\r\n"), "only the data m-line bundled: {answer}");
    // The channels the offer asks for still open on this connection.
    c.open_channel(ChannelSpec::reliable("x"));
}

#[test]
fn trickled_candidates_carry_our_mid() {
    let now = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let mut c = PeerConn::new(PeerId::from_server("p-b"), true, &[addr], &ConnConfig::default(), now);
    c.open_channel(ChannelSpec::reliable("x"));
    let mut mid_in_offer = None;
    let mut candidates = Vec::new();
    loop {
        match c.poll_output() {
            ConnOutput::Signal(Signal::Offer { sdp, .. }) => mid_in_offer = first_mid(&sdp),
            ConnOutput::Signal(Signal::Candidate { mid, .. }) => candidates.push(mid),
            ConnOutput::Timeout(_) => break,
            _ => {}
        }
    }
    assert!(mid_in_offer.is_some());
    assert_eq!(candidates, [mid_in_offer], "one host candidate, with the offer's mid");
}

/// A peer that floods candidates (on the signaling channel no server rate
/// limit covers) is refused past MAX_REMOTE_CANDIDATES distinct addresses;
/// one already known is still taken.
#[test]
fn remote_candidates_stay_bounded() {
    let now = Instant::now();
    let mut conn = impolite_conn(now);
    let candidate = |i: usize| Signal::Candidate {
        candidate: format!(
            "candidate:1 1 udp 2130706431 10.{}.{}.{} 5000 typ host",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ),
        mid: None,
    };
    for i in 0..MAX_REMOTE_CANDIDATES {
        conn.handle_signal(candidate(i), now).unwrap();
    }
    let refused = conn.handle_signal(candidate(MAX_REMOTE_CANDIDATES), now);
    assert!(matches!(refused, Err(Error::BadSignal { .. })), "{refused:?}");
    assert_eq!(conn.remote_kinds.len(), MAX_REMOTE_CANDIDATES);
    conn.handle_signal(candidate(7), now).expect("a known address is still taken");
}
