//! Relay sockets: binding them in the port range and reading them.
//!
//! Each relay socket has one receive task that forwards datagrams into the
//! server task over a bounded queue shared by all relays. When the queue is
//! full the datagram is dropped, as UDP would drop it; the server task never
//! waits on a relay.
//!
//! A relay socket receives GRO runs (a peer sending with GSO), so one
//! receive call may bring a few dozen datagrams. The buffer they land in is
//! the worker thread's, not the relay's: an idle allocation holds none.

use std::cell::RefCell;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::udp::{RecvBufs, UdpIo};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::bucket::TokenBucket;
use crate::own::OwnSet;
use crate::stats::{Stats, inc};

/// Largest peer datagram relayed to a client. Bigger ones are dropped: with
/// the 36-byte DATA-indication header they would not fit the client's path
/// anyway, and it keeps each relay's receive buffer small.
pub(crate) const MAX_PEER_DATAGRAM: usize = 4096;

/// Capacity of the queue from all relay tasks into the server task.
pub(crate) const RELAY_QUEUE: usize = 1024;

/// How many ports of the range are tried (with `bind`) per allocation before
/// answering 508.
const MAX_BIND_ATTEMPTS: usize = 64;

/// A datagram a peer sent to one of our relay sockets.
#[derive(Debug)]
pub(crate) struct PeerDatagram {
    /// The allocation's advertised relayed address (its identity).
    pub(crate) relay: SocketAddr,
    pub(crate) from: SocketAddr,
    pub(crate) data: Vec<u8>,
}

/// Binds a UDP socket on `ip` with a port from `ports` that is not in
/// `in_use`, starting at a random port (RFC 8656 §7.2 asks for unpredictable
/// relayed ports). `0..=0` lets the OS choose.
pub(crate) fn bind_relay(
    ip: IpAddr,
    ports: &RangeInclusive<u16>,
    in_use: &OwnSet<u16>,
) -> io::Result<UdpSocket> {
    let (start, end) = (*ports.start(), *ports.end());
    if (start, end) == (0, 0) {
        // The OS never hands out a port that is still bound, and the driver
        // keeps every allocation's socket open until the allocation is gone.
        return bind_udp(SocketAddr::new(ip, 0));
    }
    let span = u32::from(end - start) + 1;
    let offset = (RandomState::new().hash_one(Instant::now()) % u64::from(span)) as u32;
    let mut attempts = 0;
    let mut last_err = None;
    for i in 0..span {
        let port = start + ((offset + i) % span) as u16;
        if in_use.contains(&port) {
            continue;
        }
        match bind_udp(SocketAddr::new(ip, port)) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(e),
        }
        attempts += 1;
        if attempts >= MAX_BIND_ATTEMPTS {
            break;
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "relay port range exhausted")))
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Buffers per receive call on a relay socket.
const RECV_BUFS: usize = 2;

thread_local! {
    /// The receive buffers of the relays this worker thread serves.
    static RECV: RefCell<Option<RecvBufs>> = const { RefCell::new(None) };
}

/// Reads one relay socket until aborted, forwarding datagrams to the server
/// task. `bucket` is the allocation's inbound bandwidth budget; everything a
/// relay port receives counts against it, so an unsolicited flood is dropped
/// here instead of crowding the shared queue.
pub(crate) async fn relay_loop(
    socket: Arc<UdpIo>,
    relay: SocketAddr,
    tx: mpsc::Sender<PeerDatagram>,
    mut bucket: Option<TokenBucket>,
    stats: Stats,
) {
    let counters = stats.counters();
    // Receive errors in a row. One is usually a peer's ICMP error, reported
    // once and gone; errors that keep coming must not spin the thread.
    let mut failing = 0u32;
    loop {
        if failing >= 8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = socket.socket().readable().await {
            // Unconnected UDP sockets rarely fail; don't spin if one does.
            tracing::debug!(%relay, "relay socket: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let closed = RECV.with_borrow_mut(|bufs| {
            let bufs = bufs.get_or_insert_with(|| RecvBufs::new(RECV_BUFS, &socket));
            let n = match socket.try_recv(bufs) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::debug!(%relay, "relay socket receive: {e}");
                    failing += 1;
                    return false;
                }
            };
            failing = 0;
            for (from, data) in bufs.datagrams(n) {
                if data.len() > MAX_PEER_DATAGRAM {
                    inc(&counters.dropped_oversize);
                    continue;
                }
                if let Some(b) = bucket.as_mut()
                    && !b.try_take(data.len() as u64, Instant::now())
                {
                    inc(&counters.dropped_bandwidth);
                    continue;
                }
                match tx.try_send(PeerDatagram { relay, from, data: data.to_vec() }) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => inc(&counters.dropped_queue_full),
                    Err(TrySendError::Closed(_)) => return true,
                }
            }
            false
        });
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_inside_the_range_and_skips_ports_in_use() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Find two free ports next to each other by binding ephemeral ones.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let range = port..=port;
        let socket = bind_relay(ip, &range, &OwnSet::default()).unwrap();
        assert_eq!(socket.local_addr().unwrap().port(), port);
        // The only port is bound now: the OS refuses it.
        assert!(bind_relay(ip, &range, &OwnSet::default()).is_err());
        drop(socket);
        // Free at the OS level but marked in use by us: skipped.
        let in_use = OwnSet::from_iter([port]);
        let err = bind_relay(ip, &range, &in_use).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn zero_range_means_ephemeral() {
        let socket = bind_relay("127.0.0.1".parse().unwrap(), &(0..=0), &OwnSet::default()).unwrap();
        assert_ne!(socket.local_addr().unwrap().port(), 0);
    }
}
