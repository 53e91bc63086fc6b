//! HTTP surface: the `/ws` upgrade (origin, connection caps and token checked before it),
//! `GET /health`, `GET /api/v1/ws/stats` and `POST /api/v1/publish`. Errors are JSON and never
//! carry internals.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api_error::{error_body, ApiErrorBody, HttpCode};
use crate::app::{AppState, Refusal};
use crate::domain::{Channel, ExchangeId};
use crate::hub::Close;
use crate::protocol::{iso_millis, ErrorCode};
use crate::session;
use crate::ws::{self, Upgrade, Wire};

pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    if state.config.server.autobahn_echo {
        router = router.route("/autobahn", get(autobahn_echo));
    }
    for (path, route) in routes(&state.config.server.allowed_origins) {
        router = router.route(path, route);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every route the relay serves (but the test-only `/autobahn`), the one list the router is
/// built from: `tests/openapi.rs` checks it against the OpenAPI document both ways.
///
/// The read-only endpoints are CORS-readable under `allowed_origins` (dashboards in browser
/// pages). A method router's layer wraps only the methods it has: OPTIONS is given one, so
/// the CORS layer sees (and answers) preflight requests. Publish is never CORS-open: a page
/// must not be able to publish with a key it was handed.
pub fn routes(allowed_origins: &[String]) -> Vec<(&'static str, MethodRouter<AppState>)> {
    let cors = cors(allowed_origins);
    let readable = |route: MethodRouter<AppState>| route.options(preflight).layer(cors.clone());
    vec![
        ("/", get(crate::console::page)),
        ("/console.js", get(crate::console::script)),
        ("/console.css", get(crate::console::style)),
        ("/ws", get(ws_upgrade)),
        ("/health", readable(get(health))),
        ("/ready", readable(get(ready))),
        ("/api/v1/ws/stats", readable(get(stats))),
        ("/api/v1/instruments", readable(get(instruments))),
        ("/api/v1/klines", readable(get(klines))),
        ("/api/v1/trades", readable(get(trades))),
        ("/api/v1/openapi.json", readable(get(openapi))),
        ("/metrics", get(metrics)),
        ("/api/v1/publish", post(publish)),
    ]
}

/// The OpenAPI 3 document of the REST endpoints, generated from the handlers' annotations
/// and the response types themselves.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "exchange-relay",
        description = "Real-time market data from Binance, Coinbase and Kraken: REST endpoints. The WebSocket protocol on /ws is described in docs/protocol.md."
    ),
    paths(
        crate::console::page,
        crate::console::script,
        crate::console::style,
        ws_upgrade,
        health,
        ready,
        stats,
        instruments,
        klines,
        trades,
        openapi,
        metrics,
        publish
    ),
    tags(
        (name = "operations", description = "Liveness, readiness and counters"),
        (name = "market data", description = "What can be subscribed"),
        (name = "publish", description = "Backend services pushing private and signal messages"),
        (name = "console", description = "The web console for people"),
        (name = "websocket", description = "The client WebSocket")
    )
)]
pub struct ApiDoc;

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
            "no endpoint at {}; the relay serves / (console), /ws (WebSocket), /health, /ready, /api/v1/ws/stats, /api/v1/instruments, /api/v1/klines, /api/v1/trades, /api/v1/openapi.json and POST /api/v1/publish",
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

/// The client WebSocket (docs/protocol.md). A plain HTTP request gets 426.
#[utoipa::path(get, path = "/ws", tag = "websocket",
    params(("token" = Option<String>, Query, description = "A JWT, for browsers (or an Authorization: Bearer header)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 403, description = "Origin outside allowed_origins", body = ApiErrorBody),
        (status = 426, description = "Not a WebSocket upgrade", body = ApiErrorBody),
        (status = 429, description = "Too many connections or connects from this address", body = ApiErrorBody),
        (status = 503, description = "The relay is at its connection limit", body = ApiErrorBody)))]
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
            state.stats.connection_refused("origin not allowed");
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
            state.stats.connection_refused(refusal.as_str());
            return refusal.into_response();
        }
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token = query.get("token").map(String::as_str).or(bearer);
    let at_connect = match token.filter(|t| !t.is_empty()) {
        Some(t) => Some(state.auth.verify(t).await),
        None => None,
    };
    let upgrade = if cfg.compression {
        upgrade
    } else {
        upgrade.without_compression()
    };
    upgrade.on_upgrade(move |socket, prefix, deflate| {
        session::run(socket, prefix, deflate, state, at_connect, guard)
    })
}

/// `/autobahn` (only with `server.autobahn_echo`): echoes every message through the same
/// WebSocket path as `/ws` (the same reader, limits, outbox writer and close handling), so the
/// Autobahn suite, which expects an echo server, tests the relay's WebSocket layer.
async fn autobahn_echo(State(state): State<AppState>, upgrade: Upgrade) -> Response {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let upgrade = if state.config.server.compression {
        upgrade
    } else {
        upgrade.without_compression()
    };
    upgrade.on_upgrade(move |socket, prefix, deflate| async move {
        let cfg = &state.config.server;
        let client = Arc::new(crate::hub::Client::new(
            0,
            cfg.client_queue_capacity,
            cfg.max_subscriptions_per_client,
            Some(socket.clone()),
            deflate.map(|d| d.server_window_bits),
        ));
        let mut incoming =
            ws::incoming(socket, prefix, client.clone(), cfg.max_message_bytes, deflate).await;
        let mut reading = true;
        let close = loop {
            tokio::select! {
                close = client.outbox.deliver() => break close,
                msg = incoming.next(), if reading => {
                    let reply = match msg {
                        Some(Ok(Message::Text(t))) => Wire::text(t.as_str()).always_compressed(),
                        Some(Ok(Message::Binary(b))) => Wire::binary(&b).always_compressed(),
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

/// `GET /health`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    /// Always `ok` while the relay answers.
    status: &'static str,
    uptime_seconds: u64,
    connected_clients: usize,
    /// Per exchange: `state` (`disabled`, `idle`, `connecting`, `connected`, `unreachable`),
    /// and while unreachable `since` and `lastError`; `instrumentsLoaded`, `connections`,
    /// `wantedConnections`, `streams`.
    #[schema(value_type = Object)]
    upstreams: serde_json::Map<String, Value>,
    /// In a cluster: `nodeId`, `state` (`ok`, `degraded`), `redis` (`connected`,
    /// `unreachable`), `nodes`, `members`, the streams this node wants and who reads each,
    /// `leaseChanges`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    cluster: Option<crate::cluster::ClusterSnapshot>,
    /// With `auth.jwks_url`: the JWKS's `url`, `state` (`loaded`, or `unavailable` until a
    /// first fetch succeeds), `keys`, `fetches`, `failedFetches`, `lastError`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    jwks: Option<crate::auth::jwks::JwksSnapshot>,
}

/// Liveness, with each exchange's upstream state.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The relay serves", body = HealthBody)))]
async fn health(State(state): State<AppState>) -> Json<HealthBody> {
    // Every exchange has an adapter: one not among the upstreams is disabled.
    let mut upstreams = serde_json::Map::new();
    for id in ExchangeId::ALL {
        upstreams.insert(id.to_string(), json!({"state": "disabled"}));
    }
    for (id, health) in state.upstreams.health() {
        upstreams.insert(
            id.to_string(),
            serde_json::to_value(health).unwrap_or_default(),
        );
    }
    Json(HealthBody {
        status: "ok",
        uptime_seconds: state.stats.uptime_seconds(),
        connected_clients: state.hub.connected_clients(),
        upstreams,
        cluster: state.cluster.as_ref().map(|c| c.snapshot()),
        jwks: state.auth.current().jwks().map(|j| j.snapshot()),
    })
}

/// `GET /ready`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyBody {
    /// `ready`, or `starting` while instrument lists load.
    status: &'static str,
    /// While starting: the exchanges whose instrument list is not loaded yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    waiting_for: Vec<String>,
}

/// Readiness, distinct from liveness: 200 once every enabled exchange's instrument list is
/// loaded (subscriptions are validated and served at once), 503 before. Load balancers and
/// orchestrators route clients only to ready relays; `/health` stays 200 throughout.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "Every enabled exchange's instruments are loaded", body = ReadyBody),
    (status = 503, description = "Still loading instrument lists", body = ReadyBody)))]
async fn ready(State(state): State<AppState>) -> Response {
    let waiting_for: Vec<String> = state
        .upstreams
        .waiting_for_instruments()
        .iter()
        .map(ToString::to_string)
        .collect();
    if waiting_for.is_empty() {
        Json(ReadyBody {
            status: "ready",
            waiting_for,
        })
        .into_response()
    } else {
        let body = ReadyBody {
            status: "starting",
            waiting_for,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /api/v1/ws/stats`.
#[derive(Serialize, ToSchema)]
pub struct StatsBody {
    success: bool,
    data: StatsData,
}

/// The first nine fields are the ones existing frontends read; `<exchange>Streams` and
/// `<exchange>ActiveStreams` come for every exchange.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsData {
    connected_clients: usize,
    total_subscriptions: usize,
    active_channels: Vec<String>,
    quote_streams: usize,
    signal_streams: usize,
    /// `binanceStreams`, `binanceActiveStreams`, ... for every exchange.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    per_exchange: BTreeMap<String, Value>,
    price_cache: usize,
    upstreams: BTreeMap<String, UpstreamStatsData>,
    messages_in: u64,
    messages_out: u64,
    uptime_seconds: u64,
    conflated_messages: u64,
    slow_consumer_disconnects: u64,
    rate_limited_requests: u64,
    rejected_connections: u64,
    total_connections: u64,
    /// Refused tokens, private subscriptions, per-user connections and publish requests, by
    /// reason (`invalid_token`, `token_expired`, `keys_unavailable`, `auth_required`,
    /// `forbidden`, `user_limit`, `publish_key`).
    #[schema(value_type = Object)]
    auth_refusals: BTreeMap<String, u64>,
    recovery: RecoveryStatsData,
    /// In a cluster, as in `/health`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    cluster: Option<crate::cluster::ClusterSnapshot>,
}

/// What the recovery windows hold, and how resumes and histories went.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryStatsData {
    window_bytes: i64,
    window_messages: i64,
    recovered: u64,
    not_recovered: u64,
    histories_served: u64,
    histories_unavailable: u64,
    /// Gap notices by reason.
    #[schema(value_type = Object)]
    gaps: BTreeMap<String, u64>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatsData {
    connected: bool,
    connections: usize,
    streams: usize,
    active_streams: Vec<String>,
    reconnects: u64,
    connect_failures: u64,
    decode_errors: u64,
    rejected_requests: u64,
    resyncs: u64,
    backfilled_trades: u64,
    incomplete_backfills: u64,
    last_message_at: Option<String>,
}

/// Clients, channels, upstream streams and counters.
#[utoipa::path(get, path = "/api/v1/ws/stats", tag = "operations",
    responses((status = 200, description = "The counters now", body = StatsBody)))]
async fn stats(State(state): State<AppState>) -> Json<StatsBody> {
    let hub = state.hub.snapshot();
    let counters = state.stats.counters();
    let upstreams = state.upstreams.snapshot();
    let mut per_exchange = BTreeMap::new();
    for id in ExchangeId::ALL {
        let streams = upstreams
            .iter()
            .find(|u| u.exchange == id)
            .map(|u| u.streams.clone())
            .unwrap_or_default();
        per_exchange.insert(format!("{id}Streams"), json!(streams.len()));
        per_exchange.insert(format!("{id}ActiveStreams"), json!(streams));
    }
    let data = StatsData {
        connected_clients: hub.connected_clients,
        total_subscriptions: hub.total_subscriptions,
        active_channels: hub.active_channels,
        quote_streams: hub.quote_streams,
        signal_streams: hub.signal_channels,
        per_exchange,
        price_cache: hub.price_cache,
        upstreams: upstreams
            .into_iter()
            .map(|u| {
                let c = u.counters;
                let data = UpstreamStatsData {
                    connected: u.connected,
                    connections: u.connections,
                    streams: u.streams.len(),
                    active_streams: u.streams,
                    reconnects: c.reconnects,
                    connect_failures: c.connect_failures,
                    decode_errors: c.decode_errors,
                    rejected_requests: c.rejected_requests,
                    resyncs: c.resyncs,
                    backfilled_trades: c.backfilled_trades,
                    incomplete_backfills: c.backfills_incomplete,
                    last_message_at: c.last_message_at.map(iso_millis),
                };
                (u.exchange.to_string(), data)
            })
            .collect(),
        messages_in: counters.messages_in,
        messages_out: counters.messages_out,
        uptime_seconds: counters.uptime_seconds,
        conflated_messages: counters.conflated,
        slow_consumer_disconnects: counters.slow_consumer_disconnects,
        rate_limited_requests: counters.rate_limited,
        rejected_connections: counters.rejected_connections,
        total_connections: counters.total_connections,
        auth_refusals: state
            .stats
            .auth_refusals()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        recovery: {
            let count = |rows: Vec<(&'static str, u64)>, label: &str| {
                rows.into_iter()
                    .find(|(l, _)| *l == label)
                    .map_or(0, |(_, n)| n)
            };
            let recoveries = state.stats.recoveries();
            let histories = state.stats.histories();
            RecoveryStatsData {
                window_bytes: state.hub.windows.bytes.load(Ordering::Relaxed),
                window_messages: state.hub.windows.messages.load(Ordering::Relaxed),
                recovered: count(recoveries.clone(), "recovered"),
                not_recovered: count(recoveries, "not_recovered"),
                histories_served: count(histories.clone(), "served"),
                histories_unavailable: count(histories, "unavailable"),
                gaps: state
                    .stats
                    .gaps()
                    .into_iter()
                    .map(|(l, n)| (l.to_string(), n))
                    .collect(),
            }
        },
        cluster: state.cluster.as_ref().map(|c| c.snapshot()),
    };
    Json(StatsBody {
        success: true,
        data,
    })
}

/// `POST /api/v1/publish` body.
#[derive(ToSchema)]
#[allow(dead_code)] // the handler reads the body itself, to answer every mistake in words
pub struct PublishRequest {
    /// A `signals:`, `portfolio:` or `orders:` channel.
    #[schema(example = "orders:user123")]
    channel: String,
    /// Passed through to the subscribers as sent.
    #[schema(value_type = Object)]
    data: Value,
}

/// `POST /api/v1/publish` answer.
#[derive(Serialize, ToSchema)]
pub struct PublishBody {
    success: bool,
    data: Delivered,
}

#[derive(Serialize, ToSchema)]
pub struct Delivered {
    /// Clients of this relay the message was queued for (in a cluster too: each node counts
    /// its own).
    delivered: usize,
    /// In a cluster: the relays with subscribers to the channel that Redis handed it to (0
    /// while Redis is unreachable: then it reached this relay's subscribers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<usize>,
}

/// Pushes a message to a private (`portfolio:`, `orders:`) or `signals:` channel.
#[utoipa::path(post, path = "/api/v1/publish", tag = "publish",
    request_body = PublishRequest,
    security(("publish_key" = [])),
    responses(
        (status = 200, description = "Delivered to this relay's subscribers", body = PublishBody),
        (status = 400, description = "Not a JSON object, no data, or a channel that cannot be published to", body = ApiErrorBody),
        (status = 401, description = "Missing or wrong publish key", body = ApiErrorBody)))]
async fn publish(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let authorised = key.is_some_and(|k| state.auth.publish_key_ok(k));
    if !authorised {
        state.stats.auth_refused("publish_key", None, None);
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
    let (delivered, nodes) = match &state.cluster {
        Some(cluster) => {
            let posted = cluster.publish(&channel, &data, &state.hub).await;
            (posted.delivered, Some(posted.nodes))
        }
        None => (state.hub.publish(&channel, &data), None),
    };
    Json(PublishBody {
        success: true,
        data: Delivered { delivered, nodes },
    })
    .into_response()
}

/// `GET /api/v1/instruments` query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InstrumentsQuery {
    /// `binance`, `coinbase` or `kraken`.
    exchange: Option<String>,
}

/// `GET /api/v1/instruments` answer.
#[derive(Serialize, ToSchema)]
pub struct InstrumentsBody {
    success: bool,
    data: Vec<InstrumentData>,
}

/// One market of an exchange.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstrumentData {
    /// The unified symbol, as in channels (`BTCUSD`).
    #[schema(example = "BTCUSD")]
    symbol: String,
    /// The exchange's own spelling (`BTC/USD` on Kraken).
    #[schema(example = "BTC/USD")]
    exchange_symbol: String,
    base: String,
    quote: String,
    /// The exchange's status word (`TRADING`, `online`, ...).
    status: String,
    /// Whether it can be subscribed now.
    tradable: bool,
    /// Decimal places of prices and of quantities, where the exchange states them.
    price_precision: Option<u32>,
    quantity_precision: Option<u32>,
}

/// The symbols of one exchange, from the instrument list the relay loaded, sorted.
#[utoipa::path(get, path = "/api/v1/instruments", tag = "market data",
    params(InstrumentsQuery),
    responses(
        (status = 200, description = "The exchange's markets", body = InstrumentsBody),
        (status = 400, description = "No exchange named", body = ApiErrorBody),
        (status = 404, description = "Not an exchange this relay serves", body = ApiErrorBody),
        (status = 503, description = "The instrument list is not loaded yet", body = ApiErrorBody)))]
async fn instruments(
    State(state): State<AppState>,
    Query(query): Query<InstrumentsQuery>,
) -> Response {
    let Some(name) = query.exchange.filter(|e| !e.is_empty()) else {
        return error_body(
            StatusCode::BAD_REQUEST,
            HttpCode::InvalidParameter.as_str(),
            "name the exchange: /api/v1/instruments?exchange=binance",
        );
    };
    let id = match name.parse::<ExchangeId>() {
        Ok(id) if state.config.exchanges.get(id).enabled => id,
        Ok(id) => {
            return error_body(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownExchange.as_str(),
                &format!("{id} is disabled in this relay's configuration"),
            )
        }
        Err(e) => {
            return error_body(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownExchange.as_str(),
                &e.to_string(),
            )
        }
    };
    let Some(set) = state.upstreams.instruments(id) else {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamUnavailable.as_str(),
            &format!("{id}'s instrument list is not loaded yet; retry shortly"),
        );
    };
    let mut data: Vec<InstrumentData> = set
        .by_symbol
        .iter()
        .map(|(symbol, i)| InstrumentData {
            symbol: symbol.to_string(),
            exchange_symbol: i.native.clone(),
            base: i.base.clone(),
            quote: i.quote.clone(),
            status: i.status.clone(),
            tradable: i.tradable,
            price_precision: i.price_precision,
            quantity_precision: i.qty_precision,
        })
        .collect();
    data.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    Json(InstrumentsBody {
        success: true,
        data,
    })
    .into_response()
}

/// `GET /api/v1/klines` query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct KlinesQuery {
    /// A klines channel, e.g. `klines:BTCUSDT:1m` or `klines:ETHUSD@coinbase:5m`.
    channel: Option<String>,
    /// 1–1000, default 500.
    limit: Option<String>,
    /// The open time (ms) of the newest candle wanted; default now (the forming candle included).
    end_time: Option<String>,
}

/// `GET /api/v1/trades` query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TradesQuery {
    /// A trades channel, e.g. `trades:BTCUSDT`.
    channel: Option<String>,
    /// 1–1000, default 100.
    limit: Option<String>,
}

/// A history answer: the channel's data objects, oldest first.
#[derive(Serialize, ToSchema)]
pub struct HistoryBody {
    success: bool,
    /// The same objects as the channel's `kline` or `trade` data.
    #[schema(value_type = Vec<Object>)]
    data: Vec<Box<serde_json::value::RawValue>>,
}

/// Candles of a klines channel, oldest first: the same objects as its `kline` data.
#[utoipa::path(get, path = "/api/v1/klines", tag = "market data",
    params(KlinesQuery),
    responses(
        (status = 200, description = "The candles", body = HistoryBody),
        (status = 400, description = "A bad parameter (INVALID_CHANNEL, INVALID_OPTION)", body = ApiErrorBody),
        (status = 404, description = "An unknown market (UNKNOWN_SYMBOL, UNKNOWN_EXCHANGE, UNSUPPORTED)", body = ApiErrorBody),
        (status = 502, description = "The exchange did not give the history (HISTORY_UNAVAILABLE)", body = ApiErrorBody),
        (status = 503, description = "The exchange is unreachable (UPSTREAM_UNAVAILABLE)", body = ApiErrorBody)))]
async fn klines(State(state): State<AppState>, Query(q): Query<KlinesQuery>) -> Response {
    let end_ms = match q.end_time.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(ms)) if ms >= 0 => Some(ms),
        Some(_) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidOption.as_str(),
                "endTime must be the open time of a candle in ms since the epoch, e.g. endTime=1701806340000",
            )
        }
    };
    history_answer(&state, "klines", q.channel, q.limit, 500, end_ms).await
}

/// The most recent trades of a trades channel, oldest first: the same objects as its `trade` data.
#[utoipa::path(get, path = "/api/v1/trades", tag = "market data",
    params(TradesQuery),
    responses(
        (status = 200, description = "The trades", body = HistoryBody),
        (status = 400, description = "A bad parameter (INVALID_CHANNEL, INVALID_OPTION)", body = ApiErrorBody),
        (status = 404, description = "An unknown market (UNKNOWN_SYMBOL, UNKNOWN_EXCHANGE, UNSUPPORTED)", body = ApiErrorBody),
        (status = 502, description = "The exchange did not give the history (HISTORY_UNAVAILABLE)", body = ApiErrorBody),
        (status = 503, description = "The exchange is unreachable (UPSTREAM_UNAVAILABLE)", body = ApiErrorBody)))]
async fn trades(State(state): State<AppState>, Query(q): Query<TradesQuery>) -> Response {
    history_answer(&state, "trades", q.channel, q.limit, 100, None).await
}

async fn history_answer(
    state: &AppState,
    kind: &str,
    channel: Option<String>,
    limit: Option<String>,
    default_limit: usize,
    end_ms: Option<i64>,
) -> Response {
    let bad = |code: ErrorCode, message: &str| {
        error_body(StatusCode::BAD_REQUEST, code.as_str(), message)
    };
    let example = if kind == "klines" {
        "channel=klines:BTCUSDT:1m"
    } else {
        "channel=trades:BTCUSDT"
    };
    let Some(name) = channel.filter(|c| !c.is_empty()) else {
        return bad(
            ErrorCode::InvalidChannel,
            &format!("name the channel: /api/v1/{kind}?{example}"),
        );
    };
    let channel: Channel = match name.parse() {
        Ok(c) => c,
        Err(crate::domain::ChannelError::UnknownExchange(e)) => {
            return error_body(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownExchange.as_str(),
                &crate::domain::ChannelError::UnknownExchange(e).to_string(),
            )
        }
        Err(e) => return bad(ErrorCode::InvalidChannel, &e.to_string()),
    };
    if channel.kind() != kind {
        return bad(
            ErrorCode::InvalidChannel,
            &format!("/api/v1/{kind} takes a {kind} channel ({example}), not {name}"),
        );
    }
    let limit = match limit.as_deref().map(str::parse::<usize>) {
        None => default_limit,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return bad(
                ErrorCode::InvalidOption,
                "limit must be an integer from 1 to 1000",
            )
        }
    };
    let request = crate::hub::HistoryRequest { limit, end_ms };
    match state.hub.history(&channel, request).await {
        Ok(items) => {
            let data = items
                .into_iter()
                .filter_map(|i| serde_json::value::RawValue::from_string(i).ok())
                .collect();
            Json(HistoryBody {
                success: true,
                data,
            })
            .into_response()
        }
        Err((code, message)) => {
            let status = match code {
                ErrorCode::UnknownSymbol | ErrorCode::UnknownExchange | ErrorCode::Unsupported => {
                    StatusCode::NOT_FOUND
                }
                ErrorCode::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::HistoryUnavailable => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_REQUEST,
            };
            error_body(status, code.as_str(), &message)
        }
    }
}

/// Prometheus text exposition of the relay's counters, gauges and latency histograms.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let mut resp = state.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document of every REST endpoint", content_type = "application/json")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

/// The OpenAPI document, with the publish key's security scheme.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
    let mut doc = ApiDoc::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "publish_key",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    doc
}
