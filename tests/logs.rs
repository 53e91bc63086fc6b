//! Tokens never reach the logs, even at the most verbose level. Own test binary, because it
//! installs the process-wide log subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    // The relay's own filter, asked for everything: RUST_LOG=trace.
    tracing_subscriber::fmt()
        .with_env_filter(exchange_relay::log_filter(Some("trace")))
        .with_writer(move || writer.clone())
        .init();

    let (_sim, relay) = start().await;
    let query_token = token("frank", 300);
    let header_token = token("grace", 300);
    let message_token = token("heidi", 300);
    let bad_token = token_with("not-the-secret", json!({"sub": "x", "exp": 4102444800i64}));

    let url = format!("{}?token={query_token}", relay.ws_url());
    let mut a = Client::connect_url(&url, None).await;
    let mut b = Client::connect_url(&relay.ws_url(), Some(&header_token)).await;
    b.send(json!({"type": "auth", "token": message_token}))
        .await;
    b.recv_until(is_type("authenticated")).await;
    b.send(json!({"type": "auth", "token": bad_token})).await;
    b.recv_until(is_type("error")).await;
    a.subscribe(&["portfolio:frank"]).await;
    a.recv_until(is_type("subscribed")).await;
    let bad_url = format!("{}?token={bad_token}", relay.ws_url());
    let mut c = Client::open(&bad_url, None, None).await.unwrap();
    c.recv_close().await;
    drop((a, b));
    relay.shutdown().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("client connected"),
        "the capture works: {} bytes",
        text.len()
    );
    for t in [&query_token, &header_token, &message_token, &bad_token] {
        let signature = t.rsplit('.').next().unwrap();
        let leak: Vec<&str> = text.lines().filter(|l| l.contains(t.as_str())).collect();
        assert!(leak.is_empty(), "a token was logged: {leak:?}");
        assert!(!text.contains(signature), "a token signature was logged");
    }
}
