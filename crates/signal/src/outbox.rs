//! A connection's sending side, shared by everyone who delivers to it.
//!
//! Whoever delivers a frame writes it to the addressee's socket at once
//! when nothing is waiting there and the socket takes it: one hop, no
//! wake-up of the addressee's task. What the socket does not take waits in
//! the outbox, bounded in frames and bytes (and all outboxes together by
//! the server's budget), and the addressee's own task writes it out when the
//! socket is writable again.
//!
//! Frames delivered while a connection works through what it read (a
//! [`Batch`]) are written when it is done: a burst of frames from one client
//! to another leaves in one write.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use tokio::net::TcpStream;

use crate::ws;

/// Most bytes gathered for one write.
const WRITE_CHUNK: usize = 64 * 1024;

/// The server-wide bound on queued bytes, and the socket calls made.
#[derive(Debug)]
pub(crate) struct Budget {
    pub queued: AtomicUsize,
    pub max_bytes: usize,
    /// Reads from client sockets (`conn.rs`).
    pub socket_reads: AtomicU64,
    /// Writes to client sockets.
    pub socket_writes: AtomicU64,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The connection's own queue (messages or bytes) is full.
    Connection,
    /// The server's budget for all queues is used up.
    Server,
    /// The connection is closing.
    Closed,
    /// The queue towards the other nodes (backplane) is full.
    Backplane,
    /// The backplane is unreachable.
    Down,
}

/// A handle on one connection's sending side. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(Arc<Sink>);

#[derive(Debug)]
struct Sink {
    state: Mutex<State>,
    max_bytes: usize,
    max_frames: usize,
    budget: Arc<Budget>,
    /// Bytes the socket has taken, for the slow-consumer rule.
    written: AtomicU64,
}

/// What the connection's task is woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// A message from the server itself did not fit: close as a slow consumer.
    Kicked,
    /// The server is shutting down.
    Shutdown,
    /// A write failed: the client is gone.
    Broken,
}

#[derive(Debug, Default)]
struct State {
    /// `None` once the connection stopped sending.
    socket: Option<Arc<TcpStream>>,
    /// Wire bytes of frames a write took only part of: they go first.
    partial: Option<Bytes>,
    queue: VecDeque<Out>,
    /// Bytes in `queue` and `partial`.
    queued: usize,
    /// Pongs in `queue` (0 or 1), and where the one is: its place counted
    /// from the connection's first frame, `popped` frames having left.
    pongs: usize,
    pong_at: u64,
    popped: u64,
    /// The socket took less than it was given: only the connection's task
    /// writes (when the socket is writable), deliveries just queue.
    blocked: bool,
    /// Listed in this thread's batch.
    batched: bool,
    alarm: Option<Alarm>,
    closed: bool,
    /// The connection's task, woken when blocked or alarmed.
    waker: Option<Waker>,
}

#[derive(Debug)]
enum Out {
    /// A text message (its frame header is added when it is written).
    Text(Utf8Bytes),
    /// A whole frame (control frames).
    Wire(Bytes),
    /// A pong (a whole frame): at most one waits at a time.
    Pong(Bytes),
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Text(t) => t.len(),
            Out::Wire(w) | Out::Pong(w) => w.len(),
        }
    }
}

thread_local! {
    /// The outboxes delivered to in this thread's current batch (`None`: no batch).
    static BATCH: RefCell<Option<Vec<Outbox>>> = const { RefCell::new(None) };
    /// Where frames are gathered for a write.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// While one lives, deliveries on this thread are written when it is
/// dropped instead of at once. Not `Send`: it never lives across an await.
pub(crate) struct Batch {
    outer: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Batch {
    pub fn start() -> Batch {
        let outer = BATCH.with_borrow_mut(|b| {
            if b.is_some() {
                return false;
            }
            *b = Some(Vec::new());
            true
        });
        Batch { outer, _not_send: std::marker::PhantomData }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let Some(list) = BATCH.with_borrow_mut(Option::take) else { return };
        for outbox in list {
            let mut st = outbox.0.lock();
            st.batched = false;
            outbox.0.flush(&mut st);
        }
    }
}

impl Outbox {
    pub fn new(socket: Arc<TcpStream>, max_frames: usize, max_bytes: usize, budget: Arc<Budget>) -> Outbox {
        Outbox(Arc::new(Sink {
            state: Mutex::new(State { socket: Some(socket), ..State::default() }),
            max_bytes,
            max_frames,
            budget,
            written: AtomicU64::new(0),
        }))
    }

    /// Whether both are the same connection's.
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Tells this connection from any other alive on this node (its
    /// member entries in Redis carry it: a leave removes only its own).
    pub fn token(&self) -> u64 {
        Arc::as_ptr(&self.0) as usize as u64
    }

    /// Queues a relayed frame without waiting, or says why not. The queue
    /// is bounded in frames and bytes, and all queues together by the
    /// server's budget: a client that stops reading pins at most
    /// `max_bytes`, all of them together at most the budget.
    ///
    /// Relayed frames may fill three quarters of the queue (bytes and
    /// frames): the rest is kept for the server's own messages (presence,
    /// replies), so a client that keeps up is never closed because others
    /// filled its queue.
    pub fn try_deliver(&self, frame: Utf8Bytes) -> Result<(), Full> {
        match self.try_deliver_if(frame, || true) {
            Ok(queued) => queued,
            Err(_) => unreachable!("always valid"),
        }
    }

    /// [`Outbox::try_deliver`] if `valid()` holds once the queue's lock is
    /// taken; else the frame is handed back, not queued.
    pub fn try_deliver_if(
        &self,
        frame: Utf8Bytes,
        valid: impl FnOnce() -> bool,
    ) -> Result<Result<(), Full>, Utf8Bytes> {
        let n = frame.len();
        let mut st = self.0.lock();
        if !valid() {
            return Err(frame);
        }
        if st.closed {
            return Ok(Err(Full::Closed));
        }
        if st.queue.len() >= self.0.max_frames - self.0.max_frames / 4
            || st.queued + n > self.0.max_bytes - self.0.max_bytes / 4
        {
            return Ok(Err(Full::Connection));
        }
        let budget = &self.0.budget;
        if budget.queued.fetch_add(n, Ordering::Relaxed) + n > budget.max_bytes {
            budget.queued.fetch_sub(n, Ordering::Relaxed);
            return Ok(Err(Full::Server));
        }
        self.0.push(&mut st, Out::Text(frame), self);
        Ok(Ok(()))
    }

    /// Queues a frame the server itself sends (presence, replies): these
    /// must not be lost, so a connection whose queue cannot take one is
    /// closed as a slow consumer. They are exempt from the server budget
    /// (each is small, and bounded by the connection's own queue), but
    /// counted in it.
    pub fn deliver(&self, frame: Utf8Bytes) -> bool {
        let n = frame.len();
        let mut st = self.0.lock();
        if st.closed {
            return false;
        }
        if st.queue.len() >= self.0.max_frames || st.queued + n > self.0.max_bytes {
            self.0.alarm(&mut st, Alarm::Kicked);
            return false;
        }
        self.0.budget.queued.fetch_add(n, Ordering::Relaxed);
        self.0.push(&mut st, Out::Text(frame), self);
        true
    }

    /// Queues the answer to a ping; a pong still waiting is replaced by it
    /// instead (RFC 6455 5.5.3: only the most recent ping need be
    /// answered), so a client that pings without reading what comes back
    /// has one pong waiting, not one per ping.
    pub fn deliver_pong(&self, wire: Vec<u8>) {
        let mut st = self.0.lock();
        if st.closed {
            return;
        }
        let n = wire.len();
        if st.pongs > 0 {
            let at = (st.pong_at - st.popped) as usize;
            if let Some(Out::Pong(old)) = st.queue.get_mut(at) {
                let before = old.len();
                *old = wire.into();
                st.queued = st.queued + n - before;
                self.0.budget.queued.fetch_add(n, Ordering::Relaxed);
                self.0.budget.queued.fetch_sub(before, Ordering::Relaxed);
                return;
            }
        }
        st.pongs = 1;
        st.pong_at = st.popped + st.queue.len() as u64;
        self.0.budget.queued.fetch_add(n, Ordering::Relaxed);
        self.0.push(&mut st, Out::Pong(wire.into()), self);
    }

    /// Queues a control frame (ping, close) from the connection itself.
    pub fn deliver_control(&self, wire: Vec<u8>) {
        let mut st = self.0.lock();
        if st.closed {
            return;
        }
        self.0.budget.queued.fetch_add(wire.len(), Ordering::Relaxed);
        self.0.push(&mut st, Out::Wire(wire.into()), self);
    }

    /// Tells the connection's task the server is shutting down.
    pub fn shut_down(&self) {
        let mut st = self.0.lock();
        self.0.alarm(&mut st, Alarm::Shutdown);
    }

    /// For the connection's task: registers it to be woken, and says
    /// whether something ended the connection and whether the socket is
    /// blocked (the task then waits for it to be writable).
    pub fn poll_state(&self, cx: &Context<'_>) -> (Option<Alarm>, bool) {
        let mut st = self.0.lock();
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        (st.alarm, st.blocked)
    }

    /// For the connection's task, once the socket is writable: writes what
    /// waits.
    pub fn write_ready(&self) {
        let mut st = self.0.lock();
        st.blocked = false;
        self.0.flush(&mut st);
    }

    /// Bytes the socket has taken so far.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }

    /// Whether everything queued has been written.
    pub fn is_empty(&self) -> bool {
        let st = self.0.lock();
        st.partial.is_none() && st.queue.is_empty()
    }

    /// Polls until everything queued has been written (or the socket broke).
    pub fn poll_written(&self, cx: &mut Context<'_>, socket: &TcpStream) -> Poll<()> {
        loop {
            let (alarm, blocked) = self.poll_state(cx);
            if alarm == Some(Alarm::Broken) || self.is_empty() {
                return Poll::Ready(());
            }
            if !blocked {
                self.write_ready();
                continue;
            }
            match socket.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => self.write_ready(),
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The last frames: what waits is dropped (a frame partly written is
    /// finished), then `text` (the error) and the close frame are written.
    pub fn goodbye(&self, text: Option<Utf8Bytes>, close: Vec<u8>) {
        let mut st = self.0.lock();
        if st.closed {
            return;
        }
        let dropped: usize = st.queue.drain(..).map(|o| o.len()).sum();
        st.queued -= dropped;
        st.pongs = 0;
        self.0.budget.queued.fetch_sub(dropped, Ordering::Relaxed);
        let frames = text.map(Out::Text).into_iter().chain([Out::Wire(close.into())]);
        for out in frames {
            self.0.budget.queued.fetch_add(out.len(), Ordering::Relaxed);
            self.0.push(&mut st, out, self);
        }
    }

    /// Waits until everything queued has been written (or the socket broke).
    pub async fn written_all(&self, socket: &TcpStream) {
        std::future::poll_fn(|cx| self.poll_written(cx, socket)).await
    }

    /// The connection ends: nothing more is queued or written, and what
    /// waited leaves the server's budget.
    pub fn close(&self) {
        let mut st = self.0.lock();
        st.closed = true;
        st.socket = None;
        st.waker = None;
        self.0.budget.queued.fetch_sub(st.queued, Ordering::Relaxed);
        st.queued = 0;
        st.queue = VecDeque::new();
        st.pongs = 0;
        st.partial = None;
    }
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock")
    }

    fn alarm(&self, st: &mut State, alarm: Alarm) {
        if st.alarm.is_none() {
            st.alarm = Some(alarm);
        }
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
    }

    /// Queues `out` (its bytes already counted in the budget) and writes
    /// now, or at the end of the thread's batch.
    fn push(&self, st: &mut State, out: Out, me: &Outbox) {
        st.queued += out.len();
        st.queue.push_back(out);
        if st.blocked || st.batched {
            return;
        }
        let batched = BATCH.with_borrow_mut(|b| match b {
            Some(list) => {
                list.push(me.clone());
                true
            }
            None => false,
        });
        if batched {
            st.batched = true;
        } else {
            self.flush(st);
        }
    }

    /// Writes what waits until the socket would block; then the
    /// connection's task is woken to wait for it.
    fn flush(&self, st: &mut State) {
        if st.blocked {
            return;
        }
        let State { socket, partial, queue, queued, pongs, popped, .. } = st;
        let Some(socket) = socket.as_ref() else { return };
        let outcome = WRITE_BUF.with_borrow_mut(|buf| {
            let outcome = loop {
                buf.clear();
                let mut taken = 0;
                if let Some(p) = partial.take() {
                    buf.extend_from_slice(&p);
                    taken += p.len();
                }
                while let Some(out) = queue.front() {
                    let n = out.len();
                    if !buf.is_empty() && buf.len() + n + 10 > WRITE_CHUNK {
                        break;
                    }
                    match out {
                        Out::Text(t) => {
                            ws::put_header(buf, ws::OP_TEXT, n);
                            buf.extend_from_slice(t.as_bytes());
                        }
                        Out::Wire(w) => buf.extend_from_slice(w),
                        Out::Pong(w) => {
                            buf.extend_from_slice(w);
                            *pongs -= 1;
                        }
                    }
                    taken += n;
                    queue.pop_front();
                    *popped += 1;
                }
                if buf.is_empty() {
                    break Ok(());
                }
                *queued -= taken;
                self.budget.queued.fetch_sub(taken, Ordering::Relaxed);
                self.budget.socket_writes.fetch_add(1, Ordering::Relaxed);
                let wrote = match socket.try_write(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                    Err(e) => break Err(e),
                };
                self.written.fetch_add(wrote as u64, Ordering::Relaxed);
                if wrote < buf.len() {
                    let rest = Bytes::copy_from_slice(&buf[wrote..]);
                    *queued += rest.len();
                    self.budget.queued.fetch_add(rest.len(), Ordering::Relaxed);
                    *partial = Some(rest);
                    break Err(ErrorKind::WouldBlock.into());
                }
            };
            if buf.capacity() > 4 * WRITE_CHUNK {
                *buf = Vec::new();
            }
            outcome
        });
        match outcome {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                st.blocked = true;
                if let Some(w) = &st.waker {
                    w.wake_by_ref();
                }
            }
            Err(e) => {
                tracing::debug!("write: {e}");
                self.budget.queued.fetch_sub(st.queued, Ordering::Relaxed);
                st.queued = 0;
                st.queue = VecDeque::new();
                st.pongs = 0;
                st.partial = None;
                self.alarm(st, Alarm::Broken);
            }
        }
    }
}
