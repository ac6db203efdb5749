//! Sends one file to `peerlink receive`, built from the library crates: the
//! pairing session (`peerlink-pair`) picks the receiver in the code's room
//! and yields keys that authenticate the WebRTC session, and the transfer
//! engine (`peerlink-transfer`) answers what the receiver asks for.
//!
//! ```sh
//! cargo run -p peerlink-peer --example send_file -- ws://127.0.0.1:8080/ws notes.txt
//! peerlink receive --server ws://127.0.0.1:8080/ws --ice-addr 127.0.0.1 CODE
//! ```
//!
//! `peerlink send` does the same with progress, resume, folders and Ctrl-C.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use peerlink_pair::{Code, PairMsg, Role, Session, SessionEvent, SessionOutput};
use peerlink_peer::{ConnectOptions, DataChannel, Event, IceConfig, Message, Room, RoomConfig, SignalKeys};
use peerlink_transfer::*;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn read_at(file: &mut std::fs::File, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; len as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (server, path) = (args.next().ok_or("usage: send_file SERVER FILE")?, args.next().ok_or("no FILE")?);
    let mut file = std::fs::File::open(&path)?;
    let name = std::path::Path::new(&path).file_name().ok_or("not a file")?.to_string_lossy().into_owned();
    let manifest =
        Manifest::new(DEFAULT_CHUNK_SIZE, vec![Entry::file(RelPath::parse(&name)?, file.metadata()?.len())])?;

    let code = Code::generate(Code::DEFAULT_WORDS);
    let mut config = RoomConfig::new(server, code.room());
    config.ice = IceConfig::loopback(); // this machine only; drop this line between machines
    config.auto_connect = false; // we connect to whom the pairing session says
    config.channels = Vec::new(); // the receiver opens the transfer's two channels
    let mut room = Room::join(config).await?;
    println!("Code: {code}");
    let mut session = Session::new(Role::Creator, code, Duration::from_secs(30));
    let (mut ctl, mut data): (Option<DataChannel>, Option<DataChannel>) = (None, None);

    // Pair, connect, and wait for both channels.
    let (ctl, data) = loop {
        while let Some(out) = session.poll_output() {
            match out {
                SessionOutput::Send { to, msg } => room.send_via_server(Some(&to), msg.to_json()).await?,
                SessionOutput::Connect { peer, keys } => {
                    let keys = Some(SignalKeys { local: keys.sdp_local, remote: keys.sdp_remote });
                    room.connect(&peer, ConnectOptions { channels: Vec::new(), keys }).await?;
                }
                SessionOutput::Event(SessionEvent::Ended { reason, .. }) => {
                    return Err(reason.to_string().into());
                }
                SessionOutput::Event(ev) => eprintln!("pairing: {ev:?}"),
            }
        }
        if let (Some(c), Some(d)) = (&ctl, &data) {
            break (c.clone(), d.clone());
        }
        let deadline = session.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let event = tokio::select! {
            event = room.next_event() => event.ok_or("the signaling connection closed")?,
            _ = tokio::time::sleep_until(deadline.into()) => { session.handle_timeout(Instant::now()); continue }
        };
        match event {
            Event::PeerJoined { peer, .. } => session.peer_joined(peer, Instant::now()),
            Event::PeerLeft { peer } => session.peer_left(&peer, Instant::now()),
            Event::ServerMessage { from, data } => {
                if let Some(msg) = PairMsg::from_json(&data) {
                    session.handle_message(from, msg, Instant::now());
                }
            }
            Event::ChannelOpen { channel } if channel.label() == CTL_LABEL => ctl = Some(channel),
            Event::ChannelOpen { channel } if channel.label() == DATA_LABEL => data = Some(channel),
            Event::AuthFailed { reason, .. } => return Err(format!("tampering detected: {reason}").into()),
            _ => {}
        }
    };

    // The transfer: answer the receiver until it has verified everything.
    let mut sender = Sender::new(manifest);
    sender.start_session();
    let frame_payload = data.max_message_size() - FRAME_HEADER;
    loop {
        while let Some(out) = sender.poll() {
            match out {
                SenderOutput::Ctl(msg) => ctl.send(msg.to_json()).await?,
                SenderOutput::Hash { file: i, from, count } => {
                    let mut hashes = Vec::new();
                    for chunk in from..from + count {
                        let (offset, len) = sender.manifest().chunk_span(i, chunk).ok_or("no such chunk")?;
                        hashes.push(chunk_hash(&read_at(&mut file, offset, len)?));
                    }
                    sender.hashes_computed(i, from, hashes);
                }
                SenderOutput::Send { file: i, offset, len, expected, .. } => {
                    let bytes = read_at(&mut file, offset, len)?;
                    if chunk_hash(&bytes) != expected {
                        sender.cancel(CancelCode::Changed, format!("{name} changed while it was being sent"));
                        continue;
                    }
                    for frame in frames(i, offset, &bytes, frame_payload) {
                        data.send(frame).await?;
                    }
                }
                SenderOutput::Event(SenderEvent::Finished) => {
                    println!("{name} sent and verified by the receiver");
                    ctl.flush().await?;
                    tokio::time::sleep(Duration::from_millis(500)).await; // let `done` arrive
                    return Ok(());
                }
                SenderOutput::Event(ev) => eprintln!("transfer: {ev:?}"),
            }
        }
        match ctl.recv().await {
            Some(Message::Text(text)) => sender.handle_ctl_json(&text)?,
            Some(Message::Binary(_)) => return Err("binary message on the control channel".into()),
            None => return Err("the receiver went away".into()),
        }
    }
}
