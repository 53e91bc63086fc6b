//! JWT verification for private channels: HS256 by shared secret, or RS256/ES256 by a public
//! key file. Exactly one algorithm is accepted per relay, which rules out `alg: none` and
//! algorithm confusion (an HS256 token signed with the RSA public key). Tokens are never logged.

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::domain::UserId;

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
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: Option<i64>,
}

/// Verifies tokens with the key and rules from `[auth]`.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig) -> Result<Authenticator, String> {
        let (key, algorithm) = match &cfg.jwt_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!(
                        "auth.jwt_public_key_file: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(format!(
                        "auth.jwt_public_key_file: {} is not an RSA or EC public key in PEM form",
                        path.display()
                    ));
                }
            }
            None => (
                DecodingKey::from_secret(cfg.jwt_secret.as_bytes()),
                Algorithm::HS256,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = cfg.jwt_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken checks iss/aud only when the token carries them; a configured issuer
        // or audience must also be present.
        let mut required = vec!["exp", "sub"];
        match &cfg.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("token is not valid yet (nbf is in the future)".into())
                }
                ErrorKind::InvalidSignature => {
                    AuthError::Invalid("token signature does not verify".into())
                }
                ErrorKind::InvalidAlgorithm => AuthError::Invalid(format!(
                    "token algorithm is not accepted; this relay accepts {:?} only",
                    self.validation.algorithms
                )),
                ErrorKind::InvalidIssuer => {
                    AuthError::Invalid("token issuer is not accepted".into())
                }
                ErrorKind::InvalidAudience => {
                    AuthError::Invalid("token audience is not accepted".into())
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("token lacks the required '{claim}' claim"))
                }
                _ => AuthError::Invalid("token is malformed".into()),
            },
        )?;
        let user = UserId::parse(&data.claims.sub).map_err(|e| {
            AuthError::Invalid(format!("token subject is not a valid user id: {e}"))
        })?;
        let leeway = i64::try_from(self.validation.leeway).unwrap_or(i64::MAX / 2000);
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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn auth() -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            jwt_secret: "s3cret".into(),
            ..AuthConfig::default()
        })
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

    #[test]
    fn valid_token_gives_the_user() {
        let t = token("s3cret", json!({"sub":"user123","exp":now()+60}));
        assert_eq!(auth().verify(&t).unwrap().user.as_str(), "user123");
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        let wrong = token("other", json!({"sub":"u","exp":now()+60}));
        assert!(matches!(a.verify(&wrong), Err(AuthError::Invalid(_))));
        let expired = token("s3cret", json!({"sub":"u","exp":now()-10}));
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        let future = token("s3cret", json!({"sub":"u","exp":now()+60,"nbf":now()+30}));
        assert!(matches!(a.verify(&future), Err(AuthError::Invalid(_))));
        let no_exp = token("s3cret", json!({"sub":"u"}));
        assert!(matches!(a.verify(&no_exp), Err(AuthError::Invalid(_))));
        // alg:none: header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(matches!(a.verify(none), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn a_token_stays_valid_for_the_leeway_past_exp_and_no_longer() {
        let exp = now() + 60;
        let identity = auth()
            .verify(&token("s3cret", json!({"sub":"u","exp":exp})))
            .unwrap();
        assert_eq!(identity.valid_until_ms, Some((exp + 2) * 1000));
        assert!(!identity.expired(exp * 1000 + 1_999));
        assert!(!identity.expired((exp + 2) * 1000));
        assert!(identity.expired((exp + 2) * 1000 + 1));
        // The connect-time check agrees: a token 1 s past exp is still accepted.
        let just_past = token("s3cret", json!({"sub":"u","exp":now() - 1}));
        assert!(auth().verify(&just_past).is_ok());
    }

    #[test]
    fn leeway_is_seconds_not_a_minute() {
        let barely_expired = token("s3cret", json!({"sub":"u","exp":now()-10}));
        assert_eq!(auth().verify(&barely_expired), Err(AuthError::Expired));
    }
}
