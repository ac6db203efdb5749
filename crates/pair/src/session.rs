//! Whom to pair with in a code's room, without I/O: who goes first, who
//! waits, when a quiet peer is given up on, and how each side tells the
//! other why it stopped. Room events, pairing messages and time go in;
//! messages to send, the peer to connect to and session events come out.
//! `docs/PAIRING.md` describes the rules; `fixtures/pairing/session.json`
//! replays them step by step for every implementation.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::code::Code;
use crate::pake::{AbortCode, Keys, PairError, PairMsg, Pairing, Role};

/// Pairing messages kept from peers that asked while another pairing ran,
/// and room members remembered to try (a joiner tries the next when the
/// first stays quiet).
pub const MAX_WAITING: usize = 16;

/// Why a pairing session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Abort {
    /// The codes differ: key confirmation failed (on either side). The code
    /// is burnt.
    WrongCode,
    /// The signaling path changed an offer or answer (it did not
    /// authenticate); the text says what was wrong.
    Tampered(String),
    /// The joiner found nobody in the code's room who completed pairing in
    /// time.
    Timeout,
    /// A side gave up for another reason (cancelled, an error); for people.
    Failed(String),
}

impl Abort {
    /// The code a `pair_abort` carries for this reason.
    pub fn code(&self) -> AbortCode {
        match self {
            Abort::WrongCode => AbortCode::WrongCode,
            Abort::Tampered(_) => AbortCode::Tampered,
            Abort::Timeout => AbortCode::Timeout,
            Abort::Failed(_) => AbortCode::Failed,
        }
    }

    /// Whether it is a security failure (wrong code or tampering).
    pub fn is_security(&self) -> bool {
        matches!(self, Abort::WrongCode | Abort::Tampered(_))
    }

    /// The `pair_abort` that tells the other side.
    pub fn to_msg(&self) -> PairMsg {
        PairMsg::PairAbort { code: Some(self.code()), reason: self.to_string() }
    }

    /// Reads a `pair_abort` from the other side. Peers of the first
    /// version send no `code`; their reason text is read instead.
    pub fn from_msg(code: Option<AbortCode>, reason: &str) -> Abort {
        const TAMPER_PREFIX: &str = "tampering detected: ";
        match code {
            Some(AbortCode::WrongCode) => Abort::WrongCode,
            Some(AbortCode::Tampered) => {
                Abort::Tampered(reason.strip_prefix(TAMPER_PREFIX).unwrap_or(reason).to_string())
            }
            Some(AbortCode::Timeout) => Abort::Timeout,
            Some(AbortCode::Failed | AbortCode::Unknown) => Abort::Failed(reason.to_string()),
            None => match reason.strip_prefix(TAMPER_PREFIX) {
                Some(r) => Abort::Tampered(r.to_string()),
                None if reason.contains("codes do not match") => Abort::WrongCode,
                None => Abort::Failed(reason.to_string()),
            },
        }
    }
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Abort::WrongCode => f.write_str("the codes do not match"),
            Abort::Tampered(why) => write!(f, "tampering detected: {why}"),
            Abort::Timeout => f.write_str("nobody in the code's room completed pairing in time"),
            Abort::Failed(why) => f.write_str(why),
        }
    }
}

/// Something worth telling the user that changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// A peer started pairing and went quiet for the whole timeout; the
    /// joiner tries the next member of the room.
    QuietPeerTryingNext {
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// Likewise, and the creator keeps waiting for the receiver.
    QuietPeerStillWaiting {
        /// The timeout that ran out.
        timeout: Duration,
    },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::QuietPeerTryingNext { timeout } => write!(
                f,
                "a peer in the code's room did not complete pairing within {} s; trying the next",
                timeout.as_secs()
            ),
            Notice::QuietPeerStillWaiting { timeout } => write!(
                f,
                "a peer in the code's room did not complete pairing within {} s; still waiting for the receiver",
                timeout.as_secs()
            ),
        }
    }
}

/// What a [`Session`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent<P> {
    /// Pairing with `peer` started (it is in the room, or asked).
    PeerSeen {
        /// The peer.
        peer: P,
    },
    /// Both sides confirmed the key: connect to `peer` with `keys` (see
    /// [`SessionOutput::Connect`]).
    Paired {
        /// The peer.
        peer: P,
    },
    /// See [`Notice`].
    Notice(Notice),
    /// The peer paired or being paired with left the room.
    PeerGone {
        /// The peer.
        peer: P,
        /// Whether pairing with it had completed.
        was_paired: bool,
    },
    /// The session is over; nothing more happens.
    Ended {
        /// Why.
        reason: Abort,
        /// The other side said so (`pair_abort`), rather than this side.
        by_peer: bool,
    },
}

/// What the driver does for a [`Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutput<P> {
    /// Send `msg` to `to` through the signaling server (`send` with `to`).
    Send {
        /// The addressee.
        to: P,
        /// The message.
        msg: PairMsg,
    },
    /// Pairing with `peer` succeeded: close any older connection to it and
    /// connect with authenticated signaling using `keys`.
    Connect {
        /// The peer.
        peer: P,
        /// The session keys.
        keys: Keys,
    },
    /// Report an event.
    Event(SessionEvent<P>),
}

/// One side of a code's room: finds the peer to pair with, runs the
/// exchange ([`Pairing`]) with it, and copes with peers that join and go
/// quiet.
///
/// The rules (docs/PAIRING.md): the joiner pairs first with the member
/// present longest, which is the creator; a `pair_pake` from a third peer
/// while pairing is kept (up to [`MAX_WAITING`]); a pairing not completed
/// within the timeout is dropped, and then the creator answers the oldest
/// kept `pair_pake` or waits, while the joiner does the same, else tries the
/// next member it has not tried, else ends with [`Abort::Timeout`].
///
/// `P` names peers (the signaling server's peer ids).
pub struct Session<P> {
    role: Role,
    code: Code,
    timeout: Duration,
    /// The peer being paired with, the exchange, and when it started.
    pairing: Option<(P, Pairing, Instant)>,
    /// The peer paired with, once the keys are known.
    paired: Option<P>,
    /// Opening messages from peers that asked while we were busy, oldest first.
    waiting: Vec<(P, PairMsg)>,
    /// Room members in join order, and those tried.
    members: Vec<P>,
    tried: Vec<P>,
    out: VecDeque<SessionOutput<P>>,
    ended: bool,
}

impl<P: fmt::Debug> fmt::Debug for Session<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("pairing", &self.pairing.as_ref().map(|(p, _, _)| p))
            .field("paired", &self.paired)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<P: Clone + Eq + fmt::Debug> Session<P> {
    /// A session for `code` as `role`; a peer that does not complete
    /// pairing within `timeout` is given up on.
    pub fn new(role: Role, code: Code, timeout: Duration) -> Self {
        Session {
            role,
            code,
            timeout,
            pairing: None,
            paired: None,
            waiting: Vec::new(),
            members: Vec::new(),
            tried: Vec::new(),
            out: VecDeque::new(),
            ended: false,
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<SessionOutput<P>> {
        self.out.pop_front()
    }

    /// When [`Session::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pairing.as_ref().map(|(_, _, since)| *since + self.timeout)
    }

    /// The peer paired with, if pairing completed.
    pub fn paired(&self) -> Option<&P> {
        self.paired.as_ref()
    }

    /// Whether the session has ended.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    fn event(&mut self, ev: SessionEvent<P>) {
        self.out.push_back(SessionOutput::Event(ev));
    }

    fn send(&mut self, to: P, msg: PairMsg) {
        self.out.push_back(SessionOutput::Send { to, msg });
    }

    fn end(&mut self, reason: Abort, by_peer: bool) {
        if !self.ended {
            self.ended = true;
            self.event(SessionEvent::Ended { reason, by_peer });
        }
    }

    fn start_pairing(&mut self, peer: P, now: Instant) {
        let (pairing, first) = Pairing::start(self.role, &self.code);
        self.send(peer.clone(), first);
        if !self.tried.contains(&peer) {
            self.tried.push(peer.clone());
        }
        self.pairing = Some((peer, pairing, now));
    }

    fn reset(&mut self) {
        self.pairing = None;
        self.paired = None;
    }

    fn is_ours(&self, peer: &P) -> bool {
        self.paired.as_ref() == Some(peer) || self.pairing.as_ref().is_some_and(|(p, _, _)| p == peer)
    }

    /// A member is in the room: one listed in `joined` (in the order listed)
    /// or one that joined since.
    pub fn peer_joined(&mut self, peer: P, now: Instant) {
        if self.ended {
            return;
        }
        if self.members.len() < MAX_WAITING {
            self.members.push(peer.clone());
        }
        if self.pairing.is_none() && self.paired.is_none() {
            self.start_pairing(peer.clone(), now);
            self.event(SessionEvent::PeerSeen { peer });
        }
    }

    /// A member left the room.
    pub fn peer_left(&mut self, peer: &P, now: Instant) {
        if self.ended {
            return;
        }
        let ours = self.is_ours(peer);
        self.waiting.retain(|(p, _)| p != peer);
        self.members.retain(|p| p != peer);
        self.tried.retain(|p| p != peer);
        if ours {
            let was_paired = self.paired.is_some();
            self.reset();
            if !was_paired && self.take_up_waiting(now) {
                return;
            }
            self.event(SessionEvent::PeerGone { peer: peer.clone(), was_paired });
        }
    }

    /// The connection to the paired peer broke: a new `pair_pake` from it
    /// (it starts over) is answered.
    pub fn connection_lost(&mut self, peer: &P) {
        if self.paired.as_ref() == Some(peer) {
            self.reset();
        }
    }

    /// This side gives up: the peer paired or being paired with is told
    /// why, and the session ends.
    pub fn abort(&mut self, reason: Abort) {
        if self.ended {
            return;
        }
        let peer = self.paired.clone().or_else(|| self.pairing.as_ref().map(|(p, _, _)| p.clone()));
        if let Some(peer) = peer {
            self.send(peer, reason.to_msg());
        }
        self.end(reason, false);
    }

    /// Runs the pairing timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended || self.poll_timeout().is_none_or(|t| now < t) {
            return;
        }
        self.reset();
        if self.take_up_waiting(now) {
            return;
        }
        if self.role == Role::Joiner {
            let untried = self.members.iter().find(|p| !self.tried.contains(p)).cloned();
            match untried {
                Some(next) => {
                    self.start_pairing(next, now);
                    self.event(SessionEvent::Notice(Notice::QuietPeerTryingNext { timeout: self.timeout }));
                }
                None => self.end(Abort::Timeout, false),
            }
        } else {
            self.event(SessionEvent::Notice(Notice::QuietPeerStillWaiting { timeout: self.timeout }));
        }
    }

    /// Starts pairing with the first peer that asked while we were busy,
    /// answering the opening message it sent then.
    fn take_up_waiting(&mut self, now: Instant) -> bool {
        if self.waiting.is_empty() {
            return false;
        }
        let (peer, msg) = self.waiting.remove(0);
        self.start_pairing(peer.clone(), now);
        self.event(SessionEvent::PeerSeen { peer: peer.clone() });
        self.handle_message(peer, msg, now);
        true
    }

    /// A pairing message from `from` (a server-routed `message`).
    pub fn handle_message(&mut self, from: P, msg: PairMsg, now: Instant) {
        if self.ended {
            return;
        }
        if let PairMsg::PairAbort { code, reason } = &msg {
            if self.is_ours(&from) {
                self.end(Abort::from_msg(*code, reason), true);
            }
            return;
        }
        let fresh_pake = matches!(msg, PairMsg::PairPake { .. });
        match &self.pairing {
            Some((p, _, _)) if *p == from => {}
            // The peer we were connected to starts over (its connection
            // broke), or someone asks first: pair.
            None if fresh_pake && (self.paired.is_none() || self.paired.as_ref() == Some(&from)) => {
                self.reset();
                self.start_pairing(from.clone(), now);
                self.event(SessionEvent::PeerSeen { peer: from.clone() });
            }
            _ if fresh_pake => {
                // Someone else wants to pair while we are busy: keep its
                // opening in case the one we are pairing with goes quiet.
                self.waiting.retain(|(p, _)| *p != from);
                if self.paired.is_none() && self.waiting.len() < MAX_WAITING {
                    self.waiting.push((from, msg));
                }
                return;
            }
            _ => return,
        }
        let (peer, pairing, _) = self.pairing.as_mut().expect("set above");
        let peer = peer.clone();
        match pairing.handle(msg) {
            Ok(reply) => {
                let keys = pairing.keys().cloned();
                if let Some(reply) = reply {
                    self.send(peer.clone(), reply);
                }
                if let Some(keys) = keys {
                    self.pairing = None;
                    self.paired = Some(peer.clone());
                    self.out.push_back(SessionOutput::Connect { peer: peer.clone(), keys });
                    self.event(SessionEvent::Paired { peer });
                }
            }
            Err(PairError::WrongCode) => self.abort(Abort::WrongCode),
            Err(e) => self.abort(Abort::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_reasons_round_trip_and_old_peers_are_understood() {
        for reason in [
            Abort::WrongCode,
            Abort::Tampered("the offer was modified".into()),
            Abort::Timeout,
            Abort::Failed("cancelled".into()),
        ] {
            let PairMsg::PairAbort { code, reason: text } = reason.to_msg() else { panic!() };
            assert_eq!(Abort::from_msg(code, &text), reason);
        }
        // Version-1 peers send only the reason.
        assert_eq!(Abort::from_msg(None, "the codes do not match"), Abort::WrongCode);
        assert_eq!(Abort::from_msg(None, "tampering detected: x"), Abort::Tampered("x".into()));
        assert_eq!(
            Abort::from_msg(None, "the receiver said no"),
            Abort::Failed("the receiver said no".into())
        );
        assert_eq!(Abort::from_msg(Some(AbortCode::Unknown), "later"), Abort::Failed("later".into()));
    }
}
