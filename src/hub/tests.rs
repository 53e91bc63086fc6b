//! The hub on its own: a fake [`FeedSource`] records what the hub asks of it, clients are
//! in-process (their frames queue), and tokio's paused clock drives the delayed release.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::decimal::Dec;
use crate::events::{Feed, Trade, TradeId};

/// A source whose answers the test sets, recording every call.
#[derive(Default)]
struct FakeSource {
    check: Mutex<Option<Check>>,
    calls: Mutex<Vec<String>>,
}

impl FakeSource {
    fn answer(&self, check: Check) {
        *self.check.lock().unwrap() = Some(check);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl FeedSource for FakeSource {
    fn check(&self, _: &FeedKey) -> Check {
        self.check.lock().unwrap().clone().unwrap_or(Check::Known)
    }

    fn want(&self, key: &FeedKey) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("want {}", key.symbol));
    }

    fn unwant(&self, key: &FeedKey) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unwant {}", key.symbol));
    }

    fn reachable(&self, _: ExchangeId) -> bool {
        true
    }
}

const CLOSE_DELAY: Duration = Duration::from_millis(3000);

fn hub() -> (Arc<Hub>, Arc<FakeSource>) {
    let mut config = Config::default();
    config.streams.close_delay_ms = CLOSE_DELAY.as_millis() as u64;
    let source = Arc::new(FakeSource::default());
    let hub = Hub::new(
        &config,
        Arc::new(Stats::default()),
        CancellationToken::new(),
        source.clone(),
    );
    (hub, source)
}

fn held(hub: &Hub, name: &str) -> Held {
    let channel: Channel = name.parse().unwrap();
    Held {
        name: Arc::from(name),
        topic: hub.topic_for(&channel),
        channel,
        throttle: None,
    }
}

/// The JSON messages queued for an in-process client, in order.
fn messages(client: &Client) -> Vec<Value> {
    client
        .outbox
        .take_queued()
        .iter()
        .filter_map(|w| {
            let b = w.bytes();
            let header = match b.get(1).map(|l| l & 0x7f) {
                Some(126) => 4,
                Some(127) => 10,
                _ => 2,
            };
            serde_json::from_slice(b.get(header..)?).ok()
        })
        .collect()
}

fn trade(id: u64) -> MarketEvent {
    MarketEvent::Trade(Trade {
        trade_id: TradeId::Number(id),
        price: Dec::from_int(100),
        quantity: Dec::from_int(1),
        side: crate::events::Side::Buy,
        time_ms: 1,
    })
}

fn feed(symbol: &str, f: Feed) -> FeedKey {
    FeedKey {
        exchange: ExchangeId::Binance,
        symbol: crate::domain::Symbol::parse(symbol).unwrap(),
        feed: f,
    }
}

/// Lets the spawned release tasks run at the (paused) current time.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscribe_storm_costs_nothing_upstream_and_leaves_nothing_behind() {
    let (hub, source) = hub();
    let client = hub.register_client(None);
    for _ in 0..100 {
        assert_eq!(
            hub.attach(
                &client,
                held(&hub, "trades:BTCUSDT"),
                Join::default(),
                &None
            ),
            Attached::Live
        );
        assert!(hub.detach(&client, &held(&hub, "trades:BTCUSDT")));
    }
    settle().await;
    assert_eq!(
        source.calls(),
        ["want BTCUSDT"],
        "one upstream request for 100 subscribes"
    );
    tokio::time::advance(CLOSE_DELAY + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(source.calls(), ["want BTCUSDT", "unwant BTCUSDT"]);
    assert!(hub.topics_read().is_empty(), "no topic left behind");
    assert_eq!(hub.snapshot().total_subscriptions, 0);
}

#[tokio::test(start_paused = true)]
async fn a_topic_lingers_for_close_delay_and_a_return_within_it_keeps_the_stream() {
    let (hub, source) = hub();
    let a = hub.register_client(None);
    hub.attach(&a, held(&hub, "price:BTCUSDT"), Join::default(), &None);
    hub.detach(&a, &held(&hub, "price:BTCUSDT"));
    settle().await; // the release task starts its delay now
    tokio::time::advance(CLOSE_DELAY / 2).await;
    settle().await;
    // Back before the delay ran out (through another channel of the same feed).
    let b = hub.register_client(None);
    hub.attach(&b, held(&hub, "ticker:BTCUSDT"), Join::default(), &None);
    tokio::time::advance(CLOSE_DELAY * 2).await;
    settle().await;
    assert_eq!(
        source.calls(),
        ["want BTCUSDT"],
        "the first release was stale"
    );
    assert_eq!(hub.snapshot().active_channels, ["ticker:BTCUSDT"]);
    // Unused again: released once, after the delay.
    hub.unregister_client(&b);
    settle().await;
    tokio::time::advance(CLOSE_DELAY - Duration::from_millis(10)).await;
    settle().await;
    assert_eq!(source.calls().len(), 1, "not before close_delay");
    tokio::time::advance(Duration::from_millis(20)).await;
    settle().await;
    assert_eq!(source.calls(), ["want BTCUSDT", "unwant BTCUSDT"]);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_subscribe_is_acknowledged_and_counts_once() {
    let (hub, source) = hub();
    let c = hub.register_client(None);
    hub.attach(
        &c,
        held(&hub, "trades:BTCUSDT"),
        Join::default(),
        &Some(serde_json::json!(1)),
    );
    hub.attach(
        &c,
        held(&hub, "trades:BTCUSDT"),
        Join::default(),
        &Some(serde_json::json!(2)),
    );
    let acks: Vec<Value> = messages(&c).into_iter().map(|m| m["id"].clone()).collect();
    assert_eq!(acks, [serde_json::json!(1), serde_json::json!(2)]);
    assert_eq!(c.subscription_count(), 1);
    assert_eq!(hub.snapshot().total_subscriptions, 1);
    assert!(hub.detach(&c, &held(&hub, "trades:BTCUSDT")));
    assert!(
        !hub.detach(&c, &held(&hub, "trades:BTCUSDT")),
        "only one to drop"
    );
    assert_eq!(source.calls(), ["want BTCUSDT"]);
}

#[tokio::test(start_paused = true)]
async fn pending_subscriptions_go_live_or_are_refused_when_instruments_load() {
    let (hub, source) = hub();
    source.answer(Check::Pending);
    let c = hub.register_client(None);
    assert_eq!(
        hub.attach(&c, held(&hub, "trades:BTCUSDT"), Join::default(), &None),
        Attached::Unavailable
    );
    assert_eq!(
        hub.attach(&c, held(&hub, "trades:NOPEUSDT"), Join::default(), &None),
        Attached::Unavailable
    );
    assert!(
        source.calls().is_empty(),
        "nothing asked of an exchange not known yet"
    );
    messages(&c);
    // The list arrives: BTCUSDT exists, NOPEUSDT does not.
    source.answer(Check::Known);
    hub.instruments_loaded(ExchangeId::Kraken); // another exchange: nothing happens
    assert!(source.calls().is_empty());
    hub.instruments_loaded(ExchangeId::Binance);
    let mut calls = source.calls();
    calls.sort();
    assert_eq!(calls, ["want BTCUSDT", "want NOPEUSDT"]);
    source.answer(Check::Refused(
        ErrorCode::UnknownSymbol,
        "Unknown symbol".into(),
    ));
    hub.refused(
        &feed("NOPEUSDT", Feed::Trades),
        ErrorCode::UnknownSymbol,
        "Unknown symbol NOPEUSDT",
    );
    let told: Vec<(String, String)> = messages(&c)
        .iter()
        .map(|m| {
            (
                m["type"].as_str().unwrap().to_string(),
                m["channel"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            ("error".to_string(), "trades:NOPEUSDT".to_string()),
            ("unsubscribed".to_string(), "trades:NOPEUSDT".to_string())
        ]
    );
    assert_eq!(c.subscription_count(), 1);
    settle().await;
    tokio::time::advance(CLOSE_DELAY * 2).await;
    settle().await;
    assert_eq!(
        source.calls().last().map(String::as_str),
        Some("unwant NOPEUSDT")
    );
}

#[tokio::test(start_paused = true)]
async fn events_reach_every_subscriber_in_order_and_unwanted_feeds_go_nowhere() {
    let (hub, _source) = hub();
    let a = hub.register_client(None);
    let b = hub.register_client(None);
    hub.attach(&a, held(&hub, "trades:BTCUSDT"), Join::default(), &None);
    hub.attach(&b, held(&hub, "trades:BTCUSDT"), Join::default(), &None);
    messages(&a);
    messages(&b);
    hub.events(
        &feed("BTCUSDT", Feed::Trades),
        vec![trade(1), trade(2), trade(3)],
    );
    for c in [&a, &b] {
        let ids: Vec<u64> = messages(c)
            .iter()
            .map(|m| m["data"]["tradeId"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }
    // A feed nobody subscribed to is dropped without effect.
    hub.events(&feed("ETHUSDT", Feed::Trades), vec![trade(4)]);
    assert_eq!(hub.stats.counters().messages_out, 2 + 6);
}

fn book(best: i64) -> MarketEvent {
    MarketEvent::Book(crate::events::Book {
        bids: vec![[Dec::from_int(best), Dec::from_int(1)]],
        asks: vec![[Dec::from_int(best + 1), Dec::from_int(1)]],
        time_ms: 1,
    })
}

fn best_bids(msgs: &[Value]) -> Vec<i64> {
    msgs.iter()
        .filter(|m| m["type"] == "depth")
        .map(|m| m["data"]["bids"][0][0].as_i64().unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_throttled_subscriber_gets_the_leading_value_then_the_newest_at_each_interval_end() {
    let (hub, _) = hub();
    let fast = hub.register_client(None);
    let slow = hub.register_client(None);
    hub.attach(&fast, held(&hub, "depth:BTCUSDT:5"), Join::default(), &None);
    let mut throttled = held(&hub, "depth:BTCUSDT:5");
    throttled.throttle = Some(Duration::from_millis(1000));
    hub.attach(&slow, throttled, Join::default(), &None);
    messages(&fast);
    messages(&slow);
    let key = feed("BTCUSDT", Feed::Book);
    // Ten updates 100 ms apart: the first goes at once, the others wait for the interval.
    // (The unthrottled client is read after each: unread, its queue would conflate them.)
    let mut seen_fast = Vec::new();
    let mut got = Vec::new();
    for i in 0..10 {
        hub.events(&key, vec![book(100 + i)]);
        seen_fast.extend(best_bids(&messages(&fast)));
        got.extend(messages(&slow));
        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
    }
    assert_eq!(seen_fast, (100..110).collect::<Vec<_>>());
    // At 1 s the interval ends: the newest value (109) goes, nothing in between.
    tokio::time::advance(Duration::from_millis(10)).await;
    settle().await;
    got.extend(messages(&slow));
    assert_eq!(
        best_bids(&got),
        vec![100, 109],
        "leading edge, then the trailing newest"
    );
    // The same frames as the unthrottled subscriber's: seq 1 and 10 of the channel.
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 10]);
    // Quiet afterwards: nothing more is sent, and the next update waits for the interval.
    tokio::time::advance(Duration::from_secs(3)).await;
    settle().await;
    assert!(messages(&slow).is_empty());
    hub.events(&key, vec![book(200)]);
    settle().await;
    assert_eq!(
        best_bids(&messages(&slow)),
        vec![200],
        "a quiet channel's next value goes at once"
    );
}

#[tokio::test(start_paused = true)]
async fn the_recovery_window_forgets_by_count_and_by_age() {
    let mut config = Config::default();
    config.recovery.window_messages = 3;
    config.recovery.window_secs = 10;
    let source = Arc::new(FakeSource::default());
    let hub = Hub::new(
        &config,
        Arc::new(Stats::default()),
        CancellationToken::new(),
        source,
    );
    let keeper = hub.register_client(None);
    hub.attach(
        &keeper,
        held(&hub, "trades:BTCUSDT"),
        Join::default(),
        &None,
    );
    let ack = messages(&keeper).remove(0);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let key = feed("BTCUSDT", Feed::Trades);
    for id in 1..=5 {
        hub.events(&key, vec![trade(id)]);
    }
    let resume = |seq: u64| Join {
        since: Some(Since {
            epoch: epoch.clone(),
            seq,
        }),
        ..Join::default()
    };
    // Seqs 3, 4, 5 are held: a resume after 2 gets them all.
    let c = hub.register_client(None);
    hub.attach(&c, held(&hub, "trades:BTCUSDT"), resume(2), &None);
    let got = messages(&c);
    assert_eq!(got[0]["recovered"], true);
    let seqs: Vec<u64> = got[1..]
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    // After 1 it cannot: seq 2 is gone.
    let d = hub.register_client(None);
    hub.attach(&d, held(&hub, "trades:BTCUSDT"), resume(1), &None);
    let got = messages(&d);
    assert_eq!(got[0]["recovered"], false);
    assert_eq!(got[1]["data"]["reason"], "recovery_window");
    // Eleven seconds on, nothing is young enough to keep.
    tokio::time::advance(Duration::from_secs(11)).await;
    let e = hub.register_client(None);
    hub.attach(&e, held(&hub, "trades:BTCUSDT"), resume(4), &None);
    let got = messages(&e);
    assert_eq!(got[0]["recovered"], false);
    assert_eq!(got.len(), 2, "the gap, and nothing replayed: {got:?}");
    assert_eq!(hub.windows.messages.load(Ordering::Relaxed), 0);
}
