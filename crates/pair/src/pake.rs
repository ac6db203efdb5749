//! The pairing exchange: SPAKE2 over the signaling server, key
//! confirmation, and the keys that authenticate the WebRTC session.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::code::Code;

type HmacSha256 = Hmac<Sha256>;

/// SPAKE2 identity of the side that made the code.
pub const ID_CREATOR: &str = "peerlink/v1/pair/creator";
/// SPAKE2 identity of the side that typed it.
pub const ID_JOINER: &str = "peerlink/v1/pair/joiner";
/// HKDF salt for every key derived from the SPAKE2 key.
pub const HKDF_SALT: &str = "peerlink pair v1";

/// Which end of the code this side is. SPAKE2 runs in its asymmetric mode:
/// the creator is side A, the joiner side B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Made the code (the sender); SPAKE2 side A.
    Creator,
    /// Typed the code (the receiver); SPAKE2 side B.
    Joiner,
}

/// A pairing message, sent through the signaling server (`send` with a `to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PairMsg {
    /// The SPAKE2 message: 33 bytes (side byte `A`/`B` and a point), hex.
    PairPake {
        /// The 33 bytes, lowercase hex.
        msg: String,
    },
    /// Key confirmation: HMAC-SHA256 with the sender's confirm key over both
    /// SPAKE2 messages (creator's first), hex.
    PairConfirm {
        /// The 32-byte MAC, lowercase hex.
        mac: String,
    },
    /// The sender gave up on this pairing: `code` says why for programs
    /// (absent from version-1 peers), `reason` for people.
    PairAbort {
        /// Why, for programs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<AbortCode>,
        /// Why, for people.
        reason: String,
    },
}

/// Why a side gave up, in a `pair_abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AbortCode {
    /// Key confirmation failed: the codes differ.
    WrongCode,
    /// An offer or answer did not authenticate.
    Tampered,
    /// Nobody completed pairing in time.
    Timeout,
    /// Anything else (cancelled, an error).
    Failed,
    /// A code this version does not know: treated as `failed`.
    #[serde(other)]
    Unknown,
}

impl PairMsg {
    /// The JSON object sent through the server.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("pairing messages always serialize")
    }

    /// Reads a server-routed message; `None` if it is not a pairing message.
    pub fn from_json(value: &serde_json::Value) -> Option<PairMsg> {
        serde_json::from_value(value.clone()).ok()
    }
}

/// What went wrong while pairing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// Key confirmation failed: the other side used a different code (a typo,
    /// or someone guessing). The code is burnt.
    #[error("the codes do not match (a typo, or someone else tried to guess the code)")]
    WrongCode,
    /// The other side sent something that is not a valid pairing message.
    #[error("invalid pairing message: {0}")]
    Invalid(String),
    /// The other side gave up.
    #[error("the other side aborted pairing: {0}")]
    Aborted(String),
}

/// Keys both sides share after pairing; the server never sees them.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    /// MACs the SDP this side sends.
    pub sdp_local: [u8; 32],
    /// Checks the SDP the other side sends.
    pub sdp_remote: [u8; 32],
    /// Reserved for encrypting or authenticating data above the channel.
    pub file: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

struct Confirming {
    /// The other side's confirm key and what it MACs.
    their_key: [u8; 32],
    transcript: Vec<u8>,
    keys: Keys,
}

/// One pairing attempt, without I/O: messages in, messages out.
///
/// Both sides send the message [`Pairing::start`] returns as soon as they see
/// each other, feed every pairing message from the other side to
/// [`Pairing::handle`], and send what it returns. After the other side's
/// confirmation checks out, [`Pairing::keys`] holds the session keys. A
/// wrong code fails on both sides at the first try.
pub struct Pairing {
    role: Role,
    spake: Option<Spake2<Ed25519Group>>,
    mine: Vec<u8>,
    confirming: Option<Confirming>,
    keys: Option<Keys>,
}

impl std::fmt::Debug for Pairing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pairing").field("role", &self.role).field("paired", &self.keys.is_some()).finish()
    }
}

fn ids() -> (Identity, Identity) {
    (Identity::new(ID_CREATOR.as_bytes()), Identity::new(ID_JOINER.as_bytes()))
}

impl Pairing {
    /// Starts a pairing for `code`; returns the first message to send.
    pub fn start(role: Role, code: &Code) -> (Pairing, PairMsg) {
        Self::start_with_password(role, &code.password())
    }

    /// Like [`Pairing::start`] with the password as a string (the canonical
    /// code). Both sides must use the same string.
    pub fn start_with_password(role: Role, password: &str) -> (Pairing, PairMsg) {
        let (id_a, id_b) = ids();
        let pw = Password::new(password.as_bytes());
        let (spake, mine) = match role {
            Role::Creator => Spake2::<Ed25519Group>::start_a(&pw, &id_a, &id_b),
            Role::Joiner => Spake2::<Ed25519Group>::start_b(&pw, &id_a, &id_b),
        };
        Self::started(role, spake, mine)
    }

    #[cfg(test)]
    fn start_with_rng(
        role: Role,
        password: &str,
        rng: impl rand_core_06::RngCore + rand_core_06::CryptoRng,
    ) -> (Pairing, PairMsg) {
        let (id_a, id_b) = ids();
        let pw = Password::new(password.as_bytes());
        let (spake, mine) = match role {
            Role::Creator => Spake2::<Ed25519Group>::start_a_with_rng(&pw, &id_a, &id_b, rng),
            Role::Joiner => Spake2::<Ed25519Group>::start_b_with_rng(&pw, &id_a, &id_b, rng),
        };
        Self::started(role, spake, mine)
    }

    fn started(role: Role, spake: Spake2<Ed25519Group>, mine: Vec<u8>) -> (Pairing, PairMsg) {
        let msg = PairMsg::PairPake { msg: hex(&mine) };
        (Pairing { role, spake: Some(spake), mine, confirming: None, keys: None }, msg)
    }

    /// Which end of the code this side is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The session keys, once the other side's confirmation checked out.
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Handles a message from the other side; returns the reply to send, if any.
    pub fn handle(&mut self, msg: PairMsg) -> Result<Option<PairMsg>, PairError> {
        match msg {
            PairMsg::PairPake { msg } => {
                let theirs =
                    unhex(&msg).ok_or_else(|| PairError::Invalid("pake message is not hex".into()))?;
                if theirs == self.mine {
                    return Err(PairError::Invalid("our own message was reflected back".into()));
                }
                let spake =
                    self.spake.take().ok_or_else(|| PairError::Invalid("a second pake message".into()))?;
                let key =
                    spake.finish(&theirs).map_err(|e| PairError::Invalid(format!("pake message: {e}")))?;
                let (msg_a, msg_b) = match self.role {
                    Role::Creator => (self.mine.as_slice(), theirs.as_slice()),
                    Role::Joiner => (theirs.as_slice(), self.mine.as_slice()),
                };
                let sub = |label: &str| derive(&key, label);
                let (confirm_a, confirm_b) = (sub("confirm A"), sub("confirm B"));
                let (sdp_a, sdp_b) = (sub("sdp A"), sub("sdp B"));
                let (my_confirm, their_confirm, keys) = match self.role {
                    Role::Creator => (
                        confirm_a,
                        confirm_b,
                        Keys { sdp_local: sdp_a, sdp_remote: sdp_b, file: sub("file") },
                    ),
                    Role::Joiner => (
                        confirm_b,
                        confirm_a,
                        Keys { sdp_local: sdp_b, sdp_remote: sdp_a, file: sub("file") },
                    ),
                };
                let mac = hmac(&my_confirm, &[msg_a, msg_b]);
                let transcript = [msg_a, msg_b].concat();
                self.confirming = Some(Confirming { their_key: their_confirm, transcript, keys });
                Ok(Some(PairMsg::PairConfirm { mac: hex(&mac) }))
            }
            PairMsg::PairConfirm { mac } => {
                let Some(confirming) = self.confirming.take() else {
                    return Err(PairError::Invalid("confirmation before the pake message".into()));
                };
                let theirs =
                    unhex(&mac).ok_or_else(|| PairError::Invalid("confirmation is not hex".into()))?;
                let mut check =
                    <HmacSha256 as Mac>::new_from_slice(&confirming.their_key).expect("any key length");
                check.update(&confirming.transcript);
                // verify_slice compares in constant time.
                check.verify_slice(&theirs).map_err(|_| PairError::WrongCode)?;
                self.keys = Some(confirming.keys);
                Ok(None)
            }
            PairMsg::PairAbort { reason, .. } => Err(PairError::Aborted(reason)),
        }
    }
}

/// `HKDF-SHA256(ikm = key, salt = "peerlink pair v1", info = label)`, 32 bytes.
fn derive(key: &[u8], label: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(HKDF_SALT.as_bytes()), key)
        .expand(label.as_bytes(), &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 1024 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A rand_core 0.6 RNG that hands out fixed bytes, as the vectors assume.
    struct FixedRng {
        buf: Vec<u8>,
        pos: usize,
    }

    impl rand_core_06::RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            rand_core_06::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core_06::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, d: &mut [u8]) {
            d.copy_from_slice(&self.buf[self.pos..self.pos + d.len()]);
            self.pos += d.len();
        }
        fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand_core_06::Error> {
            self.fill_bytes(d);
            Ok(())
        }
    }

    impl rand_core_06::CryptoRng for FixedRng {}

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pairing/peerlink-pair-v1.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn field(v: &Value, k: &str) -> String {
        v[k].as_str().unwrap_or_else(|| panic!("vector field {k}")).to_string()
    }

    fn rng(v: &Value, k: &str) -> FixedRng {
        FixedRng { buf: unhex(&field(v, k)).unwrap(), pos: 0 }
    }

    fn confirm_of(m: Option<PairMsg>) -> String {
        match m {
            Some(PairMsg::PairConfirm { mac }) => mac,
            other => panic!("expected a confirmation, got {other:?}"),
        }
    }

    /// The shared vectors (generated with python-spake2, checked by a
    /// JavaScript port): the same messages, keys and confirmations.
    #[test]
    fn matches_the_published_vectors() {
        let v = vectors();
        let pw = field(&v, "password_utf8");
        assert_eq!(
            Code::parse(&field(&v, "code")).map(|c| c.password()).ok(),
            None,
            "the vector code uses words outside our list; the password is the raw string"
        );
        let (mut a, msg_a) = Pairing::start_with_rng(Role::Creator, &pw, rng(&v, "rngA_64_hex"));
        let (mut b, msg_b) = Pairing::start_with_rng(Role::Joiner, &pw, rng(&v, "rngB_64_hex"));
        assert_eq!(msg_a, PairMsg::PairPake { msg: field(&v, "msgA_hex") });
        assert_eq!(msg_b, PairMsg::PairPake { msg: field(&v, "msgB_hex") });
        let conf_a = a.handle(msg_b).unwrap();
        let conf_b = b.handle(msg_a).unwrap();
        assert_eq!(confirm_of(conf_a.clone()), field(&v, "confirmA_hex"));
        assert_eq!(confirm_of(conf_b.clone()), field(&v, "confirmB_hex"));
        assert_eq!(a.handle(conf_b.unwrap()).unwrap(), None);
        assert_eq!(b.handle(conf_a.unwrap()).unwrap(), None);
        let (ka, kb) = (a.keys().unwrap(), b.keys().unwrap());
        assert_eq!(hex(&ka.sdp_local), field(&v, "k_sdp_A_hex"));
        assert_eq!(hex(&ka.sdp_remote), field(&v, "k_sdp_B_hex"));
        assert_eq!(ka.sdp_local, kb.sdp_remote);
        assert_eq!(ka.sdp_remote, kb.sdp_local);
        assert_eq!(hex(&ka.file), field(&v, "k_file_hex"));
        assert_eq!(ka.file, kb.file);
    }

    #[test]
    fn a_wrong_code_fails_on_both_sides_at_the_first_try() {
        let v = vectors();
        let (mut a, msg_a) =
            Pairing::start_with_rng(Role::Creator, &field(&v, "password_utf8"), rng(&v, "rngA_64_hex"));
        let (mut b, msg_b) =
            Pairing::start_with_rng(Role::Joiner, &field(&v, "wrong_code_B"), rng(&v, "rngB_64_hex"));
        assert_eq!(msg_b, PairMsg::PairPake { msg: field(&v, "wrong_msgB_hex") });
        let conf_a = a.handle(msg_b).unwrap().unwrap();
        let conf_b = b.handle(msg_a).unwrap().unwrap();
        assert_eq!(a.handle(conf_b), Err(PairError::WrongCode));
        assert_eq!(b.handle(conf_a), Err(PairError::WrongCode));
        assert!(a.keys().is_none() && b.keys().is_none());
    }

    #[test]
    fn fresh_randomness_pairs_and_keys_differ_per_run() {
        let code = Code::generate(3);
        let run = || {
            let (mut a, ma) = Pairing::start(Role::Creator, &code);
            let (mut b, mb) = Pairing::start(Role::Joiner, &code);
            let ca = a.handle(mb).unwrap().unwrap();
            let cb = b.handle(ma).unwrap().unwrap();
            a.handle(cb).unwrap();
            b.handle(ca).unwrap();
            assert_eq!(a.keys().unwrap().sdp_local, b.keys().unwrap().sdp_remote);
            a.keys().unwrap().clone()
        };
        assert_ne!(run(), run(), "each pairing gets new keys");
    }

    #[test]
    fn malformed_and_out_of_order_messages_are_refused() {
        let code = Code::generate(3);
        let (mut a, ma) = Pairing::start(Role::Creator, &code);
        // A reflected message.
        assert!(matches!(a.handle(ma.clone()), Err(PairError::Invalid(_))));
        let (mut a, _) = Pairing::start(Role::Creator, &code);
        assert!(matches!(
            a.handle(PairMsg::PairConfirm { mac: "00".repeat(32) }),
            Err(PairError::Invalid(_))
        ));
        assert!(matches!(a.handle(PairMsg::PairPake { msg: "zz".into() }), Err(PairError::Invalid(_))));
        let (mut a, _) = Pairing::start(Role::Creator, &code);
        // The creator's own side byte: the wrong side.
        let (_, other_creator) = Pairing::start(Role::Creator, &code);
        assert!(matches!(a.handle(other_creator), Err(PairError::Invalid(_))));
        let (mut a, _) = Pairing::start(Role::Creator, &code);
        assert_eq!(
            a.handle(PairMsg::PairAbort { code: None, reason: "bye".into() }),
            Err(PairError::Aborted("bye".into()))
        );
    }

    /// `fixtures/pairing/messages.json`: every form parses and writes back
    /// the same object; unknown abort codes read as `failed`-like; other
    /// objects are not pairing messages.
    #[test]
    fn message_fixtures() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pairing/messages.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for m in v["messages"].as_array().unwrap() {
            let msg = PairMsg::from_json(&m["json"]).unwrap_or_else(|| panic!("{} parses", m["name"]));
            assert_eq!(msg.to_json(), m["json"], "{} round-trips", m["name"]);
        }
        let unknown = PairMsg::from_json(&v["unknown_code"]["json"]).unwrap();
        assert!(matches!(unknown, PairMsg::PairAbort { code: Some(AbortCode::Unknown), .. }));
        for n in v["not_pairing"].as_array().unwrap() {
            assert_eq!(PairMsg::from_json(n), None, "{n} is not a pairing message");
        }
    }

    #[test]
    fn messages_have_a_stable_json_form() {
        let m = PairMsg::PairPake { msg: "41ab".into() };
        assert_eq!(m.to_json(), serde_json::json!({"type": "pair_pake", "msg": "41ab"}));
        assert_eq!(PairMsg::from_json(&m.to_json()), Some(m));
        assert_eq!(PairMsg::from_json(&serde_json::json!({"type": "chat"})), None);
    }
}
