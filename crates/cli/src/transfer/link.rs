//! The paired connection under a transfer: meet in the code's room, pair
//! through the server ([`peerlink_pair::Session`] decides with whom), then
//! connect with authenticated signaling and hand the transfer its two
//! channels. The transfer reads the channels itself.

use std::time::Duration;

use peerlink_pair::{Abort, Code, PairMsg, Role, Session, SessionEvent, SessionOutput};
use peerlink_peer::{ChannelSpec, ConnState, ConnectOptions, DataChannel, Event, PeerId, Room, SignalKeys};
use peerlink_transfer::{CTL_LABEL, DATA_LABEL};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Something the transfer layer acts on.
#[derive(Debug)]
pub enum LinkEvent {
    /// A peer is in the room; pairing with it has started.
    PeerSeen,
    /// Pairing succeeded; connecting.
    Paired,
    /// Both channels to the paired peer are open: read and write them.
    Open { ctl: DataChannel, data: DataChannel },
    /// The paired peer left or the connection to it broke.
    Lost(String),
    /// Something the user should know that does not change the state, such
    /// as a peer in the room that never completed pairing.
    Notice(String),
}

/// Why a link cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("wrong code: {0}")]
    WrongCode(String),
    #[error("the session was tampered with: {0}")]
    Tampered(String),
    #[error("{0}")]
    Failed(String),
}

impl LinkError {
    /// Security failures have their own exit code.
    pub fn is_security(&self) -> bool {
        matches!(self, LinkError::WrongCode(_) | LinkError::Tampered(_))
    }

    /// How the end of a pairing session reads to the user.
    fn ended(reason: Abort, by_peer: bool, timeout: Duration) -> LinkError {
        match (reason, by_peer) {
            (Abort::WrongCode, false) => LinkError::WrongCode(
                "the other side typed a different code (a typo, or someone guessing); this code is no longer valid"
                    .into(),
            ),
            (Abort::WrongCode, true) => {
                LinkError::WrongCode("the other side has a different code; this code is no longer valid".into())
            }
            (Abort::Tampered(why), false) => LinkError::Tampered(why),
            (Abort::Tampered(why), true) => LinkError::Tampered(format!("the other side detected it: {why}")),
            (Abort::Timeout, _) => LinkError::Failed(format!(
                "the peer in the code's room did not complete pairing within {} s",
                timeout.as_secs()
            )),
            (Abort::Failed(why), true) => LinkError::Failed(format!("the other side stopped: {why}")),
            (Abort::Failed(why), false) => LinkError::Failed(why),
            (other, _) => LinkError::Failed(other.to_string()),
        }
    }
}

/// The task that owns the room: runs the pairing session, connects, and
/// reports what happens.
struct Pairer {
    room: Room,
    role: Role,
    session: Session<PeerId>,
    timeout: Duration,
    ctl: Option<DataChannel>,
    data: Option<DataChannel>,
}

/// The paired connection, driven by its own task so that waiting for its
/// next event can be abandoned at any time (as `select!` does) without
/// losing anything. Only room events pass through the task; the transfer
/// reads its channels directly.
pub struct Link {
    events: mpsc::Receiver<Result<LinkEvent, LinkError>>,
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// Starts pairing in `room` as `role` with `code`; a peer that does not
    /// complete pairing within `pairing_timeout` is given up on.
    pub fn start(room: Room, role: Role, code: Code, pairing_timeout: Duration) -> Link {
        let (tx, events) = mpsc::channel(16);
        let (close, mut close_rx) = oneshot::channel::<()>();
        let mut pairer = Pairer {
            room,
            role,
            session: Session::new(role, code, pairing_timeout),
            timeout: pairing_timeout,
            ctl: None,
            data: None,
        };
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = pairer.next() => {
                        let end = ev.is_err();
                        if tx.send(ev).await.is_err() || end {
                            break;
                        }
                    }
                    _ = &mut close_rx => break,
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), pairer.room.leave()).await;
        });
        Link { events, close: Some(close), task }
    }

    /// The next thing that happens; an error ends the transfer. Safe to
    /// abandon and call again.
    pub async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(LinkError::Failed("the connection task stopped".into())),
        }
    }

    /// Leaves the room, giving queued messages a moment to go out.
    pub async fn close(mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.task).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
    }
}

/// The channels a transfer uses; the receiver opens them.
pub fn channel_specs() -> Vec<ChannelSpec> {
    vec![ChannelSpec::reliable(CTL_LABEL), ChannelSpec::reliable(DATA_LABEL)]
}

impl Pairer {
    /// Carries out what the session asks, until it reports something.
    async fn run_session(&mut self) -> Option<Result<LinkEvent, LinkError>> {
        while let Some(out) = self.session.poll_output() {
            match out {
                SessionOutput::Send { to, msg } => {
                    if let Err(e) = self.room.send_via_server(Some(&to), msg.to_json()).await {
                        tracing::debug!("pairing message not sent: {e}");
                    }
                }
                SessionOutput::Connect { peer, keys } => {
                    // A connection left from an earlier pairing with this
                    // peer has the old keys: start afresh.
                    let _ = self.room.disconnect(&peer).await;
                    self.ctl = None;
                    self.data = None;
                    let channels = if self.role == Role::Joiner { channel_specs() } else { Vec::new() };
                    let keys = SignalKeys { local: keys.sdp_local, remote: keys.sdp_remote };
                    if let Err(e) =
                        self.room.connect(&peer, ConnectOptions { channels, keys: Some(keys) }).await
                    {
                        self.session.abort(Abort::Failed(e.to_string()));
                    }
                }
                SessionOutput::Event(ev) => {
                    return Some(match ev {
                        SessionEvent::PeerSeen { .. } => Ok(LinkEvent::PeerSeen),
                        SessionEvent::Paired { .. } => Ok(LinkEvent::Paired),
                        SessionEvent::Notice(n) => Ok(LinkEvent::Notice(n.to_string())),
                        SessionEvent::PeerGone { .. } => {
                            self.ctl = None;
                            self.data = None;
                            Ok(LinkEvent::Lost("the other side left".into()))
                        }
                        SessionEvent::Ended { reason, by_peer } => {
                            Err(LinkError::ended(reason, by_peer, self.timeout))
                        }
                        other => {
                            tracing::debug!("pairing: {other:?}");
                            continue;
                        }
                    });
                }
            }
        }
        None
    }

    /// The next thing that happens; an error ends the transfer. Not safe to
    /// abandon midway: only the task calls it.
    async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            if let Some(ev) = self.run_session().await {
                return ev;
            }
            let deadline = self.session.poll_timeout();
            let ev = tokio::select! {
                ev = self.room.next_event() => ev,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.session.handle_timeout(std::time::Instant::now());
                    continue;
                }
            };
            let now = std::time::Instant::now();
            let Some(ev) = ev else {
                self.session.abort(Abort::Failed("the signaling connection closed".into()));
                continue;
            };
            let paired = self.session.paired().cloned();
            match ev {
                Event::PeerJoined { peer, .. } => self.session.peer_joined(peer, now),
                Event::PeerLeft { peer } => self.session.peer_left(&peer, now),
                Event::ServerMessage { from, data } => {
                    if let Some(msg) = PairMsg::from_json(&data) {
                        self.session.handle_message(from, msg, now);
                    }
                }
                Event::ChannelOpen { channel } if Some(channel.peer()) == paired.as_ref() => {
                    match channel.label() {
                        CTL_LABEL => self.ctl = Some(channel),
                        DATA_LABEL => self.data = Some(channel),
                        _ => {}
                    }
                    if let (Some(ctl), Some(data)) = (&self.ctl, &self.data) {
                        return Ok(LinkEvent::Open { ctl: ctl.clone(), data: data.clone() });
                    }
                }
                Event::StateChanged { peer, state: state @ (ConnState::Failed | ConnState::Closed) }
                    if Some(&peer) == paired.as_ref() =>
                {
                    let why = self.room.stats(&peer).await.ok().and_then(|s| s.failure);
                    self.session.connection_lost(&peer);
                    self.ctl = None;
                    self.data = None;
                    return Ok(LinkEvent::Lost(match why {
                        Some(why) => format!("connection failed: {why}"),
                        None => format!("connection {}", format!("{state:?}").to_lowercase()),
                    }));
                }
                Event::StateChanged { peer, state } => tracing::debug!(%peer, ?state, "connection state"),
                Event::AuthFailed { peer, reason } => {
                    tracing::debug!(%peer, "signaling failed authentication: {reason}");
                    self.session.abort(Abort::Tampered(reason));
                }
                Event::Closed { reason } => self.session.abort(Abort::Failed(format!("signaling: {reason}"))),
                Event::ServerError { code, message } => tracing::warn!(%code, "server: {message}"),
                _ => {}
            }
        }
    }
}
