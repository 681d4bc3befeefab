//! The SQLite store of the ledger: schema, batched upserts, and the queries behind `regmux misses`.
//!
//! WAL journal with `synchronous = NORMAL`: a committed transaction survives a process crash (the WAL
//! is written before commit returns); only an OS crash can lose the last commits. Several readers
//! (`regmux misses`, the admin page) may read while the writer writes.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

use super::{Event, Outcome};

pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS misses (
    route       TEXT NOT NULL,
    repository  TEXT NOT NULL,
    reference   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    digest      TEXT,
    served_by   TEXT,
    count       INTEGER NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    resolved_at INTEGER,
    resolved_by TEXT,
    PRIMARY KEY (route, repository, reference, kind, outcome)
);
CREATE INDEX IF NOT EXISTS misses_open ON misses (route, resolved_at, count);
CREATE INDEX IF NOT EXISTS misses_digest ON misses (digest);
CREATE TABLE IF NOT EXISTS traffic (
    route    TEXT NOT NULL,
    backend  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    PRIMARY KEY (route, backend, hour)
);
"#;

impl Store {
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn })
    }

    /// Open an existing ledger for reading only.
    pub fn open_read_only(path: &Path) -> rusqlite::Result<Store> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store { conn })
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Write a batch of events in one transaction.
    pub fn apply(&mut self, events: &[Event]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut traffic = tx.prepare_cached(
                "INSERT INTO traffic (route, backend, hour, requests, bytes) VALUES (?1, ?2, ?3, 1, ?4)
                 ON CONFLICT (route, backend, hour) DO UPDATE SET requests = requests + 1, bytes = bytes + ?4",
            )?;
            let mut miss = tx.prepare_cached(
                "INSERT INTO misses (route, repository, reference, kind, outcome, digest, served_by, count, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8)
                 ON CONFLICT (route, repository, reference, kind, outcome) DO UPDATE SET
                   count = count + 1, last_seen = max(last_seen, ?8), digest = coalesce(?6, digest),
                   served_by = coalesce(?7, served_by),
                   resolved_by = CASE WHEN resolved_at >= ?8
                       OR (NOT ?9 AND resolved_by IN ('warm', 'migrate')) THEN resolved_by END,
                   resolved_at = CASE WHEN resolved_at >= ?8
                       OR (NOT ?9 AND resolved_by IN ('warm', 'migrate')) THEN resolved_at END",
            )?;
            let mut resolve = tx.prepare_cached(
                "UPDATE misses SET resolved_at = ?5, resolved_by = 'target'
                 WHERE route = ?1 AND repository = ?2 AND reference = ?3 AND kind = ?4 AND resolved_at IS NULL
                   AND last_seen <= ?5",
            )?;
            // A manifest the target serves closes the misses for the same manifest under another
            // reference too: missed by tag, later served by digest (or by another tag).
            let mut resolve_digest = tx.prepare_cached(
                "UPDATE misses SET resolved_at = ?5, resolved_by = 'target'
                 WHERE digest = ?4 AND route = ?1 AND repository = ?2 AND kind = ?3 AND resolved_at IS NULL
                   AND last_seen <= ?5",
            )?;
            let mut warmed = tx.prepare_cached(
                "UPDATE misses SET resolved_at = ?3, resolved_by = 'warm'
                 WHERE route = ?1 AND digest = ?2 AND repository = ?4 AND resolved_at IS NULL AND last_seen <= ?3",
            )?;
            // As in the PostgreSQL store: a miss reopens only an older resolution, and a resolution
            // closes only misses seen no later than itself.
            for e in events {
                if e.warmed {
                    warmed.execute(params![e.route, e.digest, e.at as i64, e.repository])?;
                    continue;
                }
                let hour = (e.at / 3600 * 3600) as i64;
                traffic.execute(params![e.route, e.served_by.as_deref().unwrap_or(""), hour, e.bytes as i64])?;
                if !matches!(e.kind, "manifest" | "blob") {
                    continue;
                }
                match e.miss {
                    Some(outcome) => {
                        miss.execute(params![
                            e.route,
                            e.repository,
                            e.reference,
                            e.kind,
                            outcome.as_str(),
                            e.digest,
                            e.served_by,
                            e.at as i64,
                            e.target_asked
                        ])?;
                    }
                    None => {
                        resolve.execute(params![e.route, e.repository, e.reference, e.kind, e.at as i64])?;
                        if let (Some(digest), "manifest") = (&e.digest, e.kind) {
                            resolve_digest.execute(params![e.route, e.repository, e.kind, digest, e.at as i64])?;
                        }
                    }
                }
            }
        }
        tx.commit()
    }

    /// The open misses of `route` that have a digest.
    pub fn open_misses(&self, route: &str) -> rusqlite::Result<Vec<super::OpenMiss>> {
        let mut st = self.conn.prepare(
            "SELECT DISTINCT repository, reference, kind, digest FROM misses
             WHERE route = ?1 AND resolved_at IS NULL AND digest IS NOT NULL",
        )?;
        let rows = st.query_map([route], |r| {
            Ok(super::OpenMiss { repository: r.get(0)?, reference: r.get(1)?, kind: r.get(2)?, digest: r.get(3)? })
        })?;
        rows.collect()
    }

    /// Mark the open misses of `route` for these digests as resolved (by `migrate`).
    pub fn resolve_digests(&mut self, route: &str, digests: &[String], by: &str) -> rusqlite::Result<usize> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        {
            let mut st = tx.prepare_cached(
                "UPDATE misses SET resolved_at = ?3, resolved_by = ?4 WHERE route = ?1 AND digest = ?2 AND resolved_at IS NULL",
            )?;
            for d in digests {
                n += st.execute(params![route, d, super::now_unix() as i64, by])?;
            }
        }
        tx.commit()?;
        Ok(n)
    }
}

/// Parse an outcome stored in the table.
pub fn outcome_from_str(s: &str) -> Option<Outcome> {
    match s {
        "fallback" => Some(Outcome::Fallback),
        "absent" => Some(Outcome::Absent),
        "error" => Some(Outcome::Error),
        _ => None,
    }
}
