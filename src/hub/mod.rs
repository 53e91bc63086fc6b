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

pub mod feed;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::domain::{Channel, ExchangeId};
use crate::events::{render, Delivery, FeedKey, MarketEvent};
use crate::protocol::{msg, now_iso, ErrorCode, RequestId};
use crate::stats::Stats;
pub use crate::ws::Close;
use crate::ws::{Outbox, Pushed, Tally, Wire};
pub use feed::{Check, FeedSink, FeedSource};

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
        socket: Option<Arc<TcpStream>>,
    ) -> Client {
        Client {
            id,
            name: Arc::from(format!("c-{id:x}")),
            outbox: Outbox::new(queue_capacity, max_subscriptions, socket),
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

struct ChannelFeed {
    channel: Channel,
    name: Arc<str>,
    subscribers: Vec<Arc<Client>>,
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

    pub fn register_client(&self, socket: Option<Arc<TcpStream>>) -> Arc<Client> {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client::new(
            id,
            self.queue_capacity,
            self.max_subscriptions,
            socket,
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
    /// `subscribed` ack followed by the current value, and asks the exchange for the stream when
    /// this is the topic's first subscription. A duplicate is acknowledged again, changing nothing.
    pub fn attach(&self, client: &Arc<Client>, held: Held, id: &RequestId) -> Attached {
        loop {
            let topic = self.topic_or_insert(&held.topic);
            let mut st = topic.lock();
            if st.removed {
                continue;
            }
            if client.holds(&held.channel) {
                self.send(client, msg::subscribed(&held.name, id));
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

            let feed = match st
                .channels
                .iter_mut()
                .position(|f| f.channel == held.channel)
            {
                Some(i) => &mut st.channels[i],
                None => {
                    self.stats.channel_opened();
                    st.channels.push(ChannelFeed {
                        channel: held.channel.clone(),
                        name: held.name.clone(),
                        subscribers: Vec::new(),
                    });
                    let last = st.channels.len() - 1;
                    &mut st.channels[last]
                }
            };
            feed.subscribers.push(client.clone());
            self.stats.subscribed(held.channel.kind(), 1);
            let name = feed.name.clone();
            self.send(client, msg::subscribed(&name, id));
            if let (TopicKey::Feed(key), Some(last)) = (&held.topic, &st.last) {
                if let Some((frame, delivery)) = render(key, &held.channel, &name, last, &now_iso())
                {
                    let tally = client
                        .outbox
                        .push_data(&name, &[(Wire::text(frame.as_str()), delivery)]);
                    self.count_tally(client, &held.channel, &name, tally);
                }
            }
            client.subs().push(held.clone());
            st.refs += 1;
            if st.refs == 1 {
                st.generation += 1;
            }
            if let (TopicKey::Feed(key), Attached::Live) = (&held.topic, &outcome) {
                if !st.wanted {
                    st.wanted = true;
                    self.source.want(key);
                }
                if !self.source.reachable(key.exchange) {
                    return Attached::Unavailable;
                }
            }
            return outcome;
        }
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
        if let Some(i) = st.channels.iter().position(|f| f.channel == held.channel) {
            let feed = &mut st.channels[i];
            if let Some(j) = feed.subscribers.iter().position(|c| c.id == client.id) {
                feed.subscribers.swap_remove(j);
                self.stats.subscribed(held.channel.kind(), -1);
            }
            if feed.subscribers.is_empty() {
                st.channels.swap_remove(i);
                self.stats.channel_closed();
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
        let delay = match key {
            TopicKey::Feed(_) => self.close_delay,
            TopicKey::Published(_) => Duration::ZERO,
        };
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
        if let (TopicKey::Feed(feed), true) = (key, st.wanted) {
            self.source.unwant(feed);
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
        let Some(topic) = self.topic(&TopicKey::Feed(key.clone())) else {
            return;
        };
        let mut st = topic.lock();
        let mut events = events;
        events.retain(|event| {
            let MarketEvent::Kline(k) = event else {
                return true;
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
        // Counted once per channel, not per client: the loop below is the hot path.
        let started = std::time::Instant::now();
        let mut conflated = 0;
        let mut frames = Vec::with_capacity(events.len());
        for feed in &st.channels {
            frames.clear();
            frames.extend(events.iter().filter_map(|event| {
                let (frame, delivery) = render(key, &feed.channel, &feed.name, event, &now)?;
                Some((Wire::text(frame.as_str()), delivery))
            }));
            if frames.is_empty() {
                continue;
            }
            let mut queued = 0;
            for client in &feed.subscribers {
                let tally = client.outbox.push_data(&feed.name, &frames);
                queued += tally.queued;
                conflated += tally.conflated;
                if tally.overflowed {
                    self.stats.slow_consumer(&client.name, &feed.name);
                }
            }
            self.stats
                .messages_out_of(feed.channel.message_type(), queued);
        }
        let now_ms = crate::protocol::now_millis();
        for event in &events {
            self.stats
                .event_delivered(key.exchange, (now_ms - event.time_ms()) as f64 / 1000.0);
        }
        self.stats.fanned_out(started.elapsed().as_secs_f64());
        if let Some(last) = events.into_iter().rev().find(MarketEvent::is_current_value) {
            st.last = Some(last);
        }
        drop(st);
        self.stats.conflated(conflated);
    }

    /// Delivers a published message to the subscribers of `channel`; returns how many got it.
    pub fn publish(&self, channel: &Channel, data: &Value) -> usize {
        let Some(topic) = self.topic(&TopicKey::Published(channel.clone())) else {
            return 0;
        };
        let st = topic.lock();
        let mut delivered = 0;
        for feed in &st.channels {
            let frame = msg::published(&feed.channel, &feed.name, data);
            let frames = [(Wire::text(frame.as_str()), Delivery::Reliable)];
            for client in &feed.subscribers {
                let tally = client.outbox.push_data(&feed.name, &frames);
                delivered += tally.queued as usize;
                self.count_tally(client, &feed.channel, &feed.name, tally);
            }
        }
        delivered
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
            self.stats.channel_closed();
            self.stats
                .subscribed(ch.channel.kind(), -(ch.subscribers.len() as i64));
            for client in ch.subscribers {
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
            for feed in &st.channels {
                snap.active_channels.push(feed.name.to_string());
                snap.total_subscriptions += feed.subscribers.len();
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
