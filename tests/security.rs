//! Production security (README § Security): keys from a JWKS (rotation, removal, outage, `kid`
//! floods, algorithm confusion), several static secrets and publish keys reloaded on SIGHUP,
//! TLS on the listener (and its certificate reloaded), and the per-user connection cap. Every
//! key and certificate is made in the test; the JWKS is served by a real HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::*;
use exchange_relay::config::Config;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// A JWKS endpoint and keys made here.

/// A JWKS document served over HTTP, replaceable, with its requests counted.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: &[&Key]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        JwksServer::on(listener, keys)
    }

    fn on(listener: TcpListener, keys: &[&Key]) -> JwksServer {
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(document(keys)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (d, h) = (d.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    axum::Json(d.lock().unwrap().clone())
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksServer { addr, doc, hits }
    }

    fn url(&self) -> String {
        jwks_url(self.addr)
    }

    fn publish(&self, keys: &[&Key]) {
        *self.doc.lock().unwrap() = document(keys);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn jwks_url(addr: SocketAddr) -> String {
    format!("http://{addr}/.well-known/jwks.json")
}

fn document(keys: &[&Key]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// A signing key: its private half for the test to sign with, its public JWK for the relay.
struct Key {
    kid: String,
    alg: Algorithm,
    signing: EncodingKey,
    jwk: Value,
}

impl Key {
    fn es256(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let jwk = Jwk::from_encoding_key(&signing, Algorithm::ES256).unwrap();
        Key::with(
            kid,
            Algorithm::ES256,
            signing,
            serde_json::to_value(jwk).unwrap(),
        )
    }

    fn eddsa(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signing = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        Key::with(
            kid,
            Algorithm::EdDSA,
            signing,
            json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
        )
    }

    /// RS256 from the repository's test key (ring, which rcgen uses, cannot make RSA keys).
    fn rs256(kid: &str) -> Key {
        let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
        let signing = EncodingKey::from_rsa_pem(&pem).unwrap();
        let jwk = Jwk::from_encoding_key(&signing, Algorithm::RS256).unwrap();
        Key::with(
            kid,
            Algorithm::RS256,
            signing,
            serde_json::to_value(jwk).unwrap(),
        )
    }

    fn with(kid: &str, alg: Algorithm, signing: EncodingKey, mut jwk: Value) -> Key {
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Key {
            kid: kid.to_string(),
            alg,
            signing,
            jwk,
        }
    }

    fn token(&self, sub: &str) -> String {
        self.token_as(sub, &self.kid)
    }

    /// A token signed by this key that names `kid`.
    fn token_as(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.to_string());
        let claims = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 300});
        jsonwebtoken::encode(&header, &claims, &self.signing).unwrap()
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/auth")
        .join(name)
}

fn jwks_config(sim: &exchange_relay::sim::SimBinance, url: &str) -> Config {
    let mut c = config_for(sim);
    c.auth.jwks_url = Some(url.to_string());
    c.auth.jwks_refresh_secs = 3600;
    c.auth.jwks_min_fetch_interval_ms = 200;
    c
}

async fn jwks_health(relay: &Relay) -> Value {
    health(relay).await["jwks"].clone()
}

// ---------------------------------------------------------------------------------------------
// JWKS

#[tokio::test]
async fn jwks_keys_of_each_type_verify_their_own_algorithm_only() {
    let (es, ed, rs) = (Key::es256("ec-1"), Key::eddsa("ed-1"), Key::rs256("rsa-1"));
    let jwks = JwksServer::start(&[&es, &ed, &rs]).await;
    let sim = start_sim().await;
    let relay = start_relay(jwks_config(&sim, &jwks.url())).await;

    for (key, user) in [(&es, "alice"), (&ed, "bob"), (&rs, "carol")] {
        let hello = hello_for(&relay, &key.token(user)).await.unwrap();
        assert_eq!(hello["data"]["userId"], user, "{:?}", key.alg);
    }
    let h = jwks_health(&relay).await;
    assert_eq!(
        (h["state"].as_str(), h["keys"].as_u64()),
        (Some("loaded"), Some(3)),
        "{h}"
    );

    // HS256 "signed" with the RSA key's public PEM, naming the RSA key: the classic confusion.
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &json!({"sub": "mallory", "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let (code, message) = hello_for(&relay, &confused).await.unwrap_err();
    assert_eq!(code, "INVALID_TOKEN");
    assert!(message.contains("HS256 is not accepted"), "{message}");
    // An ES256 token naming the RSA key, and the EC key signing as if it were the Ed25519 one.
    let (code, message) = hello_for(&relay, &es.token_as("mallory", "rsa-1"))
        .await
        .unwrap_err();
    assert_eq!(code, "INVALID_TOKEN");
    assert!(message.contains("ES256 is not accepted"), "{message}");
    assert!(hello_for(&relay, &es.token_as("mallory", "ed-1"))
        .await
        .is_err());
    // alg:none, naming a real key.
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": "rsa-1", "typ": "JWT"})),
        b64(json!({"sub": "mallory", "exp": 4102444800i64}))
    );
    assert_eq!(
        hello_for(&relay, &none).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
    // A token without a kid cannot name a key.
    let mut bare = Header::new(Algorithm::ES256);
    bare.kid = None;
    let no_kid = jsonwebtoken::encode(
        &bare,
        &json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 300}),
        &es.signing,
    )
    .unwrap();
    let (_, message) = hello_for(&relay, &no_kid).await.unwrap_err();
    assert!(message.contains("no 'kid'"), "{message}");
    let refusals = &relay.stats().await["authRefusals"];
    assert!(
        refusals["invalid_token"].as_u64().unwrap() >= 5,
        "{refusals}"
    );
}

#[tokio::test]
async fn an_unknown_kid_fetches_the_rotated_document_and_a_removed_key_stops_verifying() {
    let (old, new) = (Key::es256("2026-11"), Key::eddsa("2026-12"));
    let jwks = JwksServer::start(&[&old]).await;
    let sim = start_sim().await;
    let mut cfg = jwks_config(&sim, &jwks.url());
    cfg.auth.jwks_refresh_secs = 1;
    let relay = start_relay(cfg).await;
    let mut holder = Client::connect_url(
        &format!("{}?token={}", relay.ws_url(), old.token("alice")),
        None,
    )
    .await;
    assert_eq!(holder.hello.as_ref().unwrap()["data"]["userId"], "alice");

    // The identity service rotates: the new key is published; the relay has not fetched it.
    jwks.publish(&[&old, &new]);
    let before = jwks.hits();
    let hello = hello_for(&relay, &new.token("bob")).await.unwrap();
    assert_eq!(hello["data"]["userId"], "bob");
    assert!(jwks.hits() > before, "the unknown kid fetched the document");
    let metrics = relay.metrics().await;
    for line in [
        "relay_jwks_keys 2",
        "relay_jwks_loaded 1",
        "relay_jwks_fetches_total{outcome=\"failed\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing");
    }

    // The old key is withdrawn: after the next refresh its tokens are refused.
    jwks.publish(&[&new]);
    until("the refresh drops the old key", || async {
        (jwks_health(&relay).await["keys"].as_u64() == Some(1)).then_some(())
    })
    .await;
    let (code, message) = hello_for(&relay, &old.token("alice")).await.unwrap_err();
    assert_eq!(code, "INVALID_TOKEN");
    assert!(message.contains("does not hold"), "{message}");
    // A connection that proved itself with the old key is not dropped.
    holder.send(json!({"type": "ping", "id": 1})).await;
    assert_eq!(holder.recv_until(is_type("pong")).await["id"], 1);
    assert!(hello_for(&relay, &new.token("bob")).await.is_ok());
}

#[tokio::test]
async fn with_the_jwks_down_public_channels_work_and_private_ones_say_the_keys_are_unavailable() {
    let key = Key::es256("k1");
    let jwks_addr = dead_addr().await;
    let sim = start_sim().await;
    let relay = start_relay(jwks_config(&sim, &jwks_url(jwks_addr))).await;
    assert_eq!(jwks_health(&relay).await["state"], "unavailable");

    // A token at connect cannot be checked: said, and the connection stays for public data.
    let url = format!("{}?token={}", relay.ws_url(), key.token("alice"));
    let mut c = Client::open(&url, None, None).await.unwrap();
    let first = c.recv().await;
    assert_eq!(error_code(&first), "INVALID_TOKEN", "{first}");
    let message = first["data"]["message"].as_str().unwrap();
    assert!(
        message.contains("signing keys are unavailable"),
        "{message}"
    );
    let hello = c.recv().await;
    assert_eq!(hello["type"], "connected");
    assert_eq!(hello["data"]["authenticated"], false);
    c.subscribe(&["price:BTCUSDT", "orders:alice"]).await;
    let e = c.recv_until(is_type("error")).await;
    assert_eq!(
        (error_code(&e), e["channel"].as_str()),
        ("AUTH_REQUIRED", Some("orders:alice"))
    );
    let message = e["data"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Authentication required for this channel")
            && message.contains("unavailable"),
        "{message}"
    );
    c.recv_until(is_msg("price", "price:BTCUSDT")).await;

    // The identity service comes back: the next `auth` is checked against its keys.
    let listener = TcpListener::bind(jwks_addr).await.unwrap();
    let _jwks = JwksServer::on(listener, &[&key]);
    let deadline = tokio::time::Instant::now() + WAIT;
    let authenticated = loop {
        c.send(json!({"type": "auth", "token": key.token("alice")}))
            .await;
        let reply = c
            .recv_until(|v| v["type"] == "authenticated" || v["type"] == "error")
            .await;
        if reply["type"] == "authenticated" {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the JWKS was never fetched once it was back: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(authenticated["data"]["userId"], "alice");
    c.subscribe(&["orders:alice"]).await;
    c.recv_until(is_msg("subscribed", "orders:alice")).await;
    let refusals = &relay.stats().await["authRefusals"];
    assert!(
        refusals["keys_unavailable"].as_u64().unwrap() >= 2,
        "{refusals}"
    );
}

#[tokio::test]
async fn a_flood_of_made_up_kids_costs_the_identity_service_one_fetch_per_interval() {
    let key = Key::es256("real");
    let jwks = JwksServer::start(&[&key]).await;
    let sim = start_sim().await;
    let mut cfg = jwks_config(&sim, &jwks.url());
    cfg.auth.jwks_min_fetch_interval_ms = 1_000;
    cfg.server.client_requests_per_second = 10_000;
    cfg.server.client_request_burst = 10_000;
    cfg.server.client_error_budget = 10_000;
    let relay = start_relay(cfg).await;
    until("the first fetch", || async {
        (jwks_health(&relay).await["state"] == "loaded").then_some(())
    })
    .await;
    let at_start = jwks.hits();
    let started = std::time::Instant::now();
    let mut c = Client::connect(&relay).await;
    const FLOOD: usize = 400;
    for i in 0..FLOOD {
        let token = key.token_as("mallory", &format!("bogus-{i}"));
        c.send(json!({"type": "auth", "token": token, "id": i}))
            .await;
    }
    for _ in 0..FLOOD {
        let e = c.recv_until(is_type("error")).await;
        assert_eq!(error_code(&e), "INVALID_TOKEN", "{e}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let fetched = jwks.hits() - at_start;
    // One on-demand fetch per started second, at most.
    assert!(
        (fetched as f64) <= seconds.ceil() + 1.0,
        "{fetched} fetches for {FLOOD} unknown kids in {seconds:.2} s"
    );
    assert!(hello_for(&relay, &key.token("alice")).await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// Static keys, rotated with SIGHUP

#[tokio::test]
async fn sighup_rotates_secrets_and_publish_keys_without_dropping_a_connection() {
    let dir = std::env::temp_dir().join(format!("relay-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    let port = free_port();
    let write = |auth: &str| {
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[auth]\n{auth}\n"),
        )
        .unwrap()
    };
    write("jwt_secret = \"old-secret\"\npublish_api_key = \"old-key\"");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_exchange-relay"))
        .args(["--demo", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let _guard = Kill(std::mem::replace(
        &mut child,
        std::process::Command::new("true").spawn().unwrap(),
    ));
    let base = format!("127.0.0.1:{port}");
    until("the relay serves", || async {
        reqwest::get(format!("http://{base}/health")).await.ok()
    })
    .await;
    let tok = |secret: &str, sub: &str| {
        token_with(
            secret,
            json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 300}),
        )
    };
    let ws = format!("ws://{base}/ws");
    let publish = |key: &'static str| {
        let url = format!("http://{base}/api/v1/publish");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"channel": "orders:alice", "data": {"n": 1}}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let mut alice =
        Client::connect_url(&format!("{ws}?token={}", tok("old-secret", "alice")), None).await;
    alice.subscribe(&["orders:alice"]).await;
    alice.recv_until(is_msg("subscribed", "orders:alice")).await;

    // Rotation, step 1: the new secret first, the old one still accepted; two publish keys.
    write("jwt_secrets = [\"new-secret\", \"old-secret\"]\npublish_api_keys = [\"new-key\", \"old-key\"]");
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    until("the new secret is accepted", || {
        let url = format!("{ws}?token={}", tok("new-secret", "bob"));
        async move {
            let mut c = Client::open(&url, None, None).await.unwrap();
            (c.recv().await["type"] == "connected").then_some(())
        }
    })
    .await;
    let old_still =
        Client::connect_url(&format!("{ws}?token={}", tok("old-secret", "carol")), None).await;
    assert_eq!(old_still.hello.unwrap()["data"]["userId"], "carol");
    assert_eq!(publish("new-key").await, 200);
    assert_eq!(publish("old-key").await, 200);
    // Alice, connected before the reload, got both messages on her private channel.
    alice.recv_until(is_type("orders")).await;
    alice.recv_until(is_type("orders")).await;

    // Step 2: the old secret and key are retired.
    write("jwt_secrets = [\"new-secret\"]\npublish_api_keys = [\"new-key\"]");
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    until("the old secret is refused", || {
        let url = format!("{ws}?token={}", tok("old-secret", "dave"));
        async move {
            let mut c = Client::open(&url, None, None).await.unwrap();
            (error_code(&c.recv().await) == "INVALID_TOKEN").then_some(())
        }
    })
    .await;
    assert_eq!(publish("old-key").await, 401);
    // A configuration that does not load changes nothing.
    std::fs::write(&path, "[auth]\njwt_secrets = 7\n").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(publish("new-key").await, 200);
    // Alice is still connected and still gets her messages.
    alice.recv_until(is_type("orders")).await;
    alice
        .send(json!({"type": "ping", "id": "still-here"}))
        .await;
    assert_eq!(alice.recv_until(is_type("pong")).await["id"], "still-here");
}

// ---------------------------------------------------------------------------------------------
// TLS on the listener

struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let pem = issuer.pem();
        TestCa { issuer, pem }
    }

    /// A certificate for localhost and 127.0.0.1, written as `<name>.crt` / `<name>.key`.
    fn leaf(&self, dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem() + &self.pem).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    async fn wss(&self, addr: SocketAddr) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let url = format!("wss://localhost:{}/ws", addr.port());
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            None,
            false,
            Some(tokio_tungstenite::Connector::Rustls(self.client())),
        )
        .await?;
        Ok(Client { ws, hello: None })
    }

    fn https(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}

use tokio_rustls::rustls;

/// A relay on `cfg` whose listener serves TLS, and the sender of its reloads.
struct TlsRelay {
    addr: SocketAddr,
    reload: tokio::sync::mpsc::Sender<Config>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    async fn start(cfg: Config, ca: &TestCa) -> TlsRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            exchange_relay::run_reloadable(
                cfg,
                listener,
                async {
                    let _ = stopped.await;
                },
                reloads,
            )
            .await
            .unwrap()
        });
        let relay = TlsRelay {
            addr,
            reload,
            stop: Some(stop),
            handle,
        };
        let ready = relay.url("/ready");
        until("https /ready", || {
            let (http, url) = (ca.https(), ready.clone());
            async move {
                let r = http.get(url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        relay
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    async fn get(&self, ca: &TestCa, path: &str) -> Value {
        ca.https()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.handle)
            .await
            .unwrap()
            .unwrap();
    }
}

fn tls_config(sim: &exchange_relay::sim::SimBinance, ca: &TestCa, name: &str) -> Config {
    let dir = std::env::temp_dir().join(format!("relay-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = ca.leaf(&dir, "first");
    let mut cfg = config_for(sim);
    cfg.server.tls_cert_file = Some(cert);
    cfg.server.tls_key_file = Some(key);
    cfg
}

#[tokio::test]
async fn a_tls_client_that_stops_reading_is_closed_with_1013_and_others_keep_up() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = TestCa::new();
    let mut opts = exchange_relay::sim::SimOptions::fast();
    opts.rate_scale = 20.0;
    let sim = start_sim_with(opts).await;
    let mut cfg = tls_config(&sim, &ca, "slow");
    cfg.server.client_queue_capacity = 64;
    cfg.server.client_send_buffer_bytes = 16 * 1024;
    let relay = TlsRelay::start(cfg, &ca).await;
    let channels = [
        "trades:BTCUSDT",
        "trades:ETHUSDT",
        "trades:SOLUSDT",
        "trades:XRPUSDT",
    ];

    let mut fast = ca.wss(relay.addr).await.unwrap();
    fast.subscribe(&channels).await;
    let reader = read_trades_in_order(fast, 3_000);
    // A TLS client with a tiny receive window that subscribes and stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(relay.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
        format!("wss://localhost:{}/ws", relay.addr.port()),
        tcp,
        None,
        Some(tokio_tungstenite::Connector::Rustls(ca.client())),
    )
    .await
    .unwrap();
    let mut slow = Client { ws, hello: None };
    slow.subscribe(&channels).await;
    until("the slow TLS client is closed", || async {
        let s = relay.get(&ca, "/api/v1/ws/stats").await;
        (s["data"]["slowConsumerDisconnects"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (code, _, before) = slow.recv_close().await;
    assert_eq!(code, 1013);
    assert_eq!(error_code(before.last().unwrap()), "SLOW_CONSUMER");
    assert_eq!(
        reader.await.unwrap(),
        3_000,
        "the fast client got everything, in order"
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_listener_serves_wss_and_https_and_reloads_its_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca1, ca2) = (TestCa::new(), TestCa::new());
    let sim = start_sim().await;
    let mut cfg = tls_config(&sim, &ca1, "listener");
    let relay = TlsRelay::start(cfg.clone(), &ca1).await;
    let addr = relay.addr;
    assert_eq!(relay.get(&ca1, "/health").await["status"], "ok");

    // wss:// end to end: market data over the relay's own TLS.
    let mut c = ca1.wss(addr).await.unwrap();
    assert_eq!(c.recv().await["type"], "connected");
    c.subscribe(&["price:BTCUSDT"]).await;
    c.recv_until(is_msg("price", "price:BTCUSDT")).await;
    // Without the CA the client refuses the certificate; plain ws:// gets nowhere either.
    assert!(ca2.wss(addr).await.is_err());
    assert!(Client::open(&format!("ws://{addr}/ws"), None, None)
        .await
        .is_err());

    // A new certificate, from another CA, is put in place: new connections get it.
    let dir = cfg
        .server
        .tls_cert_file
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let (cert2, key2) = ca2.leaf(&dir, "second");
    cfg.server.tls_cert_file = Some(cert2);
    cfg.server.tls_key_file = Some(key2);
    relay.reload.send(cfg).await.unwrap();
    let mut c2 = until("the new certificate is served", || async {
        ca2.wss(addr).await.ok()
    })
    .await;
    assert_eq!(c2.recv().await["type"], "connected");
    assert!(ca1.wss(addr).await.is_err(), "the old certificate is gone");
    // The connection made with the old certificate still flows.
    c.recv_until(is_msg("price", "price:BTCUSDT")).await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Per-user connections

#[tokio::test]
async fn a_user_beyond_max_connections_per_user_gets_an_error_and_1008() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.server.max_connections_per_user = Some(2);
    let relay = start_relay(cfg).await;
    let with = |sub: &str| format!("{}?token={}", relay.ws_url(), token(sub, 300));
    let first = Client::connect_url(&with("alice"), None).await;
    let _second = Client::connect_url(&with("alice"), None).await;

    let mut third = Client::open(&with("alice"), None, None).await.unwrap();
    let (code, _, before) = third.recv_close().await;
    assert_eq!(code, 1008);
    let e = before.last().unwrap();
    assert_eq!(error_code(e), "TOO_MANY_CONNECTIONS", "{e}");
    assert!(
        e["data"]["message"].as_str().unwrap().contains("alice"),
        "{e}"
    );
    // Another user is not affected.
    let _bob = Client::connect_url(&with("bob"), None).await;
    // Becoming alice by `auth` on an open connection counts too.
    let mut anon = Client::connect(&relay).await;
    anon.send(json!({"type": "auth", "token": token("alice", 300), "id": 9}))
        .await;
    let (code, _, before) = anon.recv_close().await;
    assert_eq!(code, 1008);
    assert_eq!(before.last().unwrap()["id"], 9);
    // Refreshing a token on one of alice's own connections is not a new connection.
    let mut first = first;
    first
        .send(json!({"type": "auth", "token": token("alice", 600), "id": 1}))
        .await;
    assert_eq!(first.recv_until(is_type("authenticated")).await["id"], 1);
    // One of hers closes: a new one fits again.
    drop(first);
    until("alice's place is free again", || {
        let url = with("alice");
        async move {
            let mut c = Client::open(&url, None, None).await.unwrap();
            (c.recv().await["type"] == "connected").then_some(())
        }
    })
    .await;
    let refusals = &relay.stats().await["authRefusals"];
    assert_eq!(refusals["user_limit"], 2, "{refusals}");
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("relay_auth_refusals_total{reason=\"user_limit\"} 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("auth_refusals"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
