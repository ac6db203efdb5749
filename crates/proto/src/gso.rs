//! Gathering datagrams for one UDP GSO send.
//!
//! With generic segmentation offload a sender hands the kernel one buffer
//! of datagrams laid end to end and their size; the kernel cuts it. All
//! datagrams of a batch share a destination and a size, except the last,
//! which may be shorter (and so ends the batch). One such send costs one
//! trip through the network stack instead of one per datagram.
//!
//! Used by the native peer's driver and the embedded TURN server, which
//! send through `quinn-udp`; this part does no I/O.

/// Most bytes in one batch: a UDP datagram's 64 KiB limit, with room for
/// headers.
pub const MAX_BATCH_BYTES: usize = 60 * 1024;

/// Datagrams waiting to leave together, all for one `K` (a socket and a
/// destination). The caller asks [`GsoBatch::fits`], sends the
/// [`GsoBatch::pending`] batch and [`GsoBatch::clear`]s it when a datagram
/// does not fit, then [`GsoBatch::push`]es.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsoBatch<K> {
    key: Option<K>,
    segment: usize,
    count: usize,
    data: Vec<u8>,
}

impl<K> Default for GsoBatch<K> {
    fn default() -> Self {
        GsoBatch { key: None, segment: 0, count: 0, data: Vec::new() }
    }
}

impl<K: PartialEq + Copy> GsoBatch<K> {
    /// Whether a datagram of `len` bytes for `key` can join the batch
    /// (an empty batch takes anything), given the socket's limit of
    /// `max_segments` datagrams per send.
    pub fn fits(&self, key: K, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.key == Some(key)
                && len <= self.segment
                // A shorter datagram ended the batch.
                && self.data.len() == self.segment * self.count
                && self.data.len() + len <= MAX_BATCH_BYTES
                && self.count < max_segments)
    }

    /// Adds a datagram; call only when it [`fits`](Self::fits).
    pub fn push(&mut self, key: K, datagram: &[u8]) {
        self.push_parts(key, &[datagram]);
    }

    /// Adds a datagram made of `parts` end to end (a header and a payload,
    /// without joining them first); call only when it [`fits`](Self::fits).
    pub fn push_parts(&mut self, key: K, parts: &[&[u8]]) {
        let len = parts.iter().map(|p| p.len()).sum();
        debug_assert!(self.fits(key, len, usize::MAX));
        if self.count == 0 {
            self.key = Some(key);
            self.segment = len;
        }
        for part in parts {
            self.data.extend_from_slice(part);
        }
        self.count += 1;
    }

    /// The batch to send, if any: its key, the datagrams end to end, and
    /// the segment size (`None` for a single datagram, which needs no
    /// offload).
    pub fn pending(&self) -> Option<(K, &[u8], Option<usize>)> {
        let key = self.key.filter(|_| self.count > 0)?;
        Some((key, &self.data, (self.count > 1).then_some(self.segment)))
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Empties the batch (keeps its buffer).
    pub fn clear(&mut self) {
        self.count = 0;
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches a sequence the way a sender does: the datagrams each send
    /// carries, cut back at the segment size.
    fn batches(datagrams: &[(u8, usize)], max_segments: usize) -> Vec<(u8, Vec<usize>)> {
        let mut b = GsoBatch::default();
        let mut sent = Vec::new();
        let mut flush = |b: &mut GsoBatch<u8>| {
            if let Some((key, data, segment)) = b.pending() {
                sent.push((key, data.chunks(segment.unwrap_or(data.len())).map(<[u8]>::len).collect()));
            }
            b.clear();
        };
        for &(key, len) in datagrams {
            if !b.fits(key, len, max_segments) {
                flush(&mut b);
            }
            b.push(key, &vec![0; len]);
        }
        flush(&mut b);
        sent
    }

    #[test]
    fn equal_datagrams_to_one_place_share_a_send() {
        assert_eq!(batches(&[(1, 1200), (1, 1200), (1, 1200)], 64), vec![(1, vec![1200, 1200, 1200])]);
    }

    #[test]
    fn a_shorter_datagram_ends_a_batch_and_a_longer_one_starts_the_next() {
        let sent = batches(&[(1, 1200), (1, 700), (1, 1200), (1, 1300), (1, 1300)], 64);
        assert_eq!(sent, vec![(1, vec![1200, 700]), (1, vec![1200]), (1, vec![1300, 1300])]);
    }

    #[test]
    fn another_destination_or_a_full_batch_starts_the_next() {
        let sent = batches(&[(1, 100), (2, 100), (2, 100), (2, 100), (1, 100)], 2);
        assert_eq!(sent, vec![(1, vec![100]), (2, vec![100, 100]), (2, vec![100]), (1, vec![100])]);
        let big = batches(&[(1, 30 * 1024), (1, 30 * 1024), (1, 30 * 1024)], 64);
        assert_eq!(big, vec![(1, vec![30 * 1024, 30 * 1024]), (1, vec![30 * 1024])]);
    }

    #[test]
    fn a_datagram_in_parts_is_one_datagram() {
        let mut b = GsoBatch::default();
        b.push_parts(1u8, &[&[0x40, 0, 0, 2], &[7, 8]]);
        assert!(b.fits(1, 6, 64) && !b.fits(1, 7, 64));
        b.push(1u8, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(b.pending(), Some((1, &[0x40u8, 0, 0, 2, 7, 8, 1, 2, 3, 4, 5, 6][..], Some(6))));
    }

    #[test]
    fn a_single_datagram_needs_no_segment_size() {
        let mut b = GsoBatch::default();
        assert!(b.pending().is_none());
        b.push(7u8, &[1, 2, 3]);
        assert_eq!(b.pending(), Some((7, &[1u8, 2, 3][..], None)));
        b.clear();
        assert!(b.is_empty() && b.pending().is_none());
    }
}
