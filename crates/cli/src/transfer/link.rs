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
    /// Starts pairing in `room` as `role` with `code`.
    pub fn start(room: Room, role: Role, code: Code) -> Link {
        // Bounded: when the transfer falls behind, the task stops reading
        // the room, and the room stops reading the network.
        let (tx, events) = mpsc::channel(256);
        let (close, mut close_rx) = oneshot::channel::<()>();
        let mut pairer = Pairer { room, role, code, pairing: None, paired: None, ctl: None, data: None };
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
        self.pairing = Some((peer, pairing));
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

    fn reset(&mut self) {
        self.pairing = None;
        self.paired = None;
        self.ctl = None;
        self.data = None;
    }

    /// The next thing that happens; an error ends the transfer. Not safe to
    /// abandon midway: only the task calls it.
    async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            let Some(ev) = self.room.next_event().await else {
                return Err(LinkError::Failed("the signaling connection closed".into()));
            };
            match ev {
                Event::PeerJoined { peer, .. } => {
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
                Event::Message { peer, message, label } if Some(&peer) == self.paired.as_ref() => {
                    match (label.as_str(), message) {
                        (CTL_LABEL, Message::Text(t)) => return Ok(LinkEvent::Ctl(t)),
                        (DATA_LABEL, Message::Binary(b)) => return Ok(LinkEvent::Data(b)),
                        (l, m) => tracing::debug!(label = l, "unexpected message {m:?}: ignored"),
                    }
                }
                Event::StateChanged { peer, state: state @ (ConnState::Failed | ConnState::Closed) }
                    if Some(&peer) == self.paired.as_ref() =>
                {
                    self.reset();
                    return Ok(LinkEvent::Lost(format!(
                        "connection {}",
                        format!("{state:?}").to_lowercase()
                    )));
                }
                Event::StateChanged { peer, state } => tracing::debug!(%peer, ?state, "connection state"),
                Event::PeerLeft { peer } => {
                    let ours = Some(&peer) == self.paired.as_ref()
                        || self.pairing.as_ref().is_some_and(|(p, _)| *p == peer);
                    if ours {
                        self.reset();
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
