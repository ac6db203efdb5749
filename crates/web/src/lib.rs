//! peerlink's web app and browser client, built into the binary: `peerlink
//! serve` answers the pages and the JavaScript from memory, so one binary is
//! the whole deployment.
//!
//! - `/` — send and receive by code; `/r#CODE` opens the receive side with a
//!   code from a link or QR code (the fragment never reaches the server);
//! - `/room/NAME` — a room: who is here, chat, files to one or everyone;
//! - `/app/*`, `/lib/*`, `/vendor/*` — the page scripts, the client library
//!   (`web/lib`, importable by other web apps) and third-party modules;
//! - `/sw.js` — the service worker that streams downloads to disk.

#![warn(missing_docs)]

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// The embedded file at `path` (e.g. `/lib/room.js`): its bytes and ETag.
pub fn asset(path: &str) -> Option<(&'static [u8], String)> {
    assets::ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, bytes, hash)| (*bytes, format!("\"{hash:016x}\"")))
}

/// Every embedded path.
pub fn paths() -> impl Iterator<Item = &'static str> {
    assets::ASSETS.iter().map(|(p, _, _)| *p)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The page's Content-Security-Policy: scripts from this origin only, plus
/// the page's inline import map, allowed by its hash.
fn csp(html: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let text = String::from_utf8_lossy(html);
    let mut hashes = String::new();
    let open = "<script type=\"importmap\">";
    if let Some(start) = text.find(open).map(|i| i + open.len())
        && let Some(len) = text[start..].find("</script>")
    {
        let digest = sha2::Sha256::digest(&text.as_bytes()[start..start + len]);
        hashes = format!(" 'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest));
    }
    format!(
        "default-src 'self'; script-src 'self'{hashes}; connect-src 'self' ws: wss:; img-src 'self' data: blob:; \
         media-src 'self' blob: mediastream:; style-src 'self'; worker-src 'self'; object-src 'none'; \
         base-uri 'none'; frame-src 'self'"
    )
}

/// Serves the embedded file `path`, with an ETag (a matching `If-None-Match`
/// gets 304) and headers that keep the app to its own origin.
fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some((bytes, etag)) = asset(path) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let fresh = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str());
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { bytes.into_response() };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if path.ends_with(".html")
        && let Ok(v) = HeaderValue::from_str(&csp(bytes))
    {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

/// Adds the web app's routes to `router` (the signaling server's).
pub fn routes<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .route("/", get(|h: HeaderMap| async move { serve("/app/index.html", &h) }))
        .route("/r", get(|h: HeaderMap| async move { serve("/app/index.html", &h) }))
        .route("/room/{name}", get(|h: HeaderMap| async move { serve("/app/room.html", &h) }))
        .route("/sw.js", get(|h: HeaderMap| async move { serve("/app/sw.js", &h) }))
        .route(
            "/{top}/{*rest}",
            get(|Path((top, rest)): Path<(String, String)>, h: HeaderMap| async move {
                match top.as_str() {
                    "app" | "lib" | "vendor" => serve(&format!("/{top}/{rest}"), &h),
                    _ => (StatusCode::NOT_FOUND, "not found").into_response(),
                }
            }),
        )
}
