//! Binance Spot: combined streams (`/stream`), live `SUBSCRIBE`/`UNSUBSCRIBE`, symbols from
//! `GET /api/v3/exchangeInfo`. See EXCHANGES.md §1.
//!
//! - `price:` and `ticker:` share `<sym>@ticker`; `depth:` at 5, 10 and 20 share
//!   `<sym>@depth20@100ms`, whose payload names no symbol, so the stream name says which.
//! - Binance counts every incoming message, pongs included, against 5 a second and closes with
//!   1008 beyond it: control frames are spaced 350 ms apart (at most 3 a second plus a pong),
//!   and up to 100 streams ride in one `SUBSCRIBE`.
//! - Unknown or upper-case stream names are accepted silently and yield nothing, which is why
//!   every symbol is validated against `exchangeInfo` before it gets here.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    decimal, step_decimals, Adapter, DecodeError, Effect, Instrument, InstrumentSet, Limits,
    Protocol, ProtocolContext,
};
use crate::decimal::Dec;
use crate::domain::{ExchangeId, Interval, Symbol};
use crate::events::{Book, Feed, Kline, MarketEvent, Side, Ticker, Trade, TradeId};
use crate::protocol::now_millis;

pub struct Binance {
    limits: Limits,
}

impl Default for Binance {
    fn default() -> Self {
        Binance::new()
    }
}

impl Binance {
    pub fn new() -> Binance {
        Binance {
            limits: Limits {
                max_streams_per_connection: 1024,
                max_streams_per_message: 100,
                control_spacing: Duration::from_millis(350),
                // Binance rejects combined-stream URLs past ~8004 characters.
                max_url_len: 8000,
                // The server pings every 20 s; three missed pings means the socket is dead.
                stale_after: Duration::from_secs(60),
                // Binance cuts every connection at 24 h: renew before it does.
                max_connection_age: Some(Duration::from_secs(23 * 3600 + 30 * 60)),
                // Binance: 300 connection attempts per 5 minutes per IP; keep a margin.
                connect_budget: (250, Duration::from_secs(300)),
            },
        }
    }
}

impl Adapter for Binance {
    fn id(&self) -> ExchangeId {
        ExchangeId::Binance
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn stream_name(&self, feed: Feed, instrument: &Instrument) -> String {
        let sym = instrument.native.to_lowercase();
        match feed {
            Feed::Ticker => format!("{sym}@ticker"),
            Feed::Trades => format!("{sym}@trade"),
            Feed::Klines(iv) => format!("{sym}@kline_{iv}"),
            Feed::Book => format!("{sym}@depth20@100ms"),
        }
    }

    fn connect_url(&self, ws_base: &str, initial: &[String]) -> (String, usize) {
        let mut url = format!("{}/stream", ws_base.trim_end_matches('/'));
        let mut n = 0;
        for (i, s) in initial.iter().enumerate() {
            if url.len() + s.len() + 9 > self.limits.max_url_len
                || i >= self.limits.max_streams_per_connection
            {
                break;
            }
            url.push_str(if i == 0 { "?streams=" } else { "/" });
            url.push_str(s);
            n += 1;
        }
        (url, n)
    }

    fn new_protocol(&self, _ctx: ProtocolContext) -> Box<dyn Protocol> {
        Box::new(BinanceProtocol {
            next_id: AtomicU64::new(1),
        })
    }

    fn instruments_url(&self, rest_base: &str) -> String {
        format!("{}/api/v3/exchangeInfo", rest_base.trim_end_matches('/'))
    }

    fn parse_instruments(&self, body: &str) -> Result<InstrumentSet, DecodeError> {
        #[derive(Deserialize)]
        struct Info {
            symbols: Vec<SymbolInfo>,
        }
        #[derive(Deserialize)]
        struct SymbolInfo {
            symbol: String,
            status: String,
            #[serde(rename = "baseAsset", default)]
            base: String,
            #[serde(rename = "quoteAsset", default)]
            quote: String,
            #[serde(default)]
            filters: Vec<Filter>,
        }
        /// `{"filterType":"PRICE_FILTER","tickSize":"0.01000000",...}`,
        /// `{"filterType":"LOT_SIZE","stepSize":"0.00001000",...}`.
        #[derive(Deserialize)]
        struct Filter {
            #[serde(rename = "filterType")]
            kind: String,
            #[serde(rename = "tickSize")]
            tick_size: Option<String>,
            #[serde(rename = "stepSize")]
            step_size: Option<String>,
        }
        let info: Info = serde_json::from_str(body)?;
        let mut set = InstrumentSet::default();
        for s in info.symbols {
            // Symbols outside the unified alphabet (e.g. testnet's non-ASCII ones) cannot be
            // named in a channel, so they are left out.
            if let Ok(symbol) = Symbol::parse(&s.symbol) {
                let tradable = s.status == "TRADING";
                let step = |kind: &str, f: fn(&Filter) -> &Option<String>| {
                    s.filters
                        .iter()
                        .find(|x| x.kind == kind)
                        .and_then(|x| f(x).as_deref())
                        .and_then(step_decimals)
                };
                let price_precision = step("PRICE_FILTER", |f| &f.tick_size);
                let qty_precision = step("LOT_SIZE", |f| &f.step_size);
                set.by_symbol.insert(
                    symbol,
                    Instrument {
                        native: s.symbol,
                        base: s.base,
                        quote: s.quote,
                        status: s.status,
                        tradable,
                        price_precision,
                        qty_precision,
                        rest_name: None,
                    },
                );
            }
        }
        Ok(set)
    }
}

struct BinanceProtocol {
    next_id: AtomicU64,
}

impl BinanceProtocol {
    fn request(&self, method: &str, streams: &[String]) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        serde_json::json!({"method": method, "params": streams, "id": id}).to_string()
    }
}

impl Protocol for BinanceProtocol {
    fn subscribe(&mut self, streams: &[String], _now_ms: i64, out: &mut Vec<Effect>) {
        out.push(Effect::Send(self.request("SUBSCRIBE", streams)));
    }

    fn unsubscribe(&mut self, streams: &[String], _now_ms: i64, out: &mut Vec<Effect>) {
        out.push(Effect::Send(self.request("UNSUBSCRIBE", streams)));
    }

    fn decode(
        &mut self,
        text: &str,
        _now_ms: i64,
        out: &mut Vec<Effect>,
    ) -> Result<(), DecodeError> {
        decode(text, out)
    }
}

/// Every frame a combined-stream connection receives.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    stream: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    id: serde_json::Value,
    error: Option<ErrorBody>,
    /// Present (as `null` or a list) on replies to our requests.
    #[serde(default, rename = "result")]
    _result: serde_json::Value,
    /// A raw (non-combined) event's type, e.g. `serverShutdown`.
    e: Option<Cow<'a, str>>,
}

/// `{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}`
#[derive(Deserialize)]
struct ErrorBody {
    code: i64,
    msg: String,
}

/// Decodes one frame: pure, so it is tested from recorded JSON with no network.
pub fn decode(text: &str, out: &mut Vec<Effect>) -> Result<(), DecodeError> {
    let env: Envelope = serde_json::from_str(text)?;
    if let Some(err) = env.error {
        out.push(Effect::Rejected(format!(
            "request {} refused: code {} {}",
            env.id, err.code, err.msg
        )));
        return Ok(());
    }
    if env.e.as_deref() == Some("serverShutdown") {
        out.push(Effect::Reconnect("serverShutdown"));
        return Ok(());
    }
    let (Some(stream), Some(data)) = (env.stream, env.data) else {
        if !env.id.is_null() {
            out.push(Effect::Ack);
            return Ok(());
        }
        return Err(DecodeError::Unexpected(truncate(text)));
    };
    let data = data.get();
    let event = if stream == "!serverShutdown" {
        out.push(Effect::Reconnect("serverShutdown"));
        return Ok(());
    } else if stream.ends_with("@ticker") {
        MarketEvent::Ticker(Box::new(ticker(serde_json::from_str(data)?)?))
    } else if stream.contains("@kline_") {
        MarketEvent::Kline(kline(serde_json::from_str(data)?)?)
    } else if stream.ends_with("@trade") {
        MarketEvent::Trade(trade(serde_json::from_str(data)?)?)
    } else if stream.contains("@depth") {
        MarketEvent::Book(depth(serde_json::from_str(data)?)?)
    } else {
        return Err(DecodeError::Unexpected(format!("stream {stream}")));
    };
    out.push(Effect::Event {
        stream: stream.into_owned(),
        event,
    });
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

/// `<sym>@ticker`:
/// `{"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","w":"0.0018",
///   "x":"0.0009","c":"0.0025","Q":"10","b":"0.0024","B":"10","a":"0.0026","A":"100",
///   "o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18",...}`
#[derive(Deserialize)]
struct RawTicker<'a> {
    #[serde(rename = "E")]
    event_time: i64,
    #[serde(rename = "p")]
    change: &'a str,
    #[serde(rename = "P")]
    change_percent: &'a str,
    #[serde(rename = "x")]
    previous_close: &'a str,
    #[serde(rename = "c")]
    last: &'a str,
    #[serde(rename = "b")]
    bid: &'a str,
    #[serde(rename = "B")]
    bid_qty: &'a str,
    #[serde(rename = "a")]
    ask: &'a str,
    #[serde(rename = "A")]
    ask_qty: &'a str,
    #[serde(rename = "o")]
    open: &'a str,
    #[serde(rename = "h")]
    high: &'a str,
    #[serde(rename = "l")]
    low: &'a str,
    #[serde(rename = "v")]
    volume: &'a str,
    #[serde(rename = "q")]
    quote_volume: &'a str,
}

fn ticker(t: RawTicker) -> Result<Ticker, DecodeError> {
    Ok(Ticker {
        price: decimal("c", t.last)?,
        bid: decimal("b", t.bid)?,
        ask: decimal("a", t.ask)?,
        bid_size: decimal("B", t.bid_qty)?,
        ask_size: decimal("A", t.ask_qty)?,
        volume: decimal("v", t.volume)?,
        quote_volume: Some(decimal("q", t.quote_volume)?),
        change: Some(decimal("p", t.change)?),
        change_percent: decimal("P", t.change_percent)?,
        high: decimal("h", t.high)?,
        low: decimal("l", t.low)?,
        open: Some(decimal("o", t.open)?),
        previous_close: Some(decimal("x", t.previous_close)?),
        time_ms: t.event_time,
    })
}

/// `<sym>@kline_<iv>`: `{"e":"kline","E":...,"s":"NKNUSDT","k":{"t":1633998480000,
/// "T":1633998539999,"i":"1m","o":"0.35270000","c":"0.35280000","h":"0.35280000",
/// "l":"0.35220000","v":"25877.00000000","n":30,"x":false,"q":"9116.04600000",...}}`
#[derive(Deserialize)]
struct RawKlineEvent<'a> {
    #[serde(rename = "E")]
    event_time: i64,
    #[serde(borrow)]
    k: RawKline<'a>,
}

#[derive(Deserialize)]
struct RawKline<'a> {
    t: i64,
    #[serde(rename = "T")]
    close_time: i64,
    i: &'a str,
    o: &'a str,
    c: &'a str,
    h: &'a str,
    l: &'a str,
    v: &'a str,
    n: u64,
    x: bool,
    q: &'a str,
}

fn kline(e: RawKlineEvent) -> Result<Kline, DecodeError> {
    let k = e.k;
    let interval =
        k.i.parse::<Interval>()
            .map_err(|reason| DecodeError::Field {
                field: "k.i",
                reason,
            })?;
    Ok(Kline {
        interval,
        open_time: k.t,
        close_time: k.close_time,
        open: decimal("k.o", k.o)?,
        high: decimal("k.h", k.h)?,
        low: decimal("k.l", k.l)?,
        close: decimal("k.c", k.c)?,
        volume: decimal("k.v", k.v)?,
        quote_volume: Some(decimal("k.q", k.q)?),
        trades: Some(k.n),
        is_final: k.x,
        time_ms: e.event_time,
    })
}

/// `<sym>@trade`: `{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001",
/// "q":"100","T":1672515782136,"m":true,"M":true}`; `m` = the buyer is the maker, so the taker
/// sold.
#[derive(Deserialize)]
struct RawTrade<'a> {
    t: u64,
    p: &'a str,
    q: &'a str,
    #[serde(rename = "T")]
    trade_time: i64,
    m: bool,
}

fn trade(t: RawTrade) -> Result<Trade, DecodeError> {
    Ok(Trade {
        trade_id: TradeId::Number(t.t),
        price: decimal("p", t.p)?,
        quantity: decimal("q", t.q)?,
        side: if t.m { Side::Sell } else { Side::Buy },
        time_ms: t.trade_time,
    })
}

/// `<sym>@depth<N>@100ms`: `{"lastUpdateId":160,"bids":[["0.0024","10"]],"asks":[["0.0026","100"]]}`,
/// already best-first. No event time: the receive time stands in.
#[derive(Deserialize)]
struct RawDepth<'a> {
    #[serde(borrow)]
    bids: Vec<[&'a str; 2]>,
    #[serde(borrow)]
    asks: Vec<[&'a str; 2]>,
}

fn depth(d: RawDepth) -> Result<Book, DecodeError> {
    let levels = |side: &[[&str; 2]], field| -> Result<Vec<[Dec; 2]>, DecodeError> {
        side.iter()
            .map(|[p, q]| Ok([decimal(field, p)?, decimal(field, q)?]))
            .collect()
    };
    Ok(Book {
        bids: levels(&d.bids, "bids")?,
        asks: levels(&d.asks, "asks")?,
        time_ms: now_millis(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> crate::decimal::Dec {
        s.parse().unwrap()
    }

    fn one(text: &str) -> Effect {
        let mut out = Vec::new();
        decode(text, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    fn event(text: &str) -> (String, MarketEvent) {
        match one(text) {
            Effect::Event { stream, event } => (stream, event),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn ticker_maps_every_field() {
        let (stream, ev) = event(include_str!("../../fixtures/binance/frames/ticker.json"));
        assert_eq!(stream, "bnbbtc@ticker");
        assert_eq!(
            ev,
            MarketEvent::Ticker(Box::new(Ticker {
                price: d("0.0025"),
                bid: d("0.0024"),
                ask: d("0.0026"),
                bid_size: d("10.0"),
                ask_size: d("100.0"),
                volume: d("10000.0"),
                quote_volume: Some(d("18.0")),
                change: Some(d("0.0015")),
                change_percent: d("250.0"),
                high: d("0.0025"),
                low: d("0.0010"),
                open: Some(d("0.0010")),
                previous_close: Some(d("0.0009")),
                time_ms: 1672515782136,
            }))
        );
    }

    #[test]
    fn kline_maps_every_field() {
        let (stream, ev) = event(include_str!("../../fixtures/binance/frames/kline.json"));
        assert_eq!(stream, "nknusdt@kline_1m");
        assert_eq!(
            ev,
            MarketEvent::Kline(Kline {
                interval: Interval::M1,
                open_time: 1633998480000,
                close_time: 1633998539999,
                open: d("0.3527"),
                high: d("0.3528"),
                low: d("0.3522"),
                close: d("0.3528"),
                volume: d("25877.0"),
                quote_volume: Some(d("9116.046")),
                trades: Some(30),
                is_final: false,
                time_ms: 1633998523963,
            })
        );
    }

    #[test]
    fn trade_side_is_the_takers() {
        let (stream, ev) = event(include_str!("../../fixtures/binance/frames/trade.json"));
        assert_eq!(stream, "bnbbtc@trade");
        assert_eq!(
            ev,
            MarketEvent::Trade(Trade {
                trade_id: TradeId::Number(12345),
                price: d("0.001"),
                quantity: d("100.0"),
                side: Side::Sell,
                time_ms: 1672515782136,
            })
        );
        let (_, ev) = event(
            r#"{"stream":"x@trade","data":{"e":"trade","E":1,"s":"X","t":7,"p":"1.5","q":"2","T":2,"m":false,"M":true}}"#,
        );
        assert!(matches!(
            ev,
            MarketEvent::Trade(Trade {
                side: Side::Buy,
                ..
            })
        ));
    }

    #[test]
    fn partial_depth_takes_the_symbol_from_the_stream() {
        let (stream, ev) = event(include_str!("../../fixtures/binance/frames/depth20.json"));
        assert_eq!(stream, "bnbbtc@depth20@100ms");
        let MarketEvent::Book(book) = ev else {
            panic!("not a book")
        };
        assert_eq!(
            book.bids,
            vec![[d("0.0024"), d("10.0")], [d("0.0023"), d("5.0")]]
        );
        assert_eq!(book.asks, vec![[d("0.0026"), d("100.0")]]);
    }

    #[test]
    fn control_replies_and_shutdown() {
        assert_eq!(one(r#"{"result":null,"id":1}"#), Effect::Ack);
        assert_eq!(one(r#"{"result":["btcusdt@trade"],"id":3}"#), Effect::Ack);
        assert!(matches!(
            one(r#"{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}"#),
            Effect::Rejected(m) if m.contains("invalid stream")
        ));
        assert_eq!(
            one(r#"{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}"#),
            Effect::Reconnect("serverShutdown")
        );
        assert_eq!(
            one(r#"{"e":"serverShutdown","E":1770123456789}"#),
            Effect::Reconnect("serverShutdown")
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut out = Vec::new();
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"stream":"btcusdt@ticker","data":{"E":1}}"#,
            r#"{"stream":"btcusdt@trade","data":{"t":1,"p":"abc","q":"1","T":1,"m":true}}"#,
            r#"{"stream":"btcusdt@kline_7m","data":{"E":1,"k":{"t":0,"T":1,"i":"7m","o":"1","c":"1","h":"1","l":"1","v":"1","n":1,"x":false,"q":"1"}}}"#,
            r#"{"stream":"btcusdt@weird","data":{}}"#,
            r#"{"stream":"btcusdt@depth20@100ms","data":{"bids":[["1"]],"asks":[]}}"#,
        ] {
            assert!(decode(bad, &mut out).is_err(), "{bad}");
        }
        assert!(out.is_empty());
    }

    #[test]
    fn stream_names_and_urls() {
        let b = Binance::new();
        let i = Instrument {
            native: "BTCUSDT".into(),
            status: "TRADING".into(),
            tradable: true,
            ..Instrument::default()
        };
        assert_eq!(b.stream_name(Feed::Ticker, &i), "btcusdt@ticker");
        assert_eq!(
            b.stream_name(Feed::Klines(Interval::Mo1), &i),
            "btcusdt@kline_1M"
        );
        assert_eq!(b.stream_name(Feed::Book, &i), "btcusdt@depth20@100ms");
        assert_eq!(b.stream_name(Feed::Trades, &i), "btcusdt@trade");
        let (url, n) = b.connect_url("ws://h:1/", &["a@ticker".into(), "b@trade".into()]);
        assert_eq!(
            (url.as_str(), n),
            ("ws://h:1/stream?streams=a@ticker/b@trade", 2)
        );
        let many: Vec<String> = (0..2000)
            .map(|i| format!("sym{i:05}usdt@kline_1m"))
            .collect();
        let (url, n) = b.connect_url("wss://stream.binance.com:9443", &many);
        assert!(
            url.len() <= 8000 && n > 100 && n < 2000,
            "{} {n}",
            url.len()
        );
    }

    #[test]
    fn instruments_keep_status() {
        let set = Binance::new()
            .parse_instruments(include_str!("../../fixtures/binance/exchangeInfo.json"))
            .unwrap();
        let btc = &set.by_symbol[&Symbol::parse("BTCUSDT").unwrap()];
        assert!(btc.tradable);
        assert!(set.by_symbol.len() >= 8);
        assert!(set.by_symbol.values().any(|i| !i.tradable));
        assert_eq!((btc.base.as_str(), btc.quote.as_str()), ("BTC", "USDT"));
    }

    #[test]
    fn instrument_precisions_come_from_the_tick_and_lot_filters() {
        let body = r#"{"symbols":[{"symbol":"BTCUSDT","status":"TRADING","baseAsset":"BTC","quoteAsset":"USDT",
            "filters":[{"filterType":"PRICE_FILTER","minPrice":"0.01000000","maxPrice":"1000000.00000000","tickSize":"0.01000000"},
                       {"filterType":"LOT_SIZE","minQty":"0.00001000","maxQty":"9000.00000000","stepSize":"0.00001000"}]},
            {"symbol":"DOGEUSDT","status":"TRADING","baseAsset":"DOGE","quoteAsset":"USDT",
            "filters":[{"filterType":"PRICE_FILTER","tickSize":"0.00001000"},{"filterType":"LOT_SIZE","stepSize":"1.00000000"}]}]}"#;
        let set = Binance::new().parse_instruments(body).unwrap();
        let get = |s: &str| set.by_symbol[&Symbol::parse(s).unwrap()].clone();
        assert_eq!(
            (get("BTCUSDT").price_precision, get("BTCUSDT").qty_precision),
            (Some(2), Some(5))
        );
        assert_eq!(
            (
                get("DOGEUSDT").price_precision,
                get("DOGEUSDT").qty_precision
            ),
            (Some(5), Some(0))
        );
    }
}
