//! A joined room: the tokio driver that owns the signaling link, the UDP
//! sockets, every peer connection of the mesh and their timers.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use peerlink_proto::{ClientMsg, ErrorCode, PeerId, ServerMsg, Signal};
use str0m::channel::ChannelId;
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::auth::SignalKeys;
use crate::channel::{ChannelSpec, DataChannel, Message, Shared};
use crate::conn::{ConnConfig, ConnEvent, ConnOutput, ConnState, Path, PeerConn};
use crate::error::Error;
use crate::gather::{self, IceConfig};
use crate::relay::{Demux, GatherReport, Gatherer, Output as GatherOutput};
use crate::signaling::{self, Signaling};

/// How to join a room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Signaling server WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`.
    pub server: String,
    pub room: String,
    /// Display name announced to the room.
    pub name: Option<String>,
    pub ice: IceConfig,
    /// Channels opened to every peer. The peer that joins later opens them,
    /// so each pair has exactly one of each.
    pub channels: Vec<ChannelSpec>,
    /// Send-queue capacity per channel, in bytes.
    pub send_queue_bytes: usize,
    /// Events buffered for the application before the driver stops reading
    /// the network (senders then see backpressure, nothing is dropped).
    pub event_capacity: usize,
    /// Bound on every wait for the signaling server.
    pub signaling_timeout: Duration,
    /// Bound on negotiation plus connectivity checks per peer.
    pub connect_timeout: Duration,
    /// Connect to every member automatically (a full mesh). When false, the
    /// application chooses with [`Room::connect`]; signals from a member it
    /// has not connected to yet are held (a bounded number) until it does.
    pub auto_connect: bool,
}

impl RoomConfig {
    pub fn new(server: impl Into<String>, room: impl Into<String>) -> Self {
        RoomConfig {
            server: server.into(),
            room: room.into(),
            name: None,
            ice: IceConfig::default(),
            channels: vec![ChannelSpec::reliable("data")],
            send_queue_bytes: 1024 * 1024,
            event_capacity: 1024,
            signaling_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            auto_connect: true,
        }
    }
}

/// How to connect to one peer with [`Room::connect`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Channels this side opens (the other side gets `ChannelOpen` too).
    /// Usually only one side names them.
    pub channels: Vec<ChannelSpec>,
    /// Keys from pairing: every offer and answer is authenticated, and the
    /// connection is refused ([`Event::AuthFailed`]) if one is not.
    pub keys: Option<SignalKeys>,
}

/// What happens in a room.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A peer is in the room (already there when we joined, or joined since).
    PeerJoined {
        peer: PeerId,
        name: Option<String>,
    },
    /// A peer left or dropped; its connection and channels are gone.
    PeerLeft {
        peer: PeerId,
    },
    /// The connection to `peer` changed state.
    StateChanged {
        peer: PeerId,
        state: ConnState,
    },
    /// A channel to a peer is open, whoever opened it.
    ChannelOpen {
        channel: DataChannel,
    },
    ChannelClosed {
        peer: PeerId,
        label: String,
    },
    /// A data-channel message.
    Message {
        peer: PeerId,
        label: String,
        message: Message,
    },
    /// An application message routed through the signaling server.
    ServerMessage {
        from: PeerId,
        data: serde_json::Value,
    },
    /// An offer or answer from `peer` failed authentication (the signaling
    /// path changed it, or it was not from the paired peer). The
    /// connection to `peer` is closed.
    AuthFailed {
        peer: PeerId,
        reason: String,
    },
    /// The server refused something we sent.
    ServerError {
        code: ErrorCode,
        message: String,
    },
    /// The signaling link is gone; the room is over.
    Closed {
        reason: String,
    },
}

/// Traffic and path of one peer connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Latest round-trip time str0m measured.
    pub rtt: Option<Duration>,
    /// The selected candidate pair, e.g. `Udp 127.0.0.1:5000 (Host) -> ...`.
    pub selected_pair: Option<String>,
    pub state: Option<ConnState>,
    /// ICE restarts this connection made to recover from outages.
    pub ice_restarts: u32,
    /// The selected path: its kind (host, srflx, relay) and both ends.
    pub path: Option<Path>,
    /// Why the connection failed, with what was gathered on each side.
    pub failure: Option<String>,
    /// Why the data goes through a relay, when it does.
    pub why_relayed: Option<String>,
}

enum Command {
    Connect { peer: PeerId, options: ConnectOptions, reply: oneshot::Sender<Result<(), Error>> },
    Disconnect { peer: PeerId, reply: oneshot::Sender<()> },
    OpenChannel { peer: PeerId, spec: ChannelSpec, reply: oneshot::Sender<Result<(), Error>> },
    ServerSend { to: Option<PeerId>, data: serde_json::Value },
    Stats { peer: PeerId, reply: oneshot::Sender<Option<PeerStats>> },
    Peers { reply: oneshot::Sender<Vec<PeerId>> },
    Gathering { reply: oneshot::Sender<GatherReport> },
    Leave { reply: oneshot::Sender<()> },
}

/// A joined room. Dropping it leaves the room.
#[derive(Debug)]
pub struct Room {
    id: PeerId,
    local_addrs: Vec<SocketAddr>,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
}

impl Room {
    /// Connects to the signaling server, joins the room and starts connecting
    /// to everyone in it.
    pub async fn join(config: RoomConfig) -> Result<Room, Error> {
        let addrs = config.ice.host_addrs()?;
        let sockets = gather::bind(&addrs).await?;
        let dtls_cert = tokio::task::spawn_blocking(crate::conn::generate_dtls_cert).await.ok().flatten();
        let local_addrs = sockets.iter().map(|s| s.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let sig =
            signaling::join(&config.server, &config.room, config.name.clone(), config.signaling_timeout)
                .await?;
        let id = sig.id.clone();
        tracing::info!(peer = %id, room = %config.room, addrs = ?local_addrs, "joined");
        let mut ice_servers = config.ice.servers.clone();
        if config.ice.use_server_ice {
            ice_servers.extend(sig.ice_servers.iter().cloned());
        }
        let servers =
            crate::relay::resolve(&ice_servers, config.signaling_timeout.min(Duration::from_secs(3))).await;
        let gatherer = Gatherer::new(&local_addrs, &servers, Instant::now());
        let (commands, cmd_rx) = mpsc::channel(64);
        let (ev_tx, events) = mpsc::channel(config.event_capacity.max(16));
        let driver = Driver::new(config, sig, local_addrs.clone(), ev_tx, dtls_cert, gatherer);
        tokio::spawn(driver.run(sockets, cmd_rx));
        Ok(Room { id, local_addrs, commands, events })
    }

    /// Our peer id, assigned by the server.
    pub fn id(&self) -> &PeerId {
        &self.id
    }

    /// The local UDP addresses host candidates were gathered on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The next event; `None` once the room is closed and drained.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| Error::RoomClosed)?;
        rx.await.map_err(|_| Error::RoomClosed)
    }

    /// Connects to `peer`, a member of the room, opening `options.channels`.
    /// For rooms without `auto_connect`; on a connection that already
    /// exists it only opens the channels, and a failed or closed one is
    /// replaced.
    pub async fn connect(&self, peer: &PeerId, options: ConnectOptions) -> Result<(), Error> {
        self.call(|reply| Command::Connect { peer: peer.clone(), options, reply }).await?
    }

    /// Closes the connection to `peer` (it stays a member of the room).
    pub async fn disconnect(&self, peer: &PeerId) -> Result<(), Error> {
        self.call(|reply| Command::Disconnect { peer: peer.clone(), reply }).await
    }

    /// Opens another channel to `peer` (the remote gets `ChannelOpen` too).
    pub async fn open_channel(&self, peer: &PeerId, spec: ChannelSpec) -> Result<(), Error> {
        self.call(|reply| Command::OpenChannel { peer: peer.clone(), spec, reply }).await?
    }

    /// Sends `data` through the signaling server to one peer, or to everyone
    /// in the room when `to` is `None`. For setup before channels are open.
    pub async fn send_via_server(&self, to: Option<&PeerId>, data: serde_json::Value) -> Result<(), Error> {
        self.commands.send(Command::ServerSend { to: to.cloned(), data }).await.map_err(|_| Error::RoomClosed)
    }

    /// Traffic, RTT and selected path of the connection to `peer`.
    pub async fn stats(&self, peer: &PeerId) -> Result<PeerStats, Error> {
        self.call(|reply| Command::Stats { peer: peer.clone(), reply })
            .await?
            .ok_or_else(|| Error::UnknownPeer(peer.clone()))
    }

    /// Which local candidates were gathered, and why any are missing (no
    /// STUN answer, TURN credentials refused, ...).
    pub async fn gathering(&self) -> Result<GatherReport, Error> {
        self.call(|reply| Command::Gathering { reply }).await
    }

    /// Peers currently in the room.
    pub async fn peers(&self) -> Result<Vec<PeerId>, Error> {
        self.call(|reply| Command::Peers { reply }).await
    }

    /// Leaves the room and closes every connection.
    pub async fn leave(self) -> Result<(), Error> {
        self.call(|reply| Command::Leave { reply }).await
    }
}

struct PeerState {
    conn: PeerConn,
    channels: HashMap<ChannelId, Arc<Shared>>,
    /// Some channel could not write because SCTP's buffer was full.
    blocked: bool,
    stats: PeerStats,
    next_timeout: Instant,
    /// Has input or commands since its outputs were last polled.
    dirty: bool,
}

struct Driver {
    config: RoomConfig,
    id: PeerId,
    room: String,
    local_addrs: Vec<SocketAddr>,
    conn_config: ConnConfig,
    /// Room members and their display names.
    members: HashMap<PeerId, Option<String>>,
    /// Connections, by member.
    peers: HashMap<PeerId, PeerState>,
    /// Signals from members not connected to yet (without `auto_connect`).
    held: HashMap<PeerId, VecDeque<Signal>>,
    signaling: mpsc::Sender<ClientMsg>,
    incoming:
        futures_util::stream::BoxStream<'static, Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    initial_peers: Vec<peerlink_proto::PeerInfo>,
    events: mpsc::Sender<Event>,
    /// Events the application has not taken yet; while non-empty the driver
    /// does not read the network.
    backlog: VecDeque<Event>,
    wake: Arc<Notify>,
    closing: Option<String>,
    /// STUN and TURN from our sockets.
    gatherer: Gatherer,
    /// Server-reflexive and relayed candidates found so far.
    gathered: Vec<str0m::Candidate>,
    gathering_complete: bool,
}

/// Backlogged events above which the driver stops reading datagrams.
const BACKLOG_PAUSE: usize = 64;
/// Signals held per member not connected to yet; the oldest go first.
const MAX_HELD_SIGNALS: usize = 64;
/// Members with held signals at once.
const MAX_HELD_PEERS: usize = 64;
/// Datagrams handled per wake-up before the driver looks at its other inputs.
const RECV_BATCH: usize = 32;
/// Interval of application pings keeping the signaling link alive.
const SIGNALING_PING: Duration = Duration::from_secs(15);

impl Driver {
    fn new(
        config: RoomConfig,
        sig: Signaling,
        local_addrs: Vec<SocketAddr>,
        events: mpsc::Sender<Event>,
        dtls_cert: Option<str0m::config::DtlsCert>,
        gatherer: Gatherer,
    ) -> Self {
        let conn_config =
            ConnConfig { connect_timeout: config.connect_timeout, dtls_cert, ..ConnConfig::default() };
        let _ = sig.limits;
        Driver {
            id: sig.id,
            room: config.room.clone(),
            config,
            local_addrs,
            conn_config,
            members: HashMap::new(),
            peers: HashMap::new(),
            held: HashMap::new(),
            signaling: sig.outgoing,
            incoming: sig.incoming.boxed(),
            initial_peers: sig.peers,
            events,
            backlog: VecDeque::new(),
            wake: Arc::new(Notify::new()),
            closing: None,
            gatherer,
            gathered: Vec::new(),
            gathering_complete: false,
        }
    }

    fn emit(&mut self, ev: Event) {
        if self.backlog.is_empty() {
            match self.events.try_send(ev) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => self.backlog.push_back(ev),
            }
        } else {
            self.backlog.push_back(ev);
        }
    }

    fn signal(&mut self, msg: ClientMsg) {
        if let Err(e) = self.signaling.try_send(msg) {
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.closing.get_or_insert_with(|| "signaling server is not reading".into());
                }
                mpsc::error::TrySendError::Closed(_) => {
                    self.closing.get_or_insert_with(|| "signaling connection lost".into());
                }
            }
        }
    }

    /// A member is in the room (there when we joined, or joined since).
    fn member_joined(&mut self, peer: PeerId, name: Option<String>, initiator: bool, now: Instant) {
        if peer == self.id || self.members.contains_key(&peer) {
            return;
        }
        self.members.insert(peer.clone(), name.clone());
        self.emit(Event::PeerJoined { peer: peer.clone(), name });
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
        let hosts: &[SocketAddr] = if self.config.ice.relay_only { &[] } else { &self.local_addrs };
        let mut conn = PeerConn::new(peer.clone(), polite, hosts, &self.conn_config, now);
        for c in &self.gathered {
            conn.add_local_candidate(c.clone());
        }
        if self.gathering_complete {
            conn.gathering_complete();
        }
        if let Some(keys) = keys {
            conn.set_keys(keys);
        }
        for spec in channels {
            conn.open_channel(spec);
        }
        tracing::debug!(local = %self.id, remote = %peer, polite, "connecting");
        self.peers.insert(
            peer.clone(),
            PeerState {
                conn,
                channels: HashMap::new(),
                blocked: false,
                stats: PeerStats { state: Some(ConnState::Connecting), ..Default::default() },
                next_timeout: now,
                dirty: true,
            },
        );
        for signal in self.held.remove(&peer).unwrap_or_default() {
            self.apply_signal(&peer, signal, now);
        }
    }

    /// Closes and forgets the connection to `peer`, closing its channels.
    fn drop_conn(&mut self, peer: &PeerId) {
        let Some(mut st) = self.peers.remove(peer) else { return };
        st.conn.close();
        for (_, shared) in st.channels.drain() {
            shared.close();
            self.emit(Event::ChannelClosed { peer: peer.clone(), label: shared.spec.label.clone() });
        }
    }

    fn remove_peer(&mut self, peer: &PeerId) {
        self.held.remove(peer);
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

    fn on_server(&mut self, msg: ServerMsg, now: Instant) {
        match msg {
            ServerMsg::PeerJoined { peer, .. } if peer.id == self.id => {}
            ServerMsg::PeerJoined { peer, .. } => self.member_joined(peer.id, peer.name, false, now),
            ServerMsg::PeerLeft { peer_id, .. } => self.remove_peer(&peer_id),
            ServerMsg::Signal { from, signal, .. } => {
                if self.peers.contains_key(&from) {
                    self.apply_signal(&from, signal, now);
                } else if self.config.auto_connect {
                    self.create_conn(from.clone(), Vec::new(), None, now);
                    self.apply_signal(&from, signal, now);
                } else {
                    // Not connected to yet: hold it for Room::connect, within bounds.
                    if !self.held.contains_key(&from) && self.held.len() >= MAX_HELD_PEERS {
                        tracing::debug!(peer = %from, "too many peers with held signals: dropped");
                        return;
                    }
                    let q = self.held.entry(from).or_default();
                    if q.len() >= MAX_HELD_SIGNALS {
                        q.pop_front();
                    }
                    q.push_back(signal);
                }
            }
            ServerMsg::Message { from, data, .. } => self.emit(Event::ServerMessage { from, data }),
            ServerMsg::Error { code, message } => {
                tracing::warn!(%code, "server: {message}");
                if code.is_fatal() {
                    self.closing.get_or_insert(format!("{code}: {message}"));
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

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { peer, options, reply } => {
                let r = if self.members.contains_key(&peer) {
                    self.create_conn(peer, options.channels, options.keys, Instant::now());
                    Ok(())
                } else {
                    Err(Error::UnknownPeer(peer))
                };
                let _ = reply.send(r);
            }
            Command::Disconnect { peer, reply } => {
                self.drop_conn(&peer);
                let _ = reply.send(());
            }
            Command::OpenChannel { peer, spec, reply } => {
                let r = match self.peers.get_mut(&peer) {
                    Some(st) => {
                        st.conn.open_channel(spec);
                        st.next_timeout = Instant::now();
                        st.dirty = true;
                        Ok(())
                    }
                    None => Err(Error::UnknownPeer(peer)),
                };
                let _ = reply.send(r);
            }
            Command::ServerSend { to, data } => {
                let room = self.room.clone();
                self.signal(ClientMsg::Send { room, to, data });
            }
            Command::Stats { peer, reply } => {
                let _ = reply.send(self.peers.get(&peer).map(|st| st.stats.clone()));
            }
            Command::Gathering { reply } => {
                let _ = reply.send(self.gatherer.report());
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.members.keys().cloned().collect());
            }
            Command::Leave { reply } => {
                let room = self.room.clone();
                self.signal(ClientMsg::Leave { room });
                self.closing.get_or_insert_with(|| "left the room".into());
                let _ = reply.send(());
            }
        }
    }

    /// Moves queued messages of every channel of `st` into SCTP while it takes them.
    fn drain(st: &mut PeerState) {
        st.blocked = false;
        for (id, shared) in &st.channels {
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
                        shared.queue.lock().expect("channel queue lock").push_front(msg);
                        st.blocked = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %shared.peer, label = %shared.spec.label, "write failed: {e}");
                        shared.release(&msg);
                        shared.close();
                        break;
                    }
                }
            }
        }
    }

    /// Runs the outputs of every peer that had input or whose timer is due,
    /// until each waits for time or input.
    async fn pump(&mut self, sockets: &[UdpSocket], now: Instant) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, st)| st.dirty || st.next_timeout <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for peer in ids {
            self.pump_peer(&peer, sockets, now).await;
        }
    }

    async fn pump_peer(&mut self, peer: &PeerId, sockets: &[UdpSocket], now: Instant) {
        let mut events = Vec::new();
        let mut signals = Vec::new();
        let mut dead = false;
        {
            let Some(st) = self.peers.get_mut(peer) else { return };
            st.dirty = false;
            st.stats.ice_restarts = st.conn.restarts();
            if st.next_timeout <= now
                && let Err(e) = st.conn.handle_timeout(now)
            {
                tracing::debug!("{e}");
            }
            Self::drain(st);
            loop {
                match st.conn.poll_output() {
                    ConnOutput::Transmit { source, destination, contents } => {
                        if self.gatherer.is_relayed(source) {
                            self.gatherer.send_relayed(now, source, destination, &contents);
                        } else {
                            send_datagram(sockets, &self.local_addrs, source, destination, &contents).await;
                        }
                    }
                    ConnOutput::Signal(s) => signals.push(s),
                    ConnOutput::Timeout(t) => {
                        st.next_timeout = t;
                        break;
                    }
                    ConnOutput::Event(ev) => match ev {
                        ConnEvent::State(state) => {
                            st.stats.state = Some(state);
                            if matches!(state, ConnState::Failed | ConnState::Closed) {
                                dead = true;
                            }
                            if state == ConnState::Failed {
                                let why = st.conn.failure().unwrap_or("the connection failed").to_string();
                                let failure = format!(
                                    "{why}; our candidates: {}; theirs: [{}]",
                                    self.gatherer.report(),
                                    st.conn.remote_candidates().join(", ")
                                );
                                tracing::info!(remote = %peer, "{failure}");
                                st.stats.failure = Some(failure);
                            }
                            events.push(Event::StateChanged { peer: peer.clone(), state });
                        }
                        ConnEvent::ChannelOpen { id, label, spec } => {
                            let shared = Arc::new(Shared::new(
                                peer.clone(),
                                spec,
                                self.config.send_queue_bytes,
                                st.conn.max_message_size(),
                                self.wake.clone(),
                            ));
                            st.channels.insert(id, shared.clone());
                            tracing::debug!(remote = %peer, %label, "channel open");
                            events.push(Event::ChannelOpen { channel: DataChannel { shared } });
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
                            events.push(Event::Message {
                                peer: peer.clone(),
                                label: shared.spec.label.clone(),
                                message,
                            });
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
                        ConnEvent::Writable => Self::drain(st),
                        ConnEvent::AuthFailed(reason) => {
                            events.push(Event::AuthFailed { peer: peer.clone(), reason });
                        }
                        ConnEvent::Stats { rtt, path } => {
                            if rtt.is_some() {
                                st.stats.rtt = rtt;
                            }
                            if let Some(path) = path {
                                st.stats.why_relayed =
                                    (path.kind == crate::conn::PathKind::Relay).then(|| {
                                        why_relayed(
                                            self.config.ice.relay_only,
                                            &self.gatherer.report(),
                                            &st.conn.remote_candidates(),
                                        )
                                    });
                                st.stats.selected_pair = Some(path.to_string());
                                st.stats.path = Some(path);
                            }
                        }
                    },
                }
            }
        }
        if let Some(st) = self.peers.get_mut(peer) {
            for ip in st.conn.take_remote_ips() {
                self.gatherer.permit(now, ip);
            }
        }
        self.flush_gatherer(sockets).await;
        for signal in signals {
            let room = self.room.clone();
            self.signal(ClientMsg::Signal { room, to: peer.clone(), signal });
        }
        for ev in events {
            self.emit(ev);
        }
        if dead && let Some(st) = self.peers.get_mut(peer) {
            let closed: Vec<_> = st.channels.drain().map(|(_, shared)| shared).collect();
            for shared in closed {
                shared.close();
                self.emit(Event::ChannelClosed { peer: peer.clone(), label: shared.spec.label.clone() });
            }
        }
    }

    /// Carries out what the gatherer asks: datagrams to STUN/TURN servers,
    /// and new candidates for every connection.
    async fn flush_gatherer(&mut self, sockets: &[UdpSocket]) {
        while let Some(out) = self.gatherer.poll_output() {
            match out {
                GatherOutput::Transmit { socket, to, data } => {
                    if let Err(e) = sockets[socket].try_send_to(&data, to) {
                        tracing::debug!(%to, "STUN/TURN send: {e}");
                    }
                }
                GatherOutput::Candidate(c) => {
                    tracing::debug!(candidate = %c.to_sdp_string(), "gathered");
                    for st in self.peers.values_mut() {
                        st.conn.add_local_candidate(c.clone());
                        st.dirty = true;
                        st.next_timeout = Instant::now();
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

    fn on_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Option<PeerId> {
        let accepted = self
            .peers
            .iter()
            .find(|(_, st)| st.conn.accepts(now, source, destination, data))
            .map(|(id, _)| id);
        // str0m only recognises a DTLS sender once ICE has seen the path
        // succeed; through a relay, the remote's first DTLS flight can beat
        // that, and dropping it costs a one-second DTLS retransmission. A
        // single connection still being set up is where it belongs (DTLS
        // authenticates it anyway).
        let peer = accepted
            .or_else(|| {
                let mut connecting =
                    self.peers.iter().filter(|(_, st)| st.conn.state() == ConnState::Connecting);
                match (connecting.next(), connecting.next()) {
                    (Some((id, _)), None) if crate::conn::is_dtls(data) => Some(id),
                    _ => None,
                }
            })
            .cloned()?;
        let st = self.peers.get_mut(&peer).expect("found above");
        if let Err(e) = st.conn.handle_datagram(now, source, destination, data) {
            tracing::debug!("{e}");
        }
        Some(peer)
    }

    async fn run(mut self, sockets: Vec<UdpSocket>, mut commands: mpsc::Receiver<Command>) {
        let now = Instant::now();
        for p in std::mem::take(&mut self.initial_peers) {
            self.member_joined(p.id, p.name, true, now);
        }
        let mut buf = vec![0u8; 2048];
        let mut ping = tokio::time::interval(SIGNALING_PING);
        let wake = self.wake.clone();
        let events = self.events.clone();
        let mut incoming = std::mem::replace(&mut self.incoming, futures_util::stream::empty().boxed());
        let reason = loop {
            let now = Instant::now();
            if self.gatherer.poll_timeout().is_some_and(|t| t <= now) {
                self.gatherer.handle_timeout(now);
            }
            self.flush_gatherer(&sockets).await;
            self.pump(&sockets, now).await;
            if let Some(reason) = self.closing.take() {
                break reason;
            }
            let deadline =
                self.peers.values().map(|st| st.next_timeout).chain(self.gatherer.poll_timeout()).min();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let read_net = self.backlog.len() < BACKLOG_PAUSE;
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break "room handle dropped".to_string(),
                },
                permit = events.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(self.backlog.pop_front().expect("non-empty"));
                        while let Some(ev) = self.backlog.pop_front() {
                            match self.events.try_send(ev) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(ev)) => {
                                    self.backlog.push_front(ev);
                                    break;
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => break,
                            }
                        }
                    }
                    Err(_) => break "room handle dropped".to_string(),
                },
                frame = incoming.next() => match frame {
                    Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ServerMsg>(t.as_str()) {
                        Ok(msg) => self.on_server(msg, Instant::now()),
                        Err(e) => tracing::warn!("unreadable message from server: {e}"),
                    },
                    Some(Ok(WsMessage::Close(_))) | None => break "signaling server closed the connection".to_string(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("signaling connection lost: {e}"),
                },
                r = recv_any(&sockets, &mut buf), if read_net => match r {
                    Ok((n, source, idx)) => {
                        let destination = self.local_addrs[idx];
                        let now = Instant::now();
                        // Read what else is waiting; str0m takes a bounded
                        // number of datagrams between polls, so pump after each.
                        let (mut n, mut source) = (n, source);
                        for round in 1..=RECV_BATCH {
                            let handled = match self.gatherer.handle_datagram(now, idx, source, &buf[..n]) {
                                Demux::Pass => self.on_datagram(now, source, destination, &buf[..n]),
                                Demux::Relayed { peer, relayed, data } => {
                                    self.on_datagram(now, peer, relayed, &data)
                                }
                                Demux::Consumed => None,
                            };
                            self.flush_gatherer(&sockets).await;
                            if let Some(peer) = handled {
                                if let Some(st) = self.peers.get_mut(&peer) && st.blocked {
                                    Self::drain(st);
                                }
                                self.pump_peer(&peer, &sockets, now).await;
                            }
                            // Read another only if it will be handled: a
                            // datagram taken off the socket and then dropped
                            // is a loss SCTP has to repair.
                            if round == RECV_BATCH || self.backlog.len() >= BACKLOG_PAUSE {
                                break;
                            }
                            match sockets[idx].try_recv_from(&mut buf) {
                                Ok((len, from)) => (n, source) = (len, from),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => tracing::debug!("udp receive: {e}"),
                },
                _ = wake.notified() => {
                    // Some channel queued data; the drain in pump finds it.
                    for st in self.peers.values_mut() {
                        st.dirty = true;
                    }
                }
                _ = ping.tick() => self.signal(ClientMsg::Ping { nonce: None }),
                _ = sleep => {}
            }
        };
        tracing::debug!(peer = %self.id, "room closing: {reason}");
        let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
        for peer in &ids {
            if let Some(st) = self.peers.get_mut(peer) {
                st.conn.close();
            }
            self.pump_peer(peer, &sockets, Instant::now()).await;
        }
        self.gatherer.close(Instant::now());
        self.flush_gatherer(&sockets).await;
        let members: Vec<PeerId> = self.members.keys().chain(self.peers.keys()).cloned().collect();
        for peer in &members {
            self.remove_peer(peer);
        }
        self.emit(Event::Closed { reason });
        // Hand the application what is left, without waiting forever on it.
        let events = self.events.clone();
        let backlog = std::mem::take(&mut self.backlog);
        drop(self);
        for ev in backlog {
            if tokio::time::timeout(Duration::from_secs(5), events.send(ev)).await.is_err() {
                break;
            }
        }
    }
}

/// Explains a relayed path from what each side could offer.
fn why_relayed(relay_only: bool, ours: &GatherReport, theirs: &[String]) -> String {
    if relay_only {
        return "relay-only was asked for (our addresses are not offered)".into();
    }
    let they_direct = theirs.iter().any(|c| c.starts_with("host") || c.starts_with("srflx"));
    let we_srflx = ours.srflx.iter().any(|(_, _, o)| matches!(o, crate::relay::Outcome::Ok(_)));
    if !they_direct {
        "the other side offered only relayed candidates".into()
    } else if !we_srflx && !ours.srflx.is_empty() {
        "no direct pair answered, and our STUN requests got no answer (no server-reflexive address)".into()
    } else {
        "no direct candidate pair answered the connectivity checks (a NAT that maps per destination, \
         such as a symmetric NAT, or a firewall, on at least one side)"
            .into()
    }
}

async fn send_datagram(
    sockets: &[UdpSocket],
    local_addrs: &[SocketAddr],
    source: SocketAddr,
    destination: SocketAddr,
    data: &[u8],
) {
    let Some(sock) = local_addrs.iter().position(|a| *a == source).map(|i| &sockets[i]) else {
        tracing::trace!(%source, "no socket for source address");
        return;
    };
    match sock.try_send_to(data, destination) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let _ = tokio::time::timeout(Duration::from_millis(100), sock.send_to(data, destination)).await;
        }
        Err(e) => tracing::trace!(%destination, "udp send: {e}"),
    }
}

/// Receives one datagram from whichever socket has one.
async fn recv_any(sockets: &[UdpSocket], buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
    poll_fn(|cx| {
        for (i, s) in sockets.iter().enumerate() {
            let mut rb = ReadBuf::new(buf);
            match s.poll_recv_from(cx, &mut rb) {
                Poll::Ready(Ok(addr)) => return Poll::Ready(Ok((rb.filled().len(), addr, i))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}
