//! Server-reflexive and relayed candidates: STUN Binding requests and TURN
//! allocations from our host sockets, without I/O. Datagrams and time go
//! in; datagrams to send, new candidates and a report come out. The room's
//! driver shares the host sockets with it and hands it every datagram that
//! comes from a STUN/TURN server.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerlink_proto::IceServer;
use str0m::Candidate;
use stun_types::attribute::{ErrorCode, XorMappedAddress};
use stun_types::message::{BINDING, Message, MessageClass, MessageWriteVec, TransactionId};
use stun_types::prelude::*;
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::stun::Instant as SioInstant;
use turn_client_proto::stun::auth::Feature;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::message::ALLOCATE;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

turn_client_proto::impl_client!(TurnClient, (Udp, TurnClientUdp), (Tcp, TurnClientTcp));

/// STUN Binding retransmissions (RFC 8489 §6.2.1, shortened: gathering
/// should not hold up a connection for long).
const STUN_RTO: Duration = Duration::from_millis(250);
const STUN_ATTEMPTS: u32 = 5;
/// The TURN client gets polled at least this often: turn-client-proto does
/// not always ask for a timely poll after a state change.
const TURN_MAX_WAIT: Duration = Duration::from_secs(1);
/// ... and much more often while an allocation or a permission is on its
/// way: the client paces requests 50 ms apart without asking for the poll
/// that sends the next one.
const TURN_BUSY_WAIT: Duration = Duration::from_millis(20);
/// TURN over TCP or TLS is tried when no UDP allocation has been granted
/// this long after gathering began (or every UDP one has failed): UDP is
/// faster and cheaper for everyone, so it goes first.
pub(crate) const STREAM_FALLBACK_AFTER: Duration = Duration::from_millis(1500);

/// How we reach a TURN server (the relayed side is UDP whatever this is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TurnTransport {
    /// `turn:HOST:PORT` or `?transport=udp`.
    Udp,
    /// `turn:HOST:PORT?transport=tcp`.
    Tcp,
    /// `turns:HOST:PORT`: TCP with TLS, the server's certificate checked.
    Tls,
}

impl TurnTransport {
    /// `udp`, `tcp` or `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnTransport::Udp => "udp",
            TurnTransport::Tcp => "tcp",
            TurnTransport::Tls => "tls",
        }
    }
}

impl fmt::Display for TurnTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One ICE server from `welcome` (or configured), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Server {
    Stun(SocketAddr),
    Turn {
        addr: SocketAddr,
        username: String,
        credential: String,
        transport: TurnTransport,
        /// The host name of the URL: what a TLS certificate must name.
        host: String,
    },
}

/// A parsed STUN or TURN URL; host names are left for the caller to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Url {
    /// `None` for `stun:`.
    pub turn: Option<TurnTransport>,
    pub host: String,
    pub port: u16,
}

/// Parses `stun:host[:port]`, `turn:host[:port][?transport=udp|tcp]` and
/// `turns:host[:port][?transport=tcp]` URLs (RFC 7064, RFC 7065); other
/// schemes and transports are skipped.
pub(crate) fn parse_url(url: &str) -> Option<Url> {
    let (scheme, rest) = url.split_once(':')?;
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let transport = query.split('&').find_map(|kv| kv.strip_prefix("transport="));
    let (turn, default_port) = match (scheme, transport) {
        ("stun", None) => (None, 3478),
        ("turn", None | Some("udp")) => (Some(TurnTransport::Udp), 3478),
        ("turn", Some("tcp")) => (Some(TurnTransport::Tcp), 3478),
        ("turns", None | Some("tcp")) => (Some(TurnTransport::Tls), 5349),
        _ => return None,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        (h.to_string(), p.strip_prefix(':').map(str::parse).transpose().ok()?.unwrap_or(default_port))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(Url { turn, host, port })
}

/// Resolves the ICE servers' URLs (bounded in time) into servers we can use.
pub(crate) async fn resolve(servers: &[IceServer], timeout: Duration) -> Vec<Server> {
    let mut out = Vec::new();
    for s in servers {
        for url in &s.urls {
            let Some(Url { turn, host, port }) = parse_url(url) else {
                tracing::debug!(%url, "ICE server skipped (unknown scheme or transport)");
                continue;
            };
            let addrs = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
                    .await
                {
                    Ok(Ok(a)) => a.collect(),
                    _ => {
                        tracing::warn!(%url, "cannot resolve ICE server");
                        continue;
                    }
                },
            };
            for addr in addrs {
                let server = if let Some(transport) = turn {
                    match (&s.username, &s.credential) {
                        (Some(u), Some(c)) => Server::Turn {
                            addr,
                            username: u.clone(),
                            credential: c.clone(),
                            transport,
                            host: host.clone(),
                        },
                        _ => {
                            tracing::warn!(%url, "TURN server without credentials skipped");
                            continue;
                        }
                    }
                } else {
                    Server::Stun(addr)
                };
                if !out.contains(&server) {
                    out.push(server);
                }
            }
        }
    }
    out
}

/// What became of one STUN or TURN server, for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No answer yet.
    Pending,
    /// The candidate it gave.
    Ok(SocketAddr),
    /// Why it gave none.
    Failed(GatherFailure),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Pending => f.write_str("pending"),
            Outcome::Ok(a) => write!(f, "{a}"),
            Outcome::Failed(why) => write!(f, "none ({why})"),
        }
    }
}

/// Why a STUN or TURN server gave no candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatherFailure {
    /// The STUN server answered the Binding request with an error.
    StunError,
    /// The STUN server never answered.
    StunNoAnswer {
        /// Requests sent.
        tries: u32,
    },
    /// The TURN server refused the credentials (401 after authenticating).
    TurnUnauthorized,
    /// The TURN server refused the allocation with another error.
    TurnRefused {
        /// The STUN error code (486 quota, 508 capacity, ...).
        code: u16,
        /// The server's reason phrase.
        reason: String,
    },
    /// No allocation was granted (no answer, or refused without a reason).
    TurnNoAllocation,
    /// A granted allocation expired or was lost.
    AllocationLost,
    /// The TCP connection or TLS handshake to the TURN server failed.
    StreamConnect(String),
    /// TCP and TLS are tried only when UDP gets no allocation, and a UDP
    /// allocation was granted.
    NotNeeded,
}

impl fmt::Display for GatherFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatherFailure::StunError => f.write_str("the STUN server answered with an error"),
            GatherFailure::StunNoAnswer { tries } => {
                write!(f, "no answer from the STUN server after {tries} tries")
            }
            GatherFailure::TurnUnauthorized => f.write_str("the TURN server refused the credentials (401)"),
            GatherFailure::TurnRefused { code, reason } => {
                write!(f, "the TURN server refused the allocation ({code} {reason})")
            }
            GatherFailure::TurnNoAllocation => f.write_str(
                "the TURN server did not grant an allocation (no answer, or the credentials were refused)",
            ),
            GatherFailure::AllocationLost => f.write_str("the allocation expired or was lost"),
            GatherFailure::StreamConnect(why) => write!(f, "cannot reach the TURN server: {why}"),
            GatherFailure::NotNeeded => f.write_str("not tried (a UDP allocation was granted)"),
        }
    }
}

/// Which candidates were gathered, from where, and why any are missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatherReport {
    /// Local sockets (host candidates unless relay-only).
    pub host: Vec<SocketAddr>,
    /// Server-reflexive: (local socket, STUN server, outcome).
    pub srflx: Vec<(SocketAddr, SocketAddr, Outcome)>,
    /// Relayed: one entry per TURN server and local socket.
    pub relay: Vec<RelayAttempt>,
    /// Every STUN and TURN request has an outcome.
    pub complete: bool,
}

impl fmt::Display for GatherReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.host.iter().map(|a| a.to_string()).collect();
        write!(f, "host [{}]", hosts.join(", "))?;
        if self.srflx.is_empty() {
            f.write_str("; srflx: no STUN server")?;
        }
        for (local, server, o) in &self.srflx {
            write!(f, "; srflx from {local} via {server}: {o}")?;
        }
        if self.relay.is_empty() {
            f.write_str("; relay: no TURN server")?;
        }
        for r in &self.relay {
            write!(f, "; relay from {} via {} {}: {}", r.local, r.transport, r.server, r.outcome)?;
        }
        Ok(())
    }
}

/// One TURN server tried from one local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAttempt {
    /// Our socket (for TCP and TLS, the host address until connected).
    pub local: SocketAddr,
    /// The TURN server.
    pub server: SocketAddr,
    /// How we reach it.
    pub transport: TurnTransport,
    /// The relayed address, or why there is none.
    pub outcome: Outcome,
}

/// Where a datagram that arrived on a host socket goes.
#[derive(Debug)]
pub(crate) enum Demux {
    /// STUN/TURN traffic, handled here.
    Consumed,
    /// Data a peer sent to our relayed address.
    Relayed { peer: SocketAddr, relayed: SocketAddr, data: Payload },
    /// Not ours: for the peer connections.
    Pass,
}

/// Where a relayed datagram's payload is.
#[derive(Debug, PartialEq)]
pub(crate) enum Payload {
    /// In the message that carried it, at this range (ChannelData and Data
    /// indications: no copy).
    In(std::ops::Range<usize>),
    /// Copied out of it.
    Owned(Vec<u8>),
}

impl Payload {
    /// The payload's bytes, `message` being what carried it.
    pub(crate) fn of<'a>(&'a self, message: &'a [u8]) -> &'a [u8] {
        match self {
            Payload::In(range) => &message[range.clone()],
            Payload::Owned(data) => data,
        }
    }

    /// `payload` as a range of `message` when it lies inside it.
    fn locate(message: &[u8], payload: &[u8]) -> Payload {
        let start = (payload.as_ptr() as usize).wrapping_sub(message.as_ptr() as usize);
        match message.get(start..start.wrapping_add(payload.len())) {
            Some(inside) if std::ptr::eq(inside, payload) => Payload::In(start..start + payload.len()),
            _ => Payload::Owned(payload.to_vec()),
        }
    }
}

/// Whether `data` can be a STUN message: its first byte is 0-3 (RFC 7983);
/// ChannelData starts with 0x40-0x4F, DTLS with 20-63.
fn maybe_stun(data: &[u8]) -> bool {
    data.first().is_some_and(|b| *b < 4)
}

/// What the driver does next.
#[derive(Debug)]
pub(crate) enum Output {
    /// Send from host socket `socket`.
    Transmit { socket: usize, to: SocketAddr, data: Vec<u8> },
    /// Open stream `stream`: a TCP connection from `from` to `server`, with
    /// TLS when `tls_name` is set (the name the certificate must carry).
    /// Answer with [`Gatherer::stream_connected`] or [`Gatherer::stream_failed`].
    Connect { stream: usize, from: IpAddr, server: SocketAddr, tls_name: Option<String> },
    /// Write one STUN or ChannelData message to stream `stream`.
    StreamSend { stream: usize, data: Vec<u8> },
    /// Close stream `stream`.
    StreamClose { stream: usize },
    /// A candidate for every connection (server-reflexive or relayed).
    Candidate(Candidate),
    /// Every server has answered or given up.
    Complete,
}

struct StunProbe {
    socket: usize,
    server: SocketAddr,
    tid: TransactionId,
    request: Vec<u8>,
    attempts: u32,
    next_at: Instant,
    outcome: Outcome,
}

/// How an allocation reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A host UDP socket, by index.
    Socket(usize),
    /// A TCP or TLS stream, by index into `Gatherer::streams`.
    Stream(usize),
}

struct TurnAlloc {
    link: Link,
    /// The host socket's address, or the stream's local address.
    local: SocketAddr,
    server: SocketAddr,
    transport: TurnTransport,
    client: TurnClient,
    wait: Instant,
    relayed: Option<SocketAddr>,
    outcome: Outcome,
    /// A server-reflexive address learned from the allocation's answer.
    mapped: Option<SocketAddr>,
    /// Permissions asked for (granted or not yet), and when.
    permitted: Vec<(IpAddr, Instant)>,
    /// Datagrams waiting for a permission to be granted (bounded).
    waiting: VecDeque<(SocketAddr, Vec<u8>)>,
    /// 401 answers to our Allocate requests.
    unauthorized: u32,
    /// Addresses the server will not relay to (permission refused).
    refused: Vec<IpAddr>,
    /// Peers a channel was asked for (granted or not), at most
    /// [`MAX_CHANNELS`].
    channels: Vec<SocketAddr>,
}

/// A TURN server reached over TCP or TLS: planned, connecting, or carrying
/// the allocation `alloc`.
struct StreamPlan {
    /// The host socket whose address the connection goes out from.
    socket: usize,
    server: SocketAddr,
    transport: TurnTransport,
    host: String,
    config: TurnConfig,
    state: StreamState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamState {
    /// Waiting to see whether UDP gets an allocation.
    Planned,
    Connecting,
    /// Connected: the allocation is `turn[i]`.
    Up(usize),
    Done(GatherFailure),
}

/// Datagrams held per allocation while permissions are being created.
const MAX_WAITING: usize = 64;

/// Channels asked for per allocation: one per peer that data (not only ICE
/// checks) went to, which is one or two per connection.
const MAX_CHANNELS: usize = 64;

/// Buffers kept for relayed datagrams, and the smallest kept: a datagram
/// and the TURN framing around it, for any path MTU.
const SPARE_BUFFERS: usize = 64;
const SPARE_CAPACITY: usize = 1536;

/// STUN and TURN from all host sockets to all servers.
pub(crate) struct Gatherer {
    /// `std` ↔ sans-io time.
    base: Instant,
    hosts: Vec<SocketAddr>,
    stun: Vec<StunProbe>,
    turn: Vec<TurnAlloc>,
    streams: Vec<StreamPlan>,
    /// Whether TCP/TLS servers were started or found not needed.
    fallback_decided: bool,
    out: VecDeque<Output>,
    /// Buffers for relayed datagrams, back from the driver once sent.
    spare: Vec<Vec<u8>>,
    /// Server-reflexive candidates announced (one per address).
    srflx_seen: Vec<SocketAddr>,
    complete_sent: bool,
}

impl fmt::Debug for Gatherer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gatherer").field("report", &self.report()).finish()
    }
}

/// A permission request not answered within this is made again.
const PERMISSION_RETRY: Duration = Duration::from_secs(2);

/// Binds a channel to `peer` (RFC 8656 §12) once data goes there: data
/// then travels as ChannelData, 4 bytes of framing instead of a 36-byte
/// Send or Data indication, which the server relays without parsing STUN
/// (and a 1,228-byte datagram fits a 1,280-byte IPv6 path). Asked once
/// per peer; until it is bound, or if it is refused, indications carry the
/// data. UDP allocations only: over TCP and TLS ChannelData needs padding
/// that turn-client-proto does not add. Returns whether a request went out.
fn ask_channel(t: &mut TurnAlloc, peer: SocketAddr, sio: SioInstant) -> bool {
    if !matches!(t.link, Link::Socket(_)) || t.channels.len() >= MAX_CHANNELS || t.channels.contains(&peer) {
        return false;
    }
    t.channels.push(peer);
    match t.client.bind_channel(TransportType::Udp, peer, sio) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(%peer, "TURN channel not asked for: {e}");
            false
        }
    }
}

/// Asks the TURN server to let `ip` through, unless granted or recently
/// asked. Returns whether a request went out.
fn ask_permission(t: &mut TurnAlloc, ip: IpAddr, now: Instant, sio: SioInstant) -> bool {
    if t.refused.contains(&ip) || t.client.have_permission(TransportType::Udp, ip) {
        return false;
    }
    if let Some((_, at)) = t.permitted.iter().find(|(p, _)| *p == ip)
        && now < *at + PERMISSION_RETRY
    {
        return false;
    }
    t.permitted.retain(|(p, _)| *p != ip);
    t.permitted.push((ip, now));
    // `AlreadyExists` means a request is still pending inside the client.
    t.client.create_permission(TransportType::Udp, ip, sio).is_ok()
}

fn binding_request() -> (TransactionId, Vec<u8>) {
    let msg = Message::builder_request(BINDING, MessageWriteVec::new());
    let tid = msg.transaction_id();
    (tid, msg.finish())
}

/// Where a message for the server goes.
fn send(out: &mut VecDeque<Output>, link: Link, to: SocketAddr, data: Vec<u8>) {
    out.push_back(match link {
        Link::Socket(socket) => Output::Transmit { socket, to, data },
        Link::Stream(stream) => Output::StreamSend { stream, data },
    });
}

fn turn_config(username: &str, credential: &str) -> TurnConfig {
    let mut config = TurnConfig::new(TurnCredentials::new(username, credential));
    // USERHASH would hide the REST username (`<expiry>:<user>`)
    // a coturn-style server derives the password from.
    config.set_anonymous_username(Feature::Disabled);
    config.set_request_retransmits(
        Duration::from_millis(250),
        Duration::from_secs(2),
        5,
        Duration::from_secs(2),
    );
    config
}

impl TurnAlloc {
    fn new(
        link: Link,
        local: SocketAddr,
        server: SocketAddr,
        transport: TurnTransport,
        client: TurnClient,
        now: Instant,
    ) -> Self {
        TurnAlloc {
            link,
            local,
            server,
            transport,
            client,
            wait: now,
            relayed: None,
            outcome: Outcome::Pending,
            mapped: None,
            permitted: Vec::new(),
            waiting: VecDeque::new(),
            unauthorized: 0,
            refused: Vec::new(),
            channels: Vec::new(),
        }
    }
}

impl Gatherer {
    /// Starts gathering from each of `hosts` (the bound host sockets) to each
    /// of `servers` whose address family matches. TURN servers over TCP or
    /// TLS are tried only if UDP gets no allocation within
    /// [`STREAM_FALLBACK_AFTER`].
    pub fn new(hosts: &[SocketAddr], servers: &[Server], now: Instant) -> Gatherer {
        let mut g = Gatherer {
            base: now,
            hosts: hosts.to_vec(),
            stun: Vec::new(),
            turn: Vec::new(),
            streams: Vec::new(),
            fallback_decided: false,
            out: VecDeque::new(),
            spare: Vec::new(),
            srflx_seen: Vec::new(),
            complete_sent: false,
        };
        for (socket, host) in hosts.iter().enumerate() {
            for server in servers {
                let addr = match server {
                    Server::Stun(a) | Server::Turn { addr: a, .. } => a,
                };
                // Same family, and same scope: a loopback socket talks to
                // loopback servers only (tests restricted to 127.0.0.1 must
                // never send elsewhere), and the other way round.
                if addr.is_ipv4() != host.is_ipv4() || addr.ip().is_loopback() != host.ip().is_loopback() {
                    continue;
                }
                match server {
                    Server::Stun(addr) => {
                        let (tid, request) = binding_request();
                        g.stun.push(StunProbe {
                            socket,
                            server: *addr,
                            tid,
                            request,
                            attempts: 0,
                            next_at: now,
                            outcome: Outcome::Pending,
                        });
                    }
                    Server::Turn { addr, username, credential, transport: TurnTransport::Udp, .. } => {
                        let client = TurnClient::Udp(TurnClientUdp::allocate(
                            *host,
                            *addr,
                            turn_config(username, credential),
                        ));
                        g.turn.push(TurnAlloc::new(
                            Link::Socket(socket),
                            *host,
                            *addr,
                            TurnTransport::Udp,
                            client,
                            now,
                        ));
                    }
                    Server::Turn { addr, username, credential, transport, host: name } => {
                        // One connection per server, from the first host
                        // address that can reach it.
                        if g.streams.iter().any(|p| p.server == *addr && p.transport == *transport) {
                            continue;
                        }
                        g.streams.push(StreamPlan {
                            socket,
                            server: *addr,
                            transport: *transport,
                            host: name.clone(),
                            config: turn_config(username, credential),
                            state: StreamState::Planned,
                        });
                    }
                }
            }
        }
        g.handle_timeout(now);
        g
    }

    fn sio(&self, t: Instant) -> SioInstant {
        SioInstant::from_nanos(t.saturating_duration_since(self.base).as_nanos() as i64)
    }

    /// Whether `addr` is one of our relayed addresses.
    pub fn is_relayed(&self, addr: SocketAddr) -> bool {
        self.turn.iter().any(|t| t.relayed == Some(addr))
    }

    /// How our relayed address `addr` reaches its TURN server.
    pub fn relay_transport(&self, addr: SocketAddr) -> Option<TurnTransport> {
        self.turn.iter().find(|t| t.relayed == Some(addr)).map(|t| t.transport)
    }

    pub fn report(&self) -> GatherReport {
        let planned = self.streams.iter().filter_map(|p| {
            let outcome = match &p.state {
                StreamState::Up(_) => return None,
                StreamState::Planned | StreamState::Connecting => Outcome::Pending,
                StreamState::Done(why) => Outcome::Failed(why.clone()),
            };
            Some(RelayAttempt {
                local: self.hosts[p.socket],
                server: p.server,
                transport: p.transport,
                outcome,
            })
        });
        GatherReport {
            host: self.hosts.clone(),
            srflx: self
                .stun
                .iter()
                .map(|p| (self.hosts[p.socket], p.server, p.outcome.clone()))
                .chain(self.turn.iter().filter_map(|t| {
                    let from_stun =
                        self.stun.iter().any(|p| p.server == t.server && self.hosts[p.socket] == t.local);
                    t.mapped.filter(|_| !from_stun).map(|m| (t.local, t.server, Outcome::Ok(m)))
                }))
                .collect(),
            relay: self
                .turn
                .iter()
                .map(|t| RelayAttempt {
                    local: t.local,
                    server: t.server,
                    transport: t.transport,
                    outcome: t.outcome.clone(),
                })
                .chain(planned)
                .collect(),
            complete: self.is_complete(),
        }
    }

    fn is_complete(&self) -> bool {
        self.stun.iter().all(|p| p.outcome != Outcome::Pending)
            && self.turn.iter().all(|t| t.outcome != Outcome::Pending)
            && self.streams.iter().all(|p| matches!(p.state, StreamState::Up(_) | StreamState::Done(_)))
    }

    fn srflx(&mut self, local: SocketAddr, mapped: SocketAddr) {
        if mapped == local || self.srflx_seen.contains(&mapped) {
            return;
        }
        self.srflx_seen.push(mapped);
        match Candidate::server_reflexive(mapped, local, "udp") {
            Ok(c) => self.out.push_back(Output::Candidate(c)),
            Err(e) => tracing::debug!(%mapped, "unusable server-reflexive address: {e}"),
        }
    }

    /// Takes a datagram that arrived on host socket `socket` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, socket: usize, from: SocketAddr, data: &[u8]) -> Demux {
        // STUN Binding answers.
        if maybe_stun(data)
            && let Some(i) = self.stun.iter().position(|p| p.socket == socket && p.server == from)
            && let Ok(msg) = Message::from_bytes(data)
            && msg.is_response()
            && msg.transaction_id() == self.stun[i].tid
        {
            if self.stun[i].outcome == Outcome::Pending {
                if msg.has_class(MessageClass::Success)
                    && let Ok(x) = msg.attribute::<XorMappedAddress>()
                {
                    let mapped = x.addr(msg.transaction_id());
                    self.stun[i].outcome = Outcome::Ok(mapped);
                    self.srflx(self.hosts[socket], mapped);
                } else {
                    self.stun[i].outcome = Outcome::Failed(GatherFailure::StunError);
                }
                self.check_complete();
            }
            return Demux::Consumed;
        }
        // TURN: the allocation on this socket with this server.
        let Some(i) = self.turn.iter().position(|t| t.link == Link::Socket(socket) && t.server == from)
        else {
            return Demux::Pass;
        };
        let demux = self.turn_input(i, now, data);
        self.decide_fallback(now);
        demux
    }

    /// Takes one message that arrived on stream `stream`.
    pub fn handle_stream(&mut self, now: Instant, stream: usize, frame: &[u8]) -> Demux {
        let Some(i) = self.turn.iter().position(|t| t.link == Link::Stream(stream)) else {
            return Demux::Consumed;
        };
        let demux = match self.turn_input(i, now, frame) {
            // Nothing but TURN comes over the stream.
            Demux::Pass => Demux::Consumed,
            d => d,
        };
        self.decide_fallback(now);
        demux
    }

    /// Stream `stream` is connected (and its TLS handshake done): the
    /// allocation starts.
    pub fn stream_connected(&mut self, now: Instant, stream: usize, local: SocketAddr) {
        let Some(p) = self.streams.get_mut(stream) else { return };
        if p.state != StreamState::Connecting {
            return;
        }
        let client = TurnClient::Tcp(TurnClientTcp::allocate(local, p.server, p.config.clone()));
        let alloc = TurnAlloc::new(Link::Stream(stream), local, p.server, p.transport, client, now);
        p.state = StreamState::Up(self.turn.len());
        tracing::debug!(server = %p.server, transport = %p.transport, %local, "TURN stream connected");
        self.turn.push(alloc);
        self.pump_turn(self.turn.len() - 1, now);
    }

    /// Stream `stream` could not connect, or ended.
    pub fn stream_failed(&mut self, now: Instant, stream: usize, why: String) {
        let Some(p) = self.streams.get_mut(stream) else { return };
        match p.state {
            StreamState::Connecting => {
                tracing::debug!(server = %p.server, transport = %p.transport, "TURN stream: {why}");
                p.state = StreamState::Done(GatherFailure::StreamConnect(why));
            }
            StreamState::Up(i) => {
                let t = &mut self.turn[i];
                t.wait = now + Duration::from_secs(3600);
                if t.relayed.take().is_some() {
                    tracing::warn!(server = %t.server, transport = %t.transport, "TURN allocation lost: {why}");
                    t.outcome = Outcome::Failed(GatherFailure::AllocationLost);
                } else if t.outcome == Outcome::Pending {
                    t.outcome = Outcome::Failed(GatherFailure::StreamConnect(why));
                }
            }
            StreamState::Planned | StreamState::Done(_) => {}
        }
        self.decide_fallback(now);
        self.check_complete();
    }

    /// Starts the TCP servers once UDP has had its chance, then the TLS
    /// ones if TCP gives nothing either; marks what is left not needed once
    /// an allocation is granted. UDP, then TCP, then TLS: each is cheaper
    /// for everyone than the next, and TLS is for networks that let only
    /// TLS out.
    fn decide_fallback(&mut self, now: Instant) {
        if self.streams.iter().all(|p| p.state != StreamState::Planned) {
            return;
        }
        let granted = |t: TurnTransport| {
            self.turn.iter().any(|a| a.transport == t && matches!(a.outcome, Outcome::Ok(_)))
        };
        let settled = |t: TurnTransport| {
            self.turn.iter().filter(|a| a.transport == t).all(|a| matches!(a.outcome, Outcome::Failed(_)))
                // (A connected stream's allocation is among `turn` above.)
                && self
                    .streams
                    .iter()
                    .filter(|p| p.transport == t)
                    .all(|p| matches!(p.state, StreamState::Done(_) | StreamState::Up(_)))
        };
        let next = if granted(TurnTransport::Udp) || granted(TurnTransport::Tcp) {
            None
        } else if !self.fallback_decided {
            if !settled(TurnTransport::Udp) && now < self.base + STREAM_FALLBACK_AFTER {
                return;
            }
            self.fallback_decided = true;
            let tcp = self.streams.iter().any(|p| p.transport == TurnTransport::Tcp);
            Some(if tcp { TurnTransport::Tcp } else { TurnTransport::Tls })
        } else if settled(TurnTransport::Tcp) {
            Some(TurnTransport::Tls)
        } else {
            return;
        };
        self.fallback_decided = true;
        let Some(transport) = next else {
            for p in &mut self.streams {
                if p.state == StreamState::Planned {
                    p.state = StreamState::Done(GatherFailure::NotNeeded);
                }
            }
            self.check_complete();
            return;
        };
        for (stream, p) in self.streams.iter_mut().enumerate() {
            if p.state != StreamState::Planned || p.transport != transport {
                continue;
            }
            tracing::debug!(server = %p.server, "no relay yet: trying TURN over {transport}");
            p.state = StreamState::Connecting;
            self.out.push_back(Output::Connect {
                stream,
                from: self.hosts[p.socket].ip(),
                server: p.server,
                tls_name: (transport == TurnTransport::Tls).then(|| p.host.clone()),
            });
        }
    }

    /// A message from allocation `i`'s server.
    fn turn_input(&mut self, i: usize, now: Instant, data: &[u8]) -> Demux {
        let sio = self.sio(now);
        // turn-client-proto ignores XOR-MAPPED-ADDRESS; the Allocate answer
        // carries our server-reflexive address for free (over UDP only: a
        // TCP connection's mapping is no use to UDP candidates).
        if self.turn[i].transport == TurnTransport::Udp
            && maybe_stun(data)
            && let Ok(msg) = Message::from_bytes(data)
            && msg.has_method(ALLOCATE)
            && msg.has_class(MessageClass::Success)
            && let Ok(x) = msg.attribute::<XorMappedAddress>()
        {
            let mapped = x.addr(msg.transaction_id());
            self.turn[i].mapped = Some(mapped);
            self.srflx(self.turn[i].local, mapped);
        }
        // turn-client-proto retries refused credentials until its request
        // times out; a second 401 (after we authenticated) or any other
        // error but a stale nonce is an answer: give up now, with the reason.
        if self.turn[i].outcome == Outcome::Pending
            && maybe_stun(data)
            && let Ok(msg) = Message::from_bytes(data)
            && msg.has_method(ALLOCATE)
            && msg.has_class(MessageClass::Error)
            && let Ok(err) = msg.attribute::<ErrorCode>()
        {
            let t = &mut self.turn[i];
            let code = err.code();
            let refused = match code {
                401 => {
                    t.unauthorized += 1;
                    (t.unauthorized >= 2).then_some(GatherFailure::TurnUnauthorized)
                }
                438 => None,
                _ => Some(GatherFailure::TurnRefused { code, reason: err.reason().to_string() }),
            };
            if let Some(why) = refused {
                t.outcome = Outcome::Failed(why);
                t.client.protocol_error();
                t.wait = now + Duration::from_secs(3600);
                self.check_complete();
                return Demux::Consumed;
            }
        }
        if let Outcome::Failed(_) = self.turn[i].outcome
            && self.turn[i].relayed.is_none()
        {
            return Demux::Consumed;
        }
        let t = &mut self.turn[i];
        let transport =
            if t.transport == TurnTransport::Udp { TransportType::Udp } else { TransportType::Tcp };
        let (server, local) = (t.server, t.local);
        let ret = t.client.recv(Transmit::new(data, transport, server, local), sio);
        let demux = match ret {
            TurnRecvRet::Handled => Demux::Consumed,
            // Relayed data changes nothing in the client: nothing to poll.
            TurnRecvRet::PeerData(pd) => {
                return match self.turn[i].relayed {
                    Some(relayed) => {
                        Demux::Relayed { peer: pd.peer, relayed, data: Payload::locate(data, pd.data()) }
                    }
                    None => Demux::Consumed,
                };
            }
            TurnRecvRet::PeerIcmp { .. } => Demux::Consumed,
            TurnRecvRet::Ignored(_) => Demux::Pass,
        };
        self.pump_turn(i, now);
        demux
    }

    /// Sends `data` to `to` through the allocation whose relayed address is
    /// `relayed`. Without a permission for `to` yet, one is asked for and the
    /// datagram is dropped (ICE retransmits its checks).
    pub fn send_relayed(&mut self, now: Instant, relayed: SocketAddr, to: SocketAddr, data: &[u8]) {
        let Some(i) = self.turn.iter().position(|t| t.relayed == Some(relayed)) else { return };
        let sio = self.sio(now);
        let link = self.turn[i].link;
        match self.turn[i].client.send_to(TransportType::Udp, to, data, sio) {
            Ok(Some(t)) => {
                // Into a buffer used before: a datagram of this size is
                // past the allocator's per-thread cache, and there is one
                // for every datagram sent.
                let server = t.to;
                let len = t.data.len();
                let mut buf = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(SPARE_CAPACITY.max(len)));
                buf.resize(len, 0);
                let n = t.data.write_into(&mut buf);
                buf.truncate(n);
                send(&mut self.out, link, server, buf);
                // DTLS and what it carries, not an ICE check (STUN's first
                // byte is 0 or 1, RFC 7983). Sending changes nothing in the
                // client: it is polled only when a channel was asked for.
                if !(data.first().is_some_and(|b| *b > 3) && ask_channel(&mut self.turn[i], to, sio)) {
                    return;
                }
            }
            Ok(None) => {}
            Err(turn_client_proto::api::SendError::NoPermission)
                if self.turn[i].refused.contains(&to.ip()) => {}
            Err(turn_client_proto::api::SendError::NoPermission) => {
                // Hold it until the permission is granted (ICE would resend
                // a check only after its retransmission timeout).
                let t = &mut self.turn[i];
                if t.waiting.len() >= MAX_WAITING {
                    t.waiting.pop_front();
                }
                t.waiting.push_back((to, data.to_vec()));
                ask_permission(t, to.ip(), now, sio);
            }
            Err(e) => tracing::debug!(%to, "relay send: {e}"),
        }
        self.pump_turn(i, now);
    }

    /// Takes back a buffer the driver sent, to build a relayed datagram in
    /// next (at most [`SPARE_BUFFERS`] kept, each of [`SPARE_CAPACITY`]).
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        let fits = (SPARE_CAPACITY..=2 * SPARE_CAPACITY).contains(&buf.capacity());
        if fits && self.spare.len() < SPARE_BUFFERS && self.turn.iter().any(|t| t.relayed.is_some()) {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Lets `ip` reach our relayed addresses (a remote candidate's address).
    pub fn permit(&mut self, now: Instant, ip: IpAddr) {
        let sio = self.sio(now);
        for i in 0..self.turn.len() {
            let t = &mut self.turn[i];
            if t.relayed.is_some() && t.server.is_ipv4() == ip.is_ipv4() && ask_permission(t, ip, now, sio) {
                self.pump_turn(i, now);
            }
        }
    }

    /// Drains one TURN client: transmits, events, next wake-up.
    fn pump_turn(&mut self, i: usize, now: Instant) {
        if matches!(self.turn[i].outcome, Outcome::Failed(_)) && self.turn[i].relayed.is_none() {
            return;
        }
        let sio = self.sio(now);
        let busy = self.turn[i].outcome == Outcome::Pending || !self.turn[i].waiting.is_empty();
        let mut wait = now + if busy { TURN_BUSY_WAIT } else { TURN_MAX_WAIT };
        loop {
            let t = &mut self.turn[i];
            match t.client.poll(sio) {
                TurnPollRet::WaitUntil(at) => {
                    wait = wait.min(self.base + Duration::from_nanos(at.as_nanos().max(0) as u64))
                }
                TurnPollRet::Closed => {
                    if t.outcome == Outcome::Pending {
                        t.outcome = Outcome::Failed(GatherFailure::TurnNoAllocation);
                    } else if t.relayed.take().is_some() {
                        tracing::warn!(server = %t.server, "TURN allocation lost");
                        t.outcome = Outcome::Failed(GatherFailure::AllocationLost);
                    }
                    wait = now + Duration::from_secs(3600);
                }
                _ => {}
            }
            let mut sent = false;
            let link = t.link;
            while let Some(tx) = t.client.poll_transmit(sio) {
                send(&mut self.out, link, tx.to, tx.data.to_vec());
                sent = true;
            }
            let t = &mut self.turn[i];
            while let Some(ev) = t.client.poll_event() {
                match ev {
                    TurnEvent::AllocationCreated(TransportType::Udp, relayed) => {
                        tracing::debug!(%relayed, server = %t.server, transport = %t.transport, "TURN allocation");
                        t.relayed = Some(relayed);
                        t.outcome = Outcome::Ok(relayed);
                        match Candidate::relayed(relayed, t.local, "udp") {
                            Ok(c) => self.out.push_back(Output::Candidate(c)),
                            Err(e) => tracing::warn!(%relayed, "unusable relayed address: {e}"),
                        }
                    }
                    TurnEvent::AllocationCreateFailed(_) => {
                        t.outcome = Outcome::Failed(GatherFailure::TurnNoAllocation);
                    }
                    TurnEvent::PermissionCreateFailed(_, ip) => {
                        tracing::debug!(%ip, "TURN permission refused");
                        if t.refused.len() < 64 {
                            t.refused.push(ip);
                        }
                        t.permitted.retain(|(p, _)| *p != ip);
                        t.waiting.retain(|(to, _)| to.ip() != ip);
                    }
                    TurnEvent::PermissionCreated(_, ip) => {
                        let (ready, rest): (VecDeque<_>, VecDeque<_>) =
                            t.waiting.drain(..).partition(|(to, _)| to.ip() == ip);
                        t.waiting = rest;
                        for (to, data) in ready {
                            if let Ok(Some(tx)) = t.client.send_to(TransportType::Udp, to, &data[..], sio) {
                                let tx = tx.build();
                                send(&mut self.out, link, tx.to, tx.data);
                            }
                        }
                    }
                    _ => {}
                }
            }
            let t = &mut self.turn[i];
            t.wait = wait;
            if !sent {
                break;
            }
        }
        self.check_complete();
    }

    fn check_complete(&mut self) {
        if !self.complete_sent && self.is_complete() {
            self.complete_sent = true;
            self.out.push_back(Output::Complete);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.stun.len() {
            let p = &mut self.stun[i];
            if p.outcome != Outcome::Pending || p.next_at > now {
                continue;
            }
            if p.attempts >= STUN_ATTEMPTS {
                p.outcome = Outcome::Failed(GatherFailure::StunNoAnswer { tries: p.attempts });
                continue;
            }
            p.attempts += 1;
            p.next_at = now + STUN_RTO * (1 << (p.attempts - 1).min(3));
            self.out.push_back(Output::Transmit { socket: p.socket, to: p.server, data: p.request.clone() });
        }
        for i in 0..self.turn.len() {
            if self.turn[i].wait <= now {
                self.pump_turn(i, now);
            }
        }
        self.decide_fallback(now);
        self.check_complete();
    }

    /// When [`Gatherer::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stun = self.stun.iter().filter(|p| p.outcome == Outcome::Pending).map(|p| p.next_at);
        let turn = self.turn.iter().map(|t| t.wait);
        let fallback =
            (!self.fallback_decided && !self.streams.is_empty()).then_some(self.base + STREAM_FALLBACK_AFTER);
        stun.chain(turn).chain(fallback).min()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Gives the allocations back (REFRESH with lifetime 0), then closes
    /// the streams (the driver writes what is queued first).
    pub fn close(&mut self, now: Instant) {
        let sio = self.sio(now);
        for i in 0..self.turn.len() {
            if self.turn[i].relayed.is_some() {
                let _ = self.turn[i].client.delete(sio);
                self.pump_turn(i, now);
            }
        }
        for (stream, p) in self.streams.iter().enumerate() {
            if matches!(p.state, StreamState::Connecting | StreamState::Up(_)) {
                self.out.push_back(Output::StreamClose { stream });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_inside_its_message_is_not_copied() {
        let message = [0x40, 0x00, 0, 3, 7, 8, 9, 0];
        let inside = Payload::locate(&message, &message[4..7]);
        assert_eq!(inside, Payload::In(4..7));
        assert_eq!(inside.of(&message), &[7, 8, 9]);
        let elsewhere = [7u8, 8, 9];
        let copied = Payload::locate(&message, &elsewhere);
        assert_eq!(copied, Payload::Owned(vec![7, 8, 9]));
        assert_eq!(copied.of(&message), &[7, 8, 9]);
        // Overlapping the end is not inside.
        let longer = [1u8; 16];
        assert!(matches!(Payload::locate(&longer[..8], &longer[4..12]), Payload::Owned(_)));
        assert!(maybe_stun(&[0x00, 0x01]) && maybe_stun(&[0x01, 0x01]));
        assert!(!maybe_stun(&[0x40, 0x00]) && !maybe_stun(&[22, 0xfe]) && !maybe_stun(&[]));
    }

    #[test]
    fn buffers_are_kept_only_for_relayed_datagrams() {
        let mut g = Gatherer::new(&["127.0.0.1:5000".parse().unwrap()], &[], Instant::now());
        g.recycle(Vec::with_capacity(SPARE_CAPACITY));
        assert!(g.spare.is_empty(), "no allocation: nothing to build relayed datagrams in");
    }

    #[test]
    fn urls() {
        let url = |turn, host: &str, port| Some(Url { turn, host: host.into(), port });
        use TurnTransport::*;
        assert_eq!(parse_url("stun:203.0.113.1:3478"), url(None, "203.0.113.1", 3478));
        assert_eq!(parse_url("turn:example.org"), url(Some(Udp), "example.org", 3478));
        assert_eq!(parse_url("turn:example.org:5000?transport=udp"), url(Some(Udp), "example.org", 5000));
        assert_eq!(parse_url("turn:[2001:db8::1]:3479"), url(Some(Udp), "2001:db8::1", 3479));
        assert_eq!(parse_url("turn:example.org?transport=tcp"), url(Some(Tcp), "example.org", 3478));
        assert_eq!(parse_url("turns:example.org"), url(Some(Tls), "example.org", 5349));
        assert_eq!(parse_url("turns:example.org:443?transport=tcp"), url(Some(Tls), "example.org", 443));
        assert_eq!(parse_url("turns:example.org?transport=udp"), None, "DTLS is not spoken");
        assert_eq!(parse_url("turn:example.org?transport=sctp"), None);
        assert_eq!(parse_url("stun:example.org?transport=tcp"), None);
        assert_eq!(parse_url("http://x"), None);
        assert_eq!(parse_url("stun:"), None);
    }
}
