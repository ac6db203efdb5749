//! Chunk and file hashes (SHA-256) and their hex form on the wire.

use sha2::{Digest, Sha256};

use crate::ProtocolError;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Hex characters per hash on the wire.
pub const HASH_HEX_LEN: usize = 64;

/// The domain-separation prefix of a file hash (`docs/TRANSFER.md`).
pub const FILE_HASH_TAG: &[u8] = b"peerlink/v1/file\0";

/// The hash of one chunk: SHA-256 of its bytes.
pub fn chunk_hash(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The file hash: `SHA-256("peerlink/v1/file\0" ‖ u64be(size) ‖ u32be(chunk_size) ‖ h_0 ‖ … ‖ h_{n-1})`.
///
/// Size and chunk size are part of it so that the same chunk hashes under
/// another chunking or length cannot collide.
pub fn file_hash(size: u64, chunk_size: u32, chunk_hashes: &[Hash]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(FILE_HASH_TAG);
    hasher.update(size.to_be_bytes());
    hasher.update(chunk_size.to_be_bytes());
    for hash in chunk_hashes {
        hasher.update(hash);
    }
    hasher.finalize().into()
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The wire form of a run of hashes: their hex, concatenated.
pub fn hashes_to_hex(hashes: &[Hash]) -> String {
    let mut out = String::with_capacity(hashes.len() * HASH_HEX_LEN);
    for hash in hashes {
        out.push_str(&to_hex(hash));
    }
    out
}

/// Parses one hash from 64 hex characters (either case).
pub fn hash_from_hex(text: &str) -> Option<Hash> {
    let bytes = text.as_bytes();
    if bytes.len() != HASH_HEX_LEN {
        return None;
    }
    let mut hash = [0u8; 32];
    for (out, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
        *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(hash)
}

/// Parses the `hashes` field of a `hashes` message: whole hashes of 64 hex
/// characters each, concatenated.
pub fn hashes_from_hex(text: &str) -> Result<Vec<Hash>, ProtocolError> {
    if !text.len().is_multiple_of(HASH_HEX_LEN) {
        return Err(ProtocolError::BadHashes { reason: "length is not a multiple of 64" });
    }
    // The string is already in memory, so its length bounds this allocation.
    let mut hashes = Vec::with_capacity(text.len() / HASH_HEX_LEN);
    for piece in text.as_bytes().chunks_exact(HASH_HEX_LEN) {
        // Non-ASCII input cannot pass `nibble`, so a UTF-8 split is harmless.
        let piece = std::str::from_utf8(piece).map_err(|_| ProtocolError::BadHashes { reason: "not hex" })?;
        hashes.push(hash_from_hex(piece).ok_or(ProtocolError::BadHashes { reason: "not hex" })?);
    }
    Ok(hashes)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = chunk_hash(b"abc");
        assert_eq!(to_hex(&h), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hash_from_hex(&to_hex(&h)), Some(h));
        assert_eq!(hash_from_hex(&to_hex(&h).to_uppercase()), Some(h));
        let two = hashes_to_hex(&[h, [0; 32]]);
        assert_eq!(hashes_from_hex(&two).unwrap(), vec![h, [0; 32]]);
        assert!(hashes_from_hex(&two[1..]).is_err());
        assert!(hashes_from_hex(&"g".repeat(64)).is_err());
        // 32 two-byte characters: 64 bytes, not hex.
        assert!(hashes_from_hex(&"é".repeat(32)).is_err());
        assert_eq!(hashes_from_hex("").unwrap(), Vec::<Hash>::new());
    }
}
