//! The signaling client: greets the server, joins a room, then carries
//! `ClientMsg` out and `ServerMsg` in.

use std::time::Duration;

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use peerlink_proto::{ClientMsg, IceServer, Limits, PROTOCOL_VERSION, PeerId, PeerInfo, ServerMsg};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::Error;

pub(crate) type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Outgoing signaling messages queued before the writer task stalls us.
const OUTBOX: usize = 512;

/// A joined room's signaling link.
pub(crate) struct Signaling {
    /// The URL connected to.
    pub url: String,
    pub id: PeerId,
    /// The token that resumes `id` after a reconnect (`welcome.resume`).
    pub resume: Option<String>,
    /// `joined.resumed`: the join took back a place the id still held.
    pub resumed: bool,
    pub peers: Vec<PeerInfo>,
    /// `joined.size`: a large room, of which `peers` is a sample.
    pub size: Option<u32>,
    pub ice_servers: Vec<IceServer>,
    /// The server's limits; not acted on yet.
    #[allow(dead_code)]
    pub limits: Limits,
    pub incoming: SplitStream<WsStream>,
    pub outgoing: mpsc::Sender<ClientMsg>,
    /// The task writing `outgoing` to the socket; it ends once every queued
    /// message is written and the socket closed (or writing failed).
    pub writer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling").field("id", &self.id).finish()
    }
}

async fn recv(ws: &mut WsStream, timeout: Duration) -> Result<ServerMsg, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame =
            tokio::time::timeout_at(deadline, ws.next()).await.map_err(|_| Error::Timeout(timeout))?;
        match frame {
            None => return Err(Error::SignalingLost("server closed the connection".into())),
            Some(Err(e)) => return Err(Error::SignalingLost(e.to_string())),
            Some(Ok(WsMessage::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| Error::SignalingLost(format!("unreadable message from server: {e}")));
            }
            Some(Ok(WsMessage::Close(_))) => {
                return Err(Error::SignalingLost("server closed the connection".into()));
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn send(ws: &mut WsStream, msg: &ClientMsg) -> Result<(), Error> {
    let text = serde_json::to_string(msg).expect("client messages always serialize");
    ws.send(WsMessage::Text(text.into())).await.map_err(|e| Error::SignalingLost(e.to_string()))
}

/// Parses a server answer; an `error` becomes [`Error::Server`].
fn refused(msg: ServerMsg) -> Error {
    match msg {
        ServerMsg::Error { code, message } => Error::Server { code, message },
        other => Error::SignalingLost(format!("unexpected message from server: {other:?}")),
    }
}

/// The signaling WebSocket URL for what a person typed: `ws://` and `wss://`
/// URLs as given (with `/ws` added when they have no path), `http://` and
/// `https://` as the matching WebSocket URL, and a bare `host[:port]` as
/// `ws://host[:port]/ws`.
pub fn signaling_url(input: &str) -> String {
    let input = input.trim();
    let (scheme, rest) = match input.split_once("://") {
        Some(("http", rest)) => ("ws", rest),
        Some(("https", rest)) => ("wss", rest),
        Some((scheme, rest)) => (scheme, rest),
        None => ("ws", input),
    };
    let rest = match rest.find('/') {
        Some(i) if &rest[i..] != "/" => rest.to_string(),
        Some(i) => format!("{}/ws", &rest[..i]),
        None => format!("{rest}/ws"),
    };
    format!("{scheme}://{rest}")
}

/// Where and how to (re)join a room.
#[derive(Debug, Clone)]
pub(crate) struct JoinSpec {
    /// The server first, then other nodes of the same deployment.
    pub urls: Vec<String>,
    pub room: String,
    pub name: Option<String>,
    pub token: Option<String>,
    pub timeout: Duration,
}

/// Connects, says hello, joins `room`.
pub(crate) async fn join(
    url: &str,
    room: &str,
    name: Option<String>,
    token: Option<String>,
    timeout: Duration,
) -> Result<Signaling, Error> {
    join_with(url, room, name, token, timeout, None).await
}

/// Reconnects after the server went away: each URL of `spec` in turn, with
/// backoff, until one takes us back as `id` (`resume`) or `window` runs
/// out. A server that gives another id cannot resume us: that ends it.
pub(crate) async fn rejoin(
    spec: &JoinSpec,
    id: &PeerId,
    resume: &str,
    window: Duration,
) -> Result<Signaling, Error> {
    let deadline = tokio::time::Instant::now() + window;
    let mut backoff = Duration::from_millis(100);
    let mut last = Error::SignalingLost("no server to reconnect to".into());
    for attempt in 0.. {
        let url = &spec.urls[attempt % spec.urls.len()];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let tried = join_with(
            url,
            &spec.room,
            spec.name.clone(),
            spec.token.clone(),
            spec.timeout.min(left),
            Some(resume.to_string()),
        )
        .await;
        match tried {
            Ok(sig) if sig.id == *id => return Ok(sig),
            Ok(sig) => {
                return Err(Error::SignalingLost(format!(
                    "{url} did not resume peer id {id} (it gave {}): resume tokens are signed per deployment",
                    sig.id
                )));
            }
            Err(e) => {
                tracing::debug!(%url, "reconnect: {e}");
                last = e;
            }
        }
        // Every URL once without waiting, then back off.
        if (attempt + 1) % spec.urls.len() == 0 {
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())))
                .await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    Err(last)
}

/// The signaling WebSocket's settings. tungstenite zero-fills its read
/// buffer up to `read_buffer_size` before every read, including the reads
/// that find nothing: the room driver polls this socket on every pass of
/// its loop, so with the default 128 KiB a bulk transfer spent 6.5 % of
/// its CPU in that `memset`. Signaling messages are small; a larger one is
/// read in several pieces. Public for other clients of a signaling server
/// (the load generator of `peerlink bench`).
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

async fn join_with(
    url: &str,
    room: &str,
    name: Option<String>,
    token: Option<String>,
    timeout: Duration,
    resume: Option<String>,
) -> Result<Signaling, Error> {
    let url = &signaling_url(url);
    // Signaling is latency-bound request/response: no Nagle.
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    let (mut ws, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| Error::Timeout(timeout))?
        .map_err(|e| Error::Connect { url: url.to_string(), reason: e.to_string() })?;

    let client = Some(format!("peerlink-peer/{}", env!("CARGO_PKG_VERSION")));
    send(&mut ws, &ClientMsg::Hello { version: PROTOCOL_VERSION, client, resume }).await?;
    let (id, ice_servers, limits, resume) = match recv(&mut ws, timeout).await? {
        ServerMsg::Welcome { version, peer_id, ice_servers, limits, resume } => {
            if version != PROTOCOL_VERSION {
                return Err(Error::Version(version));
            }
            (peer_id, ice_servers, limits, resume)
        }
        other => return Err(refused(other)),
    };

    send(&mut ws, &ClientMsg::Join { room: room.to_string(), name, token }).await?;
    let (peers, resumed, size) = match recv(&mut ws, timeout).await? {
        ServerMsg::Joined { peers, resumed, size, .. } => (peers, resumed, size),
        other => return Err(refused(other)),
    };

    let (mut sink, incoming) = ws.split();
    let (outgoing, mut rx) = mpsc::channel::<ClientMsg>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let text = serde_json::to_string(&msg).expect("client messages always serialize");
            if let Err(e) = sink.send(WsMessage::Text(text.into())).await {
                tracing::debug!("signaling write failed: {e}");
                return;
            }
        }
        let _ = sink.close().await;
    });
    Ok(Signaling {
        url: url.to_string(),
        id,
        resume,
        resumed,
        peers,
        size,
        ice_servers,
        limits,
        incoming,
        outgoing,
        writer,
    })
}

#[cfg(test)]
mod tests {
    use super::signaling_url;

    #[test]
    fn server_addresses_as_people_type_them() {
        for (typed, url) in [
            ("ws://127.0.0.1:8080/ws", "ws://127.0.0.1:8080/ws"),
            ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
            ("ws://127.0.0.1:8080/", "ws://127.0.0.1:8080/ws"),
            ("wss://peer.example/signal/ws", "wss://peer.example/signal/ws"),
            ("http://192.0.2.7:8080", "ws://192.0.2.7:8080/ws"),
            ("https://peer.example/", "wss://peer.example/ws"),
            ("192.0.2.7:8080", "ws://192.0.2.7:8080/ws"),
            ("peer.example", "ws://peer.example/ws"),
            ("[::1]:8080", "ws://[::1]:8080/ws"),
        ] {
            assert_eq!(signaling_url(typed), url, "{typed}");
        }
    }
}
