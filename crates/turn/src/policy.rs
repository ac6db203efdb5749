//! The peer-address policy: which peers relay sockets may exchange data with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{IpNet, PeerPolicy};
use crate::own::OwnSet;

/// [`PeerPolicy`] plus what the server knows about its own sockets.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    allow_loopback: bool,
    allow_private: bool,
    allowed: Vec<IpNet>,
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
            allowed: policy.allowed.clone(),
            denied: policy.denied.clone(),
            own_ips,
            listen_port: listen.port(),
        }
    }

    /// Whether `ip` is one of this server's own addresses.
    pub(crate) fn is_own_ip(&self, ip: IpAddr) -> bool {
        self.own_ips.contains(&canonical(ip))
    }

    /// Whether relaying to or from `peer` is allowed, `relay_ports` being
    /// the relayed ports of this server's live allocations.
    ///
    /// The server's own addresses are refused on every port but those: a
    /// relay must not become a way into services on the server's host
    /// (its signaling port, an SSH daemon, the listen socket, where relayed
    /// STUN requests would look like a client at the relay's address). When
    /// both peers are relayed by this server, their data goes relay to
    /// relay, which those ports allow; an allocation's own address is
    /// refused by the driver, which knows which socket sends.
    pub(crate) fn allows(&self, peer: SocketAddr, relay_ports: &OwnSet<u16>) -> bool {
        let ip = canonical(peer.ip());
        if self.is_own_ip(ip) {
            if peer.port() == self.listen_port {
                return false;
            }
            // Loopback when allowed (peers on the server's machine, tests).
            return relay_ports.contains(&peer.port())
                || (classify(ip) == Class::Loopback && self.allow_loopback);
        }
        if self.denied.iter().any(|net| net.contains(ip)) {
            return false;
        }
        match classify(ip) {
            Class::Never => false,
            Class::Public => true,
            _ if self.allowed.iter().any(|net| net.contains(ip)) => true,
            Class::Loopback => self.allow_loopback,
            Class::Private => self.allow_private,
            Class::LinkLocal => false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    Never,
    LinkLocal,
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
                || o[0] == 0 // "this network"
                || o[0] >= 240
            // reserved
            {
                Class::Never
            } else if v4.is_link_local() {
                Class::LinkLocal
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
            if v6.is_unspecified() || v6.is_multicast() {
                Class::Never
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Class::LinkLocal
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

    /// With live allocations relaying on ports 40050 and 40051.
    fn allows(p: &Policy, addr: &str) -> bool {
        p.allows(addr.parse().unwrap(), &OwnSet::from_iter([40050, 40051]))
    }

    #[test]
    fn defaults_refuse_local_private_and_special_addresses() {
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
            "169.254.169.254:80",
            "[fe80::1]:5000",
            "[ff02::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "[::ffff:169.254.1.1]:5000",
            "10.1.2.3:5000",
            "172.16.0.9:5000",
            "172.31.255.1:5000",
            "192.168.1.20:5000",
            "100.64.0.1:5000",
            "[fd00::5]:5000",
            "[::ffff:10.0.0.1]:5000",
        ] {
            assert!(!allows(&p, refused), "{refused} should be refused");
        }
    }

    #[test]
    fn defaults_allow_public_peers() {
        let p = policy(PeerPolicy::default(), "192.0.2.1:3478", "192.0.2.1");
        for allowed in ["8.8.8.8:5000", "198.51.100.9:3478", "[2001:db8::1]:5000", "[::ffff:8.8.4.4]:5000"] {
            assert!(allows(&p, allowed), "{allowed} should be allowed");
        }
    }

    #[test]
    fn the_servers_own_addresses_only_at_live_relay_ports() {
        let p = policy(PeerPolicy::default(), "192.0.2.1:3478", "192.0.2.1");
        assert!(allows(&p, "192.0.2.1:40050"), "another allocation's relay");
        assert!(allows(&p, "203.0.113.7:40051"), "another allocation's relay at the external address");
        for refused in
            ["192.0.2.1:8080", "192.0.2.1:22", "203.0.113.7:8080", "203.0.113.7:40052", "203.0.113.7:3478"]
        {
            assert!(!allows(&p, refused), "{refused}: a service on the server's host");
        }
        // Allowing a network does not open the server's own host.
        let cfg = PeerPolicy { allowed: vec!["192.0.2.0/24".parse().unwrap()], ..PeerPolicy::default() };
        let p = policy(cfg, "192.0.2.1:3478", "192.0.2.1");
        assert!(!allows(&p, "192.0.2.1:8080"));
        assert!(allows(&p, "192.0.2.2:8080"));
    }

    #[test]
    fn allowed_networks_open_private_space_and_denied_ones_close_public_space() {
        let cfg = PeerPolicy {
            allowed: vec![
                "10.20.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
                "10.20.9.0/24".parse().unwrap(),
            ],
            denied: vec!["8.8.0.0/16".parse().unwrap(), "10.20.9.0/24".parse().unwrap()],
            ..PeerPolicy::default()
        };
        let p = policy(cfg, "192.0.2.1:3478", "192.0.2.1");
        assert!(allows(&p, "10.20.1.1:5000"));
        assert!(allows(&p, "[fd00::5]:5000"));
        assert!(!allows(&p, "10.21.0.1:5000"), "outside the allowed network");
        assert!(!allows(&p, "10.20.9.9:5000"), "denied wins over allowed");
        assert!(!allows(&p, "192.168.1.20:5000"));
        assert!(!allows(&p, "8.8.8.8:53"));
        assert!(allows(&p, "1.1.1.1:53"));
        assert!(!allows(&p, "224.0.0.1:5000"), "never, whatever is allowed");
        let all_private = PeerPolicy { allow_private: true, ..PeerPolicy::default() };
        let p = policy(all_private, "192.0.2.1:3478", "192.0.2.1");
        assert!(allows(&p, "192.168.1.20:5000"));
        assert!(allows(&p, "100.64.0.1:5000"));
        assert!(!allows(&p, "169.254.10.10:5000"), "link-local is not private space");
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
        assert!(!allows(&p, "203.0.113.7:8080"), "another port at the external address");
        assert!(allows(&p, "198.51.100.1:3478"), "someone else's 3478");
        let p = policy(PeerPolicy::default(), "127.0.0.1:3478", "127.0.0.1");
        assert!(!allows(&p, "127.0.0.1:5000"));
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
