//! The binary itself: a bad configuration stops it at start with one line per bad key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Starts the relay on `config` written to `path` (and a bad value from the environment),
/// checks it refuses to start, and returns what it said.
fn start_failing(path: &std::path::Path, config: &str) -> String {
    std::fs::write(path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
        .arg("--config")
        .arg(path)
        .env("RELAY_SERVER__CLIENT_REQUEST_BURST", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_fails_fast_with_a_line_per_key() {
    let dir = std::env::temp_dir().join(format!("relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let err = start_failing(
        &path,
        "[server]\nmax_connections = \"lots\"\nlisten = \"nowhere\"\n[exchanges.binance]\nws_url = \"ftp://x\"\n",
    );
    assert!(
        err.contains("server.max_connections: invalid type"),
        "{err}"
    );
    // Type errors are reported first; fixing them reveals the value checks, each on its line.
    let err = start_failing(
        &path,
        "[server]\nlisten = \"nowhere\"\n[exchanges.binance]\nws_url = \"ftp://x\"\n",
    );
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("server.") || l.trim_start().starts_with("exchanges.")
        })
        .collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(err.contains("server.listen: 'nowhere'"), "{err}");
    assert!(
        err.contains("server.client_request_burst: must be greater than 0"),
        "{err}"
    );
    assert!(
        err.contains("exchanges.binance.ws_url: scheme 'ftp'"),
        "{err}"
    );
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
        .args(["--config", "/nonexistent/relay.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/relay.toml"));
}
