//! End-to-end encrypted rooms (`docs/PROTOCOL.md`, "End-to-end encrypted
//! rooms"): members share a room secret the server never sees. Keys derived
//! from it MAC every offer and answer between two members (so the server
//! cannot swap the DTLS fingerprints and sit in the middle) and seal
//! server-routed messages with AES-256-GCM (so the server relays only
//! ciphertext). A safety number from both DTLS fingerprints lets two people
//! check their connection by eye.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::PeerId;
use crate::auth::SignalKeys;

/// The shortest room secret accepted: 16 characters (a random one from the
/// web app, 22 base64url characters, has 128 bits).
pub const MIN_ROOM_SECRET: usize = 16;

/// The key of a sealed server-routed message: `{"peerlink_e2e": "..."}`.
pub const SEALED_KEY: &str = "peerlink_e2e";
/// In a secret room, a member that refused a peer's offer or answer tells
/// it so, sealed (the server cannot forge or read it):
/// `{"peerlink_refused": REASON}`. Both ends then know.
pub const REFUSED_KEY: &str = "peerlink_refused";
const NONCE_LEN: usize = 12;

/// A room's secret, bound to the room's name: two rooms with one secret
/// share no key.
#[derive(Clone)]
pub struct RoomSecret {
    hkdf: Hkdf<Sha256>,
    room: String,
    send: [u8; 32],
}

impl std::fmt::Debug for RoomSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoomSecret({}, ..)", self.room)
    }
}

/// Why a server-routed message of a secret room was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Not sealed: the server (or a client without the secret) wrote it.
    #[error("the message is not sealed with the room's key")]
    NotSealed,
    /// Sealed, but not with this room's key for this sender and addressee.
    #[error("the message does not open with the room's key (another secret, or changed on the way)")]
    Forged,
}

impl RoomSecret {
    /// Keys for `room` from the secret people share (the link's `#k=`,
    /// `--room-secret`).
    pub fn new(secret: &str, room: &str) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(b"peerlink room v1"), secret.as_bytes());
        let send = expand(&hkdf, &[b"send", room.as_bytes()]);
        RoomSecret { hkdf, room: room.to_string(), send }
    }

    /// The SDP keys between `me` and `peer`: ours MACs what we send, theirs
    /// checks what we receive (the pairing scheme's, docs/PAIRING.md).
    pub fn signal_keys(&self, me: &PeerId, peer: &PeerId) -> SignalKeys {
        SignalKeys { local: self.sdp_key(me, peer), remote: self.sdp_key(peer, me) }
    }

    fn sdp_key(&self, from: &PeerId, to: &PeerId) -> [u8; 32] {
        expand(&self.hkdf, &[b"sdp", self.room.as_bytes(), from.as_str().as_bytes(), to.as_str().as_bytes()])
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.send).expect("a 32-byte key"))
    }

    fn aad(&self, from: &PeerId, to: &PeerId) -> Vec<u8> {
        join(&[b"send", self.room.as_bytes(), from.as_str().as_bytes(), to.as_str().as_bytes()])
    }

    /// `data` from `from` to `to`, sealed: `{"peerlink_e2e": base64url(nonce ‖ ciphertext ‖ tag)}`.
    pub fn seal(&self, from: &PeerId, to: &PeerId, data: &Value) -> Value {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        self.seal_with(from, to, data, nonce)
    }

    fn seal_with(&self, from: &PeerId, to: &PeerId, data: &Value, nonce: [u8; NONCE_LEN]) -> Value {
        let mut buf = data.to_string().into_bytes();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(from, to)),
                &mut buf,
            )
            .expect("sealing cannot fail for in-memory buffers");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&buf);
        serde_json::json!({ SEALED_KEY: URL_SAFE_NO_PAD.encode(sealed) })
    }

    /// The message `from` sent `to`, opened; refuses anything not sealed
    /// with this room's key for exactly this sender and addressee.
    pub fn open(&self, from: &PeerId, to: &PeerId, data: &Value) -> Result<Value, OpenError> {
        let text = match data {
            Value::Object(o) if o.len() == 1 => o.get(SEALED_KEY).and_then(Value::as_str),
            _ => None,
        }
        .ok_or(OpenError::NotSealed)?;
        let sealed = URL_SAFE_NO_PAD.decode(text).map_err(|_| OpenError::Forged)?;
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError::Forged);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Forged)?;
        let mut buf = rest.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(self.aad(from, to)), &mut buf)
            .map_err(|_| OpenError::Forged)?;
        serde_json::from_slice(plain).map_err(|_| OpenError::Forged)
    }
}

/// `HKDF-Expand(prk, parts joined by 0x00, 32)`.
fn expand(hkdf: &Hkdf<Sha256>, parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf.expand(&join(parts), &mut out).expect("32 bytes is a valid HKDF length");
    out
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(p);
    }
    out
}

/// The DTLS fingerprint of an SDP (`sha-256 AB:CD:...`), as its
/// `a=fingerprint:` line has it.
pub fn sdp_fingerprint(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=fingerprint:")).map(str::trim)
}

/// The safety number of a connection: five groups of five digits from both
/// DTLS fingerprints, the same at both ends. Two people who read the same
/// number to each other know nobody sits between their browsers or peers.
pub fn safety_number(ours: &str, theirs: &str) -> String {
    let (lo, hi) = if ours.as_bytes() <= theirs.as_bytes() { (ours, theirs) } else { (theirs, ours) };
    let mut h = Sha256::new();
    h.update(b"peerlink safety v1\0");
    h.update(lo.as_bytes());
    h.update(b"\0");
    h.update(hi.as_bytes());
    let h = h.finalize();
    (0..5)
        .map(|i| {
            let n = u32::from_be_bytes(h[4 * i..4 * i + 4].try_into().expect("4 bytes")) % 100_000;
            format!("{n:05}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/rooms/e2e.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn keys_and_tags_match_the_vectors() {
        let v = vectors();
        let s = RoomSecret::new(v["secret"].as_str().unwrap(), v["room"].as_str().unwrap());
        let (a, b) =
            (PeerId::from_server(v["a"].as_str().unwrap()), PeerId::from_server(v["b"].as_str().unwrap()));
        let ka = s.signal_keys(&a, &b);
        let kb = s.signal_keys(&b, &a);
        assert_eq!(hex(&ka.local), v["k_sdp_a_to_b_hex"].as_str().unwrap());
        assert_eq!(hex(&ka.remote), v["k_sdp_b_to_a_hex"].as_str().unwrap());
        assert_eq!((kb.local, kb.remote), (ka.remote, ka.local));
        let other = RoomSecret::new(v["secret"].as_str().unwrap(), "other");
        assert_eq!(
            hex(&other.signal_keys(&a, &b).local),
            v["k_sdp_a_to_b_in_room_other_hex"].as_str().unwrap()
        );
        let sdp = v["sdp_example"].as_str().unwrap();
        assert_eq!(ka.sign("offer", 0, sdp).mac, v["sdp_tag_a_offer_seq0_hex"].as_str().unwrap());
        assert_eq!(kb.sign("answer", 3, sdp).mac, v["sdp_tag_b_answer_seq3_hex"].as_str().unwrap());
        assert!(kb.verify("offer", sdp, &ka.sign("offer", 0, sdp)));
        // Without the secret, or in another room, the MAC does not check.
        let wrong = RoomSecret::new("another secret", v["room"].as_str().unwrap()).signal_keys(&b, &a);
        assert!(!wrong.verify("offer", sdp, &ka.sign("offer", 0, sdp)));
    }

    #[test]
    fn sealed_messages_match_the_vector_and_refuse_changes() {
        let v = vectors();
        let s = RoomSecret::new(v["secret"].as_str().unwrap(), v["room"].as_str().unwrap());
        let (a, b) =
            (PeerId::from_server(v["a"].as_str().unwrap()), PeerId::from_server(v["b"].as_str().unwrap()));
        let m = &v["send_from_a_to_b"];
        let nonce: [u8; 12] = (0..12).collect::<Vec<u8>>().try_into().unwrap();
        assert_eq!(hex(&nonce), m["nonce_hex"].as_str().unwrap());
        assert_eq!(hex(&s.aad(&a, &b)), m["aad_hex"].as_str().unwrap());
        assert_eq!(s.seal_with(&a, &b, &m["data"], nonce), m["sealed"]);
        assert_eq!(s.open(&a, &b, &m["sealed"]), Ok(m["data"].clone()));
        // Random nonces: two seals differ, both open.
        let (x, y) = (s.seal(&a, &b, &m["data"]), s.seal(&a, &b, &m["data"]));
        assert_ne!(x, y);
        assert_eq!(s.open(&a, &b, &y), Ok(m["data"].clone()));
        // Another sender or addressee (the server lying about `from`), another
        // room, another secret, a flipped bit, plaintext: refused.
        assert_eq!(s.open(&b, &a, &m["sealed"]), Err(OpenError::Forged));
        assert_eq!(
            RoomSecret::new(v["secret"].as_str().unwrap(), "other").open(&a, &b, &m["sealed"]),
            Err(OpenError::Forged)
        );
        assert_eq!(
            RoomSecret::new("nope", v["room"].as_str().unwrap()).open(&a, &b, &m["sealed"]),
            Err(OpenError::Forged)
        );
        let mut text = m["sealed"][SEALED_KEY].as_str().unwrap().to_string();
        let last = text.pop().unwrap();
        text.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(s.open(&a, &b, &serde_json::json!({ SEALED_KEY: text })), Err(OpenError::Forged));
        assert_eq!(s.open(&a, &b, &m["data"]), Err(OpenError::NotSealed));
        assert_eq!(s.open(&a, &b, &serde_json::json!({ SEALED_KEY: "AAAA" })), Err(OpenError::Forged));
        assert!(v["refused_example"][REFUSED_KEY].is_string());
    }

    #[test]
    fn safety_numbers_match_the_vector_at_both_ends() {
        let v = vectors();
        let (fa, fb) = (v["fingerprint_a"].as_str().unwrap(), v["fingerprint_b"].as_str().unwrap());
        assert_eq!(safety_number(fa, fb), v["safety_number"].as_str().unwrap());
        assert_eq!(safety_number(fb, fa), v["safety_number"].as_str().unwrap());
        let sdp = v["sdp_example"].as_str().unwrap();
        assert_eq!(sdp_fingerprint(sdp), Some(fa));
    }
}
