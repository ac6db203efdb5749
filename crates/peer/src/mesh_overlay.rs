//! A room with an overlay (`RoomConfig::overlay`): the overlay state
//! machine (peerlink-overlay) decides which connections the room holds,
//! and carries broadcasts and messages to one peer over a
//! `peerlink.overlay` channel on each. This module feeds it the room's
//! connection events and channel messages, and carries out what it asks.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use peerlink_overlay::{CHANNEL_LABEL, Message as OvMessage, Output, Overlay};
use peerlink_proto::{ClientMsg, PeerId, Signal};

use super::Mesh;
use crate::channel::{ChannelSpec, DataChannel, Message};
use crate::conn::ConnState;
use crate::error::{Error, SendError};
use crate::event::{Event, MessageKind, OverlayStats};

/// What a `Direct` message adds to its payload on the wire (generously).
const DIRECT_OVERHEAD: usize = 64;

/// Key of the server-routed messages that turn an offer down (`busy`), or
/// ask for signals through the server (`via_server`).
const BUSY_KEY: &str = "peerlink_overlay";
const VIA_SERVER: &str = "via_server";
/// How long a peer that refused a relayed offer is signalled through the server.
const SERVER_ONLY_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// Peers signalled through the server at once for that reason.
const MAX_SERVER_ONLY: usize = 1024;

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
    /// Signals for our connections sent through the server.
    pub signals_via_server: u64,
    /// Peers whose signals go through the server for now: they refused a
    /// relayed offer (it was for a connection they hold up).
    server_only: HashMap<PeerId, Instant>,
    /// The server said the room is large (no presence): members are who
    /// the overlay meets.
    pub large: bool,
}

impl OverlayState {
    pub fn new(ov: Overlay<PeerId>) -> Self {
        OverlayState {
            ov,
            channels: HashMap::new(),
            pending: VecDeque::new(),
            send_drops: 0,
            signals_via_server: 0,
            server_only: HashMap::new(),
            large: false,
        }
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

    /// The connection to `peer` is being replaced: the overlay counts it
    /// gone now (not when its channel's close is seen, which would close
    /// the new one).
    pub(super) fn overlay_forget(&mut self, peer: &PeerId, now: Instant) {
        let Some(os) = &mut self.overlay else { return };
        if os.channels.remove(peer).is_some() {
            os.ov.disconnected(peer, now);
        }
        os.pending.retain(|(p, _)| p != peer);
    }

    /// Starts the connection to `peer` over, signalling it through the
    /// server for a while: its relayed offer was refused, or went
    /// unanswered (lost with a link on the way).
    pub(super) fn overlay_start_over(&mut self, peer: &PeerId, now: Instant) {
        let Some(os) = &mut self.overlay else { return };
        tracing::debug!(%peer, "overlay: signalling through the server");
        if os.server_only.len() >= MAX_SERVER_ONLY {
            os.server_only.retain(|_, until| *until > now);
        }
        if os.server_only.len() < MAX_SERVER_ONLY {
            os.server_only.insert(peer.clone(), now + SERVER_ONLY_FOR);
        }
        self.drop_conn(peer);
        self.create_conn(peer.clone(), vec![ChannelSpec::reliable(CHANNEL_LABEL)], None, now);
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
    pub(super) fn overlay_server_message(
        &mut self,
        from: &PeerId,
        data: &serde_json::Value,
        now: Instant,
    ) -> bool {
        let Some(os) = &mut self.overlay else { return false };
        let said = data.get(BUSY_KEY).and_then(|v| v.as_str());
        if said == Some(VIA_SERVER) {
            // Our relayed offer was refused: signal this peer through the
            // server for a while, starting over with this connection.
            if self.peers.get(from).is_some_and(|st| st.conn.state() == ConnState::Connecting) {
                self.overlay_start_over(from, now);
            }
            return true;
        }
        if said != Some("busy") {
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
                // Not if the overlay closed it since its channel opened.
                if os.channels.contains_key(&peer) {
                    os.ov.connected(peer, now);
                }
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
            // Not once the overlay closed the connection (a `Disconnect`
            // read in the same batch): a message handled after that would
            // count the connection as up again, with no channel to it.
            let Some(os) = &mut self.overlay else { return };
            if !os.channels.contains_key(&peer) {
                continue;
            }
            match OvMessage::<PeerId>::decode(m.as_bytes()) {
                Ok(msg) => os.ov.handle_message(peer, msg, now),
                Err(e) => tracing::debug!(%peer, "overlay: {e}"),
            }
            self.overlay_outputs(now);
        }
        let Some(os) = &mut self.overlay else { return };
        if os.ov.poll_timeout().is_some_and(|t| t <= now) {
            os.ov.handle_timeout(now);
        }
        self.overlay_outputs(now);
    }

    /// Sends `signal`, for a connection to `peer` being set up, over the
    /// overlay if a route to `peer` is known; false: send it through the
    /// server. (A connection that was up re-signals through the server: an
    /// ICE restart must not depend on the overlay it may be part of.)
    pub(super) fn overlay_relay(
        &mut self,
        peer: &PeerId,
        signal: &Signal,
        fresh: bool,
        now: Instant,
    ) -> bool {
        let Some(os) = &mut self.overlay else { return false };
        let server_only = os.server_only.get(peer).is_some_and(|until| *until > now);
        let relayed = fresh
            && !server_only
            && serde_json::to_vec(signal).is_ok_and(|bytes| os.ov.relay(peer.clone(), bytes, now));
        if !relayed {
            os.signals_via_server += 1;
            return false;
        }
        self.overlay_outputs(now);
        true
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
                        None => {
                            tracing::debug!(local = %self.id, %peer, "overlay: no channel, message dropped")
                        }
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
                Output::Relayed { from, payload } => match serde_json::from_slice::<Signal>(&payload) {
                    // Its sender is who the writer says it is: it may set up
                    // a connection, never touch one that is up. An offer
                    // for one (its writer replaced a connection we still
                    // hold) is asked for again through the server, which
                    // vouches for who sends it.
                    Ok(signal)
                        if self
                            .peers
                            .get(&from)
                            .is_some_and(|st| st.conn.state() != ConnState::Connecting) =>
                    {
                        tracing::debug!(%from, "overlay: relayed signal for a connection that is up: refused");
                        if matches!(signal, Signal::Offer { .. }) {
                            self.send_via_server(Some(from), serde_json::json!({ BUSY_KEY: VIA_SERVER }));
                        }
                    }
                    Ok(signal) => self.signal_from(from, signal, true, now),
                    Err(e) => tracing::debug!(%from, "overlay: relayed signal: {e}"),
                },
                Output::RelayFailed { to, payload } => {
                    // Came back: through the server, where nothing is in its way.
                    if let Ok(signal) = serde_json::from_slice::<Signal>(&payload) {
                        os.signals_via_server += 1;
                        let room = self.room.clone();
                        self.signaling(ClientMsg::Signal { room, to, signal });
                    }
                }
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
        // Up, its channel's send queue must take it now: what the overlay
        // hands a full channel is dropped, so the caller hears it here
        // instead (as `try_send` would say), and may try again.
        let full = |c: &DataChannel| c.queued_bytes() + data.len() + DIRECT_OVERHEAD > c.queue_capacity();
        if os.channels.get(&peer).and_then(|l| l.iter().find(|c| !c.is_closed())).is_some_and(full) {
            return Err(Error::NotQueued(peer));
        }
        let queued = os.ov.send_direct(peer.clone(), data, now);
        self.overlay_outputs(now);
        if queued { Ok(()) } else { Err(Error::NotQueued(peer)) }
    }

    /// Peers the overlay counts as connected with no `peerlink.overlay`
    /// channel to them here (none, once what happened was handed to the
    /// overlay): what it sends them would be dropped.
    #[cfg(test)]
    pub(crate) fn overlay_orphans(&self) -> Vec<PeerId> {
        let Some(os) = &self.overlay else { return Vec::new() };
        if !os.pending.is_empty() {
            return Vec::new();
        }
        os.ov.connected_peers().filter(|p| !os.channels.contains_key(*p)).cloned().collect()
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
            signals_relayed: s.relayed,
            signals_via_server: os.signals_via_server,
            relays_received: s.relays_received,
            relays_forwarded: s.relays_forwarded,
            relays_failed: s.relays_failed,
        })
    }

    /// The neighbour a signal for `to` would be relayed through, when we
    /// hold no connection to `to`.
    #[cfg(test)]
    pub fn overlay_relay_hop(&self, to: &PeerId, now: Instant) -> Option<PeerId> {
        if self.peers.contains_key(to) {
            return None;
        }
        let os = self.overlay.as_ref()?;
        if os.server_only.get(to).is_some_and(|until| *until > now) {
            // Signals to it go through the server for a while.
            return None;
        }
        os.ov.relay_hop(to, now).filter(|h| h != to)
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

#[cfg(test)]
mod tests {
    use super::{BUSY_KEY, VIA_SERVER};

    #[test]
    fn server_routed_overlay_messages_match_the_fixture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/overlay/server_messages.json");
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON");
        assert_eq!(serde_json::json!({ BUSY_KEY: "busy" }), f["busy"]);
        assert_eq!(serde_json::json!({ BUSY_KEY: VIA_SERVER }), f["via_server"]);
    }
}
