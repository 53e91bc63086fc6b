//! The accept loop: HTTP/1.1 with a header-read timeout (slowloris), upgrades for `/ws`, and a
//! graceful stop that lets in-flight requests finish. With `server.tls_cert_file` the same, over
//! TLS ([`TlsServer`]): the handshake must complete within the header-read timeout too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Socket settings applied to every accepted connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    pub header_read_timeout: Duration,
    /// SO_SNDBUF; see `server.client_send_buffer_bytes`.
    pub send_buffer_bytes: usize,
}

/// The listener's certificate and key (`server.tls_cert_file`, `server.tls_key_file`), which
/// SIGHUP replaces: connections already open keep the one they were made with.
pub struct TlsServer {
    current: RwLock<Arc<rustls::ServerConfig>>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl TlsServer {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsServer, String> {
        Ok(TlsServer {
            current: RwLock::new(Arc::new(server_config(cert_file, key_file)?)),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
        })
    }

    /// Reads the files again (the same paths, or new ones); on error the old certificate stays.
    pub fn reload(&self, cert_file: &Path, key_file: &Path) -> Result<(), String> {
        let next = Arc::new(server_config(cert_file, key_file)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    pub fn files(&self) -> (&Path, &Path) {
        (&self.cert_file, &self.key_file)
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

/// A rustls server configuration from PEM files: HTTP/1.1 only (ALPN), TLS 1.2 and 1.3.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| {
            format!(
                "server.tls_cert_file: cannot read {}: {e}",
                cert_file.display()
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "server.tls_cert_file: {} is not PEM certificates: {e}",
                cert_file.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert_file: {} holds no certificate",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        format!(
            "server.tls_key_file: {} holds no usable private key (PEM, PKCS#8, RSA or EC): {e}",
            key_file.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        format!(
            "server.tls_key_file: {} does not go with the certificate of {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ConnOptions,
    tls: Option<Arc<TlsServer>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Err(error) =
            socket2::SockRef::from(&stream).set_send_buffer_size(options.send_buffer_bytes)
        {
            tracing::debug!(%error, "could not set the send buffer size");
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        let timeout = options.header_read_timeout;
        match &tls {
            None => tracker
                .spawn(async move { serve_connection(stream, peer, app, timeout, shutdown).await }),
            Some(tls) => {
                let acceptor = tls.acceptor();
                tracker.spawn(async move {
                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    serve_connection(stream, peer, app, timeout, shutdown).await
                })
            }
        };
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.oneshot(req).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
