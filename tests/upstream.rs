//! The stream manager and the Binance connection, observed from both ends: clients on the
//! relay and the simulated exchange's own view of its subscriptions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn three_clients_on_price_and_ticker_share_one_upstream_stream() {
    let (sim, relay) = start().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&relay).await;
        c.subscribe(&["price:BTCUSDT", "ticker:BTCUSDT"]).await;
        c.recv_until(is_type("price")).await;
        c.recv_until(is_type("ticker")).await;
        clients.push(c);
    }
    let subs = sim.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs.get("btcusdt@ticker"), Some(&1), "{subs:?}");
    assert_eq!(sim.connections(), 1);
    let stats = relay.stats().await;
    assert_eq!(stats["binanceStreams"], 1);
    assert_eq!(stats["binanceActiveStreams"], json!(["btcusdt@ticker"]));
    assert_eq!(stats["totalSubscriptions"], 6);
    assert_eq!(
        stats["activeChannels"],
        json!(["price:BTCUSDT", "ticker:BTCUSDT"])
    );

    // One unsubscribes politely, one vanishes without a word, one closes normally.
    let mut a = clients.remove(0);
    a.send(json!({"type": "unsubscribe", "channels": ["price:BTCUSDT", "ticker:BTCUSDT"]}))
        .await;
    a.recv_until(is_type("unsubscribed")).await;
    let b = clients.remove(0);
    drop(b); // TCP closed without a close frame
    assert_eq!(
        sim.subscriptions().get("btcusdt@ticker"),
        Some(&1),
        "still wanted by the third client"
    );
    let mut c = clients.remove(0);
    c.ws.close(None).await.unwrap();

    eventually(
        "the upstream stream to close after the last client left",
        || sim.subscriptions().is_empty(),
    )
    .await;
    eventually("the upstream connection to close", || {
        sim.connections() == 0
    })
    .await;
    let stats = relay.stats().await;
    assert_eq!(stats["binanceStreams"], 0);
    assert_eq!(stats["activeChannels"], json!([]));
}

#[tokio::test]
async fn depth_levels_share_one_partial_depth_stream() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["depth:ETHUSDT:5", "depth:ETHUSDT", "depth:ETHUSDT:20"])
        .await;
    for _ in 0..3 {
        c.recv_until(is_type("depth")).await;
    }
    assert_eq!(
        sim.subscriptions().keys().collect::<Vec<_>>(),
        ["ethusdt@depth20@100ms"]
    );
}

#[tokio::test]
async fn the_stream_lingers_for_close_delay_so_a_quick_resubscribe_costs_nothing() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.streams.close_delay_ms = 1500;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let requests_before = sim.control_messages();
    // A subscribe/unsubscribe storm.
    for i in 0..8 {
        let kind = if i % 2 == 0 {
            "unsubscribe"
        } else {
            "subscribe"
        };
        c.send(json!({"type": kind, "channels": ["trades:BTCUSDT"]}))
            .await;
    }
    c.send(json!({"type": "ping", "id": "end"})).await;
    c.recv_until(|v| v["id"] == "end").await;
    c.recv_until(is_type("trade")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.subscriptions().get("btcusdt@trade"), Some(&1));
    // The storm never reached the exchange (pings/pongs aside).
    assert!(
        sim.control_messages() - requests_before <= 2,
        "{} control messages",
        sim.control_messages() - requests_before
    );
}

#[tokio::test]
async fn an_upstream_drop_is_invisible_except_for_the_gap() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT", "ticker:ETHUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let connects = sim.connects();
    sim.kill_connections();
    eventually("a reconnect", || sim.connects() > connects).await;
    // Data resumes on both channels with no action from the client.
    c.recv_until(is_type("trade")).await;
    c.recv_until(is_type("ticker")).await;
    let subs = sim.subscriptions();
    assert_eq!(
        subs.len(),
        2,
        "everything still wanted is resubscribed: {subs:?}"
    );
    let stats = relay.stats().await;
    assert!(
        stats["upstreams"]["binance"]["reconnects"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(stats["upstreams"]["binance"]["connected"], true);
}

#[tokio::test]
async fn server_shutdown_makes_the_relay_reconnect() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:ETHUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let connects = sim.connects();
    sim.server_shutdown();
    eventually("a new connection after serverShutdown", || {
        sim.connects() > connects
    })
    .await;
    eventually("the old connection to close", || sim.connections() == 1).await;
    c.recv_until(is_type("trade")).await;
    drop(relay);
}

#[tokio::test]
async fn the_relay_serves_while_the_exchange_is_down_and_catches_up_when_it_returns() {
    let sim = start_sim().await;
    sim.set_available(false);
    let relay = start_relay_unready(config_for(&sim)).await;
    let health: serde_json::Value = reqwest::get(relay.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready = reqwest::get(relay.http("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);

    let mut c = Client::connect(&relay).await;
    c.subscribe(&["price:BTCUSDT"]).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    let e = c.recv().await;
    assert_eq!(
        (error_code(&e), e["channel"].clone()),
        ("UPSTREAM_UNAVAILABLE", json!("price:BTCUSDT"))
    );
    // An unknown symbol cannot be told apart yet; it must not reach the exchange later either.
    c.subscribe(&["price:NOPEUSDT"]).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    assert_eq!(error_code(&c.recv().await), "UPSTREAM_UNAVAILABLE");

    sim.set_available(true);
    eventually_ready(&relay).await;
    // The unknown one is dropped with UNKNOWN_SYMBOL once the instrument list arrives...
    let e = c
        .recv_until(|v| v["type"] == "error" && v["channel"] == "price:NOPEUSDT")
        .await;
    assert_eq!(error_code(&e), "UNKNOWN_SYMBOL");
    c.recv_until(is_msg("unsubscribed", "price:NOPEUSDT")).await;
    // ...and data flows on the known one with no action from the client.
    c.recv_until(is_msg("price", "price:BTCUSDT")).await;
    assert!(!sim.ever_requested("nopeusdt"));
    c.send(json!({"type": "list"})).await;
    assert_eq!(
        c.recv_until(is_type("subscriptions")).await["channels"],
        json!(["price:BTCUSDT"])
    );
}

async fn eventually_ready(relay: &common::Relay) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::get(relay.http("/ready")).await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_silent_upstream_is_replaced() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges.get_mut(ExchangeId::Binance).stale_timeout_ms = Some(600);
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let connects = sim.connects();
    // The socket stays open but nothing arrives: no data, no pings.
    sim.set_stalled(true);
    eventually("the silent connection to be replaced", || {
        sim.connects() > connects
    })
    .await;
    sim.set_stalled(false);
    // Drain what was queued before the stall, then see data flowing again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.recv_until(is_type("trade")).await;
    eventually("a single upstream connection", || sim.connections() == 1).await;
    assert!(
        relay.stats().await["upstreams"]["binance"]["reconnects"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn exchange_pings_are_answered_so_the_connection_lives_on() {
    let mut opts = exchange_relay::sim::SimOptions::fast();
    // Pongs count against the 5 messages/s limit, so pings no faster than ~3/s.
    opts.ping_every = Duration::from_millis(300);
    opts.pong_timeout = Duration::from_millis(700);
    let sim = start_sim_with(opts).await;
    let relay = start_relay(config_for(&sim)).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["ticker:BTCUSDT"]).await;
    c.recv_until(is_type("ticker")).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    c.recv_until(is_type("ticker")).await;
    assert_eq!(
        sim.connects(),
        1,
        "the exchange never dropped us for a missing pong"
    );
    assert_eq!(sim.rate_limit_closes(), 0);
}

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_open_another_connection() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges
        .get_mut(ExchangeId::Binance)
        .max_streams_per_connection = Some(5);
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    let channels: Vec<String> = [
        "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h",
    ]
    .iter()
    .map(|iv| format!("klines:BTCUSDT:{iv}"))
    .collect();
    c.send(json!({"type": "subscribe", "channels": channels}))
        .await;
    for _ in 0..12 {
        c.recv_until(is_type("subscribed")).await;
    }
    eventually("12 streams over 3 connections", || {
        sim.subscriptions().len() == 12 && sim.connections() == 3
    })
    .await;
    assert!(
        sim.subscriptions().values().all(|n| *n == 1),
        "no stream twice"
    );
    let stats = relay.stats().await;
    assert_eq!(stats["upstreams"]["binance"]["connections"], 3);
    assert_eq!(stats["binanceStreams"], 12);
}

#[tokio::test]
async fn a_rate_limited_rest_api_is_left_alone_for_retry_after() {
    let sim = start_sim().await;
    sim.set_rest_rate_limited(Some(2));
    let relay = start_relay_unready(config_for(&sim)).await;
    eventually("the first exchangeInfo request", || {
        sim.exchange_info_requests() >= 1
    })
    .await;
    let first = tokio::time::Instant::now();
    // Backoff alone would retry within a second; Retry-After says two.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(
        sim.exchange_info_requests(),
        1,
        "retried before Retry-After"
    );
    sim.set_rest_rate_limited(None);
    eventually_ready(&relay).await;
    // `first` was observed by polling, a little after the request itself.
    assert!(first.elapsed() >= Duration::from_millis(1800));
    assert_eq!(sim.exchange_info_requests(), 2);
}
