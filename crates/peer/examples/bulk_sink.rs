//! Counts what arrives on `bulk` channels: `bulk_sink SERVER ROOM BYTES`
//! joins ROOM, and once BYTES have arrived on a channel labelled `bulk`
//! prints `MB/s` from its first byte to its last and exits. The native end
//! of `web/bench/browser.mjs`'s bare-channel row (a tab sends 64 KiB
//! messages to it).

use std::time::Instant;

use peerlink_peer::{Event, IceConfig, Message, Room, RoomConfig};

#[tokio::main]
async fn main() -> Result<(), peerlink_peer::Error> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or("ws://127.0.0.1:8080/ws".into());
    let room = args.next().unwrap_or("bulk".into());
    let want: u64 = args.next().and_then(|b| b.parse().ok()).unwrap_or(256 << 20);
    let mut config = RoomConfig::new(server, room);
    config.ice = IceConfig::loopback();
    let mut room = Room::join(config).await?;
    println!("joined");
    loop {
        match room.next_event().await {
            Some(Event::ChannelOpen { channel }) if channel.label() == "bulk" => {
                let mut got = 0u64;
                let mut start = None;
                while let Some(m) = channel.recv().await {
                    start.get_or_insert_with(Instant::now);
                    got += match m {
                        Message::Binary(b) => b.len() as u64,
                        Message::Text(t) => t.len() as u64,
                    };
                    if got >= want {
                        let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
                        println!("{:.1} MB/s", got as f64 / secs / 1e6);
                        return Ok(());
                    }
                }
            }
            None => return Ok(()),
            _ => {}
        }
    }
}
