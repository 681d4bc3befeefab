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

/// Entries asked for per page of the catalog and of a tag list (`?n=`); a registry may send fewer.
pub const PAGE: usize = 1000;

/// Where an inventory reads from.
pub enum Source {
    /// The registry API, `page` entries per list request (see [`Source::api`]).
    Api { backend: Arc<Backend>, page: usize },
    /// The storage root (the folder that holds `docker/registry/v2`), and the backend's prefix logic.
    Storage { v2: PathBuf, backend: Arc<Backend> },
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{0}")]
    Backend(String),
    #[error("storage {path}: {message}")]
    Storage { path: String, message: String },
}

impl Source {
    pub fn api(backend: Arc<Backend>) -> Source {
        Source::Api { backend, page: PAGE }
    }

    /// An API source asking for `page` entries per list request (tests force pagination with it).
    pub fn api_with_page(backend: Arc<Backend>, page: usize) -> Source {
        Source::Api { backend, page: page.max(1) }
    }

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
            Source::Api { backend: b, .. } | Source::Storage { backend: b, .. } => b,
        }
    }

    /// Repository names as clients know them (the backend's prefix removed), sorted.
    pub async fn repositories(&self) -> Result<Vec<RepoName>, InventoryError> {
        let raw = match self {
            Source::Api { backend, page } => {
                api_list(backend, format!("/v2/_catalog?n={page}"), None, "repositories").await?
            }
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
            Source::Api { backend, page } => {
                match api_list(backend, format!("/v2/{mapped}/tags/list?n={page}"), Some(&mapped), "tags").await {
                    Ok(tags) => tags,
                    // distribution answers NAME_UNKNOWN for a repository of its catalog that has no
                    // tag (only manifests pulled by digest, say): no tags, as its storage folder says.
                    // Any other failure is an error, never an inventory silently short of images.
                    Err(ListError::NotFound(_)) => Vec::new(),
                    Err(e) => return Err(InventoryError::Backend(format!("tags of {repo}: {e}"))),
                }
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
            Source::Api { .. } => {
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
            Source::Api { .. } => {
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

#[derive(Debug, thiserror::Error)]
enum ListError {
    /// The first page answered 404 (`NAME_UNKNOWN` for a tag list).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
}

impl From<ListError> for InventoryError {
    fn from(e: ListError) -> InventoryError {
        InventoryError::Backend(e.to_string())
    }
}

/// The next page of a list: the `Link: <…>; rel="next"` target, a path (`/v2/…`) or an absolute URL
/// (which the backend only follows on its own origin). `Ok(None)` without a next page.
fn next_page(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(link) = headers.get(http::header::LINK) else { return Ok(None) };
    let link = link.to_str().map_err(|_| "a Link header that is not text".to_owned())?;
    for part in link.split(',') {
        let Some((target, params)) = part.trim().strip_prefix('<').and_then(|p| p.split_once('>')) else { continue };
        let rel_next = params.split(';').any(|p| {
            let p = p.trim().to_ascii_lowercase();
            p == "rel=\"next\"" || p == "rel=next"
        });
        if !rel_next && !params.trim().is_empty() {
            continue;
        }
        if target.starts_with("/v2/") {
            return Ok(Some(target.to_owned()));
        }
        return match reqwest::Url::parse(target) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.path().starts_with("/v2/") => {
                Ok(Some(url.to_string()))
            }
            _ => Err(format!("a next-page Link the inventory cannot follow: {target}")),
        };
    }
    Ok(None)
}

/// Read a paginated list (`repositories` of the catalog or `tags` of a repository), following `Link`.
async fn api_list(b: &Backend, first: String, repo: Option<&RepoName>, field: &str) -> Result<Vec<String>, ListError> {
    let mut out = Vec::new();
    let mut next = Some(first);
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        if pages > 100_000 {
            return Err(ListError::Other(format!("{path}: more than 100000 pages")));
        }
        let resp = match b.fetch(&Method::GET, &path, repo, &HeaderMap::new()).await {
            Answer::Found(r) => r,
            Answer::Missing(s) if s == StatusCode::NOT_FOUND && pages == 1 => {
                return Err(ListError::NotFound(format!("{path}: {s}")))
            }
            Answer::Missing(s) => return Err(ListError::Other(format!("{path}: {s}"))),
            Answer::Failed(e) => return Err(ListError::Other(format!("{path}: {e}"))),
        };
        next = next_page(resp.headers()).map_err(|e| ListError::Other(format!("{path}: {e}")))?;
        let v: serde_json::Value = resp.json_bytes().await.map_err(|e| ListError::Other(format!("{path}: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stub::{Reply, Stub};
    use std::sync::OnceLock;

    /// A registry whose catalog has two pages, the next one named by an absolute URL (as some
    /// registries and proxies send; distribution sends a path), and whose tag lists answer
    /// as `tags` says.
    async fn paged(tags: fn(&str) -> Reply, next_host: Option<&'static str>) -> Stub {
        let url = Arc::new(OnceLock::<String>::new());
        let own = url.clone();
        let stub = Stub::start(move |_, path| {
            let base = next_host.map_or_else(|| own.get().cloned().unwrap_or_default(), str::to_owned);
            match path {
                "/v2/_catalog?n=2" => Reply::ok(r#"{"repositories":["a/one","a/two"]}"#)
                    .header("Link", &format!("<{base}/v2/_catalog?last=a%2Ftwo&n=2>; rel=\"next\"")),
                "/v2/_catalog?last=a%2Ftwo&n=2" => Reply::ok(r#"{"repositories":["b/three"]}"#),
                p if p.contains("/tags/list") => tags(p),
                _ => Reply::status(404),
            }
        })
        .await;
        url.set(stub.url.clone()).unwrap();
        stub
    }

    #[tokio::test]
    async fn an_absolute_next_link_on_the_same_host_is_followed() {
        let stub = paged(|_| Reply::ok(r#"{"tags":["1"]}"#), None).await;
        let src = Source::api_with_page(stub.backend("old"), 2);
        let repos: Vec<String> = src.repositories().await.unwrap().iter().map(|r| r.to_string()).collect();
        assert_eq!(repos, ["a/one", "a/two", "b/three"], "the second page was read");
    }

    #[tokio::test]
    async fn a_next_link_to_another_host_is_an_error_not_a_short_list() {
        let stub = paged(|_| Reply::ok(r#"{"tags":["1"]}"#), Some("http://elsewhere.invalid:5000")).await;
        let src = Source::api_with_page(stub.backend("old"), 2);
        assert!(src.repositories().await.is_err());
    }

    #[tokio::test]
    async fn a_failing_tag_list_fails_the_inventory() {
        let stub = paged(
            |p| match p {
                p if p.starts_with("/v2/b/three/") => Reply::status(500),
                // distribution's answer for a repository without tags
                p if p.starts_with("/v2/a/two/") => {
                    Reply { body: br#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#.to_vec(), ..Reply::status(404) }
                }
                _ => Reply::ok(r#"{"tags":["1"]}"#),
            },
            None,
        )
        .await;
        let src = Source::api_with_page(stub.backend("old"), 2);
        assert_eq!(src.tags(&"a/one".parse().unwrap()).await.unwrap(), ["1"]);
        assert!(src.tags(&"a/two".parse().unwrap()).await.unwrap().is_empty(), "no tags is not a failure");
        let e = src.tags(&"b/three".parse().unwrap()).await.expect_err("a 500 is not an empty list");
        assert!(e.to_string().contains("b/three"), "{e}");
        let e = inventory(&src, None, 4).await.expect_err("the whole inventory fails");
        assert!(e.to_string().contains("500"), "{e}");
    }
}
