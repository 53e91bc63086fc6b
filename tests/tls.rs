//! `wss://` and `https://` to the exchanges, end to end: a TLS endpoint made in the test (its
//! own CA, from rcgen) in front of the simulated exchange. Trusted through `exchanges.ca_file`
//! the relay serves data; without it the relay fails closed and `/health` names the host and
//! the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// A CA, and a TLS endpoint for `localhost` signed by it that forwards to `backend`.
struct TlsFront {
    addr: std::net::SocketAddr,
    ca_pem: String,
}

async fn tls_front(backend: std::net::SocketAddr) -> TlsFront {
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

fn sim_addr(sim: &exchange_relay::sim::SimBinance) -> std::net::SocketAddr {
    url::Url::parse(&sim.rest_url())
        .unwrap()
        .socket_addrs(|| None)
        .unwrap()[0]
}

#[tokio::test]
async fn wss_and_https_through_a_trusted_ca_serve_data() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let dir = std::env::temp_dir().join(format!("relay-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &front.ca_pem).unwrap();
    let mut cfg = config_for(&sim);
    let port = front.addr.port();
    cfg.exchanges.get_mut(ExchangeId::Binance).ws_url = format!("wss://localhost:{port}");
    cfg.exchanges.get_mut(ExchangeId::Binance).rest_url = format!("https://localhost:{port}");
    cfg.exchanges.ca_file = Some(ca_file);
    // Ready means the instrument list came over https://.
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    assert!(
        sim.connections() >= 1,
        "the data came over wss:// from the simulator"
    );
    let b = until_upstream_state(&relay, "binance", "connected").await;
    assert!(b.get("lastError").is_none(), "{b}");
}

#[tokio::test]
async fn without_the_ca_the_relay_fails_closed_and_says_which_host_and_why() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let mut cfg = config_for(&sim);
    let port = front.addr.port();
    // REST stays on the plain simulator so that subscriptions are accepted; the WebSocket
    // goes through the TLS endpoint whose CA the relay does not know.
    cfg.exchanges.get_mut(ExchangeId::Binance).ws_url = format!("wss://localhost:{port}");
    let relay = start_relay(cfg).await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    let error = b["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!("localhost:{port}")),
        "names the host: {error}"
    );
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "says why: {error}"
    );
    assert_eq!(sim.connections(), 0, "nothing got through");
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_relay_with_a_clear_error() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.exchanges.ca_file = Some("/nonexistent/ca.pem".into());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = exchange_relay::run(cfg, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("exchanges.ca_file: cannot read /nonexistent/ca.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn an_https_refusal_names_the_url_and_the_reason_in_health() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let mut cfg = config_for(&sim);
    let port = front.addr.port();
    cfg.exchanges.get_mut(ExchangeId::Binance).rest_url = format!("https://localhost:{port}");
    let relay = start_relay_unready(cfg).await;
    let b = until_upstream_state(&relay, "binance", "unreachable").await;
    let error = b["lastError"].as_str().unwrap();
    assert!(error.contains(&format!("localhost:{port}")), "{error}");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}
