//! `GET /metrics`: the Prometheus exposition parses by the format's rules and moves as clients
//! subscribe and data flows; every metric the Grafana dashboard queries is one the relay
//! exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// Series name{labels} → value, checking the exposition's rules on the way.
fn parse(text: &str) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap();
            assert!(
                types.insert(family.to_string(), kind.to_string()).is_none(),
                "two # TYPE lines for {family}"
            );
            assert!(
                family.starts_with("relay_"),
                "{family} lacks the relay_ prefix"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "duplicate series {key}"
        );
        let name = key.split('{').next().unwrap();
        let family = types
            .keys()
            .filter(|f| name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("{name} has no # TYPE"));
        if types[family] == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} does not end in _total"
            );
        }
    }
    assert!(text.trim_end().ends_with("# EOF"));
    (series, types)
}

async fn scrape(relay: &Relay) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let r = reqwest::get(relay.http("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("openmetrics-text"));
    parse(&r.text().await.unwrap())
}

#[tokio::test]
async fn metrics_parse_and_move_as_clients_subscribe_and_data_flows() {
    let (_sim, relay) = start().await;
    let (before, types) = scrape(&relay).await;
    for family in [
        "relay_connected_clients",
        "relay_subscriptions",
        "relay_messages_in",
        "relay_messages_out",
        "relay_uptime_seconds",
        "relay_exchange_to_client_seconds",
    ] {
        assert!(types.contains_key(family), "{family} missing: {types:?}");
    }
    assert_eq!(types["relay_exchange_to_client_seconds"], "histogram");
    assert_eq!(before["relay_connected_clients"], 0.0);

    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT", "price:BTCUSDT"]).await;
    for _ in 0..20 {
        c.recv_until(is_type("trade")).await;
    }
    let (after, _) = scrape(&relay).await;
    assert_eq!(after["relay_connected_clients"], 1.0);
    assert_eq!(after[r#"relay_subscriptions{kind="trades"}"#], 1.0);
    assert_eq!(after[r#"relay_subscriptions{kind="price"}"#], 1.0);
    assert!(after[r#"relay_messages_out_total{kind="trade"}"#] >= 20.0);
    assert!(after[r#"relay_messages_in_total{source="binance"}"#] > 20.0);
    assert_eq!(
        after[r#"relay_upstream_connected{exchange="binance"}"#],
        1.0
    );
    assert!(after[r#"relay_upstream_rest_requests_total{exchange="binance",status="2xx"}"#] >= 1.0);
    // The latency histogram counted the deliveries, cumulative buckets ending at the count.
    let count = after[r#"relay_exchange_to_client_seconds_count{exchange="binance"}"#];
    assert!(count >= 20.0, "{count}");
    let inf = after[r#"relay_exchange_to_client_seconds_bucket{le="+Inf",exchange="binance"}"#];
    assert_eq!(inf, count);
    let buckets: Vec<f64> = after
        .iter()
        .filter(|(k, _)| {
            k.starts_with("relay_exchange_to_client_seconds_bucket") && k.contains("binance")
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.iter().all(|b| *b <= count));
    assert!(after["relay_fanout_duration_seconds_count"] >= 1.0);

    // A client error is counted by its code.
    c.send(serde_json::json!({"type": "subscribe", "channels": ["price:NOPEUSDT"]}))
        .await;
    c.recv_until(is_type("error")).await;
    let (later, _) = scrape(&relay).await;
    assert_eq!(
        later[r#"relay_client_errors_total{code="UNKNOWN_SYMBOL"}"#],
        1.0
    );
    assert_eq!(later["relay_channels"], 2.0);

    // The gauges come back down when the client leaves.
    drop(c);
    until("the gauges back at zero", || async {
        let (now, _) = scrape(&relay).await;
        (now["relay_connected_clients"] == 0.0
            && now[r#"relay_subscriptions{kind="trades"}"#] == 0.0
            && now[r#"relay_subscriptions{kind="price"}"#] == 0.0
            && now["relay_channels"] == 0.0)
            .then_some(())
    })
    .await;
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/exchange-relay.json"))
            .unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("relay_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "the dashboard queries {queried:?}");
    // What the relay exports: every series name of a live scrape (histograms' _bucket/_sum/_count).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let exported: BTreeSet<String> = runtime.block_on(async {
        // A node of a cluster, so that the cluster's metrics are there too.
        let redis = Redis::start().await;
        let sim = start_sim().await;
        let mut config = config_for(&sim);
        config.cluster.redis_url = redis.url();
        let relay = start_relay(config).await;
        until("the node to join its cluster", || async {
            (health(&relay).await["cluster"]["state"] == "ok").then_some(())
        })
        .await;
        let (series, _) = scrape(&relay).await;
        series
            .keys()
            .map(|k| k.split('{').next().unwrap().to_string())
            .collect()
    });
    let missing: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the relay does not export: {missing:?}"
    );
}
