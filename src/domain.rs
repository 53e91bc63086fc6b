//! Domain types parsed once at the edge: exchanges, symbols, intervals, user ids and the
//! client-facing [`Channel`]. `FromStr` and `Display` round-trip exactly, so the channel name a
//! client sent is the one it sees on every message.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The exchanges the relay speaks to. A new exchange is a variant here and a row in
/// [`EXCHANGES`]; its adapter registers in `exchange::adapter_for`, its simulator in
/// `sim::start_demo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeId {
    Binance,
    Coinbase,
    Kraken,
}

/// What the relay knows of an exchange before any adapter is involved.
#[derive(Debug)]
pub struct ExchangeInfo {
    pub id: ExchangeId,
    /// The name in channels (`@kraken`), configuration (`[exchanges.kraken]`) and logs.
    pub name: &'static str,
    /// The public endpoints a relay connects to unless configured otherwise: what users
    /// deploy.
    pub ws_url: &'static str,
    pub rest_url: &'static str,
}

/// Every exchange, in [`ExchangeId`] order.
pub const EXCHANGES: [ExchangeInfo; 3] = [
    ExchangeInfo {
        id: ExchangeId::Binance,
        name: "binance",
        ws_url: "wss://stream.binance.com:9443",
        rest_url: "https://api.binance.com",
    },
    ExchangeInfo {
        id: ExchangeId::Coinbase,
        name: "coinbase",
        ws_url: "wss://advanced-trade-ws.coinbase.com",
        rest_url: "https://api.coinbase.com",
    },
    ExchangeInfo {
        id: ExchangeId::Kraken,
        name: "kraken",
        ws_url: "wss://ws.kraken.com/v2",
        rest_url: "https://api.kraken.com",
    },
];

impl ExchangeId {
    pub const ALL: [ExchangeId; EXCHANGES.len()] = {
        let mut all = [ExchangeId::Binance; EXCHANGES.len()];
        let mut i = 0;
        while i < EXCHANGES.len() {
            all[i] = EXCHANGES[i].id;
            i += 1;
        }
        all
    };

    /// Its position in [`EXCHANGES`] and [`ExchangeId::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn info(self) -> &'static ExchangeInfo {
        &EXCHANGES[self.index()]
    }

    pub fn as_str(self) -> &'static str {
        self.info().name
    }
}

impl fmt::Display for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExchangeId {
    type Err = ChannelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EXCHANGES
            .iter()
            .find(|e| e.name == s)
            .map(|e| e.id)
            .ok_or_else(|| {
                let names: Vec<&str> = EXCHANGES.iter().map(|e| e.name).collect();
                ChannelError::UnknownExchange(format!(
                    "unknown exchange '{s}'; expected one of {} (lower case)",
                    names.join(", ")
                ))
            })
    }
}

/// A unified, upper-case market symbol without separator (`BTCUSDT`, `ETHUSD`).
///
/// Cheap to clone: symbols are copied into every topic key and event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol(Arc<str>);

/// Longest symbol accepted; Binance's longest spot symbols are ~20 characters.
const MAX_SYMBOL_LEN: usize = 32;

impl Symbol {
    /// Parses a unified symbol: 2 to 32 upper-case ASCII letters and digits.
    pub fn parse(s: &str) -> Result<Symbol, SymbolError> {
        if s.len() < 2 || s.len() > MAX_SYMBOL_LEN {
            return Err(SymbolError::Length);
        }
        if s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Ok(Symbol(Arc::from(s)));
        }
        if s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SymbolError::LowerCase(s.to_ascii_uppercase()));
        }
        Err(SymbolError::Characters)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a symbol did not parse; the channel parser turns it into a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolError {
    Length,
    /// Carries the upper-case spelling, for a "did you mean" hint.
    LowerCase(String),
    Characters,
}

/// `<SYMBOL>[@<exchange>]`. The exchange stays `None` when the client left it out, so the
/// channel displays exactly as it was written; [`Market::exchange_or`] resolves the default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Market {
    pub symbol: Symbol,
    pub exchange: Option<ExchangeId>,
}

impl Market {
    pub fn exchange_or(&self, default: ExchangeId) -> ExchangeId {
        self.exchange.unwrap_or(default)
    }
}

impl fmt::Display for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.exchange {
            Some(ex) => write!(f, "{}@{}", self.symbol, ex),
            None => write!(f, "{}", self.symbol),
        }
    }
}

/// Candle intervals of PROTOCOL.md, spelled as there (`1m` minute, `1M` month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interval {
    S1,
    M1,
    M3,
    M5,
    M15,
    M30,
    H1,
    H2,
    H4,
    H6,
    H8,
    H12,
    D1,
    D3,
    W1,
    Mo1,
}

impl Interval {
    pub const ALL: [Interval; 16] = [
        Interval::S1,
        Interval::M1,
        Interval::M3,
        Interval::M5,
        Interval::M15,
        Interval::M30,
        Interval::H1,
        Interval::H2,
        Interval::H4,
        Interval::H6,
        Interval::H8,
        Interval::H12,
        Interval::D1,
        Interval::D3,
        Interval::W1,
        Interval::Mo1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::S1 => "1s",
            Interval::M1 => "1m",
            Interval::M3 => "3m",
            Interval::M5 => "5m",
            Interval::M15 => "15m",
            Interval::M30 => "30m",
            Interval::H1 => "1h",
            Interval::H2 => "2h",
            Interval::H4 => "4h",
            Interval::H6 => "6h",
            Interval::H8 => "8h",
            Interval::H12 => "12h",
            Interval::D1 => "1d",
            Interval::D3 => "3d",
            Interval::W1 => "1w",
            Interval::Mo1 => "1M",
        }
    }

    /// Fixed length in milliseconds; `None` for the calendar month.
    pub fn fixed_millis(self) -> Option<i64> {
        const S: i64 = 1_000;
        const M: i64 = 60 * S;
        const H: i64 = 60 * M;
        const D: i64 = 24 * H;
        Some(match self {
            Interval::S1 => S,
            Interval::M1 => M,
            Interval::M3 => 3 * M,
            Interval::M5 => 5 * M,
            Interval::M15 => 15 * M,
            Interval::M30 => 30 * M,
            Interval::H1 => H,
            Interval::H2 => 2 * H,
            Interval::H4 => 4 * H,
            Interval::H6 => 6 * H,
            Interval::H8 => 8 * H,
            Interval::H12 => 12 * H,
            Interval::D1 => D,
            Interval::D3 => 3 * D,
            Interval::W1 => 7 * D,
            Interval::Mo1 => return None,
        })
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Interval::ALL
            .into_iter()
            .find(|iv| iv.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown interval '{s}'; expected one of 1s 1m 3m 5m 15m 30m 1h 2h 4h 6h 8h 12h 1d 3d 1w 1M"
                )
            })
    }
}

/// As written in channels (`1m`, `1M`): how a cluster's nodes pass candles to each other.
impl serde::Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Interval, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Candle boundaries; months follow the UTC calendar like Binance's `1M`.
pub fn bucket(interval: Interval, t_ms: i64) -> (i64, i64) {
    match interval.fixed_millis() {
        Some(len) => {
            // Binance aligns weeks on Monday 00:00 UTC; the epoch was a Thursday.
            let offset = if interval == Interval::W1 {
                4 * 86_400_000
            } else {
                0
            };
            let start = (t_ms - offset).div_euclid(len) * len + offset;
            (start, start + len - 1)
        }
        None => {
            use chrono::{Datelike, TimeZone, Utc};
            let dt = Utc.timestamp_millis_opt(t_ms).single().unwrap_or_default();
            let start = Utc
                .with_ymd_and_hms(dt.year(), dt.month(), 1, 0, 0, 0)
                .single()
                .unwrap_or_default();
            let (ny, nm) = if dt.month() == 12 {
                (dt.year() + 1, 1)
            } else {
                (dt.year(), dt.month() + 1)
            };
            let next = Utc
                .with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
                .single()
                .unwrap_or_default();
            (start.timestamp_millis(), next.timestamp_millis() - 1)
        }
    }
}

/// Order-book levels a `depth:` channel may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DepthLevels {
    L5,
    L10,
    L20,
}

impl DepthLevels {
    pub fn count(self) -> usize {
        match self {
            DepthLevels::L5 => 5,
            DepthLevels::L10 => 10,
            DepthLevels::L20 => 20,
        }
    }
}

impl FromStr for DepthLevels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "5" => Ok(DepthLevels::L5),
            "10" => Ok(DepthLevels::L10),
            "20" => Ok(DepthLevels::L20),
            other => Err(format!("unknown depth '{other}'; expected 5, 10 or 20")),
        }
    }
}

impl fmt::Display for DepthLevels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count())
    }
}

/// The user a private channel belongs to; compared with a token's `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

const MAX_USER_ID_LEN: usize = 128;

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, String> {
        if s.is_empty() || s.len() > MAX_USER_ID_LEN {
            return Err(format!("user ids are 1 to {MAX_USER_ID_LEN} characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|'))
        {
            return Err("user ids may contain only letters, digits and _ - . |".to_string());
        }
        Ok(UserId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-facing channel, `<kind>:<market>[:<param>]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Price(Market),
    Ticker(Market),
    Klines(Market, Interval),
    Trades(Market),
    /// `None` when the client wrote no level count (10 is meant); kept so the name round-trips.
    Depth(Market, Option<DepthLevels>),
    Signals(Market),
    Portfolio(UserId),
    Orders(UserId),
}

/// The kinds, in the order error messages list them.
const KINDS: &str = "price, ticker, klines, trades, depth, signals, portfolio, orders";

impl Channel {
    /// The market a market-data channel is about; `None` for local channels fed by publish.
    pub fn market(&self) -> Option<&Market> {
        match self {
            Channel::Price(m)
            | Channel::Ticker(m)
            | Channel::Klines(m, _)
            | Channel::Trades(m)
            | Channel::Depth(m, _) => Some(m),
            Channel::Signals(_) | Channel::Portfolio(_) | Channel::Orders(_) => None,
        }
    }

    /// The user a private channel belongs to.
    pub fn private_user(&self) -> Option<&UserId> {
        match self {
            Channel::Portfolio(u) | Channel::Orders(u) => Some(u),
            _ => None,
        }
    }

    /// Channels fed by `POST /api/v1/publish` rather than by an exchange.
    pub fn is_published(&self) -> bool {
        matches!(
            self,
            Channel::Signals(_) | Channel::Portfolio(_) | Channel::Orders(_)
        )
    }

    /// The `type` of data messages on this channel.
    pub fn message_type(&self) -> &'static str {
        match self {
            Channel::Price(_) => "price",
            Channel::Ticker(_) => "ticker",
            Channel::Klines(..) => "kline",
            Channel::Trades(_) => "trade",
            Channel::Depth(..) => "depth",
            Channel::Signals(_) => "signal",
            Channel::Portfolio(_) => "portfolio",
            Channel::Orders(_) => "orders",
        }
    }

    /// Every channel kind, as written before the first `:`.
    pub const KINDS: [&'static str; 8] = [
        "price",
        "ticker",
        "klines",
        "trades",
        "depth",
        "signals",
        "portfolio",
        "orders",
    ];

    /// The kind as written before the first `:` (`klines`).
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Price(_) => "price",
            Channel::Ticker(_) => "ticker",
            Channel::Klines(..) => "klines",
            Channel::Trades(_) => "trades",
            Channel::Depth(..) => "depth",
            Channel::Signals(_) => "signals",
            Channel::Portfolio(_) => "portfolio",
            Channel::Orders(_) => "orders",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match self {
            Channel::Price(m) | Channel::Ticker(m) | Channel::Trades(m) | Channel::Signals(m) => {
                write!(f, "{kind}:{m}")
            }
            Channel::Klines(m, iv) => write!(f, "{kind}:{m}:{iv}"),
            Channel::Depth(m, None) => write!(f, "{kind}:{m}"),
            Channel::Depth(m, Some(levels)) => write!(f, "{kind}:{m}:{levels}"),
            Channel::Portfolio(u) | Channel::Orders(u) => write!(f, "{kind}:{u}"),
        }
    }
}

/// Why a channel name was refused; each maps to one PROTOCOL.md error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// `INVALID_CHANNEL`: the text says why, in a sentence a person can act on.
    #[error("{0}")]
    Invalid(String),
    /// `UNKNOWN_EXCHANGE`.
    #[error("{0}")]
    UnknownExchange(String),
}

impl FromStr for Channel {
    type Err = ChannelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |msg: String| Err(ChannelError::Invalid(msg));
        let mut parts = s.splitn(3, ':');
        let kind = parts.next().unwrap_or_default();
        let Some(target) = parts.next() else {
            return invalid(format!(
                "channels look like <kind>:<symbol>[:<param>], e.g. price:BTCUSDT; got '{s}'"
            ));
        };
        let param = parts.next();

        let parse_market = |target: &str| -> Result<Market, ChannelError> {
            let (sym, exchange) = match target.split_once('@') {
                Some((sym, ex)) => (sym, Some(ex.parse::<ExchangeId>()?)),
                None => (target, None),
            };
            let symbol = Symbol::parse(sym).map_err(|e| {
                ChannelError::Invalid(match e {
                    SymbolError::LowerCase(upper) => {
                        let mut fixed = format!("{kind}:{upper}");
                        if let Some(ex) = exchange {
                            fixed.push('@');
                            fixed.push_str(ex.as_str());
                        }
                        if let Some(p) = param {
                            fixed.push(':');
                            fixed.push_str(p);
                        }
                        format!("symbols are upper case: did you mean {fixed}?")
                    }
                    SymbolError::Length => format!(
                        "symbol '{sym}' must be 2 to {MAX_SYMBOL_LEN} characters, e.g. BTCUSDT"
                    ),
                    SymbolError::Characters => format!(
                        "symbol '{sym}' may contain only letters and digits, without separators (BTCUSDT, not BTC-USDT)"
                    ),
                })
            })?;
            Ok(Market { symbol, exchange })
        };
        let no_param = |param: Option<&str>| -> Result<(), ChannelError> {
            match param {
                None => Ok(()),
                Some(p) => Err(ChannelError::Invalid(format!(
                    "{kind} channels take no parameter; remove ':{p}'"
                ))),
            }
        };

        match kind {
            "price" | "ticker" | "trades" | "signals" => {
                let market = parse_market(target)?;
                no_param(param)?;
                Ok(match kind {
                    "price" => Channel::Price(market),
                    "ticker" => Channel::Ticker(market),
                    "trades" => Channel::Trades(market),
                    _ => Channel::Signals(market),
                })
            }
            "klines" => {
                let market = parse_market(target)?;
                let Some(param) = param else {
                    return invalid(format!(
                        "klines channels need an interval, e.g. klines:{market}:1m"
                    ));
                };
                let interval = param.parse::<Interval>().map_err(ChannelError::Invalid)?;
                Ok(Channel::Klines(market, interval))
            }
            "depth" => {
                let market = parse_market(target)?;
                let levels = param
                    .map(str::parse::<DepthLevels>)
                    .transpose()
                    .map_err(ChannelError::Invalid)?;
                Ok(Channel::Depth(market, levels))
            }
            "portfolio" | "orders" => {
                no_param(param)?;
                let user = UserId::parse(target).map_err(ChannelError::Invalid)?;
                Ok(if kind == "portfolio" {
                    Channel::Portfolio(user)
                } else {
                    Channel::Orders(user)
                })
            }
            other => {
                let hint = match other.to_ascii_lowercase().as_str() {
                    "kline" | "candles" | "candle" => " (did you mean klines?)",
                    "trade" => " (did you mean trades?)",
                    "prices" => " (did you mean price?)",
                    "signal" => " (did you mean signals?)",
                    "order" => " (did you mean orders?)",
                    "book" | "orderbook" => " (did you mean depth?)",
                    _ => "",
                };
                invalid(format!(
                    "unknown channel kind '{other}'{hint}; expected one of {KINDS}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exchange_table_is_in_variant_order_and_names_round_trip() {
        for (i, e) in EXCHANGES.iter().enumerate() {
            assert_eq!(e.id.index(), i, "{} is out of place", e.name);
            assert_eq!(ExchangeId::ALL[i], e.id);
            assert_eq!(e.name.parse::<ExchangeId>().unwrap(), e.id);
            let toml_name: ExchangeId = serde_json::from_value(serde_json::json!(e.name)).unwrap();
            assert_eq!(toml_name, e.id, "serde's name agrees");
        }
    }

    fn parse(s: &str) -> Result<Channel, ChannelError> {
        s.parse()
    }

    #[test]
    fn every_kind_round_trips() {
        let names = [
            "price:BTCUSDT",
            "price:BTCUSD@kraken",
            "ticker:ETHUSDT",
            "ticker:BTCUSD@coinbase",
            "klines:ETHUSD@coinbase:1m",
            "klines:BTCUSDT:1M",
            "klines:BTCUSDT@binance:1s",
            "trades:SOLUSDT",
            "trades:SOLUSDT@binance",
            "depth:BTCUSDT",
            "depth:BTCUSDT:5",
            "depth:BTCUSDT:10",
            "depth:BTCUSDT@kraken:20",
            "signals:BTCUSDT",
            "portfolio:user123",
            "orders:user-1.a_b",
        ];
        for name in names {
            let ch = parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ch.to_string(), name, "round trip of {name}");
        }
        for iv in Interval::ALL {
            let name = format!("klines:BTCUSDT:{iv}");
            assert_eq!(parse(&name).map(|c| c.to_string()), Ok(name));
        }
    }

    #[test]
    fn parsed_values_are_typed() {
        assert_eq!(
            parse("klines:ETHUSD@coinbase:1m"),
            Ok(Channel::Klines(
                Market {
                    symbol: Symbol::parse("ETHUSD").unwrap(),
                    exchange: Some(ExchangeId::Coinbase)
                },
                Interval::M1
            ))
        );
        assert_eq!(
            parse("depth:BTCUSDT:20"),
            Ok(Channel::Depth(
                Market {
                    symbol: Symbol::parse("BTCUSDT").unwrap(),
                    exchange: None
                },
                Some(DepthLevels::L20)
            ))
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        let cases: &[(&str, &str)] = &[
            (
                "price:btcusdt",
                "symbols are upper case: did you mean price:BTCUSDT?",
            ),
            (
                "klines:ethusdt@kraken:1m",
                "symbols are upper case: did you mean klines:ETHUSDT@kraken:1m?",
            ),
            ("price", "channels look like"),
            ("klines:BTCUSDT", "klines channels need an interval"),
            ("klines:BTCUSDT:1H", "unknown interval '1H'"),
            ("depth:BTCUSDT:15", "unknown depth '15'"),
            ("price:BTCUSDT:1m", "price channels take no parameter"),
            ("kline:BTCUSDT:1m", "did you mean klines?"),
            ("price:BTC-USDT", "without separators"),
            ("price:B", "2 to 32 characters"),
            ("portfolio:", "user ids are 1 to"),
            ("", "channels look like"),
        ];
        for (input, want) in cases {
            match parse(input) {
                Err(ChannelError::Invalid(msg)) => {
                    assert!(msg.contains(want), "{input}: '{msg}' lacks '{want}'")
                }
                other => panic!("{input}: expected Invalid, got {other:?}"),
            }
        }
        assert!(matches!(
            parse("price:BTCUSDT@ftx"),
            Err(ChannelError::UnknownExchange(_))
        ));
    }

    #[test]
    fn month_and_minute_are_distinct() {
        assert_eq!("1m".parse::<Interval>(), Ok(Interval::M1));
        assert_eq!("1M".parse::<Interval>(), Ok(Interval::Mo1));
        assert_eq!(Interval::M1.fixed_millis(), Some(60_000));
        assert_eq!(Interval::Mo1.fixed_millis(), None);
    }
}
