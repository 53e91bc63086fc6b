//! Simulated exchanges on loopback, speaking each exchange's real wire protocol, driven by
//! `fixtures/`. The tests use them, and `exchange-relay --demo` runs the relay against them so
//! anyone can try the product offline.

pub mod binance;
pub mod coinbase;
pub mod kraken;
pub mod market;
mod util;

use std::time::Duration;

use tokio::net::TcpListener;

use crate::domain::ExchangeId;
pub use binance::SimBinance;
pub use coinbase::SimCoinbase;
pub use kraken::SimKraken;

/// Cadences and limits of a simulated exchange.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// How often the market moves.
    pub step: Duration,
    /// 24h ticker cadence (Binance: 1000 ms).
    pub ticker_every: Duration,
    /// Forming-kline cadence (Binance: 2000 ms; `1s` klines every second).
    pub kline_every: Duration,
    /// Partial-depth cadence (Binance `@100ms`).
    pub depth_every: Duration,
    /// Server ping cadence (Binance: 20 s).
    pub ping_every: Duration,
    /// Close a connection that has not answered a ping within this (Binance: 60 s).
    pub pong_timeout: Duration,
    /// Incoming messages a connection may send per second (Binance: 5).
    pub max_incoming_per_sec: usize,
    /// Streams per connection (Binance: 1024).
    pub max_streams_per_connection: usize,
    /// Seed of the markets' random walks.
    pub seed: u64,
    /// Multiplies every market's trade rate (load tests, slow-consumer tests).
    pub rate_scale: f64,
    /// How much faster than wall time the exchange's clock runs (trade times, candles).
    pub time_scale: f64,
    /// Rows Kraken's REST OHLC answers at most, the newest (Kraken: 720, whatever `since`).
    pub ohlc_rows: usize,
}

impl SimOptions {
    /// The real exchange's cadences and limits.
    pub fn realistic() -> SimOptions {
        SimOptions {
            step: Duration::from_millis(50),
            ticker_every: Duration::from_millis(1000),
            kline_every: Duration::from_millis(2000),
            depth_every: Duration::from_millis(100),
            ping_every: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            max_incoming_per_sec: 5,
            max_streams_per_connection: 1024,
            seed: 42,
            rate_scale: 1.0,
            time_scale: 1.0,
            ohlc_rows: 720,
        }
    }

    /// Real limits, faster data: what the tests use, so they wait milliseconds, not seconds.
    pub fn fast() -> SimOptions {
        SimOptions {
            step: Duration::from_millis(20),
            ticker_every: Duration::from_millis(100),
            kline_every: Duration::from_millis(200),
            depth_every: Duration::from_millis(50),
            ..SimOptions::realistic()
        }
    }
}

/// A simulated exchange running on loopback for `--demo`, kept alive by this value.
pub struct DemoExchange {
    pub id: ExchangeId,
    pub ws_url: String,
    pub rest_url: String,
    /// The simulator itself; it stops when dropped.
    _server: Box<dyn std::any::Any + Send>,
}

impl DemoExchange {
    fn new<S: Send + 'static>(id: ExchangeId, ws_url: String, rest_url: String, server: S) -> Self {
        DemoExchange {
            id,
            ws_url,
            rest_url,
            _server: Box::new(server),
        }
    }
}

/// Starts a simulator of every exchange on its own loopback port: the one place a simulator
/// is registered (the match is exhaustive, so a new exchange cannot miss its simulator).
pub async fn start_demo(opts: SimOptions) -> std::io::Result<Vec<DemoExchange>> {
    let mut running = Vec::new();
    for id in ExchangeId::ALL {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let demo = match id {
            ExchangeId::Binance => {
                let sim = SimBinance::start(listener, opts.clone()).await?;
                DemoExchange::new(id, sim.ws_url(), sim.rest_url(), sim)
            }
            ExchangeId::Coinbase => {
                let sim = SimCoinbase::start(listener, opts.clone()).await?;
                DemoExchange::new(id, sim.ws_url(), sim.rest_url(), sim)
            }
            ExchangeId::Kraken => {
                let sim = SimKraken::start(listener, opts.clone()).await?;
                DemoExchange::new(id, sim.ws_url(), sim.rest_url(), sim)
            }
        };
        running.push(demo);
    }
    Ok(running)
}
