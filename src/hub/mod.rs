//! The stream manager and fan-out hub: the single owner of subscription refcounts.
//!
//! A *topic* is what channels are fed from: one upstream stream ([`FeedKey`]), or one published
//! channel. Many channels can share a topic (`price:` and `ticker:` share the ticker feed,
//! `depth:` at 5/10/20 share the book feed), and many clients a channel. The first subscription
//! to a topic asks the exchange for the stream; when the last one goes, the topic lingers
//! `close_delay` and is then removed, upstream stream included, unless someone came back
//! (a re-checked, generation-stamped release, so a quick unsubscribe/subscribe storm never reaches
//! the exchange). Empty topics are always removed: nothing grows with churn.
//!
//! Locks: the topic map (`RwLock`) is taken before a topic's own `Mutex`, and that before a
//! client's outbox; none across an `.await`. Each event is rendered and framed once per channel,
//! and the fan-out loop writes that one buffer to every subscriber's socket in turn (see
//! [`Outbox`]), holding the topic's lock so a subscription, its ack and its first value are never
//! overtaken by an event. A write never waits, so the lock is held for one non-blocking `send`
//! per subscriber.
//!
//! Sequence numbers, recovery windows, throttling and histories are per channel
//! ([`channel::ChannelFeed`]): every message is numbered and rendered once, and a throttled,
//! resuming or history-waiting subscriber is handed the same shared frames as everyone else.

pub mod channel;
pub mod feed;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::domain::{Channel, ExchangeId};
use crate::events::{render, render_data, Delivery, Feed, FeedKey, Kline, MarketEvent, Trade};
use crate::protocol::{msg, now_iso, now_millis, ErrorCode, GapReason, RequestId, Since};
use crate::stats::Stats;
pub use crate::ws::Close;
use crate::ws::{Outbox, Pushed, Tally, Wire};
use channel::{Awaiting, ChannelFeed, Pending, Window, WindowLimits, WindowMeter};
pub use feed::{
    Check, FeedSink, FeedSource, HistoryFuture, HistoryRequest, Item, PrepareFuture, Prepared,
};

/// Trades a trades topic remembers, to join a history to the live stream.
const RECENT_TRADES: usize = 1_000;
/// Final candles a klines topic remembers, for the same.
const RECENT_FINALS: usize = 64;
/// How long a history waits for a new feed's first message before it is fetched anyway (the
/// fetch must not end before the live stream starts, or trades between the two would be lost).
const LIVE_WAIT: Duration = Duration::from_secs(5);

/// What a subscription is fed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicKey {
    Feed(FeedKey),
    Published(Channel),
}

/// One subscription a client holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub channel: Channel,
    /// The channel name as the client wrote it, shared by every message on it.
    pub name: Arc<str>,
    pub topic: TopicKey,
    /// `throttleMs`: at most one message per interval, the newest.
    pub throttle: Option<Duration>,
}

/// A history one subscriber waits for (its `ticket` tells it from an earlier request).
struct HistoryAsked {
    key: FeedKey,
    channel: Channel,
    client_id: u64,
    ticket: u64,
    limit: usize,
}

/// What a subscribe asks for once, beyond joining the channel.
#[derive(Debug, Clone, Default)]
pub struct Join {
    /// `history`: send the last N candles or trades first.
    pub history: Option<usize>,
    /// `since`: resume after this message.
    pub since: Option<Since>,
    /// The entry was an object: for a held channel, its options replace the old ones.
    pub replace: bool,
    /// In a cluster: the topic's shared sequence, and what the cluster keeps after `since`
    /// ([`Hub::prepare`]).
    pub prepared: Option<Prepared>,
}

/// A connected client as the hub sees it.
pub struct Client {
    pub id: u64,
    /// `c-<hex>`, as announced in `connected` and logged.
    pub name: Arc<str>,
    pub outbox: Outbox,
    /// Subscriptions in the order they were made. Changed only under the owning topic's lock,
    /// by the hub, so a subscription and its topic membership never disagree.
    subs: Mutex<Vec<Held>>,
}

impl AsRef<Outbox> for Client {
    fn as_ref(&self) -> &Outbox {
        &self.outbox
    }
}

impl Client {
    /// A client writing to `socket`; `None` for an in-process subscriber whose frames queue.
    pub fn new(
        id: u64,
        queue_capacity: usize,
        max_subscriptions: usize,
        socket: Option<Arc<crate::ws::Socket>>,
        deflate: Option<u8>,
    ) -> Client {
        Client {
            id,
            name: Arc::from(format!("c-{id:x}")),
            outbox: Outbox::new(queue_capacity, max_subscriptions, socket, deflate),
            subs: Mutex::new(Vec::new()),
        }
    }

    fn subs(&self) -> MutexGuard<'_, Vec<Held>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn holds(&self, channel: &Channel) -> bool {
        self.subs().iter().any(|h| &h.channel == channel)
    }

    pub fn subscription_count(&self) -> usize {
        self.subs().len()
    }

    pub fn subscriptions(&self) -> Vec<Held> {
        self.subs().clone()
    }
}

/// The outcome of [`Hub::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// Subscribed, data flows (or will as soon as the exchange answers).
    Live,
    /// Subscribed, but the exchange is unreachable: data flows once it is back.
    Unavailable,
    /// Refused; nothing changed.
    Refused(ErrorCode, String),
}

#[derive(Default)]
struct TopicState {
    channels: Vec<ChannelFeed>,
    /// Subscriptions across all channels of this topic.
    refs: usize,
    /// Bumped whenever refs leaves or reaches zero; a delayed release only acts if unchanged.
    generation: u64,
    /// The upstream stream has been asked for.
    wanted: bool,
    /// Removed from the topic map; a late attach must look the topic up again.
    removed: bool,
    /// The newest current value (not trades), replayed to new subscribers.
    last: Option<MarketEvent>,
    /// Open time of the newest final kline, so each candle is final exactly once and never
    /// reopened by a late update.
    last_final_kline: Option<i64>,
    /// Some event arrived since the stream was asked for.
    live: bool,
    /// The newest trades (trades feeds) and final candles (klines feeds), oldest first.
    recent_trades: VecDeque<Trade>,
    recent_finals: VecDeque<Kline>,
    /// In a cluster: the one sequence every channel of the topic follows, numbered by the
    /// source. `None`: each channel numbers its own messages.
    shared: Option<Shared>,
}

/// A topic's sequence when its source numbers it (see [`feed`]).
struct Shared {
    epoch: Arc<str>,
    /// The last seq applied.
    seq: u64,
    /// The seq of the newest current value.
    current_seq: u64,
    started_ms: i64,
}

impl Shared {
    fn new(epoch: &str, seq: u64) -> Shared {
        Shared {
            epoch: Arc::from(epoch),
            seq,
            current_seq: 0,
            started_ms: now_millis(),
        }
    }
}

impl TopicState {
    fn channel_index(&self, channel: &Channel) -> Option<usize> {
        self.channels.iter().position(|f| &f.channel == channel)
    }
}

struct Topic {
    state: Mutex<TopicState>,
}

impl Topic {
    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Hub {
    topics: RwLock<HashMap<TopicKey, Arc<Topic>>>,
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    next_client: AtomicU64,
    /// Where market data comes from (the exchanges; in tests, a fake).
    source: Arc<dyn FeedSource>,
    /// Itself, for the delayed releases it spawns.
    me: Weak<Hub>,
    pub stats: Arc<Stats>,
    pub default_exchange: ExchangeId,
    close_delay: Duration,
    queue_capacity: usize,
    max_subscriptions: usize,
    window: WindowLimits,
    pub windows: Arc<WindowMeter>,
    next_ticket: AtomicU64,
    /// Delayed releases; shutdown waits for none of them but they end with it.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Hub {
    pub fn new(
        config: &Config,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
        source: Arc<dyn FeedSource>,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|me: &Weak<Hub>| Hub {
            topics: RwLock::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(rand::random::<u32>() as u64),
            source,
            me: me.clone(),
            stats,
            default_exchange: config.exchanges.default,
            close_delay: config.streams.close_delay(),
            queue_capacity: config.server.client_queue_capacity,
            max_subscriptions: config.server.max_subscriptions_per_client,
            window: WindowLimits {
                messages: config.recovery.window_messages,
                max_age: Duration::from_secs(config.recovery.window_secs),
            },
            windows: Arc::new(WindowMeter::default()),
            next_ticket: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    fn topics_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TopicKey, Arc<Topic>>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    fn topics_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TopicKey, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register_client(&self, socket: Option<Arc<crate::ws::Socket>>) -> Arc<Client> {
        self.register_client_with(socket, None)
    }

    /// A client whose data frames go out compressed with a `deflate` window (permessage-deflate).
    pub fn register_client_with(
        &self,
        socket: Option<Arc<crate::ws::Socket>>,
        deflate: Option<u8>,
    ) -> Arc<Client> {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client::new(
            id,
            self.queue_capacity,
            self.max_subscriptions,
            socket,
            deflate,
        ));
        self.clients().insert(id, client.clone());
        client
    }

    /// Drops every subscription of a client that left, however it left.
    pub fn unregister_client(&self, client: &Arc<Client>) {
        for held in client.subscriptions() {
            self.detach(client, &held);
        }
        self.clients().remove(&client.id);
    }

    pub fn connected_clients(&self) -> usize {
        self.clients().len()
    }

    /// Asks every client to close (shutdown).
    pub fn close_all(&self, close: Close) {
        let clients: Vec<_> = self.clients().values().cloned().collect();
        for c in clients {
            c.outbox.close(close.clone());
        }
    }

    /// The topic a channel is fed from.
    pub fn topic_for(&self, channel: &Channel) -> TopicKey {
        match (channel.market(), crate::events::Feed::for_channel(channel)) {
            (Some(market), Some(feed)) => TopicKey::Feed(FeedKey {
                exchange: market.exchange_or(self.default_exchange),
                symbol: market.symbol.clone(),
                feed,
            }),
            _ => TopicKey::Published(channel.clone()),
        }
    }

    fn topic(&self, key: &TopicKey) -> Option<Arc<Topic>> {
        self.topics_read().get(key).cloned()
    }

    fn topic_or_insert(&self, key: &TopicKey) -> Arc<Topic> {
        if let Some(t) = self.topic(key) {
            return t;
        }
        self.topics_write()
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Topic {
                    state: Mutex::new(TopicState::default()),
                })
            })
            .clone()
    }

    /// Subscribes `client` to `held`: validates the market, joins the topic, queues the
    /// `subscribed` ack followed by what the subscription asked for (the current value, a
    /// resume from `since`, or a history), and asks the exchange for the stream when this is
    /// the topic's first subscription. A duplicate plain subscribe is acknowledged again,
    /// changing nothing; an object replaces the options of a held subscription.
    pub fn attach(&self, client: &Arc<Client>, held: Held, join: Join, id: &RequestId) -> Attached {
        loop {
            let topic = self.topic_or_insert(&held.topic);
            let mut st = topic.lock();
            if st.removed {
                continue;
            }
            if let (None, Some(p)) = (&st.shared, &join.prepared) {
                st.shared = Some(Shared::new(&p.epoch, p.seq));
            }
            let holds = client.holds(&held.channel);
            if holds && !join.replace {
                if let Some(i) = st.channel_index(&held.channel) {
                    let feed = &st.channels[i];
                    self.send(
                        client,
                        msg::subscribed(&feed.name, feed.position(), None, id),
                    );
                }
                return Attached::Live;
            }
            // Validated under the topic lock: an instrument list arriving now either is seen here
            // or finds this topic in the map when it resolves pending topics.
            let check = match &held.topic {
                TopicKey::Feed(key) => self.source.check(key),
                TopicKey::Published(_) => Check::Known,
            };
            let outcome = match check {
                Check::Known => Attached::Live,
                Check::Pending => Attached::Unavailable,
                Check::Refused(code, message) => {
                    let empty = st.refs == 0;
                    drop(st);
                    if empty {
                        self.schedule_release(&held.topic, &topic);
                    }
                    return Attached::Refused(code, message);
                }
            };

            let now = Instant::now();
            let idx = match st.channel_index(&held.channel) {
                Some(i) => i,
                None => {
                    let mut feed = ChannelFeed::new(
                        held.channel.clone(),
                        held.name.clone(),
                        Window::new(self.window, self.windows.clone()),
                        now_millis(),
                    );
                    if let Some(shared) = &st.shared {
                        feed.epoch = shared.epoch.clone();
                        feed.seq = shared.seq;
                        feed.current_seq = shared.current_seq;
                        feed.started_ms = shared.started_ms;
                    } else if st.last.is_some() {
                        // The current value is this channel's first message.
                        feed.seq = 1;
                        feed.current_seq = 1;
                    }
                    st.channels.push(feed);
                    st.channels.len() - 1
                }
            };
            let key = match &held.topic {
                TopicKey::Feed(key) => Some(key.clone()),
                TopicKey::Published(_) => None,
            };
            let TopicState { channels, last, .. } = &mut *st;
            let feed = &mut channels[idx];
            if holds {
                feed.remove(client.id);
            } else {
                if feed.members() == 0 {
                    self.stats.channel_opened();
                }
                self.stats.subscribed(held.channel.kind(), 1);
            }
            feed.idle_since = None;
            // The current value, rendered only where it is sent (a history carries its own).
            let current = |feed: &ChannelFeed| {
                key.as_ref()
                    .and_then(|k| current_frame(k, feed, last.as_ref()))
            };
            match (&join.since, join.history, &key) {
                (Some(since), _, _) => {
                    let fetched = join.prepared.as_ref().and_then(|p| p.after.as_ref());
                    let current = current(feed);
                    let frames =
                        self.resume(client, &held.topic, feed, since, fetched, current, id, now);
                    let tally = client.outbox.push_data(&feed.name, &frames);
                    self.count_tally(client, &held.channel, &feed.name, tally);
                    feed.join(client.clone(), held.throttle, now);
                }
                (None, Some(limit), Some(key)) => {
                    self.send(
                        client,
                        msg::subscribed(&feed.name, feed.position(), None, id),
                    );
                    let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
                    feed.awaiting.push(Awaiting {
                        client: client.clone(),
                        ticket,
                        throttle: held.throttle,
                    });
                    self.spawn_history(HistoryAsked {
                        key: key.clone(),
                        channel: held.channel.clone(),
                        client_id: client.id,
                        ticket,
                        limit,
                    });
                }
                _ => {
                    self.send(
                        client,
                        msg::subscribed(&feed.name, feed.position(), None, id),
                    );
                    if let Some(frame) = current(feed) {
                        let tally = client.outbox.push_data(&feed.name, &[frame]);
                        self.count_tally(client, &held.channel, &feed.name, tally);
                    }
                    feed.join(client.clone(), held.throttle, now);
                }
            }
            {
                let mut subs = client.subs();
                subs.retain(|h| h.channel != held.channel);
                subs.push(held.clone());
            }
            if holds {
                return Attached::Live;
            }
            st.refs += 1;
            if st.refs == 1 {
                st.generation += 1;
            }
            if let (TopicKey::Published(channel), false) = (&held.topic, st.wanted) {
                // A cluster delivers what other nodes publish to it from now on.
                st.wanted = true;
                self.source.follow(channel);
            }
            if let (TopicKey::Feed(key), Attached::Live) = (&held.topic, &outcome) {
                if !st.wanted {
                    st.wanted = true;
                    st.live = false;
                    self.source.want(key);
                }
                if !self.source.reachable(key.exchange) {
                    return Attached::Unavailable;
                }
            }
            return outcome;
        }
    }

    /// What a subscription needs from a cluster before [`Hub::attach`]: the topic's shared
    /// sequence when this node does not follow it yet, and for `since` what the cluster keeps
    /// after it. `None` on a single relay, or when nothing is needed.
    pub async fn prepare(&self, topic: &TopicKey, since: Option<&Since>) -> Option<Prepared> {
        let numbered_here = self.topic(topic).is_some_and(|t| t.lock().shared.is_some());
        if numbered_here && since.is_none() {
            return None;
        }
        self.source.prepare(topic, since.map(|s| s.seq)).await
    }

    /// Answers a subscribe with `since`: the ack says whether the client resumes where it left
    /// off; what follows is what it missed that the channel still holds (PROTOCOL.md §
    /// Recovery). Returns the frames to send after the ack, in order.
    /// `fetched`: what the cluster keeps after `since` (another node's messages).
    #[allow(clippy::too_many_arguments)]
    fn resume(
        &self,
        client: &Client,
        topic: &TopicKey,
        feed: &mut ChannelFeed,
        since: &Since,
        fetched: Option<&(Vec<(u64, Item)>, bool)>,
        current: Option<(Wire, Delivery)>,
        id: &RequestId,
        now: Instant,
    ) -> Vec<(Wire, Delivery)> {
        let keeps = keeps_messages(&feed.channel);
        let same_epoch = since.epoch == *feed.epoch && since.seq <= feed.seq;
        feed.window.expire(now);
        let cluster_holds = fetched.is_some_and(|(_, complete)| *complete);
        let recovered =
            same_epoch && (!keeps || feed.window.holds_after(since.seq) || cluster_holds);
        self.stats.recovery(recovered);
        self.send(
            client,
            msg::subscribed(&feed.name, feed.position(), Some(recovered), id),
        );
        if !recovered {
            let (reason, from, to) = if same_epoch {
                (GapReason::RecoveryWindow, None, feed.window.evicted_at_ms())
            } else {
                (GapReason::EpochChanged, None, Some(feed.started_ms))
            };
            self.stats.gap(reason);
            self.send(
                client,
                msg::gap(&feed.name, reason, from, to, feed.position()),
            );
        }
        let after = if same_epoch { since.seq } else { 0 };
        let mut frames = if keeps {
            // This node's window, completed by the cluster's where it reaches further back.
            let mut by_seq: BTreeMap<u64, (Wire, Delivery)> = BTreeMap::new();
            if let (true, Some((items, _))) = (same_epoch, fetched) {
                for (seq, item) in items {
                    if *seq <= after || *seq > feed.seq {
                        continue;
                    }
                    if let Some(frame) = render_item(topic, feed, item, *seq) {
                        if frame.1 == Delivery::Reliable {
                            by_seq.insert(*seq, frame);
                        }
                    }
                }
            }
            for (seq, wire) in feed.window.after_numbered(after) {
                by_seq.insert(seq, (wire, Delivery::Reliable));
            }
            by_seq.into_values().collect()
        } else {
            Vec::new()
        };
        // State channels and klines end with the current value: a forming kline the client
        // has not seen, or the newest price, ticker or book.
        if let Some(frame) = current {
            let seen = matches!(feed.channel, Channel::Klines(..)) && feed.current_seq <= after;
            if !seen && frame.1 == Delivery::Conflate {
                frames.push(frame);
            }
        }
        frames
    }

    /// Fetches a history for a subscriber that asked for one, then hands it the history and
    /// moves it to the live stream, all under the topic's lock so nothing is missed or sent
    /// twice between the two.
    fn spawn_history(&self, asked: HistoryAsked) {
        let Some(hub) = self.me.upgrade() else {
            return;
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = hub.deliver_history(asked) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }

    async fn deliver_history(&self, asked: HistoryAsked) {
        let HistoryAsked {
            key,
            channel,
            client_id,
            ticket,
            limit,
        } = asked;
        let topic_key = TopicKey::Feed(key.clone());
        // A new feed: let its stream start first, so the history reaches past its first message.
        let started = Instant::now();
        while started.elapsed() < LIVE_WAIT {
            match self.topic(&topic_key) {
                Some(t) if !t.lock().live => {}
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let request = HistoryRequest {
            limit,
            end_ms: None,
        };
        let rows = self.source.history(&key, request).await;
        let Some(topic) = self.topic(&topic_key) else {
            return;
        };
        let mut st = topic.lock();
        let Some(idx) = st.channel_index(&channel) else {
            return;
        };
        let Some(pos) = st.channels[idx]
            .awaiting
            .iter()
            .position(|a| a.client.id == client_id && a.ticket == ticket)
        else {
            return; // unsubscribed, or asked again, meanwhile
        };
        let waiting = st.channels[idx].awaiting.swap_remove(pos);
        let client = waiting.client;
        let frames = match rows {
            Ok(rows) => {
                self.stats.history(true);
                let events = merge_history(&st, &channel, rows, limit);
                let items: Vec<String> = events
                    .iter()
                    .filter_map(|e| render_data(&key, &channel, e))
                    .collect();
                let feed = &st.channels[idx];
                let frame = msg::history(&feed.name, &items, feed.position());
                vec![(Wire::text(frame.as_str()), Delivery::Reliable)]
            }
            Err(e) => {
                self.stats.history(false);
                tracing::info!(feed = ?key, error = %e, "history unavailable");
                let feed = &st.channels[idx];
                self.stats.client_error(ErrorCode::HistoryUnavailable);
                self.send(
                    &client,
                    msg::error(
                        Some(&feed.name),
                        ErrorCode::HistoryUnavailable,
                        &format!("the history of {} could not be had from {} ({e}); the subscription stands and live data flows", feed.name, key.exchange),
                        &None,
                    ),
                );
                current_frame(&key, feed, st.last.as_ref())
                    .into_iter()
                    .collect()
            }
        };
        let feed = &mut st.channels[idx];
        let tally = client.outbox.push_data(&feed.name, &frames);
        self.count_tally(&client, &channel, &feed.name, tally);
        feed.join(client, waiting.throttle, Instant::now());
    }

    /// Candles or trades for the REST history endpoints: the exchange's, joined to what the
    /// relay holds live when the channel is in use (so REST and WebSocket agree).
    pub async fn history(
        &self,
        channel: &Channel,
        request: HistoryRequest,
    ) -> Result<Vec<String>, (ErrorCode, String)> {
        let TopicKey::Feed(key) = self.topic_for(channel) else {
            return Err((
                ErrorCode::InvalidChannel,
                "history is kept for klines and trades channels".into(),
            ));
        };
        match self.source.check(&key) {
            Check::Known => {}
            Check::Pending => {
                return Err((
                    ErrorCode::UpstreamUnavailable,
                    format!(
                        "{} is unreachable right now; try again shortly",
                        key.exchange
                    ),
                ))
            }
            Check::Refused(code, message) => return Err((code, message)),
        }
        let rows = self.source.history(&key, request).await.map_err(|e| {
            (
                ErrorCode::HistoryUnavailable,
                format!("the history could not be had from {} ({e})", key.exchange),
            )
        })?;
        let events = match (request.end_ms, self.topic(&TopicKey::Feed(key.clone()))) {
            (None, Some(topic)) => merge_history(&topic.lock(), channel, rows, request.limit),
            (_, _) => {
                let mut rows = rows;
                let skip = rows.len().saturating_sub(request.limit);
                rows.split_off(skip)
            }
        };
        Ok(events
            .iter()
            .filter_map(|e| render_data(&key, channel, e))
            .collect())
    }

    /// Unsubscribes `client` from `held`; returns whether it was subscribed.
    pub fn detach(&self, client: &Arc<Client>, held: &Held) -> bool {
        let Some(topic) = self.topic(&held.topic) else {
            client.subs().retain(|h| h.channel != held.channel);
            return false;
        };
        let mut st = topic.lock();
        let before = client.subs().len();
        client.subs().retain(|h| h.channel != held.channel);
        if client.subs().len() == before {
            return false;
        }
        if let Some(i) = st.channel_index(&held.channel) {
            let feed = &mut st.channels[i];
            if feed.remove(client.id) {
                self.stats.subscribed(held.channel.kind(), -1);
                if feed.members() == 0 {
                    feed.idle_since = Some(Instant::now());
                    self.stats.channel_closed();
                }
            }
        }
        st.refs = st.refs.saturating_sub(1);
        if st.refs == 0 {
            drop(st);
            self.schedule_release(&held.topic, &topic);
        }
        true
    }

    /// Removes an unused topic after `close_delay`, unless it was used again meanwhile.
    fn schedule_release(&self, key: &TopicKey, topic: &Arc<Topic>) {
        let generation = {
            let mut st = topic.lock();
            st.generation += 1;
            st.generation
        };
        let Some(hub) = self.me.upgrade() else {
            return;
        };
        let key = key.clone();
        // Published channels linger too: their recovery window is what a client coming back
        // resumes from.
        let delay = self.close_delay;
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => hub.release(&key, generation),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    fn release(&self, key: &TopicKey, generation: u64) {
        let mut topics = self.topics_write();
        let Some(topic) = topics.get(key).cloned() else {
            return;
        };
        let mut st = topic.lock();
        if st.refs != 0 || st.generation != generation {
            return;
        }
        st.removed = true;
        topics.remove(key);
        match (key, st.wanted) {
            (TopicKey::Feed(feed), true) => self.source.unwant(feed),
            (TopicKey::Published(channel), true) => self.source.unfollow(channel),
            _ => {}
        }
    }

    fn send(&self, client: &Client, frame: crate::protocol::Frame) {
        self.count_push(client, client.outbox.push_control(frame));
    }

    /// Counts what one push to `client` on `channel` did.
    fn count_tally(&self, client: &Client, channel: &Channel, name: &str, tally: Tally) {
        self.stats
            .messages_out_of(channel.message_type(), tally.queued);
        self.stats.conflated(tally.conflated);
        if tally.overflowed {
            self.stats.slow_consumer(&client.name, name);
        }
    }

    fn count_push(&self, client: &Client, pushed: Pushed) {
        match pushed {
            Pushed::Queued => self.stats.control_out(1),
            Pushed::Conflated => self.stats.conflated(1),
            Pushed::Overflowed => self.stats.slow_consumer(&client.name, "control"),
            Pushed::Closed => {}
        }
    }

    /// Fans upstream events of one feed out to every channel of its topic, in order. A burst
    /// (events read from the exchange at once, as when the relay catches up) reaches each
    /// subscriber in one write.
    fn dispatch(&self, key: &FeedKey, events: Vec<MarketEvent>) {
        let topic_key = TopicKey::Feed(key.clone());
        let Some(topic) = self.topic(&topic_key) else {
            return;
        };
        let mut st = topic.lock();
        // A topic the source numbers goes on with its sequence (the source's own numbers are
        // handed in through `numbered`); otherwise each channel numbers its messages.
        let events = match &st.shared {
            Some(shared) => {
                let next = shared.seq + 1;
                (next..).map(Some).zip(events).collect()
            }
            None => events.into_iter().map(|e| (None, e)).collect(),
        };
        self.dispatch_locked(&topic_key, key, &mut st, events);
    }

    /// [`Hub::dispatch`] under the topic's lock; `events` with the seq each takes where the
    /// topic has a shared sequence.
    fn dispatch_locked(
        &self,
        topic_key: &TopicKey,
        key: &FeedKey,
        st: &mut TopicState,
        events: Vec<(Option<u64>, MarketEvent)>,
    ) {
        st.live = true;
        let mut events = events;
        let shared = st.shared.is_some();
        let mut newest_trade = st.recent_trades.back().map(Trade::order);
        events.retain(|(_, event)| {
            let k = match event {
                // From another node, a trade this one already had (it read the exchange
                // itself while Redis was away) is not sent twice.
                MarketEvent::Trade(t) if shared => {
                    if newest_trade.is_some_and(|n| t.order() <= n) {
                        return false;
                    }
                    newest_trade = Some(t.order());
                    return true;
                }
                MarketEvent::Kline(k) => k,
                _ => return true,
            };
            if st.last_final_kline.is_some_and(|t| k.open_time <= t) {
                return false;
            }
            if k.is_final {
                st.last_final_kline = Some(k.open_time);
            }
            true
        });
        let now = now_iso();
        let instant = Instant::now();
        self.drop_idle_channels(st, instant);
        // Counted once per channel, not per client: the loop below is the hot path.
        let started = std::time::Instant::now();
        let mut conflated = 0;
        let mut frames = Vec::with_capacity(events.len());
        let mut opens = Vec::with_capacity(events.len());
        let last_seq = events.last().and_then(|(n, _)| *n);
        let current_seq = events
            .iter()
            .rev()
            .find(|(_, e)| e.is_current_value())
            .and_then(|(n, _)| *n);
        if let (Some(shared), Some(last)) = (st.shared.as_mut(), last_seq) {
            shared.seq = last;
            if let Some(c) = current_seq {
                shared.current_seq = c;
            }
        }
        for feed in &mut st.channels {
            frames.clear();
            opens.clear();
            for (n, event) in &events {
                let seq = n.unwrap_or(feed.seq + 1);
                let Some((frame, delivery)) =
                    render(key, &feed.channel, &feed.name, event, seq, &now)
                else {
                    continue;
                };
                feed.seq = seq;
                let wire = Wire::text(frame.as_str());
                if delivery == Delivery::Reliable {
                    feed.window.push(feed.seq, &wire, instant);
                }
                if event.is_current_value() {
                    feed.current_seq = feed.seq;
                }
                opens.push(match event {
                    MarketEvent::Kline(k) => Some(k.open_time),
                    _ => None,
                });
                frames.push((wire, delivery));
            }
            if let Some(last) = last_seq {
                feed.seq = last;
            }
            if frames.is_empty() {
                continue;
            }
            let mut queued = 0;
            for client in &feed.live {
                let tally = client.outbox.push_data(&feed.name, &frames);
                queued += tally.queued;
                conflated += tally.conflated;
                if tally.overflowed {
                    self.stats.slow_consumer(&client.name, &feed.name);
                }
            }
            for group in &mut feed.throttled {
                for (frame, open) in frames.iter().zip(&opens) {
                    let send =
                        match frame.1 {
                            // Final klines are always delivered, and supersede a pending forming one.
                            Delivery::Reliable => {
                                if group.pending.as_ref().is_some_and(|p| {
                                    p.kline_open.is_some() && p.kline_open <= *open
                                }) {
                                    group.pending = None;
                                }
                                true
                            }
                            Delivery::Conflate
                                if group.pending.is_none() && instant >= group.next_due =>
                            {
                                group.next_due = instant + group.every;
                                true
                            }
                            Delivery::Conflate => {
                                group.pending = Some(Pending {
                                    wire: frame.0.clone(),
                                    kline_open: *open,
                                });
                                if !group.armed {
                                    group.armed = true;
                                    self.schedule_flush(
                                        topic_key,
                                        &feed.channel,
                                        group.every,
                                        group.next_due,
                                    );
                                }
                                false
                            }
                        };
                    if send {
                        for client in &group.members {
                            let tally = client
                                .outbox
                                .push_data(&feed.name, std::slice::from_ref(frame));
                            queued += tally.queued;
                            conflated += tally.conflated;
                            if tally.overflowed {
                                self.stats.slow_consumer(&client.name, &feed.name);
                            }
                        }
                    }
                }
            }
            self.stats
                .messages_out_of(feed.channel.message_type(), queued);
        }
        let now_ms = now_millis();
        for (_, event) in &events {
            self.stats
                .event_delivered(key.exchange, (now_ms - event.time_ms()) as f64 / 1000.0);
        }
        self.stats.fanned_out(started.elapsed().as_secs_f64());
        match key.feed {
            Feed::Trades => {
                for (_, event) in &events {
                    if let MarketEvent::Trade(t) = event {
                        if st.recent_trades.len() == RECENT_TRADES {
                            st.recent_trades.pop_front();
                        }
                        st.recent_trades.push_back(t.clone());
                    }
                }
            }
            Feed::Klines(_) => {
                for (_, event) in &events {
                    if let MarketEvent::Kline(k) = event {
                        if k.is_final {
                            if st.recent_finals.len() == RECENT_FINALS {
                                st.recent_finals.pop_front();
                            }
                            st.recent_finals.push_back(k.clone());
                        }
                    }
                }
            }
            Feed::Ticker | Feed::Book => {}
        }
        if let Some((_, last)) = events.into_iter().rev().find(|(_, e)| e.is_current_value()) {
            st.last = Some(last);
        }
        self.stats.conflated(conflated);
    }

    /// Channels nobody has held for `close_delay` go: coming back starts a new epoch.
    fn drop_idle_channels(&self, st: &mut TopicState, now: Instant) {
        let delay = self.close_delay;
        st.channels
            .retain(|f| f.idle_since.is_none_or(|t| now.duration_since(t) < delay));
    }

    /// Sends a throttle group's pending frame when its interval ends.
    fn schedule_flush(&self, topic: &TopicKey, channel: &Channel, every: Duration, at: Instant) {
        let Some(hub) = self.me.upgrade() else {
            return;
        };
        let (topic, channel) = (topic.clone(), channel.clone());
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => hub.flush(&topic, &channel, every),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    fn flush(&self, topic: &TopicKey, channel: &Channel, every: Duration) {
        let Some(topic) = self.topic(topic) else {
            return;
        };
        let mut st = topic.lock();
        let Some(idx) = st.channel_index(channel) else {
            return;
        };
        let feed = &mut st.channels[idx];
        let Some(group) = feed.throttled.iter_mut().find(|g| g.every == every) else {
            return;
        };
        group.armed = false;
        let Some(pending) = group.pending.take() else {
            return;
        };
        group.next_due = Instant::now() + every;
        let frame = [(pending.wire, Delivery::Conflate)];
        let mut queued = 0;
        for client in &group.members {
            let tally = client.outbox.push_data(&feed.name, &frame);
            queued += tally.queued;
            self.stats.conflated(tally.conflated);
        }
        self.stats
            .messages_out_of(feed.channel.message_type(), queued);
    }

    /// Delivers a published message to the subscribers of `channel`; returns how many got it.
    pub fn publish(&self, channel: &Channel, data: &Value) -> usize {
        let Some(topic) = self.topic(&TopicKey::Published(channel.clone())) else {
            return 0;
        };
        let mut st = topic.lock();
        let seq = st.shared.as_ref().map(|s| s.seq + 1);
        self.publish_locked(&mut st, data, seq)
    }

    /// Whether `channel` has a topic on this node (someone holds it, or did a moment ago).
    pub fn has_topic(&self, channel: &Channel) -> bool {
        self.topic(&TopicKey::Published(channel.clone())).is_some()
    }

    fn publish_locked(&self, st: &mut TopicState, data: &Value, seq: Option<u64>) -> usize {
        let now = Instant::now();
        self.drop_idle_channels(st, now);
        if let (Some(shared), Some(n)) = (st.shared.as_mut(), seq) {
            shared.seq = n;
        }
        let mut delivered = 0;
        for feed in &mut st.channels {
            feed.seq = seq.unwrap_or(feed.seq + 1);
            let frame = msg::published(&feed.channel, &feed.name, data, feed.seq);
            let wire = Wire::text(frame.as_str());
            feed.window.push(feed.seq, &wire, now);
            let frames = [(wire, Delivery::Reliable)];
            for client in feed.receivers() {
                let tally = client.outbox.push_data(&feed.name, &frames);
                delivered += tally.queued as usize;
                self.count_tally(client, &feed.channel, &feed.name, tally);
            }
        }
        delivered
    }

    /// Tells every channel of a feed that data is missing between `from_ms` and `to_ms`: a
    /// message of the channel, numbered and kept like the data it stands for.
    fn announce_gap(&self, key: &FeedKey, reason: GapReason, from_ms: i64, to_ms: i64) {
        let Some(topic) = self.topic(&TopicKey::Feed(key.clone())) else {
            return;
        };
        let mut st = topic.lock();
        let seq = st.shared.as_ref().map(|s| s.seq + 1);
        self.gap_locked(&mut st, reason, from_ms, to_ms, seq);
    }

    fn gap_locked(
        &self,
        st: &mut TopicState,
        reason: GapReason,
        from_ms: i64,
        to_ms: i64,
        seq: Option<u64>,
    ) {
        let now = Instant::now();
        if let (Some(shared), Some(n)) = (st.shared.as_mut(), seq) {
            shared.seq = n;
        }
        for feed in &mut st.channels {
            feed.seq = seq.unwrap_or(feed.seq + 1);
            self.stats.gap(reason);
            let frame = msg::gap(
                &feed.name,
                reason,
                Some(from_ms),
                Some(to_ms),
                feed.position(),
            );
            let wire = Wire::text(frame.as_str());
            feed.window.push(feed.seq, &wire, now);
            let frames = [(wire, Delivery::Reliable)];
            for client in feed.receivers() {
                let tally = client.outbox.push_data(&feed.name, &frames);
                self.count_tally(client, &feed.channel, &feed.name, tally);
            }
        }
    }

    /// Messages numbered by the source (a cluster), applied in order with their own seq.
    fn apply_numbered(&self, topic_key: &TopicKey, epoch: &str, items: Vec<(u64, Item)>) -> usize {
        let Some(topic) = self.topic(topic_key) else {
            return 0;
        };
        let mut delivered = 0;
        let mut st = topic.lock();
        if st.shared.as_ref().is_none_or(|s| &*s.epoch != epoch) {
            let before = items.first().map_or(0, |(n, _)| n.saturating_sub(1));
            self.restart_sequence(&mut st, epoch, before);
        }
        let applied = st.shared.as_ref().map_or(0, |s| s.seq);
        let mut run: Vec<(Option<u64>, MarketEvent)> = Vec::new();
        for (n, item) in items.into_iter().filter(|(n, _)| *n > applied) {
            match (item, topic_key) {
                (Item::Event(event), TopicKey::Feed(_)) => run.push((Some(n), event)),
                (
                    Item::Gap {
                        reason,
                        from_ms,
                        to_ms,
                    },
                    _,
                ) => {
                    if let TopicKey::Feed(key) = topic_key {
                        if !run.is_empty() {
                            self.dispatch_locked(topic_key, key, &mut st, std::mem::take(&mut run));
                        }
                    }
                    self.gap_locked(&mut st, reason, from_ms, to_ms, Some(n));
                }
                (Item::Published(data), TopicKey::Published(_)) => {
                    delivered += self.publish_locked(&mut st, &data, Some(n));
                }
                (item, _) => {
                    tracing::warn!(topic = ?topic_key, ?item, "a numbered message of another kind than its topic; skipped");
                }
            }
        }
        if let (TopicKey::Feed(key), false) = (topic_key, run.is_empty()) {
            self.dispatch_locked(topic_key, key, &mut st, run);
        }
        delivered
    }

    /// The source numbers this topic anew (a new epoch): every channel follows, and its
    /// subscribers are told their sequence restarted (`epoch_changed`).
    fn restart_sequence(&self, st: &mut TopicState, epoch: &str, seq: u64) {
        let had = st.shared.is_some();
        let shared = Shared::new(epoch, seq);
        for feed in &mut st.channels {
            feed.epoch = shared.epoch.clone();
            feed.seq = seq;
            feed.current_seq = 0;
            feed.started_ms = shared.started_ms;
            feed.window = Window::new(self.window, self.windows.clone());
            if !had {
                continue;
            }
            let frame = msg::gap(
                &feed.name,
                GapReason::EpochChanged,
                None,
                Some(shared.started_ms),
                feed.position(),
            );
            let receivers: Vec<Arc<Client>> = feed.receivers().cloned().collect();
            for client in receivers {
                self.stats.gap(GapReason::EpochChanged);
                self.send(&client, frame.clone());
            }
        }
        st.shared = Some(shared);
    }

    /// Called when an exchange's instrument list is (re)loaded: pending topics of that exchange
    /// either go live or, for symbols the exchange does not list, are dropped with
    /// `UNKNOWN_SYMBOL` so their clients know.
    fn resolve_pending(&self, exchange: ExchangeId) {
        let topics: Vec<(TopicKey, Arc<Topic>)> = self
            .topics_read()
            .iter()
            .filter(|(k, _)| matches!(k, TopicKey::Feed(f) if f.exchange == exchange))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for (key, topic) in topics {
            let TopicKey::Feed(feed) = &key else { continue };
            let mut st = topic.lock();
            if st.wanted || st.removed || st.refs == 0 {
                continue;
            }
            match self.source.check(feed) {
                Check::Pending => {}
                Check::Known => {
                    st.wanted = true;
                    self.source.want(feed);
                }
                Check::Refused(code, message) => {
                    self.drop_subscribers(&mut st, code, &message);
                    drop(st);
                    self.schedule_release(&key, &topic);
                }
            }
        }
    }

    /// Forgets the current value of a feed that can no longer vouch for it (a book being
    /// resynced, or whose connection dropped), so new subscribers wait for a fresh one.
    fn invalidate(&self, key: &FeedKey) {
        if let Some(topic) = self.topic(&TopicKey::Feed(key.clone())) {
            topic.lock().last = None;
        }
    }

    /// The exchange refused a feed for good: its subscribers get `code` and `unsubscribed`,
    /// and the topic goes (upstream stream included).
    fn reject(&self, key: &FeedKey, code: ErrorCode, message: &str) {
        let topic_key = TopicKey::Feed(key.clone());
        let Some(topic) = self.topic(&topic_key) else {
            return;
        };
        let mut st = topic.lock();
        self.drop_subscribers(&mut st, code, message);
        drop(st);
        self.schedule_release(&topic_key, &topic);
    }

    /// Tells every subscriber of a topic why it is dropped, and drops them.
    fn drop_subscribers(&self, st: &mut TopicState, code: ErrorCode, message: &str) {
        for ch in std::mem::take(&mut st.channels) {
            let mut members: Vec<Arc<Client>> = ch.receivers().cloned().collect();
            members.extend(ch.awaiting.iter().map(|a| a.client.clone()));
            if !members.is_empty() {
                self.stats.channel_closed();
            }
            self.stats
                .subscribed(ch.channel.kind(), -(members.len() as i64));
            for client in members {
                client.subs().retain(|h| h.channel != ch.channel);
                self.stats.client_error(code);
                self.send(&client, msg::error(Some(&ch.name), code, message, &None));
                self.send(&client, msg::unsubscribed(&ch.name, &None));
            }
        }
        st.refs = 0;
    }

    /// A snapshot for the stats endpoint.
    pub fn snapshot(&self) -> HubSnapshot {
        let topics: Vec<(TopicKey, Arc<Topic>)> = self
            .topics_read()
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let mut snap = HubSnapshot::default();
        for (key, topic) in topics {
            let st = topic.lock();
            for feed in st.channels.iter().filter(|f| f.members() > 0) {
                snap.active_channels.push(feed.name.to_string());
                snap.total_subscriptions += feed.members();
                if matches!(feed.channel, Channel::Signals(_)) {
                    snap.signal_channels += 1;
                }
            }
            if let TopicKey::Feed(f) = &key {
                if f.feed == crate::events::Feed::Ticker && st.refs > 0 {
                    snap.quote_streams += 1;
                }
                if matches!(st.last, Some(MarketEvent::Ticker(_))) {
                    snap.price_cache += 1;
                }
            }
        }
        snap.active_channels.sort();
        snap.connected_clients = self.connected_clients();
        snap
    }
}

impl FeedSink for Hub {
    fn events(&self, key: &FeedKey, events: Vec<MarketEvent>) {
        self.dispatch(key, events);
    }

    fn invalidated(&self, key: &FeedKey) {
        self.invalidate(key);
    }

    fn refused(&self, key: &FeedKey, code: ErrorCode, message: &str) {
        self.reject(key, code, message);
    }

    fn instruments_loaded(&self, exchange: ExchangeId) {
        self.resolve_pending(exchange);
    }

    fn gap(&self, key: &FeedKey, reason: GapReason, from_ms: i64, to_ms: i64) {
        self.announce_gap(key, reason, from_ms, to_ms);
    }

    fn numbered(&self, topic: &TopicKey, epoch: &str, items: Vec<(u64, Item)>) -> usize {
        self.apply_numbered(topic, epoch, items)
    }

    fn position(&self, topic: &TopicKey) -> Option<(Arc<str>, u64)> {
        let t = self.topic(topic)?;
        let st = t.lock();
        st.shared.as_ref().map(|s| (s.epoch.clone(), s.seq))
    }
}

/// Whether a channel's messages are kept for `since` one by one (trades, final klines,
/// published messages); the other kinds resume to their current value.
fn keeps_messages(channel: &Channel) -> bool {
    !matches!(
        channel,
        Channel::Price(_) | Channel::Ticker(_) | Channel::Depth(..)
    )
}

/// A numbered message as it goes out on one channel of its topic.
fn render_item(
    topic: &TopicKey,
    feed: &ChannelFeed,
    item: &Item,
    seq: u64,
) -> Option<(Wire, Delivery)> {
    let position = crate::protocol::Position {
        epoch: &feed.epoch,
        seq,
    };
    match (item, topic) {
        (Item::Event(event), TopicKey::Feed(key)) => {
            let (frame, delivery) = render(key, &feed.channel, &feed.name, event, seq, &now_iso())?;
            Some((Wire::text(frame.as_str()), delivery))
        }
        (
            Item::Gap {
                reason,
                from_ms,
                to_ms,
            },
            _,
        ) => {
            let frame = msg::gap(&feed.name, *reason, Some(*from_ms), Some(*to_ms), position);
            Some((Wire::text(frame.as_str()), Delivery::Reliable))
        }
        (Item::Published(data), TopicKey::Published(_)) => {
            let frame = msg::published(&feed.channel, &feed.name, data, seq);
            Some((Wire::text(frame.as_str()), Delivery::Reliable))
        }
        _ => None,
    }
}

/// The topic's current value as it was sent on this channel (its seq), for a new subscriber.
fn current_frame(
    key: &FeedKey,
    feed: &ChannelFeed,
    last: Option<&MarketEvent>,
) -> Option<(Wire, Delivery)> {
    let last = last?;
    if feed.current_seq == 0 {
        return None;
    }
    let (frame, delivery) = render(
        key,
        &feed.channel,
        &feed.name,
        last,
        feed.current_seq,
        &now_iso(),
    )?;
    Some((Wire::text(frame.as_str()), delivery))
}

/// The exchange's history joined to what the topic saw live: each trade once (by id), each
/// candle once (the relay's own copy where it has one), nothing newer than the live stream
/// has sent (that arrives live), the newest `limit`, oldest first.
fn merge_history(
    st: &TopicState,
    channel: &Channel,
    rows: Vec<MarketEvent>,
    limit: usize,
) -> Vec<MarketEvent> {
    let mut out: Vec<MarketEvent> = match channel {
        Channel::Trades(_) => {
            let newest_live = st.recent_trades.back().map(Trade::order);
            let mut seen = HashSet::new();
            let mut trades: Vec<Trade> = rows
                .into_iter()
                .filter_map(|e| match e {
                    MarketEvent::Trade(t) => Some(t),
                    _ => None,
                })
                .filter(|t| newest_live.is_none_or(|n| t.order() <= n))
                .chain(st.recent_trades.iter().cloned())
                .filter(|t| seen.insert(t.trade_id.clone()))
                .collect();
            trades.sort_by_key(Trade::order);
            trades.into_iter().map(MarketEvent::Trade).collect()
        }
        Channel::Klines(_, interval) => {
            let mut candles: BTreeMap<i64, Kline> = rows
                .into_iter()
                .filter_map(|e| match e {
                    MarketEvent::Kline(k) if k.interval == *interval => Some(k),
                    _ => None,
                })
                .map(|k| (k.open_time, k))
                .collect();
            let live_last = match &st.last {
                Some(MarketEvent::Kline(k)) if k.interval == *interval => Some(k.clone()),
                _ => None,
            };
            for k in st.recent_finals.iter().cloned().chain(live_last.clone()) {
                candles.insert(k.open_time, k);
            }
            if let Some(live) = &live_last {
                candles.retain(|open, _| *open <= live.open_time);
            }
            candles.into_values().map(MarketEvent::Kline).collect()
        }
        _ => rows,
    };
    let skip = out.len().saturating_sub(limit);
    out.split_off(skip)
}

#[derive(Debug, Default)]
pub struct HubSnapshot {
    pub connected_clients: usize,
    pub total_subscriptions: usize,
    pub active_channels: Vec<String>,
    /// Ticker feeds (price/ticker channels) in use.
    pub quote_streams: usize,
    /// `signals:` channels with subscribers.
    pub signal_channels: usize,
    /// Ticker values held for instant replay.
    pub price_cache: usize,
}

#[cfg(test)]
mod tests;
