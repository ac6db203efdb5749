//! The tokio driver of a joined room: owns the UDP sockets, the signaling
//! link and the clock, feeds the room's logic ([`Mesh`]) and carries out
//! what it asks.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use peerlink_proto::{ClientMsg, ErrorCode, PeerId, ServerMsg};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::channel::{EVENT_BYTES_PAUSE, RoomWake};
use crate::event::Event;
use crate::mesh::{Mesh, MeshOutput};
use crate::room::Command;
use crate::signaling::{JoinSpec, Signaling, WsStream};
use crate::stream::{StreamEvent, Streams};
use crate::udp::Udp;

/// Backlogged events above which the driver stops reading datagrams.
const BACKLOG_PAUSE: usize = 64;
/// Receive calls (each up to a few datagrams, or GRO runs of them) handled
/// per wake-up before the driver looks at its other inputs.
const RECV_BATCH: usize = 16;
/// Bytes of datagrams held while a channel's receive queue is full (about
/// what the socket's receive buffer holds, which took them before).
const HELD_DATA_BYTES: usize = 4 << 20;
/// Room kept in the signaling queue (and among the messages held while
/// reconnecting) for the room's own signals: past it the application's
/// messages through the server are refused ([`crate::Error::SignalingBusy`])
/// rather than fill it, which would end the room.
const SIGNALING_RESERVE: usize = 128;
/// Interval of application pings keeping the signaling link alive.
const SIGNALING_PING: Duration = Duration::from_secs(15);
/// How long a send waits for a full socket buffer before the datagram is
/// dropped (SCTP retransmits it).
pub(crate) const SEND_WAIT: Duration = Duration::from_millis(100);
/// How long the application gets to take each last event after the room
/// closed.
const LAST_EVENTS_WAIT: Duration = Duration::from_secs(5);
/// How long closing waits for the signaling socket to take what is queued.
const LEAVE_FLUSH_WAIT: Duration = Duration::from_secs(2);
/// Signaling messages held while reconnecting (no more than the outgoing
/// queue takes at once); beyond it the newest are dropped, so an offer is
/// never lost to the candidates that follow it.
const HELD_SIGNALING: usize = 512;

/// How the driver gets back to a signaling server that went away.
#[derive(Debug)]
pub(crate) struct Reconnect {
    pub spec: JoinSpec,
    pub id: PeerId,
    /// The latest `welcome.resume`; without one there is no reconnecting.
    pub resume: Option<String>,
    /// How long reconnecting may take before the room ends; zero: never try.
    pub window: Duration,
}

/// The signaling link of the moment.
struct Link {
    incoming: SplitStream<WsStream>,
    outgoing: mpsc::Sender<ClientMsg>,
    writer: tokio::task::JoinHandle<()>,
}

pub(crate) struct Driver {
    pub mesh: Mesh,
    pub wake: Arc<RoomWake>,
    pub udp: Udp,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    /// Events the application has not taken yet; while it holds
    /// [`BACKLOG_PAUSE`] or more the driver does not read the network.
    pub backlog: VecDeque<Event>,
    /// What the backlog's events hold ([`Event::size`]).
    pub backlog_bytes: usize,
    /// Callers of [`Room::leave`](crate::Room::leave), answered once the
    /// signaling socket has been flushed and closed.
    pub leave_replies: Vec<oneshot::Sender<()>>,
    /// The emulated WAN datagrams go through first, if any.
    pub netem: Option<crate::netem::Link>,
    /// Connections to TURN servers over TCP or TLS.
    pub streams: Streams,
    pub reconnect: Reconnect,
    /// Signaling the room sent while reconnecting (bounded).
    pub held: VecDeque<ClientMsg>,
    /// Datagrams that carry data, held while a receive queue is full.
    pub held_data: HeldData,
}

/// While a channel's receive queue is full the room stops taking data, not
/// the network: a datagram that carries DTLS (the channels' data) waits
/// here, in arrival order and up to [`HELD_DATA_BYTES`] (beyond, it is
/// dropped, as a full socket buffer drops it, and SCTP sends it again),
/// while STUN (ICE checks and their answers, TURN) is handled as it comes.
/// So an application that stops reading a channel slows its sender down
/// without either side taking the pause for a dead path: both go on hearing
/// each other's ICE checks. (A TURN Data indication is STUN on the outside
/// and handled too: SCTP data inside one still reaches a full queue, which
/// takes it above its bound, as data SCTP already reassembled does.)
#[derive(Default)]
pub(crate) struct HeldData {
    queue: VecDeque<(usize, std::net::SocketAddr, Vec<u8>)>,
    bytes: usize,
    dropped: u64,
}

impl HeldData {
    /// Whether `datagram` carries DTLS, directly or in TURN ChannelData
    /// (first byte 0x40-0x4F, then a 4-byte header; RFC 7983, RFC 8656).
    fn carries_data(datagram: &[u8]) -> bool {
        crate::conn::is_dtls(datagram)
            || (datagram.first().is_some_and(|b| (0x40..=0x4f).contains(b))
                && datagram.get(4..).is_some_and(crate::conn::is_dtls))
    }

    fn hold(&mut self, socket: usize, source: std::net::SocketAddr, datagram: &[u8]) {
        if self.bytes + datagram.len() > HELD_DATA_BYTES {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::debug!(
                    dropped = self.dropped,
                    "a receive queue is full and {HELD_DATA_BYTES} bytes are held: datagram dropped"
                );
            }
            return;
        }
        self.bytes += datagram.len();
        self.queue.push_back((socket, source, datagram.to_vec()));
    }

    fn pop(&mut self) -> Option<(usize, std::net::SocketAddr, Vec<u8>)> {
        let held = self.queue.pop_front()?;
        self.bytes -= held.2.len();
        Some(held)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

impl Driver {
    fn emit(&mut self, ev: Event) {
        let size = ev.size();
        if self.backlog.is_empty() {
            // Counted before it can be taken (and the count taken back).
            self.wake.event_bytes.fetch_add(size, Ordering::AcqRel);
            match self.events.try_send(ev) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.wake.event_bytes.fetch_sub(size, Ordering::AcqRel);
                    self.backlog.push_back(ev);
                }
            }
        } else {
            self.backlog.push_back(ev);
        }
        self.backlog_bytes += size;
    }

    /// Whether the application has fallen behind on its events: then the
    /// driver takes nothing more from the network or the signaling server
    /// (each would bring more), so what waits for it stays bounded, in
    /// events and in bytes.
    fn events_full(&self) -> bool {
        self.backlog.len() >= BACKLOG_PAUSE
            || self.backlog_bytes + self.wake.event_bytes.load(Ordering::Acquire) >= EVENT_BYTES_PAUSE
    }

    /// Hands the backlog on while the application's queue has room.
    fn hand_on_backlog(&mut self) {
        while let Some(ev) = self.backlog.pop_front() {
            let size = ev.size();
            self.wake.event_bytes.fetch_add(size, Ordering::AcqRel);
            match self.events.try_send(ev) {
                Ok(()) => self.backlog_bytes -= size,
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.wake.event_bytes.fetch_sub(size, Ordering::AcqRel);
                    self.backlog.push_front(ev);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    self.backlog_bytes = 0;
                    break;
                }
            }
        }
    }

    /// Whether the application keeps up with what the network brings.
    /// While leaving it always reads: the application, which gave up its
    /// `Room`, no longer takes events, but the peers' acknowledgements the
    /// leave waits for arrive as datagrams (what arrives meanwhile is held
    /// for at most the linger).
    fn can_read(&self) -> bool {
        self.reads_network() && !self.holds_data()
    }

    /// Whether datagrams are read: while the application takes its events
    /// (a full receive queue holds the data, [`HeldData`], and no more).
    fn reads_network(&self) -> bool {
        self.mesh.is_leaving() || !self.events_full()
    }

    /// Whether datagrams that carry data wait in [`HeldData`]: while a
    /// channel's receive queue is full.
    fn holds_data(&self) -> bool {
        !self.mesh.is_leaving() && self.mesh.receivers_full()
    }

    /// Hands the mesh what was held, in order, until a receive queue is
    /// full again.
    async fn replay_held(&mut self, signaling: Option<&mpsc::Sender<ClientMsg>>) {
        while !self.holds_data()
            && let Some((socket, source, datagram)) = self.held_data.pop()
        {
            self.mesh.handle_datagram(Instant::now(), socket, source, &datagram);
            self.flush(signaling).await;
        }
    }

    /// Carries out everything the room asked for; signaling is held while
    /// there is no link (`None`).
    async fn flush(&mut self, signaling: Option<&mpsc::Sender<ClientMsg>>) {
        while let Some(out) = self.mesh.poll_output() {
            match out {
                MeshOutput::Transmit { socket, to, data } => match &mut self.netem {
                    Some(link) => link.send(Instant::now(), socket, to, data),
                    None => {
                        self.udp.send(socket, to, &data).await;
                        self.mesh.recycle(data);
                    }
                },
                MeshOutput::Signaling(msg) => {
                    let unsent = match signaling {
                        None => Some(msg),
                        Some(tx) => match tx.try_send(msg) {
                            Ok(()) => None,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.mesh.fail("signaling server is not reading");
                                None
                            }
                            // The link broke: its end shows on the incoming
                            // side, and a reconnect sends what was held.
                            Err(mpsc::error::TrySendError::Closed(msg)) => Some(msg),
                        },
                    };
                    if let Some(msg) = unsent {
                        if self.held.len() < HELD_SIGNALING {
                            self.held.push_back(msg);
                        } else {
                            tracing::warn!(
                                "signaling message dropped: {HELD_SIGNALING} held while reconnecting"
                            );
                        }
                    }
                }
                MeshOutput::StreamConnect { stream, from, server, tls_name } => {
                    self.streams.connect(stream, from, server, tls_name)
                }
                MeshOutput::StreamSend { stream, data } => self.streams.send(stream, &data),
                MeshOutput::StreamClose { stream } => self.streams.close(stream),
                MeshOutput::Event(ev) => self.emit(ev),
            }
        }
    }

    fn on_stream(&mut self, ev: StreamEvent, now: Instant) {
        match ev {
            StreamEvent::Connected { stream, local } => self.mesh.stream_connected(now, stream, local),
            StreamEvent::Frame { stream, data } => self.mesh.handle_stream(now, stream, &data),
            StreamEvent::Failed { stream, why } => {
                self.streams.ended(stream);
                self.mesh.stream_failed(now, stream, why);
            }
        }
    }

    fn on_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Connect { peer, options, reply } => {
                let _ = reply.send(self.mesh.connect(peer, options, now));
            }
            Command::Disconnect { peer, reply } => {
                self.mesh.disconnect(&peer);
                let _ = reply.send(());
            }
            Command::RestartIce { peer, reply } => {
                let _ = reply.send(self.mesh.restart_ice(&peer, now));
            }
            Command::OpenChannel { peer, spec, reply } => {
                let _ = reply.send(self.mesh.open_channel(&peer, spec, now));
            }
            // Taken in the loop, where the signaling link is and its room
            // is checked; here only if that ever changes.
            Command::ServerSend { to, data, reply } => {
                self.mesh.send_via_server(to, data);
                let _ = reply.send(Ok(()));
            }
            Command::Stats { peer, reply } => {
                let _ = reply.send(self.mesh.stats(&peer));
            }
            Command::Gathering { reply } => {
                let _ = reply.send(self.mesh.gathering());
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.mesh.members());
            }
            Command::Leave { reply } => {
                self.mesh.leave(now);
                self.leave_replies.push(reply);
            }
            Command::Broadcast { data, reply } => {
                let _ = reply.send(self.mesh.broadcast(data, now));
            }
            Command::Send { peer, data, reply } => {
                let _ = reply.send(self.mesh.send_to(peer, data, now));
            }
            Command::OverlayStats { reply } => {
                let _ = reply.send(self.mesh.overlay_stats());
            }
            Command::OverlayHops { peer, reply } => {
                let _ = reply.send(self.mesh.overlay_hops(&peer));
            }
        }
    }

    pub async fn run(
        mut self,
        incoming: SplitStream<WsStream>,
        signaling: mpsc::Sender<ClientMsg>,
        writer: tokio::task::JoinHandle<()>,
    ) {
        let mut link = Some(Link { incoming, outgoing: signaling, writer });
        let mut rejoining: Option<tokio::task::JoinHandle<Result<Signaling, crate::Error>>> = None;
        let mut bufs = self.udp.recv_bufs();
        let mut ping = tokio::time::interval(SIGNALING_PING);
        let wake = self.wake.clone();
        let events = self.events.clone();
        let reason = loop {
            self.mesh.handle_timeout(Instant::now());
            self.flush(link.as_ref().map(|l| &l.outgoing)).await;
            if let Some(link) = &mut self.netem {
                let now = Instant::now();
                while let Some((socket, to, data)) = link.pop_due(now) {
                    self.udp.send(socket, to, &data).await;
                }
            }
            // Datagrams are gathered while a batch is handled, and leave
            // together before the driver waits.
            self.udp.flush().await;
            if let Some(reason) = self.mesh.take_closing() {
                break reason;
            }
            let deadline = self.mesh.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            // What was held goes first, once there is room for it.
            if !self.held_data.is_empty() && !self.holds_data() {
                self.replay_held(link.as_ref().map(|l| &l.outgoing)).await;
            }
            let read_net = self.reads_network();
            let read_signaling = read_net;
            // TURN over TCP / TLS: its frames are not held, the stream waits.
            let read_streams = self.can_read();
            let netem_due = self.netem.as_ref().and_then(|l| l.next_due());
            let netem_sleep = async {
                match netem_due {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let next_frame = async {
                match &mut link {
                    Some(l) => l.incoming.next().await,
                    None => std::future::pending().await,
                }
            };
            let rejoined = async {
                match &mut rejoining {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            };
            // What ended the link, if something did.
            let mut lost: Option<String> = None;
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(Command::ServerSend { to, data, reply }) => {
                        let room_for_it = match &link {
                            Some(l) => l.outgoing.capacity() > SIGNALING_RESERVE,
                            None => self.held.len() + SIGNALING_RESERVE < HELD_SIGNALING,
                        };
                        let _ = reply.send(if room_for_it {
                            self.mesh.send_via_server(to, data);
                            Ok(())
                        } else {
                            Err(crate::Error::SignalingBusy)
                        });
                    }
                    Some(cmd) => self.on_command(cmd, Instant::now()),
                    None => break "room handle dropped".to_string(),
                },
                permit = events.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        let ev = self.backlog.pop_front().expect("non-empty");
                        let size = ev.size();
                        self.backlog_bytes -= size;
                        self.wake.event_bytes.fetch_add(size, Ordering::AcqRel);
                        permit.send(ev);
                        self.hand_on_backlog();
                    }
                    Err(_) => break "room handle dropped".to_string(),
                },
                frame = next_frame, if read_signaling => match frame {
                    Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ServerMsg>(t.as_str()) {
                        Ok(ServerMsg::Error { code: ErrorCode::ShuttingDown, message }) if self.can_reconnect() => {
                            lost = Some(format!("shutting_down: {message}"));
                        }
                        Ok(msg) => self.mesh.handle_server(msg, Instant::now()),
                        Err(e) => tracing::warn!("unreadable message from server: {e}"),
                    },
                    Some(Ok(WsMessage::Close(_))) | None => lost = Some("signaling server closed the connection".into()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => lost = Some(format!("signaling connection lost: {e}")),
                },
                done = rejoined => {
                    rejoining = None;
                    match done {
                        Ok(Ok(sig)) => {
                            tracing::info!(peer = %sig.id, "signaling: back in the room");
                            self.reconnect.resume = sig.resume.or(self.reconnect.resume.take());
                            let now = Instant::now();
                            // Held signals belong to the connections a kept
                            // place keeps; without it they go with them.
                            let held = std::mem::take(&mut self.held);
                            if sig.resumed {
                                for msg in held {
                                    if sig.outgoing.try_send(msg).is_err() {
                                        tracing::warn!("a signaling message held during the reconnect was dropped");
                                    }
                                }
                            } else {
                                tracing::info!("signaling: our place in the room was gone; joining afresh");
                            }
                            self.mesh.rejoined(sig.peers, sig.size, sig.resumed, now);
                            self.emit(Event::Reconnected { server: sig.url.clone() });
                            link = Some(Link { incoming: sig.incoming, outgoing: sig.outgoing, writer: sig.writer });
                        }
                        Ok(Err(e)) => break format!("signaling lost, and no server took us back: {e}"),
                        Err(e) => break format!("signaling reconnect failed: {e}"),
                    }
                },
                r = poll_fn(|cx| self.udp.poll_recv(cx, &mut bufs)), if read_net => match r {
                    Ok(mut got) => {
                        // Each read is timed when it returns: SCTP times a
                        // SACK with it, and a read after a batch handled
                        // for milliseconds timed as of the first would
                        // measure round trips shorter than the path.
                        let mut now = Instant::now();
                        for round in 1..=RECV_BATCH {
                            // Every datagram read is handled (a datagram
                            // taken off the socket and then dropped is a
                            // loss SCTP has to repair), even if the
                            // application falls behind meanwhile: a receive
                            // call brings a bounded few.
                            for (source, datagram) in bufs.datagrams(got.count) {
                                // Data behind data that waits, waits too.
                                if (self.holds_data() || !self.held_data.is_empty())
                                    && HeldData::carries_data(datagram)
                                {
                                    self.held_data.hold(got.socket, source, datagram);
                                    continue;
                                }
                                self.mesh.handle_datagram(now, got.socket, source, datagram);
                                self.flush(link.as_ref().map(|l| &l.outgoing)).await;
                            }
                            if round == RECV_BATCH || !self.reads_network() {
                                break;
                            }
                            match self.udp.try_recv(got.socket, &mut bufs) {
                                Some(more) => {
                                    got = more;
                                    now = Instant::now();
                                }
                                None => break,
                            }
                        }
                    }
                    Err(e) => tracing::debug!("udp receive: {e}"),
                },
                Some(ev) = self.streams.events.recv(), if read_streams => self.on_stream(ev, Instant::now()),
                _ = wake.notify.notified() => {
                    // Channels queued messages, or a receive queue drained.
                    self.mesh.channels_ready(wake.take_ready());
                }
                _ = ping.tick() => {
                    if let Some(l) = &link
                        && l.outgoing.try_send(ClientMsg::Ping { nonce: None }).is_err()
                    {
                        tracing::debug!("signaling ping not queued");
                    }
                }
                _ = sleep => {}
                // Due datagrams go out at the top of the loop.
                _ = netem_sleep => {}
            }
            if let Some(why) = lost {
                if !self.can_reconnect() {
                    break why;
                }
                tracing::info!("{why}: reconnecting");
                // The old link's writer ends once its queue is dropped.
                link = None;
                let (spec, id) = (self.reconnect.spec.clone(), self.reconnect.id.clone());
                let resume = self.reconnect.resume.clone().unwrap_or_default();
                let window = self.reconnect.window;
                rejoining =
                    Some(tokio::spawn(
                        async move { crate::signaling::rejoin(&spec, &id, &resume, window).await },
                    ));
            }
        };
        if let Some(task) = rejoining.take() {
            task.abort();
        }
        tracing::debug!(peer = ?self.mesh, "room closing: {reason}");
        self.mesh.close(reason, Instant::now());
        self.flush(link.as_ref().map(|l| &l.outgoing)).await;
        self.udp.flush().await;
        // Everything queued for the server goes out before a leave returns:
        // a last `pair_abort` must not lose the race with the socket's close.
        let leave_replies = std::mem::take(&mut self.leave_replies);
        if let Some(Link { mut incoming, outgoing, writer }) = link {
            drop(outgoing);
            // Then read until the server closes too: a socket closed with unread
            // data is reset, and a reset makes the server's kernel throw away
            // what it received but the server has not read yet.
            let drained = tokio::time::timeout(LEAVE_FLUSH_WAIT, async {
                let _ = writer.await;
                while let Some(Ok(_)) = incoming.next().await {}
            });
            if drained.await.is_err() {
                tracing::debug!("signaling close not completed in {LEAVE_FLUSH_WAIT:?}");
            }
        }
        for reply in leave_replies {
            let _ = reply.send(());
        }
        // Hand the application what is left, without waiting forever on it.
        let backlog = std::mem::take(&mut self.backlog);
        drop(self);
        for ev in backlog {
            wake.event_bytes.fetch_add(ev.size(), Ordering::AcqRel);
            if tokio::time::timeout(LAST_EVENTS_WAIT, events.send(ev)).await.is_err() {
                break;
            }
        }
    }

    /// Whether a lost signaling link is worth reconnecting: a resume token,
    /// a window, and not on our way out.
    fn can_reconnect(&self) -> bool {
        self.reconnect.resume.is_some() && !self.reconnect.window.is_zero() && !self.mesh.is_leaving()
    }
}
