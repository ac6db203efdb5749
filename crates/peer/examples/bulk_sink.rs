//! Counts what arrives on `bulk` channels: `bulk_sink SERVER ROOM BYTES`
//! joins ROOM, and once BYTES have arrived on a channel labelled `bulk`
//! prints `MB/s` from its first byte to its last and exits. With `--send`
//! as a fourth argument it sends BYTES in 64 KiB messages on the channel
//! instead, and exits once they are flushed. The native end of
//! `web/bench/browser.mjs`'s bare-channel rows (a tab sends to it, or
//! counts what it sends).

use std::time::Instant;

use peerlink_peer::{Event, IceConfig, Message, Room, RoomConfig};

#[tokio::main]
async fn main() -> Result<(), peerlink_peer::Error> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or("ws://127.0.0.1:8080/ws".into());
    let room = args.next().unwrap_or("bulk".into());
    let want: u64 = args.next().and_then(|b| b.parse().ok()).unwrap_or(256 << 20);
    let send = args.next().as_deref() == Some("--send");
    let mut config = RoomConfig::new(server, room);
    config.ice = IceConfig::loopback();
    let mut room = Room::join(config).await?;
    println!("joined");
    loop {
        match room.next_event().await {
            Some(Event::ChannelOpen { channel }) if channel.label() == "bulk" && send => {
                let msg = vec![0u8; 64 << 10];
                let mut sent = 0u64;
                while sent < want {
                    if channel.send(Message::Binary(msg.clone())).await.is_err() {
                        return Ok(());
                    }
                    sent += msg.len() as u64;
                }
                let _ = channel.flush().await;
                println!("sent");
                // The tab reads the last bytes off the wire before we leave.
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                return Ok(());
            }
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
