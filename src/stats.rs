//! Relay-wide counters, read by `GET /api/v1/ws/stats`. One place per observable event both
//! counts and (where worth it) logs, so figures and logs never disagree.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

pub struct Stats {
    started: Instant,
    /// WebSocket messages received from clients and exchanges.
    pub messages_in: AtomicU64,
    /// Messages queued to clients (data, acks, errors).
    pub messages_out: AtomicU64,
    /// Queued conflatable values replaced by a newer one for a client that fell behind.
    pub conflated: AtomicU64,
    /// Clients closed with 1013 for not keeping up.
    pub slow_consumer_disconnects: AtomicU64,
    /// Requests refused with `RATE_LIMITED`.
    pub rate_limited: AtomicU64,
    /// WebSocket upgrades refused (caps, origin).
    pub rejected_connections: AtomicU64,
    /// Clients ever connected.
    pub total_connections: AtomicU64,
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
        }
    }
}

impl Stats {
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
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
