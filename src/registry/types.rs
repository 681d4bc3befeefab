//! Domain newtypes parsed once at the edge: [`RepoName`], [`Digest`], [`Reference`].
//!
//! The grammars are those of the distribution-spec ("Pulling manifests", the `<name>` and `<reference>`
//! rules) and the OCI image-spec `descriptor.md` digest grammar. A value of these types is valid by
//! construction, so no raw client string is ever sent to a backend.

use std::fmt;
use std::str::FromStr;

/// Longest repository name we accept. distribution rejects names longer than 255 characters
/// (`reference.NameTotalLengthMax`), so a longer one could never be served anyway.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path components, e.g. `["library", "alpine"]`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// This name without its first segment (`quay.io/keycloak/keycloak` → `keycloak/keycloak`);
    /// `None` for a one-segment name.
    pub fn strip_first(&self) -> Option<RepoName> {
        self.0.split_once('/').map(|(_, rest)| RepoName(rest.to_owned()))
    }

    /// `prefix/name`; both sides are valid names, so the result is too (unless too long).
    pub fn with_prefix(&self, prefix: &RepoName) -> Result<RepoName, NameError> {
        let joined = format!("{}/{}", prefix.0, self.0);
        if joined.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        Ok(RepoName(joined))
    }

    /// The name with `prefix/` removed, if it starts with it.
    pub fn strip_prefix(&self, prefix: &RepoName) -> Option<RepoName> {
        self.0
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| RepoName(rest.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component {0:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ separated by exactly one of: ".", "_", "__", "-"+ ; no leading/trailing separator.
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut need_alnum = true;
    while i < b.len() {
        if alnum(b[i]) {
            need_alnum = false;
            i += 1;
            continue;
        }
        if need_alnum {
            return false;
        }
        let sep_len = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return false,
        };
        i += sep_len;
        need_alnum = true;
    }
    !need_alnum
}

impl FromStr for RepoName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if let Some(bad) = s.split('/').find(|c| !valid_component(c)) {
            return Err(NameError::BadComponent(bad.to_owned()));
        }
        Ok(RepoName(s.to_owned()))
    }
}

/// A content digest `algorithm:encoded`. Only the registered algorithms are accepted
/// (sha256, sha512), with their exact hex length, lowercase: a digest is a cache key and a ledger key,
/// so two spellings of one digest must not exist.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 hex> or sha512:<128 hex>, lowercase")]
pub struct DigestError(pub String);

impl Digest {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn algorithm(&self) -> Algorithm {
        if self.0.starts_with("sha512:") {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        }
    }
    /// The hex part after `algorithm:`.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }
    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes))))
    }
    /// Whether `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        use sha2::Digest as _;
        let got = match self.algorithm() {
            Algorithm::Sha256 => hex::encode(sha2::Sha256::digest(bytes)),
            Algorithm::Sha512 => hex::encode(sha2::Sha512::digest(bytes)),
        };
        got == self.hex()
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        let bad = || DigestError(s.chars().take(200).collect());
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(bad()),
        };
        let hex_ok = hex.len() == len && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(bad());
        }
        Ok(Digest(s.to_owned()))
    }
}

/// A manifest reference: a tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`) or a digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reference {0:?}: neither a tag [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}} nor a digest")]
pub struct ReferenceError(pub String);

impl Reference {
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            return s.parse().map(Reference::Digest).map_err(|_| ReferenceError(s.chars().take(200).collect()));
        }
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(ReferenceError(s.chars().take(200).collect()));
        }
        Ok(Reference::Tag(s.to_owned()))
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    )*};
}
display_as_str!(RepoName, Digest);

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => f.write_str(d.as_str()),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["alpine", "library/alpine", "quay.io/keycloak/keycloak", "a/b__c/d-e", "a--b", "x.y_z", "0"] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok} should parse");
        }
        for bad in [
            "", "/a", "a/", "a//b", "A", "a/../b", "..", "a/./b", ".a", "a.", "a_", "a___b", "a-", "-a", "a b",
            "a%2fb", "a:b", "a..b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} should not parse");
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(NameError::TooLong));
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
    }

    #[test]
    fn name_prefixes() {
        let n: RepoName = "quay.io/keycloak/keycloak".parse().unwrap();
        assert_eq!(n.strip_first().unwrap().as_str(), "keycloak/keycloak");
        let p: RepoName = "quay-proxy".parse().unwrap();
        let mapped = n.strip_first().unwrap().with_prefix(&p).unwrap();
        assert_eq!(mapped.as_str(), "quay-proxy/keycloak/keycloak");
        assert_eq!(mapped.strip_prefix(&p).unwrap().as_str(), "keycloak/keycloak");
        let other: RepoName = "quay".parse().unwrap();
        assert!(mapped.strip_prefix(&other).is_none(), "a prefix matches whole segments only");
        assert!("alpine".parse::<RepoName>().unwrap().strip_first().is_none());
    }

    #[test]
    fn digests() {
        let hex64 = "a".repeat(64);
        assert!(format!("sha256:{hex64}").parse::<Digest>().is_ok());
        assert!(format!("sha512:{}", "0".repeat(128)).parse::<Digest>().is_ok());
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "g".repeat(64)),
            format!("md5:{hex64}"),
            hex64.clone(),
            "sha256:".to_owned(),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} should not parse");
        }
        let d = Digest::sha256_of(b"hello");
        assert_eq!(d.as_str(), "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
    }

    #[test]
    fn references() {
        assert_eq!("3.19".parse::<Reference>().unwrap(), Reference::Tag("3.19".into()));
        assert!("_x".parse::<Reference>().is_ok());
        assert!("a".repeat(128).parse::<Reference>().is_ok());
        assert!("a".repeat(129).parse::<Reference>().is_err());
        for bad in ["", ".x", "-x", "a/b", "a b", "sha256:zz", "x:y"] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} should not parse");
        }
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(d.parse::<Reference>().unwrap(), Reference::Digest(_)));
    }
}
