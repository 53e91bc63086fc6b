//! `GET /api/v1/openapi.json` describes exactly the routes the relay serves, and
//! `GET /api/v1/instruments` answers what the exchanges list. (`.ci/run` also validates the
//! document with an independent validator, openapi-spec-validator.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_every_path_is_served() {
    let (_sim, relay) = start().await;
    let doc: Value = reqwest::get(relay.http("/api/v1/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let routed: BTreeSet<String> = exchange_relay::http::routes(&[])
        .into_iter()
        .map(|(path, _)| path.to_string())
        .collect();
    assert_eq!(documented, routed, "the router and the document disagree");
    // And each documented operation is answered (not the 404/405 fallbacks).
    let http = reqwest::Client::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let status = http
                .request(m, relay.http(path))
                .send()
                .await
                .unwrap()
                .status();
            assert!(
                status != 404 && status != 405,
                "{method} {path} is documented but answers {status}"
            );
        }
    }
    // The shared shapes are described.
    for schema in [
        "ApiErrorBody",
        "StatsBody",
        "InstrumentsBody",
        "HealthBody",
        "PublishBody",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
}

#[tokio::test]
async fn instruments_lists_each_exchanges_markets_with_their_spellings() {
    let (_sims, relay) = start_all().await;
    let get = |q: &'static str| reqwest::get(relay.http(&format!("/api/v1/instruments{q}")));
    let body: Value = get("?exchange=kraken").await.unwrap().json().await.unwrap();
    assert_eq!(body["success"], true);
    let list = body["data"].as_array().unwrap();
    let btc = list.iter().find(|i| i["symbol"] == "BTCUSD").unwrap();
    assert_eq!(
        btc["exchangeSymbol"], "BTC/USD",
        "Kraken's XBT is BTC on v2"
    );
    assert_eq!(
        (btc["base"].clone(), btc["quote"].clone()),
        ("BTC".into(), "USD".into())
    );
    assert_eq!(btc["pricePrecision"], 1);
    assert_eq!(btc["quantityPrecision"], 8);
    let luna = list
        .iter()
        .find(|i| i["symbol"].as_str().unwrap().starts_with("LUNA"));
    assert_eq!(
        luna.map(|l| l["tradable"].clone()),
        Some(Value::Bool(false)),
        "halted, listed as such"
    );
    let symbols: Vec<&str> = list.iter().map(|i| i["symbol"].as_str().unwrap()).collect();
    let mut sorted = symbols.clone();
    sorted.sort();
    assert_eq!(symbols, sorted);

    let body: Value = get("?exchange=coinbase")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let btc = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["symbol"] == "BTCUSD")
        .cloned()
        .unwrap();
    assert_eq!(btc["exchangeSymbol"], "BTC-USD");
    assert_eq!(btc["quantityPrecision"], 8);

    let r = get("").await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "INVALID_PARAMETER");
    let r = get("?exchange=ftx").await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "UNKNOWN_EXCHANGE");
}

#[tokio::test]
async fn instruments_of_a_disabled_or_unloaded_exchange_say_why() {
    let dead_addr = dead_addr().await;
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges.get_mut(ExchangeId::Binance).rest_url = format!("http://{dead_addr}");
    let relay = start_relay_unready(cfg).await;
    let r = reqwest::get(relay.http("/api/v1/instruments?exchange=binance"))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "UPSTREAM_UNAVAILABLE");
    let r = reqwest::get(relay.http("/api/v1/instruments?exchange=kraken"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "disabled in this configuration");
}

#[tokio::test]
async fn the_console_page_is_served_with_a_strict_content_security_policy() {
    let (_sim, relay) = start().await;
    let r = reqwest::get(relay.http("/")).await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(csp.contains(&format!("ws://{}", relay.addr)), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.contains("<script src=\"/console.js\""));
    assert!(!html.contains("<script>"), "no inline script under the CSP");
    for (path, kind) in [
        ("/console.js", "text/javascript"),
        ("/console.css", "text/css"),
    ] {
        let r = reqwest::get(relay.http(path)).await.unwrap();
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
    }
}
