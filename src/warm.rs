//! Background warming (route option `warm = true`, the "shadow" phase of `DESIGN.md`): when a backend
//! other than the route's target served a manifest or blob, regmux asks the target for the same object
//! by digest in the background, so a proxy-cache target (Harbor) fetches and stores it from its own
//! upstream. The route can run old-mirror-first while the target fills itself from real traffic.
//!
//! Never on a client's time: jobs are queued after the client's response is finished, the queue is
//! bounded (a full queue drops and counts, and forgets the job so a later request queues it again),
//! each object is warmed once per [`DEDUP_FOR`] into each repository that missed it, and at most
//! [`CONCURRENCY`] warms run at once. A success resolves the object's ledger misses. With a shared
//! (PostgreSQL) ledger the replicas of a fleet claim each (object, repository) in the database first,
//! so it is warmed once however many replicas saw its miss.

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
    /// Warms running at once.
    concurrency: usize,
    /// Objects queued or warmed recently: (target, repository, digest). Per repository, because a
    /// registry keeps a blob per repository (distribution links it into each one, and Harbor's proxy
    /// looks for a blob in the requested repository before it fetches upstream), so a layer shared
    /// by two repositories has to be warmed in each.
    seen: moka::sync::Cache<(Arc<str>, RepoName, Digest), ()>,
    pub stats: WarmStats,
}

impl Default for Warmer {
    fn default() -> Self {
        Warmer::new()
    }
}

impl Warmer {
    pub fn new() -> Warmer {
        Warmer::with_limits(QUEUE, CONCURRENCY)
    }

    /// A warmer with a queue of `queue` jobs and `concurrency` warms at once (both at least 1).
    pub fn with_limits(queue: usize, concurrency: usize) -> Warmer {
        let (tx, rx) = mpsc::channel(queue.max(1));
        Warmer {
            tx,
            rx: Mutex::new(Some(rx)),
            concurrency: concurrency.max(1),
            seen: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(DEDUP_FOR).build(),
            stats: WarmStats::default(),
        }
    }

    /// Queue a warm; never blocks. Objects already queued or warmed recently are skipped; a job the
    /// full queue drops is forgotten, so the next request for the object queues it again.
    pub fn submit(&self, job: Job) {
        let key = (job.target.name.clone(), job.repo.clone(), job.digest.clone());
        if self.seen.contains_key(&key) {
            return;
        }
        self.seen.insert(key.clone(), ());
        match self.tx.try_send(job) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.seen.invalidate(&key);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Run the queue until the process ends (call once, inside the runtime).
    pub async fn run(self: Arc<Self>, recorder: Recorder) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else { return };
        let permits = Arc::new(Semaphore::new(self.concurrency));
        while let Some(job) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (this, recorder) = (self.clone(), recorder.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let ledger = recorder.ledger.clone();
                if let Some(l) = &ledger {
                    if !l.claim_warm(&job.target.name, job.repo.as_str(), job.digest.as_str(), DEDUP_FOR).await {
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
                        this.seen.invalidate(&(job.target.name.clone(), job.repo.clone(), job.digest.clone()));
                        if let Some(l) = &ledger {
                            l.release_warm(&job.target.name, job.repo.as_str(), job.digest.as_str()).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stub::{Reply, Stub};
    use std::collections::HashMap;

    fn digest_of(bytes: &[u8]) -> Digest {
        Digest::sha256_of(bytes)
    }

    fn job(target: &Arc<Backend>, digest: &Digest) -> Job {
        Job {
            target: target.clone(),
            route: "hub".into(),
            repo: "library/alpine".parse().unwrap(),
            digest: digest.clone(),
            kind: "blob",
        }
    }

    fn queued_jobs(w: &Warmer) -> Vec<Digest> {
        let mut rx = w.rx.lock().unwrap();
        let rx = rx.as_mut().expect("not running");
        std::iter::from_fn(|| rx.try_recv().ok().map(|j| j.digest)).collect()
    }

    #[tokio::test]
    async fn the_same_object_twice_is_queued_once() {
        let stub = Stub::start(|_, _| Reply::status(404)).await;
        let (target, other) = (stub.backend("target"), stub.backend("other"));
        let w = Warmer::with_limits(8, 2);
        let d = digest_of(b"one");
        w.submit(job(&target, &d));
        w.submit(job(&target, &d));
        assert_eq!(w.stats.queued.load(Ordering::Relaxed), 1);
        assert_eq!(w.stats.dropped.load(Ordering::Relaxed), 0);
        // The same digest for another target is another object.
        w.submit(job(&other, &d));
        assert_eq!(queued_jobs(&w), vec![d.clone(), d]);
        assert_eq!(w.stats.queued.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_counts_and_forgets_the_job() {
        let stub = Stub::start(|_, _| Reply::status(404)).await;
        let target = stub.backend("target");
        let w = Warmer::with_limits(1, 2);
        let (a, b) = (digest_of(b"a"), digest_of(b"b"));
        w.submit(job(&target, &a));
        w.submit(job(&target, &b));
        assert_eq!(w.stats.queued.load(Ordering::Relaxed), 1);
        assert_eq!(w.stats.dropped.load(Ordering::Relaxed), 1, "the second job found the queue full");
        assert_eq!(queued_jobs(&w), vec![a]);
        // Room again: the dropped object is not taken for queued, so the next request queues it.
        w.submit(job(&target, &b));
        assert_eq!(w.stats.queued.load(Ordering::Relaxed), 2);
        assert_eq!(queued_jobs(&w), vec![b]);
    }

    #[tokio::test]
    async fn no_more_warms_at_once_than_the_concurrency() {
        let blobs: HashMap<String, Vec<u8>> = (0..6u8)
            .map(|i| {
                let bytes = vec![i; 1000];
                (digest_of(&bytes).to_string(), bytes)
            })
            .collect();
        let served = blobs.clone();
        let stub = Stub::start(move |method, path| {
            let digest = path.rsplit('/').next().unwrap_or_default();
            match served.get(digest) {
                Some(b) if method == "GET" => Reply::ok(b.clone()).delay(Duration::from_millis(150)),
                _ => Reply::status(404),
            }
        })
        .await;
        let target = stub.backend("target");
        let w = Arc::new(Warmer::with_limits(16, 2));
        for d in blobs.keys() {
            w.submit(job(&target, &d.parse().unwrap()));
        }
        let runner = tokio::spawn(w.clone().run(Recorder::disabled()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while w.stats.warmed.load(Ordering::Relaxed) + w.stats.failed.load(Ordering::Relaxed) < 6 {
            assert!(tokio::time::Instant::now() < deadline, "the warms did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        runner.abort();
        assert_eq!(w.stats.warmed.load(Ordering::Relaxed), 6, "every blob warmed, digest verified");
        assert_eq!(stub.max_in_flight(), 2, "two warms at once, never more");
    }
}
