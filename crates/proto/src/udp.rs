//! A UDP socket with batched I/O (`quinn-udp`), for the native peer's
//! driver and the embedded TURN server.
//!
//! A bulk channel moves about 900 datagrams per megabyte, and a trip
//! through the kernel per datagram was most of its cost. So:
//! - a [`GsoBatch`](crate::gso::GsoBatch) of datagrams leaves in one
//!   `sendmsg` with UDP GSO (the kernel cuts it; where it cannot,
//!   `quinn-udp` notices, [`UdpIo::max_gso_segments`] drops to 1, and the
//!   caller sends one by one);
//! - receiving asks for several datagrams per call (`recvmmsg`), and with
//!   UDP GRO the kernel hands over a run of same-sized datagrams from one
//!   sender as one buffer, cut by [`RecvBufs::datagrams`] at its stride.
//!
//! Sockets get `quinn-udp`'s options: no IP fragmentation (peerlink's
//! datagrams fit the path MTU: str0m keeps them under 1,200 bytes),
//! destination address and ECN reporting (unused).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest datagram expected from a peer or client on a batched path; a
/// receive buffer holds a GRO run of them.
const MAX_DATAGRAM: usize = 1500;
/// Most buffers one receive call fills.
pub const MAX_RECV_BUFS: usize = 8;

/// One UDP socket and what `quinn-udp` knows of it.
#[derive(Debug)]
pub struct UdpIo {
    io: UdpSocket,
    state: UdpSocketState,
}

/// Where received datagrams land: a few buffers, each one datagram or a
/// GRO run of them.
#[derive(Debug)]
pub struct RecvBufs {
    /// `meta.len()` buffers of `len` bytes, end to end.
    data: Vec<u8>,
    len: usize,
    meta: Vec<RecvMeta>,
}

impl RecvBufs {
    /// `count` buffers (at most [`MAX_RECV_BUFS`]), each large enough for
    /// the GRO runs of `socket` (and for any single datagram).
    pub fn new(count: usize, socket: &UdpIo) -> Self {
        Self::with_len(count, socket.recv_buf_len())
    }

    /// `count` buffers of `len` bytes.
    pub fn with_len(count: usize, len: usize) -> Self {
        let count = count.clamp(1, MAX_RECV_BUFS);
        RecvBufs { data: vec![0; len * count], len, meta: vec![RecvMeta::default(); count] }
    }

    /// The datagrams the receive call that returned `count` brought, in
    /// arrival order, with their source.
    pub fn datagrams(&self, count: usize) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.data.chunks(self.len).zip(&self.meta).take(count).flat_map(|(buf, meta)| {
            let stride = meta.stride.max(1);
            buf[..meta.len].chunks(stride).map(move |d| (meta.addr, d))
        })
    }
}

/// Socket buffer the kernel is asked for in each direction. SCTP does not
/// pace: a bulk sender outruns the receiving side in bursts, and what the
/// default buffer (about 200 KiB, 2 ms at 100 MB/s) cannot absorb is lost,
/// each loss a congestion back-off. A relay is on that path twice. The
/// kernel caps it at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

impl UdpIo {
    /// Sets the socket up for batched I/O, with [`SOCKET_BUFFER`]-sized
    /// kernel buffers (best effort: a smaller buffer only costs throughput).
    pub fn new(io: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&io))?;
        if let Err(e) = state.set_recv_buffer_size(UdpSockRef::from(&io), SOCKET_BUFFER) {
            tracing::debug!("SO_RCVBUF: {e}");
        }
        if let Err(e) = state.set_send_buffer_size(UdpSockRef::from(&io), SOCKET_BUFFER) {
            tracing::debug!("SO_SNDBUF: {e}");
        }
        Ok(UdpIo { io, state })
    }

    /// The socket itself.
    pub fn socket(&self) -> &UdpSocket {
        &self.io
    }

    /// Bytes a receive buffer needs for this socket's GRO runs (and for any
    /// single datagram).
    pub fn recv_buf_len(&self) -> usize {
        (self.state.gro_segments() * MAX_DATAGRAM).max(u16::MAX as usize)
    }

    /// Most datagrams one send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Receives what is there now: the number of buffers filled, or
    /// `WouldBlock`.
    pub fn try_recv(&self, into: &mut RecvBufs) -> io::Result<usize> {
        let n = into.meta.len();
        let mut chunks = into.data.chunks_mut(into.len);
        let mut bufs: [IoSliceMut<'_>; MAX_RECV_BUFS] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        self.io.try_io(Interest::READABLE, || {
            self.state.recv(UdpSockRef::from(&self.io), &mut bufs[..n], &mut into.meta)
        })
    }

    /// Receives, registering for a wake-up when nothing is there.
    pub fn poll_recv(&self, cx: &mut Context<'_>, into: &mut RecvBufs) -> Poll<io::Result<usize>> {
        loop {
            if let Poll::Ready(Err(e)) = self.io.poll_recv_ready(cx) {
                return Poll::Ready(Err(e));
            }
            match self.try_recv(into) {
                // Readiness was stale: poll again, which registers us.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.io.poll_recv_ready(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Sends `contents` to `to` now: one datagram, or datagrams of
    /// `segment` bytes end to end (the last may be shorter). A full socket
    /// buffer is `WouldBlock`.
    pub fn try_send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let transmit = Transmit { destination: to, ecn: None, contents, segment_size: segment, src_ip: None };
        self.io.try_io(Interest::WRITABLE, || self.state.try_send(UdpSockRef::from(&self.io), &transmit))
    }

    /// [`try_send`](Self::try_send), waiting up to `wait` for room in the
    /// socket buffer.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
        wait: Duration,
    ) -> io::Result<()> {
        match self.try_send(to, contents, segment) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
        let retry = async {
            loop {
                self.io.writable().await?;
                match self.try_send(to, contents, segment) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        };
        tokio::time::timeout(wait, retry).await.unwrap_or_else(|_| Err(io::ErrorKind::WouldBlock.into()))
    }

    /// Sends a batch now, datagram by datagram when the batch needed GSO
    /// and the path turned out not to support it; a full socket buffer
    /// drops it (as the network would). Returns how many datagrams were not
    /// sent.
    pub fn try_send_batch(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> usize {
        let Err(e) = self.try_send(to, contents, segment) else { return 0 };
        tracing::trace!(%to, "udp send: {e}");
        let Some(segment) = segment else { return 1 };
        if self.max_gso_segments() > 1 || e.kind() == io::ErrorKind::WouldBlock {
            return contents.len().div_ceil(segment);
        }
        tracing::debug!("udp send without segmentation offload after: {e}");
        contents.chunks(segment).filter(|d| self.try_send(to, d, None).is_err()).count()
    }

    /// Sends a batch, datagram by datagram when the batch needed GSO and
    /// the path turned out not to support it. Returns how many datagrams
    /// were not sent.
    pub async fn send_batch(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
        wait: Duration,
    ) -> usize {
        let Err(e) = self.send(to, contents, segment, wait).await else { return 0 };
        tracing::trace!(%to, "udp send: {e}");
        let Some(segment) = segment else { return 1 };
        if self.max_gso_segments() > 1 {
            return contents.len().div_ceil(segment);
        }
        tracing::debug!("udp send without segmentation offload after: {e}");
        let mut lost = 0;
        for d in contents.chunks(segment) {
            if self.send(to, d, None, wait).await.is_err() {
                lost += 1;
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso::GsoBatch;

    async fn socket() -> UdpIo {
        UdpIo::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap()
    }

    /// Everything `rx` receives until `want` datagrams are in.
    async fn drain(rx: &UdpIo, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut bufs = RecvBufs::new(4, rx);
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            let n = tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| rx.poll_recv(cx, &mut bufs)))
                .await
                .expect("datagrams within 5 s")
                .unwrap();
            got.extend(bufs.datagrams(n).map(|(from, d)| (from, d.to_vec())));
        }
        got
    }

    fn datagram(len: usize, tag: u8) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    /// A burst of 3,000 datagrams of 1,200 bytes (3.6 MB, what a bulk
    /// sender's congestion window can put on the wire at once) sent before
    /// the receiver reads anything all arrive (with the default buffer of
    /// about 200 KiB most are dropped).
    #[tokio::test]
    async fn a_burst_the_default_buffer_cannot_hold_is_not_lost() {
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if rmem_max < SOCKET_BUFFER {
            panic!("net.core.rmem_max is {rmem_max}: this test needs at least {SOCKET_BUFFER}");
        }
        let (tx, rx) = (socket().await, socket().await);
        let to = rx.socket().local_addr().unwrap();
        let count = 3000;
        for i in 0..count {
            let d = datagram(1200, i as u8);
            tx.socket().send_to(&d, to).await.unwrap();
        }
        let got = drain(&rx, count).await;
        assert_eq!(got.len(), count);
        assert!(got.iter().enumerate().all(|(i, (_, d))| *d == datagram(1200, i as u8)));
    }

    #[tokio::test]
    async fn batched_datagrams_arrive_whole_and_in_order() {
        let (tx, b, c) = (socket().await, socket().await, socket().await);
        let (to_b, to_c) = (b.socket().local_addr().unwrap(), c.socket().local_addr().unwrap());
        let from = tx.socket().local_addr().unwrap();
        // A run of equal datagrams, a shorter one (ends the run), a longer
        // one, another address in between, more than a batch holds.
        let (mut sent_b, mut sent_c) = (Vec::new(), Vec::new());
        let mut batch = GsoBatch::default();
        let wait = Duration::from_millis(100);
        for i in 0..120u8 {
            let d = datagram(
                match i {
                    40 => 700,
                    41 => 1300,
                    _ => 1200,
                },
                i,
            );
            let to = if i % 50 == 7 { to_c } else { to_b };
            if !batch.fits(to, d.len(), tx.max_gso_segments()) {
                let (to, data, segment) = batch.pending().unwrap();
                assert_eq!(tx.send_batch(to, data, segment, wait).await, 0);
                batch.clear();
            }
            batch.push(to, &d);
            if to == to_c { sent_c.push(d) } else { sent_b.push(d) }
        }
        let (to, data, segment) = batch.pending().unwrap();
        assert_eq!(tx.send_batch(to, data, segment, wait).await, 0);
        let got_b = drain(&b, sent_b.len()).await;
        let got_c = drain(&c, sent_c.len()).await;
        assert!(got_b.iter().chain(&got_c).all(|(f, _)| *f == from));
        assert_eq!(got_b.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), sent_b);
        assert_eq!(got_c.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), sent_c);
    }
}
