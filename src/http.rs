//! HTTP surface: the `/ws` upgrade (origin, connection caps and token checked before it),
//! `GET /health`, `GET /api/v1/ws/stats` and `POST /api/v1/publish`. Errors are JSON and never
//! carry internals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api_error::{error_body, HttpCode};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::domain::Channel;
use crate::hub::{Close, Hub};
use crate::protocol::{iso_millis, ErrorCode};
use crate::session;
use crate::stats::Stats;
use crate::ws::{self, Upgrade, Wire};

/// Shared by every handler and session; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub conns: ConnTracker,
    /// Live client sessions; shutdown waits for them to finish.
    pub clients: TaskTracker,
    pub shutdown: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: AppInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

pub fn app(state: AppState) -> Router {
    let router = if state.config.server.autobahn_echo {
        Router::new().route("/autobahn", get(autobahn_echo))
    } else {
        Router::new()
    };
    // Read-only endpoints, readable from browser pages (dashboards) under `allowed_origins`.
    // A method router's layer wraps only the methods it has: OPTIONS is given one, so that
    // the CORS layer sees (and answers) preflight requests.
    let cors = cors(&state.config.server.allowed_origins);
    let readable = Router::new()
        .route(
            "/health",
            get(health).options(preflight).layer(cors.clone()),
        )
        .route("/ready", get(ready).options(preflight).layer(cors.clone()))
        .route(
            "/api/v1/ws/stats",
            get(stats).options(preflight).layer(cors),
        );
    router
        .route("/ws", get(ws_upgrade))
        // Never CORS-open: a page must not be able to publish with a key it was handed.
        .route("/api/v1/publish", post(publish))
        .merge(readable)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// CORS for the read-only endpoints: any origin when `allowed_origins` is empty (as for the
/// WebSocket), else exactly the listed ones. GET only, no credentials.
fn cors(allowed_origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = if allowed_origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([axum::http::Method::GET])
        .max_age(std::time::Duration::from_secs(3600))
}

/// Reached only by an OPTIONS that is not a CORS preflight (the layer answers those).
async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        HttpCode::NotFound.as_str(),
        &format!(
            "no endpoint at {}; the relay serves /ws (WebSocket), /health, /ready, /api/v1/ws/stats and POST /api/v1/publish",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let allowed = if uri.path() == "/api/v1/publish" {
        "POST"
    } else {
        "GET"
    };
    let mut resp = error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        HttpCode::MethodNotAllowed.as_str(),
        &format!("{method} is not served at {}; use {allowed}", uri.path()),
    );
    if let Ok(v) = HeaderValue::from_str(allowed) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// Counts WebSocket connections per IP and in total, for the caps, and paces new ones per IP.
pub struct ConnTracker {
    inner: Arc<Mutex<TrackerState>>,
    max_total: usize,
    max_per_ip: usize,
    connect_rate: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Upgrades since the rate limiter last forgot idle IPs.
    since_prune: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct TrackerState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one connection's place; released on drop, however the session ends.
pub struct ConnGuard {
    inner: Arc<Mutex<TrackerState>>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnTracker {
    pub fn new(max_total: usize, max_per_ip: usize, connects_per_second: u32) -> ConnTracker {
        let rate =
            std::num::NonZeroU32::new(connects_per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        ConnTracker {
            inner: Arc::new(Mutex::new(TrackerState::default())),
            max_total,
            max_per_ip,
            connect_rate: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            since_prune: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn try_acquire(&self, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        // Forget IPs that have been quiet, so the limiter's memory tracks active clients only.
        if self.since_prune.fetch_add(1, Ordering::Relaxed) >= 10_000 {
            self.since_prune.store(0, Ordering::Relaxed);
            self.connect_rate.retain_recent();
        }
        if self.connect_rate.check_key(&ip).is_err() {
            return Err(Refusal::Rate);
        }
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = st.per_ip.entry(ip).or_default();
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        st.total += 1;
        Ok(ConnGuard {
            inner: self.inner.clone(),
            ip,
        })
    }
}

/// Why an upgrade was refused before it happened.
enum Refusal {
    /// `server.max_connections` reached: 503.
    Total,
    /// `server.max_connections_per_ip` reached: 429.
    PerIp,
    /// `server.max_connects_per_ip_per_second` exceeded: 429.
    Rate,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Total => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                HttpCode::TooManyConnections.as_str(),
                "the relay is at its connection limit; retry shortly",
            ),
            Refusal::PerIp => refuse(
                StatusCode::TOO_MANY_REQUESTS,
                HttpCode::TooManyConnections.as_str(),
                "too many connections from your address; close some and retry",
            ),
            Refusal::Rate => refuse(
                StatusCode::TOO_MANY_REQUESTS,
                HttpCode::TooManyConnects.as_str(),
                "your address is opening connections too fast; slow down and retry",
            ),
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = error_body(status, code, message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

async fn ws_upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let cfg = &state.config.server;
    if !cfg.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let allowed = origin.is_some_and(|o| {
            cfg.allowed_origins
                .iter()
                .any(|a| a.trim_end_matches('/') == o.trim_end_matches('/'))
        });
        if !allowed {
            Stats::add(&state.hub.stats.rejected_connections, 1);
            return error_body(
                StatusCode::FORBIDDEN,
                HttpCode::OriginNotAllowed.as_str(),
                "this Origin may not connect to the relay",
            );
        }
    }
    let guard = match state.conns.try_acquire(peer.ip()) {
        Ok(g) => g,
        Err(refusal) => {
            Stats::add(&state.hub.stats.rejected_connections, 1);
            return refusal.into_response();
        }
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token = query.get("token").map(String::as_str).or(bearer);
    let at_connect = token
        .filter(|t| !t.is_empty())
        .map(|t| state.auth.verify(t));
    upgrade.on_upgrade(move |socket, prefix| session::run(socket, prefix, state, at_connect, guard))
}

/// `/autobahn` (only with `server.autobahn_echo`): echoes every message through the same
/// WebSocket path as `/ws` (the same reader, limits, outbox writer and close handling), so the
/// Autobahn suite, which expects an echo server, tests the relay's WebSocket layer.
async fn autobahn_echo(State(state): State<AppState>, upgrade: Upgrade) -> Response {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    upgrade.on_upgrade(move |socket, prefix| async move {
        let cfg = &state.config.server;
        let client = Arc::new(crate::hub::Client::new(
            0,
            cfg.client_queue_capacity,
            cfg.max_subscriptions_per_client,
            Some(socket.clone()),
        ));
        let mut incoming = ws::incoming(socket, prefix, client.clone(), cfg.max_message_bytes).await;
        let mut reading = true;
        let close = loop {
            tokio::select! {
                close = client.outbox.deliver() => break close,
                msg = incoming.next(), if reading => {
                    let reply = match msg {
                        Some(Ok(Message::Text(t))) => Wire::text(t.as_str()),
                        Some(Ok(Message::Binary(b))) => Wire::binary(&b),
                        Some(Ok(Message::Close(frame))) => {
                            client.outbox.close(ws::echo(frame));
                            reading = false;
                            continue;
                        }
                        Some(Ok(_)) => continue, // pings are answered by tungstenite
                        Some(Err(e)) => match ws::protocol_close(&e) {
                            Some((code, reason)) => {
                                client.outbox.close(Close { code, reason: reason.into(), last_words: None, abort: false });
                                reading = false;
                                continue;
                            }
                            None => return,
                        },
                        None => return,
                    };
                    client.outbox.push_wire(reply);
                }
            }
        };
        session::finish(&mut incoming, &client, close).await;
    })
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    let mut upstreams = serde_json::Map::new();
    for id in crate::domain::ExchangeId::ALL {
        let entry = match state.hub.upstreams.get(id) {
            None if !state.config.exchanges.get(id).enabled => json!({"state": "disabled"}),
            None => json!({"state": "unavailable", "reason": "not served by this build yet"}),
            Some(ex) => serde_json::to_value(ex.health()).unwrap_or_default(),
        };
        upstreams.insert(id.to_string(), entry);
    }
    Json(json!({
        "status": "ok",
        "uptimeSeconds": state.hub.stats.uptime_seconds(),
        "connectedClients": state.hub.connected_clients(),
        "upstreams": upstreams,
    }))
}

/// Readiness, distinct from liveness: 200 once every enabled exchange's instrument list is
/// loaded (subscriptions are validated and served at once), 503 before. Load balancers and
/// orchestrators route clients only to ready relays; `/health` stays 200 throughout.
async fn ready(State(state): State<AppState>) -> Response {
    let waiting: Vec<String> = state
        .hub
        .upstreams
        .all()
        .iter()
        .filter(|ex| ex.instruments().is_none())
        .map(|ex| ex.adapter.id().to_string())
        .collect();
    if waiting.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let body = json!({"status": "starting", "waitingFor": waiting});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn stats(State(state): State<AppState>) -> Json<Value> {
    let snap = state.hub.snapshot();
    let s = &state.hub.stats;
    let mut upstreams = serde_json::Map::new();
    let mut data = serde_json::Map::new();
    data.insert("connectedClients".into(), json!(snap.connected_clients));
    data.insert("totalSubscriptions".into(), json!(snap.total_subscriptions));
    data.insert("activeChannels".into(), json!(snap.active_channels));
    data.insert("quoteStreams".into(), json!(snap.quote_streams));
    data.insert("signalStreams".into(), json!(snap.signal_channels));
    for id in crate::domain::ExchangeId::ALL {
        let (streams, up, total) = state
            .hub
            .upstreams
            .get(id)
            .map(|ex| ex.active_streams())
            .unwrap_or_default();
        data.insert(format!("{id}Streams"), json!(streams.len()));
        data.insert(format!("{id}ActiveStreams"), json!(streams));
        if let Some(ex) = state.hub.upstreams.get(id) {
            let st = &ex.stats;
            upstreams.insert(
                id.to_string(),
                json!({
                    "connected": total > 0 && up == total,
                    "connections": up,
                    "streams": streams.len(),
                    "activeStreams": streams,
                    "reconnects": Stats::get(&st.reconnects),
                    "connectFailures": Stats::get(&st.connect_failures),
                    "decodeErrors": Stats::get(&st.decode_errors),
                    "rejectedRequests": Stats::get(&st.rejected_requests),
                    "resyncs": Stats::get(&st.resyncs),
                    "lastMessageAt": st.last_message_at.get().map(iso_millis),
                }),
            );
        }
    }
    data.insert("priceCache".into(), json!(snap.price_cache));
    data.insert("upstreams".into(), Value::Object(upstreams));
    data.insert("messagesIn".into(), json!(Stats::get(&s.messages_in)));
    data.insert("messagesOut".into(), json!(Stats::get(&s.messages_out)));
    data.insert("uptimeSeconds".into(), json!(s.uptime_seconds()));
    data.insert("conflatedMessages".into(), json!(Stats::get(&s.conflated)));
    data.insert(
        "slowConsumerDisconnects".into(),
        json!(Stats::get(&s.slow_consumer_disconnects)),
    );
    data.insert(
        "rateLimitedRequests".into(),
        json!(Stats::get(&s.rate_limited)),
    );
    data.insert(
        "rejectedConnections".into(),
        json!(Stats::get(&s.rejected_connections)),
    );
    data.insert(
        "totalConnections".into(),
        json!(Stats::get(&s.total_connections)),
    );
    Json(json!({"success": true, "data": data}))
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn publish(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let authorised = key
        .is_some_and(|k| same_secret(k.as_bytes(), state.config.auth.publish_api_key.as_bytes()));
    if !authorised {
        return error_body(
            StatusCode::UNAUTHORIZED,
            HttpCode::Unauthorized.as_str(),
            "send the publish key as Authorization: Bearer <key>",
        );
    }
    let bad = |code: ErrorCode, message: &str| {
        error_body(StatusCode::BAD_REQUEST, code.as_str(), message)
    };
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&body) else {
        return bad(
            ErrorCode::InvalidJson,
            "body must be a JSON object like {\"channel\":\"orders:user123\",\"data\":{...}}",
        );
    };
    let Some(Value::String(name)) = obj.remove("channel") else {
        return bad(
            ErrorCode::InvalidChannel,
            "\"channel\" (a string) is required",
        );
    };
    let Some(data) = obj.remove("data") else {
        return bad(ErrorCode::InvalidJson, "\"data\" is required");
    };
    let channel: Channel = match name.parse() {
        Ok(c) => c,
        Err(e) => return bad(ErrorCode::InvalidChannel, &e.to_string()),
    };
    if !channel.is_published() {
        return bad(
            ErrorCode::InvalidChannel,
            "only portfolio:, orders: and signals: channels can be published to",
        );
    }
    let delivered = state.hub.publish(&channel, &data);
    Json(json!({"success": true, "data": {"delivered": delivered}})).into_response()
}
