//! `peerlink serve`: the signaling server and, next to it, the embedded
//! STUN/TURN server, with short-lived TURN credentials for every peer.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use peerlink_proto::IceServer;
use peerlink_signal::{DEFAULT_LIMITS, IceProvider, IceRequest};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on for signaling (WebSocket at /ws, health at /healthz).
    #[arg(long, default_value = "0.0.0.0:8080", env = "PEERLINK_LISTEN")]
    listen: SocketAddr,
    /// Serve GET /metrics (Prometheus text) on this address instead of the
    /// public one, e.g. 127.0.0.1:9090 (/healthz stays public).
    #[arg(long, env = "PEERLINK_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Share rooms with every other `peerlink serve` given the same Redis
    /// (redis://[user:password@]host:port[/db]): peers on different nodes
    /// behind one load balancer meet in one room. Without it rooms live in
    /// this process.
    #[arg(long, env = "PEERLINK_REDIS")]
    redis: Option<String>,
    /// --redis names a Redis Cluster: one or more of its nodes' URLs,
    /// comma-separated (the others are learned from them).
    #[arg(long, env = "PEERLINK_REDIS_CLUSTER", requires = "redis")]
    redis_cluster: bool,
    /// How long a node's members outlive it in Redis when it dies or is cut
    /// off: the other nodes tell their peers `peer_left` within about this
    /// and a third. 1s to 1m.
    #[arg(long, env = "PEERLINK_REDIS_LEASE", default_value = "3s", value_parser = parse_lease)]
    redis_lease: Duration,
    /// Key of the resume tokens that let a client reconnect (to this node
    /// or another) with its peer id and its place in its rooms. Every node
    /// sharing a Redis needs the same one. Default: derived from
    /// --turn-secret when that is set, else random per start.
    #[arg(long, env = "PEERLINK_RESUME_SECRET", hide_env_values = true)]
    resume_secret: Option<String>,
    /// On SIGTERM, with --redis: how long this node's members keep their
    /// places while their clients reconnect to other nodes (they are told
    /// `shutting_down` at once); whoever has not resumed by then leaves.
    #[arg(long, env = "PEERLINK_DRAIN_GRACE", default_value = "10s", value_parser = crate::common::parse_duration)]
    drain_grace: Duration,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    turn: TurnArgs,
}

/// What one client may do; announced to every client in `welcome` and shown
/// at `/healthz`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Largest signaling message accepted, in bytes (`too_large` above; a
    /// frame over four times this closes the connection).
    #[arg(long, env = "PEERLINK_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_LIMITS.max_message_bytes,
          value_parser = clap::value_parser!(u32).range(1024..=16 << 20))]
    max_message_bytes: u32,
    /// Members per room (`room_full` above).
    #[arg(long, env = "PEERLINK_MAX_PEERS_PER_ROOM", default_value_t = DEFAULT_LIMITS.max_peers_per_room,
          value_parser = clap::value_parser!(u32).range(2..=100_000))]
    max_peers_per_room: u32,
    /// Rooms with more members than this are large: a newcomer's `joined`
    /// lists a random sample of this many, and nobody is told of joins and
    /// leaves (peers meet over the overlay; raise --max-peers-per-room too).
    #[arg(long, env = "PEERLINK_LISTED_PEERS", default_value_t = peerlink_signal::DEFAULT_LISTED_PEERS as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    listed_peers: u32,
    /// Rooms one connection may be in at once (`too_many_rooms` above).
    #[arg(long, env = "PEERLINK_MAX_ROOMS_PER_CONNECTION", default_value_t = DEFAULT_LIMITS.max_rooms_per_connection,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max_rooms_per_connection: u32,
    /// Sustained messages per second per connection (`rate_limited` above;
    /// more than twice this for 3 s in a row is `flooding`).
    #[arg(long, env = "PEERLINK_MESSAGES_PER_SECOND", default_value_t = DEFAULT_LIMITS.messages_per_second,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    messages_per_second: u32,
    /// Messages a connection may send at once on top of the rate.
    #[arg(long, env = "PEERLINK_MESSAGE_BURST", default_value_t = DEFAULT_LIMITS.message_burst,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    message_burst: u32,
    /// A connection that sends nothing for this long is closed
    /// (`idle_timeout`), e.g. 45s, 5m.
    #[arg(long, env = "PEERLINK_IDLE_TIMEOUT", default_value = "45s", value_parser = parse_idle)]
    idle_timeout: Duration,
    /// Messages queued for a connection that does not read before it is
    /// closed (`slow_consumer`).
    #[arg(long, env = "PEERLINK_OUTBOUND_QUEUE", default_value_t = peerlink_signal::DEFAULT_OUTBOUND_QUEUE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..=1_000_000))]
    outbound_queue: usize,
    /// Bytes queued for a connection that does not read before it is closed
    /// (`slow_consumer`): the most server memory one client can pin.
    #[arg(long, env = "PEERLINK_OUTBOUND_QUEUE_BYTES", default_value_t = peerlink_signal::DEFAULT_OUTBOUND_QUEUE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64 * 1024..=1 << 30))]
    outbound_queue_bytes: usize,
    /// Bytes queued for all connections together: past it relayed messages
    /// are refused to their senders (`peer_busy`) until queues drain.
    #[arg(long, env = "PEERLINK_QUEUE_BUDGET_BYTES", default_value_t = peerlink_signal::DEFAULT_QUEUE_BUDGET_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1 << 20..=1 << 40))]
    queue_budget_bytes: usize,
    /// A connection that reads nothing for this long while messages wait
    /// for it is closed (`slow_consumer`).
    #[arg(long, env = "PEERLINK_SLOW_CONSUMER_TIMEOUT", default_value = "10s", value_parser = parse_request_timeout)]
    slow_consumer_timeout: Duration,
    /// Require a join token signed with this secret on every join
    /// (`peerlink token`, or your backend: see the README); `unauthorized`
    /// without a valid one.
    #[arg(long, env = "PEERLINK_JOIN_SECRET", hide_env_values = true)]
    join_secret: Option<String>,
    /// A browser origin whose pages may use the server, e.g.
    /// https://app.example.org (repeatable; comma-separated in the
    /// environment). Default: any. Pages served by this server itself and
    /// clients without an Origin (native ones) are always allowed.
    #[arg(long, env = "PEERLINK_ALLOW_ORIGIN", value_delimiter = ',')]
    allow_origin: Vec<String>,
    /// TCP connections open at once (WebSocket or HTTP); more are answered
    /// 503 and closed. Default: 50,000, or what the file descriptor limit
    /// allows (serve raises its soft limit to the hard one).
    #[arg(long, env = "PEERLINK_MAX_CONNECTIONS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    max_connections: Option<usize>,
    /// TCP connections open at once from one IP address.
    #[arg(long, env = "PEERLINK_MAX_CONNECTIONS_PER_IP", default_value_t = peerlink_signal::DEFAULT_MAX_CONNECTIONS_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    max_connections_per_ip: usize,
    /// Time a connection has to send a complete HTTP request (a half-sent
    /// request is closed after it; also the keep-alive idle time).
    /// WebSockets are not affected.
    #[arg(long, env = "PEERLINK_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_request_timeout)]
    request_timeout: Duration,
    /// Threads WebSocket connections run on, each owning its connections
    /// (0: on the shared runtime that serves HTTP). Default: one for every
    /// two cores, at least one.
    #[arg(long, env = "PEERLINK_WS_THREADS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024))]
    ws_threads: Option<usize>,
}

/// A backplane lease: 1 s to 1 min.
fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = crate::common::parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&d) {
        return Err(format!("{s} is not a usable lease; 1s to 1m"));
    }
    Ok(d)
}

/// A request or slow-consumer timeout: between 1 s and 10 min.
fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    let d = crate::common::parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&d) {
        return Err(format!("{s} is not a usable timeout; 1s to 10m"));
    }
    Ok(d)
}

/// File descriptors kept for everything but client connections (TURN
/// relay sockets have their own quota).
const FD_RESERVE: u64 = 1024;

/// An idle timeout: at least 5 s (clients ping every 15 s or so).
fn parse_idle(s: &str) -> Result<Duration, String> {
    let d = crate::common::parse_duration(s)?;
    if d < Duration::from_secs(5) {
        return Err(format!("{s} is too short for an idle timeout; at least 5s"));
    }
    Ok(d)
}

impl LimitArgs {
    fn config(&self) -> peerlink_signal::Config {
        let limits = peerlink_proto::Limits {
            max_message_bytes: self.max_message_bytes,
            max_peers_per_room: self.max_peers_per_room,
            max_rooms_per_connection: self.max_rooms_per_connection,
            messages_per_second: self.messages_per_second,
            message_burst: self.message_burst,
            idle_timeout_ms: self.idle_timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        let fd_limit = crate::common::raise_fd_limit();
        let fits = fd_limit.map_or(usize::MAX, |n| n.saturating_sub(FD_RESERVE).max(64) as usize);
        let max_connections =
            self.max_connections.unwrap_or(peerlink_signal::DEFAULT_MAX_CONNECTIONS.min(fits));
        if max_connections > fits {
            tracing::warn!(
                "--max-connections {max_connections} is more than the file descriptor limit ({fd_limit:?}) allows"
            );
        }
        tracing::info!("file descriptor limit {fd_limit:?}; at most {max_connections} connections");
        peerlink_signal::Config {
            outbound_queue: self.outbound_queue,
            outbound_queue_bytes: self.outbound_queue_bytes,
            queue_budget_bytes: self.queue_budget_bytes,
            slow_consumer_timeout: self.slow_consumer_timeout,
            max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            request_timeout: self.request_timeout,
            ws_threads: self.ws_threads.unwrap_or_else(|| peerlink_signal::Config::default().ws_threads),
            join_secret: self.join_secret.clone().map(peerlink_signal::Secret),
            allowed_origins: self.allow_origin.clone(),
            listed_peers: self.listed_peers as usize,
            ..peerlink_signal::Config::with_limits(limits)
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TurnArgs {
    /// UDP address of the embedded STUN/TURN server.
    #[arg(long, default_value = "0.0.0.0:3478", env = "PEERLINK_TURN_LISTEN")]
    turn_listen: SocketAddr,
    /// Do not run the embedded STUN/TURN server (use --turn-url for another).
    #[arg(long)]
    no_turn: bool,
    /// TCP address of the embedded TURN server, for networks that block UDP
    /// (`turn:HOST:PORT?transport=tcp`; relaying stays UDP). Default: the
    /// --turn-listen address.
    #[arg(long, env = "PEERLINK_TURN_TCP_LISTEN")]
    turn_tcp_listen: Option<SocketAddr>,
    /// Do not accept TURN clients over TCP.
    #[arg(long)]
    no_turn_tcp: bool,
    /// TLS address of the embedded TURN server (`turns:HOST:PORT`), served
    /// when --turn-tls-cert and --turn-tls-key are given.
    #[arg(long, default_value = "0.0.0.0:5349", env = "PEERLINK_TURN_TLS_LISTEN")]
    turn_tls_listen: SocketAddr,
    /// PEM certificate chain (leaf first) for TURN over TLS. Its name must be
    /// the host peers reach the server by (the --turn-external-ip, or the
    /// host in the signaling URL).
    #[arg(long, env = "PEERLINK_TURN_TLS_CERT", requires = "turn_tls_key")]
    turn_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --turn-tls-cert.
    #[arg(long, env = "PEERLINK_TURN_TLS_KEY", requires = "turn_tls_cert")]
    turn_tls_key: Option<std::path::PathBuf>,
    /// The address relayed candidates carry and peers reach the TURN server
    /// at. Default: the --turn-listen address, or when that is 0.0.0.0, the
    /// first non-loopback interface address.
    #[arg(long)]
    turn_external_ip: Option<IpAddr>,
    /// Secret for TURN REST credentials, coturn's `static-auth-secret`
    /// (`use-auth-secret`). Default: a random one per start, enough for the
    /// embedded server alone.
    #[arg(long, env = "PEERLINK_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// Also hand out this STUN or TURN server (repeatable), e.g.
    /// `turn:turn.example.org:3478` for a coturn sharing --turn-secret.
    #[arg(long)]
    turn_url: Vec<String>,
    /// How long handed-out TURN credentials stay valid.
    #[arg(long, default_value = "1h", value_parser = crate::common::parse_duration)]
    turn_ttl: Duration,
    /// Relay bandwidth cap per allocation and direction, bytes per second (0: none).
    #[arg(long, default_value_t = 12_500_000)]
    turn_rate: u64,
    /// Let the TURN server relay to loopback addresses (tests on one machine).
    #[arg(long)]
    turn_allow_loopback: bool,
    /// Let the TURN server relay to private space (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7), which it refuses by default: a relay
    /// into the server's own network reaches hosts behind its firewall.
    /// Prefer --turn-allow-peer with the networks peers really use.
    #[arg(long, env = "PEERLINK_TURN_ALLOW_PRIVATE")]
    turn_allow_private: bool,
    /// A network (CIDR, e.g. 10.20.0.0/16) the TURN server may relay to
    /// although its class is refused (private, loopback, link-local);
    /// repeatable, or comma-separated in the environment. The server's own
    /// addresses stay refused but for other allocations' relays.
    #[arg(long, env = "PEERLINK_TURN_ALLOW_PEER", value_delimiter = ',')]
    turn_allow_peer: Vec<peerlink_turn::IpNet>,
    /// A network (CIDR) the TURN server never relays to; repeatable.
    #[arg(long, env = "PEERLINK_TURN_DENY_PEER", value_delimiter = ',')]
    turn_deny_peer: Vec<peerlink_turn::IpNet>,
}

fn random_secret() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The first non-loopback interface address of the family of `like`.
fn guess_external_ip(like: IpAddr) -> Option<IpAddr> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .map(|i| i.ip())
        .find(|ip| !ip.is_loopback() && ip.is_ipv4() == like.is_ipv4() && !ip.is_unspecified())
}

/// Where peers reach the embedded STUN/TURN server.
#[derive(Debug, Clone, Copy)]
struct Embedded {
    /// `None`: the host the peer reached signaling by.
    ip: Option<IpAddr>,
    udp: u16,
    tcp: Option<u16>,
    tls: Option<u16>,
}

/// `host` as it goes in a STUN/TURN URL.
fn url_host(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let turn = &args.turn;
    let secret = turn.turn_secret.clone().unwrap_or_else(random_secret);
    let ttl = turn.turn_ttl;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut turn_task = None;
    let mut turn_stats: Option<peerlink_turn::Stats> = None;
    // The embedded server's address as clients should dial it; `None` means
    // "the host the client reached signaling by".
    let mut embedded: Option<Embedded> = None;
    if !turn.no_turn {
        let socket = tokio::net::UdpSocket::bind(turn.turn_listen).await.with_context(|| {
            format!("cannot bind the STUN/TURN server to {} (use --no-turn to go without)", turn.turn_listen)
        })?;
        let bound = socket.local_addr()?;
        let external = turn.turn_external_ip.or(if bound.ip().is_unspecified() {
            guess_external_ip(bound.ip())
        } else {
            Some(bound.ip())
        });
        let mut config = peerlink_turn::Config::new(peerlink_turn::Auth::rest(secret.clone()));
        config.listen = bound;
        config.external_ip = Some(external.unwrap_or(IpAddr::from([127, 0, 0, 1])));
        config.limits.bandwidth_bytes_per_sec = (turn.turn_rate > 0).then_some(turn.turn_rate);
        config.peer_policy.allow_loopback = turn.turn_allow_loopback;
        config.peer_policy.allow_private = turn.turn_allow_private;
        config.peer_policy.allowed = turn.turn_allow_peer.clone();
        config.peer_policy.denied = turn.turn_deny_peer.clone();
        let mut server =
            peerlink_turn::Server::new(socket, config).context("cannot start the STUN/TURN server")?;
        let mut tcp_port = None;
        if !turn.no_turn_tcp {
            // Default: the UDP port's number, or, when that was left to the
            // system (port 0), a port of its own the system picks too (the
            // UDP one's number may be taken for TCP).
            let at = turn.turn_tcp_listen.unwrap_or(if turn.turn_listen.port() == 0 {
                turn.turn_listen
            } else {
                bound
            });
            let listener = tokio::net::TcpListener::bind(at).await.with_context(|| {
                format!("cannot bind TURN over TCP to {at} (use --no-turn-tcp to go without)")
            })?;
            let at = listener.local_addr()?;
            println!("peerlink serve: TURN on tcp {at}");
            tcp_port = Some(at.port());
            server = server.with_tcp(listener);
        }
        let mut tls_port = None;
        if let (Some(cert), Some(key)) = (&turn.turn_tls_cert, &turn.turn_tls_key) {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let tls = peerlink_turn::TlsConfig::from_pem(&read(cert)?, &read(key)?)
                .context("unusable TLS certificate or key for TURN over TLS")?;
            let listener = tokio::net::TcpListener::bind(turn.turn_tls_listen)
                .await
                .with_context(|| format!("cannot bind TURN over TLS to {}", turn.turn_tls_listen))?;
            let at = listener.local_addr()?;
            println!("peerlink serve: TURN on tls {at}");
            tls_port = Some(at.port());
            server = server.with_tls(listener, tls);
        }
        turn_stats = Some(server.stats());
        tracing::info!(
            "STUN/TURN on udp {bound}, relaying as {}",
            external.map_or("127.0.0.1".to_string(), |i| i.to_string())
        );
        println!("peerlink serve: STUN/TURN on udp {bound}");
        let mut stop = stop_rx.clone();
        turn_task = Some(tokio::spawn(async move {
            server
                .run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
        embedded = Some(Embedded {
            ip: turn.turn_external_ip.or((!bound.ip().is_unspecified()).then_some(bound.ip())),
            udp: bound.port(),
            tcp: tcp_port,
            tls: tls_port,
        });
    }

    let extra: Vec<String> = turn.turn_url.clone();
    let provider = IceProvider::new(move |req: &IceRequest<'_>| {
        let creds = peerlink_turn::rest_credentials(&secret, req.peer.as_str(), ttl, SystemTime::now());
        let mut out = Vec::new();
        if let Some(e) = embedded {
            let host = match (e.ip, req.host) {
                (Some(ip), _) => url_host(&ip.to_string()),
                (None, Some(h)) => url_host(h),
                (None, None) => "127.0.0.1".to_string(),
            };
            let port = e.udp;
            let mut urls = vec![format!("stun:{host}:{port}"), format!("turn:{host}:{port}?transport=udp")];
            if let Some(tcp) = e.tcp {
                urls.push(format!("turn:{host}:{tcp}?transport=tcp"));
            }
            if let Some(tls) = e.tls {
                // The certificate names the host signaling was reached by.
                let host = req.host.map(url_host).unwrap_or(host);
                urls.push(format!("turns:{host}:{tls}?transport=tcp"));
            }
            out.push(IceServer {
                urls,
                username: Some(creds.username.clone()),
                credential: Some(creds.password.clone()),
            });
        }
        if !extra.is_empty() {
            out.push(IceServer {
                urls: extra.clone(),
                username: Some(creds.username),
                credential: Some(creds.password),
            });
        }
        out
    });
    let more_metrics =
        turn_stats.map(|stats| peerlink_signal::MoreMetrics::new(move |m| turn_metrics(&stats, m)));
    let backplane = args.redis.as_ref().map(|url| peerlink_signal::BackplaneConfig {
        lease: args.redis_lease,
        cluster: args.redis_cluster,
        ..peerlink_signal::BackplaneConfig::redis(url.clone())
    });
    // Resume tokens outlive a node: every node must sign them alike.
    let resume_secret = args.resume_secret.clone().or_else(|| {
        args.turn.turn_secret.as_ref().map(|s| {
            use hmac::Mac;
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(s.as_bytes()).expect("any key length");
            m.update(b"peerlink resume key v1");
            m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
        })
    });
    let config = peerlink_signal::Config {
        ice_provider: Some(provider),
        more_metrics,
        backplane,
        resume_secret: resume_secret.map(peerlink_signal::Secret),
        drain_grace: args.drain_grace,
        ..args.limits.config()
    };
    let metrics_listener = match args.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            println!("peerlink serve: metrics on http://{}/metrics", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    tracing::info!("signaling on ws://{addr}/ws (health: http://{addr}/healthz)");
    println!("peerlink serve: listening on {addr}");
    let shutdown = crate::common::shutdown_signal();
    tracing::info!("web app on http://{addr}/");
    peerlink_signal::serve_full(listener, metrics_listener, config, shutdown, peerlink_web::routes).await?;
    // TURN outlives the drain: peers relayed here keep their path while
    // they move their signaling elsewhere.
    let _ = stop_tx.send(true);
    if let Some(task) = turn_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => tracing::warn!("STUN/TURN server: {e}"),
            Ok(_) => {}
            Err(_) => tracing::warn!("STUN/TURN server did not stop in time"),
        }
    }
    Ok(())
}

/// `peerlink token`: signs a join token.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The room the token lets its holder join; `*` for any room.
    room: String,
    /// The display name the join must carry (default: any).
    #[arg(long)]
    name: Option<String>,
    /// How long the token is valid, e.g. 10m, 1h.
    #[arg(long, default_value = "1h", value_parser = crate::common::parse_duration)]
    ttl: Duration,
    /// The server's --join-secret.
    #[arg(long, env = "PEERLINK_JOIN_SECRET", hide_env_values = true)]
    secret: String,
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
    let claims =
        peerlink_signal::JoinClaims { room: args.room, name: args.name, exp: now + args.ttl.as_secs() };
    println!("{}", peerlink_signal::join_token(args.secret.as_bytes(), &claims));
    Ok(())
}

/// The embedded TURN server's counters for `GET /metrics`.
fn turn_metrics(stats: &peerlink_turn::Stats, m: &mut peerlink_signal::Metrics) {
    let s = stats.snapshot();
    m.single("peerlink_turn_allocations", "gauge", "Live TURN allocations.", s.allocations);
    m.single(
        "peerlink_turn_allocations_total",
        "counter",
        "TURN allocations created.",
        s.allocations_created,
    );
    m.single(
        "peerlink_turn_allocations_refused_total",
        "counter",
        "ALLOCATE requests refused by a quota or an unsupported family.",
        s.allocations_refused,
    );
    m.single(
        "peerlink_turn_allocations_revoked_total",
        "counter",
        "Allocations ended at the maximum lifetime.",
        s.allocations_revoked,
    );
    m.single(
        "peerlink_turn_stream_connections",
        "gauge",
        "Open TURN client connections over TCP and TLS.",
        s.stream_connections,
    );
    m.single(
        "peerlink_turn_stream_connections_total",
        "counter",
        "TURN client connections over TCP and TLS that sent a first message.",
        s.stream_connections_total,
    );
    m.single(
        "peerlink_turn_binding_requests_total",
        "counter",
        "STUN Binding requests answered.",
        s.binding_requests,
    );
    m.family("peerlink_turn_relayed_bytes_total", "counter", "Payload bytes relayed, by direction.");
    m.sample("peerlink_turn_relayed_bytes_total", &[("direction", "to_peers")], s.bytes_to_peers);
    m.sample("peerlink_turn_relayed_bytes_total", &[("direction", "to_clients")], s.bytes_to_clients);
    m.single(
        "peerlink_turn_hairpinned_datagrams_total",
        "counter",
        "Datagrams from one allocation to another of this server, handed over without leaving the process.",
        s.hairpinned,
    );
    m.single(
        "peerlink_turn_channel_shortcuts_total",
        "counter",
        "ChannelData datagrams relayed on a route the protocol took lately, without asking it again.",
        s.channel_shortcuts,
    );
    m.family(
        "peerlink_turn_refusals_total",
        "counter",
        "Requests and datagrams refused or dropped, by reason.",
    );
    for (reason, n) in [
        ("expired_credentials", s.expired_credentials),
        ("peer_policy", s.dropped_policy),
        ("bandwidth", s.dropped_bandwidth),
        ("no_permission", s.dropped_no_permission),
        ("queue_full", s.dropped_queue_full),
        ("rate_limited", s.dropped_rate_limited),
        ("tables_full", s.dropped_tables_full),
        ("send_failed", s.dropped_send_failed),
        ("oversize", s.dropped_oversize),
        ("stream_connection_limit", s.stream_refused),
        ("tls_handshake_failed", s.tls_handshakes_failed),
        ("stream_not_stun", s.stream_framing_errors),
    ] {
        m.sample("peerlink_turn_refusals_total", &[("reason", reason)], n);
    }
}
