//! Signing keys from a JWKS document (`auth.jwks_url`), by `kid`.
//!
//! The document is fetched at start and every `jwks_refresh_secs`; a token naming a `kid` the
//! relay does not hold triggers a fetch too, but at most one per `jwks_min_fetch_interval_ms`
//! (and one at a time: callers that arrive during a fetch wait for it), so made-up `kid`s
//! cannot turn into a flood of requests to the identity service. A fetch replaces the whole
//! set: a key gone from the document stops verifying. A fetch that fails keeps the keys of the
//! last good one; until a first fetch succeeds, private channels are refused with a message
//! saying the keys are unavailable, and public channels are served as ever.
//!
//! Each key verifies the one algorithm its type implies (RSA: RS256 unless the key states
//! another RSA algorithm; EC P-256: ES256; P-384: ES384; Ed25519: EdDSA). A key whose `alg`
//! contradicts its type, symmetric (`oct`) keys and encryption keys are skipped.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{AuthError, VerifyKey};
use crate::config::AuthConfig;

/// A fetch that takes longer than this has failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused (real ones are a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Keys held at most: a document with more is cut here.
const MAX_KEYS: u64 = 256;
/// Retry delays while the document cannot be had, capped by the refresh interval.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The timings of one JWKS source; a reload with the same URL and settings keeps the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    refresh: Duration,
    min_fetch_interval: Duration,
}

impl Settings {
    pub fn of(cfg: &AuthConfig) -> Settings {
        Settings {
            refresh: Duration::from_secs(cfg.jwks_refresh_secs.max(1)),
            min_fetch_interval: Duration::from_millis(cfg.jwks_min_fetch_interval_ms),
        }
    }
}

#[derive(Default)]
struct Status {
    /// A fetch has succeeded: the keys are the document's.
    loaded: bool,
    last_error: Option<String>,
    /// When the on-demand fetch last ran (ms since the epoch).
    last_on_demand_ms: Option<i64>,
}

/// For `/health`: never the keys themselves.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwksSnapshot {
    pub url: String,
    /// `loaded` or `unavailable` (no fetch has succeeded yet).
    pub state: &'static str,
    pub keys: u64,
    pub fetches: u64,
    pub failed_fetches: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub struct Jwks {
    url: String,
    settings: Settings,
    http: reqwest::Client,
    keys: moka::sync::Cache<String, Arc<VerifyKey>>,
    status: Mutex<Status>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Fetches completed, ok or not: a caller that waited for a running fetch does not start
    /// another.
    generation: AtomicU64,
    fetches: AtomicU64,
    failed: AtomicU64,
    started: AtomicBool,
}

impl Jwks {
    pub fn new(url: &str, cfg: &AuthConfig) -> Result<Jwks, String> {
        // The identity service may sit behind the same TLS-inspecting gateway as the exchanges:
        // the same extra CAs are trusted. reqwest honours HTTPS_PROXY / NO_PROXY itself.
        let trust = crate::exchange::tls::Trust::load(None, crate::exchange::tls::ssl_cert_file())?;
        let builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("exchange-relay/", env!("CARGO_PKG_VERSION")));
        let http = trust
            .apply(builder)
            .build()
            .map_err(|e| format!("auth.jwks_url: the HTTP client could not be built: {e}"))?;
        Ok(Jwks {
            url: url.to_string(),
            settings: Settings::of(cfg),
            http,
            keys: moka::sync::Cache::new(MAX_KEYS),
            status: Mutex::new(Status::default()),
            fetching: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started: AtomicBool::new(false),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches now and then every refresh interval (sooner, with backoff, while fetches fail),
    /// until `shutdown` or until nothing holds this source any more (replaced on reload).
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Jwks> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                let Some(jwks) = weak.upgrade() else { return };
                let ok = jwks.fetch().await.is_ok();
                let wait = if ok {
                    retry = RETRY_FIRST;
                    jwks.settings.refresh
                } else {
                    let wait = retry.min(jwks.settings.refresh);
                    retry = (retry * 2).min(RETRY_MAX);
                    wait
                };
                drop(jwks);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// The key `kid` names.
    pub async fn key(&self, kid: &str) -> Result<Arc<VerifyKey>, AuthError> {
        if let Some(k) = self.keys.get(kid) {
            return Ok(k);
        }
        if self.may_fetch_on_demand() {
            let _ = self.fetch().await;
            if let Some(k) = self.keys.get(kid) {
                return Ok(k);
            }
        }
        let st = self.status();
        if !st.loaded {
            let why = st.last_error.as_deref().unwrap_or("not fetched yet");
            return Err(AuthError::KeysUnavailable(format!(
                "signing keys are unavailable: the JWKS at {} could not be fetched ({why}); tokens cannot be checked right now, try again shortly",
                self.url
            )));
        }
        let shown: String = kid.chars().take(64).collect();
        Err(AuthError::Invalid(format!(
            "token names key '{shown}', which the relay's JWKS does not hold"
        )))
    }

    /// Whether an unknown `kid` may cause a fetch now (one per `min_fetch_interval`).
    fn may_fetch_on_demand(&self) -> bool {
        let now = crate::protocol::now_millis();
        let interval =
            i64::try_from(self.settings.min_fetch_interval.as_millis()).unwrap_or(i64::MAX);
        let mut st = self.status();
        match st.last_on_demand_ms {
            Some(last) if now.saturating_sub(last) < interval => false,
            _ => {
                st.last_on_demand_ms = Some(now);
                true
            }
        }
    }

    /// Fetches the document and replaces the keys with its keys. One fetch at a time: a caller
    /// that had to wait for another's fetch takes its result instead of fetching again.
    async fn fetch(&self) -> Result<usize, String> {
        let before = self.generation.load(Ordering::SeqCst);
        let _one = self.fetching.lock().await;
        if self.generation.load(Ordering::SeqCst) != before {
            return Ok(self.keys.entry_count() as usize);
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_document().await;
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut st = self.status();
        match result {
            Ok(keys) => {
                let n = keys.len();
                let fresh: std::collections::HashSet<String> =
                    keys.iter().map(|(kid, _)| kid.clone()).collect();
                for (kid, key) in keys {
                    self.keys.insert(kid, Arc::new(key));
                }
                let gone: Vec<String> = self
                    .keys
                    .iter()
                    .map(|(kid, _)| kid.as_ref().clone())
                    .filter(|kid| !fresh.contains(kid))
                    .collect();
                for kid in &gone {
                    self.keys.invalidate(kid);
                }
                self.keys.run_pending_tasks();
                if !st.loaded || st.last_error.is_some() || !gone.is_empty() {
                    tracing::info!(url = %self.url, keys = n, removed = gone.len(), "JWKS loaded");
                }
                st.loaded = true;
                st.last_error = None;
                Ok(n)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if st.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(url = %self.url, error = %e, kept_keys = self.keys.entry_count(), "JWKS fetch failed");
                }
                st.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    async fn fetch_document(&self) -> Result<Vec<(String, VerifyKey)>, String> {
        let resp = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| format!("cannot reach it: {}", crate::exchange::with_causes(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(format!(
                "the document is larger than {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("reading the document failed: {e}"))?;
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "the document is larger than {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        parse_document(&body)
    }

    pub fn snapshot(&self) -> JwksSnapshot {
        let st = self.status();
        JwksSnapshot {
            url: self.url.clone(),
            state: if st.loaded { "loaded" } else { "unavailable" },
            keys: self.keys.entry_count(),
            fetches: self.fetches.load(Ordering::Relaxed),
            failed_fetches: self.failed.load(Ordering::Relaxed),
            last_error: st.last_error.clone(),
        }
    }
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWKS document. Keys that cannot be used are skipped (logged); a
/// document that is not a JWKS, or of whose keys none can be used, is an error and the keys
/// already held stay.
fn parse_document(body: &[u8]) -> Result<Vec<(String, VerifyKey)>, String> {
    let doc: Document = serde_json::from_slice(body)
        .map_err(|e| format!("the document is not a JWKS ({{\"keys\":[...]}}): {e}"))?;
    let total = doc.keys.len();
    let mut out = Vec::new();
    for value in doc.keys.into_iter().take(MAX_KEYS as usize) {
        match usable(value) {
            Ok(pair) => out.push(pair),
            Err(why) => tracing::debug!(%why, "JWKS key skipped"),
        }
    }
    if out.is_empty() && total > 0 {
        return Err(format!("none of its {total} keys can verify tokens (RSA, EC P-256/P-384 or Ed25519 signing keys with a kid)"));
    }
    Ok(out)
}

fn usable(value: serde_json::Value) -> Result<(String, VerifyKey), String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?;
    let kid = jwk.common.key_id.clone().ok_or("no kid")?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err(format!("{kid}: an encryption key"));
    }
    let algorithm =
        algorithm_of(&jwk).ok_or_else(|| format!("{kid}: no signing algorithm fits its type"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{kid}: {e}"))?;
    Ok((kid, VerifyKey { key, algorithm }))
}

/// The one algorithm a key verifies: the one its type implies, or the one it states if that
/// fits its type. `None` for symmetric keys and mismatches.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let stated = match jwk.common.key_algorithm {
        Some(a) => Some(Algorithm::from_str(&a.to_string()).ok()?),
        None => None,
    };
    let (fits, implied): (&[Algorithm], Algorithm) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (
            &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            Algorithm::RS256,
        ),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (&[Algorithm::ES256], Algorithm::ES256),
            EllipticCurve::P384 => (&[Algorithm::ES384], Algorithm::ES384),
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (&[Algorithm::EdDSA], Algorithm::EdDSA),
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    };
    match stated {
        Some(a) if fits.contains(&a) => Some(a),
        Some(_) => None,
        None => Some(implied),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_key_type_gets_its_one_algorithm_and_symmetric_or_contradicting_keys_are_skipped() {
        let ec = json!({"kty":"EC","crv":"P-256","kid":"e","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        let ed = json!({"kty":"OKP","crv":"Ed25519","kid":"d","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let oct = json!({"kty":"oct","kid":"o","k":"c2VjcmV0"});
        let ec_as_rs = json!({"kty":"EC","crv":"P-256","kid":"x","alg":"RS256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        let enc = json!({"kty":"OKP","crv":"Ed25519","kid":"n","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let doc = json!({"keys":[ec, ed, oct, ec_as_rs, enc, {"kty":"RSA"}]});
        let keys = parse_document(doc.to_string().as_bytes()).unwrap();
        let got: Vec<(String, Algorithm)> =
            keys.into_iter().map(|(k, v)| (k, v.algorithm)).collect();
        assert_eq!(
            got,
            vec![
                ("e".into(), Algorithm::ES256),
                ("d".into(), Algorithm::EdDSA)
            ]
        );
        let err = parse_document(json!({"keys":[oct_only()]}).to_string().as_bytes()).unwrap_err();
        assert!(err.contains("none of its 1 keys"), "{err}");
        assert!(parse_document(b"{}").is_err());
        assert!(parse_document(br#"{"keys":[]}"#).unwrap().is_empty());
    }

    fn oct_only() -> serde_json::Value {
        json!({"kty":"oct","kid":"o","k":"c2VjcmV0"})
    }
}
