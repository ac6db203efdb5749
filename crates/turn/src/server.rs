//! The tokio driver: one task owns every piece of TURN state.
//!
//! The task reads the listen socket itself and receives peer datagrams from
//! the relay tasks (see [`crate::relay`]). It answers Binding requests,
//! checks credentials, asks the [`Ledger`] (the rules: quotas, admission,
//! generations, revocation) and carries out its commands, feeds everything
//! else to turn-server-proto, and sends what the protocol produces.
//!
//! UDP goes in batches ([`peerlink_proto::udp`]): the listen socket is read
//! several datagrams (or GRO runs of them) per call, and what leaves is
//! gathered into GSO batches (consecutive datagrams of one size from one
//! socket to one address), sent when the next datagram does not fit and at
//! the end of every wake-up. Sends never wait: when the kernel's send buffer
//! is full the datagrams are dropped (and counted), so one slow path never
//! stalls the others.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::gso::GsoBatch;
use peerlink_proto::udp::{RecvBufs, UdpIo};
use stun_proto::Instant as SioInstant;
use stun_proto::types::attribute::{ErrorCode, Nonce, Userhash, Username};
use stun_proto::types::message::{BINDING, Message, MessageClass};
use stun_proto::types::{AddressFamily, TransportType};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, trace, warn};
use turn_server_proto::api::{SocketAllocateError, Transmit, TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer;
use turn_server_proto::types::message::ALLOCATE;

use crate::Error;
use crate::bucket::TokenBucket;
use crate::config::Config;
use crate::ledger::{Client, Command, Ledger, Record, Refusal, RevokeWhy};
use crate::own::OwnMap;
use crate::policy::Policy;
use crate::relay::{self, MAX_PEER_DATAGRAM, PeerDatagram, RELAY_QUEUE};
use crate::rest::{rest_expiry, rest_password, unix_now};
use crate::routes::{self, Routes};
use crate::stats::{Stats, add, dec, inc};
use crate::stream::{self, IDLE_TIMEOUT, STREAM_QUEUE, StreamConn, StreamEvent, StreamLimits, TlsConfig};
use crate::stun;

/// How often allocation ages are checked against `max_lifetime`.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Datagrams handled per wake-up before going back to `select!`.
const BATCH: usize = 64;
/// Upper bound on `poll()` steps per pump; each step is one allocation or
/// close, so this is never reached in practice.
const MAX_POLL_STEPS: usize = 1024;
/// Consecutive listen-socket receive errors after which `run` gives up.
const MAX_RECV_ERRORS: u32 = 100;
/// Buffers per receive call on the listen socket (each one datagram, or a
/// GRO run of them, up to 96 KB).
const RECV_BUFS: usize = 8;
/// Warnings about full tables are repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A STUN/TURN server on one UDP socket, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    socket: UdpSocket,
    local: SocketAddr,
    config: Config,
    relay_ip: IpAddr,
    advertised_ip: IpAddr,
    stats: Stats,
    tcp: Option<TcpListener>,
    tls: Option<(TcpListener, TlsConfig)>,
}

impl Server {
    /// Checks `config` against the bound `socket`.
    ///
    /// Fails when no credentials are configured, when the relayed address to
    /// advertise is unknown (relay sockets on an unspecified address without
    /// [`Config::external_ip`]), when the relay and advertised addresses are of
    /// different families, or when a limit is zero.
    pub fn new(socket: UdpSocket, config: Config) -> Result<Self, Error> {
        let local = socket.local_addr()?;
        if config.auth.is_empty() {
            return Err(Error::Config("no credentials: set a REST secret or static users".into()));
        }
        if config.realm.is_empty() || stun_proto::types::attribute::Realm::new(&config.realm).is_err() {
            return Err(Error::Config(format!("invalid realm {:?}", config.realm)));
        }
        let (start, end) = (*config.relay_ports.start(), *config.relay_ports.end());
        if start > end || (start == 0 && end != 0) {
            return Err(Error::Config(format!(
                "relay port range {start}..={end}: use LOW..=HIGH with LOW >= 1, or 0..=0 for ephemeral ports"
            )));
        }
        let relay_ip = config.relay_ip.unwrap_or(local.ip());
        let advertised_ip = config.external_ip.unwrap_or(relay_ip);
        if advertised_ip.is_unspecified() {
            return Err(Error::Config(format!(
                "relay sockets bind to {relay_ip}: set external_ip (or relay_ip) to the address clients should use"
            )));
        }
        if advertised_ip.is_ipv4() != relay_ip.is_ipv4() {
            return Err(Error::Config(format!(
                "relay IP {relay_ip} and advertised IP {advertised_ip} are of different families"
            )));
        }
        let l = &config.limits;
        if l.max_allocations == 0
            || l.max_allocations_per_user == 0
            || l.max_allocations_per_ip == 0
            || l.max_lifetime.is_zero()
            || l.max_auth_entries == 0
            || l.new_client_requests_per_sec == 0
            || l.bandwidth_bytes_per_sec == Some(0)
        {
            return Err(Error::Config(format!("limits must be above zero: {l:?}")));
        }
        Ok(Server {
            socket,
            local,
            config,
            relay_ip,
            advertised_ip,
            stats: Stats::default(),
            tcp: None,
            tls: None,
        })
    }

    /// Also serves clients over TCP on `listener` (`turn:HOST:PORT?transport=tcp`).
    /// Relaying stays UDP.
    pub fn with_tcp(mut self, listener: TcpListener) -> Self {
        self.tcp = Some(listener);
        self
    }

    /// Also serves clients over TLS on `listener` (`turns:HOST:PORT`).
    pub fn with_tls(mut self, listener: TcpListener, tls: TlsConfig) -> Self {
        self.tls = Some((listener, tls));
        self
    }

    /// The address the server receives STUN/TURN on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle to the server's counters, valid after `run` has returned too.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Serves until `shutdown` completes, then closes every relay socket and
    /// returns. Fails only when the listen socket keeps failing.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_QUEUE);
        let now = Instant::now();
        let Server { socket, local, config, relay_ip, advertised_ip, stats, tcp, tls } = self;
        let mut tasks = JoinSet::new();
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_QUEUE);
        let limits = StreamLimits {
            max_connections: config.limits.max_stream_connections,
            max_connections_per_ip: config.limits.max_stream_connections_per_ip,
        };
        let counts = Arc::default();
        let listeners = tcp.map(|l| (l, None)).into_iter().chain(tls.map(|(l, t)| (l, Some(t))));
        for (listener, tls) in listeners {
            tasks.spawn(stream::accept_loop(
                listener,
                tls,
                stream_tx.clone(),
                limits,
                Arc::clone(&counts),
                stats.clone(),
            ));
        }
        drop(stream_tx);
        let policy = Policy::new(&config.peer_policy, local, relay_ip, config.external_ip);
        let static_users: Vec<(String, String)> = config.auth.users.clone();
        let ledger = Ledger::new(config.limits.clone(), now);
        let gens = Gens {
            current: Gen::new(ledger.current_generation(), local, &config.realm, &static_users),
            old: None,
            local,
            realm: config.realm.clone(),
            static_users: static_users.clone(),
        };
        let st = State {
            listen: UdpIo::new(socket)?,
            out: GsoBatch::default(),
            local,
            realm: config.realm,
            rest_secret: config.auth.rest_secret,
            static_users: static_users.into_iter().map(|(u, _)| u).collect(),
            max_auth_entries: config.limits.max_auth_entries,
            bandwidth: config.limits.bandwidth_bytes_per_sec,
            ledger,
            relay_ip,
            advertised_ip,
            relay_ports: config.relay_ports,
            policy,
            stats,
            base: now,
            relays: OwnMap::default(),
            relay_tx,
            hairpin: Vec::new(),
            routes: Routes::default(),
            tasks,
            streams: HashMap::new(),
            pending_user: None,
            full_warned_at: None,
        };
        info!(
            listen = %local,
            relay_ip = %st.relay_ip,
            advertised_ip = %st.advertised_ip,
            "STUN/TURN server running"
        );
        Driver { gens, st }.run(shutdown, relay_rx, stream_rx).await
    }
}

/// One instance of turn-server-proto's state.
///
/// The protocol keeps a nonce for every client address that ever sent it a
/// request and every user it was told about, and has no way to forget
/// either; REST usernames are new every time credentials are issued. The
/// driver bounds this by *generations*: when the current instance's tables
/// reach `max_auth_entries`, new clients go to a fresh instance while
/// allocations in the previous one keep working until they end; then it is
/// dropped. A rebuild that cut live allocations would punish every user for
/// a table that grew; a plain cap would lock new users out for good. At most
/// two generations exist: if the previous one still has allocations when the
/// current one fills up, requests from new client addresses are dropped
/// until it drains (allocations end by `max_lifetime` at the latest, plus the
/// protocol's own expiry of at most an hour).
struct Gen {
    id: u64,
    server: TurnServer,
    /// REST usernames added to `server`.
    primed: HashSet<String>,
    wake: SioInstant,
}

impl std::fmt::Debug for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gen").field("id", &self.id).field("primed", &self.primed.len()).finish()
    }
}

impl Gen {
    fn new(id: u64, local: SocketAddr, realm: &str, users: &[(String, String)]) -> Self {
        let mut server = TurnServer::new(TransportType::Udp, local, realm.to_owned());
        for (user, password) in users {
            server.add_user(user.clone(), password.clone());
        }
        Gen { id, server, primed: HashSet::new(), wake: SioInstant::ZERO }
    }
}

#[derive(Debug)]
struct Gens {
    current: Gen,
    old: Option<Gen>,
    local: SocketAddr,
    realm: String,
    static_users: Vec<(String, String)>,
}

impl Gens {
    fn get_mut(&mut self, id: u64) -> Option<&mut Gen> {
        if self.current.id == id { Some(&mut self.current) } else { self.old.as_mut().filter(|g| g.id == id) }
    }
}

/// The I/O side of one allocation (the [`Ledger`] holds its rules' side),
/// keyed by its advertised relayed address.
#[derive(Debug)]
struct Relay {
    /// Kept open until the protocol closes the allocation, even when revoked,
    /// so its port cannot be handed to another allocation meanwhile.
    socket: Arc<UdpIo>,
    task: AbortHandle,
    /// Client-to-peer budget (the relay task holds the other direction's).
    out_bucket: Option<TokenBucket>,
}

/// Everything except the protocol instances. `relays` is bounded by
/// `max_allocations` (the ledger refuses more), `pending_user` holds one entry.
#[derive(Debug)]
struct State {
    listen: UdpIo,
    /// Datagrams gathered for one send.
    out: GsoBatch<(Via, SocketAddr)>,
    local: SocketAddr,
    realm: String,
    rest_secret: Option<String>,
    static_users: HashSet<String>,
    max_auth_entries: usize,
    bandwidth: Option<u64>,
    ledger: Ledger,
    relay_ip: IpAddr,
    advertised_ip: IpAddr,
    relay_ports: RangeInclusive<u16>,
    policy: Policy,
    stats: Stats,
    base: Instant,
    relays: OwnMap<SocketAddr, Relay>,
    relay_tx: mpsc::Sender<PeerDatagram>,
    /// Datagrams from one allocation to another's relayed address, waiting
    /// to be received by the second (at most `RELAY_QUEUE`).
    hairpin: Vec<PeerDatagram>,
    /// ChannelData routes the protocol took lately (see [`crate::routes`]).
    routes: Routes,
    tasks: JoinSet<()>,
    /// The username of the ALLOCATE being fed to the protocol right now, so
    /// that the `AllocateSocket` it produces can be charged to that user.
    pending_user: Option<(SocketAddr, String)>,
    full_warned_at: Option<Instant>,
    /// Clients on TCP or TLS, by remote address.
    streams: HashMap<SocketAddr, Stream>,
}

/// The socket a datagram leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The listen socket, towards a client.
    Listen,
    /// The relay socket of the allocation with this relayed address,
    /// towards a peer.
    Relay(SocketAddr),
}

/// A client connection over TCP or TLS.
#[derive(Debug)]
struct Stream {
    conn: StreamConn,
    /// Since when it has held no allocation (Binding requests do not count:
    /// they cost nothing to send and would keep a slot forever).
    idle_since: Instant,
}

#[derive(Debug)]
struct Driver {
    gens: Gens,
    st: State,
}

impl Driver {
    async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut relay_rx: mpsc::Receiver<PeerDatagram>,
        mut stream_rx: mpsc::Receiver<StreamEvent>,
    ) -> Result<(), Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut bufs = RecvBufs::new(RECV_BUFS, &self.st.listen);
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut recv_errors = 0u32;
        let result = loop {
            self.receive_hairpinned();
            // What the last wake-up gathered leaves before the next wait.
            self.st.send_batch();
            let wake = tokio::time::Instant::from_std(self.next_wake());
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                r = std::future::poll_fn(|cx| self.st.listen.poll_recv(cx, &mut bufs)) => {
                    let now = Instant::now();
                    match r {
                        Ok(n) => {
                            recv_errors = 0;
                            for (from, datagram) in bufs.datagrams(n) {
                                self.on_datagram(now, from, datagram);
                            }
                        }
                        Err(e) => {
                            debug!("TURN listen socket receive: {e}");
                            recv_errors += 1;
                            if recv_errors >= MAX_RECV_ERRORS {
                                break Err(Error::Io(e));
                            }
                            continue;
                        }
                    }
                    for _ in 0..BATCH / RECV_BUFS {
                        let Ok(n) = self.st.listen.try_recv(&mut bufs) else { break };
                        for (from, datagram) in bufs.datagrams(n) {
                            self.on_datagram(now, from, datagram);
                        }
                    }
                }
                // Never 0: `State` holds a sender, so the channel stays open.
                _ = relay_rx.recv_many(&mut batch, BATCH) => {
                    let now = Instant::now();
                    for datagram in batch.drain(..) {
                        self.on_peer(now, datagram);
                    }
                }
                // `None` once no listener is left (or none was configured).
                Some(ev) = stream_rx.recv() => self.on_stream(Instant::now(), ev),
                () = tokio::time::sleep_until(wake) => self.on_timer(Instant::now()),
                _ = tick.tick() => self.housekeeping(Instant::now()),
            }
        };
        // Close every relay socket before returning: drop our handles, then
        // stop the receive tasks and wait until they have let go of theirs.
        let n = self.st.relays.len();
        self.st.relays.clear();
        self.st.tasks.shutdown().await;
        info!(allocations = n, "STUN/TURN server stopped");
        result
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.gens.current.wake;
        if let Some(old) = &self.gens.old {
            wake = wake.min(old.wake);
        }
        let at = self.st.base + Duration::from_nanos(wake.as_nanos().max(0) as u64);
        // The protocol may ask for "now" when something expires this instant;
        // a millisecond later it is gone, so don't spin meanwhile.
        at.max(Instant::now() + Duration::from_millis(1))
    }

    /// A datagram on the UDP listen socket.
    fn on_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        // An address is a client on one transport only.
        if self.st.streams.contains_key(&from) {
            return;
        }
        self.on_client(now, from, data);
    }

    /// A connection on the TCP or TLS listener opened, sent a message, or ended.
    fn on_stream(&mut self, now: Instant, ev: StreamEvent) {
        match ev {
            StreamEvent::Open { client, conn } => {
                // A UDP client of the same address and port is improbable but
                // possible: it keeps the address, the connection is refused.
                if self.st.ledger.client(client) != Client::New {
                    debug!(%client, "TURN stream refused: the address is a UDP client");
                    return;
                }
                inc(&self.st.stats.counters().stream_connections_total);
                debug!(%client, tls = conn.tls, "TURN stream client");
                self.st.streams.insert(client, Stream { conn, idle_since: now });
            }
            StreamEvent::Frame { client, data } => {
                if !self.st.streams.contains_key(&client) {
                    return;
                }
                self.on_client(now, client, &data);
            }
            StreamEvent::Closed { client } => {
                if self.st.streams.remove(&client).is_some() {
                    debug!(%client, "TURN stream ended");
                    self.st.ledger.connection_closed(client);
                    self.run_ledger(now);
                }
            }
        }
    }

    /// A STUN or ChannelData message from a client, whatever its transport.
    fn on_client(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        // Data on a channel the protocol routed lately goes the same way
        // without it.
        if let Some((channel, payload)) = routes::channel_data(data)
            && let Some((relay, peer)) = self.st.routes.out(from, channel, now)
        {
            inc(&self.st.stats.counters().channel_shortcuts);
            self.st.dispatch(relay, peer, payload, now);
            return;
        }
        let msg = Message::from_bytes(data).ok();
        let request = msg.as_ref().filter(|m| m.has_class(MessageClass::Request));
        if let Some(req) = request
            && req.has_method(BINDING)
        {
            inc(&self.st.stats.counters().binding_requests);
            let response = stun::binding_response(req, from);
            self.st.send_to_client(&response, from);
            return;
        }

        let gen_id = match self.st.ledger.client(from) {
            Client::Revoked => {
                if let Some(req) = request {
                    let response = stun::error_response(req, ErrorCode::ALLOCATION_MISMATCH, None, None);
                    self.st.send_to_client(&response, from);
                }
                return;
            }
            Client::Known { gen_id } => gen_id,
            Client::New => {
                // Only requests create protocol state for a new address;
                // anything else from it is ignored by the protocol anyway.
                if request.is_none() {
                    return;
                }
                let admitted = self.st.ledger.admit(from, now);
                self.run_ledger(now);
                match admitted {
                    Ok(gen_id) => gen_id,
                    // Dropped: the client retransmits, or (one IP taking
                    // many addresses) has what its share allows.
                    Err(Refusal::RateLimited | Refusal::AddressEntries) => {
                        inc(&self.st.stats.counters().dropped_rate_limited);
                        return;
                    }
                    Err(_) => {
                        if self.st.full_warned_at.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                            self.st.full_warned_at = Some(now);
                            warn!(
                                max_auth_entries = self.st.max_auth_entries,
                                "TURN authentication tables full: dropping requests from new clients until older allocations end"
                            );
                        }
                        inc(&self.st.stats.counters().dropped_tables_full);
                        return;
                    }
                }
            }
        };

        if let Some(req) = request
            && req.has_method(ALLOCATE)
        {
            match self.allocate_user(gen_id, req) {
                Ok(Some(user)) if self.quota_refused(from, req, &user) => return,
                Ok(user) => self.st.pending_user = user.map(|u| (from, u)),
                Err(username) => {
                    debug!(%from, user = username, "TURN allocation refused: REST username expired");
                    inc(&self.st.stats.counters().expired_credentials);
                    let nonce = req.attribute::<Nonce>().ok();
                    let response = stun::error_response(
                        req,
                        ErrorCode::UNAUTHORIZED,
                        Some(&self.st.realm),
                        nonce.as_ref().map(|n| n.nonce()),
                    );
                    self.st.send_to_client(&response, from);
                    return;
                }
            }
        }

        let Some(generation) = self.gens.get_mut(gen_id) else {
            return;
        };
        let sio = self.st.sio(now);
        let transmit = Transmit::new(data, TransportType::Udp, from, self.st.local);
        if let Some(reply) = generation.server.recv(transmit, sio) {
            let reply = reply.build();
            if reply.from != self.st.local
                && let Some((channel, _)) = routes::channel_data(data)
            {
                self.st.routes.learn_out(from, channel, reply.from, reply.to, now);
            }
            self.st.dispatch(reply.from, reply.to, &reply.data, now);
        }
        // Only requests change what `poll` reports (new allocations, deletions);
        // polling walks every allocation, so data skips it.
        if request.is_some() {
            pump(generation, &mut self.st, now, Some(from));
        }
        self.st.pending_user = None;
    }

    /// Answers an authenticated ALLOCATE from a client without an allocation
    /// with 486 (Allocation Quota Reached, RFC 8656 §7.2) when its user or
    /// its address holds its quota; returns whether it did. turn-server-proto
    /// can only refuse with 508, which says the server is full: a client
    /// told 486 knows to give an allocation back instead of trying later.
    fn quota_refused(&mut self, from: SocketAddr, req: &Message<'_>, user: &str) -> bool {
        if self.st.ledger.client(from) != Client::New {
            return false;
        }
        let Err(why @ (Refusal::UserQuota | Refusal::AddressQuota)) =
            self.st.ledger.check_allocation(from, user)
        else {
            return false;
        };
        let password = match self.gens.static_users.iter().find(|(u, _)| u == user) {
            Some((_, p)) => p.clone(),
            None => match &self.st.rest_secret {
                Some(secret) if rest_expiry(user).is_some() => rest_password(secret, user),
                _ => return false,
            },
        };
        let Some(key) = verified_key(req, user, &password, &self.st.realm) else {
            return false; // the protocol answers that one (401)
        };
        info!(client = %from, user, "TURN allocation refused: {why} (486)");
        inc(&self.st.stats.counters().allocations_refused);
        let response = stun::signed_error_response(req, ErrorCode::ALLOCATION_QUOTA_REACHED, &key);
        self.st.send_to_client(&response, from);
        true
    }

    /// Checks and primes the username of an ALLOCATE. Returns the name to
    /// charge quotas to, or `Err(username)` for an expired REST username.
    fn allocate_user(&mut self, gen_id: u64, req: &Message<'_>) -> Result<Option<String>, String> {
        if let Ok(username) = req.attribute::<Username>() {
            let name = username.username();
            if !self.st.static_users.contains(name)
                && let Some(secret) = &self.st.rest_secret
                && let Some(expiry) = rest_expiry(name)
            {
                // Checked here, not only when priming: a username primed while
                // valid stays in the protocol's table after it expires.
                if expiry < unix_now() {
                    return Err(name.to_owned());
                }
                // Only a name the request proves it holds the password of
                // (its MESSAGE-INTEGRITY checks out with the key derived from
                // the secret) is added: anyone may send a name with a future
                // expiry, and adding each would grow the table without end.
                // A request without integrity gets its 401 without it.
                if let Some(generation) = self.gens.get_mut(gen_id)
                    && !generation.primed.contains(name)
                {
                    let password = rest_password(secret, name);
                    if verified_key(req, name, &password, &self.st.realm).is_some() {
                        generation.server.add_user(name.to_owned(), password);
                        generation.primed.insert(name.to_owned());
                        self.st.ledger.primed(gen_id);
                    }
                }
            }
            return Ok(Some(name.to_owned()));
        }
        // USERHASH (RFC 8489 anonymity) hides the name; static users still
        // authenticate, and the hash stands in for the name in quotas.
        Ok(req.attribute::<Userhash>().ok().map(|h| {
            let hex: String = h.hash().iter().map(|b| format!("{b:02x}")).collect();
            format!("userhash:{hex}")
        }))
    }

    /// Carries out what the ledger decided: generations started and
    /// dropped, allocations revoked.
    fn run_ledger(&mut self, now: Instant) {
        while let Some(cmd) = self.st.ledger.poll_command() {
            // Each changes which allocations relay: routes are learned afresh.
            self.st.routes.clear();
            match cmd {
                Command::NewGeneration { id, keep_previous } => {
                    let fresh = Gen::new(id, self.gens.local, &self.gens.realm, &self.gens.static_users);
                    let previous = std::mem::replace(&mut self.gens.current, fresh);
                    info!(
                        previous = previous.id,
                        keep_previous,
                        "TURN authentication tables full: new clients start on fresh protocol state"
                    );
                    inc(&self.st.stats.counters().auth_table_rotations);
                    self.gens.old = keep_previous.then_some(previous);
                }
                Command::DropGeneration { id } => {
                    if self.gens.old.as_ref().is_some_and(|g| g.id == id) {
                        debug!(id, "previous TURN protocol state drained");
                        self.gens.old = None;
                    }
                }
                Command::Revoke { relayed, why } => {
                    if let Some(relay) = self.st.relays.get(&relayed) {
                        relay.task.abort();
                    }
                    inc(&self.st.stats.counters().allocations_revoked);
                    if let Some(r) = self.st.ledger.allocation(relayed) {
                        let why = match why {
                            RevokeWhy::MaxLifetime => "reached its maximum lifetime",
                            RevokeWhy::ConnectionClosed => "lost its TCP/TLS connection",
                        };
                        info!(
                            user = r.user,
                            client = %r.client,
                            %relayed,
                            age_s = Ledger::age(r, now).as_secs(),
                            "TURN allocation {why}: relaying stopped"
                        );
                    }
                }
            }
        }
    }

    /// Datagrams one allocation sent to another (`State::dispatch`). What
    /// they lead to goes to clients only, never to another allocation.
    fn receive_hairpinned(&mut self) {
        if self.st.hairpin.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut batch = std::mem::take(&mut self.st.hairpin);
        for datagram in batch.drain(..) {
            self.on_peer(now, datagram);
        }
        if self.st.hairpin.is_empty() {
            self.st.hairpin = batch; // keeps its capacity
        }
    }

    /// A datagram a peer sent to a relay socket.
    fn on_peer(&mut self, now: Instant, datagram: PeerDatagram) {
        if self.st.channel_to_client(now, datagram.relay, datagram.from, &datagram.data) {
            return;
        }
        let Some(record) = self.st.ledger.allocation(datagram.relay) else {
            return; // closed while the datagram was queued
        };
        if record.revoked {
            return;
        }
        let gen_id = record.gen_id;
        if !self.st.peer_allowed(datagram.relay, datagram.from) {
            inc(&self.st.stats.counters().dropped_policy);
            trace!(peer = %datagram.from, relay = %datagram.relay, "peer refused by policy");
            return;
        }
        let Some(generation) = self.gens.get_mut(gen_id) else {
            return;
        };
        let sio = self.st.sio(now);
        let transmit = Transmit::new(&datagram.data[..], TransportType::Udp, datagram.from, datagram.relay);
        match generation.server.recv(transmit, sio) {
            Some(to_client) => {
                add(&self.st.stats.counters().bytes_to_clients, datagram.data.len() as u64);
                // `build()`: in turn-types 0.7.3 `DelayedMessage::write_into`
                // writes a SEND indication even for a DATA indication.
                let to_client = to_client.build();
                if let Some((channel, payload)) = routes::channel_data(&to_client.data)
                    && payload.len() == datagram.data.len()
                {
                    self.st.routes.learn_in(datagram.relay, datagram.from, to_client.to, channel, now);
                }
                self.st.dispatch(to_client.from, to_client.to, &to_client.data, now);
            }
            None => inc(&self.st.stats.counters().dropped_no_permission),
        }
    }

    fn on_timer(&mut self, now: Instant) {
        pump(&mut self.gens.current, &mut self.st, now, None);
        if let Some(old) = self.gens.old.as_mut() {
            pump(old, &mut self.st, now, None);
        }
        self.run_ledger(now);
    }

    fn housekeeping(&mut self, now: Instant) {
        // Connections that have held no allocation for the idle timeout are
        // closed (dropping the handle ends the connection task).
        let ledger = &self.st.ledger;
        self.st.streams.retain(|client, s| {
            if ledger.client(*client) != Client::New {
                s.idle_since = now;
                return true;
            }
            let keep = now.duration_since(s.idle_since) < IDLE_TIMEOUT;
            if !keep {
                debug!(%client, "TURN stream closed: no allocation for {IDLE_TIMEOUT:?}");
            }
            keep
        });
        self.st.ledger.housekeeping(now);
        self.run_ledger(now);
        self.st.routes.prune(now);
        while self.st.tasks.try_join_next().is_some() {}
    }
}

/// Runs the protocol's timers and allocation requests, then sends whatever it
/// queued. `requester` is the client whose request led here, if any: an
/// allocation of its own that closes now was deleted rather than expired.
fn pump(generation: &mut Gen, st: &mut State, now: Instant, requester: Option<SocketAddr>) {
    let sio = st.sio(now);
    // Re-poll right away if the loop below is cut short.
    generation.wake = sio;
    for _ in 0..MAX_POLL_STEPS {
        match generation.server.poll(sio) {
            TurnServerPollRet::WaitUntil(at) => {
                generation.wake = at;
                break;
            }
            TurnServerPollRet::AllocateSocket {
                transport,
                listen_addr,
                client_addr,
                allocation_transport,
                family,
            } => {
                let result = st.allocate(generation.id, client_addr, family, now);
                generation.server.allocated_socket(
                    transport,
                    listen_addr,
                    client_addr,
                    allocation_transport,
                    family,
                    result,
                    sio,
                );
            }
            TurnServerPollRet::SocketClose { listen_addr, .. } => st.release(listen_addr, now, requester),
            // Only TCP allocations (RFC 6062) produce these; the protocol
            // state is UDP-typed for every client transport, so it refuses
            // them with 400.
            TurnServerPollRet::TcpConnect { .. } | TurnServerPollRet::TcpClose { .. } => {}
        }
    }
    while let Some(transmit) = generation.server.poll_transmit(sio) {
        st.dispatch(transmit.from, transmit.to, &transmit.data, now);
    }
}

impl State {
    fn sio(&self, now: Instant) -> SioInstant {
        SioInstant::from_nanos(now.saturating_duration_since(self.base).as_nanos() as i64)
    }

    /// The peer policy for data between `relay` and `peer`. An allocation
    /// talking to its own relayed address is refused too.
    fn peer_allowed(&self, relay: SocketAddr, peer: SocketAddr) -> bool {
        peer != relay && self.policy.allows(peer, self.ledger.ports())
    }

    /// Binds a relay socket for a new allocation, or says why not.
    fn allocate(
        &mut self,
        gen_id: u64,
        client: SocketAddr,
        family: AddressFamily,
        now: Instant,
    ) -> Result<SocketAddr, SocketAllocateError> {
        let user = match &self.pending_user {
            Some((addr, user)) if *addr == client => user.clone(),
            _ => "<unknown>".to_owned(),
        };
        let counters = self.stats.counters();
        if let Err(why) = self.ledger.check_allocation(client, &user) {
            info!(%client, user, "TURN allocation refused: {why}");
            inc(&counters.allocations_refused);
            return Err(SocketAllocateError::InsufficientCapacity);
        }
        if (family == AddressFamily::IPV4) != self.advertised_ip.is_ipv4() {
            debug!(%client, user, %family, "TURN allocation refused: address family not served");
            inc(&counters.allocations_refused);
            return Err(SocketAllocateError::AddressFamilyNotSupported);
        }
        let socket = match relay::bind_relay(self.relay_ip, &self.relay_ports, self.ledger.ports()) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(%client, user, "TURN allocation refused: no relay socket: {e}");
                inc(&counters.allocations_refused);
                return Err(SocketAllocateError::InsufficientCapacity);
            }
        };
        let port = match socket.local_addr() {
            Ok(addr) => addr.port(),
            Err(e) => {
                warn!(%client, user, "TURN allocation refused: relay socket: {e}");
                inc(&counters.allocations_refused);
                return Err(SocketAllocateError::InsufficientCapacity);
            }
        };
        let relayed = SocketAddr::new(self.advertised_ip, port);
        let socket = match UdpIo::new(socket) {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                warn!(%client, user, "TURN allocation refused: relay socket: {e}");
                inc(&counters.allocations_refused);
                return Err(SocketAllocateError::InsufficientCapacity);
            }
        };
        let bandwidth = self.bandwidth;
        let task = self.tasks.spawn(relay::relay_loop(
            Arc::clone(&socket),
            relayed,
            self.relay_tx.clone(),
            bandwidth.map(|rate| TokenBucket::bandwidth(rate, now)),
            self.stats.clone(),
        ));
        inc(&counters.allocations);
        inc(&counters.allocations_created);
        info!(%client, %relayed, user, "TURN allocation created");
        self.ledger.allocation_created(Record {
            relayed,
            gen_id,
            client,
            user,
            created: now,
            port,
            revoked: false,
        });
        self.relays.insert(
            relayed,
            Relay { socket, task, out_bucket: bandwidth.map(|rate| TokenBucket::bandwidth(rate, now)) },
        );
        Ok(relayed)
    }

    /// Frees an allocation the protocol has closed (expired or deleted).
    fn release(&mut self, relayed: SocketAddr, now: Instant, requester: Option<SocketAddr>) {
        // What is gathered for its socket leaves before the socket goes.
        self.send_batch();
        if let Some(relay) = self.relays.remove(&relayed) {
            relay.task.abort();
        }
        self.routes.clear();
        let Some(record) = self.ledger.allocation_closed(relayed) else { return };
        dec(&self.stats.counters().allocations);
        let how = if requester == Some(record.client) { "deleted" } else { "expired" };
        info!(
            user = record.user,
            client = %record.client,
            %relayed,
            age_s = Ledger::age(&record, now).as_secs(),
            "TURN allocation {how}"
        );
        while self.tasks.try_join_next().is_some() {}
    }

    /// Sends `data` on the socket the protocol chose: the listen socket
    /// (towards a client) or an allocation's relay socket (towards a peer).
    fn dispatch(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8], now: Instant) {
        if from == self.local {
            self.send_to_client(data, to);
            return;
        }
        let allowed = self.peer_allowed(from, to);
        let counters = self.stats.counters();
        if self.ledger.allocation(from).is_none_or(|r| r.revoked) {
            trace!(%from, %to, "transmit from an unknown or revoked relay dropped");
            return;
        }
        let Some(alloc) = self.relays.get_mut(&from) else { return };
        if !allowed {
            inc(&counters.dropped_policy);
            trace!(peer = %to, relay = %from, "peer refused by policy");
            return;
        }
        if let Some(bucket) = alloc.out_bucket.as_mut()
            && !bucket.try_take(data.len() as u64, now)
        {
            inc(&counters.dropped_bandwidth);
            return;
        }
        if self.relays.contains_key(&to) {
            // Both ends are allocations of this server (two relayed peers):
            // the second receives the datagram here, from the first's
            // relayed address, as its socket would have after a trip
            // through the kernel and back. It is charged to the sender's
            // budget only.
            if data.len() > MAX_PEER_DATAGRAM {
                inc(&counters.dropped_oversize);
                return;
            }
            // On a route the protocol took lately it goes on to the
            // client at once; else it waits to be received by the protocol.
            let handed = self.channel_to_client(now, to, from, data);
            let counters = self.stats.counters();
            if !handed && self.hairpin.len() >= RELAY_QUEUE {
                inc(&counters.dropped_queue_full);
                return;
            }
            add(&counters.bytes_to_peers, data.len() as u64);
            inc(&counters.hairpinned);
            if !handed {
                self.hairpin.push(PeerDatagram { relay: to, from, data: data.to_vec() });
            }
            return;
        }
        self.queue(Via::Relay(from), to, &[], data);
    }

    /// A peer's datagram to the allocation `relay`, on a route the protocol
    /// took lately: to the client as ChannelData, after the checks `on_peer`
    /// makes before the protocol. Returns whether it was sent that way.
    fn channel_to_client(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        payload: &[u8],
    ) -> bool {
        let Some((client, channel)) = self.routes.inbound(relay, peer, now) else { return false };
        if self.ledger.allocation(relay).is_none_or(|r| r.revoked) || !self.peer_allowed(relay, peer) {
            return false; // the protocol's path drops it and counts why
        }
        let counters = self.stats.counters();
        inc(&counters.channel_shortcuts);
        add(&counters.bytes_to_clients, payload.len() as u64);
        let mut header = [0u8; 4];
        header[..2].copy_from_slice(&channel.to_be_bytes());
        header[2..].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        self.send_parts_to_client(&header, payload, client);
        true
    }

    fn send_to_client(&mut self, data: &[u8], to: SocketAddr) {
        self.send_parts_to_client(&[], data, to);
    }

    /// Sends `head` and `body` end to end to the client `to`.
    fn send_parts_to_client(&mut self, head: &[u8], body: &[u8], to: SocketAddr) {
        if let Some(stream) = self.streams.get(&to) {
            let sent = if head.is_empty() {
                stream.conn.send(body)
            } else {
                stream.conn.send(&[head, body].concat())
            };
            if !sent {
                inc(&self.stats.counters().dropped_send_failed);
                trace!(client = %to, "stream write queue full");
            }
            return;
        }
        self.queue(Via::Listen, to, head, body);
    }

    /// Adds a datagram (`head` and `body` end to end) to the batch; the
    /// batch it cannot join leaves first.
    fn queue(&mut self, via: Via, to: SocketAddr, head: &[u8], body: &[u8]) {
        let max_segments = match via {
            Via::Listen => self.listen.max_gso_segments(),
            Via::Relay(relayed) => self.relays.get(&relayed).map_or(1, |r| r.socket.max_gso_segments()),
        };
        if !self.out.fits((via, to), head.len() + body.len(), max_segments) {
            self.send_batch();
        }
        self.out.push_parts((via, to), &[head, body]);
    }

    /// Sends the batch, without waiting: what the kernel does not take now
    /// is dropped and counted.
    fn send_batch(&mut self) {
        let Some(((via, to), data, segment)) = self.out.pending() else { return };
        let counters = self.stats.counters();
        let datagrams = self.out.len() as u64;
        let lost = match via {
            Via::Listen => self.listen.try_send_batch(to, data, segment) as u64,
            Via::Relay(relayed) => match self.relays.get(&relayed) {
                Some(relay) => {
                    let lost = relay.socket.try_send_batch(to, data, segment) as u64;
                    if lost == 0 {
                        add(&counters.bytes_to_peers, data.len() as u64);
                    }
                    lost
                }
                // Released since (the protocol closed the allocation).
                None => datagrams,
            },
        };
        if lost > 0 {
            add(&counters.dropped_send_failed, lost);
        }
        self.out.clear();
    }
}

/// The long-term key of `user` / `password` in `realm`, if `req` carries a
/// MESSAGE-INTEGRITY made with it.
fn verified_key(
    req: &Message<'_>,
    user: &str,
    password: &str,
    realm: &str,
) -> Option<stun_proto::types::message::MessageIntegrityCredentials> {
    use stun_proto::types::message::LongTermCredentials;
    // Either MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256; none: an error.
    let key = LongTermCredentials::new(user.to_owned(), password.to_owned()).to_key(realm.to_owned()).into();
    req.validate_integrity(&key).is_ok().then_some(key)
}
