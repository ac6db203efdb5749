//! TURN over TCP and TLS for the driver: one task per connection to a TURN
//! server, which frames what it reads into STUN and ChannelData messages
//! ([`StreamFramer`]) for the gatherer and writes what the gatherer sends,
//! ChannelData padded as RFC 8656 §12.5 asks.
//!
//! Bounds: connecting and the TLS handshake each get [`CONNECT_TIMEOUT`];
//! each connection queues at most [`WRITE_QUEUE_BYTES`] for writing and
//! drops what does not fit (as UDP would; SCTP and ICE retransmit); frames
//! for the driver wait in a bounded channel, so a driver that falls behind
//! slows the reading instead of growing a queue.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use peerlink_proto::turn_stream::{StreamFramer, stream_padding};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Connecting, and then the TLS handshake, each within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes queued for writing to one TURN server.
const WRITE_QUEUE_BYTES: usize = 512 * 1024;
const WRITE_QUEUE_MESSAGES: usize = 1024;
/// Frames from all streams waiting for the driver.
const EVENT_QUEUE: usize = 256;
const READ_CHUNK: usize = 16 * 1024;

/// What a stream task tells the driver.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    Connected {
        stream: usize,
        local: SocketAddr,
    },
    Frame {
        stream: usize,
        data: Vec<u8>,
    },
    /// Did not connect, or ended.
    Failed {
        stream: usize,
        why: String,
    },
}

struct Handle {
    tx: mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// The driver's TURN streams.
pub(crate) struct Streams {
    handles: HashMap<usize, Handle>,
    events_tx: mpsc::Sender<StreamEvent>,
    pub events: mpsc::Receiver<StreamEvent>,
    tasks: JoinSet<()>,
    /// PEM certificates trusted for `turns:` besides the system's.
    extra_ca: Option<Vec<u8>>,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").field("open", &self.handles.len()).finish()
    }
}

impl Streams {
    pub fn new(extra_ca: Option<Vec<u8>>) -> Self {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        Streams {
            handles: HashMap::new(),
            events_tx,
            events,
            tasks: JoinSet::new(),
            extra_ca,
            tls: OnceLock::new(),
        }
    }

    /// The client TLS settings: the system's roots plus the extra CAs, built
    /// on first use.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if let Some(pem) = &self.extra_ca {
                    for cert in CertificateDer::pem_slice_iter(pem) {
                        let cert = cert.map_err(|e| format!("unreadable CA certificate: {e}"))?;
                        roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
                    }
                }
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Arc::new(config))
            })
            .clone()
    }

    /// Starts connecting stream `stream` from `from` to `server`.
    pub fn connect(&mut self, stream: usize, from: IpAddr, server: SocketAddr, tls_name: Option<String>) {
        let events = self.events_tx.clone();
        let tls = match tls_name {
            None => None,
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|_| format!("{name:?} is not a valid TLS server name"));
                match name.and_then(|n| self.tls_config().map(|c| (c, n))) {
                    Ok(t) => Some(t),
                    Err(why) => {
                        // Reported like any failure, from the task, so the
                        // driver sees it on its usual path.
                        self.tasks.spawn(async move {
                            let _ = events.send(StreamEvent::Failed { stream, why }).await;
                        });
                        return;
                    }
                }
            }
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MESSAGES);
        let queued = Arc::new(AtomicUsize::new(0));
        self.handles.insert(stream, Handle { tx, queued: Arc::clone(&queued) });
        self.tasks.spawn(run(stream, from, server, tls, rx, queued, events));
    }

    /// Queues one message; dropped when the queue is full.
    pub fn send(&mut self, stream: usize, frame: &[u8]) {
        let Some(h) = self.handles.get(&stream) else { return };
        let len = frame.len() + stream_padding(frame);
        if h.queued.load(Ordering::Relaxed) + len > WRITE_QUEUE_BYTES {
            tracing::trace!(stream, "TURN stream write queue full: message dropped");
            return;
        }
        let mut data = Vec::with_capacity(len);
        data.extend_from_slice(frame);
        data.resize(len, 0);
        if h.tx.try_send(data).is_ok() {
            h.queued.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Closes stream `stream` after what is queued.
    pub fn close(&mut self, stream: usize) {
        self.handles.remove(&stream);
    }

    /// Stream `stream` reported its end.
    pub fn ended(&mut self, stream: usize) {
        self.handles.remove(&stream);
        while self.tasks.try_join_next().is_some() {}
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn open(
    from: IpAddr,
    server: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
) -> Result<(Box<dyn Io>, SocketAddr), String> {
    let socket = if server.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(server)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("TCP connect: {e}")),
        Err(_) => return Err(format!("TCP connect: no answer within {CONNECT_TIMEOUT:?}")),
    };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let Some((config, name)) = tls else { return Ok((Box::new(tcp), local)) };
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok((Box::new(tls), local)),
        Ok(Err(e)) => Err(format!("TLS: {e}")),
        Err(_) => Err(format!("TLS handshake not done within {CONNECT_TIMEOUT:?}")),
    }
}

async fn run(
    stream: usize,
    from: IpAddr,
    server: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    events: mpsc::Sender<StreamEvent>,
) {
    let (io, local) = match open(from, server, tls).await {
        Ok(x) => x,
        Err(why) => {
            let _ = events.send(StreamEvent::Failed { stream, why }).await;
            return;
        }
    };
    if events.send(StreamEvent::Connected { stream, local }).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut framer = StreamFramer::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            loop {
                match framer.next_frame() {
                    Ok(Some(data)) => {
                        if events.send(StreamEvent::Frame { stream, data }).await.is_err() {
                            return "room closed".to_string();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("the server sent {e}"),
                }
            }
            match rd.read(&mut buf).await {
                Ok(0) => return "the server closed the connection".to_string(),
                Ok(n) => framer.push(&buf[..n]),
                Err(e) => return format!("read: {e}"),
            }
        }
    };
    let writer = async {
        while let Some(data) = rx.recv().await {
            let len = data.len();
            let r = wr.write_all(&data).await;
            queued.fetch_sub(len, Ordering::Relaxed);
            if let Err(e) = r {
                return Some(format!("write: {e}"));
            }
        }
        // Closed by the room: say goodbye properly.
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, wr.shutdown()).await;
        None
    };
    let why = tokio::select! {
        why = reader => Some(why),
        why = writer => why,
    };
    if let Some(why) = why {
        let _ = events.send(StreamEvent::Failed { stream, why }).await;
    }
}
