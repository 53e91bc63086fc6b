//! Relay-wide and per-exchange counters, and the one place each observable event is both
//! counted and (where worth it) logged, so figures and logs never disagree: code elsewhere
//! calls `stats.slow_consumer(..)`, never a counter and a `tracing` line of its own. Readers
//! (`/api/v1/ws/stats`, `/health`, a metrics exporter) take typed snapshots.
//!
//! Counters are relaxed atomics: bumping one costs the data path no lock and no ordering.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use std::sync::Arc;

use crate::domain::{ExchangeId, EXCHANGES};
use crate::protocol::{now_millis, ErrorCode, GapReason};

/// One upstream log line of a kind at most this often; the rest are counted and summarised
/// (a venue that changes its format must not flood the log with a line per frame).
const LOG_EVERY_MS: i64 = 10_000;

pub struct Stats {
    started: Instant,
    /// WebSocket messages received from clients and exchanges.
    messages_in: AtomicU64,
    /// Messages queued or written to clients (data, acks, errors).
    messages_out: AtomicU64,
    /// Queued conflatable values replaced by a newer one for a client that fell behind.
    conflated: AtomicU64,
    /// Clients closed with 1013 for not keeping up.
    slow_consumer_disconnects: AtomicU64,
    /// Requests refused with `RATE_LIMITED`.
    rate_limited: AtomicU64,
    /// WebSocket upgrades refused (caps, origin).
    rejected_connections: AtomicU64,
    /// Clients ever connected.
    total_connections: AtomicU64,
    /// Messages to clients by message type ([`OUT_KINDS`]).
    out_by_kind: Labelled<{ OUT_KINDS.len() }>,
    /// Error replies to clients by code.
    errors_by_code: Labelled<{ ErrorCode::ALL.len() }>,
    /// Exchange event time → frames handed to the sockets, per exchange ([`EXCHANGES`] order).
    event_latency: [Histogram; EXCHANGES.len()],
    /// How long one event's fan-out to every subscriber takes.
    fanout: Histogram,
    /// Subscriptions held now, by channel kind (`Channel::KINDS` order): kept here by the hub
    /// as they change, so that a scrape reads them without the topics' locks.
    subscriptions: Labelled<{ crate::domain::Channel::KINDS.len() }>,
    /// Channels with at least one subscriber.
    channels: AtomicI64,
    /// Gap notices sent, by reason (a channel's own notice counts once per channel).
    gaps: Labelled<{ GapReason::ALL.len() }>,
    /// Subscribes with `since`, by outcome.
    recoveries: Labelled<2>,
    /// Histories asked for, by outcome.
    histories: Labelled<2>,
    /// Authentication and authorisation refusals, by reason ([`AUTH_REFUSALS`]).
    auth_refusals: Labelled<{ AUTH_REFUSALS.len() }>,
}

/// Why a token, a private subscription, a user's connection or a publish request was refused.
pub const AUTH_REFUSALS: [&str; 7] = [
    "invalid_token",
    "token_expired",
    "keys_unavailable",
    "auth_required",
    "forbidden",
    "user_limit",
    "publish_key",
];

/// The message types counted on their own in `relay_messages_out_total{kind}`; anything else
/// (acks, errors, pongs) is `control`.
pub const OUT_KINDS: [&str; 9] = [
    "price",
    "ticker",
    "kline",
    "trade",
    "depth",
    "signal",
    "portfolio",
    "orders",
    "control",
];

/// A latency histogram of fixed buckets (seconds), every count an atomic: observing takes no
/// lock, and a scrape reads the buckets as they are.
pub struct Histogram {
    /// Observations at or below each bound of [`Histogram::BOUNDS`] (not cumulative).
    buckets: [AtomicU64; Histogram::BOUNDS.len()],
    /// Observations above the last bound.
    over: AtomicU64,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// A histogram as read: cumulative counts per bound, sum (seconds) and count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Upper bounds in seconds: 0.5 ms to 10 s.
    pub const BOUNDS: [f64; 14] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];

    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        match Self::BOUNDS.iter().position(|b| seconds <= *b) {
            Some(i) => add(&self.buckets[i], 1),
            None => add(&self.over, 1),
        }
        add(&self.sum_micros, (seconds * 1e6) as u64);
        add(&self.count, 1);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = Self::BOUNDS
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                cumulative += get(n);
                (*b, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: get(&self.sum_micros) as f64 / 1e6,
            count: get(&self.count),
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            conflated: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            total_connections: AtomicU64::new(0),
            out_by_kind: Labelled::new(OUT_KINDS),
            errors_by_code: Labelled::new(ErrorCode::ALL.map(ErrorCode::as_str)),
            event_latency: std::array::from_fn(|_| Histogram::default()),
            fanout: Histogram::default(),
            subscriptions: Labelled::new(crate::domain::Channel::KINDS),
            channels: AtomicI64::new(0),
            gaps: Labelled::new(GapReason::ALL.map(GapReason::as_str)),
            recoveries: Labelled::new(["recovered", "not_recovered"]),
            histories: Labelled::new(["served", "unavailable"]),
            auth_refusals: Labelled::new(AUTH_REFUSALS),
        }
    }
}

/// Counters (or, moved both ways, gauges) under a fixed list of labels, one atomic each: the
/// per-kind, per-code and per-status counts of the metrics.
pub struct Labelled<const N: usize> {
    labels: [&'static str; N],
    values: [AtomicI64; N],
}

impl<const N: usize> Labelled<N> {
    pub fn new(labels: [&'static str; N]) -> Self {
        Labelled {
            labels,
            values: std::array::from_fn(|_| AtomicI64::new(0)),
        }
    }

    /// Adds `n` (negative to take away) under `label`; an unknown label counts nowhere.
    pub fn add(&self, label: &str, n: i64) {
        if let Some(i) = self.labels.iter().position(|l| *l == label) {
            self.values[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Every label with its value, in the list's order.
    pub fn values(&self) -> Vec<(&'static str, i64)> {
        self.labels
            .iter()
            .zip(&self.values)
            .map(|(l, v)| (*l, v.load(Ordering::Relaxed)))
            .collect()
    }

    /// The same, as counters (which only ever grow).
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.values()
            .into_iter()
            .map(|(l, v)| (l, u64::try_from(v).unwrap_or(0)))
            .collect()
    }
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What the relay-wide counters say now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages_in: u64,
    pub messages_out: u64,
    pub conflated: u64,
    pub slow_consumer_disconnects: u64,
    pub rate_limited: u64,
    pub rejected_connections: u64,
    pub total_connections: u64,
    pub uptime_seconds: u64,
}

impl Stats {
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            messages_in: get(&self.messages_in),
            messages_out: get(&self.messages_out),
            conflated: get(&self.conflated),
            slow_consumer_disconnects: get(&self.slow_consumer_disconnects),
            rate_limited: get(&self.rate_limited),
            rejected_connections: get(&self.rejected_connections),
            total_connections: get(&self.total_connections),
            uptime_seconds: self.uptime_seconds(),
        }
    }

    /// A frame arrived from a client or an exchange.
    pub fn message_in(&self) {
        add(&self.messages_in, 1);
    }

    /// `n` control messages (acks, errors, pongs) went (or were queued) to clients.
    pub fn control_out(&self, n: u64) {
        self.messages_out_of("control", n);
    }

    /// `n` messages of type `kind` went (or were queued) to clients.
    pub fn messages_out_of(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        add(&self.messages_out, n);
        let kind = if OUT_KINDS.contains(&kind) {
            kind
        } else {
            "control"
        };
        self.out_by_kind.add(kind, n as i64);
    }

    /// Messages out by [`OUT_KINDS`].
    pub fn messages_out_by_kind(&self) -> Vec<(&'static str, u64)> {
        self.out_by_kind.counts()
    }

    /// `n` subscriptions of `kind` were made (or, negative, dropped).
    pub fn subscribed(&self, kind: &str, n: i64) {
        self.subscriptions.add(kind, n);
    }

    /// Subscriptions held now by kind.
    pub fn subscriptions(&self) -> Vec<(&'static str, i64)> {
        self.subscriptions.values()
    }

    /// A channel got its first subscriber.
    pub fn channel_opened(&self) {
        self.channels.fetch_add(1, Ordering::Relaxed);
    }

    /// A channel lost its last subscriber.
    pub fn channel_closed(&self) {
        self.channels.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn channels(&self) -> i64 {
        self.channels.load(Ordering::Relaxed)
    }

    /// A gap notice was sent.
    pub fn gap(&self, reason: GapReason) {
        self.gaps.add(reason.as_str(), 1);
    }

    pub fn gaps(&self) -> Vec<(&'static str, u64)> {
        self.gaps.counts()
    }

    /// A subscribe with `since` resumed (`true`) or could not.
    pub fn recovery(&self, recovered: bool) {
        self.recoveries.add(
            if recovered {
                "recovered"
            } else {
                "not_recovered"
            },
            1,
        );
    }

    pub fn recoveries(&self) -> Vec<(&'static str, u64)> {
        self.recoveries.counts()
    }

    /// A history was served (`true`) or could not be had.
    pub fn history(&self, served: bool) {
        self.histories
            .add(if served { "served" } else { "unavailable" }, 1);
    }

    pub fn histories(&self) -> Vec<(&'static str, u64)> {
        self.histories.counts()
    }

    /// A client was answered with an error.
    pub fn client_error(&self, code: ErrorCode) {
        self.errors_by_code.add(code.as_str(), 1);
    }

    /// Error replies by code.
    pub fn client_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors_by_code.counts()
    }

    /// One event of `exchange` reached its subscribers' sockets `seconds` after the exchange's
    /// event time.
    pub fn event_delivered(&self, exchange: ExchangeId, seconds: f64) {
        self.event_latency[exchange.index()].observe(seconds);
    }

    pub fn event_latency(&self, exchange: ExchangeId) -> HistogramSnapshot {
        self.event_latency[exchange.index()].snapshot()
    }

    /// One fan-out (an event, or a burst, to every subscriber of a feed) took `seconds`.
    pub fn fanned_out(&self, seconds: f64) {
        self.fanout.observe(seconds);
    }

    pub fn fanout(&self) -> HistogramSnapshot {
        self.fanout.snapshot()
    }

    /// `n` queued values were replaced by newer ones for clients that fell behind.
    pub fn conflated(&self, n: u64) {
        add(&self.conflated, n);
    }

    /// A client is closed with 1013: its queue of messages that may not be dropped is full.
    pub fn slow_consumer(&self, client: &str, channel: &str) {
        add(&self.slow_consumer_disconnects, 1);
        tracing::info!(%client, %channel, "slow consumer: closing with 1013");
    }

    /// A request was refused for the client's request rate.
    pub fn rate_limited(&self) {
        add(&self.rate_limited, 1);
    }

    /// A WebSocket upgrade was refused before it happened (`why`: which cap, or the origin).
    pub fn connection_refused(&self, why: &'static str) {
        add(&self.rejected_connections, 1);
        tracing::debug!(%why, "connection refused before the upgrade");
    }

    /// A refusal of [`AUTH_REFUSALS`], logged with who asked (never the token): the operator's
    /// own faults (keys unavailable, a wrong publish key) at warn, a client's at info.
    pub fn auth_refused(&self, reason: &'static str, client: Option<&str>, user: Option<&str>) {
        self.auth_refusals.add(reason, 1);
        let client = client.unwrap_or("-");
        let user = user.unwrap_or("-");
        match reason {
            "keys_unavailable" | "publish_key" => {
                tracing::warn!(%reason, %client, %user, "authentication refused")
            }
            _ => tracing::info!(%reason, %client, %user, "authentication refused"),
        }
    }

    /// Refusals by reason.
    pub fn auth_refusals(&self) -> Vec<(&'static str, u64)> {
        self.auth_refusals.counts()
    }

    /// A client connected.
    pub fn client_connected(&self, client: &str, authenticated: bool) {
        add(&self.total_connections, 1);
        tracing::debug!(%client, authenticated, "client connected");
    }
}

/// A timestamp in ms since the epoch, 0 meaning never.
#[derive(Default)]
pub struct AtomicMillis(AtomicI64);

impl AtomicMillis {
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<i64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

/// Since when something has been failing, and the last error, for `/health`.
#[derive(Default)]
pub struct Trouble {
    since: AtomicMillis,
    last_error: Mutex<Option<String>>,
}

impl Trouble {
    /// Records a failure: the first one since the last success starts the clock.
    fn fail(&self, error: String) {
        if self.since.get().is_none() {
            self.since.set(now_millis());
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    fn clear(&self) {
        self.since.set(0);
    }

    pub fn is_failing(&self) -> bool {
        self.since.get().is_some()
    }

    /// Since when (ms) and why, while failing.
    pub fn get(&self) -> Option<(i64, String)> {
        let since = self.since.get()?;
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        Some((since, error))
    }
}

/// A log line that may repeat once per frame: written at most every [`LOG_EVERY_MS`], with
/// the number left out since the last one.
#[derive(Default)]
struct Throttled {
    last_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl Throttled {
    /// `Some(n)` when a line may be written now (`n` were left out before it).
    fn admit(&self) -> Option<u64> {
        let now = now_millis();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now - last >= LOG_EVERY_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// One exchange's upstream counters and health, and the events that move them.
pub struct UpstreamStats {
    exchange: ExchangeId,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    decode_errors: AtomicU64,
    rejected_requests: AtomicU64,
    /// Order books rebuilt after a gap, checksum failure or crossed book.
    resyncs: AtomicU64,
    last_message_at: AtomicMillis,
    /// The WebSocket side: a connection was lost or a connect attempt failed, and none has
    /// succeeded since.
    pub ws_trouble: Trouble,
    /// The instrument list could not be fetched (the last attempt failed).
    pub rest_trouble: Trouble,
    decode_log: Throttled,
    /// Frames received from the exchange.
    messages: AtomicU64,
    /// REST answers by status class ([`REST_CLASSES`]); shared with fetch tasks.
    pub rest: Arc<RestCounters>,
    /// From losing a connection (or a failed attempt) to the next one open.
    reconnect: Histogram,
    /// Trades fetched back from REST after outages, and backfills that could not fill all.
    backfilled_trades: AtomicU64,
    backfills_incomplete: AtomicU64,
    /// Books in a run of failed checks, resynced ever further apart (for `/health`).
    failing_books: std::sync::Mutex<std::collections::BTreeMap<String, FailingBook>>,
}

/// A book that keeps failing its checks, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailingBook {
    pub stream: String,
    pub failures: u32,
    /// When the next resync is due (ISO-8601).
    pub retry_at: String,
    pub last_error: String,
}

/// Status classes of REST answers: the rate-limit codes on their own (they matter to
/// operators), the others by class; `error` when no answer came.
pub const REST_CLASSES: [&str; 6] = ["2xx", "4xx", "418", "429", "5xx", "error"];

/// REST answers of one exchange, by [`REST_CLASSES`].
pub struct RestCounters(Labelled<{ REST_CLASSES.len() }>);

impl Default for RestCounters {
    fn default() -> Self {
        RestCounters(Labelled::new(REST_CLASSES))
    }
}

impl RestCounters {
    /// An answer with `status`, or none (`None`: timeout, connection refused, ...).
    pub fn record(&self, status: Option<u16>) {
        let class = match status {
            None => "error",
            Some(418) => "418",
            Some(429) => "429",
            Some(s) if (200..300).contains(&s) => "2xx",
            Some(s) if (400..500).contains(&s) => "4xx",
            Some(_) => "5xx",
        };
        self.0.add(class, 1);
    }

    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.0.counts()
    }
}

/// What an exchange's counters say now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    pub reconnects: u64,
    pub connect_failures: u64,
    pub decode_errors: u64,
    pub rejected_requests: u64,
    pub resyncs: u64,
    pub last_message_at: Option<i64>,
    pub messages: u64,
    pub backfilled_trades: u64,
    pub backfills_incomplete: u64,
}

impl UpstreamStats {
    pub fn new(exchange: ExchangeId) -> UpstreamStats {
        UpstreamStats {
            exchange,
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            rejected_requests: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            last_message_at: AtomicMillis::default(),
            ws_trouble: Trouble::default(),
            rest_trouble: Trouble::default(),
            decode_log: Throttled::default(),
            messages: AtomicU64::new(0),
            rest: Arc::new(RestCounters::default()),
            reconnect: Histogram::default(),
            backfilled_trades: AtomicU64::new(0),
            backfills_incomplete: AtomicU64::new(0),
            failing_books: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    pub fn reconnect_durations(&self) -> HistogramSnapshot {
        self.reconnect.snapshot()
    }

    pub fn counters(&self) -> UpstreamCounters {
        UpstreamCounters {
            reconnects: get(&self.reconnects),
            connect_failures: get(&self.connect_failures),
            decode_errors: get(&self.decode_errors),
            rejected_requests: get(&self.rejected_requests),
            resyncs: get(&self.resyncs),
            last_message_at: self.last_message_at.get(),
            messages: get(&self.messages),
            backfilled_trades: get(&self.backfilled_trades),
            backfills_incomplete: get(&self.backfills_incomplete),
        }
    }

    /// A backfill after an outage fetched `trades`, all that were missed or not.
    pub fn backfilled(&self, trades: u64, complete: bool) {
        add(&self.backfilled_trades, trades);
        if !complete {
            add(&self.backfills_incomplete, 1);
        }
        tracing::info!(exchange = %self.exchange, trades, complete, "trades backfilled after an outage");
    }

    /// A connection is being opened again after it was lost or renewed.
    pub fn reconnecting(&self) {
        add(&self.reconnects, 1);
    }

    /// A connect attempt failed; `terminal` when retrying soon will not help.
    pub fn connect_failed(&self, conn: u64, error: &str, terminal: bool, retry_in_ms: u64) {
        add(&self.connect_failures, 1);
        self.ws_trouble.fail(format!("connect failed: {error}"));
        let exchange = self.exchange;
        if terminal {
            tracing::error!(%exchange, conn, %error, retry_in_ms, "exchange refused the connection; check the URL, credentials or region (retrying slowly)");
        } else {
            tracing::warn!(%exchange, conn, %error, retry_in_ms, "upstream connect failed");
        }
    }

    pub fn connected(&self, conn: u64, streams: usize) {
        if let Some((since, _)) = self.ws_trouble.get() {
            self.reconnect
                .observe((now_millis() - since).max(0) as f64 / 1000.0);
        }
        self.ws_trouble.clear();
        tracing::info!(exchange = %self.exchange, conn, streams, "upstream connected");
    }

    /// An open connection ended (`why`); data is not flowing until a new one is up.
    /// `replaced`: the relay replaces it at once (a planned renewal, the exchange's request, a
    /// silent socket), logged at info; otherwise it failed, logged as a warning.
    pub fn connection_lost(&self, conn: u64, why: &str, replaced: bool) {
        self.ws_trouble.fail(why.to_string());
        if replaced {
            tracing::info!(exchange = %self.exchange, conn, %why, "upstream connection replaced");
        } else {
            tracing::warn!(exchange = %self.exchange, conn, %why, "upstream connection lost");
        }
    }

    /// A frame arrived.
    pub fn frame_received(&self, now_ms: i64) {
        add(&self.messages, 1);
        self.last_message_at.set(now_ms);
    }

    /// A frame could not be decoded: counted, and logged at most every 10 s.
    pub fn decode_error(&self, conn: u64, error: &dyn std::fmt::Display) {
        add(&self.decode_errors, 1);
        if let Some(suppressed) = self.decode_log.admit() {
            tracing::warn!(exchange = %self.exchange, conn, %error, suppressed, "undecodable upstream frame ignored (at most one such line every 10 s; suppressed counts those left out)");
        }
    }

    /// The exchange refused a request (`stream`: the one stream refused for good, if any).
    pub fn request_refused(&self, conn: u64, stream: Option<&str>, why: &str) {
        add(&self.rejected_requests, 1);
        match stream {
            Some(stream) => {
                tracing::warn!(exchange = %self.exchange, conn, %stream, %why, "exchange refused a stream")
            }
            None => {
                tracing::warn!(exchange = %self.exchange, conn, %why, "exchange refused a request")
            }
        }
    }

    /// An order book is rebuilt from a fresh snapshot.
    pub fn book_resync(&self, conn: u64, stream: &str, why: &str, failures: u32, retry_in_ms: i64) {
        add(&self.resyncs, 1);
        if retry_in_ms == 0 {
            tracing::warn!(exchange = %self.exchange, conn, %stream, %why, "order book resync");
            return;
        }
        tracing::warn!(exchange = %self.exchange, conn, %stream, %why, failures, retry_in_ms, "order book keeps failing its check; resyncing later");
        let mut books = self.failing_books.lock().unwrap_or_else(|e| e.into_inner());
        books.insert(
            stream.to_string(),
            FailingBook {
                stream: stream.to_string(),
                failures,
                retry_at: crate::protocol::iso_millis(now_millis() + retry_in_ms),
                last_error: why.to_string(),
            },
        );
    }

    /// A book that kept failing verified again for a while.
    pub fn book_healthy(&self, stream: &str) {
        let mut books = self.failing_books.lock().unwrap_or_else(|e| e.into_inner());
        if books.remove(stream).is_some() {
            tracing::info!(exchange = %self.exchange, %stream, "order book healthy again");
        }
    }

    pub fn failing_books(&self) -> Vec<FailingBook> {
        let books = self.failing_books.lock().unwrap_or_else(|e| e.into_inner());
        books.values().cloned().collect()
    }

    /// The instrument list was loaded.
    pub fn instruments_loaded(&self, count: usize) {
        self.rest_trouble.clear();
        tracing::info!(exchange = %self.exchange, instruments = count, "instrument list loaded");
    }

    /// The instrument list could not be had.
    pub fn instruments_failed(&self, error: String) {
        tracing::warn!(exchange = %self.exchange, %error, "instrument list not loaded");
        self.rest_trouble.fail(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_line_is_written_once_per_period_and_counts_the_rest() {
        let t = Throttled::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        t.last_ms
            .store(now_millis() - LOG_EVERY_MS, Ordering::Relaxed);
        assert_eq!(t.admit(), Some(2));
    }

    #[test]
    fn every_decode_error_counts_even_when_not_logged() {
        let s = UpstreamStats::new(ExchangeId::Kraken);
        for _ in 0..1000 {
            s.decode_error(1, &"bad frame");
        }
        assert_eq!(s.counters().decode_errors, 1000);
        assert_eq!(s.decode_log.suppressed.load(Ordering::Relaxed), 999);
    }

    #[test]
    fn the_histogram_counts_each_observation_once_in_its_bucket() {
        let h = Histogram::default();
        for s in [0.0001, 0.0007, 0.003, 0.003, 20.0, -1.0] {
            h.observe(s);
        }
        let snap = h.snapshot();
        assert_eq!(snap.count, 6);
        let at = |bound: f64| {
            snap.buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, n)| *n)
        };
        assert_eq!(
            at(0.0005),
            Some(2),
            "0.0001 and the negative one (clamped to 0)"
        );
        assert_eq!(at(0.001), Some(3));
        assert_eq!(at(0.005), Some(5));
        assert_eq!(at(10.0), Some(5), "20 s is above every bound");
        assert!((snap.sum - 20.0068).abs() < 1e-3, "{}", snap.sum);
    }

    #[test]
    fn rest_answers_are_counted_by_class() {
        let r = RestCounters::default();
        for s in [
            Some(200),
            Some(204),
            Some(429),
            Some(418),
            Some(404),
            Some(503),
            None,
        ] {
            r.record(s);
        }
        let counts: std::collections::BTreeMap<_, _> = r.counts().into_iter().collect();
        assert_eq!(counts["2xx"], 2);
        assert_eq!((counts["429"], counts["418"], counts["4xx"]), (1, 1, 1));
        assert_eq!((counts["5xx"], counts["error"]), (1, 1));
    }

    #[test]
    fn trouble_keeps_its_first_moment_and_last_error() {
        let t = Trouble::default();
        assert!(t.get().is_none());
        t.fail("one".into());
        let (since, _) = t.get().unwrap();
        t.fail("two".into());
        assert_eq!(t.get(), Some((since, "two".to_string())));
        t.clear();
        assert!(!t.is_failing());
    }
}
