//! Sealed channels (`docs/PROTOCOL.md`, "Sealed channels"): messages on a
//! data channel encrypted at the application layer as well, for apps that
//! store or forward them. The two ends agree a key by ECDH P-256 (a fresh
//! key pair per channel, the public keys as each side's first message),
//! bound to the connection's two DTLS fingerprints; every message is
//! AES-256-GCM with a counter nonce. [`Sealer`] is the protocol without
//! I/O; [`SealedChannel`] runs it over a [`DataChannel`].

use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::{DataChannel, Message, SendError};

const HELLO: u8 = 0x01;
const DATA: u8 = 0x02;
const PUBLIC_LEN: usize = 65;
const NONCE_LEN: usize = 12;

/// What went wrong on a sealed channel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The other side's first message was not a public key.
    #[error("the other side did not start the sealed channel (its first message is not a P-256 public key)")]
    BadHello,
    /// A message did not open: changed, replayed, out of order, or from
    /// someone without the key.
    #[error("a message on the sealed channel does not open (changed, replayed or out of order)")]
    Forged,
    /// The other side's key did not arrive in time.
    #[error("the other side's key did not arrive within {0:?}")]
    Timeout(Duration),
    /// The channel closed before the keys were agreed.
    #[error("the channel closed before the keys were agreed")]
    Closed,
    /// Key generation or agreement failed inside the crypto library.
    #[error("key agreement failed")]
    Crypto,
}

/// The sealed-channel protocol for one end, without I/O.
pub struct Sealer {
    private: PrivateKey,
    public: Vec<u8>,
    label: String,
    ours_fp: String,
    theirs_fp: String,
    keys: Option<(LessSafeKey, LessSafeKey)>,
    send_seq: u64,
    /// The counter the next message must carry.
    recv_next: u64,
    /// A message did not open: nothing after it is trusted.
    broken: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("label", &self.label).field("ready", &self.keys.is_some()).finish()
    }
}

impl Sealer {
    /// One end of a sealed channel `label`, on a connection whose DTLS
    /// fingerprints are `ours` and `theirs` (`sha-256 AB:...`, as in the
    /// SDPs; [`crate::PeerStats::fingerprints`]), with a fresh key pair.
    pub fn new(label: &str, ours: &str, theirs: &str) -> Result<Sealer, SealError> {
        Self::with_key(PrivateKey::generate(&ECDH_P256).map_err(|_| SealError::Crypto)?, label, ours, theirs)
    }

    fn with_key(private: PrivateKey, label: &str, ours: &str, theirs: &str) -> Result<Sealer, SealError> {
        let public = private.compute_public_key().map_err(|_| SealError::Crypto)?.as_ref().to_vec();
        Ok(Sealer {
            private,
            public,
            label: label.to_string(),
            ours_fp: ours.to_string(),
            theirs_fp: theirs.to_string(),
            keys: None,
            send_seq: 0,
            recv_next: 0,
            broken: false,
        })
    }

    /// Our first message: `0x01 ‖ our public key` (65 bytes, uncompressed).
    pub fn hello(&self) -> Vec<u8> {
        let mut out = vec![HELLO];
        out.extend_from_slice(&self.public);
        out
    }

    /// Whether the keys are agreed.
    pub fn is_ready(&self) -> bool {
        self.keys.is_some()
    }

    /// The other side's first message: agrees the keys.
    pub fn handle_hello(&mut self, msg: &[u8]) -> Result<(), SealError> {
        let theirs = match msg {
            [HELLO, rest @ ..] if rest.len() == PUBLIC_LEN => rest,
            _ => return Err(SealError::BadHello),
        };
        let shared = agreement::agree(
            &self.private,
            UnparsedPublicKey::new(&ECDH_P256, theirs),
            SealError::BadHello,
            |s| Ok(s.to_vec()),
        )?;
        let hkdf = Hkdf::<Sha256>::new(Some(b"peerlink sealed v1"), &shared);
        let key = |fp_w: &str, fp_r: &str, pub_w: &[u8], pub_r: &[u8]| {
            let mut info = b"key\0".to_vec();
            info.extend_from_slice(fp_w.as_bytes());
            info.push(0);
            info.extend_from_slice(fp_r.as_bytes());
            info.push(0);
            info.extend_from_slice(pub_w);
            info.extend_from_slice(pub_r);
            let mut k = [0u8; 32];
            hkdf.expand(&info, &mut k).expect("32 bytes is a valid HKDF length");
            k
        };
        let send = key(&self.ours_fp, &self.theirs_fp, &self.public, theirs);
        let recv = key(&self.theirs_fp, &self.ours_fp, theirs, &self.public);
        let aead = |k: [u8; 32]| LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("a 32-byte key"));
        self.keys = Some((aead(send), aead(recv)));
        Ok(())
    }

    /// `msg` sealed for the wire: `0x02 ‖ nonce ‖ AES-GCM(kind ‖ payload)`,
    /// kind 1 for text, 0 for bytes. Panics before the keys are agreed.
    pub fn seal(&mut self, msg: &Message) -> Vec<u8> {
        let wire = self.seal_next(msg);
        self.send_seq += 1;
        wire
    }

    /// `msg` sealed as the next message, the counter left where it is: the
    /// channel moves it on once the message is queued, so a send refused
    /// (too large, closed) or cancelled leaves no gap, which the other side
    /// would take for a dropped or forged message.
    fn seal_next(&self, msg: &Message) -> Vec<u8> {
        let (send, _) = self.keys.as_ref().expect("seal after the keys are agreed");
        let nonce = counter_nonce(self.send_seq);
        let mut buf = Vec::with_capacity(msg.len() + 1 + AES_256_GCM.tag_len());
        buf.push(u8::from(!msg.is_binary()));
        buf.extend_from_slice(msg.as_bytes());
        send.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.label.as_bytes()),
            &mut buf,
        )
        .expect("sealing cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(DATA);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    /// A message from the wire, opened: only the next one in the order sent
    /// (a replayed, reordered or missing message is refused), and nothing
    /// after one that did not open.
    pub fn open(&mut self, wire: &[u8]) -> Result<Message, SealError> {
        let opened = self.open_next(wire);
        if opened.is_err() {
            self.broken = true;
        }
        opened
    }

    fn open_next(&mut self, wire: &[u8]) -> Result<Message, SealError> {
        if self.broken {
            return Err(SealError::Forged);
        }
        let (_, recv) = self.keys.as_ref().ok_or(SealError::Forged)?;
        let [DATA, rest @ ..] = wire else { return Err(SealError::Forged) };
        if rest.len() < NONCE_LEN + 1 + AES_256_GCM.tag_len() {
            return Err(SealError::Forged);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let seq = u64::from_be_bytes(nonce[4..].try_into().expect("8 bytes"));
        if nonce[..4] != [0; 4] || seq != self.recv_next {
            return Err(SealError::Forged);
        }
        let mut buf = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Forged)?;
        let plain = recv
            .open_in_place(nonce, Aad::from(self.label.as_bytes()), &mut buf)
            .map_err(|_| SealError::Forged)?;
        let msg = match plain {
            [1, text @ ..] => Message::Text(String::from_utf8(text.to_vec()).map_err(|_| SealError::Forged)?),
            [0, bytes @ ..] => Message::Binary(bytes.to_vec()),
            _ => return Err(SealError::Forged),
        };
        self.recv_next = seq + 1;
        Ok(msg)
    }
}

fn counter_nonce(seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// A data channel whose messages are sealed end to end (see the module
/// docs); both ends must open it as sealed. Get one with
/// [`crate::Room::seal`].
#[derive(Debug)]
pub struct SealedChannel {
    channel: DataChannel,
    sealer: Sealer,
}

impl SealedChannel {
    /// Agrees the keys over `channel` (each side sends its public key
    /// first), waiting at most `timeout` for the other side's.
    pub async fn open(
        channel: DataChannel,
        ours: &str,
        theirs: &str,
        timeout: Duration,
    ) -> Result<Self, SealError> {
        let mut sealer = Sealer::new(channel.label(), ours, theirs)?;
        channel.send(Message::Binary(sealer.hello())).await.map_err(|_| SealError::Closed)?;
        let hello = tokio::time::timeout(timeout, channel.recv())
            .await
            .map_err(|_| SealError::Timeout(timeout))?
            .ok_or(SealError::Closed)?;
        sealer.handle_hello(hello.as_bytes())?;
        Ok(SealedChannel { channel, sealer })
    }

    /// The channel underneath (its label, peer, queue).
    pub fn channel(&self) -> &DataChannel {
        &self.channel
    }

    /// Seals and sends `msg` (backpressure as [`DataChannel::send`]).
    pub async fn send(&mut self, msg: impl Into<Message>) -> Result<(), SendError> {
        let wire = self.sealer.seal_next(&msg.into());
        // Queued once `send` returns Ok, with no await after: the counter
        // moves on in the same poll, whatever happens to this future.
        self.channel.send(Message::Binary(wire)).await?;
        self.sealer.send_seq += 1;
        Ok(())
    }

    /// The next message, opened; `None` once the channel closed. A message
    /// that does not open is an error, and the channel is not to be trusted
    /// after it.
    pub async fn recv(&mut self) -> Option<Result<Message, SealError>> {
        let wire = self.channel.recv().await?;
        Some(self.sealer.open(wire.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/rooms/sealed.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn pair(v: &serde_json::Value) -> (Sealer, Sealer) {
        let s = |k: &str| v[k].as_str().unwrap();
        let key = |k: &str| PrivateKey::from_private_key(&ECDH_P256, &unhex(s(k))).unwrap();
        let a = Sealer::with_key(key("a_private_hex"), s("label"), s("fingerprint_a"), s("fingerprint_b"))
            .unwrap();
        let b = Sealer::with_key(key("b_private_hex"), s("label"), s("fingerprint_b"), s("fingerprint_a"))
            .unwrap();
        (a, b)
    }

    #[test]
    fn the_wire_matches_the_vectors_both_ways() {
        let v = vectors();
        let (mut a, mut b) = pair(&v);
        assert_eq!(a.hello(), unhex(v["a_hello_hex"].as_str().unwrap()));
        assert!(!a.is_ready());
        a.handle_hello(&b.hello()).unwrap();
        b.handle_hello(&a.hello()).unwrap();
        let text = a.seal(&Message::Text(v["a_text_seq0"]["text"].as_str().unwrap().into()));
        assert_eq!(text, unhex(v["a_text_seq0"]["wire_hex"].as_str().unwrap()));
        let bytes = a.seal(&Message::Binary(unhex(v["a_binary_seq1"]["bytes_hex"].as_str().unwrap())));
        assert_eq!(bytes, unhex(v["a_binary_seq1"]["wire_hex"].as_str().unwrap()));
        assert_eq!(
            b.seal(&Message::Text("and back".into())),
            unhex(v["b_text_seq0"]["wire_hex"].as_str().unwrap())
        );
        assert_eq!(b.open(&text), Ok(Message::Text("hello, sealed".into())));
        assert_eq!(b.open(&bytes), Ok(Message::Binary(vec![0x00, 0xff, 0x10])));
        let back = unhex(v["b_text_seq0"]["wire_hex"].as_str().unwrap());
        assert_eq!(a.open(&back), Ok(Message::Text("and back".into())));
        // Replayed: refused, and nothing after it opens.
        assert_eq!(a.open(&back), Err(SealError::Forged));
        let next = b.seal(&Message::Text("next".into()));
        assert_eq!(a.open(&next), Err(SealError::Forged));
        // Reordered (the second before the first) or one missing: refused.
        let (mut a, mut b) = pair(&v);
        a.handle_hello(&b.hello()).unwrap();
        b.handle_hello(&a.hello()).unwrap();
        let _first = a.seal(&Message::Text("1".into()));
        let second = a.seal(&Message::Text("2".into()));
        assert_eq!(b.open(&second), Err(SealError::Forged));
    }

    #[test]
    fn other_sessions_and_changed_bits_do_not_open() {
        let v = vectors();
        let wire = unhex(v["a_text_seq0"]["wire_hex"].as_str().unwrap());
        // The same keys on another DTLS session (other fingerprints): no.
        let s = |k: &str| v[k].as_str().unwrap();
        let key = |k: &str| PrivateKey::from_private_key(&ECDH_P256, &unhex(s(k))).unwrap();
        let mut other =
            Sealer::with_key(key("b_private_hex"), s("label"), s("fingerprint_b"), "sha-256 00:11").unwrap();
        let (a, _) = pair(&v);
        other.handle_hello(&a.hello()).unwrap();
        assert_eq!(other.open(&wire), Err(SealError::Forged));
        // A flipped bit, a cut message, a hello that is not a key.
        let (a, mut b) = pair(&v);
        b.handle_hello(&a.hello()).unwrap();
        let mut flipped = wire.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(b.open(&flipped), Err(SealError::Forged));
        assert_eq!(b.open(&wire[..20]), Err(SealError::Forged));
        assert_eq!(b.handle_hello(&[HELLO, 4, 1, 2]), Err(SealError::BadHello));
        assert_eq!(b.handle_hello(b"hello"), Err(SealError::BadHello));
        // Fresh keys each time: two ends agree on them, and on nothing else.
        let (fa, fb) = (s("fingerprint_a"), s("fingerprint_b"));
        let (mut x, mut y) = (Sealer::new("c", fa, fb).unwrap(), Sealer::new("c", fb, fa).unwrap());
        x.handle_hello(&y.hello()).unwrap();
        y.handle_hello(&x.hello()).unwrap();
        let m = x.seal(&Message::Text("fresh".into()));
        assert_eq!(y.open(&m), Ok(Message::Text("fresh".into())));
        assert_ne!(Sealer::new("c", fa, fb).unwrap().hello(), Sealer::new("c", fa, fb).unwrap().hello());
    }
}
