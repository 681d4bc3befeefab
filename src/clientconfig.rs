//! `regmux client-config`: what each client needs to pull through regmux, for every route.
//!
//! - Docker: `daemon.json` with `registry-mirrors` (Docker Hub only: dockerd mirrors nothing else), the
//!   image names to use for the other registries (`HOST:PORT/quay.io/…`, routed by prefix), and for Docker
//!   with the containerd image store, `hosts.toml` files.
//! - Podman / skopeo: `registries.conf` `[[registry]]` entries with a path-prefix `[[registry.mirror]]`.
//! - containerd: one `certs.d/<registry>/hosts.toml` per registry; containerd adds `?ns=<registry>` to
//!   every request, so the plain endpoint works for all of them (no `override_path`).
//!
//! Pure text generation: no I/O here.

use crate::config::Config;
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

/// The upstream origin of a registry name, as clients know it.
fn origin(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{registry}")
    }
}

/// `http://host:5000/` → (`host:5000`, plain HTTP?).
fn host_of(endpoint: &str) -> (String, bool) {
    let plain = endpoint.starts_with("http://");
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    (rest.trim_end_matches('/').to_owned(), plain)
}

/// The registries regmux serves by name, in configuration order.
fn registries(config: &Config) -> Vec<&str> {
    config.routes.iter().flat_map(|r| r.registries.iter().map(String::as_str)).collect()
}

pub fn render(config: &Config, client: Client, endpoint: &str) -> Vec<File> {
    let (host, plain) = host_of(endpoint);
    let endpoint = endpoint.trim_end_matches('/');
    match client {
        Client::Docker => {
            let hub = config.routes.iter().any(|r| r.registries.iter().any(|x| x == DOCKER_HUB) || r.default);
            let mut daemon = serde_json::Map::new();
            if hub {
                daemon.insert("registry-mirrors".into(), serde_json::json!([endpoint]));
            }
            if plain {
                daemon.insert("insecure-registries".into(), serde_json::json!([host]));
            }
            let mut files = vec![File {
                path: "/etc/docker/daemon.json".into(),
                text: serde_json::to_string_pretty(&daemon).unwrap_or_default() + "\n",
            }];
            let others: Vec<&str> = registries(config).into_iter().filter(|r| *r != DOCKER_HUB).collect();
            if !others.is_empty() {
                let mut text = String::from(
                    "# dockerd mirrors Docker Hub only. With the classic image store, pull other registries\n\
                     # through regmux by prefix (then `docker tag` to the original name if you like):\n",
                );
                for r in &others {
                    text.push_str(&format!("#   docker pull {host}/{r}/<repository>:<tag>\n"));
                }
                files.push(File { path: "README-docker-images.txt".into(), text });
                // Docker with the containerd image store reads containerd-style hosts.toml files.
                for f in containerd_files(config, endpoint, plain) {
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
                    if plain { "insecure = true\n" } else { "" }
                ));
            }
            vec![File { path: "/etc/containers/registries.conf.d/regmux.conf".into(), text }]
        }
        Client::Containerd => containerd_files(config, endpoint, plain),
    }
}

fn containerd_files(config: &Config, endpoint: &str, plain: bool) -> Vec<File> {
    registries(config)
        .into_iter()
        .map(|r| File {
            path: format!("/etc/containerd/certs.d/{r}/hosts.toml"),
            text: format!(
                "server = \"{}\"\n\n[host.\"{endpoint}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{}",
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

    #[test]
    fn renders_each_client() {
        let c = Config::builtin();
        let docker = render(&c, Client::Docker, "http://mirror:5000");
        assert!(docker[0].text.contains("\"registry-mirrors\""));
        assert!(docker[0].text.contains("\"mirror:5000\""), "insecure for plain HTTP");
        assert!(docker[1].text.contains("docker pull mirror:5000/quay.io/"));
        let podman = render(&c, Client::Podman, "https://mirror:5000");
        assert!(podman[0].text.contains("location = \"mirror:5000/quay.io\""));
        assert!(!podman[0].text.contains("insecure"));
        let ctrd = render(&c, Client::Containerd, "https://mirror:5000/");
        assert_eq!(ctrd.len(), 4);
        assert_eq!(ctrd[0].path, "/etc/containerd/certs.d/docker.io/hosts.toml");
        assert!(ctrd[0].text.starts_with("server = \"https://registry-1.docker.io\""));
        assert!(ctrd[0].text.contains("[host.\"https://mirror:5000\"]"));
    }
}
