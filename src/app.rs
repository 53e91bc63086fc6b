//! State shared by the HTTP handlers and the client sessions: the configuration, the hub,
//! the exchanges, counters, the authenticator and the connection caps. Its own module so that
//! `http` (which spawns sessions) and `session` (which uses the state) do not import each other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::domain::UserId;
use crate::exchange::Upstreams;
use crate::hub::Hub;
use crate::stats::Stats;

/// Shared by every handler and session; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub config: Config,
    pub hub: Arc<Hub>,
    /// The exchange side, for health, readiness, stats and shutdown.
    pub upstreams: Arc<Upstreams>,
    /// The cluster this relay is a node of (`[cluster] redis_url`), if any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub stats: Arc<Stats>,
    /// `GET /metrics`: reads the same counters as `stats` at scrape time.
    pub metrics: crate::metrics::Metrics,
    /// The keys tokens and publish requests are checked with; replaced on SIGHUP.
    pub auth: Arc<Auth>,
    pub conns: ConnTracker,
    /// Connections per user, for `server.max_connections_per_user`.
    pub users: UserConns,
    /// Live client sessions; shutdown waits for them to finish.
    pub clients: TaskTracker,
    pub shutdown: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: AppInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

/// Counts WebSocket connections per IP and in total, for the caps, and paces new ones per IP.
pub struct ConnTracker {
    inner: Arc<Mutex<TrackerState>>,
    max_total: usize,
    max_per_ip: usize,
    connect_rate: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Upgrades since the rate limiter last forgot idle IPs.
    since_prune: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct TrackerState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one connection's place; released on drop, however the session ends.
pub struct ConnGuard {
    inner: Arc<Mutex<TrackerState>>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnTracker {
    pub fn new(max_total: usize, max_per_ip: usize, connects_per_second: u32) -> ConnTracker {
        let rate =
            std::num::NonZeroU32::new(connects_per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        ConnTracker {
            inner: Arc::new(Mutex::new(TrackerState::default())),
            max_total,
            max_per_ip,
            connect_rate: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            since_prune: std::sync::atomic::AtomicU32::new(0),
        }
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        // Forget IPs that have been quiet, so the limiter's memory tracks active clients only.
        if self.since_prune.fetch_add(1, Ordering::Relaxed) >= 10_000 {
            self.since_prune.store(0, Ordering::Relaxed);
            self.connect_rate.retain_recent();
        }
        if self.connect_rate.check_key(&ip).is_err() {
            return Err(Refusal::Rate);
        }
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = st.per_ip.entry(ip).or_default();
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        st.total += 1;
        Ok(ConnGuard {
            inner: self.inner.clone(),
            ip,
        })
    }
}

/// Why an upgrade was refused before it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` reached: 503.
    Total,
    /// `server.max_connections_per_ip` reached: 429.
    PerIp,
    /// `server.max_connects_per_ip_per_second` exceeded: 429.
    Rate,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "relay connection limit",
            Refusal::PerIp => "per-address connection limit",
            Refusal::Rate => "per-address connect rate",
        }
    }
}

/// Counts connections per user (JWT `sub`) on this node and, in a cluster, across the nodes
/// (the cluster keeps each node's counts in Redis; while Redis is unreachable each node
/// applies the cap to its own connections).
pub struct UserConns {
    inner: Arc<Mutex<HashMap<UserId, usize>>>,
    max: Option<usize>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Holds one connection's place in its user's count; released on drop.
pub struct UserSlot {
    inner: Arc<Mutex<HashMap<UserId, usize>>>,
    user: UserId,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl UserSlot {
    pub fn user(&self) -> &UserId {
        &self.user
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.user);
            }
        }
        drop(map);
        if let Some(c) = &self.cluster {
            c.user_left(&self.user);
        }
    }
}

/// A user already holds `limit` connections (`held` of them counted where the check ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimit {
    pub limit: usize,
    pub held: usize,
}

impl UserConns {
    pub fn new(max: Option<usize>, cluster: Option<Arc<crate::cluster::Cluster>>) -> UserConns {
        UserConns {
            inner: Arc::new(Mutex::new(HashMap::new())),
            max,
            cluster,
        }
    }

    /// A place for one more connection of `user`; `None` when there is no cap (nothing is
    /// counted then).
    pub async fn acquire(&self, user: &UserId) -> Result<Option<UserSlot>, UserLimit> {
        let Some(limit) = self.max else {
            return Ok(None);
        };
        // Taken locally first (so two connections racing on this node cannot both pass), then
        // checked against the cluster's count.
        {
            let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(user.clone()).or_default();
            if *n >= limit {
                return Err(UserLimit { limit, held: *n });
            }
            *n += 1;
        }
        let mut slot = UserSlot {
            inner: self.inner.clone(),
            user: user.clone(),
            cluster: None,
        };
        if let Some(cluster) = &self.cluster {
            match cluster.user_joined(user, limit).await {
                Ok(Ok(())) => slot.cluster = Some(cluster.clone()),
                // Dropping the slot gives this node's place back.
                Ok(Err(held)) => return Err(UserLimit { limit, held }),
                // Redis unreachable: this node's own count decides (checked above).
                Err(()) => {}
            }
        }
        Ok(Some(slot))
    }

    /// Connections held by `user` on this node.
    pub fn held(&self, user: &UserId) -> usize {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(user).copied().unwrap_or(0)
    }
}
