//! Data channels: reliability presets, messages, and the send handle with its
//! bounded, backpressure-aware queue.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use peerlink_proto::PeerId;
use str0m::channel::{ChannelConfig, Reliability as Str0mReliability};
use tokio::sync::{Notify, Semaphore, TryAcquireError};

use crate::error::SendError;

/// How a channel delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reliability {
    /// Every message arrives, in order (TCP-like). The default.
    ReliableOrdered,
    /// Unordered, never retransmitted (`maxRetransmits: 0`, UDP-like).
    Unreliable,
    /// Ordered; a message not delivered within `ms` milliseconds is abandoned
    /// (`maxPacketLifeTime`).
    MaxLifetime { ms: u16 },
}

/// A channel's label and delivery mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelSpec {
    pub label: String,
    pub reliability: Reliability,
}

impl ChannelSpec {
    /// Reliable and ordered.
    pub fn reliable(label: impl Into<String>) -> Self {
        ChannelSpec { label: label.into(), reliability: Reliability::ReliableOrdered }
    }

    /// Unordered with `maxRetransmits: 0`.
    pub fn unreliable(label: impl Into<String>) -> Self {
        ChannelSpec { label: label.into(), reliability: Reliability::Unreliable }
    }

    /// Ordered with `maxPacketLifeTime: ms`.
    pub fn max_lifetime(label: impl Into<String>, ms: u16) -> Self {
        ChannelSpec { label: label.into(), reliability: Reliability::MaxLifetime { ms } }
    }

    pub(crate) fn to_str0m(&self) -> ChannelConfig {
        let (ordered, reliability) = match self.reliability {
            Reliability::ReliableOrdered => (true, Str0mReliability::Reliable),
            Reliability::Unreliable => (false, Str0mReliability::MaxRetransmits { retransmits: 0 }),
            Reliability::MaxLifetime { ms } => (true, Str0mReliability::MaxPacketLifetime { lifetime: ms }),
        };
        ChannelConfig { label: self.label.clone(), ordered, reliability, ..Default::default() }
    }

    pub(crate) fn from_str0m(label: &str, cfg: Option<&ChannelConfig>) -> Self {
        let reliability = match cfg.map(|c| (c.ordered, &c.reliability)) {
            Some((_, Str0mReliability::MaxRetransmits { .. })) => Reliability::Unreliable,
            Some((_, Str0mReliability::MaxPacketLifetime { lifetime })) => {
                Reliability::MaxLifetime { ms: *lifetime }
            }
            _ => Reliability::ReliableOrdered,
        };
        ChannelSpec { label: label.to_string(), reliability }
    }
}

/// One data-channel message.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
}

impl Message {
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    pub fn is_binary(&self) -> bool {
        matches!(self, Message::Binary(_))
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Text(s) if s.len() <= 64 => write!(f, "Text({s:?})"),
            Message::Text(s) => write!(f, "Text({} bytes)", s.len()),
            Message::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s)
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::Text(s.to_string())
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b)
    }
}

/// State shared by a [`DataChannel`] handle and the room's driver.
pub(crate) struct Shared {
    pub peer: PeerId,
    pub spec: ChannelSpec,
    /// Messages accepted by `send` and not yet written to SCTP.
    pub queue: Mutex<VecDeque<Message>>,
    /// Bytes of free queue space. Closed when the channel closes.
    pub space: Semaphore,
    pub capacity: usize,
    pub max_message: AtomicUsize,
    pub closed: AtomicBool,
    /// Wakes the driver to drain queues.
    pub wake: Arc<Notify>,
    pub sent_bytes: AtomicU64,
    pub sent_messages: AtomicU64,
}

impl Shared {
    pub fn new(
        peer: PeerId,
        spec: ChannelSpec,
        capacity: usize,
        max_message: usize,
        wake: Arc<Notify>,
    ) -> Self {
        Shared {
            peer,
            spec,
            queue: Mutex::new(VecDeque::new()),
            space: Semaphore::new(capacity),
            capacity,
            max_message: AtomicUsize::new(max_message),
            closed: AtomicBool::new(false),
            wake,
            sent_bytes: AtomicU64::new(0),
            sent_messages: AtomicU64::new(0),
        }
    }

    /// Queue space a message takes: its size, at least 1, at most the whole queue.
    pub fn cost(&self, msg: &Message) -> u32 {
        msg.len().clamp(1, self.capacity) as u32
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.space.close();
    }

    /// Returns queue space after the driver handed a message to SCTP.
    pub fn release(&self, msg: &Message) {
        self.space.add_permits(self.cost(msg) as usize);
    }
}

/// Sending half of one data channel to one peer. Cheap to clone.
///
/// `send` waits while the channel's queue is full (the peer or the network is
/// slower than the sender); `try_send` fails with [`SendError::Overflow`]
/// instead. On a reliable channel every accepted message is delivered, in
/// order, unless the connection itself is lost.
#[derive(Clone)]
pub struct DataChannel {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for DataChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataChannel")
            .field("peer", &self.shared.peer)
            .field("spec", &self.shared.spec)
            .finish()
    }
}

impl DataChannel {
    pub fn label(&self) -> &str {
        &self.shared.spec.label
    }

    pub fn peer(&self) -> &PeerId {
        &self.shared.peer
    }

    pub fn reliability(&self) -> Reliability {
        self.shared.spec.reliability
    }

    /// Largest message this channel can carry (negotiated with the remote).
    pub fn max_message_size(&self) -> usize {
        self.shared.max_message.load(Ordering::Relaxed)
    }

    /// Bytes queued here and not yet handed to the transport.
    pub fn queued_bytes(&self) -> usize {
        self.shared.capacity - self.shared.space.available_permits()
    }

    /// Capacity of the send queue in bytes.
    pub fn queue_capacity(&self) -> usize {
        self.shared.capacity
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn check(&self, msg: &Message) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        let max = self.max_message_size();
        if msg.len() > max {
            return Err(SendError::TooLarge { size: msg.len(), max });
        }
        Ok(())
    }

    fn enqueue(&self, msg: Message) {
        self.shared.queue.lock().expect("channel queue lock").push_back(msg);
        self.shared.wake.notify_one();
    }

    /// Queues `msg`, waiting while the queue is full.
    pub async fn send(&self, msg: impl Into<Message>) -> Result<(), SendError> {
        let msg = msg.into();
        self.check(&msg)?;
        let permit =
            self.shared.space.acquire_many(self.shared.cost(&msg)).await.map_err(|_| SendError::Closed)?;
        permit.forget();
        self.enqueue(msg);
        Ok(())
    }

    /// Queues `msg` if there is room now; [`SendError::Overflow`] if not.
    pub fn try_send(&self, msg: impl Into<Message>) -> Result<(), SendError> {
        let msg = msg.into();
        self.check(&msg)?;
        match self.shared.space.try_acquire_many(self.shared.cost(&msg)) {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => {
                return Err(SendError::Overflow {
                    queued: self.queued_bytes(),
                    capacity: self.shared.capacity,
                });
            }
            Err(TryAcquireError::Closed) => return Err(SendError::Closed),
        }
        self.enqueue(msg);
        Ok(())
    }

    /// Waits until everything queued so far has been handed to the transport.
    pub async fn flush(&self) -> Result<(), SendError> {
        let all = self.shared.capacity as u32;
        let permit = self.shared.space.acquire_many(all).await.map_err(|_| SendError::Closed)?;
        drop(permit);
        Ok(())
    }
}
