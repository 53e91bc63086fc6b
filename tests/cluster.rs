//! A cluster of relays on a real `redis-server` (PROTOCOL.md `[cluster]`): published messages
//! reach every node, one upstream per stream for the whole cluster, the same `seq` on every
//! node, recovery on another node, failover after `kill -9`, and Redis going away and back.
//! `.ci/run` installs `redis-server`; each test starts its own on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use exchange_relay::config::Config;
use exchange_relay::sim::SimBinance;
use serde_json::{json, Value};

fn node_config(sim: &SimBinance, redis: &Redis, node: &str) -> Config {
    let mut c = config_for(sim);
    c.cluster.redis_url = redis.url();
    c.cluster.node_id = node.into();
    c
}

async fn publish(relay: &Relay, channel: &str, data: Value) -> Value {
    reqwest::Client::new()
        .post(relay.http("/api/v1/publish"))
        .bearer_auth(PUBLISH_KEY)
        .json(&json!({"channel": channel, "data": data}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until every node's `/health` says the cluster is ok with `nodes` members.
async fn until_cluster(relays: &[&Relay], nodes: u64) {
    for relay in relays {
        until("the cluster to form", || async {
            let h = health(relay).await;
            (h["cluster"]["state"] == "ok" && h["cluster"]["nodes"] == nodes).then_some(())
        })
        .await;
    }
}

/// A Redis, a simulated Binance, and nodes `a` and `b` of one cluster, formed.
async fn two_nodes() -> (Redis, SimBinance, Relay, Relay) {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    let a = start_relay(node_config(&sim, &redis, "a")).await;
    let b = start_relay(node_config(&sim, &redis, "b")).await;
    until_cluster(&[&a, &b], 2).await;
    (redis, sim, a, b)
}

async fn subscribed(client: &mut Client, channel: &'static str) -> Value {
    client.subscribe(&[channel]).await;
    client.recv_until(is_msg("subscribed", channel)).await
}

/// Trades on `channel` until `n` have arrived: (tradeId, seq) each.
async fn trades(client: &mut Client, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = client.recv_until(is_type("trade")).await;
        out.push((
            v["data"]["tradeId"].as_u64().unwrap(),
            v["seq"].as_u64().unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn a_message_published_on_one_node_reaches_subscribers_on_every_node_once() {
    let (redis, sim, a, b) = two_nodes().await;
    let mut on_a = Client::connect(&a).await;
    let mut on_b = Client::connect(&b).await;
    let ack_a = subscribed(&mut on_a, "signals:ALPHA").await;
    let ack_b = subscribed(&mut on_b, "signals:ALPHA").await;
    assert_eq!(
        ack_a["epoch"], ack_b["epoch"],
        "one sequence for the cluster"
    );

    let posted = publish(&a, "signals:ALPHA", json!({"n": 1})).await;
    assert_eq!(posted["data"]["delivered"], 1, "{posted}");
    assert_eq!(posted["data"]["nodes"], 2, "{posted}");
    let posted = publish(&b, "signals:ALPHA", json!({"n": 2})).await;
    assert_eq!(posted["data"]["delivered"], 1, "{posted}");

    for client in [&mut on_a, &mut on_b] {
        let first = client.recv_until(is_type("signal")).await;
        let second = client.recv_until(is_type("signal")).await;
        assert_eq!(first["data"]["n"], 1);
        assert_eq!(second["data"]["n"], 2);
        assert_eq!(
            second["seq"].as_u64().unwrap(),
            first["seq"].as_u64().unwrap() + 1
        );
    }
    // Once: nothing else arrives on either node.
    for client in [&mut on_a, &mut on_b] {
        client.send(json!({"type": "ping"})).await;
        let next = client.recv_until(|v| v["type"] != "ping").await;
        assert_eq!(next["type"], "pong", "a message arrived twice: {next}");
    }
    // A node without subscribers is not counted, and gets nothing it did not ask for.
    let c = start_relay(node_config(&sim, &redis, "c")).await;
    until_cluster(&[&a, &b, &c], 3).await;
    let posted = publish(&c, "signals:ALPHA", json!({"n": 3})).await;
    assert_eq!(posted["data"]["delivered"], 0, "{posted}");
    assert_eq!(posted["data"]["nodes"], 2, "{posted}");
    assert_eq!(on_b.recv_until(is_type("signal")).await["data"]["n"], 3);
}

#[tokio::test]
async fn three_nodes_share_one_upstream_stream_with_the_same_sequence() {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    let nodes = [
        start_relay(node_config(&sim, &redis, "n1")).await,
        start_relay(node_config(&sim, &redis, "n2")).await,
        start_relay(node_config(&sim, &redis, "n3")).await,
    ];
    until_cluster(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;
    let mut clients = Vec::new();
    for relay in &nodes {
        let mut c = Client::connect(relay).await;
        subscribed(&mut c, "trades:BTCUSDT").await;
        clients.push(c);
    }
    let mut seen = Vec::new();
    for c in &mut clients {
        seen.push(trades(c, 20).await);
    }
    // Exactly one subscription to the stream at the exchange, for the whole cluster.
    let subs = sim.subscriptions();
    assert_eq!(subs.get("btcusdt@trade"), Some(&1), "{subs:?}");
    assert_eq!(sim.connections(), 1, "one exchange connection in all");
    // Every node sends each trade with the same seq.
    let mut by_trade = std::collections::BTreeMap::new();
    for list in &seen {
        for (id, seq) in list {
            if let Some(other) = by_trade.insert(*id, *seq) {
                assert_eq!(other, *seq, "trade {id} numbered differently on two nodes");
            }
        }
    }
    // Every node names the same owner.
    let mut owners = BTreeSet::new();
    for relay in &nodes {
        let h = health(relay).await;
        owners.insert(h["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"].to_string());
    }
    assert_eq!(owners.len(), 1, "{owners:?}");
}

#[tokio::test]
async fn a_client_that_moves_to_another_node_recovers_there() {
    let (_redis, _sim, a, b) = two_nodes().await;
    // Another user keeps the channel open on A meanwhile (else it is released, and with it
    // the sequence).
    let mut stays = Client::connect(&a).await;
    subscribed(&mut stays, "trades:BTCUSDT").await;
    let mut client = Client::connect(&a).await;
    let ack = subscribed(&mut client, "trades:BTCUSDT").await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let got = trades(&mut client, 5).await;
    let (last_id, last_seq) = *got.last().unwrap();
    drop(client);
    // Trades go on while the client is away; node B has never carried the channel.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut moved = Client::connect(&b).await;
    moved
        .send(json!({"type": "subscribe", "channels": [
            {"channel": "trades:BTCUSDT", "since": {"epoch": epoch, "seq": last_seq}}
        ]}))
        .await;
    let ack = moved
        .recv_until(is_msg("subscribed", "trades:BTCUSDT"))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(ack["epoch"], epoch.as_str());
    let resumed = trades(&mut moved, 10).await;
    for (i, (id, seq)) in resumed.into_iter().enumerate() {
        assert_eq!(seq, last_seq + 1 + i as u64, "seq continues without a hole");
        assert_eq!(id, last_id + 1 + i as u64, "no trade missed or repeated");
    }
}

/// A relay in its own process, so that it can be killed with SIGKILL.
struct Process(Child, u16);

impl Process {
    fn start(sim: &SimBinance, redis: &Redis, node: &str) -> Process {
        Process::start_with(sim, redis, node, &[])
    }

    /// With more `RELAY_...` settings.
    fn start_with(sim: &SimBinance, redis: &Redis, node: &str, env: &[(&str, &str)]) -> Process {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
            .envs(env.iter().copied())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RELAY_EXCHANGES__BINANCE__WS_URL", sim.ws_url())
            .env("RELAY_EXCHANGES__BINANCE__REST_URL", sim.rest_url())
            .env("RELAY_EXCHANGES__COINBASE__ENABLED", "false")
            .env("RELAY_EXCHANGES__KRAKEN__ENABLED", "false")
            .env("RELAY_STREAMS__CLOSE_DELAY_MS", "300")
            .env("RELAY_CLUSTER__REDIS_URL", redis.url())
            .env("RELAY_CLUSTER__NODE_ID", node)
            .env("RUST_LOG", "warn")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Process(child, port)
    }

    fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.1)
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.1)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay process that joined the cluster and reads trades:BTCUSDT for a client of its own
/// (so it holds the stream's lease); the client is returned to keep it so.
async fn owning_process(sim: &SimBinance, redis: &Redis, node: &str) -> (Process, Client) {
    let owner = Process::start(sim, redis, node);
    until("the process node to join", || async {
        let h: Value = reqwest::get(owner.health_url())
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (h["cluster"]["state"] == "ok").then_some(())
    })
    .await;
    let mut early = Client::connect_url(&owner.ws_url(), None).await;
    subscribed(&mut early, "trades:BTCUSDT").await;
    trades(&mut early, 3).await;
    (owner, early)
}

async fn lease_holder(redis: &Redis) -> Option<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg("relay:lease:binance:BTCUSDT:trades")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_hands_the_owners_leases_over_before_it_exits() {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    let (mut owner, _early) = owning_process(&sim, &redis, "leaving").await;
    let survivor = start_relay(node_config(&sim, &redis, "survivor")).await;
    let mut client = Client::connect(&survivor).await;
    subscribed(&mut client, "trades:BTCUSDT").await;
    let before = trades(&mut client, 5).await;
    assert!(lease_holder(&redis).await.unwrap().starts_with("leaving|"));

    let pid = owner.0.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    assert!(owner.0.wait().unwrap().success(), "a clean exit on SIGTERM");
    // Gone with the process, not left to expire: free, or already the survivor's.
    let holder = lease_holder(&redis).await;
    assert!(
        holder.as_deref().is_none_or(|h| h.starts_with("survivor|")),
        "the lease outlived its holder: {holder:?}"
    );
    let after = trades(&mut client, 30).await;
    let h = health(&survivor).await;
    assert_eq!(
        h["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"], "survivor",
        "{h}"
    );
    let all: Vec<(u64, u64)> = before.into_iter().chain(after).collect();
    for pair in all.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "no trade id missed: {pair:?}");
        assert_eq!(pair[1].1, pair[0].1 + 1, "seq continues: {pair:?}");
    }
}

#[tokio::test]
async fn killing_the_owner_moves_the_stream_and_no_trade_id_is_missed() {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    let (mut owner, _early) = owning_process(&sim, &redis, "doomed").await;
    let survivor = start_relay(node_config(&sim, &redis, "survivor")).await;
    let mut client = Client::connect(&survivor).await;
    let ack = subscribed(&mut client, "trades:BTCUSDT").await;
    let before = trades(&mut client, 10).await;
    let h = health(&survivor).await;
    assert_eq!(
        h["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"], "doomed",
        "{h}"
    );

    let _ = owner.0.kill(); // SIGKILL: no handover
    let killed = std::time::Instant::now();
    let after = trades(&mut client, 40).await;
    let h = until("the survivor to own the stream", || async {
        let h = health(&survivor).await;
        (h["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"] == "survivor").then_some(h)
    })
    .await;
    let takeover = killed.elapsed();
    println!("takeover after kill -9: {} ms", takeover.as_millis());
    assert!(h["cluster"]["leaseChanges"].as_u64().unwrap() >= 1, "{h}");
    let all: Vec<(u64, u64)> = before.into_iter().chain(after).collect();
    for pair in all.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "trade ids in order, none missing: {pair:?}"
        );
        assert_eq!(
            pair[1].1,
            pair[0].1 + 1,
            "seq continues in the same epoch: {pair:?}"
        );
    }
    let again = subscribed(&mut client, "trades:BTCUSDT").await;
    assert_eq!(again["epoch"], ack["epoch"], "the sequence carried on");
}

#[tokio::test]
async fn with_redis_gone_each_node_reads_alone_and_the_cluster_converges_when_it_is_back() {
    let (mut redis, sim, a, b) = two_nodes().await;
    let port = redis.port;
    let mut on_a = Client::connect(&a).await;
    let mut on_b = Client::connect(&b).await;
    subscribed(&mut on_a, "trades:BTCUSDT").await;
    subscribed(&mut on_b, "trades:BTCUSDT").await;
    let mut ids_a: Vec<u64> = trades(&mut on_a, 5).await.iter().map(|t| t.0).collect();
    let mut ids_b: Vec<u64> = trades(&mut on_b, 5).await.iter().map(|t| t.0).collect();

    let m = a.metrics().await;
    assert!(m.contains("relay_cluster_nodes 2\n"), "{m}");
    assert!(m.contains("relay_cluster_redis_connected 1\n"), "{m}");
    assert!(m.contains("relay_cluster_redis_errors_total 0\n"), "{m}");
    let mut owners = 0;
    for relay in [&a, &b] {
        if relay
            .metrics()
            .await
            .contains("relay_cluster_streams{role=\"owner\"} 1\n")
        {
            owners += 1;
        }
    }
    assert_eq!(owners, 1, "one node owns the stream");

    redis.kill();
    for relay in [&a, &b] {
        until("the node to say it is degraded", || async {
            let h = health(relay).await;
            (h["cluster"]["state"] == "degraded" && h["cluster"]["redis"] == "unreachable")
                .then_some(())
        })
        .await;
        let m = relay.metrics().await;
        assert!(m.contains("relay_cluster_redis_connected 0\n"), "{m}");
        assert!(
            m.contains("relay_cluster_streams{role=\"local\"} 1\n"),
            "{m}"
        );
        assert!(!m.contains("relay_cluster_redis_errors_total 0\n"), "{m}");
    }
    // Both keep serving, each reading the exchange itself.
    ids_a.extend(trades(&mut on_a, 20).await.iter().map(|t| t.0));
    ids_b.extend(trades(&mut on_b, 20).await.iter().map(|t| t.0));
    assert_eq!(sim.subscriptions().get("btcusdt@trade"), Some(&2));
    // A publish still reaches this node's own subscribers.
    let mut sig = Client::connect(&a).await;
    subscribed(&mut sig, "signals:DEGRADED").await;
    let posted = publish(&a, "signals:DEGRADED", json!({"k": 1})).await;
    assert_eq!(posted["data"]["delivered"], 1, "{posted}");
    assert_eq!(posted["data"]["nodes"], 0, "{posted}");

    let _redis = Redis::start_on(port).await;
    until_cluster(&[&a, &b], 2).await;
    until("one reader again", || async {
        (sim.subscriptions().get("btcusdt@trade") == Some(&1)).then_some(())
    })
    .await;
    ids_a.extend(trades(&mut on_a, 30).await.iter().map(|t| t.0));
    ids_b.extend(trades(&mut on_b, 30).await.iter().map(|t| t.0));
    for ids in [&ids_a, &ids_b] {
        for pair in ids.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "no trade lost or repeated: {pair:?}");
        }
    }
}

/// A TCP proxy between the relays and Redis that can pass, stall (hold every byte, keep the
/// connections) or cut (close them, refuse new ones).
struct FaultProxy {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

const PASS: u8 = 0;
const STALL: u8 = 1;
const CUT: u8 = 2;

impl FaultProxy {
    async fn start(to: u16) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let m = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == CUT {
                    continue; // dropped: closed at once
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, m.clone()));
                tokio::spawn(pump(sr, cw, m.clone()));
            }
        });
        FaultProxy { port, mode }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies one direction; holds what it read while stalled, ends (closing both) when cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_) => 0,
        };
        loop {
            match mode.load(Ordering::SeqCst) {
                CUT => return,
                STALL => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        if n > 0 && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn redis_stalled_or_cut_behind_a_proxy_degrades_the_nodes_and_they_converge_after() {
    let redis = Redis::start().await;
    let proxy = FaultProxy::start(redis.port).await;
    let sim = start_sim().await;
    let config = |node: &str| {
        let mut c = config_for(&sim);
        c.cluster.redis_url = proxy.url();
        c.cluster.node_id = node.into();
        c
    };
    let a = start_relay(config("a")).await;
    let b = start_relay(config("b")).await;
    until_cluster(&[&a, &b], 2).await;
    let mut on_a = Client::connect(&a).await;
    let mut on_b = Client::connect(&b).await;
    subscribed(&mut on_a, "trades:BTCUSDT").await;
    subscribed(&mut on_b, "trades:BTCUSDT").await;
    let mut ids = [Vec::new(), Vec::new()];
    for (ids, c) in ids.iter_mut().zip([&mut on_a, &mut on_b]) {
        ids.extend(trades(c, 5).await.iter().map(|t| t.0));
    }
    // The last round heals at once: the owner's lease from before is still alive then.
    for (fault, brief) in [(STALL, false), (CUT, false), (STALL, true)] {
        proxy.set(fault);
        for relay in [&a, &b] {
            until("the node to say it is degraded", || async {
                (health(relay).await["cluster"]["state"] == "degraded").then_some(())
            })
            .await;
        }
        // Clients are not stalled with Redis: each node reads the exchange itself.
        for (ids, c) in ids.iter_mut().zip([&mut on_a, &mut on_b]) {
            ids.extend(
                trades(c, if brief { 1 } else { 20 })
                    .await
                    .iter()
                    .map(|t| t.0),
            );
        }
        proxy.set(PASS);
        until_cluster(&[&a, &b], 2).await;
        until("one reader again", || async {
            (sim.subscriptions().get("btcusdt@trade") == Some(&1)).then_some(())
        })
        .await;
        for (ids, c) in ids.iter_mut().zip([&mut on_a, &mut on_b]) {
            ids.extend(trades(c, 20).await.iter().map(|t| t.0));
        }
    }
    for ids in &ids {
        for pair in ids.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "no trade lost or repeated: {pair:?}");
        }
    }
}

#[tokio::test]
async fn connection_attempts_spent_by_other_nodes_count_against_this_one() {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    // Other relays of the cluster made Binance's whole budget of attempts (250 per 5 min) in
    // the last moments; the oldest of them leaves the window in about 2 s.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let window = 300_000;
    for i in 0..250i64 {
        let _: () = redis::cmd("ZADD")
            .arg("relay:attempts:binance")
            .arg(now - window + 2_000 + i * 10)
            .arg(format!("other-{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let a = start_relay(node_config(&sim, &redis, "a")).await;
    until_cluster(&[&a], 1).await;
    let mut c = Client::connect(&a).await;
    subscribed(&mut c, "trades:BTCUSDT").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        sim.connects(),
        0,
        "the cluster's budget is spent: no attempt yet"
    );
    // Once the oldest attempt leaves the window, this node's goes, and is counted.
    trades(&mut c, 3).await;
    assert_eq!(sim.connects(), 1);
    let spent: i64 = redis::cmd("ZCARD")
        .arg("relay:attempts:binance")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        spent, 250,
        "one left the window, this node's took its place"
    );
}

#[tokio::test]
async fn a_stream_lives_while_any_node_wants_it_and_is_released_when_none_does() {
    let (redis, sim, a, b) = two_nodes().await;
    let mut on_a = Client::connect(&a).await;
    subscribed(&mut on_a, "trades:BTCUSDT").await;
    trades(&mut on_a, 2).await; // A reads the stream
    let mut on_b = Client::connect(&b).await;
    subscribed(&mut on_b, "trades:BTCUSDT").await;
    let mut ids: Vec<u64> = trades(&mut on_b, 5).await.iter().map(|t| t.0).collect();
    assert_eq!(
        health(&b).await["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"],
        "a"
    );

    // A's last client leaves: A lets the stream go after close_delay_ms, B still wants it and
    // takes it over; B's client misses nothing.
    drop(on_a);
    until("B to read the stream itself", || async {
        let h = health(&b).await;
        (h["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"] == "b").then_some(())
    })
    .await;
    ids.extend(trades(&mut on_b, 20).await.iter().map(|t| t.0));
    for pair in ids.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "no trade lost in the handover: {pair:?}"
        );
    }
    assert_eq!(sim.subscriptions().get("btcusdt@trade"), Some(&1));

    // The last client of the cluster leaves: the stream is closed at the exchange, and its
    // sequence is forgotten (a new epoch next time).
    drop(on_b);
    until("the exchange stream to close", || async {
        (sim.subscriptions()
            .get("btcusdt@trade")
            .copied()
            .unwrap_or(0)
            == 0)
            .then_some(())
    })
    .await;
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    until("the stream's position to go", || async {
        let exists: i64 = redis::cmd("EXISTS")
            .arg("relay:pos:binance:BTCUSDT:trades")
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        (exists == 0).then_some(())
    })
    .await;
}

/// The simulated exchanges, a Redis, nodes `a` and `b`, and on each a client that has had the
/// first message of the depth `channel` (a Kraken book: `a` reads it).
async fn kraken_book_on_two_nodes(
    channel: &'static str,
) -> (Sims, Redis, Relay, Relay, Client, Client) {
    let sims = start_sims(exchange_relay::sim::SimOptions::fast()).await;
    let redis = Redis::start().await;
    let config = |node: &str| {
        let mut c = config_for_all(&sims);
        c.cluster.redis_url = redis.url();
        c.cluster.node_id = node.into();
        c
    };
    let a = start_relay(config("a")).await;
    let b = start_relay(config("b")).await;
    until_cluster(&[&a, &b], 2).await;
    let mut on_a = Client::connect(&a).await;
    subscribed(&mut on_a, channel).await;
    on_a.recv_until(is_msg("depth", channel)).await;
    let mut on_b = Client::connect(&b).await;
    subscribed(&mut on_b, channel).await;
    on_b.recv_until(is_msg("depth", channel)).await;
    (sims, redis, a, b, on_a, on_b)
}

#[tokio::test]
async fn a_book_the_owner_cannot_vouch_for_is_not_replayed_by_another_node() {
    let (sims, _redis, _a, b, _on_a, _on_b) =
        kraken_book_on_two_nodes("depth:BTCUSD@kraken:10").await;
    // The owner's book stops verifying (and keeps failing): it is rebuilt, never sent.
    sims.kraken.corrupt_checksums("BTC/USD", true);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // A new subscriber on the follower is not handed the book B last had from A.
    let mut late = Client::connect(&b).await;
    subscribed(&mut late, "depth:BTCUSD@kraken:10").await;
    let end = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(v)) = tokio::time::timeout(
        end.saturating_duration_since(tokio::time::Instant::now()),
        late.next(),
    )
    .await
    {
        assert_ne!(v["type"], "depth", "a book nobody vouches for: {v}");
    }
    // Fixed: a verified book reaches it.
    sims.kraken.corrupt_checksums("BTC/USD", false);
    late.recv_until(is_msg("depth", "depth:BTCUSD@kraken:10"))
        .await;
}

#[tokio::test]
async fn a_stream_the_exchange_refuses_is_refused_on_every_node_at_once() {
    let (sims, _redis, _a, b, mut on_a, mut on_b) =
        kraken_book_on_two_nodes("depth:ETHUSD@kraken:10").await;
    // The exchange stops serving the pair; the owner finds out when it subscribes again.
    sims.kraken.refuse_symbol("ETH/USD");
    sims.kraken.kill_connections();
    for c in [&mut on_a, &mut on_b] {
        let e = c.recv_until(is_type("error")).await;
        assert_eq!(e["channel"], "depth:ETHUSD@kraken:10", "{e}");
        assert_eq!(error_code(&e), "UNKNOWN_SYMBOL", "{e}");
        c.recv_until(is_msg("unsubscribed", "depth:ETHUSD@kraken:10"))
            .await;
    }
    // The follower was told by the owner: it did not take the stream over (after the owner
    // let it go) only to be refused a second time.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let h = health(&b).await;
    assert_eq!(h["cluster"]["leaseChanges"], 0, "{h}");
    assert!(
        h["cluster"]["streams"].get("kraken:ETHUSD:book").is_none(),
        "{h}"
    );
}

#[tokio::test]
async fn max_connections_per_user_counts_every_node_and_forgets_a_dead_one() {
    let redis = Redis::start().await;
    let sim = start_sim().await;
    let mut cfg = node_config(&sim, &redis, "a");
    cfg.server.max_connections_per_user = Some(2);
    let a = start_relay(cfg).await;
    let b = Process::start_with(
        &sim,
        &redis,
        "b",
        &[
            ("RELAY_SERVER__MAX_CONNECTIONS_PER_USER", "2"),
            ("RELAY_AUTH__JWT_SECRET", SECRET),
        ],
    );
    until_cluster(&[&a], 2).await;
    let alice = |ws: String| format!("{ws}?token={}", token("alice", 300));
    let admitted = |url: String| async move {
        let mut c = Client::open(&url, None, None).await.unwrap();
        let first = c.recv().await;
        (first["type"] == "connected").then_some(c)
    };

    let on_b = until("B serves", || admitted(alice(b.ws_url()))).await;
    let on_a = Client::connect_url(&alice(a.ws_url()), None).await;
    // A third, on either node, is one too many for the cluster.
    for ws in [a.ws_url(), b.ws_url()] {
        let mut third = Client::open(&alice(ws), None, None).await.unwrap();
        let (code, _, before) = third.recv_close().await;
        assert_eq!(code, 1008);
        assert_eq!(error_code(before.last().unwrap()), "TOO_MANY_CONNECTIONS");
    }
    // Closing the one on A gives its place back, to a connection on B.
    drop(on_a);
    let second_on_b = until("alice's place on A is given back", || {
        admitted(alice(b.ws_url()))
    })
    .await;
    // B dies with alice's two connections (kill -9: nothing is given back). Once its
    // heartbeat lapses they stop counting, and A lets her in twice again.
    drop(b);
    drop((on_b, second_on_b));
    let first = until("B's connections stop counting", || {
        admitted(alice(a.ws_url()))
    })
    .await;
    let second = Client::connect_url(&alice(a.ws_url()), None).await;
    drop((first, second));
}
