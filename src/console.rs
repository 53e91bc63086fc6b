//! `GET /`: the web console, a page for people trying the relay (channel picker, message log,
//! tables, order-book ladder, candlestick chart, stats). Served from the binary (no CDN: it
//! works offline and behind firewalls), plain JavaScript, under a strict Content-Security-
//! Policy: scripts and styles only from the relay itself, connections only back to it. It is a
//! WebSocket and REST client like any other: the caps, rate limits and `allowed_origins` apply.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../assets/console/index.html");
const SCRIPT: &str = include_str!("../assets/console/console.js");
const STYLE: &str = include_str!("../assets/console/console.css");

/// The host the page was asked for, if it is a plain `host[:port]` (it goes into the CSP).
fn host(headers: &HeaderMap) -> Option<&str> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        .then_some(host)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The console page.
#[utoipa::path(get, path = "/", tag = "console",
    responses((status = 200, description = "The web console", content_type = "text/html")))]
pub async fn page(headers: HeaderMap) -> Response {
    let connect = match host(&headers) {
        Some(h) => format!("'self' ws://{h} wss://{h}"),
        None => "'self'".to_string(),
    };
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut resp = asset("text/html; charset=utf-8", PAGE);
    if let Ok(v) = HeaderValue::from_str(&csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp.headers_mut()
        .insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The console's script.
#[utoipa::path(get, path = "/console.js", tag = "console",
    responses((status = 200, description = "The console's JavaScript", content_type = "text/javascript")))]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The console's style sheet.
#[utoipa::path(get, path = "/console.css", tag = "console",
    responses((status = 200, description = "The console's CSS", content_type = "text/css")))]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
