//! One client connection: greeting, limits, routing, heartbeats and teardown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures_util::SinkExt;
use peerlink_proto::{ClientMsg, ErrorCode, MAX_NAME_LEN, PROTOCOL_VERSION, PeerId, ServerMsg, valid_room};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::hub::{Kick, Outbox, Refused, encode};
use crate::limit::{FLOOD_SECONDS, FloodMeter, TokenBucket};
use crate::{Config, Server};

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
}

pub(crate) async fn run(server: Server, mut ws: WebSocket, addr: SocketAddr, host: Option<String>) {
    let cfg = server.inner.config.clone();
    let (tx, mut rx) = mpsc::channel(cfg.outbound_queue);
    let kick = Arc::new(Kick::default());
    let now = Instant::now();
    let mut conn = Conn {
        server: server.clone(),
        id: new_peer_id(),
        host,
        outbox: Outbox {
            tx,
            kick: kick.clone(),
            queued: Default::default(),
            max_bytes: cfg.outbound_queue_bytes,
            budget: server.inner.budget.clone(),
        },
        greeted: false,
        resumed: false,
        resumed_across_restart: false,
        rooms: HashSet::new(),
        bucket: TokenBucket::new(cfg.limits.messages_per_second, cfg.limits.message_burst, now.into_std()),
        last_rate_notice: None,
        flood: FloodMeter::new(cfg.limits.messages_per_second, now.into_std()),
    };
    server.inner.hub.connected();
    tracing::debug!(peer = %conn.id, %addr, "connected");

    let idle = Duration::from_millis(cfg.limits.idle_timeout_ms);
    let hello_deadline = now + cfg.hello_timeout;
    let mut last_seen = now;
    let mut heartbeat = tokio::time::interval_at(now + cfg.heartbeat, cfg.heartbeat);
    let mut shutdown = server.inner.shutdown.clone();

    let end: Option<Failure> = loop {
        if *shutdown.borrow_and_update() {
            break Some(shutting_down());
        }
        let deadline = if conn.greeted { last_seen + idle } else { hello_deadline.min(last_seen + idle) };
        let outgoing = tokio::select! {
            frame = ws.recv() => {
                let msg = match frame {
                    None => break None,
                    Some(Err(e)) => {
                        tracing::debug!(peer = %conn.id, "socket error: {e}");
                        break None;
                    }
                    Some(Ok(msg)) => msg,
                };
                last_seen = Instant::now();
                match msg {
                    Message::Text(text) => {
                        if let Err(f) = conn.handle_text(text.as_str()).await {
                            let fatal = f.code.is_fatal();
                            if fatal {
                                break Some(f);
                            }
                            conn.reply_error(f);
                        }
                    }
                    Message::Binary(_) => {
                        if let Err(f) = conn.handle_binary() {
                            if f.code.is_fatal() {
                                break Some(f);
                            }
                            conn.reply_error(f);
                        }
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => {
                        // tungstenite queued the reply; send it, so the
                        // client's close handshake completes (bounded).
                        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, ws.flush()).await;
                        break None;
                    }
                }
                continue;
            }
            Some(frame) = rx.recv() => {
                conn.outbox.taken(&frame);
                Message::Text(frame)
            }
            _ = heartbeat.tick() => Message::Ping(Default::default()),
            _ = tokio::time::sleep_until(deadline) => break Some(deadline_passed(conn.greeted, &cfg)),
            // Only the hub notifies, and only when it gave up on our queue.
            _ = kick.notify.notified() => break Some(queue_overflow(&cfg)),
            // `Ok` only: if the sender is gone (the `serve` future was dropped
            // without shutting down) the branch is disabled instead of spinning.
            Ok(()) = shutdown.changed() => continue,
        };
        // A client that stops reading fills the socket buffers and this write
        // waits for it. Keep watching for what ends the connection meanwhile,
        // or a stalled client would never be kicked, timed out or shut down.
        // A client whose socket takes nothing for the slow-consumer timeout
        // is behind for good: what waits for it is refused to its senders
        // meanwhile (`peer_busy`), and now it is closed.
        // Most writes complete at once and need none of those timers.
        let mut send = std::pin::pin!(ws.send(outgoing));
        match std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(_)) => break None,
            Poll::Pending => {}
        }
        let behind = Instant::now() + cfg.slow_consumer_timeout;
        tokio::select! {
            sent = send => if sent.is_err() {
                break None;
            },
            _ = tokio::time::sleep_until(deadline) => break Some(deadline_passed(conn.greeted, &cfg)),
            _ = tokio::time::sleep_until(behind) => break Some(not_reading(&cfg)),
            _ = kick.notify.notified() => break Some(queue_overflow(&cfg)),
            Ok(()) = shutdown.changed() => break Some(shutting_down()),
        }
    };

    let draining = matches!(&end, Some(f) if f.code == ErrorCode::ShuttingDown);
    if !draining {
        for room in std::mem::take(&mut conn.rooms) {
            server.inner.hub.leave(&room, &conn.id, &conn.outbox).await;
        }
    }
    // What is still queued for us leaves the server's budget.
    conn.outbox.drain(&mut rx);
    if let Some(f) = &end {
        server.inner.hub.count_error(f.code);
        server.inner.hub.count_kick(f.code);
        tracing::debug!(peer = %conn.id, code = %f.code, "closing: {}", f.message);
        let frame = encode(&ServerMsg::Error { code: f.code, message: f.message.clone() });
        let close = CloseFrame {
            code: match f.code {
                ErrorCode::ShuttingDown => close_code::AWAY,
                ErrorCode::UnsupportedVersion | ErrorCode::HelloRequired => close_code::PROTOCOL,
                _ => close_code::POLICY,
            },
            reason: f.code.as_str().into(),
        };
        let goodbye = async {
            ws.send(Message::Text(frame)).await?;
            ws.send(Message::Close(Some(close))).await
        };
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
    }
    drop(ws);
    if draining {
        drain(&server, &conn).await;
    }
    server.inner.hub.disconnected();
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
pub(crate) async fn refuse_origin(mut ws: WebSocket, origin: &str) {
    tracing::debug!(%origin, "origin not allowed");
    let frame = encode(&ServerMsg::Error {
        code: ErrorCode::OriginNotAllowed,
        message: format!("pages from {origin} may not use this server"),
    });
    let close = CloseFrame { code: close_code::POLICY, reason: ErrorCode::OriginNotAllowed.as_str().into() };
    let goodbye = async {
        ws.send(Message::Text(frame)).await?;
        ws.send(Message::Close(Some(close))).await
    };
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
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

    async fn handle_text(&mut self, text: &str) -> Result<(), Failure> {
        let limits = self.server.inner.config.limits;
        if !self.admit()? {
            return Ok(());
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
            return self.relay(r);
        }
        let (msg, ty) =
            crate::frame::parse_client_frame(text).map_err(|(code, message)| Failure::new(code, message))?;
        if !self.greeted && !matches!(msg, ClientMsg::Hello { .. } | ClientMsg::Unknown) {
            return Err(Failure::new(ErrorCode::HelloRequired, "send hello first"));
        }
        self.dispatch(msg, ty).await
    }

    /// A `signal` or `send`, read on the fast path: delivered as the
    /// client wrote its payload, with `from` stamped.
    fn relay(&self, r: crate::frame::Relay<'_>) -> Result<(), Failure> {
        let hub = &self.server.inner.hub;
        let frame = Utf8Bytes::from(r.frame);
        match r.to {
            Some(to) => {
                hub.send_to(&r.room, &self.id, &PeerId::from_server(to.into_owned()), frame)?;
                let counter = if r.signal { &hub.signals_relayed } else { &hub.messages_relayed };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => hub.broadcast(&r.room, &self.id, frame)?,
        }
        Ok(())
    }

    async fn dispatch(&mut self, msg: ClientMsg, ty: String) -> Result<(), Failure> {
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
            ClientMsg::Signal { room, to, signal } => {
                let frame = encode(&ServerMsg::Signal { room: room.clone(), from: self.id.clone(), signal });
                hub.send_to(&room, &self.id, &to, frame)?;
                hub.signals_relayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ClientMsg::Send { room, to, data } => {
                let frame = encode(&ServerMsg::Message { room: room.clone(), from: self.id.clone(), data });
                match to {
                    Some(to) => {
                        hub.send_to(&room, &self.id, &to, frame)?;
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
        Ok(())
    }
}
