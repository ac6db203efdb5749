//! Admission of TCP connections: caps on how many are open (in total and
//! per source address), and a deadline for each HTTP request, so that
//! half-sent requests (slowloris) cannot hold the server's sockets.
//!
//! axum's `serve` reads request headers without a timer and accepts every
//! connection; [`Guarded`] is the listener it is given instead. Each
//! accepted connection holds a slot until it closes. Until the connection
//! is upgraded to a WebSocket, a read that is still waiting when the
//! request deadline passes fails, and hyper closes the connection: the
//! deadline starts at accept and again with every request, so it also
//! bounds how long an idle keep-alive connection stays open.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// What a refused connection is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\
Content-Length: 48\r\nConnection: close\r\n\r\ntoo many connections: try again in a few seconds";

/// How long a refused connection is kept to read what its client sent
/// after the refusal: closing a socket with unread data makes the kernel
/// answer with a reset, and the client would see "connection reset"
/// instead of the 503 (a lingering close, as nginx does).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Refused connections lingering at once; more are closed at once.
const MAX_LINGERING: usize = 256;

/// What a lingering refusal reads at most before it gives up.
const LINGER_BYTES: usize = 64 * 1024;

/// The caps and the deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub total: usize,
    pub per_ip: usize,
    pub request_timeout: Duration,
}

/// Open connections, and what was refused or cut, shared with `/healthz`.
#[derive(Debug)]
pub(crate) struct Admission {
    caps: Caps,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    timed_out: AtomicU64,
    lingering: AtomicUsize,
}

/// Counters for `/healthz`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmissionStats {
    /// TCP connections open now (WebSocket or plain HTTP).
    pub open: usize,
    /// Connections refused over a cap since the start.
    pub refused: u64,
    /// Connections closed because a request did not arrive in time.
    pub timed_out: u64,
}

impl Admission {
    pub(crate) fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            lingering: AtomicUsize::new(0),
        })
    }

    pub(crate) fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }

    /// A slot for a connection from `ip`, or `None` over a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut per_ip = self.per_ip.lock().expect("admission lock");
        let mine = per_ip.get(&ip).copied().unwrap_or(0);
        if self.open.load(Ordering::Relaxed) >= self.caps.total || mine >= self.caps.per_ip {
            return None;
        }
        per_ip.insert(ip, mine + 1);
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot { admission: self.clone(), ip })
    }
}

/// One admitted connection's place under the caps, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().expect("admission lock");
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's request deadline, moved by each request and lifted by
/// the WebSocket upgrade.
#[derive(Debug)]
pub(crate) struct Deadline {
    start: Instant,
    timeout: Duration,
    /// Milliseconds after `start` at which a waiting read fails.
    at_ms: AtomicU64,
    upgraded: AtomicBool,
    /// Requests being answered.
    answering: AtomicUsize,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Deadline {
            start: Instant::now(),
            timeout,
            at_ms: AtomicU64::new(timeout.as_millis() as u64),
            upgraded: AtomicBool::new(false),
            answering: AtomicUsize::new(0),
        }
    }

    /// A request arrived: no deadline while it is answered (hyper keeps
    /// reading the socket for a close meanwhile, and a slow reader of a
    /// response must not be cut off).
    pub(crate) fn request_started(&self) {
        self.answering.fetch_add(1, Ordering::Relaxed);
    }

    /// The response was written (or dropped): the next request has a full
    /// timeout from now.
    pub(crate) fn request_finished(&self) {
        let at = (self.start.elapsed() + self.timeout).as_millis() as u64;
        self.at_ms.store(at, Ordering::Relaxed);
        self.answering.fetch_sub(1, Ordering::Relaxed);
    }

    /// The connection became a WebSocket, which has its own idle timeout.
    pub(crate) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    fn at(&self) -> Option<Instant> {
        (!self.upgraded.load(Ordering::Relaxed) && self.answering.load(Ordering::Relaxed) == 0)
            .then(|| self.start + Duration::from_millis(self.at_ms.load(Ordering::Relaxed)))
    }
}

/// A response body that gives its connection a fresh request deadline
/// when it is done (written to the end, or dropped).
pub(crate) struct Answering<B> {
    pub inner: B,
    pub deadline: Arc<Deadline>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Answering<B> {
    fn drop(&mut self) {
        self.deadline.request_finished();
    }
}

/// The listener `serve` hands to axum.
pub(crate) struct Guarded {
    pub listener: TcpListener,
    pub admission: Arc<Admission>,
}

impl Listener for Guarded {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or another per-connection
                    // error): wait a little instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.admission.admit(addr.ip()) else {
                self.admission.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "connection refused: over the connection caps");
                refuse(tcp, &self.admission);
                continue;
            };
            // Signaling is small request/response frames: no Nagle delays.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
            let deadline = Arc::new(Deadline::new(self.admission.caps.request_timeout));
            return (
                GuardedIo { tcp, _slot: slot, deadline, sleep: None, admission: self.admission.clone() },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Answers a connection over the caps with a 503 and closes it; what the
/// client sent meanwhile is read and dropped for a little while first, so
/// that the close does not turn into a reset that hides the answer.
fn refuse(tcp: TcpStream, admission: &Arc<Admission>) {
    // A fresh socket's send buffer is empty: this never blocks.
    let _ = tcp.try_write(REFUSAL);
    if admission.lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        admission.lingering.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let admission = admission.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tcp;
        // The answer is all there is: a FIN after it.
        let _ = tcp.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            while read < LINGER_BYTES {
                match tcp.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        })
        .await;
        admission.lingering.fetch_sub(1, Ordering::Relaxed);
    });
}

/// An admitted connection: reads fail once its request deadline passes.
pub(crate) struct GuardedIo {
    tcp: TcpStream,
    _slot: Slot,
    deadline: Arc<Deadline>,
    /// The request deadline's timer, made when a read first waits and
    /// dropped once the connection is a WebSocket: idle WebSockets carry
    /// none.
    sleep: Option<Pin<Box<Sleep>>>,
    admission: Arc<Admission>,
}

impl GuardedIo {
    /// The socket, and its place under the caps (held until dropped), for
    /// a connection that became a WebSocket.
    pub(crate) fn into_parts(self) -> (TcpStream, Slot) {
        (self.tcp, self._slot)
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(at) = this.deadline.at() else {
            this.sleep = None;
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        // Data already waiting needs no timer.
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            this.admission.timed_out.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request in time",
            )));
        }
        Poll::Pending
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// What handlers learn about their connection (axum's connect info).
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The connection's request deadline.
    pub deadline: Arc<Deadline>,
}

impl Connected<IncomingStream<'_, Guarded>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Guarded>) -> Self {
        Peer { addr: *stream.remote_addr(), deadline: stream.io().deadline.clone() }
    }
}
