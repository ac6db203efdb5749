//! STUN and TURN over a byte stream (TCP or TLS): where one message ends
//! and the next begins (RFC 8489 §6.2.2, RFC 8656 §12.5).
//!
//! Over UDP every datagram is one STUN message or one ChannelData message.
//! Over a stream they follow each other, and each says its own length: a
//! STUN message is its 20-byte header plus the header's length field; a
//! ChannelData message is its 4-byte header plus its length field, padded
//! with zeros to a multiple of four bytes. Some clients (turn-client-proto
//! among them) leave the padding out, so [`StreamFramer`] takes both, and
//! tells the padding from a STUN message that starts right away by the
//! magic cookie. Anything else (a header that is neither) is a
//! [`FramingError`]: the stream is not speaking STUN and is closed.
//!
//! Used by the embedded TURN server's TCP and TLS listeners and by the
//! native peer's TURN client, so that both read the same framing.
//!
//! ```
//! use peerlink_proto::turn_stream::{StreamFramer, stream_padding};
//!
//! let channel = [0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c'];
//! assert_eq!(stream_padding(&channel), 1);
//! let mut framer = StreamFramer::new();
//! framer.push(&channel);
//! framer.push(&[0]); // the padding
//! framer.push(&channel[..2]);
//! assert_eq!(framer.next_frame().unwrap(), Some(channel.to_vec()));
//! assert_eq!(framer.next_frame().unwrap(), None); // half a header so far
//! ```

use std::fmt;

/// The STUN magic cookie (RFC 8489 §5), at bytes 4..8 of every message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const STUN_HEADER: usize = 20;
const CHANNEL_HEADER: usize = 4;

/// The largest frame: a ChannelData message with 65,535 bytes of data (a
/// STUN message is at most 20 + 65,532 bytes). Nothing longer can be
/// announced, so [`StreamFramer`] never holds more than this plus what was
/// pushed after it.
pub const MAX_FRAME: usize = CHANNEL_HEADER + 65535;

/// The stream does not carry STUN or ChannelData messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError {
    /// The first bytes of what could not be read.
    pub head: Vec<u8>,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a STUN or ChannelData message: starts with {:02x?}", self.head)
    }
}

impl std::error::Error for FramingError {}

/// The zero bytes that follow `frame` on a stream: ChannelData is padded to
/// a multiple of four (RFC 8656 §12.5); STUN messages already are.
pub fn stream_padding(frame: &[u8]) -> usize {
    if frame.first().is_some_and(|b| b & 0xC0 == 0x40) { (4 - frame.len() % 4) % 4 } else { 0 }
}

/// Splits a byte stream into STUN and ChannelData messages.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    /// Where the unread bytes of `buf` start.
    start: usize,
    /// Padding the last ChannelData message may be followed by.
    pad: usize,
}

impl StreamFramer {
    /// An empty framer.
    pub fn new() -> Self {
        StreamFramer::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= MAX_FRAME {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes pushed and not yet returned in a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `None` until one has arrived whole.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        if self.pad > 0 {
            let rest = &self.buf[self.start..];
            let Some(&first) = rest.first() else { return Ok(None) };
            if first == 0 {
                // Padding, or a STUN message (its first byte is zero for
                // every method below 0x100) sent without padding before it.
                if rest.len() < 8 {
                    return Ok(None);
                }
                if rest[4..8] != MAGIC_COOKIE {
                    if rest[..self.pad].iter().any(|&b| b != 0) {
                        return Err(self.error());
                    }
                    self.start += self.pad;
                }
            }
            self.pad = 0;
        }
        let rest = &self.buf[self.start..];
        if rest.len() < CHANNEL_HEADER {
            return Ok(None);
        }
        let length = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let total = match rest[0] & 0xC0 {
            0x00 => {
                if !length.is_multiple_of(4) {
                    return Err(self.error());
                }
                if rest.len() >= 8 && rest[4..8] != MAGIC_COOKIE {
                    return Err(self.error());
                }
                STUN_HEADER + length
            }
            // Channel numbers 0x4000..=0x4FFF (RFC 8656 §12).
            0x40 if rest[0] < 0x50 => CHANNEL_HEADER + length,
            _ => return Err(self.error()),
        };
        if rest.len() < total {
            return Ok(None);
        }
        let frame = rest[..total].to_vec();
        self.start += total;
        self.pad = stream_padding(&frame);
        Ok(Some(frame))
    }

    fn error(&self) -> FramingError {
        let rest = &self.buf[self.start..];
        FramingError { head: rest[..rest.len().min(8)].to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Vec<u8> {
        let mut m = vec![0x00, 0x01, 0x00, 0x00];
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m
    }

    fn channel(n: usize) -> Vec<u8> {
        let mut m = vec![0x40, 0x01];
        m.extend_from_slice(&(n as u16).to_be_bytes());
        m.extend((0..n).map(|i| i as u8 | 1));
        m
    }

    fn frames(stream: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut f = StreamFramer::new();
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            f.push(c);
            while let Some(frame) = f.next_frame()? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    #[test]
    fn padded_and_unpadded_channel_data_both_frame() {
        for n in [0, 1, 2, 3, 4, 5, 1200, 1201] {
            let want = vec![channel(n), binding(), channel(n), channel(3), binding()];
            let mut padded = Vec::new();
            let mut bare = Vec::new();
            for f in &want {
                padded.extend_from_slice(f);
                padded.extend(std::iter::repeat_n(0, stream_padding(f)));
                bare.extend_from_slice(f);
            }
            for chunk in [1, 3, 7, 64, 100_000] {
                assert_eq!(frames(&padded, chunk).unwrap(), want, "padded, {n} bytes, chunks of {chunk}");
                assert_eq!(frames(&bare, chunk).unwrap(), want, "unpadded, {n} bytes, chunks of {chunk}");
            }
        }
    }

    #[test]
    fn what_is_not_stun_is_refused() {
        // ("GET " would pass as channel 0x4745: its length is checked by
        // the reader's limits, not here.)
        assert!(frames(b"PUT / HTTP/1.1\r\n\r\n", 100).is_err());
        assert!(frames(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01], 100).is_err(), "a TLS hello");
        let mut no_cookie = binding();
        no_cookie[4] = 0;
        assert!(frames(&no_cookie, 100).is_err());
        let mut bad_pad = channel(1);
        bad_pad.extend_from_slice(&[0, 9, 9]);
        bad_pad.extend_from_slice(&binding());
        assert!(frames(&bad_pad, 100).is_err());
    }

    #[test]
    fn memory_stays_bounded_by_one_frame() {
        let mut f = StreamFramer::new();
        let big = channel(65535);
        for _ in 0..10 {
            for c in big.chunks(16384) {
                f.push(c);
                while f.next_frame().unwrap().is_some() {}
            }
            f.push(&[0]);
        }
        assert!(f.buf.capacity() <= 3 * MAX_FRAME, "buffer grew to {}", f.buf.capacity());
    }
}
