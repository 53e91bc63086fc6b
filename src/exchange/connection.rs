//! The one place socket IO happens for every exchange: connect, keep the exchange's
//! subscriptions equal to what the pool wants (diffed, batched and paced under the exchange's
//! message limit), decode frames through the adapter's session, dispatch events to the hub,
//! detect silent connections and reconnect with jittered exponential backoff.
//!
//! Subscription changes are computed when a control frame may be sent, not when they are asked
//! for, so a storm of client subscribe/unsubscribe collapses into whatever difference remains.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::{
    frame::coding::CloseCode, CloseFrame, WebSocketConfig,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Conn, Decoded, Exchange, SessionContext, TICK};
use crate::events::{FeedKey, MarketEvent};
use crate::hub::Hub;
use crate::protocol::now_millis;
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
        /// What went wrong, for `/health`.
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

/// Runs one upstream connection until nothing is wanted on it or the relay shuts down.
pub async fn run(ex: &Exchange, conn: &Conn, hub: Weak<Hub>, shutdown: CancellationToken) {
    let exchange = ex.adapter.id();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut first = true;
    loop {
        let Some(wanted) = conn.wanted_or_close() else {
            tracing::info!(%exchange, conn = conn.id, "no streams wanted; connection closed");
            return;
        };
        if !first {
            Stats::add(&ex.stats.reconnects, 1);
        }
        first = false;
        // Never more attempts than the exchange tolerates, however many connections fail.
        loop {
            let reserved = ex
                .attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reserve(Instant::now());
            let Err(wait) = reserved else { break };
            tracing::warn!(%exchange, conn = conn.id, wait_ms = wait.as_millis() as u64, "connection attempt budget spent; waiting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(wait) => {}
            }
        }
        let names: Vec<String> = wanted.keys().cloned().collect();
        let (url, in_url) = ex.adapter.connect_url(&ex.config.ws_url, &names);
        let config = WebSocketConfig::default().max_message_size(Some(MAX_UPSTREAM_MESSAGE));
        let attempt = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
        );
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        let ws = match result {
            Ok(Ok((ws, _))) => ws,
            failure => {
                let (error, kind) = match failure {
                    Ok(Err(e)) => (e.to_string(), classify(&e)),
                    _ => ("timed out".to_string(), Failure::Retryable),
                };
                ex.stats.ws_trouble.fail(format!("connect failed: {error}"));
                Stats::add(&ex.stats.connect_failures, 1);
                if kind == Failure::Terminal {
                    backoff.saturate();
                }
                let wait = backoff.next_delay();
                if kind == Failure::Terminal {
                    tracing::error!(%exchange, conn = conn.id, %error, retry_in_ms = wait.as_millis() as u64, "exchange refused the connection; check the URL, credentials or region (retrying slowly)");
                } else {
                    tracing::warn!(%exchange, conn = conn.id, %error, retry_in_ms = wait.as_millis() as u64, "upstream connect failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(wait) => continue,
                }
            }
        };
        ex.stats.ws_trouble.clear();
        tracing::info!(%exchange, conn = conn.id, streams = names.len(), "upstream connected");
        let initial: BTreeMap<String, FeedKey> = wanted.into_iter().take(in_url).collect();
        let started = Instant::now();
        conn.connected.store(true, Ordering::Relaxed);
        let outcome = session(ex, conn, &hub, &shutdown, ws, initial).await;
        conn.connected.store(false, Ordering::Relaxed);
        conn.active().clear();
        // Books held for replay are stale from the moment the socket is gone.
        // (Keys are collected first: the hub's lock order is topic, then connection.)
        let books: Vec<FeedKey> = conn
            .desired()
            .streams
            .values()
            .filter(|k| k.feed == crate::events::Feed::Book)
            .cloned()
            .collect();
        if let Some(hub) = hub.upgrade() {
            for key in &books {
                hub.invalidate(key);
            }
        }
        if started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        // Until a new connection is up, subscribers are told the exchange is away.
        if let Outcome::Reconnect { why, .. } = &outcome {
            ex.stats.ws_trouble.fail(why.clone());
        }
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Idle => continue,
            Outcome::Reconnect {
                immediate: true, ..
            } => continue,
            Outcome::Reconnect {
                immediate: false, ..
            } => {
                let wait = backoff.next_delay();
                tracing::info!(%exchange, conn = conn.id, retry_in_ms = wait.as_millis() as u64, "reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(wait) => {}
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the connection task does with one [`Decoded`].
enum Step {
    Continue,
    Leave(Outcome),
}

/// The state of one open socket.
struct Live<'a> {
    ex: &'a Exchange,
    conn: &'a Conn,
    hub: &'a Weak<Hub>,
    /// Streams requested on this socket, with the feed each one carries.
    requested: BTreeMap<String, FeedKey>,
    /// Frames waiting for their turn under the exchange's message limit.
    outgoing: std::collections::VecDeque<String>,
    fetches: tokio::sync::mpsc::Sender<(u64, Result<String, String>)>,
    /// Events decoded and not yet dispatched: a burst of frames read at once goes out together.
    events: Vec<(FeedKey, MarketEvent)>,
    /// Forming candles per stream, held for the next [`TICK`] and sent then, the newest only,
    /// whatever the source (Kraken sends its native candle on every trade, ~14 a second on a
    /// busy pair; a chart needs the candle, not every step of it). Final candles go out at once.
    forming: std::collections::HashMap<String, (FeedKey, MarketEvent)>,
}

impl Live<'_> {
    fn handle(&mut self, d: Decoded) -> Step {
        let exchange = self.ex.adapter.id();
        match d {
            Decoded::Event { stream, event } => {
                if let Some(key) = self.requested.get(&stream).cloned() {
                    self.on_event(stream, key, event);
                }
                return Step::Continue;
            }
            _ => self.flush_events(),
        }
        match d {
            Decoded::Event { .. } | Decoded::Ack => {}
            Decoded::Rejected(why) => {
                Stats::add(&self.ex.stats.rejected_requests, 1);
                tracing::warn!(%exchange, conn = self.conn.id, %why, "exchange refused a request");
            }
            Decoded::StreamRejected {
                stream,
                code,
                message,
            } => {
                Stats::add(&self.ex.stats.rejected_requests, 1);
                tracing::warn!(%exchange, conn = self.conn.id, %stream, %message, "exchange refused a stream");
                if let (Some(key), Some(hub)) = (self.requested.get(&stream), self.hub.upgrade()) {
                    hub.reject(key, code, &message);
                }
            }
            Decoded::Reconnect(why) => {
                tracing::info!(%exchange, conn = self.conn.id, %why, "reconnecting");
                return Step::Leave(Outcome::reconnect(
                    true,
                    format!("the exchange asked for a reconnect: {why}"),
                ));
            }
            Decoded::Send(frame) => self.outgoing.push_back(frame),
            Decoded::Resyncing { stream, why } => {
                Stats::add(&self.ex.stats.resyncs, 1);
                tracing::warn!(%exchange, conn = self.conn.id, %stream, %why, "order book resync");
                if let (Some(key), Some(hub)) = (self.requested.get(&stream), self.hub.upgrade()) {
                    hub.invalidate(key);
                }
            }
            Decoded::Fetch { tag, url } => {
                let http = self.ex.http.clone();
                let reply = self.fetches.clone();
                tokio::spawn(async move {
                    let body = super::fetch_text(&http, &url)
                        .await
                        .map_err(|e| e.to_string());
                    // The socket may be gone by now, and its session with it.
                    let _ = reply.send((tag, body)).await;
                });
            }
        }
        Step::Continue
    }

    /// Queues an event for dispatch, holding forming candles for the tick (see `forming`).
    fn on_event(&mut self, stream: String, key: FeedKey, event: MarketEvent) {
        match &event {
            MarketEvent::Kline(k) if !k.is_final => {
                self.forming.insert(stream, (key, event));
            }
            MarketEvent::Kline(k) => {
                // A final candle supersedes a held forming one of its bucket (or an older one).
                if matches!(self.forming.get(&stream), Some((_, MarketEvent::Kline(h))) if h.open_time <= k.open_time)
                {
                    self.forming.remove(&stream);
                }
                self.events.push((key, event));
            }
            _ => self.events.push((key, event)),
        }
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

    fn handle_all(&mut self, out: &mut Vec<Decoded>) -> Step {
        for d in out.drain(..) {
            if let Step::Leave(o) = self.handle(d) {
                return Step::Leave(o);
            }
        }
        self.flush_events();
        Step::Continue
    }

    /// Hands the events decoded so far to the hub, each feed's in one burst (in order within
    /// a feed), so a client gets a burst in one write.
    fn flush_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let Some(hub) = self.hub.upgrade() else {
            self.events.clear();
            return;
        };
        let mut rest = std::mem::take(&mut self.events);
        while let Some((key, _)) = rest.first() {
            let key = key.clone();
            let (mine, others): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| *k == key);
            hub.dispatch(&key, mine.into_iter().map(|(_, e)| e).collect());
            rest = others;
        }
        self.events = rest;
    }
}

async fn session(
    ex: &Exchange,
    conn: &Conn,
    hub: &Weak<Hub>,
    shutdown: &CancellationToken,
    ws: Ws,
    initial: BTreeMap<String, FeedKey>,
) -> Outcome {
    let exchange = ex.adapter.id();
    let mut limits = ex.adapter.limits().clone();
    if let Some(ms) = ex.config.stale_timeout_ms {
        limits.stale_after = Duration::from_millis(ms);
    }
    let ctx = SessionContext {
        rest_url: ex.config.rest_url.clone(),
        instruments: ex.instruments().unwrap_or_default(),
    };
    let mut proto = ex.adapter.new_session(ctx);
    let (mut sink, mut stream) = ws.split();
    let (fetch_tx, mut fetch_rx) = tokio::sync::mpsc::channel(256);
    let mut live = Live {
        ex,
        conn,
        hub,
        requested: BTreeMap::new(),
        outgoing: std::collections::VecDeque::new(),
        fetches: fetch_tx,
        events: Vec::new(),
        forming: std::collections::HashMap::new(),
    };
    let mut out = Vec::new();
    proto.on_connect(now_millis(), &mut out);
    if !initial.is_empty() {
        // Streams named in the connect URL are subscribed already: the session is told, and
        // the frames it would send for them are dropped.
        let names: Vec<String> = initial.keys().cloned().collect();
        let mut told = Vec::new();
        proto.subscribe(&names, now_millis(), &mut told);
        told.retain(|d| !matches!(d, Decoded::Send(_)));
        out.extend(told);
        conn.active().extend(names);
        live.requested = initial;
    }
    if let Step::Leave(o) = live.handle_all(&mut out) {
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
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "relay shutting down".into() }));
                let _ = timeout(Duration::from_secs(1), sink.send(close)).await;
                return Outcome::Shutdown;
            }
            frame = stream.next() => {
                last_rx = Instant::now();
                // Whatever else has arrived is decoded with it (up to BURST frames), so when the
                // relay falls behind, clients get the backlog in one write each, not one apiece.
                let mut next = Some(frame);
                let mut taken = 0;
                let mut leave = None;
                while let Some(frame) = next.take() {
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            ex.stats.last_message_at.set(now_millis());
                            if let Some(h) = hub.upgrade() {
                                Stats::add(&h.stats.messages_in, 1);
                            }
                            if let Err(error) = proto.decode(text.as_str(), now_millis(), &mut out) {
                                Stats::add(&ex.stats.decode_errors, 1);
                                tracing::warn!(%exchange, conn = conn.id, %error, "undecodable upstream frame ignored");
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            tracing::warn!(%exchange, conn = conn.id, ?frame, "exchange closed the connection");
                            let why = match &frame {
                                Some(f) => format!("the exchange closed the connection ({} {})", u16::from(f.code), f.reason),
                                None => "the exchange closed the connection".to_string(),
                            };
                            leave = Some(Outcome::reconnect(false, why));
                            break;
                        }
                        Some(Ok(_)) => {} // pings are answered by tungstenite; binary is not used
                        Some(Err(error)) => {
                            tracing::warn!(%exchange, conn = conn.id, %error, "upstream connection failed");
                            leave = Some(Outcome::reconnect(false, format!("connection failed: {error}")));
                            break;
                        }
                        None => {
                            tracing::warn!(%exchange, conn = conn.id, "upstream connection ended");
                            leave = Some(Outcome::reconnect(false, "the connection ended"));
                            break;
                        }
                    }
                    taken += 1;
                    if taken < BURST {
                        next = stream.next().now_or_never();
                    }
                }
                if let Step::Leave(o) = live.handle_all(&mut out) {
                    return o;
                }
                if let Some(o) = leave {
                    return o;
                }
            }
            Some((tag, body)) = fetch_rx.recv() => {
                proto.on_fetched(tag, body, now_millis(), &mut out);
                if let Step::Leave(o) = live.handle_all(&mut out) {
                    return o;
                }
            }
            _ = conn.notify.notified() => dirty = true,
            _ = sleep_until(next_control), if can_send => {
                if live.outgoing.is_empty() {
                    // Diff only when nothing is waiting, so a storm collapses into what remains.
                    let desired = conn.desired().streams.clone();
                    if desired.is_empty() {
                        let _ = timeout(SEND_TIMEOUT, sink.send(Message::Close(None))).await;
                        return Outcome::Idle;
                    }
                    if !sync_step(&mut live, &mut *proto, &desired, &limits, &mut out) {
                        dirty = false;
                    }
                    if let Step::Leave(o) = live.handle_all(&mut out) {
                        return o;
                    }
                }
                if let Some(frame) = live.outgoing.pop_front() {
                    match timeout(SEND_TIMEOUT, sink.send(Message::text(frame))).await {
                        Ok(Ok(())) => {}
                        _ => return Outcome::reconnect(false, "a subscription frame could not be sent"),
                    }
                    next_control = Instant::now() + limits.control_spacing;
                }
            }
            _ = tick.tick() => {
                proto.on_tick(now_millis(), &mut out);
                if let Step::Leave(o) = live.handle_all(&mut out) {
                    return o;
                }
                // After the session's own tick, so that candles it built this tick go now.
                live.release_forming();
            }
            _ = watchdog.tick() => {
                if last_rx.elapsed() > limits.stale_after {
                    let silent_ms = last_rx.elapsed().as_millis() as u64;
                    tracing::warn!(%exchange, conn = conn.id, silent_ms, "upstream silent; replacing the connection");
                    return Outcome::reconnect(true, format!("no frame for {silent_ms} ms"));
                }
            }
            _ = sleep_until(age_deadline) => {
                tracing::info!(%exchange, conn = conn.id, "connection reached its maximum age; renewing it");
                return Outcome::reconnect(true, "planned renewal (maximum connection age)");
            }
        }
    }
}

/// Moves the socket one batch closer to `desired`: subscribes missing streams first (clients
/// are waiting for them), then drops unwanted ones, one batch group at a time. Returns false
/// when nothing differs.
fn sync_step(
    live: &mut Live<'_>,
    proto: &mut dyn super::Session,
    desired: &BTreeMap<String, FeedKey>,
    limits: &super::Limits,
    out: &mut Vec<Decoded>,
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
        proto.subscribe(&to_sub, now_millis(), out);
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
    proto.unsubscribe(&to_unsub, now_millis(), out);
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
