//! peerlink's signaling server as a library: WebSocket rooms with presence,
//! trickle-ICE relay and server-routed messages, speaking the protocol in
//! `peerlink-proto` (prose spec: `docs/PROTOCOL.md`).
//!
//! The server never sees peer data: it introduces peers, relays their
//! negotiation, stamps every message with the sender's server-assigned id and
//! only forwards between members of the same room. Every limit it enforces is
//! announced in `welcome` and answered with an error code a client can act on.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = async { tokio::signal::ctrl_c().await.ok(); };
//! peerlink_signal::serve(listener, peerlink_signal::Config::default(), shutdown).await
//! # }
//! ```

#![warn(missing_docs)]

mod backplane;
mod conn;
mod frame;
mod hub;
mod limit;
mod listen;
mod metrics;
mod outbox;
mod shard;
mod token;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use axum::routing::get;
use peerlink_proto::{IceServer, Limits, PeerId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use backplane::BackplaneConfig;
pub use frame::{Relay, parse_client_frame, relay_frame};
pub use hub::HubStats;
pub use listen::AdmissionStats;
pub use metrics::{Metrics, MoreMetrics};
pub use token::{JoinClaims, join_token, verify_join_token};

/// What the server enforces and announces.
#[derive(Debug, Clone)]
pub struct Config {
    /// Limits announced in `welcome` and enforced per connection.
    pub limits: Limits,
    /// Interval of WebSocket pings the server sends to keep NATs and proxies open.
    pub heartbeat: Duration,
    /// Time a new connection has to send `hello`.
    pub hello_timeout: Duration,
    /// Threads of their own that WebSocket connections run on, each a
    /// single-threaded runtime (0: on the runtime that serves HTTP). By
    /// default one for every two cores (at least one): the kernel's side
    /// of each relayed message (a receive and a send on loopback or a NIC)
    /// needs the rest.
    pub ws_threads: usize,
    /// Server→client messages queued per connection before the connection is
    /// dropped as a slow consumer.
    pub outbound_queue: usize,
    /// The same bound in bytes: what a client that stops reading can pin.
    /// A relayed message that does not fit is refused to its sender
    /// (`peer_busy`); a message from the server itself that does not fit
    /// closes the connection (`slow_consumer`).
    pub outbound_queue_bytes: usize,
    /// All connections' queues together, in bytes: past it relayed messages
    /// are refused to their senders (`peer_busy`) until queues drain.
    pub queue_budget_bytes: usize,
    /// A connection whose socket takes nothing for this long while messages
    /// wait for it is closed (`slow_consumer`).
    pub slow_consumer_timeout: Duration,
    /// Frames larger than this (bytes) kill the connection outright; frames
    /// between `limits.max_message_bytes` and this get a `too_large` error.
    pub hard_frame_limit: usize,
    /// ICE servers handed to every peer in `welcome`.
    pub ice_servers: Vec<IceServer>,
    /// More ICE servers made for each peer, e.g. with short-lived TURN
    /// credentials; appended to `ice_servers`.
    pub ice_provider: Option<IceProvider>,
    /// TCP connections open at once (WebSocket or HTTP); more are answered
    /// `503` and closed. Keep it under the process's file descriptor limit.
    pub max_connections: usize,
    /// TCP connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Time a connection has to send a complete HTTP request, from when it
    /// opened or from its previous request (also how long an idle
    /// keep-alive connection stays open). WebSockets are not affected.
    pub request_timeout: Duration,
    /// When set, every `join` must carry a token signed with this secret
    /// (see [`join_token`]); `unauthorized` otherwise.
    pub join_secret: Option<Secret>,
    /// Browser origins (`https://app.example.org`) whose pages may open
    /// the WebSocket; empty: any. Pages served by this server itself, and
    /// clients that send no `Origin` (native ones), are always allowed.
    pub allowed_origins: Vec<String>,
    /// More metrics for `GET /metrics` (the TURN server's, say).
    pub more_metrics: Option<MoreMetrics>,
    /// Share rooms with other nodes through Redis; `None`: rooms live in
    /// this process only.
    pub backplane: Option<BackplaneConfig>,
    /// A room with more members than this is large: a newcomer's `joined`
    /// lists a random sample of this many (with the room's `size`), and
    /// nobody is told `peer_joined` or `peer_left` (each would go to every
    /// member); peers meet through the overlay instead (issue 15).
    pub listed_peers: usize,
    /// Key of the resume tokens in `welcome` (a reconnecting client keeps
    /// its peer id and its place in its rooms). Every node of a deployment
    /// needs the same one. `None`: a random key, so tokens work with this
    /// process only.
    pub resume_secret: Option<Secret>,
    /// How long resume tokens stay valid.
    pub resume_ttl: Duration,
    /// On shutdown, how long the members of a stopping node keep their
    /// place in their rooms (with a backplane), so that clients told
    /// `shutting_down` can resume on another node without anyone seeing
    /// them leave; whoever has not resumed by then leaves. Without a
    /// backplane the rooms end with the process: no one is told anything.
    pub drain_grace: Duration,
}

/// A secret that never shows in logs.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Who a `welcome` is for: the input of an [`IceProvider`].
#[derive(Debug, Clone, Copy)]
pub struct IceRequest<'a> {
    /// The peer id the server assigned.
    pub peer: &'a PeerId,
    /// The host the client used to reach this server (the `Host` header,
    /// without the port): where a TURN server on the same machine is
    /// reachable for it.
    pub host: Option<&'a str>,
}

type IceFn = dyn Fn(&IceRequest<'_>) -> Vec<IceServer> + Send + Sync;

/// Makes the ICE servers one peer is told about in `welcome`.
#[derive(Clone)]
pub struct IceProvider(Arc<IceFn>);

impl IceProvider {
    /// Wraps `f`, which the server calls for each connection's `welcome`; the servers it returns
    /// are appended to [`Config::ice_servers`].
    pub fn new(f: impl Fn(&IceRequest<'_>) -> Vec<IceServer> + Send + Sync + 'static) -> Self {
        IceProvider(Arc::new(f))
    }

    pub(crate) fn servers(&self, req: &IceRequest<'_>) -> Vec<IceServer> {
        (self.0)(req)
    }
}

impl std::fmt::Debug for IceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IceProvider(..)")
    }
}

/// The limits a server announces unless configured otherwise.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_message_bytes: 64 * 1024,
    max_peers_per_room: 32,
    max_rooms_per_connection: 8,
    messages_per_second: 50,
    message_burst: 200,
    idle_timeout_ms: 45_000,
};

/// Members a `joined` lists at most, unless configured otherwise: rooms up
/// to the default room limit are listed in full.
pub const DEFAULT_LISTED_PEERS: usize = 32;

/// Messages queued for one connection: above what the announced limits let
/// a full room send it at once (31 members with a burst of 200 each).
pub const DEFAULT_OUTBOUND_QUEUE: usize = 8192;
/// All connections' queued bytes together, unless configured otherwise.
pub const DEFAULT_QUEUE_BUDGET_BYTES: usize = 256 << 20;
/// How long a connection may read nothing while messages wait for it.
pub const DEFAULT_SLOW_CONSUMER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes queued for one connection before it is closed as a slow consumer:
/// what a client that stops reading can pin of the server's memory.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 1 << 20;
/// TCP connections open at once, unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// TCP connections open at once from one IP address, unless configured
/// otherwise: room for a busy office behind one NAT, not for one attacker
/// to take every slot.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// Time for a complete HTTP request, unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Config {
    /// The default configuration with these limits (the hard frame limit,
    /// where a frame closes the connection, follows the message size).
    pub fn with_limits(limits: Limits) -> Self {
        Config { limits, hard_frame_limit: 4 * limits.max_message_bytes as usize, ..Config::default() }
    }
}

impl Default for Config {
    fn default() -> Self {
        let limits = DEFAULT_LIMITS;
        Config {
            limits,
            heartbeat: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            ws_threads: (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1),
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            queue_budget_bytes: DEFAULT_QUEUE_BUDGET_BYTES,
            slow_consumer_timeout: DEFAULT_SLOW_CONSUMER_TIMEOUT,
            hard_frame_limit: 4 * limits.max_message_bytes as usize,
            ice_servers: Vec::new(),
            ice_provider: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            join_secret: None,
            allowed_origins: Vec::new(),
            more_metrics: None,
            backplane: None,
            listed_peers: DEFAULT_LISTED_PEERS,
            resume_secret: None,
            resume_ttl: Duration::from_secs(7 * 24 * 3600),
            drain_grace: Duration::from_secs(10),
        }
    }
}

/// A running server's shared state: rooms, members and configuration.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    /// The resume-token key (configured or random).
    resume_key: Secret,
    /// This process among the server's incarnations: a resume token with
    /// another epoch was issued by an earlier process (or another node).
    epoch: String,
    hub: Arc<hub::Hub>,
    budget: Arc<outbox::Budget>,
    admission: Arc<listen::Admission>,
    shutdown: watch::Receiver<bool>,
    /// The threads WebSocket connections run on.
    shards: Arc<shard::Shards>,
    /// Never sent on: `serve` waits for its receiver to see every sender
    /// dropped, which happens when the last connection task drops its `Server`.
    _alive: mpsc::Sender<()>,
}

impl Server {
    /// Creates the state and returns it with the handles `serve` uses to shut
    /// connections down and wait for them.
    fn new(config: Config) -> (Server, watch::Sender<bool>, mpsc::Receiver<()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (alive_tx, alive_rx) = mpsc::channel(1);
        let server = Server {
            inner: Arc::new(Inner {
                admission: listen::Admission::new(listen::Caps {
                    total: config.max_connections,
                    per_ip: config.max_connections_per_ip,
                    request_timeout: config.request_timeout,
                }),
                budget: Arc::new(outbox::Budget {
                    queued: Default::default(),
                    max_bytes: config.queue_budget_bytes,
                    socket_reads: Default::default(),
                    socket_writes: Default::default(),
                }),
                resume_key: config.resume_secret.clone().unwrap_or_else(|| {
                    Secret((0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect())
                }),
                epoch: format!("{:016x}", rand::random::<u64>()),
                hub: Arc::new(hub::Hub::new(config.listed_peers)),
                shards: Arc::new(shard::Shards::start(config.ws_threads)),
                config,
                shutdown: stop_rx,
                _alive: alive_tx,
            }),
        };
        (server, stop_tx, alive_rx)
    }

    /// Rooms and connections right now.
    pub fn stats(&self) -> HubStats {
        self.inner.hub.stats()
    }

    /// TCP connections open now, and those refused or timed out.
    pub fn admission(&self) -> AdmissionStats {
        self.inner.admission.stats()
    }
}

/// The HTTP routes: `GET /ws` (the signaling WebSocket), `GET /healthz`
/// and, unless metrics have a listener of their own, `GET /metrics`.
/// Other routes (the web app) are merged onto it by `serve_with`.
fn router(server: Server, with_metrics: bool) -> Router {
    let r = Router::new().route("/ws", get(ws_upgrade)).route("/healthz", get(healthz));
    let r = if with_metrics { r.route("/metrics", get(metrics)) } else { r };
    r.with_state(server)
}

async fn metrics(State(server): State<Server>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&server))
}

async fn healthz(State(server): State<Server>) -> impl IntoResponse {
    let s = server.stats();
    let a = server.admission();
    let cfg = &server.inner.config;
    let backplane = server.inner.hub.backplane().map(|b| b.status());
    let status = if backplane.as_ref().is_some_and(|b| !b.up) { "degraded" } else { "ok" };
    axum::Json(serde_json::json!({
        "status": status,
        "backplane": backplane,
        "tcp_connections": a.open,
        "connections_refused": a.refused,
        "requests_timed_out": a.timed_out,
        "max_connections": cfg.max_connections,
        "max_connections_per_ip": cfg.max_connections_per_ip,
        "request_timeout_ms": cfg.request_timeout.as_millis() as u64,
        "connections": s.connections,
        "rooms": s.rooms,
        "signals_relayed": s.signals_relayed,
        "messages_relayed": s.messages_relayed,
        "limits": server.inner.config.limits,
        "outbound_queue": cfg.outbound_queue,
        "outbound_queue_bytes": cfg.outbound_queue_bytes,
        "queued_bytes": server.inner.budget.queued.load(std::sync::atomic::Ordering::Relaxed),
        "queue_budget_bytes": cfg.queue_budget_bytes,
        "slow_consumer_timeout_ms": cfg.slow_consumer_timeout.as_millis() as u64,
        "socket_reads": server.inner.budget.socket_reads.load(std::sync::atomic::Ordering::Relaxed),
        "socket_writes": server.inner.budget.socket_writes.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// `GET /ws`: the WebSocket handshake (RFC 6455 section 4.2), then the
/// connection is the signaling server's own (`conn.rs`), with the socket
/// taken back from hyper.
async fn ws_upgrade(
    State(server): State<Server>,
    ConnectInfo(peer): ConnectInfo<listen::Peer>,
    mut req: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            "this is a WebSocket endpoint\n",
        )
            .into_response();
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return (
            StatusCode::BAD_REQUEST,
            [(header::SEC_WEBSOCKET_VERSION, "13")],
            "WebSocket version 13 only\n",
        )
            .into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| ws::accept_key(k.as_bytes())) else {
        return (StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n").into_response();
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::BAD_REQUEST, "this connection cannot be upgraded\n").into_response();
    };
    let headers = req.headers();
    // From here the WebSocket's own idle timeout applies.
    peer.deadline.upgraded();
    let addr = peer.addr;
    let host_header = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host = host_header.map(host_of);
    let cfg = &server.inner.config;
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    let refused_origin = match origin {
        Some(o) if !origin_allowed(&cfg.allowed_origins, o, host_header) => Some(o.to_string()),
        _ => None,
    };
    if refused_origin.is_some() {
        server.inner.hub.count_error(peerlink_proto::ErrorCode::OriginNotAllowed);
        server.inner.hub.count_kick(peerlink_proto::ErrorCode::OriginNotAllowed);
    }
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => return tracing::debug!(%addr, "upgrade: {e}"),
        };
        let parts = match hyper_util::server::conn::auto::upgrade::downcast::<
            hyper_util::rt::TokioIo<listen::GuardedIo>,
        >(upgraded)
        {
            Ok(parts) => parts,
            Err(_) => return tracing::warn!(%addr, "upgraded connection of an unexpected type"),
        };
        let (tcp, slot) = parts.io.into_inner().into_parts();
        // Moved to a WebSocket thread: registered with its poller there.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => return tracing::debug!(%addr, "upgrade: {e}"),
        };
        let read_ahead = parts.read_buf;
        let shards = server.inner.shards.clone();
        shards.spawn(move || async move {
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => return tracing::warn!(%addr, "WebSocket socket: {e}"),
            };
            let socket = conn::Socket { tcp: Arc::new(tcp), _slot: slot, read_ahead };
            match refused_origin {
                // A browser tells its page only that the socket closed: the
                // reason goes over the socket, as a protocol error.
                Some(origin) => conn::refuse_origin(&server, socket, &origin).await,
                None => conn::run(server, socket, addr, host).await,
            }
        });
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "upgrade"), (header::UPGRADE, "websocket")],
        [(header::SEC_WEBSOCKET_ACCEPT, key)],
    )
        .into_response()
}

/// Whether a page from `origin` may use the server: any when no list is
/// set, else one on the list or this server's own (same host and port).
fn origin_allowed(allowed: &[String], origin: &str, host: Option<&str>) -> bool {
    if allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    host.is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
}

/// A request lifts its connection's request deadline until its response
/// body is done; then the next request has a full timeout.
async fn note_request(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<listen::Peer>>().cloned() else {
        return next.run(req).await;
    };
    peer.deadline.request_started();
    let response = next.run(req).await;
    let deadline = peer.deadline.clone();
    response.map(move |inner| axum::body::Body::new(listen::Answering { inner, deadline }))
}

/// `example.org:8080` → `example.org`, `[2001:db8::1]:80` → `2001:db8::1`.
fn host_of(host: &str) -> String {
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default().to_string();
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h).to_string()
}

/// Serves signaling on `listener` until `shutdown` completes, then tells every
/// connected client (`error` with code `shutting_down`), closes their
/// sockets, and returns once every connection task has ended.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, config, shutdown, |r| r).await
}

/// Like [`serve`], with a hook to add routes (e.g. the web app) to the router.
pub async fn serve_with(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extend: impl FnOnce(Router) -> Router,
) -> std::io::Result<()> {
    serve_full(listener, None, config, shutdown, extend).await
}

/// Like [`serve_with`]; with `metrics` set, `GET /metrics` is served on
/// that listener instead of the public one (`/healthz` stays public).
pub async fn serve_full(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extend: impl FnOnce(Router) -> Router,
) -> std::io::Result<()> {
    let backplane = config.backplane.clone();
    if backplane.is_some() && config.resume_secret.is_none() {
        tracing::warn!(
            "no resume secret: clients can resume only on this node; give every node the same one"
        );
    }
    let (server, stop, mut alive) = Server::new(config);
    if let Some(cfg) = &backplane {
        let drain = server.inner.config.drain_grace;
        backplane::Backplane::start(cfg, server.inner.hub.clone(), stop.subscribe(), drain)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("--redis: {e}")))?;
    }
    let app =
        extend(router(server.clone(), metrics.is_none())).layer(axum::middleware::from_fn(note_request));
    if let Some(metrics_listener) = metrics {
        // A weak reference: a scraper's open connection must not keep the
        // server from shutting down.
        let weak = Arc::downgrade(&server.inner);
        let private = Router::new().route(
            "/metrics",
            get(move || {
                let inner = weak.upgrade();
                async move {
                    match inner {
                        Some(inner) => (
                            axum::http::StatusCode::OK,
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            metrics::render(&Server { inner }),
                        ),
                        None => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "shutting down\n".to_string(),
                        ),
                    }
                }
            }),
        );
        let mut stopped = stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                served = axum::serve(metrics_listener, private) => if let Err(e) = served {
                    tracing::warn!("metrics listener: {e}");
                },
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
    }
    let hub = server.inner.hub.clone();
    let stop_signal = async move {
        shutdown.await;
        tracing::info!("shutting down: closing connections");
        let _ = stop.send(true);
        hub.shut_down();
    };
    let listener = listen::Guarded { listener, admission: server.inner.admission.clone() };
    axum::serve(listener, app.into_make_service_with_connect_info::<listen::Peer>())
        .with_graceful_shutdown(stop_signal)
        .await?;
    // Every connection task holds a clone of `alive`; wait for them to finish.
    drop(server);
    let _ = alive.recv().await;
    tracing::info!("shut down");
    Ok(())
}
