//! How a connection's data travels and why: the selected candidate pair,
//! why it goes through a relay, and why a connection failed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::relay::{GatherReport, Outcome, TurnTransport};

/// Where a candidate address comes from (RFC 8445 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CandidateKind {
    /// An address of a local interface.
    Host,
    /// An address learned from a connectivity check (a NAT mapping nobody
    /// announced).
    PeerReflexive,
    /// A NAT's public mapping, learned from a STUN server.
    ServerReflexive,
    /// An address on a TURN relay.
    Relayed,
}

impl CandidateKind {
    /// The name SDP uses: `host`, `prflx`, `srflx`, `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::PeerReflexive => "prflx",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::Relayed => "relay",
        }
    }

    pub(crate) fn from_str0m(kind: str0m::CandidateKind) -> Self {
        match kind {
            str0m::CandidateKind::Host => CandidateKind::Host,
            str0m::CandidateKind::PeerReflexive => CandidateKind::PeerReflexive,
            str0m::CandidateKind::ServerReflexive => CandidateKind::ServerReflexive,
            str0m::CandidateKind::Relayed => CandidateKind::Relayed,
        }
    }
}

impl fmt::Display for CandidateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One end of a path, or a candidate the remote announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Where the address comes from.
    pub kind: CandidateKind,
    /// The transport address.
    pub addr: SocketAddr,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.addr)
    }
}

/// How the data of a connection travels: the selected candidate pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// `relay` if either end is a TURN relay, `srflx` if the remote end is
    /// server- or peer-reflexive (a direct path through a NAT), `host` if
    /// both are host candidates.
    pub kind: PathKind,
    /// Our end.
    pub local: Endpoint,
    /// Their end.
    pub remote: Endpoint,
    /// When our end is a relayed address of ours: how we reach that TURN
    /// server (UDP, or TCP/TLS on networks that block UDP).
    pub relay_transport: Option<TurnTransport>,
}

impl Path {
    /// Classifies the pair `local` → `remote`.
    pub(crate) fn new(local: Endpoint, remote: Endpoint) -> Path {
        let kind = if local.kind == CandidateKind::Relayed || remote.kind == CandidateKind::Relayed {
            PathKind::Relay
        } else if remote.kind == CandidateKind::Host {
            PathKind::Host
        } else {
            PathKind::Srflx
        };
        Path { kind, local, remote, relay_transport: None }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.relay_transport {
            Some(t) => write!(f, "{} over {t}: {} -> {}", self.kind, self.local, self.remote),
            None => write!(f, "{}: {} -> {}", self.kind, self.local, self.remote),
        }
    }
}

/// The kind of path a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Both ends are interface addresses: the same network.
    Host,
    /// Direct, through at least one NAT.
    Srflx,
    /// Through a TURN relay.
    Relay,
}

impl PathKind {
    /// `host`, `srflx` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Host => "host",
            PathKind::Srflx => "srflx",
            PathKind::Relay => "relay",
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection's data goes through a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WhyRelayed {
    /// This side asked for relayed candidates only.
    RelayOnly,
    /// The other side offered nothing but relayed candidates.
    RemoteRelayOnly,
    /// No direct pair answered, and no STUN server gave us a public mapping.
    NoStunAnswer,
    /// No direct pair answered the checks: a NAT that maps per destination
    /// (symmetric) or a firewall on at least one side.
    NoDirectPair,
}

impl WhyRelayed {
    /// Explains a relayed path from what each side could offer.
    pub(crate) fn explain(relay_only: bool, ours: &GatherReport, theirs: &[Endpoint]) -> WhyRelayed {
        if relay_only {
            return WhyRelayed::RelayOnly;
        }
        let they_direct =
            theirs.iter().any(|c| matches!(c.kind, CandidateKind::Host | CandidateKind::ServerReflexive));
        let we_srflx = ours.srflx.iter().any(|(_, _, o)| matches!(o, Outcome::Ok(_)));
        if !they_direct {
            WhyRelayed::RemoteRelayOnly
        } else if !we_srflx && !ours.srflx.is_empty() {
            WhyRelayed::NoStunAnswer
        } else {
            WhyRelayed::NoDirectPair
        }
    }
}

impl fmt::Display for WhyRelayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhyRelayed::RelayOnly => "relay-only was asked for (our addresses are not offered)",
            WhyRelayed::RemoteRelayOnly => "the other side offered only relayed candidates",
            WhyRelayed::NoStunAnswer => {
                "no direct pair answered, and our STUN requests got no answer (no server-reflexive address)"
            }
            WhyRelayed::NoDirectPair => {
                "no direct candidate pair answered the connectivity checks (a NAT that maps per \
                 destination, such as a symmetric NAT, or a firewall, on at least one side)"
            }
        })
    }
}

/// Why a connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Our offer got no answer within the connect timeout.
    NoAnswer,
    /// ICE found a path, but the DTLS handshake did not complete.
    Handshake,
    /// The checks timed out and the other side sent no candidates.
    NoRemoteCandidates,
    /// The checks timed out: no candidate pair answered.
    ChecksTimedOut,
    /// The connection was lost and no path came back in time.
    Lost {
        /// How long it stayed down.
        after: Duration,
        /// ICE restarts tried meanwhile.
        restarts: u32,
    },
    /// An offer or answer did not authenticate (paired connections).
    Unauthenticated(String),
    /// The WebRTC stack reported an error.
    WebRtc(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoAnswer => f.write_str("no answer to the offer arrived (is the other side there?)"),
            Failure::Handshake => {
                f.write_str("a path was found but the secure (DTLS) handshake did not complete")
            }
            Failure::NoRemoteCandidates => {
                f.write_str("connectivity checks timed out, and the other side sent no candidates")
            }
            Failure::ChecksTimedOut => {
                f.write_str("connectivity checks timed out: no candidate pair answered")
            }
            Failure::Lost { after, restarts } => write!(
                f,
                "the connection was lost and no path came back within {after:?} ({restarts} ICE restarts)"
            ),
            Failure::Unauthenticated(why) => write!(f, "signaling was not authentic: {why}"),
            Failure::WebRtc(e) => write!(f, "WebRTC error: {e}"),
        }
    }
}

/// A failed connection: why, and what each side could offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// Why it failed.
    pub reason: Failure,
    /// Our candidates and what became of every STUN/TURN server.
    pub local: GatherReport,
    /// The candidates the other side announced.
    pub remote: Vec<Endpoint>,
}

impl fmt::Display for FailureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let theirs: Vec<String> = self.remote.iter().map(Endpoint::to_string).collect();
        write!(f, "{}; our candidates: {}; theirs: [{}]", self.reason, self.local, theirs.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(kind: CandidateKind, port: u16) -> Endpoint {
        Endpoint { kind, addr: SocketAddr::from(([192, 0, 2, 1], port)) }
    }

    #[test]
    fn path_kind_follows_the_ends() {
        use CandidateKind::*;
        assert_eq!(Path::new(ep(Host, 1), ep(Host, 2)).kind, PathKind::Host);
        assert_eq!(Path::new(ep(Host, 1), ep(ServerReflexive, 2)).kind, PathKind::Srflx);
        assert_eq!(Path::new(ep(Host, 1), ep(PeerReflexive, 2)).kind, PathKind::Srflx);
        assert_eq!(Path::new(ep(Relayed, 1), ep(Host, 2)).kind, PathKind::Relay);
        assert_eq!(Path::new(ep(Host, 1), ep(Relayed, 2)).kind, PathKind::Relay);
        assert_eq!(
            Path::new(ep(Host, 1), ep(PeerReflexive, 2)).to_string(),
            "srflx: host 192.0.2.1:1 -> prflx 192.0.2.1:2"
        );
    }

    #[test]
    fn relayed_paths_are_explained() {
        use CandidateKind::*;
        let server = SocketAddr::from(([192, 0, 2, 9], 3478));
        let local = SocketAddr::from(([10, 0, 0, 1], 5000));
        let mut ours = GatherReport::default();
        assert_eq!(WhyRelayed::explain(true, &ours, &[ep(Host, 1)]), WhyRelayed::RelayOnly);
        assert_eq!(WhyRelayed::explain(false, &ours, &[ep(Relayed, 1)]), WhyRelayed::RemoteRelayOnly);
        ours.srflx.push((local, server, Outcome::Pending));
        assert_eq!(WhyRelayed::explain(false, &ours, &[ep(Host, 1)]), WhyRelayed::NoStunAnswer);
        ours.srflx[0].2 = Outcome::Ok(SocketAddr::from(([203, 0, 113, 1], 4000)));
        assert_eq!(WhyRelayed::explain(false, &ours, &[ep(ServerReflexive, 1)]), WhyRelayed::NoDirectPair);
    }
}
