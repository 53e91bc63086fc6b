//! JWT verification for private channels, and the publish keys.
//!
//! Keys come from `[auth]`: HS256 secrets (several, tried in order, for rotation), one public
//! key file (RS256, ES256 or EdDSA), or a JWKS document whose keys tokens name by `kid`
//! ([`jwks`]). Each key accepts exactly one algorithm, the one its type implies, which rules out
//! `alg: none` and algorithm confusion (an HS256 token "signed" with an RSA public key). The
//! whole set is replaced at once on SIGHUP ([`Auth::replace`]); connections keep the identity
//! they proved. Tokens are never logged.

use std::sync::{Arc, RwLock};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::domain::UserId;

pub mod jwks;

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// `exp`, seconds since the epoch, as the token states it (announced to the client).
    pub expires_at: Option<i64>,
    /// The last moment (ms since the epoch) the token is accepted: `exp` plus the configured
    /// leeway. One rule for a token checked at connect, in `auth`, at subscribe and while a
    /// connection stays open.
    pub valid_until_ms: Option<i64>,
}

impl Identity {
    /// Whether the token no longer holds at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.valid_until_ms.is_some_and(|until| now_ms > until)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// `INVALID_TOKEN`: the text says why without repeating the token.
    #[error("{0}")]
    Invalid(String),
    /// `TOKEN_EXPIRED`.
    #[error("token has expired; authenticate again with a fresh token")]
    Expired,
    /// `INVALID_TOKEN` too, but not the client's fault: the JWKS could not be had, so no
    /// token can be checked right now. The connection stays open for public channels.
    #[error("{0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Invalid(_) => "invalid_token",
            AuthError::Expired => "token_expired",
            AuthError::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: Option<i64>,
}

/// A key and the one algorithm it verifies.
#[derive(Clone)]
#[cfg_attr(test, derive(Debug))]
pub struct VerifyKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

/// Where the keys come from.
enum Keys {
    /// HS256 secrets, tried in order.
    Secrets(Vec<DecodingKey>),
    /// One public key file.
    PublicKey(VerifyKey),
    /// A JWKS document, by `kid`.
    Jwks(Arc<jwks::Jwks>),
}

/// What a token must state besides its signature: `exp`, `sub`, and `iss`/`aud` when set.
struct Rules {
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Rules {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken checks iss/aud only when the token carries them; a configured issuer
        // or audience must also be present.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// Verifies tokens with the keys and rules of one `[auth]` section, and checks publish keys.
pub struct Authenticator {
    keys: Keys,
    rules: Rules,
    publish_keys: Vec<Vec<u8>>,
}

/// Reads a PEM public key file: RSA, EC P-256 or Ed25519, each with its one algorithm.
pub fn read_public_key(path: &std::path::Path) -> Result<VerifyKey, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "auth.jwt_public_key_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    let (key, algorithm) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        (key, Algorithm::RS256)
    } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        (key, Algorithm::ES256)
    } else if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        (key, Algorithm::EdDSA)
    } else {
        return Err(format!(
            "auth.jwt_public_key_file: {} is not an RSA, EC or Ed25519 public key in PEM form",
            path.display()
        ));
    };
    Ok(VerifyKey { key, algorithm })
}

impl Authenticator {
    /// The keys `cfg` names (key files read now). A JWKS is fetched once [`jwks::Jwks::start`]
    /// runs; `reuse` is the JWKS of the authenticator this one replaces, kept (with its keys)
    /// when the URL is the same.
    pub fn from_config(
        cfg: &AuthConfig,
        reuse: Option<&Authenticator>,
    ) -> Result<Authenticator, String> {
        let keys = if let Some(url) = &cfg.jwks_url {
            let same = reuse.and_then(|a| match &a.keys {
                Keys::Jwks(j) if j.url() == url && j.settings() == jwks::Settings::of(cfg) => {
                    Some(j.clone())
                }
                _ => None,
            });
            match same {
                Some(j) => Keys::Jwks(j),
                None => Keys::Jwks(Arc::new(jwks::Jwks::new(url, cfg)?)),
            }
        } else if let Some(path) = &cfg.jwt_public_key_file {
            Keys::PublicKey(read_public_key(path)?)
        } else {
            Keys::Secrets(
                cfg.secrets()
                    .into_iter()
                    .map(|s| DecodingKey::from_secret(s.as_bytes()))
                    .collect(),
            )
        };
        Ok(Authenticator {
            keys,
            rules: Rules {
                leeway: cfg.jwt_leeway_secs,
                issuer: cfg.jwt_issuer.clone(),
                audience: cfg.jwt_audience.clone(),
            },
            publish_keys: cfg
                .publish_keys()
                .into_iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
        })
    }

    /// The JWKS this authenticator reads, if any.
    pub fn jwks(&self) -> Option<&Arc<jwks::Jwks>> {
        match &self.keys {
            Keys::Jwks(j) => Some(j),
            _ => None,
        }
    }

    /// What the keys are, for the log line of a (re)load: never the keys themselves.
    pub fn describe(&self) -> String {
        let keys = match &self.keys {
            Keys::Secrets(s) => format!("{} HS256 secret(s)", s.len()),
            Keys::PublicKey(k) => format!("a {:?} public key", k.algorithm),
            Keys::Jwks(j) => format!("the JWKS at {}", j.url()),
        };
        format!("{keys}, {} publish key(s)", self.publish_keys.len())
    }

    /// Whether `key` is one of the publish keys (compared in constant time).
    pub fn publish_key_ok(&self, key: &str) -> bool {
        // Every key is compared, so the time taken does not say which one matched.
        self.publish_keys
            .iter()
            .fold(false, |ok, k| same_secret(key.as_bytes(), k) | ok)
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("token is malformed".into()))?;
        match &self.keys {
            Keys::Secrets(secrets) => {
                let mut last = AuthError::Invalid("token signature does not verify".into());
                for key in secrets {
                    match self.decode(token, &header, key, Algorithm::HS256) {
                        // Signed with another secret, perhaps the next one.
                        Err(AuthError::Invalid(m)) if m == BAD_SIGNATURE => {
                            last = AuthError::Invalid(m);
                        }
                        other => return other,
                    }
                }
                Err(last)
            }
            Keys::PublicKey(k) => self.decode(token, &header, &k.key, k.algorithm),
            Keys::Jwks(jwks) => {
                let Some(kid) = header.kid.as_deref() else {
                    return Err(AuthError::Invalid(
                        "token has no 'kid' header; this relay verifies tokens by the key they name"
                            .into(),
                    ));
                };
                let k = jwks.key(kid).await?;
                self.decode(token, &header, &k.key, k.algorithm)
            }
        }
    }

    fn decode(
        &self,
        token: &str,
        header: &Header,
        key: &DecodingKey,
        algorithm: Algorithm,
    ) -> Result<Identity, AuthError> {
        if header.alg != algorithm {
            return Err(AuthError::Invalid(format!(
                "token algorithm {:?} is not accepted; its key verifies {algorithm:?} only",
                header.alg
            )));
        }
        let validation = self.rules.validation(algorithm);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => {
                AuthError::Invalid("token is not valid yet (nbf is in the future)".into())
            }
            ErrorKind::InvalidSignature => AuthError::Invalid(BAD_SIGNATURE.into()),
            ErrorKind::InvalidAlgorithm => AuthError::Invalid(format!(
                "token algorithm is not accepted; this key verifies {algorithm:?} only"
            )),
            ErrorKind::InvalidIssuer => AuthError::Invalid("token issuer is not accepted".into()),
            ErrorKind::InvalidAudience => {
                AuthError::Invalid("token audience is not accepted".into())
            }
            ErrorKind::MissingRequiredClaim(claim) => {
                AuthError::Invalid(format!("token lacks the required '{claim}' claim"))
            }
            _ => AuthError::Invalid("token is malformed".into()),
        })?;
        let user = UserId::parse(&data.claims.sub).map_err(|e| {
            AuthError::Invalid(format!("token subject is not a valid user id: {e}"))
        })?;
        let leeway = i64::try_from(self.rules.leeway).unwrap_or(i64::MAX / 2000);
        Ok(Identity {
            user,
            expires_at: data.claims.exp,
            valid_until_ms: data
                .claims
                .exp
                .map(|exp| exp.saturating_add(leeway).saturating_mul(1000)),
        })
    }
}

const BAD_SIGNATURE: &str = "token signature does not verify";

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The relay's authenticator, replaceable while it runs (SIGHUP). Sessions take the current
/// one for each check; a replacement applies to the next check.
pub struct Auth {
    current: RwLock<Arc<Authenticator>>,
}

impl Auth {
    pub fn new(authenticator: Authenticator) -> Auth {
        Auth {
            current: RwLock::new(Arc::new(authenticator)),
        }
    }

    pub fn current(&self) -> Arc<Authenticator> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `next` in place; returns the one it replaced.
    pub fn replace(&self, next: Authenticator) -> Arc<Authenticator> {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *cur, Arc::new(next))
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.current().verify(token).await
    }

    pub fn publish_key_ok(&self, key: &str) -> bool {
        self.current().publish_key_ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn auth() -> Authenticator {
        Authenticator::from_config(
            &AuthConfig {
                jwt_secret: "s3cret".into(),
                ..AuthConfig::default()
            },
            None,
        )
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn valid_token_gives_the_user() {
        let t = token("s3cret", json!({"sub":"user123","exp":now()+60}));
        assert_eq!(auth().verify(&t).await.unwrap().user.as_str(), "user123");
    }

    #[tokio::test]
    async fn bad_tokens_are_refused() {
        let a = auth();
        let wrong = token("other", json!({"sub":"u","exp":now()+60}));
        assert!(matches!(a.verify(&wrong).await, Err(AuthError::Invalid(_))));
        let expired = token("s3cret", json!({"sub":"u","exp":now()-10}));
        assert_eq!(a.verify(&expired).await, Err(AuthError::Expired));
        let future = token("s3cret", json!({"sub":"u","exp":now()+60,"nbf":now()+30}));
        assert!(matches!(
            a.verify(&future).await,
            Err(AuthError::Invalid(_))
        ));
        let no_exp = token("s3cret", json!({"sub":"u"}));
        assert!(matches!(
            a.verify(&no_exp).await,
            Err(AuthError::Invalid(_))
        ));
        // alg:none: header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(matches!(a.verify(none).await, Err(AuthError::Invalid(_))));
        assert!(matches!(
            a.verify("garbage").await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn a_token_stays_valid_for_the_leeway_past_exp_and_no_longer() {
        let exp = now() + 60;
        let identity = auth()
            .verify(&token("s3cret", json!({"sub":"u","exp":exp})))
            .await
            .unwrap();
        assert_eq!(identity.valid_until_ms, Some((exp + 2) * 1000));
        assert!(!identity.expired(exp * 1000 + 1_999));
        assert!(!identity.expired((exp + 2) * 1000));
        assert!(identity.expired((exp + 2) * 1000 + 1));
        // The connect-time check agrees: a token 1 s past exp is still accepted.
        let just_past = token("s3cret", json!({"sub":"u","exp":now() - 1}));
        assert!(auth().verify(&just_past).await.is_ok());
    }

    #[tokio::test]
    async fn leeway_is_seconds_not_a_minute() {
        let barely_expired = token("s3cret", json!({"sub":"u","exp":now()-10}));
        assert_eq!(
            auth().verify(&barely_expired).await,
            Err(AuthError::Expired)
        );
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey};
    use serde_json::json;

    fn hs(secret: &str) -> String {
        let exp = chrono::Utc::now().timestamp() + 60;
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"u1","exp":exp}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn every_secret_verifies_in_order_and_every_publish_key_is_accepted() {
        let a = Authenticator::from_config(
            &AuthConfig {
                jwt_secrets: vec!["new".into(), "old".into()],
                publish_api_keys: vec!["p-new".into(), "p-old".into()],
                ..AuthConfig::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(a.verify(&hs("new")).await.unwrap().user.as_str(), "u1");
        assert_eq!(a.verify(&hs("old")).await.unwrap().user.as_str(), "u1");
        assert_eq!(
            a.verify(&hs("change-me")).await,
            Err(AuthError::Invalid(BAD_SIGNATURE.into())),
            "jwt_secrets replaces jwt_secret"
        );
        assert!(a.publish_key_ok("p-new") && a.publish_key_ok("p-old"));
        assert!(!a.publish_key_ok("change-me-too") && !a.publish_key_ok("p-ne"));
        assert_eq!(a.describe(), "2 HS256 secret(s), 2 publish key(s)");
    }
}
