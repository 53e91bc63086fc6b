//! The upstream side: one sans-IO adapter per exchange (naming, frames, pure normalisation,
//! limits), one generic connection task per upstream socket (in [`connection`]), and the pool
//! that spreads an exchange's wanted streams over as few connections as its limits allow.
//!
//! Exchange spellings (`btcusdt@ticker`, `BTC-USD`, `BTC/USD`) never leave the adapter modules:
//! the rest of the relay speaks [`FeedKey`]s.

pub mod binance;
pub mod book;
pub mod candles;
pub mod coinbase;
pub mod connection;
pub mod kraken;
pub mod proxy;
pub mod rest;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ExchangeConfig};
use crate::decimal::Dec;
use crate::domain::{ExchangeId, Symbol};
use crate::events::{Feed, FeedKey, MarketEvent, Trade};
use crate::hub::{Check, FeedSink, FeedSource, HistoryFuture, HistoryRequest};
use crate::protocol::ErrorCode;
use crate::stats::{Stats, UpstreamStats};

/// How often a loaded instrument list is refreshed.
const INSTRUMENT_REFRESH: Duration = Duration::from_secs(3600);
/// Longest wait between failed instrument fetches.
const INSTRUMENT_RETRY_MAX: Duration = Duration::from_secs(30);
/// A REST call that has not answered by then has failed.
const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// One tradable market as an exchange lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instrument {
    /// The exchange's own spelling (`BTCUSDT`, `BTC-USD`, `BTC/USD`).
    pub native: String,
    /// Base and quote currency, in the relay's spelling (`BTC`, `USD`: Kraken's `XBT` is `BTC`).
    pub base: String,
    pub quote: String,
    /// The exchange's status word, for error messages.
    pub status: String,
    pub tradable: bool,
    /// Decimal places of prices and quantities, where the exchange states them (Kraken's
    /// checksum is computed at these precisions).
    pub price_precision: Option<u32>,
    pub qty_precision: Option<u32>,
    /// The name the exchange's REST API uses, where it differs (Kraken's `XXBTZUSD`).
    pub rest_name: Option<String>,
}

/// An exchange's instrument list keyed by unified symbol.
#[derive(Debug, Clone, Default)]
pub struct InstrumentSet {
    pub by_symbol: HashMap<Symbol, Instrument>,
}

/// Why an exchange frame or REST body could not be used. Never fatal: counted and logged.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// An exchange's RFC 3339 time (`2023-10-06T17:35:55.440295Z`, nanoseconds allowed) as ms
/// since the epoch.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The decimal places of a step size (`"0.01000000"` → 2, `"1"` → 0): the precision an
/// exchange states as a tick or lot.
pub fn step_decimals(step: &str) -> Option<u32> {
    step.parse::<Dec>()
        .ok()
        .filter(|d| !d.is_zero())
        .map(Dec::scale)
}

/// Parses an exchange decimal string (`"0.35280000"`) exactly.
pub fn decimal(field: &'static str, s: &str) -> Result<Dec, DecodeError> {
    s.parse::<Dec>().map_err(|_| DecodeError::Field {
        field,
        reason: format!("'{s}' is not a decimal number"),
    })
}

/// What a connection's [`Protocol`] asks of its connection task: the protocol is sans-IO, so
/// everything it wants done (events dispatched, frames sent, REST fetched, the connection
/// replaced) comes out as one of these.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Market data on one of the connection's streams (the exchange's stream name).
    Event { stream: String, event: MarketEvent },
    /// A subscription request was accepted.
    Ack,
    /// The exchange refused a request; logged and counted.
    Rejected(String),
    /// The exchange refused one stream for good: its subscribers get `code` and are dropped.
    StreamRejected {
        stream: String,
        code: ErrorCode,
        message: String,
    },
    /// The exchange asks us to reconnect (e.g. Binance `serverShutdown`), or the protocol's
    /// state cannot be repaired in place.
    Reconnect(&'static str),
    /// A frame to send, paced under the exchange's message limit, in order.
    Send(String),
    /// A REST GET whose body (or error) comes back through [`Protocol::on_fetched`].
    Fetch { tag: u64, url: String },
    /// An exact seed for the candle of trade-built `stream` forming at `asked_at_ms` (see
    /// [`rest::seed`]), answered through [`Protocol::on_seeded`].
    Seed {
        tag: u64,
        stream: String,
        interval: crate::domain::Interval,
        asked_at_ms: i64,
    },
    /// The book of `stream` was found inconsistent and is being rebuilt from a fresh snapshot
    /// (counted; its cached value is dropped so nobody is served the bad book meanwhile).
    /// `failures` counts this book's run of failed checks; past the first few its resubscribe
    /// is held back `retry_in_ms` (no resync storm).
    Resyncing {
        stream: String,
        why: String,
        failures: u32,
        retry_in_ms: i64,
    },
    /// A book that kept failing verified again for a while: it is healthy.
    BookHealthy { stream: String },
}

/// What a connection's protocol state is given when the connection opens.
#[derive(Clone)]
pub struct ProtocolContext {
    pub instruments: Arc<InstrumentSet>,
}

/// An exchange's limits, as the connection task obeys them.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_streams_per_connection: usize,
    pub max_streams_per_message: usize,
    /// Minimum spacing between the control frames we send (subscription changes).
    pub control_spacing: Duration,
    /// Longest connect URL the exchange accepts, for streams named in the URL.
    pub max_url_len: usize,
    /// No frame at all for this long means the connection is dead.
    pub stale_after: Duration,
    /// Reconnect proactively before the exchange cuts the connection.
    pub max_connection_age: Option<Duration>,
    /// At most this many connection attempts per window, across all of the exchange's
    /// connections (exchanges ban IPs that reconnect too often).
    pub connect_budget: (usize, Duration),
}

/// A connection-attempt budget shared with other relays (a cluster's, kept in Redis), so an
/// exchange's limit holds for every relay behind one egress IP, not for each.
pub trait SharedBudget: Send + Sync + 'static {
    /// Takes one of `max` attempts per `window` at `exchange`; `Some(wait)` when they are
    /// spent, `None` when the attempt may go (or the shared budget cannot be asked: then the
    /// relay's own budget alone applies).
    fn take(
        &self,
        exchange: ExchangeId,
        max: usize,
        window: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Duration>> + Send + '_>>;
}

/// A sliding-window budget of connection attempts.
#[derive(Debug)]
pub struct AttemptBudget {
    max: usize,
    window: Duration,
    attempts: std::collections::VecDeque<tokio::time::Instant>,
}

impl AttemptBudget {
    pub fn new((max, window): (usize, Duration)) -> AttemptBudget {
        AttemptBudget {
            max: max.max(1),
            window,
            attempts: std::collections::VecDeque::new(),
        }
    }

    /// Takes an attempt at `now`, or says how long to wait for one.
    pub fn reserve(&mut self, now: tokio::time::Instant) -> Result<(), Duration> {
        while self
            .attempts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.attempts.pop_front();
        }
        if self.attempts.len() >= self.max {
            let oldest = self.attempts.front().copied().unwrap_or(now);
            return Err(self.window.saturating_sub(now.duration_since(oldest)));
        }
        self.attempts.push_back(now);
        Ok(())
    }
}

/// The static, sans-IO description of one exchange.
pub trait Adapter: Send + Sync + 'static {
    fn id(&self) -> ExchangeId;
    fn limits(&self) -> &Limits;
    /// Whether the exchange can serve `feed` at all (intervals, depths). Every exchange served
    /// now does: each interval is native or built from trades, and depth 5/10/20 fits every
    /// book depth subscribed.
    fn supports(&self, _feed: Feed) -> Result<(), String> {
        Ok(())
    }
    /// The exchange's name for the stream of `feed` on `instrument`.
    fn stream_name(&self, feed: Feed, instrument: &Instrument) -> String;
    /// The URL to connect to, with as many of `initial` streams in it as fit; returns how many.
    /// By default the base URL, with every stream subscribed after connecting.
    fn connect_url(&self, ws_base: &str, _initial: &[String]) -> (String, usize) {
        (ws_base.to_string(), 0)
    }
    /// Per-connection protocol state.
    fn new_protocol(&self, ctx: ProtocolContext) -> Box<dyn Protocol>;
    /// Streams that may share one subscribe frame have the same group (Coinbase allows one
    /// channel per message; Kraken one channel and parameter set).
    fn batch_group<'a>(&self, _stream: &'a str) -> &'a str {
        ""
    }
    /// Where the instrument list is fetched from.
    fn instruments_url(&self, rest_base: &str) -> String;
    /// A note for a person who asked for `symbol`, which the exchange does not list (an
    /// exchange's own spelling the relay does not use, say).
    fn unknown_symbol_hint(&self, _symbol: &str) -> Option<&'static str> {
        None
    }
    /// Parses the instrument list into unified symbols.
    fn parse_instruments(&self, body: &str) -> Result<InstrumentSet, DecodeError>;
}

/// The protocol state of one upstream connection: frames out, events in. No IO: every
/// request to the outside world is an [`Effect`] pushed to `out`.
pub trait Protocol: Send {
    /// Called once the socket is open, before any subscription.
    fn on_connect(&mut self, _now_ms: i64, _out: &mut Vec<Effect>) {}
    /// Subscribes `streams` (one batch group). May send nothing when the exchange already
    /// sends what they need (streams derived from one upstream channel).
    fn subscribe(&mut self, streams: &[String], now_ms: i64, out: &mut Vec<Effect>);
    fn unsubscribe(&mut self, streams: &[String], now_ms: i64, out: &mut Vec<Effect>);
    fn decode(&mut self, text: &str, now_ms: i64, out: &mut Vec<Effect>)
        -> Result<(), DecodeError>;
    /// Called about every [`TICK`]: time-driven work (final candles, keep-alive pings).
    fn on_tick(&mut self, _now_ms: i64, _out: &mut Vec<Effect>) {}
    /// Trades of `stream` fetched after an outage (oldest first, older than the live ones
    /// already decoded): candles built from this market's trades take them too.
    fn backfilled(
        &mut self,
        _stream: &str,
        _trades: &[Trade],
        _now_ms: i64,
        _out: &mut Vec<Effect>,
    ) {
    }
    /// The answer to an [`Effect::Seed`].
    fn on_seeded(
        &mut self,
        _tag: u64,
        _seed: Result<candles::Seed, String>,
        _now_ms: i64,
        _out: &mut Vec<Effect>,
    ) {
    }
    /// The answer to a [`Effect::Fetch`].
    fn on_fetched(
        &mut self,
        _tag: u64,
        _body: Result<String, String>,
        _now_ms: i64,
        _out: &mut Vec<Effect>,
    ) {
    }
}

/// How often [`Protocol::on_tick`] runs.
pub const TICK: Duration = Duration::from_millis(250);

/// One exchange's streams and counters.
#[derive(Debug, Clone)]
pub struct UpstreamSnapshot {
    pub exchange: ExchangeId,
    /// Every wanted connection is open (and there is at least one).
    pub connected: bool,
    pub connections: usize,
    /// The exchange's names of the streams requested on open connections, sorted.
    pub streams: Vec<String>,
    pub counters: crate::stats::UpstreamCounters,
    /// REST answers by status class.
    pub rest: Vec<(&'static str, u64)>,
    pub reconnect: crate::stats::HistogramSnapshot,
}

/// What `/health` says of one exchange's upstream side.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamHealth {
    /// `idle` (nothing wanted, last contact fine), `connecting`, `connected`, `unreachable`.
    pub state: &'static str,
    /// While unreachable: since when (ISO-8601) and the last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub instruments_loaded: bool,
    /// Upstream connections open, and wanted.
    pub connections: usize,
    pub wanted_connections: usize,
    /// Streams requested on open connections.
    pub streams: usize,
    /// Books that keep failing their checks and are resynced ever further apart; the other
    /// symbols are served meanwhile.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing_books: Vec<crate::stats::FailingBook>,
}

/// One upstream connection as the pool sees it.
pub struct Conn {
    pub id: u64,
    desired: Mutex<Desired>,
    /// Wakes the connection task when `desired` changes.
    notify: Notify,
    /// The socket is open.
    pub connected: AtomicBool,
    /// Streams requested on the current socket.
    pub active: Mutex<BTreeSet<String>>,
}

#[derive(Default)]
struct Desired {
    streams: BTreeMap<String, FeedKey>,
    /// The task saw no streams wanted and is leaving; the pool must not add to it.
    closing: bool,
}

impl Conn {
    fn desired(&self) -> MutexGuard<'_, Desired> {
        self.desired.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn active(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The wanted streams, or `None` (and the connection marked closing) when there are none.
    fn wanted_or_close(&self) -> Option<BTreeMap<String, FeedKey>> {
        let mut d = self.desired();
        if d.streams.is_empty() {
            d.closing = true;
            None
        } else {
            Some(d.streams.clone())
        }
    }
}

/// One enabled exchange: adapter, instrument cache, connections.
pub struct Exchange {
    pub adapter: Box<dyn Adapter>,
    pub config: ExchangeConfig,
    /// The instrument list (one entry), replaced by the loader on every refresh. moka gives a
    /// lock-free read on the subscribe path.
    instruments: moka::sync::Cache<(), Arc<InstrumentSet>>,
    conns: Mutex<Pool>,
    pub stats: UpstreamStats,
    /// For REST calls the protocol asks for.
    pub http: reqwest::Client,
    /// Connection attempts, shared by all of this exchange's connections.
    pub attempts: Mutex<AttemptBudget>,
    /// Whom `wss://` trusts (see [`tls`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The proxy the environment names for the WebSocket connections (see [`proxy`]).
    pub proxy: Arc<proxy::ProxyEnv>,
    /// History and backfill requests, paced under the exchange's REST limits (see [`rest`]).
    pub rest_pace: governor::DefaultDirectRateLimiter,
    /// Trades streams that carry on a tape another relay read (a cluster's takeover): the
    /// newest trade it had, so the first connection to carry the stream backfills after it.
    resumes: Mutex<HashMap<FeedKey, rest::Seen>>,
}

/// An exchange's connections and which one carries each wanted stream.
#[derive(Default)]
struct Pool {
    conns: Vec<Arc<Conn>>,
    /// Which connection carries each wanted feed, under which stream name.
    assigned: HashMap<FeedKey, (Arc<Conn>, String)>,
    next_id: u64,
}

/// Where [`Pool::place`] put a stream.
enum Placed {
    /// On a connection that is already running (its task is told).
    Existing,
    /// On a new connection, whose task the caller starts.
    New(Arc<Conn>),
}

impl Pool {
    /// Puts `key`'s stream `name` on the first connection with room (fewest connections,
    /// at most `max` streams each), or on a new one. `None` when it is placed already.
    fn place(&mut self, key: &FeedKey, name: String, max: usize) -> Option<Placed> {
        if self.assigned.contains_key(key) {
            return None;
        }
        // A leaving connection takes nothing more; a new one replaces it.
        self.conns.retain(|c| !c.desired().closing);
        let existing = self
            .conns
            .iter()
            .find(|c| c.desired().streams.len() < max)
            .cloned();
        let (conn, placed) = match existing {
            Some(c) => {
                c.desired().streams.insert(name.clone(), key.clone());
                c.notify.notify_one();
                (c, Placed::Existing)
            }
            None => {
                self.next_id += 1;
                let conn = Arc::new(Conn {
                    id: self.next_id,
                    desired: Mutex::new(Desired::default()),
                    notify: Notify::new(),
                    connected: AtomicBool::new(false),
                    active: Mutex::new(BTreeSet::new()),
                });
                conn.desired().streams.insert(name.clone(), key.clone());
                self.conns.push(conn.clone());
                (conn.clone(), Placed::New(conn))
            }
        };
        self.assigned.insert(key.clone(), (conn, name));
        Some(placed)
    }

    /// Takes `key`'s stream off its connection (whose task is told).
    fn remove(&mut self, key: &FeedKey) {
        if let Some((conn, name)) = self.assigned.remove(key) {
            conn.desired().streams.remove(&name);
            conn.notify.notify_one();
        }
    }
}

impl Exchange {
    /// Where a resumed trades stream's tape ends (taken once, by the connection carrying it).
    pub fn take_resume(&self, key: &FeedKey) -> Option<rest::Seen> {
        self.resumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exchange's limit, or the operator's lower one.
    pub fn max_streams_per_connection(&self) -> usize {
        let max = self.adapter.limits().max_streams_per_connection;
        self.config
            .max_streams_per_connection
            .map_or(max, |configured| configured.min(max))
    }

    pub fn instruments(&self) -> Option<Arc<InstrumentSet>> {
        self.instruments.get(&())
    }

    /// Every stream requested on an open socket, how many connections are up, and how many
    /// are wanted (a connection whose streams all went is leaving, and no longer counts).
    pub fn active_streams(&self) -> (Vec<String>, usize, usize) {
        let pool = self.pool();
        let mut streams = Vec::new();
        let mut up = 0;
        let mut wanted = 0;
        for c in &pool.conns {
            if c.desired().closing {
                continue;
            }
            wanted += 1;
            if c.connected.load(Ordering::Relaxed) {
                up += 1;
                streams.extend(c.active().iter().cloned());
            }
        }
        streams.sort();
        (streams, up, wanted)
    }

    /// The upstream state as it is now, for `/health`.
    pub fn health(&self) -> UpstreamHealth {
        let (streams, up, wanted) = self.active_streams();
        let loaded = self.instruments().is_some();
        // The socket side speaks for itself once it has tried; before the instrument list is
        // in, the REST side does.
        let trouble = self
            .stats
            .ws_trouble
            .get()
            .or_else(|| self.stats.rest_trouble.get().filter(|_| !loaded));
        let state = match (&trouble, loaded) {
            (Some(_), _) => "unreachable",
            (None, false) => "connecting",
            (None, true) if wanted == 0 => "idle",
            (None, true) if up == wanted => "connected",
            (None, true) => "connecting",
        };
        let (since, last_error) = match trouble {
            Some((since, error)) => (Some(crate::protocol::iso_millis(since)), Some(error)),
            None => (None, None),
        };
        UpstreamHealth {
            state,
            since,
            last_error,
            instruments_loaded: loaded,
            connections: up,
            wanted_connections: wanted,
            streams: streams.len(),
            failing_books: self.stats.failing_books(),
        }
    }

    /// A connection task ended: its connection leaves the pool.
    fn forget(&self, conn: &Conn) {
        self.pool().conns.retain(|c| c.id != conn.id);
    }
}

/// All enabled exchanges.
pub struct Upstreams {
    exchanges: Vec<Arc<Exchange>>,
    /// Where events go: the hub, set once by [`Upstreams::start`]. Weak: the hub owns the
    /// source, not the other way round.
    sink: OnceLock<Weak<dyn FeedSink>>,
    /// Connection attempts shared with the other relays of a cluster, if any.
    budget: OnceLock<Arc<dyn SharedBudget>>,
    /// Relay-wide counters (messages in).
    stats: Arc<Stats>,
    http: reqwest::Client,
    shutdown: CancellationToken,
    /// Instrument loaders and connection tasks; shutdown waits for them.
    pub tasks: TaskTracker,
    /// Histories fetched in the last moments, shared by every client asking the same (1,000
    /// charts opening at once cost the exchange one request).
    histories: HistoryCache,
}

type HistoryCache = moka::future::Cache<(FeedKey, usize, Option<i64>), Arc<Vec<MarketEvent>>>;

/// How long a fetched history is shared: long enough for a burst of subscribers, short enough
/// that the relay's own live data covers what changed since.
const HISTORY_TTL: Duration = Duration::from_secs(2);

/// Each exchange's public REST pace for histories and backfills (EXCHANGES.md §9.1): Binance
/// 6,000 weight a minute (trades weigh 25), Coinbase 10 requests a second, Kraken about one.
fn rest_pace(id: ExchangeId) -> governor::DefaultDirectRateLimiter {
    use std::num::NonZeroU32;
    let (per_second, burst) = match id {
        ExchangeId::Binance => (3, 6),
        ExchangeId::Coinbase => (8, 10),
        ExchangeId::Kraken => (1, 3),
    };
    let quota = governor::Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    governor::RateLimiter::direct(quota)
}

/// The adapter of each exchange: the one place adapters are registered (the match is
/// exhaustive, so a new `ExchangeId` cannot miss its adapter).
fn adapter_for(id: ExchangeId) -> Box<dyn Adapter> {
    match id {
        ExchangeId::Binance => Box::new(binance::Binance::new()),
        ExchangeId::Kraken => Box::new(kraken::Kraken::new()),
        ExchangeId::Coinbase => Box::new(coinbase::Coinbase::new()),
    }
}

impl Upstreams {
    /// The exchange side of `config`; fails only when the TLS trust it names cannot be read.
    pub fn new(
        config: &Config,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> Result<Upstreams, String> {
        let trust = tls::Trust::load(config.exchanges.ca_file.as_deref(), tls::ssl_cert_file())?;
        let builder = reqwest::Client::builder()
            .timeout(REST_TIMEOUT)
            .user_agent(concat!("exchange-relay/", env!("CARGO_PKG_VERSION")));
        let http = trust
            .apply(builder)
            .build()
            .map_err(|e| format!("the REST client could not be built: {e}"))?;
        let websocket_tls = trust.websocket.clone();
        let proxy = Arc::new(proxy::ProxyEnv::from_env());
        let exchanges = ExchangeId::ALL
            .into_iter()
            .filter(|id| config.exchanges.get(*id).enabled)
            .map(|id| {
                let adapter = adapter_for(id);
                let budget = AttemptBudget::new(adapter.limits().connect_budget);
                Arc::new(Exchange {
                    attempts: Mutex::new(budget),
                    adapter,
                    config: config.exchanges.get(id).clone(),
                    instruments: moka::sync::Cache::new(1),
                    conns: Mutex::new(Pool::default()),
                    stats: UpstreamStats::new(id),
                    http: http.clone(),
                    tls: websocket_tls.clone(),
                    proxy: proxy.clone(),
                    rest_pace: rest_pace(id),
                    resumes: Mutex::new(HashMap::new()),
                })
            })
            .collect();
        Ok(Upstreams {
            exchanges,
            sink: OnceLock::new(),
            budget: OnceLock::new(),
            stats,
            http,
            shutdown,
            tasks: TaskTracker::new(),
            histories: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(HISTORY_TTL)
                .build(),
        })
    }

    fn sink(&self) -> Weak<dyn FeedSink> {
        match self.sink.get() {
            Some(s) => s.clone(),
            None => Weak::<NoSink>::new(),
        }
    }

    pub fn get(&self, id: ExchangeId) -> Option<&Arc<Exchange>> {
        self.exchanges.iter().find(|e| e.adapter.id() == id)
    }

    /// Each enabled exchange's upstream state, for `/health`.
    pub fn health(&self) -> Vec<(ExchangeId, UpstreamHealth)> {
        self.exchanges
            .iter()
            .map(|ex| (ex.adapter.id(), ex.health()))
            .collect()
    }

    /// An enabled exchange's instrument list, once loaded.
    pub fn instruments(&self, id: ExchangeId) -> Option<Arc<InstrumentSet>> {
        self.get(id)?.instruments()
    }

    /// Enabled exchanges whose instrument list is not loaded yet, for `/ready`.
    pub fn waiting_for_instruments(&self) -> Vec<ExchangeId> {
        self.exchanges
            .iter()
            .filter(|ex| ex.instruments().is_none())
            .map(|ex| ex.adapter.id())
            .collect()
    }

    /// Each enabled exchange's streams and counters, for `/api/v1/ws/stats`.
    pub fn snapshot(&self) -> Vec<UpstreamSnapshot> {
        self.exchanges
            .iter()
            .map(|ex| {
                let (streams, up, wanted) = ex.active_streams();
                UpstreamSnapshot {
                    exchange: ex.adapter.id(),
                    connected: wanted > 0 && up == wanted,
                    connections: up,
                    streams,
                    counters: ex.stats.counters(),
                    rest: ex.stats.rest.counts(),
                    reconnect: ex.stats.reconnect_durations(),
                }
            })
            .collect()
    }

    /// Starts one instrument loader per enabled exchange; events go to `sink` from now on.
    /// Connections open on demand.
    /// Connection attempts count against `budget` too (a cluster's).
    pub fn share_budget(&self, budget: Arc<dyn SharedBudget>) {
        let _ = self.budget.set(budget);
    }

    pub fn start(&self, sink: Weak<dyn FeedSink>) {
        let _ = self.sink.set(sink);
        for ex in &self.exchanges {
            let ex = ex.clone();
            let http = self.http.clone();
            let sink = self.sink();
            let shutdown = self.shutdown.clone();
            self.tasks
                .spawn(async move { load_instruments(ex, http, sink, shutdown).await });
        }
    }
}

impl FeedSource for Upstreams {
    /// Whether `key` can be served now, later, or not at all.
    fn check(&self, key: &FeedKey) -> Check {
        let Some(ex) = self.get(key.exchange) else {
            return Check::Refused(
                ErrorCode::UnknownExchange,
                format!("{} is disabled in this relay's configuration", key.exchange),
            );
        };
        if let Err(why) = ex.adapter.supports(key.feed) {
            return Check::Refused(ErrorCode::Unsupported, why);
        }
        let Some(set) = ex.instruments() else {
            return Check::Pending;
        };
        match set.by_symbol.get(&key.symbol) {
            Some(i) if i.tradable => Check::Known,
            Some(i) => Check::Refused(
                ErrorCode::UnknownSymbol,
                format!(
                    "{} is not trading on {} (status {})",
                    key.symbol, key.exchange, i.status
                ),
            ),
            None => {
                let mut message = format!("Unknown symbol {} on {}", key.symbol, key.exchange);
                let near = suggestions(&set, key.symbol.as_str());
                if !near.is_empty() {
                    let named: Vec<String> = near
                        .iter()
                        .map(|s| format!("{s}@{}", key.exchange))
                        .collect();
                    message.push_str(&format!("; did you mean {}?", named.join(" or ")));
                }
                if let Some(hint) = ex.adapter.unknown_symbol_hint(key.symbol.as_str()) {
                    message.push_str(&format!(" ({hint})"));
                }
                Check::Refused(ErrorCode::UnknownSymbol, message)
            }
        }
    }

    /// Whether data can be expected from the exchange now.
    fn reachable(&self, id: ExchangeId) -> bool {
        self.get(id)
            .is_some_and(|ex| ex.instruments().is_some() && !ex.stats.ws_trouble.is_failing())
    }

    /// Asks the exchange for the stream of `key` (first subscriber arrived).
    fn want(&self, key: &FeedKey) {
        let Some(ex) = self.get(key.exchange) else {
            return;
        };
        let Some(instrument) = ex
            .instruments()
            .and_then(|set| set.by_symbol.get(&key.symbol).cloned())
        else {
            return;
        };
        let name = ex.adapter.stream_name(key.feed, &instrument);
        let max = ex.max_streams_per_connection();
        let Some(Placed::New(conn)) = ex.pool().place(key, name, max) else {
            return;
        };
        let link = connection::Link {
            sink: self.sink(),
            stats: self.stats.clone(),
            shutdown: self.shutdown.clone(),
            budget: self.budget.get().cloned(),
        };
        let ex = ex.clone();
        self.tasks.spawn(async move {
            connection::run(&ex, &conn, link).await;
            ex.forget(&conn);
        });
    }

    /// Drops the stream of `key` (its topic was released).
    fn unwant(&self, key: &FeedKey) {
        let Some(ex) = self.get(key.exchange) else {
            return;
        };
        ex.take_resume(key);
        ex.pool().remove(key);
    }

    fn resume(&self, key: &FeedKey, after_trade: Option<(u64, i64)>) {
        if let (Some(ex), Some((id, time_ms)), Feed::Trades) =
            (self.get(key.exchange), after_trade, key.feed)
        {
            ex.resumes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone(), rest::Seen { id, time_ms });
        }
        self.want(key);
    }

    /// Candles or trades from the exchange's REST API, shared by identical requests.
    fn history(&self, key: &FeedKey, request: HistoryRequest) -> HistoryFuture {
        let ex = self.get(key.exchange).cloned();
        let cache = self.histories.clone();
        let key = key.clone();
        Box::pin(async move {
            let ex = ex.ok_or("the exchange is disabled")?;
            let inst = ex
                .instruments()
                .and_then(|set| set.by_symbol.get(&key.symbol).cloned())
                .ok_or("the exchange's instrument list is not loaded")?;
            // A few sizes, so that small and large requests share; one above the limit, as
            // the hub drops what is newer than its live stream when it joins the two.
            let size = [100, 300, 1000]
                .into_iter()
                .find(|s| *s > request.limit)
                .unwrap_or(1000);
            let fetch = async {
                let events: Vec<MarketEvent> = match key.feed {
                    Feed::Klines(iv) => rest::klines(&ex, &inst, iv, size, request.end_ms)
                        .await?
                        .into_iter()
                        .map(MarketEvent::Kline)
                        .collect(),
                    Feed::Trades => rest::recent_trades(&ex, &inst, size)
                        .await?
                        .into_iter()
                        .map(MarketEvent::Trade)
                        .collect(),
                    Feed::Ticker | Feed::Book => {
                        return Err("only klines and trades have a history".to_string())
                    }
                };
                Ok::<_, String>(Arc::new(events))
            };
            let events = cache
                .try_get_with((key.clone(), size, request.end_ms), fetch)
                .await
                .map_err(|e| e.to_string())?;
            Ok(events.to_vec())
        })
    }
}

/// The sink before [`Upstreams::start`]: nothing to tell.
struct NoSink;

impl FeedSink for NoSink {
    fn events(&self, _: &FeedKey, _: Vec<MarketEvent>) {}
    fn invalidated(&self, _: &FeedKey) {}
    fn refused(&self, _: &FeedKey, _: ErrorCode, _: &str) {}
    fn instruments_loaded(&self, _: ExchangeId) {}
    fn gap(&self, _: &FeedKey, _: crate::protocol::GapReason, _: i64, _: i64) {}
    fn numbered(
        &self,
        _: &crate::hub::TopicKey,
        _: &str,
        _: Vec<(u64, crate::hub::Item)>,
    ) -> usize {
        0
    }
    fn position(&self, _: &crate::hub::TopicKey) -> Option<(Arc<str>, u64)> {
        None
    }
}

/// Quote currencies a symbol is most often mistaken between (a Binance `USDT` market asked of
/// Kraken, which quotes in `USD`).
const QUOTES: [&str; 6] = ["USDT", "USDC", "USD", "EUR", "BTC", "ETH"];

/// Listed markets a person probably meant by an unknown `symbol`: the same base with another
/// common quote, and `BTC` for Kraken's own `XBT`. At most three, in a stable order.
fn suggestions(set: &InstrumentSet, symbol: &str) -> Vec<String> {
    let symbol = match symbol.strip_prefix("XBT") {
        Some(rest) => format!("BTC{rest}"),
        None => symbol.to_string(),
    };
    let base = QUOTES
        .iter()
        .filter_map(|q| symbol.strip_suffix(q))
        .find(|b| !b.is_empty())
        .unwrap_or(symbol.as_str());
    let mut out: Vec<String> = std::iter::once(symbol.clone())
        .chain(QUOTES.iter().map(|q| format!("{base}{q}")))
        .filter(|s| {
            Symbol::parse(s).is_ok_and(|sym| set.by_symbol.get(&sym).is_some_and(|i| i.tradable))
        })
        .collect();
    out.dedup();
    out.truncate(3);
    out
}

/// Loads an exchange's instrument list at start, retries with backoff while it is unreachable,
/// and refreshes it every [`INSTRUMENT_REFRESH`]. Every load resolves pending subscriptions.
async fn load_instruments(
    ex: Arc<Exchange>,
    http: reqwest::Client,
    sink: Weak<dyn FeedSink>,
    shutdown: CancellationToken,
) {
    let id = ex.adapter.id();
    let url = ex.adapter.instruments_url(&ex.config.rest_url);
    let mut backoff = connection::Backoff::new(Duration::from_millis(500), INSTRUMENT_RETRY_MAX);
    loop {
        let wait = match fetch_text(&http, &url, &ex.stats.rest).await {
            Ok(body) => match ex.adapter.parse_instruments(&body) {
                Ok(set) => {
                    ex.stats.instruments_loaded(set.by_symbol.len());
                    ex.instruments.insert((), Arc::new(set));
                    backoff.reset();
                    if let Some(sink) = sink.upgrade() {
                        sink.instruments_loaded(id);
                    }
                    INSTRUMENT_REFRESH
                }
                Err(e) => {
                    ex.stats
                        .instruments_failed(format!("instrument list unusable: {e}"));
                    backoff.next_delay()
                }
            },
            Err(FetchError::RetryAfter(d)) => {
                ex.stats.instruments_failed(format!(
                    "instrument list rate limited; retry after {} s",
                    d.as_secs()
                ));
                d.max(backoff.next_delay())
            }
            Err(e) => {
                ex.stats
                    .instruments_failed(format!("instrument list fetch failed: {e}"));
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> FeedKey {
        FeedKey {
            exchange: ExchangeId::Binance,
            symbol: Symbol::parse(&format!("S{i}USDT")).unwrap(),
            feed: Feed::Trades,
        }
    }

    fn loads(pool: &Pool) -> Vec<usize> {
        pool.conns
            .iter()
            .map(|c| c.desired().streams.len())
            .collect()
    }

    #[test]
    fn the_pool_fills_connections_to_the_cap_before_opening_another() {
        let mut pool = Pool::default();
        let mut new = 0;
        for i in 0..2500 {
            match pool.place(&key(i), format!("s{i}usdt@trade"), 1024) {
                Some(Placed::New(_)) => new += 1,
                Some(Placed::Existing) => {}
                None => panic!("placed twice"),
            }
        }
        assert_eq!(new, 3);
        assert_eq!(loads(&pool), [1024, 1024, 452]);
        assert!(
            pool.place(&key(7), "s7usdt@trade".into(), 1024).is_none(),
            "already placed"
        );
        // Room made on the first connection is used before the third grows.
        for i in 0..10 {
            pool.remove(&key(i));
        }
        assert_eq!(loads(&pool), [1014, 1024, 452]);
        for i in 2500..2510 {
            assert!(matches!(
                pool.place(&key(i), format!("s{i}usdt@trade"), 1024),
                Some(Placed::Existing)
            ));
        }
        assert_eq!(loads(&pool), [1024, 1024, 452]);
    }

    #[test]
    fn a_leaving_connection_takes_nothing_more() {
        let mut pool = Pool::default();
        pool.place(&key(1), "a".into(), 1024);
        pool.remove(&key(1));
        // Its task saw nothing wanted and is closing.
        assert!(pool.conns[0].wanted_or_close().is_none());
        assert!(matches!(
            pool.place(&key(2), "b".into(), 1024),
            Some(Placed::New(_))
        ));
        assert_eq!(pool.conns.len(), 1, "the leaving one is gone from the pool");
        assert_eq!(pool.conns[0].id, 2);
    }

    #[test]
    fn the_attempt_budget_slides() {
        let mut b = AttemptBudget::new((3, Duration::from_secs(10)));
        let t0 = tokio::time::Instant::now();
        for i in 0..3 {
            assert_eq!(b.reserve(t0 + Duration::from_secs(i)), Ok(()));
        }
        // The fourth must wait until the first leaves the window.
        assert_eq!(
            b.reserve(t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        assert_eq!(b.reserve(t0 + Duration::from_secs(10)), Ok(()));
        assert!(b.reserve(t0 + Duration::from_secs(10)).is_err());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// With its causes: reqwest's own text names the URL, its sources say why (a TLS
    /// certificate refused, a connection refused).
    #[error("{}", with_causes(.0))]
    Http(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    /// 429/418: the exchange said when to come back.
    #[error("rate limited; retry after {0:?}")]
    RetryAfter(Duration),
}

/// An error and its chain of causes, on one line.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// GETs `url` as text, honouring 429/418 `Retry-After`; every answer (or its absence) is
/// counted in `rest`.
pub async fn fetch_text(
    http: &reqwest::Client,
    url: &str,
    rest: &crate::stats::RestCounters,
) -> Result<String, FetchError> {
    let resp = match http.get(url).send().await {
        Ok(r) => r,
        Err(e) => {
            rest.record(None);
            return Err(e.into());
        }
    };
    let status = resp.status();
    rest.record(Some(status.as_u16()));
    if status.as_u16() == 429 || status.as_u16() == 418 {
        let secs = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60);
        return Err(FetchError::RetryAfter(Duration::from_secs(secs)));
    }
    if !status.is_success() {
        return Err(FetchError::Status(status));
    }
    Ok(resp.text().await?)
}
