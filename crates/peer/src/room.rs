//! The public handle of a joined room: how to join, and the calls an
//! application makes. The room's logic is in `mesh.rs`, its I/O in
//! `driver.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::PeerId;
use tokio::sync::{mpsc, oneshot};

use crate::channel::{ChannelSpec, RoomWake};
use crate::conn::ConnConfig;
use crate::driver::Driver;
use crate::error::Error;
use crate::event::{Event, OverlayStats, PeerStats};
use crate::gather::{self, IceConfig};
use crate::mesh::{ConnectOptions, Mesh, MeshConfig};
use crate::relay::{GatherReport, Gatherer};
use crate::signaling;

/// How to join a room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Signaling server WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`.
    pub server: String,
    /// Other nodes of the same deployment (sharing a Redis) to reconnect to
    /// when the server goes away, after the server itself. Behind a load
    /// balancer the server's own URL is enough.
    pub fallback_servers: Vec<String>,
    /// When the signaling server goes away (it shuts down, telling us
    /// `shutting_down`, or the connection breaks), reconnect for at most
    /// this long, keeping our peer id, our place in the room and every peer
    /// connection; the room ends if no server takes us back. Zero: the room
    /// ends with the signaling connection.
    pub reconnect_window: Duration,
    /// The room's name (1-64 of `A-Z a-z 0-9 - _ .`).
    pub room: String,
    /// Display name announced to the room.
    pub name: Option<String>,
    /// Join token from the application's backend, for servers that require
    /// one (`peerlink serve --join-secret`).
    pub token: Option<String>,
    /// Where candidates are gathered, and which STUN/TURN servers to use.
    pub ice: IceConfig,
    /// Channels opened to every peer. The peer that joins later opens them,
    /// so each pair has exactly one of each.
    pub channels: Vec<ChannelSpec>,
    /// Send-queue capacity per channel, in bytes.
    pub send_queue_bytes: usize,
    /// Receive-queue capacity per channel, in bytes: while one channel holds
    /// more than this untaken, the room reads no datagram (senders then see
    /// backpressure, nothing is dropped).
    pub receive_queue_bytes: usize,
    /// Room events buffered for the application before the driver stops
    /// reading the network.
    pub event_capacity: usize,
    /// Bound on every wait for the signaling server.
    pub signaling_timeout: Duration,
    /// Bound on negotiation plus connectivity checks per peer.
    pub connect_timeout: Duration,
    /// Connect to every member automatically (a full mesh). When false, the
    /// application chooses with [`Room::connect`]; signals from a member it
    /// has not connected to yet are held (a bounded number) until it does.
    pub auto_connect: bool,
    /// How long [`Room::leave`] waits for messages already sent to be
    /// acknowledged by their peers before it leaves anyway.
    pub linger: Duration,
    /// An emulated WAN on the datagrams this peer sends (benchmarks and
    /// tests): delay and random loss. `None`: the real network only.
    pub netem: Option<crate::NetEm>,
    /// Join as a member of an overlay (for rooms of any size, up to
    /// thousands): the overlay chooses the connections (every member in a
    /// room of up to `full_mesh_up_to`, a handful of neighbours beyond),
    /// and [`Room::broadcast`] and [`Room::send`] carry messages. `channels`
    /// and `auto_connect` are not used; [`Room::connect`] still opens
    /// channels of the application's own. Every member of a room must
    /// join the same way. `None`: a full mesh, as many connections as
    /// members.
    pub overlay: Option<crate::OverlayConfig>,
    /// An end-to-end encrypted room: the secret every member was given
    /// (the link's `#k=`, `--room-secret`), which the server never sees.
    /// Every offer and answer between members is authenticated with keys
    /// derived from it (a server that changes one, or a client without the
    /// secret, is refused: [`Event::AuthFailed`]), and messages sent through
    /// the server are sealed (AES-256-GCM): it relays only ciphertext.
    /// Every member of the room must use the same secret.
    pub room_secret: Option<String>,
}

impl RoomConfig {
    /// Defaults for joining `room` on `server`: one reliable channel
    /// labelled `data`, automatic full mesh, every interface.
    pub fn new(server: impl Into<String>, room: impl Into<String>) -> Self {
        RoomConfig {
            server: server.into(),
            fallback_servers: Vec::new(),
            reconnect_window: Duration::from_secs(30),
            room: room.into(),
            name: None,
            token: None,
            ice: IceConfig::default(),
            channels: vec![ChannelSpec::reliable("data")],
            send_queue_bytes: 1024 * 1024,
            receive_queue_bytes: 4 * 1024 * 1024,
            event_capacity: 1024,
            signaling_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            auto_connect: true,
            linger: Duration::from_secs(5),
            netem: None,
            overlay: None,
            room_secret: None,
        }
    }
}

/// A call from the [`Room`] handle, carried out by the driver.
pub(crate) enum Command {
    Connect { peer: PeerId, options: ConnectOptions, reply: oneshot::Sender<Result<(), Error>> },
    Disconnect { peer: PeerId, reply: oneshot::Sender<()> },
    OpenChannel { peer: PeerId, spec: ChannelSpec, reply: oneshot::Sender<Result<(), Error>> },
    RestartIce { peer: PeerId, reply: oneshot::Sender<Result<(), Error>> },
    ServerSend { to: Option<PeerId>, data: serde_json::Value, reply: oneshot::Sender<Result<(), Error>> },
    Stats { peer: PeerId, reply: oneshot::Sender<Option<PeerStats>> },
    Peers { reply: oneshot::Sender<Vec<PeerId>> },
    Gathering { reply: oneshot::Sender<GatherReport> },
    Leave { reply: oneshot::Sender<()> },
    Broadcast { data: Vec<u8>, reply: oneshot::Sender<Result<(), Error>> },
    Send { peer: PeerId, data: Vec<u8>, reply: oneshot::Sender<Result<(), Error>> },
    OverlayStats { reply: oneshot::Sender<Option<OverlayStats>> },
    OverlayHops { peer: PeerId, reply: oneshot::Sender<Option<u16>> },
}

/// A joined room. Dropping it leaves the room.
#[derive(Debug)]
pub struct Room {
    id: PeerId,
    local_addrs: Vec<SocketAddr>,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    /// Counts what the events hold, which the driver bounds.
    wake: Arc<RoomWake>,
}

impl Room {
    /// Connects to the signaling server, joins the room and starts connecting
    /// to everyone in it.
    pub async fn join(config: RoomConfig) -> Result<Room, Error> {
        if let Some(s) = &config.room_secret
            && s.chars().count() < crate::e2e::MIN_ROOM_SECRET
        {
            return Err(Error::WeakRoomSecret(s.chars().count()));
        }
        if let Some(spec) = config.channels.iter().find(|c| c.label == crate::conn::SIGNAL_LABEL) {
            return Err(Error::ReservedLabel(spec.label.clone()));
        }
        let addrs = config.ice.host_addrs()?;
        let sockets = gather::bind(&addrs).await?;
        let dtls_cert = tokio::task::spawn_blocking(crate::conn::generate_dtls_cert).await.ok().flatten();
        let local_addrs = sockets.iter().map(|s| s.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let sig = signaling::join(
            &config.server,
            &config.room,
            config.name.clone(),
            config.token.clone(),
            config.signaling_timeout,
        )
        .await?;
        let id = sig.id.clone();
        tracing::info!(peer = %id, room = %config.room, addrs = ?local_addrs, "joined");
        let mut ice_servers = config.ice.servers.clone();
        if config.ice.use_server_ice {
            ice_servers.extend(sig.ice_servers.iter().cloned());
        }
        let servers =
            crate::relay::resolve(&ice_servers, config.signaling_timeout.min(Duration::from_secs(3))).await;
        // One instant for everything that starts here: the gatherer's timers,
        // the mesh's and the first connections' start together.
        let now = Instant::now();
        let gatherer = Gatherer::new(&local_addrs, &servers, now);
        let (commands, cmd_rx) = mpsc::channel(64);
        let (ev_tx, events) = mpsc::channel(config.event_capacity.max(16));
        let mesh_config = MeshConfig {
            channels: config.channels.clone(),
            auto_connect: config.auto_connect,
            relay_only: config.ice.relay_only,
            linger: config.linger,
            send_queue_bytes: config.send_queue_bytes,
            receive_queue_bytes: config.receive_queue_bytes,
            conn: ConnConfig { connect_timeout: config.connect_timeout, dtls_cert, ..ConnConfig::default() },
            overlay: config.overlay.clone(),
            secret: config.room_secret.as_deref().map(|s| crate::e2e::RoomSecret::new(s, &config.room)),
        };
        let wake = Arc::new(RoomWake::default());
        let mut mesh = Mesh::new(
            id.clone(),
            config.room.clone(),
            mesh_config,
            local_addrs.clone(),
            gatherer,
            wake.clone(),
            now,
        );
        mesh.start(sig.peers, sig.size, now);
        let driver = Driver {
            mesh,
            wake: wake.clone(),
            udp: crate::udp::Udp::new(sockets, crate::driver::SEND_WAIT)?,
            commands: cmd_rx,
            events: ev_tx,
            backlog: Default::default(),
            backlog_bytes: 0,
            streams: crate::stream::Streams::new(config.ice.turn_ca.clone()),
            reconnect: crate::driver::Reconnect {
                spec: signaling::JoinSpec {
                    urls: std::iter::once(&config.server).chain(&config.fallback_servers).cloned().collect(),
                    room: config.room.clone(),
                    name: config.name.clone(),
                    token: config.token.clone(),
                    timeout: config.signaling_timeout,
                },
                id: id.clone(),
                resume: sig.resume.clone(),
                window: config.reconnect_window,
            },
            held: Default::default(),
            held_data: Default::default(),
            leave_replies: Vec::new(),
            netem: config.netem.map(crate::netem::Link::new),
        };
        tokio::spawn(driver.run(sig.incoming, sig.outgoing, sig.writer));
        Ok(Room { id, local_addrs, commands, events, wake })
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
        let ev = self.events.recv().await?;
        let before = self.wake.event_bytes.fetch_sub(ev.size(), std::sync::atomic::Ordering::AcqRel);
        if before >= crate::channel::EVENT_BYTES_PAUSE {
            // The driver may have stopped reading for want of room.
            self.wake.notify.notify_one();
        }
        Some(ev)
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

    /// Restarts ICE on the connection to `peer` (after a network change, or
    /// to look for a better path). Channels stay open; the connection
    /// restarts on its own when its path goes down. Once connected, the
    /// offer and answer travel on the connection's own signaling channel,
    /// without the server.
    pub async fn restart_ice(&self, peer: &PeerId) -> Result<(), Error> {
        self.call(|reply| Command::RestartIce { peer: peer.clone(), reply }).await?
    }

    /// Sends `data` through the signaling server to one peer, or to everyone
    /// in the room when `to` is `None`. For setup before channels are open.
    pub async fn send_via_server(&self, to: Option<&PeerId>, data: serde_json::Value) -> Result<(), Error> {
        self.call(|reply| Command::ServerSend { to: to.cloned(), data, reply }).await?
    }

    /// Seals `channel` end to end at the application layer (a sealed
    /// channel: ECDH P-256 keys bound to this connection's DTLS
    /// fingerprints, AES-256-GCM per message), for apps that store or
    /// forward what they receive. The other end must seal it too; waits at
    /// most `timeout` for its key.
    pub async fn seal(
        &self,
        channel: crate::DataChannel,
        timeout: Duration,
    ) -> Result<crate::SealedChannel, crate::SealError> {
        let stats = self.stats(channel.peer()).await.map_err(|_| crate::SealError::Closed)?;
        let (ours, theirs) = stats.fingerprints.ok_or(crate::SealError::Closed)?;
        crate::SealedChannel::open(channel, &ours, &theirs, timeout).await
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

    /// Sends `data` (at most [`crate::MAX_ROOM_MESSAGE`] bytes) to every
    /// member of the room, whatever its size; each receives
    /// [`Event::Message`]. Rooms joined with an overlay only
    /// ([`Error::NoOverlay`] otherwise). Reliable while connections last:
    /// a broadcast that misses a member on its tree path is fetched from a
    /// neighbour that announced it.
    pub async fn broadcast(&self, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        let data = data.into();
        self.call(|reply| Command::Broadcast { data, reply }).await?
    }

    /// Sends `data` to `peer` alone, over a direct connection opened on
    /// demand (and closed after a while unused). Rooms joined with an
    /// overlay only.
    pub async fn send(&self, peer: &PeerId, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        let data = data.into();
        self.call(|reply| Command::Send { peer: peer.clone(), data, reply }).await?
    }

    /// What the overlay is doing: neighbours, broadcasts forwarded,
    /// duplicates, repairs. `None` for a room without one.
    pub async fn overlay_stats(&self) -> Result<Option<OverlayStats>, Error> {
        self.call(|reply| Command::OverlayStats { reply }).await
    }

    /// Overlay links the last broadcast from `peer` crossed to reach us
    /// (1: we are neighbours), if one came.
    pub async fn overlay_hops(&self, peer: &PeerId) -> Result<Option<u16>, Error> {
        self.call(|reply| Command::OverlayHops { peer: peer.clone(), reply }).await
    }

    /// Leaves the room and closes every connection, without losing what
    /// was sent to connected peers: first every message already queued on
    /// such a channel is handed to its connection and acknowledged by the
    /// peer (connections still being made, failed or closed are not waited
    /// for; one down for the moment is, as its path may come back; waiting
    /// at most [`RoomConfig::linger`]; lost packets are retransmitted meanwhile),
    /// then the server is told. Returns once the server has been handed
    /// everything sent before (messages via the server, the leave itself),
    /// or after a bounded wait if it is not reading. Dropping the [`Room`]
    /// instead leaves at once.
    pub async fn leave(self) -> Result<(), Error> {
        self.call(|reply| Command::Leave { reply }).await
    }
}
