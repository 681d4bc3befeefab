//! `regmux client-config`: what each client needs to pull through regmux, for every route.
//!
//! - Docker: `daemon.json` with `registry-mirrors` (Docker Hub only: dockerd mirrors nothing else) and,
//!   for a plain-HTTP endpoint, `insecure-registries`; [`IMAGE_NAMES`], the image names to use for the
//!   other registries (`HOST:PORT/quay.io/…`, routed by prefix) with the classic image store; and, for
//!   Docker with the containerd image store, `/etc/docker/certs.d/<registry>/hosts.toml` files.
//! - Podman / skopeo: `registries.conf` `[[registry]]` entries with a path-prefix `[[registry.mirror]]`.
//! - containerd: one `certs.d/<registry>/hosts.toml` per registry, routed by `ns` (below).
//!
//! **Why containerd gets the bare endpoint and no `override_path`.** containerd adds `?ns=<registry>` to
//! every request it sends to a mirror, and regmux routes on it (the route whose `registries` holds that
//! name), so one host line – the endpoint as it is – serves every registry, and regmux sees the same
//! `/v2/<repository>/…` paths as from Docker. The alternative, `[host."…/v2/quay.io"]` with
//! `override_path = true`, also reaches regmux (by path prefix), but containerd documents
//! `override_path` for registries whose API root is *not* `/v2` (it then uses the URL path verbatim, so
//! the `/v2` must be spelled out), and a slip in that path changes every repository name: the mirror
//! answers 404 and containerd silently falls back to the origin, bypassing regmux.
//!
//! **An endpoint must be a host's root** (`https://mirror.example[:port]`, no path). Docker and Podman
//! put a mirror's path *after* `/v2/`, as part of the repository name (`/v2/regmux/library/alpine`), and
//! dockerd does not accept a mirror URL with a path at all; regmux serves the registry API at `/v2/` of
//! its own root. A reverse proxy that publishes regmux under `/regmux/` therefore cannot work for
//! them, and [`Endpoint::parse`] rejects such an endpoint instead of writing files that silently miss.
//!
//! **Secrets are not needed.** [`load`] validates the configuration like `regmux check` but does not
//! require the files it names (`password_file`, `ca_file`, `htpasswd`, TLS) to be readable: the output
//! depends only on routes and names, and it is usually generated on a workstation where the Swarm
//! secrets under `/run/secrets` do not exist.
//!
//! Text generation, plus reading the configuration file in [`load`]; nothing is written here.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::route::DOCKER_HUB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Docker,
    Podman,
    Containerd,
}

/// One file to write: a path (absolute, as on the client machine) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub text: String,
}

/// The Docker file that lists, per registry other than Docker Hub, the image name to pull through
/// regmux (relative: it is a note for the user, not a file any program reads).
pub const IMAGE_NAMES: &str = "docker-image-names.txt";

#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Where clients reach regmux: `http(s)://host[:port]`, the root of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://host[:port]`, without a trailing slash: what goes into `registry-mirrors` and hosts.toml.
    pub url: String,
    /// `host[:port]`: what goes into image names, `registries.conf` and `insecure-registries`.
    pub host: String,
    /// Plain HTTP (clients must be told the registry is insecure).
    pub plain: bool,
}

impl Endpoint {
    pub fn parse(endpoint: &str) -> Result<Endpoint, ClientConfigError> {
        let err =
            |reason: &str| ClientConfigError::Endpoint { endpoint: endpoint.to_owned(), reason: reason.to_owned() };
        let url = reqwest::Url::parse(endpoint).map_err(|e| err(&format!("not a URL ({e})")))?;
        let plain = match url.scheme() {
            "http" => true,
            "https" => false,
            _ => return Err(err("must start with http:// or https://")),
        };
        let Some(name) = url.host_str() else { return Err(err("has no host")) };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(err("must not carry credentials (use `docker login` / an auth file)"));
        }
        if !matches!(url.path(), "" | "/") {
            return Err(err(
                "has a path; registry clients address the API at /v2/ of a host's root (Docker and Podman \
                 would put the path inside the repository name, and dockerd rejects a mirror with a path), \
                 so publish regmux at the root of its own hostname, e.g. https://mirror.example",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(err("must not have a query or fragment"));
        }
        let host = match url.port() {
            Some(p) => format!("{name}:{p}"),
            None => name.to_owned(),
        };
        Ok(Endpoint { url: format!("{}://{host}", url.scheme()), host, plain })
    }

    /// What `--endpoint` defaults to: `localhost` on the port of `[server] listen`, https when regmux
    /// terminates TLS itself.
    pub fn default_for(config: &Config) -> Endpoint {
        let scheme = if config.server.tls_cert.is_some() { "https" } else { "http" };
        let port = config.server.listen.rsplit_once(':').map_or("5000", |(_, p)| p);
        let host = format!("localhost:{port}");
        Endpoint { url: format!("{scheme}://{host}"), host, plain: scheme == "http" }
    }
}

/// Read, parse and validate a configuration for `client-config`: every check of [`Config::load`]
/// except that the files it names need not exist or be readable (see the module comment).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let config = Config::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
    without_files(&config).validate().map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })?;
    Ok(config)
}

/// A copy whose file references all point at `/`, which always exists: validation then still sees
/// which settings are present (pairs, "only with …"), but not whether their files are readable.
fn without_files(config: &Config) -> Config {
    let mut c = config.clone();
    let any = |f: &mut Option<PathBuf>| {
        if f.is_some() {
            *f = Some(PathBuf::from("/"));
        }
    };
    any(&mut c.server.tls_cert);
    any(&mut c.server.tls_key);
    any(&mut c.server.htpasswd);
    any(&mut c.ledger.password_file);
    any(&mut c.ledger.ca_file);
    for b in c.backends.values_mut() {
        any(&mut b.password_file);
        any(&mut b.ca_file);
    }
    c
}

/// Everything `regmux client-config` does short of writing: load the configuration (the built-in
/// default without a path), check the endpoint (default: [`Endpoint::default_for`]), render.
pub fn generate(path: Option<&Path>, client: Client, endpoint: Option<&str>) -> Result<Vec<File>, ClientConfigError> {
    let config = match path {
        Some(p) => load(p)?,
        None => Config::builtin(),
    };
    let endpoint = match endpoint {
        Some(e) => Endpoint::parse(e)?,
        None => Endpoint::default_for(&config),
    };
    Ok(files(&config, client, &endpoint))
}

/// [`files`] for an endpoint given as text. An endpoint that [`Endpoint::parse`] rejects (a path, a
/// query, another scheme) yields no files: call [`generate`] or [`Endpoint::parse`] to get the reason.
pub fn render(config: &Config, client: Client, endpoint: &str) -> Vec<File> {
    Endpoint::parse(endpoint).map(|e| files(config, client, &e)).unwrap_or_default()
}

/// The upstream origin of a registry name, as clients know it.
fn origin(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{registry}")
    }
}

/// The registries regmux serves by name, in configuration order.
fn registries(config: &Config) -> Vec<&str> {
    config.routes.iter().flat_map(|r| r.registries.iter().map(String::as_str)).collect()
}

pub fn files(config: &Config, client: Client, endpoint: &Endpoint) -> Vec<File> {
    let Endpoint { url, host, plain } = endpoint;
    match client {
        Client::Docker => {
            let hub = config.routes.iter().any(|r| r.registries.iter().any(|x| x == DOCKER_HUB) || r.default);
            let mut daemon = serde_json::Map::new();
            if hub {
                daemon.insert("registry-mirrors".into(), serde_json::json!([url]));
            }
            if *plain {
                daemon.insert("insecure-registries".into(), serde_json::json!([host]));
            }
            let mut files = vec![File {
                path: "/etc/docker/daemon.json".into(),
                text: serde_json::to_string_pretty(&daemon).unwrap_or_default() + "\n",
            }];
            let others: Vec<&str> = registries(config).into_iter().filter(|r| *r != DOCKER_HUB).collect();
            if !others.is_empty() {
                let mut text = String::from(
                    "# dockerd mirrors Docker Hub only. With the classic image store, pull the other registries\n\
                     # through regmux by prefix (then `docker tag` to the original name if you like).\n\
                     # One line per registry: <image as usually written>  <image to pull through regmux>\n",
                );
                for r in &others {
                    text.push_str(&format!("{r}/<repository>:<tag>  {host}/{r}/<repository>:<tag>\n"));
                }
                files.push(File { path: IMAGE_NAMES.into(), text });
                // Docker with the containerd image store reads containerd-style hosts.toml files.
                for f in containerd_files(config, url, *plain) {
                    files.push(File {
                        path: f.path.replace("/etc/containerd/certs.d", "/etc/docker/certs.d"),
                        text: f.text,
                    });
                }
            }
            files
        }
        Client::Podman => {
            let mut text = String::from("# /etc/containers/registries.conf (or a drop-in under registries.conf.d/)\n");
            for r in registries(config) {
                text.push_str(&format!(
                    "\n[[registry]]\nlocation = {r:?}\n\n[[registry.mirror]]\nlocation = \"{host}/{r}\"\n{}",
                    if *plain { "insecure = true\n" } else { "" }
                ));
            }
            vec![File { path: "/etc/containers/registries.conf.d/regmux.conf".into(), text }]
        }
        Client::Containerd => containerd_files(config, url, *plain),
    }
}

/// `certs.d/<registry>/hosts.toml`: the origin as `server`, regmux as the one mirror host, routed by
/// containerd's `ns` parameter (see the module comment for why not `override_path`).
fn containerd_files(config: &Config, url: &str, plain: bool) -> Vec<File> {
    registries(config)
        .into_iter()
        .map(|r| File {
            path: format!("/etc/containerd/certs.d/{r}/hosts.toml"),
            text: format!(
                "server = \"{}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{}",
                origin(r),
                if plain {
                    "  # plain HTTP: ctr needs --plain-http; the CRI plugin accepts http:// hosts\n"
                } else {
                    ""
                }
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn renders_each_client() {
        let c = Config::builtin();
        let docker = files(&c, Client::Docker, &ep("http://mirror:5000"));
        assert_eq!(docker[0].path, "/etc/docker/daemon.json");
        let daemon: serde_json::Value = serde_json::from_str(&docker[0].text).unwrap();
        assert_eq!(daemon["registry-mirrors"], serde_json::json!(["http://mirror:5000"]));
        assert_eq!(daemon["insecure-registries"], serde_json::json!(["mirror:5000"]));
        assert_eq!(docker[1].path, IMAGE_NAMES);
        assert!(docker[1].text.contains("\nquay.io/<repository>:<tag>  mirror:5000/quay.io/<repository>:<tag>\n"));
        assert!(docker.iter().any(|f| f.path == "/etc/docker/certs.d/quay.io/hosts.toml"));
        let podman = files(&c, Client::Podman, &ep("https://mirror:5000"));
        assert!(podman[0].text.contains("location = \"mirror:5000/quay.io\""));
        assert!(!podman[0].text.contains("insecure"));
        let ctrd = files(&c, Client::Containerd, &ep("https://mirror:5000/"));
        assert_eq!(ctrd.len(), 4);
        assert_eq!(ctrd[0].path, "/etc/containerd/certs.d/docker.io/hosts.toml");
        assert!(ctrd[0].text.starts_with("server = \"https://registry-1.docker.io\""));
        assert!(ctrd[0].text.contains("[host.\"https://mirror:5000\"]"));
    }

    /// containerd is routed by `ns`: every registry's hosts.toml names the bare endpoint, no
    /// `override_path`, no `/v2` in the host URL (see the module comment).
    #[test]
    fn containerd_uses_ns_routing_not_override_path() {
        let c = Config::builtin();
        for f in files(&c, Client::Containerd, &ep("https://mirror.example")) {
            let hosts: toml::Table = toml::from_str(&f.text).unwrap();
            let host = hosts["host"].as_table().unwrap();
            assert_eq!(host.keys().collect::<Vec<_>>(), ["https://mirror.example"], "{}", f.path);
            let entry = host["https://mirror.example"].as_table().unwrap();
            assert!(!entry.contains_key("override_path"), "{}", f.path);
            assert_eq!(entry["capabilities"], toml::Value::from(vec!["pull", "resolve"]));
        }
    }

    #[test]
    fn an_endpoint_with_a_path_is_rejected() {
        for bad in ["https://mirror.example/regmux", "https://mirror.example/regmux/", "http://m:5000/v2"] {
            let e = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(e.contains("has a path") && e.contains(bad), "{e}");
            assert!(render(&Config::builtin(), Client::Containerd, bad).is_empty());
        }
        for bad in ["ftp://mirror.example", "mirror.example:5000", "https://u:p@mirror.example", "https://m/?x=1"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ep("https://mirror.example/"), ep("https://mirror.example"));
        assert_eq!(ep("https://mirror.example:8443").host, "mirror.example:8443");
        assert!(ep("http://127.0.0.1:5000").plain);
    }

    #[test]
    fn load_does_not_need_the_secret_files() {
        let dir = std::env::temp_dir().join(format!("regmux-clientconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let base = "[ledger]\nurl = \"postgres://regmux@db:5432/regmux\"\n\
                    password_file = \"/run/secrets/nope-ledger\"\n\
                    [backends.h]\nurl = \"https://harbor.example\"\nusername = \"robot$r\"\n\
                    password_file = \"/run/secrets/nope-robot\"\n\
                    [[routes]]\nname = \"docker.io\"\nregistries = [\"docker.io\"]\nbackends = [\"h\"]\n";
        std::fs::write(&path, base).unwrap();
        assert!(Config::load(&path).is_err(), "the full load wants the secrets");
        let c = load(&path).unwrap();
        assert_eq!(c.backends["h"].password_file.as_deref(), Some(Path::new("/run/secrets/nope-robot")));
        // Everything else is still validated.
        std::fs::write(&path, base.replace("username = \"robot$r\"\n", "")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("a password needs a username") && !e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generate_defaults_to_the_listen_port() {
        let f = generate(None, Client::Docker, None).unwrap();
        assert!(f[0].text.contains("\"http://localhost:5000\""), "{}", f[0].text);
        assert!(generate(None, Client::Podman, Some("https://m.example/x")).is_err());
    }
}
