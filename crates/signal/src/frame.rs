//! What the server checks of a client's text frame before acting on it,
//! after the rate limit and the size limit: JSON, an object, no `from`, a
//! known and well-formed message (docs/PROTOCOL.md, "Limits").

use peerlink_proto::{ClientMsg, ErrorCode};

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
