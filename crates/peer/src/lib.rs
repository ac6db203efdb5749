//! peerlink's native peer: join a room on a peerlink signaling server and
//! keep a full mesh of WebRTC data-channel connections with everyone in it.
//!
//! The WebRTC stack is [str0m] (sans-IO); this crate owns the I/O around it:
//! UDP sockets, timers, candidate gathering and the signaling link. Offers are
//! made with "perfect negotiation", so both sides may open channels or
//! renegotiate at the same moment. Each channel has a bounded send queue:
//! [`DataChannel::send`] waits while it is full, [`DataChannel::try_send`]
//! fails with [`SendError::Overflow`].
//!
//! ```no_run
//! use peerlink_peer::{ChannelSpec, Event, IceConfig, Room, RoomConfig};
//!
//! # async fn run() -> Result<(), peerlink_peer::Error> {
//! let mut config = RoomConfig::new("ws://127.0.0.1:8080/ws", "lobby");
//! config.ice = IceConfig::loopback();
//! config.channels = vec![ChannelSpec::reliable("chat"), ChannelSpec::unreliable("state")];
//! let mut room = Room::join(config).await?;
//! while let Some(event) = room.next_event().await {
//!     match event {
//!         Event::ChannelOpen { channel } if channel.label() == "chat" => {
//!             channel.send("hello").await.ok();
//!         }
//!         Event::Message { peer, message, .. } => println!("{peer}: {message:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

mod auth;
mod channel;
mod conn;
mod error;
mod gather;
mod relay;
mod room;
mod signaling;
mod sim;

pub use auth::SignalKeys;
pub use channel::{ChannelSpec, DataChannel, Message, Reliability};
pub use conn::{ConnState, Path, PathKind};
pub use error::{Error, SendError};
pub use gather::IceConfig;
pub use peerlink_proto::PeerId;
pub use relay::{GatherReport, Outcome as GatherOutcome};
pub use room::{ConnectOptions, Event, PeerStats, Room, RoomConfig};
pub use str0m::CandidateKind;
