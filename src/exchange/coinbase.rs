//! Coinbase Advanced Trade market data (`wss://advanced-trade-ws.coinbase.com`, no keys). See
//! EXCHANGES.md §2 and §0.1.
//!
//! - Products come from the public `GET /api/v3/brokerage/market/products`; the unified symbol
//!   is base + quote (`BTC-USD` → `BTCUSD`). `-USDC` products other than `USDT-USDC` and
//!   `EURC-USDC` are answered as the `-USD` product: messages for `BTC-USD` also feed our
//!   `BTC-USDC` streams.
//! - One channel per subscribe message (streams are batched per channel), `heartbeats`
//!   subscribed on every connection (channels otherwise close after 60–90 s idle), control
//!   frames spaced under the 8 messages/s unauthenticated limit.
//! - `sequence_num` counts per connection across all channels: any gap may have lost a
//!   `level2` update, so every book on the connection is rebuilt (unsubscribe + subscribe
//!   `level2` for a fresh snapshot) and withheld until then; the connection stays. A crossed
//!   book resyncs its product the same way.
//! - `market_trades.side` is the maker's side: the taker's, which PROTOCOL.md's `side` means,
//!   is the opposite.
//! - Klines are built from `market_trades` for every interval (seeded from REST candles): the
//!   only native stream, 5-minute `candles`, has no trade count or quote volume.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::book::{BookSide, LocalBook};
use super::candles::{DerivedCandles, Seed, SeedCandle};
use super::{
    decimal, rfc3339_ms, step_decimals, Adapter, DecodeError, Effect, Instrument, InstrumentSet,
    Limits, Protocol, ProtocolContext,
};
use crate::decimal::Dec;
use crate::domain::{ExchangeId, Interval, Symbol};
use crate::events::{Feed, MarketEvent, Side, Ticker, Trade, TradeId};

pub struct Coinbase {
    limits: Limits,
}

impl Default for Coinbase {
    fn default() -> Self {
        Coinbase::new()
    }
}

impl Coinbase {
    pub fn new() -> Coinbase {
        Coinbase {
            limits: Limits {
                max_streams_per_connection: 500,
                max_streams_per_message: 100,
                // 8 unauthenticated messages a second per IP: stay at ~6.
                control_spacing: Duration::from_millis(160),
                max_url_len: 0,
                // Heartbeats arrive every second.
                stale_after: Duration::from_secs(30),
                max_connection_age: None,
                // 8 connections a second per IP (the stricter of two documented figures).
                connect_budget: (6, Duration::from_secs(1)),
            },
        }
    }
}

/// The product whose data Coinbase sends for `product` (`BTC-USDC` → `BTC-USD`).
fn answered_as(product: &str) -> &str {
    match product.strip_suffix("-USDC") {
        Some(base) if base != "USDT" && base != "EURC" => &product[..base.len() + 4],
        _ => product,
    }
}

impl Adapter for Coinbase {
    fn id(&self) -> ExchangeId {
        ExchangeId::Coinbase
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn stream_name(&self, feed: Feed, instrument: &Instrument) -> String {
        let p = &instrument.native;
        match feed {
            Feed::Ticker => format!("ticker:{p}"),
            Feed::Trades => format!("market_trades:{p}"),
            Feed::Book => format!("level2:{p}"),
            Feed::Klines(iv) => format!("candles:{iv}:{p}"),
        }
    }

    fn new_protocol(&self, ctx: ProtocolContext) -> Box<dyn Protocol> {
        Box::new(CoinbaseProtocol::new(ctx))
    }

    fn batch_group<'a>(&self, stream: &'a str) -> &'a str {
        match stream.split_once(':') {
            Some(("candles", _)) => "market_trades",
            Some((channel, _)) => channel,
            None => stream,
        }
    }

    fn instruments_url(&self, rest_base: &str) -> String {
        format!(
            "{}/api/v3/brokerage/market/products",
            rest_base.trim_end_matches('/')
        )
    }

    fn parse_instruments(&self, body: &str) -> Result<InstrumentSet, DecodeError> {
        #[derive(Deserialize)]
        struct Reply {
            products: Vec<Product>,
        }
        #[derive(Deserialize)]
        struct Product {
            product_id: String,
            base_currency_id: Option<String>,
            quote_currency_id: Option<String>,
            status: Option<String>,
            #[serde(default)]
            trading_disabled: bool,
            product_type: Option<String>,
            quote_increment: Option<String>,
            price_increment: Option<String>,
            base_increment: Option<String>,
        }
        let reply: Reply = serde_json::from_str(body)?;
        let mut set = InstrumentSet::default();
        for p in reply.products {
            if p.product_type.as_deref().is_some_and(|t| t != "SPOT") {
                continue;
            }
            let (base, quote) = match (&p.base_currency_id, &p.quote_currency_id) {
                (Some(b), Some(q)) => (b.clone(), q.clone()),
                _ => match p.product_id.split_once('-') {
                    Some((b, q)) => (b.to_string(), q.to_string()),
                    None => continue,
                },
            };
            let Ok(symbol) = Symbol::parse(&format!("{base}{quote}")) else {
                continue;
            };
            let status = p.status.unwrap_or_else(|| "online".into());
            set.by_symbol.insert(
                symbol,
                Instrument {
                    tradable: status == "online" && !p.trading_disabled,
                    native: p.product_id,
                    base,
                    quote,
                    status,
                    price_precision: p
                        .price_increment
                        .or(p.quote_increment)
                        .as_deref()
                        .and_then(step_decimals),
                    qty_precision: p.base_increment.as_deref().and_then(step_decimals),
                    rest_name: None,
                },
            );
        }
        Ok(set)
    }
}

struct CoinbaseProtocol {
    /// Our streams on this connection.
    streams: HashSet<String>,
    /// Product → how many of our streams need its `market_trades`.
    trade_users: HashMap<String, usize>,
    /// Books by the product we subscribed (`BTC-USDC` keeps its own, fed from `BTC-USD`).
    books: HashMap<String, LocalBook>,
    /// Every kline stream: Coinbase's candles are built from its trades.
    derived: DerivedCandles,
    /// Trade ids already sent per product (snapshots and reconnects repeat trades).
    seen_trades: HashMap<String, (HashSet<String>, VecDeque<String>)>,
    /// The `sequence_num` expected next on this connection.
    next_seq: Option<u64>,
}

/// Trade ids remembered per product for deduplication.
const SEEN_TRADES: usize = 5_000;

impl CoinbaseProtocol {
    fn new(_ctx: ProtocolContext) -> CoinbaseProtocol {
        CoinbaseProtocol {
            streams: HashSet::new(),
            trade_users: HashMap::new(),
            books: HashMap::new(),
            derived: DerivedCandles::default(),
            seen_trades: HashMap::new(),
            next_seq: None,
        }
    }

    fn frame(kind: &str, channel: &str, products: &[&str]) -> String {
        json!({"type": kind, "product_ids": products, "channel": channel}).to_string()
    }

    /// Our products that `answered` (a product id in a message) stands for.
    fn products_for<'a>(
        &'a self,
        channel: &'a str,
        answered: &'a str,
    ) -> impl Iterator<Item = String> + 'a {
        let prefix = format!("{channel}:");
        self.streams
            .iter()
            .filter_map(move |s| s.strip_prefix(&prefix))
            .map(|p| p.rsplit(':').next().unwrap_or(p))
            .filter(move |p| answered_as(p) == answered)
            .map(String::from)
            .collect::<BTreeSet<_>>()
            .into_iter()
    }

    /// Rebuilds `products`' books from fresh snapshots; the connection stays.
    fn resync(&mut self, products: Vec<String>, why: &str, out: &mut Vec<Effect>) {
        if products.is_empty() {
            return;
        }
        for p in &products {
            if let Some(book) = self.books.get_mut(p) {
                *book = LocalBook::default();
            }
            out.push(Effect::Resyncing {
                stream: format!("level2:{p}"),
                why: why.to_string(),
                failures: 1,
                retry_in_ms: 0,
            });
        }
        let refs: Vec<&str> = products.iter().map(String::as_str).collect();
        out.push(Effect::Send(Self::frame("unsubscribe", "level2", &refs)));
        out.push(Effect::Send(Self::frame("subscribe", "level2", &refs)));
    }

    fn on_level2(
        &mut self,
        events: Vec<L2Event>,
        time_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        for ev in events {
            let targets: Vec<String> = self.products_for("level2", &ev.product_id).collect();
            for product in targets {
                let book = self.books.entry(product.clone()).or_default();
                if ev.kind == "snapshot" {
                    book.clear(true);
                } else if !book.synced {
                    continue; // waiting for the resync snapshot
                }
                for u in &ev.updates {
                    let price = decimal("price_level", &u.price_level)?;
                    let qty = decimal("new_quantity", &u.new_quantity)?;
                    let side = match u.side.as_str() {
                        "bid" => BookSide::Bid,
                        "offer" | "ask" => BookSide::Ask,
                        other => {
                            return Err(DecodeError::Field {
                                field: "side",
                                reason: format!("'{other}'"),
                            })
                        }
                    };
                    book.set(side, price, qty);
                }
                if book.crossed() {
                    self.resync(vec![product.clone()], "crossed book", out);
                    continue;
                }
                out.push(Effect::Event {
                    stream: format!("level2:{product}"),
                    event: MarketEvent::Book(book.top(time_ms)),
                });
            }
        }
        Ok(())
    }

    fn on_trades(
        &mut self,
        events: Vec<TradesEvent>,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        let mut trades: Vec<(RawTrade, bool)> = Vec::new();
        for ev in events {
            let snapshot = ev.kind == "snapshot";
            trades.extend(ev.trades.into_iter().map(|t| (t, snapshot)));
        }
        let time = |t: &RawTrade| rfc3339_ms(&t.time).unwrap_or(0);
        // Candles need exchange order; Coinbase batches list the newest first.
        trades.sort_by_key(|(t, _)| (time(t), t.trade_id.parse::<u64>().unwrap_or(0)));
        for (t, snapshot) in trades {
            let time_ms = rfc3339_ms(&t.time).ok_or_else(|| DecodeError::Field {
                field: "time",
                reason: t.time.clone(),
            })?;
            let trade = Trade {
                trade_id: match t.trade_id.parse::<u64>() {
                    Ok(n) => TradeId::Number(n),
                    Err(_) => TradeId::Text(t.trade_id.clone()),
                },
                price: decimal("price", &t.price)?,
                quantity: decimal("size", &t.size)?,
                // The maker's side is reported; the taker took the other one.
                side: match t.side.as_str() {
                    "BUY" => Side::Sell,
                    "SELL" => Side::Buy,
                    other => {
                        return Err(DecodeError::Field {
                            field: "side",
                            reason: format!("'{other}'"),
                        })
                    }
                },
                time_ms,
            };
            for product in self
                .products_for("market_trades", &t.product_id)
                .collect::<Vec<_>>()
            {
                let (seen, order) = self.seen_trades.entry(product.clone()).or_default();
                let fresh = seen.insert(t.trade_id.clone());
                if fresh {
                    order.push_back(t.trade_id.clone());
                    if order.len() > SEEN_TRADES {
                        if let Some(old) = order.pop_front() {
                            seen.remove(&old);
                        }
                    }
                }
                // Snapshot trades happened before the subscription: history, not news.
                if fresh && !snapshot {
                    out.push(Effect::Event {
                        stream: format!("market_trades:{product}"),
                        event: MarketEvent::Trade(trade.clone()),
                    });
                }
            }
            for product in self
                .products_for("candles", &t.product_id)
                .collect::<Vec<_>>()
            {
                self.derived.on_trade(&product, &trade, out);
            }
        }
        Ok(())
    }
}

impl Protocol for CoinbaseProtocol {
    fn backfilled(&mut self, stream: &str, trades: &[Trade], _now_ms: i64, out: &mut Vec<Effect>) {
        if let Some(product) = stream.strip_prefix("market_trades:") {
            for t in trades {
                self.derived.on_trade(product, t, out);
            }
        }
    }

    fn on_connect(&mut self, _now_ms: i64, out: &mut Vec<Effect>) {
        out.push(Effect::Send(
            json!({"type": "subscribe", "channel": "heartbeats"}).to_string(),
        ));
    }

    fn subscribe(&mut self, streams: &[String], now_ms: i64, out: &mut Vec<Effect>) {
        let mut upstream: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for stream in streams {
            if !self.streams.insert(stream.clone()) {
                continue;
            }
            let Some((channel, rest)) = stream.split_once(':') else {
                continue;
            };
            match channel {
                "candles" | "market_trades" => {
                    let product = rest.rsplit(':').next().unwrap_or(rest).to_string();
                    if channel == "candles" {
                        let Some(iv) = rest
                            .split(':')
                            .next()
                            .and_then(|i| i.parse::<Interval>().ok())
                        else {
                            continue;
                        };
                        self.derived.add(stream, iv, now_ms, out);
                    }
                    let users = self.trade_users.entry(product.clone()).or_default();
                    *users += 1;
                    if *users == 1 {
                        upstream.entry("market_trades").or_default().push(product);
                    }
                }
                "level2" | "ticker" => upstream.entry(channel).or_default().push(rest.to_string()),
                _ => {}
            }
        }
        for (channel, products) in upstream {
            let refs: Vec<&str> = products.iter().map(String::as_str).collect();
            out.push(Effect::Send(Self::frame("subscribe", channel, &refs)));
        }
    }

    fn unsubscribe(&mut self, streams: &[String], _now_ms: i64, out: &mut Vec<Effect>) {
        let mut upstream: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for stream in streams {
            if !self.streams.remove(stream) {
                continue;
            }
            let Some((channel, rest)) = stream.split_once(':') else {
                continue;
            };
            let product = rest.rsplit(':').next().unwrap_or(rest).to_string();
            match channel {
                "candles" | "market_trades" => {
                    self.derived.remove(stream);
                    let users = self.trade_users.entry(product.clone()).or_default();
                    *users = users.saturating_sub(1);
                    if *users == 0 {
                        self.trade_users.remove(&product);
                        self.seen_trades.remove(&product);
                        upstream.entry("market_trades").or_default().push(product);
                    }
                }
                "level2" => {
                    self.books.remove(&product);
                    upstream.entry("level2").or_default().push(product);
                }
                "ticker" => upstream.entry("ticker").or_default().push(product),
                _ => {}
            }
        }
        for (channel, products) in upstream {
            let refs: Vec<&str> = products.iter().map(String::as_str).collect();
            out.push(Effect::Send(Self::frame("unsubscribe", channel, &refs)));
        }
    }

    fn decode(
        &mut self,
        text: &str,
        now_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        let env: Envelope = serde_json::from_str(text)?;
        if env.kind.as_deref() == Some("error") {
            out.push(Effect::Rejected(
                env.message
                    .unwrap_or_else(|| "error without a message".into()),
            ));
            return Ok(());
        }
        if let Some(seq) = env.sequence_num {
            match self.next_seq {
                Some(expected) if seq > expected => {
                    let books: Vec<String> = self.books.keys().cloned().collect();
                    self.resync(
                        books,
                        &format!("sequence gap: expected {expected}, got {seq}"),
                        out,
                    );
                }
                Some(expected) if seq < expected => return Ok(()), // replayed or out of order
                _ => {}
            }
            self.next_seq = Some(seq + 1);
        }
        let time_ms = env
            .timestamp
            .as_deref()
            .and_then(rfc3339_ms)
            .unwrap_or(now_ms);
        let Some(events) = env.events else {
            return Ok(());
        };
        match env.channel.as_deref() {
            Some("l2_data") => self.on_level2(serde_json::from_str(events.get())?, time_ms, out)?,
            Some("market_trades") => self.on_trades(serde_json::from_str(events.get())?, out)?,
            Some("ticker") => {
                for ev in serde_json::from_str::<Vec<TickerEvent>>(events.get())? {
                    for t in ev.tickers {
                        let price = decimal("price", &t.price)?;
                        let pct = decimal("price_percent_chg_24_h", &t.price_percent_chg_24_h)?;
                        // Coinbase sends no 24 h open, and one derived from the rounded
                        // percentage would be a number Coinbase never stated: open and change
                        // are unknown (null); the percentage is Coinbase's own.
                        let ticker = Ticker {
                            price,
                            bid: decimal("best_bid", &t.best_bid)?,
                            ask: decimal("best_ask", &t.best_ask)?,
                            bid_size: decimal("best_bid_quantity", &t.best_bid_quantity)?,
                            ask_size: decimal("best_ask_quantity", &t.best_ask_quantity)?,
                            volume: decimal("volume_24_h", &t.volume_24_h)?,
                            quote_volume: None,
                            change: None,
                            change_percent: pct,
                            high: decimal("high_24_h", &t.high_24_h)?,
                            low: decimal("low_24_h", &t.low_24_h)?,
                            open: None,
                            previous_close: None,
                            time_ms,
                        };
                        for product in self
                            .products_for("ticker", &t.product_id)
                            .collect::<Vec<_>>()
                        {
                            out.push(Effect::Event {
                                stream: format!("ticker:{product}"),
                                event: MarketEvent::Ticker(Box::new(ticker.clone())),
                            });
                        }
                    }
                }
            }
            Some("subscriptions") => {
                // Unknown products are silently left out of the ack; validation against the
                // product list happens before anything is sent, so nothing to do here.
                out.push(Effect::Ack);
            }
            _ => {} // heartbeats, candles, status
        }
        Ok(())
    }

    fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        self.derived.on_tick(now_ms, out);
    }

    fn on_seeded(
        &mut self,
        tag: u64,
        seed: Result<Seed, String>,
        _now_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        self.derived.on_seed("coinbase", tag, seed, out);
    }
}

/// `{"candles":[{"start":"1712192400","low":"66055.14","high":"66331.99","open":"66312.4","close":"66181.6","volume":"355.82896243"}]}`
pub fn parse_rest_candles(body: &str) -> Result<Vec<SeedCandle>, String> {
    #[derive(Deserialize)]
    struct Reply {
        candles: Vec<Row>,
    }
    #[derive(Deserialize)]
    struct Row {
        start: String,
        low: String,
        high: String,
        open: String,
        close: String,
        volume: String,
    }
    let reply: Reply = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let f = |s: &str| s.parse::<Dec>().map_err(|e| e.to_string());
    reply
        .candles
        .into_iter()
        .map(|r| {
            Ok(SeedCandle {
                open_time: r.start.parse::<i64>().map_err(|e| e.to_string())? * 1000,
                open: f(&r.open)?,
                high: f(&r.high)?,
                low: f(&r.low)?,
                close: f(&r.close)?,
                volume: f(&r.volume)?,
                quote_volume: None,
                trades: None,
            })
        })
        .collect()
}

/// `{"channel":"l2_data","client_id":"","timestamp":"...","sequence_num":0,"events":[...]}`,
/// or `{"type":"error","message":"..."}`.
#[derive(Deserialize)]
struct Envelope<'a> {
    channel: Option<String>,
    timestamp: Option<String>,
    sequence_num: Option<u64>,
    #[serde(borrow)]
    events: Option<&'a RawValue>,
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct L2Event {
    #[serde(rename = "type")]
    kind: String,
    product_id: String,
    #[serde(default)]
    updates: Vec<L2Update>,
}

#[derive(Deserialize)]
struct L2Update {
    side: String,
    price_level: String,
    new_quantity: String,
}

#[derive(Deserialize)]
struct TradesEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    trades: Vec<RawTrade>,
}

#[derive(Deserialize, Clone)]
struct RawTrade {
    trade_id: String,
    product_id: String,
    price: String,
    size: String,
    side: String,
    time: String,
}

#[derive(Deserialize)]
struct TickerEvent {
    #[serde(default)]
    tickers: Vec<RawTicker>,
}

#[derive(Deserialize)]
struct RawTicker {
    product_id: String,
    price: String,
    volume_24_h: String,
    low_24_h: String,
    high_24_h: String,
    price_percent_chg_24_h: String,
    best_bid: String,
    best_bid_quantity: String,
    best_ask: String,
    best_ask_quantity: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> crate::decimal::Dec {
        s.parse().unwrap()
    }
    use std::sync::Arc;

    fn session() -> CoinbaseProtocol {
        CoinbaseProtocol::new(ProtocolContext {
            instruments: Arc::new(InstrumentSet::default()),
        })
    }

    fn events(out: &[Effect]) -> Vec<(&str, &MarketEvent)> {
        out.iter()
            .filter_map(|d| match d {
                Effect::Event { stream, event } => Some((stream.as_str(), event)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn heartbeats_first_and_one_channel_per_subscribe() {
        let mut s = session();
        let mut out = Vec::new();
        s.on_connect(0, &mut out);
        s.subscribe(
            &["ticker:BTC-USD".into(), "ticker:ETH-USD".into()],
            0,
            &mut out,
        );
        let frames: Vec<serde_json::Value> = out
            .iter()
            .filter_map(|d| match d {
                Effect::Send(f) => serde_json::from_str(f).ok(),
                _ => None,
            })
            .collect();
        assert_eq!(
            frames[0],
            json!({"type":"subscribe","channel":"heartbeats"})
        );
        assert_eq!(
            frames[1],
            json!({"type":"subscribe","product_ids":["BTC-USD","ETH-USD"],"channel":"ticker"})
        );
    }

    #[test]
    fn documented_frames_normalise() {
        let mut s = session();
        let mut out = Vec::new();
        s.subscribe(&["ticker:BTC-USD".into()], 0, &mut out);
        s.subscribe(&["market_trades:ETH-USD".into()], 0, &mut out);
        s.subscribe(&["level2:BTC-USD".into()], 0, &mut out);
        out.clear();
        s.decode(r#"{"channel":"ticker","client_id":"","timestamp":"2023-02-09T20:30:37.167359596Z","sequence_num":0,"events":[{"type":"snapshot","tickers":[{"type":"ticker","product_id":"BTC-USD","price":"21932.98","volume_24_h":"16038.28770938","low_24_h":"21835.29","high_24_h":"23011.18","low_52_w":"15460","high_52_w":"48240","price_percent_chg_24_h":"-4.15775596190603","best_bid":"21931.98","best_bid_quantity":"8000.21","best_ask":"21933.98","best_ask_quantity":"8038.07770938"}]}]}"#, 0, &mut out).unwrap();
        let ev = events(&out);
        let [("ticker:BTC-USD", MarketEvent::Ticker(t))] = ev.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            (t.price, t.bid, t.ask_size, t.quote_volume),
            (d("21932.98"), d("21931.98"), d("8038.07770938"), None)
        );
        // Coinbase states no open: unknown, never derived from the rounded percentage.
        assert_eq!((t.open, t.change), (None, None));
        assert_eq!(t.change_percent, d("-4.15775596190603"));
        out.clear();
        s.decode(r#"{"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:19:35.39625135Z","sequence_num":1,"events":[{"type":"update","trades":[{"trade_id":"12345","product_id":"ETH-USD","price":"1260.01","size":"0.3","side":"BUY","time":"2019-08-14T20:42:27.265Z"}]}]}"#, 0, &mut out).unwrap();
        let ev = events(&out);
        let [("market_trades:ETH-USD", MarketEvent::Trade(t))] = ev.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            t.side,
            Side::Sell,
            "BUY is the maker's side; the taker sold"
        );
        assert_eq!(t.trade_id, TradeId::Number(12345));
        out.clear();
        s.decode(r#"{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":2,"events":[{"type":"snapshot","product_id":"BTC-USD","updates":[{"side":"bid","event_time":"1970-01-01T00:00:00Z","price_level":"21921.3","new_quantity":"0.02"},{"side":"offer","event_time":"1970-01-01T00:00:00Z","price_level":"21922.5","new_quantity":"1.5"},{"side":"bid","event_time":"1970-01-01T00:00:00Z","price_level":"21921.73","new_quantity":"0.06317902"}]}]}"#, 0, &mut out).unwrap();
        let ev = events(&out);
        let [("level2:BTC-USD", MarketEvent::Book(b))] = ev.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            b.bids,
            vec![[d("21921.73"), d("0.06317902")], [d("21921.3"), d("0.02")]],
            "the unsorted snapshot is sorted"
        );
        assert_eq!(b.asks, vec![[d("21922.5"), d("1.5")]]);
    }

    #[test]
    fn a_sequence_gap_resyncs_every_book_on_the_connection() {
        let mut s = session();
        let mut out = Vec::new();
        s.subscribe(
            &["level2:BTC-USD".into(), "level2:ETH-USD".into()],
            0,
            &mut out,
        );
        for (seq, product) in [(1, "BTC-USD"), (2, "ETH-USD")] {
            s.decode(&format!(r#"{{"channel":"l2_data","sequence_num":{seq},"events":[{{"type":"snapshot","product_id":"{product}","updates":[{{"side":"bid","price_level":"1","new_quantity":"1"}},{{"side":"offer","price_level":"2","new_quantity":"1"}}]}}]}}"#), 0, &mut out).unwrap();
        }
        out.clear();
        s.decode(r#"{"channel":"heartbeats","sequence_num":5,"events":[{"current_time":"x","heartbeat_counter":3}]}"#, 0, &mut out).unwrap();
        let resynced: Vec<&str> = out
            .iter()
            .filter_map(|d| match d {
                Effect::Resyncing { stream, .. } => Some(stream.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(resynced.len(), 2, "{out:?}");
        let frames: Vec<&String> = out
            .iter()
            .filter_map(|d| match d {
                Effect::Send(f) => Some(f),
                _ => None,
            })
            .collect();
        assert!(frames[0].contains("unsubscribe") && frames[1].contains("\"subscribe\""));
        // Updates before the new snapshot are withheld.
        out.clear();
        s.decode(r#"{"channel":"l2_data","sequence_num":6,"events":[{"type":"update","product_id":"BTC-USD","updates":[{"side":"bid","price_level":"1.5","new_quantity":"1"}]}]}"#, 0, &mut out).unwrap();
        assert!(events(&out).is_empty());
    }

    #[test]
    fn usdc_products_are_answered_as_usd() {
        assert_eq!(answered_as("BTC-USDC"), "BTC-USD");
        assert_eq!(answered_as("USDT-USDC"), "USDT-USDC");
        assert_eq!(answered_as("EURC-USDC"), "EURC-USDC");
        assert_eq!(answered_as("ETH-BTC"), "ETH-BTC");
        let mut s = session();
        let mut out = Vec::new();
        s.subscribe(&["market_trades:BTC-USDC".into()], 0, &mut out);
        out.clear();
        s.decode(r#"{"channel":"market_trades","sequence_num":1,"events":[{"type":"update","trades":[{"trade_id":"9","product_id":"BTC-USD","price":"1","size":"1","side":"SELL","time":"2024-01-01T00:00:00Z"}]}]}"#, 0, &mut out).unwrap();
        assert_eq!(
            events(&out).first().map(|e| e.0),
            Some("market_trades:BTC-USDC")
        );
    }

    #[test]
    fn products_map_to_unified_symbols() {
        let set = Coinbase::new()
            .parse_instruments(r#"{"products":[{"product_id":"BTC-USD","base_currency_id":"BTC","quote_currency_id":"USD","status":"online","trading_disabled":false,"product_type":"SPOT"},{"product_id":"LUNA-USD","base_currency_id":"LUNA","quote_currency_id":"USD","status":"delisted","trading_disabled":true,"product_type":"SPOT"},{"product_id":"BIP-20DEC30-CDE","product_type":"FUTURE"}],"num_products":3}"#)
            .unwrap();
        assert_eq!(
            set.by_symbol[&Symbol::parse("BTCUSD").unwrap()].native,
            "BTC-USD"
        );
        assert!(!set.by_symbol[&Symbol::parse("LUNAUSD").unwrap()].tradable);
        assert_eq!(set.by_symbol.len(), 2);
    }
}
