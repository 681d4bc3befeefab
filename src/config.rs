//! The TOML configuration of `DESIGN.md` ("Interfaces"), exactly: serde types that reject unknown keys,
//! and [`Config::validate`], which collects every problem at once so `regmux check` can list them all.
//!
//! This module only describes and checks; it opens no sockets. Secrets (`password_file`) are read in
//! [`crate::backend`] when a backend is built, so a reload picks up a rotated secret.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::RepoName;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub htpasswd: Option<PathBuf>,
    /// How long "backend X served digest D" sends the next request for D straight to X (default 30s).
    /// Short on purpose: within it the migration target is not asked again for D, so the target's
    /// misses cannot close before it expires.
    pub location_ttl: Option<String>,
    /// Client connections served at once (default 4096); more wait in the kernel's accept queue.
    /// Read at start (a reload does not change it).
    pub max_connections: Option<usize>,
    /// How long downloads in flight may go on after SIGTERM/SIGINT before they are cut (default 30s).
    pub shutdown_grace: Option<String>,
}

/// Default of `[server] location_ttl`.
pub const DEFAULT_LOCATION_TTL: Duration = Duration::from_secs(30);
/// Default of `[server] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default of `[server] shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl ServerConfig {
    pub fn location_ttl(&self) -> Duration {
        self.location_ttl.as_deref().and_then(|s| parse_duration(s).ok()).unwrap_or(DEFAULT_LOCATION_TTL)
    }
    pub fn max_connections(&self) -> usize {
        self.max_connections.filter(|n| *n > 0).unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace.as_deref().and_then(|s| parse_duration(s).ok()).unwrap_or(DEFAULT_SHUTDOWN_GRACE)
    }
}

fn default_listen() -> String {
    "0.0.0.0:5000".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            htpasswd: None,
            location_ttl: None,
            max_connections: None,
            shutdown_grace: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9100".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_admin_listen() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for the database's TLS (`?sslmode=require`), besides the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Registry,
    Harbor,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Redirects {
    #[default]
    Follow,
    Pass,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub url: String,
    pub prefix: Option<String>,
    #[serde(default)]
    pub kind: BackendKind,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub redirects: Redirects,
    #[serde(default = "yes")]
    pub verify_digests: bool,
}

fn yes() -> bool {
    true
}

/// Never print a password, even in a debug dump of the configuration.
impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("redirects", &self.redirects)
            .field("verify_digests", &self.verify_digests)
            .finish()
    }
}

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl BackendConfig {
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.as_deref().and_then(|s| parse_duration(s).ok()).unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }
    pub fn timeout(&self) -> Duration {
        self.timeout.as_deref().and_then(|s| parse_duration(s).ok()).unwrap_or(DEFAULT_TIMEOUT)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub registries: Vec<String>,
    pub backends: Vec<String>,
    pub target: Option<String>,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub warm: bool,
}

impl RouteConfig {
    /// The migration target: `target`, or the first backend.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref().or(self.backends.first().map(String::as_str))
    }
}

/// `"3s"`, `"500ms"`, `"2m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"3s\" or \"500ms\""))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(format!("{s:?} must be more than 0 and at most 24h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A configuration file that could not be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{} problem(s) in {}:\n  - {}", .problems.len(), .path.display(), .problems.join("\n  - "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        config.validate().map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// The built-in configuration of `regmux serve` without `--config`: one route per public registry,
    /// Docker Hub as the default route. See the README ("Built-in default").
    pub fn builtin() -> Config {
        Config::parse(BUILTIN).expect("the built-in configuration parses")
    }

    /// Every problem in the configuration, or `Ok` when there is none.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            p.push(format!("server.listen {:?} is not an address like 0.0.0.0:5000", self.server.listen));
        }
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            p.push(format!("admin.listen {:?} is not an address like 127.0.0.1:9100", self.admin.listen));
        }
        if let Some(Err(e)) = self.server.location_ttl.as_deref().map(parse_duration) {
            p.push(format!("server.location_ttl: {e}"));
        }
        if let Some(Err(e)) = self.server.shutdown_grace.as_deref().map(parse_duration) {
            p.push(format!("server.shutdown_grace: {e}"));
        }
        if self.server.max_connections == Some(0) {
            p.push("server.max_connections must be more than 0".into());
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) | (None, Some(_)) => p.push("server.tls_cert and server.tls_key go together".into()),
            _ => {}
        }
        for (key, file) in [
            ("server.tls_cert", &self.server.tls_cert),
            ("server.tls_key", &self.server.tls_key),
            ("server.htpasswd", &self.server.htpasswd),
            ("ledger.password_file", &self.ledger.password_file),
            ("ledger.ca_file", &self.ledger.ca_file),
        ] {
            check_file(&mut p, key, file.as_deref());
        }
        if self.ledger.path.is_some() && self.ledger.url.is_some() {
            p.push("ledger: set path (SQLite) or url (PostgreSQL), not both".into());
        }
        if let Some(url) = &self.ledger.url {
            if let Err(e) = crate::ledger::pg::Settings::new(url, None, None) {
                p.push(e);
            }
        } else if self.ledger.password_file.is_some() || self.ledger.ca_file.is_some() {
            p.push("ledger.password_file and ledger.ca_file: only used with ledger.url".into());
        }
        for (name, b) in &self.backends {
            validate_backend(&mut p, name, b);
        }
        self.validate_routes(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    fn validate_routes(&self, p: &mut Vec<String>) {
        if self.routes.is_empty() {
            p.push("no [[routes]]: nothing would be served".into());
        }
        let mut names = HashMap::new();
        let mut hosts: HashMap<String, &str> = HashMap::new();
        let mut registries: HashMap<String, &str> = HashMap::new();
        let defaults: Vec<&str> = self.routes.iter().filter(|r| r.default).map(|r| r.name.as_str()).collect();
        if defaults.len() > 1 {
            p.push(format!("more than one route is marked default: {}", defaults.join(", ")));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let label = if r.name.is_empty() { format!("routes[{i}]") } else { format!("route {:?}", r.name) };
            if r.name.is_empty() {
                p.push(format!("{label}: name is empty"));
            } else if names.insert(r.name.clone(), i).is_some() {
                p.push(format!("{label}: the name is used by another route too"));
            }
            if r.backends.is_empty() {
                p.push(format!("{label}: backends is empty"));
            }
            for b in &r.backends {
                if !self.backends.contains_key(b) {
                    p.push(format!("{label}: backend {b:?} is not defined in [backends]"));
                }
            }
            let mut seen = std::collections::HashSet::new();
            for b in &r.backends {
                if !seen.insert(b) {
                    p.push(format!("{label}: backend {b:?} is listed twice"));
                }
            }
            if let Some(t) = &r.target {
                if !r.backends.contains(t) {
                    p.push(format!("{label}: target {t:?} is not one of its backends"));
                }
            }
            if r.hosts.is_empty() && r.registries.is_empty() && !r.default {
                p.push(format!("{label}: no hosts, no registries and not default: no request can reach it"));
            }
            for h in &r.hosts {
                let h = h.to_ascii_lowercase();
                if h.is_empty() || h.contains('/') {
                    p.push(format!("{label}: host {h:?} is not a host name"));
                } else if let Some(other) = hosts.insert(h.clone(), &r.name) {
                    p.push(format!("{label}: host {h:?} is also claimed by route {other:?}"));
                }
            }
            for reg in &r.registries {
                if reg.contains('/') || reg.parse::<RepoName>().is_err() {
                    p.push(format!("{label}: registry {reg:?} is not a registry name like quay.io"));
                } else if let Some(other) = registries.insert(reg.clone(), &r.name) {
                    p.push(format!("{label}: registry {reg:?} is also claimed by route {other:?}"));
                }
            }
        }
    }
}

fn check_file(p: &mut Vec<String>, key: &str, file: Option<&Path>) {
    if let Some(f) = file {
        if let Err(e) = std::fs::metadata(f) {
            p.push(format!("{key}: cannot read {}: {e}", f.display()));
        }
    }
}

fn validate_backend(p: &mut Vec<String>, name: &str, b: &BackendConfig) {
    let label = format!("backend {name:?}");
    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) {
        p.push(format!("{label}: a backend name may use letters, digits, '-', '_' and '.' only"));
    }
    match reqwest::Url::parse(&b.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            if u.query().is_some() || u.fragment().is_some() || !matches!(u.path(), "" | "/") {
                p.push(format!("{label}: url {:?} must be scheme://host[:port] only; put a path in prefix", b.url));
            }
        }
        _ => p.push(format!("{label}: url {:?} is not an http:// or https:// URL", b.url)),
    }
    if let Some(prefix) = &b.prefix {
        if prefix.parse::<RepoName>().is_err() {
            p.push(format!("{label}: prefix {prefix:?} is not a repository path like quay-proxy or a/b"));
        }
    }
    if b.password.is_some() && b.password_file.is_some() {
        p.push(format!("{label}: set password or password_file, not both"));
    }
    if (b.password.is_some() || b.password_file.is_some()) && b.username.is_none() {
        p.push(format!("{label}: a password needs a username"));
    }
    if b.username.is_some() && b.password.is_none() && b.password_file.is_none() {
        p.push(format!("{label}: username {:?} has no password or password_file", b.username.as_deref().unwrap_or("")));
    }
    check_file(p, &format!("{label}: password_file"), b.password_file.as_deref());
    check_file(p, &format!("{label}: ca_file"), b.ca_file.as_deref());
    for (key, v) in [("connect_timeout", &b.connect_timeout), ("timeout", &b.timeout)] {
        if let Some(v) = v {
            if let Err(e) = parse_duration(v) {
                p.push(format!("{label}: {key}: {e}"));
            }
        }
    }
}

const BUILTIN: &str = r#"
[server]
listen = "0.0.0.0:5000"

[admin]
listen = "127.0.0.1:9100"

[backends.docker-hub]
url = "https://registry-1.docker.io"

[backends.quay]
url = "https://quay.io"

[backends.ghcr]
url = "https://ghcr.io"

[backends.k8s]
url = "https://registry.k8s.io"

[[routes]]
name = "docker.io"
registries = ["docker.io"]
backends = ["docker-hub"]
default = true

[[routes]]
name = "quay.io"
registries = ["quay.io"]
backends = ["quay"]

[[routes]]
name = "ghcr.io"
registries = ["ghcr.io"]
backends = ["ghcr"]

[[routes]]
name = "registry.k8s.io"
registries = ["registry.k8s.io"]
backends = ["k8s"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_is_valid() {
        let c = Config::builtin();
        c.validate().unwrap();
        assert_eq!(c.routes.iter().filter(|r| r.default).count(), 1);
        assert_eq!(c.routes.len(), 4);
    }

    #[test]
    fn example_configuration_is_valid() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml")).unwrap();
        let mut c = Config::parse(&text).unwrap();
        // The example names secret files of a production host; they do not exist here.
        for b in c.backends.values_mut() {
            b.password_file = None;
            b.username = None;
        }
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[server]\nlisten = \"0.0.0.0:5000\"\nlisen = 1\n").unwrap_err();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::parse("[backends.a]\nurl = \"http://x\"\nprefx = \"p\"\n").unwrap_err();
        assert!(e.contains("prefx"), "{e}");
        assert!(Config::parse("[[routes]]\nname = \"r\"\nbackends = []\nwarn = true\n").is_err());
    }

    #[test]
    fn every_problem_is_reported() {
        let c = Config::parse(
            r#"
            [server]
            listen = "nowhere"
            tls_cert = "/nonexistent/cert.pem"
            max_connections = 0
            shutdown_grace = "soon"
            [backends.a]
            url = "ftp://x"
            prefix = "Bad/"
            timeout = "5 parsecs"
            password = "p"
            [backends.b]
            url = "http://b:5000/path"
            [[routes]]
            name = "r"
            backends = ["a", "zzz"]
            target = "b"
            default = true
            [[routes]]
            name = "r"
            backends = []
            default = true
            hosts = ["x"]
            "#,
        )
        .unwrap();
        let problems = c.validate().unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "server.listen",
            "tls_cert and server.tls_key",
            "server.max_connections must be more than 0",
            "server.shutdown_grace",
            "ftp://x",
            "prefix \"Bad/\"",
            "timeout",
            "a password needs a username",
            "http://b:5000/path",
            "backend \"zzz\" is not defined",
            "target \"b\" is not one of its backends",
            "more than one route is marked default",
            "the name is used by another route",
            "backends is empty",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn server_limits_default_and_parse() {
        let c = Config::parse("[server]\n").unwrap();
        assert_eq!(c.server.max_connections(), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.server.shutdown_grace(), DEFAULT_SHUTDOWN_GRACE);
        let c = Config::parse("[server]\nmax_connections = 8\nshutdown_grace = \"1500ms\"\n").unwrap();
        assert_eq!(c.server.max_connections(), 8);
        assert_eq!(c.server.shutdown_grace(), Duration::from_millis(1500));
        assert!(Config::parse("[server]\nmax_connections = -1\n").is_err(), "negative is a parse error");
    }

    #[test]
    fn debug_redacts_passwords() {
        let c = Config::parse("[backends.a]\nurl = \"http://x\"\nusername = \"u\"\npassword = \"hunter2\"\n").unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
    }
}
