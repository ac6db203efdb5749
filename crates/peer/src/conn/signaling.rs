//! Signaling of one connection: the SDPs it authenticates (pairing keys or
//! a room secret) and the signaling channel connected peers use instead of
//! the server (PROTOCOL.md "Signaling between connected peers").

use std::time::Instant;

use peerlink_proto::{Signal, SignalAuth};
use str0m::channel::ChannelId;

use super::{ConnEvent, ConnOutput, ConnState, PeerConn, first_mid, signal_kind};
use crate::auth::SignalKeys;
use crate::error::Error;
use crate::path::Failure;

/// The label of the channel on which connected peers signal to each other
/// (PROTOCOL.md "Signaling between connected peers"): the side that makes
/// the first offer opens it; it is never shown to the application.
pub const SIGNAL_LABEL: &str = "peerlink-signal";

/// A message on the signaling channel (PROTOCOL.md "Signaling between
/// connected peers"; `fixtures/peer/signal-channel.json`).
#[derive(Debug, PartialEq)]
pub(super) enum ChannelSignal {
    /// The sender reads signals on the channel.
    Hello,
    /// An offer, answer, candidate or end-of-candidates, as through the server.
    Signal(Signal),
    /// Unreadable, or a kind this version does not know.
    Ignored(String),
}

impl ChannelSignal {
    pub(super) const HELLO: &'static [u8] = br#"{"kind":"hello"}"#;

    pub(super) fn parse(data: &[u8]) -> ChannelSignal {
        let value: serde_json::Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => return ChannelSignal::Ignored(format!("unreadable message: {e}")),
        };
        if value.get("kind").and_then(|k| k.as_str()) == Some("hello") {
            return ChannelSignal::Hello;
        }
        match serde_json::from_value::<Signal>(value) {
            Ok(Signal::Unknown) => ChannelSignal::Ignored("a signal kind this version does not know".into()),
            Ok(signal) => ChannelSignal::Signal(signal),
            Err(e) => ChannelSignal::Ignored(format!("unreadable signal: {e}")),
        }
    }
}

/// What to do with an offer or answer, as its `auth` says.
pub(super) enum Auth {
    /// Apply it; record its sequence number (if it carries one) once applied.
    Apply(Option<u64>),
    /// Authentic but older than one applied: ignore it.
    Stale,
}

/// The way a signal travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// Through the signaling server.
    Server,
    /// On the connection's own signaling channel.
    Channel(ChannelId),
}

impl PeerConn {
    /// Authenticate every offer and answer from now on, both ways. Set it
    /// before the first offer or answer.
    pub fn set_keys(&mut self, keys: SignalKeys) {
        self.keys = Some(keys);
    }

    /// Wraps an outgoing SDP, with `auth` when the connection has keys.
    pub(super) fn sdp_signal(&mut self, kind: &str, sdp: String) -> Signal {
        if self.mid.is_none() {
            self.mid = first_mid(&sdp);
        }
        if self.fingerprints.0.is_none()
            && let Some(fp) = crate::e2e::sdp_fingerprint(&sdp)
        {
            self.fingerprints.0 = Some(fp.to_string());
        }
        let auth = self.keys.as_ref().map(|k| k.sign(kind, self.send_seq, &sdp));
        if auth.is_some() {
            self.send_seq += 1;
        }
        if kind == "offer" { Signal::Offer { sdp, auth } } else { Signal::Answer { sdp, auth } }
    }

    /// Checks an incoming SDP's `auth` when the connection has keys.
    /// `Apply(seq)`: authentic and newer than any applied (or no keys);
    /// record `seq` with [`PeerConn::applied`] once the SDP is applied, not
    /// when it is ignored in a collision. `Stale`: an authentic SDP older
    /// than one applied (it came the slow way: through the server while a
    /// later one came on the signaling channel, or the server replayed it),
    /// to ignore. One that is not authentic closes the connection for good.
    pub(super) fn check_auth(
        &mut self,
        kind: &str,
        sdp: &str,
        auth: Option<&SignalAuth>,
    ) -> Result<Auth, Error> {
        let Some(keys) = &self.keys else { return Ok(Auth::Apply(None)) };
        let reason = match auth {
            None => format!("the {kind} carries no authentication"),
            Some(a) if !keys.verify(kind, sdp, a) => {
                format!("the {kind} was modified in transit (its MAC does not match)")
            }
            Some(a) if self.recv_seq.is_some_and(|last| a.seq <= last) => {
                tracing::debug!(
                    peer = %self.remote,
                    "ignoring an {kind} older than one applied (sequence {} after {:?})",
                    a.seq,
                    self.recv_seq
                );
                return Ok(Auth::Stale);
            }
            Some(a) => return Ok(Auth::Apply(Some(a.seq))),
        };
        tracing::warn!(peer = %self.remote, "refusing signal: {reason}");
        self.out.push_back(ConnOutput::Event(ConnEvent::AuthFailed(reason.clone())));
        self.fail(Failure::Unauthenticated(reason.clone()));
        Err(Error::Unauthenticated { peer: self.remote.clone(), reason })
    }

    /// An authenticated SDP with sequence `seq` is being applied: older
    /// ones are ignored from now on.
    pub(super) fn applied(&mut self, seq: Option<u64>) {
        if seq.is_some() {
            self.recv_seq = seq;
        }
    }

    /// The signaling channel, when signals can go there: the connection is
    /// up and the remote said it reads it. (While the path is down, the
    /// channel is down with it: signals go through the server.)
    pub(super) fn channel_if_up(&self) -> Option<Via> {
        if self.state != ConnState::Connected || !self.remote_reads_channel {
            return None;
        }
        self.signal_channels.first().map(|id| Via::Channel(*id))
    }

    /// Sends `signal` the way `via` says; through the server if the channel
    /// cannot take it.
    pub(super) fn send_signal(&mut self, signal: Signal, via: Via) -> Via {
        if matches!(signal, Signal::Offer { .. } | Signal::Answer { .. }) {
            tracing::debug!(peer = %self.remote, ?via, "sending {}", signal_kind(&signal));
        }
        if let Via::Channel(id) = via
            && self.signal_channels.contains(&id)
            && let Some(mut ch) = self.rtc.channel(id)
        {
            let text = serde_json::to_string(&signal).expect("signals always serialize");
            match ch.write(false, text.as_bytes()) {
                Ok(true) => {
                    self.channel_signals.0 += 1;
                    return via;
                }
                Ok(false) => {
                    tracing::debug!(peer = %self.remote, "signaling channel full: through the server")
                }
                Err(e) => tracing::debug!(peer = %self.remote, "signaling channel: {e}: through the server"),
            }
        }
        self.out.push_back(ConnOutput::Signal(signal));
        Via::Server
    }

    /// The signaling link to the server was lost and is back: an offer that
    /// went through it may never have arrived.
    pub fn signaling_reset(&mut self) {
        if self.pending.is_some() && self.pending_via == Via::Server {
            self.pending_maybe_lost = true;
            self.negotiate();
        }
    }

    /// Signals sent and received on the signaling channel.
    pub fn channel_signals(&self) -> (u64, u64) {
        self.channel_signals
    }

    /// A message on a signaling channel: a signal, or the remote's hello.
    pub(super) fn on_channel_signal(&mut self, id: ChannelId, data: &[u8], now: Instant) {
        match ChannelSignal::parse(data) {
            ChannelSignal::Hello => self.remote_reads_channel = true,
            ChannelSignal::Signal(signal) => {
                self.channel_signals.1 += 1;
                if let Err(e) = self.handle_signal_via(signal, now, Via::Channel(id)) {
                    tracing::warn!("{e}");
                }
            }
            ChannelSignal::Ignored(why) => {
                tracing::debug!(peer = %self.remote, "signaling channel: {why}: ignored");
            }
        }
    }
}
