//! `regmux migrate`: bring images into a route's target by digest.
//!
//! - `warm` (a Harbor proxy-cache project, which refuses pushes): GET the manifest by digest through the
//!   target, GET every blob in full (digest verified), then confirm the target serves the manifest by
//!   digest, polling with backoff (Harbor stores a manifest only after its blobs).
//! - `copy` (a registry that accepts pushes): blobs first (cross-repository mount when the blob is known
//!   to be in another repository of the target, because this run pushed it there or found it there,
//!   else a streamed upload that the target verifies), then manifests by digest (children of an index
//!   first), then the tag — byte-identical digests. An image whose blobs are not all on a source fails
//!   before any of its bytes are sent, naming every missing digest (a dry run checks the same).
//!
//! What the target already has is skipped, so a re-run after an interruption resumes; the blobs of what
//! it already has become mount sources, so a re-run does not upload a shared layer again. A tag that
//! points elsewhere on the target is never overwritten: the old mirror's digest is what moves, and the
//! report says the tag is stale.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Serialize;

use super::{manifest_accept, parse_manifest, Parsed};
use crate::backend::{Answer, Backend};
use crate::config::BackendKind;
use crate::registry::{Digest, RepoName, CONTENT_DIGEST_HEADER};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Warm,
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Manifest,
    Blob,
}

/// One thing to bring into the target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    pub repository: RepoName,
    pub tag: Option<String>,
    pub digest: Digest,
    pub kind: Kind,
}

impl Item {
    pub fn label(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}:{t}@{}", self.repository, self.digest),
            None => format!("{}@{}", self.repository, self.digest),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub moved: Vec<Entry>,
    pub already: Vec<Entry>,
    pub failed: Vec<Entry>,
    /// Images whose tag on the target points to another digest than the one moved.
    pub stale_tags: Vec<Entry>,
    #[serde(skip)]
    pub digests: BTreeSet<String>,
}

/// The shared state of one run.
pub struct Migration {
    pub mode: Mode,
    pub dest: Arc<Backend>,
    pub sources: Vec<Arc<Backend>>,
    pub dry_run: bool,
    /// Bytes moved so far, counted per chunk while they stream (for progress).
    pub bytes: Arc<AtomicU64>,
    /// Warm: the first repository this run warmed each blob in.
    pushed: Mutex<HashMap<Digest, RepoName>>,
    /// Copy: blobs known to be in the target, and the (mapped) repositories known to hold each, for
    /// cross-repository mounts: pushed or mounted by this run, or found there (a blob `HEAD`, or a
    /// manifest the target already had).
    in_target: Mutex<HashMap<Digest, BTreeSet<RepoName>>>,
    /// One lock per blob digest: images copied concurrently that share a layer wait for the first
    /// upload and then mount it, instead of each uploading it.
    blob_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Manifests read from a source in this run (the tag step needs them again).
    manifests: Mutex<HashMap<Digest, (Bytes, HeaderValue)>>,
    /// Warm mode: blobs warmed in a second repository after a first one (mapped name, path, digest),
    /// warmed once more after the first pass. A proxy cache (distribution's `inflight` set; Harbor
    /// likewise) stores a blob in the background once per digest at a time, and a request for the same
    /// digest in another repository while that store runs gets the bytes but no copy of its own.
    rewarm: Mutex<Vec<(RepoName, String, Digest)>>,
    /// Warm mode: how [`Migration::confirm`] polls.
    confirm_backoff: Backoff,
}

/// Bounded polling: `attempts` tries, sleeping `first`, then twice as long each time up to `max`.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    max: Duration,
    attempts: u32,
}

/// About 24 s in all before a warm is declared unconfirmed.
const CONFIRM_BACKOFF: Backoff =
    Backoff { first: Duration::from_millis(250), max: Duration::from_secs(8), attempts: 8 };

/// How one item went.
enum Done {
    Moved { bytes: u64, digests: Vec<Digest>, stale: Option<String> },
    Already { digests: Vec<Digest>, stale: Option<String> },
}

impl Migration {
    pub fn new(mode: Mode, dest: Arc<Backend>, sources: Vec<Arc<Backend>>, dry_run: bool) -> Migration {
        Migration {
            mode,
            dest,
            sources,
            dry_run,
            bytes: Arc::default(),
            pushed: Mutex::default(),
            in_target: Mutex::default(),
            blob_locks: Mutex::default(),
            manifests: Mutex::default(),
            rewarm: Mutex::default(),
            confirm_backoff: CONFIRM_BACKOFF,
        }
    }

    #[cfg(test)]
    fn with_confirm_backoff(mut self, first: Duration, max: Duration, attempts: u32) -> Migration {
        self.confirm_backoff = Backoff { first, max, attempts };
        self
    }

    /// Copy: `mapped` (a repository of the target) holds `digest`; a mount source from now on.
    fn remember(&self, digest: &Digest, mapped: &RepoName) {
        if let Ok(mut m) = self.in_target.lock() {
            m.entry(digest.clone()).or_default().insert(mapped.clone());
        }
    }

    /// A repository of the target other than `mapped` known to hold the blob.
    fn mount_source(&self, digest: &Digest, mapped: &RepoName) -> Option<RepoName> {
        let m = self.in_target.lock().ok()?;
        m.get(digest)?.iter().find(|r| *r != mapped).cloned()
    }

    /// Whether `mapped` is known to hold the blob.
    fn known_in(&self, digest: &Digest, mapped: &RepoName) -> bool {
        self.in_target.lock().is_ok_and(|m| m.get(digest).is_some_and(|s| s.contains(mapped)))
    }

    /// Copy: the target already holds this manifest, so it holds everything it refers to (a registry
    /// accepts a manifest only then): record its blobs (and its children's) as mount sources. Best
    /// effort: a manifest it cannot read only costs a later upload.
    async fn remember_blobs_of(&self, repo: &RepoName, bytes: Bytes) {
        let Ok(mapped) = self.dest.map_name(repo) else { return };
        let mut stack = vec![(bytes, 0)];
        while let Some((bytes, depth)) = stack.pop() {
            match parse_manifest(&bytes) {
                Ok(Parsed::Image(blobs)) => blobs.iter().for_each(|(d, _)| self.remember(d, &mapped)),
                Ok(Parsed::Index(children)) if depth < 2 => {
                    for (child, _) in children {
                        if let Ok(Some((b, _))) = get_manifest(&self.dest, repo, &child).await {
                            stack.push((b, depth + 1));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Bring every item over, `concurrency` at once; `tick` is called after each item.
    pub async fn run(&self, items: Vec<Item>, concurrency: usize, tick: &(dyn Fn(&Item) + Sync)) -> Summary {
        let results: Vec<(Item, Result<Done, String>)> = stream::iter(items.into_iter().map(|item| async move {
            let r = self.one(&item).await;
            tick(&item);
            (item, r)
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
        let rewarm = self.rewarm.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        for (mapped, path, digest) in rewarm {
            if let Err(e) = self.warm_blob(&mapped, &path, &digest).await {
                tracing::warn!(repository = %mapped, %digest, "second warm of a shared blob failed: {e}");
            }
        }
        let mut s = Summary::default();
        for (item, r) in results {
            let image = item.label();
            match r {
                Ok(Done::Moved { bytes, digests, stale }) => {
                    s.digests.extend(digests.iter().map(|d| d.to_string()));
                    if let Some(st) = stale {
                        s.stale_tags.push(Entry { image: image.clone(), reason: Some(st), bytes: 0 });
                    }
                    s.moved.push(Entry { image, reason: None, bytes });
                }
                Ok(Done::Already { digests, stale }) => {
                    s.digests.extend(digests.iter().map(|d| d.to_string()));
                    if let Some(st) = stale {
                        s.stale_tags.push(Entry { image: image.clone(), reason: Some(st), bytes: 0 });
                    }
                    s.already.push(Entry { image, reason: None, bytes: 0 });
                }
                Err(reason) => s.failed.push(Entry { image, reason: Some(reason), bytes: 0 }),
            }
        }
        for list in [&mut s.moved, &mut s.already, &mut s.failed, &mut s.stale_tags] {
            list.sort_by(|a, b| a.image.cmp(&b.image));
        }
        s
    }

    async fn one(&self, item: &Item) -> Result<Done, String> {
        let mut digests = Vec::new();
        let moved = match item.kind {
            Kind::Blob => self.blob(&item.repository, &item.digest, false).await.map_err(String::from)?,
            Kind::Manifest => self.manifest(&item.repository, &item.digest, &mut digests).await?,
        };
        digests.push(item.digest.clone());
        let stale = match &item.tag {
            Some(tag) if item.kind == Kind::Manifest => self.tag(&item.repository, tag, &item.digest).await?,
            _ => None,
        };
        Ok(match moved {
            Some(bytes) => Done::Moved { bytes, digests, stale },
            None => Done::Already { digests, stale },
        })
    }

    /// Bring one manifest (and what it refers to) over. `Some(bytes moved)`, or `None` if the target
    /// already had all of it.
    async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        digests: &mut Vec<Digest>,
    ) -> Result<Option<u64>, String> {
        if self.mode == Mode::Copy {
            if let Some((bytes, _)) = get_manifest(&self.dest, repo, digest).await? {
                self.remember_blobs_of(repo, bytes).await;
                return Ok(None);
            }
        }
        let (bytes, content_type) = match self.mode {
            Mode::Copy => self.source_manifest(repo, digest).await?,
            Mode::Warm => self.dest_manifest(repo, digest).await?,
        };
        let mut moved = 0u64;
        let mut any = self.mode == Mode::Copy;
        match parse_manifest(&bytes)? {
            Parsed::Index(children) => {
                // Every child is tried, so the reason names everything that is missing.
                let mut failures = Vec::new();
                for (child, _) in children {
                    match Box::pin(self.manifest(repo, &child, digests)).await {
                        Ok(Some(b)) => {
                            moved += b;
                            any = true;
                        }
                        Ok(None) => {}
                        Err(e) => failures.push(format!("{child}: {e}")),
                    }
                    digests.push(child);
                }
                if !failures.is_empty() {
                    return Err(failures.join("; "));
                }
            }
            Parsed::Image(blobs) => {
                let lacking = match self.mode {
                    Mode::Copy => Some(self.copy_precheck(repo, &blobs).await?),
                    Mode::Warm => None,
                };
                let mut missing = Vec::new();
                let mut other = Vec::new();
                for (d, _) in blobs {
                    if lacking.as_ref().is_some_and(|l| !l.contains(&d)) {
                        digests.push(d);
                        continue;
                    }
                    match self.blob(repo, &d, lacking.is_some()).await {
                        Ok(Some(b)) => {
                            moved += b;
                            any = true;
                        }
                        Ok(None) => {}
                        // Warm: a blob the target cannot fetch does not stop the others.
                        Err(BlobError::Missing(e)) if self.mode == Mode::Warm => missing.push((d.clone(), e)),
                        Err(BlobError::Other(e)) if self.mode == Mode::Warm => other.push(e),
                        Err(BlobError::Missing(e) | BlobError::Other(e)) => return Err(e),
                    }
                    digests.push(d);
                }
                if !missing.is_empty() || !other.is_empty() {
                    let mut reason = Vec::new();
                    if !missing.is_empty() {
                        let list: Vec<&str> = missing.iter().map(|(d, _)| d.as_str()).collect();
                        reason.push(format!(
                            "the target cannot fetch {} blob(s): {} ({})",
                            missing.len(),
                            list.join(", "),
                            missing[0].1
                        ));
                    }
                    reason.extend(other);
                    return Err(reason.join("; "));
                }
            }
        }
        if self.dry_run {
            return Ok(any.then_some(moved));
        }
        match self.mode {
            Mode::Copy => self.put_manifest(repo, digest.as_str(), &bytes, &content_type).await?,
            Mode::Warm => self.confirm(repo, digest).await?,
        }
        Ok(any.then_some(moved))
    }

    /// Copy, before anything of an image is sent: which of its blobs the target lacks (those it has
    /// become mount sources); an error naming every blob that is neither on the target, nor known in
    /// another of its repositories, nor on any source. A dry run checks the same.
    async fn copy_precheck(&self, repo: &RepoName, blobs: &[(Digest, u64)]) -> Result<BTreeSet<Digest>, String> {
        let mapped = self.dest.map_name(repo).map_err(|e| e.to_string())?;
        let mut lacking = BTreeSet::new();
        let mut missing = Vec::new();
        for (d, _) in blobs {
            if lacking.contains(d) {
                continue;
            }
            if self.dest_has_blob(&mapped, d).await {
                self.remember(d, &mapped);
                continue;
            }
            if self.mount_source(d, &mapped).is_none() && !self.source_has_blob(repo, d).await? {
                missing.push(d.as_str());
            }
            lacking.insert(d.clone());
        }
        if !missing.is_empty() {
            let names: Vec<&str> = self.sources.iter().map(|s| &*s.name).collect();
            return Err(format!(
                "{} blob(s) missing on every source ({}): {}",
                missing.len(),
                names.join(", "),
                missing.join(", ")
            ));
        }
        Ok(lacking)
    }

    /// Whether the target answers a blob `HEAD` with 200.
    async fn dest_has_blob(&self, mapped: &RepoName, digest: &Digest) -> bool {
        let path = format!("/v2/{mapped}/blobs/{digest}");
        matches!(self.dest.fetch(&Method::HEAD, &path, Some(mapped), &HeaderMap::new()).await,
            Answer::Found(r) if r.status() == StatusCode::OK)
    }

    /// Whether any source holds the blob (a `HEAD`); an error if a source cannot answer.
    async fn source_has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, String> {
        let mut failed = Vec::new();
        for s in &self.sources {
            if s.kind == BackendKind::Harbor {
                // Harbor's proxy cache answers a blob HEAD with 404 until a GET has fetched the blob
                // (see proxy.rs): its HEAD cannot say "missing". The upload's GET will tell.
                return Ok(true);
            }
            let mapped = s.map_name(repo).map_err(|e| e.to_string())?;
            let path = format!("/v2/{mapped}/blobs/{digest}");
            match s.fetch(&Method::HEAD, &path, Some(&mapped), &HeaderMap::new()).await {
                Answer::Found(r) if r.status() == StatusCode::OK => return Ok(true),
                Answer::Found(_) | Answer::Missing(_) => {}
                Answer::Failed(e) => failed.push(format!("{}: {e}", s.name)),
            }
        }
        if failed.is_empty() {
            Ok(false)
        } else {
            Err(format!("blob {digest}: {}", failed.join("; ")))
        }
    }

    /// Bring one blob over; `None` if the target had it. `checked`: copy mode, the precheck found the
    /// target lacking it, so only what this run did since matters (no second `HEAD`).
    async fn blob(&self, repo: &RepoName, digest: &Digest, checked: bool) -> Result<Option<u64>, BlobError> {
        let lock = self
            .blob_locks
            .lock()
            .map_err(|e| BlobError::Other(e.to_string()))?
            .entry(digest.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let mapped = self.dest.map_name(repo).map_err(|e| BlobError::Other(e.to_string()))?;
        let path = format!("/v2/{mapped}/blobs/{digest}");
        if checked {
            // Another image of this run may have put it into the same repository meanwhile.
            if self.known_in(digest, &mapped) {
                return Ok(None);
            }
        } else {
            // A HEAD tells whether the target has the blob, except on a distribution proxy, where a
            // HEAD itself fetches the blob upstream (and answers 200): a warm target that is not Harbor
            // (whose HEAD answers 404 until a GET fetched the blob) is read in full every time.
            let head_is_honest = self.mode == Mode::Copy || self.dest.kind == BackendKind::Harbor;
            if head_is_honest && self.dest_has_blob(&mapped, digest).await {
                if self.mode == Mode::Copy {
                    self.remember(digest, &mapped);
                }
                return Ok(None);
            }
        }
        if self.dry_run {
            return Ok(Some(0));
        }
        let bytes = match self.mode {
            Mode::Warm => {
                let n = self.warm_blob(&mapped, &path, digest).await?;
                let first = self
                    .pushed
                    .lock()
                    .map_err(|e| BlobError::Other(e.to_string()))?
                    .entry(digest.clone())
                    .or_insert(repo.clone())
                    .clone();
                if first != *repo {
                    if let Ok(mut r) = self.rewarm.lock() {
                        r.push((mapped.clone(), path.clone(), digest.clone()));
                    }
                }
                n
            }
            Mode::Copy => self.copy_blob(repo, &mapped, digest).await.map_err(BlobError::Other)?,
        };
        Ok(Some(bytes))
    }

    /// GET a blob in full through the target (which then stores it), verifying its digest.
    async fn warm_blob(&self, mapped: &RepoName, path: &str, digest: &Digest) -> Result<u64, BlobError> {
        let resp = match self.dest.fetch(&Method::GET, path, Some(mapped), &HeaderMap::new()).await {
            Answer::Found(r) if r.status() == StatusCode::OK => r,
            Answer::Found(r) => {
                return Err(BlobError::Other(format!("target answered {} for blob {digest}", r.status())))
            }
            Answer::Missing(s) => return Err(BlobError::Missing(format!("target answered {s}"))),
            Answer::Failed(e) => return Err(BlobError::Other(format!("target, blob {digest}: {e}"))),
        };
        let mut hasher = Hasher::new();
        let mut n = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Other(format!("blob {digest}: {e}")))?;
            n += chunk.len() as u64;
            self.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            hasher.update(&chunk);
        }
        if hasher.hex() != digest.hex() {
            return Err(BlobError::Other(format!("blob {digest}: the target's bytes do not match the digest")));
        }
        Ok(n)
    }

    /// Put a blob into the target: mount it from a repository of the target known to hold it, or
    /// stream it from the first source that has it (the target checks the digest on the PUT).
    async fn copy_blob(&self, repo: &RepoName, mapped: &RepoName, digest: &Digest) -> Result<u64, String> {
        let scope = format!("repository:{mapped}:pull,push");
        let from = self.mount_source(digest, mapped);
        let mut post = format!("/v2/{mapped}/blobs/uploads/");
        if let Some(f) = &from {
            post.push_str(&format!("?mount={digest}&from={f}"));
        }
        let mut resp = self
            .dest
            .request(&Method::POST, &post, &scope, &HeaderMap::new(), None)
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() == StatusCode::CREATED && from.is_some() {
            self.remember(digest, mapped);
            return Ok(0);
        }
        if from.is_some() && resp.status() != StatusCode::ACCEPTED {
            // The mount itself was refused (e.g. 401/403: no pull right on the other repository, which
            // a registry checks for a mount): upload the blob instead.
            tracing::debug!(%digest, %mapped, status = %resp.status(), "mount refused; uploading");
            let plain = format!("/v2/{mapped}/blobs/uploads/");
            resp = self
                .dest
                .request(&Method::POST, &plain, &scope, &HeaderMap::new(), None)
                .await
                .map_err(|e| e.to_string())?;
        }
        if resp.status() != StatusCode::ACCEPTED {
            return Err(format!("target refused an upload to {mapped}: {}", resp.status()));
        }
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or("upload without Location")?
            .to_owned();
        let (src, size) = self.source_blob(repo, digest).await?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        if let Some(n) = size {
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let resp = self.dest.request_stream(&Method::PUT, &put, &scope, &h, src).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::CREATED {
            return Err(format!("target refused blob {digest}: {}", resp.status()));
        }
        self.remember(digest, mapped);
        Ok(size.unwrap_or(0))
    }

    /// The first source that has the blob, as a body to stream on, with its length.
    async fn source_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(reqwest::Body, Option<u64>), String> {
        let mut tried = Vec::new();
        for s in &self.sources {
            let mapped = s.map_name(repo).map_err(|e| e.to_string())?;
            match s.fetch(&Method::GET, &format!("/v2/{mapped}/blobs/{digest}"), Some(&mapped), &HeaderMap::new()).await
            {
                Answer::Found(r) if r.status() == StatusCode::OK => {
                    let len = r.content_length();
                    let moved = self.bytes.clone();
                    let counted = r.bytes_stream().inspect(move |c| {
                        if let Ok(c) = c {
                            moved.fetch_add(c.len() as u64, Ordering::Relaxed);
                        }
                    });
                    return Ok((reqwest::Body::wrap_stream(counted), len));
                }
                Answer::Found(r) => tried.push(format!("{}: {}", s.name, r.status())),
                Answer::Missing(st) => tried.push(format!("{}: {st}", s.name)),
                Answer::Failed(e) => tried.push(format!("{}: {e}", s.name)),
            }
        }
        Err(format!("blob {digest} is on no source ({})", tried.join("; ")))
    }

    async fn source_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(Bytes, HeaderValue), String> {
        if let Some(m) = self.manifests.lock().ok().and_then(|m| m.get(digest).cloned()) {
            return Ok(m);
        }
        let mut tried = Vec::new();
        for s in &self.sources {
            match get_manifest(s, repo, digest).await {
                Ok(Some(m)) => {
                    if let Ok(mut cache) = self.manifests.lock() {
                        cache.insert(digest.clone(), m.clone());
                    }
                    return Ok(m);
                }
                Ok(None) => tried.push(format!("{}: missing", s.name)),
                Err(e) => tried.push(format!("{}: {e}", s.name)),
            }
        }
        Err(format!("manifest {digest} is on no source ({})", tried.join("; ")))
    }

    async fn dest_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(Bytes, HeaderValue), String> {
        get_manifest(&self.dest, repo, digest)
            .await?
            .ok_or_else(|| format!("the target cannot fetch manifest {digest}"))
    }

    async fn dest_has_manifest(&self, repo: &RepoName, reference: &Digest) -> Result<bool, String> {
        Ok(self.dest_tag_digest(repo, reference.as_str()).await?.is_some())
    }

    /// The digest the target serves for a tag or digest, if any (a HEAD).
    async fn dest_tag_digest(&self, repo: &RepoName, reference: &str) -> Result<Option<String>, String> {
        let mapped = self.dest.map_name(repo).map_err(|e| e.to_string())?;
        let path = format!("/v2/{mapped}/manifests/{reference}");
        match self.dest.fetch(&Method::HEAD, &path, Some(&mapped), &manifest_accept()).await {
            Answer::Found(r) if r.status() == StatusCode::OK => Ok(Some(
                r.headers().get(CONTENT_DIGEST_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(reference).to_owned(),
            )),
            Answer::Found(_) | Answer::Missing(_) => Ok(None),
            Answer::Failed(e) => Err(format!("target: {e}")),
        }
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        bytes: &Bytes,
        content_type: &HeaderValue,
    ) -> Result<(), String> {
        let mapped = self.dest.map_name(repo).map_err(|e| e.to_string())?;
        let scope = format!("repository:{mapped}:pull,push");
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, content_type.clone());
        let path = format!("/v2/{mapped}/manifests/{reference}");
        let resp =
            self.dest.request(&Method::PUT, &path, &scope, &h, Some(bytes.clone())).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("target refused manifest {reference}: {}", body.trim()));
        }
        Ok(())
    }

    /// Set the tag on the target if it has none; report it if it points elsewhere.
    async fn tag(&self, repo: &RepoName, tag: &str, digest: &Digest) -> Result<Option<String>, String> {
        match self.dest_tag_digest(repo, tag).await? {
            Some(d) if d == digest.as_str() => Ok(None),
            Some(d) => Ok(Some(format!("the target's {repo}:{tag} points to {d}; {digest} was moved by digest"))),
            None if self.mode == Mode::Copy && !self.dry_run => {
                let (bytes, ct) = self.source_manifest(repo, digest).await?;
                self.put_manifest(repo, tag, &bytes, &ct).await?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Warm mode: the target must now serve the manifest by digest. Harbor stores a proxied manifest
    /// only after its blobs, so poll with backoff, bounded.
    async fn confirm(&self, repo: &RepoName, digest: &Digest) -> Result<(), String> {
        let Backoff { first, max, attempts } = self.confirm_backoff;
        let mut wait = first;
        for attempt in 1..=attempts {
            if self.dest_has_manifest(repo, digest).await? {
                return Ok(());
            }
            if attempt < attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(max);
            }
        }
        Err(format!("the target does not serve {digest} after warming ({attempts} tries)"))
    }
}

/// Why a blob did not come over.
enum BlobError {
    /// Warm: the target cannot fetch the blob (it answered 404).
    Missing(String),
    Other(String),
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::Missing(s) | BlobError::Other(s) => f.write_str(s),
        }
    }
}

impl From<BlobError> for String {
    fn from(e: BlobError) -> String {
        match e {
            BlobError::Missing(s) | BlobError::Other(s) => s,
        }
    }
}

/// GET a manifest by digest from one backend, verified.
async fn get_manifest(b: &Backend, repo: &RepoName, digest: &Digest) -> Result<Option<(Bytes, HeaderValue)>, String> {
    let mapped = b.map_name(repo).map_err(|e| e.to_string())?;
    let path = format!("/v2/{mapped}/manifests/{digest}");
    match b.fetch(&Method::GET, &path, Some(&mapped), &manifest_accept()).await {
        Answer::Found(r) if r.status() == StatusCode::OK => {
            let ct = r
                .headers()
                .get(http::header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"));
            let bytes = r.bytes().await.map_err(|e| e.to_string())?;
            if !digest.matches(&bytes) {
                return Err(format!("{}: manifest bytes do not match {digest}", b.name));
            }
            Ok(Some((bytes, ct)))
        }
        Answer::Found(_) | Answer::Missing(_) => Ok(None),
        Answer::Failed(e) => Err(e.to_string()),
    }
}

struct Hasher(sha2::Sha256);

impl Hasher {
    fn new() -> Hasher {
        use sha2::Digest as _;
        Hasher(sha2::Sha256::new())
    }
    fn update(&mut self, b: &[u8]) {
        use sha2::Digest as _;
        self.0.update(b);
    }
    fn hex(self) -> String {
        use sha2::Digest as _;
        hex::encode(self.0.finalize())
    }
}

/// Items from an inventory: its JSON output, or text lines `repo:tag@digest` / `repo@digest`.
pub fn items_from_inventory(text: &str) -> Result<Vec<Item>, String> {
    if text.trim_start().starts_with('[') {
        let records: Vec<super::ImageRecord> =
            serde_json::from_str(text).map_err(|e| format!("inventory JSON: {e}"))?;
        return records
            .into_iter()
            .map(|r| {
                Ok(Item {
                    repository: r.repository.parse().map_err(|e| format!("{}: {e}", r.repository))?,
                    tag: Some(r.tag),
                    digest: r.digest.parse().map_err(|e| format!("{e}"))?,
                    kind: Kind::Manifest,
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: expected repo:tag@digest or repo@digest, got {line:?}", i + 1);
        let (name, digest) = line.split_once('@').ok_or_else(bad)?;
        let (repo, tag) = match name.rsplit_once(':') {
            Some((r, t)) => (r, Some(t.to_owned())),
            None => (name, None),
        };
        out.push(Item {
            repository: repo.parse().map_err(|_| bad())?,
            tag,
            digest: digest.parse().map_err(|_| bad())?,
            kind: Kind::Manifest,
        });
    }
    Ok(out)
}

/// Items from the ledger's open misses of a route (see [`crate::ledger::Ledger::open_misses`]).
pub fn items_from_ledger(misses: Vec<crate::ledger::OpenMiss>) -> Vec<Item> {
    let mut set = BTreeSet::new();
    for m in misses {
        let (Ok(repository), Ok(digest)) = (m.repository.parse(), m.digest.parse()) else { continue };
        let kind = if m.kind == "blob" { Kind::Blob } else { Kind::Manifest };
        let tag = (kind == Kind::Manifest && !m.reference.contains(':')).then_some(m.reference);
        set.insert(Item { repository, tag, digest, kind });
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stub::{Reply, Stub};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// A target whose manifest `HEAD`s answer 404 `missing` times, then 200 (never, with `None`).
    async fn polled_target(missing: Option<usize>) -> (Stub, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let stub = Stub::start(move |method, path| {
            if method != "HEAD" || !path.contains("/manifests/") {
                return Reply::status(404);
            }
            let n = p.fetch_add(1, Ordering::SeqCst) + 1;
            match missing {
                Some(m) if n > m => {
                    Reply::ok("{}").header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                }
                _ => Reply::status(404),
            }
        })
        .await;
        (stub, polls)
    }

    #[tokio::test]
    async fn confirm_polls_until_the_target_stores_the_manifest() {
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let repo: RepoName = "library/alpine".parse().unwrap();
        let (stub, polls) = polled_target(Some(2)).await;
        let m = Migration::new(Mode::Warm, stub.backend("target"), Vec::new(), false).with_confirm_backoff(
            Duration::from_millis(20),
            Duration::from_millis(40),
            5,
        );
        let started = Instant::now();
        m.confirm(&repo, &digest).await.expect("the third poll finds it");
        assert_eq!(polls.load(Ordering::SeqCst), 3, "404, 404, then 200");
        assert!(started.elapsed() >= Duration::from_millis(60), "it backed off between polls (20 + 40 ms)");
    }

    #[tokio::test]
    async fn confirm_gives_up_after_a_bounded_number_of_polls() {
        let digest: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let repo: RepoName = "library/alpine".parse().unwrap();
        let (stub, polls) = polled_target(None).await;
        let m = Migration::new(Mode::Warm, stub.backend("target"), Vec::new(), false).with_confirm_backoff(
            Duration::from_millis(10),
            Duration::from_millis(40),
            5,
        );
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), m.confirm(&repo, &digest))
            .await
            .expect("confirm returns in bounded time")
            .expect_err("a manifest never served is a failure");
        assert!(e.contains(digest.as_str()) && e.contains("5 tries"), "{e}");
        assert_eq!(polls.load(Ordering::SeqCst), 5, "exactly the configured number of polls");
        // Sleeps of 10, 20, 40, 40 ms between the five polls; none after the last.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(110) && took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn the_default_confirm_backoff_is_bounded() {
        let Backoff { first, max, attempts } = CONFIRM_BACKOFF;
        let (mut wait, mut total) = (first, Duration::ZERO);
        for _ in 1..attempts {
            total += wait;
            wait = (wait * 2).min(max);
        }
        assert!(total > Duration::from_secs(10) && total < Duration::from_secs(30), "{total:?}");
    }

    #[test]
    fn inventory_text_lines() {
        let d = format!("sha256:{}", "a".repeat(64));
        let items = items_from_inventory(&format!("library/alpine:3.19@{d}\n# comment\nx/y@{d}\n")).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].tag.as_deref(), Some("3.19"));
        assert_eq!(items[1].tag, None);
        assert!(items_from_inventory("nonsense").is_err());
    }
}
