//! The exchanges' keyless REST market data (EXCHANGES.md §9): candle and trade histories for
//! `history` and the REST history endpoints, and the trades an outage made the relay miss.
//!
//! Everything is exact: candles at an interval the exchange has no REST candles for are
//! aggregated from a finer interval that divides it, and only buckets the fetched range covers
//! whole are kept; 1 s candles (no exchange but Binance has them over REST) are built from
//! the exchange's recent trades, the oldest, possibly partial, second dropped. Where an
//! exchange has no more (Kraken's OHLC ends 720 rows back), there are fewer candles, never
//! invented ones.
//!
//! Every request waits for the exchange's REST pace ([`Exchange::rest_pace`]), so a burst of
//! histories never exceeds the exchange's weight limits; identical requests are shared by the
//! cache in [`super::Upstreams`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::candles::{Seed, SeedCandle};
use super::{Exchange, Instrument};
use crate::decimal::Dec;
use crate::domain::{bucket, ExchangeId, Interval};
use crate::events::{Kline, Side, Trade, TradeId};
use crate::protocol::now_millis;

/// Pages one history or backfill may take, whatever it asks (Kraken: one a second).
const MAX_PAGES: usize = 12;
/// Trades per REST page (the most every exchange here allows).
const PAGE: usize = 1000;

/// A trade the relay has seen: where a backfill starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub id: u64,
    pub time_ms: i64,
}

/// What a backfill found: the trades strictly between the two ends, in exchange order, and
/// whether that is all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Filled {
    pub trades: Vec<Trade>,
    pub complete: bool,
}

async fn get(ex: &Exchange, url: &str) -> Result<String, String> {
    ex.rest_pace.until_ready().await;
    super::fetch_text(&ex.http, url, &ex.stats.rest)
        .await
        .map_err(|e| e.to_string())
}

fn rest_name(inst: &Instrument) -> &str {
    inst.rest_name.as_deref().unwrap_or(&inst.native)
}

/// The newest `limit` candles of `interval` (up to the one opening at `end_ms`), oldest first;
/// the forming candle is the last, `isFinal:false`.
pub async fn klines(
    ex: &Exchange,
    inst: &Instrument,
    interval: Interval,
    limit: usize,
    end_ms: Option<i64>,
) -> Result<Vec<Kline>, String> {
    let now = now_millis();
    let end = end_ms.unwrap_or(now).min(now);
    let mut out = match ex.adapter.id() {
        ExchangeId::Binance => binance_klines(ex, inst, interval, limit, end).await?,
        ExchangeId::Coinbase => match coinbase_granularity(interval) {
            Some((name, secs)) => {
                let (rows, from) =
                    coinbase_candles(ex, inst, name, secs, interval, limit, end).await?;
                aggregate(rows, from, interval, now)
            }
            None => from_trades(recent_trades(ex, inst, PAGE).await?, interval, now),
        },
        ExchangeId::Kraken => match kraken_minutes(interval) {
            Some(minutes) => {
                let (rows, from) = kraken_ohlc(ex, inst, minutes).await?;
                let mut candles = aggregate(rows, from, interval, now);
                // Kraken's OHLC ends 720 rows back: older candles are built from its trades.
                if let (true, Some(len), Some(first)) = (
                    candles.len() < limit,
                    interval.fixed_millis(),
                    candles.first().map(|k| k.open_time),
                ) {
                    let missing = (limit - candles.len()) as i64;
                    let mut older = kraken_candles_from_trades(
                        ex,
                        inst,
                        interval,
                        first - missing * len,
                        first,
                        now,
                    )
                    .await?;
                    older.append(&mut candles);
                    candles = older;
                }
                candles
            }
            None => from_trades(recent_trades(ex, inst, PAGE).await?, interval, now),
        },
    };
    out.retain(|k| k.open_time <= end);
    let skip = out.len().saturating_sub(limit);
    Ok(out.split_off(skip))
}

/// The most recent `limit` trades, oldest first.
pub async fn recent_trades(
    ex: &Exchange,
    inst: &Instrument,
    limit: usize,
) -> Result<Vec<Trade>, String> {
    let base = &ex.config.rest_url;
    let limit = limit.clamp(1, PAGE);
    let mut trades = match ex.adapter.id() {
        ExchangeId::Binance => parse_binance_trades(
            &get(
                ex,
                &format!("{base}/api/v3/trades?symbol={}&limit={limit}", inst.native),
            )
            .await?,
        )?,
        ExchangeId::Coinbase => coinbase_window(ex, inst, 0, now_millis(), limit).await?.0,
        ExchangeId::Kraken => {
            parse_kraken_trades(
                &get(
                    ex,
                    &format!(
                        "{base}/0/public/Trades?pair={}&count={limit}",
                        rest_name(inst)
                    ),
                )
                .await?,
            )?
            .0
        }
    };
    trades.sort_by_key(Trade::order);
    trades.dedup_by_key(|t| t.order());
    let skip = trades.len().saturating_sub(limit);
    Ok(trades.split_off(skip))
}

/// The trades made after `after` and before `before` (or until now), fetched by id where the
/// exchange allows (Binance `historicalTrades`), by time with Kraken's `last` cursor, by time
/// window on Coinbase.
pub async fn trades_between(
    ex: &Exchange,
    inst: &Instrument,
    after: Seen,
    before: Option<Seen>,
) -> Result<Filled, String> {
    let base = &ex.config.rest_url;
    let wanted = |t: &Trade| t.order() > after.id && before.is_none_or(|b| t.order() < b.id);
    let mut got: BTreeMap<u64, Trade> = BTreeMap::new();
    let mut reached_end = false;
    match ex.adapter.id() {
        ExchangeId::Binance => {
            let mut from = after.id + 1;
            for _ in 0..MAX_PAGES {
                let url = format!(
                    "{base}/api/v3/historicalTrades?symbol={}&fromId={from}&limit={PAGE}",
                    inst.native
                );
                let page = parse_binance_trades(&get(ex, &url).await?)?;
                let short = page.len() < PAGE;
                let newest = page.iter().map(Trade::order).max();
                got.extend(page.into_iter().filter(wanted).map(|t| (t.order(), t)));
                match (newest, before) {
                    (Some(n), Some(b)) if n + 1 >= b.id => reached_end = true,
                    (None, _) => reached_end = true,
                    _ if short => reached_end = true,
                    (Some(n), _) => from = n + 1,
                }
                if reached_end {
                    break;
                }
            }
        }
        ExchangeId::Coinbase => {
            // The window: from the last trade seen to the first live one.
            let end = before.map_or(now_millis(), |b| b.time_ms);
            let (page, reached) = coinbase_window(ex, inst, after.time_ms, end, usize::MAX).await?;
            reached_end = reached || page.first().is_some_and(|t| t.order() <= after.id + 1);
            got.extend(page.into_iter().filter(wanted).map(|t| (t.order(), t)));
        }
        ExchangeId::Kraken => {
            let (page, reached) = kraken_trades_from(ex, inst, after.time_ms, MAX_PAGES, |p| {
                let newest = p.iter().map(Trade::order).max();
                newest.zip(before).is_some_and(|(n, b)| n + 1 >= b.id)
            })
            .await?;
            reached_end = reached;
            got.extend(page.into_iter().filter(wanted).map(|t| (t.order(), t)));
        }
    }
    let trades: Vec<Trade> = got.into_values().collect();
    // Ids are consecutive per market on every exchange here (EXCHANGES.md §9): with both ends
    // known, completeness is a count.
    let complete = match before {
        Some(b) => trades.len() as u64 == b.id.saturating_sub(after.id + 1),
        None => reached_end,
    };
    Ok(Filled { trades, complete })
}

/// The exact seed of the trade-built candle of `interval` forming at `asked_at`: closed REST
/// candles from the bucket's start, coarsest first (days, then hours, then minutes, each up to
/// the start of the current one), then every trade since the current minute began, with ids.
/// Ids join the live stream to the seed exactly; the candle rows carry what the exchange states
/// of the rest (Coinbase no trade count).
pub async fn seed(
    ex: &Exchange,
    inst: &Instrument,
    interval: Interval,
    asked_at: i64,
) -> Result<Seed, String> {
    let (start, _) = bucket(interval, asked_at);
    let length = interval.fixed_millis().unwrap_or(i64::MAX);
    // (unit, Coinbase granularity, Kraken minutes), coarsest first.
    const LEVELS: [(i64, &str, u32); 3] = [
        (86_400_000, "ONE_DAY", 1440),
        (3_600_000, "ONE_HOUR", 60),
        (60_000, "ONE_MINUTE", 1),
    ];
    let mut cursor = start;
    let mut rows = Vec::new();
    for (unit, granularity, minutes) in LEVELS {
        if unit >= length {
            continue;
        }
        let current = asked_at.div_euclid(unit) * unit;
        if current <= cursor {
            continue;
        }
        let mut got: Vec<SeedCandle> = match ex.adapter.id() {
            ExchangeId::Coinbase => {
                let url = format!(
                    "{}/api/v3/brokerage/market/products/{}/candles?start={}&end={}&granularity={granularity}&limit=350",
                    ex.config.rest_url,
                    inst.native,
                    cursor / 1000,
                    current / 1000 - 1
                );
                super::coinbase::parse_rest_candles(&get(ex, &url).await?)?
            }
            ExchangeId::Kraken => {
                let url = format!(
                    "{}/0/public/OHLC?pair={}&interval={minutes}&since={}",
                    ex.config.rest_url,
                    rest_name(inst),
                    cursor / 1000 - 1
                );
                super::kraken::parse_rest_ohlc(&get(ex, &url).await?)?
            }
            ExchangeId::Binance => return Err("Binance candles are never built from trades".into()),
        };
        got.retain(|r| r.open_time >= cursor && r.open_time < current);
        rows.extend(got);
        cursor = current;
    }
    let mut trades: BTreeMap<u64, Trade> = BTreeMap::new();
    let mut complete = false;
    match ex.adapter.id() {
        ExchangeId::Coinbase => {
            let (page, reached) =
                coinbase_window(ex, inst, cursor, now_millis(), usize::MAX).await?;
            complete = reached;
            trades.extend(page.into_iter().map(|t| (t.order(), t)));
        }
        ExchangeId::Kraken => {
            let (page, reached) = kraken_trades_from(ex, inst, cursor, 5, |_| false).await?;
            complete = reached;
            trades.extend(page.into_iter().map(|t| (t.order(), t)));
        }
        ExchangeId::Binance => {}
    }
    Ok(Seed {
        rows,
        trades: trades
            .into_values()
            .filter(|t| t.time_ms >= cursor)
            .collect(),
        trades_from: cursor,
        complete,
    })
}

/// Kraken's trades from `from_ms` on, oldest first: `Trades` by `since`, then following each
/// answer's `last` (kept as a string), for at most `pages` pages. Stops early when `far_enough`
/// says a page reached what is wanted, or the exchange has no more; returns the trades and
/// whether it stopped for one of those (not the page cap).
async fn kraken_trades_from(
    ex: &Exchange,
    inst: &Instrument,
    from_ms: i64,
    pages: usize,
    far_enough: impl Fn(&[Trade]) -> bool,
) -> Result<(Vec<Trade>, bool), String> {
    let mut got: BTreeMap<u64, Trade> = BTreeMap::new();
    let mut since = (from_ms * 1_000_000).to_string();
    for _ in 0..pages {
        let url = format!(
            "{}/0/public/Trades?pair={}&since={since}&count={PAGE}",
            ex.config.rest_url,
            rest_name(inst)
        );
        let (page, last) = parse_kraken_trades(&get(ex, &url).await?)?;
        let done = page.len() < PAGE || far_enough(&page);
        got.extend(page.into_iter().map(|t| (t.order(), t)));
        match last {
            Some(l) if !done && l != since => since = l,
            _ => return Ok((got.into_values().collect(), true)),
        }
    }
    Ok((got.into_values().collect(), false))
}

/// Coinbase's trades from `start_ms` to `end_ms`, oldest first, the newest `want` of them at
/// least when there are that many: the market ticker answers newest first and perhaps fewer
/// rows than asked (its cap is not documented), so the window is paged back by time until a
/// page brings nothing new or `want` are had. Returns the trades and whether the window's start
/// was reached (not the page cap).
async fn coinbase_window(
    ex: &Exchange,
    inst: &Instrument,
    start_ms: i64,
    end_ms: i64,
    want: usize,
) -> Result<(Vec<Trade>, bool), String> {
    let mut got: BTreeMap<u64, Trade> = BTreeMap::new();
    let start = start_ms / 1000;
    let mut end = end_ms / 1000 + 1;
    let ask = want.min(PAGE);
    for _ in 0..MAX_PAGES {
        if got.len() >= want {
            return Ok((got.into_values().collect(), false));
        }
        let url = format!(
            "{}/api/v3/brokerage/market/products/{}/ticker?limit={ask}&start={start}&end={end}",
            ex.config.rest_url, inst.native
        );
        let page = parse_coinbase_ticker(&get(ex, &url).await?)?;
        let (before, rows) = (got.len(), page.len());
        let oldest = page.iter().map(|t| t.time_ms).min();
        got.extend(page.into_iter().map(|t| (t.order(), t)));
        match oldest {
            // The oldest second may hold more trades than the page showed: it is asked again.
            Some(o) if got.len() > before && o / 1000 >= start => end = o / 1000 + 1,
            // A full page of nothing new: one second holds more trades than a page, and the
            // API cannot say which others there are.
            Some(_) if got.len() == before && rows >= 100 => {
                return Ok((got.into_values().collect(), false))
            }
            _ => return Ok((got.into_values().collect(), true)),
        }
    }
    Ok((got.into_values().collect(), false))
}

async fn binance_klines(
    ex: &Exchange,
    inst: &Instrument,
    interval: Interval,
    limit: usize,
    end: i64,
) -> Result<Vec<Kline>, String> {
    let base = &ex.config.rest_url;
    let url = format!(
        "{base}/api/v3/klines?symbol={}&interval={}&limit={}&endTime={end}",
        inst.native,
        interval.as_str(),
        limit.clamp(1, 1000)
    );
    let body = get(ex, &url).await?;
    type Row = (
        i64,
        String,
        String,
        String,
        String,
        String,
        i64,
        String,
        u64,
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
    );
    let rows: Vec<Row> = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let now = now_millis();
    rows.into_iter()
        .map(|(open_time, o, h, l, c, v, close_time, q, n, ..)| {
            Ok(Kline {
                interval,
                open_time,
                close_time,
                open: dec(&o)?,
                high: dec(&h)?,
                low: dec(&l)?,
                close: dec(&c)?,
                volume: dec(&v)?,
                quote_volume: Some(dec(&q)?),
                trades: Some(n),
                is_final: close_time < now,
                time_ms: close_time.min(now),
            })
        })
        .collect()
}

fn dec(s: &str) -> Result<Dec, String> {
    s.parse::<Dec>().map_err(|e| format!("'{s}': {e}"))
}

/// Coinbase's REST granularity for `interval` (the interval itself, or one dividing it).
fn coinbase_granularity(interval: Interval) -> Option<(&'static str, i64)> {
    Some(match interval {
        Interval::S1 => return None,
        Interval::M1 | Interval::M3 => ("ONE_MINUTE", 60),
        Interval::M5 => ("FIVE_MINUTE", 300),
        Interval::M15 => ("FIFTEEN_MINUTE", 900),
        Interval::M30 => ("THIRTY_MINUTE", 1800),
        Interval::H1 | Interval::H4 | Interval::H8 | Interval::H12 => ("ONE_HOUR", 3600),
        Interval::H2 => ("TWO_HOUR", 7200),
        Interval::H6 => ("SIX_HOUR", 21600),
        Interval::D1 | Interval::D3 | Interval::W1 | Interval::Mo1 => ("ONE_DAY", 86400),
    })
}

/// Kraken's OHLC interval (minutes) for `interval`, itself or one dividing it. Kraken's own
/// weeks start on Thursday, so `1w` is built from days.
fn kraken_minutes(interval: Interval) -> Option<u32> {
    Some(match interval {
        Interval::S1 => return None,
        Interval::M1 | Interval::M3 => 1,
        Interval::M5 => 5,
        Interval::M15 => 15,
        Interval::M30 => 30,
        Interval::H1 | Interval::H2 | Interval::H6 => 60,
        Interval::H4 | Interval::H8 | Interval::H12 => 240,
        Interval::D1 | Interval::D3 | Interval::W1 | Interval::Mo1 => 1440,
    })
}

/// Pages Coinbase's candles (350 per request, newest first) back from `end` until `limit`
/// candles of `interval` are covered, the exchange has no more, or [`MAX_PAGES`]. Returns the
/// rows and the start of the range they cover.
async fn coinbase_candles(
    ex: &Exchange,
    inst: &Instrument,
    granularity: &str,
    secs: i64,
    interval: Interval,
    limit: usize,
    end_ms: i64,
) -> Result<(Vec<SeedCandle>, i64), String> {
    const ROWS: i64 = 350;
    let base = &ex.config.rest_url;
    let per = interval
        .fixed_millis()
        .map_or(31 * 86_400, |ms| ms / 1000)
        .max(secs)
        / secs;
    let needed = (limit as i64 + 1) * per;
    let mut rows = Vec::new();
    let mut end = end_ms / 1000 / secs * secs + secs; // exclusive
    let mut covered_from = end * 1000;
    let mut fetched = 0;
    for _ in 0..MAX_PAGES {
        let start = end - ROWS * secs;
        let url = format!(
            "{base}/api/v3/brokerage/market/products/{}/candles?start={start}&end={}&granularity={granularity}&limit={ROWS}",
            inst.native,
            end - 1
        );
        let page = super::coinbase::parse_rest_candles(&get(ex, &url).await?)?;
        covered_from = start * 1000;
        let empty = page.is_empty();
        rows.extend(page);
        fetched += ROWS;
        end = start;
        if empty || fetched >= needed {
            break;
        }
    }
    Ok((rows, covered_from))
}

/// Kraken's OHLC: the 720 most recent rows, whatever `since` says. Returns the rows and the
/// start of the range they cover (the oldest row's open).
async fn kraken_ohlc(
    ex: &Exchange,
    inst: &Instrument,
    minutes: u32,
) -> Result<(Vec<SeedCandle>, i64), String> {
    let base = &ex.config.rest_url;
    let url = format!(
        "{base}/0/public/OHLC?pair={}&interval={minutes}",
        rest_name(inst)
    );
    let rows = super::kraken::parse_rest_ohlc(&get(ex, &url).await?)?;
    let from = rows.iter().map(|r| r.open_time).min().unwrap_or(i64::MAX);
    Ok((rows, from))
}

/// Candles of `interval` from rows of a granularity dividing it: exact sums, and only the
/// buckets that start inside the fetched range (a bucket cut by the range would be partial).
fn aggregate(rows: Vec<SeedCandle>, from_ms: i64, interval: Interval, now: i64) -> Vec<Kline> {
    let mut buckets: BTreeMap<i64, Vec<SeedCandle>> = BTreeMap::new();
    let mut rows = rows;
    rows.sort_by_key(|r| r.open_time);
    rows.dedup_by_key(|r| r.open_time);
    for r in rows {
        let (start, _) = bucket(interval, r.open_time);
        if start >= from_ms {
            buckets.entry(start).or_default().push(r);
        }
    }
    buckets
        .into_iter()
        .filter_map(|(start, rows)| {
            let (_, close_time) = bucket(interval, start);
            let first = rows.first()?;
            let last = rows.last()?;
            let sum = |f: fn(&SeedCandle) -> Option<Dec>| {
                rows.iter()
                    .try_fold(Dec::ZERO, |acc, r| acc.checked_add(f(r)?))
            };
            Some(Kline {
                interval,
                open_time: start,
                close_time,
                open: first.open,
                high: rows.iter().map(|r| r.high).max()?,
                low: rows.iter().map(|r| r.low).min()?,
                close: last.close,
                volume: sum(|r| Some(r.volume))?,
                quote_volume: sum(|r| r.quote_volume),
                trades: rows.iter().map(|r| r.trades).sum(),
                is_final: close_time < now,
                time_ms: close_time.min(now),
            })
        })
        .collect()
}

/// Kraken candles of `interval` opening in `[from, to)`, built from its Trades (forward from
/// `from`, following `last`, up to [`MAX_PAGES`] at Kraken's one request a second). Exact, and
/// only when the trades reach `to`: a run that ends early would leave a hole before the OHLC
/// candles, so it gives none.
async fn kraken_candles_from_trades(
    ex: &Exchange,
    inst: &Instrument,
    interval: Interval,
    from: i64,
    to: i64,
    now: i64,
) -> Result<Vec<Kline>, String> {
    let (trades, reached) = kraken_trades_from(ex, inst, from, MAX_PAGES, |p| {
        p.iter().any(|t| t.time_ms >= to)
    })
    .await?;
    if !reached {
        return Ok(Vec::new());
    }
    let inside: Vec<Trade> = trades
        .into_iter()
        .filter(|t| t.time_ms >= from && t.time_ms < to)
        .collect();
    Ok(candles_from_trades(inside, interval, now, false))
}

/// Candles built from trades (oldest first); the oldest bucket is dropped, as trades before
/// the first one fetched may belong to it.
fn from_trades(trades: Vec<Trade>, interval: Interval, now: i64) -> Vec<Kline> {
    candles_from_trades(trades, interval, now, true)
}

/// Candles from trades; `drop_first` when the first bucket may be missing earlier trades.
fn candles_from_trades(
    trades: Vec<Trade>,
    interval: Interval,
    now: i64,
    drop_first: bool,
) -> Vec<Kline> {
    let mut by_bucket: BTreeMap<i64, Vec<Trade>> = BTreeMap::new();
    for t in trades {
        by_bucket
            .entry(bucket(interval, t.time_ms).0)
            .or_default()
            .push(t);
    }
    if drop_first {
        by_bucket.pop_first();
    }
    by_bucket
        .into_iter()
        .filter_map(|(start, mut ts)| {
            ts.sort_by_key(|t| (t.time_ms, t.order()));
            let (_, close_time) = bucket(interval, start);
            let volume = ts
                .iter()
                .try_fold(Dec::ZERO, |acc, t| acc.checked_add(t.quantity))?;
            let quote = ts.iter().try_fold(Dec::ZERO, |acc, t| {
                acc.checked_add(t.price.checked_mul(t.quantity)?)
            });
            Some(Kline {
                interval,
                open_time: start,
                close_time,
                open: ts.first()?.price,
                high: ts.iter().map(|t| t.price).max()?,
                low: ts.iter().map(|t| t.price).min()?,
                close: ts.last()?.price,
                volume,
                quote_volume: quote,
                trades: Some(ts.len() as u64),
                is_final: close_time < now,
                time_ms: ts.last()?.time_ms,
            })
        })
        .collect()
}

/// `[{"id":28457,"price":"4.00000100","qty":"12.00000000","quoteQty":"48.000012","time":1499865549590,"isBuyerMaker":true,"isBestMatch":true}]`
fn parse_binance_trades(body: &str) -> Result<Vec<Trade>, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Row {
        id: u64,
        price: String,
        qty: String,
        time: i64,
        is_buyer_maker: bool,
    }
    let rows: Vec<Row> = serde_json::from_str(body).map_err(|e| e.to_string())?;
    rows.into_iter()
        .map(|r| {
            Ok(Trade {
                trade_id: TradeId::Number(r.id),
                price: dec(&r.price)?,
                quantity: dec(&r.qty)?,
                // The buyer made the market: the taker sold.
                side: if r.is_buyer_maker {
                    Side::Sell
                } else {
                    Side::Buy
                },
                time_ms: r.time,
            })
        })
        .collect()
}

/// `{"trades":[{"trade_id":"10092327","product_id":"BTC-USD","price":"17488.12","size":"0.0000623","time":"2023-01-11T00:52:37.557001Z","side":"BUY"}],"best_bid":"...","best_ask":"..."}`,
/// newest first; `side` is the maker's.
fn parse_coinbase_ticker(body: &str) -> Result<Vec<Trade>, String> {
    #[derive(Deserialize)]
    struct Reply {
        trades: Vec<Row>,
    }
    #[derive(Deserialize)]
    struct Row {
        trade_id: String,
        price: String,
        size: String,
        time: String,
        side: String,
    }
    let reply: Reply = serde_json::from_str(body).map_err(|e| e.to_string())?;
    reply
        .trades
        .into_iter()
        .map(|r| {
            Ok(Trade {
                trade_id: match r.trade_id.parse::<u64>() {
                    Ok(n) => TradeId::Number(n),
                    Err(_) => TradeId::Text(r.trade_id.clone()),
                },
                price: dec(&r.price)?,
                quantity: dec(&r.size)?,
                side: match r.side.as_str() {
                    "BUY" => Side::Sell,
                    "SELL" => Side::Buy,
                    other => return Err(format!("side '{other}'")),
                },
                time_ms: super::rfc3339_ms(&r.time).ok_or_else(|| format!("time '{}'", r.time))?,
            })
        })
        .collect()
}

/// `{"error":[],"result":{"XXBTZUSD":[["30243.40000","0.34507674",1688669597.8277369,"b","m","",61044952]],"last":"1688671969993150842"}}`:
/// oldest first, `b`/`s` the taker's side. Returns the trades and `last`, kept as a string (a
/// 19-digit value does not survive a float).
fn parse_kraken_trades(body: &str) -> Result<(Vec<Trade>, Option<String>), String> {
    let result = super::kraken::rest_result(body)?;
    let last = match result.get("last") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let rows = super::kraken::pair_rows(result)?;
    type Row = (String, String, f64, String, String, String, u64);
    let rows: Vec<Row> = serde_json::from_value(rows).map_err(|e| e.to_string())?;
    let trades = rows
        .into_iter()
        .map(|(price, volume, time, side, _, _, id)| {
            Ok(Trade {
                trade_id: TradeId::Number(id),
                price: dec(&price)?,
                quantity: dec(&volume)?,
                side: match side.as_str() {
                    "b" => Side::Buy,
                    "s" => Side::Sell,
                    other => return Err(format!("side '{other}'")),
                },
                time_ms: (time * 1000.0).round() as i64,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((trades, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candle(open_time: i64, o: i64, h: i64, l: i64, c: i64, v: i64) -> SeedCandle {
        SeedCandle {
            open_time,
            open: Dec::from_int(o),
            high: Dec::from_int(h),
            low: Dec::from_int(l),
            close: Dec::from_int(c),
            volume: Dec::from_int(v),
            quote_volume: None,
            trades: Some(1),
        }
    }

    #[test]
    fn aggregation_is_exact_and_drops_buckets_the_range_cuts() {
        let m = 60_000;
        // 1m rows from 00:01 to 00:06: the 3m bucket at 00:00 is cut by the range's start.
        let rows = (1..=6)
            .map(|i| candle(i * m, 10 + i, 20 + i, i, 11 + i, 2))
            .collect();
        let k = aggregate(rows, m, Interval::M3, i64::MAX);
        // 00:03 (rows 3, 4, 5) and the newest, 00:06, forming from row 6.
        assert_eq!(k.len(), 2, "{k:?}");
        assert_eq!(k[1].open_time, 6 * m);
        assert_eq!(k[0].open_time, 3 * m);
        assert_eq!(k[0].open, Dec::from_int(13));
        assert_eq!(k[0].high, Dec::from_int(25));
        assert_eq!(k[0].low, Dec::from_int(3));
        assert_eq!(k[0].close, Dec::from_int(16));
        assert_eq!(k[0].volume, Dec::from_int(6));
        assert_eq!(k[0].trades, Some(3));
        assert!(k[0].is_final);
    }

    #[test]
    fn rest_rows_of_each_exchange_parse() {
        let b = parse_binance_trades(r#"[{"id":6739446511,"price":"4.00000100","qty":"12.00000000","quoteQty":"48.000012","time":1499865549590,"isBuyerMaker":true,"isBestMatch":true}]"#).unwrap();
        assert_eq!(b[0].trade_id, TradeId::Number(6_739_446_511));
        assert_eq!(b[0].side, Side::Sell);
        let c = parse_coinbase_ticker(r#"{"trades":[{"trade_id":"10092327","product_id":"BTC-USDT","price":"17488.12","size":"0.0000623","time":"2023-01-11T00:52:37.557001Z","side":"BUY","bid":"","ask":""}],"best_bid":"1","best_ask":"2"}"#).unwrap();
        assert_eq!(c[0].side, Side::Sell, "maker bought: the taker sold");
        assert_eq!(c[0].time_ms, 1_673_398_357_557);
        let (k, last) = parse_kraken_trades(r#"{"error":[],"result":{"XXBTZUSD":[["30243.40000","0.34507674",1688669597.8277369,"b","m","",61044952]],"last":"1688671969993150842"}}"#).unwrap();
        assert_eq!(k[0].trade_id, TradeId::Number(61_044_952));
        assert_eq!(k[0].side, Side::Buy);
        assert_eq!(last.as_deref(), Some("1688671969993150842"));
        assert!(parse_kraken_trades(r#"{"error":["EGeneral:Too many requests"]}"#).is_err());
    }
}
