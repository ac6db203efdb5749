//! A room's logic without I/O: members, one connection per connected
//! member, signals held for members not connected to yet, the channels'
//! queues, which connection a datagram belongs to, and connection events
//! turned into room events. Server messages, datagrams and time go in;
//! datagrams, signaling messages and events come out, in the shape of
//! str0m's `handle_input` / `poll_output`. The tokio driver (`driver.rs`)
//! owns the sockets and the clock; `sim.rs` runs whole rooms on simulated
//! time with the same code.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use peerlink_proto::{ClientMsg, PeerId, PeerInfo, ServerMsg, Signal};
use rustc_hash::FxHashMap;
use str0m::channel::ChannelId;

use crate::auth::SignalKeys;
use crate::channel::{ChannelSpec, DataChannel, Message, RoomWake, Shared};
use crate::conn::{ConnConfig, ConnEvent, ConnOutput, ConnState, PeerConn, is_dtls};
use crate::error::Error;
use crate::event::{Event, PeerStats};
use crate::path::{FailureReport, PathKind, WhyRelayed};
use crate::relay::{Demux, GatherReport, Gatherer, Output as GatherOutput};

/// Signals held per member not connected to yet; the oldest go first.
const MAX_HELD_SIGNALS: usize = 64;
/// Members with held signals at once.
const MAX_HELD_PEERS: usize = 64;
/// Remembered (source, destination) → connection routes; the table is
/// cleared when it grows past this (routes are relearned on first use).
const MAX_ROUTES: usize = 4096;

/// What a room does, beyond the connections' own settings.
#[derive(Debug, Clone)]
pub(crate) struct MeshConfig {
    /// Channels the later joiner opens to every member.
    pub channels: Vec<ChannelSpec>,
    /// Connect to every member (a full mesh), or only when asked.
    pub auto_connect: bool,
    /// Offer relayed candidates only.
    pub relay_only: bool,
    /// Longest wait of a leave for sent messages to be acknowledged.
    pub linger: Duration,
    /// Send-queue capacity per channel, in bytes.
    pub send_queue_bytes: usize,
    /// Receive-queue capacity per channel, in bytes.
    pub receive_queue_bytes: usize,
    /// Per-connection settings.
    pub conn: ConnConfig,
    /// Connections and broadcasts chosen by an overlay (large rooms).
    pub overlay: Option<peerlink_overlay::Config>,
    /// An end-to-end encrypted room's keys.
    pub secret: Option<crate::e2e::RoomSecret>,
}

/// How to connect to one peer with [`crate::Room::connect`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Channels this side opens (the other side gets `ChannelOpen` too).
    /// Usually only one side names them.
    pub channels: Vec<ChannelSpec>,
    /// Keys from pairing: every offer and answer is authenticated, and the
    /// connection is refused ([`Event::AuthFailed`]) if one is not.
    pub keys: Option<SignalKeys>,
}

/// What the driver carries out for the room.
#[derive(Debug)]
pub(crate) enum MeshOutput {
    /// Send `data` to `to` from host socket `socket`.
    Transmit { socket: usize, to: SocketAddr, data: Vec<u8> },
    /// Open stream `stream` to a TURN server (TCP from `from`, with TLS
    /// checked against `tls_name` when set); answer with
    /// [`Mesh::stream_connected`] or [`Mesh::stream_failed`].
    StreamConnect { stream: usize, from: std::net::IpAddr, server: SocketAddr, tls_name: Option<String> },
    /// Write one STUN or ChannelData message to stream `stream`.
    StreamSend { stream: usize, data: Vec<u8> },
    /// Close stream `stream` once what is queued is written.
    StreamClose { stream: usize },
    /// Send a message to the signaling server.
    Signaling(ClientMsg),
    /// Hand an event to the application.
    Event(Event),
}

struct PeerState {
    /// Names this connection (not the member: a replaced connection gets a
    /// new key), for routes and ready lists.
    key: u64,
    conn: PeerConn,
    channels: HashMap<ChannelId, Arc<Shared>>,
    stats: PeerStats,
    next_timeout: Instant,
    /// Has input or commands since its outputs were last polled.
    dirty: bool,
    /// When its offer went over the overlay (overlay rooms): unanswered
    /// for [`RELAYED_ANSWER_TIMEOUT`], the connection starts over through
    /// the server.
    relayed_offer_at: Option<Instant>,
    /// A signal for it came through the server: ours go that way too.
    server_signalled: bool,
}

/// How long an offer relayed over the overlay waits for its answer before
/// the connection starts over with signals through the server (a link on
/// the way may have closed with it).
const RELAYED_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// One joined room's state.
pub(crate) struct Mesh {
    id: PeerId,
    room: String,
    config: MeshConfig,
    /// Our host sockets' addresses; a transmit's source picks the socket.
    local_addrs: Vec<SocketAddr>,
    /// Room members and their display names.
    members: HashMap<PeerId, Option<String>>,
    /// Members kept though the `joined` of our resume did not list them
    /// (one may be reconnecting too): taken for gone once their connection
    /// fails or the peer closes it (at once without a live one), unless
    /// it comes up again, a `peer_joined` names them or a signal from them
    /// through the server shows them still there.
    unconfirmed: HashSet<PeerId>,
    /// Connections, by member. This map and the two below are looked up for
    /// every datagram, so they hash with Fx rather than SipHash: their keys
    /// are server-minted ids, our own counter and paths ICE accepted (a
    /// bounded table), none of which an attacker can pick in numbers.
    peers: FxHashMap<PeerId, PeerState>,
    /// Connection key → member.
    keys: FxHashMap<u64, PeerId>,
    next_key: u64,
    /// Which connection a datagram from `source` to `destination` belongs
    /// to, learned from the first one it accepted: later datagrams are not
    /// offered to every connection.
    routes: FxHashMap<(SocketAddr, SocketAddr), u64>,
    /// Signals from members not connected to yet (without `auto_connect`).
    held: HashMap<PeerId, VecDeque<Signal>>,
    /// STUN and TURN from our sockets.
    gatherer: Gatherer,
    /// Server-reflexive and relayed candidates found so far.
    gathered: Vec<str0m::Candidate>,
    gathering_complete: bool,
    wake: Arc<RoomWake>,
    out: VecDeque<MeshOutput>,
    /// Set when the room must end, with the reason.
    closing: Option<String>,
    /// A leave waiting for sent messages to be acknowledged, until then.
    leaving: Option<Instant>,
    /// The overlay, in a room joined with one.
    overlay: Option<overlay::OverlayState>,
}

/// Refuses a channel with the signaling channel's label.
fn reserved(spec: &ChannelSpec) -> Result<(), Error> {
    if spec.label == crate::conn::SIGNAL_LABEL {
        return Err(Error::ReservedLabel(spec.label.clone()));
    }
    Ok(())
}

#[path = "mesh_overlay.rs"]
mod overlay;
pub use overlay::MAX_ROOM_MESSAGE;

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("id", &self.id).field("room", &self.room).finish_non_exhaustive()
    }
}

impl Mesh {
    pub fn new(
        id: PeerId,
        room: String,
        config: MeshConfig,
        local_addrs: Vec<SocketAddr>,
        gatherer: Gatherer,
        wake: Arc<RoomWake>,
        now: Instant,
    ) -> Mesh {
        Mesh {
            id,
            room,
            config,
            local_addrs,
            members: HashMap::new(),
            unconfirmed: HashSet::new(),
            peers: FxHashMap::default(),
            keys: FxHashMap::default(),
            next_key: 0,
            routes: FxHashMap::default(),
            held: HashMap::new(),
            gatherer,
            gathered: Vec::new(),
            gathering_complete: false,
            wake,
            out: VecDeque::new(),
            closing: None,
            leaving: None,
            overlay: None,
        }
        .with_overlay(now)
    }

    /// The overlay's timers start at `now`, the mesh's clock (simulated
    /// time in the simulations), not the wall clock's.
    fn with_overlay(mut self, now: Instant) -> Self {
        if let Some(cfg) = self.config.overlay.clone() {
            let ov = peerlink_overlay::Overlay::new(self.id.clone(), cfg, rand::random(), now);
            self.overlay = Some(overlay::OverlayState::new(ov));
            self.config.auto_connect = false;
        }
        self
    }

    /// The members listed in `joined`: as the later joiner, we connect to
    /// them. `size`: the room is large and `members` a sample of `size`.
    pub fn start(&mut self, members: Vec<PeerInfo>, size: Option<u32>, now: Instant) {
        self.flush_gatherer(now);
        if let Some(os) = &mut self.overlay {
            let ids: Vec<PeerId> = members.iter().map(|p| p.id.clone()).collect();
            let n = size.map_or(ids.len(), |n| n as usize);
            os.large = size.is_some();
            os.ov.join(ids, n, now);
            if size.is_some() {
                // A sample: members to meet, not the room's list.
                for p in members {
                    self.members.entry(p.id).or_insert(p.name);
                }
                self.overlay_step(now);
                return;
            }
        }
        for p in members {
            self.member_joined(p.id, p.name, true, now);
        }
        self.overlay_step(now);
    }

    /// Back in the room after a reconnect, with `members` listed in
    /// `joined`. When our place was kept (`resumed`), members we know are
    /// kept as they are (one not listed may be reconnecting too, after a
    /// server restart; one that really left is dropped once its connection
    /// fails or closes, see `unconfirmed`) and new ones are connected to as
    /// by a joiner. Otherwise the
    /// others were told we left and dropped their connections to us: every
    /// member is dropped and the room is joined afresh.
    pub fn rejoined(&mut self, members: Vec<PeerInfo>, size: Option<u32>, resumed: bool, now: Instant) {
        if !resumed {
            for peer in self.members() {
                self.remove_peer(&peer);
            }
        } else {
            if size.is_none() && self.overlay.is_none() {
                // A whole list: who is not on it may have left while we
                // were away (its `peer_left` written to our old socket).
                let listed: HashSet<&PeerId> = members.iter().map(|p| &p.id).collect();
                self.unconfirmed = self.members.keys().filter(|p| !listed.contains(p)).cloned().collect();
                // One without a live connection has nothing left to tell us.
                let dead: Vec<PeerId> = self
                    .unconfirmed
                    .iter()
                    .filter(|p| {
                        self.peers
                            .get(*p)
                            .is_none_or(|st| matches!(st.conn.state(), ConnState::Failed | ConnState::Closed))
                    })
                    .cloned()
                    .collect();
                for peer in dead {
                    self.remove_peer(&peer);
                }
            }
            // An offer written to the old link may not have arrived.
            for st in self.peers.values_mut() {
                st.conn.signaling_reset();
                st.dirty = true;
                st.next_timeout = now;
            }
        }
        self.start(members, size, now);
    }

    /// Why the room must end, once it must.
    pub fn take_closing(&mut self) -> Option<String> {
        self.closing.take()
    }

    /// Hands back a datagram's buffer once it is sent, for the next
    /// relayed datagram to be built in.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.gatherer.recycle(buf);
    }

    pub fn poll_output(&mut self) -> Option<MeshOutput> {
        self.out.pop_front()
    }

    /// The earliest time [`Mesh::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .map(|st| st.next_timeout)
            .chain(self.gatherer.poll_timeout())
            .chain(self.leaving)
            .chain(self.overlay.as_ref().and_then(|os| os.ov.poll_timeout()))
            .min()
    }

    fn emit(&mut self, ev: Event) {
        if self.overlay_intercepts(&ev) {
            return;
        }
        self.out.push_back(MeshOutput::Event(ev));
    }

    fn signaling(&mut self, msg: ClientMsg) {
        self.out.push_back(MeshOutput::Signaling(msg));
    }

    /// The signaling link failed or cannot keep up: the room ends.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.closing.get_or_insert_with(|| reason.into());
    }

    /// A member is in the room (there when we joined, or joined since).
    fn member_joined(&mut self, peer: PeerId, name: Option<String>, initiator: bool, now: Instant) {
        // Known already: the server says it is here (see `unconfirmed`).
        self.unconfirmed.remove(&peer);
        if peer == self.id || self.members.contains_key(&peer) {
            return;
        }
        self.members.insert(peer.clone(), name.clone());
        self.emit(Event::PeerJoined { peer: peer.clone(), name });
        if let Some(os) = &mut self.overlay {
            os.ov.peer_known(peer.clone());
        }
        if self.config.auto_connect {
            let channels = if initiator { self.config.channels.clone() } else { Vec::new() };
            self.create_conn(peer, channels, None, now);
        }
    }

    /// Starts a connection to `peer`, replacing a dead one, and replays
    /// signals held for it.
    fn create_conn(
        &mut self,
        peer: PeerId,
        channels: Vec<ChannelSpec>,
        keys: Option<SignalKeys>,
        now: Instant,
    ) {
        if peer == self.id {
            return;
        }
        if let Some(st) = self.peers.get_mut(&peer)
            && !matches!(st.conn.state(), ConnState::Failed | ConnState::Closed)
        {
            for spec in channels {
                st.conn.open_channel(spec);
            }
            st.next_timeout = now;
            st.dirty = true;
            return;
        }
        self.drop_conn(&peer);
        let polite = self.id < peer;
        let hosts: &[SocketAddr] = if self.config.relay_only { &[] } else { &self.local_addrs };
        let mut conn = PeerConn::new(peer.clone(), polite, hosts, &self.config.conn, now);
        for c in &self.gathered {
            conn.add_local_candidate(c.clone());
        }
        if self.gathering_complete {
            conn.gathering_complete();
        }
        // Pairing's keys, else the room secret's: every SDP authenticated.
        if let Some(keys) =
            keys.or_else(|| self.config.secret.as_ref().map(|s| s.signal_keys(&self.id, &peer)))
        {
            conn.set_keys(keys);
        }
        for spec in channels {
            conn.open_channel(spec);
        }
        tracing::debug!(local = %self.id, remote = %peer, polite, "connecting");
        let key = self.next_key;
        self.next_key += 1;
        self.keys.insert(key, peer.clone());
        self.peers.insert(
            peer.clone(),
            PeerState {
                key,
                conn,
                channels: HashMap::new(),
                stats: PeerStats { state: Some(ConnState::Connecting), ..Default::default() },
                next_timeout: now,
                dirty: true,
                relayed_offer_at: None,
                server_signalled: false,
            },
        );
        for signal in self.held.remove(&peer).unwrap_or_default() {
            self.apply_signal(&peer, signal, now);
        }
    }

    /// Closes and forgets the connection to `peer`, closing its channels.
    fn drop_conn(&mut self, peer: &PeerId) {
        let Some(mut st) = self.peers.remove(peer) else { return };
        self.keys.remove(&st.key);
        self.routes.retain(|_, k| *k != st.key);
        st.conn.close();
        // Its goodbye out before it is forgotten (bounded: a close_notify
        // is a datagram or two).
        let now = st.conn.last_now();
        for _ in 0..16 {
            match st.conn.poll_output() {
                ConnOutput::Transmit { source, destination, contents } => Self::transmit(
                    &mut self.gatherer,
                    &self.local_addrs,
                    &mut self.out,
                    now,
                    source,
                    destination,
                    contents,
                ),
                ConnOutput::Timeout(_) => break,
                _ => {}
            }
        }
        for (_, shared) in st.channels.drain() {
            shared.close();
            self.emit(Event::ChannelClosed { peer: peer.clone(), label: shared.spec.label.clone() });
        }
    }

    /// Sends a connection's datagram from `source`: a host socket, or a
    /// TURN allocation.
    fn transmit(
        gatherer: &mut Gatherer,
        local_addrs: &[SocketAddr],
        out: &mut VecDeque<MeshOutput>,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: Vec<u8>,
    ) {
        if gatherer.is_relayed(source) {
            gatherer.send_relayed(now, source, destination, &contents);
        } else if let Some(socket) = local_addrs.iter().position(|a| *a == source) {
            out.push_back(MeshOutput::Transmit { socket, to: destination, data: contents });
        } else {
            tracing::trace!(%source, "no socket for source address");
        }
    }

    fn remove_peer(&mut self, peer: &PeerId) {
        self.held.remove(peer);
        self.unconfirmed.remove(peer);
        self.drop_conn(peer);
        if self.members.remove(peer).is_some() {
            self.emit(Event::PeerLeft { peer: peer.clone() });
        }
    }

    fn apply_signal(&mut self, from: &PeerId, signal: Signal, now: Instant) {
        let Some(st) = self.peers.get_mut(from) else { return };
        if let Err(e) = st.conn.handle_signal(signal, now) {
            tracing::warn!("{e}");
        }
        st.next_timeout = now;
        st.dirty = true;
    }

    /// A message from the signaling server.
    pub fn handle_server(&mut self, msg: ServerMsg, now: Instant) {
        match msg {
            ServerMsg::PeerJoined { peer, .. } => self.member_joined(peer.id, peer.name, false, now),
            ServerMsg::PeerLeft { peer_id, .. } => {
                self.remove_peer(&peer_id);
                if let Some(os) = &mut self.overlay {
                    os.ov.peer_gone(&peer_id, now);
                    self.overlay_step(now);
                }
            }
            ServerMsg::Signal { from, signal, .. } => {
                self.signal_from(from, signal, false, now);
                if self.overlay.is_some() {
                    self.overlay_step(now);
                }
            }
            ServerMsg::Message { from, data, .. } => {
                let data = match &self.config.secret {
                    // Room-wide messages are sealed to `*`, the rest to us.
                    Some(s) => match s
                        .open(&from, &self.id, &data)
                        .or_else(|_| s.open(&from, &PeerId::from_server("*"), &data))
                    {
                        Ok(data) => data,
                        Err(e) => {
                            tracing::warn!(%from, "a message through the server refused: {e}");
                            self.emit(Event::ServerMessageRefused { from, reason: e.to_string() });
                            return;
                        }
                    },
                    None => data,
                };
                if self.config.secret.is_some()
                    && let Some(reason) = data.get(crate::e2e::REFUSED_KEY).and_then(|r| r.as_str())
                {
                    // A member refused what reached it as our signaling. Sealed
                    // messages carry no counter, so the server could replay an
                    // old notice: it only ends a connection not yet up.
                    let up = self.peers.get(&from).is_some_and(|st| st.conn.state() == ConnState::Connected);
                    if !up {
                        let reason = format!("it refused our signaling: {reason}");
                        self.drop_conn(&from);
                        // Failed, as the application and the overlay (which
                        // may wait on this connection) must hear.
                        self.emit(Event::StateChanged { peer: from.clone(), state: ConnState::Failed });
                        self.emit(Event::AuthFailed { peer: from.clone(), reason });
                        // Failed, as a connection whose checks fail: one not
                        // listed on our resume is taken for gone (as in the
                        // browser).
                        if self.unconfirmed.contains(&from) {
                            self.remove_peer(&from);
                        }
                    }
                    return;
                }
                if self.overlay_server_message(&from, &data, now) {
                    self.overlay_step(now);
                } else {
                    self.emit(Event::ServerMessage { from, data });
                }
            }
            ServerMsg::Error { code, message } => {
                tracing::warn!(%code, "server: {message}");
                if code.is_fatal() {
                    self.fail(format!("{code}: {message}"));
                } else {
                    self.emit(Event::ServerError { code, message });
                }
            }
            ServerMsg::Welcome { .. }
            | ServerMsg::Joined { .. }
            | ServerMsg::Left { .. }
            | ServerMsg::Pong { .. }
            | ServerMsg::Unknown => {}
        }
    }

    /// A signal from `from`, through the server or relayed over the overlay.
    /// `relayed`: over the overlay; else through the server, and our
    /// signals for that connection go through the server too.
    fn signal_from(&mut self, from: PeerId, signal: Signal, relayed: bool, now: Instant) {
        if !relayed {
            // The server relays only between members: still one, and one
            // taken for gone (see `unconfirmed`) is one again.
            self.unconfirmed.remove(&from);
            if self.overlay.is_none() {
                self.member_joined(from.clone(), None, false, now);
            }
        }
        self.take_signal(from.clone(), signal, now);
        if !relayed && let Some(st) = self.peers.get_mut(&from) {
            st.server_signalled = true;
        }
    }

    fn take_signal(&mut self, from: PeerId, signal: Signal, now: Instant) {
        if let Signal::Offer { sdp, .. } = &signal
            && let Some(st) = self.peers.get(&from)
        {
            // An offer for a connection that failed starts a new one: the
            // peer tries again (after its own reconnect, say), and a failed
            // connection would swallow every offer. An offer of a new
            // session: the remote closed our connection and opened another
            // before we noticed; this offer is not for ours.
            let dead = matches!(st.conn.state(), ConnState::Failed | ConnState::Closed);
            if dead || st.conn.is_new_session(sdp) {
                let why = if dead { "offer after ours failed" } else { "offer of a new session" };
                tracing::debug!(local = %self.id, remote = %from, "{why}: connection replaced");
                self.overlay_forget(&from, now);
                self.drop_conn(&from);
            }
        }
        if self.peers.contains_key(&from) {
            self.apply_signal(&from, signal, now);
        } else if self.config.auto_connect {
            self.create_conn(from.clone(), Vec::new(), None, now);
            self.apply_signal(&from, signal, now);
        } else if self.overlay.is_some() && matches!(signal, Signal::Offer { .. }) {
            // The overlay takes an offer within its connection limit.
            if self.overlay_accepts(&from, &signal, now) {
                self.create_conn(from.clone(), Vec::new(), None, now);
                self.apply_signal(&from, signal, now);
            }
        } else {
            // Not connected to yet: held for Room::connect, or (overlay
            // rooms) for the offer, which a relayed signal may overtake.
            if !self.held.contains_key(&from) && self.held.len() >= MAX_HELD_PEERS {
                if self.overlay.is_none() {
                    tracing::debug!(peer = %from, "too many peers with held signals: dropped");
                    return;
                }
                // Overlay rooms have no presence to clear them: another goes.
                if let Some(old) = self.held.keys().next().cloned() {
                    self.held.remove(&old);
                }
            }
            let q = self.held.entry(from).or_default();
            if q.len() >= MAX_HELD_SIGNALS {
                q.pop_front();
            }
            q.push_back(signal);
        }
    }

    /// Connects to `peer`, a member, with `options` (see [`crate::Room::connect`]).
    pub fn connect(&mut self, peer: PeerId, options: ConnectOptions, now: Instant) -> Result<(), Error> {
        if !self.members.contains_key(&peer) {
            return Err(Error::UnknownPeer(peer));
        }
        for spec in &options.channels {
            reserved(spec)?;
        }
        self.create_conn(peer, options.channels, options.keys, now);
        Ok(())
    }

    /// Closes the connection to `peer`; it stays a member.
    pub fn disconnect(&mut self, peer: &PeerId) {
        self.drop_conn(peer);
    }

    /// Opens another channel to `peer`.
    pub fn open_channel(&mut self, peer: &PeerId, spec: ChannelSpec, now: Instant) -> Result<(), Error> {
        reserved(&spec)?;
        let st = self.peers.get_mut(peer).ok_or_else(|| Error::UnknownPeer(peer.clone()))?;
        st.conn.open_channel(spec);
        st.next_timeout = now;
        st.dirty = true;
        Ok(())
    }

    /// Restarts ICE on the connection to `peer`.
    pub fn restart_ice(&mut self, peer: &PeerId, now: Instant) -> Result<(), Error> {
        let st = self.peers.get_mut(peer).ok_or_else(|| Error::UnknownPeer(peer.clone()))?;
        st.conn.restart_ice();
        st.next_timeout = now;
        st.dirty = true;
        Ok(())
    }

    /// Sends `data` through the server to `to`, or to every other member.
    pub fn send_via_server(&mut self, to: Option<PeerId>, data: serde_json::Value) {
        let room = self.room.clone();
        let data = match &self.config.secret {
            Some(s) => s.seal(&self.id, to.as_ref().unwrap_or(&PeerId::from_server("*")), &data),
            None => data,
        };
        self.signaling(ClientMsg::Send { room, to, data });
    }

    /// The connection to `peer`'s traffic and path.
    pub fn stats(&self, peer: &PeerId) -> Option<PeerStats> {
        self.peers.get(peer).map(|st| {
            let mut stats = st.stats.clone();
            (stats.signals_sent_on_channel, stats.signals_received_on_channel) = st.conn.channel_signals();
            stats.ice_restarts = st.conn.restarts();
            stats
        })
    }

    /// What gathering found.
    pub fn gathering(&self) -> GatherReport {
        self.gatherer.report()
    }

    /// Who the connections held and not failed or closed are to, beside
    /// who the overlay thinks they are to.
    #[cfg(test)]
    pub fn connection_debug(&self) -> String {
        let mut live: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, st)| !matches!(st.conn.state(), ConnState::Failed | ConnState::Closed))
            .map(|(p, st)| format!("{p}:{:?}", st.conn.state()))
            .collect();
        live.sort();
        let mut ov: Vec<String> = self
            .overlay
            .as_ref()
            .map(|os| os.ov.connections().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        ov.sort();
        format!("mesh {live:?} overlay {ov:?}")
    }

    /// Connections held and not failed or closed.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.peers
            .values()
            .filter(|st| !matches!(st.conn.state(), ConnState::Failed | ConnState::Closed))
            .count()
    }

    /// Whether a live connection to `peer` exists (or is being made).
    #[cfg(test)]
    pub fn has_connection(&self, peer: &PeerId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|st| !matches!(st.conn.state(), ConnState::Failed | ConnState::Closed))
    }

    /// The room's other members.
    pub fn members(&self) -> Vec<PeerId> {
        self.members.keys().cloned().collect()
    }

    /// Leaves the room once every message queued on a channel has been
    /// acknowledged by its peer, or at `now` + the configured linger: until
    /// then connections keep running (retransmitting what was lost); then
    /// the server is told, and the room ends. The server is told last
    /// because members drop their connection to a peer that left.
    pub fn leave(&mut self, now: Instant) {
        if self.leaving.is_none()
            && self.closing.is_none()
            && let Some(os) = &mut self.overlay
        {
            os.ov.leave(now);
            self.overlay_step(now);
            self.pump(now);
        }
        if self.leaving.is_none() && self.closing.is_none() {
            self.leaving = Some(now + self.config.linger);
            self.check_leaving(now);
        }
    }

    /// Whether a leave is waiting for acknowledgements.
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }

    /// Finishes a leave whose messages are all delivered or whose linger
    /// is over.
    fn check_leaving(&mut self, now: Instant) {
        let Some(deadline) = self.leaving else { return };
        if now < deadline && !self.all_acknowledged() {
            return;
        }
        self.leaving = None;
        let room = self.room.clone();
        self.signaling(ClientMsg::Leave { room });
        self.fail("left the room");
    }

    /// Whether nothing sent on a peer's channels waits, in our queues or
    /// unacknowledged in SCTP. Connections that are up, or down for the
    /// moment (their path may come back within the linger: an ICE restart,
    /// a Wi-Fi handover), are waited for; those still being made or gone
    /// for good cannot deliver and are not.
    fn all_acknowledged(&mut self) -> bool {
        self.peers.values_mut().all(|st| {
            !matches!(st.conn.state(), ConnState::Connected | ConnState::Disconnected)
                || (st.channels.values().all(|ch| ch.queue.lock().expect("channel queue lock").is_empty())
                    && st.conn.unacknowledged() == 0)
        })
    }

    /// Channels of these connections queued messages to send.
    pub fn channels_ready(&mut self, keys: impl IntoIterator<Item = u64>) {
        for key in keys {
            if let Some(st) = self.keys.get(&key).and_then(|peer| self.peers.get_mut(peer)) {
                st.dirty = true;
            }
        }
    }

    /// Whether the application keeps up: while a channel's receive queue is
    /// full, the driver should read no datagram.
    pub fn receivers_full(&self) -> bool {
        self.wake.full_receivers.load(Ordering::Acquire) > 0
    }

    /// Runs timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.gatherer.poll_timeout().is_some_and(|t| t <= now) {
            self.gatherer.handle_timeout(now);
        }
        self.flush_gatherer(now);
        self.pump(now);
        if self.overlay.is_some() {
            // What the connections received and what the overlay's timers
            // ask, then out at once.
            self.overlay_step(now);
            self.pump(now);
        }
        self.check_leaving(now);
    }

    /// Polls every connection that had input or whose timer is due.
    pub fn pump(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, st)| st.dirty || st.next_timeout <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for peer in due {
            self.pump_peer(&peer, now);
        }
    }

    /// A datagram that arrived on host socket `socket` from `source`.
    pub fn handle_datagram(&mut self, now: Instant, socket: usize, source: SocketAddr, data: &[u8]) {
        let Some(&destination) = self.local_addrs.get(socket) else { return };
        let handled = match self.gatherer.handle_datagram(now, socket, source, data) {
            Demux::Pass => self.route(now, source, destination, data),
            Demux::Relayed { peer, relayed, data: payload } => {
                self.route(now, peer, relayed, payload.of(data))
            }
            Demux::Consumed => None,
        };
        self.flush_gatherer(now);
        // str0m takes a bounded number of datagrams between polls: poll the
        // connection after each.
        if let Some(peer) = handled {
            self.pump_peer(&peer, now);
        }
    }

    /// One message from TURN stream `stream`.
    pub fn handle_stream(&mut self, now: Instant, stream: usize, frame: &[u8]) {
        let handled = match self.gatherer.handle_stream(now, stream, frame) {
            Demux::Relayed { peer, relayed, data: payload } => {
                self.route(now, peer, relayed, payload.of(frame))
            }
            Demux::Pass | Demux::Consumed => None,
        };
        self.flush_gatherer(now);
        if let Some(peer) = handled {
            self.pump_peer(&peer, now);
        }
    }

    /// TURN stream `stream` is connected from `local`.
    pub fn stream_connected(&mut self, now: Instant, stream: usize, local: SocketAddr) {
        self.gatherer.stream_connected(now, stream, local);
        self.flush_gatherer(now);
    }

    /// TURN stream `stream` did not connect, or ended.
    pub fn stream_failed(&mut self, now: Instant, stream: usize, why: String) {
        self.gatherer.stream_failed(now, stream, why);
        self.flush_gatherer(now);
    }

    /// Hands a datagram to the connection it belongs to.
    fn route(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Option<PeerId> {
        let known = self.routes.get(&(source, destination)).and_then(|k| self.keys.get(k));
        let peer = match known {
            Some(peer) => peer.clone(),
            None => {
                let accepted = self
                    .peers
                    .iter()
                    .find(|(_, st)| st.conn.accepts(now, source, destination, data))
                    .map(|(id, st)| (id.clone(), st.key));
                match accepted {
                    Some((peer, key)) => {
                        if self.routes.len() >= MAX_ROUTES {
                            self.routes.clear();
                        }
                        self.routes.insert((source, destination), key);
                        peer
                    }
                    // str0m only recognises a DTLS sender once ICE has seen
                    // the path succeed; through a relay, the remote's first
                    // DTLS flight can beat that, and dropping it costs a
                    // one-second DTLS retransmission. A single connection
                    // still being set up is where it belongs (DTLS
                    // authenticates it anyway).
                    None if is_dtls(data) => {
                        let mut connecting =
                            self.peers.iter().filter(|(_, st)| st.conn.state() == ConnState::Connecting);
                        match (connecting.next(), connecting.next()) {
                            (Some((id, _)), None) => id.clone(),
                            _ => return None,
                        }
                    }
                    None => return None,
                }
            }
        };
        let st = self.peers.get_mut(&peer)?;
        if let Err(e) = st.conn.handle_datagram(now, source, destination, data) {
            tracing::debug!("{e}");
        }
        Some(peer)
    }

    /// Moves queued messages of every channel of `st` into SCTP while it
    /// takes them. Returns the channels to end: closed by the application
    /// with nothing left to send, or refused by SCTP (a message over a
    /// maximum the peer lowered since, a stream SCTP no longer has).
    fn drain(st: &mut PeerState) -> Vec<ChannelId> {
        // The peer's maximum, as its latest description says.
        let max_message = st.conn.max_message_size();
        let mut ended = Vec::new();
        for (id, shared) in &st.channels {
            shared.unschedule();
            shared.max_message.store(max_message, Ordering::Relaxed);
            let mut failed = false;
            loop {
                let Some(msg) = shared.queue.lock().expect("channel queue lock").pop_front() else { break };
                match st.conn.write(*id, msg.is_binary(), msg.as_bytes()) {
                    Ok(true) => {
                        st.stats.bytes_sent += msg.len() as u64;
                        st.stats.messages_sent += 1;
                        shared.sent_bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
                        shared.sent_messages.fetch_add(1, Ordering::Relaxed);
                        shared.release(&msg);
                    }
                    Ok(false) => {
                        // SCTP's buffer is full: the rest waits for Writable.
                        shared.queue.lock().expect("channel queue lock").push_front(msg);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(peer = %shared.peer, label = %shared.spec.label, "write failed, closing the channel: {e}");
                        shared.release(&msg);
                        failed = true;
                        break;
                    }
                }
            }
            if failed || (shared.is_closing() && shared.queue.lock().expect("channel queue lock").is_empty())
            {
                ended.push(*id);
            }
        }
        ended
    }

    /// Closes channels `ids` of `peer` at both ends; the application hears
    /// [`Event::ChannelClosed`] for each.
    fn end_channels(st: &mut PeerState, peer: &PeerId, ids: Vec<ChannelId>, events: &mut Vec<Event>) {
        for id in ids {
            let Some(shared) = st.channels.remove(&id) else { continue };
            st.conn.close_channel(id);
            let unsent = std::mem::take(&mut *shared.queue.lock().expect("channel queue lock"));
            if !unsent.is_empty() {
                tracing::warn!(peer = %peer, label = %shared.spec.label, "{} queued messages not sent", unsent.len());
            }
            shared.close();
            events.push(Event::ChannelClosed { peer: peer.clone(), label: shared.spec.label.clone() });
        }
    }

    /// Polls one connection until it waits for time or input.
    fn pump_peer(&mut self, peer: &PeerId, now: Instant) {
        let mut events = Vec::new();
        let mut signals = Vec::new();
        let mut dead = false;
        if self.peers.get(peer).is_some_and(|st| {
            st.relayed_offer_at.is_some_and(|at| now >= at + RELAYED_ANSWER_TIMEOUT)
                && st.conn.state() == ConnState::Connecting
                && !st.conn.has_remote_description()
        }) {
            self.overlay_start_over(peer, now);
            return;
        }
        let fresh;
        {
            let Some(st) = self.peers.get_mut(peer) else { return };
            // Never connected yet: its signals may be relayed.
            fresh = st.conn.state() == ConnState::Connecting && !st.server_signalled;
            // A relayed offer is waited on until answered, even once the
            // remote signals through the server: its offer, if it collides
            // with ours and we are impolite, is ignored, and ours may have
            // been lost on the way as its was.
            if st.conn.state() != ConnState::Connecting || st.conn.has_remote_description() {
                st.relayed_offer_at = None;
            }
            st.dirty = false;
            st.stats.ice_restarts = st.conn.restarts();
            if st.next_timeout <= now
                && let Err(e) = st.conn.handle_timeout(now)
            {
                tracing::debug!("{e}");
            }
            let ended = Self::drain(st);
            Self::end_channels(st, peer, ended, &mut events);
            loop {
                match st.conn.poll_output() {
                    ConnOutput::Transmit { source, destination, contents } => Self::transmit(
                        &mut self.gatherer,
                        &self.local_addrs,
                        &mut self.out,
                        now,
                        source,
                        destination,
                        contents,
                    ),
                    ConnOutput::Signal(s) => signals.push(s),
                    ConnOutput::Timeout(t) => {
                        st.next_timeout = match st.relayed_offer_at {
                            Some(at) => t.min(at + RELAYED_ANSWER_TIMEOUT),
                            None => t,
                        };
                        break;
                    }
                    ConnOutput::Event(ev) => match ev {
                        ConnEvent::State(state) => {
                            st.stats.state = Some(state);
                            if state == ConnState::Connected {
                                self.unconfirmed.remove(peer);
                                st.stats.safety_number = st.conn.safety_number();
                                st.stats.fingerprints = st.conn.fingerprints();
                            }
                            if matches!(state, ConnState::Failed | ConnState::Closed) {
                                dead = true;
                            }
                            if state == ConnState::Failed {
                                let report = FailureReport {
                                    reason: st
                                        .conn
                                        .failure()
                                        .cloned()
                                        .unwrap_or(crate::path::Failure::ChecksTimedOut),
                                    local: self.gatherer.report(),
                                    remote: st.conn.remote_candidates(),
                                };
                                tracing::info!(remote = %peer, "{report}");
                                st.stats.failure = Some(report);
                            }
                            events.push(Event::StateChanged { peer: peer.clone(), state });
                        }
                        ConnEvent::ChannelOpen { id, label, spec } => {
                            let shared = Arc::new(Shared::new(
                                peer.clone(),
                                spec,
                                st.key,
                                (self.config.send_queue_bytes, self.config.receive_queue_bytes),
                                st.conn.max_message_size(),
                                self.wake.clone(),
                            ));
                            st.channels.insert(id, shared.clone());
                            tracing::debug!(remote = %peer, %label, "channel open");
                            events.push(Event::ChannelOpen { channel: DataChannel::new(shared) });
                        }
                        ConnEvent::ChannelData { id, binary, data } => {
                            let Some(shared) = st.channels.get(&id) else { continue };
                            st.stats.bytes_received += data.len() as u64;
                            st.stats.messages_received += 1;
                            let message = if binary {
                                Message::Binary(data)
                            } else {
                                match String::from_utf8(data) {
                                    Ok(s) => Message::Text(s),
                                    Err(e) => Message::Binary(e.into_bytes()),
                                }
                            };
                            shared.deliver(message);
                        }
                        ConnEvent::ChannelClose { id } => {
                            if let Some(shared) = st.channels.remove(&id) {
                                shared.close();
                                events.push(Event::ChannelClosed {
                                    peer: peer.clone(),
                                    label: shared.spec.label.clone(),
                                });
                            }
                        }
                        ConnEvent::Writable => {
                            let ended = Self::drain(st);
                            Self::end_channels(st, peer, ended, &mut events);
                        }
                        ConnEvent::AuthFailed(reason) => {
                            events.push(Event::AuthFailed { peer: peer.clone(), reason });
                        }
                        ConnEvent::Stats { rtt, path } => {
                            if rtt.is_some() {
                                st.stats.rtt = rtt;
                            }
                            if let Some(mut path) = path {
                                path.relay_transport = self.gatherer.relay_transport(path.local.addr);
                                st.stats.why_relayed = (path.kind == PathKind::Relay).then(|| {
                                    WhyRelayed::explain(
                                        self.config.relay_only,
                                        &self.gatherer.report(),
                                        &st.conn.remote_candidates(),
                                    )
                                });
                                st.stats.path = Some(path);
                            }
                        }
                    },
                }
            }
            for ip in st.conn.take_remote_ips() {
                self.gatherer.permit(now, ip);
            }
        }
        self.flush_gatherer(now);
        for signal in signals {
            let offer = matches!(signal, Signal::Offer { .. });
            if self.overlay_relay(peer, &signal, fresh, now) {
                if offer && let Some(st) = self.peers.get_mut(peer) {
                    st.relayed_offer_at.get_or_insert(now);
                    st.next_timeout = st.next_timeout.min(now + RELAYED_ANSWER_TIMEOUT);
                }
                continue;
            }
            let room = self.room.clone();
            self.signaling(ClientMsg::Signal { room, to: peer.clone(), signal });
        }
        for ev in events {
            if let Event::AuthFailed { peer, reason } = &ev
                && self.config.secret.is_some()
            {
                // Sealed, so the peer can trust it: the signaling between
                // us was changed (or it lacks the secret).
                self.send_via_server(
                    Some(peer.clone()),
                    serde_json::json!({ crate::e2e::REFUSED_KEY: reason }),
                );
            }
            self.emit(ev);
        }
        if dead && let Some(st) = self.peers.get_mut(peer) {
            let closed: Vec<_> = st.channels.drain().map(|(_, shared)| shared).collect();
            for shared in closed {
                shared.close();
                self.emit(Event::ChannelClosed { peer: peer.clone(), label: shared.spec.label.clone() });
            }
        }
        if dead && self.unconfirmed.remove(peer) {
            tracing::debug!(remote = %peer, "not listed on our resume, and its connection is gone: taken for gone");
            self.remove_peer(peer);
        }
    }

    /// Carries out what the gatherer asks: datagrams to STUN/TURN servers,
    /// and new candidates for every connection.
    fn flush_gatherer(&mut self, now: Instant) {
        while let Some(out) = self.gatherer.poll_output() {
            match out {
                GatherOutput::Transmit { socket, to, data } => {
                    self.out.push_back(MeshOutput::Transmit { socket, to, data });
                }
                GatherOutput::Connect { stream, from, server, tls_name } => {
                    self.out.push_back(MeshOutput::StreamConnect { stream, from, server, tls_name });
                }
                GatherOutput::StreamSend { stream, data } => {
                    self.out.push_back(MeshOutput::StreamSend { stream, data });
                }
                GatherOutput::StreamClose { stream } => {
                    self.out.push_back(MeshOutput::StreamClose { stream })
                }
                GatherOutput::Candidate(c) => {
                    tracing::debug!(candidate = %c.to_sdp_string(), "gathered");
                    for st in self.peers.values_mut() {
                        st.conn.add_local_candidate(c.clone());
                        st.dirty = true;
                        st.next_timeout = now;
                    }
                    self.gathered.push(c);
                }
                GatherOutput::Complete => {
                    tracing::debug!(report = %self.gatherer.report(), "gathering complete");
                    self.gathering_complete = true;
                    for st in self.peers.values_mut() {
                        st.conn.gathering_complete();
                        st.dirty = true;
                    }
                }
            }
        }
    }

    /// Ends the room: closes every connection (their goodbyes go out),
    /// gives TURN allocations back, and reports every member gone and then
    /// [`Event::Closed`].
    pub fn close(&mut self, reason: String, now: Instant) {
        let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
        for peer in &ids {
            if let Some(st) = self.peers.get_mut(peer) {
                st.conn.close();
            }
            self.pump_peer(peer, now);
        }
        self.gatherer.close(now);
        self.flush_gatherer(now);
        let members: Vec<PeerId> = self.members.keys().chain(self.peers.keys()).cloned().collect();
        for peer in &members {
            self.remove_peer(peer);
        }
        self.emit(Event::Closed { reason });
    }
}
