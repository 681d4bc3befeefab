//! Integration-test harness: real registries, real clients and the real `regmux` binary on 127.0.0.1.
//!
//! Every test binary that says `mod support;` gets:
//! - [`Lab`]: a scratch folder that lives as long as the test, and [`free_port`];
//! - [`Registry`] (`docker-registry serve`: plain, htpasswd, token or pull-through) and [`TokenIssuer`],
//!   an in-process Docker token endpoint;
//! - test images built once per process with umoci ([`images`]) and pushed with skopeo ([`push`]);
//! - client drivers: skopeo through a mirror, a private [`Containerd`], a private [`Dockerd`], and
//!   [`EtcHostsGuard`] that keeps their Docker Hub fallback on this machine;
//! - [`Regmux`], which runs the built binary and finds the address it bound;
//! - [`http`], a small blocking HTTP/1.1 client for assertions.
//!
//! Rules the harness keeps so that tests can rely on them: only 127.0.0.1 and ephemeral ports, never
//! the internet; readiness is polled on the real condition with a deadline, never slept for; every
//! child process is killed and waited for on `Drop`, panics included, and when a test panics the tail
//! of each child's log is printed so the failure can be read from `cargo test` output alone.
//! Set `REGMUX_KEEP_LAB=1` to keep lab folders after a failed test.
//!
//! Tests that touch machine-wide state (dockerd, `/etc/hosts`) take [`machine_lock`] first.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

mod checks;
mod clients;
mod http;
mod images;
mod postgres;
mod process;
mod registry;
mod regmux;
mod token;

pub use checks::Checks;
pub use clients::{
    skopeo_copy_via_mirror, write_hosts_toml, write_registries_conf, Containerd, Dockerd, EtcHostsGuard,
    DOCKER_HUB_NAMES,
};
pub use http::{basic_auth, http, try_http, Response};
pub use images::{
    blob_digests, config_digest, corrupt_blob, delete_blob, image, images, layer_digests, manifest_bytes,
    manifest_digest, push, push_with_creds, random_bytes, try_push, BuiltImage, Format,
};
pub use postgres::{Postgres, PG_DATABASE, PG_ROLE};
pub use process::{run, wait_for, ChildGuard};
pub use registry::{LoggedRequest, Registry, RegistryOpts};
pub use regmux::{config_header, Regmux};
pub use token::{TokenIssuer, TokenOpts, TokenRequest};

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A scratch folder for one test, removed on drop (kept when `REGMUX_KEEP_LAB=1` and the test panicked).
#[derive(Debug)]
pub struct Lab {
    dir: Option<tempfile::TempDir>,
}

impl Lab {
    /// A new empty folder under the system temp dir.
    pub fn new() -> Lab {
        let dir = tempfile::Builder::new().prefix("regmux-lab-").tempdir().expect("create lab temp dir");
        Lab { dir: Some(dir) }
    }

    /// The folder itself.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("lab dir present until drop").path()
    }

    /// `path()/rel`, created (with parents) as a folder.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.path().join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create lab dir {}: {e}", p.display()));
        p
    }

    /// Writes `contents` to `path()/rel` (parents created) and returns the full path.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create lab dir {}: {e}", parent.display()));
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write lab file {}: {e}", p.display()));
        p
    }

    /// Reads `path()/rel` as text.
    pub fn read(&self, rel: &str) -> String {
        let p = self.path().join(rel);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read lab file {}: {e}", p.display()))
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if std::thread::panicking() {
            if std::env::var_os("REGMUX_KEEP_LAB").is_some_and(|v| v == "1") {
                eprintln!("[harness] lab kept at {}", dir.keep().display());
            } else {
                eprintln!("[harness] lab {} removed; set REGMUX_KEEP_LAB=1 to keep it", dir.path().display());
            }
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bind :0, read the port, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// Serializes tests that touch machine-wide state (dockerd, `/etc/hosts`) inside one test binary.
/// A panic in another holder does not poison it for the rest.
pub fn machine_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A short folder directly under /tmp: unix socket paths must stay under ~108 bytes, and a lab path
/// plus containerd's own suffixes can pass that.
pub(crate) fn short_tmp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("create short dir under /tmp")
}

/// The last `n` lines of a file, for failure reports ("" if unreadable).
pub(crate) fn tail_file(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    tail(&text, n)
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
