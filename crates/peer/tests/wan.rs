//! Channels over an emulated lossy WAN: the peers' own drivers delay and
//! drop the datagrams they send (`RoomConfig::netem`), over a real
//! signaling server and real str0m connections on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Peer, Server};
use peerlink_peer::{ChannelSpec, NetEm};

/// At 1 % and 5 % loss each way (20 ms round trips), a reliable channel
/// delivers every message once and in order; an unreliable one, sending at
/// the same time, loses some (at 5 %), duplicates none, and holds nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_channels_stay_intact_through_loss_and_unreliable_ones_drop() {
    const N: usize = 400;
    for (i, loss) in [0.01, 0.05].into_iter().enumerate() {
        let server = Server::start().await;
        let mut cfg = server.config(&format!("lossy-{i}"));
        cfg.channels = vec![ChannelSpec::reliable("r"), ChannelSpec::unreliable("u")];
        let em = |seed| NetEm { loss, seed, ..NetEm::delay(Duration::from_millis(10)) };
        cfg.netem = Some(em(1));
        let mut a = Peer::join(cfg.clone()).await;
        cfg.netem = Some(em(2));
        let mut b = Peer::join(cfg).await;
        let (ia, ib) = (a.id(), b.id());
        a.until("channels", |p| p.has_channel(&ib, "r") && p.has_channel(&ib, "u")).await;
        b.until("channels", |p| p.has_channel(&ia, "r") && p.has_channel(&ia, "u")).await;

        let (r, u) = (a.channel(&ib, "r"), a.channel(&ib, "u"));
        let pad = "x".repeat(1000);
        for n in 0..N {
            r.send(format!("{n} {pad}")).await.unwrap();
            u.send(format!("{n} {pad}")).await.unwrap();
        }
        b.until("every reliable message", |p| p.texts_from(&ia, "r").len() >= N).await;
        let want: Vec<String> = (0..N).map(|n| format!("{n} {pad}")).collect();
        assert_eq!(b.texts_from(&ia, "r"), want, "loss {loss}: every message once, in order");

        // What of the unreliable stream arrived by now arrived once.
        let got = b.texts_from(&ia, "u");
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "loss {loss}: no duplicates");
        assert!(got.len() >= N / 2, "loss {loss}: {} of {N} unreliable messages", got.len());
        if loss >= 0.05 {
            // 400 datagrams at 5 %: losing none is a one in a billion chance.
            assert!(got.len() < N, "loss {loss}: the unreliable channel does not retransmit");
        }
    }
}
