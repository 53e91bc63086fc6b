//! One channel of a topic: its sequence (`epoch`, `seq`), its recovery window, and who
//! receives it: live subscribers, throttled groups, and subscribers waiting for a history.
//!
//! Every message on a channel is rendered once and numbered once; subscribers differ only in
//! which of the shared frames they are given (all of them, or the newest per throttle
//! interval), never in their bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::Client;
use crate::domain::Channel;
use crate::protocol::Position;
use crate::ws::Wire;

/// The size of every recovery window together, for `/metrics` and the stats endpoint.
#[derive(Debug, Default)]
pub struct WindowMeter {
    pub bytes: AtomicI64,
    pub messages: AtomicI64,
}

/// How much a channel keeps for `since` (`[recovery]`).
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits {
    pub messages: usize,
    pub max_age: Duration,
}

struct Kept {
    seq: u64,
    at: Instant,
    at_ms: i64,
    wire: Wire,
}

/// The channel's recent messages that must not be missed (trades, final klines, published
/// messages, gap notices), bounded by count and age.
pub struct Window {
    kept: VecDeque<Kept>,
    bytes: usize,
    /// The highest seq dropped from the window: a resume after it is complete.
    evicted_upto: u64,
    /// When that message was produced, ms.
    evicted_at_ms: Option<i64>,
    limits: WindowLimits,
    meter: Arc<WindowMeter>,
}

impl Window {
    pub fn new(limits: WindowLimits, meter: Arc<WindowMeter>) -> Window {
        Window {
            kept: VecDeque::new(),
            bytes: 0,
            evicted_upto: 0,
            evicted_at_ms: None,
            limits,
            meter,
        }
    }

    pub fn push(&mut self, seq: u64, wire: &Wire, now: Instant) {
        let at_ms = crate::protocol::now_millis();
        if self.limits.messages == 0 {
            self.evicted_upto = seq;
            self.evicted_at_ms = Some(at_ms);
            return;
        }
        self.bytes += wire.len();
        self.meter
            .bytes
            .fetch_add(wire.len() as i64, Ordering::Relaxed);
        self.meter.messages.fetch_add(1, Ordering::Relaxed);
        self.kept.push_back(Kept {
            seq,
            at: now,
            at_ms,
            wire: wire.clone(),
        });
        while self.kept.len() > self.limits.messages {
            self.evict();
        }
        self.expire(now);
    }

    /// Drops what is older than the window's age limit.
    pub fn expire(&mut self, now: Instant) {
        while self
            .kept
            .front()
            .is_some_and(|k| now.duration_since(k.at) > self.limits.max_age)
        {
            self.evict();
        }
    }

    fn evict(&mut self) {
        if let Some(k) = self.kept.pop_front() {
            self.bytes -= k.wire.len();
            self.meter
                .bytes
                .fetch_sub(k.wire.len() as i64, Ordering::Relaxed);
            self.meter.messages.fetch_sub(1, Ordering::Relaxed);
            self.evicted_upto = k.seq;
            self.evicted_at_ms = Some(k.at_ms);
        }
    }

    /// When the newest message the window no longer holds was produced.
    pub fn evicted_at_ms(&self) -> Option<i64> {
        self.evicted_at_ms
    }

    /// Whether every kept-kind message after `seq` is still held.
    pub fn holds_after(&self, seq: u64) -> bool {
        self.evicted_upto <= seq
    }

    /// The held messages after `seq`, oldest first, with their seq.
    pub fn after_numbered(&self, seq: u64) -> Vec<(u64, Wire)> {
        self.kept
            .iter()
            .filter(|k| k.seq > seq)
            .map(|k| (k.seq, k.wire.clone()))
            .collect()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.meter
            .bytes
            .fetch_sub(self.bytes as i64, Ordering::Relaxed);
        self.meter
            .messages
            .fetch_sub(self.kept.len() as i64, Ordering::Relaxed);
    }
}

/// A frame waiting for its throttle interval to end.
pub struct Pending {
    pub wire: Wire,
    /// Open time, for a forming kline (a final one of the same candle supersedes it).
    pub kline_open: Option<i64>,
}

/// The subscribers of one channel at one `throttleMs`: they share the schedule and the
/// newest pending frame, so throttling costs per group, not per client.
pub struct Throttle {
    pub every: Duration,
    pub members: Vec<Arc<Client>>,
    /// When the next frame may go at once.
    pub next_due: Instant,
    pub pending: Option<Pending>,
    /// A flush is scheduled for `next_due`.
    pub armed: bool,
}

/// A subscriber waiting for its `history`: it joins the live stream once the history is sent.
pub struct Awaiting {
    pub client: Arc<Client>,
    /// Tells a late answer for an earlier request from the current one.
    pub ticket: u64,
    pub throttle: Option<Duration>,
}

pub struct ChannelFeed {
    pub channel: Channel,
    pub name: Arc<str>,
    pub epoch: Arc<str>,
    /// When this epoch started, ms.
    pub started_ms: i64,
    /// The last seq produced.
    pub seq: u64,
    /// The seq of the message that carried the topic's current value on this channel.
    pub current_seq: u64,
    pub live: Vec<Arc<Client>>,
    pub throttled: Vec<Throttle>,
    pub awaiting: Vec<Awaiting>,
    pub window: Window,
    /// Since when nobody holds the channel; it goes `close_delay` later (a new epoch then).
    pub idle_since: Option<Instant>,
}

impl ChannelFeed {
    pub fn new(channel: Channel, name: Arc<str>, window: Window, now_ms: i64) -> ChannelFeed {
        ChannelFeed {
            channel,
            name,
            epoch: new_epoch(),
            started_ms: now_ms,
            seq: 0,
            current_seq: 0,
            live: Vec::new(),
            throttled: Vec::new(),
            awaiting: Vec::new(),
            window,
            idle_since: None,
        }
    }

    pub fn position(&self) -> Position<'_> {
        Position {
            epoch: &self.epoch,
            seq: self.seq,
        }
    }

    pub fn members(&self) -> usize {
        self.live.len()
            + self.awaiting.len()
            + self
                .throttled
                .iter()
                .map(|t| t.members.len())
                .sum::<usize>()
    }

    /// Takes `client` out of whichever list holds it; returns whether one did.
    pub fn remove(&mut self, client_id: u64) -> bool {
        if let Some(i) = self.live.iter().position(|c| c.id == client_id) {
            self.live.swap_remove(i);
            return true;
        }
        if let Some(i) = self.awaiting.iter().position(|a| a.client.id == client_id) {
            self.awaiting.swap_remove(i);
            return true;
        }
        for (g, group) in self.throttled.iter_mut().enumerate() {
            if let Some(i) = group.members.iter().position(|c| c.id == client_id) {
                group.members.swap_remove(i);
                if group.members.is_empty() {
                    self.throttled.swap_remove(g);
                }
                return true;
            }
        }
        false
    }

    /// Adds `client` to the live stream, throttled or not.
    pub fn join(&mut self, client: Arc<Client>, throttle: Option<Duration>, now: Instant) {
        match throttle {
            None => self.live.push(client),
            Some(every) => match self.throttled.iter_mut().find(|t| t.every == every) {
                Some(group) => group.members.push(client),
                None => self.throttled.push(Throttle {
                    every,
                    members: vec![client],
                    next_due: now,
                    pending: None,
                    armed: false,
                }),
            },
        }
    }

    /// Every subscriber that receives live messages now.
    pub fn receivers(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.live
            .iter()
            .chain(self.throttled.iter().flat_map(|t| t.members.iter()))
    }
}

/// A short random name for a new sequence.
pub fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    Arc::from(s)
}
