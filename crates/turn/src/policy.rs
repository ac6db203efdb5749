//! The peer-address policy: which peers relay sockets may exchange data with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{IpNet, PeerPolicy};

/// [`PeerPolicy`] plus what the server knows about its own sockets.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    allow_loopback: bool,
    allow_private: bool,
    denied: Vec<IpNet>,
    /// Addresses that reach this server: listen, relay and external IPs, and
    /// loopback when a socket is bound to an unspecified address.
    own_ips: Vec<IpAddr>,
    listen_port: u16,
}

impl Policy {
    pub(crate) fn new(
        policy: &PeerPolicy,
        listen: SocketAddr,
        relay_ip: IpAddr,
        external_ip: Option<IpAddr>,
    ) -> Self {
        let mut own_ips = vec![canonical(listen.ip()), canonical(relay_ip)];
        own_ips.extend(external_ip.map(canonical));
        if listen.ip().is_unspecified() || relay_ip.is_unspecified() {
            // Bound to every interface: loopback reaches us too. Other interface
            // addresses are not known here (see `Config::external_ip`).
            own_ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
            own_ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        own_ips.retain(|ip| !ip.is_unspecified());
        own_ips.sort();
        own_ips.dedup();
        Policy {
            allow_loopback: policy.allow_loopback,
            allow_private: policy.allow_private,
            denied: policy.denied.clone(),
            own_ips,
            listen_port: listen.port(),
        }
    }

    /// Whether `ip` is one of this server's own addresses.
    pub(crate) fn is_own_ip(&self, ip: IpAddr) -> bool {
        self.own_ips.contains(&canonical(ip))
    }

    /// Whether relaying to or from `peer` is allowed.
    ///
    /// The listen socket is always refused: relayed STUN requests would look
    /// like a client at the relay's address, nesting allocations and hiding
    /// the real client from every per-address limit. Other allocations' relay
    /// addresses on this server are allowed (when both peers are relayed by
    /// the same server, their data goes relay to relay); an allocation's own
    /// address is refused by the driver, which knows which socket sends.
    pub(crate) fn allows(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        if self.is_own_ip(ip) && peer.port() == self.listen_port {
            return false;
        }
        if self.denied.iter().any(|net| net.contains(ip)) {
            return false;
        }
        match classify(ip) {
            Class::Never => false,
            Class::Loopback => self.allow_loopback,
            Class::Private => self.allow_private,
            Class::Public => true,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    Never,
    Loopback,
    Private,
    Public,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is judged as the IPv4 address it
/// carries, so it cannot smuggle in a refused address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || o[0] == 0 // "this network"
                || o[0] >= 240
            // reserved
            {
                Class::Never
            } else if v4.is_loopback() {
                Class::Loopback
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                Class::Private
            } else {
                Class::Public
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() || v6.is_multicast() || (s[0] & 0xffc0) == 0xfe80 {
                Class::Never
            } else if v6.is_loopback() {
                Class::Loopback
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Class::Private
            } else {
                Class::Public
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(p: PeerPolicy, listen: &str, relay_ip: &str) -> Policy {
        Policy::new(
            &p,
            listen.parse().unwrap(),
            relay_ip.parse().unwrap(),
            Some("203.0.113.7".parse().unwrap()),
        )
    }

    fn allows(p: &Policy, addr: &str) -> bool {
        p.allows(addr.parse().unwrap())
    }

    #[test]
    fn defaults_refuse_local_and_special_addresses() {
        let p = policy(PeerPolicy::default(), "192.0.2.1:3478", "192.0.2.1");
        assert!(!allows(&p, "192.0.2.1:3478"), "our listen socket");
        for refused in [
            "127.0.0.1:5000",
            "127.8.9.10:5000",
            "[::1]:5000",
            "0.0.0.0:5000",
            "[::]:5000",
            "0.1.2.3:5000",
            "224.0.0.1:5000",
            "239.255.255.250:1900",
            "255.255.255.255:5000",
            "240.0.0.1:5000",
            "169.254.10.10:5000",
            "[fe80::1]:5000",
            "[ff02::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "[::ffff:169.254.1.1]:5000",
        ] {
            assert!(!allows(&p, refused), "{refused} should be refused");
        }
    }

    #[test]
    fn defaults_allow_public_and_private_peers() {
        let p = policy(PeerPolicy::default(), "192.0.2.1:3478", "192.0.2.1");
        for allowed in [
            "8.8.8.8:5000",
            "10.1.2.3:5000",
            "172.16.0.9:5000",
            "172.31.255.1:5000",
            "192.168.1.20:5000",
            "100.64.0.1:5000",
            "[fd00::5]:5000",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.1]:5000",
        ] {
            assert!(allows(&p, allowed), "{allowed} should be allowed");
        }
    }

    #[test]
    fn private_and_extra_networks_can_be_denied() {
        let cfg = PeerPolicy {
            allow_private: false,
            denied: vec!["8.8.0.0/16".parse().unwrap()],
            ..PeerPolicy::default()
        };
        let p = policy(cfg, "192.0.2.1:3478", "192.0.2.1");
        assert!(!allows(&p, "10.1.2.3:5000"));
        assert!(!allows(&p, "192.168.1.20:5000"));
        assert!(!allows(&p, "[fd00::5]:5000"));
        assert!(!allows(&p, "8.8.8.8:53"));
        assert!(allows(&p, "1.1.1.1:53"));
    }

    #[test]
    fn loopback_only_when_allowed_and_never_our_own_sockets() {
        let cfg = PeerPolicy { allow_loopback: true, ..PeerPolicy::default() };
        let p = policy(cfg, "127.0.0.1:3478", "127.0.0.1");
        assert!(allows(&p, "127.0.0.1:5000"));
        assert!(!allows(&p, "127.0.0.1:3478"), "our listen socket");
        assert!(!allows(&p, "203.0.113.7:3478"), "our listen port at the external address");
        assert!(!allows(&p, "[::ffff:127.0.0.1]:3478"));
        assert!(allows(&p, "203.0.113.7:40050"), "another allocation's relay");
        assert!(allows(&p, "198.51.100.1:3478"), "someone else's 3478");
    }

    #[test]
    fn unspecified_bind_counts_loopback_as_own() {
        let cfg = PeerPolicy { allow_loopback: true, ..PeerPolicy::default() };
        let p = policy(cfg, "0.0.0.0:3478", "0.0.0.0");
        assert!(!allows(&p, "127.0.0.1:3478"));
        assert!(allows(&p, "127.0.0.1:5000"));
        assert!(p.is_own_ip("127.0.0.1".parse().unwrap()));
        assert!(p.is_own_ip("203.0.113.7".parse().unwrap()));
        assert!(!p.is_own_ip("0.0.0.0".parse().unwrap()));
    }
}
