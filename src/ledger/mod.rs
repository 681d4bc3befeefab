//! The migration ledger: what each route's migration target could not serve, and how much traffic each
//! backend carried per hour (`DESIGN.md`, "Migration").
//!
//! The request path only calls [`Recorder::record`], which never blocks: events go into a bounded queue
//! that one writer thread drains in batched transactions, at least once a second. A full queue drops the
//! event and counts it. [`Recorder::shutdown`] flushes everything before the process exits. The store
//! itself ([`store`]) is SQLite in WAL mode, so a `kill -9` loses at most the unflushed last second.

pub mod report;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Events waiting for the writer; beyond this they are dropped (and counted), never waited for.
pub const QUEUE_CAPACITY: usize = 65_536;
/// The writer commits at least this often while events arrive.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
const MAX_BATCH: usize = 5_000;

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
    /// `manifest` or `blob` (other kinds only count as traffic).
    pub kind: &'static str,
    pub digest: Option<String>,
    /// The backend that served, if any.
    pub served_by: Option<String>,
    pub bytes: u64,
    /// `None` when the target served it (which resolves an open miss for the same object).
    pub miss: Option<Outcome>,
    /// Background warming brought the object (`digest`) into the target: resolves its misses, counts
    /// no traffic.
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
    pub path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("ledger {path}: {source}")]
pub struct LedgerError {
    pub path: String,
    #[source]
    pub source: rusqlite::Error,
}

impl Recorder {
    /// A recorder that records nothing (no ledger configured or available).
    pub fn disabled() -> Recorder {
        Recorder {
            tx: Arc::new(Mutex::new(None)),
            stats: Arc::default(),
            writer: Arc::new(Mutex::new(None)),
            path: None,
        }
    }

    /// Open (creating if needed) the SQLite ledger and start its writer thread.
    pub fn open(path: &Path) -> Result<Recorder, LedgerError> {
        let store =
            store::Store::open(path).map_err(|source| LedgerError { path: path.display().to_string(), source })?;
        // An unbounded channel bounded by `Stats::depth`: a `sync_channel` of QUEUE_CAPACITY would
        // allocate and touch every slot up front (11 MiB of idle RSS, measured with massif).
        let (tx, rx) = channel();
        let stats: Arc<Stats> = Arc::default();
        let s = stats.clone();
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_loop(store, rx, &s))
            .map_err(|e| LedgerError {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Recorder {
            tx: Arc::new(Mutex::new(Some(tx))),
            stats,
            writer: Arc::new(Mutex::new(Some(writer))),
            path: Some(path.to_owned()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
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
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn write_loop(mut store: store::Store, rx: Receiver<Event>, stats: &Stats) {
    let mut batch = Vec::with_capacity(1024);
    loop {
        // Wait for the first event, then collect more for up to FLUSH_INTERVAL.
        let first = match rx.recv() {
            Ok(e) => e,
            Err(_) => return,
        };
        batch.push(first);
        let deadline = Instant::now() + FLUSH_INTERVAL;
        let mut closed = false;
        while batch.len() < MAX_BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(e) => batch.push(e),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let n = batch.len() as u64;
        match store.apply(&batch) {
            Ok(()) => {
                stats.last_commit.store(now_unix(), Ordering::Relaxed);
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, events = n, "ledger write failed; these events are lost");
            }
        }
        stats.written.fetch_add(n, Ordering::Relaxed);
        batch.clear();
        if closed {
            // Drain whatever is left after the sender was closed.
            let rest: Vec<Event> = rx.try_iter().collect();
            if !rest.is_empty() {
                let n = rest.len() as u64;
                if let Err(e) = store.apply(&rest) {
                    tracing::error!(error = %e, "final ledger write failed");
                }
                stats.written.fetch_add(n, Ordering::Relaxed);
            }
            return;
        }
    }
}
