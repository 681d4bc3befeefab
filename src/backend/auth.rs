//! Backend authentication: plain Basic, and the Docker token flow (distribution `docs/spec/auth/token.md`):
//! a 401 carries `WWW-Authenticate: Bearer realm,service,scope`; regmux asks the realm for a token
//! (anonymously, or with the backend's credentials as Basic) and retries with `Authorization: Bearer`.
//!
//! Tokens are cached per (realm, service, scope) until shortly before `expires_in`; concurrent requests
//! for one scope share one token fetch. Nothing here logs a token or a password, and [`Secret`] has a
//! redacting `Debug` so that no `{:?}` can leak one either.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// A password or token. `Debug` prints `<redacted>`.
#[derive(Clone)]
pub struct Secret(pub Arc<str>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// The `Authorization` header value for Basic.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.0);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    pub scope: String,
}

#[derive(Clone)]
pub struct Token {
    pub value: Secret,
    /// When the cache must stop handing the token out.
    pub ttl: Duration,
}

/// Registries return `token` (Docker) or `access_token` (OAuth2) or both; `expires_in` defaults to 60 s
/// (token.md: "if omitted, a default of 60 seconds should be assumed").
#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Hand a token out until 10 s before it expires (clock skew and request time), but never less than 1 s.
fn usable_for(expires_in: u64) -> Duration {
    Duration::from_secs(expires_in.saturating_sub(10).max(1))
}

struct TokenExpiry;

impl moka::Expiry<TokenKey, Token> for TokenExpiry {
    fn expire_after_create(&self, _: &TokenKey, token: &Token, _: Instant) -> Option<Duration> {
        Some(token.ttl)
    }
}

pub type TokenCache = moka::future::Cache<TokenKey, Token>;

pub fn token_cache() -> TokenCache {
    moka::future::Cache::builder().max_capacity(10_000).expire_after(TokenExpiry).build()
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint {realm}: {source}")]
    Request { realm: String, source: reqwest::Error },
    #[error("token endpoint {realm} answered {status}")]
    Status { realm: String, status: reqwest::StatusCode },
    #[error("token endpoint {realm} answered without a token")]
    NoToken { realm: String },
    #[error("token endpoint {realm} did not answer within {timeout:?}")]
    Timeout { realm: String, timeout: Duration },
}

/// Ask the realm for a token. Credentials go to the realm only: it is the party that was named by the
/// backend's challenge for exactly that purpose.
pub async fn fetch_token(
    client: &reqwest::Client,
    key: &TokenKey,
    credentials: Option<&Credentials>,
    timeout: Duration,
) -> Result<Token, TokenError> {
    let realm = key.realm.clone();
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("scope", &key.scope);
        if let Some(service) = &key.service {
            q.append_pair("service", service);
        }
        q.finish()
    };
    let sep = if key.realm.contains('?') { '&' } else { '?' };
    let mut req = client.get(format!("{}{sep}{query}", key.realm));
    if let Some(c) = credentials {
        req = req.header(http::header::AUTHORIZATION, c.basic_header());
    }
    let fut = async {
        let resp = req.send().await.map_err(|source| TokenError::Request { realm: realm.clone(), source })?;
        if !resp.status().is_success() {
            return Err(TokenError::Status { realm: realm.clone(), status: resp.status() });
        }
        let bytes = resp.bytes().await.map_err(|source| TokenError::Request { realm: realm.clone(), source })?;
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| TokenError::NoToken { realm: realm.clone() })?;
        let value = body.token.or(body.access_token).filter(|t| !t.is_empty());
        let value = value.ok_or_else(|| TokenError::NoToken { realm: realm.clone() })?;
        Ok(Token { value: Secret(value.into()), ttl: usable_for(body.expires_in.unwrap_or(60)) })
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(Err(TokenError::Timeout { realm: realm.clone(), timeout }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts() {
        let c = Credentials { username: "robot$regmux".into(), password: Secret("hunter2".into()) };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.basic_header(), "Basic cm9ib3QkcmVnbXV4Omh1bnRlcjI=");
    }

    #[test]
    fn lifetimes() {
        assert_eq!(usable_for(300), Duration::from_secs(290));
        assert_eq!(usable_for(5), Duration::from_secs(1));
    }
}
