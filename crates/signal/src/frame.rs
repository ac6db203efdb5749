//! What the server checks of a client's text frame before acting on it,
//! after the rate limit and the size limit: JSON, an object, no `from`, a
//! known and well-formed message (docs/PROTOCOL.md, "Limits").

use std::borrow::Cow;

use peerlink_proto::{ClientMsg, ErrorCode, PeerId};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// A client frame, parsed once.
pub(crate) enum Frame<'a> {
    /// A well-formed `send`, borrowed from the frame: its `data` is relayed
    /// as the exact JSON text the client sent, without being rebuilt.
    Send { room: Cow<'a, str>, to: Option<PeerId>, data: &'a RawValue },
    /// Anything else, with its `type` string.
    Other(ClientMsg, String),
}

/// Whether a field was there, whatever its value.
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Present(true))
    }
}

/// The relay's hot path: `send` is most of what a busy server sees. One
/// borrowing parse recognises a well-formed one; anything else (including
/// every malformed or refused frame) goes through [`parse_client_frame`],
/// so the answers to bad input are the same.
pub(crate) fn parse_frame(text: &str) -> Result<Frame<'_>, (ErrorCode, String)> {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(rename = "type", borrow)]
        ty: Cow<'a, str>,
        #[serde(borrow)]
        room: Cow<'a, str>,
        #[serde(default)]
        to: Option<PeerId>,
        #[serde(borrow)]
        data: &'a RawValue,
        /// Present at all (even `null`): refused as spoofing, below.
        #[serde(default)]
        from: Present,
    }
    if let Ok(p) = serde_json::from_str::<Probe<'_>>(text)
        && p.ty == "send"
        && !p.from.0
    {
        return Ok(Frame::Send { room: p.room, to: p.to, data: p.data });
    }
    let (msg, ty) = parse_client_frame(text)?;
    Ok(Frame::Other(msg, ty))
}

/// The `message` a `send` becomes: what encoding `ServerMsg::Message`
/// writes, with `data` as the sender wrote it.
pub(crate) fn message_frame(room: &str, from: &PeerId, data: &RawValue) -> String {
    let room = serde_json::to_string(room).expect("strings serialize");
    let from = serde_json::to_string(from).expect("ids serialize");
    let data = data.get();
    let mut out = String::with_capacity(48 + room.len() + from.len() + data.len());
    out.push_str(r#"{"type":"message","room":"#);
    out.push_str(&room);
    out.push_str(r#","from":"#);
    out.push_str(&from);
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

/// Parses one text frame from a client into a message and its `type`
/// string, or the error code and text the client is told.
pub fn parse_client_frame(text: &str) -> Result<(ClientMsg, String), (ErrorCode, String)> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| (ErrorCode::BadJson, format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err((ErrorCode::BadJson, "a message is a JSON object".into()));
    };
    if obj.contains_key("from") {
        return Err((
            ErrorCode::SpoofedSender,
            "messages may not carry `from`: the server stamps the sender".into(),
        ));
    }
    let ty = obj.get("type").and_then(|t| t.as_str()).map(str::to_owned);
    let msg: ClientMsg = serde_json::from_value(value).map_err(|e| match &ty {
        None => (ErrorCode::BadMessage, "missing string field `type`".to_string()),
        Some(ty) => (ErrorCode::BadMessage, format!("bad `{ty}` message: {e}")),
    })?;
    Ok((msg, ty.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerlink_proto::ServerMsg;

    /// The fast path answers exactly as the full parse: the same `message`
    /// bytes for compact data, and the same refusals.
    #[test]
    fn the_send_fast_path_matches_the_full_parse() {
        let from = PeerId::from_server("p-1");
        for text in [
            r#"{"type":"send","room":"lobby","to":"p-2","data":{"a":1,"b":[true,null,"x\"y"]}}"#,
            r#"{"type":"send","room":"lobby","data":"hi"}"#,
            r#"{"type":"send","room":"lo\u0062by","to":null,"data":null,"extra":1}"#,
            r#"{"data":5,"room":"r","type":"send"}"#,
        ] {
            let Ok(Frame::Send { room, to, data }) = parse_frame(text) else {
                panic!("fast path for {text}")
            };
            let Ok((ClientMsg::Send { room: r2, to: t2, data: d2 }, _)) = parse_client_frame(text) else {
                panic!("full parse of {text}")
            };
            assert_eq!((room.as_ref(), &to), (r2.as_str(), &t2), "{text}");
            let slow = serde_json::to_string(&ServerMsg::Message { room: r2, from: from.clone(), data: d2 })
                .unwrap();
            assert_eq!(message_frame(&room, &from, data), slow, "{text}");
        }
        for text in [
            r#"{"type":"send","room":"lobby","data":1,"from":"p-9"}"#,
            r#"{"type":"send","room":"lobby","data":1,"from":null}"#,
            r#"{"type":"send","room":"lobby"}"#,
            r#"{"type":"send","room":5,"data":1}"#,
            r#"{"type":"send","room":"lobby","to":7,"data":1}"#,
            r#"{"type":"send","room":"lobby","data":1"#,
            r#"[1]"#,
        ] {
            let fast = parse_frame(text).err();
            let full = parse_client_frame(text).err();
            assert!(fast.is_some(), "{text} is refused");
            assert_eq!(fast, full, "{text}");
        }
        // Anything but `send` takes the full path.
        assert!(matches!(
            parse_frame(r#"{"type":"ping","nonce":1}"#),
            Ok(Frame::Other(ClientMsg::Ping { .. }, _))
        ));
    }
}
