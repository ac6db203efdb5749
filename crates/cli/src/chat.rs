//! `peerlink chat`: one line per message, to everyone in the room.

use std::collections::HashMap;

use anyhow::Context;
use peerlink_peer::{ChannelSpec, DataChannel, Event, IceConfig, Message, PeerId, Room, RoomConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

const LABEL: &str = "chat";

fn who(names: &HashMap<PeerId, String>, peer: &PeerId) -> String {
    names.get(peer).cloned().unwrap_or_else(|| peer.to_string())
}

/// A display name as shown: as given when made of letters, digits,
/// spaces and `-_.'`, else quoted and escaped, so that no name reads as
/// part of a status line (`a, end to end (safety number ...)`).
fn shown_name(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | '\''));
    if plain { name.to_string() } else { format!("{name:?}") }
}

/// `text` from the other side (or the server) as it may reach a terminal:
/// control characters escaped (`\n`, `\u{1b}`), so that a message cannot
/// move the cursor, colour the screen, or start a line of its own that
/// passes for one of ours (a forged `* connected to ... safety number`).
fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Which room to join, and as whom.
pub struct Join {
    pub room: String,
    pub name: Option<String>,
    pub token: Option<String>,
    pub room_secret: Option<String>,
}

/// `servers`: the server, then nodes to fall back to.
pub async fn run(servers: Vec<String>, join: Join, ice: IceConfig) -> anyhow::Result<()> {
    let Join { room, name, token, room_secret } = join;
    let server = servers[0].clone();
    let secret_room = room_secret.is_some();
    let mut config = RoomConfig::new(server.clone(), room.clone());
    config.fallback_servers = servers[1..].to_vec();
    config.name = name;
    config.token = token;
    config.room_secret = room_secret;
    config.ice = ice;
    config.channels = vec![ChannelSpec::reliable(LABEL)];
    let mut room_handle = Room::join(config).await.with_context(|| format!("joining {room} on {server}"))?;
    println!("* joined {room} as {}", room_handle.id());

    let mut names: HashMap<PeerId, String> = HashMap::new();
    let mut channels: HashMap<PeerId, DataChannel> = HashMap::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let shutdown = crate::common::shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            line = lines.next_line(), if stdin_open => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    if channels.is_empty() {
                        println!("* nobody connected yet");
                    }
                    for ch in channels.values() {
                        if let Err(e) = ch.try_send(line.clone()) {
                            println!("* not sent to {}: {e}", who(&names, ch.peer()));
                        }
                    }
                }
                None => stdin_open = false,
            },
            ev = room_handle.next_event() => match ev {
                None => break,
                Some(Event::PeerJoined { peer, name }) => {
                    let name = name.map(|n| shown_name(&n));
                    let label = name.clone().map_or_else(|| peer.to_string(), |n| format!("{n} ({peer})"));
                    println!("* {label} is here");
                    if let Some(n) = name {
                        names.insert(peer, n);
                    }
                }
                Some(Event::PeerLeft { peer }) => {
                    println!("* {} left", who(&names, &peer));
                    channels.remove(&peer);
                    names.remove(&peer);
                }
                Some(Event::ChannelOpen { channel }) if channel.label() == LABEL => {
                    let peer = who(&names, channel.peer());
                    // In a secret room the connection was authenticated end
                    // to end; the safety number lets people check it too.
                    let safety = room_handle.stats(channel.peer()).await.ok().and_then(|s| s.safety_number);
                    match safety {
                        Some(n) if secret_room => println!("* connected to {peer}, end to end (safety number {n})"),
                        _ => println!("* connected to {peer}"),
                    }
                    let reader = channel.clone();
                    tokio::spawn(async move {
                        while let Some(message) = reader.recv().await {
                            match message {
                                Message::Text(t) => println!("{peer}: {}", shown(&t)),
                                Message::Binary(b) => println!("{peer}: <{} bytes>", b.len()),
                            }
                        }
                    });
                    channels.insert(channel.peer().clone(), channel);
                }
                Some(Event::ChannelOpen { channel }) => crate::common::refuse_channel(&channel),
                Some(Event::ChannelClosed { peer, label }) if label == LABEL => {
                    channels.remove(&peer);
                }
                Some(Event::StateChanged { peer, state }) => {
                    tracing::info!("{}: {state:?}", who(&names, &peer));
                }
                Some(Event::ServerError { code, message }) => println!("* server: {code}: {}", shown(&message)),
                Some(Event::AuthFailed { peer, reason }) => {
                    // What we found wrong with its signaling, or (a sealed
                    // notice) what it found wrong with ours.
                    println!("* refused {}: {}", who(&names, &peer), shown(&reason));
                }
                Some(Event::ServerMessageRefused { from, reason }) => {
                    println!("* refused a message from {} through the server: {}", who(&names, &from), shown(&reason));
                }
                Some(Event::Reconnected { server }) => println!("* reconnected to {server}"),
                Some(Event::Closed { reason }) => anyhow::bail!("room closed: {reason}"),
                Some(_) => {}
            },
        }
    }
    room_handle.leave().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn names_that_could_pass_for_a_status_line_are_quoted() {
        use super::shown_name;
        assert_eq!(shown_name("ada"), "ada");
        assert_eq!(shown_name("Zoë O'Neil-Ng"), "Zoë O'Neil-Ng");
        assert_eq!(
            shown_name("a, end to end (safety number 12345)"),
            "\"a, end to end (safety number 12345)\""
        );
        assert_eq!(shown_name("x\n* y"), "\"x\\n* y\"");
    }

    #[test]
    fn what_the_other_side_sends_cannot_forge_a_line_or_drive_the_terminal() {
        assert_eq!(
            shown("hi\n* connected to alice, end to end (safety number 1234)"),
            "hi\\n* connected to alice, end to end (safety number 1234)"
        );
        assert_eq!(shown("\u{1b}[2J\u{1b}[31mred\r"), "\\u{1b}[2J\\u{1b}[31mred\\r");
        assert_eq!(shown("café ✓ tab\there"), "café ✓ tab\\there");
    }
}
