//! Counters the server updates and anyone holding a [`Stats`] can read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A cheap, cloneable handle to the server's counters (for `/healthz`, tests
/// and logs). Counters are monotonic except [`StatsSnapshot::allocations`].
#[derive(Debug, Clone, Default)]
pub struct Stats {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) allocations: AtomicU64,
    pub(crate) allocations_created: AtomicU64,
    pub(crate) allocations_refused: AtomicU64,
    pub(crate) allocations_revoked: AtomicU64,
    pub(crate) binding_requests: AtomicU64,
    pub(crate) expired_credentials: AtomicU64,
    pub(crate) bytes_to_peers: AtomicU64,
    pub(crate) bytes_to_clients: AtomicU64,
    pub(crate) hairpinned: AtomicU64,
    pub(crate) channel_shortcuts: AtomicU64,
    pub(crate) dropped_policy: AtomicU64,
    pub(crate) dropped_bandwidth: AtomicU64,
    pub(crate) dropped_no_permission: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_rate_limited: AtomicU64,
    pub(crate) dropped_tables_full: AtomicU64,
    pub(crate) dropped_send_failed: AtomicU64,
    pub(crate) dropped_oversize: AtomicU64,
    pub(crate) auth_table_rotations: AtomicU64,
    pub(crate) stream_connections: AtomicU64,
    pub(crate) stream_connections_total: AtomicU64,
    pub(crate) stream_refused: AtomicU64,
    pub(crate) tls_handshakes_failed: AtomicU64,
    pub(crate) stream_framing_errors: AtomicU64,
}

/// One reading of every counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Live allocations (relay sockets held), including revoked ones the
    /// protocol state has not yet expired.
    pub allocations: u64,
    /// Allocations ever created.
    pub allocations_created: u64,
    /// ALLOCATE requests refused by a limit (508) or an unsupported family (440).
    pub allocations_refused: u64,
    /// Allocations cut off at [`Limits::max_lifetime`](crate::Limits::max_lifetime).
    pub allocations_revoked: u64,
    /// STUN Binding requests answered.
    pub binding_requests: u64,
    /// ALLOCATE requests refused with 401 because the REST username had expired.
    pub expired_credentials: u64,
    /// Payload bytes sent from relay sockets to peers.
    pub bytes_to_peers: u64,
    /// Payload bytes from peers delivered to clients.
    pub bytes_to_clients: u64,
    /// Datagrams one allocation of this server sent to another's relayed
    /// address, handed over inside the server instead of through the
    /// kernel and back (counted in both byte counters too).
    pub hairpinned: u64,
    /// ChannelData datagrams relayed (either way) on a route the protocol
    /// took lately, without asking it again (see `routes.rs`).
    pub channel_shortcuts: u64,
    /// Datagrams dropped by the peer policy (either direction).
    pub dropped_policy: u64,
    /// Datagrams dropped by an allocation's bandwidth bucket.
    pub dropped_bandwidth: u64,
    /// Peer datagrams dropped because the client had no permission for the peer.
    pub dropped_no_permission: u64,
    /// Peer datagrams dropped because the relay queue into the server task was full.
    pub dropped_queue_full: u64,
    /// Requests from new client addresses dropped by the request-rate limit.
    pub dropped_rate_limited: u64,
    /// Requests from new client addresses dropped because the authentication
    /// tables were full.
    pub dropped_tables_full: u64,
    /// Datagrams the kernel would not take (send buffer full) or refused.
    pub dropped_send_failed: u64,
    /// Peer datagrams larger than a relay accepts (4096 bytes).
    pub dropped_oversize: u64,
    /// Times the protocol state's authentication tables were started afresh.
    pub auth_table_rotations: u64,
    /// Open TCP and TLS client connections.
    pub stream_connections: u64,
    /// TCP and TLS client connections that became ready (after the TLS
    /// handshake and a first STUN message).
    pub stream_connections_total: u64,
    /// TCP and TLS connections closed at once: a connection limit was reached.
    pub stream_refused: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshakes_failed: u64,
    /// TCP and TLS connections closed because they did not carry STUN.
    pub stream_framing_errors: u64,
}

impl Stats {
    /// Reads every counter (each atomically, not all at the same instant).
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &*self.inner;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            allocations: r(&c.allocations),
            allocations_created: r(&c.allocations_created),
            allocations_refused: r(&c.allocations_refused),
            allocations_revoked: r(&c.allocations_revoked),
            binding_requests: r(&c.binding_requests),
            expired_credentials: r(&c.expired_credentials),
            bytes_to_peers: r(&c.bytes_to_peers),
            bytes_to_clients: r(&c.bytes_to_clients),
            hairpinned: r(&c.hairpinned),
            channel_shortcuts: r(&c.channel_shortcuts),
            dropped_policy: r(&c.dropped_policy),
            dropped_bandwidth: r(&c.dropped_bandwidth),
            dropped_no_permission: r(&c.dropped_no_permission),
            dropped_queue_full: r(&c.dropped_queue_full),
            dropped_rate_limited: r(&c.dropped_rate_limited),
            dropped_tables_full: r(&c.dropped_tables_full),
            dropped_send_failed: r(&c.dropped_send_failed),
            dropped_oversize: r(&c.dropped_oversize),
            auth_table_rotations: r(&c.auth_table_rotations),
            stream_connections: r(&c.stream_connections),
            stream_connections_total: r(&c.stream_connections_total),
            stream_refused: r(&c.stream_refused),
            tls_handshakes_failed: r(&c.tls_handshakes_failed),
            stream_framing_errors: r(&c.stream_framing_errors),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner
    }
}

pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn dec(counter: &AtomicU64) {
    counter.fetch_sub(1, Ordering::Relaxed);
}
