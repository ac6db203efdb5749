//! Candidate gathering: which local addresses the peer offers and the UDP
//! sockets behind them; `relay.rs` adds server-reflexive and relayed
//! candidates from the same sockets.

use std::net::{IpAddr, SocketAddr};

use peerlink_proto::IceServer;
use tokio::net::UdpSocket;

use crate::error::Error;

/// Which local addresses ICE may use.
///
/// By default every non-loopback interface address (IPv4, and IPv6 that is
/// not link-local) is gathered, or loopback when there is nothing else.
/// Restrict it to keep traffic on chosen networks: tests use
/// `IceConfig::only([127.0.0.1])`.
///
/// Server-reflexive and relayed candidates come from STUN and TURN servers:
/// those the signaling server announces in `welcome` (with short-lived TURN
/// credentials) unless `use_server_ice` is off, plus `servers`. A server is
/// only contacted from a local address of the same scope: loopback sockets
/// talk to loopback servers only, so a test restricted to 127.0.0.1 never
/// sends anywhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceConfig {
    /// Exactly these addresses (no interface enumeration) when non-empty.
    pub addrs: Vec<IpAddr>,
    /// Only addresses of these interfaces (by name, e.g. `eth0`) when non-empty.
    pub interfaces: Vec<String>,
    /// Use the STUN/TURN servers the signaling server hands out. On by default.
    pub use_server_ice: bool,
    /// More STUN/TURN servers, in the browser's `iceServers` shape:
    /// `stun:`, `turn:` (UDP, or TCP with `?transport=tcp`) and `turns:`
    /// (TLS) URLs. TCP and TLS are tried only when no UDP allocation is
    /// granted within 1.5 s.
    pub servers: Vec<IceServer>,
    /// Offer relayed candidates only (the browser's `iceTransportPolicy:
    /// "relay"`): the other side never learns our addresses, at the cost of
    /// relaying everything. Needs a TURN server.
    pub relay_only: bool,
    /// PEM certificates trusted for `turns:` servers besides the system's
    /// (a private CA, or a self-signed server certificate).
    pub turn_ca: Option<Vec<u8>>,
}

impl Default for IceConfig {
    fn default() -> Self {
        IceConfig {
            addrs: Vec::new(),
            interfaces: Vec::new(),
            use_server_ice: true,
            servers: Vec::new(),
            relay_only: false,
            turn_ca: None,
        }
    }
}

impl IceConfig {
    /// Gather only on `addrs`.
    pub fn only(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        IceConfig { addrs: addrs.into_iter().collect(), ..IceConfig::default() }
    }

    /// Gather only on 127.0.0.1.
    pub fn loopback() -> Self {
        Self::only([IpAddr::from([127, 0, 0, 1])])
    }

    /// The addresses host candidates will be gathered on.
    pub fn host_addrs(&self) -> Result<Vec<IpAddr>, Error> {
        if !self.addrs.is_empty() {
            return Ok(self.addrs.clone());
        }
        let ifaces = if_addrs::get_if_addrs()?;
        let usable = |ip: &IpAddr| match ip {
            IpAddr::V4(v4) => !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        };
        let chosen: Vec<(String, IpAddr)> = ifaces
            .into_iter()
            .filter(|i| self.interfaces.is_empty() || self.interfaces.contains(&i.name))
            .map(|i| (i.name.clone(), i.ip()))
            .filter(|(_, ip)| usable(ip))
            .collect();
        let non_loopback: Vec<IpAddr> =
            chosen.iter().map(|(_, ip)| *ip).filter(|ip| !ip.is_loopback()).collect();
        let addrs =
            if non_loopback.is_empty() { chosen.iter().map(|(_, ip)| *ip).collect() } else { non_loopback };
        if addrs.is_empty() {
            return Err(Error::NoAddresses(if self.interfaces.is_empty() {
                "no interface has an address".into()
            } else {
                format!("interfaces {:?} have no address", self.interfaces)
            }));
        }
        Ok(addrs)
    }
}

/// Binds one UDP socket on an ephemeral port for each address.
pub(crate) async fn bind(addrs: &[IpAddr]) -> Result<Vec<UdpSocket>, Error> {
    let mut sockets = Vec::with_capacity(addrs.len());
    for ip in addrs {
        // Sized for bulk by `UdpIo::new`.
        let socket = UdpSocket::bind(SocketAddr::new(*ip, 0)).await?;
        sockets.push(socket);
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_addresses_are_used_as_given() {
        let cfg = IceConfig::loopback();
        assert_eq!(cfg.host_addrs().unwrap(), vec![IpAddr::from([127, 0, 0, 1])]);
    }

    #[test]
    fn interface_filter_restricts_gathering() {
        let cfg = IceConfig { interfaces: vec!["lo".into()], ..IceConfig::default() };
        let addrs = cfg.host_addrs().unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.is_loopback()), "{addrs:?}");
        let none = IceConfig { interfaces: vec!["no-such-if0".into()], ..IceConfig::default() };
        assert!(matches!(none.host_addrs(), Err(Error::NoAddresses(_))));
    }
}
