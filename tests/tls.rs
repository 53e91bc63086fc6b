//! `wss://` and `https://` to the exchanges, end to end: a TLS endpoint made in the test (its
//! own CA, from rcgen) in front of the simulated exchange. Trusted through `exchanges.ca_file`
//! the relay serves data; without it the relay fails closed and `/health` names the host and
//! the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio::net::TcpListener;

#[tokio::test]
async fn wss_and_https_through_a_trusted_ca_serve_data() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let cfg = config_through_tls(&sim, &front, "tls");
    // Ready means the instrument list came over https://.
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    assert!(
        sim.connections() >= 1,
        "the data came over wss:// from the simulator"
    );
    let b = until_upstream_state(&relay, "binance", "connected").await;
    assert!(b.get("lastError").is_none(), "{b}");
}

#[tokio::test]
async fn without_the_ca_the_relay_fails_closed_and_says_which_host_and_why() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let mut cfg = config_for(&sim);
    let port = front.addr.port();
    // REST stays on the plain simulator so that subscriptions are accepted; the WebSocket
    // goes through the TLS endpoint whose CA the relay does not know.
    cfg.exchanges.get_mut(ExchangeId::Binance).ws_url = format!("wss://localhost:{port}");
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    let error = b["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!("localhost:{port}")),
        "names the host: {error}"
    );
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "says why: {error}"
    );
    assert_eq!(sim.connections(), 0, "nothing got through");
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_relay_with_a_clear_error() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges.ca_file = Some("/nonexistent/ca.pem".into());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = exchange_relay::run(cfg, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("exchanges.ca_file: cannot read /nonexistent/ca.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn an_https_refusal_names_the_url_and_the_reason_in_health() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let mut cfg = config_for(&sim);
    let port = front.addr.port();
    cfg.exchanges.get_mut(ExchangeId::Binance).rest_url = format!("https://localhost:{port}");
    let relay = start_relay_unready(cfg).await;
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    let error = b["lastError"].as_str().unwrap();
    assert!(error.contains(&format!("localhost:{port}")), "{error}");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}
