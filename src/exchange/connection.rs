//! The one place socket IO happens for every exchange: connect, keep the exchange's
//! subscriptions equal to what the pool wants (diffed, batched and paced under the exchange's
//! message limit), decode frames through the adapter's protocol state, dispatch events to the hub,
//! detect silent connections and reconnect with jittered exponential backoff.
//!
//! Subscription changes are computed when a control frame may be sent, not when they are asked
//! for, so a storm of client subscribe/unsubscribe collapses into whatever difference remains.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::{
    frame::coding::CloseCode, CloseFrame, WebSocketConfig,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::rest::{self, Seen};
use super::{Conn, Effect, Exchange, Protocol, ProtocolContext, TICK};
use crate::domain::ExchangeId;
use crate::events::{Feed, FeedKey, MarketEvent, Trade};
use crate::hub::FeedSink;
use crate::protocol::{now_millis, GapReason};
use crate::stats::Stats;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Upstream frames decoded together when several have arrived (see the read branch).
const BURST: usize = 64;
/// A connection that lived this long was healthy: the next failure starts the backoff afresh.
/// Short enough that periodic cuts (Binance renewals, exchange restarts) do not escalate the
/// backoff; long enough that a connection dropped right after opening (flapping) does.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// Largest upstream frame accepted (full order-book snapshots can be large).
const MAX_UPSTREAM_MESSAGE: usize = 16 << 20;
/// How long live trades wait for a backfill before it is given up (PROTOCOL.md: at most 30 s).
const BACKFILL_WAIT: Duration = Duration::from_secs(30);
/// A trades stream with no live trade this long after a reconnect is backfilled up to now.
const QUIET_AFTER: Duration = Duration::from_secs(3);

/// The newest trade dispatched per trades feed, kept across a connection's sockets.
#[derive(Default)]
pub struct Tape {
    last: std::collections::HashMap<FeedKey, Seen>,
    /// Open time of the newest final candle dispatched per klines feed.
    last_final: std::collections::HashMap<FeedKey, i64>,
}

/// A klines stream whose candles that closed during an outage are being fetched.
struct KlineRecovery {
    key: FeedKey,
    /// Live candle events waiting for the fetch.
    buffer: Vec<MarketEvent>,
    started: Instant,
}

/// A trades stream catching up after an outage.
struct Recovery {
    key: FeedKey,
    /// The last trade dispatched before the outage.
    after: Seen,
    /// The first live trade after it, once one came.
    first_live: Option<Seen>,
    /// Live trades waiting for the backfill.
    buffer: Vec<Trade>,
    started: Instant,
}

/// Whether an exchange numbers each market's trades 1, 2, 3, ... (EXCHANGES.md §9): then a
/// live trade right after the last one dispatched proves nothing was missed.
fn ids_are_consecutive(exchange: ExchangeId) -> bool {
    match exchange {
        ExchangeId::Binance | ExchangeId::Coinbase => true,
        // Per pair, but not stated to be without holes: always ask.
        ExchangeId::Kraken => false,
    }
}

/// Jittered exponential backoff ("equal jitter": half fixed, half random), so that many
/// connections dropped at once do not come back in lockstep.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let cap = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Skips straight to the longest wait.
    pub fn saturate(&mut self) {
        self.attempt = 16;
    }
}

/// Whether a failed connection attempt is worth a quick retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Network trouble, timeouts, 5xx, 429: retry with the normal backoff.
    Retryable,
    /// The exchange refused us (401/403/404/451...): retrying soon will not help, so the
    /// relay waits the longest backoff between attempts and says so at error level. It never
    /// gives up: a geo-block can be lifted, a misconfigured URL fixed by a redeploy.
    Terminal,
}

pub fn classify(error: &tokio_tungstenite::tungstenite::Error) -> Failure {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Http(resp) => {
            let status = resp.status().as_u16();
            if (400..500).contains(&status) && status != 408 && status != 429 {
                Failure::Terminal
            } else {
                Failure::Retryable
            }
        }
        Error::Url(_) | Error::Tls(_) => Failure::Terminal,
        _ => Failure::Retryable,
    }
}

enum Outcome {
    Shutdown,
    /// Nothing is wanted any more.
    Idle,
    Reconnect {
        /// The exchange asked for it (planned cut) or the connection went silent: no backoff.
        immediate: bool,
        /// What went wrong, for `/health` and the log.
        why: String,
    },
}

impl Outcome {
    fn reconnect(immediate: bool, why: impl Into<String>) -> Outcome {
        Outcome::Reconnect {
            immediate,
            why: why.into(),
        }
    }
}

/// What a connection task needs from the relay besides its exchange: where events go, the
/// relay-wide counters, and the stop signal.
pub struct Link {
    pub sink: Weak<dyn FeedSink>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    /// The cluster's attempt budget, asked before this relay's own.
    pub budget: Option<Arc<dyn super::SharedBudget>>,
}

impl Link {
    /// Sleeps `wait`; false when the relay shuts down first.
    async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = sleep(wait) => true,
        }
    }
}

/// Runs one upstream connection until nothing is wanted on it or the relay shuts down:
/// connect, serve the socket, and after it ends reconnect with backoff.
pub async fn run(ex: &Arc<Exchange>, conn: &Conn, link: Link) {
    let exchange = ex.adapter.id();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut first = true;
    // The newest trade dispatched per trades feed, across this connection's sockets, and when
    // the last socket was lost: where the next socket's backfill starts.
    let mut tape = Tape::default();
    let mut lost_at: Option<i64> = None;
    loop {
        let Some(wanted) = conn.wanted_or_close() else {
            tracing::info!(%exchange, conn = conn.id, "no streams wanted; connection closed");
            return;
        };
        if !first {
            ex.stats.reconnecting();
        }
        first = false;
        if !take_attempt(ex, conn, &link).await {
            return;
        }
        let names: Vec<String> = wanted.keys().cloned().collect();
        let (ws, in_url) = match connect(ex, &names, &link.shutdown).await {
            Connect::Open(ws, in_url) => (ws, in_url),
            Connect::Shutdown => return,
            Connect::Failed(error, kind) => {
                if kind == Failure::Terminal {
                    backoff.saturate();
                }
                let wait = backoff.next_delay();
                let terminal = kind == Failure::Terminal;
                ex.stats
                    .connect_failed(conn.id, &error, terminal, wait.as_millis() as u64);
                if !link.pause(wait).await {
                    return;
                }
                continue;
            }
        };
        ex.stats.connected(conn.id, names.len());
        let initial: BTreeMap<String, FeedKey> = wanted.into_iter().take(in_url).collect();
        let started = Instant::now();
        conn.connected.store(true, Ordering::Relaxed);
        let outcome = serve(ex, conn, &link, *ws, initial, &mut tape, lost_at.take()).await;
        conn.connected.store(false, Ordering::Relaxed);
        lost_at = Some(now_millis());
        conn.active().clear();
        invalidate_books(conn, &link);
        if started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Idle => continue,
            Outcome::Reconnect { immediate, why } => {
                // Until a new connection is up, subscribers are told the exchange is away.
                ex.stats.connection_lost(conn.id, &why, immediate);
                if !immediate {
                    let wait = backoff.next_delay();
                    tracing::info!(%exchange, conn = conn.id, retry_in_ms = wait.as_millis() as u64, "reconnecting");
                    if !link.pause(wait).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits for a connection attempt within the exchange's budget (exchanges ban IPs that
/// reconnect too often, however many connections fail). False when the relay shuts down.
async fn take_attempt(ex: &Exchange, conn: &Conn, link: &Link) -> bool {
    loop {
        if let Some(budget) = &link.budget {
            let (max, window) = ex.adapter.limits().connect_budget;
            if let Some(wait) = budget.take(ex.adapter.id(), max, window).await {
                tracing::warn!(exchange = %ex.adapter.id(), conn = conn.id, wait_ms = wait.as_millis() as u64, "the cluster's connection attempt budget is spent; waiting");
                if !link.pause(wait).await {
                    return false;
                }
                continue;
            }
        }
        let reserved = ex
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(Instant::now());
        let Err(wait) = reserved else { return true };
        tracing::warn!(exchange = %ex.adapter.id(), conn = conn.id, wait_ms = wait.as_millis() as u64, "connection attempt budget spent; waiting");
        if !link.pause(wait).await {
            return false;
        }
    }
}

/// The result of one connect attempt.
enum Connect {
    /// Open, with the first `usize` of the streams already subscribed through the URL.
    Open(Box<Ws>, usize),
    Failed(String, Failure),
    Shutdown,
}

async fn connect(ex: &Exchange, names: &[String], shutdown: &CancellationToken) -> Connect {
    let (url, in_url) = ex.adapter.connect_url(&ex.config.ws_url, names);
    let parsed = url::Url::parse(&url).ok();
    // A failure names the host, so that a TLS refusal says which endpoint (and why).
    let host = parsed
        .as_ref()
        .and_then(|u| {
            u.host_str()
                .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(0)))
        })
        .unwrap_or_default();
    let attempt = timeout(CONNECT_TIMEOUT, open(ex, &url, parsed.as_ref()));
    let result = tokio::select! {
        _ = shutdown.cancelled() => return Connect::Shutdown,
        r = attempt => r,
    };
    match result {
        Ok(Ok(ws)) => Connect::Open(Box::new(ws), in_url),
        Ok(Err(e)) => Connect::Failed(format!("{host}: {e}"), classify(&e)),
        Err(_) => Connect::Failed(format!("{host}: timed out"), Failure::Retryable),
    }
}

/// The WebSocket handshake, directly or through the proxy the environment names.
async fn open(
    ex: &Exchange,
    url: &str,
    parsed: Option<&url::Url>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let config = WebSocketConfig::default().max_message_size(Some(MAX_UPSTREAM_MESSAGE));
    let connector = Some(tokio_tungstenite::Connector::Rustls(ex.tls.clone()));
    let via = parsed.and_then(|u| {
        Some((
            ex.proxy.for_url(u)?,
            u.host_str()?,
            u.port_or_known_default()?,
        ))
    });
    match via {
        None => {
            let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                url,
                Some(config),
                true,
                connector,
            )
            .await?;
            Ok(ws)
        }
        Some((proxy, host, port)) => {
            let stream = super::proxy::tunnel(proxy, host, port).await?;
            let _ = stream.set_nodelay(true);
            let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
                url,
                stream,
                Some(config),
                connector,
            )
            .await?;
            Ok(ws)
        }
    }
}

/// Books held for replay are stale from the moment the socket is gone. (Keys are collected
/// first: the hub's lock order is topic, then connection.)
fn invalidate_books(conn: &Conn, link: &Link) {
    let books: Vec<FeedKey> = conn
        .desired()
        .streams
        .values()
        .filter(|k| k.feed == crate::events::Feed::Book)
        .cloned()
        .collect();
    if let Some(sink) = link.sink.upgrade() {
        for key in &books {
            sink.invalidated(key);
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Whether the socket is kept after an effect, or left with an outcome.
type Flow = ControlFlow<Outcome>;

/// The state of one open socket.
struct Live<'a> {
    ex: &'a Arc<Exchange>,
    conn: &'a Conn,
    link: &'a Link,
    /// The exchange's protocol state for this socket.
    proto: Box<dyn Protocol>,
    /// Effects the protocol asked for, handled after each call into it.
    out: Vec<Effect>,
    /// Streams requested on this socket, with the feed each one carries.
    requested: BTreeMap<String, FeedKey>,
    /// Frames waiting for their turn under the exchange's message limit.
    outgoing: std::collections::VecDeque<String>,
    fetches: tokio::sync::mpsc::Sender<(u64, Result<String, String>)>,
    /// Events decoded and not yet dispatched: a burst of frames read at once goes out together.
    events: Vec<(FeedKey, MarketEvent)>,
    /// The connection's record of the trades it dispatched (see [`Tape`]).
    tape: &'a mut Tape,
    /// When the previous socket was lost: trades streams resume through a backfill.
    outage: Option<i64>,
    opened: Instant,
    /// Trades streams being backfilled, and those done (or never needing it) on this socket.
    recovering: std::collections::HashMap<String, Recovery>,
    resolved: std::collections::HashSet<String>,
    backfills: tokio::sync::mpsc::Sender<(String, Result<rest::Filled, String>)>,
    /// Klines streams whose first candle after an outage was checked, and those catching up on
    /// the candles that closed while the relay was away.
    klines_checked: std::collections::HashSet<String>,
    kline_recovering: std::collections::HashMap<String, KlineRecovery>,
    kline_fills: tokio::sync::mpsc::Sender<(String, Result<Vec<crate::events::Kline>, String>)>,
    seeds: tokio::sync::mpsc::Sender<(u64, Result<super::candles::Seed, String>)>,
    /// Books being rebuilt, since when: the fresh snapshot ends a `book_resync` gap.
    resyncing: std::collections::HashMap<String, i64>,
    /// Forming candles per stream, held for the next [`TICK`] and sent then, the newest only,
    /// whatever the source (Kraken sends its native candle on every trade, ~14 a second on a
    /// busy pair; a chart needs the candle, not every step of it). Final candles go out at once.
    forming: std::collections::HashMap<String, (FeedKey, MarketEvent)>,
}

impl Live<'_> {
    fn handle(&mut self, d: Effect) -> Flow {
        let conn = self.conn.id;
        match d {
            Effect::Event { stream, event } => {
                if let Some(key) = self.requested.get(&stream).cloned() {
                    self.on_event(stream, key, event);
                }
                return ControlFlow::Continue(());
            }
            _ => self.flush_events(),
        }
        match d {
            Effect::Event { .. } | Effect::Ack => {}
            Effect::Rejected(why) => self.ex.stats.request_refused(conn, None, &why),
            Effect::StreamRejected {
                stream,
                code,
                message,
            } => {
                self.ex.stats.request_refused(conn, Some(&stream), &message);
                if let (Some(key), Some(sink)) =
                    (self.requested.get(&stream), self.link.sink.upgrade())
                {
                    sink.refused(key, code, &message);
                }
            }
            Effect::Reconnect(why) => {
                return ControlFlow::Break(Outcome::reconnect(
                    true,
                    format!("the exchange asked for a reconnect: {why}"),
                ));
            }
            Effect::Send(frame) => self.outgoing.push_back(frame),
            Effect::BookHealthy { stream } => self.ex.stats.book_healthy(&stream),
            Effect::Resyncing {
                stream,
                why,
                failures,
                retry_in_ms,
            } => {
                self.ex
                    .stats
                    .book_resync(conn, &stream, &why, failures, retry_in_ms);
                self.resyncing
                    .entry(stream.clone())
                    .or_insert_with(now_millis);
                if let (Some(key), Some(sink)) =
                    (self.requested.get(&stream), self.link.sink.upgrade())
                {
                    sink.invalidated(key);
                }
            }
            Effect::Seed {
                tag,
                stream,
                interval,
                asked_at_ms,
            } => {
                let inst = self.requested.get(&stream).and_then(|key| {
                    self.ex
                        .instruments()
                        .and_then(|set| set.by_symbol.get(&key.symbol).cloned())
                });
                let (ex, reply) = (self.ex.clone(), self.seeds.clone());
                tokio::spawn(async move {
                    let seed = match inst {
                        Some(inst) => rest::seed(&ex, &inst, interval, asked_at_ms).await,
                        None => Err("the instrument is not in the exchange's list".to_string()),
                    };
                    let _ = reply.send((tag, seed)).await;
                });
            }
            Effect::Fetch { tag, url } => {
                let http = self.ex.http.clone();
                let rest = self.ex.stats.rest.clone();
                let reply = self.fetches.clone();
                tokio::spawn(async move {
                    let body = super::fetch_text(&http, &url, &rest)
                        .await
                        .map_err(|e| e.to_string());
                    // The socket may be gone by now, and its protocol state with it.
                    let _ = reply.send((tag, body)).await;
                });
            }
        }
        ControlFlow::Continue(())
    }

    /// Handles what the protocol asked for since the last call, then dispatches the events.
    fn handle_out(&mut self) -> Flow {
        let mut out = std::mem::take(&mut self.out);
        let mut flow = ControlFlow::Continue(());
        for d in out.drain(..) {
            flow = self.handle(d);
            if flow.is_break() {
                break;
            }
        }
        // The buffer's capacity is kept for the next call.
        self.out = out;
        self.out.clear();
        self.flush_events();
        flow
    }

    /// An event of a stream: trades and candles catch up after an outage first, a rebuilt
    /// book's gap is said, then it is queued ([`Live::queue`]).
    fn on_event(&mut self, stream: String, key: FeedKey, event: MarketEvent) {
        if let MarketEvent::Trade(t) = &event {
            return self.on_trade(stream, key, t.clone());
        }
        if let MarketEvent::Kline(k) = &event {
            let (interval, open_time, is_final) = (k.interval, k.open_time, k.is_final);
            if let Some(r) = self.kline_recovering.get_mut(&stream) {
                r.buffer.push(event);
                return;
            }
            if self.candles_missed(&stream, &key, interval, open_time) {
                self.kline_recovering.insert(
                    stream.clone(),
                    KlineRecovery {
                        key: key.clone(),
                        buffer: vec![event],
                        started: Instant::now(),
                    },
                );
                self.fetch_missed_candles(&stream, &key, interval, open_time);
                return;
            }
            if is_final {
                self.tape.last_final.insert(key.clone(), open_time);
            }
        }
        if let (MarketEvent::Book(b), Some(from)) = (&event, self.resyncing.get(&stream).copied()) {
            // The first book after a resync is the fresh snapshot: what was missed is said,
            // in order, before it.
            self.resyncing.remove(&stream);
            self.flush_events();
            if let Some(sink) = self.link.sink.upgrade() {
                sink.gap(&key, GapReason::BookResync, from, b.time_ms.max(from));
            }
        }
        self.queue(stream, key, event);
    }

    /// Queues an event for dispatch: forming candles are held for the tick (the newest only),
    /// and a final candle supersedes a held forming one of its bucket (or an older one).
    fn queue(&mut self, stream: String, key: FeedKey, event: MarketEvent) {
        match &event {
            MarketEvent::Kline(k) if !k.is_final => {
                self.forming.insert(stream, (key, event));
            }
            MarketEvent::Kline(k) => {
                if matches!(self.forming.get(&stream), Some((_, MarketEvent::Kline(h))) if h.open_time <= k.open_time)
                {
                    self.forming.remove(&stream);
                }
                self.events.push((key, event));
            }
            _ => self.events.push((key, event)),
        }
    }

    /// A live trade. Once per id, in exchange order: after an outage a trades stream's live
    /// trades wait (at most [`BACKFILL_WAIT`]) while the trades made meanwhile are fetched
    /// from the exchange's REST API; what cannot be had becomes an `upstream_outage` gap.
    fn on_trade(&mut self, stream: String, key: FeedKey, t: Trade) {
        let seen = Seen {
            id: t.order(),
            time_ms: t.time_ms,
        };
        if let Some(r) = self.recovering.get_mut(&stream) {
            if seen.id > r.after.id {
                r.buffer.push(t);
                if r.first_live.is_none() {
                    r.first_live = Some(seen);
                    self.start_backfill(&stream);
                }
            }
            return;
        }
        let mut last = self.tape.last.get(&key).copied();
        let mut outage = self.outage;
        if last.is_none() {
            // A stream carrying on another relay's tape (a cluster's takeover): the trades
            // since its last one come first, as after an outage of this connection.
            if let Some(seen) = self.ex.take_resume(&key) {
                self.tape.last.insert(key.clone(), seen);
                self.resolved.remove(&stream);
                last = Some(seen);
                outage = Some(seen.time_ms);
            }
        }
        if last.is_some_and(|l| seen.id <= l.id) {
            return; // already dispatched (a resubscribe's snapshot, a resend)
        }
        if let (Some(_), Some(after), false) = (outage, last, self.resolved.contains(&stream)) {
            if seen.id > after.id + 1 || !ids_are_consecutive(key.exchange) {
                self.recovering.insert(
                    stream.clone(),
                    Recovery {
                        key,
                        after,
                        first_live: Some(seen),
                        buffer: vec![t],
                        started: Instant::now(),
                    },
                );
                self.start_backfill(&stream);
                return;
            }
            self.resolved.insert(stream.clone());
        }
        self.tape.last.insert(key.clone(), seen);
        self.events.push((key, MarketEvent::Trade(t)));
    }

    /// Fetches the trades between a recovering stream's last dispatched trade and its first
    /// live one (or now, on a quiet market).
    fn start_backfill(&mut self, stream: &str) {
        let Some(r) = self.recovering.get(stream) else {
            return;
        };
        let Some(inst) = self
            .ex
            .instruments()
            .and_then(|set| set.by_symbol.get(&r.key.symbol).cloned())
        else {
            return;
        };
        let (ex, after, before) = (self.ex.clone(), r.after, r.first_live);
        let (reply, stream) = (self.backfills.clone(), stream.to_string());
        tokio::spawn(async move {
            let filled = rest::trades_between(&ex, &inst, after, before).await;
            let _ = reply.send((stream, filled)).await;
        });
    }

    /// A backfill's answer: the trades it found, in order, then what could not be had as a
    /// gap, then the live trades that waited.
    fn on_backfill(&mut self, stream: String, filled: Result<rest::Filled, String>) -> Flow {
        let Some(r) = self.recovering.remove(&stream) else {
            return ControlFlow::Continue(());
        };
        self.resolved.insert(stream.clone());
        self.flush_events();
        let before = r.first_live.map(|f| f.id);
        let (found, complete) = match filled {
            Ok(f) => (f.trades, f.complete),
            Err(e) => {
                tracing::warn!(exchange = %self.ex.adapter.id(), %stream, error = %e, "trade backfill failed");
                (Vec::new(), false)
            }
        };
        let mut trades: Vec<Trade> = found
            .into_iter()
            .filter(|t| t.order() > r.after.id && before.is_none_or(|b| t.order() < b))
            .collect();
        self.ex.stats.backfilled(trades.len() as u64, complete);
        let mut frames = Vec::new();
        self.proto
            .backfilled(&stream, &trades, now_millis(), &mut frames);
        let mut live = r.buffer;
        live.sort_by_key(Trade::order);
        trades.extend(live);
        let mut newest = r.after;
        let mut out = Vec::with_capacity(trades.len());
        for t in trades {
            let id = t.order();
            if id > newest.id {
                newest = Seen {
                    id,
                    time_ms: t.time_ms,
                };
                out.push(t);
            }
        }
        if !complete {
            // The gap goes where the tape breaks: at the first hole in the ids where they are
            // consecutive, else just before the live trades.
            let live_at = out
                .iter()
                .position(|t| before.is_some_and(|b| t.order() >= b))
                .unwrap_or(out.len());
            let split = if ids_are_consecutive(r.key.exchange) {
                let mut prev = r.after.id;
                out.iter()
                    .position(|t| {
                        let id = t.order();
                        let hole = id != prev + 1;
                        prev = id;
                        hole
                    })
                    .unwrap_or(live_at)
            } else {
                live_at
            };
            // From the disconnect, or the trade before the hole if later, to the first trade
            // after it: the first and last moment trades may be missing.
            let prev = match split {
                0 => r.after.time_ms,
                i => out[i - 1].time_ms,
            };
            let from = self.outage.map_or(prev, |lost| lost.max(prev));
            let to = out
                .get(split)
                .map(|t| t.time_ms)
                .or(r.first_live.map(|f| f.time_ms))
                .unwrap_or_else(now_millis);
            let live_part = out.split_off(split);
            self.events.extend(
                out.into_iter()
                    .map(|t| (r.key.clone(), MarketEvent::Trade(t))),
            );
            self.flush_events();
            if let Some(sink) = self.link.sink.upgrade() {
                sink.gap(&r.key, GapReason::UpstreamOutage, from, to.max(from));
            }
            out = live_part;
        }
        self.tape.last.insert(r.key.clone(), newest);
        self.events.extend(
            out.into_iter()
                .map(|t| (r.key.clone(), MarketEvent::Trade(t))),
        );
        self.out.extend(frames);
        self.handle_out()
    }

    /// Whether candles of `stream` closed while the relay was away: the first candle after an
    /// outage opens later than the one after the last final candle dispatched.
    fn candles_missed(
        &mut self,
        stream: &str,
        key: &FeedKey,
        interval: crate::domain::Interval,
        open_time: i64,
    ) -> bool {
        if self.outage.is_none() || !self.klines_checked.insert(stream.to_string()) {
            return false;
        }
        let Some(last) = self.tape.last_final.get(key).copied() else {
            return false;
        };
        let (_, last_close) = crate::domain::bucket(interval, last);
        let next = crate::domain::bucket(interval, last_close + 1).0;
        open_time > next
    }

    /// Fetches the candles that closed between the last final one dispatched and `open_time`.
    fn fetch_missed_candles(
        &mut self,
        stream: &str,
        key: &FeedKey,
        interval: crate::domain::Interval,
        open_time: i64,
    ) {
        let after = self.tape.last_final.get(key).copied().unwrap_or(open_time);
        let inst = self
            .ex
            .instruments()
            .and_then(|set| set.by_symbol.get(&key.symbol).cloned());
        let (ex, reply, stream) = (
            self.ex.clone(),
            self.kline_fills.clone(),
            stream.to_string(),
        );
        // Enough rows for the outage (at most the history's 1,000).
        let span = interval.fixed_millis().unwrap_or(28 * 86_400_000).max(1);
        let limit = (((open_time - after) / span) as usize + 2).min(1000);
        tokio::spawn(async move {
            let candles = match inst {
                Some(inst) => rest::klines(&ex, &inst, interval, limit, Some(open_time - 1))
                    .await
                    .map(|c| {
                        c.into_iter()
                            .filter(|k| {
                                k.is_final && k.open_time > after && k.open_time < open_time
                            })
                            .collect()
                    }),
                None => Err("the instrument is not in the exchange's list".to_string()),
            };
            let _ = reply.send((stream, candles)).await;
        });
    }

    /// The candles that closed during an outage, final and in order, before the live ones that
    /// waited; when they cannot be had, an `upstream_outage` gap says so.
    fn on_kline_fill(
        &mut self,
        stream: String,
        candles: Result<Vec<crate::events::Kline>, String>,
    ) -> Flow {
        let Some(r) = self.kline_recovering.remove(&stream) else {
            return ControlFlow::Continue(());
        };
        self.flush_events();
        match candles {
            Ok(found) => {
                for k in found {
                    self.tape.last_final.insert(r.key.clone(), k.open_time);
                    self.events.push((r.key.clone(), MarketEvent::Kline(k)));
                }
            }
            Err(e) => {
                tracing::warn!(exchange = %self.ex.adapter.id(), %stream, error = %e, "candles of the outage could not be fetched");
                let from = self.outage.unwrap_or_else(now_millis);
                let to = r
                    .buffer
                    .first()
                    .map_or_else(now_millis, |e| e.time_ms())
                    .max(from);
                if let Some(sink) = self.link.sink.upgrade() {
                    sink.gap(&r.key, GapReason::UpstreamOutage, from, to);
                }
            }
        }
        for event in r.buffer {
            if let MarketEvent::Kline(k) = &event {
                if k.is_final {
                    self.tape.last_final.insert(r.key.clone(), k.open_time);
                }
            }
            self.queue(stream.clone(), r.key.clone(), event);
        }
        self.handle_out()
    }

    /// Trades streams that had no live trade since the socket opened are backfilled up to
    /// now; a backfill that takes too long is given up (the live trades waited enough).
    fn check_backfills(&mut self) -> Flow {
        if self.outage.is_none() {
            return ControlFlow::Continue(());
        }
        if self.opened.elapsed() >= QUIET_AFTER {
            let quiet: Vec<(String, FeedKey)> = self
                .requested
                .iter()
                .filter(|(s, k)| {
                    k.feed == Feed::Trades
                        && !self.resolved.contains(*s)
                        && !self.recovering.contains_key(*s)
                })
                .map(|(s, k)| (s.clone(), k.clone()))
                .collect();
            for (stream, key) in quiet {
                match self.tape.last.get(&key).copied() {
                    Some(after) => {
                        self.recovering.insert(
                            stream.clone(),
                            Recovery {
                                key,
                                after,
                                first_live: None,
                                buffer: Vec::new(),
                                started: Instant::now(),
                            },
                        );
                        self.start_backfill(&stream);
                    }
                    None => {
                        self.resolved.insert(stream);
                    }
                }
            }
        }
        let late: Vec<String> = self
            .recovering
            .iter()
            .filter(|(_, r)| r.started.elapsed() >= BACKFILL_WAIT)
            .map(|(s, _)| s.clone())
            .collect();
        for stream in late {
            self.on_backfill(stream, Err("no answer in time".into()))?;
        }
        let late: Vec<String> = self
            .kline_recovering
            .iter()
            .filter(|(_, r)| r.started.elapsed() >= BACKFILL_WAIT)
            .map(|(s, _)| s.clone())
            .collect();
        for stream in late {
            self.on_kline_fill(stream, Err("no answer in time".into()))?;
        }
        ControlFlow::Continue(())
    }

    /// Hands the events decoded so far to the hub, each feed's in one burst (in order within
    /// a feed), so a client gets a burst in one write.
    fn flush_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let Some(sink) = self.link.sink.upgrade() else {
            self.events.clear();
            return;
        };
        let mut rest = std::mem::take(&mut self.events);
        while let Some((key, _)) = rest.first() {
            let key = key.clone();
            let (mine, others): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| *k == key);
            sink.events(&key, mine.into_iter().map(|(_, e)| e).collect());
            rest = others;
        }
        self.events = rest;
    }

    /// Streams named in the connect URL are subscribed already: the protocol is told, and
    /// the frames it would send for them are dropped.
    fn start(&mut self, initial: BTreeMap<String, FeedKey>) -> Flow {
        self.proto.on_connect(now_millis(), &mut self.out);
        if !initial.is_empty() {
            let names: Vec<String> = initial.keys().cloned().collect();
            let mut told = Vec::new();
            self.proto.subscribe(&names, now_millis(), &mut told);
            told.retain(|d| !matches!(d, Effect::Send(_)));
            self.out.extend(told);
            self.conn.active().extend(names);
            self.requested = initial;
        }
        self.handle_out()
    }

    /// One frame from the exchange, and whatever else has already arrived with it (up to
    /// [`BURST`] frames): when the relay falls behind, clients get the backlog in one write
    /// each, not one apiece.
    fn on_frames(
        &mut self,
        first: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        stream: &mut futures_util::stream::SplitStream<Ws>,
    ) -> Flow {
        let mut next = Some(first);
        let mut taken = 0;
        let mut leave = None;
        while let Some(frame) = next.take() {
            match frame {
                Some(Ok(Message::Text(text))) => {
                    let now = now_millis();
                    self.ex.stats.frame_received(now);
                    self.link.stats.message_in();
                    if let Err(error) = self.proto.decode(text.as_str(), now, &mut self.out) {
                        self.ex.stats.decode_error(self.conn.id, &error);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = match &frame {
                        Some(f) => format!(
                            "the exchange closed the connection ({} {})",
                            u16::from(f.code),
                            f.reason
                        ),
                        None => "the exchange closed the connection".to_string(),
                    };
                    leave = Some(Outcome::reconnect(false, why));
                    break;
                }
                Some(Ok(_)) => {} // pings are answered by tungstenite; binary is not used
                Some(Err(error)) => {
                    leave = Some(Outcome::reconnect(
                        false,
                        format!("connection failed: {error}"),
                    ));
                    break;
                }
                None => {
                    leave = Some(Outcome::reconnect(false, "the connection ended"));
                    break;
                }
            }
            taken += 1;
            if taken < BURST {
                next = stream.next().now_or_never();
            }
        }
        self.handle_out()?;
        match leave {
            Some(o) => ControlFlow::Break(o),
            None => ControlFlow::Continue(()),
        }
    }

    fn on_seeded(&mut self, tag: u64, seed: Result<super::candles::Seed, String>) -> Flow {
        self.proto.on_seeded(tag, seed, now_millis(), &mut self.out);
        self.handle_out()
    }

    fn on_fetched(&mut self, tag: u64, body: Result<String, String>) -> Flow {
        self.proto
            .on_fetched(tag, body, now_millis(), &mut self.out);
        self.handle_out()
    }

    fn on_tick(&mut self) -> Flow {
        self.proto.on_tick(now_millis(), &mut self.out);
        self.handle_out()?;
        self.check_backfills()?;
        // After the protocol's own tick, so that candles it built this tick go now.
        self.release_forming();
        ControlFlow::Continue(())
    }

    /// The tick: the held forming candles go out, for streams still requested.
    fn release_forming(&mut self) {
        for (stream, held) in self.forming.drain() {
            if self.requested.contains_key(&stream) {
                self.events.push(held);
            }
        }
        self.flush_events();
    }

    /// A control frame may be sent now: the next queued one, or, when none waits, the next
    /// step towards the wanted subscriptions (so a storm collapses into what remains).
    /// Returns the frame to send, if any, and whether subscriptions may still differ.
    fn control_slot(
        &mut self,
        limits: &super::Limits,
    ) -> ControlFlow<Outcome, (Option<String>, bool)> {
        let mut dirty = true;
        if self.outgoing.is_empty() {
            let desired = self.conn.desired().streams.clone();
            if desired.is_empty() {
                return ControlFlow::Break(Outcome::Idle);
            }
            dirty = sync_step(self, &desired, limits);
            self.handle_out()?;
        }
        ControlFlow::Continue((self.outgoing.pop_front(), dirty))
    }
}

/// Serves one open socket: keeps its subscriptions equal to what the pool wants, decodes
/// frames, runs the protocol's clock, watches for silence, and renews it when it gets old.
async fn serve(
    ex: &Arc<Exchange>,
    conn: &Conn,
    link: &Link,
    ws: Ws,
    initial: BTreeMap<String, FeedKey>,
    tape: &mut Tape,
    outage: Option<i64>,
) -> Outcome {
    let mut limits = ex.adapter.limits().clone();
    if let Some(ms) = ex.config.stale_timeout_ms {
        limits.stale_after = Duration::from_millis(ms);
    }
    let ctx = ProtocolContext {
        instruments: ex.instruments().unwrap_or_default(),
    };
    let (mut sink, mut stream) = ws.split();
    let (fetch_tx, mut fetch_rx) = tokio::sync::mpsc::channel(256);
    let (backfill_tx, mut backfill_rx) = tokio::sync::mpsc::channel(64);
    let (kline_tx, mut kline_rx) = tokio::sync::mpsc::channel(64);
    let (seed_tx, mut seed_rx) = tokio::sync::mpsc::channel(64);
    let mut live = Live {
        ex,
        conn,
        link,
        proto: ex.adapter.new_protocol(ctx),
        out: Vec::new(),
        requested: BTreeMap::new(),
        outgoing: std::collections::VecDeque::new(),
        fetches: fetch_tx,
        events: Vec::new(),
        forming: std::collections::HashMap::new(),
        tape,
        outage,
        opened: Instant::now(),
        recovering: std::collections::HashMap::new(),
        resolved: std::collections::HashSet::new(),
        backfills: backfill_tx,
        klines_checked: std::collections::HashSet::new(),
        kline_recovering: std::collections::HashMap::new(),
        kline_fills: kline_tx,
        seeds: seed_tx,
        resyncing: std::collections::HashMap::new(),
    };
    if let ControlFlow::Break(o) = live.start(initial) {
        return o;
    }
    let mut next_control = Instant::now();
    let mut dirty = true;
    let mut last_rx = Instant::now();
    let age_deadline = limits
        .max_connection_age
        .map(|age| Instant::now() + age)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let mut watchdog = tokio::time::interval(limits.stale_after / 4);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let can_send = dirty || !live.outgoing.is_empty();
        let flow = tokio::select! {
            biased;
            _ = link.shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "relay shutting down".into() }));
                let _ = timeout(Duration::from_secs(1), sink.send(close)).await;
                ControlFlow::Break(Outcome::Shutdown)
            }
            frame = stream.next() => {
                last_rx = Instant::now();
                live.on_frames(frame, &mut stream)
            }
            Some((tag, body)) = fetch_rx.recv() => live.on_fetched(tag, body),
            Some((stream, filled)) = backfill_rx.recv() => live.on_backfill(stream, filled),
            Some((stream, candles)) = kline_rx.recv() => live.on_kline_fill(stream, candles),
            Some((tag, seed)) = seed_rx.recv() => live.on_seeded(tag, seed),
            _ = conn.notify.notified() => {
                dirty = true;
                ControlFlow::Continue(())
            }
            _ = sleep_until(next_control), if can_send => match live.control_slot(&limits) {
                ControlFlow::Break(Outcome::Idle) => {
                    let _ = timeout(SEND_TIMEOUT, sink.send(Message::Close(None))).await;
                    ControlFlow::Break(Outcome::Idle)
                }
                ControlFlow::Break(o) => ControlFlow::Break(o),
                ControlFlow::Continue((frame, still_dirty)) => {
                    dirty = still_dirty;
                    match frame {
                        None => ControlFlow::Continue(()),
                        Some(frame) => match timeout(SEND_TIMEOUT, sink.send(Message::text(frame))).await {
                            Ok(Ok(())) => {
                                next_control = Instant::now() + limits.control_spacing;
                                ControlFlow::Continue(())
                            }
                            _ => ControlFlow::Break(Outcome::reconnect(false, "a subscription frame could not be sent")),
                        },
                    }
                }
            },
            _ = tick.tick() => live.on_tick(),
            _ = watchdog.tick() => {
                if last_rx.elapsed() > limits.stale_after {
                    let silent_ms = last_rx.elapsed().as_millis() as u64;
                    ControlFlow::Break(Outcome::reconnect(true, format!("no frame for {silent_ms} ms; replacing the connection")))
                } else {
                    ControlFlow::Continue(())
                }
            }
            _ = sleep_until(age_deadline) => {
                ControlFlow::Break(Outcome::reconnect(true, "planned renewal (maximum connection age)"))
            }
        };
        if let ControlFlow::Break(o) = flow {
            return o;
        }
    }
}

/// Moves the socket one batch closer to `desired`: subscribes missing streams first (clients
/// are waiting for them), then drops unwanted ones, one batch group at a time. Returns false
/// when nothing differs.
fn sync_step(
    live: &mut Live<'_>,
    desired: &BTreeMap<String, FeedKey>,
    limits: &super::Limits,
) -> bool {
    let adapter = &live.ex.adapter;
    let max = limits.max_streams_per_message;
    let batch = |names: Vec<&String>| -> Vec<String> {
        let Some(group) = names.first().map(|s| adapter.batch_group(s)) else {
            return Vec::new();
        };
        names
            .into_iter()
            .filter(|s| adapter.batch_group(s) == group)
            .take(max)
            .cloned()
            .collect()
    };
    let to_sub = batch(
        desired
            .keys()
            .filter(|s| !live.requested.contains_key(*s))
            .collect(),
    );
    if !to_sub.is_empty() {
        for s in &to_sub {
            if let Some(key) = desired.get(s) {
                live.requested.insert(s.clone(), key.clone());
            }
        }
        live.conn.active().extend(to_sub.iter().cloned());
        tracing::debug!(exchange = %adapter.id(), conn = live.conn.id, streams = to_sub.len(), "subscribing");
        live.proto.subscribe(&to_sub, now_millis(), &mut live.out);
        return true;
    }
    let to_unsub = batch(
        live.requested
            .keys()
            .filter(|s| !desired.contains_key(*s))
            .collect(),
    );
    if to_unsub.is_empty() {
        return false;
    }
    for s in &to_unsub {
        live.requested.remove(s);
        live.conn.active().remove(s);
    }
    tracing::debug!(exchange = %adapter.id(), conn = live.conn.id, streams = to_unsub.len(), "unsubscribing");
    live.proto
        .unsubscribe(&to_unsub, now_millis(), &mut live.out);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_terminal_and_trouble_is_retryable() {
        use tokio_tungstenite::tungstenite::http::Response;
        use tokio_tungstenite::tungstenite::Error;
        let http = |code: u16| {
            Error::Http(Box::new(
                Response::builder().status(code).body(None).unwrap(),
            ))
        };
        assert_eq!(classify(&http(451)), Failure::Terminal, "geo-blocked");
        assert_eq!(classify(&http(403)), Failure::Terminal);
        assert_eq!(classify(&http(429)), Failure::Retryable);
        assert_eq!(classify(&http(503)), Failure::Retryable);
        assert_eq!(classify(&Error::ConnectionClosed), Failure::Retryable);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(classify(&Error::Io(io)), Failure::Retryable);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        for x in &d[5..] {
            assert!(
                *x >= Duration::from_secs(1) && *x <= Duration::from_secs(2),
                "{x:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
