//! Negotiation races and backpressure, over a real signaling server and real
//! str0m connections on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Peer, Server};
use peerlink_peer::{ChannelSpec, ConnState, Message, SendError};

/// Both peers open channels at the same moment, first on a fresh connection
/// (both make the initial offer: glare) and again once connected; both end
/// with every channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glare_both_sides_add_channels_at_once() {
    let server = Server::start().await;
    let cfg = || {
        let mut c = server.config("glare");
        c.channels = vec![]; // no automatic channels: each side opens its own
        c
    };
    let mut a = Peer::join(cfg()).await;
    let mut b = Peer::join(cfg()).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("b present", |p| p.joined.contains(&ib)).await;
    b.until("a present", |p| p.joined.contains(&ia)).await;

    let (ra, rb) = tokio::join!(
        a.room.open_channel(&ib, ChannelSpec::reliable("a1")),
        b.room.open_channel(&ia, ChannelSpec::reliable("b1")),
    );
    ra.unwrap();
    rb.unwrap();
    let first = ["a1", "b1"];
    a.until("both first channels", |p| first.iter().all(|l| p.has_channel(&ib, l))).await;
    b.until("both first channels", |p| first.iter().all(|l| p.has_channel(&ia, l))).await;

    // Connected now: add more from both sides at once.
    let (ra, rb) = tokio::join!(
        async {
            a.room.open_channel(&ib, ChannelSpec::unreliable("a2")).await?;
            a.room.open_channel(&ib, ChannelSpec::max_lifetime("a3", 200)).await
        },
        async {
            b.room.open_channel(&ia, ChannelSpec::reliable("b2")).await?;
            b.room.open_channel(&ia, ChannelSpec::unreliable("b3")).await
        },
    );
    ra.unwrap();
    rb.unwrap();
    let all = ["a1", "b1", "a2", "a3", "b2", "b3"];
    a.until("all channels", |p| all.iter().all(|l| p.has_channel(&ib, l))).await;
    b.until("all channels", |p| all.iter().all(|l| p.has_channel(&ia, l))).await;
    assert_eq!(a.states.get(&ib), Some(&ConnState::Connected));

    // Every channel carries data both ways.
    for l in all {
        a.channel(&ib, l).send(format!("a on {l}")).await.unwrap();
        b.channel(&ia, l).send(format!("b on {l}")).await.unwrap();
    }
    a.until("data on all", |p| all.iter().all(|l| p.texts_from(&ib, l) == vec![format!("b on {l}")])).await;
    b.until("data on all", |p| all.iter().all(|l| p.texts_from(&ia, l) == vec![format!("a on {l}")])).await;
    server.stop().await;
}

/// A sender outrunning a slow receiver: the send queue never exceeds its
/// bound, `try_send` overflows with the typed error, and the reliable channel
/// delivers every byte in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_memory_and_loses_nothing() {
    const QUEUE: usize = 256 * 1024;
    const MSG: usize = 16 * 1024;
    const TOTAL: usize = 16 * 1024 * 1024;
    const RECEIVE_QUEUE: usize = 256 * 1024;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = Server::start().await;
    let mut cfg = server.config("bp");
    cfg.channels = vec![ChannelSpec::reliable("bulk")];
    cfg.send_queue_bytes = QUEUE;
    let mut tx = Peer::join(cfg.clone()).await;
    cfg.receive_queue_bytes = RECEIVE_QUEUE; // a receiver that holds little
    let mut rx_room = peerlink_peer::Room::join(cfg).await.unwrap();
    let irx = rx_room.id().clone();
    tx.until("channel", |p| p.has_channel(&irx, "bulk")).await;
    let rx = loop {
        match tokio::time::timeout(Duration::from_secs(20), rx_room.next_event())
            .await
            .expect("channel opens")
        {
            Some(peerlink_peer::Event::ChannelOpen { channel }) => break channel,
            Some(_) => {}
            None => panic!("room closed"),
        }
    };
    let ch = tx.channel(&irx, "bulk");
    assert_eq!(ch.queue_capacity(), QUEUE);

    // Oversized messages fail clearly instead of being split or dropped.
    let max = ch.max_message_size();
    assert!(max >= 64 * 1024, "max message size {max}");
    assert_eq!(ch.try_send(vec![0u8; max + 1]), Err(SendError::TooLarge { size: max + 1, max }));

    let sender = tokio::spawn(async move {
        let mut overflowed = false;
        let mut max_queued = 0;
        for i in 0..TOTAL / MSG {
            let mut m = vec![(i % 251) as u8; MSG];
            m[..8].copy_from_slice(&(i as u64).to_be_bytes());
            if !overflowed {
                match ch.try_send(m.clone()) {
                    Ok(()) => {
                        max_queued = max_queued.max(ch.queued_bytes());
                        continue;
                    }
                    Err(SendError::Overflow { queued, capacity }) => {
                        assert_eq!(capacity, QUEUE);
                        assert!(queued + MSG > QUEUE, "overflow only when full: {queued}");
                        overflowed = true;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            ch.send(m).await.unwrap();
            max_queued = max_queued.max(ch.queued_bytes());
        }
        ch.flush().await.unwrap();
        (overflowed, max_queued)
    });

    // The receiver reads slowly at first, then catches up. What waits in
    // its receive queue stays near the queue's bound (the room stops
    // reading the network when the queue is full; what SCTP has already
    // reassembled still lands).
    let mut expected = 0usize;
    let mut bytes = 0usize;
    let mut most_waiting = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while bytes < TOTAL {
        most_waiting = most_waiting.max(rx.received_bytes_waiting());
        let m = tokio::time::timeout_at(deadline, rx.recv()).await.expect("data keeps coming");
        let Some(Message::Binary(b)) = m else { panic!("binary messages until the end, got {m:?}") };
        assert_eq!(b.len(), MSG);
        let seq = u64::from_be_bytes(b[..8].try_into().unwrap()) as usize;
        assert_eq!(seq, expected, "in order, nothing lost");
        assert!(b[8..].iter().all(|x| *x == (seq % 251) as u8), "content intact");
        expected += 1;
        bytes += b.len();
        if expected < 64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(most_waiting <= RECEIVE_QUEUE + 1024 * 1024, "receive queue bounded: {most_waiting}");
    assert!(most_waiting > RECEIVE_QUEUE / 2, "the slow start filled the receive queue: {most_waiting}");
    let (overflowed, max_queued) = sender.await.unwrap();
    drop(rx_room);
    assert!(overflowed, "try_send reported overflow when the queue was full");
    assert!(max_queued <= QUEUE, "queue stayed within its bound: {max_queued}");
    assert_eq!(expected, TOTAL / MSG);
    server.stop().await;
}

/// A receiver that stops reading its channel for longer than the silence
/// watch (2.5 s): the sender is held back, neither side takes the pause for
/// a dead path (no disconnect, no ICE restart: ICE checks are still
/// answered while the data waits), and once it reads again everything
/// arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_holds_the_sender_back_and_keeps_the_connection() {
    use peerlink_peer::{Event, Room};
    const MSG: usize = 16 * 1024;
    const TOTAL: usize = 16 * 1024 * 1024;
    const PAUSE: Duration = Duration::from_secs(6);
    let server = Server::start().await;
    let mut cfg = server.config("pause");
    cfg.channels = vec![ChannelSpec::reliable("bulk")];
    let mut tx = Peer::join(cfg.clone()).await;
    cfg.receive_queue_bytes = 256 * 1024;
    let mut rx_room = Room::join(cfg).await.unwrap();
    let (irx, itx) = (rx_room.id().clone(), tx.id());
    tx.until("channel", |p| p.has_channel(&irx, "bulk")).await;
    let rx = loop {
        match tokio::time::timeout(common::WAIT, rx_room.next_event()).await.expect("channel opens") {
            Some(Event::ChannelOpen { channel }) => break channel,
            Some(_) => {}
            None => panic!("room closed"),
        }
    };
    let ch = tx.channel(&irx, "bulk");
    let sender = tokio::spawn(async move {
        for i in 0..TOTAL / MSG {
            let mut m = vec![(i % 251) as u8; MSG];
            m[..8].copy_from_slice(&(i as u64).to_be_bytes());
            ch.send(m).await.unwrap();
        }
        ch.flush().await.unwrap();
    });

    // Nobody reads the channel; both rooms' events are taken meanwhile.
    let mut rx_states = Vec::new();
    let watch_rx = async {
        let end = tokio::time::Instant::now() + PAUSE;
        while let Ok(Some(ev)) = tokio::time::timeout_at(end, rx_room.next_event()).await {
            if let Event::StateChanged { state, .. } = ev {
                rx_states.push(state);
            }
        }
    };
    tokio::join!(watch_rx, tx.pump_for(PAUSE));
    assert!(!sender.is_finished(), "the sender was held back while nobody read");
    assert!(rx.received_bytes_waiting() > 0, "data waited to be read");
    assert_eq!(
        rx_states,
        Vec::<ConnState>::new(),
        "the reader's connection never changed state in the pause"
    );
    assert_eq!(tx.states.get(&irx), Some(&ConnState::Connected), "the sender's connection stayed up");
    let stats = rx_room.stats(&itx).await.unwrap();
    assert_eq!(stats.ice_restarts, 0, "no ICE restart");

    // Reading again: everything, in order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for expected in 0..TOTAL / MSG {
        let m = tokio::time::timeout_at(deadline, rx.recv()).await.expect("data keeps coming");
        let Some(Message::Binary(b)) = m else { panic!("binary messages until the end, got {m:?}") };
        let seq = u64::from_be_bytes(b[..8].try_into().unwrap()) as usize;
        assert_eq!(seq, expected, "in order, nothing lost");
    }
    tokio::time::timeout_at(deadline, sender).await.expect("the sender finished").unwrap();
    drop(rx_room);
    server.stop().await;
}

/// `DataChannel::close` on one side: what was queued still arrives, in order,
/// both sides hear the channel close, the closer's sends are refused, and the
/// connection's other channel goes on carrying data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_sends_what_was_queued_ends_it_at_both_ends_and_keeps_the_others() {
    let server = Server::start().await;
    let mut cfg = server.config("close");
    cfg.channels = vec![ChannelSpec::reliable("bulk"), ChannelSpec::reliable("chat")];
    let mut a = Peer::join(cfg.clone()).await;
    let mut b = Peer::join(cfg).await;
    let (ia, ib) = (a.id(), b.id());
    a.until("channels", |p| p.has_channel(&ib, "bulk") && p.has_channel(&ib, "chat")).await;
    b.until("channels", |p| p.has_channel(&ia, "bulk") && p.has_channel(&ia, "chat")).await;

    let bulk = a.channel(&ib, "bulk");
    // Queued faster than SCTP takes them: most are still in the queue when
    // the channel is closed.
    const N: usize = 400;
    for i in 0..N {
        bulk.send(format!("{i:05}{}", "x".repeat(16 * 1024))).await.unwrap();
    }
    bulk.close();
    assert!(bulk.is_closed());
    assert!(matches!(bulk.send("after close").await, Err(SendError::Closed)));
    assert!(matches!(bulk.try_send("after close"), Err(SendError::Closed)));

    b.until("bulk closed at b", |p| p.closed_channels.contains(&(ia.clone(), "bulk".to_string()))).await;
    a.until("bulk closed at a", |p| p.closed_channels.contains(&(ib.clone(), "bulk".to_string()))).await;
    let got = b.texts_from(&ia, "bulk");
    assert_eq!(got.len(), N, "every message queued before close arrives");
    for (i, m) in got.iter().enumerate() {
        assert!(m.starts_with(&format!("{i:05}")), "in order: {i} is {}", &m[..5]);
    }
    assert!(!b.has_channel(&ia, "bulk") && !a.has_channel(&ib, "bulk"));

    // The other channel and the connection are untouched.
    a.channel(&ib, "chat").send("still here").await.unwrap();
    b.channel(&ia, "chat").send("me too").await.unwrap();
    b.until("chat from a", |p| p.texts_from(&ia, "chat") == ["still here"]).await;
    a.until("chat from b", |p| p.texts_from(&ib, "chat") == ["me too"]).await;
    assert_eq!(a.states.get(&ib), Some(&ConnState::Connected));
    assert_eq!(a.closed_channels.len(), 1);
    assert_eq!(b.closed_channels.len(), 1);
    server.stop().await;
}
