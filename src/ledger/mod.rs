//! The migration ledger: what each route's migration target could not serve, and how much traffic each
//! backend carried per hour (`DESIGN.md`, "Migration").
//!
//! The request path only calls [`Recorder::record`], which never blocks: events go into a bounded queue
//! that one writer thread drains in batched transactions, every [`FLUSH_INTERVAL`]. A full queue drops
//! the event and counts it. When the store cannot be written (the database is down, the disk is full)
//! the writer keeps the batch and retries it with a backoff while new events wait in the queue, so
//! nothing is lost up to [`QUEUE_CAPACITY`] events. [`Recorder::shutdown`] flushes everything before
//! the process exits.
//!
//! Two stores answer the same records and reports: SQLite in WAL mode for one replica ([`store`]; a
//! `kill -9` loses at most the unflushed last 200 ms) and PostgreSQL for a fleet sharing one ledger
//! ([`pg`]). The writer talks to a `Sink`; everything that reads goes through [`Ledger`]; nothing
//! else in the crate knows which store it is.

pub mod pg;
pub mod report;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Events waiting for the writer; beyond this they are dropped (and counted), never waited for.
pub const QUEUE_CAPACITY: usize = 65_536;
/// The writer commits at least this often while events arrive.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
const MAX_BATCH: usize = 5_000;
/// Retry backoff while the store cannot be written.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// At shutdown, how long the writer keeps retrying a store that cannot be written.
pub const SHUTDOWN_RETRY: Duration = Duration::from_secs(10);

/// Why the route's target did not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target lacked it; another backend served it.
    Fallback,
    /// No backend had it.
    Absent,
    /// The target failed (down, timeout, 5xx, bad bytes).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Fallback => "fallback",
            Outcome::Absent => "absent",
            Outcome::Error => "error",
        }
    }
}

/// One finished request, as the ledger sees it.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: u64,
    pub route: String,
    pub repository: String,
    pub reference: String,
    /// `manifest` or `blob`: the request path records nothing else (`/v2/`, tags lists and the
    /// catalog are not content a migration moves, so they are neither misses nor traffic). A store
    /// given another kind counts it as traffic only.
    pub kind: &'static str,
    pub digest: Option<String>,
    /// The backend that served, if any.
    pub served_by: Option<String>,
    pub bytes: u64,
    /// `None` when the target served it (which resolves an open miss for the same object).
    pub miss: Option<Outcome>,
    /// The target was asked and lacked it or failed. A miss where it was not asked (the shadow phase:
    /// the old mirror first) does not reopen a miss that warming or migrate resolved, since those
    /// verified that the target holds the object.
    pub target_asked: bool,
    /// Background warming brought the object (`digest`) into `repository` of the target: resolves its
    /// misses there, counts no traffic.
    pub warmed: bool,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Default)]
pub struct Stats {
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub written: AtomicU64,
    pub write_errors: AtomicU64,
    /// Unix time of the last successful commit (0: none yet).
    pub last_commit: AtomicU64,
    /// The last write failed; the writer is retrying.
    pub failing: AtomicBool,
    /// Events given up on at shutdown because the store stayed unwritable.
    pub lost: AtomicU64,
    /// `shutdown` was called: retrying stops after [`SHUTDOWN_RETRY`].
    pub closing: AtomicBool,
}

impl Stats {
    pub fn depth(&self) -> u64 {
        self.queued.load(Ordering::Relaxed).saturating_sub(self.written.load(Ordering::Relaxed))
    }
}

/// The request path's handle on the ledger. Cloning is cheap.
#[derive(Clone)]
pub struct Recorder {
    tx: Arc<Mutex<Option<Sender<Event>>>>,
    pub stats: Arc<Stats>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Where the ledger lives, and the read side of it (`None`: no ledger).
    pub ledger: Option<Ledger>,
}

#[derive(Debug, thiserror::Error)]
#[error("ledger {location}: {message}")]
pub struct LedgerError {
    pub location: String,
    pub message: String,
}

/// Where the ledger lives: `[ledger] path` or `[ledger] url`.
#[derive(Clone, Debug)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(Box<pg::Settings>),
}

impl Location {
    /// The configured location; `None` when the configuration names neither.
    pub fn from_config(c: &crate::config::LedgerConfig) -> Result<Option<Location>, String> {
        match (&c.path, &c.url) {
            (_, Some(url)) => {
                let settings = pg::Settings::new(url, c.password_file.as_deref(), c.ca_file.as_deref())?;
                Ok(Some(Location::Postgres(Box::new(settings))))
            }
            (Some(p), None) => Ok(Some(Location::Sqlite(p.clone()))),
            (None, None) => Ok(None),
        }
    }

    /// For logs and pages: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(s) => s.display.clone(),
        }
    }
}

/// An open miss that has a digest (what `migrate --from-ledger` brings over).
#[derive(Debug, Clone)]
pub struct OpenMiss {
    pub repository: String,
    pub reference: String,
    pub kind: String,
    pub digest: String,
}

/// The read side of the ledger: reports, open misses, resolutions, and the fleet's warm claims. Cheap
/// to clone; the same answers from either store.
#[derive(Clone)]
pub enum Ledger {
    Sqlite(PathBuf),
    Postgres(Arc<pg::Db>),
}

impl Ledger {
    pub fn open(location: &Location) -> Result<Ledger, String> {
        Ok(match location {
            Location::Sqlite(p) => Ledger::Sqlite(p.clone()),
            Location::Postgres(s) => Ledger::Postgres(Arc::new(pg::Db::new(s)?)),
        })
    }

    /// For logs and pages: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Ledger::Sqlite(p) => p.display().to_string(),
            Ledger::Postgres(db) => db.display.clone(),
        }
    }

    /// Several replicas share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Ledger::Postgres(_))
    }

    pub async fn route_report(
        &self,
        route: &str,
        target: &str,
        since: u64,
        limit: usize,
    ) -> Result<report::RouteReport, String> {
        match self {
            Ledger::Sqlite(p) => {
                let (p, route, target) = (p.clone(), route.to_owned(), target.to_owned());
                blocking(move || {
                    let s = store::Store::open_read_only(&p)?;
                    report::route_report(&s, &route, &target, since, limit)
                })
                .await
            }
            Ledger::Postgres(db) => pg::route_report(db, route, target, since, limit).await,
        }
    }

    pub async fn open_misses(&self, route: &str) -> Result<Vec<OpenMiss>, String> {
        match self {
            Ledger::Sqlite(p) => {
                let (p, route) = (p.clone(), route.to_owned());
                blocking(move || store::Store::open_read_only(&p)?.open_misses(&route)).await
            }
            Ledger::Postgres(db) => pg::open_misses(db, route).await,
        }
    }

    /// Mark the open misses of `route` for these digests resolved (`by`: who brought them).
    pub async fn resolve_digests(&self, route: &str, digests: &[String], by: &str) -> Result<usize, String> {
        match self {
            Ledger::Sqlite(p) => {
                let (p, route, digests, by) = (p.clone(), route.to_owned(), digests.to_vec(), by.to_owned());
                blocking(move || store::Store::open(&p)?.resolve_digests(&route, &digests, &by)).await
            }
            Ledger::Postgres(db) => pg::resolve_digests(db, route, digests, by).await,
        }
    }

    /// Whether this replica should warm `digest` into `repository` of `target`: always with SQLite (one replica; the
    /// warmer dedups in memory), once per `valid_for` across the fleet with PostgreSQL. When the
    /// database cannot answer, warm anyway: a warm is idempotent, and a duplicate beats none.
    pub async fn claim_warm(&self, target: &str, repository: &str, digest: &str, valid_for: Duration) -> bool {
        match self {
            Ledger::Sqlite(_) => true,
            Ledger::Postgres(db) => match pg::claim_warm(db, target, repository, digest, valid_for).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(%target, %digest, "cannot claim the warm in the ledger, warming anyway: {e}");
                    true
                }
            },
        }
    }

    /// Give a claim back after a failed warm.
    pub async fn release_warm(&self, target: &str, repository: &str, digest: &str) {
        if let Ledger::Postgres(db) = self {
            if let Err(e) = pg::release_warm(db, target, repository, digest).await {
                tracing::warn!(%target, %digest, "cannot release the warm claim: {e}");
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// The writer's store.
enum Sink {
    Sqlite(store::Store),
    Postgres(Box<pg::Writer>),
}

impl Sink {
    fn apply(&mut self, seq: u64, batch: &[Event]) -> Result<(), String> {
        match self {
            Sink::Sqlite(s) => s.apply(batch).map_err(|e| e.to_string()),
            Sink::Postgres(w) => w.apply(seq, batch),
        }
    }
}

impl Recorder {
    /// A recorder that records nothing (no ledger configured or available).
    pub fn disabled() -> Recorder {
        Recorder {
            tx: Arc::new(Mutex::new(None)),
            stats: Arc::default(),
            writer: Arc::new(Mutex::new(None)),
            ledger: None,
        }
    }

    /// Open the ledger and start its writer thread. SQLite: the file is created now, and an error is
    /// returned if it cannot be. PostgreSQL: only the settings are checked here; the database may be
    /// down, and records wait for it.
    pub fn open(location: &Location) -> Result<Recorder, LedgerError> {
        let err = |message: String| LedgerError { location: location.describe(), message };
        let sink = match location {
            Location::Sqlite(path) => Sink::Sqlite(store::Store::open(path).map_err(|e| err(e.to_string()))?),
            Location::Postgres(settings) => {
                Sink::Postgres(Box::new(pg::Writer::new((**settings).clone()).map_err(|e| err(e.to_string()))?))
            }
        };
        let ledger = Ledger::open(location).map_err(err)?;
        // An unbounded channel bounded by `Stats::depth`: a `sync_channel` of QUEUE_CAPACITY would
        // allocate and touch every slot up front (11 MiB of idle RSS, measured with massif).
        let (tx, rx) = channel();
        let stats: Arc<Stats> = Arc::default();
        let s = stats.clone();
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_loop(sink, rx, &s))
            .map_err(|e| err(e.to_string()))?;
        Ok(Recorder {
            tx: Arc::new(Mutex::new(Some(tx))),
            stats,
            writer: Arc::new(Mutex::new(Some(writer))),
            ledger: Some(ledger),
        })
    }

    pub fn enabled(&self) -> bool {
        self.ledger.is_some()
    }

    /// Queue an event. Never blocks: a full queue drops it and counts the drop.
    pub fn record(&self, event: Event) {
        let Ok(guard) = self.tx.lock() else { return };
        let Some(tx) = guard.as_ref() else { return };
        if self.stats.depth() >= QUEUE_CAPACITY as u64 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if tx.send(event).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stop accepting events, write everything queued, and wait for the writer.
    pub fn shutdown(&self) {
        self.stats.closing.store(true, Ordering::Relaxed);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn write_loop(mut sink: Sink, rx: Receiver<Event>, stats: &Stats) {
    if let Sink::Postgres(w) = &mut sink {
        match w.connect() {
            Ok(()) => tracing::info!("ledger database connected; schema up to date"),
            Err(e) => tracing::warn!("ledger database unreachable, records wait in the queue until it answers: {e}"),
        }
    }
    let mut batch = Vec::with_capacity(1024);
    let mut seq = 0u64;
    let mut backoff = MIN_BACKOFF;
    let mut give_up_at = None;
    loop {
        if batch.is_empty() {
            // Wait for the first event (none left and the queue closed: done), then collect more for
            // up to FLUSH_INTERVAL.
            let Ok(first) = rx.recv() else { return };
            batch.push(first);
            let deadline = Instant::now() + FLUSH_INTERVAL;
            while batch.len() < MAX_BATCH {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            seq += 1;
        }
        let n = batch.len() as u64;
        // A retried batch is the same batch with the same number: a store that did commit it (and
        // lost the acknowledgement) recognises it.
        match sink.apply(seq, &batch) {
            Ok(()) => {
                if stats.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(queued = stats.depth(), "ledger writable again; writing what waited");
                }
                stats.last_commit.store(now_unix(), Ordering::Relaxed);
                stats.written.fetch_add(n, Ordering::Relaxed);
                batch.clear();
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if !stats.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, queued = stats.depth(), "ledger write failed; keeping the events and retrying");
                }
                if stats.closing.load(Ordering::Relaxed)
                    && *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_RETRY) <= Instant::now()
                {
                    let rest = rx.try_iter().count() as u64;
                    let lost = n + rest;
                    stats.lost.fetch_add(lost, Ordering::Relaxed);
                    stats.written.fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(error = %e, lost, "ledger still not writable at shutdown; these events are lost");
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> Event {
        Event {
            at: now_unix(),
            route: "hub".into(),
            repository: "library/alpine".into(),
            reference: format!("v{i}"),
            kind: "manifest",
            digest: None,
            served_by: None,
            bytes: 0,
            miss: Some(Outcome::Absent),
            target_asked: true,
            warmed: false,
        }
    }

    /// A database that never answers: the queue holds QUEUE_CAPACITY events, drops and counts the
    /// rest, and `record` never waits.
    #[test]
    fn an_unreachable_database_fills_the_queue_then_drops_and_counts() {
        // Port 1 on loopback: nothing listens, every connect is refused at once.
        let settings = pg::Settings::new("postgres://regmux:pw@127.0.0.1:1/regmux", None, None).unwrap();
        let recorder = Recorder::open(&Location::Postgres(Box::new(settings))).unwrap();
        let extra = 1_000;
        let started = Instant::now();
        for i in 0..(QUEUE_CAPACITY as u64 + extra) {
            recorder.record(event(i));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "record must not wait: {:?}", started.elapsed());
        let stats = &recorder.stats;
        assert_eq!(stats.dropped.load(Ordering::Relaxed), extra);
        assert_eq!(stats.depth(), QUEUE_CAPACITY as u64);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stats.failing.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(stats.failing.load(Ordering::Relaxed), "the writer reports the failure");
        assert_eq!(stats.written.load(Ordering::Relaxed), 0);
    }
}
