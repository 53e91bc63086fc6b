//! Slow consumers: bounded per-client queues, conflation of current values, 1013 for a client
//! that cannot keep up with reliable data, and nobody else slowed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use exchange_relay::sim::SimOptions;
use serde_json::json;

async fn busy_relay(capacity: usize) -> (exchange_relay::sim::SimBinance, common::Relay) {
    let mut opts = SimOptions::fast();
    opts.rate_scale = 20.0; // ~1,000 trades/s on the four symbols below
    let sim = start_sim_with(opts).await;
    let mut cfg = config_for(&sim);
    cfg.server.client_queue_capacity = capacity;
    cfg.server.client_send_buffer_bytes = 16 * 1024;
    let relay = start_relay(cfg).await;
    (sim, relay)
}

/// A client whose receive window is tiny, so the relay's writes to it back up within moments
/// of it not reading (instead of after megabytes of loopback buffering).
async fn small_window_client(relay: &common::Relay) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(relay.addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(relay.ws_url(), stream)
        .await
        .unwrap();
    Client { ws, hello: None }
}

const TRADES: [&str; 4] = [
    "trades:BTCUSDT",
    "trades:ETHUSDT",
    "trades:SOLUSDT",
    "trades:XRPUSDT",
];

#[tokio::test]
async fn a_client_that_stops_reading_trades_is_closed_with_1013_and_others_keep_up() {
    let (_sim, relay) = busy_relay(64).await;
    let mut fast = Client::connect(&relay).await;
    fast.subscribe(&TRADES).await;
    // The fast client reads continuously and checks every trade arrives in order.
    let reader = read_trades_in_order(fast, 5_000);
    let mut slow = small_window_client(&relay).await;
    slow.subscribe(&TRADES).await;

    eventually_async(&relay, |s| {
        s["slowConsumerDisconnects"].as_u64().unwrap() >= 1
    })
    .await;
    // The slow client finds SLOW_CONSUMER and 1013 after whatever its socket had buffered.
    let (code, _, before) = slow.recv_close().await;
    assert_eq!(code, 1013);
    assert_eq!(error_code(before.last().unwrap()), "SLOW_CONSUMER");
    assert_eq!(
        reader.await.unwrap(),
        5_000,
        "the fast client got everything, in order"
    );
    assert_eq!(relay.stats().await["slowConsumerDisconnects"], 1);
}

/// Polls the stats until `cond` holds.
async fn eventually_async(relay: &common::Relay, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = relay.stats().await;
        if cond(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_behind_on_conflatable_channels_is_kept_and_catches_up() {
    let (_sim, relay) = busy_relay(8).await;
    let mut lagging = small_window_client(&relay).await;
    let symbols = [
        "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "AVAXUSDT",
        "ETHBTC", "BNBBTC",
    ];
    let channels: Vec<String> = symbols
        .iter()
        .flat_map(|s| {
            [
                format!("depth:{s}:20"),
                format!("depth:{s}:10"),
                format!("ticker:{s}"),
            ]
        })
        .collect();
    lagging
        .send(json!({"type": "subscribe", "channels": channels}))
        .await;

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = relay.stats().await;
        assert_eq!(s["slowConsumerDisconnects"], 0, "{s}");
        assert_eq!(s["connectedClients"], 1, "{s}");
        if s["conflatedMessages"].as_u64().unwrap() > 100 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "conflation never started: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It reads again, and within a bounded number of messages is on current data: the queue
    // held at most one value per channel, not seconds of history.
    lagging
        .send(json!({"type": "ping", "id": "still-here"}))
        .await;
    let mut before_pong = 0;
    loop {
        let m = lagging.recv().await;
        if m["id"] == "still-here" {
            break;
        }
        before_pong += 1;
    }
    assert!(
        before_pong < 5_000,
        "{before_pong} messages were queued ahead of the pong"
    );
    lagging.recv_until(is_type("depth")).await;
}
