//! The simulated Binance speaks Binance's protocol: what a plain Binance client sees of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn combined_streams_are_wrapped_and_raw_streams_are_not() {
    let sim = start_sim().await;
    let mut combined = open(&format!(
        "{}/stream?streams=btcusdt@trade/ethusdt@ticker",
        sim.ws_url()
    ))
    .await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let v = next_json(&mut combined).await;
        let stream = v["stream"].as_str().unwrap().to_string();
        assert!(v["data"].is_object());
        if stream == "btcusdt@trade" {
            assert_eq!(v["data"]["e"], "trade");
            assert_eq!(v["data"]["s"], "BTCUSDT");
            assert!(
                v["data"]["p"].as_str().unwrap().contains('.'),
                "numbers are decimal strings"
            );
        }
        seen.insert(stream);
    }
    let mut raw = open(&format!("{}/ws/ethusdt@depth5@100ms", sim.ws_url())).await;
    let v = next_json(&mut raw).await;
    assert!(v.get("stream").is_none());
    assert_eq!(v["bids"].as_array().unwrap().len(), 5);
    assert!(v["lastUpdateId"].is_u64());
}

#[tokio::test]
async fn live_subscription_control_and_documented_errors() {
    let sim = start_sim().await;
    let mut ws = open(&format!("{}/ws", sim.ws_url())).await;
    for (req, want) in [
        (
            json!({"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade", "btcusdt@trade"], "id": 1}),
            json!({"result": null, "id": 1}),
        ),
        (
            json!({"method": "UNSUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 312}),
            json!({"result": null, "id": 312}),
        ),
        (
            json!({"method": "LIST_SUBSCRIPTIONS", "id": 3}),
            json!({"result": ["btcusdt@trade"], "id": 3}),
        ),
    ] {
        ws.send(Message::text(req.to_string())).await.unwrap();
        // Skip trade events that may already flow on the raw connection.
        let reply = loop {
            let v = next_json(&mut ws).await;
            if v.get("id").is_some() {
                break v;
            }
        };
        assert_eq!(reply, want);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ws.send(Message::text(
        json!({"method": "DANCE", "id": 4}).to_string(),
    ))
    .await
    .unwrap();
    let reply = loop {
        let v = next_json(&mut ws).await;
        if v.get("id").is_some() {
            break v;
        }
    };
    assert_eq!(reply["error"]["code"], 2);
    assert!(reply["error"]["msg"]
        .as_str()
        .unwrap()
        .starts_with("Invalid request: unknown variant DANCE"));
}

#[tokio::test]
async fn more_than_five_messages_a_second_closes_with_1008() {
    let sim = start_sim().await;
    let mut ws = open(&format!("{}/ws", sim.ws_url())).await;
    for i in 0..6 {
        ws.send(Message::text(
            json!({"method": "LIST_SUBSCRIPTIONS", "id": i}).to_string(),
        ))
        .await
        .unwrap();
    }
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, (1008, "Too many requests".to_string()));
    assert_eq!(sim.rate_limit_closes(), 1);
}

#[tokio::test]
async fn unknown_and_upper_case_streams_are_accepted_but_silent() {
    let sim = start_sim().await;
    let mut ws = open(&format!("{}/stream", sim.ws_url())).await;
    ws.send(Message::text(
        json!({"method": "SUBSCRIBE", "params": ["BTCUSDT@trade", "nopeusdt@trade"], "id": 1})
            .to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"result": null, "id": 1}));
    let quiet = tokio::time::timeout(Duration::from_millis(400), ws.next()).await;
    assert!(
        quiet.is_err() || matches!(quiet, Ok(Some(Ok(Message::Ping(_))))),
        "{quiet:?}"
    );
}

#[tokio::test]
async fn rest_endpoints_answer_like_binance() {
    let sim = start_sim().await;
    let get = |path: &str| reqwest::get(format!("{}{path}", sim.rest_url()));
    let info: Value = get("/api/v3/exchangeInfo")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(info["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["symbol"] == "BTCUSDT" && s["baseAsset"] == "BTC"));

    let t: Value = get("/api/v3/ticker/24hr?symbol=ETHUSDT")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["symbol"], "ETHUSDT");
    assert!(t["lastPrice"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);

    let d: Value = get("/api/v3/depth?symbol=BTCUSDT&limit=5")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["bids"].as_array().unwrap().len(), 5);

    tokio::time::sleep(Duration::from_millis(100)).await;
    let k: Value = get("/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &k.as_array().unwrap()[0];
    assert_eq!(row.as_array().unwrap().len(), 12);
    assert_eq!(row[6].as_i64().unwrap(), row[0].as_i64().unwrap() + 59_999);

    let bad = get("/api/v3/ticker/24hr?symbol=NOPE").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap(),
        json!({"code": -1121, "msg": "Invalid symbol."})
    );
    let bad = get("/api/v3/klines?symbol=BTCUSDT&interval=7m")
        .await
        .unwrap();
    assert_eq!(bad.json::<Value>().await.unwrap()["code"], -1120);
}
