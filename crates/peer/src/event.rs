//! What a room reports to the application: its events and per-connection
//! statistics.

use std::time::Duration;

use peerlink_proto::{ErrorCode, PeerId};

use crate::channel::DataChannel;
use crate::conn::ConnState;
use crate::path::{FailureReport, Path, WhyRelayed};

/// What happens in a room. Channel messages are not room events: each
/// [`DataChannel`] has its own receive queue ([`DataChannel::recv`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A peer is in the room (already there when we joined, or joined since).
    PeerJoined {
        /// Its id.
        peer: PeerId,
        /// The display name it gave, if any.
        name: Option<String>,
    },
    /// A peer left or dropped; its connection and channels are gone.
    PeerLeft {
        /// Its id.
        peer: PeerId,
    },
    /// The signaling server went away (it shut down, or the connection
    /// broke) and we are back, with the same peer id and our place in the
    /// room, on `server`. Peer connections were not interrupted; signals
    /// sent meanwhile were held and are delivered now.
    Reconnected {
        /// The URL that took us back.
        server: String,
    },
    /// The connection to `peer` changed state.
    StateChanged {
        /// The remote peer.
        peer: PeerId,
        /// The new state.
        state: ConnState,
    },
    /// A channel to a peer is open, whoever opened it.
    ChannelOpen {
        /// The channel: send on it, and receive with [`DataChannel::recv`].
        channel: DataChannel,
    },
    /// A channel closed (either side closed it, or its connection ended).
    ChannelClosed {
        /// The remote peer.
        peer: PeerId,
        /// The channel's label.
        label: String,
    },
    /// An application message routed through the signaling server.
    ServerMessage {
        /// The sender, as stamped by the server.
        from: PeerId,
        /// The message as sent.
        data: serde_json::Value,
    },
    /// In an end-to-end encrypted room, a message through the server that
    /// was not sealed with the room's key for us (the server wrote it, a
    /// client without the secret sent it, or it was changed): dropped.
    ServerMessageRefused {
        /// The sender, as stamped by the server.
        from: PeerId,
        /// Why it was refused.
        reason: String,
    },
    /// An offer or answer from `peer` failed authentication (the signaling
    /// path changed it, or it was not from the paired peer). The
    /// connection to `peer` is closed.
    AuthFailed {
        /// The remote peer.
        peer: PeerId,
        /// What was wrong with it.
        reason: String,
    },
    /// The server refused something we sent.
    ServerError {
        /// Machine-readable code.
        code: ErrorCode,
        /// The server's explanation, for people.
        message: String,
    },
    /// A message sent with [`crate::Room::broadcast`] or [`crate::Room::send`]
    /// (rooms with an overlay).
    Message {
        /// Who sent it.
        from: PeerId,
        /// The message as sent.
        data: Vec<u8>,
        /// To everyone, or to us alone.
        kind: MessageKind,
    },
    /// Messages sent with [`crate::Room::send`] to `peer` were not
    /// delivered: no connection to it could be made (three attempts, a
    /// second apart; it may have left, or hold all the connections it may).
    SendFailed {
        /// The addressee.
        peer: PeerId,
        /// How many messages were given up.
        messages: usize,
    },
    /// The signaling link is gone; the room is over.
    Closed {
        /// Why.
        reason: String,
    },
}

impl Event {
    /// Roughly what the event holds in memory, for the bound on events the
    /// application has not taken: a message's bytes, else a small constant.
    pub(crate) fn size(&self) -> usize {
        const BASE: usize = 64;
        BASE + match self {
            Event::Message { data, .. } => data.len(),
            Event::ServerMessage { data, .. } => json_size(data),
            Event::ServerError { message, .. } => message.len(),
            Event::Closed { reason } => reason.len(),
            _ => 0,
        }
    }
}

/// About the bytes of `v` as JSON text.
fn json_size(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => 8,
        serde_json::Value::String(s) => s.len() + 2,
        serde_json::Value::Array(a) => 2 + a.iter().map(|x| json_size(x) + 1).sum::<usize>(),
        serde_json::Value::Object(o) => 2 + o.iter().map(|(k, x)| k.len() + 4 + json_size(x)).sum::<usize>(),
    }
}

/// Traffic and path of one peer connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStats {
    /// Message bytes handed to SCTP.
    pub bytes_sent: u64,
    /// Message bytes received.
    pub bytes_received: u64,
    /// Messages handed to SCTP.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Latest round-trip time str0m measured.
    pub rtt: Option<Duration>,
    /// The connection's state.
    pub state: Option<ConnState>,
    /// ICE restarts this connection made to recover from outages.
    pub ice_restarts: u32,
    /// The selected path: its kind (host, srflx, relay) and both ends.
    pub path: Option<Path>,
    /// Why the connection failed, with what was gathered on each side.
    pub failure: Option<FailureReport>,
    /// Why the data goes through a relay, when it does.
    pub why_relayed: Option<WhyRelayed>,
    /// Five groups of five digits from both ends' DTLS fingerprints, the
    /// same at both ends: people who read the same number to each other
    /// know nobody sits in between (once both SDPs are known).
    pub safety_number: Option<String>,
    /// The DTLS fingerprints of this end and the other (`sha-256 AB:...`,
    /// as in the SDPs), once both are known; sealed channels bind their
    /// keys to them.
    pub fingerprints: Option<(String, String)>,
    /// Offers, answers and candidates sent to the peer on the connection's
    /// own signaling channel (not through the server).
    pub signals_sent_on_channel: u64,
    /// Offers, answers and candidates the peer sent on that channel.
    pub signals_received_on_channel: u64,
}

/// How a room message reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Broadcast to the room; it crossed `hops` overlay links (1: straight
    /// from its sender).
    Broadcast {
        /// Overlay links crossed.
        hops: u16,
    },
    /// Sent to us alone, over a direct connection.
    Direct,
}

/// What a room's overlay is doing ([`crate::Room::overlay_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Neighbours: the peers we hold overlay connections to.
    pub neighbors: Vec<PeerId>,
    /// Spare peers known (the passive view).
    pub passive: usize,
    /// Connections open or being opened (neighbours, direct, closing).
    pub connections: usize,
    /// Broadcasts received.
    pub delivered: u64,
    /// Broadcasts received again (each prunes a link).
    pub duplicates: u64,
    /// Broadcast copies sent to neighbours (our own included).
    pub forwarded: u64,
    /// Broadcasts fetched because they did not come in time (tree repairs).
    pub grafts: u64,
    /// Links pruned from the broadcast tree.
    pub prunes: u64,
    /// Neighbours lost and replaced.
    pub replacements: u64,
    /// Overlay messages dropped (a send queue was full).
    pub dropped: u64,
    /// Signals for our connections sent over the overlay (relayed by
    /// neighbours) rather than through the server.
    pub signals_relayed: u64,
    /// Signals for our connections sent through the server (no route over
    /// the overlay was known, or a relayed one came back).
    pub signals_via_server: u64,
    /// Relayed signals that reached us.
    pub relays_received: u64,
    /// Relayed signals we passed on for others.
    pub relays_forwarded: u64,
    /// Signals we relayed that came back unreachable (then sent through the server).
    pub relays_failed: u64,
}
