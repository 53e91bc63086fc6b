//! A simulated Kraken Spot WebSocket v2 on loopback (EXCHANGES.md §3, §6): `status` on connect,
//! one ack per symbol, `Currency pair not supported` / `Already subscribed` error acks,
//! `ping`→`pong`, a `heartbeat` every second, `ticker`, `trade`, `ohlc` (updates on trades only)
//! and `book` (snapshot, then updates) whose numbers carry the pair's full precision, trailing
//! zeros included, with the CRC32 of the top 10 levels. REST: `/0/public/AssetPairs` (from
//! `fixtures/kraken/AssetPairs.json`) and `/0/public/OHLC`.
//!
//! Its checksum is computed here from the formatted strings, independently of the relay's
//! decimal-based one, so the two cross-check each other. Test controls: corrupt the next
//! checksum of a symbol, read back the true books it published and the candles it closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::market::{default_specs, Candle, Market, SimTrade};
use super::util::{add_ref, drop_ref, lock, rfc3339, unavailable};
use super::SimOptions;
use crate::domain::Interval;
use crate::protocol::now_millis;

/// Published true books remembered per symbol, for tests.
const BOOK_HISTORY: usize = 400;

/// A pair as the sim lists it.
#[derive(Clone, Debug)]
struct Pair {
    /// v2 name, `BTC/USD`.
    ws: String,
    /// REST key, `XXBTZUSD`.
    key: String,
    price_dp: usize,
    qty_dp: usize,
    tradable: bool,
}

struct Frame {
    /// `book:BTC/USD`, `trade:BTC/USD`, `ticker:BTC/USD`, `ohlc:5:BTC/USD`, `heartbeat`.
    key: String,
    text: Utf8Bytes,
}

#[derive(Clone, Copy, Debug)]
enum Control {
    Kill,
}

/// One published book state: top 10 per side, best first.
pub type TopBook = (Vec<[f64; 2]>, Vec<[f64; 2]>);

struct Inner {
    opts: SimOptions,
    pairs: Vec<Pair>,
    asset_pairs: String,
    /// Market per v2 symbol.
    markets: Mutex<HashMap<String, Market>>,
    frames: broadcast::Sender<Arc<Frame>>,
    control: broadcast::Sender<Control>,
    subscriptions: Mutex<HashMap<String, usize>>,
    corrupt: Mutex<HashSet<String>>,
    /// Pairs whose every checksum is wrong (a precision REST and WebSocket disagree on).
    always_corrupt: Mutex<HashSet<String>>,
    /// `book` subscribe requests per pair.
    book_subscribes: Mutex<HashMap<String, u64>>,
    /// Pairs whose `AssetPairs` entry states one more price decimal than the books use.
    misstated: Mutex<HashSet<String>>,
    /// Symbols whose subscriptions are refused although listed.
    refused: Mutex<HashSet<String>>,
    books: Mutex<HashMap<String, VecDeque<TopBook>>>,
    closed: Mutex<HashMap<(String, Interval), Vec<Candle>>>,
    available: AtomicBool,
    /// The REST trade endpoints answer 503 (history and backfill refused, the rest served).
    trades_refused: AtomicBool,
    connections: AtomicUsize,
    connects: AtomicU64,
}

fn v2(code: &str) -> &str {
    match code {
        "XBT" => "BTC",
        "XDG" => "DOGE",
        other => other,
    }
}

/// A number with exactly `dp` decimals, as a raw JSON number (trailing zeros kept).
fn num(v: f64, dp: usize) -> Box<RawValue> {
    let text = if v.is_finite() {
        format!("{v:.dp$}")
    } else {
        "0".into()
    };
    RawValue::from_string(text).unwrap_or_default()
}

/// Kraken's checksum from the formatted strings: asks low→high, then bids high→low.
fn checksum(m: &Market, p: &Pair) -> u32 {
    let digits = |v: f64, dp: usize| {
        let s = format!("{v:.dp$}").replace('.', "");
        let t = s.trim_start_matches('0');
        if t.is_empty() {
            "0".to_string()
        } else {
            t.to_string()
        }
    };
    let mut s = String::new();
    for (price, qty) in m.asks.iter().take(10) {
        s.push_str(&digits(*price, p.price_dp));
        s.push_str(&digits(*qty, p.qty_dp));
    }
    for (price, qty) in m.bids.iter().take(10) {
        s.push_str(&digits(*price, p.price_dp));
        s.push_str(&digits(*qty, p.qty_dp));
    }
    crc32fast::hash(s.as_bytes())
}

fn levels(side: &[(f64, f64)], p: &Pair) -> Vec<Value> {
    side.iter()
        .map(|(price, qty)| json!({"price": num(*price, p.price_dp), "qty": num(*qty, p.qty_dp)}))
        .collect()
}

/// Native OHLC lengths, minutes → interval.
fn ohlc_interval(minutes: u64) -> Option<Interval> {
    Some(match minutes {
        1 => Interval::M1,
        5 => Interval::M5,
        15 => Interval::M15,
        30 => Interval::M30,
        60 => Interval::H1,
        240 => Interval::H4,
        1440 => Interval::D1,
        10080 => Interval::W1,
        _ => return None,
    })
}

fn interval_minutes(iv: Interval) -> u64 {
    (iv.fixed_millis().unwrap_or(0) / 60_000) as u64
}

/// A running simulated Kraken; stops when dropped.
pub struct SimKraken {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for SimKraken {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SimKraken {
    pub async fn start(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimKraken> {
        let addr = listener.local_addr()?;
        let asset_pairs = include_str!("../../fixtures/kraken/AssetPairs.json").to_string();
        let listing: Value = serde_json::from_str(&asset_pairs).unwrap_or_default();
        let specs = default_specs();
        let mut pairs = Vec::new();
        let mut markets = HashMap::new();
        if let Some(result) = listing["result"].as_object() {
            for (key, p) in result {
                let Some((b, q)) = p["wsname"].as_str().and_then(|w| w.split_once('/')) else {
                    continue;
                };
                if key.ends_with(".d") {
                    continue;
                }
                let (b, q) = (v2(b), v2(q));
                let pair = Pair {
                    ws: format!("{b}/{q}"),
                    key: key.clone(),
                    price_dp: p["pair_decimals"].as_u64().unwrap_or(2) as usize,
                    qty_dp: p["lot_decimals"].as_u64().unwrap_or(8) as usize,
                    tradable: p["status"] == "online",
                };
                if let Some((i, spec)) = specs
                    .iter()
                    .enumerate()
                    .find(|(_, s)| s.base == b && s.quote == q)
                {
                    let mut spec = spec.clone();
                    spec.trades_per_sec *= opts.rate_scale;
                    markets.insert(
                        pair.ws.clone(),
                        Market::new(spec, opts.seed.wrapping_add(100 + i as u64)).warmed(
                            crate::protocol::now_millis(),
                            super::market::WARM_UP_MS,
                            opts.time_scale,
                        ),
                    );
                }
                pairs.push(pair);
            }
        }
        let inner = Arc::new(Inner {
            pairs,
            asset_pairs,
            markets: Mutex::new(markets),
            frames: broadcast::channel(65_536).0,
            control: broadcast::channel(16).0,
            subscriptions: Mutex::new(HashMap::new()),
            corrupt: Mutex::new(HashSet::new()),
            always_corrupt: Mutex::new(HashSet::new()),
            book_subscribes: Mutex::new(HashMap::new()),
            misstated: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
            books: Mutex::new(HashMap::new()),
            closed: Mutex::new(HashMap::new()),
            available: AtomicBool::new(true),
            trades_refused: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            opts,
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/v2", get(ws))
            .route("/", get(ws))
            .route("/0/public/AssetPairs", get(asset_pairs_handler))
            .route("/0/public/OHLC", get(ohlc_handler))
            .route("/0/public/Trades", get(trades_handler))
            .with_state(inner.clone());
        super::util::serve(
            listener,
            app,
            run_market(inner.clone(), stop.clone()),
            &stop,
        );
        Ok(SimKraken { inner, addr, stop })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v2", self.addr)
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

    /// `channel:symbol` (ohlc: `ohlc:N:symbol`) → connections subscribed.
    pub fn subscriptions(&self) -> HashMap<String, usize> {
        lock(&self.inner.subscriptions).clone()
    }

    pub fn kill_connections(&self) {
        let _ = self.inner.control.send(Control::Kill);
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

    /// The next book update of `symbol` (v2 name) carries a wrong checksum.
    /// Every checksum of `symbol` is wrong while `on`, snapshots included.
    pub fn corrupt_checksums(&self, symbol: &str, on: bool) {
        let mut set = lock(&self.inner.always_corrupt);
        if on {
            set.insert(symbol.to_string());
        } else {
            set.remove(symbol);
        }
    }

    /// From now on `AssetPairs` states one more price decimal for `symbol` (its `wsname`)
    /// than its books and checksums use, as REST and WebSocket sometimes disagree.
    pub fn misstate_rest_precision(&self, symbol: &str) {
        lock(&self.inner.misstated).insert(symbol.to_string());
    }

    /// How many `book` subscribe requests the exchange has received for `symbol`.
    pub fn book_subscribes(&self, symbol: &str) -> u64 {
        lock(&self.inner.book_subscribes)
            .get(symbol)
            .copied()
            .unwrap_or(0)
    }

    pub fn corrupt_next_checksum(&self, symbol: &str) {
        lock(&self.inner.corrupt).insert(symbol.to_string());
    }

    /// Refuses subscriptions to `symbol` from now on, as Kraken does for a pair it stopped
    /// serving after the instrument list was read.
    pub fn refuse_symbol(&self, symbol: &str) {
        lock(&self.inner.refused).insert(symbol.to_string());
    }

    /// The true books published for `symbol`, oldest first (top 10 per side, best first).
    pub fn published_books(&self, symbol: &str) -> Vec<TopBook> {
        lock(&self.inner.books)
            .get(symbol)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Candles of `interval` the market closed for `symbol`, derived from its own trades.
    /// Every candle of `symbol` the market has closed (warm-up included), oldest first.
    pub fn history_candles(&self, symbol: &str, interval: Interval) -> Vec<Candle> {
        lock(&self.inner.markets)
            .get(symbol)
            .and_then(|m| m.history.get(&interval))
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn closed_candles(&self, symbol: &str, interval: Interval) -> Vec<Candle> {
        lock(&self.inner.closed)
            .get(&(symbol.to_string(), interval))
            .cloned()
            .unwrap_or_default()
    }
}

fn emit(inner: &Inner, key: String, v: Value) {
    let _ = inner.frames.send(Arc::new(Frame {
        key,
        text: Utf8Bytes::from(v.to_string()),
    }));
}

fn ticker_json(m: &Market, p: &Pair) -> Value {
    let s = &m.stats;
    let (bid, bid_qty) = m.best_bid();
    let (ask, ask_qty) = m.best_ask();
    let change = s.last - s.open;
    let vwap = if s.volume > 0.0 {
        s.quote_volume / s.volume
    } else {
        s.last
    };
    json!({"symbol": p.ws, "bid": num(bid, p.price_dp), "bid_qty": num(bid_qty, p.qty_dp),
        "ask": num(ask, p.price_dp), "ask_qty": num(ask_qty, p.qty_dp), "last": num(s.last, p.price_dp),
        "volume": num(s.volume, p.qty_dp), "vwap": num(vwap, p.price_dp), "low": num(s.low, p.price_dp),
        "high": num(s.high, p.price_dp), "change": num(change, p.price_dp),
        "change_pct": num(change / s.open * 100.0, 2), "timestamp": rfc3339(now_millis())})
}

fn trade_json(t: &SimTrade, p: &Pair) -> Value {
    json!({"symbol": p.ws, "side": if t.taker_sold { "sell" } else { "buy" }, "price": num(t.price, p.price_dp),
        "qty": num(t.qty, p.qty_dp), "ord_type": "market", "trade_id": t.id, "timestamp": rfc3339(t.time_ms)})
}

fn ohlc_json(c: &Candle, p: &Pair) -> Value {
    let vwap = if c.volume > 0.0 {
        c.quote_volume / c.volume
    } else {
        c.close
    };
    json!({"symbol": p.ws, "open": num(c.open, p.price_dp), "high": num(c.high, p.price_dp),
        "low": num(c.low, p.price_dp), "close": num(c.close, p.price_dp), "trades": c.trades,
        "volume": num(c.volume, p.qty_dp), "vwap": num(vwap, p.price_dp),
        "interval_begin": rfc3339(c.open_time), "interval": interval_minutes(c.interval),
        "timestamp": rfc3339(c.close_time + 1)})
}

fn book_snapshot(m: &Market, p: &Pair) -> Value {
    json!({"channel": "book", "type": "snapshot", "data": [{"symbol": p.ws,
        "bids": levels(&m.bids, p), "asks": levels(&m.asks, p), "checksum": checksum(m, p),
        "timestamp": rfc3339(now_millis())}]})
}

fn top10(m: &Market) -> TopBook {
    let side = |v: &[(f64, f64)]| v.iter().take(10).map(|(p, q)| [*p, *q]).collect();
    (side(&m.bids), side(&m.asks))
}

/// Levels of `new` that differ from `old` (absolute quantities), plus removals as `qty: 0`.
fn diff(old: &[(f64, f64)], new: &[(f64, f64)], p: &Pair) -> Vec<Value> {
    let mut out = Vec::new();
    for (price, _) in old {
        if !new.iter().any(|(np, _)| np == price) {
            out.push(json!({"price": num(*price, p.price_dp), "qty": num(0.0, p.qty_dp)}));
        }
    }
    for (price, qty) in new {
        if !old.iter().any(|(op, oq)| op == price && oq == qty) {
            out.push(json!({"price": num(*price, p.price_dp), "qty": num(*qty, p.qty_dp)}));
        }
    }
    out
}

async fn run_market(inner: Arc<Inner>, stop: CancellationToken) {
    let opts = inner.opts.clone();
    let mut tick = tokio::time::interval(opts.step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let (mut next_ticker, mut next_heartbeat) = (last, last);
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
        let wanted: HashSet<String> = lock(&inner.subscriptions).keys().cloned().collect();
        let ticker_due = now >= next_ticker;
        if ticker_due {
            next_ticker = now + opts.ticker_every;
        }
        let mut markets = lock(&inner.markets);
        for p in &inner.pairs {
            let Some(m) = markets.get_mut(&p.ws) else {
                continue;
            };
            let (old_bids, old_asks) = (m.bids.clone(), m.asks.clone());
            let (trades, closed) = m.step(now_ms, dt);
            if !closed.is_empty() {
                let mut store = lock(&inner.closed);
                for c in &closed {
                    let list = store.entry((p.ws.clone(), c.interval)).or_default();
                    list.push(c.clone());
                    if list.len() > 1000 {
                        list.remove(0);
                    }
                }
            }
            let key = |ch: &str| format!("{ch}:{}", p.ws);
            if !trades.is_empty() && wanted.contains(&key("trade")) {
                let data: Vec<Value> = trades.iter().map(|t| trade_json(t, p)).collect();
                emit(
                    &inner,
                    key("trade"),
                    json!({"channel": "trade", "type": "update", "data": data}),
                );
            }
            if !trades.is_empty() {
                for (iv, c) in &m.forming {
                    let minutes = interval_minutes(*iv);
                    let k = format!("ohlc:{minutes}:{}", p.ws);
                    if ohlc_interval(minutes) == Some(*iv) && wanted.contains(&k) {
                        emit(
                            &inner,
                            k,
                            json!({"channel": "ohlc", "type": "update", "timestamp": rfc3339(now_ms), "data": [ohlc_json(c, p)]}),
                        );
                    }
                }
            }
            if ticker_due && wanted.contains(&key("ticker")) {
                emit(
                    &inner,
                    key("ticker"),
                    json!({"channel": "ticker", "type": "update", "data": [ticker_json(m, p)]}),
                );
            }
            // Every state is recorded: a snapshot can show any of them.
            {
                let mut history = lock(&inner.books);
                let h = history.entry(p.ws.clone()).or_default();
                if h.back() != Some(&top10(m)) {
                    h.push_back(top10(m));
                }
                if h.len() > BOOK_HISTORY {
                    h.pop_front();
                }
            }
            let (bids, asks) = (diff(&old_bids, &m.bids, p), diff(&old_asks, &m.asks, p));
            if (!bids.is_empty() || !asks.is_empty()) && wanted.contains(&key("book")) {
                let mut sum = checksum(m, p);
                if lock(&inner.corrupt).remove(&p.ws) || lock(&inner.always_corrupt).contains(&p.ws)
                {
                    sum = sum.wrapping_add(1);
                }
                emit(
                    &inner,
                    key("book"),
                    json!({"channel": "book", "type": "update", "data": [{"symbol": p.ws,
                    "bids": bids, "asks": asks, "checksum": sum, "timestamp": rfc3339(now_ms)}]}),
                );
            }
        }
        drop(markets);
        if now >= next_heartbeat {
            next_heartbeat = now + std::time::Duration::from_secs(1);
            emit(&inner, "heartbeat".into(), json!({"channel": "heartbeat"}));
        }
    }
}

async fn ws(State(inner): State<Arc<Inner>>, upgrade: WebSocketUpgrade) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    upgrade.on_upgrade(move |socket| connection(socket, inner))
}

fn ack(method: &str, result: Value, req_id: &Value) -> String {
    let t = rfc3339(now_millis());
    json!({"method": method, "result": result, "success": true, "time_in": t, "time_out": t, "req_id": req_id}).to_string()
}

fn nack(method: &str, error: &str, symbol: &str, req_id: &Value) -> String {
    let t = rfc3339(now_millis());
    json!({"error": error, "method": method, "success": false, "symbol": symbol, "time_in": t, "time_out": t, "req_id": req_id}).to_string()
}

/// Answers one request; returns the frames to send, in order.
fn handle(inner: &Inner, subs: &mut HashSet<String>, text: &str) -> Vec<String> {
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return vec![json!({"error": "Invalid JSON", "success": false}).to_string()];
    };
    let req_id = req.get("req_id").cloned().unwrap_or(Value::Null);
    let method = req["method"].as_str().unwrap_or_default();
    match method {
        "ping" => {
            let t = rfc3339(now_millis());
            vec![json!({"method": "pong", "req_id": req_id, "time_in": t, "time_out": t}).to_string()]
        }
        "subscribe" if req["params"]["channel"] == "instrument" => {
            // Every pair with the precisions its books' checksums use.
            let pairs: Vec<Value> = inner
                .pairs
                .iter()
                .map(|p| json!({"symbol": p.ws, "status": if p.tradable { "online" } else { "delisted" },
                    "price_precision": p.price_dp, "qty_precision": p.qty_dp}))
                .collect();
            vec![
                ack(method, json!({"channel": "instrument", "snapshot": true}), &req_id),
                json!({"channel": "instrument", "type": "snapshot", "data": {"assets": [], "pairs": pairs}}).to_string(),
            ]
        }
        "subscribe" | "unsubscribe" => {
            let params = &req["params"];
            let channel = params["channel"].as_str().unwrap_or_default();
            let symbols: Vec<&str> = params["symbol"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            let interval = params["interval"].as_u64().unwrap_or(1);
            let mut frames = Vec::new();
            for sym in symbols {
                let refused = lock(&inner.refused).contains(sym);
                let pair = inner.pairs.iter().find(|p| p.ws == sym && p.tradable && !refused);
                let Some(pair) = pair else {
                    frames.push(nack(method, &format!("Currency pair not supported {sym}"), sym, &req_id));
                    continue;
                };
                let key = match channel {
                    "ohlc" => format!("ohlc:{interval}:{sym}"),
                    "book" | "ticker" | "trade" => format!("{channel}:{sym}"),
                    _ => {
                        frames.push(nack(method, "Channel not supported", sym, &req_id));
                        continue;
                    }
                };
                if method == "subscribe" && channel == "book" {
                    *lock(&inner.book_subscribes).entry(sym.to_string()).or_default() += 1;
                }
                if method == "subscribe" {
                    if !subs.insert(key.clone()) {
                        frames.push(nack(method, "Already subscribed", sym, &req_id));
                        continue;
                    }
                    add_ref(&inner.subscriptions, &key);
                    let mut result = json!({"channel": channel, "symbol": sym, "snapshot": true});
                    if channel == "book" {
                        result["depth"] = params["depth"].clone();
                    }
                    frames.push(ack(method, result, &req_id));
                    let markets = lock(&inner.markets);
                    if let Some(m) = markets.get(sym) {
                        match channel {
                            "book" => {
                                let mut snap = book_snapshot(m, pair);
                                if lock(&inner.always_corrupt).contains(sym) {
                                    let sum = snap["data"][0]["checksum"].as_u64().unwrap_or(0);
                                    snap["data"][0]["checksum"] = json!((sum as u32).wrapping_add(1));
                                }
                                frames.push(snap.to_string());
                            }
                            "ticker" => frames.push(json!({"channel": "ticker", "type": "snapshot", "data": [ticker_json(m, pair)]}).to_string()),
                            "ohlc" => {
                                if let Some(c) = ohlc_interval(interval).and_then(|iv| m.forming.get(&iv)) {
                                    frames.push(json!({"channel": "ohlc", "type": "snapshot", "data": [ohlc_json(c, pair)]}).to_string());
                                }
                            }
                            _ => {}
                        }
                    }
                } else {
                    if subs.remove(&key) {
                        drop_ref(&inner.subscriptions, &key);
                    }
                    frames.push(ack(method, json!({"channel": channel, "symbol": sym}), &req_id));
                }
            }
            frames
        }
        other => vec![json!({"error": format!("Method not supported {other}"), "method": other, "success": false, "req_id": req_id}).to_string()],
    }
}

async fn connection(socket: WebSocket, inner: Arc<Inner>) {
    inner.connections.fetch_add(1, Ordering::SeqCst);
    inner.connects.fetch_add(1, Ordering::SeqCst);
    let (mut tx, mut rx) = socket.split();
    let mut frames = inner.frames.subscribe();
    let mut control = inner.control.subscribe();
    let mut subs: HashSet<String> = HashSet::new();
    let status = json!({"channel": "status", "type": "update", "data": [{"version": "2.0.10", "system": "online", "api_version": "v2", "connection_id": 9471984923908980762u64}]});
    let mut alive = tx.send(Message::text(status.to_string())).await.is_ok();
    while alive {
        tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    for reply in handle(&inner, &mut subs, text.as_str()) {
                        if tx.send(Message::text(reply)).await.is_err() {
                            alive = false;
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            frame = frames.recv() => match frame {
                Ok(f) => {
                    let wanted = if f.key == "heartbeat" { !subs.is_empty() } else { subs.contains(&f.key) };
                    if wanted && tx.send(Message::Text(f.text.clone())).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            c = control.recv() => if let Ok(Control::Kill) = c { break },
        }
    }
    for key in subs {
        drop_ref(&inner.subscriptions, &key);
    }
    inner.connections.fetch_sub(1, Ordering::SeqCst);
}

async fn asset_pairs_handler(State(inner): State<Arc<Inner>>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let misstated = lock(&inner.misstated).clone();
    let body = if misstated.is_empty() {
        inner.asset_pairs.clone()
    } else {
        let mut listing: Value = serde_json::from_str(&inner.asset_pairs).unwrap_or_default();
        for p in inner.pairs.iter().filter(|p| misstated.contains(&p.ws)) {
            if let Some(entry) = listing["result"].get_mut(&p.key) {
                entry["pair_decimals"] = json!(p.price_dp + 1);
            }
        }
        listing.to_string()
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct OhlcQuery {
    pair: Option<String>,
    interval: Option<u64>,
    since: Option<i64>,
}

#[derive(serde::Deserialize)]
struct TradesQuery {
    pair: Option<String>,
    /// A timestamp, in seconds or nanoseconds (`last` of a previous answer).
    since: Option<String>,
    count: Option<usize>,
}

/// `GET /0/public/Trades`: up to `count` (1000) trades from `since` on, oldest first
/// (without `since`, the most recent), and `last` (ns, a string) to continue from.
async fn trades_handler(State(inner): State<Arc<Inner>>, Query(q): Query<TradesQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) || inner.trades_refused.load(Ordering::SeqCst) {
        return unavailable();
    }
    let err = |e: &str| Json(json!({"error": [e]})).into_response();
    let Some(pair) = q
        .pair
        .as_deref()
        .and_then(|name| inner.pairs.iter().find(|p| p.key == name || p.ws == name))
    else {
        return err("EQuery:Unknown asset pair");
    };
    let count = q.count.unwrap_or(1000).clamp(1, 1000);
    let since_ns: Option<i128> = match q.since.as_deref().map(str::parse::<i128>) {
        None => None,
        // Seconds and nanoseconds are both accepted, as on Kraken.
        Some(Ok(v)) if v < 100_000_000_000 => Some(v * 1_000_000_000),
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return err("EGeneral:Invalid arguments"),
    };
    let markets = lock(&inner.markets);
    let Some(m) = markets.get(&pair.ws) else {
        return err("EQuery:Unknown asset pair");
    };
    let ns = |t: &super::market::SimTrade| i128::from(t.time_ms) * 1_000_000;
    let trades: Vec<&super::market::SimTrade> = match since_ns {
        Some(since) => m
            .tape
            .iter()
            .filter(|t| ns(t) >= since)
            .take(count)
            .collect(),
        None => {
            let skip = m.tape.len().saturating_sub(count);
            m.tape.iter().skip(skip).collect()
        }
    };
    let last = trades
        .last()
        .map(|t| (ns(t) + 1).to_string())
        .or_else(|| since_ns.map(|s| s.to_string()))
        .unwrap_or_else(|| "0".to_string());
    let rows: Vec<Value> = trades
        .iter()
        .map(|t| {
            json!([
                format!("{:.*}", pair.price_dp, t.price),
                format!("{:.*}", pair.qty_dp, t.qty),
                t.time_ms as f64 / 1000.0,
                if t.taker_sold { "s" } else { "b" },
                "l",
                "",
                t.id
            ])
        })
        .collect();
    Json(json!({"error": [], "result": {pair.key.clone(): rows, "last": last}})).into_response()
}

async fn ohlc_handler(State(inner): State<Arc<Inner>>, Query(q): Query<OhlcQuery>) -> Response {
    if !inner.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let err = |e: &str| Json(json!({"error": [e]})).into_response();
    let Some(pair) = q
        .pair
        .as_deref()
        .and_then(|name| inner.pairs.iter().find(|p| p.key == name))
    else {
        return err("EQuery:Unknown asset pair");
    };
    let Some(iv) = ohlc_interval(q.interval.unwrap_or(1)) else {
        return err("EGeneral:Invalid arguments");
    };
    let since_ms = q.since.unwrap_or(0) * 1000;
    let markets = lock(&inner.markets);
    let Some(m) = markets.get(&pair.ws) else {
        return err("EQuery:Unknown asset pair");
    };
    let row = |c: &Candle| {
        let vwap = if c.volume > 0.0 {
            c.quote_volume / c.volume
        } else {
            c.close
        };
        json!([
            c.open_time / 1000,
            format!("{:.*}", pair.price_dp, c.open),
            format!("{:.*}", pair.price_dp, c.high),
            format!("{:.*}", pair.price_dp, c.low),
            format!("{:.*}", pair.price_dp, c.close),
            format!("{:.*}", pair.price_dp, vwap),
            format!("{:.*}", pair.qty_dp, c.volume),
            c.trades
        ])
    };
    // The last row is the current, not yet committed candle, as on Kraken.
    let mut rows: Vec<Value> = m
        .history
        .get(&iv)
        .into_iter()
        .flatten()
        .chain(m.forming.get(&iv))
        .filter(|c| c.open_time > since_ms)
        .map(row)
        .collect();
    // The newest `ohlc_rows` (720 on Kraken), whatever `since` asked.
    let skip = rows.len().saturating_sub(inner.opts.ohlc_rows);
    let rows = rows.split_off(skip);
    let last = rows.last().and_then(|r| r[0].as_i64()).unwrap_or(0);
    Json(json!({"error": [], "result": {pair.key.clone(): rows, "last": last}})).into_response()
}
