//! Upstream traffic through an HTTP proxy, as the environment says (`HTTPS_PROXY` for
//! `wss://`, `HTTP_PROXY` for `ws://`, `ALL_PROXY` for both, `NO_PROXY` for exceptions; the
//! lower-case names too). reqwest applies the same variables to the REST calls itself; this
//! opens the WebSocket connections through an HTTP `CONNECT` tunnel.

use std::io;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

/// The proxy settings of the environment, read once at start.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    https: Option<Url>,
    http: Option<Url>,
    all: Option<Url>,
    /// Host suffixes (or `*`) that go direct.
    no_proxy: Vec<String>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name.to_ascii_lowercase())
        .ok()
        .or_else(|| std::env::var(name).ok())
        .filter(|v| !v.trim().is_empty())
}

/// A proxy URL; a bare `host:port` means `http://host:port`.
fn proxy_url(v: &str) -> Option<Url> {
    let v = v.trim();
    let with_scheme = if v.contains("://") {
        v.to_string()
    } else {
        format!("http://{v}")
    };
    Url::parse(&with_scheme)
        .ok()
        .filter(|u| u.host_str().is_some())
}

impl ProxyEnv {
    pub fn from_env() -> ProxyEnv {
        ProxyEnv {
            https: var("HTTPS_PROXY").as_deref().and_then(proxy_url),
            http: var("HTTP_PROXY").as_deref().and_then(proxy_url),
            all: var("ALL_PROXY").as_deref().and_then(proxy_url),
            no_proxy: var("NO_PROXY")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().trim_start_matches('.').to_ascii_lowercase())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The proxy a connection to `url` goes through, if any.
    pub fn for_url(&self, url: &Url) -> Option<&Url> {
        let host = url.host_str()?.to_ascii_lowercase();
        let excepted = self
            .no_proxy
            .iter()
            .any(|n| n == "*" || host == *n || host.ends_with(&format!(".{n}")));
        if excepted {
            return None;
        }
        let own = match url.scheme() {
            "wss" | "https" => self.https.as_ref(),
            _ => self.http.as_ref(),
        };
        own.or(self.all.as_ref())
    }
}

/// Opens a TCP tunnel to `host:port` through the HTTP proxy `proxy` (`CONNECT`), with its
/// credentials when the URL has them.
pub async fn tunnel(proxy: &Url, host: &str, port: u16) -> io::Result<TcpStream> {
    let proxy_host = proxy
        .host_str()
        .ok_or_else(|| io::Error::other("the proxy URL has no host"))?;
    let proxy_port = proxy.port_or_known_default().unwrap_or(8080);
    let mut stream = TcpStream::connect((proxy_host, proxy_port)).await?;
    let mut request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if !proxy.username().is_empty() {
        let credentials = format!("{}:{}", proxy.username(), proxy.password().unwrap_or(""));
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The proxy's answer, up to the blank line; nothing of the tunnel follows before we speak.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || stream.read(&mut byte).await? == 0 {
            return Err(io::Error::other(format!(
                "proxy {proxy_host}:{proxy_port} closed or overflowed the CONNECT answer"
            )));
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(io::Error::other(format!(
            "proxy {proxy_host}:{proxy_port} refused CONNECT {host}:{port}: {status_line}"
        )));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_chooses_the_proxy_by_scheme_and_no_proxy_excepts() {
        let env = ProxyEnv {
            https: proxy_url("proxy.corp:3128"),
            http: None,
            all: proxy_url("socks.corp:1080"),
            no_proxy: vec!["internal.corp".into(), "localhost".into()],
        };
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            env.for_url(&url("wss://stream.binance.com:9443/stream"))
                .map(Url::as_str),
            Some("http://proxy.corp:3128/")
        );
        assert_eq!(
            env.for_url(&url("ws://ws.kraken.com/v2")).map(Url::as_str),
            Some("http://socks.corp:1080/"),
            "ws:// falls back to ALL_PROXY"
        );
        assert!(env.for_url(&url("wss://feed.internal.corp/x")).is_none());
        assert!(env.for_url(&url("wss://localhost:9/x")).is_none());
    }
}
