//! Normalised market events, the common language between exchange adapters and the hub, and
//! their rendering into the client data messages of PROTOCOL.md § Data shapes.
//!
//! Events carry no symbol or exchange: the [`FeedKey`] they arrive on says both, so an adapter
//! cannot get them wrong and the renderer always prints the unified symbol.

use serde::{Deserialize, Serialize};

use crate::decimal::Dec;
use crate::domain::{Channel, ExchangeId, Interval, Symbol};
use crate::protocol::{iso_millis, Frame};

/// What an upstream stream carries, in exchange-neutral terms. One feed may serve several
/// channel kinds: `Ticker` feeds `price:` and `ticker:`, `Book` feeds `depth:` at 5, 10 and 20.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feed {
    Ticker,
    Trades,
    Klines(Interval),
    Book,
}

impl Feed {
    /// The feed a market-data channel is served from; `None` for published channels.
    pub fn for_channel(channel: &Channel) -> Option<Feed> {
        Some(match channel {
            Channel::Price(_) | Channel::Ticker(_) => Feed::Ticker,
            Channel::Klines(_, iv) => Feed::Klines(*iv),
            Channel::Trades(_) => Feed::Trades,
            Channel::Depth(..) => Feed::Book,
            Channel::Signals(_) | Channel::Portfolio(_) | Channel::Orders(_) => return None,
        })
    }
}

/// One upstream stream, in unified terms: the unit the stream manager reference-counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeedKey {
    pub exchange: ExchangeId,
    pub symbol: Symbol,
    pub feed: Feed,
}

/// 24-hour rolling statistics plus best bid/ask. Every amount is the exchange's own decimal
/// (or exactly derived from them); `None` where the exchange gives no exact value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticker {
    pub price: Dec,
    pub bid: Dec,
    pub ask: Dec,
    pub bid_size: Dec,
    pub ask_size: Dec,
    pub volume: Dec,
    /// `None` where the exchange does not report it exactly (Kraken, Coinbase).
    pub quote_volume: Option<Dec>,
    /// `None` where the exchange gives neither it nor the open (Coinbase).
    pub change: Option<Dec>,
    pub change_percent: Dec,
    pub high: Dec,
    pub low: Dec,
    /// `None` where the exchange does not give the 24 h open (Coinbase).
    pub open: Option<Dec>,
    pub previous_close: Option<Dec>,
    /// Exchange event time, ms since the epoch.
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kline {
    pub interval: Interval,
    /// Open time, ms.
    pub open_time: i64,
    /// Open time + interval − 1 ms.
    pub close_time: i64,
    pub open: Dec,
    pub high: Dec,
    pub low: Dec,
    pub close: Dec,
    pub volume: Dec,
    /// `None` where the exchange's candle does not give it exactly (Kraken's vwap is rounded).
    pub quote_volume: Option<Dec>,
    /// `None` where it cannot be known (a candle seeded from REST rows without a count).
    pub trades: Option<u64>,
    pub is_final: bool,
    /// Exchange event time, ms.
    pub time_ms: i64,
}

/// The exchange's own trade id: numeric where the exchange's is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TradeId {
    Number(u64),
    Text(String),
}

impl TradeId {
    /// The trade's place in its exchange's tape: every exchange here numbers each market's
    /// trades with integers (Coinbase's as strings).
    pub fn order(&self) -> u64 {
        match self {
            TradeId::Number(n) => *n,
            TradeId::Text(s) => s.parse().unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Buy,
    Sell,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    pub trade_id: TradeId,
    pub price: Dec,
    pub quantity: Dec,
    /// The taker's side.
    pub side: Side,
    pub time_ms: i64,
}

impl Trade {
    /// See [`TradeId::order`].
    pub fn order(&self) -> u64 {
        self.trade_id.order()
    }
}

/// Top of an order book, best level first on each side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub bids: Vec<[Dec; 2]>,
    pub asks: Vec<[Dec; 2]>,
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MarketEvent {
    /// Boxed: a ticker is several times the size of the other events, which are the common ones.
    Ticker(Box<Ticker>),
    Kline(Kline),
    Trade(Trade),
    Book(Book),
}

/// How a client that falls behind may be treated for a message (see `hub::outbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Only the newest value per channel matters: older queued ones may be replaced.
    Conflate,
    /// Every message matters: never dropped silently.
    Reliable,
}

impl MarketEvent {
    /// The exchange's event time, ms.
    pub fn time_ms(&self) -> i64 {
        match self {
            MarketEvent::Ticker(t) => t.time_ms,
            MarketEvent::Kline(k) => k.time_ms,
            MarketEvent::Trade(t) => t.time_ms,
            MarketEvent::Book(b) => b.time_ms,
        }
    }

    /// Whether this event is the current value of its feed, worth replaying to a new subscriber.
    pub fn is_current_value(&self) -> bool {
        !matches!(self, MarketEvent::Trade(_))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PriceData<'a> {
    exchange: &'a str,
    symbol: &'a str,
    price: Dec,
    change24h: Option<Dec>,
    change_percent24h: Dec,
    high24h: Dec,
    low24h: Dec,
    volume24h: Dec,
    timestamp: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TickerData<'a> {
    exchange: &'a str,
    symbol: &'a str,
    price: Dec,
    bid: Dec,
    ask: Dec,
    bid_size: Dec,
    ask_size: Dec,
    volume: Dec,
    quote_volume: Option<Dec>,
    change: Option<Dec>,
    change_percent: Dec,
    high: Dec,
    low: Dec,
    open: Option<Dec>,
    previous_close: Option<Dec>,
    timestamp: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KlineData<'a> {
    exchange: &'a str,
    symbol: &'a str,
    interval: &'a str,
    time: i64,
    close_time: i64,
    open: Dec,
    high: Dec,
    low: Dec,
    close: Dec,
    volume: Dec,
    quote_volume: Option<Dec>,
    trades: Option<u64>,
    is_final: bool,
    timestamp: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TradeData<'a> {
    exchange: &'a str,
    symbol: &'a str,
    trade_id: &'a TradeId,
    price: Dec,
    quantity: Dec,
    side: Side,
    timestamp: String,
}

#[derive(Serialize)]
struct DepthData<'a> {
    exchange: &'a str,
    symbol: &'a str,
    bids: &'a [[Dec; 2]],
    asks: &'a [[Dec; 2]],
    timestamp: String,
}

#[derive(Serialize)]
struct DataMessage<'a, T> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: &'a str,
    seq: u64,
    data: T,
    timestamp: &'a str,
}

/// One data object of PROTOCOL.md § Data shapes.
#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Price(PriceData<'a>),
    Ticker(TickerData<'a>),
    Kline(KlineData<'a>),
    Trade(TradeData<'a>),
    Depth(DepthData<'a>),
}

/// The data object `event` makes on `channel` of `key`, and how it is delivered. `None` when
/// the event does not feed this channel kind (a ticker for a depth channel cannot happen
/// through the manager, but the renderer does not trust that).
fn data<'a>(
    key: &'a FeedKey,
    channel: &Channel,
    event: &'a MarketEvent,
) -> Option<(Data<'a>, Delivery)> {
    let exchange = key.exchange.as_str();
    let symbol = key.symbol.as_str();
    Some(match (channel, event) {
        (Channel::Price(_), MarketEvent::Ticker(t)) => (
            Data::Price(PriceData {
                exchange,
                symbol,
                price: t.price,
                change24h: t.change,
                change_percent24h: t.change_percent,
                high24h: t.high,
                low24h: t.low,
                volume24h: t.volume,
                timestamp: t.time_ms,
            }),
            Delivery::Conflate,
        ),
        (Channel::Ticker(_), MarketEvent::Ticker(t)) => (
            Data::Ticker(TickerData {
                exchange,
                symbol,
                price: t.price,
                bid: t.bid,
                ask: t.ask,
                bid_size: t.bid_size,
                ask_size: t.ask_size,
                volume: t.volume,
                quote_volume: t.quote_volume,
                change: t.change,
                change_percent: t.change_percent,
                high: t.high,
                low: t.low,
                open: t.open,
                previous_close: t.previous_close,
                timestamp: iso_millis(t.time_ms),
            }),
            Delivery::Conflate,
        ),
        (Channel::Klines(_, iv), MarketEvent::Kline(k)) if *iv == k.interval => (
            Data::Kline(KlineData {
                exchange,
                symbol,
                interval: k.interval.as_str(),
                time: k.open_time,
                close_time: k.close_time,
                open: k.open,
                high: k.high,
                low: k.low,
                close: k.close,
                volume: k.volume,
                quote_volume: k.quote_volume,
                trades: k.trades,
                is_final: k.is_final,
                timestamp: iso_millis(k.time_ms),
            }),
            if k.is_final {
                Delivery::Reliable
            } else {
                Delivery::Conflate
            },
        ),
        (Channel::Trades(_), MarketEvent::Trade(t)) => (
            Data::Trade(TradeData {
                exchange,
                symbol,
                trade_id: &t.trade_id,
                price: t.price,
                quantity: t.quantity,
                side: t.side,
                timestamp: iso_millis(t.time_ms),
            }),
            Delivery::Reliable,
        ),
        (Channel::Depth(_, levels), MarketEvent::Book(b)) => {
            let n = levels.map_or(10, |l| l.count());
            (
                Data::Depth(DepthData {
                    exchange,
                    symbol,
                    bids: &b.bids[..b.bids.len().min(n)],
                    asks: &b.asks[..b.asks.len().min(n)],
                    timestamp: iso_millis(b.time_ms),
                }),
                Delivery::Conflate,
            )
        }
        _ => return None,
    })
}

/// Renders `event` as message `seq` of one channel of `key`, serialised once for every
/// subscriber of that channel; `None` when the event does not feed this channel kind.
pub fn render(
    key: &FeedKey,
    channel: &Channel,
    channel_name: &str,
    event: &MarketEvent,
    seq: u64,
    now: &str,
) -> Option<(Frame, Delivery)> {
    let (data, delivery) = data(key, channel, event)?;
    let msg = DataMessage {
        kind: channel.message_type(),
        channel: channel_name,
        seq,
        data,
        timestamp: now,
    };
    // Serialising plain structs of numbers and strings cannot fail; an empty object keeps the
    // type honest should it ever.
    let json = serde_json::to_string(&msg).unwrap_or_else(|_| String::from("{}"));
    Some((Frame::from(json), delivery))
}

/// The data object alone, serialised: an item of a `history` message or a REST answer.
pub fn render_data(key: &FeedKey, channel: &Channel, event: &MarketEvent) -> Option<String> {
    let (data, _) = data(key, channel, event)?;
    serde_json::to_string(&data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DepthLevels, Market};

    fn d(s: &str) -> Dec {
        s.parse().unwrap()
    }

    fn key(feed: Feed) -> FeedKey {
        FeedKey {
            exchange: ExchangeId::Binance,
            symbol: Symbol::parse("BTCUSDT").unwrap(),
            feed,
        }
    }

    fn market() -> Market {
        Market {
            symbol: Symbol::parse("BTCUSDT").unwrap(),
            exchange: None,
        }
    }

    #[test]
    fn depth_is_sliced_to_the_channel_levels() {
        let book = MarketEvent::Book(Book {
            bids: (0..20)
                .map(|i| [Dec::from_int(100 - i), Dec::from_int(1)])
                .collect(),
            asks: (0..20)
                .map(|i| [Dec::from_int(101 + i), Dec::from_int(1)])
                .collect(),
            time_ms: 0,
        });
        for (levels, n) in [
            (None, 10),
            (Some(DepthLevels::L5), 5),
            (Some(DepthLevels::L20), 20),
        ] {
            let ch = Channel::Depth(market(), levels);
            let (frame, delivery) =
                render(&key(Feed::Book), &ch, &ch.to_string(), &book, 1, "now").unwrap();
            let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
            assert_eq!(v["data"]["bids"].as_array().unwrap().len(), n);
            assert_eq!(v["data"]["asks"].as_array().unwrap().len(), n);
            assert_eq!(v["data"]["bids"][0], serde_json::json!([100, 1]));
            assert_eq!(delivery, Delivery::Conflate);
        }
    }

    #[test]
    fn final_klines_are_reliable_and_forming_ones_conflate() {
        let mut k = Kline {
            interval: Interval::M1,
            open_time: 60_000,
            close_time: 119_999,
            open: d("1.0"),
            high: d("2.0"),
            low: d("0.5"),
            close: d("1.5"),
            volume: d("10.0"),
            quote_volume: Some(d("15.0")),
            trades: Some(3),
            is_final: false,
            time_ms: 61_000,
        };
        let ch = Channel::Klines(market(), Interval::M1);
        let (_, d) = render(
            &key(Feed::Klines(Interval::M1)),
            &ch,
            "c",
            &MarketEvent::Kline(k.clone()),
            1,
            "t",
        )
        .unwrap();
        assert_eq!(d, Delivery::Conflate);
        k.is_final = true;
        let (frame, d) = render(
            &key(Feed::Klines(Interval::M1)),
            &ch,
            "c",
            &MarketEvent::Kline(k),
            2,
            "t",
        )
        .unwrap();
        assert_eq!(d, Delivery::Reliable);
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(v["type"], "kline");
        assert_eq!(v["seq"], 2);
        assert_eq!(v["data"]["isFinal"], true);
        assert_eq!(v["data"]["closeTime"], 119_999);
        assert_eq!(v["data"]["exchange"], "binance");
    }
}
