//! Whom the relay trusts for the exchanges' `wss://` and `https://`: the public web roots,
//! plus the CA certificates of `exchanges.ca_file` and `SSL_CERT_FILE`, for networks whose
//! gateway inspects TLS with its own CA. One trust for the WebSocket connections and the REST
//! client alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The trust both clients use.
pub struct Trust {
    /// For the WebSocket connections.
    pub websocket: Arc<rustls::ClientConfig>,
    /// The extra CA certificates, PEM, for the REST client.
    pub extra_pem: Vec<Vec<u8>>,
}

impl Trust {
    /// The public roots plus `ca_file` and `SSL_CERT_FILE` (`ssl_cert_file`), each of which
    /// must be readable and hold at least one certificate.
    pub fn load(ca_file: Option<&Path>, ssl_cert_file: Option<PathBuf>) -> Result<Trust, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let mut extra_pem = Vec::new();
        let files = ca_file
            .map(|p| ("exchanges.ca_file", p.to_path_buf()))
            .into_iter()
            .chain(ssl_cert_file.map(|p| ("SSL_CERT_FILE", p)));
        for (what, path) in files {
            let pem = std::fs::read(&path)
                .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{what}: {} is not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{what}: {} holds no certificate", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{what}: {}: {e}", path.display()))?;
            }
            extra_pem.push(pem);
        }
        let websocket = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Trust {
            websocket: Arc::new(websocket),
            extra_pem,
        })
    }

    /// Adds the extra CAs to a REST client.
    pub fn apply(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for pem in &self.extra_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).unwrap_or_default() {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
    }
}

/// `SSL_CERT_FILE`, when set.
pub fn ssl_cert_file() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    }

    #[test]
    fn ssl_cert_file_and_ca_file_add_to_the_public_roots() {
        let dir = std::env::temp_dir().join(format!("relay-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.pem"), dir.join("b.pem"));
        std::fs::write(&a, ca_pem()).unwrap();
        std::fs::write(&b, ca_pem() + &ca_pem()).unwrap();
        let trust = Trust::load(Some(&a), Some(b.clone())).unwrap();
        assert_eq!(trust.extra_pem.len(), 2);
        assert!(Trust::load(None, None).unwrap().extra_pem.is_empty());

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = Trust::load(None, Some(empty)).err().unwrap();
        assert!(
            err.starts_with("SSL_CERT_FILE:") && err.contains("holds no certificate"),
            "{err}"
        );
        let err = Trust::load(Some(Path::new("/nonexistent.pem")), None)
            .err()
            .unwrap();
        assert!(
            err.contains("exchanges.ca_file: cannot read /nonexistent.pem"),
            "{err}"
        );
    }
}
