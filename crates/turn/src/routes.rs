//! ChannelData routes the protocol took lately, so that the data following
//! on them skips it.
//!
//! Nearly everything a busy TURN server relays is ChannelData: a client's
//! channel towards its peer, and a peer's datagrams back to the client on
//! the channel bound to that peer. For every one of them turn-server-proto
//! finds the client, the allocation, the channel and the permission, checks
//! their lifetimes and hands back the datagram as a new buffer, which the
//! driver copies again to send it. At a few hundred megabits that work
//! (four copies of every datagram between two allocations of this server,
//! three allocations, a failed STUN parse) was a fifth of the CPU of a
//! relayed transfer with both peers on the same machine (`bench relay`),
//! half of what one peer's whole DTLS and SCTP stack took.
//!
//! So the driver remembers where the protocol sent ChannelData from a
//! client's channel (the allocation and the peer) and the channel on which
//! it gave a peer's datagram to a client, for [`TTL`], and relays the
//! datagrams that follow on the same route itself: one copy, into the send
//! batch. Every check the driver makes on a datagram (the peer policy, a
//! revoked or closed allocation, the bandwidth budget) is still made; what
//! is skipped is the protocol's lookup of state that a channel binding
//! fixes for its lifetime (RFC 8656 §12: a channel stays bound to one peer).
//!
//! A route is only ever learned from the protocol's own decision, and it is
//! trusted for [`TTL`]: a permission or channel binding that expires because
//! its client stopped refreshing it is honoured that much longer at most.
//! Whatever ends an allocation (deletion, expiry, revocation) or replaces
//! the protocol state forgets every route at once.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a route the protocol took is used without asking it again.
pub(crate) const TTL: Duration = Duration::from_millis(250);

/// Routes remembered in each direction at most; a route that does not fit
/// waits for the next housekeeping to be learned (its data takes the
/// protocol's path meanwhile).
pub(crate) const MAX_ROUTES: usize = 65_536;

#[derive(Debug, Default)]
pub(crate) struct Routes {
    /// (client, channel number) → (relayed address, peer).
    out: HashMap<(SocketAddr, u16), Out>,
    /// (relayed address, peer) → (client, channel number).
    inbound: HashMap<(SocketAddr, SocketAddr), In>,
    /// The route each way found last, with its key: datagrams come in runs
    /// on one route (a GRO run is one sender's), and these keys are the
    /// clients' and peers' addresses, hashed with SipHash.
    last_out: Cell<Option<((SocketAddr, u16), Out)>>,
    last_in: Cell<Option<((SocketAddr, SocketAddr), In)>>,
}

#[derive(Debug, Clone, Copy)]
struct Out {
    relay: SocketAddr,
    peer: SocketAddr,
    until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct In {
    client: SocketAddr,
    channel: u16,
    until: Instant,
}

impl Routes {
    /// The protocol sent ChannelData from `client`'s `channel` out of the
    /// allocation `relay` to `peer`.
    pub(crate) fn learn_out(
        &mut self,
        client: SocketAddr,
        channel: u16,
        relay: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) {
        if self.out.len() < MAX_ROUTES || self.out.contains_key(&(client, channel)) {
            self.out.insert((client, channel), Out { relay, peer, until: now + TTL });
            self.last_out.set(None);
        }
    }

    /// Where ChannelData from `client`'s `channel` goes: the allocation's
    /// relayed address and the peer.
    pub(crate) fn out(
        &self,
        client: SocketAddr,
        channel: u16,
        now: Instant,
    ) -> Option<(SocketAddr, SocketAddr)> {
        let route = remembered(&self.last_out, &self.out, (client, channel))?;
        (now < route.until).then_some((route.relay, route.peer))
    }

    /// The protocol gave a datagram from `peer` to the allocation `relay`
    /// to `client` as ChannelData on `channel`.
    pub(crate) fn learn_in(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        client: SocketAddr,
        channel: u16,
        now: Instant,
    ) {
        if self.inbound.len() < MAX_ROUTES || self.inbound.contains_key(&(relay, peer)) {
            self.inbound.insert((relay, peer), In { client, channel, until: now + TTL });
            self.last_in.set(None);
        }
    }

    /// The client and channel a datagram from `peer` to `relay` goes to.
    pub(crate) fn inbound(
        &self,
        relay: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<(SocketAddr, u16)> {
        let route = remembered(&self.last_in, &self.inbound, (relay, peer))?;
        (now < route.until).then_some((route.client, route.channel))
    }

    /// Forgets every route (an allocation ended, or the protocol state changed).
    pub(crate) fn clear(&mut self) {
        self.out.clear();
        self.inbound.clear();
        self.last_out.set(None);
        self.last_in.set(None);
    }

    /// Drops the routes whose time is up.
    pub(crate) fn prune(&mut self, now: Instant) {
        self.out.retain(|_, r| now < r.until);
        self.inbound.retain(|_, r| now < r.until);
        self.last_out.set(None);
        self.last_in.set(None);
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.out.len(), self.inbound.len())
    }
}

/// `map`'s entry for `key`, from `last` when that was the one found last.
fn remembered<K: Copy + Eq + Hash, V: Copy>(
    last: &Cell<Option<(K, V)>>,
    map: &HashMap<K, V>,
    key: K,
) -> Option<V> {
    match last.get() {
        Some((k, v)) if k == key => Some(v),
        _ => {
            let v = *map.get(&key)?;
            last.set(Some((key, v)));
            Some(v)
        }
    }
}

/// A ChannelData message's channel number and payload, if `data` is one
/// (channel numbers 0x4000-0x4FFF, RFC 8656 §12; over UDP the padding is
/// optional, so anything after the payload is ignored, as the protocol does).
pub(crate) fn channel_data(data: &[u8]) -> Option<(u16, &[u8])> {
    let header = data.get(..4)?;
    let channel = u16::from_be_bytes([header[0], header[1]]);
    if !(0x4000..=0x4FFF).contains(&channel) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    Some((channel, data.get(4..4 + len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_route_is_used_for_its_ttl_and_no_longer() {
        let t0 = Instant::now();
        let mut r = Routes::default();
        r.learn_out(addr(1), 0x4000, addr(2), addr(3), t0);
        r.learn_in(addr(2), addr(3), addr(1), 0x4001, t0);
        assert_eq!(r.out(addr(1), 0x4000, t0), Some((addr(2), addr(3))));
        assert_eq!(r.out(addr(1), 0x4001, t0), None);
        assert_eq!(r.inbound(addr(2), addr(3), t0 + TTL / 2), Some((addr(1), 0x4001)));
        assert_eq!(r.out(addr(1), 0x4000, t0 + TTL), None);
        assert_eq!(r.inbound(addr(2), addr(3), t0 + TTL), None);
        // Learned again, it lives another TTL.
        r.learn_out(addr(1), 0x4000, addr(2), addr(3), t0 + TTL);
        assert!(r.out(addr(1), 0x4000, t0 + TTL + TTL / 2).is_some());
        r.prune(t0 + TTL);
        assert_eq!(r.len(), (1, 0));
        r.clear();
        assert_eq!(r.out(addr(1), 0x4000, t0 + TTL), None);
    }

    #[test]
    fn the_route_found_last_is_never_stale() {
        let t0 = Instant::now();
        let mut r = Routes::default();
        r.learn_out(addr(1), 0x4000, addr(2), addr(3), t0);
        r.learn_in(addr(2), addr(3), addr(1), 0x4000, t0);
        assert_eq!(r.out(addr(1), 0x4000, t0), Some((addr(2), addr(3))));
        assert_eq!(r.inbound(addr(2), addr(3), t0), Some((addr(1), 0x4000)));
        // Learned again with another end: the new one, at once.
        r.learn_out(addr(1), 0x4000, addr(2), addr(4), t0);
        r.learn_in(addr(2), addr(3), addr(5), 0x4001, t0);
        assert_eq!(r.out(addr(1), 0x4000, t0), Some((addr(2), addr(4))));
        assert_eq!(r.inbound(addr(2), addr(3), t0), Some((addr(5), 0x4001)));
        // Its time still counts, and forgetting forgets it.
        assert_eq!(r.out(addr(1), 0x4000, t0 + TTL), None);
        r.clear();
        assert_eq!(r.out(addr(1), 0x4000, t0), None);
        assert_eq!(r.inbound(addr(2), addr(3), t0), None);
        r.learn_out(addr(1), 0x4000, addr(2), addr(3), t0);
        assert!(r.out(addr(1), 0x4000, t0).is_some());
        r.prune(t0 + TTL);
        r.learn_out(addr(1), 0x4000, addr(2), addr(3), t0 + TTL);
        assert_eq!(r.len(), (1, 0));
        r.prune(t0 + TTL + TTL);
        assert_eq!(r.out(addr(1), 0x4000, t0), None, "pruned, not served from memory");
    }

    #[test]
    fn routes_are_bounded() {
        let t0 = Instant::now();
        let mut r = Routes::default();
        for i in 0..MAX_ROUTES + 10 {
            let client = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1000));
            r.learn_out(client, 0x4000, addr(2), addr(3), t0);
            r.learn_in(addr(2), client, client, 0x4000, t0);
        }
        assert_eq!(r.len(), (MAX_ROUTES, MAX_ROUTES));
        // A known route is refreshed even when full.
        let first = SocketAddr::from(([10, 0, 0, 0], 1000));
        r.learn_out(first, 0x4000, addr(2), addr(4), t0);
        assert_eq!(r.out(first, 0x4000, t0), Some((addr(2), addr(4))));
    }

    #[test]
    fn only_channel_numbers_frame_channel_data() {
        assert_eq!(channel_data(&[0x40, 0x00, 0, 3, 1, 2, 3]), Some((0x4000, &[1u8, 2, 3][..])));
        // Padding after the payload is ignored.
        assert_eq!(channel_data(&[0x4f, 0xff, 0, 1, 9, 0, 0, 0]), Some((0x4fff, &[9u8][..])));
        assert_eq!(channel_data(&[0x40, 0x00, 0, 4, 1, 2, 3]), None, "truncated");
        assert_eq!(channel_data(&[0x50, 0x00, 0, 0]), None, "reserved range");
        assert_eq!(channel_data(&[0x00, 0x01, 0, 0]), None, "a STUN message");
        assert_eq!(channel_data(&[0x40, 0x00, 0]), None);
    }
}
