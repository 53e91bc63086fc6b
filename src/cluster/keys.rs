//! How a cluster's state is laid out in Redis, and the scripts that change it atomically.
//!
//! Per exchange stream (`<id>` = `binance:BTCUSDT:trades`):
//! - `relay:lease:<id>`: `<node>|<token>`, taken when free (or still this node's, [`TAKE`])
//!   with a short expiry, renewed by its holder; the token (`relay:fence:<id>`, incremented per grant) fences a stalled old owner
//!   out: every publish checks that the lease is still its own.
//! - `relay:pos:<id>`: hash `epoch`, `seq` (the last seq published), `trade` (the newest trade,
//!   `<id>:<ms>`): where a new owner carries on.
//! - `relay:win:<id>`: the recovery window, a stream with one entry per published batch, its id
//!   the batch's last seq, bounded in length.
//! - `relay:want:<id>`: sorted set of the nodes that want the stream, scored by expiry.
//! - pub/sub `relay:feed:<id>`: every batch, as published.
//!
//! Per published channel (`<ch>` = `signals:alpha`): `relay:pos:<ch>`, `relay:win:<ch>`, pub/sub
//! `relay:pub:<ch>`. Nodes: `relay:nodes`, scored by expiry. Control: pub/sub `relay:ctl`.
//! Per node: `relay:users:<node>`, its connections per user (`server.max_connections_per_user`).

use std::sync::LazyLock;

use redis::Script;

use crate::domain::Channel;
use crate::events::{Feed, FeedKey};
use crate::hub::TopicKey;

pub const NODES: &str = "relay:nodes";
pub const CONTROL: &str = "relay:ctl";

/// A topic's name inside the keys.
pub fn topic_id(topic: &TopicKey) -> String {
    match topic {
        TopicKey::Feed(key) => feed_id(key),
        TopicKey::Published(channel) => channel.to_string(),
    }
}

pub fn feed_id(key: &FeedKey) -> String {
    let feed = match key.feed {
        Feed::Ticker => "ticker".to_string(),
        Feed::Trades => "trades".to_string(),
        Feed::Book => "book".to_string(),
        Feed::Klines(iv) => format!("klines_{iv}"),
    };
    format!("{}:{}:{}", key.exchange, key.symbol.as_str(), feed)
}

/// The cluster's connection attempts at an exchange (see [`ATTEMPT`]).
pub fn attempts(exchange: crate::domain::ExchangeId) -> String {
    format!("relay:attempts:{exchange}")
}

pub fn lease(id: &str) -> String {
    format!("relay:lease:{id}")
}

pub fn fence(id: &str) -> String {
    format!("relay:fence:{id}")
}

pub fn pos(id: &str) -> String {
    format!("relay:pos:{id}")
}

pub fn window(id: &str) -> String {
    format!("relay:win:{id}")
}

/// A node's connections per user: hash `<user>` → count.
pub fn users(node: &str) -> String {
    format!("relay:users:{node}")
}

pub fn want(id: &str) -> String {
    format!("relay:want:{id}")
}

/// The pub/sub channel a topic's messages travel on.
pub fn wire(topic: &TopicKey) -> String {
    match topic {
        TopicKey::Feed(key) => feed_wire(&feed_id(key)),
        TopicKey::Published(channel) => published_wire(channel),
    }
}

/// The pub/sub channel of the stream `id` (see [`feed_id`]).
pub fn feed_wire(id: &str) -> String {
    format!("relay:feed:{id}")
}

/// What the pub/sub channels of published channels start with.
pub const PUBLISHED_WIRE: &str = "relay:pub:";

pub fn published_wire(channel: &Channel) -> String {
    format!("{PUBLISHED_WIRE}{channel}")
}

/// Whether the cluster keeps a topic's messages one by one for `since` (trades, klines and
/// published channels; tickers and books resume to their current value).
pub fn keeps(topic: &TopicKey) -> bool {
    match topic {
        TopicKey::Feed(key) => matches!(key.feed, Feed::Trades | Feed::Klines(_)),
        TopicKey::Published(_) => true,
    }
}

/// The start of every script that reads a topic's position: the epoch, created (with `seq` 0)
/// where none exists. KEYS[1] is the position, ARGV[1] the epoch to create.
macro_rules! with_position {
    ($rest:literal) => {
        concat!(
            "local e = redis.call('HGET', KEYS[1], 'epoch')\n",
            "if not e then\n",
            "  e = ARGV[1]\n",
            "  redis.call('HSET', KEYS[1], 'epoch', e, 'seq', 0)\n",
            "end\n",
            $rest
        )
    };
}

/// The topic's position (see [`with_position!`]) and its newest trade ('' if none).
/// KEYS: pos. ARGV: new epoch, ttl ms. Returns {epoch, seq, trade}.
pub static POSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(with_position!(
        r#"
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {e, redis.call('HGET', KEYS[1], 'seq'), redis.call('HGET', KEYS[1], 'trade') or ''}
"#
    ))
});

/// The topic's position and, in the same moment, its window from a seq on.
/// KEYS: pos, window. ARGV: new epoch, ttl ms, first entry id. Returns {epoch, seq, entries}.
pub static RECALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(with_position!(
        r#"
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {e, redis.call('HGET', KEYS[1], 'seq'), redis.call('XRANGE', KEYS[2], ARGV[3], '+')}
"#
    ))
});

/// A batch of a stream, published by its lease holder only.
/// KEYS: lease, pos, window. ARGV: lease value, epoch, last seq, payload, pub/sub channel,
/// keep (0/1), max entries, ttl ms, newest trade ('' if none). Returns 1, or 0 when the lease is
/// not the caller's (it was fenced out).
pub static PUBLISH_FEED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'seq', ARGV[3])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[2], 'trade', ARGV[9]) end
redis.call('PEXPIRE', KEYS[2], ARGV[8])
if ARGV[6] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], ARGV[3] .. '-1', 'm', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"#,
    )
});

/// A message posted to a published channel: numbered by Redis, kept, published.
/// KEYS: pos, window. ARGV: new epoch, item JSON, pub/sub channel, max entries, ttl ms, node
/// (JSON string), message id (JSON string), lowest seq allowed. Returns {epoch, seq, receivers}.
pub static PUBLISH_MESSAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(with_position!(
        r#"
local s = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if s < tonumber(ARGV[8]) then
  s = tonumber(ARGV[8])
  redis.call('HSET', KEYS[1], 'seq', s)
end
local payload = '{"n":' .. ARGV[6] .. ',"e":"' .. e .. '","t":0,"m":' .. ARGV[7] .. ',"i":[[' .. s .. ',' .. ARGV[2] .. ']]}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], s .. '-1', 'm', payload)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local n = redis.call('PUBLISH', ARGV[3], payload)
return {e, s, n}
"#
    ))
});

/// Takes a lease that is free, or still this node's from before (a lease it held when Redis
/// went away and that has not expired yet: it is taken anew, with the new token).
/// KEYS: lease. ARGV: value, the node's prefix (`<node>|`), lease ms. Returns 1 or 0.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"#,
    )
});

/// One connection attempt at an exchange, for every relay of the cluster: a sliding window of
/// attempts. KEYS: the exchange's attempts. ARGV: now ms, window ms, max, a unique member.
/// Returns 0 (taken) or how many ms until one is free.
pub static ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + tonumber(ARGV[2]) - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"#,
    )
});

/// Renews a lease held by the caller. KEYS: lease, pos, window. ARGV: value, lease ms, ttl ms.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"#,
    )
});

/// Gives a lease up if it is the caller's. KEYS: lease. ARGV: value.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// One more connection of a user, if the live nodes together hold fewer than the cap.
/// KEYS: nodes, this node's users. ARGV: user, cap, now ms, this node, ttl ms. Returns -1
/// (counted) or how many the cluster holds.
pub static USER_JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local total = 0
local counted = false
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')) do
  if n == ARGV[4] then counted = true end
  total = total + tonumber(redis.call('HGET', 'relay:users:' .. n, ARGV[1]) or '0')
end
if not counted then total = total + tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') end
if total >= tonumber(ARGV[2]) then return total end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return -1
"#,
    )
});

/// One connection of a user fewer. KEYS: this node's users. ARGV: user.
pub static USER_LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"#,
    )
});
