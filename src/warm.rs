//! Background warming (route option `warm = true`, the "shadow" phase of `DESIGN.md`): when a backend
//! other than the route's target served a manifest or blob, regmux asks the target for the same object
//! by digest in the background, so a proxy-cache target (Harbor) fetches and stores it from its own
//! upstream. The route can run old-mirror-first while the target fills itself from real traffic.
//!
//! Never on a client's time: jobs are queued after the client's response is finished, the queue is
//! bounded (a full queue drops and counts), each object is warmed once per [`DEDUP_FOR`], and at most
//! [`CONCURRENCY`] warms run at once. A success resolves the object's ledger misses. With a shared
//! (PostgreSQL) ledger the replicas of a fleet claim each object in the database first, so an object
//! is warmed once however many replicas saw its miss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode};
use tokio::sync::{mpsc, Semaphore};

use crate::backend::{Answer, Backend};
use crate::ledger::{now_unix, Event, Recorder};
use crate::registry::{Digest, RepoName};

pub const QUEUE: usize = 4096;
pub const CONCURRENCY: usize = 2;
pub const DEDUP_FOR: Duration = Duration::from_secs(600);

pub struct Job {
    pub target: Arc<Backend>,
    pub route: String,
    pub repo: RepoName,
    pub digest: Digest,
    /// `manifest` or `blob`.
    pub kind: &'static str,
}

#[derive(Default)]
pub struct WarmStats {
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub warmed: AtomicU64,
    pub failed: AtomicU64,
    /// Left to another replica that claimed the object first.
    pub claimed_elsewhere: AtomicU64,
}

pub struct Warmer {
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
    seen: moka::sync::Cache<(Arc<str>, Digest), ()>,
    pub stats: WarmStats,
}

impl Default for Warmer {
    fn default() -> Self {
        Warmer::new()
    }
}

impl Warmer {
    pub fn new() -> Warmer {
        let (tx, rx) = mpsc::channel(QUEUE);
        Warmer {
            tx,
            rx: Mutex::new(Some(rx)),
            seen: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(DEDUP_FOR).build(),
            stats: WarmStats::default(),
        }
    }

    /// Queue a warm; never blocks. Objects already queued or warmed recently are skipped.
    pub fn submit(&self, job: Job) {
        let key = (job.target.name.clone(), job.digest.clone());
        if self.seen.contains_key(&key) {
            return;
        }
        self.seen.insert(key, ());
        match self.tx.try_send(job) {
            Ok(()) => self.stats.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Run the queue until the process ends (call once, inside the runtime).
    pub async fn run(self: Arc<Self>, recorder: Recorder) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else { return };
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        while let Some(job) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (this, recorder) = (self.clone(), recorder.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let ledger = recorder.ledger.clone();
                if let Some(l) = &ledger {
                    if !l.claim_warm(&job.target.name, job.digest.as_str(), DEDUP_FOR).await {
                        this.stats.claimed_elsewhere.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(target = %job.target.name, digest = %job.digest, "another replica warms it");
                        return;
                    }
                }
                let result = warm(&job).await;
                match &result {
                    Ok(bytes) => {
                        this.stats.warmed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(route = %job.route, target = %job.target.name, repository = %job.repo, digest = %job.digest, kind = job.kind, bytes, "warmed");
                        recorder.record(Event {
                            at: now_unix(),
                            route: job.route.clone(),
                            repository: job.repo.to_string(),
                            reference: job.digest.to_string(),
                            kind: job.kind,
                            digest: Some(job.digest.to_string()),
                            served_by: Some(job.target.name.to_string()),
                            bytes: 0,
                            miss: None,
                            target_asked: true,
                            warmed: true,
                        });
                    }
                    Err(e) => {
                        this.stats.failed.fetch_add(1, Ordering::Relaxed);
                        // Let a later request (here or on another replica) try again.
                        this.seen.invalidate(&(job.target.name.clone(), job.digest.clone()));
                        if let Some(l) = &ledger {
                            l.release_warm(&job.target.name, job.digest.as_str()).await;
                        }
                        tracing::warn!(route = %job.route, target = %job.target.name, repository = %job.repo, digest = %job.digest, "warming failed: {e}");
                    }
                }
            });
        }
    }
}

/// GET the object through the target in full and check its digest; returns the bytes read.
async fn warm(job: &Job) -> Result<u64, String> {
    let mapped = job.target.map_name(&job.repo).map_err(|e| e.to_string())?;
    let (path, headers) = match job.kind {
        "manifest" => (format!("/v2/{mapped}/manifests/{}", job.digest), crate::migrate::manifest_accept()),
        _ => (format!("/v2/{mapped}/blobs/{}", job.digest), HeaderMap::new()),
    };
    let resp = match job.target.fetch(&Method::GET, &path, Some(&mapped), &headers).await {
        Answer::Found(r) if r.status() == StatusCode::OK => r,
        Answer::Found(r) => return Err(format!("target answered {}", r.status())),
        Answer::Missing(s) => return Err(format!("target answered {s}")),
        Answer::Failed(e) => return Err(e.to_string()),
    };
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        n += chunk.len() as u64;
        hasher.update(&chunk);
    }
    if hex::encode(hasher.finalize()) != job.digest.hex() {
        return Err("the target's bytes do not match the digest".into());
    }
    Ok(n)
}
