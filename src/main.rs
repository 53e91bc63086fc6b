//! The `exchange-relay` binary: parses the command line, loads the configuration, sets up
//! logging and runs the relay until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use exchange_relay::config::Config;
use exchange_relay::sim::{start_demo, SimOptions};
use tokio::net::TcpListener;

/// Real-time market-data relay: Binance, Coinbase and Kraken upstream, one WebSocket hub downstream.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file; without it ./config.toml is read if present.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Listen address, overriding server.listen (e.g. 127.0.0.1:3000).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Offline demo: start simulated exchanges on loopback and relay them instead of the real
    /// ones. No network access needed.
    #[arg(long)]
    demo: bool,
    /// Log as JSON lines instead of text (for log shippers).
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Validates the configuration (every key, environment overrides, the key files it
    /// names) and exits 0, or 1 with one line per problem: for deploy pipelines.
    CheckConfig,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::CheckConfig) = args.command {
        return check_config(&args);
    }
    // The error alone, as a sentence (a bad config is one line per key): no backtrace, which
    // anyhow would add under RUST_BACKTRACE, and no `Debug` form.
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exchange-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `check-config`: what starting would find wrong with the configuration, without binding
/// a port or reaching an exchange.
fn check_config(args: &Args) -> std::process::ExitCode {
    let (path, required) = config_path(args);
    let problems = match Config::load(&path, required, std::env::vars()) {
        Err(e) => e.problems,
        Ok(config) => {
            let mut p = Vec::new();
            if let Err(e) = exchange_relay::auth::Authenticator::from_config(&config.auth, None) {
                p.push(e);
            }
            if let (Some(cert), Some(key)) =
                (&config.server.tls_cert_file, &config.server.tls_key_file)
            {
                if let Err(e) = exchange_relay::server::server_config(cert, key) {
                    p.push(e);
                }
            }
            let ca = config.exchanges.ca_file.as_deref();
            if let Err(e) = exchange_relay::exchange::tls::Trust::load(
                ca,
                exchange_relay::exchange::tls::ssl_cert_file(),
            ) {
                p.push(e);
            }
            p
        }
    };
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return std::process::ExitCode::SUCCESS;
    }
    for p in &problems {
        println!("{}: {p}", path.display());
    }
    std::process::ExitCode::FAILURE
}

/// The configuration file to read, and whether it must exist (named on the command line).
fn config_path(args: &Args) -> (PathBuf, bool) {
    match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    // One CPU (a container limit, or pinned with taskset): tokio's multi-thread scheduler then
    // only adds work stealing and queue overflow to every wake; the current-thread scheduler
    // runs the same tasks in order. Measured by `loadgen`, see README § Performance.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(relay_main(args))
}

async fn relay_main(args: Args) -> anyhow::Result<()> {
    let filter = exchange_relay::log_filter(std::env::var("RUST_LOG").ok().as_deref());
    // Colour only for a person at a terminal: `docker logs`, files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }

    let (path, required) = config_path(&args);
    let mut config = Config::load(&path, required, std::env::vars())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    let addr = config
        .server
        .listen_addr()
        .map_err(|e| anyhow::anyhow!("server.listen: {e}"))?
        .to_string();
    // Bound before anything else starts, so a busy port fails at once, in one line.
    let listener = TcpListener::bind(addr.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;

    // Kept alive for the life of the relay.
    let mut _sims = Vec::new();
    if args.demo {
        _sims = start_demo(SimOptions::realistic()).await?;
        for sim in &_sims {
            let cfg = config.exchanges.get_mut(sim.id);
            cfg.enabled = true;
            cfg.ws_url = sim.ws_url.clone();
            cfg.rest_url = sim.rest_url.clone();
            tracing::info!(exchange = %sim.id, ws = %sim.ws_url, rest = %sim.rest_url, "demo: simulated exchange running");
        }
    }

    let local = listener.local_addr().map_or(addr, |a| a.to_string());
    tracing::info!(addr = %local, demo = args.demo, "exchange-relay listening");
    let reloads = reload_on_sighup(path, required);
    exchange_relay::run_reloadable(config, listener, shutdown_signal(), reloads).await?;
    tracing::info!("stopped");
    Ok(())
}

/// On SIGHUP, the configuration read again (file and environment), for the relay to apply what
/// can change while it runs (`[auth]`, the TLS certificate). One that does not load is logged
/// and changes nothing.
fn reload_on_sighup(path: PathBuf, required: bool) -> tokio::sync::mpsc::Receiver<Config> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be caught here: reloads need a restart");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
            match Config::load(&path, required, std::env::vars()) {
                Ok(config) => {
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused: the configuration does not load; nothing changed")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (path, required, tx);
    rx
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
