//! One peer connection without I/O: str0m plus perfect negotiation and
//! channel bookkeeping. Datagrams, signals and time go in; datagrams, signals,
//! events and the next deadline come out.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerlink_proto::{PeerId, Signal};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, CandidateKind, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

use crate::auth::SignalKeys;
use crate::channel::ChannelSpec;
use crate::error::Error;
use crate::path::{self, Endpoint, Failure, Path};

mod signaling;
#[cfg(test)]
mod tests;

pub use signaling::SIGNAL_LABEL;
use signaling::{Auth, ChannelSignal, Via};

/// The message size a peer may send when the remote SDP names none (RFC 8841).
const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_536;
/// Remote candidates held while no remote description is set.
const MAX_EARLY_CANDIDATES: usize = 64;
/// Distinct remote candidate addresses a connection takes over its life
/// (each ICE restart brings a few): a peer sending more on the signaling
/// channel, which no server rate limit covers, is refused.
pub(crate) const MAX_REMOTE_CANDIDATES: usize = 1024;

/// An offer through the server that has had no answer for this long is
/// taken as lost (the server may drop a message for a member that is
/// reconnecting) and made again.
const OFFER_LOST_AFTER: Duration = Duration::from_secs(15);

/// Connection state as the application sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// Negotiating and checking candidates.
    Connecting,
    /// ICE, DTLS and SCTP are up.
    Connected,
    /// The selected path stopped answering; it may come back.
    Disconnected,
    /// No path was found in time, or the connection broke for good.
    Failed,
    /// Closed locally or by the remote.
    Closed,
}

/// What a [`PeerConn`] reports.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    State(ConnState),
    ChannelOpen {
        id: ChannelId,
        label: String,
        spec: ChannelSpec,
    },
    ChannelData {
        id: ChannelId,
        binary: bool,
        data: Vec<u8>,
    },
    ChannelClose {
        id: ChannelId,
    },
    /// A channel's send buffer drained below the low-water mark.
    Writable,
    /// An offer or answer failed authentication: the connection is closed.
    AuthFailed(String),
    Stats {
        rtt: Option<Duration>,
        path: Option<Path>,
    },
}

/// What [`PeerConn::poll_output`] hands the driver.
#[derive(Debug)]
pub(crate) enum ConnOutput {
    Transmit { source: SocketAddr, destination: SocketAddr, contents: Vec<u8> },
    Signal(Signal),
    Event(ConnEvent),
    Timeout(Instant),
}

/// Tunables of one connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    /// How long negotiation plus connectivity checks may take.
    pub connect_timeout: Duration,
    /// How often str0m reports RTT and the selected pair.
    pub stats_interval: Duration,
    /// The DTLS certificate, generated once per room: generating one takes
    /// tens of milliseconds, which would otherwise add to every connect.
    pub dtls_cert: Option<str0m::config::DtlsCert>,
    /// A connection disconnected this long gets an ICE restart (and another
    /// every this long while it stays down).
    pub restart_after: Duration,
    /// A connection disconnected this long has failed for good.
    pub give_up_after: Duration,
    /// Nothing heard from the remote for this long (ICE keepalives arrive
    /// every second) counts as disconnected, well before ICE's own checks
    /// give up.
    pub silence: Duration,
}

/// Generates a DTLS certificate with the default crypto provider.
pub(crate) fn generate_dtls_cert() -> Option<str0m::config::DtlsCert> {
    str0m::crypto::from_feature_flags().dtls_provider.generate_certificate()
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            connect_timeout: Duration::from_secs(15),
            stats_interval: Duration::from_millis(500),
            dtls_cert: None,
            restart_after: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
            silence: Duration::from_millis(2500),
        }
    }
}

pub(crate) struct PeerConn {
    rtc: Rtc,
    remote: PeerId,
    /// On an offer collision the polite side rolls back its own offer; the
    /// impolite side ignores the incoming one (the W3C "perfect negotiation").
    polite: bool,
    /// Our outstanding offer and the channels it carries.
    pending: Option<(SdpPendingOffer, Vec<(ChannelId, ChannelSpec)>)>,
    /// The outstanding offer restarts ICE.
    pending_restart: bool,
    /// The way the outstanding offer went.
    pending_via: Via,
    /// The outstanding offer went through the server and may have been lost
    /// with the signaling link (it reconnected since).
    pending_maybe_lost: bool,
    /// Open signaling channels (normally one; two if both sides opened one
    /// in an offer collision). We send on the first, read every one.
    signal_channels: Vec<ChannelId>,
    /// We opened a signaling channel (in our first offer).
    signal_channel_asked: bool,
    /// The remote said hello on a signaling channel: it reads signals there.
    remote_reads_channel: bool,
    /// The way our last offer or answer went; candidates follow it.
    sdp_via: Via,
    /// Our last SDP was an answer.
    last_sent_answer: bool,
    /// The way the remote's last offer came; our answer goes back that way.
    offer_via: Via,
    /// Signals sent on the signaling channel, and received there.
    channel_signals: (u64, u64),
    /// The remote's ICE username fragment, from its last SDP: an offer with
    /// another restarts ICE.
    remote_ufrag: Option<String>,
    /// The offer being handled restarts ICE.
    remote_restarted: bool,
    /// Channels asked for but not yet handed to str0m.
    wanted: Vec<ChannelSpec>,
    /// Channels handed to str0m, until they open.
    creating: HashMap<ChannelId, ChannelSpec>,
    open: HashMap<ChannelId, ChannelSpec>,
    restart_wanted: bool,
    have_remote_description: bool,
    early_candidates: Vec<Candidate>,
    /// The session id of the remote's SDP (`o=` line): another one is
    /// another peer connection, not a renegotiation of this one.
    remote_session: Option<String>,
    remote_max_message_size: usize,
    state: ConnState,
    ever_connected: bool,
    connect_deadline: Option<Instant>,
    restart_after: Duration,
    give_up_after: Duration,
    /// Latest time seen in any input.
    last_now: Instant,
    /// When the current outage began (ICE reported disconnected).
    down_since: Option<Instant>,
    /// When we last sent an offer or answered one.
    last_offer_at: Option<Instant>,
    /// ICE restarts made, for diagnostics.
    restarts: u32,
    /// Keys that authenticate offers and answers, for paired peers.
    keys: Option<SignalKeys>,
    /// The DTLS fingerprints of our SDP and theirs (the safety number).
    fingerprints: (Option<String>, Option<String>),
    /// Sequence number of our next authenticated offer or answer.
    send_seq: u64,
    /// Highest sequence number accepted from the remote.
    recv_seq: Option<u64>,
    out: VecDeque<ConnOutput>,
    /// Our candidates in SDP attribute form, trickled after our first offer
    /// or answer (str0m also lists them in the SDP).
    local_candidates: Vec<String>,
    /// The media id of our data m-line, from our first offer or answer:
    /// trickled candidates carry it (W3C stacks refuse a candidate without).
    mid: Option<String>,
    trickled: bool,
    /// Every local candidate is known (STUN and TURN have answered).
    gathering_done: bool,
    /// Our relayed addresses (a path through one is a relayed path).
    relayed: Vec<SocketAddr>,
    /// Kinds of the remote candidates we were told about.
    remote_kinds: HashMap<SocketAddr, CandidateKind>,
    /// Remote addresses not yet handed to the driver (TURN permissions).
    new_remote_ips: Vec<IpAddr>,
    silence: Duration,
    /// Last datagram from the remote.
    last_heard: Instant,
    /// The outage was seen by our silence watch, not by ICE.
    silent: bool,
    /// Why the connection failed, once it has.
    failure: Option<Failure>,
    /// ICE's own view, for failure reasons.
    ice_state: IceConnectionState,
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConn").field("remote", &self.remote).field("state", &self.state).finish()
    }
}

/// SCTP's receive window, and the largest message this side accepts
/// (`a=max-message-size`). str0m sizes sctp-proto's receive buffer as
/// max(max-message-size, 1 MiB), so raising the one raises the other; the
/// window bounds the data in flight to one round trip, and 1 MiB is 10 MB/s
/// at 100 ms; 4 MiB allows 40 MB/s there. A browser reads the larger
/// `a=max-message-size` as leave to send us messages up to 4 MiB (if its own
/// limit allows), which we can reassemble: no message is larger than the
/// window. What a connection holds for an application that does not read
/// is still bounded by the window.
const RECEIVE_WINDOW: usize = 4 << 20;

/// The largest UDP payload a connection sends. str0m's default (1,150)
/// leaves SCTP 1,062 bytes of user data per packet; every packet costs CPU
/// on both sides (a DTLS record, a checksum, a system call's share, the
/// bookkeeping of a chunk), so bigger packets move more per CPU-second.
/// 1,228 is the most that still fits the smallest path IPv6 allows (1,280
/// bytes: 40 of IPv6 header, 8 of UDP) even relayed through a TURN channel
/// (4 bytes of ChannelData), so no path needs fragmentation or discovery:
/// DTLS handshake flights are cut to it, and str0m, which reserves 88 bytes
/// for SCTP and DTLS overhead, gives SCTP 1,140 bytes of data per packet in
/// datagrams of 1,205 (a DTLS record with AES-GCM adds 37 bytes). Chromium
/// does the same arithmetic (libwebrtc's `kSctpMtu`: 1,191-byte SCTP
/// packets, 1,228-byte datagrams).
pub(crate) const DATAGRAM_MAX: usize = 1228;

/// SCTP's send buffer. str0m counts data as buffered until the peer
/// acknowledges it, so this is also the most data in flight: its 128 KiB
/// default lets a 64 KiB message out only when 64 KiB or less is
/// outstanding, one per round trip. The peer's receive window plus 2 MiB
/// keeps a full window of ours in flight (a native peer's is
/// [`RECEIVE_WINDOW`]) with more waiting behind it. str0m also refuses
/// single writes larger than this.
const SCTP_SEND_BUFFER: usize = RECEIVE_WINDOW + (2 << 20);

/// The most one channel may have in SCTP's send buffer, unless it has
/// nothing there: the rest is kept for the other channels, so a chat
/// message beside a bulk transfer is taken at once (and, with the vendored
/// sctp-proto's turns, sent after at most one bulk message) instead of
/// waiting in peerlink's queue for the buffer to drain.
const CHANNEL_SHARE: usize = SCTP_SEND_BUFFER - (256 << 10);

impl PeerConn {
    /// A connection to `remote` using `locals` as host candidates.
    pub fn new(
        remote: PeerId,
        polite: bool,
        locals: &[SocketAddr],
        config: &ConnConfig,
        now: Instant,
    ) -> Self {
        let mut builder = Rtc::builder().set_stats_interval(Some(config.stats_interval));
        if let Some(cert) = &config.dtls_cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        // ICE checks a working pair every max-RTO: once a second keeps the
        // silence watch meaningful on an idle connection.
        builder.set_max_stun_rto(Duration::from_secs(1));
        // A first check that a TURN server drops (its permission is still on
        // the way) is retried after 100 ms rather than 250.
        builder.set_initial_stun_rto(Duration::from_millis(100));
        // No codecs: a browser that adds a camera or a microphone gets its
        // audio and video m-lines rejected (port 0) and keeps its data
        // channels with us; nothing is sent to a peer that cannot play it.
        let builder = builder
            .clear_codecs()
            .set_sctp_max_buffered_amount(SCTP_SEND_BUFFER)
            .set_sctp_max_message_size(RECEIVE_WINDOW as u32)
            .set_mtu(DATAGRAM_MAX..=DATAGRAM_MAX);
        let mut rtc = builder.build(now);
        let mut local_candidates = Vec::new();
        for addr in locals {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    if let Some(c) = rtc.add_local_candidate(c) {
                        local_candidates.push(c.to_sdp_string());
                    }
                }
                Err(e) => tracing::warn!(%addr, "unusable local address: {e}"),
            }
        }
        PeerConn {
            rtc,
            remote,
            polite,
            pending: None,
            pending_restart: false,
            pending_via: Via::Server,
            pending_maybe_lost: false,
            signal_channels: Vec::new(),
            signal_channel_asked: false,
            remote_reads_channel: false,
            sdp_via: Via::Server,
            last_sent_answer: false,
            offer_via: Via::Server,
            channel_signals: (0, 0),
            remote_ufrag: None,
            remote_restarted: false,
            wanted: Vec::new(),
            creating: HashMap::new(),
            open: HashMap::new(),
            restart_wanted: false,
            have_remote_description: false,
            early_candidates: Vec::new(),
            remote_session: None,
            remote_max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            state: ConnState::Connecting,
            ever_connected: false,
            connect_deadline: Some(now + config.connect_timeout),
            restart_after: config.restart_after,
            give_up_after: config.give_up_after,
            last_now: now,
            down_since: None,
            last_offer_at: None,
            restarts: 0,
            keys: None,
            fingerprints: (None, None),
            send_seq: 0,
            recv_seq: None,
            out: VecDeque::from([ConnOutput::Event(ConnEvent::State(ConnState::Connecting))]),
            local_candidates,
            mid: None,
            trickled: false,
            gathering_done: false,
            relayed: Vec::new(),
            remote_kinds: HashMap::new(),
            new_remote_ips: Vec::new(),
            silence: config.silence,
            last_heard: now,
            silent: false,
            failure: None,
            ice_state: IceConnectionState::New,
        }
    }

    /// Adds a candidate found after the connection was made (server-
    /// reflexive or relayed); trickled at once if our first description went
    /// out already.
    pub fn add_local_candidate(&mut self, c: Candidate) {
        if c.kind() == CandidateKind::Relayed {
            self.relayed.push(c.addr());
        }
        let Some(c) = self.rtc.add_local_candidate(c) else { return };
        let sdp = c.to_sdp_string();
        if self.trickled {
            let signal = Signal::Candidate { candidate: sdp.clone(), mid: self.mid.clone() };
            let _ = self.send_signal(signal, self.sdp_via);
        }
        self.local_candidates.push(sdp);
    }

    /// Every local candidate is known: end-of-candidates can go out.
    pub fn gathering_complete(&mut self) {
        if !self.gathering_done {
            self.gathering_done = true;
            if self.trickled {
                let _ = self.send_signal(Signal::EndOfCandidates, self.sdp_via);
            }
        }
    }

    /// Remote addresses learned since the last call (for TURN permissions).
    pub fn take_remote_ips(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.new_remote_ips)
    }

    /// Why the connection failed, if it has.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Remote candidates we were told about.
    pub fn remote_candidates(&self) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = self
            .remote_kinds
            .iter()
            .map(|(addr, k)| Endpoint { kind: path::CandidateKind::from_str0m(*k), addr: *addr })
            .collect();
        v.sort_by_key(|e| (e.kind.as_str(), e.addr));
        v
    }

    fn learn_remote(&mut self, c: &Candidate) {
        let addr = c.addr();
        if self.remote_kinds.insert(addr, c.kind()).is_none() && !self.new_remote_ips.contains(&addr.ip()) {
            self.new_remote_ips.push(addr.ip());
        }
    }

    /// Whether `sdp` comes from another peer connection than the one this
    /// connection negotiated with (the remote closed that one and started
    /// anew, before we noticed): then this connection must be replaced.
    pub fn is_new_session(&self, sdp: &str) -> bool {
        match (&self.remote_session, sdp_session_id(sdp)) {
            (Some(known), Some(id)) => known != id,
            _ => false,
        }
    }

    fn learn_remote_sdp(&mut self, sdp: &str) {
        if self.remote_session.is_none() {
            self.remote_session = sdp_session_id(sdp).map(str::to_string);
        }
        if let Some(ufrag) = sdp_ice_ufrag(sdp) {
            self.remote_ufrag = Some(ufrag.to_string());
        }
        for line in sdp.lines() {
            if let Some(attr) = line.trim().strip_prefix("a=")
                && attr.starts_with("candidate:")
                && let Ok(c) = Candidate::from_sdp_string(attr)
            {
                self.learn_remote(&c);
            }
        }
    }

    fn path(&self, local: SocketAddr, remote: SocketAddr) -> Path {
        let local_kind =
            if self.relayed.contains(&local) { CandidateKind::Relayed } else { CandidateKind::Host };
        let remote_kind = self.remote_kinds.get(&remote).copied().unwrap_or(CandidateKind::PeerReflexive);
        Path::new(
            Endpoint { kind: path::CandidateKind::from_str0m(local_kind), addr: local },
            Endpoint { kind: path::CandidateKind::from_str0m(remote_kind), addr: remote },
        )
    }

    fn fail(&mut self, reason: Failure) {
        if self.failure.is_none() {
            self.failure = Some(reason);
        }
        self.set_state(ConnState::Failed);
        self.rtc.disconnect();
    }

    /// When this side should next restart ICE, while the connection is down.
    /// The impolite side goes first; the polite side only steps in if no
    /// restart arrived (its peer may not restart on its own). Perfect
    /// negotiation copes if both offer at once.
    /// While an offer through the server is out, the next one waits for
    /// its answer (or [`OFFER_LOST_AFTER`]).
    fn restart_due(&self) -> Option<Instant> {
        let since = self.down_since?;
        if self.restart_wanted {
            // Asked for, behind the offer that is out: due when that offer
            // counts as lost (negotiate() then replaces it).
            return match (&self.pending, self.pending_via) {
                (Some(_), Via::Server) => Some(self.last_offer_at.unwrap_or(since) + OFFER_LOST_AFTER),
                (Some(_), Via::Channel(_)) if self.state != ConnState::Connected => Some(since),
                _ => None,
            };
        }
        let wait = if self.polite { self.restart_after * 2 } else { self.restart_after };
        let last = self.last_offer_at.map_or(since, |o| o.max(since));
        match (&self.pending, self.pending_via) {
            (Some(_), Via::Server) => Some(last + OFFER_LOST_AFTER.max(wait)),
            _ => Some(last + wait),
        }
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    /// ICE restarts this connection has made.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Largest message the remote accepts in one write.
    pub fn max_message_size(&self) -> usize {
        self.remote_max_message_size.min(SCTP_SEND_BUFFER)
    }

    /// Restarts ICE: now, or once the offer that is out is answered.
    pub fn restart_ice(&mut self) {
        self.restarts += 1;
        self.restart_wanted = true;
        self.negotiate();
    }

    /// Asks for a new data channel; negotiates if needed.
    pub fn open_channel(&mut self, spec: ChannelSpec) {
        self.wanted.push(spec);
        self.negotiate();
    }

    /// Makes an offer if something needs negotiating and no offer is out.
    fn negotiate(&mut self) {
        if self.state == ConnState::Closed {
            return;
        }
        if self.pending.is_some() {
            // An offer is out. Its answer will come on the way it went, which
            // is ordered and reliable: a second offer now would get an answer
            // too, and the first answer would be taken for the second's. So
            // a restart waits for the answer, unless the offer may be lost
            // (it went through a server link that broke since, or nothing
            // came back for a long time).
            let lost = match self.pending_via {
                Via::Server => {
                    self.pending_maybe_lost
                        || self.last_offer_at.is_some_and(|t| self.last_now >= t + OFFER_LOST_AFTER)
                }
                // On the channel, over a path that went down: a restart
                // cannot wait for it.
                Via::Channel(_) => self.restart_wanted && self.state != ConnState::Connected,
            };
            if !lost {
                return;
            }
            tracing::debug!(peer = %self.remote, "our offer had no answer: offering again");
            if let Some((_, added)) = self.pending.take() {
                self.wanted.splice(0..0, added.into_iter().map(|(_, spec)| spec));
            }
            self.restart_wanted |= std::mem::take(&mut self.pending_restart);
        }
        self.pending_maybe_lost = false;
        if self.wanted.is_empty() && !self.restart_wanted {
            return;
        }
        let mut api = self.rtc.sdp_api();
        let mut added = Vec::new();
        if !self.signal_channel_asked && !self.have_remote_description {
            // Our first offer: it opens the signaling channel too.
            self.signal_channel_asked = true;
            let spec = ChannelSpec::reliable(SIGNAL_LABEL);
            added.push((api.add_channel_with_config(spec.to_str0m()), spec));
        }
        for spec in self.wanted.drain(..) {
            let id = api.add_channel_with_config(spec.to_str0m());
            added.push((id, spec));
        }
        let restart = self.restart_wanted;
        if restart {
            api.ice_restart(true);
            self.restart_wanted = false;
        }
        match api.apply() {
            Some((offer, pending)) => {
                let signal = self.sdp_signal("offer", offer.to_sdp_string());
                // On the channel while connected, unless our last SDP was an
                // answer through the server: the offer must not overtake it
                // (the remote, its own offer still out, would ignore ours).
                let via = match (self.last_sent_answer, self.sdp_via) {
                    (true, Via::Server) => Via::Server,
                    _ => self.channel_if_up().unwrap_or(Via::Server),
                };
                let via = self.send_signal(signal, via);
                self.sdp_via = via;
                self.last_sent_answer = false;
                self.pending = Some((pending, added));
                self.pending_restart = restart;
                self.pending_via = via;
                self.last_offer_at = Some(self.last_now);
                self.trickle();
            }
            // Channels after the first go in-band (DCEP): no offer needed.
            None => self.creating.extend(added),
        }
    }

    /// Sends our candidates once, after our first offer or answer, and
    /// end-of-candidates if gathering is over (else when it is).
    fn trickle(&mut self) {
        if self.trickled {
            return;
        }
        self.trickled = true;
        for candidate in self.local_candidates.clone() {
            let _ = self.send_signal(Signal::Candidate { candidate, mid: self.mid.clone() }, self.sdp_via);
        }
        if self.gathering_done {
            let _ = self.send_signal(Signal::EndOfCandidates, self.sdp_via);
        }
    }

    /// Applies a signal from the remote peer that came through the server.
    pub fn handle_signal(&mut self, signal: Signal, now: Instant) -> Result<(), Error> {
        self.handle_signal_via(signal, now, Via::Server)
    }

    fn handle_signal_via(&mut self, signal: Signal, now: Instant, via: Via) -> Result<(), Error> {
        self.last_now = self.last_now.max(now);
        if matches!(signal, Signal::Offer { .. } | Signal::Answer { .. }) {
            tracing::debug!(peer = %self.remote, ?via, "received {}", signal_kind(&signal));
        }
        match signal {
            Signal::Offer { sdp, auth } => {
                let Auth::Apply(seq) = self.check_auth("offer", &sdp, auth.as_ref())? else {
                    return Ok(());
                };
                if self.pending.is_some() && !self.polite {
                    // Glare, and we win: the remote rolls back and answers ours.
                    tracing::debug!(peer = %self.remote, "offer collision: ignoring theirs");
                    return Ok(());
                }
                self.applied(seq);
                let ufrag = sdp_ice_ufrag(&sdp);
                if self.remote_ufrag.is_some() && ufrag.is_some() && self.remote_ufrag.as_deref() != ufrag {
                    // The remote restarts ICE: ours, if wanted, is done by it.
                    self.restart_wanted = false;
                    self.remote_restarted = true;
                }
                self.learn_remote_sdp(&sdp);
                self.offer_via = via;
                self.handle_offer(&sdp, now)
            }
            Signal::Answer { sdp, auth } => {
                let Auth::Apply(seq) = self.check_auth("answer", &sdp, auth.as_ref())? else {
                    return Ok(());
                };
                if self.pending.is_none() {
                    tracing::debug!(peer = %self.remote, "answer without an offer out: ignored");
                    return Ok(());
                }
                if via != self.pending_via {
                    // Answers come back the way their offer went: this one
                    // answers an offer we gave up on.
                    tracing::debug!(peer = %self.remote, ?via, "answer to an earlier offer: ignored");
                    return Ok(());
                }
                self.applied(seq);
                self.learn_remote_sdp(&sdp);
                self.handle_answer(&sdp, now)
            }
            Signal::Candidate { candidate, .. } => {
                // node-datachannel trickles the SDP attribute line itself.
                let candidate = candidate.strip_prefix("a=").unwrap_or(&candidate);
                if is_mdns(candidate) {
                    // A browser's host address behind an mDNS name: we cannot
                    // resolve it, and need not: its connectivity checks reach
                    // us and make a peer-reflexive candidate.
                    tracing::debug!(peer = %self.remote, "skipping mDNS candidate {candidate}");
                    return Ok(());
                }
                let c = Candidate::from_sdp_string(candidate).map_err(|e| Error::BadSignal {
                    peer: self.remote.clone(),
                    reason: format!("candidate: {e}"),
                })?;
                if self.remote_kinds.len() >= MAX_REMOTE_CANDIDATES
                    && !self.remote_kinds.contains_key(&c.addr())
                {
                    return Err(Error::BadSignal {
                        peer: self.remote.clone(),
                        reason: format!(
                            "more than {MAX_REMOTE_CANDIDATES} remote candidates: {candidate} ignored"
                        ),
                    });
                }
                self.learn_remote(&c);
                if self.have_remote_description {
                    self.rtc.add_remote_candidate(c);
                } else if self.early_candidates.len() < MAX_EARLY_CANDIDATES {
                    self.early_candidates.push(c);
                }
                Ok(())
            }
            Signal::EndOfCandidates | Signal::Unknown => Ok(()),
        }
    }

    fn handle_offer(&mut self, sdp: &str, now: Instant) -> Result<(), Error> {
        let offer = SdpOffer::from_sdp_string(sdp)
            .map_err(|e| Error::BadSignal { peer: self.remote.clone(), reason: format!("offer: {e}") })?;
        if let Some((_, added)) = self.pending.take() {
            // Glare, and we yield: accept_offer rolls our offer back; its
            // channels are asked for again once the offer is answered (the
            // signaling channel too: the remote's offer may carry none).
            tracing::debug!(peer = %self.remote, "offer collision: rolling back ours");
            self.wanted.splice(0..0, added.into_iter().map(|(_, spec)| spec));
            // Our restart is done by theirs, if theirs is one.
            self.restart_wanted |= std::mem::take(&mut self.pending_restart) && !self.remote_restarted;
        }
        self.remote_restarted = false;
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| Error::Negotiation { peer: self.remote.clone(), reason: e.to_string() })?;
        self.remote_description_set(sdp, now);
        // Answering counts as negotiating: a restart offer from the remote
        // postpones our own.
        self.last_offer_at = Some(now);
        let signal = self.sdp_signal("answer", answer.to_sdp_string());
        // Back the way the offer came: the remote may not hear the other way
        // (its server link, or the path under the channel, may be down).
        self.sdp_via = self.send_signal(signal, self.offer_via);
        self.last_sent_answer = true;
        self.trickle();
        self.negotiate();
        Ok(())
    }

    fn handle_answer(&mut self, sdp: &str, now: Instant) -> Result<(), Error> {
        let answer = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| Error::BadSignal { peer: self.remote.clone(), reason: format!("answer: {e}") })?;
        let Some((pending, added)) = self.pending.take() else {
            tracing::debug!(peer = %self.remote, "answer without an offer out: ignored");
            return Ok(());
        };
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| Error::Negotiation { peer: self.remote.clone(), reason: e.to_string() })?;
        self.creating.extend(added);
        self.pending_restart = false;
        self.remote_description_set(sdp, now);
        self.negotiate();
        Ok(())
    }

    /// Both DTLS fingerprints (ours, theirs), once known.
    pub fn fingerprints(&self) -> Option<(String, String)> {
        match &self.fingerprints {
            (Some(ours), Some(theirs)) => Some((ours.clone(), theirs.clone())),
            _ => None,
        }
    }

    /// The connection's safety number, once both DTLS fingerprints are known.
    pub fn safety_number(&self) -> Option<String> {
        match &self.fingerprints {
            (Some(ours), Some(theirs)) => Some(crate::e2e::safety_number(ours, theirs)),
            _ => None,
        }
    }

    fn remote_description_set(&mut self, sdp: &str, now: Instant) {
        // The first one only: str0m checks the DTLS certificate against the
        // first remote fingerprint and ignores later ones, so the safety
        // number must not follow a later SDP's line.
        if self.fingerprints.1.is_none()
            && let Some(fp) = crate::e2e::sdp_fingerprint(sdp)
        {
            self.fingerprints.1 = Some(fp.to_string());
        }
        let first = !self.have_remote_description;
        self.have_remote_description = true;
        if first {
            // The remote's checks may have arrived before its answer; ICE
            // queued them. Each timeout answers one queued check and returns
            // early, and ICE paces timeouts Ta (50 ms) apart, so our own first
            // check would wait behind them. Run the queue down now: this was
            // most of the connect time on a direct path.
            for _ in 0..3 {
                if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(peer = %self.remote, "ice timeout: {e}");
                }
            }
        }
        for c in self.early_candidates.drain(..) {
            self.rtc.add_remote_candidate(c);
        }
        if let Some(size) = max_message_size(sdp) {
            self.remote_max_message_size = size;
        }
    }

    /// Whether a datagram from `source` to `destination` belongs to this connection.
    pub fn accepts(&self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) -> bool {
        match Receive::new(Protocol::Udp, source, destination, data) {
            Ok(r) => self.rtc.accepts(&Input::Receive(now, r)),
            Err(_) => false,
        }
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Result<(), Error> {
        self.last_now = self.last_now.max(now);
        let Ok(r) = Receive::new(Protocol::Udp, source, destination, data) else {
            return Ok(());
        };
        self.last_heard = self.last_heard.max(now);
        // A bad or excess datagram is dropped, not fatal: the peer retransmits.
        self.rtc
            .handle_input(Input::Receive(now, r))
            .map_err(|e| Error::Negotiation { peer: self.remote.clone(), reason: e.to_string() })?;
        if self.silent && self.rtc.is_connected() {
            // The path came back before (or without) a restart.
            tracing::info!(peer = %self.remote, "heard from the remote again");
            self.silent = false;
            self.down_since = None;
            self.set_state(ConnState::Connected);
        }
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        self.last_now = self.last_now.max(now);
        if self.state == ConnState::Connected
            && self.down_since.is_none()
            && now >= self.last_heard + self.silence
        {
            tracing::info!(peer = %self.remote, "nothing heard for {:?}: disconnected", self.silence);
            self.silent = true;
            // Restart timers count from when the outage was noticed.
            self.down_since = Some(now);
            self.set_state(ConnState::Disconnected);
        }
        if let Some(since) = self.down_since {
            if now >= since + self.give_up_after {
                tracing::info!(peer = %self.remote, "no path for {:?}: failed", self.give_up_after);
                self.down_since = None;
                self.fail(Failure::Lost { after: self.give_up_after, restarts: self.restarts });
                return Ok(());
            }
            if self.restart_due().is_some_and(|due| now >= due) {
                if !self.restart_wanted {
                    self.restarts += 1;
                    tracing::info!(peer = %self.remote, restarts = self.restarts, "disconnected: restarting ICE");
                    self.restart_wanted = true;
                }
                self.negotiate();
            }
        }
        if let Some(deadline) = self.connect_deadline
            && now >= deadline
            && !self.ever_connected
        {
            self.connect_deadline = None;
            let why = if !self.have_remote_description {
                Failure::NoAnswer
            } else if self.ice_state.is_connected() {
                Failure::Handshake
            } else if self.remote_kinds.is_empty() {
                Failure::NoRemoteCandidates
            } else {
                Failure::ChecksTimedOut
            };
            self.fail(why);
            return Ok(());
        }
        if !self.have_remote_description {
            // ICE paces its checks Ta (50 ms) after the last timeout it saw;
            // a timeout fed before there is anyone to check would delay the
            // first check by that much. Nothing else runs before an offer or
            // answer has been applied.
            return Ok(());
        }
        self.rtc.handle_input(Input::Timeout(now)).map_err(|e| self.broken(e))
    }

    fn broken(&mut self, e: str0m::RtcError) -> Error {
        self.fail(Failure::WebRtc(e.to_string()));
        Error::Negotiation { peer: self.remote.clone(), reason: e.to_string() }
    }

    fn set_state(&mut self, state: ConnState) {
        if state == ConnState::Connected {
            // Connected: the remote has applied our answer (the path needs
            // its credentials and fingerprint), so an offer cannot overtake it.
            self.last_sent_answer = false;
        }
        if state == ConnState::Connected && self.state == ConnState::Disconnected {
            // The path is back: a restart asked for while it was down is
            // not needed any more.
            self.restart_wanted = false;
        }
        if self.state != state && self.state != ConnState::Closed {
            self.state = state;
            self.out.push_back(ConnOutput::Event(ConnEvent::State(state)));
        }
    }

    /// Next thing to do. Call until it returns `Timeout`.
    pub fn poll_output(&mut self) -> ConnOutput {
        loop {
            if let Some(o) = self.out.pop_front() {
                return o;
            }
            if !self.rtc.is_alive() {
                self.set_state(if self.ever_connected { ConnState::Closed } else { ConnState::Failed });
                if let Some(o) = self.out.pop_front() {
                    return o;
                }
                return ConnOutput::Timeout(far_future(self.last_now));
            }
            let output = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    let err = self.broken(e);
                    tracing::warn!("{err}");
                    continue;
                }
            };
            match output {
                Output::Transmit(t) => {
                    return ConnOutput::Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    };
                }
                Output::Timeout(t) => {
                    let mut t = if self.have_remote_description { t } else { far_future(self.last_now) };
                    if let (Some(since), Some(due)) = (self.down_since, self.restart_due()) {
                        t = t.min(due).min(since + self.give_up_after);
                    }
                    if self.state == ConnState::Connected && self.down_since.is_none() {
                        t = t.min(self.last_heard + self.silence);
                    }
                    let t = match self.connect_deadline {
                        Some(d) if !self.ever_connected => t.min(d),
                        _ => t,
                    };
                    return ConnOutput::Timeout(t);
                }
                Output::Event(e) => self.on_rtc_event(e),
            }
        }
    }

    fn on_rtc_event(&mut self, e: RtcEvent) {
        match e {
            RtcEvent::Connected => {
                self.ever_connected = true;
                self.connect_deadline = None;
                self.set_state(ConnState::Connected);
            }
            RtcEvent::IceConnectionStateChange(s) => {
                self.ice_state = s;
                match s {
                    IceConnectionState::Disconnected if self.ever_connected => {
                        self.down_since.get_or_insert(self.last_now);
                        self.set_state(ConnState::Disconnected);
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed if self.ever_connected => {
                        self.down_since = None;
                        self.silent = false;
                        self.set_state(ConnState::Connected);
                    }
                    _ => {}
                }
            }
            RtcEvent::ChannelOpen(id, label) if label == SIGNAL_LABEL => {
                self.creating.remove(&id);
                self.signal_channels.push(id);
                // Tells the remote it may signal here.
                if let Some(mut ch) = self.rtc.channel(id) {
                    match ch.write(false, ChannelSignal::HELLO) {
                        Ok(true) => {}
                        // A new channel's buffer is empty: this does not happen.
                        Ok(false) => {
                            tracing::debug!(peer = %self.remote, "signaling channel hello not taken")
                        }
                        Err(e) => tracing::debug!(peer = %self.remote, "signaling channel hello: {e}"),
                    }
                }
            }
            RtcEvent::ChannelData(d) if self.signal_channels.contains(&d.id) => {
                let now = self.last_now;
                self.on_channel_signal(d.id, &d.data, now);
            }
            RtcEvent::ChannelClose(id) if self.signal_channels.contains(&id) => {
                self.signal_channels.retain(|c| *c != id);
            }
            RtcEvent::ChannelOpen(id, label) => {
                let spec = self.creating.remove(&id).unwrap_or_else(|| {
                    let cfg = self.rtc.channel(id).and_then(|c| c.config().cloned());
                    ChannelSpec::from_str0m(&label, cfg.as_ref())
                });
                if let Some(mut ch) = self.rtc.channel(id) {
                    ch.set_buffered_amount_low_threshold(SCTP_SEND_BUFFER / 2);
                }
                self.open.insert(id, spec.clone());
                self.out.push_back(ConnOutput::Event(ConnEvent::ChannelOpen { id, label, spec }));
            }
            RtcEvent::ChannelData(d) => {
                self.out.push_back(ConnOutput::Event(ConnEvent::ChannelData {
                    id: d.id,
                    binary: d.binary,
                    data: d.data,
                }));
            }
            RtcEvent::ChannelClose(id) if self.open.remove(&id).is_some() => {
                self.out.push_back(ConnOutput::Event(ConnEvent::ChannelClose { id }));
            }
            RtcEvent::ChannelBufferedAmountLow(_) => {
                self.out.push_back(ConnOutput::Event(ConnEvent::Writable));
            }
            RtcEvent::PeerStats(s) => {
                let path = s.selected_candidate_pair.as_ref().map(|p| self.path(p.local.addr, p.remote.addr));
                // Data-only sessions have no RTCP RTT; ICE consent checks measure it.
                let rtt = s
                    .rtt
                    .or_else(|| s.selected_candidate_pair.as_ref().and_then(|p| p.current_round_trip_time));
                self.out.push_back(ConnOutput::Event(ConnEvent::Stats { rtt, path }));
            }
            RtcEvent::Closed => self.set_state(ConnState::Closed),
            _ => {}
        }
    }

    /// Writes one message. `Ok(false)`: the send buffer, or this channel's
    /// share of it, is full: try again
    /// after [`ConnEvent::Writable`] or more input.
    pub fn write(&mut self, id: ChannelId, binary: bool, data: &[u8]) -> Result<bool, Error> {
        let max = self.max_message_size();
        if data.len() > max {
            return Err(Error::MessageTooLarge { size: data.len(), max });
        }
        let Some(mut ch) = self.rtc.channel(id) else {
            return Err(Error::ChannelClosed);
        };
        let buffered = ch.buffered_amount();
        if buffered > 0 && buffered + data.len() > CHANNEL_SHARE {
            return Ok(false);
        }
        ch.write(binary, data)
            .map_err(|e| Error::Negotiation { peer: self.remote.clone(), reason: e.to_string() })
    }

    /// Closes channel `id` (an SCTP stream reset, after what was written to
    /// it): the peer sees it close. No [`ConnEvent::ChannelClose`] follows
    /// for it here.
    pub fn close_channel(&mut self, id: ChannelId) {
        if self.open.remove(&id).is_some() {
            self.rtc.direct_api().close_data_channel(id);
        }
    }

    /// Bytes written to open channels that the peer has not acknowledged
    /// yet (SCTP counts a message as buffered until it is acknowledged).
    pub fn unacknowledged(&mut self) -> usize {
        let ids: Vec<ChannelId> = self.open.keys().copied().collect();
        ids.into_iter().map(|id| self.rtc.channel(id).map_or(0, |mut ch| ch.buffered_amount())).sum()
    }

    pub fn close(&mut self) {
        // Connected: a DTLS close_notify tells the remote at once (polled
        // out like any datagram), rather than its silence timeout later.
        if !(self.state == ConnState::Connected && self.rtc.close().is_ok()) {
            self.rtc.disconnect();
        }
        self.set_state(ConnState::Closed);
    }

    /// Whether the remote's offer or answer has been applied.
    pub fn has_remote_description(&self) -> bool {
        self.have_remote_description
    }

    /// The latest time seen.
    pub fn last_now(&self) -> Instant {
        self.last_now
    }
}

fn signal_kind(signal: &Signal) -> &'static str {
    match signal {
        Signal::Offer { .. } => "offer",
        Signal::Answer { .. } => "answer",
        Signal::Candidate { .. } => "candidate",
        Signal::EndOfCandidates => "end_of_candidates",
        Signal::Unknown => "unknown",
    }
}

/// Whether a datagram is DTLS (RFC 7983: first byte 20 to 63).
pub(crate) fn is_dtls(data: &[u8]) -> bool {
    data.first().is_some_and(|b| (20..=63).contains(b))
}

/// The media id of the first m-line of an SDP (`a=mid:`).
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=mid:")).map(|m| m.trim().to_string())
}

/// Whether a candidate's address is an mDNS name (`<uuid>.local`).
fn is_mdns(candidate: &str) -> bool {
    // candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
    candidate.split_whitespace().nth(4).is_some_and(|a| a.ends_with(".local"))
}

/// Reads `a=max-message-size` from an SDP; 0 there means "no limit".
fn max_message_size(sdp: &str) -> Option<usize> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=max-message-size:"))
        .and_then(|v| v.trim().parse().ok())
        .map(|n: usize| if n == 0 { usize::MAX } else { n })
}

/// A deadline that never comes in practice: an hour after `now`.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(3600)
}

/// The ICE username fragment of an SDP (`a=ice-ufrag:`).
fn sdp_ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:")).map(str::trim)
}

/// The session id of an SDP's `o=` line.
fn sdp_session_id(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("o=")).and_then(|o| o.split_whitespace().nth(1))
}
