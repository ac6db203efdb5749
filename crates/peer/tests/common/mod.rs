//! Test harness: a real signaling server on 127.0.0.1:0 and real peers that
//! gather on 127.0.0.1 only.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use peerlink_peer::{
    ChannelSpec, ConnState, DataChannel, Event, IceConfig, Message, PeerId, Room, RoomConfig,
};
use tokio::sync::{mpsc, oneshot};

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(peerlink_signal::Config::default()).await
    }

    pub async fn start_with(config: peerlink_signal::Config) -> Server {
        Self::start_at("127.0.0.1:0".parse().unwrap(), config).await
    }

    /// A server on `addr` (a restarted server on its predecessor's port).
    pub async fn start_at(addr: SocketAddr, config: peerlink_signal::Config) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(peerlink_signal::serve(listener, config, async move {
            let _ = rx.await;
        }));
        Server { addr, stop: Some(tx), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn config(&self, room: &str) -> RoomConfig {
        let mut c = RoomConfig::new(self.url(), room);
        c.ice = IceConfig::loopback();
        c
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("server stops").unwrap().unwrap();
    }
}

/// A room plus everything it has reported so far.
pub struct Peer {
    pub room: Room,
    pub joined: HashSet<PeerId>,
    pub left: HashSet<PeerId>,
    pub states: HashMap<PeerId, ConnState>,
    pub channels: HashMap<(PeerId, String), DataChannel>,
    pub closed_channels: Vec<(PeerId, String)>,
    pub messages: Vec<(PeerId, String, Message)>,
    pub server_messages: Vec<(PeerId, serde_json::Value)>,
    pub closed: Option<String>,
    pub auth_failures: Vec<(PeerId, String)>,
    pub refused_server_messages: Vec<(PeerId, String)>,
    pub server_errors: Vec<peerlink_proto::ErrorCode>,
    /// Messages read off every open channel by a task per channel.
    inbox: mpsc::Receiver<(PeerId, String, Message)>,
    inbox_tx: mpsc::Sender<(PeerId, String, Message)>,
}

pub const WAIT: Duration = Duration::from_secs(20);

impl Peer {
    pub async fn join(config: RoomConfig) -> Peer {
        let room = Room::join(config).await.expect("join");
        let (inbox_tx, inbox) = mpsc::channel(1024);
        Peer {
            inbox,
            inbox_tx,
            room,
            joined: HashSet::new(),
            left: HashSet::new(),
            states: HashMap::new(),
            channels: HashMap::new(),
            closed_channels: Vec::new(),
            messages: Vec::new(),
            server_messages: Vec::new(),
            closed: None,
            auth_failures: Vec::new(),
            refused_server_messages: Vec::new(),
            server_errors: Vec::new(),
        }
    }

    pub fn id(&self) -> PeerId {
        self.room.id().clone()
    }

    fn record(&mut self, ev: Event) {
        match ev {
            Event::PeerJoined { peer, .. } => {
                self.joined.insert(peer);
            }
            Event::PeerLeft { peer } => {
                self.left.insert(peer);
            }
            Event::StateChanged { peer, state } => {
                self.states.insert(peer, state);
            }
            Event::ChannelOpen { channel } => {
                let key = (channel.peer().clone(), channel.label().to_string());
                let tx = self.inbox_tx.clone();
                let reader = channel.clone();
                tokio::spawn(async move {
                    while let Some(m) = reader.recv().await {
                        if tx.send((key.0.clone(), key.1.clone(), m)).await.is_err() {
                            break;
                        }
                    }
                });
                self.channels.insert((channel.peer().clone(), channel.label().to_string()), channel);
            }
            Event::ChannelClosed { peer, label } => {
                self.channels.remove(&(peer.clone(), label.clone()));
                self.closed_channels.push((peer, label));
            }
            Event::ServerMessage { from, data } => self.server_messages.push((from, data)),
            Event::Closed { reason } => self.closed = Some(reason),
            Event::AuthFailed { peer, reason } => self.auth_failures.push((peer, reason)),
            Event::ServerMessageRefused { from, reason } => self.refused_server_messages.push((from, reason)),
            Event::ServerError { code, .. } => self.server_errors.push(code),
            _ => {}
        }
    }

    /// The next room event or channel message; `None` when the room ended.
    async fn next(&mut self) -> Option<()> {
        tokio::select! {
            ev = self.room.next_event() => {
                self.record(ev?);
            }
            Some(m) = self.inbox.recv() => self.messages.push(m),
        }
        Some(())
    }

    /// Handles events and messages until `cond` holds; panics after `WAIT`.
    pub async fn until(&mut self, what: &str, cond: impl Fn(&Peer) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(self) {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Some(())) => {}
                Ok(None) => panic!("{}: room closed while waiting for {what}", self.id()),
                Err(_) => panic!("{}: timed out waiting for {what}", self.id()),
            }
        }
    }

    /// Handles whatever events and messages arrive within `d`.
    pub async fn pump_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(())) = tokio::time::timeout_at(deadline, self.next()).await {}
    }

    pub fn channel(&self, peer: &PeerId, label: &str) -> DataChannel {
        self.channels.get(&(peer.clone(), label.to_string())).cloned().expect("channel open")
    }

    pub fn has_channel(&self, peer: &PeerId, label: &str) -> bool {
        self.channels.contains_key(&(peer.clone(), label.to_string()))
    }

    pub fn texts_from(&self, peer: &PeerId, label: &str) -> Vec<String> {
        self.messages
            .iter()
            .filter(|(p, l, _)| p == peer && l == label)
            .filter_map(|(_, _, m)| match m {
                Message::Text(s) => Some(s.clone()),
                Message::Binary(_) => None,
            })
            .collect()
    }
}

pub fn specs() -> Vec<ChannelSpec> {
    vec![ChannelSpec::reliable("reliable"), ChannelSpec::unreliable("unreliable")]
}
