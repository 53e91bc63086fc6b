//! Trades survive upstream outages: after a reconnect the trades made meanwhile come back from
//! each exchange's REST API, in order, once each; what cannot be had is a `gap` (PROTOCOL.md §
//! Sequence numbers and recovery). Real sockets, simulated exchanges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use exchange_relay::sim::SimOptions;
use serde_json::Value;
use tokio::time::{timeout, Instant};

fn trade_id(v: &Value) -> u64 {
    match &v["data"]["tradeId"] {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("tradeId {other}"),
    }
}

async fn read(c: &mut Client, channel: &str, span: Duration, out: &mut Vec<Value>) {
    let end = Instant::now() + span;
    while let Ok(Some(v)) = timeout(end.saturating_duration_since(Instant::now()), c.next()).await {
        if v["channel"] == channel && (v["type"] == "trade" || v["type"] == "gap") {
            out.push(v);
        }
    }
}

/// Subscribes to `channel`, reads a while, lets `cut` break the upstream, reads on.
async fn across_a_cut(
    relay: &Relay,
    channel: &str,
    cut: impl std::future::Future<Output = ()>,
) -> Vec<Value> {
    let mut c = Client::connect(relay).await;
    c.subscribe(&[channel]).await;
    c.recv_until(is_type("subscribed")).await;
    let mut got = Vec::new();
    read(&mut c, channel, Duration::from_millis(1500), &mut got).await;
    assert!(!got.is_empty(), "{channel}: trades before the cut");
    let ((), ()) = tokio::join!(cut, read(&mut c, channel, Duration::from_secs(6), &mut got));
    got
}

fn assert_gapless(channel: &str, msgs: &[Value]) {
    assert!(
        msgs.iter().all(|m| m["type"] == "trade"),
        "{channel}: a gap was announced: {:?}",
        msgs.iter().find(|m| m["type"] == "gap")
    );
    let ids: Vec<u64> = msgs.iter().map(trade_id).collect();
    let holes: Vec<(u64, u64)> = ids
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        holes.is_empty(),
        "{channel}: missing or repeated trade ids at {holes:?}"
    );
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{channel}: seq");
}

#[tokio::test]
async fn an_upstream_kill_during_a_trade_burst_leaves_no_trade_missing_on_any_exchange() {
    let sims = start_sims(SimOptions {
        rate_scale: 5.0,
        ..SimOptions::fast()
    })
    .await;
    let relay = start_relay(config_for_all(&sims)).await;
    let (b, k, c) = tokio::join!(
        across_a_cut(&relay, "trades:BTCUSDT", async {
            sims.binance.kill_connections()
        }),
        across_a_cut(&relay, "trades:BTCUSD@kraken", async {
            sims.kraken.kill_connections()
        }),
        across_a_cut(&relay, "trades:BTCUSD@coinbase", async {
            sims.coinbase.kill_connections()
        }),
    );
    assert_gapless("trades:BTCUSDT", &b);
    assert_gapless("trades:BTCUSD@kraken", &k);
    assert_gapless("trades:BTCUSD@coinbase", &c);
    let stats = relay.stats().await;
    for ex in ["binance", "kraken", "coinbase"] {
        assert!(
            stats["upstreams"][ex]["reconnects"].as_u64().unwrap() >= 1,
            "{ex} reconnected"
        );
    }
}

/// The gap a refused or out-of-reach backfill leaves: one `upstream_outage` message in the
/// tape's place, bracketing the missing trades.
fn assert_outage_gap(channel: &str, msgs: &[Value]) {
    let at = msgs
        .iter()
        .position(|m| m["type"] == "gap")
        .unwrap_or_else(|| panic!("{channel}: no gap announced"));
    let gap = &msgs[at];
    assert_eq!(gap["data"]["reason"], "upstream_outage");
    let time = |m: &Value| {
        chrono::DateTime::parse_from_rfc3339(m["data"]["timestamp"].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let iso = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(gap["data"][k].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let (from, to) = (iso("from"), iso("to"));
    let before = &msgs[at - 1];
    let after = &msgs[at + 1];
    assert!(
        trade_id(after) > trade_id(before) + 1,
        "{channel}: trades are missing"
    );
    assert!(
        from >= time(before),
        "{channel}: from {from} before the last trade kept {}",
        time(before)
    );
    assert!(
        to <= time(after) && from <= to,
        "{channel}: to {to} after the first trade after it {}",
        time(after)
    );
    // The gap is a message of the channel: it takes a seq.
    assert_eq!(
        gap["seq"].as_u64().unwrap(),
        before["seq"].as_u64().unwrap() + 1
    );
    assert_eq!(
        after["seq"].as_u64().unwrap(),
        gap["seq"].as_u64().unwrap() + 1
    );
}

#[tokio::test]
async fn rest_refusing_during_the_outage_yields_a_gap_with_the_right_bounds() {
    let sims = start_sims(SimOptions::fast()).await;
    let relay = start_relay(config_for_all(&sims)).await;
    let (b, k) = tokio::join!(
        across_a_cut(&relay, "trades:BTCUSDT", async {
            sims.binance.refuse_trades_rest(true);
            sims.binance.kill_connections();
        }),
        across_a_cut(&relay, "trades:BTCUSD@kraken", async {
            sims.kraken.refuse_trades_rest(true);
            sims.kraken.kill_connections();
        }),
    );
    assert_outage_gap("trades:BTCUSDT", &b);
    assert_outage_gap("trades:BTCUSD@kraken", &k);
    let stats = relay.stats().await;
    assert!(
        stats["upstreams"]["binance"]["incompleteBackfills"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        stats["recovery"]["gaps"]["upstream_outage"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("relay_upstream_incomplete_backfills_total{exchange=\"kraken\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("relay_gaps_total{reason=\"upstream_outage\"}"));
}

#[tokio::test]
async fn an_outage_beyond_the_exchanges_reach_is_a_gap() {
    let sims = start_sims(SimOptions::fast()).await;
    let relay = start_relay(config_for_all(&sims)).await;
    let (b, c) = tokio::join!(
        // The exchange is away for a second and a half, and what it traded meanwhile is then
        // beyond its REST API's reach.
        across_a_cut(&relay, "trades:BTCUSDT", async {
            sims.binance.set_available(false);
            sims.binance.kill_connections();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sims.binance.forget_trades();
            sims.binance.set_available(true);
        }),
        across_a_cut(&relay, "trades:BTCUSD@coinbase", async {
            sims.coinbase.set_available(false);
            sims.coinbase.kill_connections();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sims.coinbase.forget_trades();
            sims.coinbase.set_available(true);
        }),
    );
    assert_outage_gap("trades:BTCUSDT", &b);
    assert_outage_gap("trades:BTCUSD@coinbase", &c);
}

/// A book the relay rebuilt from a fresh snapshot says so on every depth channel of it, in
/// sequence, between the last book before the failure and the first fresh one.
async fn resync_gap(relay: &Relay, channel: &str, break_book: impl FnOnce()) {
    let mut c = Client::connect(relay).await;
    c.subscribe(&[channel]).await;
    c.recv_until(is_type("subscribed")).await;
    let before = c
        .recv_until(|v| v["channel"] == channel && v["type"] == "depth")
        .await;
    break_book();
    let gap = c
        .recv_until(|v| v["channel"] == channel && v["type"] != "depth")
        .await;
    assert_eq!(gap["type"], "gap", "{channel}: {gap}");
    assert_eq!(gap["data"]["reason"], "book_resync");
    let from = chrono::DateTime::parse_from_rfc3339(gap["data"]["from"].as_str().unwrap()).unwrap();
    let to = chrono::DateTime::parse_from_rfc3339(gap["data"]["to"].as_str().unwrap()).unwrap();
    assert!(from <= to);
    assert!(gap["seq"].as_u64().unwrap() > before["seq"].as_u64().unwrap());
    let fresh = c
        .recv_until(|v| v["channel"] == channel && v["type"] == "depth")
        .await;
    assert_eq!(
        fresh["seq"].as_u64().unwrap(),
        gap["seq"].as_u64().unwrap() + 1
    );
}

#[tokio::test]
async fn a_rebuilt_book_is_announced_as_a_book_resync_gap() {
    let sims = start_sims(SimOptions::fast()).await;
    let relay = start_relay(config_for_all(&sims)).await;
    tokio::join!(
        resync_gap(&relay, "depth:BTCUSD@kraken:10", || sims
            .kraken
            .corrupt_next_checksum("BTC/USD")),
        resync_gap(&relay, "depth:BTCUSD@coinbase:10", || sims
            .coinbase
            .skip_sequence()),
    );
}

/// Reads `channel` for `span`: the open times of final candles, and gap notices.
async fn finals_and_gaps(
    c: &mut Client,
    channel: &str,
    span: Duration,
    finals: &mut Vec<i64>,
    gaps: &mut i32,
) {
    let end = Instant::now() + span;
    while let Ok(Some(v)) = timeout(end.saturating_duration_since(Instant::now()), c.next()).await {
        if v["channel"] != channel {
            continue;
        }
        if v["type"] == "gap" {
            *gaps += 1;
        }
        if v["type"] == "kline" && v["data"]["isFinal"] == true {
            finals.push(v["data"]["time"].as_i64().unwrap());
        }
    }
}

/// Candles that closed while the relay was away are still sent, final, once each, in order
/// (from the exchange's REST candles), before the live ones.
async fn finals_across_an_outage(
    relay: &Relay,
    channel: &str,
    cut: impl std::future::Future<Output = ()>,
) {
    let mut c = Client::connect(relay).await;
    c.subscribe(&[channel]).await;
    c.recv_until(is_type("subscribed")).await;
    let mut finals: Vec<i64> = Vec::new();
    let mut gaps = 0;
    finals_and_gaps(
        &mut c,
        channel,
        Duration::from_millis(2500),
        &mut finals,
        &mut gaps,
    )
    .await;
    cut.await;
    finals_and_gaps(
        &mut c,
        channel,
        Duration::from_secs(6),
        &mut finals,
        &mut gaps,
    )
    .await;
    assert_eq!(gaps, 0, "{channel}: the outage's candles were had");
    assert!(finals.len() >= 6, "{channel}: {finals:?}");
    assert!(
        finals.windows(2).all(|w| w[1] - w[0] == 1000),
        "{channel}: every second final once, in order, across the outage: {finals:?}"
    );
}

#[tokio::test]
async fn candles_that_close_during_an_outage_are_still_sent_final_once() {
    let sims = start_sims(SimOptions::fast()).await;
    let relay = start_relay(config_for_all(&sims)).await;
    let away = Duration::from_millis(2500);
    tokio::join!(
        finals_across_an_outage(&relay, "klines:BTCUSDT:1s", async {
            sims.binance.set_available(false);
            sims.binance.kill_connections();
            tokio::time::sleep(away).await;
            sims.binance.set_available(true);
        }),
        finals_across_an_outage(&relay, "klines:BTCUSD@kraken:1s", async {
            sims.kraken.set_available(false);
            sims.kraken.kill_connections();
            tokio::time::sleep(away).await;
            sims.kraken.set_available(true);
        }),
        finals_across_an_outage(&relay, "klines:BTCUSD@coinbase:1s", async {
            sims.coinbase.set_available(false);
            sims.coinbase.kill_connections();
            tokio::time::sleep(away).await;
            sims.coinbase.set_available(true);
        }),
    );
}
