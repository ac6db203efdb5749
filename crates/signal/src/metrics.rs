//! `GET /metrics`: the server's counters in the Prometheus text format
//! (version 0.0.4), for scraping.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Server;

type RenderFn = dyn Fn(&mut Metrics) + Send + Sync;

/// More metrics rendered after the server's own (e.g. the TURN server's).
#[derive(Clone)]
pub struct MoreMetrics(Arc<RenderFn>);

impl MoreMetrics {
    /// Wraps `f`, called on every scrape.
    pub fn new(f: impl Fn(&mut Metrics) + Send + Sync + 'static) -> Self {
        MoreMetrics(Arc::new(f))
    }
}

impl std::fmt::Debug for MoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoreMetrics(..)")
    }
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Metrics {
    out: String,
}

impl Metrics {
    /// Starts a metric family: its help text and type (`counter`, `gauge`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample, with `labels` as `(name, value)` pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The exposition of `server`'s counters, then those of `more`.
pub(crate) fn render(server: &Server) -> String {
    let inner = &server.inner;
    let hub = inner.hub.stats();
    let adm = inner.admission.stats();
    let mut m = Metrics::default();
    m.single(
        "peerlink_connections",
        "gauge",
        "Open signaling WebSocket connections.",
        hub.connections as u64,
    );
    m.single(
        "peerlink_tcp_connections",
        "gauge",
        "Open TCP connections (WebSocket or HTTP).",
        adm.open as u64,
    );
    m.single("peerlink_rooms", "gauge", "Rooms with at least one member.", hub.rooms as u64);
    m.single("peerlink_joins_total", "counter", "Joins accepted.", inner.hub.joins());
    m.family("peerlink_relayed_messages_total", "counter", "Messages relayed between peers, by type.");
    m.sample("peerlink_relayed_messages_total", &[("type", "signal")], hub.signals_relayed);
    m.sample("peerlink_relayed_messages_total", &[("type", "send")], hub.messages_relayed);
    let errors = inner.hub.errors();
    m.family("peerlink_errors_total", "counter", "Errors sent to clients, by code.");
    for (code, n) in &errors {
        m.sample("peerlink_errors_total", &[("code", code.as_str())], *n);
    }
    m.family(
        "peerlink_kicks_total",
        "counter",
        "Connections the server closed, by the error code it closed them with.",
    );
    for (code, n) in inner.hub.kicks() {
        m.sample("peerlink_kicks_total", &[("reason", code.as_str())], n);
    }
    m.single(
        "peerlink_queued_bytes",
        "gauge",
        "Bytes queued for clients, all connections together.",
        inner.budget.queued.load(Ordering::Relaxed) as u64,
    );
    m.single(
        "peerlink_websocket_reads_total",
        "counter",
        "Reads from WebSocket clients' sockets (each may carry many frames).",
        inner.budget.socket_reads.load(Ordering::Relaxed),
    );
    m.single(
        "peerlink_websocket_writes_total",
        "counter",
        "Writes to WebSocket clients' sockets (each may carry many frames).",
        inner.budget.socket_writes.load(Ordering::Relaxed),
    );
    m.single(
        "peerlink_connections_refused_total",
        "counter",
        "TCP connections refused over the connection caps.",
        adm.refused,
    );
    m.single(
        "peerlink_requests_timed_out_total",
        "counter",
        "HTTP connections closed because a request did not arrive in time.",
        adm.timed_out,
    );
    if let Some(bp) = inner.hub.backplane() {
        let c = &bp.counters;
        m.single(
            "peerlink_backplane_up",
            "gauge",
            "1 when Redis is reachable (joins and messages to other nodes are served).",
            u64::from(bp.is_up()),
        );
        m.single(
            "peerlink_backplane_published_total",
            "counter",
            "Messages published to other nodes.",
            c.published.load(Ordering::Relaxed),
        );
        m.single(
            "peerlink_backplane_received_total",
            "counter",
            "Events received from Redis for this node.",
            c.received.load(Ordering::Relaxed),
        );
        m.single(
            "peerlink_backplane_errors_total",
            "counter",
            "Redis errors (failed connections, commands, subscriptions).",
            c.errors.load(Ordering::Relaxed),
        );
        m.single(
            "peerlink_backplane_reconnects_total",
            "counter",
            "Times the connection to Redis was made again.",
            c.reconnects.load(Ordering::Relaxed),
        );
        m.single(
            "peerlink_backplane_members_swept_total",
            "counter",
            "Members of dead nodes this node removed.",
            c.members_swept.load(Ordering::Relaxed),
        );
        m.single(
            "peerlink_backplane_queued_bytes",
            "gauge",
            "Bytes of messages waiting to be published.",
            bp.queued_bytes() as u64,
        );
        m.single(
            "peerlink_backplane_lag_microseconds",
            "gauge",
            "How long the last batch's oldest message waited for Redis.",
            c.lag_us.load(Ordering::Relaxed),
        );
    }
    if let Some(more) = &inner.config.more_metrics {
        (more.0)(&mut m);
    }
    m.out
}
