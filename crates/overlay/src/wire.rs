//! The overlay's messages and their binary encoding on the `peerlink.overlay`
//! data channel (pinned by `fixtures/overlay/messages.json`).
//!
//! Every message is one data-channel message: a version byte (1), a type
//! byte, then the fields in order. Peer ids are a length byte and UTF-8;
//! integers are big-endian; a payload is the rest of the message. A decoder
//! refuses anything malformed or longer than its fields, and unknown types
//! (from a newer peer) decode to an error the caller may ignore.

use std::fmt;

/// Version byte opening every message.
pub const VERSION: u8 = 1;
/// Most peers listed in one `Shuffle` or `ShuffleReply`.
pub const MAX_LISTED: usize = 64;
/// Most message ids announced in one `IHave`.
pub const MAX_IHAVE: usize = 256;
/// Largest payload of a `Relay` or `Unreachable` (a signal: an SDP with
/// its candidates is a few KiB).
pub const MAX_RELAY: usize = 16 * 1024;

/// What a peer id must do to travel: written as at most 255 bytes of UTF-8.
pub trait WireId: Sized {
    /// The id as text.
    fn to_wire(&self) -> String;
    /// The id read back; `None` if the text is not a valid id.
    fn from_wire(s: &str) -> Option<Self>;
}

impl WireId for peerlink_proto::PeerId {
    fn to_wire(&self) -> String {
        self.as_str().to_string()
    }
    fn from_wire(s: &str) -> Option<Self> {
        (!s.is_empty()).then(|| peerlink_proto::PeerId::from_server(s))
    }
}

impl WireId for u32 {
    fn to_wire(&self) -> String {
        self.to_string()
    }
    fn from_wire(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

/// One overlay message between two connected peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<P> {
    /// HyParView JOIN: a newcomer asks its contact to take it in.
    Join,
    /// HyParView FORWARD_JOIN: a random walk announcing `peer`, a newcomer.
    ForwardJoin {
        /// The newcomer.
        peer: P,
        /// Hops left.
        ttl: u8,
    },
    /// HyParView NEIGHBOR: be my neighbour. `high`: the sender has no
    /// neighbour at all (or was picked by a join walk), so it must be taken.
    Neighbor {
        /// Must be accepted.
        high: bool,
    },
    /// Answer to `Join` or `Neighbor`.
    NeighborReply {
        /// We are neighbours now.
        accepted: bool,
    },
    /// HyParView DISCONNECT: no longer neighbours. `alive`: the sender stays
    /// in the room (keep it as a spare).
    Disconnect {
        /// The sender stays in the room.
        alive: bool,
    },
    /// HyParView SHUFFLE: a random walk carrying a sample of who `origin` knows.
    Shuffle {
        /// Who started the walk.
        origin: P,
        /// Hops left.
        ttl: u8,
        /// The sample (`origin` included).
        peers: Vec<P>,
    },
    /// Answer to `Shuffle`, to the previous hop: a sample back.
    ShuffleReply {
        /// The sample.
        peers: Vec<P>,
    },
    /// Plumtree GOSSIP: a broadcast, pushed eagerly.
    Gossip {
        /// The broadcast's id (random, from its origin).
        id: u64,
        /// Who broadcast it.
        origin: P,
        /// Links crossed before this one.
        hops: u16,
        /// Pushed by its origin to each of its neighbours (a room small
        /// enough to be a full mesh): receivers only announce it on.
        all: bool,
        /// The application's message.
        payload: Vec<u8>,
    },
    /// Plumtree IHAVE: ids of broadcasts the sender has, with their hops.
    IHave {
        /// (id, hops) pairs.
        ids: Vec<(u64, u16)>,
    },
    /// Plumtree GRAFT: push broadcasts to me eagerly from now on, starting
    /// with broadcast `id` (none: a shorter path was found for one we have).
    Graft {
        /// The broadcast wanted.
        id: Option<u64>,
    },
    /// Plumtree PRUNE: stop pushing broadcasts to me eagerly (I got a duplicate).
    Prune,
    /// A message to this peer alone.
    Direct {
        /// The application's message.
        payload: Vec<u8>,
    },
    /// A signal for `to`, a peer the sender has no connection to, passed
    /// on hop by hop along the reverse path of what `to` sent before.
    Relay {
        /// The addressee.
        to: P,
        /// Who wrote it.
        from: P,
        /// Hops left.
        ttl: u8,
        /// The signal (at most [`MAX_RELAY`] bytes).
        payload: Vec<u8>,
    },
    /// A `Relay` coming back to its writer `to`: `from`, its addressee,
    /// could not be reached (no route, or a hop's limit).
    Unreachable {
        /// The relay's writer.
        to: P,
        /// The relay's addressee.
        from: P,
        /// Hops left.
        ttl: u8,
        /// The relay's signal.
        payload: Vec<u8>,
    },
}

/// Why bytes are not an overlay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A version this peer does not speak.
    Version(u8),
    /// A message type this peer does not know (from a newer peer).
    UnknownType(u8),
    /// Cut short, too long, or a field out of range.
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Version(v) => write!(f, "overlay message version {v}, expected {VERSION}"),
            DecodeError::UnknownType(t) => write!(f, "unknown overlay message type {t}"),
            DecodeError::Malformed(why) => write!(f, "malformed overlay message: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

mod tag {
    pub const JOIN: u8 = 1;
    pub const FORWARD_JOIN: u8 = 2;
    pub const NEIGHBOR: u8 = 3;
    pub const NEIGHBOR_REPLY: u8 = 4;
    pub const DISCONNECT: u8 = 5;
    pub const SHUFFLE: u8 = 6;
    pub const SHUFFLE_REPLY: u8 = 7;
    pub const GOSSIP: u8 = 16;
    pub const GOSSIP_ALL: u8 = 20;
    pub const IHAVE: u8 = 17;
    pub const GRAFT: u8 = 18;
    pub const PRUNE: u8 = 19;
    pub const DIRECT: u8 = 32;
    pub const RELAY: u8 = 33;
    pub const UNREACHABLE: u8 = 34;
}

fn put_id<P: WireId>(out: &mut Vec<u8>, id: &P) {
    let s = id.to_wire();
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

fn put_ids<P: WireId>(out: &mut Vec<u8>, ids: &[P]) {
    let n = ids.len().min(MAX_LISTED);
    out.push(n as u8);
    for id in &ids[..n] {
        put_id(out, id);
    }
}

impl<P: WireId> Message<P> {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.push(VERSION);
        match self {
            Message::Join => out.push(tag::JOIN),
            Message::ForwardJoin { peer, ttl } => {
                out.push(tag::FORWARD_JOIN);
                put_id(&mut out, peer);
                out.push(*ttl);
            }
            Message::Neighbor { high } => out.extend([tag::NEIGHBOR, u8::from(*high)]),
            Message::NeighborReply { accepted } => out.extend([tag::NEIGHBOR_REPLY, u8::from(*accepted)]),
            Message::Disconnect { alive } => out.extend([tag::DISCONNECT, u8::from(*alive)]),
            Message::Shuffle { origin, ttl, peers } => {
                out.push(tag::SHUFFLE);
                put_id(&mut out, origin);
                out.push(*ttl);
                put_ids(&mut out, peers);
            }
            Message::ShuffleReply { peers } => {
                out.push(tag::SHUFFLE_REPLY);
                put_ids(&mut out, peers);
            }
            Message::Gossip { id, origin, hops, all, payload } => {
                out.reserve(payload.len() + 32);
                out.push(if *all { tag::GOSSIP_ALL } else { tag::GOSSIP });
                out.extend(id.to_be_bytes());
                put_id(&mut out, origin);
                out.extend(hops.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Message::IHave { ids } => {
                out.push(tag::IHAVE);
                let n = ids.len().min(MAX_IHAVE);
                out.extend((n as u16).to_be_bytes());
                for (id, hops) in &ids[..n] {
                    out.extend(id.to_be_bytes());
                    out.extend(hops.to_be_bytes());
                }
            }
            Message::Graft { id } => {
                out.push(tag::GRAFT);
                if let Some(id) = id {
                    out.extend(id.to_be_bytes());
                }
            }
            Message::Prune => out.push(tag::PRUNE),
            Message::Direct { payload } => {
                out.reserve(payload.len() + 1);
                out.push(tag::DIRECT);
                out.extend_from_slice(payload);
            }
            Message::Relay { to, from, ttl, payload } | Message::Unreachable { to, from, ttl, payload } => {
                out.reserve(payload.len() + 32);
                out.push(if matches!(self, Message::Relay { .. }) { tag::RELAY } else { tag::UNREACHABLE });
                put_id(&mut out, to);
                put_id(&mut out, from);
                out.push(*ttl);
                out.extend_from_slice(payload);
            }
        }
        out
    }

    /// Reads one message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b: bytes };
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let msg = match r.u8()? {
            tag::JOIN => Message::Join,
            tag::FORWARD_JOIN => Message::ForwardJoin { peer: r.id()?, ttl: r.u8()? },
            tag::NEIGHBOR => Message::Neighbor { high: r.flag()? },
            tag::NEIGHBOR_REPLY => Message::NeighborReply { accepted: r.flag()? },
            tag::DISCONNECT => Message::Disconnect { alive: r.flag()? },
            tag::SHUFFLE => Message::Shuffle { origin: r.id()?, ttl: r.u8()?, peers: r.ids()? },
            tag::SHUFFLE_REPLY => Message::ShuffleReply { peers: r.ids()? },
            t @ (tag::GOSSIP | tag::GOSSIP_ALL) => {
                let id = r.u64()?;
                let origin = r.id()?;
                let hops = r.u16()?;
                return Ok(Message::Gossip {
                    id,
                    origin,
                    hops,
                    all: t == tag::GOSSIP_ALL,
                    payload: r.b.to_vec(),
                });
            }
            tag::IHAVE => {
                let n = r.u16()? as usize;
                if n > MAX_IHAVE {
                    return Err(DecodeError::Malformed("too many ids"));
                }
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push((r.u64()?, r.u16()?));
                }
                Message::IHave { ids }
            }
            tag::GRAFT => Message::Graft { id: if r.b.is_empty() { None } else { Some(r.u64()?) } },
            tag::PRUNE => Message::Prune,
            tag::DIRECT => return Ok(Message::Direct { payload: r.b.to_vec() }),
            t @ (tag::RELAY | tag::UNREACHABLE) => {
                let (to, from, ttl) = (r.id()?, r.id()?, r.u8()?);
                if r.b.len() > MAX_RELAY {
                    return Err(DecodeError::Malformed("relayed signal over 16 KiB"));
                }
                let payload = r.b.to_vec();
                return Ok(if t == tag::RELAY {
                    Message::Relay { to, from, ttl, payload }
                } else {
                    Message::Unreachable { to, from, ttl, payload }
                });
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if !r.b.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok(msg)
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Malformed("cut short"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Malformed("flag not 0 or 1")),
        }
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn id<P: WireId>(&mut self) -> Result<P, DecodeError> {
        let n = self.u8()? as usize;
        let s =
            std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Malformed("peer id not UTF-8"))?;
        P::from_wire(s).ok_or(DecodeError::Malformed("invalid peer id"))
    }
    fn ids<P: WireId>(&mut self) -> Result<Vec<P>, DecodeError> {
        let n = self.u8()? as usize;
        if n > MAX_LISTED {
            return Err(DecodeError::Malformed("too many peers listed"));
        }
        (0..n).map(|_| self.id()).collect()
    }
}
