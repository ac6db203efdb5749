//! coturn-compatible time-limited credentials ("TURN REST API", `use-auth-secret`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// A username and password for one TURN user, valid until the expiry baked
/// into the username.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestCredentials {
    /// `<expiry>:<user>`, or a bare `<expiry>` when the user is empty; the
    /// expiry is in Unix seconds.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
}

impl std::fmt::Debug for RestCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The password for a REST `username`: `base64(HMAC-SHA1(secret, username))`,
/// exactly as coturn computes it with `use-auth-secret`.
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Credentials for `user` that expire `ttl` after `now`. The same secret works
/// with the embedded server and with a coturn configured with
/// `use-auth-secret` / `static-auth-secret`.
pub fn rest_credentials(secret: &str, user: &str, ttl: Duration, now: SystemTime) -> RestCredentials {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    let expiry = now.saturating_add(ttl.as_secs());
    let username = if user.is_empty() { expiry.to_string() } else { format!("{expiry}:{user}") };
    let password = rest_password(secret, &username);
    RestCredentials { username, password }
}

/// The expiry (Unix seconds) in a REST username, following coturn: the digits
/// before the first `:`, or, when that part is not all digits, the digits
/// after it; a username without `:` must be all digits. `None` when the
/// username is not REST-shaped.
pub(crate) fn rest_expiry(username: &str) -> Option<u64> {
    fn digits(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    match username.split_once(':') {
        None => digits(username),
        Some((head, tail)) => digits(head).or_else(|| digits(tail)),
    }
}

/// Current Unix time in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coturn_check_vector() {
        // The example from coturn's turnserver.conf / the TURN REST API draft.
        assert_eq!(rest_password("foobar", "1599491771"), "Tpz/nKkyvX/vMSLKvL4sbtBt8Vs=");
    }

    #[test]
    fn credentials_carry_expiry_and_user() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let creds = rest_credentials("s3cret", "ada", Duration::from_secs(600), now);
        assert_eq!(creds.username, "1700000600:ada");
        assert_eq!(creds.password, rest_password("s3cret", "1700000600:ada"));
        assert_eq!(rest_expiry(&creds.username), Some(1_700_000_600));

        let bare = rest_credentials("s3cret", "", Duration::from_secs(1), now);
        assert_eq!(bare.username, "1700000001");
        assert!(!format!("{bare:?}").contains(&bare.password));
    }

    #[test]
    fn expiry_parsing_follows_coturn() {
        assert_eq!(rest_expiry("1599491771"), Some(1_599_491_771));
        assert_eq!(rest_expiry("1599491771:ada"), Some(1_599_491_771));
        assert_eq!(rest_expiry("1599491771:ada:x"), Some(1_599_491_771));
        assert_eq!(rest_expiry("ada:1599491771"), Some(1_599_491_771));
        assert_eq!(rest_expiry("ada"), None);
        assert_eq!(rest_expiry("ada:bob"), None);
        assert_eq!(rest_expiry("+12"), None);
        assert_eq!(rest_expiry(""), None);
        assert_eq!(rest_expiry(":12"), Some(12));
    }
}
