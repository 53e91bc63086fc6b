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
    // Type errors and value checks in one run, each on its own line.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("server.") || l.trim_start().starts_with("exchanges.")
        })
        .collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        err.contains("server.max_connections: invalid type"),
        "{err}"
    );
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

#[test]
fn a_busy_port_fails_at_once_in_one_line_before_the_demo_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
        .args(["--demo", "--listen", &addr])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(
        !stdout.contains("simulated"),
        "the simulators started before the port was checked: {stdout}"
    );
}

#[test]
fn logs_to_a_pipe_have_no_colour_and_listen_takes_a_host_name() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
        .args(["--demo", "--listen", "localhost:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.contains("exchange-relay listening");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("exchange-relay listening"), "{text}");
    assert!(
        text.contains("addr=127.0.0.1:") || text.contains("addr=[::1]:"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in piped logs: {text:?}"
    );
}

#[test]
fn the_docker_build_context_leaves_out_build_output_and_keeps_what_the_dockerfile_copies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(patterns.contains(&"target/"), "{patterns:?}");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                !patterns.iter().any(|p| p.trim_end_matches('/') == source),
                ".dockerignore leaves out {source}, which the Dockerfile copies"
            );
            assert!(root.join(source).exists(), "{source} is copied but missing");
        }
    }
}

#[test]
fn check_config_says_ok_or_lists_every_problem_and_the_key_files() {
    let dir = std::env::temp_dir().join(format!("relay-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |config: &str| {
        let path = dir.join("c.toml");
        std::fs::write(&path, config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let (ok, out) = run(&shipped);
    assert!(ok, "{out}");
    assert!(out.trim_end().ends_with(": ok"), "{out}");

    let (ok, out) = run("[server]\nmax_connections = \"lots\"\nlisten = \"nowhere\"\n");
    assert!(!ok);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("server.max_connections: invalid type"),
        "{out}"
    );
    assert!(out.contains("server.listen: 'nowhere'"), "{out}");

    // The key files it names are read and parsed too.
    let (ok, out) = run("[auth]\njwt_public_key_file = \"/nonexistent/key.pem\"\n");
    assert!(!ok);
    assert!(
        out.contains("auth.jwt_public_key_file: cannot read /nonexistent/key.pem"),
        "{out}"
    );
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let (ok, out) = run(&format!(
        "[auth]\njwt_public_key_file = \"{}\"\n",
        not_a_key.display()
    ));
    assert!(!ok);
    assert!(
        out.contains("is not an RSA, EC or Ed25519 public key"),
        "{out}"
    );

    // The listener's certificate and key, and the rotation keys.
    let (ok, out) = run(&format!(
        "[server]\ntls_cert_file = \"{0}\"\ntls_key_file = \"/nonexistent/key.pem\"\n",
        not_a_key.display()
    ));
    assert!(!ok);
    assert!(
        out.contains("server.tls_cert_file:") && out.contains("holds no certificate"),
        "{out}"
    );
    let (ok, out) = run("[server]\ntls_cert_file = \"cert.pem\"\n");
    assert!(!ok);
    assert!(
        out.contains("set together with server.tls_key_file"),
        "{out}"
    );
    let (ok, out) = run("[auth]\njwt_secrets = [\"new\", \"\"]\npublish_api_keys = [\"\"]\njwks_url = \"ftp://x\"\n");
    assert!(!ok);
    assert!(out.contains("auth.jwks_url: scheme 'ftp'"), "{out}");
    assert!(
        out.contains("auth.publish_api_key: must not be empty"),
        "{out}"
    );
    let (ok, out) = run("[auth]\njwt_secrets = [\"new\", \"\"]\n");
    assert!(!ok);
    assert!(out.contains("auth.jwt_secret: must not be empty"), "{out}");
}
