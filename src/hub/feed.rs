//! The boundary between the hub and what feeds it. The hub asks a [`FeedSource`] for the
//! upstream streams its topics need; the source tells the hub's [`FeedSink`] what arrived.
//! Each side holds the other only through these traits: the exchange connections are one
//! source, a cluster's Redis feed can be another, and the hub's own tests use a fake.

use std::future::Future;
use std::pin::Pin;

use crate::domain::ExchangeId;
use crate::events::{FeedKey, MarketEvent};
use crate::protocol::{ErrorCode, GapReason};

/// What a history is asked for: the newest `limit` candles or trades of a feed, candles up to
/// the one opening at `end_ms` when given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HistoryRequest {
    pub limit: usize,
    pub end_ms: Option<i64>,
}

/// Candles or trades, oldest first, or why they could not be had.
pub type HistoryFuture = Pin<Box<dyn Future<Output = Result<Vec<MarketEvent>, String>> + Send>>;

/// Whether a market can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Known,
    /// Not known yet (the exchange's instrument list is not loaded: it is unreachable).
    Pending,
    /// Never: the client gets `code` and `message`.
    Refused(ErrorCode, String),
}

/// What the hub asks of the side that produces market data.
pub trait FeedSource: Send + Sync + 'static {
    /// Whether `key` can be served now, later, or not at all.
    fn check(&self, key: &FeedKey) -> Check;
    /// The first subscriber of `key` arrived: start the stream.
    fn want(&self, key: &FeedKey);
    /// `key`'s topic was released (its last subscriber left `close_delay` ago): stop it.
    fn unwant(&self, key: &FeedKey);
    /// Whether data can be expected from `exchange` now.
    fn reachable(&self, exchange: ExchangeId) -> bool;
    /// The recent candles or trades of a klines or trades feed (the exchange's REST API),
    /// oldest first: at least the newest `limit` where the exchange has them, perhaps more (the
    /// hub joins them to its live data and keeps the newest `limit`).
    fn history(&self, _key: &FeedKey, _request: HistoryRequest) -> HistoryFuture {
        Box::pin(async { Err("this source keeps no history".to_string()) })
    }
}

/// What a source tells the hub. Called from the source's tasks; none of these may block.
pub trait FeedSink: Send + Sync + 'static {
    /// Events of one feed, in exchange order; a burst read at once comes in one call.
    fn events(&self, key: &FeedKey, events: Vec<MarketEvent>);
    /// The feed can no longer vouch for its current value (a book resyncing, a connection
    /// lost): new subscribers wait for a fresh one.
    fn invalidated(&self, key: &FeedKey);
    /// The exchange refused the feed for good: its subscribers are told and dropped.
    fn refused(&self, key: &FeedKey, code: ErrorCode, message: &str);
    /// An exchange's instrument list was (re)loaded: pending subscriptions can be resolved.
    fn instruments_loaded(&self, exchange: ExchangeId);
    /// Data of `key` the exchange produced between `from_ms` and `to_ms` could not be had:
    /// every channel of the feed says so, in sequence.
    fn gap(&self, key: &FeedKey, reason: GapReason, from_ms: i64, to_ms: i64);
}
