//! peerlink's overlay for large rooms: who each peer keeps a connection to,
//! and how a broadcast crosses the room, without I/O.
//!
//! A full mesh costs every peer one connection per member. [`Overlay`]
//! keeps each peer at a handful of connections whatever the room's size:
//!
//! - **Membership** is HyParView (Leitão, Pereira, Rodrigues; DSN 2007): a
//!   small *active view* of neighbours we hold connections to, and a larger
//!   *passive view* of peers we know of, used to replace neighbours that
//!   leave. Joins travel as random walks, and shuffles keep the passive
//!   views fresh and mixed. In a room of at most
//!   [`Config::full_mesh_up_to`] members everyone is everyone's neighbour:
//!   a small room stays a full mesh.
//! - **Broadcast** is Plumtree (Leitão, Pereira, Rodrigues; SRDS 2007): a
//!   broadcast is pushed eagerly along a spanning tree of the neighbour
//!   links, and its id lazily (`IHave`) along the others. A peer that gets
//!   a duplicate prunes that link from the tree; a peer that hears of a
//!   broadcast it has not received in time grafts the link it heard from.
//!   Each broadcast crosses each tree link once.
//! - **Signals** for a connection being set up can go over the overlay
//!   instead of the server ([`Overlay::relay`]): back along the way a
//!   message from the peer came (a join walk, a shuffle, a broadcast, a
//!   relayed signal), hop by hop; one that cannot go on comes back to its
//!   writer ([`Output::RelayFailed`]), who sends it through the server.
//! - **Messages to one peer** use a direct connection opened on demand and
//!   closed when idle ([`Config::idle_close`]). An overlay route would cost
//!   every hop bandwidth and latency for each message, and would need a
//!   routing layer on top of an unstructured graph; a direct connection
//!   costs one handshake and carries the conversation at full speed.
//!
//! What changed from iroh-gossip, whose parameters these are (and from
//! the papers):
//!
//! - A `ShuffleReply` goes back to the previous hop of the walk over the
//!   link it came on, not to the walk's origin over a new connection (a
//!   WebRTC connection costs a signaling round and a DTLS handshake, too
//!   much for a few peer ids); the previous hop merges the reply into its
//!   own passive view, so views still mix.
//! - Below `full_mesh_up_to` members joins connect to every member, and the
//!   origin sends a broadcast to every neighbour in the `all` form, which
//!   receivers only announce: a small room is a full mesh, one hop.
//! - A link is pruned on the second duplicate in a row from it, not the
//!   first: with several senders at once, broadcasts cross, and pruning on
//!   each crossing cut two links of one cycle at once, breaking the tree
//!   (on loopback the median delivery took a 150 ms graft; now 2-9 ms).
//! - Timeouts fit WebRTC: a graft after 150 ms (iroh: 80 ms), connections
//!   given 15 s to come up, at most 8 connections (an offer beyond is
//!   refused, and the caller says so at once), and messages to one peer
//!   retried on a new connection before they are reported undelivered.
//! - libp2p gossipsub keeps a mesh per topic with a degree range and
//!   gossips message ids on a heartbeat; Plumtree's tree sends each
//!   broadcast across each link about once, which is what a room of
//!   browsers on upload-limited links needs.
//!
//! The caller owns the connections: it carries out [`Output::Connect`] and
//! [`Output::Close`], delivers [`Output::Send`] on the connection (in order,
//! reliably), and reports back with [`Overlay::connected`],
//! [`Overlay::disconnected`] and [`Overlay::handle_message`]. Time comes in
//! as `now`; [`Overlay::poll_timeout`] says when to call
//! [`Overlay::handle_timeout`].
//!
//! ```
//! use std::time::Instant;
//! use peerlink_overlay::{Config, Output, Overlay};
//!
//! let now = Instant::now();
//! let mut a = Overlay::new(1u32, Config::default(), 7, now);
//! a.join(vec![2], 2, now);
//! // `a` asks for a connection to its contact, 2, and queues a Join for it.
//! assert!(matches!(a.poll_output(), Some(Output::Connect(2))));
//! a.connected(2, now);
//! assert!(matches!(a.poll_output(), Some(Output::Send(2, peerlink_overlay::Message::Join))));
//! ```

#![warn(missing_docs)]

mod overlay;
pub mod sim;
mod wire;

pub use overlay::{Config, Delivery, Output, Overlay, Stats};
pub use wire::{DecodeError, MAX_IHAVE, MAX_LISTED, MAX_RELAY, Message, VERSION, WireId};

/// What a peer id must be.
pub trait Id: Clone + Eq + std::hash::Hash + Ord + std::fmt::Debug {}
impl<T: Clone + Eq + std::hash::Hash + Ord + std::fmt::Debug> Id for T {}

/// The data-channel label of the overlay's messages.
pub const CHANNEL_LABEL: &str = "peerlink.overlay";
