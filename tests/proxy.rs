//! Upstream WebSocket and REST traffic through the HTTP proxy the environment names
//! (`HTTPS_PROXY`): a small CONNECT proxy made in the test sees both tunnels. Its own test
//! binary: it sets the process's environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP CONNECT proxy on loopback that records every target it tunnels to.
async fn connect_proxy() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let line = text.lines().next().unwrap_or_default().to_string();
                let mut parts = line.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                log.lock().unwrap().push(target.to_string());
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn websocket_and_rest_go_through_the_https_proxy() {
    let sim = start_sim().await;
    let front = tls_front(sim_addr(&sim)).await;
    let (proxy, seen) = connect_proxy().await;
    // Before the relay starts: it reads the environment once.
    std::env::set_var("HTTPS_PROXY", format!("http://{proxy}"));
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let cfg = config_through_tls(&sim, &front, "proxy");
    let port = front.addr.port();
    let relay = start_relay(cfg).await;
    let want = format!("localhost:{port}");
    let tunnels = || seen.lock().unwrap().iter().filter(|t| **t == want).count();
    // Ready: the instrument list came over https:// through one tunnel; no WebSocket yet.
    assert_eq!(tunnels(), 1, "REST: {:?}", seen.lock().unwrap());
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["trades:BTCUSDT"]).await;
    c.recv_until(is_type("trade")).await;
    // The trade came over wss:// through a second tunnel.
    assert_eq!(tunnels(), 2, "WebSocket: {:?}", seen.lock().unwrap());
}
