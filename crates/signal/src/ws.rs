//! The WebSocket wire format (RFC 6455) as the server needs it, and no
//! more: the handshake's accept key, reading masked client frames in place
//! out of whatever buffer the bytes arrived in, and writing unmasked server
//! frames. No extensions are negotiated, so the reserved bits must be zero.
//!
//! A general-purpose library keeps a read buffer per connection and copies
//! every frame through it; signaling connections are mostly idle, so the
//! connection reads into its worker thread's buffer and keeps bytes of its
//! own only while a frame is incomplete (`conn.rs`).

use base64::Engine;
use sha1::{Digest, Sha1};

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Close codes the server sends.
pub(crate) const CLOSE_NORMAL: u16 = 1000;
pub(crate) const CLOSE_AWAY: u16 = 1001;
pub(crate) const CLOSE_PROTOCOL: u16 = 1002;
pub(crate) const CLOSE_INVALID_DATA: u16 = 1007;
pub(crate) const CLOSE_POLICY: u16 = 1008;
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// One frame read from a client, its payload unmasked in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub fin: bool,
    pub opcode: u8,
    /// Where the payload is in the buffer given to [`read_frame`].
    pub payload: std::ops::Range<usize>,
}

/// Why the connection must be closed, with the close code to send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// Reads the frame at the start of `buf`, unmasking its payload in place:
/// the frame and its length in bytes, `None` when `buf` does not hold all
/// of it yet, or the rule it breaks. Frames with a payload over
/// `max_payload` are refused as soon as their header is in.
pub(crate) fn read_frame(buf: &mut [u8], max_payload: usize) -> Result<Option<(Frame, usize)>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(violation(CLOSE_PROTOCOL, "reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b1 & 0x80 == 0 {
        return Err(violation(CLOSE_PROTOCOL, "client frames must be masked"));
    }
    let control = opcode & 0x8 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(violation(CLOSE_PROTOCOL, "unknown opcode")),
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else { return Ok(None) };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else { return Ok(None) };
            (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10)
        }
        n => (n as u64, 2),
    };
    if control && (len > 125 || !fin) {
        return Err(violation(CLOSE_PROTOCOL, "control frames are unfragmented and at most 125 bytes"));
    }
    if len > max_payload as u64 {
        return Err(violation(CLOSE_TOO_BIG, "frame too large"));
    }
    let len = len as usize;
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    let mask: [u8; 4] = mask.try_into().expect("4 bytes");
    at += 4;
    let Some(payload) = buf.get_mut(at..at + len) else { return Ok(None) };
    unmask(payload, mask);
    Ok(Some((Frame { fin, opcode, payload: at..at + len }, at + len)))
}

/// XORs `data` with the repeated 4-byte `mask`, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends the header of an unmasked, final frame of `len` payload bytes.
pub(crate) fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// A whole control frame (close, ping, pong) as it goes on the wire.
pub(crate) fn control_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= 125);
    let mut out = Vec::with_capacity(2 + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A close frame with `code` and `reason` (cut to fit a control frame).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control_frame(OP_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser sends it (masked).
    fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn masked_frames_of_every_length_form_read_back() {
        for len in [0, 1, 7, 8, 9, 125, 126, 127, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut wire = masked(0x81, &payload, [0x12, 0x34, 0x56, 0x78]);
            wire.extend_from_slice(b"next");
            let total = wire.len() - 4;
            // Every prefix is incomplete, never an error.
            for cut in [0, 1, 2, 3, total / 2, total - 1] {
                assert_eq!(read_frame(&mut wire.clone()[..cut], 1 << 20), Ok(None), "len {len} cut {cut}");
            }
            let (frame, used) = read_frame(&mut wire, 1 << 20).unwrap().unwrap();
            assert_eq!(used, total);
            assert!(frame.fin);
            assert_eq!(frame.opcode, OP_TEXT);
            assert_eq!(&wire[frame.payload], &payload[..], "len {len}");
        }
    }

    #[test]
    fn rule_breaking_frames_are_refused_with_their_close_code() {
        let cases: [(Vec<u8>, u16); 6] = [
            (masked(0xC1, b"x", [1, 2, 3, 4]), CLOSE_PROTOCOL), // RSV1 without an extension
            (vec![0x81, 0x01, b'x'], CLOSE_PROTOCOL),           // unmasked
            (masked(0x83, b"x", [1, 2, 3, 4]), CLOSE_PROTOCOL), // opcode 3
            (masked(0x09, b"x", [1, 2, 3, 4]), CLOSE_PROTOCOL), // fragmented ping
            (masked(0x89, &[0; 126], [1, 2, 3, 4]), CLOSE_PROTOCOL), // long ping
            (masked(0x82, &[0; 101], [1, 2, 3, 4]), CLOSE_TOO_BIG),
        ];
        for (mut wire, code) in cases {
            assert_eq!(read_frame(&mut wire, 100).unwrap_err().code, code, "{wire:02x?}");
        }
        // Too large is known from the header alone.
        let mut header = vec![0x81, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(read_frame(&mut header, 1 << 20).unwrap_err().code, CLOSE_TOO_BIG);
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        for (len, header) in [
            (5, vec![0x81, 5]),
            (126, vec![0x81, 126, 0, 126]),
            (70000, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
        ] {
            let mut out = Vec::new();
            put_header(&mut out, OP_TEXT, len);
            assert_eq!(out, header);
        }
        let close = close_frame(1008, &"é".repeat(100));
        assert_eq!(close[..4], [0x88, 124, 0x03, 0xF0]);
        assert!(std::str::from_utf8(&close[4..]).is_ok(), "reason cut on a character boundary");
    }
}
