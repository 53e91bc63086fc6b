//! Sequence numbers, `since` recovery, throttling and subscription options, over real sockets
//! against the simulated exchanges (PROTOCOL.md § Sequence numbers and recovery, § Subscription
//! options).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

/// Reads data messages of `channel` (skipping anything else) for `span`.
async fn collect(client: &mut Client, channel: &str, span: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let end = Instant::now() + span;
    while let Ok(Some(v)) =
        timeout(end.saturating_duration_since(Instant::now()), client.next()).await
    {
        if v["channel"] == channel && v.get("seq").is_some() && v["type"] != "subscribed" {
            out.push(v);
        }
    }
    out
}

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn every_subscriber_sees_the_same_seq_growing_by_one() {
    let (_sim, relay) = start().await;
    let mut a = Client::connect(&relay).await;
    a.subscribe(&["trades:BTCUSDT"]).await;
    let ack_a = a.recv_until(is_type("subscribed")).await;
    assert!(ack_a["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(ack_a["seq"].is_u64());
    let first_a = a.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    let mut b = Client::connect(&relay).await;
    b.subscribe(&["trades:BTCUSDT"]).await;
    let ack_b = b.recv_until(is_type("subscribed")).await;
    assert_eq!(ack_b["epoch"], ack_a["epoch"], "one sequence per channel");
    assert!(ack_b["seq"].as_u64().unwrap() >= first_a["seq"].as_u64().unwrap());
    let from_a = collect(&mut a, "trades:BTCUSDT", Duration::from_secs(2)).await;
    let from_b = collect(&mut b, "trades:BTCUSDT", Duration::from_secs(2)).await;
    let sa = seqs(&from_a);
    assert!(sa.len() > 5, "trades flow: {sa:?}");
    assert!(sa.windows(2).all(|w| w[1] == w[0] + 1), "gapless: {sa:?}");
    // b's messages are a's, byte for byte but the timestamp: the same frame.
    for m in &from_b {
        let twin = from_a.iter().find(|x| x["seq"] == m["seq"]);
        if let Some(twin) = twin {
            assert_eq!(twin["data"], m["data"]);
        }
    }
    let sb = seqs(&from_b);
    assert_eq!(
        sb[0],
        ack_b["seq"].as_u64().unwrap() + 1,
        "live follows the ack's seq"
    );
}

#[tokio::test]
async fn a_client_away_for_five_seconds_recovers_every_trade_with_its_seq() {
    let (_sim, relay) = start().await;
    // Someone else keeps the channel (and its record of what was sent) meanwhile.
    let mut keeper = Client::connect(&relay).await;
    keeper.subscribe(&["trades:BTCUSDT"]).await;
    let mut leaver = Client::connect(&relay).await;
    leaver.subscribe(&["trades:BTCUSDT"]).await;
    let ack = leaver.recv_until(is_type("subscribed")).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let seen = collect(&mut leaver, "trades:BTCUSDT", Duration::from_millis(800)).await;
    let last = seen.last().expect("trades before leaving")["seq"]
        .as_u64()
        .unwrap();
    drop(leaver);
    let during = collect(&mut keeper, "trades:BTCUSDT", Duration::from_secs(5)).await;

    let mut back = Client::connect(&relay).await;
    back.send(json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","since":{"epoch":epoch,"seq":last}}],"id":9}))
        .await;
    let ack = back.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(ack["id"], 9);
    let replayed = collect(&mut back, "trades:BTCUSDT", Duration::from_secs(1)).await;
    let got = seqs(&replayed);
    assert_eq!(got[0], last + 1, "resumes right after since");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "no hole: {got:?}");
    for m in during.iter().filter(|m| m["seq"].as_u64().unwrap() > last) {
        let r = replayed
            .iter()
            .find(|x| x["seq"] == m["seq"])
            .unwrap_or_else(|| panic!("seq {} missed", m["seq"]));
        assert_eq!(
            r["data"]["tradeId"], m["data"]["tradeId"],
            "original seq, same trade"
        );
    }
}

#[tokio::test]
async fn a_resume_beyond_the_window_or_from_another_epoch_says_gap() {
    let sim = start_sim().await;
    let mut config = config_for(&sim);
    config.recovery.window_messages = 5;
    let relay = start_relay(config).await;
    let mut keeper = Client::connect(&relay).await;
    keeper.subscribe(&["trades:BTCUSDT"]).await;
    let ack = keeper.recv_until(is_type("subscribed")).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let first = keeper.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    let since = first["seq"].as_u64().unwrap();
    // More than the window's five trades go by.
    let later = collect(&mut keeper, "trades:BTCUSDT", Duration::from_secs(2)).await;
    assert!(later.len() > 6);

    let mut c = Client::connect(&relay).await;
    c.send(json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","since":{"epoch":epoch,"seq":since}}]}))
        .await;
    let ack = c.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], false);
    let gap = c.recv_until(is_type("gap")).await;
    assert_eq!(gap["data"]["reason"], "recovery_window");
    assert_eq!(gap["channel"], "trades:BTCUSDT");
    assert_eq!(gap["epoch"], epoch);
    assert_eq!(
        gap["seq"], ack["seq"],
        "carries the channel's seq, takes none"
    );
    let held = collect(&mut c, "trades:BTCUSDT", Duration::from_millis(300)).await;
    assert!(!held.is_empty(), "what the window holds follows");

    let mut d = Client::connect(&relay).await;
    d.send(json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","since":{"epoch":"nope","seq":1}}]}))
        .await;
    let ack = d.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], false);
    let gap = d.recv_until(is_type("gap")).await;
    assert_eq!(gap["data"]["reason"], "epoch_changed");
    assert!(gap["data"]["to"].is_string());

    // A seq above the channel's current one counts as a wrong epoch.
    let mut e = Client::connect(&relay).await;
    e.send(json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","since":{"epoch":epoch,"seq":u32::MAX}}]}))
        .await;
    let gap = e.recv_until(is_type("gap")).await;
    assert_eq!(gap["data"]["reason"], "epoch_changed");
}

#[tokio::test]
async fn state_channels_recover_to_their_current_value() {
    let (_sim, relay) = start().await;
    let mut a = Client::connect(&relay).await;
    a.subscribe(&["depth:BTCUSDT:5"]).await;
    let ack = a.recv_until(is_type("subscribed")).await;
    let first = a.recv_until(is_msg("depth", "depth:BTCUSDT:5")).await;
    let mut b = Client::connect(&relay).await;
    b.send(json!({"type":"subscribe","channels":[{"channel":"depth:BTCUSDT:5","since":{"epoch":ack["epoch"],"seq":first["seq"]}}]}))
        .await;
    let ack_b = b.recv_until(is_type("subscribed")).await;
    assert_eq!(ack_b["recovered"], true);
    let current = b.recv_until(is_msg("depth", "depth:BTCUSDT:5")).await;
    assert!(current["seq"].as_u64().unwrap() >= first["seq"].as_u64().unwrap());
}

#[tokio::test]
async fn a_new_epoch_starts_when_an_unused_channel_was_released() {
    let (_sim, relay) = start().await; // close_delay 300 ms
    let mut a = Client::connect(&relay).await;
    a.subscribe(&["trades:BTCUSDT"]).await;
    let first = a.recv_until(is_type("subscribed")).await;
    a.send(json!({"type":"unsubscribe","channels":["trades:BTCUSDT"]}))
        .await;
    a.recv_until(is_type("unsubscribed")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.subscribe(&["trades:BTCUSDT"]).await;
    let again = a.recv_until(is_type("subscribed")).await;
    assert_ne!(again["epoch"], first["epoch"]);
    assert_eq!(again["seq"], 0);
}

#[tokio::test]
async fn throttled_and_unthrottled_subscribers_side_by_side() {
    let (_sim, relay) = start().await;
    let mut fast = Client::connect(&relay).await;
    fast.subscribe(&["depth:BTCUSDT:5"]).await;
    let mut slow = Client::connect(&relay).await;
    slow.send(json!({"type":"subscribe","channels":[{"channel":"depth:BTCUSDT:5","throttleMs":500}],"id":1}))
        .await;
    slow.recv_until(is_type("subscribed")).await;
    let (f, s) = tokio::join!(
        collect(&mut fast, "depth:BTCUSDT:5", Duration::from_secs(3)),
        collect(&mut slow, "depth:BTCUSDT:5", Duration::from_secs(3)),
    );
    assert!(f.len() >= 20, "unthrottled gets every update: {}", f.len());
    // One current value at subscribe, then at most one per 500 ms.
    assert!((4..=8).contains(&s.len()), "throttled got {}", s.len());
    let fast_seqs = seqs(&f);
    for m in &s {
        // The same numbered frames, just fewer of them.
        let seq = m["seq"].as_u64().unwrap();
        if let Some(twin) = f.iter().find(|x| x["seq"] == seq) {
            assert_eq!(twin["data"], m["data"]);
        }
    }
    assert!(fast_seqs.windows(2).all(|w| w[1] == w[0] + 1));
    // The trailing edge: the throttled client's last message is the newest value, within one
    // interval of the unthrottled one's.
    let last_slow = s.last().unwrap()["seq"].as_u64().unwrap();
    let last_fast = *fast_seqs.last().unwrap();
    assert!(
        last_fast - last_slow <= 8,
        "slow {last_slow} vs fast {last_fast}"
    );
}

#[tokio::test]
async fn throttled_klines_still_get_every_final_candle() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send(
        json!({"type":"subscribe","channels":[{"channel":"klines:BTCUSDT:1s","throttleMs":5000}]}),
    )
    .await;
    c.recv_until(is_type("subscribed")).await;
    let got = collect(&mut c, "klines:BTCUSDT:1s", Duration::from_secs(4)).await;
    let finals = got.iter().filter(|k| k["data"]["isFinal"] == true).count();
    assert!(
        finals >= 2,
        "final 1s candles are never throttled: {finals}"
    );
    let forming = got.iter().filter(|k| k["data"]["isFinal"] == false).count();
    assert!(forming <= 2, "forming ones are: {forming}");
}

#[tokio::test]
async fn bad_options_are_refused_per_channel() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send(json!({"type":"subscribe","channels":[
        {"channel":"price:BTCUSDT","history":10},
        {"channel":"trades:BTCUSDT","throttleMs":1000},
        {"channel":"depth:BTCUSDT","throttleMs":50},
        {"channel":"klines:BTCUSDT:1m","colour":"red"},
        {"channel":"trades:ETHUSDT","since":{"epoch":"x"}},
        {"channel":"trades:ETHUSDT","since":{"epoch":"x","seq":1},"history":5},
        "ticker:BTCUSDT"
    ],"id":4}))
        .await;
    let mut errors = Vec::new();
    let mut acks = Vec::new();
    while errors.len() < 6 || acks.is_empty() {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("error") => {
                assert_eq!(error_code(&v), "INVALID_OPTION", "{v}");
                assert_eq!(v["id"], 4);
                errors.push(v["data"]["message"].as_str().unwrap().to_string());
            }
            Some("subscribed") => acks.push(v["channel"].clone()),
            _ => {}
        }
    }
    assert_eq!(acks, vec![json!("ticker:BTCUSDT")]);
    assert!(errors[0].contains("history"), "{}", errors[0]);
    assert!(errors[1].contains("throttleMs"), "{}", errors[1]);
    assert!(
        errors[2].contains("100") && errors[2].contains("60000"),
        "{}",
        errors[2]
    );
    assert!(errors[3].contains("colour"), "{}", errors[3]);
    assert!(errors[4].contains("since"), "{}", errors[4]);
    assert!(errors[5].contains("combined"), "{}", errors[5]);
}

#[tokio::test]
async fn published_messages_are_numbered_and_recoverable() {
    let (_sim, relay) = start().await;
    let mut a = Client::connect(&relay).await;
    a.subscribe(&["signals:BTCUSDT"]).await;
    let ack = a.recv_until(is_type("subscribed")).await;
    let http = reqwest::Client::new();
    let publish = |n: u64| {
        http.post(relay.http("/api/v1/publish"))
            .bearer_auth(PUBLISH_KEY)
            .json(&json!({"channel":"signals:BTCUSDT","data":{"n":n}}))
            .send()
    };
    publish(1).await.unwrap();
    let m1 = a.recv_until(is_type("signal")).await;
    assert_eq!(m1["seq"], 1);
    drop(a);
    // Published while nobody is subscribed, inside close_delay: kept for the resume.
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish(2).await.unwrap();
    let mut b = Client::connect(&relay).await;
    b.send(json!({"type":"subscribe","channels":[{"channel":"signals:BTCUSDT","since":{"epoch":ack["epoch"],"seq":1}}]}))
        .await;
    let ack = b.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], true);
    let m2 = b.recv_until(is_type("signal")).await;
    assert_eq!(m2["seq"], 2);
    assert_eq!(m2["data"]["n"], 2);
}

#[tokio::test]
async fn a_client_closed_for_being_slow_resumes_without_loss() {
    let sim = start_sim_with(exchange_relay::sim::SimOptions {
        rate_scale: 20.0,
        ..exchange_relay::sim::SimOptions::fast()
    })
    .await;
    let mut config = config_for(&sim);
    config.server.client_queue_capacity = 16;
    config.server.client_send_buffer_bytes = 4096;
    let relay = start_relay(config).await;
    let mut keeper = Client::connect(&relay).await;
    keeper.subscribe(&["trades:BTCUSDT"]).await;
    keeper.recv_until(is_type("subscribed")).await;
    // The keeper reads on, so the channel stays in use while the slow client is away.
    let keeping = tokio::spawn(async move {
        collect(&mut keeper, "trades:BTCUSDT", Duration::from_secs(6)).await
    });
    let mut slow = Client::connect(&relay).await;
    slow.subscribe(&["trades:BTCUSDT"]).await;
    let ack = slow.recv_until(is_type("subscribed")).await;
    let first = slow.recv_until(is_msg("trade", "trades:BTCUSDT")).await;
    // Stop reading until the relay gives up on the client.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, _, before_close) = slow.recv_close().await;
    assert_eq!(code, 1013);
    let last = before_close
        .iter()
        .filter(|m| m["channel"] == "trades:BTCUSDT" && m["type"] == "trade")
        .map(|m| m["seq"].as_u64().unwrap())
        .max()
        .unwrap_or(first["seq"].as_u64().unwrap());
    let mut back = Client::connect(&relay).await;
    back.send(json!({"type":"subscribe","channels":[{"channel":"trades:BTCUSDT","since":{"epoch":ack["epoch"],"seq":last}}]}))
        .await;
    let ack = back.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let resumed = collect(&mut back, "trades:BTCUSDT", Duration::from_millis(500)).await;
    let got = seqs(&resumed);
    assert_eq!(got[0], last + 1);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
    keeping.abort();
}

#[tokio::test]
async fn window_memory_is_reported() {
    let (_sim, relay) = start().await;
    let mut a = Client::connect(&relay).await;
    a.subscribe(&["trades:BTCUSDT"]).await;
    collect(&mut a, "trades:BTCUSDT", Duration::from_secs(1)).await;
    let body = relay.metrics().await;
    let bytes: f64 = body
        .lines()
        .find(|l| l.starts_with("relay_recovery_window_bytes "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("relay_recovery_window_bytes");
    assert!(bytes > 0.0);
    let stats = relay.stats().await;
    assert!(stats["recovery"]["windowBytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_private_channel_is_checked_before_anything_is_replayed() {
    let (_sim, relay) = start().await;
    let mut alice = Client::connect_url(&relay.ws_url(), Some(&token("alice", 300))).await;
    alice.subscribe(&["orders:alice"]).await;
    let ack = alice.recv_until(is_type("subscribed")).await;
    let http = reqwest::Client::new();
    for n in 1..=3 {
        http.post(relay.http("/api/v1/publish"))
            .bearer_auth(PUBLISH_KEY)
            .json(&json!({"channel":"orders:alice","data":{"n":n}}))
            .send()
            .await
            .unwrap();
    }
    alice
        .recv_until(|v| v["type"] == "orders" && v["seq"] == 3)
        .await;
    drop(alice);
    let since = json!({"epoch": ack["epoch"], "seq": 1});
    // Without a token, and with another user's: refused, nothing of alice's replayed.
    for bearer in [None, Some(token("mallory", 300))] {
        let mut other = Client::connect_url(&relay.ws_url(), bearer.as_deref()).await;
        other
            .send(json!({"type":"subscribe","channels":[{"channel":"orders:alice","since":since}]}))
            .await;
        let err = other.recv_until(is_type("error")).await;
        assert!(
            ["AUTH_REQUIRED", "FORBIDDEN"].contains(&error_code(&err)),
            "{err}"
        );
        other.send(json!({"type":"ping"})).await;
        let next = other.recv_until(|v| v["type"] != "error").await;
        assert_eq!(next["type"], "pong", "nothing was replayed: {next}");
    }
    // Alice again: her orders after seq 1, with their seqs.
    let mut back = Client::connect_url(&relay.ws_url(), Some(&token("alice", 300))).await;
    back.send(json!({"type":"subscribe","channels":[{"channel":"orders:alice","since":since}]}))
        .await;
    let ack = back.recv_until(is_type("subscribed")).await;
    assert_eq!(ack["recovered"], true);
    let two = back.recv_until(is_type("orders")).await;
    let three = back.recv_until(is_type("orders")).await;
    assert_eq!(
        (two["seq"].as_u64(), three["seq"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(three["data"]["n"], 3);
}

#[tokio::test]
async fn subscribing_again_with_an_object_replaces_the_options_and_a_plain_name_changes_nothing() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["depth:BTCUSDT:5"]).await;
    c.recv_until(is_type("subscribed")).await;
    // Unthrottled: about 20 a second on the simulator.
    let before = collect(&mut c, "depth:BTCUSDT:5", Duration::from_secs(1)).await;
    assert!(before.len() >= 10, "{}", before.len());
    c.send(
        json!({"type":"subscribe","channels":[{"channel":"depth:BTCUSDT:5","throttleMs":1000}]}),
    )
    .await;
    c.recv_until(is_type("subscribed")).await;
    let throttled = collect(&mut c, "depth:BTCUSDT:5", Duration::from_secs(2)).await;
    assert!(
        (1..=4).contains(&throttled.len()),
        "throttled now: {}",
        throttled.len()
    );
    // A plain name again changes nothing: still throttled.
    c.subscribe(&["depth:BTCUSDT:5"]).await;
    c.recv_until(is_type("subscribed")).await;
    let still = collect(&mut c, "depth:BTCUSDT:5", Duration::from_secs(2)).await;
    assert!(still.len() <= 4, "still throttled: {}", still.len());
    // An object with history on a held klines channel sends a history again.
    c.send(json!({"type":"subscribe","channels":[{"channel":"klines:BTCUSDT:1s","history":5}]}))
        .await;
    c.recv_until(is_type("history")).await;
    c.send(json!({"type":"subscribe","channels":[{"channel":"klines:BTCUSDT:1s","history":3}]}))
        .await;
    let again = c.recv_until(is_type("history")).await;
    assert_eq!(again["data"].as_array().unwrap().len(), 3);
    let stats = relay.stats().await;
    assert_eq!(stats["totalSubscriptions"], 2, "no double count");
}

#[tokio::test]
async fn klines_resume_with_the_candles_that_closed_then_the_forming_one() {
    let (_sim, relay) = start().await;
    let mut keeper = Client::connect(&relay).await;
    keeper.subscribe(&["klines:BTCUSDT:1s"]).await;
    let ack = keeper.recv_until(is_type("subscribed")).await;
    let seen = collect(
        &mut keeper,
        "klines:BTCUSDT:1s",
        Duration::from_millis(1500),
    )
    .await;
    let since = seen.last().unwrap()["seq"].as_u64().unwrap();
    // Three more seconds of candles while the other client is away.
    let during = collect(&mut keeper, "klines:BTCUSDT:1s", Duration::from_secs(3)).await;
    let closed: Vec<i64> = during
        .iter()
        .filter(|m| m["data"]["isFinal"] == true)
        .map(|m| m["data"]["time"].as_i64().unwrap())
        .collect();
    assert!(closed.len() >= 2);
    let mut back = Client::connect(&relay).await;
    back.send(json!({"type":"subscribe","channels":[{"channel":"klines:BTCUSDT:1s","since":{"epoch":ack["epoch"],"seq":since}}]}))
        .await;
    let resumed = back.recv_until(is_type("subscribed")).await;
    assert_eq!(resumed["recovered"], true);
    let replay = collect(&mut back, "klines:BTCUSDT:1s", Duration::from_millis(300)).await;
    let finals: Vec<i64> = replay
        .iter()
        .take_while(|m| m["data"]["isFinal"] == true)
        .map(|m| m["data"]["time"].as_i64().unwrap())
        .collect();
    for t in &closed {
        assert!(finals.contains(t), "final {t} replayed: {finals:?}");
    }
    let forming = &replay[finals.len()];
    assert_eq!(forming["data"]["isFinal"], false, "then the forming one");
    assert!(forming["data"]["time"].as_i64().unwrap() > *finals.last().unwrap());
}
