//! A real `docker-registry serve` (distribution 2.8.2) on 127.0.0.1:<free port>, with its storage,
//! config and logs in a folder the caller chooses (usually inside a [`super::Lab`]).
//!
//! Files in that folder: `config.yml`, `storage/`, `registry.log` (its stderr: the app log) and
//! `access.log` (its stdout: one combined-log line per request, written after the response).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{ChildGuard, POLL};
use super::token::TokenIssuer;
use super::{free_port, try_http};

/// How the registry authenticates clients and where it gets content from.
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    auth: Auth,
    proxy: Option<Proxy>,
}

#[derive(Debug, Clone, Default)]
enum Auth {
    #[default]
    None,
    Htpasswd {
        user: String,
        pass: String,
    },
    Token {
        realm: String,
        service: String,
        issuer: String,
        rootcertbundle: PathBuf,
    },
}

#[derive(Debug, Clone)]
struct Proxy {
    remote_url: String,
    creds: Option<(String, String)>,
}

impl RegistryOpts {
    /// No auth, local storage (the default).
    pub fn plain() -> RegistryOpts {
        RegistryOpts::default()
    }

    /// Clients must send Basic credentials `user:pass` (bcrypt htpasswd file made with `htpasswd -Bbn`).
    pub fn htpasswd(mut self, user: &str, pass: &str) -> RegistryOpts {
        self.auth = Auth::Htpasswd { user: user.into(), pass: pass.into() };
        self
    }

    /// Clients must bring a bearer token from `issuer` (`auth.token` with its realm, service,
    /// issuer name and certificate bundle).
    pub fn token(mut self, issuer: &TokenIssuer) -> RegistryOpts {
        self.auth = Auth::Token {
            realm: issuer.realm(),
            service: issuer.service().to_string(),
            issuer: issuer.issuer_name().to_string(),
            rootcertbundle: issuer.cert_path().to_path_buf(),
        };
        self
    }

    /// Pull-through cache of `remote_url` (the registry refuses pushes in this mode, and panics at
    /// start if the remote does not answer).
    pub fn proxy(mut self, remote_url: &str) -> RegistryOpts {
        self.proxy = Some(Proxy { remote_url: remote_url.into(), creds: None });
        self
    }

    /// Pull-through cache of `remote_url`, logging in there as `user:pass`.
    pub fn proxy_with_creds(mut self, remote_url: &str, user: &str, pass: &str) -> RegistryOpts {
        self.proxy = Some(Proxy { remote_url: remote_url.into(), creds: Some((user.into(), pass.into())) });
        self
    }
}

/// One request as the registry's access log recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// A running docker-registry; killed and reaped on drop.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    port: u16,
    child: Option<ChildGuard>,
}

impl Registry {
    /// Writes the config into `dir` (created if needed) and starts the registry on a free port.
    /// Returns once `GET /v2/` answers 200 or 401. Panics with the registry's log if it does not.
    pub fn start(dir: impl AsRef<Path>, opts: RegistryOpts) -> Registry {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(dir.join("storage"))
            .unwrap_or_else(|e| panic!("create registry dir {}: {e}", dir.display()));
        let auth_yaml = match &opts.auth {
            Auth::None => String::new(),
            Auth::Htpasswd { user, pass } => {
                let out =
                    Command::new("htpasswd").args(["-Bbn", user, pass]).output().expect("run htpasswd (apache2-utils)");
                assert!(out.status.success(), "htpasswd -Bbn failed: {out:?}");
                let file = dir.join("htpasswd");
                fs::write(&file, &out.stdout).expect("write htpasswd file");
                format!("auth: {{htpasswd: {{realm: basic-realm, path: {}}}}}\n", q(&file))
            }
            Auth::Token { realm, service, issuer, rootcertbundle } => format!(
                "auth: {{token: {{realm: {}, service: {}, issuer: {}, rootcertbundle: {}}}}}\n",
                q(realm),
                q(service),
                q(issuer),
                q(rootcertbundle)
            ),
        };
        let proxy_yaml = match &opts.proxy {
            None => String::new(),
            Some(Proxy { remote_url, creds: None }) => format!("proxy: {{remoteurl: {}}}\n", q(remote_url)),
            Some(Proxy { remote_url, creds: Some((u, p)) }) => {
                format!("proxy: {{remoteurl: {}, username: {}, password: {}}}\n", q(remote_url), q(u), q(p))
            }
        };
        let mut reg = Registry { dir, port: 0, child: None };
        // The port is free when picked but another process could take it before the registry binds:
        // pick again if the registry says so.
        for attempt in 1..=3 {
            reg.port = free_port();
            let config = format!(
                "version: 0.1\n\
                 log: {{level: info, formatter: text}}\n\
                 storage:\n  filesystem: {{rootdirectory: {storage}}}\n  delete: {{enabled: true}}\n  \
                 maintenance: {{uploadpurging: {{enabled: false}}}}\n\
                 http: {{addr: 127.0.0.1:{port}, secret: regmux-test-secret}}\n\
                 {auth_yaml}{proxy_yaml}",
                storage = q(reg.storage_dir()),
                port = reg.port,
            );
            fs::write(reg.config_path(), config).expect("write registry config.yml");
            match reg.spawn_and_wait() {
                Ok(()) => return reg,
                Err(log) if attempt < 3 && log.contains("address already in use") => continue,
                Err(log) => panic!("docker-registry in {} did not become ready:\n{log}", reg.dir.display()),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts the registry again after [`Registry::stop`], same port, config and storage.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn_and_wait() {
            panic!("docker-registry in {} did not restart:\n{log}", self.dir.display());
        }
    }

    /// Spawns and polls `GET /v2/`; `Err(log tail)` if the process exits or 15 s pass.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .unwrap_or_else(|e| panic!("open registry {name}: {e}"))
        };
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(open("access.log"))
            .stderr(open("registry.log"));
        let mut child = ChildGuard::spawn("docker-registry", &mut cmd, Some(self.log_path()));
        let deadline = Instant::now() + Duration::from_secs(15);
        let url = format!("{}/v2/", self.url());
        loop {
            if let Some(status) = child.try_wait() {
                return Err(format!("exited with {status}:\n{}", super::tail_file(&self.log_path(), 30)));
            }
            if let Ok(r) = try_http("GET", &url, &[]) {
                if r.status == 200 || r.status == 401 {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no answer on {url} in 15 s:\n{}", super::tail_file(&self.log_path(), 30)));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills and reaps the registry (a dead backend); the port stays reserved for [`Registry::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.stop();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().is_none())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for image references and `hosts.toml`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, for regmux backend URLs.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The filesystem driver's root (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// The application log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The access log so far (one line per finished request; poll, it lags the response slightly).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Requests parsed from the access log, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.access_log().lines().filter_map(parse_access_line).collect()
    }
}

/// Parses `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split_whitespace();
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest { method, path, status })
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn q(s: impl AsRef<std::ffi::OsStr>) -> String {
    let s = s.as_ref().to_str().expect("registry config values are UTF-8");
    serde_json::to_string(s).expect("quote string")
}
