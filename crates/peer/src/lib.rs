//! peerlink's native peer: join a room on a peerlink signaling server and
//! keep a full mesh of WebRTC data-channel connections with everyone in it.
//!
//! The WebRTC stack is [str0m] (sans-IO); this crate owns the I/O around it:
//! UDP sockets, timers, candidate gathering and the signaling link. Offers are
//! made with "perfect negotiation", so both sides may open channels or
//! renegotiate at the same moment.
//!
//! A [`Room`] reports what happens in the room as [`Event`]s: members
//! joining and leaving, connection states, channels opening and closing.
//! Each [`DataChannel`] is a two-way handle with bounded queues both ways:
//! [`DataChannel::send`] waits while the send queue is full
//! ([`DataChannel::try_send`] fails with [`SendError::Overflow`]), and
//! [`DataChannel::recv`] takes the next message.
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
//!     if let Event::ChannelOpen { channel } = event
//!         && channel.label() == "chat"
//!     {
//!         channel.send("hello").await.ok();
//!         tokio::spawn(async move {
//!             while let Some(message) = channel.recv().await {
//!                 println!("{}: {message:?}", channel.peer());
//!             }
//!         });
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The room's logic (`mesh.rs`) and each connection's (`conn.rs`) do no
//! I/O: `sim.rs` runs whole rooms on simulated time with loss and delay.

#![warn(missing_docs)]

mod auth;
mod channel;
mod conn;
mod driver;
mod e2e;
mod error;
mod event;
mod gather;
mod mesh;
mod netem;
mod path;
mod relay;
mod room;
mod sealed;
mod signaling;
mod sim;
mod stream;
mod udp;

pub use auth::SignalKeys;
pub use channel::{ChannelSpec, DataChannel, Message, Reliability};
pub use conn::ConnState;
pub use e2e::{OpenError, RoomSecret, safety_number, sdp_fingerprint};
pub use error::{Error, SendError};
pub use event::{Event, MessageKind, OverlayStats, PeerStats};
pub use gather::IceConfig;
pub use mesh::ConnectOptions;
pub use mesh::MAX_ROOM_MESSAGE;
pub use netem::NetEm;
pub use path::{CandidateKind, Endpoint, Failure, FailureReport, Path, PathKind, WhyRelayed};
pub use peerlink_overlay::Config as OverlayConfig;
pub use peerlink_proto::PeerId;
pub use relay::{GatherFailure, GatherReport, Outcome as GatherOutcome, RelayAttempt, TurnTransport};
pub use room::{Room, RoomConfig};
pub use sealed::{SealError, SealedChannel, Sealer};
pub use signaling::signaling_url;
pub use signaling::ws_config as signaling_ws_config;
