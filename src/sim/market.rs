//! The simulated market every simulated exchange publishes: a seeded random walk producing
//! trades, a top-of-book around the walk, 24-hour statistics and candles for every interval,
//! all derived from the one trade tape so that each exchange's view is consistent.

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

pub use crate::domain::bucket;
use crate::domain::Interval;

/// One market of `fixtures/sim/markets.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct MarketSpec {
    pub base: String,
    pub quote: String,
    pub price: f64,
    pub tick: f64,
    pub lot: f64,
    pub trades_per_sec: f64,
    pub volatility: f64,
}

#[derive(Debug, Deserialize)]
struct MarketsFile {
    markets: Vec<MarketSpec>,
}

/// The markets shipped in `fixtures/sim/markets.json`.
pub fn default_specs() -> Vec<MarketSpec> {
    serde_json::from_str::<MarketsFile>(include_str!("../../fixtures/sim/markets.json"))
        .map(|f| f.markets)
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimTrade {
    pub id: u64,
    pub price: f64,
    pub qty: f64,
    /// The taker sold (Binance `m`: the buyer was the maker).
    pub taker_sold: bool,
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Candle {
    pub interval: Interval,
    pub open_time: i64,
    pub close_time: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    pub quote_volume: f64,
    pub trades: u64,
    pub first_id: u64,
    pub last_id: u64,
}

/// Rolling statistics since the simulation started (standing in for 24 hours).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats24 {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub last: f64,
    pub last_qty: f64,
    pub volume: f64,
    pub quote_volume: f64,
    pub count: u64,
    pub first_id: u64,
}

pub struct Market {
    pub spec: MarketSpec,
    /// Unified symbol, `BASEQUOTE`.
    pub symbol: String,
    mid: f64,
    rng: StdRng,
    next_id: u64,
    carry: f64,
    /// End of the previous step; the next step's trades come after it.
    last_step_ms: Option<i64>,
    pub stats: Stats24,
    /// Forming candle per interval.
    pub forming: BTreeMap<Interval, Candle>,
    /// Recently finalised candles per interval (newest last), for REST history.
    pub history: BTreeMap<Interval, VecDeque<Candle>>,
    /// The most recent trades, oldest first, for the REST trade endpoints (history and
    /// backfill); what is older is gone, as beyond a real exchange's reach.
    pub tape: VecDeque<SimTrade>,
    /// How many trades the tape keeps.
    pub tape_len: usize,
    /// How much faster than wall time the market's clock runs: trade rates are per wall
    /// second, whatever the clock.
    pub time_scale: f64,
    /// Top 20 levels each side, best first: `(price, qty)`.
    pub bids: Vec<(f64, f64)>,
    pub asks: Vec<(f64, f64)>,
}

/// Value of a book level, US dollars (real BTC/USD books: ~$5 to ~$300k, median ~$2k).
const BOOK_NOTIONAL: (f64, f64) = (5.0, 300_000.0);
/// Value of a trade, US dollars.
const TRADE_NOTIONAL: (f64, f64) = (5.0, 50_000.0);

/// Rough US-dollar value of one unit of a quote currency, to size orders by value.
fn quote_usd(quote: &str) -> f64 {
    match quote {
        "BTC" => 97_500.0,
        "ETH" => 3_650.0,
        _ => 1.0, // USD, USDT, USDC, EUR
    }
}

/// Finalised candles kept per interval.
const HISTORY: usize = 500;
/// Trades kept for the REST trade endpoints, unless a test asks for fewer.
const TAPE: usize = 50_000;
/// How long every simulated market has traded when its simulator starts.
pub const WARM_UP_MS: i64 = 10 * 60_000;
/// Levels per side: Kraken is subscribed at depth 25.
pub const BOOK_LEVELS: usize = 25;

impl Market {
    pub fn new(spec: MarketSpec, seed: u64) -> Market {
        let symbol = format!("{}{}", spec.base, spec.quote);
        let mut m = Market {
            mid: spec.price,
            rng: StdRng::seed_from_u64(seed),
            next_id: 1_000_000,
            carry: 0.0,
            last_step_ms: None,
            stats: Stats24 {
                open: spec.price,
                high: spec.price,
                low: spec.price,
                last: spec.price,
                last_qty: 0.0,
                volume: 0.0,
                quote_volume: 0.0,
                count: 0,
                first_id: 1_000_000,
            },
            forming: BTreeMap::new(),
            history: BTreeMap::new(),
            tape: VecDeque::new(),
            tape_len: TAPE,
            time_scale: 1.0,
            bids: Vec::new(),
            asks: Vec::new(),
            symbol,
            spec,
        };
        m.rebuild_book();
        m
    }

    fn round_tick(&self, p: f64) -> f64 {
        let t = self.spec.tick;
        ((p / t).round() * t * 1e10).round() / 1e10
    }

    /// A size worth between `lo` and `hi` US dollars, log-uniform (many small orders, a few
    /// large ones, as real books and tapes show), rounded to the lot. Sizes follow value, not
    /// the lot: Kraken's lot is 10⁻⁸ BTC, and lot multiples would be dust.
    fn size(&mut self, (lo, hi): (f64, f64)) -> f64 {
        let usd = (self.rng.random_range(lo.ln()..hi.ln())).exp();
        let price_usd = self.mid * quote_usd(&self.spec.quote);
        self.round_lot(usd / price_usd)
    }

    fn round_lot(&self, q: f64) -> f64 {
        let l = self.spec.lot;
        (((q / l).round().max(1.0)) * l * 1e10).round() / 1e10
    }

    /// Re-centres the book on the mid. Levels that survive keep their quantity most of the
    /// time, so a step changes a few levels, as on a real book, not all of them.
    fn rebuild_book(&mut self) {
        let tick = self.spec.tick;
        let best_bid = self.round_tick(self.mid - tick / 2.0);
        let best_ask = self.round_tick(best_bid + tick);
        let old_bids = std::mem::take(&mut self.bids);
        let old_asks = std::mem::take(&mut self.asks);
        // A surviving level keeps its quantity 80% of the time; otherwise a fresh lot multiple.
        let level = |old: &[(f64, f64)], price: f64, m: &mut Market| -> (f64, f64) {
            let kept = old.iter().find(|(p, _)| *p == price).map(|(_, q)| *q);
            match kept {
                Some(q) if m.rng.random_bool(0.8) => (price, q),
                _ => {
                    let qty = m.size(BOOK_NOTIONAL);
                    (price, qty)
                }
            }
        };
        let mut bids = Vec::with_capacity(BOOK_LEVELS);
        let mut asks = Vec::with_capacity(BOOK_LEVELS);
        for i in 0..BOOK_LEVELS {
            let pb = self.round_tick(best_bid - i as f64 * tick);
            let pa = self.round_tick(best_ask + i as f64 * tick);
            bids.push(level(&old_bids, pb, self));
            asks.push(level(&old_asks, pa, self));
        }
        self.bids = bids;
        self.asks = asks;
    }

    /// A market that has been trading for `span_ms` before `now_ms`: a tape and candles to
    /// serve over REST from the start, as a real exchange has.
    pub fn warmed(mut self, now_ms: i64, span_ms: i64, time_scale: f64) -> Market {
        self.time_scale = time_scale;
        let step = 1_000;
        let mut t = now_ms - span_ms;
        self.last_step_ms = Some(t - step);
        while t < now_ms {
            self.step(t, step as f64 / 1000.0);
            t += step;
        }
        self.step(now_ms, (now_ms - (t - step)) as f64 / 1000.0);
        self
    }

    /// Advances the market by `dt_s` seconds ending at `now_ms`: returns the trades made, and
    /// the candles that closed (each exactly once), oldest first.
    pub fn step(&mut self, now_ms: i64, dt_s: f64) -> (Vec<SimTrade>, Vec<Candle>) {
        let mut closed = Vec::new();
        // Trades are spread over (previous step, now], never back into a closed bucket.
        let from_ms = self.last_step_ms.unwrap_or(now_ms - 1).min(now_ms - 1);
        // The span actually covered, not the caller's idea of it: a simulator whose task was
        // held up still trades through every second (a quiet second would lose its candles).
        let dt_s = match self.last_step_ms {
            Some(_) => (now_ms - from_ms) as f64 / 1000.0 / self.time_scale.max(f64::MIN_POSITIVE),
            None => dt_s,
        };
        self.last_step_ms = Some(now_ms);
        self.carry += self.spec.trades_per_sec * dt_s * self.rng.random_range(0.5..1.5);
        let n = self.carry.floor() as usize;
        self.carry -= n as f64;
        let mut trades = Vec::with_capacity(n);
        for i in 0..n {
            // Sum of uniforms: a cheap, bounded stand-in for a normal move.
            let z: f64 = (0..4)
                .map(|_| self.rng.random_range(-1.0..1.0))
                .sum::<f64>()
                / 2.0;
            self.mid = (self.mid * (1.0 + self.spec.volatility * z)).max(self.spec.tick * 10.0);
            let taker_sold = self.rng.random_bool(0.5);
            let half = self.spec.tick / 2.0;
            let price = self.round_tick(if taker_sold {
                self.mid - half
            } else {
                self.mid + half
            });
            let qty = self.size(TRADE_NOTIONAL);
            // Trades within one step get increasing times inside the step.
            let span = (now_ms - from_ms) as f64;
            let time_ms = from_ms + 1 + ((i as f64 / n as f64) * (span - 1.0)) as i64;
            let t = SimTrade {
                id: self.next_id,
                price,
                qty,
                taker_sold,
                time_ms,
            };
            self.next_id += 1;
            self.apply(&t, &mut closed);
            self.tape.push_back(t.clone());
            while self.tape.len() > self.tape_len {
                self.tape.pop_front();
            }
            trades.push(t);
        }
        if n > 0 {
            self.rebuild_book();
        }
        closed.extend(self.close_candles(now_ms));
        (trades, closed)
    }

    fn close_candles(&mut self, now_ms: i64) -> Vec<Candle> {
        let mut closed = Vec::new();
        let done: Vec<Interval> = self
            .forming
            .iter()
            .filter(|(_, c)| c.close_time < now_ms)
            .map(|(iv, _)| *iv)
            .collect();
        for iv in done {
            if let Some(c) = self.forming.remove(&iv) {
                let h = self.history.entry(iv).or_default();
                h.push_back(c.clone());
                if h.len() > HISTORY {
                    h.pop_front();
                }
                closed.push(c);
            }
        }
        closed
    }

    fn apply(&mut self, t: &SimTrade, closed: &mut Vec<Candle>) {
        closed.extend(self.close_candles(t.time_ms));
        let s = &mut self.stats;
        s.last = t.price;
        s.last_qty = t.qty;
        s.high = s.high.max(t.price);
        s.low = s.low.min(t.price);
        s.volume += t.qty;
        s.quote_volume += t.qty * t.price;
        s.count += 1;
        for iv in Interval::ALL {
            let (start, end) = bucket(iv, t.time_ms);
            let c = self.forming.entry(iv).or_insert_with(|| Candle {
                interval: iv,
                open_time: start,
                close_time: end,
                open: t.price,
                high: t.price,
                low: t.price,
                close: t.price,
                volume: 0.0,
                quote_volume: 0.0,
                trades: 0,
                first_id: t.id,
                last_id: t.id,
            });
            c.high = c.high.max(t.price);
            c.low = c.low.min(t.price);
            c.close = t.price;
            c.volume += t.qty;
            c.quote_volume += t.qty * t.price;
            c.trades += 1;
            c.last_id = t.id;
        }
    }

    /// The newest `limit` trades, oldest first.
    pub fn latest_trades(&self, limit: usize) -> Vec<SimTrade> {
        let skip = self.tape.len().saturating_sub(limit);
        self.tape.iter().skip(skip).cloned().collect()
    }

    /// Up to `limit` trades from id `from` on, oldest first (from the oldest kept when `from`
    /// is older than the tape).
    pub fn trades_from_id(&self, from: u64, limit: usize) -> Vec<SimTrade> {
        self.tape
            .iter()
            .filter(|t| t.id >= from)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Forgets every trade made so far: what a REST backfill can no longer reach.
    pub fn forget_tape(&mut self) {
        self.tape.clear();
    }

    pub fn best_bid(&self) -> (f64, f64) {
        self.bids.first().copied().unwrap_or((self.mid, 0.0))
    }

    pub fn best_ask(&self) -> (f64, f64) {
        self.asks.first().copied().unwrap_or((self.mid, 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MarketSpec {
        MarketSpec {
            base: "BTC".into(),
            quote: "USDT".into(),
            price: 100.0,
            tick: 0.01,
            lot: 0.001,
            trades_per_sec: 50.0,
            volatility: 0.0001,
        }
    }

    #[test]
    fn candles_close_exactly_once_and_agree_with_the_tape() {
        let mut m = Market::new(spec(), 7);
        let mut t = 1_700_000_000_000i64;
        let mut all_trades = Vec::new();
        let mut closed_1s = Vec::new();
        for _ in 0..100 {
            t += 50;
            let (trades, closed) = m.step(t, 0.05);
            all_trades.extend(trades);
            closed_1s.extend(closed.into_iter().filter(|c| c.interval == Interval::S1));
        }
        assert!(closed_1s.len() >= 3);
        let mut starts: Vec<i64> = closed_1s.iter().map(|c| c.open_time).collect();
        starts.dedup();
        assert_eq!(starts.len(), closed_1s.len(), "a candle closed twice");
        for c in &closed_1s {
            let inside: Vec<&SimTrade> = all_trades
                .iter()
                .filter(|tr| tr.time_ms >= c.open_time && tr.time_ms <= c.close_time)
                .collect();
            assert_eq!(c.trades as usize, inside.len());
            assert_eq!(c.open, inside[0].price);
            assert_eq!(c.close, inside[inside.len() - 1].price);
        }
    }

    #[test]
    fn books_are_never_crossed() {
        let mut m = Market::new(spec(), 3);
        for i in 0..200 {
            m.step(1_700_000_000_000 + i * 100, 0.1);
            assert!(m.best_bid().0 < m.best_ask().0);
            assert_eq!(m.bids.len(), BOOK_LEVELS);
        }
    }

    #[test]
    fn sizes_look_like_a_real_venues_even_with_a_tiny_lot() {
        // Kraken's BTC/USD lot is 10^-8 BTC: lot multiples would be dust (3.7e-7 BTC).
        let mut m = Market::new(
            MarketSpec {
                base: "BTC".into(),
                quote: "USD".into(),
                price: 97_450.0,
                tick: 0.1,
                lot: 1e-8,
                trades_per_sec: 20.0,
                volatility: 0.0001,
            },
            5,
        );
        let mut values: Vec<f64> = Vec::new();
        for i in 0..50 {
            let (trades, _) = m.step(1_700_000_000_000 + i * 100, 0.1);
            values.extend(m.bids.iter().chain(&m.asks).map(|(p, q)| p * q));
            values.extend(trades.iter().map(|t| t.price * t.qty));
        }
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        assert!(values[0] >= 4.0, "a level worth ${}", values[0]);
        assert!((200.0..20_000.0).contains(&median), "median ${median}");
        assert!(values[values.len() - 1] > 20_000.0);
    }

    #[test]
    fn month_and_week_buckets_follow_the_calendar() {
        // 2024-02-15T12:00:00Z
        let t = 1_707_998_400_000;
        let (start, end) = bucket(Interval::Mo1, t);
        assert_eq!(start, 1_706_745_600_000); // 2024-02-01
        assert_eq!(end, 1_709_251_200_000 - 1); // 2024-03-01 − 1 ms
        let (wstart, _) = bucket(Interval::W1, t);
        assert_eq!(wstart, 1_707_696_000_000); // Monday 2024-02-12
    }
}
