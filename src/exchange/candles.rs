//! Candles built from trades, for intervals an exchange has no native stream for.
//!
//! Exact by construction: trades are bucketed by the exchange's trade time (never the receive
//! time), deduplicated by trade id (snapshots re-send trades), and each candle is final exactly
//! once, when a trade of a later bucket arrives or [`GRACE_MS`] after its end, whichever is
//! first; a trade for a finalised bucket is dropped rather than reopening it. A bucket without
//! trades produces no candle (Coinbase's and Kraken's own candles behave the same).
//!
//! The forming candle is sent at most once per session tick (every trade would be dozens of
//! messages a second on a busy market); final candles are sent at once.
//!
//! The candle forming when a subscription starts is seeded exactly ([`Seed`]): the exchange's
//! closed REST candles from the bucket's start to the start of the current minute, then the
//! exchange's own trades, with their ids, from there on, so that the live trades join the seed
//! by id, not by time. What the REST candles do not state (Coinbase's rows have no trade count;
//! neither exchange's a quote volume) is unknown for that first candle: `None`, sent as
//! `null`, never an estimate.
//!
//! Amounts are exact decimals: volume is the exact sum of the trades' sizes, quote volume the
//! exact sum of price · size.

use std::collections::{HashMap, HashSet, VecDeque};

use super::Effect;
use crate::decimal::Dec;
use crate::domain::{bucket, Interval};
use crate::events::{Kline, MarketEvent, Trade, TradeId};

/// How long after its end a candle without later trades waits before it is final: absorbs
/// trade batching (Coinbase sends trades every 250 ms) and network delay.
pub const GRACE_MS: i64 = 2_000;
/// Trade ids remembered for deduplication.
const RECENT_IDS: usize = 10_000;
/// Trades held while the REST seed is on its way.
const MAX_PENDING: usize = 100_000;

/// What the candle forming at a moment is seeded from: closed REST candles covering the
/// bucket from its start to `trades_from`, then every trade from `trades_from` on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Seed {
    pub rows: Vec<SeedCandle>,
    pub trades: Vec<Trade>,
    pub trades_from: i64,
    /// Every trade since `trades_from` is in `trades` (the pages did not run out).
    pub complete: bool,
}

/// One REST candle, as a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedCandle {
    pub open_time: i64,
    pub open: Dec,
    pub high: Dec,
    pub low: Dec,
    pub close: Dec,
    pub volume: Dec,
    pub quote_volume: Option<Dec>,
    pub trades: Option<u64>,
}

#[derive(Debug, Clone)]
struct Building {
    open_time: i64,
    close_time: i64,
    open: Dec,
    high: Dec,
    low: Dec,
    close: Dec,
    /// (time, id) of the trade that set `close`: the latest one wins, whatever the order.
    close_key: (i64, u64),
    volume: Dec,
    /// `None` once unknown (a seed without it, or a sum beyond `Dec`'s range).
    quote_volume: Option<Dec>,
    /// `None` when the seed did not say how many trades it covers.
    trades: Option<u64>,
    last_time: i64,
}

pub struct TradeCandles {
    interval: Interval,
    forming: Option<Building>,
    /// Open time of the newest final candle.
    last_final: Option<i64>,
    seen: HashSet<TradeId>,
    seen_order: VecDeque<TradeId>,
    /// Trades waiting for the seed; `None` once seeded (or when no seed is wanted).
    pending: Option<Vec<Trade>>,
    /// Trades of the seeded bucket before this time are in the seed's candles.
    seeded_until: Option<(i64, i64)>,
    /// Trades changed the forming candle since it was last sent. Forming candles go out at
    /// most once a tick (250 ms): a busy market trades dozens of times a second, and a chart
    /// needs the candle, not every step of it. Final candles go out at once.
    changed: bool,
}

impl TradeCandles {
    /// A builder that waits for [`TradeCandles::seed`] (or [`TradeCandles::seed_failed`]).
    pub fn seeded(interval: Interval) -> TradeCandles {
        let mut c = TradeCandles::unseeded(interval);
        c.pending = Some(Vec::new());
        c
    }

    /// A builder that starts from the first trade (no REST candles at this interval).
    pub fn unseeded(interval: Interval) -> TradeCandles {
        TradeCandles {
            interval,
            forming: None,
            last_final: None,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            pending: None,
            seeded_until: None,
            changed: false,
        }
    }

    /// Seeds the forming candle (the bucket of `asked_at_ms`) from `seed`, then replays the
    /// trades that arrived meanwhile (those in the seed already are known by id).
    pub fn seed(&mut self, seed: &Seed, asked_at_ms: i64, out: &mut Vec<Kline>) {
        let (start, end) = bucket(self.interval, asked_at_ms);
        let from = seed.trades_from.max(start);
        let mut rows: Vec<&SeedCandle> = seed
            .rows
            .iter()
            .filter(|r| r.open_time >= start && r.open_time < from)
            .collect();
        rows.sort_by_key(|r| r.open_time);
        rows.dedup_by_key(|r| r.open_time);
        let mut trades: Vec<&Trade> = seed
            .trades
            .iter()
            .filter(|t| t.time_ms >= from && t.time_ms <= end)
            .collect();
        trades.sort_by_key(|t| (t.time_ms, t.trade_id.order()));
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            let sum = |f: fn(&SeedCandle) -> Option<Dec>| {
                rows.iter()
                    .try_fold(Dec::ZERO, |acc, r| acc.checked_add(f(r)?))
            };
            self.forming = Some(Building {
                open_time: start,
                close_time: end,
                open: first.open,
                high: rows.iter().map(|r| r.high).max().unwrap_or(first.high),
                low: rows.iter().map(|r| r.low).min().unwrap_or(first.low),
                close: last.close,
                close_key: (from - 1, 0),
                volume: sum(|r| Some(r.volume)).unwrap_or(Dec::ZERO),
                quote_volume: sum(|r| r.quote_volume),
                trades: rows.iter().map(|r| r.trades).sum(),
                last_time: from - 1,
            });
        }
        self.seeded_until = Some((start, from));
        for t in trades {
            if self.remember(&t.trade_id) {
                self.apply(t, start, end);
            }
        }
        if !seed.complete {
            // Some trades of the bucket could not be had: its count is not known.
            if let Some(b) = &mut self.forming {
                b.trades = None;
            }
        }
        self.emit_forming(out);
        self.changed = false;
        self.replay(out);
    }

    /// The REST seed could not be had: start from the trades alone.
    pub fn seed_failed(&mut self, out: &mut Vec<Kline>) {
        self.replay(out);
    }

    fn replay(&mut self, out: &mut Vec<Kline>) {
        if let Some(pending) = self.pending.take() {
            for t in &pending {
                self.on_trade(t, out);
            }
        }
    }

    /// Applies one trade; pushes a final candle (when this trade opens a later bucket) and the
    /// forming one.
    pub fn on_trade(&mut self, t: &Trade, out: &mut Vec<Kline>) {
        if let Some(pending) = &mut self.pending {
            if pending.len() < MAX_PENDING {
                pending.push(t.clone());
            }
            return;
        }
        if !self.remember(&t.trade_id) {
            return;
        }
        let (start, end) = bucket(self.interval, t.time_ms);
        if self.last_final.is_some_and(|f| start <= f) {
            return; // late for a final candle: never reopened
        }
        if let Some((seeded_start, until)) = self.seeded_until {
            if start == seeded_start && t.time_ms < until {
                return; // counted in the seed's candles
            }
        }
        match &self.forming {
            Some(f) if start > f.open_time => self.finalize(out),
            Some(f) if start < f.open_time => return,
            _ => {}
        }
        self.apply(t, start, end);
        // The forming candle goes out on the next tick, once, however many trades changed it.
        self.changed = true;
    }

    /// Adds a trade of the bucket `[start, end]` to the forming candle.
    fn apply(&mut self, t: &Trade, start: i64, end: i64) {
        let key = (t.time_ms, t.trade_id.order());
        let b = self.forming.get_or_insert(Building {
            open_time: start,
            close_time: end,
            open: t.price,
            high: t.price,
            low: t.price,
            close: t.price,
            close_key: key,
            volume: Dec::ZERO,
            quote_volume: Some(Dec::ZERO),
            trades: Some(0),
            last_time: t.time_ms,
        });
        b.high = b.high.max(t.price);
        b.low = b.low.min(t.price);
        if key >= b.close_key {
            b.close = t.price;
            b.close_key = key;
        }
        b.volume = b.volume.checked_add(t.quantity).unwrap_or(b.volume);
        b.quote_volume = b
            .quote_volume
            .and_then(|q| q.checked_add(t.quantity.checked_mul(t.price)?));
        b.trades = b.trades.map(|n| n + 1);
        b.last_time = b.last_time.max(t.time_ms);
    }

    /// Sends the forming candle if trades changed it since the last tick, and finalises a
    /// candle whose bucket ended more than [`GRACE_MS`] ago.
    pub fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Kline>) {
        if self
            .forming
            .as_ref()
            .is_some_and(|f| now_ms > f.close_time + GRACE_MS)
        {
            self.finalize(out);
        } else if self.changed {
            self.changed = false;
            self.emit_forming(out);
        }
    }

    fn remember(&mut self, id: &TradeId) -> bool {
        if !self.seen.insert(id.clone()) {
            return false;
        }
        self.seen_order.push_back(id.clone());
        if self.seen_order.len() > RECENT_IDS {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    fn finalize(&mut self, out: &mut Vec<Kline>) {
        self.changed = false;
        if let Some(b) = self.forming.take() {
            self.last_final = Some(b.open_time);
            out.push(self.kline(&b, true));
        }
    }

    fn emit_forming(&self, out: &mut Vec<Kline>) {
        if let Some(b) = &self.forming {
            out.push(self.kline(b, false));
        }
    }

    fn kline(&self, b: &Building, is_final: bool) -> Kline {
        Kline {
            interval: self.interval,
            open_time: b.open_time,
            close_time: b.close_time,
            open: b.open,
            high: b.high,
            low: b.low,
            close: b.close,
            volume: b.volume,
            quote_volume: b.quote_volume,
            trades: b.trades,
            is_final,
            time_ms: b.last_time,
        }
    }
}

/// The trade-built candle streams of one upstream connection, and their REST seeds in
/// flight: the plumbing every exchange that builds candles shares. The adapter says which
/// stream to build at which interval and where its seed comes from; this routes trades,
/// ticks and seed replies to the builders and turns their candles into events.
#[derive(Default)]
pub struct DerivedCandles {
    /// Stream name → builder.
    builders: HashMap<String, TradeCandles>,
    /// Seed requests in flight: fetch tag → (stream, asked at ms).
    seeds: HashMap<u64, (String, i64)>,
    next_tag: u64,
}

impl DerivedCandles {
    /// Starts building `stream` at `interval`, its forming candle seeded exactly from the
    /// exchange's REST API ([`Effect::Seed`], answered through [`DerivedCandles::on_seed`]).
    pub fn add(&mut self, stream: &str, interval: Interval, now_ms: i64, out: &mut Vec<Effect>) {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.seeds.insert(tag, (stream.to_string(), now_ms));
        out.push(Effect::Seed {
            tag,
            stream: stream.to_string(),
            interval,
            asked_at_ms: now_ms,
        });
        self.builders
            .insert(stream.to_string(), TradeCandles::seeded(interval));
    }

    pub fn remove(&mut self, stream: &str) {
        self.builders.remove(stream);
    }

    /// A trade of `market`: every builder whose stream name ends with `:<market>` takes it.
    pub fn on_trade(&mut self, market: &str, trade: &Trade, out: &mut Vec<Effect>) {
        let suffix = format!(":{market}");
        for (stream, builder) in self
            .builders
            .iter_mut()
            .filter(|(n, _)| n.ends_with(&suffix))
        {
            let mut klines = Vec::new();
            builder.on_trade(trade, &mut klines);
            push_klines(stream, klines, out);
        }
    }

    pub fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        for (stream, builder) in &mut self.builders {
            let mut klines = Vec::new();
            builder.on_tick(now_ms, &mut klines);
            push_klines(stream, klines, out);
        }
    }

    /// The (parsed) answer to a seed request: the builder starts from it, or from its trades
    /// alone when the seed could not be had.
    pub fn on_seed(
        &mut self,
        exchange: &str,
        tag: u64,
        seed: Result<Seed, String>,
        out: &mut Vec<Effect>,
    ) {
        let Some((stream, asked_at)) = self.seeds.remove(&tag) else {
            return;
        };
        let Some(builder) = self.builders.get_mut(&stream) else {
            return;
        };
        let mut klines = Vec::new();
        match seed {
            Ok(seed) => builder.seed(&seed, asked_at, &mut klines),
            Err(error) => {
                tracing::warn!(%exchange, %stream, %error, "candle seed failed; building from trades alone");
                builder.seed_failed(&mut klines);
            }
        }
        push_klines(&stream, klines, out);
    }
}

/// Candles of `stream` as events.
pub fn push_klines(stream: &str, klines: Vec<Kline>, out: &mut Vec<Effect>) {
    for k in klines {
        out.push(Effect::Event {
            stream: stream.to_string(),
            event: MarketEvent::Kline(k),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Side;

    fn d(s: &str) -> Dec {
        s.parse().unwrap()
    }

    fn trade(id: u64, t: i64, price: f64, qty: f64) -> Trade {
        Trade {
            trade_id: TradeId::Number(id),
            price: Dec::from_f64(price).unwrap(),
            quantity: Dec::from_f64(qty).unwrap(),
            side: Side::Buy,
            time_ms: t,
        }
    }

    #[test]
    fn candles_are_exact_and_final_once() {
        let mut c = TradeCandles::unseeded(Interval::S1);
        let mut out = Vec::new();
        c.on_trade(&trade(1, 1_000, 10.0, 1.0), &mut out);
        c.on_trade(&trade(2, 1_500, 12.0, 2.0), &mut out);
        c.on_trade(&trade(2, 1_500, 12.0, 2.0), &mut out); // duplicate
        c.on_trade(&trade(3, 1_900, 9.0, 1.0), &mut out);
        assert!(out.is_empty(), "forming candles wait for the tick");
        c.on_tick(1_950, &mut out);
        assert_eq!(out.len(), 1, "one forming update for three trades");
        assert_eq!((out[0].trades, out[0].is_final), (Some(3), false));
        c.on_tick(1_960, &mut out);
        assert_eq!(out.len(), 1, "nothing changed, nothing sent");
        out.clear();
        c.on_trade(&trade(4, 2_100, 11.0, 1.0), &mut out);
        assert_eq!(out.len(), 1, "the final candle goes out at once");
        let fin = &out[0];
        assert!(fin.is_final);
        assert_eq!((fin.open_time, fin.close_time), (1_000, 1_999));
        assert_eq!(
            (fin.open, fin.high, fin.low, fin.close),
            (d("10"), d("12"), d("9"), d("9"))
        );
        assert_eq!((fin.volume, fin.trades), (d("4"), Some(3)));
        assert_eq!(fin.quote_volume, Some(d("43")));
        c.on_tick(2_200, &mut out);
        assert!(!out[1].is_final && out[1].open_time == 2_000);
        // A late trade for the final candle does not reopen it.
        out.clear();
        c.on_trade(&trade(5, 1_950, 100.0, 1.0), &mut out);
        assert!(out.is_empty());
        // The clock finalises a candle nobody trades after.
        c.on_tick(2_999 + GRACE_MS, &mut out);
        assert!(out.is_empty());
        c.on_tick(3_000 + GRACE_MS, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_final && out[0].open_time == 2_000);
        c.on_tick(10_000, &mut out);
        assert_eq!(out.len(), 1, "final exactly once");
    }

    #[test]
    fn close_is_the_latest_trade_whatever_the_arrival_order() {
        let mut c = TradeCandles::unseeded(Interval::M1);
        let mut out = Vec::new();
        c.on_trade(&trade(2, 5_000, 20.0, 1.0), &mut out);
        c.on_trade(&trade(1, 4_000, 10.0, 1.0), &mut out);
        c.on_tick(5_000, &mut out);
        assert_eq!(out.last().unwrap().close, d("20"));
    }

    #[test]
    fn the_seed_covers_the_start_of_the_bucket() {
        let mut c = TradeCandles::seeded(Interval::M3);
        let mut out = Vec::new();
        // Trades arrive before the seed: held.
        c.on_trade(&trade(7, 130_000, 50.0, 1.0), &mut out);
        c.on_trade(&trade(8, 170_000, 55.0, 1.0), &mut out);
        assert!(out.is_empty());
        let rows = [
            SeedCandle {
                open_time: 0,
                open: d("40.0"),
                high: d("45.0"),
                low: d("39.0"),
                close: d("44.0"),
                volume: d("3.0"),
                quote_volume: None,
                trades: Some(3),
            },
            SeedCandle {
                open_time: 60_000,
                open: d("44.0"),
                high: d("60.0"),
                low: d("43.0"),
                close: d("48.0"),
                volume: d("2.0"),
                quote_volume: None,
                trades: Some(2),
            },
            SeedCandle {
                open_time: 120_000,
                open: d("48.0"),
                high: d("49.0"),
                low: d("47.0"),
                close: d("49.0"),
                volume: d("1.0"),
                quote_volume: None,
                trades: Some(1),
            },
        ];
        // Asked at 150 s: closed minutes 0 and 1 from candles, the current minute from trades
        // (7 among them, so the live copy of 7 is not counted twice; 8 came after).
        let seed = Seed {
            rows: rows[..2].to_vec(),
            trades: vec![trade(6, 121_000, 47.0, 1.0), trade(7, 130_000, 50.0, 1.0)],
            trades_from: 120_000,
            complete: true,
        };
        c.seed(&seed, 150_000, &mut out);
        c.on_tick(170_000, &mut out);
        let last = out.last().unwrap();
        assert_eq!(
            (last.open_time, last.open, last.high, last.low),
            (0, d("40"), d("60"), d("39"))
        );
        assert_eq!(
            (last.close, last.volume, last.trades),
            (d("55"), d("8"), Some(8))
        );
        // The seed rows gave no quote volume: unknown, not estimated.
        assert_eq!(last.quote_volume, None);
    }
}
