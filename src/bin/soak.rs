//! Soak: N clients with M trade subscriptions each, across the three simulated exchanges, for
//! T minutes, while the exchanges' connections are killed on a schedule and, between kills,
//! stalled or fed corrupt data. Trade ids are consecutive per market, so every gap, duplicate
//! and reordering a client sees is counted; a gap is excused only when it overlaps an outage
//! window (from the fault until the relay's subscriptions are back at the exchange). Reports
//! messages lost outside outages (must be 0), duplicates, out-of-order deliveries, reconnect
//! time p50/p95/max, resyncs, the relay's RSS at start and end, and errors. Exits non-zero if
//! anything was lost, duplicated or reordered.
//!
//! ```text
//! cargo build --release --bins
//! target/release/soak --clients 200 --subs 5 --minutes 10 --kill-every 30
//! ```

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use exchange_relay::sim::{SimBinance, SimCoinbase, SimKraken, SimOptions};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Soak test for exchange-relay against the simulated exchanges")]
struct Args {
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Trade subscriptions per client.
    #[arg(long, default_value_t = 5)]
    subs: usize,
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between upstream kills (all three exchanges); a stall or corruption falls
    /// halfway between two kills.
    #[arg(long, default_value_t = 30)]
    kill_every: u64,
    /// The relay binary (default: exchange-relay beside this program).
    #[arg(long)]
    relay_bin: Option<String>,
}

/// Trade channels the clients spread over, and the exchange each belongs to.
const CHANNELS: &[(&str, &str)] = &[
    ("trades:BTCUSDT", "binance"),
    ("trades:ETHUSDT", "binance"),
    ("trades:SOLUSDT", "binance"),
    ("trades:BNBUSDT", "binance"),
    ("trades:XRPUSDT", "binance"),
    ("trades:BTCUSD@kraken", "kraken"),
    ("trades:ETHUSD@kraken", "kraken"),
    ("trades:SOLUSD@kraken", "kraken"),
    ("trades:BTCUSD@coinbase", "coinbase"),
    ("trades:ETHUSD@coinbase", "coinbase"),
    ("trades:SOLUSD@coinbase", "coinbase"),
];

/// Book channels a few extra clients hold, so book faults have books to resync.
const BOOKS: &[&str] = &[
    "depth:BTCUSD@kraken:10",
    "depth:ETHUSD@coinbase:10",
    "depth:BTCUSDT:10",
];

#[derive(Debug, Clone)]
struct Gap {
    exchange: &'static str,
    after_ms: i64,
    before_ms: i64,
    missing: u64,
}

#[derive(Default)]
struct Report {
    trades: u64,
    gaps: Vec<Gap>,
    duplicates: u64,
    out_of_order: u64,
    client_errors: HashMap<String, u64>,
    client_disconnects: u64,
    /// Outage windows per exchange, ms since the epoch.
    outages: Vec<(&'static str, i64, i64)>,
    /// Fault to recovery, ms, per exchange reconnect.
    reconnect_ms: Vec<u64>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn iso_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

struct Relay {
    child: Child,
    addr: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn start_relay(args: &Args, b: &SimBinance, k: &SimKraken, c: &SimCoinbase) -> Result<Relay> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "[server]\nlisten = \"{addr}\"\nmax_connects_per_ip_per_second = 10000\nmax_connections_per_ip = 10000\n\
         [streams]\nclose_delay_ms = 1000\n\
         [exchanges.binance]\nws_url = \"{}\"\nrest_url = \"{}\"\nstale_timeout_ms = 3000\n\
         [exchanges.kraken]\nws_url = \"{}\"\nrest_url = \"{}\"\nstale_timeout_ms = 3000\n\
         [exchanges.coinbase]\nws_url = \"{}\"\nrest_url = \"{}\"\nstale_timeout_ms = 3000\n",
        b.ws_url(), b.rest_url(), k.ws_url(), k.rest_url(), c.ws_url(), c.rest_url()
    );
    let path = std::env::temp_dir().join(format!("soak-relay-{}.toml", std::process::id()));
    std::fs::write(&path, config)?;
    let bin = match &args.relay_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .with_file_name("exchange-relay")
            .display()
            .to_string(),
    };
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin} (cargo build --release --bins)"))?;
    let relay = Relay { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{}/ready", relay.addr)).await {
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

/// One client for the whole run: subscribes, reads, checks every trade id, reconnects if cut.
async fn client(
    addr: String,
    channels: Vec<(&'static str, &'static str)>,
    report: Arc<Mutex<Report>>,
    until: Instant,
) {
    let exchange_of: HashMap<&str, &'static str> = channels.iter().copied().collect();
    // Per channel: last trade id and its time.
    let mut last: HashMap<String, (u64, i64)> = HashMap::new();
    while Instant::now() < until {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let names: Vec<&str> = channels.iter().map(|(c, _)| *c).collect();
        let req = serde_json::json!({"type": "subscribe", "channels": names});
        if ws.send(Message::text(req.to_string())).await.is_err() {
            continue;
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, ws.next()).await {
                Err(_) => return, // the run is over
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => {
                    report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .client_disconnects += 1;
                    break;
                }
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(msg.as_str()) else {
                continue;
            };
            match v["type"].as_str() {
                Some("trade") => {
                    let channel = v["channel"].as_str().unwrap_or_default().to_string();
                    let (Some(id), Some(t)) = (
                        v["data"]["tradeId"].as_u64(),
                        v["data"]["timestamp"].as_str().and_then(iso_ms),
                    ) else {
                        continue;
                    };
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    r.trades += 1;
                    match last.get(&channel).copied() {
                        Some((prev, _)) if id == prev => r.duplicates += 1,
                        Some((prev, _)) if id < prev => r.out_of_order += 1,
                        Some((prev, prev_t)) => {
                            if id > prev + 1 {
                                let exchange =
                                    exchange_of.get(channel.as_str()).copied().unwrap_or("?");
                                r.gaps.push(Gap {
                                    exchange,
                                    after_ms: prev_t,
                                    before_ms: t,
                                    missing: id - prev - 1,
                                });
                            }
                            last.insert(channel, (id, t));
                        }
                        None => {
                            last.insert(channel, (id, t));
                        }
                    }
                }
                Some("error") => {
                    let code = v["data"]["code"].as_str().unwrap_or("?").to_string();
                    *report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .client_errors
                        .entry(code)
                        .or_default() += 1;
                }
                _ => {}
            }
        }
    }
}

/// Waits until the relay has opened a new connection to the exchange (its connect count
/// passed `connects_before`) and holds `streams` subscriptions again; returns when (ms).
async fn recovered(
    connects: impl Fn() -> u64,
    connects_before: u64,
    count: impl Fn() -> usize,
    streams: usize,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    while (connects() <= connects_before || count() < streams) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    now_ms()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = SimOptions::realistic();
    let binance = SimBinance::start(TcpListener::bind("127.0.0.1:0").await?, opts.clone()).await?;
    let kraken = SimKraken::start(TcpListener::bind("127.0.0.1:0").await?, opts.clone()).await?;
    let coinbase = SimCoinbase::start(TcpListener::bind("127.0.0.1:0").await?, opts).await?;
    let relay = start_relay(&args, &binance, &kraken, &coinbase).await?;
    let pid = relay.child.id();
    let rss_start = rss_kib(pid);
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    let until = Instant::now() + run;
    let report = Arc::new(Mutex::new(Report::default()));
    println!(
        "soak: {} clients x {} trade subscriptions for {:.1} min, upstream kill every {} s, relay pid {pid}",
        args.clients, args.subs, args.minutes, args.kill_every
    );

    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let chans: Vec<(&'static str, &'static str)> = (0..args.subs.min(CHANNELS.len()))
            .map(|k| CHANNELS[(i + k * 3) % CHANNELS.len()])
            .collect();
        tasks.push(tokio::spawn(client(
            relay.addr.clone(),
            chans,
            report.clone(),
            until,
        )));
    }
    for (i, book) in BOOKS.iter().enumerate() {
        let addr = relay.addr.clone();
        tasks.push(tokio::spawn(async move {
            // Book holders keep the books subscribed (and so resyncable); their data is not checked.
            if let Ok((mut ws, _)) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await
            {
                let req = serde_json::json!({"type": "subscribe", "channels": [book], "id": i});
                let _ = ws.send(Message::text(req.to_string())).await;
                let _ =
                    tokio::time::timeout(run, async { while ws.next().await.is_some() {} }).await;
            }
        }));
    }

    // Let every subscription reach the exchanges, and count what "fully subscribed" means.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b_streams = binance.subscriptions().len();
    let k_streams = kraken.subscriptions().len();
    let c_streams = coinbase.subscriptions().len();
    println!("upstream streams: binance {b_streams}, kraken {k_streams}, coinbase {c_streams}");

    let mut round = 0u64;
    while Instant::now() + Duration::from_secs(args.kill_every) < until {
        tokio::time::sleep(Duration::from_secs(args.kill_every / 2)).await;
        // Halfway: a stall or a corruption, in rotation.
        let fault = [
            "stall binance",
            "corrupt kraken checksum",
            "skip coinbase sequence",
            "garbage binance frame",
        ][(round % 4) as usize];
        let start = now_ms();
        match round % 4 {
            0 => {
                let before = binance.connects();
                binance.set_stalled(true);
                tokio::time::sleep(Duration::from_secs(5)).await;
                binance.set_stalled(false);
                // The relay replaces the silent socket (stale_timeout_ms 3 s).
                let end = recovered(
                    || binance.connects(),
                    before,
                    || binance.subscriptions().len(),
                    b_streams,
                )
                .await;
                // The stalled socket is replaced; until then nothing flows.
                report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .outages
                    .push(("binance", start, end + 1000));
            }
            1 => kraken.corrupt_next_checksum("BTC/USD"),
            2 => coinbase.skip_sequence(),
            _ => binance.send_garbage(),
        }
        println!(
            "t+{:>4.0}s fault: {fault}",
            run.as_secs_f64()
                - until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(args.kill_every - args.kill_every / 2)).await;
        // The kill: every upstream connection of every exchange at once.
        let (bc, kc, cc) = (binance.connects(), kraken.connects(), coinbase.connects());
        let killed = now_ms();
        binance.kill_connections();
        kraken.kill_connections();
        coinbase.kill_connections();
        let (b, k, c) = tokio::join!(
            recovered(
                || binance.connects(),
                bc,
                || binance.subscriptions().len(),
                b_streams
            ),
            recovered(
                || kraken.connects(),
                kc,
                || kraken.subscriptions().len(),
                k_streams
            ),
            recovered(
                || coinbase.connects(),
                cc,
                || coinbase.subscriptions().len(),
                c_streams
            ),
        );
        {
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            for (exchange, end) in [("binance", b), ("kraken", k), ("coinbase", c)] {
                r.reconnect_ms.push((end - killed).max(0) as u64);
                // Trades the exchange made before our subscriptions were back are gone by
                // design; a second of margin for the ones in flight at the fault.
                r.outages.push((exchange, killed - 1000, end + 1000));
            }
        }
        println!(
            "t+{:>4.0}s kill: reconnected in {} / {} / {} ms (binance / kraken / coinbase)",
            run.as_secs_f64()
                - until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
            b - killed,
            k - killed,
            c - killed
        );
        round += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    let rss_end = rss_kib(pid);
    let stats: serde_json::Value = reqwest::get(format!("http://{}/api/v1/ws/stats", relay.addr))
        .await?
        .json()
        .await?;
    let ups = &stats["data"]["upstreams"];
    let sum = |field: &str| {
        ["binance", "kraken", "coinbase"]
            .iter()
            .map(|e| ups[e][field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };

    let r = report.lock().unwrap_or_else(|e| e.into_inner());
    let excused = |g: &Gap| {
        r.outages
            .iter()
            .any(|(ex, from, to)| *ex == g.exchange && g.after_ms <= *to && g.before_ms >= *from)
    };
    let lost: u64 = r
        .gaps
        .iter()
        .filter(|g| !excused(g))
        .map(|g| g.missing)
        .sum();
    let outage_missing: u64 = r
        .gaps
        .iter()
        .filter(|g| excused(g))
        .map(|g| g.missing)
        .sum();
    let mut rec = r.reconnect_ms.clone();
    rec.sort_unstable();
    println!("---");
    println!("trades delivered        {}", r.trades);
    println!("lost outside outages    {lost}");
    println!("missed during outages   {outage_missing} (trades made while the upstream was down)");
    println!("duplicates              {}", r.duplicates);
    println!("out of order            {}", r.out_of_order);
    println!(
        "reconnects measured     {} (p50 {} ms, p95 {} ms, max {} ms)",
        rec.len(),
        percentile(&rec, 0.5),
        percentile(&rec, 0.95),
        rec.last().copied().unwrap_or(0)
    );
    println!("relay reconnects        {}", sum("reconnects"));
    println!("book resyncs            {}", sum("resyncs"));
    println!("upstream decode errors  {}", sum("decodeErrors"));
    println!("client errors           {:?}", r.client_errors);
    println!("client disconnects      {}", r.client_disconnects);
    println!(
        "relay RSS               {:.1} MiB at start, {:.1} MiB at end",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    if lost > 0 || r.duplicates > 0 || r.out_of_order > 0 {
        let bad: Vec<&Gap> = r.gaps.iter().filter(|g| !excused(g)).take(10).collect();
        println!("FAILED; first unexcused gaps: {bad:?}");
        std::process::exit(1);
    }
    println!("OK");
    Ok(())
}
