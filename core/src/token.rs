//! Bootstrap tokens: short-lived, HMAC-signed claims that prove an identity to a CA before
//! the caller has a certificate. A controller mints them for workloads outside Kubernetes;
//! the federation mints them for clusters that join.
//!
//! Format: `ist1.<base64url(claims JSON)>.<base64url(HMAC-SHA256)>`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ist1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for {found}, not {expected}")]
    WrongAudience { expected: String, found: String },
    #[error("token key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `token` is a bootstrap token (rather than, say, a Kubernetes service-account
/// token).
pub fn is_bootstrap(token: &str) -> bool {
    token
        .strip_prefix(PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: u64,
}

/// The secret that signs and checks tokens.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenKey {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Loads the key at `path`, creating a random one (mode 0600) when the file is absent.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        let err = |source| TokenError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => Ok(Self::from_bytes(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; 32] = rand::random();
                // Another process may be creating it too: whoever is first, all use its key.
                let bytes = crate::fsutil::create_private_once(path, &bytes).map_err(err)?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Mints a token proving `subject` to `audience`, valid for `ttl`.
    pub fn mint(&self, subject: &str, audience: &str, ttl: Duration) -> String {
        let claims = Claims {
            sub: subject.to_owned(),
            aud: audience.to_owned(),
            exp: unix_now() + ttl.as_secs(),
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{PREFIX}.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks a token for `audience` and returns the subject it proves.
    pub fn verify(&self, token: &str, audience: &str) -> Result<String, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(body), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, body.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp < unix_now() {
            return Err(TokenError::Expired);
        }
        if claims.aud != audience {
            return Err(TokenError::WrongAudience {
                expected: audience.to_owned(),
                found: claims.aud,
            });
        }
        Ok(claims.sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_proves_its_subject_to_its_audience_only() {
        let key = TokenKey::from_bytes(b"k");
        let t = key.mint(
            "spiffe://td/ns/a/sa/b",
            "cluster:east",
            Duration::from_secs(60),
        );
        assert_eq!(
            key.verify(&t, "cluster:east").expect("valid"),
            "spiffe://td/ns/a/sa/b"
        );
        assert!(matches!(
            key.verify(&t, "cluster:west"),
            Err(TokenError::WrongAudience { .. })
        ));
        assert!(matches!(
            TokenKey::from_bytes(b"other").verify(&t, "cluster:east"),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn tampered_and_expired_tokens_are_refused() {
        let key = TokenKey::from_bytes(b"k");
        let t = key.mint("a", "x", Duration::from_secs(60));
        let forged = t.replacen("ist1.", "ist1.e", 1);
        assert!(key.verify(&forged, "x").is_err());
        assert!(matches!(
            key.verify("garbage", "x"),
            Err(TokenError::Malformed)
        ));
        let expired = key.mint("a", "x", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(
            key.verify(&expired, "x"),
            Err(TokenError::Expired)
        ));
    }
}
