//! Test harness: a real relay and a simulated exchange on 127.0.0.1:0, and a WebSocket client
//! that speaks to the relay like wscat would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use exchange_relay::config::Config;
pub use exchange_relay::domain::ExchangeId;
use exchange_relay::sim::{SimBinance, SimCoinbase, SimKraken, SimOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

pub const SECRET: &str = "test-secret";
pub const PUBLISH_KEY: &str = "test-publish-key";

pub async fn start_sim() -> SimBinance {
    start_sim_with(SimOptions::fast()).await
}

pub async fn start_sim_with(opts: SimOptions) -> SimBinance {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimBinance::start(listener, opts).await.unwrap()
}

/// A config pointing Binance at `sim`, the other exchanges off, short delays for tests.
pub fn config_for(sim: &SimBinance) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.auth.jwt_secret = SECRET.into();
    c.auth.publish_api_key = PUBLISH_KEY.into();
    c.streams.close_delay_ms = 300;
    c.exchanges.get_mut(ExchangeId::Binance).ws_url = sim.ws_url();
    c.exchanges.get_mut(ExchangeId::Binance).rest_url = sim.rest_url();
    c.exchanges.get_mut(ExchangeId::Coinbase).enabled = false;
    c.exchanges.get_mut(ExchangeId::Kraken).enabled = false;
    c
}

pub struct Relay {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h).await.unwrap().unwrap();
        }
    }

    /// `GET /metrics`, the text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stats(&self) -> Value {
        let v: Value = reqwest::get(self.http("/api/v1/ws/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["success"], true);
        v["data"].clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a relay and waits until it is ready (`/ready`: instrument lists loaded).
pub async fn start_relay(config: Config) -> Relay {
    let relay = start_relay_unready(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = reqwest::get(relay.http("/ready"))
            .await
            .map(|r| r.status().as_u16());
        if status.ok() == Some(200) {
            return relay;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a relay without waiting for readiness.
pub async fn start_relay_unready(config: Config) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        exchange_relay::run(config, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Relay {
        addr,
        stop: Some(tx),
        handle: Some(handle),
    }
}

/// The simulated exchanges of a test.
pub struct Sims {
    pub binance: SimBinance,
    pub kraken: SimKraken,
    pub coinbase: SimCoinbase,
}

pub async fn start_sims(opts: SimOptions) -> Sims {
    let binance = SimBinance::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        opts.clone(),
    )
    .await
    .unwrap();
    let kraken = SimKraken::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        opts.clone(),
    )
    .await
    .unwrap();
    let coinbase = SimCoinbase::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
        .await
        .unwrap();
    Sims {
        binance,
        kraken,
        coinbase,
    }
}

/// A config pointing every exchange at its simulator.
pub fn config_for_all(sims: &Sims) -> Config {
    let mut c = config_for(&sims.binance);
    c.exchanges.get_mut(ExchangeId::Kraken).enabled = true;
    c.exchanges.get_mut(ExchangeId::Kraken).ws_url = sims.kraken.ws_url();
    c.exchanges.get_mut(ExchangeId::Kraken).rest_url = sims.kraken.rest_url();
    c.exchanges.get_mut(ExchangeId::Coinbase).enabled = true;
    c.exchanges.get_mut(ExchangeId::Coinbase).ws_url = sims.coinbase.ws_url();
    c.exchanges.get_mut(ExchangeId::Coinbase).rest_url = sims.coinbase.rest_url();
    c
}

/// All simulators and a relay wired to them.
pub async fn start_all() -> (Sims, Relay) {
    let sims = start_sims(SimOptions::fast()).await;
    let relay = start_relay(config_for_all(&sims)).await;
    (sims, relay)
}

/// A sim and a relay wired to it.
pub async fn start() -> (SimBinance, Relay) {
    let sim = start_sim().await;
    let relay = start_relay(config_for(&sim)).await;
    (sim, relay)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    /// The `connected` message, when the relay sent one.
    pub hello: Option<Value>,
}

impl Client {
    /// Connects and reads the `connected` message.
    pub async fn connect(relay: &Relay) -> Client {
        Client::connect_url(&relay.ws_url(), None).await
    }

    pub async fn connect_url(url: &str, bearer: Option<&str>) -> Client {
        let mut c = Client::open(url, bearer, None).await.unwrap();
        let hello = c.recv().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c.hello = Some(hello);
        c
    }

    /// Opens the socket without reading anything.
    pub async fn open(
        url: &str,
        bearer: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        if let Some(t) = bearer {
            req.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        if let Some(o) = origin {
            req.headers_mut()
                .insert("Origin", HeaderValue::from_str(o).unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client { ws, hello: None })
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    pub async fn subscribe(&mut self, channels: &[&str]) {
        self.send(json!({"type": "subscribe", "channels": channels}))
            .await;
    }

    /// The next JSON message (pings and pongs skipped).
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Some(v) => v,
            None => panic!("connection closed while a message was expected"),
        }
    }

    /// The next JSON message, or `None` once the connection closed.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a message");
            match m {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server sent non-JSON"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame as sent (pings and pongs skipped), for checks on the exact JSON.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a message");
            match m {
                Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    panic!("connection closed while a message was expected")
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until a message matches, returning it; panics after [`WAIT`].
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = tokio::time::timeout(left, self.recv())
                .await
                .expect("timed out waiting for a matching message");
            if pred(&v) {
                return v;
            }
        }
    }

    /// Reads until the close frame; returns its code and reason and the messages before it.
    pub async fn recv_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for the close");
            match m {
                Some(Ok(Message::Text(t))) => {
                    before.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string(), before)
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new(), before),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return (1006, String::new(), before),
            }
        }
    }
}

/// Reads `client` until `n` trades have arrived, checking that each channel's trade ids are
/// consecutive (no gap, no reorder); returns how many were read.
pub fn read_trades_in_order(mut client: Client, n: u64) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut last = std::collections::HashMap::new();
        let mut trades = 0u64;
        while let Some(m) = client.next().await {
            if m["type"] != "trade" {
                continue;
            }
            let id = m["data"]["tradeId"].as_u64().unwrap();
            let prev = last.insert(m["channel"].as_str().unwrap().to_string(), id);
            assert!(
                prev.is_none_or(|p| id == p + 1),
                "gap or reorder on {}: {prev:?} -> {id}",
                m["channel"]
            );
            trades += 1;
            if trades == n {
                break;
            }
        }
        trades
    })
}

/// The first message of a connection made with `?token=`: `connected`, or the error's code and
/// message.
pub async fn hello_for(relay: &Relay, token: &str) -> Result<Value, (String, String)> {
    let url = format!("{}?token={token}", relay.ws_url());
    let mut c = Client::open(&url, None, None).await.unwrap();
    let first = c.recv().await;
    if first["type"] == "connected" {
        Ok(first)
    } else {
        Err((
            error_code(&first).to_string(),
            first["data"]["message"].as_str().unwrap_or("").to_string(),
        ))
    }
}

pub fn is_type(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["type"] == kind
}

pub fn is_msg(kind: &'static str, channel: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["type"] == kind && v["channel"] == channel
}

pub fn error_code(v: &Value) -> &str {
    v["data"]["code"].as_str().unwrap_or_default()
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the async `cond` gives `Some`, polling; panics with `what` after [`WAIT`].
pub async fn until<T, F, Fut>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /health`.
pub async fn health(relay: &Relay) -> Value {
    reqwest::get(relay.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `/health` says `exchange` is in `state`; returns its entry.
pub async fn until_upstream_state(relay: &Relay, exchange: &str, state: &str) -> Value {
    until(&format!("{exchange} {state} in /health"), || async {
        let e = health(relay).await["upstreams"][exchange].clone();
        (e["state"] == state).then_some(e)
    })
    .await
}

/// The open time (ms) of a kline message's candle.
pub fn open_time(kline: &Value) -> i64 {
    kline["time"].as_i64().unwrap()
}

/// A signed HS256 token for `sub` expiring `ttl_s` seconds from now.
pub fn token(sub: &str, ttl_s: i64) -> String {
    token_with(
        SECRET,
        json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + ttl_s}),
    )
}

pub fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `[[price, qty], ...]` of a depth message side.
pub fn levels(v: &Value) -> Vec<[f64; 2]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| [l[0].as_f64().unwrap(), l[1].as_f64().unwrap()])
        .collect()
}

/// Two book sides with the same levels (prices and quantities equal to 1e-9 relative).
pub fn same_levels(a: &[[f64; 2]], b: &[[f64; 2]]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| close(x[0], y[0]) && close(x[1], y[1]))
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

/// Checks a relay kline's prices and volume against the exchange's own candle.
pub fn assert_prices_match(k: &Value, c: &exchange_relay::sim::market::Candle) {
    for (field, want) in [
        ("open", c.open),
        ("high", c.high),
        ("low", c.low),
        ("close", c.close),
        ("volume", c.volume),
    ] {
        assert!(
            close(k[field].as_f64().unwrap(), want),
            "{field}: {k} vs {c:?}"
        );
    }
}

/// Checks relay klines (`data` objects) against the candles the exchange closed from the same
/// trades, field by field (trade-built candles have an exact quote volume too).
pub fn assert_candles_match(klines: &[Value], truth: &[exchange_relay::sim::market::Candle]) {
    for k in klines {
        let t = k["time"].as_i64().unwrap();
        let c = truth
            .iter()
            .find(|c| c.open_time == t)
            .expect("the exchange closed this candle");
        let fields = [
            ("open", c.open),
            ("high", c.high),
            ("low", c.low),
            ("close", c.close),
            ("volume", c.volume),
            ("quoteVolume", c.quote_volume),
        ];
        for (field, want) in fields {
            assert!(
                close(k[field].as_f64().unwrap(), want),
                "{field}: {k} vs {c:?}"
            );
        }
        assert_eq!(k["trades"].as_u64().unwrap(), c.trades, "{k} vs {c:?}");
        assert_eq!(k["closeTime"].as_i64().unwrap(), c.close_time);
    }
}

/// A WebSocket upgrade request by plain HTTP, to see refusals (status, headers, body).
pub async fn raw_upgrade(relay: &Relay) -> reqwest::Response {
    reqwest::Client::new()
        .get(relay.http("/ws"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap()
}

/// A CA, and a TLS endpoint for `localhost` signed by it that forwards to `backend`.
pub struct TlsFront {
    pub addr: SocketAddr,
    pub ca_pem: String,
}

pub async fn tls_front(backend: std::net::SocketAddr) -> TlsFront {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses our certificate ends here: nothing to forward.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    TlsFront {
        addr,
        ca_pem: ca.pem(),
    }
}

/// Where a simulated Binance listens.
pub fn sim_addr(sim: &SimBinance) -> SocketAddr {
    url::Url::parse(&sim.rest_url())
        .unwrap()
        .socket_addrs(|| None)
        .unwrap()[0]
}

/// An address on loopback that nothing listens on (an unreachable exchange).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A config whose Binance is reached over `wss://` and `https://` through `front`, trusting
/// its CA through `exchanges.ca_file`.
pub fn config_through_tls(sim: &SimBinance, front: &TlsFront, name: &str) -> Config {
    let dir = std::env::temp_dir().join(format!("relay-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &front.ca_pem).unwrap();
    let mut cfg = config_for(sim);
    let port = front.addr.port();
    let binance = cfg.exchanges.get_mut(ExchangeId::Binance);
    binance.ws_url = format!("wss://localhost:{port}");
    binance.rest_url = format!("https://localhost:{port}");
    cfg.exchanges.ca_file = Some(ca_file);
    cfg
}

/// A `redis-server` of the test's own, on a free port, without persistence.
pub struct Redis {
    pub port: u16,
    child: std::process::Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Redis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is needed for the cluster tests (apt-get install redis-server; .ci/run installs it)");
        let redis = Redis { port, child };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
