//! Configuration: the keys of PROTOCOL.md § Configuration contract, read from a TOML file,
//! overridden by `RELAY_<SECTION>__<KEY>` environment variables, validated before any port is
//! bound. Every bad key is reported on its own line, so an operator fixes them in one pass.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::domain::ExchangeId;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub streams: StreamsConfig,
    pub exchanges: ExchangesConfig,
    pub recovery: RecoveryConfig,
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP/WebSocket listener binds.
    pub listen: String,
    /// PROTOCOL.md's per-client cap, also announced in `connected`.
    pub max_subscriptions_per_client: usize,
    /// Global WebSocket cap; beyond it upgrades get 503 + Retry-After.
    pub max_connections: usize,
    /// Largest client frame accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// Per-IP WebSocket cap; beyond it upgrades get 429 + Retry-After.
    pub max_connections_per_ip: usize,
    /// Connections one user (JWT `sub`) may hold, on this node or across the cluster; beyond
    /// it the connection gets an error and is closed with 1008. `None`: no per-user cap.
    pub max_connections_per_user: Option<usize>,
    /// PEM certificate chain and private key: with both, the listener serves `https://` and
    /// `wss://` itself (reloaded on SIGHUP).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// permessage-deflate (RFC 7692) for clients that offer it; each frame is compressed once
    /// and shared by every such client.
    pub compression: bool,
    /// Sustained client request rate (token refill per second).
    pub client_requests_per_second: u32,
    /// Requests a client may send at once before the rate applies.
    pub client_request_burst: u32,
    /// An HTTP request's headers must arrive whole within this (slowloris).
    pub header_read_timeout_ms: u64,
    /// Allowed `Origin` headers; empty allows any (CLI clients send none).
    pub allowed_origins: Vec<String>,
    /// How often the relay pings each client (WebSocket ping frame).
    pub ping_interval_ms: u64,
    /// A client that sends nothing at all (not even a pong) for this long is closed as dead.
    pub client_timeout_ms: u64,
    /// Frames a client may have queued before it counts as a slow consumer (see `hub::outbox`).
    pub client_queue_capacity: usize,
    /// How long shutdown waits for clients and upstreams to close before giving up.
    pub shutdown_grace_ms: u64,
    /// Kernel send buffer per client socket (SO_SNDBUF). Fixed rather than autotuned (up to
    /// megabytes), so a stalled client backs up into the relay's conflating queue within
    /// moments instead of receiving seconds of stale data from the kernel later.
    pub client_send_buffer_bytes: usize,
    /// Serve `/autobahn`, an echo endpoint on the same WebSocket stack as `/ws`, for the
    /// Autobahn conformance suite. Off in production.
    pub autobahn_echo: bool,
    /// New WebSocket connections per second from one IP (bursts of twice that); beyond: 429.
    pub max_connects_per_ip_per_second: u32,
    /// Error replies a connection may provoke at once (refilled one a second); beyond it the
    /// client is closed with 1008: a client that only sends bad requests is broken or hostile.
    pub client_error_budget: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:3000".into(),
            max_subscriptions_per_client: 50,
            max_connections: 10_000,
            max_message_bytes: 65_536,
            max_connections_per_ip: 1_000,
            max_connections_per_user: None,
            tls_cert_file: None,
            tls_key_file: None,
            compression: true,
            client_requests_per_second: 10,
            client_request_burst: 20,
            header_read_timeout_ms: 10_000,
            allowed_origins: Vec::new(),
            ping_interval_ms: 20_000,
            client_timeout_ms: 60_000,
            client_queue_capacity: 1_024,
            shutdown_grace_ms: 5_000,
            client_send_buffer_bytes: 256 * 1024,
            autobahn_echo: false,
            max_connects_per_ip_per_second: 50,
            client_error_budget: 100,
        }
    }
}

impl ServerConfig {
    /// `listen` checked: an IP address with a port (`0.0.0.0:3000`, `[::1]:3000`) or a host
    /// name with a port (`localhost:3000`), resolved when the listener binds.
    pub fn listen_addr(&self) -> Result<&str, String> {
        let listen = self.listen.as_str();
        if listen.parse::<SocketAddr>().is_ok() {
            return Ok(listen);
        }
        let bad = || {
            format!(
                "'{listen}' is not an address like 0.0.0.0:3000, 127.0.0.1:3000 or localhost:3000"
            )
        };
        let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !host_ok || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(listen)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret; ignored when `jwt_secrets`, `jwt_public_key_file` or `jwks_url` is set.
    pub jwt_secret: String,
    /// Several HS256 secrets, tried in order (rotation: the new one first, the old one until
    /// its tokens have expired); replaces `jwt_secret` when not empty.
    pub jwt_secrets: Vec<String>,
    /// PEM public key (RSA, EC P-256 or Ed25519) for RS256/ES256/EdDSA tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// A JWKS document (`https://`, or `http://` on a private network): tokens name their key
    /// by `kid`. Instead of the secrets and the key file.
    pub jwks_url: Option<String>,
    /// How often the JWKS document is fetched again (besides when a token names an unknown
    /// `kid`, at most one such fetch per `jwks_min_fetch_interval_ms`).
    pub jwks_refresh_secs: u64,
    /// The least time between two fetches asked for by unknown `kid`s (a flood of made-up
    /// `kid`s costs the identity service one fetch per interval, no more).
    pub jwks_min_fetch_interval_ms: u64,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`; jsonwebtoken's own default (60 s) is far too lax.
    pub jwt_leeway_secs: u64,
    /// Bearer key for `POST /api/v1/publish`.
    pub publish_api_key: String,
    /// Several publish keys, any of which is accepted (rotation); replaces `publish_api_key`
    /// when not empty.
    pub publish_api_keys: Vec<String>,
}

impl AuthConfig {
    /// The HS256 secrets in the order they are tried.
    pub fn secrets(&self) -> Vec<&str> {
        if self.jwt_secrets.is_empty() {
            vec![self.jwt_secret.as_str()]
        } else {
            self.jwt_secrets.iter().map(String::as_str).collect()
        }
    }

    /// The publish keys accepted.
    pub fn publish_keys(&self) -> Vec<&str> {
        if self.publish_api_keys.is_empty() {
            vec![self.publish_api_key.as_str()]
        } else {
            self.publish_api_keys.iter().map(String::as_str).collect()
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: "change-me".into(),
            jwt_secrets: Vec::new(),
            jwt_public_key_file: None,
            jwks_url: None,
            jwks_refresh_secs: 300,
            jwks_min_fetch_interval_ms: 10_000,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 2,
            publish_api_key: "change-me-too".into(),
            publish_api_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// How long an unused upstream stream lingers before it is closed, so a client that
    /// resubscribes at once (page reload) does not cost an upstream round trip.
    pub close_delay_ms: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            close_delay_ms: 3_000,
        }
    }
}

impl StreamsConfig {
    pub fn close_delay(&self) -> Duration {
        Duration::from_millis(self.close_delay_ms)
    }
}

/// What each channel keeps for clients that resume with `since` (PROTOCOL.md § Recovery).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Messages kept per channel (trades, final klines, published messages, gap notices).
    pub window_messages: usize,
    /// And at most this old.
    pub window_secs: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            window_messages: 1_000,
            window_secs: 300,
        }
    }
}

/// Several relays sharing one Redis (PROTOCOL.md `[cluster]`, README § Running a cluster).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Empty: one node on its own. `redis://host:6379/0` joins the cluster behind that Redis.
    pub redis_url: String,
    /// This node's name in the cluster; empty: hostname and process id.
    pub node_id: String,
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.redis_url.trim().is_empty()
    }

    /// The configured node id, or `<hostname>-<pid>`.
    pub fn node_name(&self) -> String {
        if !self.node_id.trim().is_empty() {
            return self.node_id.trim().to_string();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "relay".to_string());
        format!("{host}-{}", std::process::id())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawExchanges")]
pub struct ExchangesConfig {
    /// The exchange meant by a channel without `@exchange`.
    pub default: ExchangeId,
    /// Extra CA certificates (PEM) trusted for the exchanges' `wss://` and `https://`, beside
    /// the public roots: for TLS-inspecting gateways. `SSL_CERT_FILE` is honoured too.
    pub ca_file: Option<PathBuf>,
    /// One per exchange, in [`ExchangeId::ALL`] order.
    venues: Vec<ExchangeConfig>,
}

impl Default for ExchangesConfig {
    fn default() -> Self {
        RawExchanges::default().into()
    }
}

impl ExchangesConfig {
    pub fn get(&self, id: ExchangeId) -> &ExchangeConfig {
        &self.venues[id.index()]
    }

    pub fn get_mut(&mut self, id: ExchangeId) -> &mut ExchangeConfig {
        &mut self.venues[id.index()]
    }
}

#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub enabled: bool,
    pub ws_url: String,
    pub rest_url: String,
    /// An upstream connection with no frame at all (data, ping, heartbeat) for this long is
    /// replaced; `None` takes the exchange's own default (Binance: 60 s, three missed pings).
    pub stale_timeout_ms: Option<u64>,
    /// Streams per upstream connection; `None` (or more than the exchange allows) takes the
    /// exchange's maximum (Binance: 1024). Lower it to spread streams over more connections.
    pub max_streams_per_connection: Option<usize>,
}

impl ExchangeConfig {
    /// The real exchange: what users deploy.
    pub fn for_exchange(id: ExchangeId) -> ExchangeConfig {
        let info = id.info();
        ExchangeConfig {
            enabled: true,
            ws_url: info.ws_url.into(),
            rest_url: info.rest_url.into(),
            stale_timeout_ms: None,
            max_streams_per_connection: None,
        }
    }
}

/// `[exchanges]` as written: `default`, and a `[exchanges.<name>]` table per exchange whose
/// absent keys take that exchange's own defaults. Keys are checked one by one before this is
/// read (`check_keys`), so an unknown name is reported there, with the names there are.
#[derive(Default, Deserialize)]
#[serde(default)]
struct RawExchanges {
    default: Option<ExchangeId>,
    ca_file: Option<PathBuf>,
    #[serde(flatten)]
    venues: BTreeMap<ExchangeId, RawExchange>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawExchange {
    enabled: Option<bool>,
    ws_url: Option<String>,
    rest_url: Option<String>,
    stale_timeout_ms: Option<u64>,
    max_streams_per_connection: Option<usize>,
}

impl RawExchange {
    fn resolve(self, id: ExchangeId) -> ExchangeConfig {
        let own = ExchangeConfig::for_exchange(id);
        ExchangeConfig {
            enabled: self.enabled.unwrap_or(own.enabled),
            ws_url: self.ws_url.unwrap_or(own.ws_url),
            rest_url: self.rest_url.unwrap_or(own.rest_url),
            stale_timeout_ms: self.stale_timeout_ms,
            max_streams_per_connection: self.max_streams_per_connection,
        }
    }
}

impl From<RawExchanges> for ExchangesConfig {
    fn from(mut raw: RawExchanges) -> Self {
        ExchangesConfig {
            default: raw.default.unwrap_or(ExchangeId::Binance),
            ca_file: raw.ca_file,
            venues: ExchangeId::ALL
                .into_iter()
                .map(|id| raw.venues.remove(&id).unwrap_or_default().resolve(id))
                .collect(),
        }
    }
}

/// A configuration that could not be used: one line per bad key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> ConfigError {
        ConfigError {
            problems: vec![problem],
        }
    }
}

impl Config {
    /// Reads `path` (a missing file is an error only when `required`), applies `env` overrides
    /// (`RELAY_SECTION__KEY=value` pairs) and validates the result.
    pub fn load(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ConfigError::one(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        Config::from_toml(&text, env)
    }

    /// Parses TOML text with `env` overrides applied, then validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::one(format!("config is not valid TOML: {e}"))
        })?;
        let mut raw_env = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("RELAY_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                continue;
            }
            set_path(&mut table, &path, env_value(&value));
            raw_env.insert(path.join("."), value);
        }

        // Every key is checked on its own; a bad one is reported and set aside (its default
        // stands in), so the value checks below run too and one run reports every problem.
        let mut problems = Vec::new();
        check_keys(&mut table, &raw_env, &mut problems);
        let config: Config = match toml::Value::Table(table).try_into() {
            Ok(c) => c,
            Err(e) => {
                let e: toml::de::Error = e;
                problems.push(e.message().to_string());
                return Err(ConfigError { problems });
            }
        };
        if let Err(e) = config.validate() {
            problems.extend(e.problems);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let s = &self.server;
        if let Err(e) = s.listen_addr() {
            p.push(format!("server.listen: {e}"));
        }
        let positive: [(&str, u64); 13] = [
            (
                "max_subscriptions_per_client",
                s.max_subscriptions_per_client as u64,
            ),
            ("max_connections", s.max_connections as u64),
            ("max_message_bytes", s.max_message_bytes as u64),
            ("max_connections_per_ip", s.max_connections_per_ip as u64),
            (
                "client_requests_per_second",
                u64::from(s.client_requests_per_second),
            ),
            ("client_request_burst", u64::from(s.client_request_burst)),
            ("header_read_timeout_ms", s.header_read_timeout_ms),
            ("ping_interval_ms", s.ping_interval_ms),
            ("client_timeout_ms", s.client_timeout_ms),
            ("client_queue_capacity", s.client_queue_capacity as u64),
            (
                "client_send_buffer_bytes",
                s.client_send_buffer_bytes as u64,
            ),
            (
                "max_connects_per_ip_per_second",
                u64::from(s.max_connects_per_ip_per_second),
            ),
            ("client_error_budget", u64::from(s.client_error_budget)),
        ];
        for (key, value) in positive {
            if value == 0 {
                p.push(format!("server.{key}: must be greater than 0"));
            }
        }
        if s.max_connections_per_user == Some(0) {
            p.push(
                "server.max_connections_per_user: must be greater than 0 (leave it out for no cap)"
                    .into(),
            );
        }
        if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
            p.push(
                "server.tls_cert_file: set together with server.tls_key_file (both or neither)"
                    .into(),
            );
        }
        if s.max_message_bytes < 128 {
            p.push("server.max_message_bytes: must be at least 128".into());
        }
        if s.client_timeout_ms <= s.ping_interval_ms {
            p.push(format!(
                "server.client_timeout_ms: must be longer than server.ping_interval_ms ({}), or live clients are dropped between pings",
                s.ping_interval_ms
            ));
        }
        for origin in &s.allowed_origins {
            if url::Url::parse(origin).is_err() {
                p.push(format!(
                    "server.allowed_origins: '{origin}' is not an origin like https://app.example.com"
                ));
            }
        }
        if self.cluster.enabled() {
            if let Err(e) = redis::Client::open(self.cluster.redis_url.trim()) {
                p.push(format!(
                    "cluster.redis_url: '{}' is not a Redis URL like redis://localhost:6379/0 ({e})",
                    self.cluster.redis_url
                ));
            }
        }
        let a = &self.auth;
        if a.jwt_public_key_file.is_some() && a.jwks_url.is_some() {
            p.push(
                "auth.jwks_url: set either auth.jwks_url or auth.jwt_public_key_file, not both"
                    .into(),
            );
        }
        if let Some(jwks) = &a.jwks_url {
            match url::Url::parse(jwks) {
                Ok(u) if matches!(u.scheme(), "https" | "http") => {}
                Ok(u) => p.push(format!(
                    "auth.jwks_url: scheme '{}' is not one of https, http",
                    u.scheme()
                )),
                Err(e) => p.push(format!("auth.jwks_url: '{jwks}' is not a URL ({e})")),
            }
        }
        if a.jwks_refresh_secs == 0 {
            p.push("auth.jwks_refresh_secs: must be greater than 0".into());
        }
        if a.jwt_public_key_file.is_none()
            && a.jwks_url.is_none()
            && a.secrets().iter().any(|s| s.is_empty())
        {
            p.push("auth.jwt_secret: must not be empty (or set auth.jwt_secrets, auth.jwt_public_key_file or auth.jwks_url)".into());
        }
        if a.publish_keys().iter().any(|k| k.is_empty()) {
            p.push(
                "auth.publish_api_key: must not be empty (nor any of auth.publish_api_keys)".into(),
            );
        }
        for id in ExchangeId::ALL {
            let cfg = self.exchanges.get(id);
            check_url(&mut p, id, "ws_url", &cfg.ws_url, &["ws", "wss"]);
            check_url(&mut p, id, "rest_url", &cfg.rest_url, &["http", "https"]);
            if cfg.stale_timeout_ms == Some(0) {
                p.push(format!(
                    "exchanges.{id}.stale_timeout_ms: must be greater than 0"
                ));
            }
        }
        if !self.exchanges.get(self.exchanges.default).enabled {
            p.push(format!(
                "exchanges.default: '{}' is disabled (exchanges.{}.enabled = false)",
                self.exchanges.default, self.exchanges.default
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

fn check_url(p: &mut Vec<String>, id: ExchangeId, key: &str, value: &str, schemes: &[&str]) {
    match url::Url::parse(value) {
        Ok(u) if schemes.contains(&u.scheme()) => {}
        Ok(u) => p.push(format!(
            "exchanges.{id}.{key}: scheme '{}' is not one of {}",
            u.scheme(),
            schemes.join(", ")
        )),
        Err(e) => p.push(format!(
            "exchanges.{id}.{key}: '{value}' is not a URL ({e})"
        )),
    }
}

/// An environment value as TOML (`50`, `true`, `["a"]`), else as a plain string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = table;
    for part in parents {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        cur = next;
    }
    cur.insert(last.clone(), value);
}

/// Checks every key on its own, so that one bad key does not hide the next, and removes the
/// keys found bad so that the rest can still be read and validated.
fn check_keys(
    table: &mut toml::Table,
    raw_env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let mut bad_sections = Vec::new();
    for (section, value) in table.iter_mut() {
        let toml::Value::Table(keys) = value else {
            problems.push(format!("{section}: must be a table ([{section}])"));
            bad_sections.push(section.clone());
            continue;
        };
        match section.as_str() {
            "server" => check_each::<ServerConfig>(section, keys, raw_env, problems),
            "auth" => check_each::<AuthConfig>(section, keys, raw_env, problems),
            "streams" => check_each::<StreamsConfig>(section, keys, raw_env, problems),
            "recovery" => check_each::<RecoveryConfig>(section, keys, raw_env, problems),
            "cluster" => check_each::<ClusterConfig>(section, keys, raw_env, problems),
            "exchanges" => {
                let mut bad = Vec::new();
                for (key, value) in keys.iter_mut() {
                    let path = format!("exchanges.{key}");
                    if ExchangeId::ALL.iter().any(|id| id.as_str() == key) {
                        match value {
                            toml::Value::Table(inner) => {
                                check_each::<RawExchange>(&path, inner, raw_env, problems)
                            }
                            _ => {
                                problems.push(format!("{path}: must be a table ([{path}])"));
                                bad.push(key.clone());
                            }
                        }
                    } else if key == "default" || key == "ca_file" {
                        if !check_one::<RawExchanges>(&path, key, value, raw_env, problems) {
                            bad.push(key.clone());
                        }
                    } else {
                        let names: Vec<&str> =
                            ExchangeId::ALL.iter().map(|id| id.as_str()).collect();
                        problems.push(format!(
                            "{path}: unknown key; expected default, ca_file or an exchange ({})",
                            names.join(", ")
                        ));
                        bad.push(key.clone());
                    }
                }
                for key in bad {
                    keys.remove(&key);
                }
            }
            other => {
                problems.push(format!(
                    "[{other}]: unknown section; expected server, auth, streams, exchanges, recovery or cluster"
                ));
                bad_sections.push(section.clone());
            }
        }
    }
    for section in bad_sections {
        table.remove(&section);
    }
}

fn check_each<T: DeserializeOwned>(
    section: &str,
    keys: &mut toml::Table,
    raw_env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let mut bad = Vec::new();
    for (key, value) in keys.iter_mut() {
        if !check_one::<T>(&format!("{section}.{key}"), key, value, raw_env, problems) {
            bad.push(key.clone());
        }
    }
    for key in bad {
        keys.remove(&key);
    }
}

/// Deserialises `T` from a table holding only `key`, every other field defaulted; false (and
/// the problem recorded) when it does not fit. An environment value that parsed as TOML but
/// does not fit is retried as the plain string it was (a numeric secret, say).
fn check_one<T: DeserializeOwned>(
    path: &str,
    key: &str,
    value: &mut toml::Value,
    raw_env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> bool {
    let attempt = |v: &toml::Value| {
        let mut single = toml::Table::new();
        single.insert(key.to_string(), v.clone());
        toml::Value::Table(single).try_into::<T>().map(|_| ())
    };
    let Err(err) = attempt(value) else {
        return true;
    };
    if let Some(raw) = raw_env.get(path) {
        let as_string = toml::Value::String(raw.clone());
        if attempt(&as_string).is_ok() {
            *value = as_string;
            return true;
        }
    }
    let message = err.message().trim().replace('\n', " ");
    if message.starts_with("unknown field") {
        problems.push(format!("{path}: unknown key"));
    } else {
        problems.push(format!("{path}: {message}"));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_toml("", env(&[])).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:3000");
        assert_eq!(c.server.max_subscriptions_per_client, 50);
        assert_eq!(c.streams.close_delay_ms, 3000);
        assert_eq!(c.exchanges.default, ExchangeId::Binance);
        assert_eq!(
            c.exchanges.get(ExchangeId::Binance).ws_url,
            "wss://stream.binance.com:9443"
        );
        assert_eq!(
            c.exchanges.get(ExchangeId::Kraken).ws_url,
            "wss://ws.kraken.com/v2"
        );
        assert_eq!(
            c.exchanges.get(ExchangeId::Coinbase).rest_url,
            "https://api.coinbase.com"
        );
    }

    #[test]
    fn shipped_config_toml_is_valid_and_points_at_the_real_exchanges() {
        let text = include_str!("../config.toml");
        let c = Config::from_toml(text, env(&[])).unwrap();
        assert!(c
            .exchanges
            .get(ExchangeId::Binance)
            .ws_url
            .starts_with("wss://stream.binance.com"));
        assert!(c
            .exchanges
            .get(ExchangeId::Coinbase)
            .ws_url
            .starts_with("wss://"));
        assert!(c
            .exchanges
            .get(ExchangeId::Kraken)
            .ws_url
            .starts_with("wss://"));
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        let listen = |l: &str| {
            ServerConfig {
                listen: l.into(),
                ..ServerConfig::default()
            }
            .listen_addr()
            .map(str::to_string)
        };
        for good in [
            "0.0.0.0:3000",
            "127.0.0.1:4002",
            "[::1]:3000",
            "localhost:4002",
            "relay-1.internal:80",
        ] {
            assert_eq!(listen(good).as_deref(), Ok(good));
        }
        for bad in [
            "nowhere",
            "localhost",
            ":3000",
            "localhost:99999",
            "a b:1",
            "http://x:1",
        ] {
            let err = listen(bad).unwrap_err();
            assert!(err.contains("localhost:3000"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_overrides_the_file() {
        let c = Config::from_toml(
            "[server]\nlisten = \"127.0.0.1:1\"\n[exchanges.kraken]\nenabled = true\n",
            env(&[
                ("RELAY_SERVER__LISTEN", "127.0.0.1:4000"),
                ("RELAY_SERVER__MAX_CONNECTIONS", "7"),
                ("RELAY_EXCHANGES__KRAKEN__ENABLED", "false"),
                ("RELAY_AUTH__JWT_SECRET", "12345"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:4000");
        assert_eq!(c.server.max_connections, 7);
        assert!(!c.exchanges.get(ExchangeId::Kraken).enabled);
        assert_eq!(c.auth.jwt_secret, "12345");
        assert_eq!(
            c.exchanges.get(ExchangeId::Kraken).ws_url,
            "wss://ws.kraken.com/v2"
        );
    }

    #[test]
    fn every_bad_key_gets_its_own_line() {
        let err = Config::from_toml(
            "[server]\nmax_connections = \"many\"\nlisten = \"nowhere\"\nbogus = 1\n\
             [exchanges.binance]\nws_url = \"http://x\"\n[exchanges]\ndefault = \"ftx\"\n[extra]\n",
            env(&[]),
        )
        .unwrap_err();
        let text = err.problems.join("\n");
        assert!(
            text.contains("server.max_connections: invalid type"),
            "{text}"
        );
        assert!(text.contains("server.bogus: unknown key"), "{text}");
        assert!(text.contains("exchanges.default:"), "{text}");
        assert!(text.contains("[extra]: unknown section"), "{text}");
        // The value checks run in the same pass: listen and the ws_url scheme are reported too.
        assert!(text.contains("server.listen: 'nowhere'"), "{text}");
        assert!(
            text.contains("exchanges.binance.ws_url: scheme 'http'"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 6, "{text}");

        let err = Config::from_toml(
            "[server]\nlisten = \"nowhere\"\nclient_request_burst = 0\n[exchanges.binance]\nws_url = \"http://x\"\n",
            env(&[]),
        )
        .unwrap_err();
        let text = err.problems.join("\n");
        assert!(text.contains("server.listen: 'nowhere'"), "{text}");
        assert!(
            text.contains("server.client_request_burst: must be greater than 0"),
            "{text}"
        );
        assert!(
            text.contains("exchanges.binance.ws_url: scheme 'http'"),
            "{text}"
        );
    }
}
