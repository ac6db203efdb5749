//! The peer library's errors.

use std::time::Duration;

use peerlink_proto::{ErrorCode, PeerId};

/// Errors of room and connection operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot reach signaling server {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("signaling server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("signaling server refused: {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("signaling server speaks protocol version {0}, we speak {v}", v = peerlink_proto::PROTOCOL_VERSION)]
    Version(u32),
    #[error("signaling connection lost: {0}")]
    SignalingLost(String),
    #[error("unusable signal from {peer}: {reason}")]
    BadSignal { peer: PeerId, reason: String },
    #[error("negotiation with {peer} failed: {reason}")]
    Negotiation { peer: PeerId, reason: String },
    #[error(
        "refused signaling from {peer}: {reason}; the signaling server may be tampering with the session"
    )]
    Unauthenticated { peer: PeerId, reason: String },
    #[error("no peer {0} in this room")]
    UnknownPeer(PeerId),
    #[error("no usable local address to gather candidates from ({0})")]
    NoAddresses(String),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("message of {size} bytes exceeds the channel's maximum of {max}")]
    MessageTooLarge { size: usize, max: usize },
    #[error("channel closed")]
    ChannelClosed,
    #[error("the room was left or its driver stopped")]
    RoomClosed,
}

/// Why a data-channel send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The bounded send queue is full; retry later or use `send().await`.
    #[error("send queue full: {queued} of {capacity} bytes queued")]
    Overflow { queued: usize, capacity: usize },
    /// Larger than the negotiated maximum message size; split it (file
    /// transfer chunks for you).
    #[error("message of {size} bytes exceeds the negotiated maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// The channel or its connection closed.
    #[error("channel closed")]
    Closed,
}
