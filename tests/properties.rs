//! Property tests: parse∘display round-trips, and no parser or normaliser panics on any input
//! (arbitrary text, and real frames with bytes changed or cut). The cargo-fuzz targets in
//! `fuzz/` drive the same entry points with coverage guidance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use exchange_relay::decimal::Dec;
use exchange_relay::domain::{Channel, Interval};
use exchange_relay::exchange::{
    binance, coinbase, kraken, Adapter, InstrumentSet, ProtocolContext,
};
use exchange_relay::protocol::parse_request;
use proptest::prelude::*;

fn symbol() -> impl Strategy<Value = String> {
    "[A-Z0-9]{2,12}"
}

fn market() -> impl Strategy<Value = String> {
    (
        symbol(),
        prop::option::of(prop::sample::select(vec!["binance", "coinbase", "kraken"])),
    )
        .prop_map(|(s, ex)| match ex {
            Some(ex) => format!("{s}@{ex}"),
            None => s,
        })
}

/// Every valid channel name, spelled as a client may write it.
fn channel_name() -> impl Strategy<Value = String> {
    let intervals: Vec<&'static str> = Interval::ALL.iter().map(|i| i.as_str()).collect();
    prop_oneof![
        (
            prop::sample::select(vec!["price", "ticker", "trades", "signals"]),
            market()
        )
            .prop_map(|(k, m)| format!("{k}:{m}")),
        (market(), prop::sample::select(intervals)).prop_map(|(m, i)| format!("klines:{m}:{i}")),
        (
            market(),
            prop::option::of(prop::sample::select(vec!["5", "10", "20"]))
        )
            .prop_map(|(m, l)| match l {
                Some(l) => format!("depth:{m}:{l}"),
                None => format!("depth:{m}"),
            }),
        (
            prop::sample::select(vec!["portfolio", "orders"]),
            "[a-zA-Z0-9_.|-]{1,24}"
        )
            .prop_map(|(k, u)| format!("{k}:{u}")),
    ]
}

const BINANCE: &[&str] = &[
    include_str!("../fixtures/binance/frames/ticker.json"),
    include_str!("../fixtures/binance/frames/kline.json"),
    include_str!("../fixtures/binance/frames/trade.json"),
    include_str!("../fixtures/binance/frames/depth20.json"),
    r#"{"result":null,"id":1}"#,
    r#"{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}"#,
];

const KRAKEN: &[&str] = &[
    r#"{"channel":"book","type":"snapshot","data":[{"symbol":"BTC/USD","bids":[{"price":97000.1,"qty":0.5}],"asks":[{"price":97000.2,"qty":1.25}],"checksum":12345,"timestamp":"2023-10-06T17:35:55.440295Z"}]}"#,
    r#"{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"sell","price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,"timestamp":"2023-09-25T07:49:37.708706Z"}]}"#,
    r#"{"channel":"ticker","type":"snapshot","data":[{"symbol":"BTC/USD","bid":0.10025,"bid_qty":740.0,"ask":0.10036,"ask_qty":1361.44813783,"last":0.10035,"volume":997038.98383185,"vwap":0.10148,"low":0.09979,"high":0.10285,"change":-0.00017,"change_pct":-0.17}]}"#,
    r#"{"channel":"ohlc","type":"update","data":[{"symbol":"BTC/USD","open":0.5624,"high":0.5628,"low":0.5622,"close":0.5627,"trades":12,"volume":30927.68066226,"vwap":0.5626,"interval_begin":"2023-10-04T16:25:00.000000000Z","interval":5}]}"#,
    r#"{"error":"Currency pair not supported NOPE/USD","method":"subscribe","success":false,"symbol":"NOPE/USD"}"#,
];

const COINBASE: &[&str] = &[
    r#"{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":0,"events":[{"type":"snapshot","product_id":"BTC-USD","updates":[{"side":"bid","event_time":"1970-01-01T00:00:00Z","price_level":"21921.73","new_quantity":"0.06317902"}]}]}"#,
    r#"{"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:19:35.39625135Z","sequence_num":1,"events":[{"type":"update","trades":[{"trade_id":"12345","product_id":"BTC-USD","price":"1260.01","size":"0.3","side":"BUY","time":"2019-08-14T20:42:27.265Z"}]}]}"#,
    r#"{"channel":"ticker","client_id":"","timestamp":"2023-02-09T20:30:37.167359596Z","sequence_num":2,"events":[{"type":"snapshot","tickers":[{"type":"ticker","product_id":"BTC-USD","price":"21932.98","volume_24_h":"16038.28770938","low_24_h":"21835.29","high_24_h":"23011.18","price_percent_chg_24_h":"-4.15775596190603","best_bid":"21931.98","best_bid_quantity":"8000.21","best_ask":"21933.98","best_ask_quantity":"8038.07770938"}]}]}"#,
    r#"{"type":"error","message":"authentication failure"}"#,
];

/// A real frame with one byte replaced, or cut short.
fn mutated(frames: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop::sample::select(frames.to_vec()),
        any::<prop::sample::Index>(),
        any::<u8>(),
        any::<bool>(),
    )
        .prop_map(|(frame, at, byte, cut)| {
            let mut bytes = frame.as_bytes().to_vec();
            let i = at.index(bytes.len());
            if cut {
                bytes.truncate(i);
            } else {
                bytes[i] = byte;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
}

fn sessions() -> Vec<Box<dyn exchange_relay::exchange::Protocol>> {
    let ctx = ProtocolContext {
        instruments: Arc::new(InstrumentSet::default()),
    };
    let mut kraken = kraken::Kraken::new().new_protocol(ctx.clone());
    let mut coinbase = coinbase::Coinbase::new().new_protocol(ctx);
    let mut out = Vec::new();
    // Subscribed, so their frames take the full path (books, candles, trades).
    kraken.subscribe(
        &[
            "book:BTC/USD".into(),
            "trade:BTC/USD".into(),
            "candles:1s:BTC/USD".into(),
            "ticker:BTC/USD".into(),
            "ohlc:5:BTC/USD".into(),
        ],
        0,
        &mut out,
    );
    coinbase.subscribe(&["level2:BTC-USD".into()], 0, &mut out);
    coinbase.subscribe(
        &["market_trades:BTC-USD".into(), "candles:1m:BTC-USD".into()],
        0,
        &mut out,
    );
    coinbase.subscribe(&["ticker:BTC-USD".into()], 0, &mut out);
    vec![kraken, coinbase]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn channels_round_trip(name in channel_name()) {
        let channel: Channel = name.parse().unwrap();
        prop_assert_eq!(channel.to_string(), name.clone());
        prop_assert_eq!(channel.to_string().parse::<Channel>().unwrap(), channel);
    }

    #[test]
    fn the_channel_parser_never_panics(s in "\\PC{0,40}", t in "[a-zA-Z0-9:@._|-]{0,30}") {
        let _ = s.parse::<Channel>();
        let _ = t.parse::<Channel>();
    }

    #[test]
    fn the_request_parser_never_panics(s in "\\PC{0,200}", channels in prop::collection::vec("\\PC{0,20}", 0..5), id in any::<i64>()) {
        let _ = parse_request(&s);
        let json = serde_json::json!({"type": "subscribe", "channels": channels, "id": id}).to_string();
        let _ = parse_request(&json);
    }

    #[test]
    fn decimals_round_trip(int in 0u64..10_000_000_000, frac in 0u64..100_000_000, neg in any::<bool>()) {
        let text = format!("{}{int}.{frac:08}", if neg { "-" } else { "" });
        let d: Dec = text.parse().unwrap();
        prop_assert_eq!(d.to_string().parse::<Dec>().unwrap(), d);
        prop_assert!((d.to_f64() - text.parse::<f64>().unwrap()).abs() <= 1e-9 * d.to_f64().abs().max(1.0));
    }

    #[test]
    fn the_decimal_parser_never_panics(s in "[0-9eE+.-]{0,40}") {
        let _ = s.parse::<Dec>();
    }

    #[test]
    fn the_binance_normaliser_never_panics(s in "\\PC{0,300}", m in mutated(BINANCE)) {
        let mut out = Vec::new();
        let _ = binance::decode(&s, &mut out);
        let _ = binance::decode(&m, &mut out);
    }

    #[test]
    fn the_kraken_and_coinbase_normalisers_never_panic(s in "\\PC{0,300}", k in mutated(KRAKEN), c in mutated(COINBASE)) {
        let mut out = Vec::new();
        for mut session in sessions() {
            let _ = session.decode(&s, 0, &mut out);
            let _ = session.decode(&k, 0, &mut out);
            let _ = session.decode(&c, 0, &mut out);
            session.on_tick(i64::MAX / 2, &mut out);
        }
    }

    /// Candles built from trades carry exact sums: volume = Σ size and quote volume =
    /// Σ price · size, as the exchange's decimals add up, printed with exactly those digits.
    #[test]
    fn trade_built_candles_sum_exactly(trades in prop::collection::vec(
        (1u64..10_000_000, 0u32..=8, 1u64..10_000_000, 0u32..=8), 1..60)
    ) {
        use exchange_relay::events::{Side, Trade, TradeId};
        use exchange_relay::exchange::candles::TradeCandles;
        let mut candles = TradeCandles::unseeded(Interval::M1);
        let mut out = Vec::new();
        // Exact expectations in integers: sizes at 10^-8, price · size at 10^-16.
        let (mut volume, mut quote) = (0i128, 0i128);
        for (i, (p, ps, q, qs)) in trades.iter().enumerate() {
            let text = |units: u64, scale: u32| {
                let s = format!("{units:0>width$}", width = scale as usize + 1);
                let (int, frac) = s.split_at(s.len() - scale as usize);
                if frac.is_empty() { int.to_string() } else { format!("{int}.{frac}") }
            };
            let price: Dec = text(*p, *ps).parse().unwrap();
            let quantity: Dec = text(*q, *qs).parse().unwrap();
            let q8 = i128::from(*q) * 10i128.pow(8 - qs);
            let p8 = i128::from(*p) * 10i128.pow(8 - ps);
            volume += q8;
            quote += q8 * p8;
            candles.on_trade(&Trade {
                trade_id: TradeId::Number(i as u64),
                price,
                quantity,
                side: Side::Buy,
                time_ms: 60_000 + i as i64,
            }, &mut out);
        }
        candles.on_tick(60_000 + trades.len() as i64, &mut out);
        let k = out.last().unwrap();
        let exact = |units: i128, scale: u32| -> Dec {
            let s = format!("{units:0>width$}", width = scale as usize + 1);
            let (int, frac) = s.split_at(s.len() - scale as usize);
            format!("{int}.{frac}").parse().unwrap()
        };
        prop_assert_eq!(k.volume, exact(volume, 8));
        prop_assert_eq!(k.quote_volume, Some(exact(quote, 16)));
        prop_assert_eq!(k.trades, Some(trades.len() as u64));
        // Printed as the exact decimal: its digits, no exponent, no float noise.
        let printed = serde_json::to_string(&k.volume).unwrap();
        prop_assert_eq!(printed.parse::<Dec>().unwrap(), k.volume);
        prop_assert!(!printed.contains('e'));
        prop_assert_eq!(printed, exact(volume, 8).to_string());
    }
}
