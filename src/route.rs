//! Which route answers a request: containerd's `ns` parameter, then a first path segment that names a
//! registry, then the `Host` header, then the default route (`DESIGN.md`, "Request path", step 3).
//!
//! Routing only picks among configured routes: an unknown `ns`, prefix or host never makes regmux
//! contact anything new. This module does no I/O.

use std::collections::HashMap;

use crate::config::Config;
use crate::registry::RepoName;

/// The registry whose one-segment names live under `library/` (Docker Hub's official images).
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Backend names, in the order they are tried.
    pub backends: Vec<String>,
    /// The migration target (`target`, or the first backend).
    pub target: String,
    pub registries: Vec<String>,
    pub hosts: Vec<String>,
    pub default: bool,
    pub warm: bool,
    /// One of `registries` is `docker.io`: `alpine` means `library/alpine`.
    pub docker_hub: bool,
}

/// How a request found its route (logged, and useful when a user wonders why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Namespace,
    PathPrefix,
    Host,
    Default,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Namespace => "ns",
            Via::PathPrefix => "prefix",
            Via::Host => "host",
            Via::Default => "default",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route serves registry {0:?} (ns parameter)")]
    UnknownNamespace(String),
    #[error("no route serves this request: no registry prefix, host or default route matched")]
    NoRoute,
}

/// A routed request: the route, how it was chosen, and the repository name as the route's backends
/// know it (registry prefix removed, `library/` added on Docker Hub routes).
#[derive(Debug)]
pub struct Routed<'a> {
    pub route: &'a Route,
    pub via: Via,
    pub name: Option<RepoName>,
}

#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    by_registry: HashMap<String, usize>,
    by_host: HashMap<String, usize>,
    default: Option<usize>,
}

impl Router {
    /// Build from a validated configuration.
    pub fn new(config: &Config) -> Router {
        let mut r = Router::default();
        for (i, rc) in config.routes.iter().enumerate() {
            for reg in &rc.registries {
                r.by_registry.insert(reg.to_ascii_lowercase(), i);
            }
            for h in &rc.hosts {
                r.by_host.insert(h.to_ascii_lowercase(), i);
            }
            if rc.default {
                r.default = Some(i);
            }
            r.routes.push(Route {
                name: rc.name.clone(),
                backends: rc.backends.clone(),
                target: rc.target().unwrap_or_default().to_owned(),
                registries: rc.registries.clone(),
                hosts: rc.hosts.clone(),
                default: rc.default,
                warm: rc.warm,
                docker_hub: rc.registries.iter().any(|x| x == DOCKER_HUB),
            });
        }
        r
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Route a request. `ns` is containerd's query parameter, `host` the `Host` header or `:authority`
    /// (a port is ignored), `name` the repository of the path (`None` for `/v2/_catalog`).
    pub fn route(
        &self,
        ns: Option<&str>,
        host: Option<&str>,
        name: Option<&RepoName>,
    ) -> Result<Routed<'_>, RouteError> {
        let (idx, via) = self.pick(ns, host, name)?;
        let route = &self.routes[idx];
        let name = name.map(|n| {
            // A registry prefix is stripped when it chose the route, and also when `ns` chose it
            // (a containerd hosts.toml may point at `http://regmux/v2/quay.io` with override_path).
            let first = n.segments().next().unwrap_or_default();
            let stripped = match (via, n.strip_first()) {
                (Via::PathPrefix | Via::Namespace, Some(rest)) if route.registries.iter().any(|r| r == first) => rest,
                _ => n.clone(),
            };
            if route.docker_hub && !stripped.as_str().contains('/') {
                format!("library/{stripped}").parse().unwrap_or(stripped)
            } else {
                stripped
            }
        });
        Ok(Routed { route, via, name })
    }

    fn pick(&self, ns: Option<&str>, host: Option<&str>, name: Option<&RepoName>) -> Result<(usize, Via), RouteError> {
        if let Some(ns) = ns {
            let ns = ns.to_ascii_lowercase();
            return match self.by_registry.get(&ns) {
                Some(&i) => Ok((i, Via::Namespace)),
                None => Err(RouteError::UnknownNamespace(ns.chars().take(100).collect())),
            };
        }
        if let Some(n) = name {
            if n.strip_first().is_some() {
                if let Some(&i) = n.segments().next().and_then(|first| self.by_registry.get(first)) {
                    return Ok((i, Via::PathPrefix));
                }
            }
        }
        if let Some(h) = host.map(strip_port) {
            if let Some(&i) = self.by_host.get(&h.to_ascii_lowercase()) {
                return Ok((i, Via::Host));
            }
        }
        self.default.map(|i| (i, Via::Default)).ok_or(RouteError::NoRoute)
    }
}

/// `host:port` → `host`; `[::1]:5000` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let c = Config::parse(
            r#"
            [backends.hub]
            url = "http://hub"
            [backends.quay]
            url = "http://quay"
            [backends.ghcr]
            url = "http://ghcr"
            [[routes]]
            name = "hub"
            registries = ["docker.io"]
            backends = ["hub"]
            default = true
            [[routes]]
            name = "quay"
            hosts = ["mirror.quay.example"]
            registries = ["quay.io"]
            backends = ["quay"]
            [[routes]]
            name = "ghcr"
            hosts = ["ghcr.mirror"]
            backends = ["ghcr"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        Router::new(&c)
    }

    fn n(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    fn route(r: &Router, ns: Option<&str>, host: Option<&str>, name: &str) -> (String, Via, String) {
        let x = r.route(ns, host, Some(&n(name))).unwrap();
        (x.route.name.clone(), x.via, x.name.unwrap().to_string())
    }

    #[test]
    fn table() {
        let r = router();
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a str, (&'a str, Via, &'a str));
        let cases: &[Case] = &[
            (Some("quay.io"), None, "keycloak/keycloak", ("quay", Via::Namespace, "keycloak/keycloak")),
            (Some("QUAY.IO"), Some("ghcr.mirror"), "a/b", ("quay", Via::Namespace, "a/b")),
            (Some("quay.io"), None, "quay.io/keycloak/keycloak", ("quay", Via::Namespace, "keycloak/keycloak")),
            (Some("docker.io"), None, "alpine", ("hub", Via::Namespace, "library/alpine")),
            (None, None, "quay.io/keycloak/keycloak", ("quay", Via::PathPrefix, "keycloak/keycloak")),
            (None, Some("ghcr.mirror"), "quay.io/x/y", ("quay", Via::PathPrefix, "x/y")),
            (None, None, "docker.io/alpine", ("hub", Via::PathPrefix, "library/alpine")),
            (None, None, "docker.io/bitnami/redis", ("hub", Via::PathPrefix, "bitnami/redis")),
            (None, Some("mirror.quay.example:443"), "keycloak/keycloak", ("quay", Via::Host, "keycloak/keycloak")),
            (None, Some("ghcr.mirror"), "owner/app", ("ghcr", Via::Host, "owner/app")),
            (None, Some("GHCR.MIRROR"), "app", ("ghcr", Via::Host, "app")),
            (None, Some("127.0.0.1:5000"), "alpine", ("hub", Via::Default, "library/alpine")),
            (None, None, "bitnami/redis", ("hub", Via::Default, "bitnami/redis")),
            // A one-segment name that equals a registry is a repository, not a prefix.
            (None, None, "quay.io", ("hub", Via::Default, "library/quay.io")),
            // An unknown registry-like prefix is just part of the name on the default route.
            (None, None, "example.com/app", ("hub", Via::Default, "example.com/app")),
        ];
        for (ns, host, name, (want_route, want_via, want_name)) in cases {
            let got = route(&r, *ns, *host, name);
            assert_eq!(got, (want_route.to_string(), *want_via, want_name.to_string()), "{ns:?} {host:?} {name}");
        }
    }

    #[test]
    fn unknown_namespace_is_refused() {
        let r = router();
        assert_eq!(
            r.route(Some("evil.example"), None, Some(&n("a"))).unwrap_err(),
            RouteError::UnknownNamespace("evil.example".into())
        );
    }

    #[test]
    fn no_default_route() {
        let c = Config::parse(
            "[backends.q]\nurl = \"http://q\"\n[[routes]]\nname = \"q\"\nregistries = [\"quay.io\"]\nbackends = [\"q\"]\n",
        )
        .unwrap();
        let r = Router::new(&c);
        assert_eq!(r.route(None, Some("x"), Some(&n("a/b"))).unwrap_err(), RouteError::NoRoute);
        assert!(r.route(None, None, None).is_err());
        assert_eq!(r.route(Some("quay.io"), None, None).unwrap().route.name, "q");
    }

    #[test]
    fn ports() {
        assert_eq!(strip_port("a.b:5000"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:5000"), "[::1]");
    }
}
