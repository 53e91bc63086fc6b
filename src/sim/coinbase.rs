//! A simulated Coinbase Advanced Trade market-data feed on loopback (EXCHANGES.md §2.2, §6):
//! every message in the `{channel, client_id, timestamp, sequence_num, events}` envelope with
//! `sequence_num` counting per connection, one channel per subscribe (an unknown channel is
//! answered "authentication failure", as Coinbase does), unknown products silently left out of
//! the `subscriptions` ack, `-USDC` products answered as `-USD`, a subscribe required within
//! 5 s, more than 8 messages a second refused, `heartbeats` every second, `l2_data` snapshots
//! (unsorted) and updates with `bid`/`offer`, `market_trades` whose `side` is the maker's, and
//! `ticker` with best bid/ask. REST: `market/products` (from `fixtures/coinbase/products.json`)
//! and `market/products/{id}/candles`.
//!
//! Test controls: skip a sequence number, kill connections, read back true books and candles.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kraken::TopBook;
use super::market::{default_specs, Candle, Market, SimTrade};
use super::util::{add_ref, decimals, drop_ref, lock, rfc3339, unavailable};
use super::SimOptions;
use crate::domain::Interval;
use crate::protocol::now_millis;

const BOOK_HISTORY: usize = 400;
/// Unauthenticated messages a connection may send per second.
const MAX_MESSAGES_PER_SEC: usize = 8;

#[derive(Clone, Debug)]
struct Product {
    id: String,
    /// The product whose data answers for this one (`BTC-USDC` → `BTC-USD`).
    data_id: String,
    price_dp: usize,
    size_dp: usize,
    tradable: bool,
}

/// Events of one channel for one product, wrapped per connection (each has its own sequence).
struct Frame {
    /// `level2:BTC-USD`, `market_trades:BTC-USD`, `ticker:BTC-USD`.
    key: String,
    channel: &'static str,
    events: String,
}

#[derive(Clone, Copy, Debug)]
enum Control {
    Kill,
    SkipSequence,
}

struct Inner {
    opts: SimOptions,
    products: Vec<Product>,
    products_json: String,
    /// Market per data product id.
    markets: Mutex<HashMap<String, Market>>,
    recent_trades: Mutex<HashMap<String, VecDeque<SimTrade>>>,
    frames: broadcast::Sender<Arc<Frame>>,
    control: broadcast::Sender<Control>,
    /// `channel:data product` → subscribed connections.
    subscriptions: Mutex<HashMap<String, usize>>,
    books: Mutex<HashMap<String, VecDeque<TopBook>>>,
    closed: Mutex<HashMap<(String, Interval), Vec<Candle>>>,
    available: AtomicBool,
    /// The REST trade endpoints answer 503 (history and backfill refused, the rest served).
    trades_refused: AtomicBool,
    connections: AtomicUsize,
    connects: AtomicU64,
    rate_limit_closes: AtomicU64,
}

/// A running simulated Coinbase; stops when dropped.
pub struct SimCoinbase {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for SimCoinbase {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SimCoinbase {
    pub async fn start(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimCoinbase> {
        let addr = listener.local_addr()?;
        let products_json = include_str!("../../fixtures/coinbase/products.json").to_string();
        let listing: Value = serde_json::from_str(&products_json).unwrap_or_default();
        let specs = default_specs();
        let mut products = Vec::new();
        let mut markets = HashMap::new();
        for p in listing["products"].as_array().into_iter().flatten() {
            let id = p["product_id"].as_str().unwrap_or_default().to_string();
            let alias = p["alias"].as_str().filter(|a| !a.is_empty());
            let step = |k: &str| {
                p[k].as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(0.01)
            };
            let product = Product {
                data_id: alias.unwrap_or(&id).to_string(),
                price_dp: decimals(step("quote_increment")),
                size_dp: decimals(step("base_increment")),
                tradable: p["status"] == "online" && p["trading_disabled"] == false,
                id,
            };
            if product.data_id == product.id {
                let (b, q) = product.id.split_once('-').unwrap_or_default();
                if let Some((i, spec)) = specs
                    .iter()
                    .enumerate()
                    .find(|(_, s)| s.base == b && s.quote == q)
                {
                    let mut spec = spec.clone();
                    spec.trades_per_sec *= opts.rate_scale;
                    markets.insert(
                        product.id.clone(),
                        Market::new(spec, opts.seed.wrapping_add(200 + i as u64)).warmed(
                            crate::protocol::now_millis(),
                            super::market::WARM_UP_MS,
                            opts.time_scale,
                        ),
                    );
                }
            }
            products.push(product);
        }
        let inner = Arc::new(Inner {
            products,
            products_json,
            markets: Mutex::new(markets),
            recent_trades: Mutex::new(HashMap::new()),
            frames: broadcast::channel(65_536).0,
            control: broadcast::channel(16).0,
            subscriptions: Mutex::new(HashMap::new()),
            books: Mutex::new(HashMap::new()),
            closed: Mutex::new(HashMap::new()),
            available: AtomicBool::new(true),
            trades_refused: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            rate_limit_closes: AtomicU64::new(0),
            opts,
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/", get(ws))
            .route("/api/v3/brokerage/market/products", get(products_handler))
            .route(
                "/api/v3/brokerage/market/products/{id}/ticker",
                get(ticker_handler),
            )
            .route(
                "/api/v3/brokerage/market/products/{id}/candles",
                get(candles_handler),
            )
            .with_state(inner.clone());
        super::util::serve(
            listener,
            app,
            run_market(inner.clone(), stop.clone()),
            &stop,
        );
        Ok(SimCoinbase { inner, addr, stop })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::SeqCst)
    }

    pub fn rate_limit_closes(&self) -> u64 {
        self.inner.rate_limit_closes.load(Ordering::SeqCst)
    }

    /// `channel:product` → connections subscribed (products as the data is answered).
    pub fn subscriptions(&self) -> HashMap<String, usize> {
        lock(&self.inner.subscriptions).clone()
    }

    pub fn kill_connections(&self) {
        let _ = self.inner.control.send(Control::Kill);
    }

    /// Every connection's next message skips a sequence number, as if one had been lost.
    pub fn skip_sequence(&self) {
        let _ = self.inner.control.send(Control::SkipSequence);
    }

    /// While set, the REST trade endpoints refuse (503); WebSocket and the rest are served.
    pub fn refuse_trades_rest(&self, refuse: bool) {
        self.inner.trades_refused.store(refuse, Ordering::SeqCst);
    }

    /// Forgets every trade made so far: a backfill can no longer reach them.
    pub fn forget_trades(&self) {
        for m in lock(&self.inner.markets).values_mut() {
            m.forget_tape();
        }
    }

    pub fn set_available(&self, available: bool) {
        self.inner.available.store(available, Ordering::SeqCst);
    }

    /// The last trades of a product (up to 50): id and whether the taker sold.
    pub fn recent_trades(&self, product: &str) -> Vec<(u64, bool)> {
        lock(&self.inner.recent_trades)
            .get(product)
            .map(|r| r.iter().map(|t| (t.id, t.taker_sold)).collect())
            .unwrap_or_default()
    }

    pub fn published_books(&self, product: &str) -> Vec<TopBook> {
        lock(&self.inner.books)
            .get(product)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn closed_candles(&self, product: &str, interval: Interval) -> Vec<Candle> {
        lock(&self.inner.closed)
            .get(&(product.to_string(), interval))
            .cloned()
            .unwrap_or_default()
    }
}

fn fmt(v: f64, dp: usize) -> String {
    format!("{v:.dp$}")
}

fn emit(inner: &Inner, key: String, channel: &'static str, events: Value) {
    let _ = inner.frames.send(Arc::new(Frame {
        key,
        channel,
        events: events.to_string(),
    }));
}

fn l2_updates(side: &str, levels: &[(f64, f64)], p: &Product, now: &str) -> Vec<Value> {
    levels
        .iter()
        .map(|(price, qty)| json!({"side": side, "event_time": now, "price_level": fmt(*price, p.price_dp), "new_quantity": fmt(*qty, p.size_dp)}))
        .collect()
}

fn l2_snapshot(m: &Market, p: &Product) -> Value {
    let t = rfc3339(now_millis());
    // Coinbase's snapshot is not sorted: send the levels worst first.
    let mut updates = l2_updates("bid", &m.bids, p, &t);
    updates.extend(l2_updates("offer", &m.asks, p, &t));
    updates.reverse();
    json!([{"type": "snapshot", "product_id": p.data_id, "updates": updates}])
}

fn ticker_events(m: &Market, p: &Product, kind: &str) -> Value {
    let s = &m.stats;
    let (bid, bid_qty) = m.best_bid();
    let (ask, ask_qty) = m.best_ask();
    json!([{"type": kind, "tickers": [{"type": "ticker", "product_id": p.data_id, "price": fmt(s.last, p.price_dp),
        "volume_24_h": fmt(s.volume, p.size_dp), "low_24_h": fmt(s.low, p.price_dp), "high_24_h": fmt(s.high, p.price_dp),
        "low_52_w": fmt(s.low, p.price_dp), "high_52_w": fmt(s.high, p.price_dp),
        "price_percent_chg_24_h": format!("{:.8}", (s.last - s.open) / s.open * 100.0),
        "best_bid": fmt(bid, p.price_dp), "best_bid_quantity": fmt(bid_qty, p.size_dp),
        "best_ask": fmt(ask, p.price_dp), "best_ask_quantity": fmt(ask_qty, p.size_dp)}]}])
}

fn trades_events(trades: &[SimTrade], p: &Product, kind: &str) -> Value {
    // Newest first, as Coinbase batches them; `side` is the maker's.
    let list: Vec<Value> = trades
        .iter()
        .rev()
        .map(|t| json!({"trade_id": t.id.to_string(), "product_id": p.data_id, "price": fmt(t.price, p.price_dp),
            "size": fmt(t.qty, p.size_dp), "side": if t.taker_sold { "BUY" } else { "SELL" }, "time": rfc3339(t.time_ms)}))
        .collect();
    json!([{"type": kind, "trades": list}])
}

fn diff(old: &[(f64, f64)], new: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = old
        .iter()
        .filter(|(p, _)| !new.iter().any(|(np, _)| np == p))
        .map(|(p, _)| (*p, 0.0))
        .collect();
    out.extend(new.iter().filter(|l| !old.contains(l)).copied());
    out
}

fn top10(m: &Market) -> TopBook {
    let side = |v: &[(f64, f64)]| v.iter().take(10).map(|(p, q)| [*p, *q]).collect();
    (side(&m.bids), side(&m.asks))
}

async fn run_market(inner: Arc<Inner>, stop: CancellationToken) {
    let opts = inner.opts.clone();
    let mut tick = tokio::time::interval(opts.step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut next_ticker = last;
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
        let ticker_due = now >= next_ticker;
        if ticker_due {
            next_ticker = now + opts.ticker_every;
        }
        let wanted: HashSet<String> = lock(&inner.subscriptions).keys().cloned().collect();
        let mut markets = lock(&inner.markets);
        for p in inner.products.iter().filter(|p| p.id == p.data_id) {
            let Some(m) = markets.get_mut(&p.id) else {
                continue;
            };
            let (old_bids, old_asks) = (m.bids.clone(), m.asks.clone());
            let (trades, closed) = m.step(now_ms, dt);
            {
                let mut store = lock(&inner.closed);
                for c in &closed {
                    store
                        .entry((p.id.clone(), c.interval))
                        .or_default()
                        .push(c.clone());
                }
                let mut history = lock(&inner.books);
                let h = history.entry(p.id.clone()).or_default();
                if h.back() != Some(&top10(m)) {
                    h.push_back(top10(m));
                }
                if h.len() > BOOK_HISTORY {
                    h.pop_front();
                }
                let mut recent = lock(&inner.recent_trades);
                let r = recent.entry(p.id.clone()).or_default();
                r.extend(trades.iter().cloned());
                while r.len() > 50 {
                    r.pop_front();
                }
            }
            let key = |ch: &str| format!("{ch}:{}", p.id);
            if !trades.is_empty() && wanted.contains(&key("market_trades")) {
                emit(
                    &inner,
                    key("market_trades"),
                    "market_trades",
                    trades_events(&trades, p, "update"),
                );
            }
            if ticker_due && wanted.contains(&key("ticker")) {
                emit(
                    &inner,
                    key("ticker"),
                    "ticker",
                    ticker_events(m, p, "update"),
                );
            }
            if wanted.contains(&key("level2")) {
                let t = rfc3339(now_ms);
                let mut updates = l2_updates("bid", &diff(&old_bids, &m.bids), p, &t);
                updates.extend(l2_updates("offer", &diff(&old_asks, &m.asks), p, &t));
                if !updates.is_empty() {
                    emit(
                        &inner,
                        key("level2"),
                        "l2_data",
                        json!([{"type": "update", "product_id": p.id, "updates": updates}]),
                    );
                }
            }
        }
    }
}

async fn ws(State(inner): State<Arc<Inner>>, upgrade: WebSocketUpgrade) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    upgrade.on_upgrade(move |socket| connection(socket, inner))
}

/// One connection's envelope writer: every message gets the next sequence number.
struct Envelope {
    seq: u64,
}

impl Envelope {
    fn wrap(&mut self, channel: &str, events: &str) -> String {
        let seq = self.seq;
        self.seq += 1;
        format!(
            "{{\"channel\":\"{channel}\",\"client_id\":\"\",\"timestamp\":\"{}\",\"sequence_num\":{seq},\"events\":{events}}}",
            rfc3339(now_millis())
        )
    }
}

/// Answers one request: the messages to send (already wrapped), or `Err` to close.
fn handle(
    inner: &Inner,
    env: &mut Envelope,
    subs: &mut BTreeMap<String, HashSet<String>>,
    keys: &mut HashSet<String>,
    text: &str,
) -> Vec<String> {
    let error = |m: &str| json!({"type": "error", "message": m}).to_string();
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return vec![error("failure to parse message")];
    };
    let kind = req["type"].as_str().unwrap_or_default();
    if kind != "subscribe" && kind != "unsubscribe" {
        return vec![error("unknown message type")];
    }
    let Some(channel) = req["channel"].as_str() else {
        // The Exchange feed's `channels` array is not Advanced Trade's protocol.
        return vec![error(
            "channel is required; subscribe to one channel per message",
        )];
    };
    let known = [
        "heartbeats",
        "ticker",
        "ticker_batch",
        "market_trades",
        "level2",
        "candles",
        "status",
    ];
    if !known.contains(&channel) {
        return vec![error("authentication failure")];
    }
    let requested: Vec<&str> = req["product_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut snapshots = Vec::new();
    for id in requested {
        // Unknown or untradable products are silently left out, as on Coinbase.
        let Some(p) = inner.products.iter().find(|p| p.id == id && p.tradable) else {
            continue;
        };
        let key = format!("{channel}:{}", p.data_id);
        let held = subs.entry(channel.to_string()).or_default();
        if kind == "subscribe" {
            if !held.insert(p.id.clone()) {
                continue;
            }
            if keys.insert(key.clone()) {
                add_ref(&inner.subscriptions, &key);
            }
            let markets = lock(&inner.markets);
            if let Some(m) = markets.get(&p.data_id) {
                match channel {
                    "level2" => snapshots.push(("l2_data", l2_snapshot(m, p).to_string())),
                    "ticker" => {
                        snapshots.push(("ticker", ticker_events(m, p, "snapshot").to_string()))
                    }
                    "market_trades" => {
                        let recent: Vec<SimTrade> = lock(&inner.recent_trades)
                            .get(&p.data_id)
                            .map(|r| r.iter().cloned().collect())
                            .unwrap_or_default();
                        snapshots.push((
                            "market_trades",
                            trades_events(&recent, p, "snapshot").to_string(),
                        ));
                    }
                    _ => {}
                }
            }
        } else {
            held.remove(&p.id);
            let still = held.iter().any(|other| {
                inner
                    .products
                    .iter()
                    .any(|q| &q.id == other && q.data_id == p.data_id)
            });
            if !still && keys.remove(&key) {
                drop_ref(&inner.subscriptions, &key);
            }
        }
    }
    if channel == "heartbeats" {
        let held = subs.entry("heartbeats".into()).or_default();
        if kind == "subscribe" {
            held.insert(String::new());
        } else {
            held.clear();
        }
    }
    let listing: serde_json::Map<String, Value> = subs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            (
                k.clone(),
                json!(v.iter().filter(|p| !p.is_empty()).collect::<Vec<_>>()),
            )
        })
        .collect();
    // The snapshot may come before the ack, as on Coinbase.
    for (ch, events) in snapshots {
        out.push(env.wrap(ch, &events));
    }
    out.push(env.wrap(
        "subscriptions",
        &json!([{"subscriptions": listing}]).to_string(),
    ));
    out
}

async fn connection(socket: WebSocket, inner: Arc<Inner>) {
    inner.connections.fetch_add(1, Ordering::SeqCst);
    inner.connects.fetch_add(1, Ordering::SeqCst);
    let (mut tx, mut rx) = socket.split();
    let mut frames = inner.frames.subscribe();
    let mut control = inner.control.subscribe();
    let mut env = Envelope { seq: 0 };
    let mut subs: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut keys: HashSet<String> = HashSet::new();
    let mut window: VecDeque<Instant> = VecDeque::new();
    let first_subscribe_deadline = Instant::now() + Duration::from_secs(5);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut counter = 0u64;
    loop {
        tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let now = Instant::now();
                    window.push_back(now);
                    while window.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
                        window.pop_front();
                    }
                    if window.len() > MAX_MESSAGES_PER_SEC {
                        inner.rate_limit_closes.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(Message::text(json!({"type": "error", "message": "rate limit exceeded"}).to_string())).await;
                        let _ = tx.send(Message::Close(Some(CloseFrame { code: 1008, reason: "rate limit exceeded".into() }))).await;
                        break;
                    }
                    let mut ok = true;
                    for reply in handle(&inner, &mut env, &mut subs, &mut keys, text.as_str()) {
                        if tx.send(Message::text(reply)).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if !ok {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            frame = frames.recv() => match frame {
                Ok(f) => {
                    if keys.contains(&f.key) && tx.send(Message::text(env.wrap(f.channel, &f.events))).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            c = control.recv() => match c {
                Ok(Control::Kill) => break,
                Ok(Control::SkipSequence) => env.seq += 1,
                Err(_) => {}
            },
            _ = heartbeat.tick() => {
                if subs.is_empty() && Instant::now() >= first_subscribe_deadline {
                    // Coinbase disconnects a client that has not subscribed within 5 s.
                    break;
                }
                if subs.get("heartbeats").is_some_and(|h| !h.is_empty()) {
                    counter += 1;
                    let events = json!([{"current_time": rfc3339(now_millis()), "heartbeat_counter": counter}]);
                    if tx.send(Message::text(env.wrap("heartbeats", &events.to_string()))).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    for key in keys {
        drop_ref(&inner.subscriptions, &key);
    }
    inner.connections.fetch_sub(1, Ordering::SeqCst);
}

async fn products_handler(State(inner): State<Arc<Inner>>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        inner.products_json.clone(),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct CandleQuery {
    start: Option<i64>,
    end: Option<i64>,
    granularity: Option<String>,
}

#[derive(serde::Deserialize)]
struct TickerQuery {
    limit: Option<usize>,
    start: Option<String>,
    end: Option<String>,
}

/// `GET /market/products/{id}/ticker`: the newest `limit` trades (at most 100) inside
/// `[start, end]` (UNIX seconds), newest first, `side` the maker's; and the best bid and ask.
async fn ticker_handler(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(q): Query<TickerQuery>,
) -> Response {
    if !inner.available.load(Ordering::SeqCst) || inner.trades_refused.load(Ordering::SeqCst) {
        return unavailable();
    }
    let Some(limit) = q.limit else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "INVALID_ARGUMENT", "message": "limit is required"})),
        )
            .into_response();
    };
    let Some(p) = inner.products.iter().find(|p| p.id == id) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(json!({"error": "NOT_FOUND", "message": "product not found"})),
        )
            .into_response();
    };
    let secs = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<i64>().ok());
    let (start, end) = (secs(&q.start), secs(&q.end));
    let markets = lock(&inner.markets);
    let Some(m) = markets.get(&p.data_id) else {
        return Json(json!({"trades": [], "best_bid": "", "best_ask": ""})).into_response();
    };
    let trades: Vec<Value> = m
        .tape
        .iter()
        .rev()
        .filter(|t| start.is_none_or(|s| t.time_ms >= s * 1000))
        .filter(|t| end.is_none_or(|e| t.time_ms < e * 1000))
        // At most 100 rows whatever is asked (EXCHANGES.md §0.1).
        .take(limit.clamp(1, 100))
        .map(|t| json!({"trade_id": t.id.to_string(), "product_id": p.id, "price": fmt(t.price, p.price_dp),
            "size": fmt(t.qty, p.size_dp), "time": rfc3339(t.time_ms), "side": if t.taker_sold { "BUY" } else { "SELL" },
            "bid": "", "ask": ""}))
        .collect();
    let (bid, _) = m.best_bid();
    let (ask, _) = m.best_ask();
    Json(json!({"trades": trades, "best_bid": fmt(bid, p.price_dp), "best_ask": fmt(ask, p.price_dp)}))
        .into_response()
}

async fn candles_handler(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(q): Query<CandleQuery>,
) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let bad = |m: &str| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "INVALID_ARGUMENT", "message": m})),
        )
            .into_response()
    };
    let iv = match q.granularity.as_deref() {
        Some("ONE_MINUTE") => Interval::M1,
        Some("FIVE_MINUTE") => Interval::M5,
        Some("FIFTEEN_MINUTE") => Interval::M15,
        Some("THIRTY_MINUTE") => Interval::M30,
        Some("ONE_HOUR") => Interval::H1,
        Some("TWO_HOUR") => Interval::H2,
        Some("SIX_HOUR") => Interval::H6,
        Some("ONE_DAY") => Interval::D1,
        _ => return bad("granularity is invalid"),
    };
    let (Some(start), Some(end)) = (q.start, q.end) else {
        return bad("start and end are required");
    };
    let Some(p) = inner.products.iter().find(|p| p.id == id) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(json!({"error": "NOT_FOUND", "message": "product not found"})),
        )
            .into_response();
    };
    let markets = lock(&inner.markets);
    let Some(m) = markets.get(&p.data_id) else {
        return bad("no data");
    };
    let mut rows: Vec<Value> = m
        .history
        .get(&iv)
        .into_iter()
        .flatten()
        .chain(m.forming.get(&iv))
        .filter(|c| c.open_time >= start * 1000 && c.open_time <= end * 1000)
        .map(|c| json!({"start": (c.open_time / 1000).to_string(), "low": fmt(c.low, p.price_dp), "high": fmt(c.high, p.price_dp),
            "open": fmt(c.open, p.price_dp), "close": fmt(c.close, p.price_dp), "volume": fmt(c.volume, p.size_dp)}))
        .collect();
    rows.reverse(); // newest first
    rows.truncate(350);
    Json(json!({"candles": rows})).into_response()
}
