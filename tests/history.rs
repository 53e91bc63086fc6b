//! `history` on subscribe and the REST history endpoints, on every exchange, over real sockets
//! against the simulators' REST and WebSocket APIs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

async fn subscribe_with_history(relay: &Relay, channel: &str, n: u64) -> (Client, Value) {
    let mut c = Client::connect(relay).await;
    c.send(json!({"type":"subscribe","channels":[{"channel":channel,"history":n}],"id":1}))
        .await;
    let ack = c.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["channel"], channel);
    // The history comes before any live message of the channel.
    let first = c
        .recv_until(|v| v["channel"] == channel && v["type"] != "subscribed")
        .await;
    assert_eq!(first["type"], "history", "{first}");
    (c, first)
}

async fn live(c: &mut Client, channel: &str, span: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let end = Instant::now() + span;
    while let Ok(Some(v)) = timeout(end.saturating_duration_since(Instant::now()), c.next()).await {
        if v["channel"] == channel {
            out.push(v);
        }
    }
    out
}

fn trade_id(v: &Value) -> u64 {
    match &v["tradeId"] {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("tradeId {other}"),
    }
}

/// History then live on a trades channel: every id once, none missing across the seam.
async fn trades_seam(relay: &Relay, channel: &str) {
    let (mut c, history) = subscribe_with_history(relay, channel, 50).await;
    let items = history["data"].as_array().unwrap();
    assert_eq!(
        items.len(),
        50,
        "{channel}: 50 trades asked, the market has more"
    );
    let mut ids: Vec<u64> = items.iter().map(trade_id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{channel} history: {ids:?}"
    );
    let rest = live(&mut c, channel, Duration::from_secs(2)).await;
    let seqs: Vec<u64> = rest.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs.first().copied(),
        Some(history["seq"].as_u64().unwrap() + 1),
        "{channel}: live follows the history's seq"
    );
    ids.extend(rest.iter().map(|m| trade_id(&m["data"])));
    assert!(ids.len() > 55, "{channel}: live trades follow");
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{channel}: a gap or a duplicate at the seam: {ids:?}"
    );
}

/// History then live on a 1s klines channel across candle boundaries: each candle time once
/// in the history, then only updates of the forming one or newer candles, no bucket skipped.
async fn klines_seam(relay: &Relay, channel: &str) {
    let (mut c, history) = subscribe_with_history(relay, channel, 5).await;
    let items = history["data"].as_array().unwrap();
    assert!(
        !items.is_empty() && items.len() <= 5,
        "{channel}: {}",
        items.len()
    );
    let times: Vec<i64> = items.iter().map(|k| k["time"].as_i64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[1] > w[0]),
        "{channel}: each candle once: {times:?}"
    );
    for k in &items[..items.len() - 1] {
        assert_eq!(
            k["isFinal"], true,
            "{channel}: closed candles are final: {k}"
        );
        assert!(k["volume"].as_f64().unwrap() > 0.0);
    }
    let newest = *times.last().unwrap();
    let rest = live(&mut c, channel, Duration::from_millis(3500)).await;
    let mut all = times.clone();
    for m in rest.iter().filter(|m| m["type"] == "kline") {
        let t = m["data"]["time"].as_i64().unwrap();
        assert!(
            t >= newest,
            "{channel}: live went back before the history's newest candle"
        );
        if m["data"]["isFinal"] == true {
            assert!(
                !items.iter().any(|k| k["time"] == t && k["isFinal"] == true),
                "{channel}: a final candle twice"
            );
        }
        if !all.contains(&t) {
            all.push(t);
        }
    }
    assert!(
        all.len() >= times.len() + 2,
        "{channel}: candles went on: {all:?}"
    );
    assert!(
        all.windows(2).all(|w| w[1] - w[0] == 1000),
        "{channel}: a second skipped at the seam: {all:?} (history {times:?})"
    );
}

#[tokio::test]
async fn history_joins_live_trades_on_every_exchange() {
    let (_sims, relay) = start_all().await;
    tokio::join!(
        trades_seam(&relay, "trades:BTCUSDT"),
        trades_seam(&relay, "trades:BTCUSD@kraken"),
        trades_seam(&relay, "trades:BTCUSD@coinbase"),
    );
}

#[tokio::test]
async fn history_joins_live_candles_on_every_exchange() {
    let (_sims, relay) = start_all().await;
    // Let the markets make a few seconds of candles first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::join!(
        klines_seam(&relay, "klines:BTCUSDT:1s"),
        klines_seam(&relay, "klines:BTCUSD@kraken:1s"),
        klines_seam(&relay, "klines:BTCUSD@coinbase:1s"),
    );
}

#[tokio::test]
async fn history_unavailable_leaves_the_subscription_standing() {
    let (sim, relay) = start().await;
    // The stream is open; then the exchange's REST API refuses.
    let mut watcher = Client::connect(&relay).await;
    watcher.subscribe(&["trades:BTCUSDT"]).await;
    watcher.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    sim.set_available(false);
    let mut c = Client::connect(&relay).await;
    c.send(
        json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","history":10}],"id":3}),
    )
    .await;
    c.recv_until(is_type("subscribed")).await;
    let err = c.recv_until(is_type("error")).await;
    assert_eq!(error_code(&err), "HISTORY_UNAVAILABLE");
    assert_eq!(err["channel"], "trades:BTCUSDT");
    let trade = c.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    assert!(trade["seq"].is_u64(), "live data flows");
}

#[tokio::test]
async fn rest_history_endpoints_answer_with_the_channel_objects() {
    let (_sims, relay) = start_all().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let http = reqwest::Client::new();
    for channel in [
        "klines:BTCUSDT:1s",
        "klines:BTCUSD@kraken:1s",
        "klines:BTCUSD@coinbase:1s",
    ] {
        let r = http
            .get(relay.http("/api/v1/klines"))
            .query(&[("channel", channel), ("limit", "3")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{channel}");
        let body: Value = r.json().await.unwrap();
        let data = body["data"].as_array().unwrap();
        assert!(!data.is_empty() && data.len() <= 3, "{channel}: {body}");
        assert_eq!(data[0]["interval"], "1s");
        assert!(data[0]["closeTime"].as_i64().unwrap() == data[0]["time"].as_i64().unwrap() + 999);
    }
    for channel in [
        "trades:BTCUSDT",
        "trades:BTCUSD@kraken",
        "trades:BTCUSD@coinbase",
    ] {
        let body: Value = http
            .get(relay.http("/api/v1/trades"))
            .query(&[("channel", channel), ("limit", "20")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 20, "{channel}");
        let ids: Vec<u64> = data.iter().map(trade_id).collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "{channel}: oldest first, every one"
        );
        assert!(data[0]["side"] == "buy" || data[0]["side"] == "sell");
    }
    // endTime: the newest candle wanted.
    let times = candle_times(&relay, "channel=klines:BTCUSDT:1s&limit=10").await;
    assert!(times.len() >= 3, "ten minutes of market: {times:?}");
    let end = times[times.len() - 3];
    let older = candle_times(
        &relay,
        &format!("channel=klines:BTCUSDT:1s&limit=2&endTime={end}"),
    )
    .await;
    assert_eq!(older, times[times.len() - 4..times.len() - 2].to_vec());
    // Bad parameters and unknown markets.
    let status = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (s, v["error"]["code"].as_str().unwrap_or("").to_string())
        }
    };
    for (path, want) in [
        ("/api/v1/klines", (400, "INVALID_CHANNEL")),
        (
            "/api/v1/klines?channel=trades:BTCUSDT",
            (400, "INVALID_CHANNEL"),
        ),
        (
            "/api/v1/klines?channel=klines:BTCUSDT:1m&limit=0",
            (400, "INVALID_OPTION"),
        ),
        (
            "/api/v1/trades?channel=trades:BTCUSDT&limit=1001",
            (400, "INVALID_OPTION"),
        ),
        (
            "/api/v1/trades?channel=trades:NOPEUSDT",
            (404, "UNKNOWN_SYMBOL"),
        ),
        (
            "/api/v1/trades?channel=trades:BTCUSDT@nowhere",
            (404, "UNKNOWN_EXCHANGE"),
        ),
    ] {
        let (code, name) = status(relay.http(path)).await;
        assert_eq!((code, name.as_str()), want, "{path}");
    }
}

/// The open times of `GET /api/v1/klines?<query>`.
async fn candle_times(relay: &Relay, query: &str) -> Vec<i64> {
    let body: Value = reqwest::get(relay.http(&format!("/api/v1/klines?{query}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["time"].as_i64().unwrap())
        .collect()
}

/// The sum of `relay_upstream_rest_requests` for one exchange.
async fn rest_requests(relay: &Relay, exchange: &str) -> f64 {
    let body = relay.metrics().await;
    body.lines()
        .filter(|l| {
            l.starts_with("relay_upstream_rest_requests_total{")
                && l.contains(&format!("exchange=\"{exchange}\""))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn many_charts_opening_at_once_cost_the_exchange_a_handful_of_requests() {
    let (_sim, relay) = start().await;
    let before = rest_requests(&relay, "binance").await;
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = Client::connect(&relay).await;
        c.send(
            json!({"type":"subscribe","channels":[{"channel":"klines:BTCUSDT:1m","history":200}]}),
        )
        .await;
        clients.push(c);
    }
    for c in &mut clients {
        let h = c.recv_until(is_type("history")).await;
        assert!(!h["data"].as_array().unwrap().is_empty());
    }
    let after = rest_requests(&relay, "binance").await;
    assert!(
        after - before <= 3.0,
        "40 histories cost {} REST requests",
        after - before
    );
}

#[tokio::test]
async fn a_coinbase_history_longer_than_its_100_row_pages_is_paged_together() {
    let (_sims, relay) = start_all().await;
    let (_c, history) = subscribe_with_history(&relay, "trades:BTCUSD@coinbase", 250).await;
    let ids: Vec<u64> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(trade_id)
        .collect();
    assert_eq!(ids.len(), 250);
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "every trade once, in order: {ids:?}"
    );
}

#[tokio::test]
async fn kraken_candles_beyond_its_ohlc_rows_are_built_from_its_trades() {
    // Kraken's OHLC answers only its newest rows (720; 3 here), whatever `since` says: the
    // older candles of a history come from its Trades, exactly.
    let sims = start_sims(exchange_relay::sim::SimOptions {
        ohlc_rows: 3,
        ..exchange_relay::sim::SimOptions::fast()
    })
    .await;
    let relay = start_relay(config_for_all(&sims)).await;
    let body: Value =
        reqwest::get(relay.http("/api/v1/klines?channel=klines:BTCUSD@kraken:1m&limit=8"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 8, "{body}");
    let times: Vec<i64> = data.iter().map(|k| k["time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[1] - w[0] == 60_000), "{times:?}");
    let closed = sims
        .kraken
        .history_candles("BTC/USD", exchange_relay::domain::Interval::M1);
    // The five built from trades (the market traded ten minutes before the simulator started),
    // exact in every field Kraken's candles state.
    let mut compared = 0;
    for k in &data[..5] {
        let c = closed
            .iter()
            .find(|c| c.open_time == k["time"].as_i64().unwrap())
            .expect("the exchange closed this candle");
        compared += 1;
        assert_prices_match(k, c);
        assert_eq!(k["trades"].as_u64(), Some(c.trades), "{k}");
        assert_eq!(k["isFinal"], true);
    }
    assert_eq!(compared, 5);
}
