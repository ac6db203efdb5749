//! The paired connection under a transfer: meet in the code's room, run the
//! pairing exchange through the server, then connect with authenticated
//! signaling and hand the transfer its two channels.

use std::time::Duration;

use peerlink_pair::{Code, PairError, PairMsg, Pairing, Role};
use peerlink_peer::{
    ChannelSpec, ConnState, ConnectOptions, DataChannel, Event, Message, PeerId, Room, SignalKeys,
};
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
    /// Both channels to the paired peer are open.
    Open { ctl: DataChannel, data: DataChannel },
    /// A control message from the paired peer.
    Ctl(String),
    /// A data frame from the paired peer.
    Data(Vec<u8>),
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
}

/// How many opening pairing messages from peers other than the one being
/// paired with are kept for later (see `Pairer::waiting`), and how many
/// room members a receiver keeps in mind to try.
const MAX_WAITING: usize = 16;

/// What a pairing message says when the other side found tampering.
const TAMPER_PREFIX: &str = "tampering detected: ";

/// The task that owns the room: pairs, connects and forwards what happens.
struct Pairer {
    room: Room,
    role: Role,
    code: Code,
    /// The peer being paired with, and the exchange.
    pairing: Option<(PeerId, Pairing)>,
    /// The peer paired with, once the keys are known.
    paired: Option<PeerId>,
    /// When the current pairing attempt started.
    pairing_since: Option<tokio::time::Instant>,
    /// A pairing attempt the other side does not complete in this time is
    /// dropped, so that a peer that joins the code's room and goes quiet
    /// cannot hold the transfer up.
    pairing_timeout: Duration,
    /// Opening messages from peers that wanted to pair while we were busy
    /// with another, oldest first: when that one goes quiet or leaves, the
    /// next is taken up where it left off.
    waiting: Vec<(PeerId, PairMsg)>,
    /// Room members in join order (the server lists the longest present
    /// first), and those we have tried pairing with: a receiver that finds
    /// a quiet peer where the sender should be tries the next.
    members: Vec<PeerId>,
    tried: Vec<PeerId>,
    ctl: Option<DataChannel>,
    data: Option<DataChannel>,
}

/// The paired connection, driven by its own task so that waiting for its
/// next event can be abandoned at any time (as `select!` does) without
/// losing anything.
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
        // Bounded: when the transfer falls behind, the task stops reading
        // the room, and the room stops reading the network.
        let (tx, events) = mpsc::channel(256);
        let (close, mut close_rx) = oneshot::channel::<()>();
        let mut pairer = Pairer {
            room,
            role,
            code,
            pairing: None,
            paired: None,
            pairing_since: None,
            pairing_timeout,
            waiting: Vec::new(),
            members: Vec::new(),
            tried: Vec::new(),
            ctl: None,
            data: None,
        };
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = pairer.next() => {
                        let end = ev.is_err();
                        if let Err(e) = &ev {
                            // Whatever ended it, the other side is told why
                            // rather than left waiting.
                            pairer.abort(e).await;
                        }
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
    async fn tell(&self, peer: &PeerId, msg: &PairMsg) {
        if let Err(e) = self.room.send_via_server(Some(peer), msg.to_json()).await {
            tracing::debug!("pairing message not sent: {e}");
        }
    }

    async fn start_pairing(&mut self, peer: PeerId) {
        let (pairing, first) = Pairing::start(self.role, &self.code);
        self.tell(&peer, &first).await;
        if !self.tried.contains(&peer) {
            self.tried.push(peer.clone());
        }
        self.pairing = Some((peer, pairing));
        self.pairing_since = Some(tokio::time::Instant::now());
    }

    /// Tells the peer being paired or paired with that we are giving up.
    async fn abort(&mut self, e: &LinkError) {
        let peer = self.paired.clone().or_else(|| self.pairing.as_ref().map(|(p, _)| p.clone()));
        let Some(peer) = peer else { return };
        let reason = match e {
            LinkError::Tampered(r) => format!("{TAMPER_PREFIX}{r}"),
            LinkError::WrongCode(_) => "the codes do not match".to_string(),
            LinkError::Failed(r) => r.clone(),
        };
        tracing::debug!(%peer, "telling the other side: {reason}");
        self.tell(&peer, &PairMsg::PairAbort { reason }).await;
    }

    /// The peer being paired with said nothing for too long: take up the
    /// next that asked, or (as the receiver, with nobody else) give up.
    async fn pairing_timed_out(&mut self) -> Result<LinkEvent, LinkError> {
        let quiet = self.pairing.as_ref().map(|(p, _)| p.clone());
        tracing::info!(peer = ?quiet, "pairing timed out");
        self.reset();
        if let Some(ev) = self.take_up_waiting().await? {
            return Ok(ev);
        }
        let secs = self.pairing_timeout.as_secs();
        if self.role == Role::Joiner {
            let untried = self.members.iter().find(|p| !self.tried.contains(p)).cloned();
            if let Some(next) = untried {
                self.start_pairing(next).await;
                return Ok(LinkEvent::Notice(format!(
                    "a peer in the code's room did not complete pairing within {secs} s; trying the next"
                )));
            }
            return Err(LinkError::Failed(format!(
                "the peer in the code's room did not complete pairing within {secs} s"
            )));
        }
        Ok(LinkEvent::Notice(format!(
            "a peer in the code's room did not complete pairing within {secs} s; still waiting for the receiver"
        )))
    }

    /// Starts pairing with the first peer that asked while we were busy,
    /// answering the opening message it sent then.
    async fn take_up_waiting(&mut self) -> Result<Option<LinkEvent>, LinkError> {
        if self.waiting.is_empty() {
            return Ok(None);
        }
        let (peer, msg) = self.waiting.remove(0);
        tracing::debug!(%peer, "pairing with a peer that asked earlier");
        self.start_pairing(peer.clone()).await;
        Ok(Some(self.on_pair_message(peer, msg).await?.unwrap_or(LinkEvent::PeerSeen)))
    }

    fn reset(&mut self) {
        self.pairing_since = None;
        self.pairing = None;
        self.paired = None;
        self.ctl = None;
        self.data = None;
    }

    /// The next thing that happens; an error ends the transfer. Not safe to
    /// abandon midway: only the task calls it.
    async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            let deadline = self.pairing_since.map(|t| t + self.pairing_timeout);
            // Messages are read once both channels are open (and `Open`
            // was handed out), so none overtakes it.
            let (ctl, data) = match (&self.ctl, &self.data) {
                (Some(c), Some(d)) => (Some(c.clone()), Some(d.clone())),
                _ => (None, None),
            };
            let ev = tokio::select! {
                ev = self.room.next_event() => ev,
                Some(m) = async { ctl.as_ref()?.recv().await }, if ctl.is_some() => match m {
                    Message::Text(t) => return Ok(LinkEvent::Ctl(t)),
                    m => { tracing::debug!("unexpected control message {m:?}: ignored"); continue; }
                },
                Some(m) = async { data.as_ref()?.recv().await }, if data.is_some() => match m {
                    Message::Binary(b) => return Ok(LinkEvent::Data(b)),
                    m => { tracing::debug!("unexpected data message {m:?}: ignored"); continue; }
                },
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => return self.pairing_timed_out().await,
            };
            let Some(ev) = ev else {
                return Err(LinkError::Failed("the signaling connection closed".into()));
            };
            match ev {
                Event::PeerJoined { peer, .. } => {
                    if self.members.len() < MAX_WAITING {
                        self.members.push(peer.clone());
                    }
                    if self.pairing.is_none() && self.paired.is_none() {
                        self.start_pairing(peer.clone()).await;
                        return Ok(LinkEvent::PeerSeen);
                    }
                    tracing::debug!(%peer, "another peer joined the code's room: ignored");
                }
                Event::ServerMessage { from, data } => {
                    let Some(msg) = PairMsg::from_json(&data) else { continue };
                    if let Some(ev) = self.on_pair_message(from, msg).await? {
                        return Ok(ev);
                    }
                }
                Event::ChannelOpen { channel } if Some(channel.peer()) == self.paired.as_ref() => {
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
                    if Some(&peer) == self.paired.as_ref() =>
                {
                    let why =
                        self.room.stats(&peer).await.ok().and_then(|s| s.failure).map(|f| f.to_string());
                    self.reset();
                    if let Some(why) = why {
                        return Ok(LinkEvent::Lost(format!("connection failed: {why}")));
                    }
                    return Ok(LinkEvent::Lost(format!(
                        "connection {}",
                        format!("{state:?}").to_lowercase()
                    )));
                }
                Event::StateChanged { peer, state } => tracing::debug!(%peer, ?state, "connection state"),
                Event::PeerLeft { peer } => {
                    let ours = Some(&peer) == self.paired.as_ref()
                        || self.pairing.as_ref().is_some_and(|(p, _)| *p == peer);
                    self.waiting.retain(|(p, _)| *p != peer);
                    self.members.retain(|p| *p != peer);
                    self.tried.retain(|p| *p != peer);
                    if ours {
                        let was_paired = self.paired.is_some();
                        self.reset();
                        if !was_paired && let Some(ev) = self.take_up_waiting().await? {
                            return Ok(ev);
                        }
                        return Ok(LinkEvent::Lost("the other side left".into()));
                    }
                }
                Event::AuthFailed { peer, reason } => {
                    tracing::debug!(%peer, "signaling failed authentication: {reason}");
                    return Err(LinkError::Tampered(reason));
                }
                Event::Closed { reason } => return Err(LinkError::Failed(format!("signaling: {reason}"))),
                Event::ServerError { code, message } => tracing::warn!(%code, "server: {message}"),
                _ => {}
            }
        }
    }

    async fn on_pair_message(&mut self, from: PeerId, msg: PairMsg) -> Result<Option<LinkEvent>, LinkError> {
        let kind = match &msg {
            PairMsg::PairPake { .. } => "pake",
            PairMsg::PairConfirm { .. } => "confirm",
            PairMsg::PairAbort { .. } => "abort",
        };
        let pairing = self.pairing.as_ref().map(|(p, _)| p);
        tracing::debug!(%from, kind, ?pairing, paired = ?self.paired, "pairing message");
        let ours =
            self.paired.as_ref() == Some(&from) || self.pairing.as_ref().is_some_and(|(p, _)| *p == from);
        if let (PairMsg::PairAbort { reason }, true) = (&msg, ours) {
            return Err(match reason.strip_prefix(TAMPER_PREFIX) {
                Some(r) => LinkError::Tampered(format!("the other side detected it: {r}")),
                None if reason.contains("codes do not match") => LinkError::WrongCode(
                    "the other side has a different code; this code is no longer valid".into(),
                ),
                None => LinkError::Failed(format!("the other side stopped: {reason}")),
            });
        }
        let fresh_pake = matches!(msg, PairMsg::PairPake { .. });
        match &self.pairing {
            Some((p, _)) if *p == from => {}
            // The peer we were connected to starts over (its connection
            // broke): pair again.
            None if fresh_pake && (self.paired.is_none() || self.paired.as_ref() == Some(&from)) => {
                self.reset();
                self.start_pairing(from.clone()).await;
            }
            _ if fresh_pake => {
                // Someone else wants to pair while we are busy: keep its
                // opening in case the one we are pairing with goes quiet.
                self.waiting.retain(|(p, _)| *p != from);
                if self.paired.is_none() && self.waiting.len() < MAX_WAITING {
                    tracing::debug!(%from, "a second peer wants to pair: kept for later");
                    self.waiting.push((from, msg));
                }
                return Ok(None);
            }
            _ => {
                tracing::debug!(%from, "pairing message from a peer we are not pairing with: ignored");
                return Ok(None);
            }
        }
        let (peer, pairing) = self.pairing.as_mut().expect("set above");
        let peer = peer.clone();
        let handled = pairing.handle(msg);
        let keys = pairing.keys().cloned();
        match handled {
            Ok(reply) => {
                if let Some(reply) = reply {
                    self.tell(&peer, &reply).await;
                }
                let Some(keys) = keys else { return Ok(None) };
                self.pairing_since = None;
                self.pairing = None;
                self.paired = Some(peer.clone());
                // A connection left from an earlier pairing with this peer
                // has the old keys: start afresh.
                let _ = self.room.disconnect(&peer).await;
                let channels = if self.role == Role::Joiner { channel_specs() } else { Vec::new() };
                let keys = SignalKeys { local: keys.sdp_local, remote: keys.sdp_remote };
                self.room
                    .connect(&peer, ConnectOptions { channels, keys: Some(keys) })
                    .await
                    .map_err(|e| LinkError::Failed(e.to_string()))?;
                Ok(Some(LinkEvent::Paired))
            }
            Err(PairError::WrongCode) => {
                tracing::debug!(%peer, "key confirmation failed");
                Err(LinkError::WrongCode(
                    "the other side typed a different code (a typo, or someone guessing); this code is no longer valid"
                        .into(),
                ))
            }
            Err(PairError::Aborted(reason)) => {
                Err(LinkError::Failed(format!("the other side stopped: {reason}")))
            }
            Err(e) => Err(LinkError::Failed(e.to_string())),
        }
    }
}
