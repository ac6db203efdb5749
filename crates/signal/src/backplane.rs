//! Rooms shared by several `peerlink serve` nodes through Redis.
//!
//! Every node keeps, for each room with members on it, a replica of the
//! room (every member and the node it is on); Redis holds the truth and
//! carries the changes. Each node subscribes to one channel of its own
//! (`pl:n:NODE`), and everything it learns arrives there in one order:
//! membership changes are Lua scripts that update a room's hash and publish
//! to the nodes with members in it in the same atomic step, so no node sees
//! a `peer_joined` before a `joined` it should follow, nor a signal from a
//! peer before that peer's `peer_joined`. Messages between members of one
//! node never touch Redis; to a member elsewhere they are one `PUBLISH` to
//! its node. Keys:
//!
//! - `pl:{ROOM}:m`: the members, peer id → `{"id","node","s","n"}` (`s`
//!   the join order, `n` the name); `pl:{ROOM}:seq` the join counter. Both
//!   in the room's hash slot, so a script touches one slot (Redis Cluster).
//! - `{pl}:nodes`: node leases (sorted set, expiry in Redis's clock) and
//!   `{pl}:members:NODE`: what each node holds, so the others can remove
//!   the members of a node whose lease ran out (killed, cut off) and tell
//!   their peers `peer_left`.
//!
//! A node that finds its lease gone (Redis restarted and lost its data, or
//! the node was cut off for longer than the lease) puts its members back,
//! and a lease later compares each room with Redis's copy, telling its
//! members what changed meanwhile.
//!
//! On a Redis Cluster ([`BackplaneConfig::cluster`]) commands are routed by
//! slot, and a batch becomes one pipeline per hash tag (a pipeline must stay
//! in one slot there). Node channels stay classic pub/sub, which the
//! cluster carries to every shard; each node subscribes on one cluster
//! node. Ordering: a subscriber sees the messages published on one cluster
//! node in order, but not those of different nodes, so a message to a
//! member on another node is published from the room's own slot (a one-line
//! script keyed by the room), where the room's membership events are
//! published too: a peer's signals still follow its `peer_joined`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use peerlink_proto::PeerId;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::hub::{Full, Hub};

const JOIN: &str = include_str!("lua/join.lua");
const LEAVE: &str = include_str!("lua/leave.lua");
const SYNC: &str = include_str!("lua/sync.lua");
const HEARTBEAT: &str = include_str!("lua/heartbeat.lua");
const FORGET: &str = include_str!("lua/forget.lua");
/// PUBLISH from the slot of KEYS[1] (the room), on a Redis Cluster.
const PUBLISH_FROM_ROOM: &str = "return redis.call('PUBLISH', ARGV[1], ARGV[2])";

/// Longest a connection attempt or a reply from Redis may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a join waits for Redis before it is refused (`unavailable`).
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest a stopping node waits for its connections' leaves, beyond the
/// drain grace they may wait for their clients to resume elsewhere.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Operations sent to Redis in one pipeline at most.
const BATCH: usize = 512;

/// How a server shares its rooms with other nodes.
#[derive(Debug, Clone)]
pub struct BackplaneConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// How long a node's members outlive it: a node renews its lease every
    /// third of this; when it stops (killed, cut off from Redis) the other
    /// nodes remove its members and tell their peers `peer_left` within
    /// about one lease and a third.
    pub lease: Duration,
    /// Bytes of messages for other nodes that may wait to be sent to
    /// Redis; past it they are refused to their senders (`peer_busy`).
    pub max_queued_bytes: usize,
    /// `url` is a Redis Cluster: one or more of its nodes' URLs,
    /// comma-separated, to learn the rest from.
    pub cluster: bool,
}

impl BackplaneConfig {
    /// Redis at `url`, with a 3 s lease and 16 MiB of queue.
    pub fn redis(url: impl Into<String>) -> Self {
        BackplaneConfig {
            url: url.into(),
            lease: Duration::from_secs(3),
            max_queued_bytes: 16 << 20,
            cluster: false,
        }
    }

    /// A Redis Cluster, reached through `seeds` (comma-separated URLs).
    pub fn redis_cluster(seeds: impl Into<String>) -> Self {
        BackplaneConfig { cluster: true, ..BackplaneConfig::redis(seeds) }
    }
}

/// Where the commands go: one Redis, or a cluster.
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to one Redis, or to a Redis Cluster (routed by slot).
#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Commands sent together: one pipeline on a single Redis; on a cluster one
/// per hash tag (each stays in its slot), in the order each tag first
/// appears, every command's reply in its place.
#[derive(Default)]
struct Batch {
    cmds: Vec<(Option<String>, redis::Cmd)>,
}

impl Batch {
    /// `tag`: the hash tag of the command's keys; `None` for keyless ones.
    fn add(&mut self, tag: Option<String>, cmd: redis::Cmd) {
        self.cmds.push((tag, cmd));
    }

    async fn run(self, conn: &mut Conn) -> redis::RedisResult<Vec<redis::Value>> {
        if self.cmds.is_empty() {
            return Ok(Vec::new());
        }
        if let Conn::Single(_) = conn {
            let mut pipe = redis::pipe();
            for (_, cmd) in self.cmds {
                pipe.add_command(cmd);
            }
            return pipe.query_async(conn).await;
        }
        let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
        for (i, (tag, _)) in self.cmds.iter().enumerate() {
            match groups.iter_mut().find(|(t, _)| t == tag) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((tag.clone(), vec![i])),
            }
        }
        // Every group is sent even when one fails (a single Redis would
        // have run them all); the first error is returned.
        let mut out = vec![redis::Value::Nil; self.cmds.len()];
        let mut first_error = None;
        for (_, idx) in groups {
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.add_command(self.cmds[i].1.clone());
            }
            match pipe.query_async::<Vec<redis::Value>>(conn).await {
                Ok(replies) => {
                    for (i, v) in idx.into_iter().zip(replies) {
                        out[i] = v;
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// The hash tag of a room's keys.
fn room_tag(room: &str) -> Option<String> {
    Some(format!("{{{room}}}"))
}

/// The hash tag of the node leases and indexes.
fn pl_tag() -> Option<String> {
    Some("{pl}".to_string())
}

/// One member as Redis stores it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Entry {
    pub id: String,
    pub node: String,
    pub s: u64,
    #[serde(default)]
    pub n: Option<String>,
}

/// What a node's channel carries.
#[derive(Debug)]
pub(crate) enum Event {
    /// Every member of a room: after a join here (`J`), or a resync (`S`).
    Members { room: String, members: Vec<Entry>, kept: Option<String> },
    /// Someone joined on another node.
    Joined { room: String, member: Entry },
    /// Someone on another node left (or its node's lease ran out).
    Left { room: String, peer: String },
    /// A relayed frame for a member here (`to`), or for all members here
    /// but `from` (`to` is `None`).
    Frame { room: String, to: Option<PeerId>, from: PeerId, from_node: String, frame: Utf8Bytes },
    /// A refusal for a sender here, from the node of its addressee.
    Refused { room: String, to: PeerId, frame: Utf8Bytes },
}

#[derive(Deserialize)]
struct Membership {
    t: String,
    r: String,
    #[serde(default)]
    p: Option<String>,
    #[serde(default)]
    m: Vec<Entry>,
    /// In `J`: the joiner resumed a place it still held.
    #[serde(default)]
    k: bool,
}

impl Event {
    /// Reads a message from a node's channel. Membership events are JSON
    /// (written by the scripts); frames are `f\tROOM\tTO\tFROM\tNODE\n` or
    /// `e\tROOM\tTO\n` and the frame as the client will get it.
    pub fn parse(payload: &[u8]) -> Option<Event> {
        if payload.first() == Some(&b'{') {
            let m: Membership = serde_json::from_slice(payload).ok()?;
            return match m.t.as_str() {
                "J" | "S" => {
                    let kept = if m.k { m.p } else { None };
                    Some(Event::Members { room: m.r, members: m.m, kept })
                }
                "j" => Some(Event::Joined { room: m.r, member: m.m.into_iter().next()? }),
                "l" => Some(Event::Left { room: m.r, peer: m.p? }),
                _ => None,
            };
        }
        let text = std::str::from_utf8(payload).ok()?;
        let (head, frame) = text.split_once('\n')?;
        let frame = Utf8Bytes::from(frame.to_string());
        let mut f = head.split('\t');
        match f.next()? {
            "f" => {
                let room = f.next()?.to_string();
                let to = f.next()?;
                let to = (!to.is_empty()).then(|| PeerId::from_server(to));
                let from = PeerId::from_server(f.next()?);
                let from_node = f.next()?.to_string();
                Some(Event::Frame { room, to, from, from_node, frame })
            }
            "e" => {
                let room = f.next()?.to_string();
                let to = PeerId::from_server(f.next()?);
                Some(Event::Refused { room, to, frame })
            }
            _ => None,
        }
    }
}

/// What became of a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinOutcome {
    Joined,
    Already,
    Full(u64),
    /// A resume that had to find its place (mode `resume-only`) did not.
    Gone,
    /// Redis did not answer in time, or the connection broke.
    Failed,
}

/// What became of a leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaveOutcome {
    Removed,
    /// Not in the room.
    Absent,
    /// Another node has the member now (it resumed there).
    Moved(String),
    /// Redis did not answer in time, or the connection broke.
    Failed,
}

/// How a join takes a place already held by the same peer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinMode {
    /// A new member; a place already held is `Already`.
    Join,
    /// A resume: a place held is taken back here, else joined as new.
    Resume,
    /// A resume that may only take back a place it holds (`Gone` if none).
    ResumeOnly,
}

enum Op {
    Join {
        room: String,
        peer: PeerId,
        name: Option<String>,
        max: usize,
        mode: JoinMode,
        /// The joining connection's token ([`crate::outbox::Outbox::token`]).
        conn: u64,
        reply: oneshot::Sender<JoinOutcome>,
    },
    Leave {
        room: String,
        peer: PeerId,
        /// Only this connection's membership; `None`: whichever of this node.
        conn: Option<u64>,
        done: Option<oneshot::Sender<LeaveOutcome>>,
    },
    Publish {
        node: String,
        room: String,
        payload: String,
        at: Instant,
    },
}

/// Counters for `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub members_swept: AtomicU64,
    /// Microseconds the last batch's oldest message waited for Redis.
    pub lag_us: AtomicU64,
}

/// This node's link to the others.
#[derive(Debug)]
pub(crate) struct Backplane {
    node: String,
    ops: mpsc::UnboundedSender<Op>,
    /// Bytes of frames queued towards Redis.
    queued: AtomicUsize,
    max_queued: usize,
    lease: Duration,
    commands_up: AtomicBool,
    stream_up: AtomicBool,
    pub counters: Counters,
    /// The last error, for `/healthz`.
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Join { room, peer, .. } => write!(f, "Join({room}, {peer})"),
            Op::Leave { room, peer, .. } => write!(f, "Leave({room}, {peer})"),
            Op::Publish { node, .. } => write!(f, "Publish({node})"),
        }
    }
}

/// Status for `/healthz`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Status {
    pub kind: &'static str,
    pub node: String,
    pub up: bool,
    pub last_error: Option<String>,
    pub queued_bytes: usize,
    pub lag_us: u64,
}

impl Backplane {
    /// Connects this node to Redis at `cfg.url` (in the background: a node
    /// starts, and serves what it can, while Redis is away) and feeds
    /// `hub` from its channel until `stop`.
    pub fn start(
        cfg: &BackplaneConfig,
        hub: Arc<Hub>,
        stop: watch::Receiver<bool>,
        drain_grace: Duration,
    ) -> Result<Arc<Backplane>, redis::RedisError> {
        let seeds: Vec<&str> = cfg.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        // Node channels are read from one Redis (on a cluster, the first
        // seed: classic pub/sub reaches every shard).
        let client = redis::Client::open(*seeds.first().unwrap_or(&cfg.url.as_str()))?;
        // On a cluster the subscription moves to the next seed when one
        // cannot be reached: no seed is a single point of failure.
        let subscribe_via = if cfg.cluster {
            seeds.iter().map(|s| redis::Client::open(*s)).collect::<Result<Vec<_>, _>>()?
        } else {
            vec![client.clone()]
        };
        let target = if cfg.cluster {
            Target::Cluster(
                redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT)
                    .build()?,
            )
        } else {
            Target::Single(client.clone())
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let bp = Arc::new(Backplane {
            node: format!("{:016x}", rand::random::<u64>()),
            ops: tx,
            queued: AtomicUsize::new(0),
            max_queued: cfg.max_queued_bytes,
            lease: cfg.lease,
            commands_up: AtomicBool::new(false),
            stream_up: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        });
        hub.attach(bp.clone());
        tracing::info!(node = %bp.node, "sharing rooms through Redis");
        let (resync_tx, resync_rx) = mpsc::unbounded_channel();
        let drain = drain_grace + DRAIN_TIMEOUT;
        // The stream is read until the commands task has said goodbye: a
        // draining node must still hear its members move to other nodes.
        let (done_tx, done_rx) = watch::channel(false);
        let cmds = commands(bp.clone(), hub.clone(), target, rx, resync_rx, stop, drain);
        tokio::spawn(async move {
            cmds.await;
            drop(done_tx);
        });
        tokio::spawn(stream(bp.clone(), hub, subscribe_via, resync_tx, done_rx));
        Ok(bp)
    }

    /// Whether joins and messages to other nodes can be served now.
    pub fn is_up(&self) -> bool {
        self.commands_up.load(Ordering::Relaxed) && self.stream_up.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        Status {
            kind: "redis",
            node: self.node.clone(),
            up: self.is_up(),
            last_error: self.last_error.lock().expect("backplane lock").clone(),
            queued_bytes: self.queued.load(Ordering::Relaxed),
            lag_us: self.counters.lag_us.load(Ordering::Relaxed),
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        let mut last = self.last_error.lock().expect("backplane lock");
        if last.as_deref() != Some(msg.as_str()) {
            tracing::warn!("redis backplane: {msg}");
        }
        *last = Some(msg);
    }

    /// Adds `peer` to `room` in Redis; its `joined` comes through the stream.
    /// With `resume`, a member `peer` already is moves to this node instead
    /// (no one is told).
    pub async fn join(
        &self,
        room: &str,
        peer: &PeerId,
        name: Option<String>,
        max: usize,
        mode: JoinMode,
        conn: u64,
    ) -> JoinOutcome {
        let (reply, answer) = oneshot::channel();
        let op = Op::Join { room: room.to_string(), peer: peer.clone(), name, max, mode, conn, reply };
        if self.ops.send(op).is_err() {
            return JoinOutcome::Failed;
        }
        match tokio::time::timeout(JOIN_TIMEOUT, answer).await {
            Ok(Ok(outcome)) => outcome,
            _ => JoinOutcome::Failed,
        }
    }

    /// Removes `peer` from `room` in Redis (in order after what it sent).
    /// Never refused: leaves are bounded by the members this node has.
    pub fn leave(&self, room: &str, peer: &PeerId) {
        let _ =
            self.ops.send(Op::Leave { room: room.to_string(), peer: peer.clone(), conn: None, done: None });
    }

    /// Like [`Backplane::leave`], and waits until Redis has it (bounded;
    /// not at all while Redis is unreachable): a join anywhere after this
    /// returns does not find `peer` in the room.
    /// Only connection `conn`'s membership is removed: one the member
    /// resumed on since (here or elsewhere) stays, and says so (`Moved`).
    pub async fn leave_and_wait(&self, room: &str, peer: &PeerId, conn: u64) -> LeaveOutcome {
        let (done, finished) = oneshot::channel();
        let op = Op::Leave { room: room.to_string(), peer: peer.clone(), conn: Some(conn), done: Some(done) };
        if self.ops.send(op).is_ok()
            && self.is_up()
            && let Ok(Ok(outcome)) = tokio::time::timeout(JOIN_TIMEOUT, finished).await
        {
            return outcome;
        }
        LeaveOutcome::Failed
    }

    /// Sends `frame` from `from` to `to` on `node` (to every member there
    /// but `from` when `to` is `None`).
    pub fn forward(
        &self,
        node: &str,
        room: &str,
        to: Option<&PeerId>,
        from: &PeerId,
        frame: &Utf8Bytes,
    ) -> Result<(), Full> {
        if !self.is_up() {
            return Err(Full::Down);
        }
        let to = to.map_or("", |t| t.as_str());
        let payload = format!("f\t{room}\t{to}\t{from}\t{}\n{}", self.node, frame.as_str());
        self.publish(node, room, payload)
    }

    /// Tells `to` on `node` that what it sent was refused (`frame` is the error).
    pub fn refuse(&self, node: &str, room: &str, to: &PeerId, frame: &Utf8Bytes) {
        let payload = format!("e\t{room}\t{to}\n{}", frame.as_str());
        if self.publish(node, room, payload).is_err() {
            tracing::debug!(%to, "a refusal for another node was dropped: its queue is full");
        }
    }

    fn publish(&self, node: &str, room: &str, payload: String) -> Result<(), Full> {
        let n = payload.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > self.max_queued {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(Full::Backplane);
        }
        let op = Op::Publish { node: node.to_string(), room: room.to_string(), payload, at: Instant::now() };
        if self.ops.send(op).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(Full::Down);
        }
        Ok(())
    }
}

fn members_key(room: &str) -> String {
    format!("pl:{{{room}}}:m")
}

fn seq_key(room: &str) -> String {
    format!("pl:{{{room}}}:seq")
}

const LEASES: &str = "{pl}:nodes";

fn index_key(node: &str) -> String {
    format!("{{pl}}:members:{node}")
}

fn channel(node: &str) -> String {
    format!("pl:n:{node}")
}

fn join_cmd(
    room: &str,
    peer: &PeerId,
    node: &str,
    name: Option<&str>,
    max: usize,
    mode: &str,
    conn: u64,
) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(JOIN)
        .arg(2)
        .arg(members_key(room))
        .arg(seq_key(room))
        .arg(room)
        .arg(peer.as_str())
        .arg(node)
        .arg(if name.is_some() { "1" } else { "0" })
        .arg(name.unwrap_or(""))
        .arg(max)
        .arg(mode)
        .arg(conn.to_string());
    c
}

/// `conn`: only that connection's membership (`None`: any of `owner`'s).
fn leave_cmd(room: &str, peer: &str, owner: &str, conn: Option<u64>) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(LEAVE).arg(2).arg(members_key(room)).arg(seq_key(room)).arg(room).arg(peer).arg(owner);
    c.arg(conn.map(|c| c.to_string()).unwrap_or_default());
    c
}

fn entry(room: &str, peer: &str) -> String {
    format!("{room}\t{peer}")
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

async fn connect(target: &Target) -> redis::RedisResult<Conn> {
    match target {
        Target::Single(client) => {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(REDIS_TIMEOUT)
                .set_response_timeout(REDIS_TIMEOUT);
            Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&cfg).await?))
        }
        Target::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
    }
}

/// Sends what the hub asks for, renews the lease, sweeps dead nodes and
/// puts this node's members back when Redis lost them.
async fn commands(
    bp: Arc<Backplane>,
    hub: Arc<Hub>,
    target: Target,
    mut ops: mpsc::UnboundedReceiver<Op>,
    mut resync: mpsc::UnboundedReceiver<()>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    // Resync every room a lease after an interruption: by then every live
    // node has put its members back.
    let mut sync_at: Option<Instant> = None;
    let mut restore_again = false;
    // After `stop`: the connections are closing, and each one's leaves
    // must still reach Redis; then this node says goodbye.
    let mut draining: Option<Instant> = None;
    loop {
        if *stop.borrow() && draining.is_none() {
            draining = Some(Instant::now() + drain);
        }
        if draining.is_some_and(|d| Instant::now() > d) {
            return;
        }
        let mut conn = match connect(&target).await {
            Ok(c) => c,
            Err(e) => {
                bp.failed("connecting", &e);
                if draining.is_some() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        if !first {
            bp.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("redis backplane: connected again");
            sync_at = Some(Instant::now() + bp.lease);
        }
        first = false;
        let mut beat = tokio::time::interval(bp.lease / 3);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let broke: redis::RedisError = loop {
            tokio::select! {
                op = ops.recv() => {
                    let Some(op) = op else { return };
                    let mut batch = vec![op];
                    while batch.len() < BATCH {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = run_batch(&bp, &mut conn, batch).await {
                        if is_connection_error(&e) {
                            break e;
                        }
                        bp.failed("a batch failed", &e);
                    }
                }
                _ = beat.tick() => {
                    match heartbeat(&bp, &hub, &mut conn, &mut restore_again).await {
                        Ok(fresh) => {
                            bp.commands_up.store(true, Ordering::Relaxed);
                            if fresh {
                                sync_at = Some(Instant::now() + bp.lease);
                            }
                        }
                        Err(e) if is_connection_error(&e) => break e,
                        Err(e) => bp.failed("heartbeat", &e),
                    }
                }
                Some(()) = resync.recv() => {
                    sync_at = Some(Instant::now() + bp.lease);
                    // The stream broke and came back: this connection may
                    // be a dead one to a Redis that restarted.
                    match redis::cmd("PING").query_async::<String>(&mut conn).await {
                        Ok(_) => bp.commands_up.store(true, Ordering::Relaxed),
                        Err(e) if is_connection_error(&e) => break e,
                        Err(e) => bp.failed("ping", &e),
                    }
                }
                _ = tokio::time::sleep_until(sync_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if sync_at.is_some() => {
                    sync_at = None;
                    let mut batch = Batch::default();
                    for room in hub.local_rooms() {
                        let mut c = redis::cmd("EVAL");
                        c.arg(SYNC).arg(1).arg(members_key(&room)).arg(&room).arg(&bp.node);
                        batch.add(room_tag(&room), c);
                    }
                    if let Err(e) = batch.run(&mut conn).await {
                        if is_connection_error(&e) {
                            break e;
                        }
                        bp.failed("resync", &e);
                    }
                }
                _ = stop.changed(), if draining.is_none() => {
                    draining = Some(Instant::now() + drain);
                }
                _ = tokio::time::sleep(Duration::from_millis(20)), if draining.is_some() => {
                    let overdue = draining.is_some_and(|d| Instant::now() > d);
                    if hub.stats().connections == 0 && ops.is_empty() || overdue {
                        if let Err(e) = farewell(&bp, &mut conn).await {
                            bp.failed("leaving", &e);
                        }
                        return;
                    }
                }
            }
        };
        bp.commands_up.store(false, Ordering::Relaxed);
        bp.failed("connection lost", &broke);
    }
}

/// Takes what is left of this node out of Redis (its members, whose
/// connections are gone, and its lease).
async fn farewell(bp: &Backplane, conn: &mut Conn) -> redis::RedisResult<()> {
    let held: Vec<String> = redis::cmd("SMEMBERS").arg(index_key(&bp.node)).query_async(conn).await?;
    let mut batch = Batch::default();
    for e in &held {
        if let Some((room, peer)) = e.split_once('\t') {
            batch.add(room_tag(room), leave_cmd(room, peer, &bp.node, None));
        }
    }
    let mut del = redis::cmd("DEL");
    del.arg(index_key(&bp.node));
    batch.add(pl_tag(), del);
    let mut zrem = redis::cmd("ZREM");
    zrem.arg(LEASES).arg(&bp.node);
    batch.add(pl_tag(), zrem);
    batch.run(conn).await?;
    tracing::info!(members = held.len(), "redis backplane: this node left");
    Ok(())
}

/// Renews the lease; puts our members back if Redis had lost them (returns
/// whether it had); removes the members of nodes whose leases ran out.
async fn heartbeat(
    bp: &Backplane,
    hub: &Hub,
    conn: &mut Conn,
    restore_again: &mut bool,
) -> redis::RedisResult<bool> {
    let reply: Vec<String> = redis::cmd("EVAL")
        .arg(HEARTBEAT)
        .arg(1)
        .arg(LEASES)
        .arg(&bp.node)
        .arg(bp.lease.as_millis() as u64)
        .query_async(conn)
        .await?;
    let fresh = reply.first().is_some_and(|f| f == "1");
    if fresh || *restore_again {
        // A sweep that read our lease as expired may still remove what we
        // put back now: put it back once more on the next beat.
        *restore_again = fresh;
        let members = hub.local_members();
        if !members.is_empty() {
            if fresh {
                tracing::info!(members = members.len(), "redis backplane: putting this node's members back");
            }
            let mut batch = Batch::default();
            for (room, peer, name, conn) in &members {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(index_key(&bp.node)).arg(entry(room, peer.as_str()));
                batch.add(pl_tag(), sadd);
                batch.add(
                    room_tag(room),
                    join_cmd(room, peer, &bp.node, name.as_deref(), usize::MAX, "restore", *conn),
                );
            }
            batch.run(conn).await?;
        }
    }
    for dead in reply.iter().skip(1).filter(|d| **d != bp.node) {
        let held: Vec<String> = redis::cmd("SMEMBERS").arg(index_key(dead)).query_async(conn).await?;
        let mut batch = Batch::default();
        for e in &held {
            if let Some((room, peer)) = e.split_once('\t') {
                batch.add(room_tag(room), leave_cmd(room, peer, dead, None));
            }
        }
        let removed = batch.run(conn).await?;
        let n = removed.iter().filter(|r| redis::from_redis_value::<i64>(r).ok() == Some(1)).count();
        let _: i64 = redis::cmd("EVAL")
            .arg(FORGET)
            .arg(2)
            .arg(LEASES)
            .arg(index_key(dead))
            .arg(dead.as_str())
            .query_async(conn)
            .await?;
        bp.counters.members_swept.fetch_add(n as u64, Ordering::Relaxed);
        tracing::info!(node = %dead, members = n, "redis backplane: a node's lease ran out; its members were removed");
    }
    Ok(fresh)
}

/// Sends one batch in one round trip.
async fn run_batch(bp: &Backplane, conn: &mut Conn, batch: Vec<Op>) -> redis::RedisResult<()> {
    let cluster = matches!(conn, Conn::Cluster(_));
    let mut pipe = Batch::default();
    let mut joins: Vec<(usize, oneshot::Sender<JoinOutcome>)> = Vec::new();
    // A leave that fails is told by its sender being dropped.
    let mut leaves: Vec<(usize, oneshot::Sender<LeaveOutcome>, String, PeerId)> = Vec::new();
    let mut bytes = 0;
    let mut oldest: Option<Instant> = None;
    let mut published = 0u64;
    let mut i = 0;
    for op in batch {
        match op {
            Op::Join { room, peer, name, max, mode, conn, reply } => {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(index_key(&bp.node)).arg(entry(&room, peer.as_str()));
                pipe.add(pl_tag(), sadd);
                let mode = match mode {
                    JoinMode::ResumeOnly => "resume-only",
                    JoinMode::Resume => "resume",
                    JoinMode::Join => "join",
                };
                pipe.add(room_tag(&room), join_cmd(&room, &peer, &bp.node, name.as_deref(), max, mode, conn));
                joins.push((i + 1, reply));
                i += 2;
            }
            Op::Leave { room, peer, conn, done } => {
                leaves.extend(done.map(|d| (i, d, room.clone(), peer.clone())));
                pipe.add(room_tag(&room), leave_cmd(&room, peer.as_str(), &bp.node, conn));
                let mut srem = redis::cmd("SREM");
                srem.arg(index_key(&bp.node)).arg(entry(&room, peer.as_str()));
                pipe.add(pl_tag(), srem);
                i += 2;
            }
            Op::Publish { node, room, payload, at } => {
                bytes += payload.len();
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
                if cluster {
                    // From the room's slot, where its membership events
                    // are published: one order for both (module docs).
                    let mut c = redis::cmd("EVAL");
                    c.arg(PUBLISH_FROM_ROOM).arg(1).arg(members_key(&room)).arg(channel(&node)).arg(payload);
                    pipe.add(room_tag(&room), c);
                } else {
                    let mut c = redis::cmd("PUBLISH");
                    c.arg(channel(&node)).arg(payload);
                    pipe.add(None, c);
                }
                published += 1;
                i += 1;
            }
        }
    }
    let result = pipe.run(conn).await;
    bp.queued.fetch_sub(bytes, Ordering::Relaxed);
    if let Some(at) = oldest {
        bp.counters.lag_us.store(at.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    let replies = match result {
        Ok(r) => r,
        Err(e) => {
            for (_, reply) in joins {
                let _ = reply.send(JoinOutcome::Failed);
            }
            return Err(e);
        }
    };
    bp.counters.published.fetch_add(published, Ordering::Relaxed);
    for (at, reply) in joins {
        let said =
            replies.get(at).and_then(|v| redis::from_redis_value::<String>(v).ok()).unwrap_or_default();
        let outcome = match said.as_str() {
            "ok" => JoinOutcome::Joined,
            "already" => JoinOutcome::Already,
            "gone" => JoinOutcome::Gone,
            s => match s.strip_prefix("full:").and_then(|n| n.parse().ok()) {
                Some(n) => JoinOutcome::Full(n),
                None => JoinOutcome::Failed,
            },
        };
        let _ = reply.send(outcome);
    }
    // A member that moved to another connection of this node stays in its
    // index (the leave's SREM took it out).
    let mut index_back = Batch::default();
    for (at, done, room, peer) in leaves {
        let outcome = match replies.get(at) {
            Some(v) => match redis::from_redis_value::<i64>(v) {
                Ok(1) => LeaveOutcome::Removed,
                Ok(_) => LeaveOutcome::Absent,
                Err(_) => match redis::from_redis_value::<String>(v)
                    .ok()
                    .and_then(|s| s.strip_prefix("moved:").map(str::to_string))
                {
                    Some(node) => LeaveOutcome::Moved(node),
                    None => LeaveOutcome::Failed,
                },
            },
            None => LeaveOutcome::Failed,
        };
        if outcome == LeaveOutcome::Moved(bp.node.clone()) {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(index_key(&bp.node)).arg(entry(&room, peer.as_str()));
            index_back.add(pl_tag(), sadd);
        }
        let _ = done.send(outcome);
    }
    index_back.run(conn).await?;
    Ok(())
}

/// Reads this node's channel into the hub; after a break, asks for a resync.
async fn stream(
    bp: Arc<Backplane>,
    hub: Arc<Hub>,
    clients: Vec<redis::Client>,
    resync: mpsc::UnboundedSender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    let name = channel(&bp.node);
    let mut attempt = 0usize;
    loop {
        if stop.has_changed().is_err() {
            return;
        }
        let client = &clients[attempt % clients.len()];
        attempt += 1;
        let subscribed = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&name).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        let ps = match subscribed {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                bp.failed("subscribing", &e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_) => {
                bp.failed("subscribing", &"timed out");
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        // Next time, this seed first again.
        attempt -= 1;
        if !first {
            // Whatever was published to us meanwhile is lost.
            let _ = resync.send(());
        }
        first = false;
        bp.stream_up.store(true, Ordering::Relaxed);
        let mut messages = ps.into_on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    bp.counters.received.fetch_add(1, Ordering::Relaxed);
                    match Event::parse(msg.get_payload_bytes()) {
                        Some(ev) => hub.apply(&bp.node, ev),
                        None => bp.failed("stream", &"a message this version cannot read"),
                    }
                }
                _ = stop.changed() => return,
            }
        }
        bp.stream_up.store(false, Ordering::Relaxed);
        // Redis went away, most likely: the commands connection is broken
        // too, though it may not know before it next sends. Until it has
        // checked (on the resync below, once the stream is back), joins
        // are refused rather than lost on a dead connection.
        bp.commands_up.store(false, Ordering::Relaxed);
        bp.failed("subscription", &"the connection closed");
    }
}
