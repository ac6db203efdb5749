//! A sealed channel's native end: `sealed_echo SERVER ROOM` joins ROOM,
//! seals every channel labelled `notes` (`Room::seal`) and answers each
//! message opened on it: text upper-cased, bytes reversed. The browser test
//! `web/test/e2e/secret.test.js` talks to it from a tab.

use std::time::Duration;

use peerlink_peer::{ChannelSpec, Event, IceConfig, Message, Room, RoomConfig};

#[tokio::main]
async fn main() -> Result<(), peerlink_peer::Error> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or("ws://127.0.0.1:8080/ws".into());
    let room = args.next().unwrap_or("sealed".into());
    let mut config = RoomConfig::new(server, room);
    config.ice = IceConfig::loopback();
    config.channels = vec![ChannelSpec::reliable("notes")];
    let mut room = Room::join(config).await?;
    println!("joined {}", room.id());
    while let Some(event) = room.next_event().await {
        let Event::ChannelOpen { channel } = event else { continue };
        if channel.label() != "notes" {
            continue;
        }
        match room.seal(channel, Duration::from_secs(10)).await {
            Ok(mut sealed) => {
                println!("sealed with {}", sealed.channel().peer());
                tokio::spawn(async move {
                    while let Some(Ok(m)) = sealed.recv().await {
                        let reply = match m {
                            Message::Text(t) => Message::Text(t.to_uppercase()),
                            Message::Binary(mut b) => {
                                b.reverse();
                                Message::Binary(b)
                            }
                        };
                        if sealed.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => println!("not sealed: {e}"),
        }
    }
    Ok(())
}
