//! Coinbase Advanced Trade through the relay: every kind, per-connection sequence gaps resync
//! the books in place, trade-built candles equal the exchange's own, the taker's side, USDC
//! answered as USD, and the 8 messages/s limit respected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use exchange_relay::domain::Interval;
use serde_json::{json, Value};

#[tokio::test]
async fn every_kind_is_served_from_coinbase() {
    let (sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&[
        "price:BTCUSD@coinbase",
        "ticker:BTCUSD@coinbase",
        "trades:BTCUSD@coinbase",
        "depth:BTCUSD@coinbase:20",
        "klines:BTCUSD@coinbase:1m",
        "klines:BTCUSD@coinbase:5m",
        "klines:BTCUSD@coinbase:1s",
    ])
    .await;
    let t = c.recv_until(is_type("ticker")).await;
    assert_eq!(
        (t["data"]["exchange"].clone(), t["data"]["symbol"].clone()),
        (json!("coinbase"), json!("BTCUSD"))
    );
    assert!(t["data"]["quoteVolume"].is_null() && t["data"]["previousClose"].is_null());
    c.recv_until(is_type("price")).await;
    c.recv_until(is_type("trade")).await;
    let d = c.recv_until(is_type("depth")).await;
    assert_eq!(d["data"]["bids"].as_array().unwrap().len(), 20);
    for iv in ["1m", "5m", "1s"] {
        let ch = format!("klines:BTCUSD@coinbase:{iv}");
        let k = c
            .recv_until(move |v| v["type"] == "kline" && v["channel"] == ch.as_str())
            .await;
        let data = &k["data"];
        if iv == "1s" {
            // No REST seed at 1 s: built from trades alone, every field exact.
            assert!(
                data["quoteVolume"].is_number() && data["trades"].is_u64(),
                "{k}"
            );
        } else {
            // The candle forming at subscribe time is seeded from REST rows, which carry
            // neither a quote volume nor a trade count: those are unknown, never estimated.
            assert!(data["volume"].is_number(), "{k}");
            assert_eq!(
                data["quoteVolume"].is_null(),
                data["trades"].is_null(),
                "{k}"
            );
        }
    }
    // Heartbeats are subscribed on the connection; no message limit was broken.
    assert_eq!(sims.coinbase.rate_limit_closes(), 0);
    assert_eq!(sims.coinbase.connects(), 1);
}

#[tokio::test]
async fn a_sequence_gap_resyncs_the_books_in_place() {
    let (sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["depth:ETHUSD@coinbase:10", "depth:SOLUSD@coinbase:10"])
        .await;
    c.recv_until(is_type("depth")).await;
    let connects = sims.coinbase.connects();
    sims.coinbase.skip_sequence();
    let mut checked = 0;
    while checked < 40 {
        let m = c.recv_until(is_type("depth")).await;
        let product = if m["channel"] == "depth:ETHUSD@coinbase:10" {
            "ETH-USD"
        } else {
            "SOL-USD"
        };
        let (bids, asks) = (levels(&m["data"]["bids"]), levels(&m["data"]["asks"]));
        assert!(bids[0][0] < asks[0][0], "crossed book sent");
        let truth = sims.coinbase.published_books(product);
        assert!(
            truth
                .iter()
                .any(|(b, a)| same_levels(b, &bids) && same_levels(a, &asks)),
            "client book matches no true book of {product}"
        );
        checked += 1;
    }
    let s = relay.stats().await;
    assert_eq!(
        s["upstreams"]["coinbase"]["resyncs"], 2,
        "both books on the connection: {s}"
    );
    assert_eq!(
        sims.coinbase.connects(),
        connects,
        "the connection was kept"
    );
}

#[tokio::test]
async fn one_second_candles_built_from_trades_equal_the_exchanges_own() {
    let (sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["klines:ETHUSD@coinbase:1s"]).await;
    let mut finals: Vec<Value> = Vec::new();
    while finals.len() < 4 {
        let k = c.recv_until(is_type("kline")).await;
        if k["data"]["isFinal"] == true {
            finals.push(k["data"].clone());
        }
    }
    // The exchange's own record of the last candle the relay finalised.
    let last = open_time(&finals[finals.len() - 1]);
    eventually("the exchange's own candles", || {
        sims.coinbase
            .closed_candles("ETH-USD", Interval::S1)
            .iter()
            .any(|c| c.open_time >= last)
    })
    .await;
    let truth = sims.coinbase.closed_candles("ETH-USD", Interval::S1);
    assert_candles_match(&finals[1..], &truth);
}

#[tokio::test]
async fn trade_side_is_the_takers_and_usdc_is_answered_as_usd() {
    let (sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSD@coinbase", "trades:BTCUSDC@coinbase"])
        .await;
    let mut usd = Vec::new();
    let mut usdc = 0;
    while usd.len() < 20 || usdc < 5 {
        let m = c.recv_until(is_type("trade")).await;
        if m["channel"] == "trades:BTCUSDC@coinbase" {
            assert_eq!(m["data"]["symbol"], "BTCUSDC");
            usdc += 1;
        } else {
            usd.push(m["data"].clone());
        }
    }
    let truth = sims.coinbase.recent_trades("BTC-USD");
    let mut compared = 0;
    for t in &usd {
        if let Some((_, taker_sold)) = truth
            .iter()
            .find(|(id, _)| Some(*id) == t["tradeId"].as_u64())
        {
            assert_eq!(t["side"], if *taker_sold { "sell" } else { "buy" }, "{t}");
            compared += 1;
        }
    }
    assert!(compared > 0, "no trade left to compare");
    // BTC-USDC is answered as BTC-USD: one upstream trades subscription serves both.
    assert_eq!(
        sims.coinbase.subscriptions().get("market_trades:BTC-USD"),
        Some(&1)
    );
}

#[tokio::test]
async fn products_come_from_the_list() {
    let (_sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&[
        "price:LUNAUSD@coinbase",
        "price:XBTUSD@coinbase",
        "price:BTCUSDT@coinbase",
    ])
    .await;
    let mut got = std::collections::HashMap::new();
    for _ in 0..3 {
        let m = c
            .recv_until(|v| v["type"] == "error" || v["type"] == "subscribed")
            .await;
        got.insert(
            m["channel"].as_str().unwrap().to_string(),
            error_code(&m).to_string(),
        );
    }
    assert_eq!(got["price:LUNAUSD@coinbase"], "UNKNOWN_SYMBOL");
    assert_eq!(got["price:XBTUSD@coinbase"], "UNKNOWN_SYMBOL");
    assert_eq!(
        got["price:BTCUSDT@coinbase"], "",
        "BTC-USDT is its own market"
    );
}

#[tokio::test]
async fn many_subscriptions_stay_under_the_message_limit() {
    let (sims, relay) = start_all().await;
    let mut c = Client::connect(&relay).await;
    let mut channels = Vec::new();
    for s in ["BTCUSD", "ETHUSD", "SOLUSD", "DOGEUSD", "XRPUSD", "ETHBTC"] {
        for k in ["ticker", "trades", "depth"] {
            channels.push(format!("{k}:{s}@coinbase"));
        }
        channels.push(format!("klines:{s}@coinbase:1m"));
    }
    c.send(json!({"type": "subscribe", "channels": channels}))
        .await;
    for _ in 0..24 {
        c.recv_until(is_type("subscribed")).await;
    }
    eventually("every stream upstream", || {
        sims.coinbase.subscriptions().len() >= 18
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sims.coinbase.rate_limit_closes(), 0);
    assert_eq!(sims.coinbase.connects(), 1);
    let s = relay.stats().await;
    assert_eq!(s["coinbaseStreams"], 24);
}

#[tokio::test]
async fn one_minute_candles_built_from_trades_equal_the_exchanges_own() {
    // The simulated exchange's clock runs 30x: a minute of trades every two seconds.
    let mut opts = exchange_relay::sim::SimOptions::fast();
    opts.time_scale = 30.0;
    let sims = start_sims(opts).await;
    let relay = start_relay(config_for_all(&sims)).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["klines:ETHUSD@coinbase:1m", "klines:BTCUSD@coinbase:3m"])
        .await;
    let mut finals: Vec<Value> = Vec::new();
    while finals.len() < 4 {
        let k = c
            .recv_until(is_msg("kline", "klines:ETHUSD@coinbase:1m"))
            .await;
        if k["data"]["isFinal"] == true {
            finals.push(k["data"].clone());
        }
    }
    let truth = sims.coinbase.closed_candles("ETH-USD", Interval::M1);
    // The first candle was seeded from REST mid-minute; every later one must be exact.
    assert_candles_match(&finals[1..], &truth);
}
