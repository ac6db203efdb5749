//! Authenticated signaling: peers that share keys (from pairing) MAC every
//! offer and answer, so the signaling server cannot change the SDP and the
//! DTLS fingerprints in it.

use hmac::{Hmac, Mac};
use peerlink_proto::SignalAuth;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The two SDP keys of a paired connection (`docs/PAIRING.md`): ours MACs
/// what we send, theirs checks what we receive.
#[derive(Clone, PartialEq, Eq)]
pub struct SignalKeys {
    /// MACs what we send.
    pub local: [u8; 32],
    /// Checks what we receive.
    pub remote: [u8; 32],
}

impl std::fmt::Debug for SignalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalKeys(..)")
    }
}

fn mac(key: &[u8; 32], kind: &str, seq: u64, sdp: &str) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("any key length");
    m.update(kind.as_bytes());
    m.update(&[0]);
    m.update(&seq.to_be_bytes());
    m.update(sdp.as_bytes());
    m
}

impl SignalKeys {
    /// The `auth` for an SDP we send: `kind` is `offer` or `answer`.
    pub fn sign(&self, kind: &str, seq: u64, sdp: &str) -> SignalAuth {
        let tag = mac(&self.local, kind, seq, sdp).finalize().into_bytes();
        SignalAuth { seq, mac: tag.iter().map(|b| format!("{b:02x}")).collect() }
    }

    /// Whether `auth` proves the other side wrote `sdp` (constant-time check).
    pub fn verify(&self, kind: &str, sdp: &str, auth: &SignalAuth) -> bool {
        let Some(tag) = unhex(&auth.mac) else { return false };
        mac(&self.remote, kind, auth.seq, sdp).verify_slice(&tag).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hex: &str) -> [u8; 32] {
        unhex(hex).unwrap().try_into().unwrap()
    }

    /// The tag in `fixtures/pairing/peerlink-pair-v1.json` (creator's offer, seq 0).
    #[test]
    fn matches_the_pairing_vector() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pairing/peerlink-pair-v1.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let creator = SignalKeys {
            local: key(v["k_sdp_A_hex"].as_str().unwrap()),
            remote: key(v["k_sdp_B_hex"].as_str().unwrap()),
        };
        let sdp = v["sdp_example"].as_str().unwrap();
        let auth = creator.sign("offer", 0, sdp);
        assert_eq!(auth.mac, v["sdp_tag_A_offer_seq0_hex"].as_str().unwrap());
        let joiner = SignalKeys { local: creator.remote, remote: creator.local };
        assert!(joiner.verify("offer", sdp, &auth));
        // Any change is caught: the SDP, the kind, the sequence number, the key.
        assert!(!joiner.verify("offer", &sdp.replace("AB:CD", "AB:CE"), &auth));
        assert!(!joiner.verify("answer", sdp, &auth));
        assert!(!joiner.verify("offer", sdp, &SignalAuth { seq: 1, ..auth.clone() }));
        assert!(!creator.verify("offer", sdp, &auth));
        assert!(!joiner.verify("offer", sdp, &SignalAuth { seq: 0, mac: "zz".repeat(32) }));
    }
}
