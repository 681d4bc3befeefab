//! The migration driver (`DESIGN.md`, "Migration"): [`inventory`] lists what a registry really holds
//! (through its API, or read-only from a `distribution` storage folder), and [`transfer`] brings images
//! into a route's target by digest, warming a Harbor proxy-cache project or copying into a registry
//! that accepts pushes.
//!
//! Everything moves by digest: a tag that moved upstream since the old mirror cached it (`mysql:8`)
//! cannot make the target serve different bytes than the old mirror did.

pub mod inventory;
#[cfg(test)]
pub(crate) mod stub;
pub mod transfer;

use serde::{Deserialize, Serialize};

use crate::registry::Digest;

/// Every manifest type a pull may meet; sent as separate `Accept` lines, as clients do.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

pub fn manifest_accept() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for t in MANIFEST_TYPES {
        h.append(http::header::ACCEPT, http::HeaderValue::from_static(t));
    }
    h
}

/// What a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An index / manifest list: child manifests, with their platform (`linux/arm64/v8`).
    Index(Vec<(Digest, String)>),
    /// An image manifest: its config and layers, with sizes.
    Image(Vec<(Digest, u64)>),
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

/// Parse an OCI or Docker schema2 manifest or index. Schema1 is not supported (it has no config
/// blob and distribution converts it anyway).
pub fn parse_manifest(bytes: &[u8]) -> Result<Parsed, String> {
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest JSON: {e}"))?;
    let digest = |d: &RawDescriptor| d.digest.parse::<Digest>().map_err(|e| e.to_string());
    if let Some(children) = raw.manifests {
        let mut out = Vec::new();
        for c in &children {
            let platform = c.platform.as_ref().map_or_else(String::new, |p| {
                let mut s = format!("{}/{}", p.os, p.architecture);
                if let Some(v) = &p.variant {
                    s.push('/');
                    s.push_str(v);
                }
                s
            });
            out.push((digest(c)?, platform));
        }
        return Ok(Parsed::Index(out));
    }
    if raw.config.is_none() && raw.layers.is_none() {
        return Err("neither an index nor an image manifest (schema1 is not supported)".into());
    }
    let mut blobs = Vec::new();
    for d in raw.config.iter().chain(raw.layers.iter().flatten()) {
        blobs.push((digest(d)?, d.size));
    }
    Ok(Parsed::Image(blobs))
}

/// How much of an image a registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Completeness {
    Complete,
    Partial,
    ManifestOnly,
}

/// One image of an inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub status: Completeness,
    /// For an index: each platform's manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformRecord>,
    /// Blobs (and child manifests) the registry lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformRecord {
    pub platform: String,
    pub digest: String,
}

/// `*` and `?` glob matching (for `--repo`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("library/*", "library/alpine"));
        assert!(glob_match("*", "a/b/c"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("library/*", "bitnami/redis"));
        assert!(glob_match("*redis*", "bitnami/redis-cluster"));
        assert!(!glob_match("a", "ab"));
    }

    #[test]
    fn manifests() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":10}},"layers":[{{"digest":"{}","size":20}}]}}"#,
            d('a'),
            d('b')
        );
        match parse_manifest(image.as_bytes()).unwrap() {
            Parsed::Image(b) => assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 30),
            other => panic!("{other:?}"),
        }
        let index = format!(
            r#"{{"manifests":[{{"digest":"{}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d('c')
        );
        assert_eq!(
            parse_manifest(index.as_bytes()).unwrap(),
            Parsed::Index(vec![(d('c').parse().unwrap(), "linux/arm64/v8".into())])
        );
        assert!(parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
    }
}
