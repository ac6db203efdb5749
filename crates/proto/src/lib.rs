//! peerlink's wire formats: the signaling protocol spoken between peers and
//! `peerlink serve`, as JSON text frames over a WebSocket.
//!
//! Messages are tagged by `type` and named by direction: a client sends
//! [`ClientMsg`], the server sends [`ServerMsg`]. The first exchange carries the
//! protocol version ([`ClientMsg::Hello`] → [`ServerMsg::Welcome`]). Every enum
//! has an `Unknown` catch-all so that a newer peer does not break an older one.
//! The format is pinned by the golden fixtures in `fixtures/protocol/`, which
//! the browser client's tests read too. `docs/PROTOCOL.md` is the prose spec.
//!
//! ```
//! use peerlink_proto::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
//!
//! let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, client: None, resume: None };
//! let json = serde_json::to_string(&hello).unwrap();
//! assert_eq!(json, r#"{"type":"hello","version":1}"#);
//!
//! let msg: ServerMsg = serde_json::from_str(r#"{"type":"pong","nonce":7}"#).unwrap();
//! assert_eq!(msg, ServerMsg::Pong { nonce: Some(7) });
//! ```

#![warn(missing_docs)]

pub mod gso;
pub mod turn_stream;
pub mod udp;

use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. Carried by `hello` and `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A peer's identity on the signaling server: assigned by the server in
/// `welcome`, stamped by the server on everything a peer sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(String);

/// Maps keyed by id are looked up with the `&str` read off the wire.
impl std::borrow::Borrow<str> for PeerId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PeerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PeerId {
    /// Wraps an id the server assigned. Servers mint ids; clients only read
    /// them off the wire.
    pub fn from_server(id: impl Into<String>) -> Self {
        PeerId(id.into())
    }

    /// The id as the server wrote it, e.g. `p-9b71e0aa`; opaque, so compare it but do not parse it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room name: 1 to [`MAX_ROOM_LEN`] bytes of letters, digits, `-`, `_`, `.`.
pub const MAX_ROOM_LEN: usize = 64;
/// A display name: at most this many bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a room name against the rules in `docs/PROTOCOL.md`.
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message on a connection: the protocol version the client speaks.
    Hello {
        /// The protocol version the client speaks; any other than the server's closes the connection.
        version: u32,
        /// Free-form client description for logs, e.g. `peerlink-cli/0.1`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// A reconnecting client's `welcome.resume`: the server gives it the
        /// same peer id again, and a `join` of a room it is still a member
        /// of takes its place back without anyone seeing it leave or join.
        /// An invalid or expired token is ignored (a new id is given).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
    },
    /// Join a room; answered by `joined` (or `error`).
    Join {
        /// The room to join or create: 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.`.
        room: String,
        /// Display name shown to the other members, at most [`MAX_NAME_LEN`] bytes; need not be unique.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// A join token from the application's backend, required by servers
        /// run with a join secret (`unauthorized` without a valid one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Leave a room; answered by `left`.
    Leave {
        /// The room to leave; `not_in_room` if this connection is not a member.
        room: String,
    },
    /// WebRTC negotiation for one peer in a shared room.
    Signal {
        /// A room that both the sender and `to` are members of.
        room: String,
        /// The member the negotiation is for (`unknown_peer` if not in `room`).
        to: PeerId,
        /// The offer, answer or candidate, delivered to `to` in a server `signal`.
        signal: Signal,
    },
    /// An application message routed through the server, to one peer or
    /// (without `to`) to every other member of the room.
    Send {
        /// The room to send in; the sender must be a member.
        room: String,
        /// The one member to deliver to; when absent, every other member of the room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<PeerId>,
        /// Any JSON value, delivered unchanged in `message`; counts against `max_message_bytes`.
        data: serde_json::Value,
    },
    /// Application-level liveness check; answered by `pong` with the same nonce.
    Ping {
        /// Any number, echoed back in the `pong` so answers can be matched to pings.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// A message type this version does not know.
    #[serde(other)]
    Unknown,
}

/// The negotiation payload carried by `signal` in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    /// An SDP offer (initial, renegotiation or ICE restart).
    Offer {
        /// The offer's SDP text, as `RTCSessionDescription.sdp` holds it.
        sdp: String,
        /// Proof that a paired peer wrote this SDP (see [`SignalAuth`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<SignalAuth>,
    },
    /// The SDP answer to the last offer.
    Answer {
        /// The answer's SDP text, as `RTCSessionDescription.sdp` holds it.
        sdp: String,
        /// Proof that a paired peer wrote this SDP (see [`SignalAuth`]); absent between unpaired peers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<SignalAuth>,
    },
    /// A trickled ICE candidate, in SDP `candidate:` attribute form.
    Candidate {
        /// The candidate attribute, e.g. `candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host`.
        candidate: String,
        /// Media id of the m-line it belongs to, copied from the sender's SDP (e.g. `0`, `i0n`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mid: Option<String>,
    },
    /// No more candidates will follow for the current ICE generation.
    EndOfCandidates,
    /// A signal kind this version does not know.
    #[serde(other)]
    Unknown,
}

/// Authenticates an offer or answer between peers that share a key (from
/// pairing, `docs/PAIRING.md`): the server relays it untouched and cannot
/// forge it, so it cannot swap the DTLS fingerprints the SDP carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalAuth {
    /// Counts the sender's offers and answers to this peer from 0; a
    /// receiver accepts only increasing values, so old SDP cannot be replayed.
    pub seq: u64,
    /// HMAC-SHA256 over `kind ‖ 0x00 ‖ u64be(seq) ‖ sdp`, lowercase hex.
    pub mac: String,
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to `hello`: who you are, how to reach TURN, what the limits are.
    Welcome {
        /// The protocol version the server speaks ([`PROTOCOL_VERSION`]).
        version: u32,
        /// This connection's id, stamped on everything it sends; a reconnect gets a new one
        /// unless it presents `resume`.
        peer_id: PeerId,
        /// STUN and TURN servers for `RTCConfiguration.iceServers`; possibly none.
        ice_servers: Vec<IceServer>,
        /// The limits the server enforces on this connection.
        limits: Limits,
        /// An opaque token to send in `hello.resume` when reconnecting
        /// (after `shutting_down`, or a lost connection) to keep this id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
    },
    /// Answer to `join`: the other members already in the room.
    Joined {
        /// The room joined.
        room: String,
        /// The members already there, not including you, longest present first.
        peers: Vec<PeerInfo>,
        /// True when this `join` took back a place the peer id still held
        /// (a resume): nobody was told anything, and peers missing from
        /// `peers` left meanwhile. Absent (false) for a join as a newcomer,
        /// which every other member was told of with `peer_joined`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
        /// Set in a large room (more members than the server lists): `peers`
        /// is a random sample, and this is how many other members there are.
        /// Nobody in a large room is told `peer_joined` or `peer_left`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u32>,
    },
    /// Answer to `leave`.
    Left {
        /// The room left.
        room: String,
    },
    /// Someone joined a room you are in.
    PeerJoined {
        /// The room they joined.
        room: String,
        /// The newcomer's id and display name.
        peer: PeerInfo,
    },
    /// Someone left a room you are in (or their connection dropped).
    PeerLeft {
        /// The room they left.
        room: String,
        /// Who left; nothing more comes from them in this room.
        peer_id: PeerId,
    },
    /// Negotiation from another member; `from` is stamped by the server.
    Signal {
        /// The room the sender shares with you.
        room: String,
        /// The sender's id.
        from: PeerId,
        /// The payload as sent; a `kind` the server does not know arrives as [`Signal::Unknown`].
        signal: Signal,
    },
    /// An application message routed by the server; `from` is stamped by it.
    Message {
        /// The room it was sent in.
        room: String,
        /// The sender's id.
        from: PeerId,
        /// The JSON value the sender put in `send`, unchanged.
        data: serde_json::Value,
    },
    /// Something the client sent was refused, or the connection is closing.
    Error {
        /// Why, for the client to act on; a fatal code ([`ErrorCode::is_fatal`]) closes the connection.
        code: ErrorCode,
        /// Explanation for people; its wording may change at any time.
        message: String,
    },
    /// Answer to `ping`.
    Pong {
        /// The `nonce` of the `ping` answered; absent if it had none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// A message type this version does not know.
    #[serde(other)]
    Unknown,
}

/// A room member as presence reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The member's server-assigned id.
    pub id: PeerId,
    /// The display name it gave in `join`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One entry of `RTCConfiguration.iceServers`, in the browser's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// One server's `stun:` or `turn:` URLs, e.g. `turn:127.0.0.1:3478?transport=udp`.
    pub urls: Vec<String>,
    /// The TURN username; absent for STUN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The TURN password that goes with `username`; absent for STUN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The limits the server enforces on this connection, announced in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest text frame accepted, in bytes (`too_large` above).
    pub max_message_bytes: u32,
    /// Members per room (`room_full` above).
    pub max_peers_per_room: u32,
    /// Rooms one connection may be in at once (`too_many_rooms` above).
    pub max_rooms_per_connection: u32,
    /// Sustained messages per second per connection (`rate_limited` above).
    pub messages_per_second: u32,
    /// Burst allowance on top of the sustained rate.
    pub message_burst: u32,
    /// A connection silent for this long is closed (`idle_timeout`).
    pub idle_timeout_ms: u64,
}

/// Machine-readable reason carried by `error`. Clients act on the code; the
/// message is for humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame was not valid JSON, or not a JSON object.
    BadJson,
    /// The `type` is not one the server knows.
    UnknownType,
    /// A known type with missing or ill-typed fields.
    BadMessage,
    /// The frame exceeded `max_message_bytes`.
    TooLarge,
    /// A binary frame; the protocol is JSON text only.
    BinaryFrame,
    /// `hello` carried a version the server does not speak. The connection closes.
    UnsupportedVersion,
    /// Something other than `hello` arrived first.
    HelloRequired,
    /// `hello` sent twice.
    AlreadyGreeted,
    /// The room name breaks the naming rules.
    InvalidRoom,
    /// The display name is too long.
    InvalidName,
    /// The room has `max_peers_per_room` members already.
    RoomFull,
    /// The connection is in `max_rooms_per_connection` rooms already.
    TooManyRooms,
    /// Joining a room the connection is already in.
    AlreadyJoined,
    /// The sender is not a member of the room it named.
    NotInRoom,
    /// The addressee is not a member of that room.
    UnknownPeer,
    /// The message carried a `from` field: only the server names senders.
    SpoofedSender,
    /// More than the allowed messages per second; the message was dropped.
    RateLimited,
    /// The server requires a join token and the `join` had none, or one
    /// that is not valid for this room and name (or expired); the message
    /// says which. Get a fresh token and join again.
    Unauthorized,
    /// The browser page's `Origin` is not one the server allows. The
    /// connection closes.
    OriginNotAllowed,
    /// The connection kept sending far above the rate limit (more dropped
    /// than allowed, three seconds in a row). The connection closes.
    Flooding,
    /// The connection sent nothing for `idle_timeout_ms`. The connection closes.
    IdleTimeout,
    /// The addressee's queue is full (it reads slower than messages arrive
    /// for it), or the server's queue budget is used up: the message was
    /// not delivered to the peers named. Retry later.
    PeerBusy,
    /// The client did not read its messages fast enough. The connection closes.
    SlowConsumer,
    /// The server is shutting down. The connection closes.
    ShuttingDown,
    /// The server cannot reach the room store it shares with other nodes
    /// (Redis): the join, or the message to a member on another node, was
    /// not served. Retry shortly (with backoff), or reconnect: another node
    /// may be fine.
    Unavailable,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name, e.g. `room_full`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::AlreadyGreeted => "already_greeted",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::SpoofedSender => "spoofed_sender",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::Flooding => "flooding",
            ErrorCode::PeerBusy => "peer_busy",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether the server closes the connection after sending this code.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::UnsupportedVersion
                | ErrorCode::IdleTimeout
                | ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
                | ErrorCode::Flooding
                | ErrorCode::OriginNotAllowed
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_parse_to_the_catch_all() {
        let m: ClientMsg = serde_json::from_str(r#"{"type":"teleport","x":1}"#).unwrap();
        assert_eq!(m, ClientMsg::Unknown);
        let m: ServerMsg = serde_json::from_str(r#"{"type":"news"}"#).unwrap();
        assert_eq!(m, ServerMsg::Unknown);
        let s: Signal = serde_json::from_str(r#"{"kind":"pranswer","sdp":""}"#).unwrap();
        assert_eq!(s, Signal::Unknown);
        let c: ErrorCode = serde_json::from_str(r#""quota_exceeded""#).unwrap();
        assert_eq!(c, ErrorCode::Unknown);
    }

    #[test]
    fn error_code_names_match_serde() {
        for code in [
            ErrorCode::BadJson,
            ErrorCode::RoomFull,
            ErrorCode::SpoofedSender,
            ErrorCode::RateLimited,
            ErrorCode::UnsupportedVersion,
            ErrorCode::SlowConsumer,
            ErrorCode::Flooding,
            ErrorCode::PeerBusy,
            ErrorCode::Unauthorized,
            ErrorCode::OriginNotAllowed,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn room_names() {
        assert!(valid_room("chat-1.a_b"));
        assert!(!valid_room(""));
        assert!(!valid_room("a b"));
        assert!(!valid_room("../x"));
        assert!(!valid_room(&"x".repeat(MAX_ROOM_LEN + 1)));
    }
}
