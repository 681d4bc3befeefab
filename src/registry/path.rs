//! Request paths of the pull API, parsed into a typed [`RegistryPath`].
//!
//! Routes (distribution-spec "Endpoints"): `/v2/`, `/v2/_catalog`, `/v2/<name>/manifests/<reference>`,
//! `/v2/<name>/blobs/<digest>`, `/v2/<name>/tags/list`, `/v2/<name>/referrers/<digest>`. A name has any
//! number of segments, so the path is split from the right: the endpoint keyword is always the
//! second-to-last segment. Handlers never see the raw path.

use super::types::{Digest, DigestError, NameError, Reference, ReferenceError, RepoName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryPath {
    /// `/v2/`: the API version check.
    Base,
    Catalog,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    TagsList {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("not an endpoint of the pull API regmux serves")]
    NotAnEndpoint,
    #[error("blob uploads are not supported: regmux is a pull-only proxy")]
    Upload,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// Parse the path part of a request URI (no query string).
pub fn parse_path(path: &str) -> Result<RegistryPath, PathError> {
    let rest = match path {
        "/v2" | "/v2/" => return Ok(RegistryPath::Base),
        _ => path.strip_prefix("/v2/").ok_or(PathError::NotAnEndpoint)?,
    };
    if rest == "_catalog" {
        return Ok(RegistryPath::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n < 3 {
        return Err(PathError::NotAnEndpoint);
    }
    let name_of = |end: usize| segs[..end].join("/").parse::<RepoName>();
    // `/v2/<name>/blobs/uploads/` and `/v2/<name>/blobs/uploads/<uuid>` belong to the push API.
    if segs[n - 2] == "uploads" && segs[n - 3] == "blobs" || segs[n - 1] == "uploads" && segs[n - 2] == "blobs" {
        return Err(PathError::Upload);
    }
    let (keyword, last) = (segs[n - 2], segs[n - 1]);
    match keyword {
        "tags" if last == "list" => Ok(RegistryPath::TagsList { name: name_of(n - 2)? }),
        "manifests" => {
            let name = name_of(n - 2)?;
            Ok(RegistryPath::Manifest { name, reference: last.parse()? })
        }
        "blobs" => {
            let name = name_of(n - 2)?;
            Ok(RegistryPath::Blob { name, digest: last.parse()? })
        }
        "referrers" => {
            let name = name_of(n - 2)?;
            Ok(RegistryPath::Referrers { name, digest: last.parse()? })
        }
        _ => Err(PathError::NotAnEndpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_every_endpoint() {
        assert_eq!(parse_path("/v2/"), Ok(RegistryPath::Base));
        assert_eq!(parse_path("/v2"), Ok(RegistryPath::Base));
        assert_eq!(parse_path("/v2/_catalog"), Ok(RegistryPath::Catalog));
        match parse_path("/v2/quay.io/keycloak/keycloak/manifests/24.0").unwrap() {
            RegistryPath::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "quay.io/keycloak/keycloak");
                assert_eq!(reference, Reference::Tag("24.0".into()));
            }
            other => panic!("{other:?}"),
        }
        let p = format!("/v2/library/alpine/blobs/{}", d('a'));
        assert!(matches!(parse_path(&p), Ok(RegistryPath::Blob { .. })));
        let p = format!("/v2/a/referrers/{}", d('b'));
        assert!(matches!(parse_path(&p), Ok(RegistryPath::Referrers { .. })));
        assert!(matches!(parse_path("/v2/a/b/tags/list"), Ok(RegistryPath::TagsList { .. })));
        // A repository may itself be called "manifests" or "blobs".
        match parse_path("/v2/manifests/blobs/manifests/latest").unwrap() {
            RegistryPath::Manifest { name, .. } => assert_eq!(name.as_str(), "manifests/blobs"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_paths() {
        use PathError::*;
        type Case = (&'static str, fn(&PathError) -> bool);
        let cases: &[Case] = &[
            ("/v1/", |e| *e == NotAnEndpoint),
            ("/", |e| *e == NotAnEndpoint),
            ("/v2/alpine", |e| *e == NotAnEndpoint),
            ("/v2/alpine/manifests", |e| *e == NotAnEndpoint),
            ("/v2/a/tags/other", |e| *e == NotAnEndpoint),
            ("/v2/a/unknown/x", |e| *e == NotAnEndpoint),
            ("/v2/../etc/manifests/x", |e| matches!(e, Name(_))),
            ("/v2/a//b/manifests/x", |e| matches!(e, Name(_))),
            ("/v2/A/manifests/x", |e| matches!(e, Name(_))),
            ("/v2//manifests/x", |e| matches!(e, Name(_))),
            ("/v2/a%2fb/manifests/x", |e| matches!(e, Name(_))),
            ("/v2/a/blobs/sha256:xyz", |e| matches!(e, Digest(_))),
            ("/v2/a/referrers/latest", |e| matches!(e, Digest(_))),
            ("/v2/a/manifests/-bad", |e| matches!(e, Reference(_))),
            ("/v2/a/manifests/", |e| matches!(e, Reference(_))),
            ("/v2/a/blobs/uploads/", |e| *e == Upload),
            ("/v2/a/blobs/uploads/1234-uuid", |e| *e == Upload),
        ];
        for (path, want) in cases {
            let got = parse_path(path);
            assert!(got.as_ref().is_err_and(want), "{path}: {got:?}");
        }
        let long = format!("/v2/{}/manifests/x", "a".repeat(256));
        assert_eq!(parse_path(&long), Err(Name(NameError::TooLong)));
    }
}
