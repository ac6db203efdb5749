//! The room's UDP sockets with batched I/O (`quinn-udp`).
//!
//! A bulk channel moves about 900 datagrams per megabyte, and a trip
//! through the kernel per datagram was most of a transfer's cost. So:
//! - consecutive datagrams of one size from one socket to one address leave
//!   in one `sendmsg` with UDP GSO (the kernel cuts them; a kernel that
//!   cannot is detected by `quinn-udp` and the batch goes one by one);
//! - receiving asks for several datagrams per call (`recvmmsg`), and with
//!   UDP GRO the kernel hands over a run of same-sized datagrams from one
//!   sender as one buffer, cut here at its stride.
//!
//! Sockets get `quinn-udp`'s options: no IP fragmentation (our datagrams
//! fit the path MTU; str0m keeps them under 1,200 bytes), destination
//! address and ECN reporting (unused).

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams read per receive call, at most (one buffer each).
const RECV_BUFS: usize = 4;
/// Largest datagram we expect from a peer; a GRO buffer holds
/// `gro_segments` of them.
const MAX_DATAGRAM: usize = 1500;
/// Most bytes in one GSO send (the kernel's limit is a 64 KiB UDP datagram).
const MAX_BATCH_BYTES: usize = 60 * 1024;

/// One socket and what `quinn-udp` knows of it.
#[derive(Debug)]
struct Socket {
    io: UdpSocket,
    state: UdpSocketState,
}

/// The datagrams being gathered for one send.
#[derive(Debug, Default)]
struct Batch {
    socket: usize,
    to: Option<SocketAddr>,
    /// Size of every datagram but the last, which may be shorter (and then
    /// ends the batch).
    segment: usize,
    count: usize,
    data: Vec<u8>,
}

/// The room's sockets: batched sends, batched receives.
#[derive(Debug)]
pub(crate) struct Udp {
    sockets: Vec<Socket>,
    batch: Batch,
    /// How long a send waits for a full socket buffer before the datagrams
    /// are dropped (SCTP retransmits them).
    send_wait: Duration,
}

/// Where received datagrams land: a few buffers, each one datagram or a
/// GRO run of them.
#[derive(Debug)]
pub(crate) struct RecvBufs {
    /// `RECV_BUFS` buffers of `len` bytes, end to end.
    data: Vec<u8>,
    len: usize,
    meta: [RecvMeta; RECV_BUFS],
}

/// What one receive call brought: `count` buffers of `socket`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub socket: usize,
    pub count: usize,
}

impl RecvBufs {
    /// The datagrams of a [`Received`], in arrival order, with their source.
    pub fn datagrams(&self, got: Received) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.data.chunks(self.len).zip(&self.meta).take(got.count).flat_map(|(buf, meta)| {
            let stride = meta.stride.max(1);
            buf[..meta.len].chunks(stride).map(move |d| (meta.addr, d))
        })
    }
}

impl Udp {
    pub fn new(sockets: Vec<UdpSocket>, send_wait: Duration) -> std::io::Result<Self> {
        let sockets = sockets
            .into_iter()
            .map(|io| {
                let state = UdpSocketState::new(UdpSockRef::from(&io))?;
                Ok(Socket { io, state })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Udp { sockets, batch: Batch::default(), send_wait })
    }

    /// Receive buffers sized for these sockets.
    pub fn recv_bufs(&self) -> RecvBufs {
        let gro = self.sockets.iter().map(|s| s.state.gro_segments()).max().unwrap_or(1);
        let len = (gro * MAX_DATAGRAM).max(u16::MAX as usize);
        RecvBufs { data: vec![0; len * RECV_BUFS], len, meta: [RecvMeta::default(); RECV_BUFS] }
    }

    /// Receives from whichever socket has datagrams.
    pub fn poll_recv(&self, cx: &mut Context<'_>, into: &mut RecvBufs) -> Poll<std::io::Result<Received>> {
        for (i, s) in self.sockets.iter().enumerate() {
            loop {
                if s.io.poll_recv_ready(cx).is_pending() {
                    break;
                }
                match recv(s, into) {
                    Ok(count) => return Poll::Ready(Ok(Received { socket: i, count })),
                    // Readiness was stale: poll again, which registers us.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Poll::Pending
    }

    /// Receives from `socket` if it has datagrams now.
    pub fn try_recv(&self, socket: usize, into: &mut RecvBufs) -> Option<Received> {
        let count = recv(&self.sockets[socket], into).ok()?;
        Some(Received { socket, count })
    }

    /// Queues a datagram; whatever it cannot join is sent first.
    pub async fn send(&mut self, socket: usize, to: SocketAddr, data: &[u8]) {
        let b = &self.batch;
        let joins = b.count > 0
            && b.socket == socket
            && b.to == Some(to)
            && data.len() <= b.segment
            // A shorter datagram ended the batch.
            && b.data.len() == b.segment * b.count
            && b.data.len() + data.len() <= MAX_BATCH_BYTES
            && b.count < self.sockets[socket].state.max_gso_segments();
        if !joins {
            self.flush().await;
            self.batch.socket = socket;
            self.batch.to = Some(to);
            self.batch.segment = data.len();
        }
        self.batch.data.extend_from_slice(data);
        self.batch.count += 1;
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) {
        if self.batch.count == 0 {
            return;
        }
        let Some(to) = self.batch.to else { return };
        let s = &self.sockets[self.batch.socket];
        let segment = (self.batch.count > 1).then_some(self.batch.segment);
        let sent = send_waiting(s, to, &self.batch.data, segment, self.send_wait).await;
        if let Err(e) = sent
            && segment.is_some()
            && s.state.max_gso_segments() == 1
        {
            // This path cannot do GSO (quinn-udp noticed and turned it
            // off): the same datagrams one by one.
            tracing::debug!("udp send without segmentation offload after: {e}");
            for d in self.batch.data.chunks(self.batch.segment) {
                let _ = send_waiting(s, to, d, None, self.send_wait).await;
            }
        }
        self.batch.count = 0;
        self.batch.data.clear();
    }
}

fn recv(s: &Socket, into: &mut RecvBufs) -> std::io::Result<usize> {
    let mut bufs = into.data.chunks_mut(into.len);
    let mut slices: [IoSliceMut<'_>; RECV_BUFS] =
        std::array::from_fn(|_| IoSliceMut::new(bufs.next().expect("RECV_BUFS buffers")));
    s.io.try_io(Interest::READABLE, || s.state.recv(UdpSockRef::from(&s.io), &mut slices, &mut into.meta))
}

/// One send, waiting up to `wait` for room in the socket buffer. Errors
/// other than a full buffer are the network's (unreachable, no route) and
/// only logged: SCTP retransmits.
async fn send_waiting(
    s: &Socket,
    to: SocketAddr,
    contents: &[u8],
    segment_size: Option<usize>,
    wait: Duration,
) -> std::io::Result<()> {
    let transmit = Transmit { destination: to, ecn: None, contents, segment_size, src_ip: None };
    let attempt = || s.io.try_io(Interest::WRITABLE, || s.state.try_send(UdpSockRef::from(&s.io), &transmit));
    let result = match attempt() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let retry = async {
                loop {
                    s.io.writable().await?;
                    match attempt() {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        other => return other,
                    }
                }
            };
            match tokio::time::timeout(wait, retry).await {
                Ok(r) => r,
                Err(_) => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
        other => other,
    };
    if let Err(e) = &result {
        tracing::trace!(%to, "udp send: {e}");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Everything `rx` receives within a short while, as (source, datagram).
    async fn drain(rx: &Udp, bufs: &mut RecvBufs, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            let r = tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| rx.poll_recv(cx, bufs)))
                .await
                .expect("datagrams within 5 s")
                .unwrap();
            got.extend(bufs.datagrams(r).map(|(from, d)| (from, d.to_vec())));
        }
        got
    }

    fn datagram(len: usize, tag: u8) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    #[tokio::test]
    async fn batched_datagrams_arrive_whole_and_in_order() {
        let (a, b, c) = (socket().await, socket().await, socket().await);
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let from = a.local_addr().unwrap();
        let mut tx = Udp::new(vec![a], Duration::from_millis(100)).unwrap();
        let rx_b = Udp::new(vec![b], Duration::from_millis(100)).unwrap();
        let rx_c = Udp::new(vec![c], Duration::from_millis(100)).unwrap();
        // A run of equal datagrams, a shorter one (ends the run), a longer
        // one, another address in between, more than a batch holds.
        let mut sent_b = Vec::new();
        let mut sent_c = Vec::new();
        for i in 0..120u8 {
            let len = match i {
                40 => 700,
                41 => 1300,
                _ => 1200,
            };
            let d = datagram(len, i);
            if i % 50 == 7 {
                tx.send(0, to_c, &d).await;
                sent_c.push(d);
            } else {
                tx.send(0, to_b, &d).await;
                sent_b.push(d);
            }
        }
        tx.flush().await;
        let (mut bufs_b, mut bufs_c) = (rx_b.recv_bufs(), rx_c.recv_bufs());
        let got_b = drain(&rx_b, &mut bufs_b, sent_b.len()).await;
        let got_c = drain(&rx_c, &mut bufs_c, sent_c.len()).await;
        assert!(got_b.iter().chain(&got_c).all(|(f, _)| *f == from));
        assert_eq!(got_b.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), sent_b);
        assert_eq!(got_c.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), sent_c);
    }
}
