//! The one place socket IO happens for every exchange: connect, keep the exchange's
//! subscriptions equal to what the pool wants (diffed, batched and paced under the exchange's
//! message limit), decode frames through the adapter's session, dispatch events to the hub,
//! detect silent connections and reconnect with jittered exponential backoff.
//!
//! Subscription changes are computed when a control frame may be sent, not when they are asked
//! for, so a storm of client subscribe/unsubscribe collapses into whatever difference remains.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::{
    frame::coding::CloseCode, CloseFrame, WebSocketConfig,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Conn, Decoded, Exchange};
use crate::events::FeedKey;
use crate::hub::Hub;
use crate::protocol::now_millis;
use crate::stats::Stats;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lived this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
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
}

enum Outcome {
    Shutdown,
    /// Nothing is wanted any more.
    Idle,
    Reconnect {
        /// The exchange asked for it (planned cut): no backoff.
        immediate: bool,
    },
}

/// Runs one upstream connection until nothing is wanted on it or the relay shuts down.
pub async fn run(ex: Arc<Exchange>, conn: Arc<Conn>, hub: Weak<Hub>, shutdown: CancellationToken) {
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
                let error = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                ex.stats.failing.store(true, Ordering::Relaxed);
                Stats::add(&ex.stats.connect_failures, 1);
                let wait = backoff.next_delay();
                tracing::warn!(%exchange, conn = conn.id, %error, retry_in_ms = wait.as_millis() as u64, "upstream connect failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(wait) => continue,
                }
            }
        };
        ex.stats.failing.store(false, Ordering::Relaxed);
        tracing::info!(%exchange, conn = conn.id, streams = names.len(), "upstream connected");
        let initial: BTreeMap<String, FeedKey> = wanted.into_iter().take(in_url).collect();
        let started = Instant::now();
        conn.connected.store(true, Ordering::Relaxed);
        let outcome = session(&ex, &conn, &hub, &shutdown, ws, initial).await;
        conn.connected.store(false, Ordering::Relaxed);
        conn.active().clear();
        if started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Idle => continue,
            Outcome::Reconnect { immediate: true } => continue,
            Outcome::Reconnect { immediate: false } => {
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
    let mut proto = ex.adapter.new_session();
    let (mut sink, mut stream) = ws.split();
    // Streams requested on this socket, with the feed each one carries.
    let mut requested = initial;
    conn.active().extend(requested.keys().cloned());
    let mut next_control = Instant::now();
    let mut dirty = true;
    let mut last_rx = Instant::now();
    let mut decoded = Vec::new();
    let age_deadline = limits
        .max_connection_age
        .map(|age| Instant::now() + age)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let mut watchdog = tokio::time::interval(limits.stale_after / 4);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "relay shutting down".into() }));
                let _ = timeout(Duration::from_secs(1), sink.send(close)).await;
                return Outcome::Shutdown;
            }
            frame = stream.next() => {
                last_rx = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        ex.stats.last_message_at.set(now_millis());
                        let Some(hub) = hub.upgrade() else { return Outcome::Shutdown };
                        Stats::add(&hub.stats.messages_in, 1);
                        decoded.clear();
                        if let Err(error) = proto.decode(text.as_str(), &mut decoded) {
                            Stats::add(&ex.stats.decode_errors, 1);
                            tracing::warn!(%exchange, conn = conn.id, %error, "undecodable upstream frame ignored");
                        }
                        for d in decoded.drain(..) {
                            match d {
                                Decoded::Event { stream, event } => {
                                    if let Some(key) = requested.get(&stream) {
                                        hub.dispatch(key, event);
                                    }
                                }
                                Decoded::Ack => {}
                                Decoded::Rejected(why) => {
                                    Stats::add(&ex.stats.rejected_requests, 1);
                                    tracing::warn!(%exchange, conn = conn.id, %why, "exchange refused a request");
                                }
                                Decoded::Reconnect(why) => {
                                    tracing::info!(%exchange, conn = conn.id, %why, "exchange asked for a reconnect");
                                    return Outcome::Reconnect { immediate: true };
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        tracing::warn!(%exchange, conn = conn.id, ?frame, "exchange closed the connection");
                        return Outcome::Reconnect { immediate: false };
                    }
                    Some(Ok(_)) => {} // pings are answered by tungstenite; binary is not used
                    Some(Err(error)) => {
                        tracing::warn!(%exchange, conn = conn.id, %error, "upstream connection failed");
                        return Outcome::Reconnect { immediate: false };
                    }
                    None => {
                        tracing::warn!(%exchange, conn = conn.id, "upstream connection ended");
                        return Outcome::Reconnect { immediate: false };
                    }
                }
            }
            _ = conn.notify.notified() => dirty = true,
            _ = sleep_until(next_control), if dirty => {
                let desired = conn.desired().streams.clone();
                if desired.is_empty() {
                    let _ = timeout(SEND_TIMEOUT, sink.send(Message::Close(None))).await;
                    return Outcome::Idle;
                }
                let max = limits.max_streams_per_message;
                let to_sub: Vec<String> = desired.keys().filter(|s| !requested.contains_key(*s)).take(max).cloned().collect();
                let (frame, n) = if !to_sub.is_empty() {
                    for s in &to_sub {
                        if let Some(key) = desired.get(s) {
                            requested.insert(s.clone(), key.clone());
                        }
                    }
                    conn.active().extend(to_sub.iter().cloned());
                    (proto.subscribe(&to_sub), to_sub.len())
                } else {
                    let to_unsub: Vec<String> = requested.keys().filter(|s| !desired.contains_key(*s)).take(max).cloned().collect();
                    if to_unsub.is_empty() {
                        dirty = false;
                        continue;
                    }
                    for s in &to_unsub {
                        requested.remove(s);
                        conn.active().remove(s);
                    }
                    (proto.unsubscribe(&to_unsub), to_unsub.len())
                };
                tracing::debug!(%exchange, conn = conn.id, streams = n, "subscription change sent");
                match timeout(SEND_TIMEOUT, sink.send(Message::text(frame))).await {
                    Ok(Ok(())) => {}
                    _ => return Outcome::Reconnect { immediate: false },
                }
                next_control = Instant::now() + limits.control_spacing;
            }
            _ = watchdog.tick() => {
                if last_rx.elapsed() > limits.stale_after {
                    tracing::warn!(%exchange, conn = conn.id, silent_ms = last_rx.elapsed().as_millis() as u64, "upstream silent; replacing the connection");
                    return Outcome::Reconnect { immediate: true };
                }
            }
            _ = sleep_until(age_deadline) => {
                tracing::info!(%exchange, conn = conn.id, "connection reached its maximum age; renewing it");
                return Outcome::Reconnect { immediate: true };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
