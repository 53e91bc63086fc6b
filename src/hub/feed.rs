//! The boundary between the hub and what feeds it. The hub asks a [`FeedSource`] for the
//! upstream streams its topics need; the source tells the hub's [`FeedSink`] what arrived.
//! Each side holds the other only through these traits: the exchange connections are one
//! source, a cluster's Redis feed can be another, and the hub's own tests use a fake.
//!
//! On its own the hub numbers every channel's messages itself. In a cluster the source numbers
//! them ([`FeedSource::prepare`], [`FeedSink::numbered`]): one sequence per topic, the same on
//! every node, so a client can resume on any of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::TopicKey;
use crate::domain::{Channel, ExchangeId};
use crate::events::{FeedKey, MarketEvent};
use crate::protocol::{ErrorCode, GapReason};

/// A message of a topic that takes a seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Item {
    Event(MarketEvent),
    Gap {
        reason: GapReason,
        from_ms: i64,
        to_ms: i64,
    },
    /// A message posted to a published channel.
    Published(Value),
}

/// A topic's shared sequence, as a cluster keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub epoch: Arc<str>,
    /// The last seq produced.
    pub seq: u64,
    /// For a `since`: the messages after it that the cluster still keeps, oldest first, and
    /// whether they are all of them (`false`: some were dropped from its window).
    pub after: Option<(Vec<(u64, Item)>, bool)>,
}

pub type PrepareFuture = Pin<Box<dyn Future<Output = Option<Prepared>> + Send>>;

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
    /// Before a topic is first used on this node (or resumed with `since`): the sequence the
    /// source numbers it with, shared by every node, and what it keeps after `since`. `None`:
    /// the hub numbers the topic's channels itself (a single relay; the default).
    fn prepare(&self, _topic: &TopicKey, _since: Option<u64>) -> PrepareFuture {
        Box::pin(async { None })
    }
    /// Like [`FeedSource::want`], for a stream that carries on a tape another node read: its
    /// trades after `after_trade` (id, ms) are fetched before live ones (the cluster's takeover).
    fn resume(&self, key: &FeedKey, _after_trade: Option<(u64, i64)>) {
        self.want(key);
    }
    /// A published channel got its first subscriber on this node / its topic was released.
    fn follow(&self, _channel: &Channel) {}
    fn unfollow(&self, _channel: &Channel) {}
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
    /// Messages the source numbered (a cluster), in order: each goes out with its own seq, in
    /// `epoch`; one already applied is skipped, a new epoch restarts the topic's sequence.
    /// Returns how many subscribers got a published message (0 for feeds).
    fn numbered(&self, topic: &TopicKey, epoch: &str, items: Vec<(u64, Item)>) -> usize;
    /// The sequence a topic is at on this node, when the source numbers it.
    fn position(&self, topic: &TopicKey) -> Option<(Arc<str>, u64)>;
}
