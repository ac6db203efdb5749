//! One client connection: greeting, limits, routing, heartbeats and teardown.

//!
//! The connection reads into its worker thread's buffer and handles every
//! complete frame there; only an incomplete frame (or what follows a
//! message that has to wait, a join through the backplane) is copied into a
//! buffer of its own, so an idle connection holds no read buffer. What it
//! sends and what others send it goes through its [`Outbox`].

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use peerlink_proto::{ClientMsg, ErrorCode, MAX_NAME_LEN, PROTOCOL_VERSION, PeerId, ServerMsg, valid_room};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::hub::{Outbox, Refused, Route, encode};
use crate::limit::{FLOOD_SECONDS, FloodMeter, TokenBucket};
use crate::outbox::{Alarm, Batch};
use crate::ws::{self, Violation};
use crate::{Config, Server};

/// Bytes read from a socket at once (the worker thread's buffer).
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// A connection upgraded to a WebSocket.
pub(crate) struct Socket {
    pub tcp: Arc<TcpStream>,
    /// Its place under the connection caps.
    pub _slot: crate::listen::Slot,
    /// Bytes the HTTP server read past the upgrade request.
    pub read_ahead: Bytes,
}

/// Longest we spend telling a client goodbye before dropping the socket.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

fn new_peer_id() -> PeerId {
    PeerId::from_server(format!("p-{:016x}", rand::random::<u64>()))
}

/// A refusal sent to the client as `error`.
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }
}

impl From<Refused> for Failure {
    fn from(r: Refused) -> Self {
        Failure { code: r.0, message: r.1 }
    }
}

struct Conn {
    server: Server,
    id: PeerId,
    /// The host the client reached us by (for ICE server URLs).
    host: Option<String>,
    outbox: Outbox,
    greeted: bool,
    /// Greeted with a valid resume token: joins take back the places the
    /// id still holds.
    resumed: bool,
    /// ... and the token comes from an earlier process of a server without
    /// a backplane: its rooms went with it, nobody was told the id left, so
    /// joining any room is taking a place back.
    resumed_across_restart: bool,
    rooms: HashSet<String>,
    bucket: TokenBucket,
    /// When we last told this client it was rate limited (one notice a second).
    last_rate_notice: Option<Instant>,
    flood: FloodMeter,
    /// Bytes of frames not handled yet (incomplete, or behind a message
    /// that had to wait).
    pending: Vec<u8>,
    /// A fragmented message so far: its opcode and payload.
    fragments: Option<(u8, Vec<u8>)>,
    /// Since when part of a frame (`pending`) or of a fragmented message
    /// has been held: it must be complete within the request timeout, or a
    /// client trickling bytes pins those buffers for ever.
    incomplete_since: Option<Instant>,
    last_seen: Instant,
    /// The last read filled the buffer: more is waiting, and the task
    /// lets others run before it reads again.
    more: bool,
    /// The rate limit dropped a frame since the last read.
    throttled: bool,
    /// Where the last frame to one peer went.
    route: Option<Route>,
}

/// How handling what was read ended.
enum Step {
    /// Everything complete was handled.
    Done,
    /// A message that has to wait (`join`, `leave`): the rest waits behind it.
    Wait(ClientMsg),
    /// The client closed (the payload of its close frame).
    Closed(Vec<u8>),
    /// The client broke the WebSocket rules.
    Violation(Violation),
    /// The connection ends (with an error for the client, or quietly).
    End(Option<Failure>),
}

/// What woke the connection's task.
enum Wake {
    Readable,
    Writable,
    /// The outbox became blocked: the slow-consumer clock starts.
    Blocked,
    Timer,
    Alarm(Alarm),
}

pub(crate) async fn run(server: Server, mut socket: Socket, addr: SocketAddr, host: Option<String>) {
    // The bytes read ahead are a slice of the HTTP server's whole read
    // buffer, which they would keep alive.
    let read_ahead = std::mem::take(&mut socket.read_ahead).to_vec();
    let cfg = &server.inner.config;
    let tcp = socket.tcp.clone();
    let outbox =
        Outbox::new(tcp.clone(), cfg.outbound_queue, cfg.outbound_queue_bytes, server.inner.budget.clone());
    let key = server.inner.hub.connected(&outbox);
    let now = Instant::now();
    let mut conn = Conn {
        server: server.clone(),
        id: new_peer_id(),
        host,
        outbox,
        greeted: false,
        resumed: false,
        resumed_across_restart: false,
        rooms: HashSet::new(),
        bucket: TokenBucket::new(cfg.limits.messages_per_second, cfg.limits.message_burst, now.into_std()),
        last_rate_notice: None,
        flood: FloodMeter::new(cfg.limits.messages_per_second, now.into_std()),
        pending: read_ahead,
        fragments: None,
        incomplete_since: None,
        last_seen: now,
        more: false,
        throttled: false,
        route: None,
    };
    tracing::debug!(peer = %conn.id, %addr, "connected");

    let idle = Duration::from_millis(cfg.limits.idle_timeout_ms);
    let hello_deadline = now + cfg.hello_timeout;
    let frame_timeout = cfg.request_timeout;
    let deadline = |conn: &Conn| {
        let idle_at =
            if conn.greeted { conn.last_seen + idle } else { hello_deadline.min(conn.last_seen + idle) };
        conn.incomplete_since.map_or(idle_at, |since| idle_at.min(since + frame_timeout))
    };
    let mut next_ping = now + cfg.heartbeat;
    // Bytes written when the socket was first seen blocked, and when.
    let mut behind: Option<(u64, Instant)> = None;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline(&conn).min(next_ping)));
    let mut handle_pending = !conn.pending.is_empty();
    // A client over its rate is not read again until it may send: what it
    // sends meanwhile waits in its own socket (TCP pushes back), so a flood
    // costs the server a buffer per token, not a core.
    let mut paused: Option<Instant> = None;
    // The payload of the client's close frame, to echo.
    let mut client_closed: Option<Vec<u8>> = None;

    let end: Option<Failure> = loop {
        if *server.inner.shutdown.borrow() {
            break Some(shutting_down());
        }
        if std::mem::take(&mut conn.more) {
            // A client that keeps the socket full (a flooder, or a big
            // burst) gets one buffer per turn, not tokio's budget of 128
            // (8 MiB of frames) before the other connections on this
            // worker are served.
            tokio::task::yield_now().await;
        }
        let step = if handle_pending {
            handle_pending = false;
            conn.handle_pending()
        } else {
            let wake = std::future::poll_fn(|cx| {
                let (alarm, blocked) = conn.outbox.poll_state(cx);
                if let Some(alarm) = alarm {
                    return Poll::Ready(Wake::Alarm(alarm));
                }
                if blocked {
                    if behind.is_none() {
                        return Poll::Ready(Wake::Blocked);
                    }
                    if tcp.poll_write_ready(cx).is_ready() {
                        return Poll::Ready(Wake::Writable);
                    }
                }
                if paused.is_none() && tcp.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Readable);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Readable => {
                    let step = conn.read(&tcp);
                    if std::mem::take(&mut conn.throttled) {
                        let until = Instant::now() + conn.bucket.retry_after().max(Duration::from_millis(1));
                        paused = Some(until);
                        if until < timer.deadline() {
                            timer.as_mut().reset(until);
                        }
                    }
                    step
                }
                Wake::Writable => {
                    conn.outbox.write_ready();
                    if conn.outbox.is_empty() {
                        behind = None;
                    } else if behind.is_some_and(|(w, _)| w != conn.outbox.written()) {
                        behind = Some((conn.outbox.written(), Instant::now()));
                    }
                    continue;
                }
                Wake::Blocked => {
                    let since = Instant::now();
                    behind = Some((conn.outbox.written(), since));
                    let due = since + cfg.slow_consumer_timeout;
                    if due < timer.deadline() {
                        timer.as_mut().reset(due);
                    }
                    continue;
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if paused.is_some_and(|until| now >= until) {
                        paused = None;
                    }
                    if conn.incomplete_since.is_some_and(|since| now >= since + frame_timeout) {
                        break Some(Failure::new(
                            ErrorCode::IdleTimeout,
                            format!("a frame or message incomplete for {} ms", frame_timeout.as_millis()),
                        ));
                    }
                    if now >= deadline(&conn) {
                        break Some(deadline_passed(conn.greeted, cfg));
                    }
                    if let Some((written, since)) = behind {
                        if written != conn.outbox.written() {
                            behind = (!conn.outbox.is_empty()).then(|| (conn.outbox.written(), now));
                        } else if now >= since + cfg.slow_consumer_timeout {
                            break Some(not_reading(cfg));
                        }
                    }
                    if now >= next_ping {
                        conn.outbox.deliver_control(ws::control_frame(ws::OP_PING, &[]));
                        next_ping = now + cfg.heartbeat;
                    }
                    let mut due = deadline(&conn).min(next_ping);
                    if let Some((_, since)) = behind {
                        due = due.min(since + cfg.slow_consumer_timeout);
                    }
                    if let Some(until) = paused {
                        due = due.min(until);
                    }
                    timer.as_mut().reset(due);
                    continue;
                }
                Wake::Alarm(Alarm::Kicked) => break Some(queue_overflow(cfg)),
                Wake::Alarm(Alarm::Shutdown) => break Some(shutting_down()),
                Wake::Alarm(Alarm::Broken) => break None,
            }
        };
        let incomplete = !conn.pending.is_empty() || conn.fragments.is_some();
        match (incomplete, conn.incomplete_since) {
            (false, _) => conn.incomplete_since = None,
            (true, None) => {
                conn.incomplete_since = Some(Instant::now());
                let due = deadline(&conn).min(next_ping);
                if due < timer.deadline() {
                    timer.as_mut().reset(due);
                }
            }
            (true, Some(_)) => {}
        }
        match step {
            Step::Done => {}
            Step::Wait(msg) => {
                // Boxed: an idle connection does not carry the space for it.
                if let Err(f) = Box::pin(conn.dispatch_waiting(msg)).await {
                    if f.code.is_fatal() {
                        break Some(f);
                    }
                    conn.reply_error(f);
                }
                handle_pending = !conn.pending.is_empty();
            }
            Step::Closed(payload) => {
                client_closed = Some(payload);
                break None;
            }
            Step::Violation(v) => {
                tracing::debug!(peer = %conn.id, "closing: {}", v.reason);
                conn.outbox.goodbye(None, ws::close_frame(v.code, v.reason));
                let _ = Box::pin(tokio::time::timeout(GOODBYE_TIMEOUT, conn.outbox.written_all(&tcp))).await;
                break None;
            }
            Step::End(end) => break end,
        }
    };

    // Boxed: an idle connection does not carry the space for it.
    Box::pin(finish(server, conn, end, client_closed, tcp, socket, key)).await;
}

/// The connection ends: its rooms are left (or, on shutdown, kept for the
/// drain grace), the client is told why (or its close is answered).
async fn finish(
    server: Server,
    mut conn: Conn,
    end: Option<Failure>,
    client_closed: Option<Vec<u8>>,
    tcp: Arc<TcpStream>,
    socket: Socket,
    key: u64,
) {
    let draining = matches!(&end, Some(f) if f.code == ErrorCode::ShuttingDown);
    if !draining {
        for room in std::mem::take(&mut conn.rooms) {
            server.inner.hub.leave(&room, &conn.id, &conn.outbox).await;
        }
    }
    if let Some(f) = &end {
        server.inner.hub.count_error(f.code);
        server.inner.hub.count_kick(f.code);
        tracing::debug!(peer = %conn.id, code = %f.code, "closing: {}", f.message);
        let frame = encode(&ServerMsg::Error { code: f.code, message: f.message.clone() });
        let close = match f.code {
            ErrorCode::ShuttingDown => ws::CLOSE_AWAY,
            ErrorCode::UnsupportedVersion | ErrorCode::HelloRequired => ws::CLOSE_PROTOCOL,
            _ => ws::CLOSE_POLICY,
        };
        // What was queued for the client is dropped: it is told why it goes.
        conn.outbox.goodbye(Some(frame), ws::close_frame(close, f.code.as_str()));
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.outbox.written_all(&tcp)).await;
    } else if let Some(payload) = client_closed {
        // The close handshake: the client's code echoed.
        let code = payload.get(..2).map_or(ws::CLOSE_NORMAL, |c| u16::from_be_bytes([c[0], c[1]]));
        conn.outbox.goodbye(None, ws::close_frame(code, ""));
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.outbox.written_all(&tcp)).await;
    }
    // What is still queued for us leaves the server's budget, and nobody
    // writes to the socket any more.
    conn.outbox.close();
    drop(tcp);
    drop(socket);
    if draining {
        drain(&server, &conn).await;
    }
    server.inner.hub.disconnected(key);
    tracing::debug!(peer = %conn.id, "disconnected");
}

/// A shutting-down node's member: told to reconnect (`shutting_down`), it
/// keeps its places for the drain grace so that it can resume them on
/// another node without anyone seeing it leave; then whatever it has not
/// taken back is left. Without a backplane the rooms end with this process
/// and nobody is told anything.
async fn drain(server: &Server, conn: &Conn) {
    let hub = &server.inner.hub;
    if hub.backplane().is_none() {
        return;
    }
    let until = Instant::now() + server.inner.config.drain_grace;
    let ours = || conn.rooms.iter().filter(|r| hub.is_ours(r, &conn.id, &conn.outbox)).count();
    while ours() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for room in &conn.rooms {
        hub.leave(room, &conn.id, &conn.outbox).await;
    }
}

/// Tells a page from a refused origin why, and closes.
pub(crate) async fn refuse_origin(server: &Server, socket: Socket, origin: &str) {
    tracing::debug!(%origin, "origin not allowed");
    let frame = encode(&ServerMsg::Error {
        code: ErrorCode::OriginNotAllowed,
        message: format!("pages from {origin} may not use this server"),
    });
    let outbox = Outbox::new(socket.tcp.clone(), 4, 64 * 1024, server.inner.budget.clone());
    outbox.goodbye(Some(frame), ws::close_frame(ws::CLOSE_POLICY, ErrorCode::OriginNotAllowed.as_str()));
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, outbox.written_all(&socket.tcp)).await;
    outbox.close();
}

fn shutting_down() -> Failure {
    Failure::new(ErrorCode::ShuttingDown, "server is shutting down")
}

/// The idle timeout, or the hello timeout before `hello`.
fn deadline_passed(greeted: bool, cfg: &Config) -> Failure {
    if greeted {
        Failure::new(
            ErrorCode::IdleTimeout,
            format!("nothing received for {} ms", cfg.limits.idle_timeout_ms),
        )
    } else {
        Failure::new(
            ErrorCode::HelloRequired,
            format!("no hello within {} ms", cfg.hello_timeout.as_millis()),
        )
    }
}

/// A message the server itself sends (presence, a reply) did not fit.
fn queue_overflow(cfg: &Config) -> Failure {
    Failure::new(
        ErrorCode::SlowConsumer,
        format!(
            "more than {} messages or {} bytes queued for you",
            cfg.outbound_queue, cfg.outbound_queue_bytes
        ),
    )
}

/// The client's socket took nothing for the slow-consumer timeout.
fn not_reading(cfg: &Config) -> Failure {
    Failure::new(
        ErrorCode::SlowConsumer,
        format!(
            "you read nothing of what was queued for you for {} ms",
            cfg.slow_consumer_timeout.as_millis()
        ),
    )
}

impl Conn {
    fn reply(&self, msg: &ServerMsg) {
        self.outbox.deliver(encode(msg));
    }

    fn reply_error(&self, f: Failure) {
        self.server.inner.hub.count_error(f.code);
        self.reply(&ServerMsg::Error { code: f.code, message: f.message });
    }

    /// Takes a token for a frame: `Ok(false)` when the frame is to be
    /// dropped silently, an error for the first drop in a second (the
    /// notice) and for a flood (fatal).
    fn admit(&mut self) -> Result<bool, Failure> {
        let limits = self.server.inner.config.limits;
        let now = std::time::Instant::now();
        if self.bucket.take(now) {
            return Ok(true);
        }
        self.throttled = true;
        if self.flood.dropped(now) {
            return Err(Failure::new(
                ErrorCode::Flooding,
                format!(
                    "over the rate limit for {FLOOD_SECONDS} seconds in a row ({} messages per second, burst {}); closing",
                    limits.messages_per_second, limits.message_burst
                ),
            ));
        }
        let notice_due = self.last_rate_notice.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if notice_due {
            self.last_rate_notice = Some(Instant::now());
            return Err(Failure::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second (burst {}); dropped, retry in {} ms",
                    limits.messages_per_second,
                    limits.message_burst,
                    self.bucket.retry_after().as_millis().max(1)
                ),
            ));
        }
        Ok(false)
    }

    /// A binary frame: refused, but counted against the rate like any frame
    /// (each refusal is a reply).
    fn handle_binary(&mut self) -> Result<(), Failure> {
        if !self.admit()? {
            return Ok(());
        }
        Err(Failure::new(
            ErrorCode::BinaryFrame,
            "binary frames are not part of the protocol; send JSON text",
        ))
    }

    /// Reads what the socket has and handles every complete frame.
    fn read(&mut self, tcp: &TcpStream) -> Step {
        let _batch = Batch::start();
        self.server.inner.budget.socket_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        READ_BUF.with_borrow_mut(|buf| {
            // A read that does not fill the buffer emptied the socket: its
            // readiness is cleared with it (as a `WouldBlock` would), so the
            // connection does not read again only to be told there is
            // nothing. Data that arrives meanwhile is a new event.
            let mut short = 0;
            let read = tcp.try_io(tokio::io::Interest::READABLE, || {
                let n = std::io::Read::read(&mut &*socket2::SockRef::from(tcp), buf)?;
                if n > 0 && n < buf.len() {
                    short = n;
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let n = match read {
                Ok(0) => return Step::End(None),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && short > 0 => short,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::Done,
                Err(e) => {
                    tracing::debug!(peer = %self.id, "socket error: {e}");
                    return Step::End(None);
                }
            };
            self.last_seen = Instant::now();
            self.more = n == buf.len();
            if self.pending.is_empty() {
                let (used, step) = self.frames(&mut buf[..n]);
                self.pending.extend_from_slice(&buf[used..n]);
                step
            } else {
                self.pending.extend_from_slice(&buf[..n]);
                self.handle_own()
            }
        })
    }

    /// Handles the complete frames among the bytes kept from before.
    fn handle_pending(&mut self) -> Step {
        let _batch = Batch::start();
        self.handle_own()
    }

    fn handle_own(&mut self) -> Step {
        let mut own = std::mem::take(&mut self.pending);
        let (used, step) = self.frames(&mut own);
        if used < own.len() {
            own.drain(..used);
            self.pending = own;
        }
        step
    }

    /// Handles the complete frames at the start of `buf`: how many bytes
    /// they took, and how it ended.
    fn frames(&mut self, buf: &mut [u8]) -> (usize, Step) {
        let hard_limit = self.server.inner.config.hard_frame_limit;
        let mut at = 0;
        loop {
            let (frame, used) = match ws::read_frame(&mut buf[at..], hard_limit) {
                Ok(Some(frame)) => frame,
                Ok(None) => return (at, Step::Done),
                Err(v) => return (at, Step::Violation(v)),
            };
            let payload = &buf[at + frame.payload.start..at + frame.payload.end];
            at += used;
            match self.frame(frame.opcode, frame.fin, payload, hard_limit) {
                Step::Done => {}
                step => return (at, step),
            }
        }
    }

    fn frame(&mut self, opcode: u8, fin: bool, payload: &[u8], hard_limit: usize) -> Step {
        match opcode {
            ws::OP_PING => {
                self.outbox.deliver_pong(ws::control_frame(ws::OP_PONG, payload));
                Step::Done
            }
            ws::OP_PONG => Step::Done,
            ws::OP_CLOSE => Step::Closed(payload.to_vec()),
            ws::OP_CONTINUATION => {
                let Some((opcode, mut message)) = self.fragments.take() else {
                    return Step::Violation(Violation {
                        code: ws::CLOSE_PROTOCOL,
                        reason: "continuation frame without a message",
                    });
                };
                if message.len() + payload.len() > hard_limit {
                    return Step::Violation(Violation {
                        code: ws::CLOSE_TOO_BIG,
                        reason: "message too large",
                    });
                }
                message.extend_from_slice(payload);
                if fin {
                    self.message(opcode, &message)
                } else {
                    self.fragments = Some((opcode, message));
                    Step::Done
                }
            }
            _ if self.fragments.is_some() => Step::Violation(Violation {
                code: ws::CLOSE_PROTOCOL,
                reason: "a new message before the fragmented one was finished",
            }),
            _ if !fin => {
                self.fragments = Some((opcode, payload.to_vec()));
                Step::Done
            }
            _ => self.message(opcode, payload),
        }
    }

    /// One whole message from the client.
    fn message(&mut self, opcode: u8, payload: &[u8]) -> Step {
        let handled = if opcode == ws::OP_BINARY {
            self.handle_binary().map(|()| None)
        } else {
            let Ok(text) = std::str::from_utf8(payload) else {
                return Step::Violation(Violation {
                    code: ws::CLOSE_INVALID_DATA,
                    reason: "text is not UTF-8",
                });
            };
            self.handle_text(text)
        };
        match handled {
            Ok(None) => Step::Done,
            Ok(Some(msg)) => Step::Wait(msg),
            Err(f) if f.code.is_fatal() => Step::End(Some(f)),
            Err(f) => {
                self.reply_error(f);
                Step::Done
            }
        }
    }

    /// A text message: handled, or handed back when it has to wait.
    fn handle_text(&mut self, text: &str) -> Result<Option<ClientMsg>, Failure> {
        let limits = self.server.inner.config.limits;
        if !self.admit()? {
            return Ok(None);
        }
        if text.len() > limits.max_message_bytes as usize {
            return Err(Failure::new(
                ErrorCode::TooLarge,
                format!("message of {} bytes exceeds the limit of {}", text.len(), limits.max_message_bytes),
            ));
        }
        if self.greeted
            && let Some(r) = crate::frame::relay_frame(text, self.id.as_str())
        {
            return self.relay(r).map(|()| None);
        }
        let (msg, ty) =
            crate::frame::parse_client_frame(text).map_err(|(code, message)| Failure::new(code, message))?;
        if !self.greeted && !matches!(msg, ClientMsg::Hello { .. } | ClientMsg::Unknown) {
            return Err(Failure::new(ErrorCode::HelloRequired, "send hello first"));
        }
        self.dispatch(msg, ty)
    }

    /// A `signal` or `send`, read on the fast path: delivered as the
    /// client wrote its payload, with `from` stamped.
    fn relay(&mut self, r: crate::frame::Relay<'_>) -> Result<(), Failure> {
        let hub = &self.server.inner.hub;
        let frame = Utf8Bytes::from(r.frame);
        match r.to {
            Some(to) => {
                hub.send_to(&r.room, &self.id, &to, frame, &mut self.route)?;
                let counter = if r.signal { &hub.signals_relayed } else { &hub.messages_relayed };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => hub.broadcast(&r.room, &self.id, frame)?,
        }
        Ok(())
    }

    /// Acts on a message, except those that have to wait (handed back).
    fn dispatch(&mut self, msg: ClientMsg, ty: String) -> Result<Option<ClientMsg>, Failure> {
        let inner = &self.server.inner;
        let hub = &inner.hub;
        match msg {
            ClientMsg::Hello { version, client, resume } => {
                if self.greeted {
                    return Err(Failure::new(ErrorCode::AlreadyGreeted, "hello was already sent"));
                }
                if version != PROTOCOL_VERSION {
                    return Err(Failure::new(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
                        ),
                    ));
                }
                self.greeted = true;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let key = inner.resume_key.0.as_bytes();
                if let Some(token) = resume {
                    match crate::token::verify_resume_token(key, &token, now) {
                        Ok((id, epoch)) => {
                            tracing::debug!(peer = %id, was = %self.id, "resumed");
                            self.id = PeerId::from_server(id);
                            self.resumed = true;
                            self.resumed_across_restart = epoch != inner.epoch && hub.backplane().is_none();
                        }
                        // Not an error: the client learns from the new id.
                        Err(why) => tracing::debug!(peer = %self.id, "resume token refused: {why}"),
                    }
                }
                tracing::debug!(peer = %self.id, client = client.as_deref().unwrap_or("-"), "hello");
                let mut ice_servers = inner.config.ice_servers.clone();
                if let Some(p) = &inner.config.ice_provider {
                    ice_servers
                        .extend(p.servers(&crate::IceRequest { peer: &self.id, host: self.host.as_deref() }));
                }
                self.reply(&ServerMsg::Welcome {
                    version: PROTOCOL_VERSION,
                    peer_id: self.id.clone(),
                    ice_servers,
                    limits: inner.config.limits,
                    resume: Some(crate::token::resume_token(
                        key,
                        self.id.as_str(),
                        now + inner.config.resume_ttl.as_secs(),
                        &inner.epoch,
                    )),
                });
            }
            msg @ (ClientMsg::Join { .. } | ClientMsg::Leave { .. }) => return Ok(Some(msg)),
            ClientMsg::Signal { room, to, signal } => {
                let frame = encode(&ServerMsg::Signal { room: room.clone(), from: self.id.clone(), signal });
                hub.send_to(&room, &self.id, to.as_str(), frame, &mut self.route)?;
                hub.signals_relayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ClientMsg::Send { room, to, data } => {
                let frame = encode(&ServerMsg::Message { room: room.clone(), from: self.id.clone(), data });
                match to {
                    Some(to) => {
                        hub.send_to(&room, &self.id, to.as_str(), frame, &mut self.route)?;
                        hub.messages_relayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    None => hub.broadcast(&room, &self.id, frame)?,
                }
            }
            ClientMsg::Ping { nonce } => self.reply(&ServerMsg::Pong { nonce }),
            ClientMsg::Unknown => {
                return Err(Failure::new(ErrorCode::UnknownType, format!("unknown message type `{ty}`")));
            }
        }
        Ok(None)
    }

    /// `join` and `leave`, which wait for the hub (and the backplane).
    async fn dispatch_waiting(&mut self, msg: ClientMsg) -> Result<(), Failure> {
        let inner = &self.server.inner;
        let hub = &inner.hub;
        match msg {
            ClientMsg::Join { room, name, token } => {
                if !valid_room(&room) {
                    return Err(Failure::new(
                        ErrorCode::InvalidRoom,
                        "room names are 1-64 bytes of letters, digits, '-', '_' and '.'",
                    ));
                }
                if name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN) {
                    return Err(Failure::new(
                        ErrorCode::InvalidName,
                        format!("names are at most {MAX_NAME_LEN} bytes"),
                    ));
                }
                if self.rooms.contains(&room) {
                    return Err(Failure::new(ErrorCode::AlreadyJoined, format!("already in room {room}")));
                }
                let max_rooms = inner.config.limits.max_rooms_per_connection as usize;
                if self.rooms.len() >= max_rooms {
                    return Err(Failure::new(
                        ErrorCode::TooManyRooms,
                        format!("already in {max_rooms} rooms, the limit"),
                    ));
                }
                let mut token_refusal = None;
                if let Some(secret) = &inner.config.join_secret {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let checked = match token.as_deref() {
                        None => Err("this server requires one".to_string()),
                        Some(t) => {
                            crate::verify_join_token(secret.0.as_bytes(), t, &room, name.as_deref(), now)
                                .map(|_| ())
                        }
                    };
                    match checked {
                        Ok(()) => {}
                        // Join tokens are short-lived: a resumed id taking
                        // back a place it still holds needs none (the resume
                        // token proves it is the member), anything else does.
                        Err(why) if self.resumed && !self.resumed_across_restart => {
                            token_refusal = Some(format!("joining {room} needs a valid token: {why}"));
                        }
                        Err(why) => {
                            return Err(Failure::new(
                                ErrorCode::Unauthorized,
                                format!("joining {room} needs a valid token: {why}"),
                            ));
                        }
                    }
                }
                let max_peers = inner.config.limits.max_peers_per_room as usize;
                // The hub sends `joined` itself, ordered before any `peer_joined`.
                let resume = match (self.resumed, self.resumed_across_restart, token_refusal) {
                    (false, _, _) => crate::hub::Resume::No,
                    (true, false, None) => crate::hub::Resume::IfPresent,
                    (true, false, Some(why)) => crate::hub::Resume::OnlyPresent(why),
                    (true, true, _) => crate::hub::Resume::Always,
                };
                hub.join(&room, &self.id, name, self.outbox.clone(), max_peers, resume).await?;
                tracing::info!(peer = %self.id, %room, "joined");
                self.rooms.insert(room);
            }
            ClientMsg::Leave { room } => {
                if !self.rooms.remove(&room) {
                    return Err(Failure::new(ErrorCode::NotInRoom, format!("you are not in room {room}")));
                }
                hub.leave(&room, &self.id, &self.outbox).await;
                tracing::info!(peer = %self.id, %room, "left");
                self.reply(&ServerMsg::Left { room });
            }
            _ => {}
        }
        Ok(())
    }
}
