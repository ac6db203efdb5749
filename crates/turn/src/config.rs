//! What the server is told: addresses, credentials, limits and the peer policy.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;

/// Configuration of the STUN/TURN server.
///
/// Build it with [`Config::new`] and change the fields you need; every field
/// has a documented default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Where the CLI binds the UDP socket it hands to [`serve`](crate::serve).
    /// The server itself uses the socket's actual local address.
    /// Default `0.0.0.0:3478`.
    pub listen: SocketAddr,
    /// The STUN realm sent in every 401. Default `"peerlink"`.
    pub realm: String,
    /// The address advertised in XOR-RELAYED-ADDRESS. Needed when the relay
    /// sockets are bound to an unspecified address (`0.0.0.0`) or when the host
    /// sits behind a 1:1 NAT. Default `None`: advertise the relay IP.
    pub external_ip: Option<IpAddr>,
    /// Where relay sockets are bound. Default `None`: the listen socket's IP.
    pub relay_ip: Option<IpAddr>,
    /// Ports for relay sockets, tried from a random start. `0..=0` lets the
    /// operating system pick an ephemeral port (handy in tests). Default
    /// `49152..=65535` (coturn's default).
    pub relay_ports: RangeInclusive<u16>,
    /// Who may allocate.
    pub auth: Auth,
    /// Caps that keep the server from becoming an open or unbounded relay.
    pub limits: Limits,
    /// Which peer addresses an allocation may exchange data with.
    pub peer_policy: PeerPolicy,
}

impl Config {
    /// A configuration with every default and the given credentials.
    pub fn new(auth: Auth) -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 3478),
            realm: "peerlink".to_owned(),
            external_ip: None,
            relay_ip: None,
            relay_ports: 49152..=65535,
            auth,
            limits: Limits::default(),
            peer_policy: PeerPolicy::default(),
        }
    }
}

/// Long-term credentials the server accepts (RFC 8489 §9.2).
///
/// Both kinds can be active at once; a static user wins over a REST username
/// of the same name.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Auth {
    /// coturn's `use-auth-secret`: any username of the form `<expiry>:<user>`
    /// (or a bare `<expiry>`, or `<user>:<expiry>`) whose expiry, in Unix
    /// seconds, is not past, with password
    /// [`rest_password(secret, username)`](crate::rest_password).
    pub rest_secret: Option<String>,
    /// Fixed `(username, password)` pairs.
    pub users: Vec<(String, String)>,
}

impl Auth {
    /// Time-limited REST credentials derived from `secret` (coturn `use-auth-secret`).
    pub fn rest(secret: impl Into<String>) -> Self {
        Auth { rest_secret: Some(secret.into()), users: Vec::new() }
    }

    /// A fixed user table.
    pub fn users<U, P>(users: impl IntoIterator<Item = (U, P)>) -> Self
    where
        U: Into<String>,
        P: Into<String>,
    {
        Auth { rest_secret: None, users: users.into_iter().map(|(u, p)| (u.into(), p.into())).collect() }
    }

    /// Adds one fixed user.
    #[must_use]
    pub fn with_user(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((username.into(), password.into()));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest_secret.is_none() && self.users.is_empty()
    }
}

impl fmt::Debug for Auth {
    // Secrets and passwords stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("rest_secret", &self.rest_secret.as_ref().map(|_| "<redacted>"))
            .field("users", &self.users.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

/// Resource caps. turn-server-proto has none of its own.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Live allocations on the whole server. Beyond it, ALLOCATE gets 508
    /// (Insufficient Capacity). Default 1000.
    pub max_allocations: usize,
    /// Live allocations per username (a REST username counts as itself, so
    /// every `<expiry>:<user>` is its own user). Default 10.
    pub max_allocations_per_user: usize,
    /// Live allocations per client IP address (an IPv6 client's /64).
    /// Default 32.
    pub max_allocations_per_ip: usize,
    /// Hard cap on an allocation's age, however often it is refreshed. When it
    /// is reached the relay socket is closed, data stops, and the client's
    /// further requests get 437 (Allocation Mismatch). Each refresh is also
    /// capped to 3600 s by turn-server-proto itself. Default 12 hours.
    pub max_lifetime: Duration,
    /// Token-bucket rate for each allocation and each direction, in payload
    /// bytes per second, with a burst of one second's worth (at least 64 KiB).
    /// Datagrams beyond it are dropped. `None`: unlimited. Default 2 MiB/s.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Bound on turn-server-proto's authentication tables, which never shrink:
    /// a nonce per client address and every REST username it was told about
    /// (counted as requests from addresses without an allocation, an upper
    /// bound, plus usernames). When reached, new clients start on a fresh
    /// protocol state while allocations on the old one keep working until they
    /// end; if the old one still has allocations when the new one fills up
    /// too, requests from new client addresses are dropped until it drains. So
    /// at most two states of this size exist. Default 20 000.
    pub max_auth_entries: usize,
    /// STUN requests per second, server-wide, accepted from client addresses
    /// that hold no allocation (the only requests that grow those tables).
    /// Excess requests are dropped; clients retransmit. Default 500.
    pub new_client_requests_per_sec: u32,
    /// Client addresses (IP and port) from one IP (an IPv6 client's /64)
    /// that may take entries in the current authentication tables before
    /// it holds an allocation: one host cannot fill them (and lock new
    /// clients out while older allocations last) by changing its source
    /// port. Default 256 (a large NAT's users share an IP).
    pub max_auth_entries_per_ip: usize,
    /// Open TCP and TLS client connections, together. Beyond it a new
    /// connection is closed at once. Default 1000.
    pub max_stream_connections: usize,
    /// Open TCP and TLS client connections per client IP. Default 32.
    pub max_stream_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_allocations: 1000,
            max_allocations_per_user: 10,
            max_allocations_per_ip: 32,
            max_lifetime: Duration::from_secs(12 * 3600),
            bandwidth_bytes_per_sec: Some(2 * 1024 * 1024),
            max_auth_entries: 20_000,
            new_client_requests_per_sec: 500,
            max_auth_entries_per_ip: 256,
            max_stream_connections: 1000,
            max_stream_connections_per_ip: 32,
        }
    }
}

/// Which peers an allocation may talk to ("no open relay"), by default
/// coturn's safe stance: public addresses only.
///
/// Always refused, whatever the flags: unspecified, multicast, broadcast,
/// `0.0.0.0/8`, reserved `240.0.0.0/4`, the server's own addresses on any
/// port but another live allocation's relayed port (when both peers are
/// relayed by this server their data goes from relay to relay), and an
/// allocation's own relayed address. Refused unless allowed: loopback,
/// private space, link-local. IPv4-mapped IPv6 addresses are judged as IPv4.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PeerPolicy {
    /// Relay to and from loopback addresses. Default `false`; tests turn it on.
    pub allow_loopback: bool,
    /// Relay to and from private space: RFC 1918 (`10/8`, `172.16/12`,
    /// `192.168/16`), shared CGNAT space (`100.64/10`) and IPv6 ULA
    /// (`fc00::/7`). Default `false`: a relay into the server's own network
    /// lets anyone with credentials reach hosts behind its firewall. Allow
    /// what a LAN deployment needs with `allowed` instead, where possible.
    pub allow_private: bool,
    /// Networks allowed even though their class is refused (private,
    /// loopback, link-local): e.g. `10.20.0.0/16` for a LAN deployment.
    /// Never overrides the server's own addresses or `denied`.
    pub allowed: Vec<IpNet>,
    /// Further networks to refuse.
    pub denied: Vec<IpNet>,
}

/// An IP network in CIDR notation, such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// A network from an address and a prefix length; `None` when the prefix
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    /// Whether `ip` lies in this network. IPv4 and IPv6 never match each other
    /// (callers canonicalise IPv4-mapped addresses first).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = Error;

    /// `ADDR/PREFIX`, or a bare address for a single host.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Config(format!("invalid IP network {s:?}: expected ADDR/PREFIX"));
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let prefix = match prefix {
            Some(p) => p.trim().parse().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpNet::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_parses_and_matches() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.3.4".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host: IpNet = "192.168.1.7".parse().unwrap();
        assert!(host.contains("192.168.1.7".parse().unwrap()));
        assert!(!host.contains("192.168.1.8".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert_eq!(v6.to_string(), "fd00::/8");
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let auth = Auth::rest("hunter2").with_user("ada", "pw-ada");
        let shown = format!("{auth:?}");
        assert!(shown.contains("ada"));
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("pw-ada"));
    }
}
