//! peerlink's embedded STUN/TURN server (RFC 8489 / RFC 8656; clients on
//! UDP, TCP or TLS, relaying over UDP).
//!
//! `peerlink serve` runs it next to the signaling server so that peers behind
//! NATs that defeat direct connections can still reach each other through a
//! relay. The protocol is [turn-server-proto] (sans-IO); this crate is the
//! tokio driver around it and adds what a public server needs and the
//! protocol crate leaves out:
//!
//! - **Binding** requests are answered directly, without credentials, with
//!   XOR-MAPPED-ADDRESS set to the client's source address.
//! - **Credentials**: static users and/or coturn-style REST credentials
//!   (`use-auth-secret`): the signaling server hands every peer
//!   [`rest_credentials`] in its `welcome`, and the same secret works with a
//!   coturn instead of the embedded server. An expired REST username gets 401
//!   for new allocations.
//! - **No open relay**: allocations need valid credentials; quotas per user,
//!   per client IP (486 Allocation Quota Reached, signed) and in total (508
//!   Insufficient Capacity); a hard cap on an
//!   allocation's age; a bandwidth token bucket per allocation and direction;
//!   and a [`PeerPolicy`] that refuses loopback, unspecified, multicast,
//!   broadcast, link-local, the server's listen socket and an allocation's
//!   own relayed address (private networks, and other allocations' relays for
//!   two relayed peers, are allowed unless configured otherwise).
//! - **Bounded memory**: every queue and map has a cap; datagrams that do not
//!   fit are dropped, as UDP would drop them, and counted in [`Stats`].
//!
//! - **TCP and TLS clients** ([`Server::with_tcp`], [`Server::with_tls`]) for
//!   networks that block UDP: `turn:HOST:PORT?transport=tcp` and
//!   `turns:HOST:PORT`. Messages are framed as RFC 8656 §12.5 says
//!   (ChannelData padded to four bytes; unpadded input is accepted too) and
//!   handled exactly like datagrams from the connection's address; the
//!   relayed side is UDP. An allocation stops relaying when its connection
//!   ends. Connections are capped in total and per IP (per /64 for IPv6),
//!   must finish the TLS handshake and send a first message within
//!   [`HANDSHAKE_TIMEOUT`], are closed once they have held no allocation
//!   for [`IDLE_TIMEOUT`] (Binding requests do not keep them), queue at most
//!   [`WRITE_QUEUE_BYTES`] for writing, and end when a write is not taken
//!   within [`WRITE_TIMEOUT`].
//!
//! One task owns all state. Each relay socket has a small receive task that
//! forwards datagrams to it over a bounded queue (1024 datagrams, shared;
//! overflow is dropped); each TCP/TLS connection has a task that frames what
//! it reads into the same kind of queue. Sends never wait: a full kernel
//! buffer (or a connection's full write queue) drops the message.
//!
//! ```no_run
//! use std::time::{Duration, SystemTime};
//! use peerlink_turn::{Auth, Config, rest_credentials};
//!
//! # async fn run() -> Result<(), peerlink_turn::Error> {
//! let secret = "a long random secret";
//! let mut config = Config::new(Auth::rest(secret));
//! config.external_ip = Some("203.0.113.7".parse().unwrap()); // listening on 0.0.0.0
//! let socket = tokio::net::UdpSocket::bind(config.listen).await?;
//!
//! // What the signaling server puts in `welcome` for one peer:
//! let creds = rest_credentials(secret, "peer-42", Duration::from_secs(3600), SystemTime::now());
//! assert!(creds.username.ends_with(":peer-42"));
//!
//! let server = peerlink_turn::Server::new(socket, config)?;
//! let stats = server.stats(); // e.g. for /healthz
//! server.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! println!("{} allocations were created", stats.snapshot().allocations_created);
//! # Ok(()) }
//! ```
//!
//! Limitations: relaying is UDP only (no RFC 6062 TCP allocations: those get 400);
//! ICMP from peers is not relayed; a client that hides its username behind
//! USERHASH can only use static credentials; the peer policy is applied to
//! data, so CreatePermission for a refused peer succeeds but nothing flows.
//!
//! [turn-server-proto]: https://docs.rs/turn-server-proto

#![warn(missing_docs)]

mod bucket;
mod config;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod ledger;
mod own;
mod policy;
mod relay;
mod rest;
mod routes;
mod server;
mod stats;
mod stream;
mod stun;

use std::future::Future;

pub use config::{Auth, Config, IpNet, Limits, PeerPolicy};
pub use rest::{RestCredentials, rest_credentials, rest_password};
pub use server::Server;
pub use stats::{Stats, StatsSnapshot};
pub use stream::{HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, TlsConfig, WRITE_QUEUE_BYTES, WRITE_TIMEOUT};

/// Errors from starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work; the message says which part.
    #[error("invalid STUN/TURN configuration: {0}")]
    Config(String),
    /// The listen socket failed.
    #[error("STUN/TURN socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves STUN and TURN on `socket` until `shutdown` completes.
///
/// Shorthand for [`Server::new`] then [`Server::run`]; use those to get a
/// [`Stats`] handle first.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    Server::new(socket, config)?.run(shutdown).await
}
