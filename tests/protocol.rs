//! Every client message, server message and error code of PROTOCOL.md, through a real relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn is_iso(v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.'
}

#[tokio::test]
async fn connected_then_ping_pong_echoes_the_id() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    let hello = c.hello.clone().unwrap();
    assert_eq!(hello["data"]["authenticated"], false);
    assert_eq!(hello["data"]["userId"], Value::Null);
    assert_eq!(hello["data"]["maxSubscriptions"], 50);
    assert!(hello["data"]["clientId"]
        .as_str()
        .unwrap()
        .starts_with("c-"));
    assert!(is_iso(&hello["timestamp"]), "{hello}");

    c.send(json!({"type": "ping", "id": 7})).await;
    let pong = c.recv().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 7);
    assert!(is_iso(&pong["timestamp"]));

    // `action` is accepted as an alias of `type`; string ids come back as strings.
    c.send(json!({"action": "ping", "id": "abc"})).await;
    let pong = c.recv().await;
    assert_eq!(
        (pong["type"].clone(), pong["id"].clone()),
        (json!("pong"), json!("abc"))
    );
}

#[tokio::test]
async fn malformed_requests_get_errors_and_the_connection_stays() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;

    c.send_raw(Message::text("this is not json")).await;
    assert_eq!(error_code(&c.recv().await), "INVALID_JSON");

    c.send_raw(Message::text("[1,2,3]")).await;
    assert_eq!(error_code(&c.recv().await), "INVALID_JSON");

    c.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    let e = c.recv().await;
    assert_eq!(error_code(&e), "INVALID_JSON");
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("binary frames are not supported"));

    c.send(json!({"id": 3})).await;
    let e = c.recv().await;
    assert_eq!(
        (error_code(&e), e["id"].clone()),
        ("UNKNOWN_TYPE", json!(3))
    );

    c.send(json!({"type": "dance", "id": 4})).await;
    let e = c.recv().await;
    assert_eq!(
        (error_code(&e), e["id"].clone()),
        ("UNKNOWN_TYPE", json!(4))
    );

    c.send(json!({"type": "subscribe"})).await;
    assert_eq!(error_code(&c.recv().await), "INVALID_CHANNEL");

    // Still serving.
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
}

#[tokio::test]
async fn a_line_pasted_with_the_wscat_prompt_is_explained() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send_raw(Message::text(r#"> {"type":"ping"}"#)).await;
    let e = c.recv().await;
    assert_eq!(error_code(&e), "INVALID_JSON");
    let message = e["data"]["message"].as_str().unwrap();
    assert!(message.contains("wscat's prompt"), "{message}");
    c.send_raw(Message::text("{'type':'ping'}")).await;
    let e = c.recv().await;
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap()
            .contains("double quotes"),
        "{e}"
    );
}

#[tokio::test]
async fn channel_errors_name_the_channel_and_say_why() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send(json!({"type": "subscribe", "id": 9, "channels": [
        "price:btcusdt", "price:BTCUSDT@ftx", "price:NOPEUSDT", "price:LUNAUSDT", "klines:BTCUSDT:7m",
        "ticker:BTCUSD@coinbase"
    ]}))
    .await;
    let mut errors = Vec::new();
    for _ in 0..6 {
        let e = c.recv().await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["id"], 9);
        errors.push((
            e["channel"].as_str().unwrap().to_string(),
            error_code(&e).to_string(),
            e["data"]["message"].as_str().unwrap().to_string(),
        ));
    }
    let find = |ch: &str| errors.iter().find(|e| e.0 == ch).unwrap().clone();
    let (_, code, msg) = find("price:btcusdt");
    assert_eq!(code, "INVALID_CHANNEL");
    assert_eq!(msg, "symbols are upper case: did you mean price:BTCUSDT?");
    assert_eq!(find("price:BTCUSDT@ftx").1, "UNKNOWN_EXCHANGE");
    let (_, code, msg) = find("price:NOPEUSDT");
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("UNKNOWN_SYMBOL", "Unknown symbol NOPEUSDT on binance")
    );
    let (_, code, msg) = find("price:LUNAUSDT");
    assert_eq!(code, "UNKNOWN_SYMBOL");
    assert!(msg.contains("not trading"), "{msg}");
    assert_eq!(find("klines:BTCUSDT:7m").1, "INVALID_CHANNEL");
    // Coinbase is switched off in this relay's configuration.
    assert_eq!(find("ticker:BTCUSD@coinbase").1, "UNKNOWN_EXCHANGE");

    // An unknown symbol never reaches the exchange.
    assert!(!sim.ever_requested("nopeusdt"));
    assert!(!sim.ever_requested("lunausdt"));
}

#[tokio::test]
async fn subscribe_list_unsubscribe_and_duplicates() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send(json!({"type": "subscribe", "channels": ["price:BTCUSDT", "trades:ETHUSDT"], "id": 1}))
        .await;
    let a = c.recv_until(is_type("subscribed")).await;
    assert_eq!(
        (a["channel"].clone(), a["id"].clone()),
        (json!("price:BTCUSDT"), json!(1))
    );
    assert!(is_iso(&a["timestamp"]));
    c.recv_until(is_msg("subscribed", "trades:ETHUSDT")).await;

    // A duplicate is acknowledged again and changes nothing.
    c.send(json!({"type": "subscribe", "channels": ["price:BTCUSDT"], "id": 2}))
        .await;
    let again = c
        .recv_until(|v| v["type"] == "subscribed" && v["id"] == 2)
        .await;
    assert_eq!(again["channel"], "price:BTCUSDT");
    assert_eq!(relay.stats().await["totalSubscriptions"], 2);

    c.send(json!({"type": "list", "id": 3})).await;
    let list = c.recv_until(is_type("subscriptions")).await;
    assert_eq!(list["channels"], json!(["price:BTCUSDT", "trades:ETHUSDT"]));
    assert_eq!(list["id"], 3);

    c.send(json!({"type": "unsubscribe", "channels": ["price:BTCUSDT"], "id": 4}))
        .await;
    let u = c.recv_until(is_type("unsubscribed")).await;
    assert_eq!(
        (u["channel"].clone(), u["id"].clone()),
        (json!("price:BTCUSDT"), json!(4))
    );

    c.send(json!({"type": "unsubscribe", "channels": ["price:BTCUSDT"], "id": 5}))
        .await;
    let e = c.recv_until(is_type("error")).await;
    assert_eq!(
        (error_code(&e), e["channel"].clone(), e["id"].clone()),
        ("NOT_SUBSCRIBED", json!("price:BTCUSDT"), json!(5))
    );

    c.send(json!({"type": "list"})).await;
    let list = c.recv_until(is_type("subscriptions")).await;
    assert_eq!(list["channels"], json!(["trades:ETHUSDT"]));
}

#[tokio::test]
async fn every_kind_delivers_its_documented_shape() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&[
        "price:BTCUSDT",
        "ticker:BTCUSDT",
        "klines:BTCUSDT:1s",
        "trades:BTCUSDT",
        "depth:BTCUSDT",
        "depth:BTCUSDT:5",
        "depth:BTCUSDT@binance:20",
    ])
    .await;

    let p = c.recv_until(is_msg("price", "price:BTCUSDT")).await;
    let d = &p["data"];
    for f in [
        "price",
        "change24h",
        "changePercent24h",
        "high24h",
        "low24h",
        "volume24h",
        "timestamp",
    ] {
        assert!(d[f].is_number(), "price.{f} in {p}");
    }
    assert_eq!(
        (d["symbol"].clone(), d["exchange"].clone()),
        (json!("BTCUSDT"), json!("binance"))
    );
    assert!(is_iso(&p["timestamp"]));

    let t = c.recv_until(is_msg("ticker", "ticker:BTCUSDT")).await;
    let d = &t["data"];
    for f in [
        "price",
        "bid",
        "ask",
        "bidSize",
        "askSize",
        "volume",
        "quoteVolume",
        "change",
        "changePercent",
        "high",
        "low",
        "open",
        "previousClose",
    ] {
        assert!(d[f].is_number(), "ticker.{f} in {t}");
    }
    assert!(d["bid"].as_f64() < d["ask"].as_f64());
    assert!(is_iso(&d["timestamp"]));

    let k = c.recv_until(is_msg("kline", "klines:BTCUSDT:1s")).await;
    let d = &k["data"];
    assert_eq!(d["interval"], "1s");
    assert_eq!(
        d["closeTime"].as_i64().unwrap(),
        d["time"].as_i64().unwrap() + 999
    );
    for f in [
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quoteVolume",
        "trades",
    ] {
        assert!(d[f].is_number(), "kline.{f} in {k}");
    }
    assert!(d["isFinal"].is_boolean());

    let tr = c.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    let d = &tr["data"];
    assert!(d["tradeId"].is_u64(), "Binance trade ids are numbers: {tr}");
    assert!(d["side"] == "buy" || d["side"] == "sell");
    assert!(d["price"].is_number() && d["quantity"].is_number());
    assert!(is_iso(&d["timestamp"]));

    for (ch, n) in [
        ("depth:BTCUSDT", 10),
        ("depth:BTCUSDT:5", 5),
        ("depth:BTCUSDT@binance:20", 20),
    ] {
        let m = c
            .recv_until(move |v| v["type"] == "depth" && v["channel"] == ch)
            .await;
        let bids = m["data"]["bids"].as_array().unwrap();
        let asks = m["data"]["asks"].as_array().unwrap();
        assert_eq!((bids.len(), asks.len()), (n, n), "{ch}");
        assert!(
            bids[0][0].as_f64() < asks[0][0].as_f64(),
            "crossed book on {ch}"
        );
        assert!(
            bids[0][0].as_f64() > bids[1][0].as_f64(),
            "bids best first on {ch}"
        );
        assert!(
            asks[0][0].as_f64() < asks[1][0].as_f64(),
            "asks best first on {ch}"
        );
    }
}

#[tokio::test]
async fn final_klines_come_exactly_once_per_candle() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["klines:ETHUSDT:1s"]).await;
    let mut finals = Vec::new();
    let mut last_time = 0;
    while finals.len() < 3 {
        let k = c.recv_until(is_type("kline")).await;
        let t = k["data"]["time"].as_i64().unwrap();
        assert!(
            t >= last_time,
            "klines went backwards: {t} after {last_time}"
        );
        assert!(
            !finals.contains(&t),
            "candle {t} changed after it was final"
        );
        last_time = t;
        if k["data"]["isFinal"] == true {
            finals.push(t);
        }
    }
    assert!(finals.windows(2).all(|w| w[1] > w[0]));
}

#[tokio::test]
async fn a_new_subscriber_gets_the_current_value_at_once() {
    let (_sim, relay) = start().await;
    let mut first = Client::connect(&relay).await;
    first.subscribe(&["ticker:SOLUSDT"]).await;
    first.recv_until(is_type("ticker")).await;

    // The relay holds a value now: the next subscriber's first message after `subscribed`
    // is that value, not a wait for the next tick.
    let mut second = Client::connect(&relay).await;
    second.subscribe(&["price:SOLUSDT"]).await;
    let ack = second.recv().await;
    assert_eq!(ack["type"], "subscribed");
    let next = second.recv().await;
    assert_eq!(
        (next["type"].clone(), next["channel"].clone()),
        (json!("price"), json!("price:SOLUSDT"))
    );
}

#[tokio::test]
async fn fifty_subscriptions_in_one_request_then_the_51st_is_refused() {
    let (sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    let symbols = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"];
    let intervals = ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h"];
    let channels: Vec<String> = symbols
        .iter()
        .flat_map(|s| intervals.iter().map(move |i| format!("klines:{s}:{i}")))
        .collect();
    assert_eq!(channels.len(), 50);
    c.send(json!({"type": "subscribe", "channels": channels, "id": 1}))
        .await;
    for _ in 0..50 {
        c.recv_until(is_type("subscribed")).await;
    }
    c.send(
        json!({"type": "subscribe", "channels": ["price:BTCUSDT", "klines:BTCUSDT:1m"], "id": 2}),
    )
    .await;
    let e = c.recv_until(is_type("error")).await;
    assert_eq!(
        (error_code(&e), e["channel"].clone()),
        ("SUBSCRIPTION_LIMIT", json!("price:BTCUSDT"))
    );
    // A channel already held is a duplicate, not a 51st subscription.
    let dup = c.recv_until(|v| v["id"] == 2).await;
    assert_eq!(
        (dup["type"].clone(), dup["channel"].clone()),
        (json!("subscribed"), json!("klines:BTCUSDT:1m"))
    );

    // All 50 streams reach the exchange on one connection without breaking its 5 msg/s limit.
    eventually("50 streams upstream", || sim.subscriptions().len() == 50).await;
    assert_eq!(sim.rate_limit_closes(), 0);
    assert_eq!(sim.connects(), 1);
    assert_eq!(relay.stats().await["totalSubscriptions"], 50);
}

#[tokio::test]
async fn flooding_gets_rate_limited_then_closed_with_1008() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.client_requests_per_second = 5;
    cfg.server.client_request_burst = 5;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    for i in 0..200 {
        if c.ws
            .send(Message::text(json!({"type": "ping", "id": i}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, _, before) = c.recv_close().await;
    assert_eq!(code, 1008);
    assert!(before.iter().any(|v| error_code(v) == "RATE_LIMITED"));
    // Only admitted requests are answered: the burst, and what the rate refilled meanwhile.
    let pongs = before.iter().filter(|v| v["type"] == "pong").count();
    let limited = before
        .iter()
        .filter(|v| error_code(v) == "RATE_LIMITED")
        .count();
    assert!((5..50).contains(&pongs), "{pongs} pongs");
    assert!(limited >= 20, "{limited} refusals");

    // Other clients are unaffected.
    let mut other = Client::connect(&relay).await;
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.recv().await["type"], "pong");
}

#[tokio::test]
async fn a_rate_limited_request_is_refused_not_carried_out_and_echoes_its_id() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    // One token a second: the burst is spent long before a second token arrives.
    cfg.server.client_requests_per_second = 1;
    cfg.server.client_request_burst = 20;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    for i in 1..=25 {
        c.send(json!({"type": "ping", "id": i})).await;
    }
    // Beyond the burst too: this subscribe must not subscribe.
    c.send(json!({"type": "subscribe", "channels": ["price:BTCUSDT"], "id": "sub"}))
        .await;
    let mut replies = Vec::new();
    while replies.len() < 26 {
        replies.push(c.recv().await);
    }
    for (i, r) in replies[..20].iter().enumerate() {
        assert_eq!(
            (r["type"].clone(), r["id"].clone()),
            (json!("pong"), json!(i + 1)),
            "{r}"
        );
    }
    for (i, r) in replies[20..25].iter().enumerate() {
        assert_eq!(error_code(r), "RATE_LIMITED", "{r}");
        assert_eq!(
            r["id"],
            json!(i + 21),
            "the refusal echoes the request's id: {r}"
        );
    }
    assert_eq!(error_code(&replies[25]), "RATE_LIMITED");
    assert_eq!(replies[25]["id"], "sub");
    // Nothing else was answered: no pong and no ack for the refused requests.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    c.send(json!({"type": "list", "id": "l"})).await;
    let list = c.recv().await;
    assert_eq!(list["type"], "subscriptions", "{list}");
    assert_eq!(
        list["channels"],
        json!([]),
        "the refused subscribe did not subscribe"
    );
    assert_eq!(sim.subscriptions().len(), 0);
    assert_eq!(relay.stats().await["rateLimitedRequests"], 6);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_after_an_error() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.max_message_bytes = 1024;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    let big = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(4096));
    c.send_raw(Message::text(big)).await;
    let (code, _, before) = c.recv_close().await;
    assert_eq!(code, 1009);
    assert!(before
        .iter()
        .any(|v| v["type"] == "error"
            && v["data"]["message"].as_str().unwrap().contains("too large")));
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.allowed_origins = vec!["https://app.example.com".into()];
    let relay = start_relay(cfg).await;
    let err = Client::open(&relay.ws_url(), None, Some("https://evil.example.com"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("403"), "{err}");
    let err = Client::open(&relay.ws_url(), None, None)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("403"), "{err}");
    let ok = Client::open(&relay.ws_url(), None, Some("https://app.example.com")).await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn connection_caps_refuse_before_the_upgrade() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.max_connections_per_ip = 2;
    let relay = start_relay(cfg).await;
    let _a = Client::connect(&relay).await;
    let _b = Client::connect(&relay).await;
    let resp = raw_upgrade(&relay).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());

    let mut cfg = config_for(&sim);
    cfg.server.max_connections = 1;
    let relay = start_relay(cfg).await;
    let _a = Client::connect(&relay).await;
    let err = Client::open(&relay.ws_url(), None, None)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.ping_interval_ms = 100;
    cfg.server.client_timeout_ms = 400;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    // Not reading means tungstenite never answers the relay's pings: a dead peer.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let stats = relay.stats().await;
    assert_eq!(stats["connectedClients"], 0, "{stats}");
    let (code, _, _) = c.recv_close().await;
    assert!(code == 1008 || code == 1006, "{code}");

    // A client that reads (and so answers pings) stays connected past the timeout.
    let mut live = Client::connect(&relay).await;
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(1000);
    while tokio::time::Instant::now() < until {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), live.ws.next()).await;
    }
    assert_eq!(relay.stats().await["connectedClients"], 1);
}

#[tokio::test]
async fn a_client_that_only_sends_bad_requests_spends_its_error_budget() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.client_error_budget = 5;
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    let bad: Vec<String> = (0..10).map(|i| format!("price:bad{i}")).collect();
    c.send(json!({"type": "subscribe", "channels": bad})).await;
    let (code, _, before) = c.recv_close().await;
    assert_eq!(code, 1008);
    let errors = before.iter().filter(|v| v["type"] == "error").count();
    assert_eq!(errors, 6, "five answers, then the closing one: {before:?}");
    assert!(before.last().unwrap()["data"]["message"]
        .as_str()
        .unwrap()
        .contains("too many invalid requests"));

    // A client within its budget is unaffected.
    let mut ok = Client::connect(&relay).await;
    ok.subscribe(&["price:bad"]).await;
    assert_eq!(error_code(&ok.recv().await), "INVALID_CHANNEL");
    ok.send(json!({"type": "ping"})).await;
    assert_eq!(ok.recv().await["type"], "pong");
}

#[tokio::test]
async fn connections_from_one_address_are_paced() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.max_connects_per_ip_per_second = 1; // bursts of 2
    let relay = start_relay(cfg).await;
    let _a = Client::connect(&relay).await;
    let _b = Client::connect(&relay).await;
    let resp = raw_upgrade(&relay).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TOO_MANY_CONNECTS");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let _c = Client::connect(&relay).await;
}

#[tokio::test]
async fn a_plain_http_request_to_ws_is_told_to_upgrade() {
    let (_sim, relay) = start().await;
    let resp = reqwest::get(relay.http("/ws")).await.unwrap();
    assert_eq!(resp.status(), 426);
    assert_eq!(resp.headers()["upgrade"], "websocket");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "WEBSOCKET_UPGRADE_REQUIRED");
    let bad_version = reqwest::Client::new()
        .get(relay.http("/ws"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "8")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_version.status(), 400);
}

#[tokio::test]
async fn a_client_close_is_echoed_while_data_flows() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4000.into(),
        reason: "done here".into(),
    };
    c.send_raw(Message::Close(Some(frame))).await;
    let (code, reason, _) = c.recv_close().await;
    assert_eq!((code, reason.as_str()), (4000, "done here"));
    // The relay let go of the client and its subscription.
    let mut stats = relay.stats().await;
    for _ in 0..100 {
        if stats["connectedClients"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        stats = relay.stats().await;
    }
    assert_eq!(stats["connectedClients"], 0);
    assert_eq!(stats["totalSubscriptions"], 0);
}

/// A client may send its first frame in the same packet as the upgrade request; the relay
/// must read it from what the HTTP layer had already buffered.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_sim, relay) = start().await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        relay.addr
    )
    .into_bytes();
    // A masked text frame, as a client must send: {"type":"ping","id":42}
    let payload = br#"{"type":"ping","id":42}"#;
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&bytes).await.unwrap();

    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let text = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let s = String::from_utf8_lossy(&got).into_owned();
            if s.contains(r#""type":"pong""#) {
                return s;
            }
        }
    })
    .await
    .expect("no pong for the frame sent with the upgrade");
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains(r#""id":42"#), "{text}");
}
