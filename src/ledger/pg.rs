//! The PostgreSQL store of the ledger (`[ledger] url`): one ledger shared by a fleet of replicas.
//!
//! The same tables as the SQLite store plus two for the fleet: `warm_claims` (one background warm per
//! object and repository across replicas) and `ledger_batches` (each writer's committed batch numbers, so a batch whose
//! commit acknowledgement was lost is not counted twice when it is retried). The schema is created and
//! upgraded under a transaction-scoped advisory lock, so replicas starting together on an empty database
//! do not race. The writer pipelines each batch's statements in one transaction (one round trip per
//! batch, not per event); reads and claims go through a small connection pool.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::try_join_all;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls};

use super::report::{share, BackendTraffic, HourShare, Miss, RouteReport};
use super::{Event, OpenMiss};
use crate::backend::chain;
use crate::backend::tls::LazyVerifier;

/// How long connecting, and each query, may take before the attempt counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(5);
const POOL_SIZE: usize = 4;

/// Schema versions, applied in order; `regmux_schema` holds the last one applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE misses (
    route       TEXT NOT NULL,
    repository  TEXT NOT NULL,
    reference   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    digest      TEXT,
    served_by   TEXT,
    count       BIGINT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT,
    PRIMARY KEY (route, repository, reference, kind, outcome)
);
CREATE INDEX misses_open ON misses (route, resolved_at, count);
CREATE INDEX misses_digest ON misses (digest);
CREATE TABLE traffic (
    route    TEXT NOT NULL,
    backend  TEXT NOT NULL,
    hour     BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    bytes    BIGINT NOT NULL,
    PRIMARY KEY (route, backend, hour)
);
CREATE TABLE warm_claims (
    target     TEXT NOT NULL,
    digest     TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    claimed_by TEXT NOT NULL,
    PRIMARY KEY (target, digest)
);
CREATE TABLE ledger_batches (
    writer TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (writer, seq)
);
"#,
    // 2: warm claims per repository (a blob is warmed into each repository that shares it). Claims
    // live for minutes, so the old ones are simply dropped.
    r#"
DROP TABLE warm_claims;
CREATE TABLE warm_claims (
    target     TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest     TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    claimed_by TEXT NOT NULL,
    PRIMARY KEY (target, repository, digest)
);
"#,
];

/// A parsed `[ledger] url` with its password resolved.
#[derive(Clone)]
pub struct Settings {
    config: Config,
    /// The URL without its password, for logs and the admin page.
    pub display: String,
    verifier: Arc<LazyVerifier>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl Settings {
    /// Parse the URL and find the password: in the URL, else `password_file`, else `PGPASSWORD`, else
    /// the password file of `PGPASSFILE` (or `~/.pgpass`), as libpq does.
    pub fn new(url: &str, password_file: Option<&Path>, ca_file: Option<&Path>) -> Result<Settings, String> {
        let mut config: Config = url.parse().map_err(|e| format!("ledger.url: {e}"))?;
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err("ledger.url: expected postgres://user@host:port/database".into());
        }
        if config.get_user().is_none() {
            return Err("ledger.url: no user (postgres://USER@host/database)".into());
        }
        if config.get_password().is_none() {
            let password = match password_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| format!("ledger.password_file {}: {e}", f.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                None => std::env::var("PGPASSWORD").ok().or_else(|| passfile_password(&config)),
            };
            if let Some(p) = password {
                config.password(p);
            }
        }
        config.connect_timeout(TIMEOUT);
        config.application_name("regmux");
        let display = redact(url);
        let verifier = match ca_file {
            None => LazyVerifier::shared(),
            Some(f) => crate::backend::tls::verifier_with_ca_file(f)
                .map_err(|e| format!("ledger.ca_file {}: {e}", f.display()))?,
        };
        Ok(Settings { config, display, verifier })
    }

    fn tls(&self) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
        if self.config.get_ssl_mode() != SslMode::Require {
            return Ok(None);
        }
        let mut tls =
            crate::backend::tls::client_config(self.verifier.clone()).map_err(|e| format!("ledger TLS: {e}"))?;
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
    }

    /// One connection, driven on the current runtime, with the schema brought up to date.
    pub async fn connect(&self) -> Result<Client, String> {
        let client = match self.tls()? {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls).await.map_err(|e| chain(&e))?;
                tokio::spawn(conn);
                client
            }
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(|e| chain(&e))?;
                tokio::spawn(conn);
                client
            }
        };
        Ok(client)
    }

    /// A pool for reads and warm claims (connections are made when first needed).
    pub fn pool(&self) -> Result<Pool, String> {
        let mc = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match self.tls()? {
            Some(tls) => Manager::from_config(self.config.clone(), tls, mc),
            None => Manager::from_config(self.config.clone(), NoTls, mc),
        };
        Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(TIMEOUT))
            .wait_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| chain(&e))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_owned(),
    };
    let user = auth.split(':').next().unwrap_or_default();
    format!("{scheme}://{user}@{host}")
}

/// The password for this connection from a libpq password file (`host:port:database:user:password`,
/// `*` matches anything, `\` escapes `:` and `\`).
fn passfile_password(config: &Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = config.get_user().unwrap_or_default();
    let db = config.get_dbname().unwrap_or(user).to_owned();
    let want = [host.as_str(), port.as_str(), db.as_str(), user];
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let fields = split_passfile_line(line);
        if fields.len() != 5 {
            return None;
        }
        let matches = fields[..4].iter().zip(want).all(|(f, w)| f == "*" || f == w);
        matches.then(|| fields[4].clone())
    })
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

/// Create or upgrade the schema. Safe to run from many replicas at once: the advisory lock makes
/// them take turns, and each sees the version the previous one left.
pub async fn migrate_schema(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7302918400)", &[]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS regmux_schema (version INTEGER NOT NULL)").await?;
    let version: i32 = tx.query_opt("SELECT version FROM regmux_schema", &[]).await?.map_or(0, |r| r.get::<_, i32>(0));
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await?;
        tracing::info!(version = i + 1, "ledger schema upgraded");
    }
    let latest = MIGRATIONS.len() as i32;
    if version == 0 {
        tx.execute("INSERT INTO regmux_schema (version) VALUES ($1)", &[&latest]).await?;
    } else if version < latest {
        tx.execute("UPDATE regmux_schema SET version = $1", &[&latest]).await?;
    }
    tx.commit().await
}

/// The writer's side: one connection, reconnected after any failure; runs on the writer thread's own
/// single-threaded runtime so that it keeps writing after the server's runtime has stopped.
pub struct Writer {
    settings: Settings,
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    /// Identifies this process's batches in `ledger_batches`.
    id: String,
    last_cleanup: u64,
}

impl Writer {
    pub fn new(settings: Settings) -> std::io::Result<Writer> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Writer { settings, runtime, client: None, id: writer_id(), last_cleanup: 0 })
    }

    /// Write `batch` (number `seq` of this writer) in one transaction. A retry of a batch that did
    /// commit (the acknowledgement was lost) is recognised by its number and not applied twice.
    pub fn apply(&mut self, seq: u64, batch: &[Event]) -> Result<(), String> {
        let Writer { settings, runtime, client, id, last_cleanup } = self;
        let result = runtime.block_on(async {
            let c = ensure_connected(settings, client).await?;
            tokio::time::timeout(TIMEOUT * 2, write_batch(c, id, seq, batch))
                .await
                .map_err(|_| "write: timed out".to_owned())?
                .map_err(|e| chain(&e))?;
            let now = super::now_unix();
            if now >= *last_cleanup + 3600 {
                // Batch numbers only matter while a retry is possible, and a warm claim only for
                // DEDUP_FOR (10 min); keep a day of both.
                let day_ago = (now - 86_400) as i64;
                c.execute("DELETE FROM ledger_batches WHERE at < $1", &[&day_ago]).await.map_err(|e| chain(&e))?;
                c.execute("DELETE FROM warm_claims WHERE claimed_at < $1", &[&day_ago]).await.map_err(|e| chain(&e))?;
                *last_cleanup = now;
            }
            Ok(())
        });
        if result.is_err() {
            // Start from a fresh connection next time.
            *client = None;
        }
        result
    }

    /// Connect (and create the schema) now rather than at the first batch.
    pub fn connect(&mut self) -> Result<(), String> {
        let Writer { settings, runtime, client, .. } = self;
        runtime.block_on(ensure_connected(settings, client)).map(|_| ())
    }
}

async fn ensure_connected<'c>(settings: &Settings, client: &'c mut Option<Client>) -> Result<&'c mut Client, String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = None;
        let mut c =
            tokio::time::timeout(TIMEOUT, settings.connect()).await.map_err(|_| "connect: timed out".to_owned())??;
        tokio::time::timeout(TIMEOUT, migrate_schema(&mut c))
            .await
            .map_err(|_| "schema: timed out".to_owned())?
            .map_err(|e| format!("schema: {}", chain(&e)))?;
        *client = Some(c);
    }
    Ok(client.as_mut().expect("connected above"))
}

fn writer_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{}-{nanos}", host.trim(), std::process::id())
}

async fn write_batch(
    client: &mut Client,
    writer: &str,
    seq: u64,
    events: &[Event],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let fresh = tx
        .execute(
            "INSERT INTO ledger_batches (writer, seq, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&writer, &(seq as i64), &(super::now_unix() as i64)],
        )
        .await?;
    if fresh == 0 {
        tracing::info!(seq, "ledger batch was already committed; not applying it twice");
        return tx.rollback().await;
    }
    let traffic = tx
        .prepare(
            "INSERT INTO traffic (route, backend, hour, requests, bytes) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (route, backend, hour) DO UPDATE SET
               requests = traffic.requests + EXCLUDED.requests, bytes = traffic.bytes + EXCLUDED.bytes",
        )
        .await?;
    let miss = tx
        .prepare(
            "INSERT INTO misses (route, repository, reference, kind, outcome, digest, served_by, count, first_seen, last_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8)
             ON CONFLICT (route, repository, reference, kind, outcome) DO UPDATE SET
               count = misses.count + 1, last_seen = greatest(misses.last_seen, $8),
               digest = coalesce($6, misses.digest), served_by = coalesce($7, misses.served_by),
               resolved_at = CASE WHEN misses.resolved_at >= $8
                   OR (NOT $9 AND misses.resolved_by IN ('warm', 'migrate')) THEN misses.resolved_at END,
               resolved_by = CASE WHEN misses.resolved_at >= $8
                   OR (NOT $9 AND misses.resolved_by IN ('warm', 'migrate')) THEN misses.resolved_by END",
        )
        .await?;
    let resolve = tx
        .prepare(
            "UPDATE misses SET resolved_at = $5, resolved_by = 'target'
             WHERE route = $1 AND repository = $2 AND kind = $4 AND resolved_at IS NULL AND last_seen <= $5
               AND (reference = $3 OR ($6::text IS NOT NULL AND kind = 'manifest' AND digest = $6))",
        )
        .await?;
    let warmed = tx
        .prepare(
            "UPDATE misses SET resolved_at = $3, resolved_by = 'warm'
             WHERE route = $1 AND digest = $2 AND repository = $4 AND resolved_at IS NULL AND last_seen <= $3",
        )
        .await?;

    // Traffic counters add up in any order: one row per (route, backend, hour).
    let mut sums: HashMap<(&str, &str, i64), (i64, i64)> = HashMap::new();
    for e in events.iter().filter(|e| !e.warmed) {
        let hour = (e.at / 3600 * 3600) as i64;
        let s = sums.entry((&e.route, e.served_by.as_deref().unwrap_or(""), hour)).or_default();
        s.0 += 1;
        s.1 += e.bytes as i64;
    }
    // Sorted, so that concurrent writers lock the same rows in the same order.
    let mut sums: Vec<_> = sums.into_iter().collect();
    sums.sort_unstable();
    let sum_rows: Vec<_> = sums.iter().map(|((r, b, h), (n, bytes))| (*r, *b, *h, *n, *bytes)).collect();
    try_join_all(sum_rows.iter().map(|(r, b, h, n, bytes)| {
        let params: [&(dyn ToSql + Sync); 5] = [r, b, h, n, bytes];
        tx.execute_raw(&traffic, params)
    }))
    .await?;

    // Misses and resolutions depend on their order: send them in order, pipelined. Across replicas the
    // order of commits is not the order of events (a replica's miss may commit after another replica's
    // warm resolved it), so each statement compares times: a miss reopens only a resolution older
    // than itself, and a resolution closes only misses seen no later than itself.
    let ats: Vec<i64> = events.iter().map(|e| e.at as i64).collect();
    let outcomes: Vec<Option<&str>> = events.iter().map(|e| e.miss.map(|o| o.as_str())).collect();
    let mut ops = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let params: Vec<&(dyn ToSql + Sync)> = if e.warmed {
            vec![&e.route, &e.digest, &ats[i], &e.repository]
        } else if !matches!(e.kind, "manifest" | "blob") {
            continue;
        } else if let Some(outcome) = &outcomes[i] {
            vec![
                &e.route,
                &e.repository,
                &e.reference,
                &e.kind,
                outcome,
                &e.digest,
                &e.served_by,
                &ats[i],
                &e.target_asked,
            ]
        } else {
            // A manifest the target serves also closes the misses for it under another reference
            // (missed by tag, served by digest), as in SQLite.
            vec![&e.route, &e.repository, &e.reference, &e.kind, &ats[i], &e.digest]
        };
        let statement = match (e.warmed, &outcomes[i]) {
            (true, _) => &warmed,
            (false, Some(_)) => &miss,
            (false, None) => &resolve,
        };
        ops.push(tx.execute_raw(statement, params));
    }
    try_join_all(ops).await?;
    tx.commit().await
}

// ---- reads, claims and resolutions (through the pool) ----

pub type Error = String;

/// The pool of one process, with the schema checked once.
pub struct Db {
    pool: Pool,
    schema: tokio::sync::OnceCell<()>,
    /// This replica's name in `warm_claims`.
    pub me: String,
    pub display: String,
}

impl Db {
    pub fn new(settings: &Settings) -> Result<Db, String> {
        Ok(Db {
            pool: settings.pool()?,
            schema: tokio::sync::OnceCell::new(),
            me: writer_id(),
            display: settings.display.clone(),
        })
    }
}

async fn client(db: &Db) -> Result<deadpool_postgres::Client, Error> {
    let mut c = db.pool.get().await.map_err(|e| format!("ledger database: {}", chain(&e)))?;
    db.schema
        .get_or_try_init(|| async { migrate_schema(&mut c).await.map_err(|e| format!("ledger schema: {}", chain(&e))) })
        .await?;
    Ok(c)
}

pub async fn route_report(db: &Db, route: &str, target: &str, since: u64, limit: usize) -> Result<RouteReport, Error> {
    let c = client(db).await?;
    let e = |e: tokio_postgres::Error| chain(&e);
    let since_hour = (since / 3600 * 3600) as i64;
    let backends: Vec<BackendTraffic> = c
        .query(
            "SELECT backend, sum(requests)::BIGINT, sum(bytes)::BIGINT FROM traffic WHERE route = $1 AND hour >= $2
             GROUP BY backend ORDER BY sum(requests) DESC, backend",
            &[&route, &since_hour],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| BackendTraffic {
            backend: r.get(0),
            requests: r.get::<_, i64>(1) as u64,
            bytes: r.get::<_, i64>(2) as u64,
        })
        .collect();
    let hours: Vec<HourShare> = c
        .query(
            "SELECT hour, sum(requests)::BIGINT, sum(CASE WHEN backend = $3 THEN requests ELSE 0 END)::BIGINT
             FROM traffic WHERE route = $1 AND hour >= $2 GROUP BY hour ORDER BY hour",
            &[&route, &since_hour, &target],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| {
            let (hour, req, tr): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            HourShare {
                hour: hour as u64,
                requests: req as u64,
                target_requests: tr as u64,
                target_request_share: share(tr as u64, req as u64),
            }
        })
        .collect();
    let open_misses: i64 = c
        .query_one(
            "SELECT count(*) FROM misses WHERE route = $1 AND resolved_at IS NULL AND last_seen >= $2",
            &[&route, &(since as i64)],
        )
        .await
        .map_err(e)?
        .get(0);
    let misses: Vec<Miss> = c
        .query(
            "SELECT repository, reference, kind, outcome, digest, served_by, count, first_seen, last_seen
             FROM misses WHERE route = $1 AND resolved_at IS NULL AND last_seen >= $2
             ORDER BY count DESC, last_seen DESC LIMIT $3",
            &[&route, &(since as i64), &(limit as i64)],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| Miss {
            repository: r.get(0),
            reference: r.get(1),
            kind: r.get(2),
            outcome: r.get(3),
            digest: r.get(4),
            served_by: r.get(5),
            count: r.get::<_, i64>(6) as u64,
            first_seen: r.get::<_, i64>(7) as u64,
            last_seen: r.get::<_, i64>(8) as u64,
        })
        .collect();
    Ok(RouteReport::new(route, target, since, backends, hours, open_misses as u64, misses))
}

pub async fn open_misses(db: &Db, route: &str) -> Result<Vec<OpenMiss>, Error> {
    let c = client(db).await?;
    let rows = c
        .query(
            "SELECT DISTINCT repository, reference, kind, digest FROM misses
             WHERE route = $1 AND resolved_at IS NULL AND digest IS NOT NULL",
            &[&route],
        )
        .await
        .map_err(|e| chain(&e))?;
    Ok(rows
        .iter()
        .map(|r| OpenMiss { repository: r.get(0), reference: r.get(1), kind: r.get(2), digest: r.get(3) })
        .collect())
}

pub async fn resolve_digests(db: &Db, route: &str, digests: &[String], by: &str) -> Result<usize, Error> {
    let mut c = client(db).await?;
    let tx = c.transaction().await.map_err(|e| chain(&e))?;
    let now = super::now_unix() as i64;
    let st = tx
        .prepare(
            "UPDATE misses SET resolved_at = $3, resolved_by = $4 WHERE route = $1 AND digest = $2 AND resolved_at IS NULL",
        )
        .await
        .map_err(|e| chain(&e))?;
    let counts = try_join_all(digests.iter().map(|d| {
        let params: [&(dyn ToSql + Sync); 4] = [&route, d, &now, &by];
        tx.execute_raw(&st, params)
    }))
    .await
    .map_err(|e| chain(&e))?;
    tx.commit().await.map_err(|e| chain(&e))?;
    Ok(counts.iter().sum::<u64>() as usize)
}

/// Claim the warm of `digest` into `repository` of `target` for this replica. `false`: another replica
/// claimed it less than `valid_for` ago (and is warming it, or has).
pub async fn claim_warm(
    db: &Db,
    target: &str,
    repository: &str,
    digest: &str,
    valid_for: Duration,
) -> Result<bool, Error> {
    let c = client(db).await?;
    let now = super::now_unix() as i64;
    let expired = now - valid_for.as_secs() as i64;
    let row = c
        .query_opt(
            "INSERT INTO warm_claims (target, repository, digest, claimed_at, claimed_by) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (target, repository, digest) DO UPDATE
               SET claimed_at = EXCLUDED.claimed_at, claimed_by = EXCLUDED.claimed_by
               WHERE warm_claims.claimed_at < $6
             RETURNING claimed_by",
            &[&target, &repository, &digest, &now, &db.me, &expired],
        )
        .await
        .map_err(|e| chain(&e))?;
    Ok(row.is_some())
}

/// Give a claim back after a failed warm, so that the next miss (on any replica) tries again.
pub async fn release_warm(db: &Db, target: &str, repository: &str, digest: &str) -> Result<(), Error> {
    let c = client(db).await?;
    c.execute(
        "DELETE FROM warm_claims WHERE target = $1 AND repository = $2 AND digest = $3 AND claimed_by = $4",
        &[&target, &repository, &digest, &db.me],
    )
    .await
    .map_err(|e| chain(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        assert_eq!(redact("postgres://u:secret@db:5432/x"), "postgres://u@db:5432/x");
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
    }

    #[test]
    fn passfile_lines_split_with_escapes() {
        assert_eq!(split_passfile_line(r"db:5432:*:u:pa\:ss"), ["db", "5432", "*", "u", "pa:ss"]);
        assert_eq!(split_passfile_line("a:b:c:d:e:f"), ["a", "b", "c", "d", "e:f"]);
    }

    #[test]
    fn password_from_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let s = Settings::new("postgres://regmux@127.0.0.1:5432/regmux", Some(&f), None).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"s3cret"[..]));
        assert!(Settings::new("postgres://127.0.0.1/regmux", None, None).is_err(), "a user is required");
        assert!(Settings::new("mysql://u@h/d", None, None).is_err());
    }
}
