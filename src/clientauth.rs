//! Optional client authentication (`[server] htpasswd`): bcrypt entries as written by `htpasswd -B`.
//! Clients log in with Basic (`docker login`, skopeo `--creds`); without a file regmux is anonymous.
//!
//! A client's credentials are checked here and never forwarded to a backend. bcrypt is slow on
//! purpose, and a pull makes dozens of requests, so a successful check is remembered for a few minutes
//! under a hash of the credentials (never the credentials themselves).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use sha2::Digest as _;

pub struct Htpasswd {
    users: HashMap<String, String>,
    verified: moka::sync::Cache<[u8; 32], ()>,
}

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("cannot read htpasswd file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("htpasswd file {path}, line {line}: only bcrypt entries (htpasswd -B) are supported")]
    NotBcrypt { path: String, line: usize },
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HtpasswdError::Read { path: path.display().to_string(), source })?;
        Htpasswd::parse(&text).map_err(|line| HtpasswdError::NotBcrypt { path: path.display().to_string(), line })
    }

    /// Parse the file's text; `Err(line)` names the first line that is not a bcrypt entry.
    pub fn parse(text: &str) -> Result<Htpasswd, usize> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((u, h)) if h.starts_with("$2") => {
                    users.insert(u.to_owned(), h.to_owned());
                }
                _ => return Err(i + 1),
            }
        }
        let verified = moka::sync::Cache::builder().max_capacity(1000).time_to_live(Duration::from_secs(300)).build();
        Ok(Htpasswd { users, verified })
    }

    /// Whether an `Authorization` header carries valid credentials.
    pub fn authorized(&self, header: Option<&HeaderValue>) -> bool {
        let Some(raw) = header.and_then(|h| h.to_str().ok()) else { return false };
        let Some((scheme, b64)) = raw.split_once(' ') else { return false };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else { return false };
        let key: [u8; 32] = sha2::Sha256::digest(&decoded).into();
        if self.verified.contains_key(&key) {
            return true;
        }
        let Ok(decoded) = String::from_utf8(decoded) else { return false };
        let Some((user, pass)) = decoded.split_once(':') else { return false };
        let ok = self.users.get(user).is_some_and(|hash| bcrypt::verify(pass, hash).unwrap_or(false));
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s))).unwrap()
    }

    #[test]
    fn bcrypt_entries() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let h = Htpasswd::parse(&format!("# users\nalice:{hash}\n")).unwrap();
        assert!(h.authorized(Some(&basic("alice:s3cret"))));
        assert!(h.authorized(Some(&basic("alice:s3cret"))), "cached");
        assert!(!h.authorized(Some(&basic("alice:wrong"))));
        assert!(!h.authorized(Some(&basic("bob:s3cret"))));
        assert!(!h.authorized(None));
        assert!(!h.authorized(Some(&HeaderValue::from_static("Bearer x"))));
        assert_eq!(Htpasswd::parse("alice:{SHA}abc").err(), Some(1));
    }
}
