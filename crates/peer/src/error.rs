//! The peer library's errors.

use crate::e2e::MIN_ROOM_SECRET;
use std::time::Duration;

use peerlink_proto::{ErrorCode, PeerId};

/// Errors of room and connection operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The signaling server could not be reached.
    #[error("cannot reach signaling server {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The signaling server did not answer in time.
    #[error("signaling server did not answer within {0:?}")]
    Timeout(Duration),
    /// The signaling server refused a request (`error` message).
    #[error("signaling server refused: {code}: {message}")]
    Server {
        /// Machine-readable code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server speaks another protocol version.
    #[error("signaling server speaks protocol version {0}, we speak {v}", v = peerlink_proto::PROTOCOL_VERSION)]
    Version(u32),
    /// The signaling connection broke.
    #[error("signaling connection lost: {0}")]
    SignalingLost(String),
    /// A signal from a peer could not be used (malformed SDP or candidate).
    #[error("unusable signal from {peer}: {reason}")]
    BadSignal {
        /// Who sent it.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
    /// The WebRTC stack refused a negotiation step.
    #[error("negotiation with {peer} failed: {reason}")]
    Negotiation {
        /// The remote peer.
        peer: PeerId,
        /// The stack's reason.
        reason: String,
    },
    /// An offer or answer did not authenticate (paired connections).
    #[error(
        "refused signaling from {peer}: {reason}; the signaling server may be tampering with the session"
    )]
    Unauthenticated {
        /// The remote peer.
        peer: PeerId,
        /// What did not verify.
        reason: String,
    },
    /// No such member in the room.
    #[error("no peer {0} in this room")]
    UnknownPeer(PeerId),
    /// No local address to gather candidates from.
    #[error("no usable local address to gather candidates from ({0})")]
    NoAddresses(String),
    /// A socket operation failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A message larger than the channel can carry.
    #[error("message of {size} bytes exceeds the channel's maximum of {max}")]
    MessageTooLarge {
        /// Its size.
        size: usize,
        /// The negotiated maximum.
        max: usize,
    },
    /// The channel is closed.
    #[error("channel closed")]
    ChannelClosed,
    /// A channel label the library uses itself.
    #[error("the channel label {0:?} is reserved for peerlink's own signaling between connected peers")]
    ReservedLabel(String),
    /// The room was left, or its driver stopped.
    #[error("the room was left or its driver stopped")]
    RoomClosed,
    /// A room secret too short to resist guessing: the server sees what
    /// it MACs and seals, so it could test guesses offline.
    #[error(
        "a room secret needs at least {MIN_ROOM_SECRET} characters of randomness (the web app makes 22); this one has {0}"
    )]
    WeakRoomSecret(usize),
    /// `broadcast` and `send` need a room joined with an overlay
    /// (`RoomConfig::overlay`); other rooms use their channels.
    #[error("this room has no overlay: join with RoomConfig::overlay set to broadcast or send")]
    NoOverlay,
    /// A room message over the limit.
    #[error("room message of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A message through the server was not queued: the signaling link has
    /// that much waiting already (the server reads slower than the room
    /// sends). Retry later.
    #[error("message through the server not queued: the signaling link has too much waiting; retry later")]
    SignalingBusy,
    /// A message to one peer was not queued: too much is waiting for its
    /// connection to come up or, once up, in its send queue, or no
    /// connection can be opened within the overlay's limit. Retry later.
    #[error(
        "message to {0} not queued: too much is waiting for its connection (being set up, or its send queue is full), or the connection limit is reached"
    )]
    NotQueued(PeerId),
}

/// Why a data-channel send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The bounded send queue is full; retry later or use `send().await`.
    #[error("send queue full: {queued} of {capacity} bytes queued")]
    Overflow {
        /// Bytes queued now.
        queued: usize,
        /// The queue's capacity.
        capacity: usize,
    },
    /// Larger than the negotiated maximum message size; split it (file
    /// transfer chunks for you).
    #[error("message of {size} bytes exceeds the negotiated maximum of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The negotiated maximum.
        max: usize,
    },
    /// The channel or its connection closed.
    #[error("channel closed")]
    Closed,
}
