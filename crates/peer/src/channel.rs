//! Data channels: reliability presets, messages, and the channel handle
//! with its two bounded queues (send and receive).

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
#[non_exhaustive]
pub enum Reliability {
    /// Every message arrives, in order (TCP-like). The default.
    ReliableOrdered,
    /// Unordered, never retransmitted (`maxRetransmits: 0`, UDP-like).
    Unreliable,
    /// Ordered; a message not delivered within `ms` milliseconds is abandoned
    /// (`maxPacketLifeTime`).
    MaxLifetime {
        /// The lifetime in milliseconds.
        ms: u16,
    },
}

/// A channel's label and delivery mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelSpec {
    /// The label both sides see (`RTCDataChannel.label`).
    pub label: String,
    /// How messages are delivered.
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
    /// A string (`send("...")` in a browser).
    Text(String),
    /// Bytes (`send(ArrayBuffer)` in a browser).
    Binary(Vec<u8>),
}

impl Message {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it carries no byte (empty messages are legal).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// Whether it is [`Message::Binary`].
    pub fn is_binary(&self) -> bool {
        matches!(self, Message::Binary(_))
    }

    /// The payload, taking it.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Message::Text(s) => s.into_bytes(),
            Message::Binary(b) => b,
        }
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

/// What the channels of one room share with its driver: which connections
/// have messages to send, and whether any receive queue is full.
#[derive(Debug, Default)]
pub(crate) struct RoomWake {
    /// Wakes the driver.
    pub notify: Notify,
    /// Connections (by key) whose channels queued something since the
    /// driver last looked.
    ready: Mutex<Vec<u64>>,
    /// Channels whose receive queue is over its capacity; the driver holds
    /// datagrams that carry data while this is above zero.
    pub full_receivers: AtomicUsize,
    /// Bytes of events in the application's event queue, not yet taken
    /// ([`crate::Room::next_event`]); past [`EVENT_BYTES_PAUSE`] with those
    /// the driver holds, it reads neither the network nor signaling.
    pub event_bytes: AtomicUsize,
}

/// Bytes of events waiting for the application (handed to its queue or held
/// by the driver) at which the driver stops taking more from the network
/// and the signaling server: events carry messages of up to 64 KiB.
pub(crate) const EVENT_BYTES_PAUSE: usize = 4 << 20;

impl RoomWake {
    /// Connections with something to send, once each.
    pub fn take_ready(&self) -> Vec<u64> {
        std::mem::take(&mut *self.ready.lock().expect("wake lock"))
    }

    fn schedule(&self, conn: u64) {
        self.ready.lock().expect("wake lock").push(conn);
        self.notify.notify_one();
    }
}

/// Messages received and not yet taken by the application.
#[derive(Debug, Default)]
struct Inbox {
    messages: VecDeque<Message>,
    bytes: usize,
    /// Over capacity: counted in [`RoomWake::full_receivers`].
    full: bool,
}

/// State shared by the [`DataChannel`] handles and the room's driver.
pub(crate) struct Shared {
    pub peer: PeerId,
    pub spec: ChannelSpec,
    /// The connection this channel belongs to (see [`RoomWake`]).
    conn: u64,
    /// Messages accepted by `send` and not yet written to SCTP.
    pub queue: Mutex<VecDeque<Message>>,
    /// Bytes of free queue space. Closed when the channel closes.
    space: Semaphore,
    capacity: usize,
    /// The connection is already on the driver's ready list.
    scheduled: AtomicBool,
    pub max_message: AtomicUsize,
    closed: AtomicBool,
    /// The application closed the channel: nothing more is accepted; the
    /// driver sends what is queued, then closes it at both ends.
    closing: AtomicBool,
    wake: Arc<RoomWake>,
    inbox: Mutex<Inbox>,
    /// Wakes a task waiting in `recv`.
    arrived: Notify,
    receive_capacity: usize,
    /// Application handles alive; with none, received messages are dropped.
    handles: AtomicUsize,
    pub sent_bytes: AtomicU64,
    pub sent_messages: AtomicU64,
}

impl Shared {
    pub fn new(
        peer: PeerId,
        spec: ChannelSpec,
        conn: u64,
        capacities: (usize, usize),
        max_message: usize,
        wake: Arc<RoomWake>,
    ) -> Self {
        let (capacity, receive_capacity) = capacities;
        Shared {
            peer,
            spec,
            conn,
            queue: Mutex::new(VecDeque::new()),
            space: Semaphore::new(capacity),
            capacity,
            scheduled: AtomicBool::new(false),
            max_message: AtomicUsize::new(max_message),
            closed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            wake,
            inbox: Mutex::new(Inbox::default()),
            arrived: Notify::new(),
            receive_capacity,
            handles: AtomicUsize::new(0),
            sent_bytes: AtomicU64::new(0),
            sent_messages: AtomicU64::new(0),
        }
    }

    /// Queue space a message takes: its size, at least 1, at most the whole queue.
    fn cost(&self, msg: &Message) -> u32 {
        msg.len().clamp(1, self.capacity) as u32
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.space.close();
        self.arrived.notify_waiters();
        self.arrived.notify_one();
        let mut inbox = self.inbox.lock().expect("inbox lock");
        if inbox.full {
            // Nobody will wait for the application to take these.
            inbox.full = false;
            self.wake.full_receivers.fetch_sub(1, Ordering::AcqRel);
            self.wake.notify.notify_one();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The application closed the channel ([`DataChannel::close`]).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The driver is about to drain the send queue: a later `send` must
    /// schedule the connection again.
    pub fn unschedule(&self) {
        self.scheduled.store(false, Ordering::Release);
    }

    /// Returns queue space after the driver handed a message to SCTP.
    pub fn release(&self, msg: &Message) {
        self.space.add_permits(self.cost(msg) as usize);
    }

    /// Hands a received message to the application. Dropped when no handle
    /// is left to take it.
    pub fn deliver(&self, msg: Message) {
        if self.handles.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut inbox = self.inbox.lock().expect("inbox lock");
        inbox.bytes += msg.len();
        inbox.messages.push_back(msg);
        if !inbox.full && inbox.bytes > self.receive_capacity {
            inbox.full = true;
            self.wake.full_receivers.fetch_add(1, Ordering::AcqRel);
        }
        drop(inbox);
        self.arrived.notify_one();
    }

    fn take(&self) -> Option<Message> {
        let mut inbox = self.inbox.lock().expect("inbox lock");
        let msg = inbox.messages.pop_front()?;
        inbox.bytes -= msg.len();
        if inbox.full && inbox.bytes <= self.receive_capacity / 2 {
            // Below half: the driver reads the network again.
            inbox.full = false;
            self.wake.full_receivers.fetch_sub(1, Ordering::AcqRel);
            self.wake.notify.notify_one();
        }
        Some(msg)
    }

    fn enqueue(&self, msg: Message) {
        self.queue.lock().expect("channel queue lock").push_back(msg);
        self.schedule();
    }

    /// Puts the connection on the driver's ready list (once).
    fn schedule(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.wake.schedule(self.conn);
        } else {
            self.wake.notify.notify_one();
        }
    }
}

/// One data channel to one peer: send with [`DataChannel::send`], receive
/// with [`DataChannel::recv`]. Cheap to clone; every clone is the same
/// channel.
///
/// Both directions are bounded. `send` waits while the send queue is full
/// (the peer or the network is slower than the sender); `try_send` fails
/// with [`SendError::Overflow`] instead. On a reliable channel every
/// accepted message is delivered, in order, unless the connection itself is
/// lost. Received messages wait in a receive queue until taken; while one is
/// full the room reads no more datagrams, so a slow reader slows the sender
/// down rather than losing anything. Messages that arrive once every handle
/// of a channel is dropped are discarded.
pub struct DataChannel {
    pub(crate) shared: Arc<Shared>,
}

impl DataChannel {
    pub(crate) fn new(shared: Arc<Shared>) -> DataChannel {
        shared.handles.fetch_add(1, Ordering::AcqRel);
        DataChannel { shared }
    }
}

impl Clone for DataChannel {
    fn clone(&self) -> Self {
        DataChannel::new(self.shared.clone())
    }
}

impl Drop for DataChannel {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Nobody will take what is queued: free it, and the driver.
            let mut inbox = self.shared.inbox.lock().expect("inbox lock");
            inbox.messages.clear();
            inbox.bytes = 0;
            if inbox.full {
                inbox.full = false;
                self.shared.wake.full_receivers.fetch_sub(1, Ordering::AcqRel);
                self.shared.wake.notify.notify_one();
            }
        }
    }
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
    /// The channel's label.
    pub fn label(&self) -> &str {
        &self.shared.spec.label
    }

    /// The peer at the other end.
    pub fn peer(&self) -> &PeerId {
        &self.shared.peer
    }

    /// How the channel delivers.
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

    /// Bytes received and not yet taken with `recv`.
    pub fn received_bytes_waiting(&self) -> usize {
        self.shared.inbox.lock().expect("inbox lock").bytes
    }

    /// Whether the channel (or its connection) has closed, or
    /// [`DataChannel::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed() || self.shared.is_closing()
    }

    /// Closes the channel at both ends, as `RTCDataChannel.close()` does:
    /// sends are refused from now on ([`SendError::Closed`], also for a send
    /// waiting for room); messages already queued still go, then the stream
    /// is reset, and both sides get [`crate::Event::ChannelClosed`]. What
    /// arrived before can still be taken with [`DataChannel::recv`], which
    /// then returns `None`. Closing one channel leaves the connection and its
    /// other channels as they are.
    pub fn close(&self) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.space.close();
        self.shared.schedule();
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

    /// Queues `msg`, waiting while the queue is full.
    pub async fn send(&self, msg: impl Into<Message>) -> Result<(), SendError> {
        let msg = msg.into();
        self.check(&msg)?;
        let permit =
            self.shared.space.acquire_many(self.shared.cost(&msg)).await.map_err(|_| SendError::Closed)?;
        permit.forget();
        self.shared.enqueue(msg);
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
        self.shared.enqueue(msg);
        Ok(())
    }

    /// Waits until everything queued so far has been handed to the transport.
    pub async fn flush(&self) -> Result<(), SendError> {
        let all = self.shared.capacity as u32;
        let permit = self.shared.space.acquire_many(all).await.map_err(|_| SendError::Closed)?;
        drop(permit);
        Ok(())
    }

    /// The next message from the peer, in arrival order; `None` once the
    /// channel has closed and every message that arrived before has been
    /// taken. Safe to cancel: a message is taken only when returned.
    pub async fn recv(&self) -> Option<Message> {
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(msg) = self.shared.take() {
                return Some(msg);
            }
            if self.is_closed() {
                // A message delivered just before the close is still taken.
                return self.shared.take();
            }
            arrived.await;
        }
    }

    /// The next message if one is waiting.
    pub fn try_recv(&self) -> Option<Message> {
        self.shared.take()
    }
}
