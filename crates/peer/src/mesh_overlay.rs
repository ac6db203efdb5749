//! A room with an overlay (`RoomConfig::overlay`): the overlay state
//! machine (peerlink-overlay) decides which connections the room holds,
//! and carries broadcasts and messages to one peer over a
//! `peerlink.overlay` channel on each. This module feeds it the room's
//! connection events and channel messages, and carries out what it asks.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use peerlink_overlay::{CHANNEL_LABEL, Message as OvMessage, Output, Overlay};
use peerlink_proto::{PeerId, Signal};

use super::Mesh;
use crate::channel::{ChannelSpec, DataChannel, Message};
use crate::conn::ConnState;
use crate::error::{Error, SendError};
use crate::event::{Event, MessageKind, OverlayStats};

/// Key of the server-routed message that turns an offer down.
const BUSY_KEY: &str = "peerlink_overlay";

/// Largest application message [`crate::Room::broadcast`] and
/// [`crate::Room::send`] take, in bytes.
pub const MAX_ROOM_MESSAGE: usize = 64 * 1024;

/// The overlay of one room, and the channels it speaks on.
pub(crate) struct OverlayState {
    pub ov: Overlay<PeerId>,
    /// `peerlink.overlay` channels by peer (two when both sides opened one
    /// at once: both are read, the first is written).
    channels: HashMap<PeerId, Vec<DataChannel>>,
    /// Connection events not handed to the overlay yet.
    pending: VecDeque<(PeerId, bool)>,
    /// Messages dropped because a channel's send queue was full.
    pub send_drops: u64,
    /// The server said the room is large (no presence): members are who
    /// the overlay meets.
    pub large: bool,
}

impl OverlayState {
    pub fn new(ov: Overlay<PeerId>) -> Self {
        OverlayState { ov, channels: HashMap::new(), pending: VecDeque::new(), send_drops: 0, large: false }
    }
}

impl Mesh {
    /// Whether `ev` is the overlay's business (its channel opening or
    /// closing): then it is taken here and not shown to the application.
    pub(super) fn overlay_intercepts(&mut self, ev: &Event) -> bool {
        let Some(os) = &mut self.overlay else { return false };
        match ev {
            Event::ChannelOpen { channel } if channel.label() == CHANNEL_LABEL => {
                let peer = channel.peer().clone();
                let list = os.channels.entry(peer.clone()).or_default();
                list.push(channel.clone());
                if list.len() == 1 {
                    os.pending.push_back((peer, true));
                }
                true
            }
            Event::ChannelClosed { peer, label } if label == CHANNEL_LABEL => {
                if let Some(list) = os.channels.get_mut(peer) {
                    list.retain(|c| !c.is_closed());
                    if list.is_empty() {
                        os.channels.remove(peer);
                        os.pending.push_back((peer.clone(), false));
                    }
                }
                true
            }
            Event::StateChanged { peer, state: ConnState::Failed | ConnState::Closed } => {
                // Also when it failed before its channel opened.
                os.channels.remove(peer);
                os.pending.push_back((peer.clone(), false));
                false
            }
            _ => false,
        }
    }

    /// Whether to answer an offer from `from`, a peer we hold no connection
    /// to: the overlay keeps connections within its limit.
    pub(super) fn overlay_accepts(&mut self, from: &PeerId, signal: &Signal, now: Instant) -> bool {
        let Some(os) = &mut self.overlay else { return false };
        if !matches!(signal, Signal::Offer { .. }) {
            return false;
        }
        let ok = os.ov.accept(from.clone(), now);
        if ok {
            self.members.entry(from.clone()).or_insert(None);
        } else {
            // Said through the server: the offerer gives up at once instead
            // of waiting for its connect timeout.
            tracing::debug!(peer = %from, "overlay: connection limit reached, offer refused");
            self.send_via_server(Some(from.clone()), serde_json::json!({ BUSY_KEY: "busy" }));
        }
        ok
    }

    /// A server-routed message that is the overlay's: a peer turned our
    /// offer down.
    pub(super) fn overlay_server_message(&mut self, from: &PeerId, data: &serde_json::Value) -> bool {
        let Some(os) = &mut self.overlay else { return false };
        if data.get(BUSY_KEY).and_then(|v| v.as_str()) != Some("busy") {
            return false;
        }
        os.channels.remove(from);
        os.pending.push_back((from.clone(), false));
        self.drop_conn(from);
        true
    }

    /// Feeds the overlay what happened since the last step (connections,
    /// messages on its channels, timers) and carries out its outputs.
    pub(super) fn overlay_step(&mut self, now: Instant) {
        let Some(os) = &mut self.overlay else { return };
        let mut down = Vec::new();
        while let Some((peer, up)) = os.pending.pop_front() {
            if up {
                os.ov.connected(peer, now);
            } else {
                os.ov.disconnected(&peer, now);
                down.push(peer);
            }
        }
        for peer in down {
            // A connection without its overlay channel is not kept, dead or
            // not (with presence quiet, nobody would say its peer left, and
            // the overlay no longer counts it); nor is a member only the
            // overlay knew.
            if self.peers.contains_key(&peer) {
                self.drop_conn(&peer);
                if self.overlay.as_ref().is_some_and(|os| os.large) {
                    self.members.remove(&peer);
                }
            }
        }
        let Some(os) = &mut self.overlay else { return };
        let mut input = Vec::new();
        for (peer, list) in &os.channels {
            for ch in list {
                while let Some(m) = ch.try_recv() {
                    input.push((peer.clone(), m));
                }
            }
        }
        for (peer, m) in input {
            match OvMessage::<PeerId>::decode(m.as_bytes()) {
                Ok(msg) => os.ov.handle_message(peer, msg, now),
                Err(e) => tracing::debug!(%peer, "overlay: {e}"),
            }
        }
        if os.ov.poll_timeout().is_some_and(|t| t <= now) {
            os.ov.handle_timeout(now);
        }
        self.overlay_outputs(now);
    }

    fn overlay_outputs(&mut self, now: Instant) {
        loop {
            let Some(os) = &mut self.overlay else { return };
            let Some(out) = os.ov.poll_output() else { return };
            match out {
                Output::Connect(peer) => {
                    self.members.entry(peer.clone()).or_insert(None);
                    let live = self
                        .peers
                        .get(&peer)
                        .is_some_and(|st| !matches!(st.conn.state(), ConnState::Failed | ConnState::Closed));
                    let os = self.overlay.as_mut().expect("overlay");
                    if live {
                        // Up already (the other side opened it) or on its way.
                        if os.channels.contains_key(&peer) {
                            os.pending.push_back((peer, true));
                        }
                    } else {
                        self.create_conn(peer, vec![ChannelSpec::reliable(CHANNEL_LABEL)], None, now);
                    }
                }
                Output::Close(peer) => {
                    os.channels.remove(&peer);
                    self.drop_conn(&peer);
                }
                Output::Send(peer, msg) => {
                    let bytes = msg.encode();
                    let sent = os
                        .channels
                        .get(&peer)
                        .and_then(|l| l.iter().find(|c| !c.is_closed()))
                        .map(|c| c.try_send(Message::Binary(bytes)));
                    match sent {
                        Some(Ok(())) => {
                            if let Some(st) = self.peers.get_mut(&peer) {
                                st.dirty = true;
                                st.next_timeout = now;
                            }
                        }
                        Some(Err(SendError::Overflow { .. })) => {
                            os.send_drops += 1;
                            tracing::debug!(%peer, "overlay: send queue full, message dropped");
                        }
                        Some(Err(e)) => tracing::debug!(%peer, "overlay: {e}"),
                        None => tracing::debug!(%peer, "overlay: no channel"),
                    }
                }
                Output::Deliver(d) => self.emit(Event::Message {
                    from: d.origin,
                    data: d.payload,
                    kind: MessageKind::Broadcast { hops: d.hops },
                }),
                Output::Direct { from, payload } => {
                    self.emit(Event::Message { from, data: payload, kind: MessageKind::Direct })
                }
                Output::DirectFailed { peer, messages } => self.emit(Event::SendFailed { peer, messages }),
                Output::NeighborUp(peer) => tracing::debug!(local = %self.id, %peer, "neighbour up"),
                Output::NeighborDown(peer) => tracing::debug!(local = %self.id, %peer, "neighbour down"),
            }
        }
    }

    /// Sends `data` to every member (see [`crate::Room::broadcast`]).
    pub fn broadcast(&mut self, data: Vec<u8>, now: Instant) -> Result<(), Error> {
        check_size(&data)?;
        let os = self.overlay.as_mut().ok_or(Error::NoOverlay)?;
        os.ov.broadcast(data, now);
        self.overlay_outputs(now);
        Ok(())
    }

    /// Sends `data` to `peer` alone (see [`crate::Room::send`]).
    pub fn send_to(&mut self, peer: PeerId, data: Vec<u8>, now: Instant) -> Result<(), Error> {
        check_size(&data)?;
        let os = self.overlay.as_mut().ok_or(Error::NoOverlay)?;
        let queued = os.ov.send_direct(peer.clone(), data, now);
        self.overlay_outputs(now);
        if queued { Ok(()) } else { Err(Error::NotQueued(peer)) }
    }

    /// The overlay's counters and neighbours.
    pub fn overlay_stats(&self) -> Option<OverlayStats> {
        let os = self.overlay.as_ref()?;
        let s = os.ov.stats();
        Some(OverlayStats {
            neighbors: os.ov.neighbors().to_vec(),
            passive: s.passive,
            connections: s.connections,
            delivered: s.delivered,
            duplicates: s.duplicates,
            forwarded: s.forwarded,
            grafts: s.grafts,
            prunes: s.prunes,
            replacements: s.replacements,
            dropped: s.dropped + os.send_drops,
        })
    }

    /// Hops the last broadcast from `peer` crossed to reach us.
    pub fn overlay_hops(&self, peer: &PeerId) -> Option<u16> {
        self.overlay.as_ref()?.ov.hops_from(peer)
    }
}

fn check_size(data: &[u8]) -> Result<(), Error> {
    if data.len() > MAX_ROOM_MESSAGE {
        return Err(Error::TooLarge { size: data.len(), max: MAX_ROOM_MESSAGE });
    }
    Ok(())
}
