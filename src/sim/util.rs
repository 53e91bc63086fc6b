//! Small pieces every simulated exchange uses.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// RFC 3339 with microseconds, as Kraken and Coinbase print times.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// What every endpoint answers during a simulated outage.
pub fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "simulated outage").into_response()
}

/// Counts one more subscriber of `key`.
pub fn add_ref(map: &Mutex<HashMap<String, usize>>, key: &str) {
    *lock(map).entry(key.to_string()).or_default() += 1;
}

/// Counts one subscriber of `key` fewer, forgetting keys nobody holds.
pub fn drop_ref(map: &Mutex<HashMap<String, usize>>, key: &str) {
    let mut m = lock(map);
    if let Some(n) = m.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            m.remove(key);
        }
    }
}

/// The exchange's clock: wall time, optionally running `scale` times faster from the moment
/// the simulator started (so a test sees minutes of candles in seconds).
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    origin_ms: i64,
    origin: std::time::Instant,
    scale: f64,
}

impl SimClock {
    pub fn new(scale: f64) -> SimClock {
        SimClock {
            origin_ms: crate::protocol::now_millis(),
            origin: std::time::Instant::now(),
            scale,
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.origin_ms + (self.origin.elapsed().as_secs_f64() * 1000.0 * self.scale) as i64
    }
}

/// Decimal places of a tick or lot size (`0.01` → 2).
pub fn decimals(step: f64) -> usize {
    let s = format!("{step:.10}");
    s.trim_end_matches('0')
        .split_once('.')
        .map_or(0, |(_, f)| f.len())
}

/// Serves `app` on `listener` (TCP_NODELAY, as exchanges send small frames) and runs `market`,
/// both until `stop` is cancelled.
pub fn serve(
    listener: TcpListener,
    app: Router,
    market: impl std::future::Future<Output = ()> + Send + 'static,
    stop: &CancellationToken,
) {
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await;
    });
    tokio::spawn(market);
}
