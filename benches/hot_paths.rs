//! The hot pieces of the data path, in isolation: `cargo bench`.
//! - normalise: one Binance frame (raw JSON) into a typed event;
//! - render: one event into the JSON a client receives (once per channel, not per client);
//! - fan-out: one event to 1,000 in-process subscribers' queues: the relay's own share of a
//!   fan-out (lookup, render, lock, per-client bookkeeping); with real clients each subscriber
//!   also costs one `send`, which `loadgen` measures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use exchange_relay::config::Config;
use exchange_relay::domain::{Channel, ExchangeId, Symbol};
use exchange_relay::events::{render, Feed, FeedKey, MarketEvent, Side, Trade, TradeId};
use exchange_relay::exchange::binance;
use exchange_relay::hub::{Check, FeedSink, FeedSource, Held, Hub, Join};
use exchange_relay::stats::Stats;

const TRADE: &str = r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1672515782136,"s":"BTCUSDT","t":12345,"p":"97523.45000000","q":"0.50000000","T":1672515782136,"m":true,"M":true}}"#;
const TICKER: &str = include_str!("../fixtures/binance/frames/ticker.json");
const DEPTH: &str = include_str!("../fixtures/binance/frames/depth20.json");

fn normalise(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalise_binance");
    for (name, frame) in [("trade", TRADE), ("ticker", TICKER), ("depth20", DEPTH)] {
        let mut out = Vec::with_capacity(1);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                binance::decode(std::hint::black_box(frame), &mut out).unwrap();
            })
        });
    }
    g.finish();
}

fn key() -> FeedKey {
    FeedKey {
        exchange: ExchangeId::Binance,
        symbol: Symbol::parse("BTCUSDT").unwrap(),
        feed: Feed::Trades,
    }
}

fn trade_event() -> MarketEvent {
    MarketEvent::Trade(Trade {
        trade_id: TradeId::Number(12345),
        price: "97523.45".parse().unwrap_or_default(),
        quantity: "0.5".parse().unwrap_or_default(),
        side: Side::Sell,
        time_ms: 1_672_515_782_136,
    })
}

fn serialise(c: &mut Criterion) {
    let channel: Channel = "trades:BTCUSDT".parse().unwrap();
    let event = trade_event();
    let k = key();
    c.bench_function("render_trade", |b| {
        b.iter(|| {
            render(
                &k,
                &channel,
                "trades:BTCUSDT",
                std::hint::black_box(&event),
                1,
                "2024-12-06T12:00:00.000Z",
            )
        })
    });
}

/// A source that can serve every market and does nothing: the bench feeds the hub itself.
struct Everything;

impl FeedSource for Everything {
    fn check(&self, _: &FeedKey) -> Check {
        Check::Known
    }
    fn want(&self, _: &FeedKey) {}
    fn unwant(&self, _: &FeedKey) {}
    fn reachable(&self, _: ExchangeId) -> bool {
        true
    }
}

fn fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let config = Config::default();
    let hub = Hub::new(
        &config,
        Arc::new(Stats::default()),
        tokio_util::sync::CancellationToken::new(),
        Arc::new(Everything),
    );
    let channel: Channel = "trades:BTCUSDT".parse().unwrap();
    let clients: Vec<_> = (0..1000)
        .map(|_| {
            let client = hub.register_client(None);
            let held = Held {
                name: Arc::from("trades:BTCUSDT"),
                topic: hub.topic_for(&channel),
                channel: channel.clone(),
                throttle: None,
            };
            hub.attach(&client, held, Join::default(), &None);
            client.outbox.take_queued();
            client
        })
        .collect();
    let k = key();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("trade_to_1000_subscribers", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Queues hold 1,024 reliable frames: drain, untimed, as the writers would.
                let n = left.min(500);
                let start = Instant::now();
                for _ in 0..n {
                    hub.events(&k, vec![trade_event()]);
                }
                spent += start.elapsed();
                for c in &clients {
                    c.outbox.take_queued();
                }
                left -= n;
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, normalise, serialise, fanout);
criterion_main!(benches);
