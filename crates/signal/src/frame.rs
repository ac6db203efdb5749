//! What the server checks of a client's text frame before acting on it,
//! after the rate limit and the size limit: JSON, an object, no `from`, a
//! known and well-formed message (docs/PROTOCOL.md, "Limits").

use std::borrow::Cow;

use peerlink_proto::{ClientMsg, ErrorCode, Signal};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

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

/// A `signal` or `send` read in one borrowed pass, for relaying: the
/// addressee and the frame to deliver, the payload spliced in as the client
/// wrote it, with `from` stamped (no tree of values, no re-serialising).
#[derive(Debug, PartialEq)]
pub struct Relay<'a> {
    /// The room it is sent in.
    pub room: Cow<'a, str>,
    /// The one member it is for (`send` to the room: none).
    pub to: Option<Cow<'a, str>>,
    /// Whether it is a `signal` (else a `send`).
    pub signal: bool,
    /// The server frame to deliver.
    pub frame: String,
}

#[derive(Deserialize)]
struct RelayFields<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    signal: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    from: Option<IgnoredAny>,
}

/// A JSON value read through without keeping it: it parses exactly when a
/// `serde_json::Value` would (the raw value a parser skips over is checked
/// less: numbers out of range, for one).
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Checked, E> {
        if v.is_finite() { Ok(Checked) } else { Err(E::custom("number out of range")) }
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// The fast path for the two messages the server relays: `Some` when
/// `text` is a well-formed `signal` or `send` (exactly what
/// [`parse_client_frame`] accepts as one, with a `signal` of a known
/// kind), `None` for anything else, which takes the full path (and gets
/// its error there).
pub fn relay_frame<'a>(text: &'a str, from: &str) -> Option<Relay<'a>> {
    let f: RelayFields<'a> = serde_json::from_str(text).ok()?;
    if f.from.is_some() {
        return None;
    }
    let (signal, payload) = match (&*f.ty, f.signal, f.data) {
        ("signal", Some(s), _) => {
            // A known kind, well-formed (an unknown one is relayed as
            // `unknown`, by the full path).
            match serde_json::from_str::<Signal>(s.get()) {
                Ok(Signal::Unknown) | Err(_) => return None,
                Ok(_) => {}
            }
            f.to.as_ref()?;
            (true, s)
        }
        // Exactly the JSON a `serde_json::Value` takes (numbers in range,
        // strings well escaped), checked without building one.
        ("send", _, Some(d)) if serde_json::from_str::<Checked>(d.get()).is_ok() => (false, d),
        _ => return None,
    };
    let raw = payload.get();
    let mut frame = String::with_capacity(raw.len() + f.room.len() + from.len() + 52);
    frame.push_str(if signal { r#"{"type":"signal","room":"# } else { r#"{"type":"message","room":"# });
    // A room read without escapes is written back as it came.
    match &f.room {
        Cow::Borrowed(room) => push_quoted(&mut frame, room),
        Cow::Owned(room) => frame.push_str(&serde_json::to_string(room).ok()?),
    }
    frame.push_str(r#","from":"#);
    push_quoted(&mut frame, from);
    frame.push_str(if signal { r#","signal":"# } else { r#","data":"# });
    frame.push_str(raw);
    frame.push('}');
    Some(Relay { room: f.room, to: f.to, signal, frame })
}

/// Appends `s` as a JSON string: between quotes as it is when nothing in it
/// needs an escape (a server-minted id; a string serde_json borrowed from
/// the client's JSON, which had none), else as serde_json writes it.
fn push_quoted(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serializes"));
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_client_frame, relay_frame};
    use peerlink_proto::{ClientMsg, PeerId, ServerMsg};

    /// What the full path delivers for a relayed message.
    fn full(text: &str, from: &str) -> ServerMsg {
        let from = PeerId::from_server(from);
        match parse_client_frame(text).expect("valid").0 {
            ClientMsg::Signal { room, signal, .. } => ServerMsg::Signal { room, from, signal },
            ClientMsg::Send { room, data, .. } => ServerMsg::Message { room, from, data },
            other => panic!("not relayed: {other:?}"),
        }
    }

    #[test]
    fn the_fast_path_delivers_what_the_full_path_does_for_every_fixture() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/protocol/client");
        let mut relayed = 0;
        for entry in std::fs::read_dir(dir).expect("fixtures") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("fixture");
            let text = text.trim();
            let ty = serde_json::from_str::<serde_json::Value>(text).expect("JSON")["type"].clone();
            match relay_frame(text, "p-1234") {
                Some(r) => {
                    relayed += 1;
                    let delivered: ServerMsg = serde_json::from_str(&r.frame).expect("a server message");
                    assert_eq!(delivered, full(text, "p-1234"), "{text}");
                    let to = match parse_client_frame(text).expect("valid").0 {
                        ClientMsg::Signal { to, .. } => Some(to),
                        ClientMsg::Send { to, .. } => to,
                        _ => unreachable!(),
                    };
                    assert_eq!(r.to.as_deref(), to.as_ref().map(|p| p.as_str()));
                }
                None => assert!(ty != "signal" && ty != "send", "{text} took the full path"),
            }
        }
        assert_eq!(relayed, 7, "every signal and send fixture");
    }

    #[test]
    fn anything_unusual_takes_the_full_path() {
        for text in [
            r#"{"type":"send","room":"r","data":1,"from":"p-evil"}"#,
            r#"{"type":"signal","room":"r","to":"p-2","signal":{"kind":"teleport"}}"#,
            r#"{"type":"signal","room":"r","to":"p-2","signal":{"kind":"offer"}}"#,
            r#"{"type":"signal","room":"r","signal":{"kind":"end_of_candidates"}}"#,
            r#"{"type":"send","room":"r"}"#,
            r#"{"type":"send","room":"r","room":"s","data":1}"#,
            r#"{"type":"send","room":"r","data":1"#,
            r#"{"type":"ping"}"#,
        ] {
            assert!(relay_frame(text, "p-1").is_none(), "{text}");
        }
        // Escapes in names are written back escaped.
        let r = relay_frame(r#"{"type":"send","room":"a\"b","data":{"x":[1,2]}}"#, "p-1").expect("relayed");
        assert_eq!(r.frame, r#"{"type":"message","room":"a\"b","from":"p-1","data":{"x":[1,2]}}"#);
        // A room escaped where it need not be is written plainly; one
        // without escapes as it came, non-ASCII and all; an id that needs
        // escaping is escaped.
        let r = relay_frame(r#"{"type":"send","room":"caf\u00e9","data":1}"#, "p-1").expect("relayed");
        assert_eq!(r.frame, r#"{"type":"message","room":"café","from":"p-1","data":1}"#);
        let r = relay_frame(r#"{"type":"send","room":"café ☕","data":1}"#, "p-\"1").expect("relayed");
        assert_eq!(r.frame, r#"{"type":"message","room":"café ☕","from":"p-\"1","data":1}"#);
        let delivered: ServerMsg = serde_json::from_str(&r.frame).expect("a server message");
        assert_eq!(
            delivered,
            ServerMsg::Message {
                room: "café ☕".into(), from: PeerId::from_server("p-\"1"), data: 1.into()
            }
        );
    }
}
