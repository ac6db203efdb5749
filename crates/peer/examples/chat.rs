//! Line chat with everyone in a room: `cargo run -p peerlink-peer --example
//! chat -- ws://127.0.0.1:8080/ws lobby` in two terminals (with `peerlink
//! serve` running). Each line goes to every peer over a data channel.

use peerlink_peer::{ChannelSpec, DataChannel, Event, IceConfig, Message, Room, RoomConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), peerlink_peer::Error> {
    let mut args = std::env::args().skip(1);
    let (server, room) =
        (args.next().unwrap_or("ws://127.0.0.1:8080/ws".into()), args.next().unwrap_or("lobby".into()));
    let mut config = RoomConfig::new(server, room);
    config.ice = IceConfig::loopback(); // this machine only; drop this line between machines
    config.channels = vec![ChannelSpec::reliable("chat")];
    let mut room = Room::join(config).await?;
    let mut peers: Vec<DataChannel> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            Ok(Some(line)) = lines.next_line() => {
                peers.retain(|ch| !ch.is_closed());
                for ch in &peers {
                    ch.send(line.as_str()).await.ok();
                }
            }
            event = room.next_event() => match event {
                Some(Event::ChannelOpen { channel }) => {
                    let reader = channel.clone();
                    tokio::spawn(async move {
                        while let Some(Message::Text(text)) = reader.recv().await {
                            println!("{}: {text}", reader.peer());
                        }
                    });
                    peers.push(channel);
                }
                Some(Event::PeerLeft { peer }) => println!("* {peer} left"),
                None => return Ok(()),
                _ => {}
            },
        }
    }
}
