//! peerlink pairing: a short code such as `7-lantern-zebra-acid` lets two
//! peers agree on keys through a signaling server they do not trust.
//!
//! The number names the room both sides meet in; the words are the password
//! of a SPAKE2 exchange (Ed25519 group, the construction of RustCrypto's
//! `spake2` 0.4 and python-spake2, which magic-wormhole uses too) whose
//! messages travel through the server. Each side then proves it derived the
//! same key (key confirmation), so a wrong code fails on both sides after a
//! single try, and an attacker, the server included, gets one guess per
//! code. The resulting [`Keys`] authenticate the WebRTC session: every offer
//! and answer carries a MAC, which pins the DTLS fingerprints in it.
//! `docs/PAIRING.md` specifies the bytes; `fixtures/pairing/` holds test
//! vectors the browser client checks too.
//!
//! ```
//! use peerlink_pair::{Code, Pairing, Role};
//!
//! let code = Code::generate(Code::DEFAULT_WORDS);
//! let typed = Code::parse(&code.to_string()).unwrap();
//! let (mut creator, to_joiner) = Pairing::start(Role::Creator, &code);
//! let (mut joiner, to_creator) = Pairing::start(Role::Joiner, &typed);
//! let confirm_from_creator = creator.handle(to_creator).unwrap().unwrap();
//! let confirm_from_joiner = joiner.handle(to_joiner).unwrap().unwrap();
//! creator.handle(confirm_from_joiner).unwrap();
//! joiner.handle(confirm_from_creator).unwrap();
//! assert_eq!(creator.keys().unwrap().sdp_local, joiner.keys().unwrap().sdp_remote);
//! ```

//!
//! [`Session`] decides whom to pair with in the code's room (the rules in
//! `docs/PAIRING.md`), without I/O, so every client follows the same steps.

#![warn(missing_docs)]

mod code;
mod pake;
mod session;

pub use code::{Code, CodeError, wordlist};
pub use pake::{AbortCode, HKDF_SALT, ID_CREATOR, ID_JOINER, Keys, PairError, PairMsg, Pairing, Role};
pub use session::{Abort, MAX_WAITING, Notice, Session, SessionEvent, SessionOutput};
