//! Maps keyed by what this server chose: its relayed addresses and ports.
//!
//! They are looked up for every relayed datagram, several times, and
//! SipHash (std's default, keyed against collision floods) was a tenth of
//! the driver's time relaying between two allocations. A client chooses
//! none of these keys (the kernel or the configured range picks each relay
//! port), so nobody can fill a table with colliding entries, and an
//! unkeyed fast hash is safe here. Maps keyed by clients' and peers'
//! addresses keep SipHash.

pub(crate) type OwnMap<K, V> = rustc_hash::FxHashMap<K, V>;
pub(crate) type OwnSet<K> = rustc_hash::FxHashSet<K>;
