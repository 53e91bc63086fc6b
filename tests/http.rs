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
async fn health_says_idle_once_the_last_client_has_gone() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    drop(c);
    // close_delay_ms is 300 in tests: the stream goes, then the connection.
    eventually("upstream closed", || sim.connections() == 0).await;
    let b = until("the connection gone from /health", || async {
        let b = health(&relay).await["upstreams"]["binance"].clone();
        (b["connections"] == 0 && b["wantedConnections"] == 0).then_some(b)
    })
    .await;
    assert_eq!(b["state"], "idle", "{b}");
    assert_eq!(b["streams"], 0, "{b}");
    assert!(b.get("lastError").is_none(), "{b}");
}

#[tokio::test]
async fn health_says_unreachable_since_when_and_why_without_subscribers() {
    // Nothing listens on the exchange's address: the instrument list cannot be fetched.
    let dead_addr = dead_addr().await;
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges.get_mut(ExchangeId::Binance).rest_url = format!("http://{dead_addr}");
    cfg.exchanges.get_mut(ExchangeId::Binance).ws_url = format!("ws://{dead_addr}");
    let relay = start_relay_unready(cfg).await;
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    assert!(b["since"].as_str().unwrap().ends_with('Z'), "{b}");
    assert!(
        b["lastError"].as_str().unwrap().contains("instrument list"),
        "{b}"
    );
    assert_eq!(b["instrumentsLoaded"], false);
}

#[tokio::test]
async fn health_says_unreachable_while_the_exchange_is_away() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    sim.set_available(false);
    sim.kill_connections();
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    assert!(b["since"].is_string() && b["lastError"].is_string(), "{b}");
    sim.set_available(true);
    c.recv_until(is_type("trade")).await;
    let b = until_upstream_state(&relay, "binance", "connected").await;
    assert!(b.get("since").is_none(), "{b}");
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

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let (_sim, relay) = start().await;
    let http = reqwest::Client::new();
    for path in ["/nope", "/api/v1/nothing", "/console.png"] {
        let r = http.get(relay.http(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "NOT_FOUND");
        assert!(body["error"]["message"].as_str().unwrap().contains(path));
    }
    let r = http
        .get(relay.http("/api/v1/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn read_only_endpoints_are_cors_readable_and_publish_is_not() {
    let (_sim, relay) = start().await;
    let http = reqwest::Client::new();
    for path in ["/health", "/ready", "/api/v1/ws/stats"] {
        let r = http
            .get(relay.http(path))
            .header("Origin", "https://dash.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*", "{path}");
        let pre = http
            .request(reqwest::Method::OPTIONS, relay.http(path))
            .header("Origin", "https://dash.example.com")
            .header("Access-Control-Request-Method", "GET")
            .send()
            .await
            .unwrap();
        assert!(pre.status().is_success(), "{path}: {}", pre.status());
        assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    }
    let pre = http
        .request(reqwest::Method::OPTIONS, relay.http("/api/v1/publish"))
        .header("Origin", "https://dash.example.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.allowed_origins = vec!["https://app.example.com".into()];
    let relay = start_relay(cfg).await;
    let http = reqwest::Client::new();
    let get = |origin: &'static str| {
        http.get(relay.http("/api/v1/ws/stats"))
            .header("Origin", origin)
            .send()
    };
    let r = get("https://app.example.com").await.unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = get("https://evil.example.com").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
