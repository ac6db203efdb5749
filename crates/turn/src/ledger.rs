//! The allocation rules without I/O: who may allocate (quotas per server,
//! user and client address), when new clients are admitted (a rate, and the
//! protocol-state *generations* that bound the authentication tables), and
//! when an allocation is revoked (maximum lifetime). Time and events go in;
//! decisions and [`Command`]s for the driver (`server.rs`) come out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::bucket::TokenBucket;
use crate::config::Limits;
use crate::own::{OwnMap, OwnSet};
use crate::stream::per_ip_key;

/// What the driver does for the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Start fresh protocol state, generation `id`, for new clients. The
    /// previous generation is kept when `keep_previous` (it still has
    /// allocations), else dropped.
    NewGeneration { id: u64, keep_previous: bool },
    /// Forget generation `id`: its last allocation ended.
    DropGeneration { id: u64 },
    /// Stop relaying for the allocation at `relayed`; its client's
    /// requests get 437 from now on.
    Revoke { relayed: SocketAddr, why: RevokeWhy },
}

/// Why an allocation stops relaying before the protocol closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RevokeWhy {
    /// It reached `max_lifetime`.
    MaxLifetime,
    /// The TCP or TLS connection it was made on ended.
    ConnectionClosed,
}

/// Why a request or an allocation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many requests from new client addresses this second.
    RateLimited,
    /// The authentication tables are full and the previous generation still
    /// has allocations.
    TablesFull,
    /// The server holds `max_allocations`.
    ServerFull,
    /// The user holds `max_allocations_per_user`.
    UserQuota,
    /// The client address holds `max_allocations_per_ip`.
    AddressQuota,
    /// The client's IP already has `max_auth_entries_per_ip` addresses in
    /// the current authentication tables.
    AddressEntries,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::RateLimited => "too many new clients this second",
            Refusal::TablesFull => "authentication tables full",
            Refusal::ServerFull => "server allocation limit reached",
            Refusal::UserQuota => "per-user allocation limit reached",
            Refusal::AddressQuota => "per-address allocation limit reached",
            Refusal::AddressEntries => "too many new addresses from one IP",
        })
    }
}

/// What the ledger knows of a client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Client {
    /// Nothing: its first request must be admitted ([`Ledger::admit`]).
    New,
    /// It has allocations in generation `gen`.
    Known { gen_id: u64 },
    /// One of its allocations was revoked.
    Revoked,
}

/// One allocation, keyed by its advertised relayed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// The advertised relayed address: the allocation's identity.
    pub relayed: SocketAddr,
    pub gen_id: u64,
    pub client: SocketAddr,
    pub user: String,
    pub created: Instant,
    pub port: u16,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
struct Generation {
    id: u64,
    /// Users primed plus client addresses fed to it: the entries of the
    /// protocol's authentication tables (a nonce per address, a key per
    /// user).
    load: usize,
    allocations: usize,
    /// The client addresses fed to it (bounded by `max_auth_entries`), and
    /// how many of them each IP (IPv6: /64) has.
    addresses: HashSet<SocketAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Generation {
    fn new(id: u64) -> Self {
        Generation { id, load: 0, allocations: 0, addresses: HashSet::new(), per_ip: HashMap::new() }
    }
}

#[derive(Debug)]
struct ClientState {
    gen_id: u64,
    allocations: usize,
    revoked: bool,
}

/// Every rule of the server, and the state they need. Every map is bounded
/// by `max_allocations` (the client and quota maps hold only addresses and
/// users with allocations).
#[derive(Debug)]
pub(crate) struct Ledger {
    limits: Limits,
    current: Generation,
    previous: Option<Generation>,
    next_id: u64,
    /// By relayed address.
    allocs: OwnMap<SocketAddr, Record>,
    clients: HashMap<SocketAddr, ClientState>,
    per_user: HashMap<String, usize>,
    per_ip: HashMap<IpAddr, usize>,
    ports: OwnSet<u16>,
    new_clients: TokenBucket,
    out: VecDeque<Command>,
}

impl Ledger {
    /// The first generation has id 1.
    pub fn new(limits: Limits, now: Instant) -> Self {
        let rate = u64::from(limits.new_client_requests_per_sec);
        Ledger {
            limits,
            current: Generation::new(1),
            previous: None,
            next_id: 2,
            allocs: OwnMap::default(),
            clients: HashMap::new(),
            per_user: HashMap::new(),
            per_ip: HashMap::new(),
            ports: OwnSet::default(),
            new_clients: TokenBucket::new(rate, rate, now),
            out: VecDeque::new(),
        }
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// The generation new clients go to.
    pub fn current_generation(&self) -> u64 {
        self.current.id
    }

    /// What is known of `addr`.
    pub fn client(&self, addr: SocketAddr) -> Client {
        match self.clients.get(&addr) {
            None => Client::New,
            Some(c) if c.revoked => Client::Revoked,
            Some(c) => Client::Known { gen_id: c.gen_id },
        }
    }

    /// A request from an address without allocations: admitted to a
    /// generation (the current one, or a fresh one when the current one's
    /// tables are full), or refused.
    pub fn admit(&mut self, from: SocketAddr, now: Instant) -> Result<u64, Refusal> {
        if !self.new_clients.try_take(1, now) {
            return Err(Refusal::RateLimited);
        }
        // An address already fed to the current tables takes no more room.
        if self.current.addresses.contains(&from) {
            return Ok(self.current.id);
        }
        let ip = per_ip_key(from.ip());
        if self.current.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_auth_entries_per_ip {
            return Err(Refusal::AddressEntries);
        }
        if self.current.load >= self.limits.max_auth_entries {
            if self.previous.as_ref().is_some_and(|p| p.allocations > 0) {
                return Err(Refusal::TablesFull);
            }
            let previous = std::mem::replace(&mut self.current, Generation::new(self.next_id));
            self.next_id += 1;
            let keep_previous = previous.allocations > 0;
            self.previous = keep_previous.then_some(previous);
            self.out.push_back(Command::NewGeneration { id: self.current.id, keep_previous });
        }
        self.current.load += 1;
        self.current.addresses.insert(from);
        *self.current.per_ip.entry(ip).or_default() += 1;
        Ok(self.current.id)
    }

    /// A REST user was added to generation `gen_id`'s tables.
    pub fn primed(&mut self, gen_id: u64) {
        if let Some(g) = self.generation_mut(gen_id) {
            g.load += 1;
        }
    }

    fn generation_mut(&mut self, id: u64) -> Option<&mut Generation> {
        if self.current.id == id {
            Some(&mut self.current)
        } else {
            self.previous.as_mut().filter(|g| g.id == id)
        }
    }

    /// Whether `user` at `client` may have one more allocation.
    pub fn check_allocation(&self, client: SocketAddr, user: &str) -> Result<(), Refusal> {
        let limits = &self.limits;
        if self.allocs.len() >= limits.max_allocations {
            Err(Refusal::ServerFull)
        } else if self.per_user.get(user).copied().unwrap_or(0) >= limits.max_allocations_per_user {
            Err(Refusal::UserQuota)
        } else if self.per_ip.get(&per_ip_key(client.ip())).copied().unwrap_or(0)
            >= limits.max_allocations_per_ip
        {
            Err(Refusal::AddressQuota)
        } else {
            Ok(())
        }
    }

    /// Relay ports held by live allocations (a new relay socket must not
    /// take one, even while its allocation is revoked and not yet closed).
    pub fn ports(&self) -> &OwnSet<u16> {
        &self.ports
    }

    /// An allocation was made (after [`Ledger::check_allocation`]).
    pub fn allocation_created(&mut self, record: Record) {
        if let Some(g) = self.generation_mut(record.gen_id) {
            g.allocations += 1;
        }
        self.ports.insert(record.port);
        *self.per_user.entry(record.user.clone()).or_default() += 1;
        *self.per_ip.entry(per_ip_key(record.client.ip())).or_default() += 1;
        self.clients
            .entry(record.client)
            .or_insert(ClientState { gen_id: record.gen_id, allocations: 0, revoked: false })
            .allocations += 1;
        self.allocs.insert(record.relayed, record);
    }

    /// The allocation at `relayed`, if it is live.
    pub fn allocation(&self, relayed: SocketAddr) -> Option<&Record> {
        self.allocs.get(&relayed)
    }

    /// The protocol closed the allocation at `relayed` (expired or deleted):
    /// frees its quotas (a revoked one's were freed when it was revoked) and
    /// port; the record, if it was ours.
    pub fn allocation_closed(&mut self, relayed: SocketAddr) -> Option<Record> {
        let record = self.allocs.remove(&relayed)?;
        self.ports.remove(&record.port);
        if !record.revoked {
            release_quotas(&mut self.per_user, &mut self.per_ip, &record);
        }
        if let Some(client) = self.clients.get_mut(&record.client) {
            client.allocations = client.allocations.saturating_sub(1);
            if client.allocations == 0 {
                self.clients.remove(&record.client);
            }
        }
        if let Some(g) = self.generation_mut(record.gen_id) {
            g.allocations = g.allocations.saturating_sub(1);
        }
        if let Some(id) = self.previous.as_ref().filter(|p| p.allocations == 0).map(|p| p.id) {
            self.previous = None;
            self.out.push_back(Command::DropGeneration { id });
        }
        Some(record)
    }

    /// Revokes allocations that reached the maximum lifetime.
    pub fn housekeeping(&mut self, now: Instant) {
        let max = self.limits.max_lifetime;
        for (relayed, record) in &mut self.allocs {
            if record.revoked || now.saturating_duration_since(record.created) < max {
                continue;
            }
            record.revoked = true;
            release_quotas(&mut self.per_user, &mut self.per_ip, record);
            if let Some(client) = self.clients.get_mut(&record.client) {
                client.revoked = true;
            }
            self.out.push_back(Command::Revoke { relayed: *relayed, why: RevokeWhy::MaxLifetime });
        }
    }

    /// The TCP or TLS connection of `client` ended: its allocations stop
    /// relaying (RFC 8656 §3.1: an allocation over a stream lives as long
    /// as the connection).
    pub fn connection_closed(&mut self, client: SocketAddr) {
        for (relayed, record) in &mut self.allocs {
            if record.client != client || record.revoked {
                continue;
            }
            record.revoked = true;
            release_quotas(&mut self.per_user, &mut self.per_ip, record);
            self.out.push_back(Command::Revoke { relayed: *relayed, why: RevokeWhy::ConnectionClosed });
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.revoked = true;
        }
    }

    /// How long `record` has lived at `now`.
    pub fn age(record: &Record, now: Instant) -> Duration {
        now.saturating_duration_since(record.created)
    }
}

/// A revoked allocation relays nothing more: its user's and its address's
/// quotas are free at once (a client whose TCP connection broke makes a new
/// allocation on its next one), though the protocol keeps its state, and
/// the ledger its port and its place in the total, until it expires.
fn release_quotas(
    per_user: &mut HashMap<String, usize>,
    per_ip: &mut HashMap<IpAddr, usize>,
    record: &Record,
) {
    decrement(per_user, &record.user);
    decrement(per_ip, &per_ip_key(record.client.ip()));
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_allocations: 4,
            max_allocations_per_user: 2,
            max_allocations_per_ip: 3,
            max_lifetime: Duration::from_secs(60),
            max_auth_entries: 3,
            new_client_requests_per_sec: 5,
            ..Limits::default()
        }
    }

    fn addr(host: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, host], port))
    }

    fn record(ledger: &Ledger, port: u16, client: SocketAddr, user: &str, now: Instant) -> Record {
        Record {
            relayed: addr(200, port),
            gen_id: ledger.current_generation(),
            client,
            user: user.into(),
            created: now,
            port,
            revoked: false,
        }
    }

    fn commands(ledger: &mut Ledger) -> Vec<Command> {
        std::iter::from_fn(|| ledger.poll_command()).collect()
    }

    #[test]
    fn quotas_per_server_user_and_address() {
        let t0 = Instant::now();
        let mut l = Ledger::new(limits(), t0);
        let (alice, bob, carol) = (addr(1, 1000), addr(2, 1000), addr(3, 1000));
        for port in [50000, 50001] {
            assert_eq!(l.check_allocation(alice, "alice"), Ok(()));
            l.allocation_created(record(&l, port, alice, "alice", t0));
        }
        assert_eq!(l.check_allocation(alice, "alice"), Err(Refusal::UserQuota));
        assert_eq!(l.check_allocation(alice, "alice2"), Ok(()), "another user at the same address");
        l.allocation_created(record(&l, 50002, alice, "alice2", t0));
        assert_eq!(l.check_allocation(alice, "alice3"), Err(Refusal::AddressQuota));
        l.allocation_created(record(&l, 50003, bob, "bob", t0));
        assert_eq!(l.check_allocation(carol, "carol"), Err(Refusal::ServerFull));
        assert_eq!(l.ports().len(), 4);
        // Closing frees the user's quota, the address's and the port.
        let closed = l.allocation_closed(addr(200, 50000)).unwrap();
        assert_eq!(closed.user, "alice");
        assert_eq!(l.allocation_closed(addr(200, 50000)), None, "closed once");
        assert!(!l.ports().contains(&50000));
        assert_eq!(l.check_allocation(carol, "carol"), Ok(()));
        assert_eq!(
            l.check_allocation(alice, "alice"),
            Ok(()),
            "one of alice's two, two of the address's three"
        );
        assert_eq!(l.client(bob), Client::Known { gen_id: 1 });
        l.allocation_closed(addr(200, 50003));
        assert_eq!(l.client(bob), Client::New, "a client without allocations is forgotten");
    }

    #[test]
    fn new_clients_are_rate_limited_on_simulated_time() {
        let t0 = Instant::now();
        let mut l = Ledger::new(Limits { max_auth_entries: 1000, ..limits() }, t0);
        let admitted = (0..10).filter(|i| l.admit(addr(1, 1000 + i), t0).is_ok()).count();
        assert_eq!(admitted, 5, "a burst of one second's worth");
        assert_eq!(l.admit(addr(1, 2000), t0), Err(Refusal::RateLimited));
        assert_eq!(l.admit(addr(1, 2001), t0 + Duration::from_millis(200)), Ok(1), "one more after 1/5 s");
        assert_eq!(l.admit(addr(1, 2002), t0 + Duration::from_millis(200)), Err(Refusal::RateLimited));
    }

    /// Full tables start a new generation; while the previous one still
    /// has allocations no third is started, and new clients are refused;
    /// once it drains it is dropped and rotation works again.
    #[test]
    fn generations_bound_the_authentication_tables() {
        let t0 = Instant::now();
        let mut l = Ledger::new(Limits { new_client_requests_per_sec: 1000, ..limits() }, t0);
        let c = addr(9, 1);
        for i in 0..3 {
            assert_eq!(l.admit(addr(10 + i, 1), t0), Ok(1));
        }
        l.allocation_created(record(&l, 50000, c, "u", t0));
        assert_eq!(commands(&mut l), []);
        // Generation 1 is full (3 entries): new clients go to generation 2,
        // and generation 1 is kept for its allocation.
        assert_eq!(l.admit(addr(20, 1), t0), Ok(2));
        assert_eq!(commands(&mut l), [Command::NewGeneration { id: 2, keep_previous: true }]);
        l.primed(2);
        l.primed(2);
        assert_eq!(l.admit(addr(21, 1), t0), Err(Refusal::TablesFull), "generation 2 is full, 1 not drained");
        // The allocation of generation 1 ends: it is dropped...
        l.allocation_closed(addr(200, 50000));
        assert_eq!(commands(&mut l), [Command::DropGeneration { id: 1 }]);
        // ...and generation 3 replaces 2, which has no allocation to keep.
        assert_eq!(l.admit(addr(21, 1), t0), Ok(3));
        assert_eq!(commands(&mut l), [Command::NewGeneration { id: 3, keep_previous: false }]);
    }

    /// The tables hold a nonce per client address: an address asking again
    /// takes no more room, and one host changing its source port takes at
    /// most its share, so it cannot fill them and lock new clients out.
    #[test]
    fn the_tables_count_addresses_and_give_each_ip_a_share() {
        let t0 = Instant::now();
        let limits = Limits {
            max_auth_entries: 100,
            max_auth_entries_per_ip: 4,
            new_client_requests_per_sec: 1000,
            ..limits()
        };
        let mut l = Ledger::new(limits, t0);
        for _ in 0..10 {
            assert_eq!(l.admit(addr(1, 1000), t0), Ok(1), "the same address again");
        }
        assert_eq!(l.current.load, 1);
        for port in 1001..1004 {
            assert_eq!(l.admit(addr(1, port), t0), Ok(1));
        }
        assert_eq!(l.admit(addr(1, 1004), t0), Err(Refusal::AddressEntries), "the IP's fifth address");
        assert_eq!(l.admit(addr(1, 1000), t0), Ok(1), "its first still asks");
        assert_eq!(l.admit(addr(2, 1000), t0), Ok(1), "another IP");
        // IPv6: one /64 is one client network.
        let v6 = |last: u16, port: u16| SocketAddr::from(([0x2001, 0xdb8, 1, 2, 0, 0, 0, last], port));
        for i in 0..4 {
            assert_eq!(l.admit(v6(i, 1), t0), Ok(1));
        }
        assert_eq!(l.admit(v6(9, 1), t0), Err(Refusal::AddressEntries));
        assert_eq!(l.current.load, 9);
    }

    /// The allocation quota per address counts an IPv6 client's /64.
    #[test]
    fn the_allocation_quota_counts_an_ipv6_clients_network() {
        let t0 = Instant::now();
        let mut l = Ledger::new(limits(), t0);
        let v6 = |last: u16| SocketAddr::from(([0x2001, 0xdb8, 1, 2, 0, 0, 0, last], 4000));
        for (port, last) in [(50000, 1), (50001, 2), (50002, 3)] {
            assert_eq!(l.check_allocation(v6(last), &format!("u{last}")), Ok(()));
            l.allocation_created(record(&l, port, v6(last), &format!("u{last}"), t0));
        }
        assert_eq!(l.check_allocation(v6(4), "u4"), Err(Refusal::AddressQuota));
    }

    /// A client whose TCP connection broke comes back on a new one (a new
    /// address): its revoked allocations no longer hold its quotas, and when
    /// the protocol closes them they are not counted off twice.
    #[test]
    fn a_closed_connection_frees_its_allocations_quotas() {
        let t0 = Instant::now();
        let mut l = Ledger::new(limits(), t0);
        let (first, second) = (addr(1, 1000), addr(1, 1001));
        for port in [50000, 50001] {
            l.allocation_created(record(&l, port, first, "alice", t0));
        }
        assert_eq!(l.check_allocation(second, "alice"), Err(Refusal::UserQuota));
        l.connection_closed(first);
        assert_eq!(commands(&mut l).len(), 2, "both revoked");
        assert_eq!(l.check_allocation(second, "alice"), Ok(()), "the user's quota is free");
        l.allocation_created(record(&l, 50002, second, "alice", t0));
        // The protocol closes the revoked ones: alice still holds one.
        l.allocation_closed(addr(200, 50000));
        l.allocation_closed(addr(200, 50001));
        l.allocation_created(record(&l, 50003, second, "alice", t0));
        assert_eq!(l.check_allocation(second, "alice"), Err(Refusal::UserQuota), "two live: the quota holds");
    }

    #[test]
    fn allocations_are_revoked_at_the_maximum_lifetime() {
        let t0 = Instant::now();
        let mut l = Ledger::new(limits(), t0);
        let (a, b) = (addr(1, 1), addr(2, 2));
        l.allocation_created(record(&l, 50000, a, "a", t0));
        l.allocation_created(record(&l, 50001, b, "b", t0 + Duration::from_secs(30)));
        l.housekeeping(t0 + Duration::from_secs(59));
        assert_eq!(commands(&mut l), []);
        l.housekeeping(t0 + Duration::from_secs(60));
        assert_eq!(
            commands(&mut l),
            [Command::Revoke { relayed: addr(200, 50000), why: RevokeWhy::MaxLifetime }]
        );
        assert_eq!(l.client(a), Client::Revoked);
        assert_eq!(l.client(b), Client::Known { gen_id: 1 });
        l.housekeeping(t0 + Duration::from_secs(61));
        assert_eq!(commands(&mut l), [], "revoked once");
        assert!(l.ports().contains(&50000), "the port stays taken until the protocol closes it");
        l.housekeeping(t0 + Duration::from_secs(90));
        assert_eq!(
            commands(&mut l),
            [Command::Revoke { relayed: addr(200, 50001), why: RevokeWhy::MaxLifetime }]
        );
    }
}
