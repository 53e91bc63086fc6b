//! exchange-relay: live market data from Binance, Coinbase and Kraken, normalised and fanned
//! out to WebSocket clients. The library does the work; `main.rs` is a thin shell around [`run`].
#![forbid(unsafe_code)]

pub mod api_error;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod console;
pub mod decimal;
pub mod domain;
pub mod events;
pub mod exchange;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod sim;
pub mod stats;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{AppInner, AppState, ConnTracker, UserConns};
use crate::config::Config;
use crate::exchange::Upstreams;
use crate::hub::{Close, FeedSink, Hub};
use crate::protocol::close;

/// The relay's log filter: `directives` (RUST_LOG syntax; `info` when absent), except that
/// tungstenite never logs at TRACE, where it prints every frame and handshake request, tokens
/// included (`?token=`, `{"type":"auth"}`): tokens never reach the logs. A directive sets a
/// level rather than capping one, so the cap is added only where TRACE would reach tungstenite.
pub fn log_filter(directives: Option<&str>) -> tracing_subscriber::EnvFilter {
    let base = directives.unwrap_or("info");
    let mut filter = tracing_subscriber::EnvFilter::try_new(base)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let traces_tungstenite = base.split(',').any(|d| {
        let d = d.trim().to_ascii_lowercase();
        match d.split_once('=') {
            None => d == "trace",
            Some((target, level)) => level == "trace" && target.contains("tungstenite"),
        }
    });
    if traces_tungstenite {
        for target in [
            "tungstenite=debug",
            "tungstenite::protocol=debug",
            "tungstenite::handshake=debug",
            "tungstenite::handshake::client=debug",
            "tungstenite::handshake::server=debug",
            "tokio_tungstenite=debug",
        ] {
            if let Ok(d) = target.parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn the_tungstenite_cap_never_raises_a_level() {
        // A quiet relay stays quiet: the cap must not enable tungstenite's DEBUG output.
        assert_eq!(
            log_filter(Some("warn")).max_level_hint(),
            Some(LevelFilter::WARN)
        );
        assert_eq!(log_filter(None).max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(
            log_filter(Some("trace")).max_level_hint(),
            Some(LevelFilter::TRACE)
        );
    }
}

/// Applies what a reload may change: `[auth]` and the listener's certificate files.
fn reload(
    state: &AppState,
    tls: Option<&server::TlsServer>,
    next: &Config,
    token: &CancellationToken,
) {
    let current = state.auth.current();
    match auth::Authenticator::from_config(&next.auth, Some(&current)) {
        Ok(authenticator) => {
            if let Some(jwks) = authenticator.jwks() {
                jwks.start(token.clone());
            }
            let what = authenticator.describe();
            state.auth.replace(authenticator);
            tracing::info!(keys = %what, "reloaded [auth]");
        }
        Err(error) => tracing::error!(%error, "reload: [auth] not changed"),
    }
    match (tls, &next.server.tls_cert_file, &next.server.tls_key_file) {
        (Some(tls), Some(cert), Some(key)) => match tls.reload(cert, key) {
            Ok(()) => tracing::info!(cert = %cert.display(), "reloaded the TLS certificate"),
            Err(error) => tracing::error!(%error, "reload: the TLS certificate not changed"),
        },
        (None, None, None) => {}
        _ => tracing::warn!("reload: turning TLS on or off (server.tls_cert_file) needs a restart"),
    }
    tracing::info!("reload done; changes outside [auth] and the TLS files need a restart");
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
}

/// Runs the relay on `listener` until `shutdown` completes, then closes clients with 1001,
/// closes upstream connections and waits up to `server.shutdown_grace_ms` for both.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_reloadable(config, listener, shutdown, reloads).await
}

/// [`run`], taking configurations to reload from `reloads` (SIGHUP in `main.rs`): the `[auth]`
/// section (keys, key files, the JWKS) and the listener's certificate are replaced; connections
/// stay open. Anything else needs a restart, and a configuration that does not load changes
/// nothing; both are logged.
pub async fn run_reloadable(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    // rustls needs a process-wide crypto provider; ring is the only one compiled in. A second
    // install (tests start several relays) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let authenticator =
        auth::Authenticator::from_config(&config.auth, None).map_err(RunError::Config)?;
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            server::TlsServer::load(cert, key).map_err(RunError::Config)?,
        )),
        _ => None,
    };
    let token = CancellationToken::new();
    if let Some(jwks) = authenticator.jwks() {
        jwks.start(token.clone());
    }
    let stats = Arc::new(stats::Stats::default());
    // The exchange side feeds the hub through the hub's boundary (hub::feed): the hub holds
    // the source, the source a weak handle on the hub.
    let upstreams =
        Arc::new(Upstreams::new(&config, stats.clone(), token.clone()).map_err(RunError::Config)?);
    // In a cluster the Redis side sits between the two: the hub's source, the exchanges' sink.
    let cluster = if config.cluster.enabled() {
        Some(
            cluster::Cluster::new(&config, upstreams.clone(), token.clone())
                .map_err(RunError::Config)?,
        )
    } else {
        None
    };
    let source: Arc<dyn hub::FeedSource> = match &cluster {
        Some(c) => c.clone(),
        None => upstreams.clone(),
    };
    let hub = Hub::new(&config, stats.clone(), token.clone(), source);
    let hub_sink: std::sync::Weak<dyn FeedSink> =
        Arc::downgrade(&hub) as std::sync::Weak<dyn FeedSink>;
    match &cluster {
        Some(c) => {
            tracing::info!(node = %c.node_id(), redis = %config.cluster.redis_url, "joining the cluster");
            c.start(hub_sink);
            upstreams.share_budget(c.clone());
            let cluster_sink: Arc<dyn FeedSink> = c.clone();
            upstreams.start(Arc::downgrade(&cluster_sink));
        }
        None => upstreams.start(hub_sink),
    }
    let auth = Arc::new(auth::Auth::new(authenticator));
    let state = AppState::new(AppInner {
        conns: ConnTracker::new(
            config.server.max_connections,
            config.server.max_connections_per_ip,
            config.server.max_connects_per_ip_per_second,
        ),
        hub: hub.clone(),
        upstreams: upstreams.clone(),
        cluster: cluster.clone(),
        metrics: metrics::Metrics::new(
            stats.clone(),
            hub.clone(),
            upstreams.clone(),
            cluster.clone(),
            auth.clone(),
        ),
        stats,
        auth,
        users: UserConns::new(config.server.max_connections_per_user, cluster.clone()),
        clients: TaskTracker::new(),
        shutdown: token.clone(),
        config: config.clone(),
    });
    let http_tasks = TaskTracker::new();
    let server = server::serve(
        listener,
        http::app(state.clone()),
        server::ConnOptions {
            header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
            send_buffer_bytes: config.server.client_send_buffer_bytes,
        },
        tls.clone(),
        token.clone(),
        http_tasks.clone(),
    );
    let mut server = std::pin::pin!(server);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut server => break,
            _ = &mut shutdown => break,
            Some(next) = reloads.recv() => reload(&state, tls.as_deref(), &next, &token),
        }
    }
    tracing::info!("shutting down: closing clients with 1001 and upstreams");
    hub.close_all(Close {
        code: close::GOING_AWAY,
        reason: "server shutting down".into(),
        last_words: None,
        abort: false,
    });
    token.cancel();
    server.await;
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    state.clients.close();
    upstreams.tasks.close();
    http_tasks.close();
    let drained = tokio::time::timeout(grace, async {
        state.clients.wait().await;
        upstreams.tasks.wait().await;
        if let Some(c) = &cluster {
            c.tasks.wait().await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period ended with work still running"
        );
    }
    Ok(())
}
