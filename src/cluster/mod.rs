//! Several relays as one, on Redis (PROTOCOL.md `[cluster]`; README § Running a cluster).
//!
//! The cluster sits at the hub's feed boundary ([`crate::hub::feed`]): to the hub it is the
//! [`FeedSource`], to the exchange connections the [`FeedSink`]. For each exchange stream that
//! any node wants, one node holds a lease in Redis and reads the exchange; it numbers each
//! message (one sequence per topic, carried on from Redis by whoever holds the lease next),
//! hands it to its own hub and publishes it. Every other node that wants the stream follows its
//! pub/sub channel and hands the same numbered messages to its hub. Published channels are
//! numbered by Redis itself. The recovery window of trades, klines and published channels is a
//! bounded Redis stream, so `since` works on any node.
//!
//! When Redis is unreachable a node is *degraded*: it reads every stream it needs from the
//! exchange itself, as a single relay would, and numbers it on its own. When Redis is back,
//! one node takes each lease with a new epoch (the nodes' sequences diverged meanwhile); a node
//! that read the stream itself keeps doing so until the owner's trades overlap its own, then
//! follows the owner, so its clients miss no trade and see none twice.
//!
//! Every Redis call is bounded by a timeout and none is made under a lock the hub takes; the
//! cluster's own state is changed by one task ([`Cluster::run`]), in order.

pub mod keys;
mod users;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::domain::{Channel, ExchangeId};
use crate::events::{Feed, FeedKey, MarketEvent};
use crate::hub::{
    Check, FeedSink, FeedSource, HistoryFuture, HistoryRequest, Item, PrepareFuture, Prepared,
    TopicKey,
};
use crate::protocol::{now_millis, ErrorCode, GapReason};

/// How long a lease lives unless renewed: a dead owner's streams move within about this.
const LEASE: Duration = Duration::from_millis(3_000);
/// How often leases are renewed, free ones tried, and the node's heartbeat written.
const TICK: Duration = Duration::from_millis(500);
/// The longest any Redis call may take before Redis counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How long positions outlive their last use (a stream nobody reads starts a new epoch).
const POSITION_TTL: Duration = Duration::from_secs(600);
/// How long a published channel's sequence and window outlive its last message.
const PUBLISHED_TTL: Duration = Duration::from_secs(86_400);
/// A degraded node following an owner again waits at most this long for the owner's trades
/// to overlap its own.
const SWITCH_WAIT: Duration = Duration::from_secs(10);
/// How long `POST /api/v1/publish` waits for its own message to come back from Redis.
const ECHO_WAIT: Duration = Duration::from_secs(1);

/// What this node does with a stream it wants.
#[derive(Debug, Clone)]
enum Role {
    /// It holds the lease, reads the exchange and publishes.
    Owner { token: u64 },
    /// Another node does; this one applies its messages.
    Follower,
    /// Redis is away: it reads the exchange itself.
    Local,
    /// Redis is back and another node got the lease: it reads the exchange itself until the
    /// owner's messages overlap its own.
    Switching {
        since: Instant,
        /// The owner's batches seen meanwhile, in order.
        held: Vec<Batch>,
    },
}

/// A topic's sequence where this node numbers it (owner, or reading on its own).
#[derive(Debug, Clone)]
struct Pos {
    epoch: Arc<str>,
    seq: u64,
}

struct Stream {
    role: Role,
    /// The node holding the lease, as last seen.
    owner: Option<String>,
    pos: Option<Pos>,
    /// The newest trade applied here (id, ms): where a new owner's backfill starts.
    last_trade: Option<(u64, i64)>,
}

/// A topic's epoch and seq in Redis, what its window holds after a seq, and whether that is
/// all of it.
type Recalled = (Arc<str>, u64, Vec<(u64, Item)>, bool);

/// An entry of a window stream as XRANGE returns it: id, then field/value pairs.
type WindowEntry = (String, Vec<String>);

/// One numbered batch as it travels through Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    /// The publishing node.
    n: String,
    e: String,
    /// The lease token it published under (0 for published channels).
    t: u64,
    /// For a posted message: the id its poster waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    i: Vec<(u64, Item)>,
    /// What the owner's exchange said of the stream beside its messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<Notice>,
}

/// What an owner tells the followers that takes no seq.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Notice {
    /// The stream's current value cannot be vouched for (a book being rebuilt).
    Invalidated,
    /// The exchange refused the stream for good.
    Refused { code: ErrorCode, message: String },
}

enum Cmd {
    Want(FeedKey),
    Unwant(FeedKey),
    Follow(Channel),
    Unfollow(Channel),
    /// Another node gave a lease up: try it now.
    Free(String),
}

enum Sub {
    Subscribe(String),
    Unsubscribe(String),
}

#[derive(Default)]
struct State {
    streams: BTreeMap<FeedKey, Stream>,
    /// The wanted streams by their pub/sub channel (`relay:feed:<id>`).
    wires: HashMap<String, FeedKey>,
    published: HashSet<Channel>,
    /// Numbering for published topics while Redis is away.
    local_pos: HashMap<TopicKey, Pos>,
    redis_up: bool,
    members: Vec<String>,
    lease_changes: u64,
    /// Posted messages waiting for their echo, by message id.
    echoes: HashMap<String, oneshot::Sender<usize>>,
    /// This node's connections per user (`server.max_connections_per_user`), as Redis should
    /// hold them in `relay:users:<node>`.
    users: HashMap<String, u64>,
    /// Heartbeats since the user counts were last written whole.
    beats_since_user_sync: u32,
}

/// What `/health` and the stats endpoint show of the cluster.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSnapshot {
    pub node_id: String,
    pub state: &'static str,
    pub redis: &'static str,
    pub nodes: usize,
    pub members: Vec<String>,
    /// Streams this node wants, with the node that reads each.
    pub streams: BTreeMap<String, StreamView>,
    pub lease_changes: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamView {
    pub owner: Option<String>,
    pub role: &'static str,
    pub epoch: Option<String>,
    pub seq: Option<u64>,
}

/// A posted message's outcome.
pub struct Posted {
    /// This node's subscribers that got it.
    pub delivered: usize,
    /// The relays subscribed to the channel that Redis handed it to (0 when Redis is away:
    /// then it reached this node only).
    pub nodes: usize,
}

/// A batch on its way to Redis (see [`Cluster::publisher`]).
struct Outgoing {
    id: String,
    keys: [String; 3],
    lease_value: String,
    epoch: String,
    last: u64,
    payload: String,
    wire: String,
    keep: bool,
    trade: String,
}

pub struct Cluster {
    me: Weak<Cluster>,
    node: Arc<str>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    /// The exchange connections.
    exchange: Arc<dyn FeedSource>,
    /// The hub, set once by [`Cluster::start`].
    hub: OnceLock<Weak<dyn FeedSink>>,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    state: Mutex<State>,
    cmds: mpsc::UnboundedSender<Cmd>,
    cmd_rx: Mutex<Option<mpsc::UnboundedReceiver<Cmd>>>,
    subs: mpsc::UnboundedSender<Sub>,
    sub_rx: Mutex<Option<mpsc::UnboundedReceiver<Sub>>>,
    window_messages: usize,
    /// Redis calls that failed or timed out (`/metrics`).
    redis_errors: AtomicU64,
    shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Cluster {
    pub fn new(
        config: &Config,
        exchange: Arc<dyn FeedSource>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, String> {
        let client = redis::Client::open(config.cluster.redis_url.trim())
            .map_err(|e| format!("cluster.redis_url: {e}"))?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (subs, sub_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        Ok(Arc::new_cyclic(|me| Cluster {
            me: me.clone(),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            node: Arc::from(config.cluster.node_name()),
            exchange,
            hub: OnceLock::new(),
            client,
            conn: tokio::sync::Mutex::new(None),
            state: Mutex::new(State::default()),
            cmds,
            cmd_rx: Mutex::new(Some(cmd_rx)),
            subs,
            sub_rx: Mutex::new(Some(sub_rx)),
            window_messages: config.recovery.window_messages.max(1),
            redis_errors: AtomicU64::new(0),
            shutdown,
            tasks: TaskTracker::new(),
        }))
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.load(Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hub(&self) -> Option<Arc<dyn FeedSink>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    /// Starts the cluster's tasks, handing messages to `hub`.
    pub fn start(self: &Arc<Self>, hub: Weak<dyn FeedSink>) {
        let _ = self.hub.set(hub);
        let cmd_rx = self.cmd_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let sub_rx = self.sub_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out_rx = self
            .outgoing_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(cmd_rx), Some(sub_rx), Some(out_rx)) = (cmd_rx, sub_rx, out_rx) {
            let me = self.clone();
            self.tasks.spawn(async move { me.run(cmd_rx).await });
            let me = self.clone();
            self.tasks.spawn(async move { me.listen(sub_rx).await });
            let me = self.clone();
            self.tasks.spawn(async move { me.publisher(out_rx).await });
        }
        self.tasks.close();
    }

    /// A connection for one call; `None` when Redis cannot be reached now.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Some(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CALL_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(
            CALL_TIMEOUT * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => {
                *conn = Some(c.clone());
                Some(c)
            }
            _ => None,
        }
    }

    /// Runs one Redis call; a failure drops the connection (the next call reconnects).
    async fn call<T, Fut>(
        &self,
        what: &str,
        build: impl FnOnce(MultiplexedConnection) -> Fut,
    ) -> Option<T>
    where
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.connection().await else {
            self.redis_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let result = tokio::time::timeout(CALL_TIMEOUT, build(conn)).await;
        if !matches!(result, Ok(Ok(_))) {
            self.redis_errors.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(what, error = %e, "redis call failed");
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    *self.conn.lock().await = None;
                }
                None
            }
            Err(_) => {
                tracing::debug!(what, "redis call timed out");
                *self.conn.lock().await = None;
                None
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Option<T> {
        self.call(what, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Option<T> {
        self.call(what, |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        self.call(
            what,
            |mut c| async move { script.invoke_async(&mut c).await },
        )
        .await
    }

    /// The cluster's one state-changing task: commands from the hub, and every [`TICK`] the
    /// heartbeat, lease renewals and attempts.
    async fn run(self: Arc<Self>, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.subs.send(Sub::Subscribe(keys::CONTROL.into())).ok();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                _ = tick.tick() => self.beat().await,
            }
        }
        self.leave().await;
    }

    async fn command(&self, cmd: Cmd) {
        match cmd {
            Cmd::Want(key) => {
                {
                    let mut st = self.state();
                    if st.streams.contains_key(&key) {
                        return;
                    }
                    st.streams.insert(
                        key.clone(),
                        Stream {
                            role: Role::Local,
                            owner: None,
                            pos: None,
                            last_trade: None,
                        },
                    );
                    st.wires
                        .insert(keys::wire(&TopicKey::Feed(key.clone())), key.clone());
                }
                if self.state().redis_up {
                    // Followed first, so nothing the owner publishes from now on is missed.
                    self.state_set_role(&key, Role::Follower);
                    self.subs
                        .send(Sub::Subscribe(keys::wire(&TopicKey::Feed(key.clone()))))
                        .ok();
                    if !self.try_lease(&key, false).await {
                        self.note_owner(&key, &keys::feed_id(&key)).await;
                    }
                    if matches!(self.role(&key), Some(Role::Follower)) {
                        self.catch_up(&TopicKey::Feed(key.clone())).await;
                    }
                } else {
                    self.read_locally(&key);
                }
            }
            Cmd::Unwant(key) => {
                let stream = {
                    let mut st = self.state();
                    st.wires.remove(&keys::wire(&TopicKey::Feed(key.clone())));
                    st.streams.remove(&key)
                };
                let Some(stream) = stream else {
                    return;
                };
                let id = keys::feed_id(&key);
                self.subs
                    .send(Sub::Unsubscribe(keys::wire(&TopicKey::Feed(key.clone()))))
                    .ok();
                if !matches!(stream.role, Role::Follower) {
                    self.exchange.unwant(&key);
                }
                let (me, want) = (self.node.to_string(), keys::want(&id));
                let _: Option<i64> = self
                    .query("zrem want", redis::cmd("ZREM").arg(want).arg(me))
                    .await;
                if let Role::Owner { token } = stream.role {
                    self.give_up(&id, token).await;
                }
            }
            Cmd::Follow(channel) => {
                if self.state().published.insert(channel.clone()) {
                    self.subs
                        .send(Sub::Subscribe(keys::published_wire(&channel)))
                        .ok();
                    self.catch_up(&TopicKey::Published(channel)).await;
                }
            }
            Cmd::Unfollow(channel) => {
                let followed = {
                    let mut st = self.state();
                    // Released here: used again, it starts anew (as a single relay's would).
                    st.local_pos.remove(&TopicKey::Published(channel.clone()));
                    st.published.remove(&channel)
                };
                if followed {
                    self.subs
                        .send(Sub::Unsubscribe(keys::published_wire(&channel)))
                        .ok();
                }
            }
            Cmd::Free(id) => {
                let key = self.state().wires.get(&keys::feed_wire(&id)).cloned();
                if let Some(key) = key {
                    if matches!(self.role(&key), Some(Role::Follower)) {
                        self.try_lease(&key, false).await;
                    }
                }
            }
        }
    }

    fn role(&self, key: &FeedKey) -> Option<Role> {
        self.state().streams.get(key).map(|s| s.role.clone())
    }

    fn state_set_role(&self, key: &FeedKey, role: Role) {
        if let Some(s) = self.state().streams.get_mut(key) {
            s.role = role;
        }
    }

    /// Reads `key` from the exchange on this node alone (Redis away), numbering on from where
    /// this node's hub is.
    fn read_locally(&self, key: &FeedKey) {
        let topic = TopicKey::Feed(key.clone());
        let position = self.hub().and_then(|h| h.position(&topic));
        let seed = {
            let mut st = self.state();
            let Some(s) = st.streams.get_mut(key) else {
                return;
            };
            s.role = Role::Local;
            s.owner = None;
            if s.pos.is_none() {
                s.pos = Some(match position {
                    Some((epoch, seq)) => Pos { epoch, seq },
                    None => Pos {
                        epoch: new_epoch(),
                        seq: 0,
                    },
                });
            }
            s.last_trade
        };
        self.exchange.resume(key, seed);
    }

    /// Tries to take the lease of `key`. `fresh`: this node read the stream on its own while
    /// Redis was away, so it starts a new epoch (the nodes' numbers diverged meanwhile).
    async fn try_lease(&self, key: &FeedKey, fresh: bool) -> bool {
        let id = keys::feed_id(key);
        let Some(token): Option<u64> = self
            .query("incr fence", redis::cmd("INCR").arg(keys::fence(&id)))
            .await
        else {
            return false;
        };
        let got: Option<i64> = self
            .eval(
                "take lease",
                keys::TAKE
                    .key(keys::lease(&id))
                    .arg(self.lease_value(token))
                    .arg(format!("{}|", self.node))
                    .arg(LEASE.as_millis() as u64),
            )
            .await;
        if got != Some(1) {
            return false;
        }
        // The lease is ours: carry the sequence on from Redis (or start one).
        let topic = TopicKey::Feed(key.clone());
        let pos = if fresh {
            let epoch = new_epoch();
            let pos_key = keys::pos(&id);
            let window = keys::window(&id);
            let e = epoch.to_string();
            let _: Option<()> = self
                .pipeline(
                    "new epoch",
                    redis::pipe()
                        .atomic()
                        .cmd("DEL")
                        .arg(window)
                        .ignore()
                        .cmd("HSET")
                        .arg(pos_key)
                        .arg("epoch")
                        .arg(&e)
                        .arg("seq")
                        .arg(0)
                        .ignore(),
                )
                .await;
            Some((Pos { epoch, seq: 0 }, None))
        } else {
            self.read_position(&id).await
        };
        let Some((pos, trade)) = pos else {
            self.give_up(&id, token).await;
            return false;
        };
        tracing::info!(node = %self.node, stream = %id, epoch = %pos.epoch, seq = pos.seq, "took the lease; reading the exchange");
        // The owner's own batches would only come back to it: Redis need not send them.
        self.subs.send(Sub::Unsubscribe(keys::feed_wire(&id))).ok();
        let (was, seed) = {
            let mut st = self.state();
            st.lease_changes += 1;
            let Some(s) = st.streams.get_mut(key) else {
                return false;
            };
            let was = std::mem::replace(&mut s.role, Role::Owner { token });
            s.owner = Some(self.node.to_string());
            // The newest trade this node or Redis knows: the backfill starts after it.
            let seed = match (s.last_trade, trade) {
                (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            s.last_trade = seed;
            s.pos = Some(pos.clone());
            (was, seed)
        };
        if fresh {
            if let Some(hub) = self.hub() {
                hub.numbered(&topic, &pos.epoch, Vec::new());
            }
        }
        if !matches!(was, Role::Local | Role::Switching { .. }) {
            self.exchange.resume(key, seed);
        }
        true
    }

    /// A stream's position and newest trade in Redis (created where missing).
    async fn read_position(&self, id: &str) -> Option<(Pos, Option<(u64, i64)>)> {
        let pos_key = keys::pos(id);
        let epoch = new_epoch().to_string();
        let (e, seq, trade): (String, u64, String) = self
            .eval(
                "position",
                keys::POSITION
                    .key(&pos_key)
                    .arg(epoch)
                    .arg(POSITION_TTL.as_millis() as u64),
            )
            .await?;
        let trade = Some(trade).and_then(|t| {
            let (id, ms) = t.split_once(':')?;
            Some((id.parse().ok()?, ms.parse().ok()?))
        });
        Some((
            Pos {
                epoch: Arc::from(e),
                seq,
            },
            trade,
        ))
    }

    /// What this node writes into a lease it holds under `token`.
    fn lease_value(&self, token: u64) -> String {
        format!("{}|{token}", self.node)
    }

    /// Drops the lease if it is still this node's, and says so on the control channel so an
    /// interested node takes it at once; whether it was this node's.
    async fn release(&self, id: &str, token: u64) -> bool {
        let released: Option<i64> = self
            .eval(
                "release",
                keys::RELEASE
                    .key(keys::lease(id))
                    .arg(self.lease_value(token)),
            )
            .await;
        if released != Some(1) {
            return false;
        }
        let _: Option<i64> = self
            .query(
                "free",
                redis::cmd("PUBLISH")
                    .arg(keys::CONTROL)
                    .arg(format!("free {id}")),
            )
            .await;
        true
    }

    /// Gives a lease up, and tells the others so one takes it at once.
    async fn give_up(&self, id: &str, token: u64) {
        if self.release(id, token).await {
            // Nobody else wants it: the stream is released cluster-wide, a new epoch next time.
            let now = now_millis();
            let want = keys::want(id);
            let others: Option<i64> = self
                .query(
                    "zcount",
                    redis::cmd("ZCOUNT").arg(&want).arg(now).arg("+inf"),
                )
                .await;
            if others == Some(0) {
                let (p, w) = (keys::pos(id), keys::window(id));
                let _: Option<i64> = self
                    .query("forget", redis::cmd("DEL").arg(p).arg(w).arg(want))
                    .await;
            }
        }
    }

    /// Every [`TICK`]: the heartbeat (which also tells whether Redis is up), then each wanted
    /// stream's lease.
    async fn beat(&self) {
        let now = now_millis();
        let expiry = now + LEASE.as_millis() as i64;
        let me = self.node.to_string();
        let wanted: Vec<String> = self.state().streams.keys().map(keys::feed_id).collect();
        let mut p = redis::pipe();
        p.cmd("ZADD").arg(keys::NODES).arg(expiry).arg(&me).ignore();
        p.cmd("ZREMRANGEBYSCORE")
            .arg(keys::NODES)
            .arg("-inf")
            .arg(now)
            .ignore();
        for id in &wanted {
            let want = keys::want(id);
            p.cmd("ZADD").arg(&want).arg(expiry).arg(&me).ignore();
            p.cmd("PEXPIRE")
                .arg(&want)
                .arg(POSITION_TTL.as_millis() as u64)
                .ignore();
        }
        p.cmd("ZRANGE").arg(keys::NODES).arg(0).arg(-1);
        let members: Option<(Vec<String>,)> = self.pipeline("heartbeat", &p).await;
        let Some((members,)) = members else {
            self.degrade();
            return;
        };
        let was_up = {
            let mut st = self.state();
            st.members = members;
            std::mem::replace(&mut st.redis_up, true)
        };
        if !was_up {
            tracing::info!(node = %self.node, "redis reachable: joining the cluster");
        }
        self.keep_users(!was_up).await;
        let streams: Vec<(FeedKey, Role)> = self
            .state()
            .streams
            .iter()
            .map(|(k, s)| (k.clone(), s.role.clone()))
            .collect();
        for (key, role) in streams {
            let id = keys::feed_id(&key);
            match role {
                Role::Owner { token } => {
                    let value = self.lease_value(token);
                    let (l, p, w) = (keys::lease(&id), keys::pos(&id), keys::window(&id));
                    let renewed: Option<i64> = self
                        .eval(
                            "renew",
                            keys::RENEW
                                .key(l)
                                .key(p)
                                .key(w)
                                .arg(value)
                                .arg(LEASE.as_millis() as u64)
                                .arg(POSITION_TTL.as_millis() as u64),
                        )
                        .await;
                    if renewed == Some(0) {
                        // Another node holds it now (this one stalled past the lease).
                        tracing::warn!(node = %self.node, stream = %id, "lease lost; following its new owner");
                        self.exchange.unwant(&key);
                        {
                            let mut st = self.state();
                            st.lease_changes += 1;
                            if let Some(s) = st.streams.get_mut(&key) {
                                s.role = Role::Follower;
                                s.pos = None;
                            }
                        }
                        self.subs.send(Sub::Subscribe(keys::feed_wire(&id))).ok();
                        self.catch_up(&TopicKey::Feed(key.clone())).await;
                    }
                }
                Role::Follower => {
                    if !self.try_lease(&key, false).await {
                        self.note_owner(&key, &id).await;
                    }
                }
                Role::Local => {
                    // Redis is back. Whoever takes the lease starts a new epoch; the others
                    // keep reading until its messages overlap theirs.
                    self.subs
                        .send(Sub::Subscribe(keys::wire(&TopicKey::Feed(key.clone()))))
                        .ok();
                    if !self.try_lease(&key, true).await {
                        self.state_set_role(
                            &key,
                            Role::Switching {
                                since: Instant::now(),
                                held: Vec::new(),
                            },
                        );
                        self.note_owner(&key, &id).await;
                    }
                }
                Role::Switching { since, .. } => {
                    // Nobody took the lease (its holder died meanwhile): this node, which
                    // reads the stream already, does.
                    if !self.try_lease(&key, true).await && since.elapsed() >= SWITCH_WAIT {
                        self.switch(&key);
                    }
                }
            }
        }
    }

    async fn note_owner(&self, key: &FeedKey, id: &str) {
        let lease = keys::lease(id);
        let holder: Option<Option<String>> =
            self.query("get lease", redis::cmd("GET").arg(lease)).await;
        if let Some(holder) = holder {
            let owner = holder.map(|h| h.split('|').next().unwrap_or_default().to_string());
            if let Some(s) = self.state().streams.get_mut(key) {
                s.owner = owner;
            }
        }
    }

    /// Redis did not answer: every stream this node wants is read here until it is back.
    fn degrade(&self) {
        let followed: Vec<FeedKey> = {
            let mut st = self.state();
            if st.redis_up {
                tracing::warn!(node = %self.node, "redis unreachable: reading the exchanges on this node alone");
            }
            st.redis_up = false;
            st.members.clear();
            st.streams
                .iter()
                .filter(|(_, s)| !matches!(s.role, Role::Local))
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in followed {
            match self.role(&key) {
                Some(Role::Follower) => self.read_locally(&key),
                Some(_) => {
                    // An owner (or one switching) already reads the exchange.
                    let mut st = self.state();
                    if let Some(s) = st.streams.get_mut(&key) {
                        s.role = Role::Local;
                        s.owner = None;
                    }
                }
                None => {}
            }
        }
    }

    /// A switching node follows the owner from now on: its own reading stops, and the owner's
    /// batches held meanwhile are applied (the hub skips the trades it already sent).
    fn switch(&self, key: &FeedKey) {
        let held = {
            let mut st = self.state();
            let Some(s) = st.streams.get_mut(key) else {
                return;
            };
            let Role::Switching { held, .. } = std::mem::replace(&mut s.role, Role::Follower)
            else {
                return;
            };
            s.pos = None;
            held
        };
        self.exchange.unwant(key);
        tracing::info!(node = %self.node, stream = %keys::feed_id(key), "following the stream's owner again");
        let topic = TopicKey::Feed(key.clone());
        for batch in held {
            self.apply(&topic, batch);
        }
    }

    /// After (re)subscribing to a topic: what was published before the subscription took,
    /// from the window, so the topic goes on without a hole.
    async fn catch_up(&self, topic: &TopicKey) {
        let Some(hub) = self.hub() else {
            return;
        };
        let id = keys::topic_id(topic);
        let Some((epoch, seq)) = hub.position(topic) else {
            return;
        };
        if !keys::keeps(topic) {
            return;
        }
        let Some((e, _, items, _)) = self.recall(&id, seq).await else {
            return;
        };
        if *e == *epoch && !items.is_empty() {
            hub.numbered(topic, &e, items);
        }
    }

    /// The topic's position in Redis and what its window holds after `after`, and whether that
    /// is everything after it.
    async fn recall(&self, id: &str, after: u64) -> Option<Recalled> {
        let (pos_key, window) = (keys::pos(id), keys::window(id));
        let epoch = new_epoch().to_string();
        let start = format!("{}-0", after.saturating_add(1));
        let (e, seq, entries): (String, u64, Vec<WindowEntry>) = self
            .eval(
                "recall",
                keys::RECALL
                    .key(&pos_key)
                    .key(&window)
                    .arg(epoch)
                    .arg(POSITION_TTL.as_millis() as u64)
                    .arg(start),
            )
            .await?;
        let mut items: Vec<(u64, Item)> = Vec::new();
        for (_, fields) in entries {
            let Some(raw) = fields.get(1) else { continue };
            match serde_json::from_str::<Batch>(raw) {
                Ok(b) if b.e == e => items.extend(b.i.into_iter().filter(|(n, _)| *n > after)),
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(stream = %id, error = %err, "unreadable window entry in redis; skipped")
                }
            }
        }
        items.sort_by_key(|(n, _)| *n);
        items.dedup_by_key(|(n, _)| *n);
        let complete = seq <= after
            || items
                .iter()
                .enumerate()
                .all(|(i, (n, _))| *n == after + 1 + i as u64)
                && items.last().is_some_and(|(n, _)| *n >= seq);
        Some((Arc::from(e), seq, items, complete))
    }

    /// The pub/sub side: one subscriber connection, re-established (and every subscription
    /// with it) whenever it drops.
    async fn listen(self: Arc<Self>, mut subs: mpsc::UnboundedReceiver<Sub>) {
        let mut names: HashSet<String> = HashSet::new();
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let pubsub =
                tokio::time::timeout(CALL_TIMEOUT * 2, self.client.get_async_pubsub()).await;
            let Ok(Ok(pubsub)) = pubsub else {
                // Take what the hub asked meanwhile, then wait.
                while let Ok(s) = subs.try_recv() {
                    track(&mut names, s);
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            backoff = Duration::from_millis(200);
            let (mut sink, mut stream) = pubsub.split();
            let mut ok = true;
            for name in &names {
                if sink.subscribe(name).await.is_err() {
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            // What was published while the subscriber was away comes from the windows.
            self.resync().await;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    s = subs.recv() => {
                        let Some(s) = s else { return };
                        let result = match &s {
                            Sub::Subscribe(n) if !names.contains(n) => sink.subscribe(n).await,
                            Sub::Unsubscribe(n) if names.contains(n) => sink.unsubscribe(n).await,
                            _ => Ok(()),
                        };
                        track(&mut names, s);
                        if result.is_err() {
                            break;
                        }
                    }
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        self.received(msg.get_channel_name(), msg.get_payload_bytes()).await;
                    }
                }
            }
            tracing::warn!(node = %self.node, "redis subscriber connection lost; reconnecting");
        }
    }

    /// Fills every followed topic from its window (after the subscriber reconnected).
    async fn resync(&self) {
        let topics: Vec<TopicKey> = {
            let st = self.state();
            st.streams
                .iter()
                .filter(|(_, s)| matches!(s.role, Role::Follower))
                .map(|(k, _)| TopicKey::Feed(k.clone()))
                .chain(st.published.iter().cloned().map(TopicKey::Published))
                .collect()
        };
        for topic in topics {
            self.catch_up(&topic).await;
        }
    }

    /// A pub/sub message.
    async fn received(&self, channel: &str, payload: &[u8]) {
        if channel == keys::CONTROL {
            if let Some(id) = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.strip_prefix("free "))
            {
                self.cmds.send(Cmd::Free(id.to_string())).ok();
            }
            return;
        }
        let batch = || match serde_json::from_slice::<Batch>(payload) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(%channel, error = %e, "unreadable message from redis; skipped");
                None
            }
        };
        let topic = if let Some(name) = channel.strip_prefix(keys::PUBLISHED_WIRE) {
            match name.parse::<Channel>() {
                Ok(c) => TopicKey::Published(c),
                Err(_) => return,
            }
        } else {
            let (key, role) = {
                let st = self.state();
                let Some(key) = st.wires.get(channel) else {
                    return;
                };
                (key.clone(), st.streams.get(key).map(|s| s.role.clone()))
            };
            match role {
                Some(Role::Follower) => {}
                Some(Role::Switching { .. }) => {
                    if let Some(batch) = batch() {
                        self.hold(&key, batch);
                    }
                    return;
                }
                // This node's own batch (it applied it already), or one it reads itself:
                // not even parsed.
                _ => return,
            }
            TopicKey::Feed(key)
        };
        let Some(batch) = batch() else {
            return;
        };
        // A hole (a message lost on the way): fill it from the window first.
        if let (Some(hub), Some((n, _))) = (self.hub(), batch.i.first()) {
            if let Some((epoch, seq)) = hub.position(&topic) {
                if *epoch == *batch.e && *n > seq + 1 {
                    self.catch_up(&topic).await;
                }
            }
        }
        self.apply(&topic, batch);
    }

    /// Holds an owner's batch while this node still reads the stream itself; switches once
    /// the owner's trades reach back to this node's newest (or at once, for other feeds).
    fn hold(&self, key: &FeedKey, batch: Batch) {
        let ready = {
            let mut st = self.state();
            let Some(s) = st.streams.get_mut(key) else {
                return;
            };
            let mine = s.last_trade.map(|t| t.0);
            let Role::Switching { held, .. } = &mut s.role else {
                return;
            };
            held.push(batch);
            // The held batches are in order: their first trade is the owner's oldest.
            let oldest_theirs = held
                .iter()
                .flat_map(|b| &b.i)
                .find_map(|(_, item)| trade_of(item))
                .map(|t| t.0);
            key.feed != Feed::Trades
                || match (mine, oldest_theirs) {
                    (None, _) => true,
                    (Some(m), Some(o)) => o <= m,
                    (Some(_), None) => false,
                }
        };
        if ready {
            self.switch(key);
        }
    }

    fn apply(&self, topic: &TopicKey, batch: Batch) {
        let Some(hub) = self.hub() else {
            return;
        };
        if let (TopicKey::Feed(key), Some(notice)) = (topic, &batch.x) {
            match notice {
                Notice::Invalidated => hub.invalidated(key),
                Notice::Refused { code, message } => hub.refused(key, *code, message),
            }
        }
        if let TopicKey::Feed(key) = topic {
            let newest = newest_trade(&batch.i);
            if let (Some(t), Some(s)) = (newest, self.state().streams.get_mut(key)) {
                s.last_trade = Some(t);
            }
        }
        let echo = batch.m.clone();
        let delivered = hub.numbered(topic, &batch.e, batch.i);
        if let Some(m) = echo {
            if let Some(tx) = self.state().echoes.remove(&m) {
                let _ = tx.send(delivered);
            }
        }
    }

    /// Numbers what this node reads from the exchange, hands it to the hub and, as the
    /// stream's owner, publishes it.
    fn own(&self, key: &FeedKey, items: Vec<Item>) {
        let topic = TopicKey::Feed(key.clone());
        let (pos, numbered, publish) = {
            let mut st = self.state();
            let Some(s) = st.streams.get_mut(key) else {
                return;
            };
            let publish = match s.role {
                Role::Owner { token } => Some(token),
                Role::Local | Role::Switching { .. } => None,
                // Not this node's to read (a message of a stream just handed over).
                Role::Follower => return,
            };
            let pos = s.pos.get_or_insert_with(|| Pos {
                epoch: new_epoch(),
                seq: 0,
            });
            let numbered: Vec<(u64, Item)> = items
                .into_iter()
                .map(|item| {
                    pos.seq += 1;
                    (pos.seq, item)
                })
                .collect();
            if let Some(t) = newest_trade(&numbered) {
                s.last_trade = Some(t);
            }
            (pos.clone(), numbered, publish)
        };
        if let Some(token) = publish {
            self.queue_batch(key, token, &pos, &numbered, None);
        }
        if let Some(hub) = self.hub() {
            hub.numbered(&topic, &pos.epoch, numbered);
        }
    }

    /// Tells the followers of a stream this node owns what its exchange said (no seq).
    fn tell(&self, key: &FeedKey, notice: Notice) {
        let owned = {
            let st = self.state();
            st.streams.get(key).and_then(|s| match (&s.role, &s.pos) {
                (Role::Owner { token }, Some(pos)) => Some((*token, pos.clone())),
                _ => None,
            })
        };
        if let Some((token, pos)) = owned {
            self.queue_batch(key, token, &pos, &[], Some(notice));
        }
    }

    /// Queues a batch (and a notice) for Redis, where [`Cluster::publisher`] sends it in the
    /// order queued; `pos` is the stream's position after it.
    fn queue_batch(
        &self,
        key: &FeedKey,
        token: u64,
        pos: &Pos,
        items: &[(u64, Item)],
        notice: Option<Notice>,
    ) {
        let epoch = &*pos.epoch;
        let last = pos.seq;
        let batch = Batch {
            n: self.node.to_string(),
            e: epoch.to_string(),
            t: token,
            m: None,
            i: items.to_vec(),
            x: notice,
        };
        let Ok(payload) = serde_json::to_string(&batch) else {
            return;
        };
        let trade = newest_trade(items)
            .map(|(id, ms)| format!("{id}:{ms}"))
            .unwrap_or_default();
        let id = keys::feed_id(key);
        let topic = TopicKey::Feed(key.clone());
        let out = Outgoing {
            keys: [keys::lease(&id), keys::pos(&id), keys::window(&id)],
            id: id.to_string(),
            lease_value: self.lease_value(token),
            epoch: epoch.to_string(),
            last,
            payload,
            wire: keys::wire(&topic),
            // A notice alone is not kept: a later subscriber has no use for it.
            keep: keys::keeps(&topic) && !items.is_empty(),
            trade,
        };
        self.outgoing.send(out).ok();
    }

    /// Sends the owners' batches to Redis one after the other, in the order they were read.
    /// With Redis away they are dropped (the node reads on its own then).
    async fn publisher(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
        loop {
            let out = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                out = rx.recv() => match out { Some(o) => o, None => return },
            };
            if !self.state().redis_up {
                continue;
            }
            let refused: Option<i64> = self
                .eval(
                    "publish",
                    keys::PUBLISH_FEED
                        .key(&out.keys[0])
                        .key(&out.keys[1])
                        .key(&out.keys[2])
                        .arg(&out.lease_value)
                        .arg(&out.epoch)
                        .arg(out.last)
                        .arg(&out.payload)
                        .arg(&out.wire)
                        .arg(if out.keep { "1" } else { "0" })
                        .arg(self.window_messages)
                        .arg(POSITION_TTL.as_millis() as u64)
                        .arg(&out.trade),
                )
                .await;
            if refused == Some(0) {
                tracing::warn!(node = %self.node, stream = %out.id, "publish refused: the lease is no longer this node's");
            }
        }
    }

    /// `POST /api/v1/publish`: numbered by Redis and sent to every node that has subscribers;
    /// this node's are counted when the message comes back from Redis. With Redis away, this
    /// node's subscribers only.
    pub async fn publish(&self, channel: &Channel, data: &Value, hub: &crate::hub::Hub) -> Posted {
        let topic = TopicKey::Published(channel.clone());
        let local = hub.has_topic(channel);
        let floor = hub.position(&topic).map_or(0, |(_, s)| s + 1);
        let message_id = format!("{}-{}", self.node, rand::random::<u64>());
        let (tx, rx) = oneshot::channel();
        if local {
            self.state().echoes.insert(message_id.clone(), tx);
        }
        let id = keys::topic_id(&topic);
        let item = serde_json::to_string(&Item::Published(data.clone())).unwrap_or_default();
        let node = serde_json::to_string(&*self.node).unwrap_or_default();
        let mid = serde_json::to_string(&message_id).unwrap_or_default();
        let epoch = new_epoch().to_string();
        let (pos, window, wire) = (
            keys::pos(&id),
            keys::window(&id),
            keys::published_wire(channel),
        );
        let published: Option<(String, u64, usize)> = if self.state().redis_up {
            self.eval(
                "publish",
                keys::PUBLISH_MESSAGE
                    .key(pos)
                    .key(window)
                    .arg(epoch)
                    .arg(&item)
                    .arg(wire)
                    .arg(self.window_messages)
                    .arg(PUBLISHED_TTL.as_millis() as u64)
                    .arg(&node)
                    .arg(&mid)
                    .arg(floor),
            )
            .await
        } else {
            None
        };
        match published {
            Some((_, _, nodes)) => {
                let delivered = if local {
                    tokio::time::timeout(ECHO_WAIT, rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0)
                } else {
                    0
                };
                self.state().echoes.remove(&message_id);
                Posted { delivered, nodes }
            }
            None => {
                self.state().echoes.remove(&message_id);
                let delivered = self.publish_locally(channel, data, hub);
                Posted {
                    delivered,
                    nodes: 0,
                }
            }
        }
    }

    /// A posted message while Redis is away: numbered on from this node's sequence.
    fn publish_locally(&self, channel: &Channel, data: &Value, hub: &crate::hub::Hub) -> usize {
        let topic = TopicKey::Published(channel.clone());
        let (epoch, seq) = {
            let position = hub.position(&topic);
            let mut st = self.state();
            let pos = st
                .local_pos
                .entry(topic.clone())
                .or_insert_with(|| match &position {
                    Some((e, s)) => Pos {
                        epoch: e.clone(),
                        seq: *s,
                    },
                    None => Pos {
                        epoch: new_epoch(),
                        seq: 0,
                    },
                });
            if let Some((e, s)) = &position {
                if *e == pos.epoch {
                    pos.seq = pos.seq.max(*s);
                }
            }
            pos.seq += 1;
            (pos.epoch.clone(), pos.seq)
        };
        hub.numbered(&topic, &epoch, vec![(seq, Item::Published(data.clone()))])
    }

    /// On shutdown (SIGTERM): every lease this node holds is handed over at once.
    async fn leave(&self) {
        let owned: Vec<(String, u64)> = self
            .state()
            .streams
            .iter()
            .filter_map(|(k, s)| match s.role {
                Role::Owner { token } => Some((keys::feed_id(k), token)),
                _ => None,
            })
            .collect();
        for (id, token) in owned {
            if self.release(&id, token).await {
                tracing::info!(node = %self.node, stream = %id, "lease handed over (shutting down)");
            }
        }
        let me = self.node.to_string();
        let _: Option<i64> = self
            .query("leave", redis::cmd("ZREM").arg(keys::NODES).arg(me))
            .await;
    }

    pub fn snapshot(&self) -> ClusterSnapshot {
        let st = self.state();
        let streams = st
            .streams
            .iter()
            .map(|(k, s)| {
                let role = match s.role {
                    Role::Owner { .. } => "owner",
                    Role::Follower => "follower",
                    Role::Local => "local",
                    Role::Switching { .. } => "switching",
                };
                let owner = match s.role {
                    Role::Owner { .. } | Role::Local | Role::Switching { .. } => {
                        Some(self.node.to_string())
                    }
                    Role::Follower => s.owner.clone(),
                };
                (
                    keys::feed_id(k),
                    StreamView {
                        owner,
                        role,
                        epoch: s.pos.as_ref().map(|p| p.epoch.to_string()),
                        seq: s.pos.as_ref().map(|p| p.seq),
                    },
                )
            })
            .collect();
        ClusterSnapshot {
            node_id: self.node.to_string(),
            state: if st.redis_up { "ok" } else { "degraded" },
            redis: if st.redis_up {
                "connected"
            } else {
                "unreachable"
            },
            nodes: st.members.len().max(1),
            members: st.members.clone(),
            streams,
            lease_changes: st.lease_changes,
        }
    }
}

/// A trade's place in its tape and time (id, ms).
fn trade_of(item: &Item) -> Option<(u64, i64)> {
    match item {
        Item::Event(MarketEvent::Trade(t)) => Some((t.order(), t.time_ms)),
        _ => None,
    }
}

/// The newest trade among numbered messages.
fn newest_trade(items: &[(u64, Item)]) -> Option<(u64, i64)> {
    items.iter().rev().find_map(|(_, item)| trade_of(item))
}

fn track(names: &mut HashSet<String>, s: Sub) {
    match s {
        Sub::Subscribe(n) => {
            names.insert(n);
        }
        Sub::Unsubscribe(n) => {
            names.remove(&n);
        }
    }
}

fn new_epoch() -> Arc<str> {
    crate::hub::channel::new_epoch()
}

impl FeedSource for Cluster {
    fn check(&self, key: &FeedKey) -> Check {
        self.exchange.check(key)
    }

    fn want(&self, key: &FeedKey) {
        self.cmds.send(Cmd::Want(key.clone())).ok();
    }

    fn unwant(&self, key: &FeedKey) {
        self.cmds.send(Cmd::Unwant(key.clone())).ok();
    }

    fn reachable(&self, exchange: ExchangeId) -> bool {
        self.exchange.reachable(exchange)
    }

    fn history(&self, key: &FeedKey, request: HistoryRequest) -> HistoryFuture {
        self.exchange.history(key, request)
    }

    fn prepare(&self, topic: &TopicKey, since: Option<u64>) -> PrepareFuture {
        let Some(me) = self.hub_cluster() else {
            return Box::pin(async { None });
        };
        let topic = topic.clone();
        Box::pin(async move { me.prepared(&topic, since).await })
    }

    fn follow(&self, channel: &Channel) {
        self.cmds.send(Cmd::Follow(channel.clone())).ok();
    }

    fn unfollow(&self, channel: &Channel) {
        self.cmds.send(Cmd::Unfollow(channel.clone())).ok();
    }
}

impl Cluster {
    fn hub_cluster(&self) -> Option<Arc<Cluster>> {
        self.me.upgrade()
    }

    /// [`FeedSource::prepare`]: the topic's position in Redis (created where none exists) and,
    /// for `since`, what its window holds after it. With Redis away: this node's own.
    async fn prepared(&self, topic: &TopicKey, since: Option<u64>) -> Option<Prepared> {
        let id = keys::topic_id(topic);
        if self.state().redis_up {
            let found = match since {
                Some(after) if keys::keeps(topic) => self
                    .recall(&id, after)
                    .await
                    .map(|(epoch, seq, items, complete)| (epoch, seq, Some((items, complete)))),
                _ => self
                    .read_position(&id)
                    .await
                    .map(|(pos, _)| (pos.epoch, pos.seq, None)),
            };
            if let Some((epoch, seq, after)) = found {
                return Some(Prepared { epoch, seq, after });
            }
        }
        let mut st = self.state();
        let pos = match topic {
            TopicKey::Feed(key) => st.streams.get(key).and_then(|s| s.pos.clone()),
            TopicKey::Published(_) => st.local_pos.get(topic).cloned(),
        };
        let pos = pos.unwrap_or_else(|| {
            let pos = Pos {
                epoch: new_epoch(),
                seq: 0,
            };
            if let TopicKey::Published(_) = topic {
                st.local_pos.insert(topic.clone(), pos.clone());
            }
            pos
        });
        Some(Prepared {
            epoch: pos.epoch,
            seq: pos.seq,
            after: None,
        })
    }
}

/// Connection attempts at an exchange count for the whole cluster: nodes behind one egress IP
/// share the exchange's limit. With Redis away each node keeps to its own budget alone.
impl crate::exchange::SharedBudget for Cluster {
    fn take(
        &self,
        exchange: ExchangeId,
        max: usize,
        window: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Duration>> + Send + '_>> {
        Box::pin(async move {
            if !self.state().redis_up {
                return None;
            }
            let member = format!("{}-{}", self.node, rand::random::<u64>());
            let wait: i64 = self
                .eval(
                    "attempt",
                    keys::ATTEMPT
                        .key(keys::attempts(exchange))
                        .arg(now_millis())
                        .arg(window.as_millis() as u64)
                        .arg(max)
                        .arg(member),
                )
                .await?;
            (wait > 0).then(|| Duration::from_millis(wait as u64))
        })
    }
}

/// What the exchange connections read, on the way to the hub.
impl FeedSink for Cluster {
    fn events(&self, key: &FeedKey, events: Vec<MarketEvent>) {
        self.own(key, events.into_iter().map(Item::Event).collect());
    }

    fn invalidated(&self, key: &FeedKey) {
        if let Some(hub) = self.hub() {
            hub.invalidated(key);
        }
        self.tell(key, Notice::Invalidated);
    }

    fn refused(&self, key: &FeedKey, code: ErrorCode, message: &str) {
        if let Some(hub) = self.hub() {
            hub.refused(key, code, message);
        }
        self.tell(
            key,
            Notice::Refused {
                code,
                message: message.to_string(),
            },
        );
    }

    fn instruments_loaded(&self, exchange: ExchangeId) {
        if let Some(hub) = self.hub() {
            hub.instruments_loaded(exchange);
        }
    }

    fn gap(&self, key: &FeedKey, reason: GapReason, from_ms: i64, to_ms: i64) {
        self.own(
            key,
            vec![Item::Gap {
                reason,
                from_ms,
                to_ms,
            }],
        );
    }

    fn numbered(&self, topic: &TopicKey, epoch: &str, items: Vec<(u64, Item)>) -> usize {
        self.hub().map_or(0, |h| h.numbered(topic, epoch, items))
    }

    fn position(&self, topic: &TopicKey) -> Option<(Arc<str>, u64)> {
        self.hub().and_then(|h| h.position(topic))
    }
}
