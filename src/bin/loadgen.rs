//! Load generator: runs the real relay binary as a child pinned to one core, feeds it from a
//! Binance-protocol exchange that emits trades at exact intended times, drives N WebSocket
//! clients from the other core, and prints delivered messages/s, end-to-end latency
//! (p50/p99/p999/max from the intended send time, so coordinated omission is not hidden), relay
//! CPU per delivery, RSS and memory per connection. It refuses to report a result when it, not
//! the relay, was the saturated side. See README § Performance for the scenarios.
//!
//! ```text
//! cargo build --release --bins
//! target/release/loadgen fanout --clients 1000 --rates 100,500,1000
//! ```

use std::cell::RefCell;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Parser, Debug)]
#[command(about = "Load generator for exchange-relay")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// The relay binary (default: exchange-relay beside this program).
    #[arg(long, global = true)]
    relay_bin: Option<String>,
    /// CPU the relay is pinned to.
    #[arg(long, global = true, default_value_t = 0)]
    relay_cpu: usize,
    /// CPU the load generator and feed are pinned to.
    #[arg(long, global = true, default_value_t = 1)]
    loadgen_cpu: usize,
    /// Warm-up before each measurement, seconds.
    #[arg(long, global = true, default_value_t = 2)]
    warmup: u64,
    /// Measurement window, seconds.
    #[arg(long, global = true, default_value_t = 10)]
    duration: u64,
    /// Repetitions of each point (median, min and max are reported).
    #[arg(long, global = true, default_value_t = 1)]
    repeat: usize,
    /// Measuring clients offer permessage-deflate (as browsers do) and inflate what they get;
    /// the figures then include bytes on the wire per delivery either way.
    #[arg(long, global = true)]
    compression: bool,
}

/// Whether the measuring clients negotiate permessage-deflate (`--compression`).
static COMPRESSION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Bytes the measuring clients read from their sockets, all of them together.
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// (a) one channel, many clients, rate stepped up.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Upstream trades per second, one point each.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        rates: Vec<f64>,
        /// Percentage of clients that connect and never read (scenario e).
        #[arg(long, default_value_t = 0.0)]
        slow_percent: f64,
    },
    /// (b) many channels, few clients each, mixed rates.
    Breadth {
        #[arg(long, default_value_t = 1000)]
        channels: usize,
        #[arg(long, default_value_t = 3)]
        clients_per_channel: usize,
        /// Mean trades per second per channel (rates spread 0.2x..1.8x).
        #[arg(long, default_value_t = 5.0)]
        mean_rate: f64,
    },
    /// (c) clients subscribing and unsubscribing continuously.
    Churn {
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// Distinct channels the clients churn over.
        #[arg(long, default_value_t = 200)]
        channels: usize,
        /// Subscribe/unsubscribe requests per client per second.
        #[arg(long, default_value_t = 2.0)]
        ops_per_client: f64,
    },
    /// (f) one depth channel at `rate` updates a second, every client subscribed with
    /// `throttleMs` (0: unthrottled): relay CPU per client.
    Throttle {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Book levels of the channel (`depth:BTCUSDT:<levels>`: 5, 10 or 20).
        #[arg(long, default_value_t = 5)]
        levels: u32,
        /// One figure per value (0: no throttle).
        #[arg(long, value_delimiter = ',', default_value = "0,1000")]
        throttle_ms: Vec<u64>,
    },
    /// (g) two relays of one cluster on a redis-server of its own: node A reads the exchange,
    /// every client is on node B, so each trade goes exchange -> A -> Redis -> B -> client.
    /// Compare with `fanout` at the same clients and rates for what the Redis hop costs.
    Cluster {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, value_delimiter = ',', default_value = "100")]
        rates: Vec<f64>,
    },
    /// (d) connected clients, no traffic: memory per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// The feed: a Binance-protocol exchange emitting trades at exact intended times.

/// Intended send times by trade id, in µs since the run started (the clients' clock too).
struct SendTimes {
    start: Instant,
    slots: Vec<AtomicU64>,
}

impl SendTimes {
    const SLOTS: usize = 1 << 22;

    fn new() -> Arc<SendTimes> {
        Arc::new(SendTimes {
            start: Instant::now(),
            slots: (0..Self::SLOTS).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn record(&self, id: u64, at_us: u64) {
        self.slots[id as usize % Self::SLOTS].store(at_us, Ordering::Relaxed);
    }

    fn get(&self, id: u64) -> u64 {
        self.slots[id as usize % Self::SLOTS].load(Ordering::Relaxed)
    }
}

/// One relay connection to the feed.
type FeedConn = (
    Arc<Mutex<std::collections::HashSet<String>>>,
    mpsc::Sender<String>,
);

struct Feed {
    symbols: Vec<String>,
    /// Relay connections: what each is subscribed to, and its outbound channel.
    conns: Mutex<Vec<FeedConn>>,
    control_messages: AtomicU64,
    /// Windows of one second in which a connection sent more than 5 messages.
    rate_violations: AtomicU64,
    next_id: AtomicU64,
    /// Frames dropped because a relay connection's queue was full (must stay 0).
    dropped: AtomicU64,
    /// Trades emitted on a stream no relay connection was subscribed to (yet).
    unrouted: AtomicU64,
    times: Arc<SendTimes>,
}

impl Feed {
    /// The id the next trade will get.
    fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Trades sent to at least one relay connection so far.
    fn routed(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1 - self.unrouted.load(Ordering::Relaxed)
    }

    /// Waits until the relay has subscribed `n` streams upstream (it paces its SUBSCRIBE
    /// requests under Binance's limit, so many streams take seconds).
    async fn wait_for_streams(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.subscribed_streams() < n {
            if Instant::now() > deadline {
                bail!(
                    "the relay subscribed {} of {n} streams upstream",
                    self.subscribed_streams()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn subscribed_streams(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .iter()
            .map(|(s, _)| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    /// Emits one partial-depth update of `symbol` (a new best bid each time).
    fn emit_depth(&self, symbol_index: usize, n: u64) {
        let symbol = &self.symbols[symbol_index];
        let stream = format!("{}@depth20@100ms", symbol.to_lowercase());
        let level = |p: u64| format!("[\"{}.{:02}\",\"1.00000000\"]", p / 100, p % 100);
        let bids: Vec<String> = (0..20).map(|i| level(10_000 + n % 50 - i)).collect();
        let asks: Vec<String> = (0..20).map(|i| level(10_001 + n % 50 + i)).collect();
        let frame = format!(
            "{{\"stream\":\"{stream}\",\"data\":{{\"lastUpdateId\":{n},\"bids\":[{}],\"asks\":[{}]}}}}",
            bids.join(","),
            asks.join(",")
        );
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for (subs, tx) in conns.iter() {
            if subs.lock().map(|s| s.contains(&stream)).unwrap_or(false)
                && tx.try_send(frame.clone()).is_err()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Emits one trade on `symbol` intended at `at_us`.
    fn emit(&self, symbol_index: usize, at_us: u64) {
        let symbol = &self.symbols[symbol_index];
        let stream = format!("{}@trade", symbol.to_lowercase());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.times.record(id, at_us);
        let ms = chrono::Utc::now().timestamp_millis();
        let frame = format!(
            "{{\"stream\":\"{stream}\",\"data\":{{\"e\":\"trade\",\"E\":{ms},\"s\":\"{symbol}\",\"t\":{id},\"p\":\"100.00000000\",\"q\":\"1.00000000\",\"T\":{ms},\"m\":false,\"M\":true}}}}"
        );
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut routed = false;
        for (subs, tx) in conns.iter() {
            if subs.lock().map(|s| s.contains(&stream)).unwrap_or(false) {
                routed = true;
                if tx.try_send(frame.clone()).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !routed {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn start_feed(
    symbols: Vec<String>,
    times: Arc<SendTimes>,
) -> Result<(Arc<Feed>, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let feed = Arc::new(Feed {
        symbols,
        conns: Mutex::new(Vec::new()),
        control_messages: AtomicU64::new(0),
        rate_violations: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        dropped: AtomicU64::new(0),
        unrouted: AtomicU64::new(0),
        times,
    });
    let app = Router::new()
        .route("/api/v3/exchangeInfo", get(exchange_info))
        .route("/stream", get(feed_ws))
        .with_state(feed.clone());
    tokio::task::spawn_local(async move {
        let _ = axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .await;
    });
    Ok((feed, addr))
}

async fn exchange_info(State(feed): State<Arc<Feed>>) -> impl IntoResponse {
    let symbols: Vec<serde_json::Value> = feed
        .symbols
        .iter()
        .map(|s| serde_json::json!({"symbol": s, "status": "TRADING", "baseAsset": s.trim_end_matches("USDT"), "quoteAsset": "USDT"}))
        .collect();
    axum::Json(serde_json::json!({"symbols": symbols}))
}

async fn feed_ws(
    State(feed): State<Arc<Feed>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let initial: std::collections::HashSet<String> = exchange_relay::sim::binance::url_streams(&q)
        .into_iter()
        .collect();
    ws.max_write_buffer_size(64 << 20)
        .on_upgrade(move |socket| feed_conn(socket, feed, initial))
}

async fn feed_conn(socket: WebSocket, feed: Arc<Feed>, initial: std::collections::HashSet<String>) {
    let (mut sink, mut stream) = socket.split();
    let subs = Arc::new(Mutex::new(initial));
    let (tx, mut rx) = mpsc::channel::<String>(1 << 16);
    feed.conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((subs.clone(), tx));
    let mut window: std::collections::VecDeque<Instant> = Default::default();
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    feed.control_messages.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    window.push_back(now);
                    while window.front().is_some_and(|f| now.duration_since(*f) >= Duration::from_secs(1)) {
                        window.pop_front();
                    }
                    if window.len() > 5 {
                        feed.rate_violations.fetch_add(1, Ordering::Relaxed);
                    }
                    let Ok(req) = serde_json::from_str::<serde_json::Value>(t.as_str()) else { continue };
                    let params: Vec<String> = req["params"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
                    if let Ok(mut s) = subs.lock() {
                        match req["method"].as_str() {
                            Some("SUBSCRIBE") => s.extend(params),
                            Some("UNSUBSCRIBE") => params.iter().for_each(|p| { s.remove(p); }),
                            _ => {}
                        }
                    }
                    let reply = serde_json::json!({"result": null, "id": req["id"]}).to_string();
                    if sink.send(Message::text(reply)).await.is_err() { break; }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            frame = rx.recv() => match frame {
                Some(f) => { if sink.send(Message::text(f)).await.is_err() { break; } }
                None => break,
            },
        }
    }
    // Nothing is subscribed on a closed connection.
    subs.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Emits trades on `symbols` (index, rate per second) at exact intended times until `until`.
async fn emit_loop(feed: Arc<Feed>, rates: Vec<(usize, f64)>, until: Instant) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let start_us = feed.times.now_us();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = rates
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| *r > 0.0)
        .map(|(i, (_, r))| Reverse((start_us + (1e6 / r) as u64 / 2, i)))
        .collect();
    while let Some(Reverse((at_us, i))) = heap.pop() {
        if Instant::now() >= until {
            return;
        }
        let now_us = feed.times.now_us();
        if at_us > now_us {
            tokio::time::sleep(Duration::from_micros(at_us - now_us)).await;
        }
        let (symbol, rate) = rates[i];
        feed.emit(symbol, at_us);
        heap.push(Reverse((at_us + (1e6 / rate) as u64, i)));
    }
}

// ---------------------------------------------------------------------------------------------
// The relay under test.

struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn relay_bin(args: &Args) -> Result<String> {
    if let Some(b) = &args.relay_bin {
        return Ok(b.clone());
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("exchange-relay");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            bin.display()
        );
    }
    Ok(bin.display().to_string())
}

async fn start_relay(args: &Args, feed: SocketAddr) -> Result<RelayProcess> {
    start_relay_with(args, feed, "").await
}

/// A relay whose config ends with `extra` (TOML sections).
async fn start_relay_with(args: &Args, feed: SocketAddr, extra: &str) -> Result<RelayProcess> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = format!(
        "[server]\nlisten = \"{addr}\"\nmax_connections = 20000\nmax_connections_per_ip = 20000\n\
         client_requests_per_second = 1000\nclient_request_burst = 1000\nmax_connects_per_ip_per_second = 100000\n\
         [streams]\nclose_delay_ms = 1000\n\
         [exchanges.binance]\nws_url = \"ws://{feed}\"\nrest_url = \"http://{feed}\"\n\
         [exchanges.coinbase]\nenabled = false\n[exchanges.kraken]\nenabled = false\n{extra}"
    );
    let path =
        std::env::temp_dir().join(format!("loadgen-relay-{}-{port}.toml", std::process::id()));
    std::fs::write(&path, config)?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(args.relay_cpu.to_string())
        .arg(relay_bin(args)?)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the relay (needs taskset)")?;
    let relay = RelayProcess { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/ready")).send().await {
            if r.status().is_success() {
                return Ok(relay);
            }
        }
        if Instant::now() > deadline {
            bail!("the relay did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is the 14th field.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // USER_HZ is 100 on Linux
}

/// (current RSS, peak RSS) in KiB, from /proc.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------------------------
// Clients.

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

struct Meter {
    histogram: Histogram<u64>,
    delivered: u64,
    /// Only trades with ids in [from_id, to_id) count: exactly those the feed emitted in the
    /// measurement window, however late (the emitter may lag its intended times, and
    /// deliveries arrive after the window). Empty until a measurement starts.
    from_id: u64,
    to_id: u64,
}

/// A measuring client: a WebSocket spoken by hand over a plain socket. At 100k messages/s
/// on one core a full WebSocket library (UTF-8 validation, task machinery per frame) made the
/// load generator the saturated side; this reads frames in bulk and only looks for the
/// trade id. Server frames are unmasked and unfragmented; pings are answered.
struct RawClient {
    stream: TcpStream,
    buf: bytes::BytesMut,
    /// With `--compression`: inflates compressed messages (the relay compresses each on its
    /// own, `server_no_context_takeover`).
    inflater: Option<flate2::Decompress>,
    inflated: Vec<u8>,
}

/// A masked client frame (mask key 0, which leaves the payload as is).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

enum Frame<'a> {
    Text(&'a [u8]),
    /// A text message compressed with permessage-deflate (RSV1).
    Deflated(&'a [u8]),
    Ping(&'a [u8]),
    Close,
    Other,
}

impl RawClient {
    async fn connect(addr: SocketAddr, small_window: bool) -> Result<RawClient> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4()?;
        if small_window {
            socket.set_recv_buffer_size(4096)?;
        }
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let compression = COMPRESSION.load(Ordering::Relaxed);
        let offer = if compression {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = bytes::BytesMut::with_capacity(4096);
        let end = loop {
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("connection closed during the handshake");
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            bail!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&buf[..end.min(80)])
            );
        }
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if compression && !head.contains("permessage-deflate") {
            bail!("the relay did not accept permessage-deflate");
        }
        let _ = buf.split_to(end);
        Ok(RawClient {
            stream,
            buf,
            inflater: compression.then(|| flate2::Decompress::new(false)),
            inflated: Vec::new(),
        })
    }

    /// A compressed message's text (`payload` with the deflate tail appended, inflated).
    fn inflate<'a>(
        inflater: &mut Option<flate2::Decompress>,
        out: &'a mut Vec<u8>,
        payload: &[u8],
    ) -> &'a [u8] {
        out.clear();
        let Some(d) = inflater.as_mut() else {
            return out;
        };
        d.reset(false);
        for input in [payload, &[0, 0, 0xff, 0xff][..]] {
            let mut input = input;
            loop {
                out.reserve(4096);
                let before = d.total_in();
                if d.decompress_vec(input, out, flate2::FlushDecompress::Sync)
                    .is_err()
                {
                    out.clear();
                    return out;
                }
                input = &input[(d.total_in() - before) as usize..];
                if input.is_empty() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        out
    }

    async fn send_text(&mut self, text: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(&client_frame(0x1, text.as_bytes()))
            .await?;
        Ok(())
    }

    /// Splits the next complete frame off the buffer: (header + payload length, frame).
    fn parse(buf: &[u8]) -> Option<(usize, Frame<'_>)> {
        if buf.len() < 2 {
            return None;
        }
        let opcode = buf[0] & 0x0f;
        let (len, mut hdr) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
            }
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if buf[1] & 0x80 != 0 {
            hdr += 4; // servers do not mask, but be tolerant
        }
        if buf.len() < hdr + len {
            return None;
        }
        let payload = &buf[hdr..hdr + len];
        let frame = match opcode {
            0x1 if buf[0] & 0x40 != 0 => Frame::Deflated(payload),
            0x1 => Frame::Text(payload),
            0x9 => Frame::Ping(payload),
            0x8 => Frame::Close,
            _ => Frame::Other,
        };
        Some((hdr + len, frame))
    }

    /// Reads until `n` text frames containing `needle` have arrived.
    async fn wait_for(&mut self, needle: &[u8], n: usize) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let mut seen = 0;
        while seen < n {
            while let Some((used, frame)) = Self::parse(&self.buf) {
                let t = match frame {
                    Frame::Text(t) => Some(t),
                    Frame::Deflated(z) => {
                        Some(Self::inflate(&mut self.inflater, &mut self.inflated, z))
                    }
                    _ => None,
                };
                if t.is_some_and(|t| t.windows(needle.len()).any(|w| w == needle)) {
                    seen += 1;
                }
                let _ = self.buf.split_to(used);
            }
            if seen >= n {
                break;
            }
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
                    .await;
            match read {
                Ok(Ok(0)) | Err(_) => bail!("no reply from the relay"),
                Ok(r) => {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Reads everything, recording the latency of every trade, until the connection ends.
    async fn read_loop(self, meter: Rc<RefCell<Meter>>, times: Arc<SendTimes>) {
        self.read_texts(|t| {
            if let Some(id) = trade_id(t) {
                let now = times.now_us();
                let sent = times.get(id);
                let mut m = meter.borrow_mut();
                if id >= m.from_id && id < m.to_id && sent > 0 {
                    m.delivered += 1;
                    let _ = m.histogram.record(now.saturating_sub(sent).max(1));
                }
            }
        })
        .await
    }

    /// Counts the data messages of type `depth` it reads.
    async fn count_loop(self, count: Rc<std::cell::Cell<u64>>) {
        // `{"type":"depth",...`: the type is the first field of a data message.
        const NEEDLE: &[u8] = b"\"type\":\"depth\"";
        self.read_texts(|t| {
            if t.get(1..1 + NEEDLE.len()) == Some(NEEDLE) {
                count.set(count.get() + 1)
            }
        })
        .await
    }

    /// Reads until the connection ends, handing each text frame to `on_text` and answering
    /// pings.
    async fn read_texts(mut self, mut on_text: impl FnMut(&[u8])) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let mut pongs = Vec::new();
            while let Some((used, frame)) = Self::parse(&self.buf) {
                match frame {
                    Frame::Text(t) => on_text(t),
                    Frame::Deflated(z) => {
                        on_text(Self::inflate(&mut self.inflater, &mut self.inflated, z))
                    }
                    Frame::Ping(p) => pongs.push(client_frame(0xA, p)),
                    Frame::Close => return,
                    Frame::Other => {}
                }
                let _ = self.buf.split_to(used);
            }
            for p in pongs {
                if self.stream.write_all(&p).await.is_err() {
                    return;
                }
            }
            self.buf.reserve(16 * 1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    WIRE_BYTES.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `"tradeId":123` without parsing the whole message (the client must be cheaper than the relay).
fn trade_id(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"tradeId\":";
    let i = text.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let mut id = 0u64;
    let mut any = false;
    for &b in &text[i..] {
        if !b.is_ascii_digit() {
            break;
        }
        id = id * 10 + u64::from(b - b'0');
        any = true;
    }
    any.then_some(id)
}

/// Connects `n` clients (bounded concurrency), each subscribed to `channels(i)`, and waits for
/// every ack. Returns them ready to read.
async fn connect_clients(
    addr: SocketAddr,
    n: usize,
    channels: impl Fn(usize) -> Vec<serde_json::Value>,
    small_window: impl Fn(usize) -> bool,
) -> Result<Vec<RawClient>> {
    let mut out = Vec::with_capacity(n);
    for chunk_start in (0..n).step_by(200) {
        let mut pending = Vec::new();
        for i in chunk_start..(chunk_start + 200).min(n) {
            let chans = channels(i);
            let small = small_window(i);
            pending.push(async move {
                let mut c = RawClient::connect(addr, small).await?;
                c.wait_for(b"\"connected\"", 1).await?;
                if !chans.is_empty() {
                    let req = serde_json::json!({"type": "subscribe", "channels": chans});
                    c.send_text(&req.to_string()).await?;
                    c.wait_for(b"\"subscribed\"", chans.len()).await?;
                }
                Ok::<RawClient, anyhow::Error>(c)
            });
        }
        for c in futures_util::future::join_all(pending).await {
            out.push(c?);
        }
    }
    Ok(out)
}

/// A full WebSocket client, for scenarios that talk request/response (churn).
async fn connect_ws(addr: SocketAddr) -> Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    Ok(ws)
}

// ---------------------------------------------------------------------------------------------
// Measurements.

#[derive(Debug, Clone)]
struct Point {
    delivered_per_s: f64,
    expected_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    relay_cpu_s: f64,
    relay_us_per_delivery: f64,
    relay_rss_mib: f64,
    relay_peak_mib: f64,
    loadgen_cpu_share: f64,
    /// Trades the feed emitted in the window.
    emitted: u64,
    /// CPU seconds in the window of the other processes measured (cluster: owner, Redis).
    others_cpu_s: Vec<f64>,
    /// Bytes the clients read from their sockets per delivery (frames as sent, compressed
    /// or not).
    wire_bytes_per_delivery: f64,
}

impl Point {
    fn verdict(&self) -> &'static str {
        if self.loadgen_cpu_share > 0.9 {
            "INVALID: the load generator was saturated, not the relay"
        } else if self.delivered_per_s < 0.95 * self.expected_per_s {
            "relay saturated (fell behind)"
        } else {
            "ok"
        }
    }
}

/// Measures one window: trades flow at `rates` while clients read; returns the figures.
/// `fanout` is how many reading clients each trade goes to: the expected deliveries are the
/// trades the feed actually emitted in the window times that.
async fn measure(
    args: &Args,
    relay: &RelayProcess,
    feed: &Arc<Feed>,
    meter: &Rc<RefCell<Meter>>,
    rates: Vec<(usize, f64)>,
    fanout: f64,
    others: &[u32],
) -> Point {
    let total = Duration::from_secs(args.warmup + args.duration);
    let emitter = tokio::task::spawn_local(emit_loop(feed.clone(), rates, Instant::now() + total));
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    {
        let mut m = meter.borrow_mut();
        m.histogram.reset();
        m.delivered = 0;
        m.from_id = feed.next_id();
        m.to_id = u64::MAX;
    }
    let (cpu0, me0, t0) = (
        cpu_seconds(relay.pid()),
        cpu_seconds(std::process::id()),
        Instant::now(),
    );
    let emitted0 = feed.routed();
    let others0: Vec<f64> = others.iter().map(|p| cpu_seconds(*p)).collect();
    let (wire0, delivered0) = (WIRE_BYTES.load(Ordering::Relaxed), meter.borrow().delivered);
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let (wire1, delivered1) = (WIRE_BYTES.load(Ordering::Relaxed), meter.borrow().delivered);
    let others_cpu_s: Vec<f64> = others
        .iter()
        .zip(&others0)
        .map(|(p, c0)| cpu_seconds(*p) - c0)
        .collect();
    let (cpu1, me1, secs) = (
        cpu_seconds(relay.pid()),
        cpu_seconds(std::process::id()),
        t0.elapsed().as_secs_f64(),
    );
    let emitted = feed.routed() - emitted0;
    meter.borrow_mut().to_id = feed.next_id();
    let expected_per_s = emitted as f64 * fanout / secs;
    let _ = emitter.await;
    // Let deliveries of trades sent in the window that are still in flight land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = meter.borrow();
    let (rss, peak) = rss_kib(relay.pid());
    let q = |p: f64| m.histogram.value_at_quantile(p) as f64 / 1000.0;
    let delivered = m.delivered as f64;
    Point {
        delivered_per_s: delivered / secs,
        expected_per_s,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: m.histogram.max() as f64 / 1000.0,
        relay_cpu_s: cpu1 - cpu0,
        relay_us_per_delivery: if delivered > 0.0 {
            (cpu1 - cpu0) * 1e6 / delivered
        } else {
            0.0
        },
        relay_rss_mib: rss as f64 / 1024.0,
        relay_peak_mib: peak as f64 / 1024.0,
        loadgen_cpu_share: (me1 - me0) / secs,
        emitted,
        others_cpu_s,
        wire_bytes_per_delivery: (wire1 - wire0) as f64
            / delivered1.saturating_sub(delivered0).max(1) as f64,
    }
}

fn print_point(label: &str, p: &Point) {
    println!(
        "{label:<28} delivered {:>9.0}/s of {:>9.0}/s | latency p50 {:>7.2} p99 {:>7.2} p999 {:>7.2} max {:>7.2} ms | relay CPU {:>5.2}s = {:>5.2} us/delivery | {:>6.1} wire bytes/delivery | RSS {:>6.1} MiB (peak {:>6.1}) | loadgen CPU {:>3.0}% | {}",
        p.delivered_per_s, p.expected_per_s, p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms,
        p.relay_cpu_s, p.relay_us_per_delivery, p.wire_bytes_per_delivery, p.relay_rss_mib,
        p.relay_peak_mib, p.loadgen_cpu_share * 100.0, p.verdict()
    );
}

/// Median, min and max of repeated points, by p99 and CPU per delivery.
fn summarize(label: &str, points: &[Point]) {
    if points.len() < 2 {
        return;
    }
    let stat = |f: fn(&Point) -> f64| {
        let mut v: Vec<f64> = points.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (p99, p99min, p99max) = stat(|p| p.p99_ms);
    let (us, usmin, usmax) = stat(|p| p.relay_us_per_delivery);
    let (d, dmin, dmax) = stat(|p| p.delivered_per_s);
    let (w, _, _) = stat(|p| p.wire_bytes_per_delivery);
    println!(
        "{label:<28} median of {}: p99 {p99:.2} ms [{p99min:.2}..{p99max:.2}] | {us:.2} us/delivery [{usmin:.2}..{usmax:.2}] | {w:.1} wire bytes/delivery | {d:.0}/s [{dmin:.0}..{dmax:.0}]",
        points.len()
    );
}

fn new_meter() -> Rc<RefCell<Meter>> {
    Rc::new(RefCell::new(Meter {
        histogram: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|_| {
            Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
        }),
        delivered: 0,
        from_id: u64::MAX,
        to_id: 0,
    }))
}

async fn fanout(args: &Args, clients: usize, rates: &[f64], slow_percent: f64) -> Result<()> {
    let times = SendTimes::new();
    let (feed, feed_addr) = start_feed(vec!["BTCUSDT".into()], times.clone()).await?;
    let relay = start_relay(args, feed_addr).await?;
    let slow = (clients as f64 * slow_percent / 100.0).round() as usize;
    let meter = new_meter();
    let sockets = connect_clients(
        relay.addr,
        clients,
        |_| vec!["trades:BTCUSDT".into()],
        |i| i < slow,
    )
    .await?;
    let mut stalled = Vec::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        if i < slow {
            stalled.push(ws); // connected and subscribed, never read
        } else {
            tokio::task::spawn_local(ws.read_loop(meter.clone(), times.clone()));
        }
    }
    feed.wait_for_streams(1).await?;
    let readers = clients - slow;
    println!(
        "fan-out: 1 channel x {clients} clients ({slow} not reading), relay pid {} on cpu {}",
        relay.pid(),
        args.relay_cpu
    );
    for &rate in rates {
        let mut points = Vec::new();
        for _ in 0..args.repeat {
            let p = measure(
                args,
                &relay,
                &feed,
                &meter,
                vec![(0, rate)],
                readers as f64,
                &[],
            )
            .await;
            print_point(&format!("{clients}c x {rate} msg/s"), &p);
            points.push(p);
        }
        summarize(&format!("{clients}c x {rate} msg/s"), &points);
    }
    let stats: serde_json::Value = reqwest::get(format!("http://{}/api/v1/ws/stats", relay.addr))
        .await?
        .json()
        .await?;
    println!(
        "relay stats: connectedClients {} slowConsumerDisconnects {} conflatedMessages {}",
        stats["data"]["connectedClients"],
        stats["data"]["slowConsumerDisconnects"],
        stats["data"]["conflatedMessages"]
    );
    drop(stalled);
    Ok(())
}

/// A redis-server of the benchmark's own, pinned beside the relays, without persistence.
struct RedisProcess {
    child: Child,
    port: u16,
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_redis(args: &Args) -> Result<RedisProcess> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("taskset")
        .arg("-c")
        .arg(args.relay_cpu.to_string())
        .args([
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let redis = RedisProcess { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(redis)
}

async fn cluster(args: &Args, clients: usize, rates: &[f64]) -> Result<()> {
    let times = SendTimes::new();
    let (feed, feed_addr) = start_feed(vec!["BTCUSDT".into()], times.clone()).await?;
    let redis = start_redis(args).await?;
    let node = |id: &str| {
        format!(
            "[cluster]\nredis_url = \"redis://127.0.0.1:{}/0\"\nnode_id = \"{id}\"\n",
            redis.port
        )
    };
    let owner = start_relay_with(args, feed_addr, &node("a")).await?;
    let follower = start_relay_with(args, feed_addr, &node("b")).await?;
    // One client on A first: A takes the stream's lease and reads the exchange.
    // It reads (into a meter of its own), or A would drop it as a slow consumer and hand over.
    for ws in connect_clients(owner.addr, 1, |_| vec!["trades:BTCUSDT".into()], |_| false).await? {
        tokio::task::spawn_local(ws.read_loop(new_meter(), times.clone()));
    }
    feed.wait_for_streams(1).await?;
    let meter = new_meter();
    let sockets = connect_clients(
        follower.addr,
        clients,
        |_| vec!["trades:BTCUSDT".into()],
        |_| false,
    )
    .await?;
    for ws in sockets {
        tokio::task::spawn_local(ws.read_loop(meter.clone(), times.clone()));
    }
    let health: serde_json::Value = reqwest::get(format!("http://{}/health", follower.addr))
        .await?
        .json()
        .await?;
    println!(
        "cluster: exchange -> node A (pid {}) -> redis (pid {}) -> node B (pid {}) -> {clients} clients, all on cpu {}; B says the stream's owner is {}",
        owner.pid(),
        redis.child.id(),
        follower.pid(),
        args.relay_cpu,
        health["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"]
    );
    for &rate in rates {
        let mut points = Vec::new();
        for _ in 0..args.repeat {
            let p = measure(
                args,
                &follower,
                &feed,
                &meter,
                vec![(0, rate)],
                clients as f64,
                &[owner.pid(), redis.child.id()],
            )
            .await;
            print_point(&format!("B: {clients}c x {rate} msg/s"), &p);
            let per_event = |cpu: f64| {
                if p.emitted > 0 {
                    cpu * 1e6 / p.emitted as f64
                } else {
                    0.0
                }
            };
            println!(
                "{:<28} {} trades: owner A {:.1} us CPU per trade, redis {:.1} us CPU per published trade",
                "",
                p.emitted,
                per_event(p.others_cpu_s[0]),
                per_event(p.others_cpu_s[1])
            );
            points.push(p);
        }
        summarize(&format!("B: {clients}c x {rate} msg/s"), &points);
    }
    let health: serde_json::Value = reqwest::get(format!("http://{}/health", follower.addr))
        .await?
        .json()
        .await?;
    println!(
        "after the run, the stream's owner is {}",
        health["cluster"]["streams"]["binance:BTCUSDT:trades"]["owner"]
    );
    Ok(())
}

async fn throttle(
    args: &Args,
    clients: usize,
    rate: f64,
    levels: u32,
    throttles: &[u64],
) -> Result<()> {
    let channel = format!("depth:BTCUSDT:{levels}");
    let times = SendTimes::new();
    let (feed, feed_addr) = start_feed(vec!["BTCUSDT".into()], times).await?;
    let relay = start_relay(args, feed_addr).await?;
    println!(
        "throttle: 1 depth channel at {rate} updates/s x {clients} clients, relay pid {} on cpu {}",
        relay.pid(),
        args.relay_cpu
    );
    // The feed keeps updating the book for the whole run.
    let feed_loop = {
        let feed = feed.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                feed.emit_depth(0, n);
            }
        })
    };
    for &ms in throttles {
        let sockets = connect_clients(
            relay.addr,
            clients,
            |_| {
                if ms == 0 {
                    vec![channel.clone().into()]
                } else {
                    vec![serde_json::json!({"channel": channel, "throttleMs": ms})]
                }
            },
            |_| false,
        )
        .await?;
        feed.wait_for_streams(1).await?;
        let count = Rc::new(std::cell::Cell::new(0u64));
        let readers: Vec<_> = sockets
            .into_iter()
            .map(|c| tokio::task::spawn_local(c.count_loop(count.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let (cpu0, n0, t0) = (cpu_seconds(relay.pid()), count.get(), Instant::now());
        let wire0 = WIRE_BYTES.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(relay.pid()) - cpu0;
        let n = count.get() - n0;
        let wire = WIRE_BYTES.load(Ordering::Relaxed) - wire0;
        let delivered = n as f64 / secs;
        println!(
            "{channel} throttleMs {ms:>5}: delivered {delivered:>9.0}/s ({:.2}/s per client) | relay CPU {:.3} s/s = {:.1} us per client-second, {:.2} us/delivery | {:.1} wire bytes/delivery{}",
            delivered / clients as f64,
            cpu / secs,
            cpu / secs * 1e6 / clients as f64,
            if delivered > 0.0 { cpu / secs * 1e6 / delivered } else { 0.0 },
            wire as f64 / n.max(1) as f64,
            if COMPRESSION.load(Ordering::Relaxed) { " (permessage-deflate)" } else { "" },
        );
        for r in readers {
            r.abort();
        }
        // The clients leave; the channel lingers (close delay) and the next round rejoins it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    feed_loop.abort();
    Ok(())
}

async fn breadth(args: &Args, channels: usize, per_channel: usize, mean_rate: f64) -> Result<()> {
    let times = SendTimes::new();
    let symbols: Vec<String> = (0..channels).map(|i| format!("S{i:04}USDT")).collect();
    let (feed, feed_addr) = start_feed(symbols.clone(), times.clone()).await?;
    let relay = start_relay(args, feed_addr).await?;
    let meter = new_meter();
    let n = channels * per_channel;
    let sockets = connect_clients(
        relay.addr,
        n,
        |i| vec![format!("trades:{}", symbols[i % channels]).into()],
        |_| false,
    )
    .await?;
    for c in sockets {
        tokio::task::spawn_local(c.read_loop(meter.clone(), times.clone()));
    }
    feed.wait_for_streams(channels).await?;
    // Mixed rates: spread 0.2x..1.8x of the mean, deterministic.
    let rates: Vec<(usize, f64)> = (0..channels)
        .map(|i| {
            (
                i,
                mean_rate * (0.2 + 1.6 * (i as f64 / channels.max(2) as f64)),
            )
        })
        .collect();
    println!(
        "breadth: {channels} channels x {per_channel} clients, {:.0} trades/s upstream",
        rates.iter().map(|r| r.1).sum::<f64>()
    );
    let mut points = Vec::new();
    for _ in 0..args.repeat {
        let p = measure(
            args,
            &relay,
            &feed,
            &meter,
            rates.clone(),
            per_channel as f64,
            &[],
        )
        .await;
        print_point(&format!("{channels}ch x {per_channel}c"), &p);
        points.push(p);
    }
    summarize(&format!("{channels}ch x {per_channel}c"), &points);
    let stats: serde_json::Value = reqwest::get(format!("http://{}/api/v1/ws/stats", relay.addr))
        .await?
        .json()
        .await?;
    println!(
        "relay stats: binanceStreams {} (feed subscribed to {}), totalSubscriptions {}, connections {}, messagesIn {}, feed emitted {} dropped {} unrouted {}",
        stats["data"]["binanceStreams"],
        feed.subscribed_streams(),
        stats["data"]["totalSubscriptions"],
        stats["data"]["upstreams"]["binance"]["connections"],
        stats["data"]["messagesIn"],
        feed.next_id.load(Ordering::Relaxed) - 1,
        feed.dropped.load(Ordering::Relaxed),
        feed.unrouted.load(Ordering::Relaxed)
    );
    let window = &stats["data"]["recovery"];
    let bytes = window["windowBytes"].as_f64().unwrap_or(0.0);
    println!(
        "recovery windows: {} messages, {:.1} MiB over {channels} channels ({:.1} KiB a channel)",
        window["windowMessages"],
        bytes / (1024.0 * 1024.0),
        bytes / 1024.0 / channels as f64
    );
    Ok(())
}

async fn churn(args: &Args, clients: usize, channels: usize, ops: f64) -> Result<()> {
    let times = SendTimes::new();
    let symbols: Vec<String> = (0..channels).map(|i| format!("S{i:04}USDT")).collect();
    let (feed, feed_addr) = start_feed(symbols.clone(), times.clone()).await?;
    let relay = start_relay(args, feed_addr).await?;
    let mut sockets = Vec::with_capacity(clients);
    for _ in 0..clients {
        sockets.push(connect_ws(relay.addr).await?);
    }
    let done = Rc::new(RefCell::new(0u64));
    let until = Instant::now() + Duration::from_secs(args.duration);
    let cpu0 = cpu_seconds(relay.pid());
    let control0 = feed.control_messages.load(Ordering::Relaxed);
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let symbols = symbols.clone();
        let done = done.clone();
        tokio::task::spawn_local(async move {
            let mut k = i;
            let gap = Duration::from_secs_f64(1.0 / ops);
            while Instant::now() < until {
                let ch = format!("trades:{}", symbols[k % symbols.len()]);
                k = k.wrapping_mul(31).wrapping_add(7);
                for kind in ["subscribe", "unsubscribe"] {
                    let req = serde_json::json!({"type": kind, "channels": [ch]});
                    if ws.send(WsMessage::text(req.to_string())).await.is_err() {
                        return;
                    }
                    // Wait for the reply (ack), skipping data.
                    loop {
                        match ws.next().await {
                            Some(Ok(WsMessage::Text(t))) if t.as_str().contains("subscribed\"") => {
                                break
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                    *done.borrow_mut() += 1;
                    tokio::time::sleep(gap).await;
                }
            }
            let _ = ws.close(None).await;
        });
    }
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let secs = args.duration as f64;
    let control = feed.control_messages.load(Ordering::Relaxed) - control0;
    let cpu = cpu_seconds(relay.pid()) - cpu0;
    // After the close delay every upstream stream must be gone (no leaks).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats: serde_json::Value = reqwest::get(format!("http://{}/api/v1/ws/stats", relay.addr))
        .await?
        .json()
        .await?;
    let ops_done = *done.borrow();
    println!(
        "churn: {clients} clients over {channels} channels: {:.0} client requests/s -> {:.1} upstream control messages/s, {} one-second windows over 5 msg/s | relay CPU {:.2}s | after close delay: binanceStreams {} (feed still subscribed to {}), totalSubscriptions {}",
        ops_done as f64 / secs,
        control as f64 / secs,
        feed.rate_violations.load(Ordering::Relaxed),
        cpu,
        stats["data"]["binanceStreams"],
        feed.subscribed_streams(),
        stats["data"]["totalSubscriptions"]
    );
    Ok(())
}

async fn idle(args: &Args, clients: usize) -> Result<()> {
    let times = SendTimes::new();
    let (_feed, feed_addr) = start_feed(vec!["BTCUSDT".into()], times).await?;
    let relay = start_relay(args, feed_addr).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (base, _) = rss_kib(relay.pid());
    let sockets = connect_clients(relay.addr, clients, |_| Vec::new(), |_| false).await?;
    tokio::time::sleep(Duration::from_secs(args.warmup.max(3))).await;
    let (rss, peak) = rss_kib(relay.pid());
    let cpu0 = cpu_seconds(relay.pid());
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let cpu = cpu_seconds(relay.pid()) - cpu0;
    println!(
        "idle: {clients} connected clients | relay RSS {:.1} MiB before, {:.1} MiB after (peak {:.1}) | {:.2} KiB per connection | relay CPU {:.3}s over {}s idle",
        base as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        (rss.saturating_sub(base)) as f64 / clients as f64,
        cpu,
        args.duration
    );
    drop(sockets);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    COMPRESSION.store(args.compression, Ordering::Relaxed);
    // The load generator and its feed share one core; the relay gets the other.
    let _ = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &args.loadgen_cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        match args.scenario.clone() {
            Scenario::Fanout {
                clients,
                rates,
                slow_percent,
            } => fanout(&args, clients, &rates, slow_percent).await,
            Scenario::Breadth {
                channels,
                clients_per_channel,
                mean_rate,
            } => breadth(&args, channels, clients_per_channel, mean_rate).await,
            Scenario::Churn {
                clients,
                channels,
                ops_per_client,
            } => churn(&args, clients, channels, ops_per_client).await,
            Scenario::Idle { clients } => idle(&args, clients).await,
            Scenario::Cluster { clients, rates } => cluster(&args, clients, &rates).await,
            Scenario::Throttle {
                clients,
                rate,
                levels,
                throttle_ms,
            } => throttle(&args, clients, rate, levels, &throttle_ms).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trade_ids_are_found_without_parsing() {
        let m = br#"{"type":"trade","channel":"trades:BTCUSDT","data":{"exchange":"binance","symbol":"BTCUSDT","tradeId":12345,"price":1.0}}"#;
        assert_eq!(trade_id(m), Some(12345));
        assert_eq!(trade_id(br#"{"type":"pong"}"#), None);
    }

    #[test]
    fn frames_round_trip_through_the_parser() {
        // A client frame is masked (bit set, key 0); the parser skips the key either way.
        let f = client_frame(0x1, b"hello");
        match RawClient::parse(&f) {
            Some((used, Frame::Text(t))) => assert_eq!((used, t), (f.len(), &b"hello"[..])),
            _ => panic!("not parsed"),
        }
        let big = vec![b'x'; 70_000];
        let f = client_frame(0x9, &big);
        assert!(
            matches!(RawClient::parse(&f), Some((n, Frame::Ping(p))) if n == f.len() && p.len() == 70_000)
        );
        assert!(
            RawClient::parse(&f[..f.len() - 1]).is_none(),
            "incomplete frame waits"
        );
    }
}
