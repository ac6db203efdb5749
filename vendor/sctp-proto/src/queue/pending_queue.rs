use crate::chunk::chunk_payload_data::ChunkPayloadData;

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::time::Duration;
use rustc_hash::FxHashMap;
use std::time::Instant;

/// pendingBaseQueue
pub(crate) type PendingBaseQueue = VecDeque<ChunkPayloadData>;

/// The unsent chunks of one kind (ordered or unordered) of one stream.
#[derive(Debug, Default)]
struct StreamQueue {
    chunks: PendingBaseQueue,
    /// Whether the queue is in its round-robin ring.
    in_ring: bool,
}

/// A queue's key: stream identifier, unordered.
type Key = (u16, bool);

/// pendingQueue: the chunks of messages written but not sent yet.
///
/// Unordered messages go before ordered ones (as upstream). Within each
/// kind, streams take turns one whole message at a time (round robin, as
/// RFC 8260's scheduler does without I-DATA), so a small message on one
/// stream waits for at most one message of each other stream, however much
/// another stream has queued; upstream sent every message in the order it
/// was written. The fragments of one message are sent back to back (their
/// TSNs must be consecutive without I-DATA).
#[derive(Debug, Default)]
pub(crate) struct PendingQueue {
    queues: FxHashMap<Key, StreamQueue>,
    /// Streams with chunks waiting, the next to send at the front: ordered
    /// (`rings[0]`) and unordered (`rings[1]`).
    rings: [VecDeque<u16>; 2],
    queue_len: usize,
    n_bytes: usize,
    /// The queue of a message whose first fragment was sent and whose last
    /// was not.
    selected: Option<Key>,
}

impl PendingQueue {
    pub(crate) fn new() -> Self {
        PendingQueue::default()
    }

    pub(crate) fn push(&mut self, c: ChunkPayloadData) {
        self.n_bytes += c.user_data.len();
        self.queue_len += 1;
        let key = (c.stream_identifier, c.unordered);
        let queue = self.queues.entry(key).or_default();
        queue.chunks.push_back(c);
        if !queue.in_ring {
            queue.in_ring = true;
            self.rings[usize::from(key.1)].push_back(key.0);
        }
    }

    /// Start lifetimes for the newly queued suffix using the next transmit poll's time.
    /// Every queue retains message-ID order, so old pending messages need no rescan.
    /// Gives the new timed messages their deadline; whether any got one.
    pub(crate) fn start_timed_messages(&mut self, first_message_id: u64, now: Instant) -> bool {
        let mut timed = false;
        for queue in self.queues.values_mut() {
            for chunk in queue
                .chunks
                .iter_mut()
                .rev()
                .take_while(|chunk| chunk.message_id >= first_message_id)
            {
                if chunk.deadline.is_some()
                    || chunk.payload_type == crate::PayloadProtocolIdentifier::Dcep
                {
                    continue;
                }
                if let Some((crate::ReliabilityType::Timed, lifetime)) = chunk.reliability {
                    chunk.deadline = now.checked_add(Duration::from_millis(u64::from(lifetime)));
                    timed = true;
                }
            }
        }
        timed
    }

    /// The queue whose message goes next.
    fn next_key(&self) -> Option<Key> {
        if self.selected.is_some() {
            return self.selected;
        }
        if let Some(stream) = self.rings[1].front() {
            return Some((*stream, true));
        }
        self.rings[0].front().map(|stream| (*stream, false))
    }

    pub(crate) fn peek(&self) -> Option<&ChunkPayloadData> {
        self.queues.get(&self.next_key()?)?.chunks.front()
    }

    pub(crate) fn pop(
        &mut self,
        beginning_fragment: bool,
        unordered: bool,
    ) -> Option<ChunkPayloadData> {
        let key = self.next_key()?;
        if self.selected.is_none() && (!beginning_fragment || key.1 != unordered) {
            return None;
        }
        let popped = self.queues.get_mut(&key)?.chunks.pop_front()?;
        self.n_bytes -= popped.user_data.len();
        self.queue_len -= 1;
        if popped.ending_fragment {
            // The message is out: the stream's turn ends.
            self.selected = None;
            self.unring(key);
        } else {
            self.selected = Some(key);
        }
        self.settle(key);
        Some(popped)
    }

    /// Takes queue `key` out of its ring.
    fn unring(&mut self, key: Key) {
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        if queue.in_ring {
            queue.in_ring = false;
            let ring = &mut self.rings[usize::from(key.1)];
            if ring.front() == Some(&key.0) {
                ring.pop_front();
            } else if let Some(at) = ring.iter().position(|s| *s == key.0) {
                ring.remove(at);
            }
        }
    }

    /// Puts queue `key` at the back of its ring if it has chunks waiting
    /// and is not in it; forgets it when it has none.
    fn settle(&mut self, key: Key) {
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        if queue.chunks.is_empty() {
            self.unring(key);
            if self.selected != Some(key) {
                self.queues.remove(&key);
            }
        } else if !queue.in_ring {
            queue.in_ring = true;
            self.rings[usize::from(key.1)].push_back(key.0);
        }
    }

    /// Close the SSN gap after removing an entirely unsent ordered message.
    pub(crate) fn compact_ordered_ssns(&mut self, stream_identifier: u16) {
        if let Some(queue) = self.queues.get_mut(&(stream_identifier, false)) {
            for chunk in &mut queue.chunks {
                chunk.stream_sequence_number = chunk.stream_sequence_number.wrapping_sub(1);
            }
        }
    }

    pub(crate) fn get_num_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Remove a message without allocating a temporary collection. Selection
    /// persists when removing a different message from the pending queues.
    pub(crate) fn remove_message(
        &mut self,
        message_id: u64,
        mut on_remove: impl FnMut(ChunkPayloadData),
    ) -> usize {
        if self.selected.is_some() && self.peek().is_some_and(|c| c.message_id == message_id) {
            self.selected = None;
        }
        let mut removed_bytes = 0;
        let mut removed_chunks = 0;
        let mut touched = Vec::new();
        for (key, queue) in &mut self.queues {
            let before = removed_chunks;
            queue.chunks.retain_mut(|chunk| {
                if chunk.message_id != message_id {
                    return true;
                }
                removed_bytes += chunk.user_data.len();
                removed_chunks += 1;
                on_remove(core::mem::take(chunk));
                false
            });
            if removed_chunks > before {
                touched.push(*key);
            }
        }
        for key in touched {
            self.settle(key);
        }
        self.n_bytes -= removed_bytes;
        self.queue_len -= removed_chunks;
        removed_bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.queue_len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn contains_message(&self, message_id: u64) -> bool {
        self.queues.values().any(|queue| {
            queue
                .chunks
                .iter()
                .any(|chunk| chunk.message_id == message_id)
        })
    }

    pub(crate) fn contains_stream(&self, stream_identifier: u16) -> bool {
        [false, true].into_iter().any(|unordered| {
            self.queues
                .get(&(stream_identifier, unordered))
                .is_some_and(|queue| !queue.chunks.is_empty())
        })
    }
}
