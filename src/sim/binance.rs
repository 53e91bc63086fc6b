//! A simulated Binance Spot on loopback, speaking Binance's real protocol (EXCHANGES.md §1, §6):
//! `/stream?streams=` (combined, wrapped `{"stream","data"}`), `/ws` and `/ws/<stream>` (raw),
//! `SUBSCRIBE`/`UNSUBSCRIBE`/`LIST_SUBSCRIPTIONS`, documented error shapes, and Binance's limits:
//! more than 5 incoming messages a second (pings and pongs count) closes with 1008
//! "Too many requests", at most 1024 streams a connection, lower-case stream names only
//! (anything else is accepted and stays silent, as on the real exchange), a ping every 20 s and
//! a close after 60 s without a pong. REST: `exchangeInfo` (from `fixtures/`), `ticker/24hr`,
//! `depth`, `klines`, with `-1121 Invalid symbol.` for unknown symbols.
//!
//! Tests and the soak drive it through [`SimBinance`]'s controls: kill connections, announce
//! `serverShutdown`, go unavailable, stall.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::market::{default_specs, Candle, Market, SimTrade};
use super::util::{lock, unavailable};
use super::SimOptions;
use crate::domain::Interval;
use crate::protocol::now_millis;

/// One market-data frame, pre-rendered in both forms so connections only pick one.
struct SimFrame {
    stream: String,
    raw: Utf8Bytes,
    combined: Utf8Bytes,
}

#[derive(Clone, Copy, Debug)]
enum Control {
    /// Drop every connection without a close frame.
    Kill,
    /// Send `serverShutdown` on every connection.
    ServerShutdown,
    /// Send a frame that is not JSON on every connection.
    Garbage,
}

struct Inner {
    opts: SimOptions,
    markets: Mutex<Vec<Market>>,
    frames: broadcast::Sender<Arc<SimFrame>>,
    control: broadcast::Sender<Control>,
    /// Stream → how many connections are subscribed to it.
    streams: Mutex<HashMap<String, usize>>,
    /// Every stream name ever requested, valid or not.
    requested_ever: Mutex<HashSet<String>>,
    exchange_info: String,
    available: AtomicBool,
    /// The REST trade endpoints answer 503 (history and backfill refused, the rest served).
    trades_refused: AtomicBool,
    stalled: AtomicBool,
    /// While set, `exchangeInfo` answers 429 with this `Retry-After` (seconds).
    rest_limited: Mutex<Option<u64>>,
    exchange_info_requests: AtomicU64,
    connections: AtomicUsize,
    connects: AtomicU64,
    control_messages: AtomicU64,
    rate_limit_closes: AtomicU64,
}

/// A running simulated Binance; stops when dropped.
pub struct SimBinance {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for SimBinance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SimBinance {
    /// Starts on `listener` with the shipped fixtures.
    pub async fn start(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimBinance> {
        let addr = listener.local_addr()?;
        let markets = default_specs()
            .into_iter()
            .enumerate()
            .map(|(i, mut spec)| {
                spec.trades_per_sec *= opts.rate_scale;
                Market::new(spec, opts.seed.wrapping_add(i as u64)).warmed(
                    crate::protocol::now_millis(),
                    super::market::WARM_UP_MS,
                    opts.time_scale,
                )
            })
            .collect();
        let inner = Arc::new(Inner {
            markets: Mutex::new(markets),
            frames: broadcast::channel(65_536).0,
            control: broadcast::channel(16).0,
            streams: Mutex::new(HashMap::new()),
            requested_ever: Mutex::new(HashSet::new()),
            exchange_info: include_str!("../../fixtures/binance/exchangeInfo.json").to_string(),
            available: AtomicBool::new(true),
            trades_refused: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            rest_limited: Mutex::new(None),
            exchange_info_requests: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            control_messages: AtomicU64::new(0),
            rate_limit_closes: AtomicU64::new(0),
            opts,
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/stream", get(ws_combined))
            .route("/ws", get(ws_raw))
            .route("/ws/{stream}", get(ws_raw_one))
            .route("/api/v3/exchangeInfo", get(exchange_info))
            .route("/api/v3/ticker/24hr", get(ticker_24hr))
            .route("/api/v3/depth", get(depth))
            .route("/api/v3/klines", get(klines))
            .route("/api/v3/trades", get(recent_trades))
            .route("/api/v3/historicalTrades", get(historical_trades))
            .with_state(inner.clone());
        super::util::serve(
            listener,
            app,
            run_market(inner.clone(), stop.clone()),
            &stop,
        );
        Ok(SimBinance { inner, addr, stop })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// WebSocket connections ever accepted.
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::SeqCst)
    }

    /// Stream → number of connections subscribed to it, right now.
    pub fn subscriptions(&self) -> BTreeMap<String, usize> {
        lock(&self.inner.streams)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Whether any request ever named a stream containing `needle`.
    pub fn ever_requested(&self, needle: &str) -> bool {
        lock(&self.inner.requested_ever)
            .iter()
            .any(|s| s.contains(needle))
    }

    /// Control messages (requests, pings, pongs) received from clients.
    pub fn control_messages(&self) -> u64 {
        self.inner.control_messages.load(Ordering::SeqCst)
    }

    /// Connections closed for breaking the 5 messages/s limit.
    pub fn rate_limit_closes(&self) -> u64 {
        self.inner.rate_limit_closes.load(Ordering::SeqCst)
    }

    /// Drops every WebSocket connection without a close frame.
    pub fn kill_connections(&self) {
        let _ = self.inner.control.send(Control::Kill);
    }

    /// Announces `serverShutdown` on every connection.
    pub fn server_shutdown(&self) {
        let _ = self.inner.control.send(Control::ServerShutdown);
    }

    /// Sends a corrupt (truncated, not JSON) frame on every connection.
    pub fn send_garbage(&self) {
        let _ = self.inner.control.send(Control::Garbage);
    }

    /// While unavailable, upgrades and REST calls get 503 (an outage).
    pub fn set_available(&self, available: bool) {
        self.inner.available.store(available, Ordering::SeqCst);
    }

    /// While `Some(s)`, `exchangeInfo` answers 429 with `Retry-After: s`, as Binance does when
    /// the IP's request weight is spent.
    pub fn set_rest_rate_limited(&self, retry_after_s: Option<u64>) {
        *lock(&self.inner.rest_limited) = retry_after_s;
    }

    /// `exchangeInfo` requests received.
    pub fn exchange_info_requests(&self) -> u64 {
        self.inner.exchange_info_requests.load(Ordering::SeqCst)
    }

    /// While stalled, open connections go silent: no data, no pings.
    /// While set, the REST trade endpoints refuse (503); WebSocket and the rest are served.
    pub fn refuse_trades_rest(&self, refuse: bool) {
        self.inner.trades_refused.store(refuse, Ordering::SeqCst);
    }

    /// Forgets every trade made so far: a backfill can no longer reach them.
    pub fn forget_trades(&self) {
        for m in lock(&self.inner.markets).iter_mut() {
            m.forget_tape();
        }
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.inner.stalled.store(stalled, Ordering::SeqCst);
    }
}

fn d8(v: f64) -> String {
    format!("{v:.8}")
}

fn emit(inner: &Inner, stream: String, data: Value) {
    let raw = data.to_string();
    let combined = format!("{{\"stream\":\"{stream}\",\"data\":{raw}}}");
    let _ = inner.frames.send(Arc::new(SimFrame {
        stream,
        raw: Utf8Bytes::from(raw),
        combined: Utf8Bytes::from(combined),
    }));
}

fn trade_json(symbol: &str, t: &SimTrade, now: i64) -> Value {
    json!({"e":"trade","E":now,"s":symbol,"t":t.id,"p":d8(t.price),"q":d8(t.qty),"T":t.time_ms,"m":t.taker_sold,"M":true})
}

fn kline_json(symbol: &str, c: &Candle, is_final: bool, now: i64) -> Value {
    json!({"e":"kline","E":now,"s":symbol,"k":{
        "t":c.open_time,"T":c.close_time,"s":symbol,"i":c.interval.as_str(),"f":c.first_id,"L":c.last_id,
        "o":d8(c.open),"c":d8(c.close),"h":d8(c.high),"l":d8(c.low),"v":d8(c.volume),"n":c.trades,
        "x":is_final,"q":d8(c.quote_volume),"V":"0","Q":"0","B":"0"}})
}

fn ticker_json(m: &Market, now: i64) -> Value {
    let s = &m.stats;
    let (bid, bid_qty) = m.best_bid();
    let (ask, ask_qty) = m.best_ask();
    let change = s.last - s.open;
    let vwap = if s.volume > 0.0 {
        s.quote_volume / s.volume
    } else {
        s.last
    };
    json!({"e":"24hrTicker","E":now,"s":m.symbol,"p":d8(change),"P":format!("{:.3}", change / s.open * 100.0),
        "w":d8(vwap),"x":d8(s.open),"c":d8(s.last),"Q":d8(s.last_qty),"b":d8(bid),"B":d8(bid_qty),
        "a":d8(ask),"A":d8(ask_qty),"o":d8(s.open),"h":d8(s.high),"l":d8(s.low),"v":d8(s.volume),
        "q":d8(s.quote_volume),"O":now - 86_400_000,"C":now,"F":s.first_id,"L":s.first_id + s.count,"n":s.count})
}

fn depth_json(m: &Market, levels: usize, update_id: u64) -> Value {
    let side = |v: &[(f64, f64)]| -> Vec<[String; 2]> {
        v.iter()
            .take(levels)
            .map(|(p, q)| [d8(*p), d8(*q)])
            .collect()
    };
    json!({"lastUpdateId":update_id,"bids":side(&m.bids),"asks":side(&m.asks)})
}

/// Steps every market and publishes what subscribed streams would see, at Binance's cadences.
async fn run_market(inner: Arc<Inner>, stop: CancellationToken) {
    let opts = inner.opts.clone();
    let mut tick = tokio::time::interval(opts.step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let (mut next_ticker, mut next_kline, mut next_kline_1s, mut next_depth) =
        (start, start, start, start);
    let mut last = Instant::now();
    let mut update_id = 1u64;
    let clock = super::util::SimClock::new(opts.time_scale);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let now_ms = clock.now_ms();
        let wanted: HashSet<String> = lock(&inner.streams)
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| k.clone())
            .collect();
        let due = |t: &mut Instant, every: Duration| {
            if now >= *t {
                *t = now + every;
                true
            } else {
                false
            }
        };
        let ticker_due = due(&mut next_ticker, opts.ticker_every);
        let kline_due = due(&mut next_kline, opts.kline_every);
        let kline_1s_due = due(
            &mut next_kline_1s,
            opts.kline_every.min(Duration::from_secs(1)),
        );
        let depth_due = due(&mut next_depth, opts.depth_every);
        let mut markets = lock(&inner.markets);
        for m in markets.iter_mut() {
            let (trades, closed) = m.step(now_ms, dt);
            let sym = m.symbol.to_lowercase();
            let trade_stream = format!("{sym}@trade");
            if wanted.contains(&trade_stream) {
                for t in &trades {
                    emit(
                        &inner,
                        trade_stream.clone(),
                        trade_json(&m.symbol, t, now_ms),
                    );
                }
            }
            for c in &closed {
                let stream = format!("{sym}@kline_{}", c.interval);
                if wanted.contains(&stream) {
                    emit(&inner, stream, kline_json(&m.symbol, c, true, now_ms));
                }
            }
            if ticker_due {
                let stream = format!("{sym}@ticker");
                if wanted.contains(&stream) {
                    emit(&inner, stream, ticker_json(m, now_ms));
                }
            }
            if kline_due || kline_1s_due {
                for (iv, c) in &m.forming {
                    let due_now = if *iv == Interval::S1 {
                        kline_1s_due
                    } else {
                        kline_due
                    };
                    let stream = format!("{sym}@kline_{iv}");
                    if due_now && wanted.contains(&stream) {
                        emit(&inner, stream, kline_json(&m.symbol, c, false, now_ms));
                    }
                }
            }
            if depth_due {
                update_id += 1;
                for levels in [5, 10, 20] {
                    for suffix in ["@100ms", ""] {
                        let stream = format!("{sym}@depth{levels}{suffix}");
                        if wanted.contains(&stream) {
                            emit(&inner, stream, depth_json(m, levels, update_id));
                        }
                    }
                }
            }
        }
    }
}

async fn ws_combined(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let initial = url_streams(&q);
    ws.on_upgrade(move |socket| connection(socket, inner, initial, true))
}

/// The streams a combined-stream URL names (`/stream?streams=a@trade/b@ticker`): subscribed
/// from the start.
pub fn url_streams(query: &HashMap<String, String>) -> Vec<String> {
    query
        .get("streams")
        .map(|s| {
            s.split('/')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

async fn ws_raw(State(inner): State<Arc<Inner>>, ws: WebSocketUpgrade) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    ws.on_upgrade(move |socket| connection(socket, inner, Vec::new(), false))
}

async fn ws_raw_one(
    State(inner): State<Arc<Inner>>,
    Path(stream): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    ws.on_upgrade(move |socket| connection(socket, inner, vec![stream], false))
}

/// Subscribes `conn` to `streams` as Binance would: names are taken as given (an unknown or
/// upper-case one simply never gets data).
fn add_streams(
    inner: &Inner,
    subscribed: &mut HashSet<String>,
    streams: &[String],
) -> Result<(), String> {
    lock(&inner.requested_ever).extend(streams.iter().cloned());
    let new: Vec<&String> = streams
        .iter()
        .filter(|s| !subscribed.contains(*s))
        .collect();
    if subscribed.len() + new.len() > inner.opts.max_streams_per_connection {
        return Err("Invalid request: too many streams".into());
    }
    let mut map = lock(&inner.streams);
    for s in new {
        subscribed.insert(s.clone());
        *map.entry(s.clone()).or_default() += 1;
    }
    Ok(())
}

fn remove_streams(inner: &Inner, subscribed: &mut HashSet<String>, streams: &[String]) {
    let mut map = lock(&inner.streams);
    for s in streams {
        if subscribed.remove(s) {
            if let Some(n) = map.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    map.remove(s);
                }
            }
        }
    }
}

/// Answers one request frame; `None` when it deserves no answer.
fn handle_request(inner: &Inner, subscribed: &mut HashSet<String>, text: &str) -> String {
    let err = |code: i64, msg: &str, id: &Value| {
        json!({"error": {"code": code, "msg": msg}, "id": id}).to_string()
    };
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return err(
            3,
            "Invalid JSON: expected value at line 1 column 1",
            &Value::Null,
        );
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let id_ok = match &id {
        Value::Null => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::String(s) => s.len() <= 36 && s.chars().all(|c| c.is_ascii_alphanumeric()),
        _ => false,
    };
    if !id_ok {
        return err(
            2,
            "Invalid request: request ID must be an unsigned integer",
            &Value::Null,
        );
    }
    let params: Vec<String> = match req.get("params") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let names: Option<Vec<String>> =
                items.iter().map(|v| v.as_str().map(String::from)).collect();
            match names {
                Some(n) => n,
                None => return err(2, "Invalid request: invalid stream", &id),
            }
        }
        Some(_) => return err(2, "Invalid request: invalid stream", &id),
    };
    match req.get("method").and_then(Value::as_str) {
        Some("SUBSCRIBE") => match add_streams(inner, subscribed, &params) {
            Ok(()) => json!({"result": null, "id": id}).to_string(),
            Err(msg) => err(2, &msg, &id),
        },
        Some("UNSUBSCRIBE") => {
            remove_streams(inner, subscribed, &params);
            json!({"result": null, "id": id}).to_string()
        }
        Some("LIST_SUBSCRIPTIONS") => {
            let mut list: Vec<&String> = subscribed.iter().collect();
            list.sort();
            json!({"result": list, "id": id}).to_string()
        }
        Some(other) => err(
            2,
            &format!("Invalid request: unknown variant {other}, expected one of SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY at line 1 column 28"),
            &id,
        ),
        None => err(2, "Invalid request: missing field method at line 1 column 73", &id),
    }
}

async fn connection(socket: WebSocket, inner: Arc<Inner>, initial: Vec<String>, combined: bool) {
    inner.connections.fetch_add(1, Ordering::SeqCst);
    inner.connects.fetch_add(1, Ordering::SeqCst);
    let mut subscribed = HashSet::new();
    let _ = add_streams(&inner, &mut subscribed, &initial);
    let (mut tx, mut rx) = socket.split();
    let mut frames = inner.frames.subscribe();
    let mut control = inner.control.subscribe();
    let opts = inner.opts.clone();
    let mut window: VecDeque<Instant> = VecDeque::new();
    let mut ping = tokio::time::interval_at(Instant::now() + opts.ping_every, opts.ping_every);
    let mut last_pong = Instant::now();
    let mut pending_ping = false;
    loop {
        tokio::select! {
            incoming = rx.next() => {
                let Some(Ok(incoming)) = incoming else { break };
                if matches!(incoming, Message::Close(_)) {
                    break;
                }
                inner.control_messages.fetch_add(1, Ordering::SeqCst);
                let now = Instant::now();
                window.push_back(now);
                while window.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
                    window.pop_front();
                }
                if window.len() > opts.max_incoming_per_sec {
                    inner.rate_limit_closes.fetch_add(1, Ordering::SeqCst);
                    let frame = CloseFrame { code: 1008, reason: "Too many requests".into() };
                    let _ = tx.send(Message::Close(Some(frame))).await;
                    break;
                }
                match incoming {
                    Message::Text(text) => {
                        let reply = handle_request(&inner, &mut subscribed, text.as_str());
                        if tx.send(Message::text(reply)).await.is_err() {
                            break;
                        }
                    }
                    Message::Pong(_) => {
                        last_pong = Instant::now();
                        pending_ping = false;
                    }
                    _ => {}
                }
            }
            frame = frames.recv() => match frame {
                Ok(f) => {
                    if inner.stalled.load(Ordering::SeqCst) || !subscribed.contains(&f.stream) {
                        continue;
                    }
                    let text = if combined { f.combined.clone() } else { f.raw.clone() };
                    if tx.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            c = control.recv() => match c {
                Ok(Control::Kill) => break,
                Ok(Control::Garbage) => {
                    let _ = tx.send(Message::text("{\"stream\":\"btcusdt@trade\",\"data\":{\"e\":\"tra")).await;
                }
                Ok(Control::ServerShutdown) => {
                    let event = json!({"e":"serverShutdown","E":now_millis()});
                    let text = if combined { json!({"stream":"!serverShutdown","data":event}) } else { event };
                    let _ = tx.send(Message::text(text.to_string())).await;
                }
                Err(_) => {}
            },
            _ = ping.tick() => {
                if inner.stalled.load(Ordering::SeqCst) {
                    continue;
                }
                if pending_ping && last_pong.elapsed() >= opts.pong_timeout {
                    let frame = CloseFrame { code: 1008, reason: "Pong timeout".into() };
                    let _ = tx.send(Message::Close(Some(frame))).await;
                    break;
                }
                pending_ping = true;
                if tx.send(Message::Ping("sim".into())).await.is_err() {
                    break;
                }
            }
        }
    }
    let all: Vec<String> = subscribed.iter().cloned().collect();
    remove_streams(&inner, &mut subscribed, &all);
    inner.connections.fetch_sub(1, Ordering::SeqCst);
}

#[derive(serde::Deserialize)]
struct SymbolQuery {
    symbol: Option<String>,
    limit: Option<usize>,
    interval: Option<String>,
    #[serde(rename = "fromId")]
    from_id: Option<u64>,
    #[serde(rename = "endTime")]
    end_time: Option<i64>,
}

fn trade_rows(trades: &[super::market::SimTrade]) -> Value {
    Value::Array(
        trades
            .iter()
            .map(|t| {
                json!({"id": t.id, "price": d8(t.price), "qty": d8(t.qty), "quoteQty": d8(t.price * t.qty),
                    "time": t.time_ms, "isBuyerMaker": t.taker_sold, "isBestMatch": true})
            })
            .collect(),
    )
}

/// `GET /api/v3/trades`: the newest `limit` (default 500, at most 1000), oldest first.
async fn recent_trades(State(inner): State<Arc<Inner>>, Query(q): Query<SymbolQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) || inner.trades_refused.load(Ordering::SeqCst) {
        return unavailable();
    }
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    match with_market(&inner, &q.symbol, |m| m.latest_trades(limit)) {
        Some(t) => Json(trade_rows(&t)).into_response(),
        None => bad_symbol(),
    }
}

/// `GET /api/v3/historicalTrades`: from `fromId` on (default: the newest `limit`), ascending.
async fn historical_trades(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<SymbolQuery>,
) -> Response {
    if !inner.available.load(Ordering::SeqCst) || inner.trades_refused.load(Ordering::SeqCst) {
        return unavailable();
    }
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    let trades = with_market(&inner, &q.symbol, |m| match q.from_id {
        Some(from) => m.trades_from_id(from, limit),
        None => m.latest_trades(limit),
    });
    match trades {
        Some(t) => Json(trade_rows(&t)).into_response(),
        None => bad_symbol(),
    }
}

fn bad_symbol() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": -1121, "msg": "Invalid symbol."})),
    )
        .into_response()
}

fn with_market<T>(
    inner: &Inner,
    symbol: &Option<String>,
    f: impl FnOnce(&Market) -> T,
) -> Option<T> {
    let symbol = symbol.as_deref()?;
    lock(&inner.markets)
        .iter()
        .find(|m| m.symbol == symbol)
        .map(f)
}

async fn exchange_info(State(inner): State<Arc<Inner>>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    inner.exchange_info_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(secs) = *lock(&inner.rest_limited) {
        let body = json!({"code": -1003, "msg": "Too much request weight used; current limit is 6000 request weight per 1 MINUTE."});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, secs.to_string())],
            Json(body),
        )
            .into_response();
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        inner.exchange_info.clone(),
    )
        .into_response()
}

async fn ticker_24hr(State(inner): State<Arc<Inner>>, Query(q): Query<SymbolQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let now = now_millis();
    match with_market(&inner, &q.symbol, |m| {
        let t = ticker_json(m, now);
        json!({"symbol": m.symbol, "priceChange": t["p"], "priceChangePercent": t["P"],
            "weightedAvgPrice": t["w"], "prevClosePrice": t["x"], "lastPrice": t["c"], "lastQty": t["Q"],
            "bidPrice": t["b"], "bidQty": t["B"], "askPrice": t["a"], "askQty": t["A"], "openPrice": t["o"],
            "highPrice": t["h"], "lowPrice": t["l"], "volume": t["v"], "quoteVolume": t["q"],
            "openTime": t["O"], "closeTime": t["C"], "firstId": t["F"], "lastId": t["L"], "count": t["n"]})
    }) {
        Some(v) => Json(v).into_response(),
        None => bad_symbol(),
    }
}

async fn depth(State(inner): State<Arc<Inner>>, Query(q): Query<SymbolQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let limit = q.limit.unwrap_or(100).min(5000);
    match with_market(&inner, &q.symbol, |m| {
        depth_json(m, limit, now_millis() as u64)
    }) {
        Some(v) => Json(v).into_response(),
        None => bad_symbol(),
    }
}

async fn klines(State(inner): State<Arc<Inner>>, Query(q): Query<SymbolQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let Some(interval) = q
        .interval
        .as_deref()
        .and_then(|i| i.parse::<Interval>().ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": -1120, "msg": "Invalid interval."})),
        )
            .into_response();
    };
    let limit = q.limit.unwrap_or(500).min(1000);
    let row = |c: &Candle| {
        json!([
            c.open_time,
            d8(c.open),
            d8(c.high),
            d8(c.low),
            d8(c.close),
            d8(c.volume),
            c.close_time,
            d8(c.quote_volume),
            c.trades,
            "0",
            "0",
            "0"
        ])
    };
    match with_market(&inner, &q.symbol, |m| {
        let mut rows: Vec<Value> = m
            .history
            .get(&interval)
            .map(|h| h.iter().map(row).collect())
            .unwrap_or_default();
        if let Some(c) = m.forming.get(&interval) {
            rows.push(row(c));
        }
        if let Some(end) = q.end_time {
            rows.retain(|r| r[0].as_i64().is_some_and(|t| t <= end));
        }
        let skip = rows.len().saturating_sub(limit);
        rows.split_off(skip)
    }) {
        Some(rows) => Json(Value::Array(rows)).into_response(),
        None => bad_symbol(),
    }
}
