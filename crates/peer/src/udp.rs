//! The room's UDP sockets: datagrams gathered into GSO batches, received
//! several at a time ([`peerlink_proto::udp`] says how).

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use peerlink_proto::gso::GsoBatch;
use peerlink_proto::udp::{RecvBufs, UdpIo};
use tokio::net::UdpSocket;

/// Buffers per receive call (each one datagram, or a GRO run of them).
const RECV_BUFS: usize = 4;

/// The room's sockets: batched sends, batched receives.
#[derive(Debug)]
pub(crate) struct Udp {
    sockets: Vec<UdpIo>,
    /// The datagrams being gathered for one send, by socket and destination.
    batch: GsoBatch<(usize, SocketAddr)>,
    /// How long a send waits for a full socket buffer before the datagrams
    /// are dropped (SCTP retransmits them).
    send_wait: Duration,
}

/// What one receive call brought: `count` buffers of `socket`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub socket: usize,
    pub count: usize,
}

impl Udp {
    pub fn new(sockets: Vec<UdpSocket>, send_wait: Duration) -> std::io::Result<Self> {
        let sockets = sockets.into_iter().map(UdpIo::new).collect::<std::io::Result<Vec<_>>>()?;
        Ok(Udp { sockets, batch: GsoBatch::default(), send_wait })
    }

    /// Receive buffers sized for these sockets.
    pub fn recv_bufs(&self) -> RecvBufs {
        let len = self.sockets.iter().map(UdpIo::recv_buf_len).max().unwrap_or(u16::MAX as usize);
        RecvBufs::with_len(RECV_BUFS, len)
    }

    /// Receives from whichever socket has datagrams.
    pub fn poll_recv(&self, cx: &mut Context<'_>, into: &mut RecvBufs) -> Poll<std::io::Result<Received>> {
        for (socket, s) in self.sockets.iter().enumerate() {
            if let Poll::Ready(r) = s.poll_recv(cx, into) {
                return Poll::Ready(r.map(|count| Received { socket, count }));
            }
        }
        Poll::Pending
    }

    /// Receives from `socket` if it has datagrams now. `None` also for a
    /// receive error: a UDP socket's errors are a peer's ICMP reports,
    /// given once and cleared, and the readiness wait reports them again
    /// if they persist; the caller just stops draining for this turn.
    pub fn try_recv(&self, socket: usize, into: &mut RecvBufs) -> Option<Received> {
        let count = self.sockets[socket].try_recv(into).ok()?;
        Some(Received { socket, count })
    }

    /// Queues a datagram; the batch it cannot join is sent first.
    pub async fn send(&mut self, socket: usize, to: SocketAddr, data: &[u8]) {
        if !self.batch.fits((socket, to), data.len(), self.sockets[socket].max_gso_segments()) {
            self.flush().await;
        }
        self.batch.push((socket, to), data);
    }

    /// Sends what is queued. What the network refuses is only logged: SCTP
    /// retransmits.
    pub async fn flush(&mut self) {
        if let Some(((socket, to), data, segment)) = self.batch.pending() {
            self.sockets[socket].send_batch(to, data, segment, self.send_wait).await;
        }
        self.batch.clear();
    }
}
