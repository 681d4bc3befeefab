//! A throwaway PostgreSQL cluster (Debian's `postgresql` package) on 127.0.0.1:<free port>, with its
//! data, unix socket and log in a folder the caller chooses (usually inside a [`super::Lab`]).
//!
//! `initdb` and `postgres` refuse to run as root, so when the tests run as root they run as the
//! `postgres` system user (uid/gid from `/etc/passwd`, set on the child; no su/runuser), the folder is
//! chowned to it, and the lab folders above it get the "others may traverse" bit (never the read bit)
//! so that user can reach it. Local (unix socket) connections are `trust`, TCP ones `scram-sha-256`.
//!
//! After [`Postgres::start`] there is a role `regmux` (LOGIN, password [`Postgres::password`]) owning
//! database `regmux`; [`Postgres::url`] names it without the password, as a regmux config would.
//! [`Postgres::stop`] is a fast shutdown (SIGINT: clients are disconnected, the postmaster exits) and
//! [`Postgres::restart`] brings the same cluster back on the same port: a database that goes away and
//! comes back. Files in the folder: `data/`, `postgres.log` (the server's stderr, appended across
//! restarts) and the socket `.s.PGSQL.<port>`.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::process::{describe, run, signal, ChildGuard, POLL};

/// The application role and database created by [`Postgres::start`].
pub const PG_ROLE: &str = "regmux";
pub const PG_DATABASE: &str = "regmux";
const PG_PASSWORD: &str = "secret-pw";

/// How long the server may take to accept connections after it is spawned.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the postmaster is killed.
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A running (or stopped, between [`Postgres::stop`] and [`Postgres::restart`]) PostgreSQL cluster.
/// Stopped and waited for on drop; when the drop happens during a panic, the tail of its log is printed.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// uid/gid the server runs as (`None`: as ourselves).
    owner: Option<(u32, u32)>,
    child: Option<ChildGuard>,
}

impl Postgres {
    /// `initdb` in `dir/data`, start the server on a free loopback port, wait until it accepts
    /// connections, then create role `regmux` and database `regmux`.
    pub fn start(dir: PathBuf) -> Postgres {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create postgres dir {}: {e}", dir.display()));
        let owner = if effective_uid() == 0 { Some(system_user("postgres")) } else { None };
        if let Some((uid, gid)) = owner {
            let_others_traverse(&dir);
            chown(&dir, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        }
        let mut pg = Postgres { bin: bin_dir(), dir, port: 0, owner, child: None };

        let mut initdb = pg.as_owner(Command::new(pg.bin.join("initdb")));
        initdb
            .arg("-D")
            .arg(pg.data_dir())
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--no-sync", "--no-locale", "-E", "UTF8"]);
        let out = run(&mut initdb, Duration::from_secs(120));
        assert!(out.status.success(), "initdb in {}: {}", pg.dir.display(), describe(&out));

        // The port is free when picked but something else could take it before the server binds.
        for attempt in 1..=3 {
            pg.port = free_port();
            match pg.spawn_and_wait() {
                Ok(()) => break,
                Err(log) if attempt < 3 && log.contains("could not bind") => continue,
                Err(log) => panic!("postgres in {} did not become ready:\n{log}", pg.dir.display()),
            }
        }

        pg.psql_in("postgres", &format!("CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{PG_PASSWORD}'"));
        pg.psql_in("postgres", &format!("CREATE DATABASE {PG_DATABASE} OWNER {PG_ROLE}"));
        pg
    }

    /// `postgres://regmux@127.0.0.1:PORT/regmux` (no password: that goes in a password file).
    pub fn url(&self) -> String {
        format!("postgres://{PG_ROLE}@127.0.0.1:{}/{PG_DATABASE}", self.port)
    }

    /// The password of role `regmux`.
    pub fn password(&self) -> &str {
        PG_PASSWORD
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server log so far (all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().is_none())
    }

    /// Fast shutdown (SIGINT to the postmaster: sessions are ended, the server exits cleanly) and wait
    /// for the exit; SIGKILL if it takes more than 15 s. The port stays ours for [`Postgres::restart`].
    /// Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if child.try_wait().is_none() {
            signal(child.pid(), "INT");
            if child.wait_exit(STOP_WITHIN).is_none() {
                eprintln!("[harness] postgres did not stop within {STOP_WITHIN:?} of SIGINT; killing it");
            }
        }
        child.stop(); // reaps; kills only if it is still running
    }

    /// Starts the cluster again after [`Postgres::stop`]: same data, same port. Returns once it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn_and_wait() {
            panic!("postgres in {} did not restart on port {}:\n{log}", self.dir.display(), self.port);
        }
    }

    /// Serve TLS with this certificate and key (PEM) and refuse every TCP connection without TLS
    /// (`hostnossl … reject` first in `pg_hba.conf`); restarts the server. The unix socket, which the
    /// harness's `psql` uses, is unaffected.
    pub fn require_tls(&mut self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        for (name, text, mode) in [("server.crt", cert_pem, 0o644), ("server.key", key_pem, 0o600)] {
            let path = data.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod TLS file");
            if let Some((uid, gid)) = self.owner {
                chown(&path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(
            "
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
",
        );
        fs::write(&conf, text).expect("write postgresql.conf");
        let hba = data.join("pg_hba.conf");
        let text = fs::read_to_string(&hba).expect("read pg_hba.conf");
        fs::write(
            &hba,
            format!(
                "hostnossl all all 0.0.0.0/0 reject
{text}"
            ),
        )
        .expect("write pg_hba.conf");
        self.restart();
    }

    /// Runs `sql` as the superuser over the unix socket against database `regmux`, unaligned and
    /// tuples-only (`-At`): one row per line, columns separated by `|`. Returns stdout without its final
    /// newline; panics with psql's stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(PG_DATABASE, sql)
    }

    fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = self.try_psql_in(db, sql);
        assert!(out.status.success(), "psql -d {db} -c {sql:?}: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        text.strip_suffix('\n').unwrap_or(&text).to_owned()
    }

    fn try_psql_in(&self, db: &str, sql: &str) -> Output {
        let mut cmd = Command::new(self.bin.join("psql"));
        scrub_pg_env(&mut cmd);
        cmd.arg("-h").arg(&self.dir).args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db]).args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]);
        run(&mut cmd, Duration::from_secs(60))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command that runs as the cluster's owner, in its folder (a cwd the owner can read).
    fn as_owner(&self, mut cmd: Command) -> Command {
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        scrub_pg_env(&mut cmd);
        cmd.current_dir(&self.dir).env("HOME", &self.dir).env("LC_ALL", "C");
        cmd
    }

    /// Spawns the postmaster on `self.port` and polls `pg_isready`; `Err(log tail)` if the process exits
    /// or the deadline passes.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path().display()));
        let mut cmd = self.as_owner(Command::new(self.bin.join("postgres")));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&self.dir)
            // Speed only: a throwaway cluster need not survive an OS crash.
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone postgres log handle"))
            .stderr(log);
        // The log tail on panic is printed by `Postgres::drop` (it outlives each run's guard).
        let mut child = ChildGuard::spawn("postgres", &mut cmd, None);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = child.try_wait() {
                return Err(format!("postgres exited with {status}:\n{}", super::tail_file(&self.log_path(), 30)));
            }
            let ready = run(
                Command::new("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()]),
                Duration::from_secs(5),
            );
            if ready.status.success() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                signal(child.pid(), "INT");
                child.wait_exit(STOP_WITHIN);
                return Err(format!(
                    "pg_isready on 127.0.0.1:{} did not succeed within {READY_WITHIN:?}:\n{}",
                    self.port,
                    super::tail_file(&self.log_path(), 30)
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[harness] postgres log {} (last lines):\n{}",
                self.log_path().display(),
                super::tail_file(&self.log_path(), 40)
            );
        }
        self.stop();
    }
}

/// The folder of the newest installed PostgreSQL's server binaries (`/usr/lib/postgresql/<ver>/bin`).
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v);
    newest.map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server under {}/<version>/bin: install the postgresql package", root.display())
    })
}

/// The effective uid of this process (the owner of `/proc/self`), without libc.
fn effective_uid() -> u32 {
    fs::metadata("/proc/self").map(|m| m.uid()).expect("stat /proc/self")
}

/// uid and gid of a system user, from `/etc/passwd`.
fn system_user(name: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .unwrap_or_else(|| panic!("no user {name:?} in /etc/passwd: install the postgresql package"))
}

/// Adds the "others may traverse" bit to the folders above `dir` that lack it, inside the temp dir only
/// (a lab is a 0700 temp dir): the server's user must reach its data folder.
fn let_others_traverse(dir: &Path) {
    let tmp = std::env::temp_dir();
    for a in dir.ancestors().skip(1) {
        let meta = fs::metadata(a).unwrap_or_else(|e| panic!("stat {}: {e}", a.display()));
        if meta.mode() & 0o001 != 0 {
            continue;
        }
        assert!(
            a.starts_with(&tmp) && a != tmp,
            "{} is not traversable by the postgres user; put the cluster under {}",
            a.display(),
            tmp.display()
        );
        let mut perms = meta.permissions();
        perms.set_mode(meta.mode() & 0o7777 | 0o001);
        fs::set_permissions(a, perms).unwrap_or_else(|e| panic!("chmod o+x {}: {e}", a.display()));
    }
}

/// libpq settings from the environment would override nothing we pass explicitly, except these.
fn scrub_pg_env(cmd: &mut Command) {
    for var in ["PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGDATA"] {
        cmd.env_remove(var);
    }
}
