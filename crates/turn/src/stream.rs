//! TURN over TCP and TLS between client and server (RFC 8656 §3.1): the
//! listeners and one task per connection.
//!
//! Relaying stays UDP: a client on a stream asks for a UDP allocation as it
//! would over UDP. Each connection task splits what it reads into STUN and
//! ChannelData messages ([`StreamFramer`]) and hands them to the server task
//! as if each were a datagram from the connection's remote address; the
//! server task writes its answers back through the connection's queue. So the
//! protocol state, credentials, quotas and peer policy are the same for every
//! transport. An allocation lives as long as its connection: when the
//! connection ends, its allocations stop relaying.
//!
//! Bounds: connections in total and per client IP (beyond them a new
//! connection is closed at once), a TLS handshake and the first message must
//! complete within [`HANDSHAKE_TIMEOUT`], a connection that holds no
//! allocation is closed after [`IDLE_TIMEOUT`] without a message, and each
//! connection's write queue holds at most [`WRITE_QUEUE_BYTES`]: what does
//! not fit is dropped, as UDP would drop it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peerlink_proto::turn_stream::{MAX_FRAME, StreamFramer, stream_padding};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

use crate::Error;
use crate::stats::{Stats, dec, inc};

/// How long a new connection gets for its TLS handshake and first message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed once it has held no allocation for this long
/// (from when it opened, or its last allocation ended).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write the client does not take within this ends the connection (its
/// slot is not held by a client that stopped reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes queued for writing to one connection; beyond it messages are
/// dropped.
pub const WRITE_QUEUE_BYTES: usize = 512 * 1024;
/// Messages queued for writing to one connection.
const WRITE_QUEUE_MESSAGES: usize = 1024;
/// Frames from all connections waiting for the server task.
pub(crate) const STREAM_QUEUE: usize = 1024;
const READ_CHUNK: usize = 16 * 1024;

/// TLS settings for the `turns:` listener: a certificate chain and its key.
#[derive(Clone)]
pub struct TlsConfig(pub(crate) Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

impl TlsConfig {
    /// A server configuration from PEM: the certificate chain (leaf first)
    /// and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<TlsConfig, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("TLS certificate: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Config("TLS certificate: no certificate in the PEM file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| Error::Config(format!("TLS key: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| Error::Config(format!("TLS certificate and key: {e}")))?;
        Ok(TlsConfig(Arc::new(config)))
    }
}

/// What connection tasks tell the server task.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    /// A connection is ready (handshake done); answers go into `conn`.
    Open { client: SocketAddr, conn: StreamConn },
    /// One STUN or ChannelData message.
    Frame { client: SocketAddr, data: Vec<u8> },
    /// The connection ended.
    Closed { client: SocketAddr },
}

/// The server task's handle on one connection: its write queue.
#[derive(Debug)]
pub(crate) struct StreamConn {
    tx: mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    pub tls: bool,
}

impl StreamConn {
    /// Queues one message (padded for the stream); false when the queue is
    /// full or the connection is gone.
    pub fn send(&self, frame: &[u8]) -> bool {
        let pad = stream_padding(frame);
        let len = frame.len() + pad;
        if self.queued.load(Ordering::Relaxed) + len > WRITE_QUEUE_BYTES {
            return false;
        }
        let mut data = Vec::with_capacity(len);
        data.extend_from_slice(frame);
        data.resize(len, 0);
        match self.tx.try_send(data) {
            Ok(()) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }
}

/// Connection counts, total and per IP, shared by the TCP and TLS listeners.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Releases a connection's place in [`Counts`] when dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
    stats: Stats,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        dec(&self.stats.counters().stream_connections);
    }
}

/// What the per-address connection limit counts by: the IPv4 address, or
/// the IPv6 /64 (one host usually has a whole /64).
pub(crate) fn per_ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
    }
}

/// Limits on stream connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

/// Accepts connections on `listener` (TLS when `tls` is set) until aborted;
/// dropping this future ends every connection it started.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsConfig>,
    events: mpsc::Sender<StreamEvent>,
    limits: StreamLimits,
    counts: Arc<Mutex<Counts>>,
    stats: Stats,
) {
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.0));
    let kind = if acceptor.is_some() { "tls" } else { "tcp" };
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "TURN over {kind} listening");
    }
    let mut conns = JoinSet::new();
    let mut errors = 0u32;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, from) = match accepted {
            Ok(a) => {
                errors = 0;
                a
            }
            Err(e) => {
                // Out of descriptors, mostly: back off instead of spinning.
                errors += 1;
                if errors == 1 || errors.is_power_of_two() {
                    warn!("TURN {kind} accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let ip = per_ip_key(from.ip());
        let slot = {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            let on_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
            if c.total >= limits.max_connections || on_ip >= limits.max_connections_per_ip {
                drop(c);
                inc(&stats.counters().stream_refused);
                debug!(%from, "TURN {kind} connection refused: connection limit reached");
                continue; // dropping `stream` closes it
            }
            c.total += 1;
            *c.per_ip.entry(ip).or_default() += 1;
            inc(&stats.counters().stream_connections);
            Slot { counts: Arc::clone(&counts), ip, stats: stats.clone() }
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        let acceptor = acceptor.clone();
        let stats = stats.clone();
        conns.spawn(async move {
            let _slot = slot;
            match acceptor {
                None => connection(stream, from, false, events, stats).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(tls, from, true, events, stats).await,
                        Ok(Err(e)) => {
                            inc(&stats.counters().tls_handshakes_failed);
                            debug!(%from, "TURN TLS handshake failed: {e}");
                        }
                        Err(_) => {
                            inc(&stats.counters().tls_handshakes_failed);
                            debug!(%from, "TURN TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

/// Reads and writes one connection until either side ends it.
async fn connection<S>(
    stream: S,
    client: SocketAddr,
    tls: bool,
    events: mpsc::Sender<StreamEvent>,
    stats: Stats,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE_MESSAGES);
    let queued = Arc::new(AtomicUsize::new(0));
    let conn = StreamConn { tx, queued: Arc::clone(&queued), tls };
    let mut framer = StreamFramer::new();
    let mut buf = vec![0u8; READ_CHUNK];

    // The first message must arrive in time (TLS was timed by the caller).
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut framer, &mut buf)).await;
    let first = match first {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                inc(&stats.counters().stream_framing_errors);
            }
            debug!(%client, "TURN stream closed: {e}");
            return;
        }
        Err(_) => {
            debug!(%client, "TURN stream closed: no message within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    if events.send(StreamEvent::Open { client, conn }).await.is_err()
        || events.send(StreamEvent::Frame { client, data: first }).await.is_err()
    {
        return;
    }
    let reader = async {
        loop {
            match read_frame(&mut rd, &mut framer, &mut buf).await {
                Ok(Some(data)) => {
                    if events.send(StreamEvent::Frame { client, data }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    inc(&stats.counters().stream_framing_errors);
                    debug!(%client, "TURN stream closed: {e}");
                    return;
                }
            }
        }
    };
    let writer = async {
        // Ends when the server task drops the connection's sender.
        while let Some(data) = rx.recv().await {
            let len = data.len();
            let r = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&data)).await;
            queued.fetch_sub(len, Ordering::Relaxed);
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    trace!(%client, "TURN stream write: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%client, "TURN stream closed: the client took nothing for {WRITE_TIMEOUT:?}");
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
    let _ = events.send(StreamEvent::Closed { client }).await;
}

/// The next message from the stream; `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    framer: &mut StreamFramer,
    buf: &mut [u8],
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        match framer.next_frame() {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        debug_assert!(framer.buffered() <= MAX_FRAME + buf.len());
        let n = rd.read(buf).await?;
        if n == 0 {
            return Ok(None);
        }
        framer.push(&buf[..n]);
    }
}
