//! `GET /health`, `GET /api/v1/ws/stats`, and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn stats_carry_every_documented_field() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["price:BTCUSDT", "klines:ETHUSDT:1s"]).await;
    c.recv_until(is_type("price")).await;
    c.recv_until(is_type("kline")).await;
    let s = relay.stats().await;
    assert_eq!(s["connectedClients"], 1);
    assert_eq!(s["totalSubscriptions"], 2);
    assert_eq!(
        s["activeChannels"],
        serde_json::json!(["klines:ETHUSDT:1s", "price:BTCUSDT"])
    );
    assert_eq!(s["quoteStreams"], 1);
    assert_eq!(s["signalStreams"], 0);
    assert_eq!(s["binanceStreams"], 2);
    assert_eq!(
        s["binanceActiveStreams"],
        serde_json::json!(["btcusdt@ticker", "ethusdt@kline_1s"])
    );
    assert_eq!(s["priceCache"], 1);
    let b = &s["upstreams"]["binance"];
    assert_eq!(b["connected"], true);
    assert_eq!(b["streams"], 2);
    assert_eq!(b["reconnects"], 0);
    assert!(b["lastMessageAt"].as_str().unwrap().ends_with('Z'));
    assert!(b["activeStreams"].is_array());
    assert!(s["messagesIn"].as_u64().unwrap() > 0);
    assert!(s["messagesOut"].as_u64().unwrap() > 0);
    assert!(s["uptimeSeconds"].is_u64());
}

#[tokio::test]
async fn health_reports_upstream_state() {
    let (_sim, relay) = start().await;
    let h: Value = reqwest::get(relay.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["upstreams"]["binance"]["state"], "idle");
    assert_eq!(h["upstreams"]["coinbase"]["state"], "disabled");
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let h: Value = reqwest::get(relay.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["upstreams"]["binance"]["state"], "connected");
    assert_eq!(h["upstreams"]["binance"]["instrumentsLoaded"], true);
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001_and_lets_go_of_the_exchange() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let addr = relay.addr;
    relay.shutdown().await;
    let (code, _, _) = c.recv_close().await;
    assert_eq!(code, 1001);
    eventually("upstream connections closed", || sim.connections() == 0).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn a_slowloris_request_is_cut_off_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.header_read_timeout_ms = 300;
    let relay = start_relay(cfg).await;
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The relay ends the connection (EOF, maybe after a 408) instead of waiting forever.
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was left open");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // A complete request on a new connection is still served.
    let h = reqwest::get(relay.http("/health")).await.unwrap();
    assert_eq!(h.status(), 200);
}
