//! Signals relayed over the overlay ([`Overlay::relay`]): routes learned
//! from what came through a neighbour, passed on hop by hop, and sent back
//! to their writer when they cannot go on.

use std::time::{Duration, Instant};

use super::{Output, Overlay};
use crate::Id;
use crate::wire::{MAX_RELAY, Message};

/// Where to send a relayed signal for a peer: the neighbour a message
/// from it came through.
pub(super) struct Route<P> {
    via: P,
    until: Instant,
}

impl<P> Route<P> {
    /// Whether it still holds at `now`.
    pub(super) fn live(&self, now: Instant) -> bool {
        self.until > now
    }
}

/// Routes known at once.
const MAX_ROUTES: usize = 4096;

impl<P: Id> Overlay<P> {
    /// Sends a signal (an offer, answer or candidate for a connection being
    /// set up) to `to` over the overlay, hop by hop along the reverse path
    /// of a message `to` sent us before (its join walk, a shuffle, a
    /// broadcast, a relayed signal), so that the server carries no
    /// signaling between members that can reach each other. Returns false
    /// if no route is known (or the payload is over [`MAX_RELAY`]): send it
    /// through the server. A relay that cannot go on comes back as
    /// [`Output::RelayFailed`]. Signals to one peer follow one route, in order.
    pub fn relay(&mut self, to: P, payload: Vec<u8>, now: Instant) -> bool {
        if self.left || to == self.me || payload.len() > MAX_RELAY {
            return false;
        }
        let Some(hop) = self.next_hop(&to, None, now) else { return false };
        self.stats.relayed += 1;
        let msg = Message::Relay { to, from: self.me.clone(), ttl: self.config.relay_ttl, payload };
        self.send(hop, msg, now);
        true
    }

    /// The neighbour a signal relayed to `to` now would be passed to
    /// (`to` itself when connected), if a way is known.
    pub fn relay_hop(&self, to: &P, now: Instant) -> Option<P> {
        self.next_hop(to, None, now)
    }

    /// Whether the connection to `peer` is up.
    fn is_up(&self, peer: &P) -> bool {
        self.conns.get(peer).is_some_and(|c| c.up)
    }

    /// The neighbour to pass a relayed signal for `to` to: `to` itself if
    /// connected, else the route's, if it is up and not `except`.
    fn next_hop(&self, to: &P, except: Option<&P>, now: Instant) -> Option<P> {
        if self.is_up(to) {
            return Some(to.clone());
        }
        let r = self.routes.get(to)?;
        (r.until > now && Some(&r.via) != except && self.is_up(&r.via)).then(|| r.via.clone())
    }

    /// `dest` sent something that came to us through `via`: the way back.
    /// The first route stays while it lasts and its link is up, so signals
    /// to one peer keep their order.
    pub(super) fn learn_route(&mut self, dest: &P, via: &P, now: Instant) {
        if *dest == self.me || dest == via {
            return;
        }
        let until = now + self.config.route_retention;
        let keep = match self.routes.get_mut(dest) {
            Some(r) if r.via == *via => {
                r.until = until;
                return;
            }
            Some(r) => r.until > now && self.conns.get(&r.via).is_some_and(|c| c.up),
            None => false,
        };
        if keep {
            return;
        }
        if self.routes.len() >= MAX_ROUTES && !self.routes.contains_key(dest) {
            // Full: expired ones go at the next tick.
            return;
        }
        self.routes.insert(dest.clone(), Route { via: via.clone(), until });
    }

    /// Whether one more relay may be passed on this second.
    fn relay_budget(&mut self, now: Instant) -> bool {
        if now >= self.relay_window.0 + Duration::from_secs(1) {
            self.relay_window = (now, 0);
        }
        if self.relay_window.1 >= self.config.max_relays_per_second {
            return false;
        }
        self.relay_window.1 += 1;
        true
    }

    pub(super) fn on_relay(&mut self, link: P, to: P, from: P, ttl: u8, payload: Vec<u8>, now: Instant) {
        if payload.len() > MAX_RELAY {
            return;
        }
        if from == self.me {
            // Ours, back by a loop of routes learned at different times.
            self.routes.remove(&to);
            self.stats.relays_failed += 1;
            self.out.push_back(Output::RelayFailed { to, payload });
            return;
        }
        self.learn_route(&from, &link, now);
        if to == self.me {
            self.stats.relays_received += 1;
            self.out.push_back(Output::Relayed { from, payload });
            return;
        }
        let hop = if ttl > 0 && self.relay_budget(now) { self.next_hop(&to, Some(&link), now) } else { None };
        // Not back to its writer: the route would loop.
        let hop = hop.filter(|h| *h != from);
        match hop {
            Some(hop) => {
                self.stats.relays_forwarded += 1;
                self.send(hop, Message::Relay { to, from, ttl: ttl - 1, payload }, now);
            }
            None => {
                // Back the way it came: each hop learned the way to its writer.
                let ttl = self.config.relay_ttl;
                self.send(link, Message::Unreachable { to: from, from: to, ttl, payload }, now);
            }
        }
    }

    pub(super) fn on_unreachable(
        &mut self,
        link: P,
        to: P,
        from: P,
        ttl: u8,
        payload: Vec<u8>,
        now: Instant,
    ) {
        if self.routes.get(&from).is_some_and(|r| r.via == link) {
            self.routes.remove(&from);
        }
        if to == self.me {
            self.stats.relays_failed += 1;
            self.out.push_back(Output::RelayFailed { to: from, payload });
            return;
        }
        let hop = if ttl > 0 && self.relay_budget(now) { self.next_hop(&to, Some(&link), now) } else { None };
        match hop {
            Some(hop) => self.send(hop, Message::Unreachable { to, from, ttl: ttl - 1, payload }, now),
            None => self.stats.dropped += 1,
        }
    }
}
