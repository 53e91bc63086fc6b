//! Kraken Spot WebSocket v2 (`wss://ws.kraken.com/v2`). See EXCHANGES.md §3 and §4.
//!
//! - Symbols come from `GET /0/public/AssetPairs`, never from string rules: `XBT/USD` there is
//!   `BTC/USD` on v2 (and `XDG` is `DOGE`); the unified symbol is base + quote (`BTCUSD`).
//! - `book` is subscribed once per symbol at depth 25 (enough for `depth:…:20`; Kraken allows one
//!   subscription per channel and symbol). After every message both sides are truncated to 25
//!   and the CRC32 of the top 10 is checked, computed from exact decimals written at the pair's
//!   precision, never through `f64`. A mismatch or a crossed book resyncs that symbol alone
//!   (unsubscribe, then subscribe for a fresh snapshot); until the snapshot arrives the symbol's
//!   depth is withheld, so no client sees a bad book.
//! - Native candles (`ohlc`: 1m 5m 15m 30m 1h 4h 1d) carry no "closed" flag: a candle is final
//!   when a later one starts or its end has passed by [`GRACE_MS`]. Their quote volume is `null`
//!   (Kraken gives only a rounded vwap). Every other interval (1s 3m 2h 6h 8h 12h 3d 1w 1M) is
//!   built from trades, seeded from REST OHLC; `1w` is built too so that weeks start on Monday
//!   as on Binance.
//! - The server closes idle sockets after about a minute: an application `ping` goes out every
//!   20 s. Subscribe errors become client errors (`UNKNOWN_SYMBOL`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::book::Resyncs;
use super::book::{BookSide, LocalBook};
use super::candles::{push_klines, DerivedCandles, Seed, SeedCandle, GRACE_MS};
use super::{
    decimal, rfc3339_ms, Adapter, DecodeError, Effect, Instrument, InstrumentSet, Limits, Protocol,
    ProtocolContext,
};
use crate::decimal::Dec;
use crate::domain::{bucket, ExchangeId, Interval, Symbol};
use crate::events::{Feed, Kline, MarketEvent, Side, Ticker, Trade, TradeId};
use crate::protocol::ErrorCode;

/// Book depth subscribed: the smallest Kraken depth covering `depth:…:20`.
pub const BOOK_DEPTH: usize = 25;
/// Levels per side the checksum covers.
const CHECKSUM_LEVELS: usize = 10;
/// Application ping cadence (Kraken closes sockets idle for about a minute).
const PING_EVERY_MS: i64 = 20_000;

pub struct Kraken {
    limits: Limits,
}

impl Default for Kraken {
    fn default() -> Self {
        Kraken::new()
    }
}

impl Kraken {
    pub fn new() -> Kraken {
        Kraken {
            limits: Limits {
                // Undocumented; kept modest so one connection's resyncs stay cheap.
                max_streams_per_connection: 200,
                max_streams_per_message: 50,
                // Kraken's subscribe rate limit is load-dependent; 5 a second has headroom.
                control_spacing: Duration::from_millis(200),
                max_url_len: 0,
                // Heartbeats arrive every second on a subscribed connection.
                stale_after: Duration::from_secs(30),
                max_connection_age: None,
                // Cloudflare bans an IP for 10 minutes past ~150 attempts in 10 minutes.
                connect_budget: (100, Duration::from_secs(600)),
            },
        }
    }
}

/// Kraken's native candle lengths in minutes, for the intervals served natively.
fn native_minutes(iv: Interval) -> Option<u32> {
    Some(match iv {
        Interval::M1 => 1,
        Interval::M5 => 5,
        Interval::M15 => 15,
        Interval::M30 => 30,
        Interval::H1 => 60,
        Interval::H4 => 240,
        Interval::D1 => 1440,
        _ => return None,
    })
}

/// Kraken's v1/REST asset codes that v2 spells differently.
fn v2_asset(code: &str) -> &str {
    match code {
        "XBT" => "BTC",
        "XDG" => "DOGE",
        other => other,
    }
}

impl Adapter for Kraken {
    fn id(&self) -> ExchangeId {
        ExchangeId::Kraken
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn stream_name(&self, feed: Feed, instrument: &Instrument) -> String {
        let sym = &instrument.native;
        match feed {
            Feed::Ticker => format!("ticker:{sym}"),
            Feed::Trades => format!("trade:{sym}"),
            Feed::Book => format!("book:{sym}"),
            Feed::Klines(iv) => match native_minutes(iv) {
                Some(m) => format!("ohlc:{m}:{sym}"),
                None => format!("candles:{iv}:{sym}"),
            },
        }
    }

    fn new_protocol(&self, ctx: ProtocolContext) -> Box<dyn Protocol> {
        Box::new(KrakenProtocol::new(ctx))
    }

    fn batch_group<'a>(&self, stream: &'a str) -> &'a str {
        match stream.split_once(':') {
            // Derived candles subscribe the trade channel underneath.
            Some(("candles", _)) => "trade",
            Some(("ohlc", rest)) => {
                let n = rest.split_once(':').map_or(rest, |(n, _)| n);
                &stream[..5 + n.len()]
            }
            Some((channel, _)) => channel,
            None => stream,
        }
    }

    fn unknown_symbol_hint(&self, symbol: &str) -> Option<&'static str> {
        symbol
            .starts_with("XBT")
            .then_some("Kraken's XBT is BTC here")
    }

    fn instruments_url(&self, rest_base: &str) -> String {
        format!("{}/0/public/AssetPairs", rest_base.trim_end_matches('/'))
    }

    fn parse_instruments(&self, body: &str) -> Result<InstrumentSet, DecodeError> {
        #[derive(Deserialize)]
        struct Reply {
            #[serde(default)]
            error: Vec<String>,
            #[serde(default)]
            result: HashMap<String, Pair>,
        }
        #[derive(Deserialize)]
        struct Pair {
            wsname: Option<String>,
            status: Option<String>,
            pair_decimals: Option<u32>,
            lot_decimals: Option<u32>,
        }
        let reply: Reply = serde_json::from_str(body)?;
        if !reply.error.is_empty() {
            return Err(DecodeError::Unexpected(reply.error.join("; ")));
        }
        let mut set = InstrumentSet::default();
        for (key, pair) in reply.result {
            // `.d` pairs are dark pools; pairs without a wsname are not on WebSocket.
            let Some((base, quote)) = pair.wsname.as_deref().and_then(|w| w.split_once('/')) else {
                continue;
            };
            if key.ends_with(".d") {
                continue;
            }
            let (base, quote) = (v2_asset(base), v2_asset(quote));
            let Ok(symbol) = Symbol::parse(&format!("{base}{quote}")) else {
                continue;
            };
            let status = pair.status.unwrap_or_else(|| "online".into());
            set.by_symbol.insert(
                symbol,
                Instrument {
                    native: format!("{base}/{quote}"),
                    base: base.to_string(),
                    quote: quote.to_string(),
                    tradable: status == "online",
                    status,
                    price_precision: pair.pair_decimals,
                    qty_precision: pair.lot_decimals,
                    rest_name: Some(key),
                },
            );
        }
        Ok(set)
    }
}

/// Kraken's CRC32: top-10 asks low→high then top-10 bids high→low, each level as price
/// digits then quantity digits, at the pair's precisions.
fn checksum(book: &LocalBook, price_prec: u32, qty_prec: u32) -> u32 {
    let mut s = String::with_capacity(400);
    let mut push = |p: &Dec, q: &Dec| {
        s.push_str(&p.checksum_digits(price_prec));
        s.push_str(&q.checksum_digits(qty_prec));
    };
    for (p, q) in book.best_asks().take(CHECKSUM_LEVELS) {
        push(p, q);
    }
    for (p, q) in book.best_bids().take(CHECKSUM_LEVELS) {
        push(p, q);
    }
    crc32fast::hash(s.as_bytes())
}

/// A native `ohlc` stream: the candle being reported, finalised exactly once.
struct NativeCandles {
    interval: Interval,
    current: Option<Kline>,
    last_final: Option<i64>,
}

impl NativeCandles {
    fn update(&mut self, k: Kline, out: &mut Vec<Kline>) {
        if self.last_final.is_some_and(|f| k.open_time <= f) {
            return;
        }
        if let Some(cur) = &self.current {
            if k.open_time < cur.open_time {
                return;
            }
            if k.open_time > cur.open_time {
                self.finalize(out);
            }
        }
        out.push(k.clone());
        self.current = Some(k);
    }

    fn finalize(&mut self, out: &mut Vec<Kline>) {
        if let Some(mut k) = self.current.take() {
            k.is_final = true;
            self.last_final = Some(k.open_time);
            out.push(k);
        }
    }

    fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Kline>) {
        if self
            .current
            .as_ref()
            .is_some_and(|k| now_ms > k.close_time + GRACE_MS)
        {
            self.finalize(out);
        }
    }
}

struct KrakenProtocol {
    /// Native symbol → instrument (precisions, REST name).
    by_native: HashMap<String, Instrument>,
    /// Our streams on this connection.
    streams: HashSet<String>,
    /// Native symbol → how many of our streams need its `trade` channel.
    trade_users: HashMap<String, usize>,
    books: HashMap<String, LocalBook>,
    /// Books that keep failing their checksum are resynced ever further apart.
    resyncs: Resyncs,
    /// Price and quantity precision by pair from the WebSocket `instrument` channel: the ones
    /// the book checksum is computed at, which REST's `AssetPairs` may state otherwise.
    ws_precisions: HashMap<String, (u32, u32)>,
    native: HashMap<String, NativeCandles>,
    /// Intervals Kraken has no native stream for, built from its trades.
    derived: DerivedCandles,
    next_req: u64,
    last_ping_ms: i64,
}

impl KrakenProtocol {
    fn new(ctx: ProtocolContext) -> KrakenProtocol {
        let by_native = ctx
            .instruments
            .by_symbol
            .values()
            .map(|i| (i.native.clone(), i.clone()))
            .collect();
        KrakenProtocol {
            by_native,
            streams: HashSet::new(),
            trade_users: HashMap::new(),
            books: HashMap::new(),
            resyncs: Resyncs::default(),
            ws_precisions: HashMap::new(),
            native: HashMap::new(),
            derived: DerivedCandles::default(),
            next_req: 1,
            last_ping_ms: 0,
        }
    }

    fn request(
        &mut self,
        method: &str,
        channel: &str,
        symbols: &[&str],
        extra: serde_json::Value,
    ) -> String {
        let mut params = json!({"channel": channel, "symbol": symbols});
        if let (Some(p), serde_json::Value::Object(extra)) = (params.as_object_mut(), extra) {
            p.extend(extra);
        }
        let req_id = self.next_req;
        self.next_req += 1;
        json!({"method": method, "params": params, "req_id": req_id}).to_string()
    }

    /// One `subscribe`/`unsubscribe` frame for `channel` (with its parameter: the ohlc interval)
    /// on `symbols`. The per-channel rules live here only: books at depth 25, trades without
    /// the 50-trade snapshot (history, not news).
    fn frame(
        &mut self,
        method: &str,
        channel: &str,
        param: Option<&str>,
        symbols: &[&str],
        out: &mut Vec<Effect>,
    ) {
        let subscribing = method == "subscribe";
        let extra = match channel {
            "book" if subscribing => json!({"depth": BOOK_DEPTH}),
            "trade" if subscribing => json!({"snapshot": false}),
            "ohlc" => json!({"interval": param.and_then(|p| p.parse::<u32>().ok()).unwrap_or(1)}),
            _ => json!({}),
        };
        let frame = self.request(method, channel, symbols, extra);
        out.push(Effect::Send(frame));
    }

    /// Sends one frame per (channel, parameter) group.
    fn frames(&mut self, method: &str, groups: Groups, out: &mut Vec<Effect>) {
        for ((channel, param), symbols) in groups {
            let syms: Vec<&str> = symbols.iter().map(String::as_str).collect();
            self.frame(method, &channel, param.as_deref(), &syms, out);
        }
    }

    /// Resyncs one symbol's book from a fresh snapshot (unsubscribe, then subscribe); the
    /// connection and other symbols stay. A book that keeps failing is resubscribed ever
    /// later ([`Resyncs`]): until then it sends nothing, and the others flow.
    fn resync(&mut self, symbol: &str, why: &str, now_ms: i64, out: &mut Vec<Effect>) {
        let stream = format!("book:{symbol}");
        let retry_in_ms = self.resyncs.failed(&stream, now_ms);
        out.push(Effect::Resyncing {
            stream: stream.clone(),
            why: why.to_string(),
            failures: self.resyncs.failures(&stream),
            retry_in_ms,
        });
        if let Some(book) = self.books.get_mut(symbol) {
            book.clear(false);
        }
        self.frame("unsubscribe", "book", None, &[symbol], out);
        if retry_in_ms == 0 {
            self.frame("subscribe", "book", None, &[symbol], out);
        }
    }

    fn precisions(&self, symbol: &str, fallback: (u32, u32)) -> (u32, u32) {
        if let Some(p) = self.ws_precisions.get(symbol) {
            return *p;
        }
        self.by_native.get(symbol).map_or(fallback, |i| {
            (
                i.price_precision.unwrap_or(fallback.0),
                i.qty_precision.unwrap_or(fallback.1),
            )
        })
    }

    fn on_book(
        &mut self,
        msg: BookMsg,
        snapshot: bool,
        now_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        let symbol = msg.symbol.clone();
        let stream = format!("book:{symbol}");
        if !self.streams.contains(&stream) {
            return Ok(());
        }
        let (pp, qp) = self.precisions(&symbol, (msg.price_scale(), msg.qty_scale()));
        let book = self.books.entry(symbol.clone()).or_default();
        if snapshot {
            book.clear(true);
        } else if !book.synced {
            return Ok(()); // waiting for the resync snapshot
        }
        for (side, levels) in [(BookSide::Bid, &msg.bids), (BookSide::Ask, &msg.asks)] {
            for l in levels {
                let price = decimal("price", l.price.get())?;
                let qty = decimal("qty", l.qty.get())?;
                book.set(side, price, qty);
            }
        }
        book.truncate(BOOK_DEPTH);
        let local = checksum(book, pp, qp);
        if local != msg.checksum {
            self.resync(
                &symbol,
                &format!("checksum mismatch: ours {local}, Kraken's {}", msg.checksum),
                now_ms,
                out,
            );
            return Ok(());
        }
        if book.crossed() {
            self.resync(&symbol, "crossed book", now_ms, out);
            return Ok(());
        }
        if self.resyncs.verified(&stream) {
            out.push(Effect::BookHealthy {
                stream: stream.clone(),
            });
        }
        let time_ms = msg
            .timestamp
            .as_deref()
            .and_then(rfc3339_ms)
            .unwrap_or_else(crate::protocol::now_millis);
        out.push(Effect::Event {
            stream,
            event: MarketEvent::Book(book.top(time_ms)),
        });
        Ok(())
    }

    /// A reply to one of our requests. A subscribe refused for a symbol means the exchange
    /// will never serve it: every stream of ours on it is refused, so its clients are told
    /// instead of waiting forever.
    fn on_reply(&self, method: &str, frame: &Frame, out: &mut Vec<Effect>) {
        if frame.success != Some(false) {
            out.push(Effect::Ack);
            return;
        }
        let error = frame.error.clone().unwrap_or_default();
        match (&frame.symbol, method) {
            (Some(symbol), "subscribe") if !error.contains("Already subscribed") => {
                let suffix = format!(":{symbol}");
                for stream in self.streams.iter().filter(|s| s.ends_with(&suffix)) {
                    out.push(Effect::StreamRejected {
                        stream: stream.clone(),
                        code: ErrorCode::UnknownSymbol,
                        message: format!("kraken refused {symbol}: {error}"),
                    });
                }
            }
            _ => out.push(Effect::Rejected(format!("{method}: {error}"))),
        }
    }

    /// Native candles. Kraken's have no closed flag: [`NativeCandles`] marks one final when
    /// the next begins or the clock passes its end. `time` is the message's (never later than
    /// now): the candle's own `timestamp` is its end, and a 1d candle's is tomorrow.
    fn on_ohlc(
        &mut self,
        mut candles: Vec<OhlcMsg>,
        snapshot: bool,
        time_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        candles.sort_by_key(|c| rfc3339_ms(&c.interval_begin).unwrap_or(0));
        if snapshot {
            // A snapshot lists recent candles; only the newest is current.
            let newest = candles.pop();
            candles = newest.into_iter().collect();
        }
        for c in candles {
            let stream = format!("ohlc:{}:{}", c.interval, c.symbol);
            let Some(state) = self.native.get_mut(&stream) else {
                continue;
            };
            let begin = rfc3339_ms(&c.interval_begin).ok_or_else(|| DecodeError::Field {
                field: "interval_begin",
                reason: c.interval_begin.clone(),
            })?;
            let (open_time, close_time) = bucket(state.interval, begin);
            let k = Kline {
                interval: state.interval,
                open_time,
                close_time,
                open: c.open,
                high: c.high,
                low: c.low,
                close: c.close,
                volume: c.volume,
                // Kraken gives only a rounded vwap: no exact quote volume.
                quote_volume: None,
                trades: Some(c.trades),
                is_final: false,
                time_ms,
            };
            let mut klines = Vec::new();
            state.update(k, &mut klines);
            push_klines(&stream, klines, out);
        }
        Ok(())
    }

    fn on_trades(
        &mut self,
        mut trades: Vec<TradeMsg>,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        // Candles need trades in exchange order, whatever order a message lists them in.
        trades.sort_by_key(|t| (rfc3339_ms(&t.timestamp).unwrap_or(0), t.trade_id));
        for t in trades {
            let time_ms = rfc3339_ms(&t.timestamp).ok_or_else(|| DecodeError::Field {
                field: "timestamp",
                reason: format!("'{}' is not RFC 3339", t.timestamp),
            })?;
            let trade = Trade {
                trade_id: TradeId::Number(t.trade_id),
                price: t.price,
                quantity: t.qty,
                side: match t.side.as_str() {
                    "buy" => Side::Buy,
                    "sell" => Side::Sell,
                    other => {
                        return Err(DecodeError::Field {
                            field: "side",
                            reason: format!("'{other}'"),
                        })
                    }
                },
                time_ms,
            };
            let stream = format!("trade:{}", t.symbol);
            if self.streams.contains(&stream) {
                out.push(Effect::Event {
                    stream,
                    event: MarketEvent::Trade(trade.clone()),
                });
            }
            self.derived.on_trade(&t.symbol, &trade, out);
        }
        Ok(())
    }
}

/// Symbols per (channel, parameter): one Kraken frame each.
type Groups = BTreeMap<(String, Option<String>), Vec<String>>;

fn group(groups: &mut Groups, channel: &str, param: Option<&str>, symbol: String) {
    groups
        .entry((channel.to_string(), param.map(String::from)))
        .or_default()
        .push(symbol);
}

/// Splits our stream name: (`channel`, parameter, native symbol).
fn parts(stream: &str) -> Option<(&str, Option<&str>, &str)> {
    let (channel, rest) = stream.split_once(':')?;
    match channel {
        "ohlc" | "candles" => {
            let (param, symbol) = rest.split_once(':')?;
            Some((channel, Some(param), symbol))
        }
        _ => Some((channel, None, rest)),
    }
}

impl Protocol for KrakenProtocol {
    fn backfilled(&mut self, stream: &str, trades: &[Trade], _now_ms: i64, out: &mut Vec<Effect>) {
        if let Some(symbol) = stream.strip_prefix("trade:") {
            for t in trades {
                self.derived.on_trade(symbol, t, out);
            }
        }
    }

    fn subscribe(&mut self, streams: &[String], now_ms: i64, out: &mut Vec<Effect>) {
        let mut upstream = Groups::new();
        for stream in streams {
            let Some((channel, param, symbol)) = parts(stream) else {
                continue;
            };
            if !self.streams.insert(stream.clone()) {
                continue;
            }
            let symbol = symbol.to_string();
            match channel {
                "trade" | "candles" => {
                    if channel == "candles" {
                        let Some(iv) = param.and_then(|p| p.parse::<Interval>().ok()) else {
                            continue;
                        };
                        self.derived.add(stream, iv, now_ms, out);
                    }
                    let users = self.trade_users.entry(symbol.clone()).or_default();
                    *users += 1;
                    if *users == 1 {
                        group(&mut upstream, "trade", None, symbol);
                    }
                }
                "ohlc" => {
                    let minutes: u32 = param.and_then(|p| p.parse().ok()).unwrap_or(1);
                    let interval = Interval::ALL
                        .into_iter()
                        .find(|iv| native_minutes(*iv) == Some(minutes))
                        .unwrap_or(Interval::M1);
                    self.native.insert(
                        stream.clone(),
                        NativeCandles {
                            interval,
                            current: None,
                            last_final: None,
                        },
                    );
                    group(&mut upstream, "ohlc", param, symbol);
                }
                _ => group(&mut upstream, channel, None, symbol),
            }
        }
        self.frames("subscribe", upstream, out);
    }

    fn unsubscribe(&mut self, streams: &[String], _now_ms: i64, out: &mut Vec<Effect>) {
        let mut upstream = Groups::new();
        for stream in streams {
            let Some((channel, param, symbol)) = parts(stream) else {
                continue;
            };
            if !self.streams.remove(stream) {
                continue;
            }
            let symbol = symbol.to_string();
            match channel {
                "trade" | "candles" => {
                    self.derived.remove(stream);
                    let users = self.trade_users.entry(symbol.clone()).or_default();
                    *users = users.saturating_sub(1);
                    if *users == 0 {
                        self.trade_users.remove(&symbol);
                        group(&mut upstream, "trade", None, symbol);
                    }
                }
                "ohlc" => {
                    self.native.remove(stream);
                    group(&mut upstream, "ohlc", param, symbol);
                }
                "book" => {
                    self.books.remove(&symbol);
                    group(&mut upstream, "book", None, symbol);
                }
                _ => group(&mut upstream, channel, None, symbol),
            }
        }
        self.frames("unsubscribe", upstream, out);
    }

    fn decode(
        &mut self,
        text: &str,
        now_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        let frame: Frame = serde_json::from_str(text)?;
        if let Some(method) = frame.method {
            self.on_reply(method, &frame, out);
            return Ok(());
        }
        let Some(data) = frame.data else {
            return Ok(()); // heartbeat
        };
        let snapshot = frame.kind == Some("snapshot");
        match frame.channel {
            Some("book") => {
                for msg in serde_json::from_str::<Vec<BookMsg>>(data.get())? {
                    self.on_book(msg, snapshot, now_ms, out)?;
                }
            }
            Some("trade") => self.on_trades(serde_json::from_str(data.get())?, out)?,
            Some("ticker") => {
                for t in serde_json::from_str::<Vec<TickerMsg>>(data.get())? {
                    on_ticker(t, now_ms, out);
                }
            }
            Some("ohlc") => {
                let event_time = frame.timestamp.and_then(rfc3339_ms).unwrap_or(now_ms);
                let candles = serde_json::from_str(data.get())?;
                self.on_ohlc(candles, snapshot, event_time.min(now_ms), out)?;
            }
            Some("instrument") => {
                #[derive(Deserialize)]
                struct Pairs {
                    #[serde(default)]
                    pairs: Vec<PairMsg>,
                }
                #[derive(Deserialize)]
                struct PairMsg {
                    symbol: String,
                    price_precision: u32,
                    qty_precision: u32,
                }
                for p in serde_json::from_str::<Pairs>(data.get())?.pairs {
                    self.ws_precisions
                        .insert(p.symbol, (p.price_precision, p.qty_precision));
                }
            }
            _ => {} // status, heartbeat
        }
        Ok(())
    }

    /// The `instrument` channel first: its precisions are the ones the checksums use.
    fn on_connect(&mut self, _now_ms: i64, out: &mut Vec<Effect>) {
        self.next_req += 1;
        out.push(Effect::Send(
            serde_json::json!({"method": "subscribe", "params": {"channel": "instrument"}, "req_id": self.next_req})
                .to_string(),
        ));
    }

    fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        for stream in self.resyncs.due(now_ms) {
            if let Some(symbol) = stream.strip_prefix("book:") {
                if self.streams.contains(&stream) {
                    self.frame("subscribe", "book", None, &[symbol], out);
                }
            }
        }
        for (stream, state) in &mut self.native {
            let mut klines = Vec::new();
            state.on_tick(now_ms, &mut klines);
            push_klines(stream, klines, out);
        }
        self.derived.on_tick(now_ms, out);
        if now_ms - self.last_ping_ms >= PING_EVERY_MS {
            self.last_ping_ms = now_ms;
            let req_id = self.next_req;
            self.next_req += 1;
            out.push(Effect::Send(
                json!({"method": "ping", "req_id": req_id}).to_string(),
            ));
        }
    }

    fn on_seeded(
        &mut self,
        tag: u64,
        seed: Result<Seed, String>,
        _now_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        self.derived.on_seed("kraken", tag, seed, out);
    }
}

/// `[time, "open", "high", "low", "close", "vwap", "volume", count]`.
type RestOhlcRow = (i64, String, String, String, String, String, String, u64);

/// The `result` of a Kraken public REST answer (`{"error":[...],"result":{...}}`), or its
/// errors.
pub fn rest_result(body: &str) -> Result<HashMap<String, serde_json::Value>, String> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        error: Vec<String>,
        result: Option<HashMap<String, serde_json::Value>>,
    }
    let reply: Reply = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if !reply.error.is_empty() {
        return Err(reply.error.join("; "));
    }
    Ok(reply.result.unwrap_or_default())
}

/// The pair's rows in a `result` keyed by Kraken's pair name, beside `last`.
pub fn pair_rows(result: HashMap<String, serde_json::Value>) -> Result<serde_json::Value, String> {
    result
        .into_iter()
        .find(|(k, v)| k != "last" && v.is_array())
        .map(|(_, v)| v)
        .ok_or_else(|| "no rows in the reply".to_string())
}

/// `GET /0/public/OHLC`: `{"error":[],"result":{"XXBTZUSD":[[time,"o","h","l","c","vwap","vol",count],...],"last":...}}`.
pub fn parse_rest_ohlc(body: &str) -> Result<Vec<SeedCandle>, String> {
    let rows = pair_rows(rest_result(body)?)?;
    let rows: Vec<RestOhlcRow> = serde_json::from_value(rows).map_err(|e| e.to_string())?;
    rows.into_iter()
        .map(|(t, o, h, l, c, _vwap, v, n)| {
            let f = |s: &str| s.parse::<Dec>().map_err(|e| e.to_string());
            Ok(SeedCandle {
                open_time: t * 1000,
                open: f(&o)?,
                high: f(&h)?,
                low: f(&l)?,
                close: f(&c)?,
                volume: f(&v)?,
                quote_volume: None,
                trades: Some(n),
            })
        })
        .collect()
}

/// `{"symbol":"ALGO/USD","bid":0.10025,"bid_qty":740.0,...,"change_pct":-0.17}`: every
/// amount Kraken's own, the open exactly `last − change`.
fn on_ticker(t: TickerMsg, now_ms: i64, out: &mut Vec<Effect>) {
    out.push(Effect::Event {
        stream: format!("ticker:{}", t.symbol),
        event: MarketEvent::Ticker(Box::new(Ticker {
            price: t.last,
            bid: t.bid,
            ask: t.ask,
            bid_size: t.bid_qty,
            ask_size: t.ask_qty,
            volume: t.volume,
            // vwap·volume would look exact and is not: vwap is rounded.
            quote_volume: None,
            change: Some(t.change),
            change_percent: t.change_pct,
            high: t.high,
            low: t.low,
            open: t.last.checked_sub(t.change),
            previous_close: None,
            time_ms: t
                .timestamp
                .as_deref()
                .and_then(rfc3339_ms)
                .unwrap_or(now_ms),
        })),
    });
}

#[derive(Deserialize)]
struct Frame<'a> {
    channel: Option<&'a str>,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    method: Option<&'a str>,
    success: Option<bool>,
    error: Option<String>,
    symbol: Option<String>,
    /// The message's time (ohlc updates carry it; the candles' own `timestamp` is their end).
    timestamp: Option<&'a str>,
}

#[derive(Deserialize)]
struct RawLevel<'a> {
    #[serde(borrow)]
    price: &'a RawValue,
    #[serde(borrow)]
    qty: &'a RawValue,
}

/// `{"symbol":"MATIC/USD","bids":[{"price":0.5666,"qty":4831.75496356}],"asks":[...],
/// "checksum":2439117997,"timestamp":"2023-10-06T17:35:55.440295Z"}`; numbers keep Kraken's
/// full precision, read as raw text.
#[derive(Deserialize)]
struct BookMsg<'a> {
    symbol: String,
    #[serde(borrow, default)]
    bids: Vec<RawLevel<'a>>,
    #[serde(borrow, default)]
    asks: Vec<RawLevel<'a>>,
    checksum: u32,
    timestamp: Option<String>,
}

impl BookMsg<'_> {
    /// Precisions seen in this message, for pairs without instrument data.
    fn price_scale(&self) -> u32 {
        self.bids
            .iter()
            .chain(&self.asks)
            .map(|l| frac_digits(l.price.get()))
            .max()
            .unwrap_or(0)
    }

    fn qty_scale(&self) -> u32 {
        self.bids
            .iter()
            .chain(&self.asks)
            .map(|l| frac_digits(l.qty.get()))
            .max()
            .unwrap_or(0)
    }
}

fn frac_digits(s: &str) -> u32 {
    s.split_once('.').map_or(0, |(_, f)| f.len() as u32)
}

// Kraken v2 sends amounts as JSON numbers; [`Dec`] reads them back to the digits Kraken wrote.
#[derive(Deserialize)]
struct TradeMsg {
    symbol: String,
    side: String,
    price: Dec,
    qty: Dec,
    trade_id: u64,
    timestamp: String,
}

#[derive(Deserialize)]
struct TickerMsg {
    symbol: String,
    bid: Dec,
    bid_qty: Dec,
    ask: Dec,
    ask_qty: Dec,
    last: Dec,
    volume: Dec,
    low: Dec,
    high: Dec,
    change: Dec,
    change_pct: Dec,
    timestamp: Option<String>,
}

#[derive(Deserialize)]
struct OhlcMsg {
    symbol: String,
    open: Dec,
    high: Dec,
    low: Dec,
    close: Dec,
    trades: u64,
    volume: Dec,
    interval_begin: String,
    interval: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> crate::decimal::Dec {
        s.parse().unwrap()
    }
    use std::sync::Arc;

    fn session(instruments: InstrumentSet) -> KrakenProtocol {
        KrakenProtocol::new(ProtocolContext {
            instruments: Arc::new(instruments),
        })
    }

    fn matic() -> InstrumentSet {
        let mut set = InstrumentSet::default();
        set.by_symbol.insert(
            Symbol::parse("MATICUSD").unwrap(),
            Instrument {
                native: "MATIC/USD".into(),
                base: "MATIC".into(),
                quote: "USD".into(),
                status: "online".into(),
                tradable: true,
                price_precision: Some(4),
                qty_precision: Some(8),
                rest_name: Some("MATICUSD".into()),
            },
        );
        set
    }

    /// EXCHANGES.md §3.3, numbers as the docs print them (trailing zeros dropped).
    const SNAPSHOT: &str = r#"{"channel":"book","type":"snapshot","data":[{"symbol":"MATIC/USD","bids":[{"price":0.5666,"qty":4831.75496356},{"price":0.5665,"qty":6658.22734739},{"price":0.5664,"qty":18724.91513344},{"price":0.5663,"qty":11563.92544914},{"price":0.5662,"qty":14006.65365711},{"price":0.5661,"qty":17454.85679807},{"price":0.566,"qty":18097.1547},{"price":0.5659,"qty":33644.89175666},{"price":0.5658,"qty":148.3464},{"price":0.5657,"qty":606.70854372}],"asks":[{"price":0.5668,"qty":4410.79769741},{"price":0.5669,"qty":4655.40412487},{"price":0.567,"qty":49844.89424998},{"price":0.5671,"qty":24306.41678},{"price":0.5672,"qty":29783.25223475},{"price":0.5673,"qty":57234.71239278},{"price":0.5674,"qty":45065.04744},{"price":0.5675,"qty":5912.76380354},{"price":0.5676,"qty":42514.92434778},{"price":0.5677,"qty":36304.0847022}],"checksum":2439117997,"timestamp":"2023-10-06T17:35:55.440295Z"}]}"#;
    const UPDATE: &str = r#"{"channel":"book","type":"update","data":[{"symbol":"MATIC/USD","bids":[{"price":0.5657,"qty":1098.3947558}],"asks":[],"checksum":2114181697,"timestamp":"2023-10-06T17:35:55.440295Z"}]}"#;

    #[test]
    fn checksum_vectors_from_the_docs_pass() {
        let mut s = session(matic());
        let mut out = Vec::new();
        s.subscribe(&["book:MATIC/USD".into()], 0, &mut out);
        out.clear();
        s.decode(SNAPSHOT, 0, &mut out).unwrap();
        assert!(
            matches!(
                &out[..],
                [Effect::Event {
                    event: MarketEvent::Book(_),
                    ..
                }]
            ),
            "{out:?}"
        );
        out.clear();
        s.decode(UPDATE, 0, &mut out).unwrap();
        let [Effect::Event {
            event: MarketEvent::Book(b),
            ..
        }] = &out[..]
        else {
            panic!("update rejected: {out:?}")
        };
        assert_eq!(b.bids[9], [d("0.5657"), d("1098.3947558")]);
    }

    #[test]
    fn the_guide_string_checksum_is_3310070434() {
        let guide = "45285210000045286415457195345286615457110945289615456091145290215890660452918154553491452947445474945296135380000452975994554245299518772827452835100000004528341545820154528211000000045281010000000452803154592586452790799000045277633101034527753000000045277315460273745276615445238";
        assert_eq!(crc32fast::hash(guide.as_bytes()), 3_310_070_434);
    }

    #[test]
    fn a_bad_checksum_resyncs_only_that_symbol() {
        let mut s = session(matic());
        let mut out = Vec::new();
        s.subscribe(&["book:MATIC/USD".into()], 0, &mut out);
        s.decode(SNAPSHOT, 0, &mut out).unwrap();
        out.clear();
        let bad = UPDATE.replace("2114181697", "12345");
        s.decode(&bad, 0, &mut out).unwrap();
        assert!(out
            .iter()
            .any(|d| matches!(d, Effect::Resyncing { stream, .. } if stream == "book:MATIC/USD")));
        let frames: Vec<&String> = out
            .iter()
            .filter_map(|d| match d {
                Effect::Send(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 2, "{out:?}");
        assert!(frames[0].contains("\"unsubscribe\"") && frames[0].contains("MATIC/USD"));
        assert!(frames[1].contains("\"subscribe\"") && frames[1].contains("\"depth\":25"));
        assert!(
            !out.iter().any(|d| matches!(d, Effect::Event { .. })),
            "no bad book goes out"
        );
        // Updates before the fresh snapshot are ignored; the snapshot restores service.
        out.clear();
        s.decode(UPDATE, 0, &mut out).unwrap();
        assert!(out.is_empty());
        s.decode(SNAPSHOT, 0, &mut out).unwrap();
        assert!(matches!(&out[..], [Effect::Event { .. }]));
    }

    #[test]
    fn instruments_map_xbt_and_xdg() {
        let body = r#"{"error":[],"result":{
            "XXBTZUSD":{"altname":"XBTUSD","wsname":"XBT/USD","base":"XXBT","quote":"ZUSD","pair_decimals":1,"lot_decimals":8,"status":"online"},
            "XDGUSD":{"altname":"XDGUSD","wsname":"XDG/USD","base":"XXDG","quote":"ZUSD","pair_decimals":7,"lot_decimals":8,"status":"online"},
            "XETHZUSD.d":{"altname":"ETHUSD.d","wsname":"ETH/USD","status":"online"},
            "USDTUSD":{"altname":"USDTUSD","wsname":"USDT/USD","pair_decimals":4,"lot_decimals":8,"status":"cancel_only"}}}"#;
        let set = Kraken::new().parse_instruments(body).unwrap();
        let btc = &set.by_symbol[&Symbol::parse("BTCUSD").unwrap()];
        assert_eq!(
            (
                btc.native.as_str(),
                btc.price_precision,
                btc.rest_name.as_deref()
            ),
            ("BTC/USD", Some(1), Some("XXBTZUSD"))
        );
        assert_eq!(
            set.by_symbol[&Symbol::parse("DOGEUSD").unwrap()].native,
            "DOGE/USD"
        );
        assert!(!set.by_symbol[&Symbol::parse("USDTUSD").unwrap()].tradable);
        assert!(
            !set.by_symbol
                .contains_key(&Symbol::parse("XBTUSD").unwrap()),
            "no string-rule aliases"
        );
        assert_eq!(set.by_symbol.len(), 3, "dark pool pairs are skipped");
    }

    #[test]
    fn ticker_trade_and_ohlc_map_to_events() {
        let mut s = session(matic());
        let mut out = Vec::new();
        s.subscribe(&["ticker:ALGO/USD".into()], 0, &mut out);
        s.subscribe(
            &["trade:MATIC/USD".into(), "candles:1s:MATIC/USD".into()],
            0,
            &mut out,
        );
        s.subscribe(&["ohlc:5:MATIC/USD".into()], 0, &mut out);
        // The trade-built candle asks for its seed; the exchange has nothing in this bucket.
        let tag = out
            .iter()
            .find_map(|d| match d {
                Effect::Seed { tag, stream, .. } if stream == "candles:1s:MATIC/USD" => Some(*tag),
                _ => None,
            })
            .unwrap();
        let mut seeded = Vec::new();
        s.on_seeded(
            tag,
            Ok(crate::exchange::candles::Seed {
                complete: true,
                ..Default::default()
            }),
            0,
            &mut seeded,
        );
        let sends = out.iter().filter(|d| matches!(d, Effect::Send(_))).count();
        assert_eq!(
            sends, 3,
            "one trade subscription serves the trades and the 1s candles: {out:?}"
        );
        out.clear();
        s.decode(r#"{"channel":"ticker","type":"snapshot","data":[{"symbol":"ALGO/USD","bid":0.10025,"bid_qty":740.0,"ask":0.10036,"ask_qty":1361.44813783,"last":0.10035,"volume":997038.98383185,"vwap":0.10148,"low":0.09979,"high":0.10285,"change":-0.00017,"change_pct":-0.17}]}"#, 7, &mut out).unwrap();
        let [Effect::Event {
            stream,
            event: MarketEvent::Ticker(t),
        }] = &out[..]
        else {
            panic!("{out:?}")
        };
        assert_eq!(stream, "ticker:ALGO/USD");
        assert_eq!(
            (
                t.price,
                t.bid_size,
                t.change_percent,
                t.quote_volume,
                t.time_ms
            ),
            (d("0.10035"), d("740.0"), d("-0.17"), None, 7)
        );
        // last − change, exactly: 0.10035 − (−0.00017).
        assert_eq!(t.open, Some(d("0.10052")));
        out.clear();
        s.decode(r#"{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell","price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,"timestamp":"2023-09-25T07:49:37.708706Z"}]}"#, 0, &mut out).unwrap();
        let trade = out
            .iter()
            .find_map(|d| match d {
                Effect::Event {
                    event: MarketEvent::Trade(t),
                    ..
                } => Some(t),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (trade.side, trade.trade_id.clone(), trade.time_ms),
            (Side::Sell, TradeId::Number(4665906), 1695628177708)
        );
        // The trade-built candle goes out on the next tick.
        assert!(!out.iter().any(|d| matches!(
            d,
            Effect::Event {
                event: MarketEvent::Kline(_),
                ..
            }
        )));
        s.on_tick(1695628177708 + 100, &mut out);
        assert!(out.iter().any(|d| matches!(d, Effect::Event { stream, event: MarketEvent::Kline(_) } if stream == "candles:1s:MATIC/USD")));
        out.clear();
        s.decode(r#"{"channel":"ohlc","type":"update","timestamp":"2023-10-04T16:26:30.524394914Z","data":[{"symbol":"MATIC/USD","open":0.5624,"high":0.5628,"low":0.5622,"close":0.5627,"trades":12,"volume":30927.68066226,"vwap":0.5626,"interval_begin":"2023-10-04T16:25:00.000000000Z","interval":5,"timestamp":"2023-10-04T16:30:00.000000Z"}]}"#, 1696436795000, &mut out).unwrap();
        let [Effect::Event {
            event: MarketEvent::Kline(k),
            ..
        }] = &out[..]
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            (
                k.interval,
                k.open_time,
                k.close_time - k.open_time,
                k.trades,
                k.is_final
            ),
            (Interval::M5, 1696436700000, 299_999, Some(12), false)
        );
        // The data's time is the message's (16:26:30.524), not the candle's end (16:30).
        assert_eq!(k.time_ms, 1696436790524);
        // The clock finalises it exactly once.
        out.clear();
        s.on_tick(1696437000000 + GRACE_MS + 1, &mut out);
        s.on_tick(1696437000000 + GRACE_MS + 2, &mut out);
        let finals = out
            .iter()
            .filter(|d| matches!(d, Effect::Event { stream, event: MarketEvent::Kline(k) } if k.is_final && stream == "ohlc:5:MATIC/USD"))
            .count();
        assert_eq!(finals, 1);
    }

    #[test]
    fn subscribe_errors_reach_the_clients() {
        let mut s = session(matic());
        let mut out = Vec::new();
        s.subscribe(&["ticker:NOPE/USD".into()], 0, &mut out);
        out.clear();
        s.decode(r#"{"error":"Currency pair not supported NOPE/USD","method":"subscribe","success":false,"symbol":"NOPE/USD","time_in":"2026-09-24T03:54:32.996743Z","time_out":"2026-09-24T03:54:32.996775Z"}"#, 0, &mut out).unwrap();
        assert!(
            matches!(&out[..], [Effect::StreamRejected { stream, code: ErrorCode::UnknownSymbol, .. }] if stream == "ticker:NOPE/USD"),
            "{out:?}"
        );
    }

    #[test]
    fn rest_ohlc_rows_parse() {
        let rows = parse_rest_ohlc(r#"{"error":[],"result":{"XXBTZUSD":[[1688671200,"30306.1","30306.2","30305.7","30305.7","30306.1","3.39243896",23]],"last":1688672160}}"#).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].open_time, rows[0].trades, rows[0].volume),
            (1_688_671_200_000, Some(23), d("3.39243896"))
        );
    }
}
