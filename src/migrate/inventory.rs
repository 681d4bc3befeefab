//! `regmux inventory`: what a registry really holds, image by image.
//!
//! Two sources give the same answer: the registry API (catalog, tags, manifests, a `HEAD` per blob),
//! or a `distribution` filesystem storage folder read without touching the registry. The storage
//! way matters for an old pull-through mirror: a blob `HEAD` on a distribution proxy downloads the blob
//! upstream, while reading its folder downloads nothing and needs no proxy switch-off.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, Method, StatusCode};

use super::{manifest_accept, parse_manifest, Completeness, ImageRecord, Parsed, PlatformRecord};
use crate::backend::{Answer, Backend};
use crate::registry::{Digest, RepoName};

/// Where an inventory reads from.
pub enum Source {
    Api(Arc<Backend>),
    /// The storage root (the folder that holds `docker/registry/v2`), and the backend's prefix logic.
    Storage {
        v2: PathBuf,
        backend: Arc<Backend>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{0}")]
    Backend(String),
    #[error("storage {path}: {message}")]
    Storage { path: String, message: String },
}

impl Source {
    /// A storage source; `dir` may be the `rootdirectory` of the registry or its `docker/registry/v2`.
    pub fn storage(dir: &Path, backend: Arc<Backend>) -> Result<Source, InventoryError> {
        for candidate in [dir.join("docker/registry/v2"), dir.to_path_buf()] {
            if candidate.join("repositories").is_dir() {
                return Ok(Source::Storage { v2: candidate, backend });
            }
        }
        Err(InventoryError::Storage {
            path: dir.display().to_string(),
            message: "no docker/registry/v2/repositories folder: not a distribution filesystem storage".into(),
        })
    }

    fn backend(&self) -> &Backend {
        match self {
            Source::Api(b) | Source::Storage { backend: b, .. } => b,
        }
    }

    /// Repository names as clients know them (the backend's prefix removed), sorted.
    pub async fn repositories(&self) -> Result<Vec<RepoName>, InventoryError> {
        let raw = match self {
            Source::Api(b) => api_list(b, "/v2/_catalog?n=1000".into(), None, "repositories").await?,
            Source::Storage { v2, .. } => {
                let mut out = Vec::new();
                walk_repositories(&v2.join("repositories"), String::new(), &mut out)
                    .map_err(|e| InventoryError::Storage { path: v2.display().to_string(), message: e.to_string() })?;
                out
            }
        };
        let mut names: Vec<RepoName> =
            raw.iter().filter_map(|r| r.parse().ok()).filter_map(|r| self.backend().unmap_name(&r)).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>, InventoryError> {
        let mapped = self.backend().map_name(repo).map_err(|e| InventoryError::Backend(e.to_string()))?;
        let mut tags = match self {
            // A repository in the catalog whose tag list fails has no tags to inventory.
            Source::Api(b) => {
                api_list(b, format!("/v2/{mapped}/tags/list"), Some(&mapped), "tags").await.unwrap_or_default()
            }
            Source::Storage { v2, .. } => {
                let dir = v2.join("repositories").join(mapped.as_str()).join("_manifests/tags");
                let mut out = Vec::new();
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.path().join("current/link").is_file() {
                            out.push(e.file_name().to_string_lossy().into_owned());
                        }
                    }
                }
                out
            }
        };
        tags.sort();
        Ok(tags)
    }

    /// A manifest's digest and bytes, by tag or digest; `None` when absent.
    pub async fn manifest(&self, repo: &RepoName, reference: &str) -> Result<Option<(Digest, Bytes)>, InventoryError> {
        let b = self.backend();
        let mapped = b.map_name(repo).map_err(|e| InventoryError::Backend(e.to_string()))?;
        match self {
            Source::Api(_) => {
                let path = format!("/v2/{mapped}/manifests/{reference}");
                match b.fetch(&Method::GET, &path, Some(&mapped), &manifest_accept()).await {
                    Answer::Found(resp) if resp.status() == StatusCode::OK => {
                        let bytes = resp.bytes().await.map_err(|e| InventoryError::Backend(e.to_string()))?;
                        let digest = match reference.parse::<Digest>() {
                            Ok(d) if d.matches(&bytes) => d,
                            Ok(d) => return Err(InventoryError::Backend(format!("{repo}@{d}: bytes do not match"))),
                            Err(_) => Digest::sha256_of(&bytes),
                        };
                        Ok(Some((digest, bytes)))
                    }
                    Answer::Found(_) | Answer::Missing(_) => Ok(None),
                    Answer::Failed(e) => Err(InventoryError::Backend(format!("{repo}:{reference}: {e}"))),
                }
            }
            Source::Storage { v2, .. } => {
                let repo_dir = v2.join("repositories").join(mapped.as_str()).join("_manifests");
                let digest = match reference.parse::<Digest>() {
                    Ok(d) => d,
                    Err(_) => match read_link(&repo_dir.join("tags").join(reference).join("current/link")) {
                        Some(d) => d,
                        None => return Ok(None),
                    },
                };
                if !repo_dir.join("revisions").join(revision_path(&digest)).join("link").is_file() {
                    return Ok(None);
                }
                match std::fs::read(blob_data(v2, &digest)) {
                    Ok(bytes) if digest.matches(&bytes) => Ok(Some((digest, Bytes::from(bytes)))),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Whether the registry can serve this blob in this repository.
    pub async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, InventoryError> {
        let b = self.backend();
        let mapped = b.map_name(repo).map_err(|e| InventoryError::Backend(e.to_string()))?;
        match self {
            Source::Api(_) => {
                let path = format!("/v2/{mapped}/blobs/{digest}");
                match b.fetch(&Method::HEAD, &path, Some(&mapped), &HeaderMap::new()).await {
                    Answer::Found(r) => Ok(r.status() == StatusCode::OK),
                    Answer::Missing(_) => Ok(false),
                    Answer::Failed(e) => Err(InventoryError::Backend(format!("{repo}@{digest}: {e}"))),
                }
            }
            Source::Storage { v2, .. } => {
                let link = v2
                    .join("repositories")
                    .join(mapped.as_str())
                    .join("_layers")
                    .join(revision_path(digest))
                    .join("link");
                Ok(link.is_file() && blob_data(v2, digest).is_file())
            }
        }
    }
}

/// `sha256:abcd…` → `sha256/abcd…`.
fn revision_path(d: &Digest) -> PathBuf {
    let (alg, hex) = d.as_str().split_once(':').unwrap_or(("sha256", d.as_str()));
    Path::new(alg).join(hex)
}

fn blob_data(v2: &Path, d: &Digest) -> PathBuf {
    let (alg, hex) = d.as_str().split_once(':').unwrap_or(("sha256", d.as_str()));
    v2.join("blobs").join(alg).join(&hex[..2.min(hex.len())]).join(hex).join("data")
}

fn read_link(path: &Path) -> Option<Digest> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Repositories are the folders that hold `_manifests`; a repository can contain others (`a/b`, `a/b/c`).
fn walk_repositories(dir: &Path, prefix: String, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('_') {
            continue;
        }
        let full = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if e.path().join("_manifests").is_dir() {
            out.push(full.clone());
        }
        walk_repositories(&e.path(), full, out)?;
    }
    Ok(())
}

/// Read a paginated list (`repositories` of the catalog or `tags` of a repository), following `Link`.
async fn api_list(
    b: &Backend,
    first: String,
    repo: Option<&RepoName>,
    field: &str,
) -> Result<Vec<String>, InventoryError> {
    let mut out = Vec::new();
    let mut next = Some(first);
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        if pages > 10_000 {
            break;
        }
        let resp = match b.fetch(&Method::GET, &path, repo, &HeaderMap::new()).await {
            Answer::Found(r) => r,
            Answer::Missing(s) => return Err(InventoryError::Backend(format!("{path}: {s}"))),
            Answer::Failed(e) => return Err(InventoryError::Backend(format!("{path}: {e}"))),
        };
        next = resp
            .headers()
            .get(http::header::LINK)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.trim().strip_prefix('<')?.split_once('>').map(|(t, _)| t.to_owned()))
            .filter(|t| t.starts_with("/v2/"));
        let v: serde_json::Value = resp.json_bytes().await.map_err(InventoryError::Backend)?;
        if let Some(items) = v.get(field).and_then(|x| x.as_array()) {
            out.extend(items.iter().filter_map(|x| x.as_str().map(str::to_owned)));
        }
    }
    Ok(out)
}

trait JsonBytes {
    async fn json_bytes(self) -> Result<serde_json::Value, String>;
}

impl JsonBytes for reqwest::Response {
    async fn json_bytes(self) -> Result<serde_json::Value, String> {
        let b = self.bytes().await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&b).map_err(|e| e.to_string())
    }
}

/// Inventory one image (a tag): its manifest, each platform's, and which blobs are present.
pub async fn image(src: &Source, repo: &RepoName, tag: &str) -> Result<Option<ImageRecord>, InventoryError> {
    let Some((digest, bytes)) = src.manifest(repo, tag).await? else { return Ok(None) };
    let mut rec = ImageRecord {
        repository: repo.to_string(),
        tag: tag.to_owned(),
        digest: digest.to_string(),
        status: Completeness::Complete,
        platforms: Vec::new(),
        missing: Vec::new(),
        blobs: 0,
        bytes: 0,
    };
    let mut manifests = vec![(digest, bytes)];
    let mut present = 0usize;
    let mut seen = BTreeSet::new();
    while let Some((_, bytes)) = manifests.pop() {
        match parse_manifest(&bytes).map_err(InventoryError::Backend)? {
            Parsed::Index(children) => {
                for (child, platform) in children {
                    rec.platforms.push(PlatformRecord { platform, digest: child.to_string() });
                    match src.manifest(repo, child.as_str()).await? {
                        Some(m) => manifests.push(m),
                        None => rec.missing.push(child.to_string()),
                    }
                }
            }
            Parsed::Image(blobs) => {
                for (d, size) in blobs {
                    if !seen.insert(d.clone()) {
                        continue;
                    }
                    rec.blobs += 1;
                    rec.bytes += size;
                    if src.has_blob(repo, &d).await? {
                        present += 1;
                    } else {
                        rec.missing.push(d.to_string());
                    }
                }
            }
        }
    }
    rec.status = if rec.missing.is_empty() {
        Completeness::Complete
    } else if present == 0 {
        Completeness::ManifestOnly
    } else {
        Completeness::Partial
    };
    Ok(Some(rec))
}

/// The whole inventory, repositories matching `glob` (all when `None`), `concurrency` images at once.
pub async fn inventory(
    src: &Source,
    glob: Option<&str>,
    concurrency: usize,
) -> Result<Vec<ImageRecord>, InventoryError> {
    let repos: Vec<RepoName> = src
        .repositories()
        .await?
        .into_iter()
        .filter(|r| glob.is_none_or(|g| super::glob_match(g, r.as_str())))
        .collect();
    let mut work = Vec::new();
    for r in &repos {
        for t in src.tags(r).await? {
            work.push((r.clone(), t));
        }
    }
    let results: Vec<Result<Option<ImageRecord>, InventoryError>> =
        stream::iter(work.iter().map(|(r, t)| image(src, r, t))).buffer_unordered(concurrency.max(1)).collect().await;
    let mut out = Vec::new();
    for r in results {
        if let Some(rec) = r? {
            out.push(rec);
        }
    }
    out.sort_by(|a, b| (&a.repository, &a.tag).cmp(&(&b.repository, &b.tag)));
    Ok(out)
}
