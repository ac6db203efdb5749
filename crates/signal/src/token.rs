//! Join tokens: how a deployment that is not open to everyone lets only
//! the people its own backend vouches for into rooms.
//!
//! The backend and `peerlink serve` share a secret (`--join-secret`). The
//! backend signs short-lived claims (room, optionally the display name,
//! expiry) and hands the token to its user's client, which sends it in
//! `join`. Same family as the TURN REST credentials: an HMAC over what is
//! granted, checked without any state on the server.
//!
//! A token is `PAYLOAD.MAC`: `PAYLOAD` is the claims as JSON
//! (`{"room":"lobby","name":"ada","exp":1767225600}`; `room` may be `*` for
//! any room, `name` may be left out for any name), base64url without
//! padding; `MAC` is HMAC-SHA256(secret, PAYLOAD), base64url without
//! padding. The MAC covers the encoded payload as sent, so a backend may
//! write the JSON however its language does. `fixtures/protocol/token.json`
//! has a vector.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted; real ones are about 150 bytes.
const MAX_TOKEN_LEN: usize = 1024;

/// What a join token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinClaims {
    /// The room, or `*` for any room.
    pub room: String,
    /// The display name the join must carry; `None` for any.
    pub name: Option<String>,
    /// Expiry, Unix seconds: the token is refused from then on.
    pub exp: u64,
}

/// Signs `claims` with `secret`: what an application backend does.
pub fn join_token(secret: &[u8], claims: &JoinClaims) -> String {
    // Keys in the documented order (room, name, exp); verifying does not
    // depend on it.
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let name = claims.name.as_deref().map(|n| format!(",\"name\":{}", quote(n))).unwrap_or_default();
    let json = format!("{{\"room\":{}{name},\"exp\":{}}}", quote(&claims.room), claims.exp);
    let payload = B64.encode(json);
    let mac = B64.encode(mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{mac}")
}

fn mac(secret: &[u8], payload: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(payload.as_bytes());
    m
}

/// Checks that `token` is signed with `secret`, not expired at `now`
/// (Unix seconds), and grants joining `room` as `name`; otherwise says why.
pub fn verify_join_token(
    secret: &[u8],
    token: &str,
    room: &str,
    name: Option<&str>,
    now: u64,
) -> Result<JoinClaims, String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("the token is longer than {MAX_TOKEN_LEN} bytes"));
    }
    let (payload, sig) = token.split_once('.').ok_or("the token is not PAYLOAD.MAC")?;
    let sig = B64.decode(sig).map_err(|_| "the token's MAC is not base64url")?;
    mac(secret, payload)
        .verify_slice(&sig)
        .map_err(|_| "the token is not signed with this server's secret")?;
    let json = B64.decode(payload).map_err(|_| "the token's payload is not base64url")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| "the token's payload is not JSON")?;
    let claims = JoinClaims {
        room: claims["room"].as_str().ok_or("the token names no room")?.to_string(),
        name: match &claims["name"] {
            serde_json::Value::Null => None,
            v => Some(v.as_str().ok_or("the token's name is not a string")?.to_string()),
        },
        exp: claims["exp"].as_u64().ok_or("the token has no expiry")?,
    };
    if now >= claims.exp {
        return Err(format!("the token expired {} s ago", now - claims.exp));
    }
    if claims.room != "*" && claims.room != room {
        return Err(format!("the token is for room {}, not {room}", claims.room));
    }
    if let Some(want) = &claims.name
        && name != Some(want.as_str())
    {
        return Err(format!("the token is for the name {want:?}"));
    }
    Ok(claims)
}

/// A resume token for `peer`, valid until `exp` (Unix seconds), issued by
/// the server process `epoch`: what `welcome.resume` carries.
/// `PEER.EXP.EPOCH.MAC`, MAC = HMAC-SHA256(key, "peerlink-resume-v1 PEER
/// EXP EPOCH"), base64url without padding. Opaque to clients; every node of
/// a deployment must share `key`.
pub(crate) fn resume_token(key: &[u8], peer: &str, exp: u64, epoch: &str) -> String {
    let mac = B64.encode(resume_mac(key, peer, exp, epoch).finalize().into_bytes());
    format!("{peer}.{exp}.{epoch}.{mac}")
}

fn resume_mac(key: &[u8], peer: &str, exp: u64, epoch: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(format!("peerlink-resume-v1 {peer} {exp} {epoch}").as_bytes());
    m
}

/// The peer id `token` resumes and the epoch of the process that issued it,
/// if it is signed with `key` and not expired at `now`; otherwise why not.
pub(crate) fn verify_resume_token(key: &[u8], token: &str, now: u64) -> Result<(String, String), String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("too long".into());
    }
    let mut parts = token.splitn(4, '.');
    let (Some(peer), Some(exp), Some(epoch), Some(mac)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not PEER.EXP.EPOCH.MAC".into());
    };
    let exp: u64 = exp.parse().map_err(|_| "bad expiry")?;
    let mac = B64.decode(mac).map_err(|_| "MAC not base64url")?;
    resume_mac(key, peer, exp, epoch).verify_slice(&mac).map_err(|_| "not signed by this deployment")?;
    if now >= exp {
        return Err(format!("expired {} s ago", now - exp));
    }
    Ok((peer.to_string(), epoch.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"backend secret";

    fn claims(room: &str, name: Option<&str>, exp: u64) -> JoinClaims {
        JoinClaims { room: room.into(), name: name.map(Into::into), exp }
    }

    #[test]
    fn a_token_grants_its_room_and_name_until_it_expires() {
        let t = join_token(SECRET, &claims("lobby", Some("ada"), 1000));
        assert_eq!(
            verify_join_token(SECRET, &t, "lobby", Some("ada"), 999),
            Ok(claims("lobby", Some("ada"), 1000))
        );
        let refused = |room, name, now| verify_join_token(SECRET, &t, room, name, now).unwrap_err();
        assert!(refused("lobby", Some("ada"), 1000).contains("expired"));
        assert!(refused("other", Some("ada"), 999).contains("room lobby"));
        assert!(refused("lobby", Some("bob"), 999).contains("name"));
        assert!(refused("lobby", None, 999).contains("name"));
        assert!(
            verify_join_token(b"another secret", &t, "lobby", Some("ada"), 999)
                .unwrap_err()
                .contains("secret")
        );
    }

    #[test]
    fn wildcards_grant_any_room_and_any_name() {
        let t = join_token(SECRET, &claims("*", None, 1000));
        assert!(verify_join_token(SECRET, &t, "anything", Some("bob"), 5).is_ok());
        assert!(verify_join_token(SECRET, &t, "lobby", None, 5).is_ok());
    }

    #[test]
    fn tampered_and_malformed_tokens_are_refused() {
        let t = join_token(SECRET, &claims("lobby", None, 1000));
        let (payload, mac) = t.split_once('.').unwrap();
        let forged = B64.encode(r#"{"room":"*","exp":99999999999}"#);
        for bad in [
            String::new(),
            "no-dot".into(),
            format!("{forged}.{mac}"),
            format!("{payload}.{}", B64.encode([0u8; 32])),
            format!("{payload}.!!"),
            "x".repeat(2000),
        ] {
            assert!(verify_join_token(SECRET, &bad, "lobby", None, 5).is_err(), "{bad}");
        }
    }

    /// The shared vector in fixtures/protocol/token.json: the server accepts
    /// it and reproduces its MAC from the payload.
    #[test]
    fn the_fixture_vector() {
        let raw = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/protocol/token.json"
        ))
        .expect("fixture");
        let v: serde_json::Value = serde_json::from_str(&raw).expect("json");
        let secret = v["secret"].as_str().unwrap().as_bytes();
        let token = v["token"].as_str().unwrap();
        let (payload, mac_b64) = token.split_once('.').unwrap();
        assert_eq!(B64.encode(mac(secret, payload).finalize().into_bytes()), mac_b64);
        let c = &v["claims"];
        let want = claims(c["room"].as_str().unwrap(), c["name"].as_str(), c["exp"].as_u64().unwrap());
        assert_eq!(join_token(secret, &want), token, "the same claims sign to the same token");
        let now = v["valid_at"].as_u64().unwrap();
        assert_eq!(verify_join_token(secret, token, &want.room, want.name.as_deref(), now), Ok(want));
    }

    #[test]
    fn resume_tokens_name_their_peer_until_they_expire() {
        let t = resume_token(b"k", "p-00ab", 1000, "e1");
        assert_eq!(verify_resume_token(b"k", &t, 999), Ok(("p-00ab".to_string(), "e1".to_string())));
        assert!(verify_resume_token(b"k", &t.replacen(".e1.", ".e2.", 1), 999).is_err(), "another epoch");
        assert!(verify_resume_token(b"k", &t, 1000).unwrap_err().contains("expired"));
        assert!(verify_resume_token(b"other", &t, 999).is_err(), "another deployment's key");
        let forged = t.replacen("p-00ab", "p-00ac", 1);
        assert!(verify_resume_token(b"k", &forged, 999).is_err(), "another peer's id");
        assert!(verify_resume_token(b"k", "p-00ab.1000.e1", 999).is_err());
    }
}
