//! The registry pull API as clients see it through regmux, against real registries (docker-registry
//! 2.8.2) on 127.0.0.1: the `/v2/` check, manifests, blobs, listings, routing, ordered fallback across
//! backends, verified streaming, the error envelope, path validation, backend authentication (Basic,
//! bearer tokens with and without credentials, token expiry and refusal), a dead backend, the
//! location cache; and the binary itself: `regmux check`, configuration by environment, and the
//! JSON request log (one event per request, never a credential).
//!
//! Most tests use [`fixture`]: two plain registries and regmux in front of them, configured like a
//! migration in progress (`harbor` first, with its content under a project prefix; the `old` mirror
//! second). Each test starts its own fixture (a registry starts in tens of milliseconds), so tests can
//! run in parallel threads and may stop backends or corrupt their storage without affecting others.
//!
//! Content of the fixture (names as a Docker Hub client asks for them; `library/` is added by regmux):
//!
//! | client name | `harbor` (`hub-proxy/library/…`)                | `old` (`library/…`)             |
//! |-------------|-------------------------------------------------|---------------------------------|
//! | `small`     | `oci` (OCI), `v2s2` (Docker schema2), `fresh` (OCI) | `oci` (OCI), `legacy` (schema2) |
//! | `multi`     | `1` (OCI index and both platform manifests)     | –                               |
//! | `other`     | –                                               | `1` (OCI)                       |
//! | `partial`   | `1` (= `small`), its first layer unlinked       | `1` (= `small`, whole)          |
//!
//! and on `harbor` under `quay-proxy/`: `keycloak/keycloak:24.0` (= `other`), served by the `quay`
//! route (`?ns=quay.io`, `/v2/quay.io/…`, `Host: mirror.quay.test`).
//!
//! Access logs of the registries ([`Registry::requests`]) tell which backend was asked for what;
//! [`Backend::requests`] keeps only what came after seeding, without regmux's health probes
//! (`GET /v2/`). Nothing here sleeps (log lines and log messages are polled for with a deadline),
//! except [`expired_token_is_replaced`], whose point is that time passes.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Backend headers regmux may pass on (`DESIGN.md`, "Stream").
const PASSED_HEADERS: [&str; 6] =
    ["content-type", "content-length", "docker-content-digest", "etag", "content-range", "accept-ranges"];
/// Headers regmux (or hyper) sets itself on every answer.
const OWN_HEADERS: [&str; 4] = ["docker-distribution-api-version", "date", "connection", "transfer-encoding"];

// ---------------------------------------------------------------------------------------------
// Fixture

/// Two plain registries and regmux in front of them. Fields drop in order: regmux, the registries,
/// then the lab folder.
struct Fixture {
    regmux: Regmux,
    harbor: Backend,
    old: Backend,
    _lab: Lab,
}

/// A registry behind regmux, and how many lines its access log had once it was seeded, so that
/// assertions see only what regmux asked for.
struct Backend {
    reg: Registry,
    seeded: usize,
}

impl Backend {
    /// Waits until every request so far is in the access log (a marker request is sent and waited
    /// for), and remembers where the log ends.
    fn seeded(reg: Registry) -> Backend {
        let marker = "/v2/seeding/done/manifests/marker";
        http("GET", &format!("{}{marker}", reg.url()), &[]);
        let seeded = wait_for("the seeding marker in the access log", Duration::from_secs(5), || {
            let requests = reg.requests();
            requests.iter().position(|r| r.path == marker).map(|i| i + 1)
        });
        Backend { reg, seeded }
    }

    /// What the registry was asked since it was seeded, except `GET /v2/` (regmux's health probe)
    /// and the requests of [`Fixture::sync_logs`].
    fn requests(&self) -> Vec<LoggedRequest> {
        self.reg
            .requests()
            .into_iter()
            .skip(self.seeded)
            .filter(|r| !(r.method == "GET" && r.path == "/v2/"))
            .filter(|r| !r.path.contains("/manifests/sync-"))
            .collect()
    }

    /// How many requests with exactly this method and path (query included) it got since seeding.
    fn count(&self, method: &str, path: &str) -> usize {
        self.requests().iter().filter(|r| r.method == method && r.path == path).count()
    }
}

/// Starts `harbor` and `old`, pushes the content in the table at the top of this file, and starts
/// regmux with [`two_backend_config`].
fn fixture() -> Fixture {
    let lab = Lab::new();
    let harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain());
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    std::thread::scope(|s| {
        s.spawn(|| {
            let h = harbor.addr();
            push("small", &format!("{h}/hub-proxy/library/small:oci"), Format::Oci);
            push("small", &format!("{h}/hub-proxy/library/small:v2s2"), Format::V2s2);
            push("small", &format!("{h}/hub-proxy/library/small:fresh"), Format::Oci);
            push("multi", &format!("{h}/hub-proxy/library/multi:1"), Format::All);
            push("small", &format!("{h}/hub-proxy/library/partial:1"), Format::Oci);
            delete_blob(&harbor.url(), "hub-proxy/library/partial", &layer_digests("small")[0]);
            push("other", &format!("{h}/quay-proxy/keycloak/keycloak:24.0"), Format::Oci);
        });
        s.spawn(|| {
            let o = old.addr();
            push("small", &format!("{o}/library/small:oci"), Format::Oci);
            push("small", &format!("{o}/library/small:legacy"), Format::V2s2);
            push("other", &format!("{o}/library/other:1"), Format::Oci);
            push("small", &format!("{o}/library/partial:1"), Format::Oci);
        });
    });
    let config = two_backend_config(&lab.path().join("ledger.db"), &harbor.url(), &old.url());
    let regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    Fixture { regmux, harbor: Backend::seeded(harbor), old: Backend::seeded(old), _lab: lab }
}

/// The test configuration: route `hub` (Docker Hub, default) tries `harbor` (prefix `hub-proxy`)
/// then `old`; route `quay` (`quay.io`, host `mirror.quay.test`) has `harbor-quay` (same registry,
/// prefix `quay-proxy`).
fn two_backend_config(ledger: &std::path::Path, harbor_url: &str, old_url: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[ledger]
path = "{ledger}"

[backends.harbor]
url = "{harbor_url}"
prefix = "hub-proxy"

[backends.old]
url = "{old_url}"

[backends.harbor-quay]
url = "{harbor_url}"
prefix = "quay-proxy"

[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["harbor", "old"]
default = true

[[routes]]
name = "quay"
registries = ["quay.io"]
hosts = ["mirror.quay.test"]
backends = ["harbor-quay"]
"#,
        ledger = ledger.display(),
    )
}

impl Fixture {
    /// One request to regmux; `path` includes `/v2/` and any query.
    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        http(method, &format!("{}{path}", self.regmux.url()), headers)
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.req("GET", path, headers)
    }

    /// Makes sure both access logs hold every request regmux sent before this call: a registry
    /// writes its access-log line just after answering, so regmux may answer its client a moment
    /// before the line is there. A request that reaches both backends (an unknown tag) is sent, and
    /// its lines are waited for.
    fn sync_logs(&self) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("sync-{}", N.fetch_add(1, Ordering::SeqCst));
        let r = self.get(&format!("/v2/small/manifests/{tag}"), &accept_manifests());
        assert_eq!(r.status, 404, "sync request: {}", r.text());
        for reg in [&self.harbor.reg, &self.old.reg] {
            wait_for(&format!("{tag} in {}'s access log", reg.dir().display()), Duration::from_secs(5), || {
                reg.requests().iter().any(|r| r.path.ends_with(&format!("/manifests/{tag}"))).then_some(())
            });
        }
    }
}

/// Every manifest media type, one `Accept` line each (the way Docker and containerd send them).
fn accept_manifests() -> Vec<(&'static str, &'static str)> {
    accept(&[DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX])
}

fn accept(types: &[&'static str]) -> Vec<(&'static str, &'static str)> {
    types.iter().map(|t| ("Accept", *t)).collect()
}

/// Asserts the OCI error envelope `{"errors":[{"code","message",…}]}` with this status and code,
/// and returns the error object.
#[track_caller]
fn assert_error(resp: &Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    assert_eq!(resp.header("Docker-Distribution-API-Version"), Some("registry/2.0"), "{:?}", resp.headers);
    assert!(
        resp.header("Content-Type").is_some_and(|t| t.starts_with("application/json")),
        "error content type: {:?}",
        resp.headers
    );
    let body = resp.json();
    let errors = body["errors"].as_array().unwrap_or_else(|| panic!("no errors array: {body}"));
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["code"], code, "{body}");
    assert!(errors[0]["message"].as_str().is_some_and(|m| !m.is_empty()), "message: {body}");
    errors[0].clone()
}

/// `detail.attempts` of an error names each backend that was asked, in order.
#[track_caller]
fn assert_attempts(error: &Value, backends: &[&str]) {
    let attempts = error["detail"]["attempts"].as_array().unwrap_or_else(|| panic!("no detail.attempts: {error}"));
    let named: Vec<&str> =
        attempts.iter().map(|a| a.as_str().and_then(|a| a.split(':').next()).unwrap_or("")).collect();
    assert_eq!(named, backends, "attempts: {error}");
}

/// No header outside the allow-list (and what regmux sets itself) reached the client.
#[track_caller]
fn assert_only_allowed_headers(resp: &Response) {
    for (name, _) in &resp.headers {
        let name = name.to_ascii_lowercase();
        assert!(
            PASSED_HEADERS.contains(&name.as_str()) || OWN_HEADERS.contains(&name.as_str()),
            "backend header {name:?} passed to the client: {:?}",
            resp.headers
        );
    }
}

/// A `HEAD` on a raw connection, returning the head and every byte that followed it until the server
/// closed the connection (the harness client does not read a body for HEAD, so it cannot see one).
fn raw_head(addr: &str, path: &str, headers: &[(&str, &str)]) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to regmux");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut req = format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send HEAD");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read HEAD answer until close");
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers") + 4;
    (String::from_utf8_lossy(&all[..end]).into_owned(), all[end..].to_vec())
}

/// A HEAD answer: status, the headers that say what a GET would return, and no body bytes.
#[track_caller]
fn assert_head(fx: &Fixture, path: &str, headers: &[(&str, &str)], digest: &str, len: usize) {
    let r = fx.req("HEAD", path, headers);
    assert_eq!(r.status, 200, "HEAD {path}");
    assert_eq!(r.header("Docker-Content-Digest"), Some(digest), "HEAD {path}: {:?}", r.headers);
    assert_eq!(r.header("Content-Length"), Some(len.to_string().as_str()), "HEAD {path}: {:?}", r.headers);
    let (head, body) = raw_head(fx.regmux.addr(), path, headers);
    assert!(head.starts_with("HTTP/1.1 200"), "raw HEAD {path}: {head}");
    assert!(body.is_empty(), "HEAD {path} sent {} body bytes", body.len());
}

/// A GET of a manifest that must succeed with exactly these bytes, digest and media type.
#[track_caller]
fn assert_manifest(resp: &Response, image: &str, format: Format, media_type: &str) {
    assert_eq!(resp.status, 200, "manifest {image} ({format:?}): {}", resp.text());
    let digest = manifest_digest(image, format);
    assert_eq!(resp.header("Docker-Content-Digest"), Some(digest.as_str()), "{:?}", resp.headers);
    assert_eq!(resp.header("Content-Type"), Some(media_type), "{:?}", resp.headers);
    assert!(resp.complete, "manifest body cut short");
    assert_eq!(resp.body, manifest_bytes(image, format), "manifest bytes of {image} ({format:?})");
}

/// A GET of a blob that must succeed whole.
#[track_caller]
fn assert_blob(resp: &Response, digest: &str) {
    assert_eq!(resp.status, 200, "blob {digest}: {}", resp.text());
    assert!(resp.complete, "blob {digest} cut short after {} bytes", resp.body.len());
    assert_eq!(resp.body_digest(), digest, "blob bytes");
    assert_eq!(resp.header("Docker-Content-Digest"), Some(digest), "{:?}", resp.headers);
    assert_eq!(resp.header("Content-Length"), Some(resp.body.len().to_string().as_str()), "{:?}", resp.headers);
}

fn tags_of(resp: &Response) -> Vec<String> {
    assert_eq!(resp.status, 200, "tags/list: {}", resp.text());
    resp.json()["tags"].as_array().expect("tags array").iter().map(|t| t.as_str().expect("tag").to_string()).collect()
}

fn repositories_of(resp: &Response) -> Vec<String> {
    assert_eq!(resp.status, 200, "_catalog: {}", resp.text());
    resp.json()["repositories"]
        .as_array()
        .expect("repositories array")
        .iter()
        .map(|t| t.as_str().expect("repository").to_string())
        .collect()
}

/// `</v2/…>; rel="next"` → `/v2/…`.
fn next_link(resp: &Response) -> Option<String> {
    let link = resp.header("Link")?;
    assert!(link.ends_with("rel=\"next\""), "Link: {link}");
    Some(link.strip_prefix('<')?.split_once('>')?.0.to_string())
}

/// Rewrites a manifest in a registry's storage as other valid JSON (an annotation added), so the
/// registry serves it under its old digest with bytes that no longer match it.
fn tamper_manifest(storage: &std::path::Path, digest: &str) {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).expect("read manifest")).expect("manifest JSON");
    m["annotations"] = json!({"tampered": "yes"});
    std::fs::write(&path, serde_json::to_vec(&m).expect("serialize")).expect("write manifest");
}

/// Makes one blob of one repository unreadable to a registry without making it look absent: the
/// repository's link to it no longer holds a digest, and distribution answers 500 while `/v2/` and
/// everything else still answer (so health probes keep the backend up).
fn break_blob_link(storage: &std::path::Path, repo: &str, digest: &str) {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let link = storage.join("docker/registry/v2/repositories").join(repo).join("_layers/sha256").join(hex).join("link");
    assert!(link.is_file(), "no link {}", link.display());
    std::fs::write(&link, "not a digest").expect("overwrite blob link");
}

/// Starts `regmux serve --config` with `RUST_LOG=debug` (every event of regmux and its libraries),
/// so that a secret leaking into any log line would show.
fn start_debug(lab: &Lab, config: &str) -> Regmux {
    let path = lab.write("regmux/regmux.toml", config);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmux"));
    cmd.arg("serve").arg("--config").arg(&path).env("RUST_LOG", "debug");
    Regmux::spawn(cmd, &path)
}

/// Route `hub` (Docker Hub, default) with one backend, `harbor` (prefix `hub-proxy`), logging in with
/// `creds` when given.
fn harbor_only_config(lab: &Lab, harbor: &Registry, creds: Option<(&str, &str)>) -> String {
    let login = creds.map_or(String::new(), |(user, pass)| format!("username = \"{user}\"\npassword = \"{pass}\"\n"));
    format!(
        "{header}\n[backends.harbor]\nurl = \"{url}\"\nprefix = \"hub-proxy\"\n{login}\n\
         [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"harbor\"]\ndefault = true\n",
        header = config_header(&lab.path().join("ledger.db")),
        url = harbor.url(),
    )
}

/// Neither a secret nor `user:secret` in Basic form (base64) is anywhere in regmux's log.
#[track_caller]
fn assert_no_secrets(regmux: &Regmux, creds: &[(&str, &str)]) {
    let logs = regmux.logs();
    assert!(logs.lines().count() > 5, "too little log to judge:\n{logs}");
    for (user, pass) in creds {
        let basic = basic_auth(user, pass);
        let b64 = basic.trim_start_matches("Basic ").trim();
        assert!(!logs.contains(pass), "the password of {user} is in regmux's log:\n{logs}");
        assert!(!logs.contains(b64), "Basic credentials of {user} are in regmux's log:\n{logs}");
    }
}

/// The JSON `request` events (`--log-format json`) in a log; every line must be JSON.
fn request_events(logs: &str) -> Vec<Value> {
    logs.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .filter(|e| e["message"] == "request")
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `/v2/` answers the API version check; every method but GET/HEAD and every push endpoint is 405
/// `UNSUPPORTED`; none of them reaches a backend (a DELETE in particular deletes nothing).
#[test]
fn base_endpoint_and_unsupported_requests() {
    let fx = fixture();
    let ping = fx.get("/v2/", &[]);
    assert_eq!(ping.status, 200, "{}", ping.text());
    assert_eq!(ping.header("Docker-Distribution-API-Version"), Some("registry/2.0"));
    assert_eq!(ping.json(), json!({}));
    let head = fx.req("HEAD", "/v2/", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Docker-Distribution-API-Version"), Some("registry/2.0"));

    let manifest = manifest_digest("small", Format::Oci);
    let layer = &layer_digests("small")[0];
    let unsupported = [
        ("POST", "/v2/small/blobs/uploads/".to_string()),
        ("POST", format!("/v2/small/blobs/uploads/?mount={layer}&from=library/other")),
        ("PUT", "/v2/small/manifests/oci".to_string()),
        ("PUT", format!("/v2/small/blobs/uploads/some-uuid?digest={layer}")),
        ("PATCH", "/v2/small/blobs/uploads/some-uuid".to_string()),
        ("DELETE", format!("/v2/small/manifests/{manifest}")),
        ("DELETE", format!("/v2/small/blobs/{layer}")),
        ("OPTIONS", "/v2/".to_string()),
        // Upload paths are refused whatever the method.
        ("GET", "/v2/small/blobs/uploads/".to_string()),
        ("GET", "/v2/small/blobs/uploads/some-uuid".to_string()),
    ];
    for (method, path) in &unsupported {
        let r = fx.req(method, path, &[]);
        assert_error(&r, 405, "UNSUPPORTED");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}: a 405 names the allowed methods");
    }
    let r = fx.req("HEAD", "/v2/small/blobs/uploads/some-uuid", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // Everything else is 405 UNSUPPORTED too: paths that are no pull endpoint, whatever the method
    // (a malformed name inside such a path does not make it a 400: there is no endpoint to name).
    for path in [
        "/v2/small/unknown/x",
        "/v1/",
        "/v1/_ping",
        "/",
        "/v2/small",
        "/v2/small/manifests",
        "/v2/small/tags/other",
        "/v2/_catalog/x",
        "/v2/SMALL/unknown/x",
        "/metrics",
    ] {
        for method in ["GET", "HEAD", "PUT"] {
            let r = fx.req(method, path, &[]);
            if method == "HEAD" {
                assert_eq!(r.status, 405, "HEAD {path}");
            } else {
                assert_error(&r, 405, "UNSUPPORTED");
            }
        }
    }

    fx.sync_logs();
    assert_eq!(fx.harbor.requests(), [], "harbor was asked");
    assert_eq!(fx.old.requests(), [], "old was asked");
    // The DELETEs deleted nothing.
    assert_manifest(&fx.get("/v2/small/manifests/oci", &accept_manifests()), "small", Format::Oci, OCI_MANIFEST);
    assert_blob(&fx.get(&format!("/v2/small/blobs/{layer}"), &[]), layer);
}

/// Manifests by tag and by digest, GET and HEAD, OCI and Docker schema2, an index and its children,
/// under every spelling of a Docker Hub name, with `Accept` forwarded line by line; a manifest only
/// the second backend has; missing manifests.
#[test]
fn manifests_by_tag_and_digest() {
    let fx = fixture();
    let all = accept_manifests();
    for (tag, format, media_type) in [("oci", Format::Oci, OCI_MANIFEST), ("v2s2", Format::V2s2, DOCKER_MANIFEST)] {
        let digest = manifest_digest("small", format);
        let len = manifest_bytes("small", format).len();
        // `library/` is added to one-segment names; `docker.io/` selects the route and is stripped.
        for name in ["small", "library/small", "docker.io/small", "docker.io/library/small"] {
            for reference in [tag, digest.as_str()] {
                let path = format!("/v2/{name}/manifests/{reference}");
                let r = fx.get(&path, &all);
                assert_manifest(&r, "small", format, media_type);
                assert_only_allowed_headers(&r);
                assert_head(&fx, &path, &all, &digest, len);
            }
        }
        let r = fx.get(&format!("/v2/small/manifests/{tag}?ns=docker.io"), &all);
        assert_manifest(&r, "small", format, media_type);
    }

    // An OCI manifest is found when one of several Accept lines names OCI (distribution 404s it
    // otherwise), and not found when none does: every line must reach the backend, and only them.
    let docker_then_oci = accept(&[DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST]);
    assert_manifest(&fx.get("/v2/small/manifests/fresh", &docker_then_oci), "small", Format::Oci, OCI_MANIFEST);
    let docker_only = accept(&[DOCKER_MANIFEST, DOCKER_LIST]);
    let refused = fx.get("/v2/small/manifests/fresh", &docker_only);
    assert_error(&refused, 404, "MANIFEST_UNKNOWN");
    // One line with a list of types is passed as it is, too.
    let one_line = format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}");
    let r = fx.get("/v2/small/manifests/fresh", &[("Accept", &one_line)]);
    assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);

    // The index and each platform manifest.
    let r = fx.get("/v2/multi/manifests/1", &all);
    assert_manifest(&r, "multi", Format::All, OCI_INDEX);
    let r = fx.get(&format!("/v2/multi/manifests/{}", manifest_digest("multi", Format::All)), &all);
    assert_manifest(&r, "multi", Format::All, OCI_INDEX);
    for child in ["multi-amd64", "multi-arm64"] {
        let r = fx.get(&format!("/v2/multi/manifests/{}", manifest_digest(child, Format::Oci)), &all);
        assert_manifest(&r, child, Format::Oci, OCI_MANIFEST);
    }

    // Only the second backend has these: `other`, and the tag `legacy` of `small`.
    let r = fx.get("/v2/other/manifests/1", &all);
    assert_manifest(&r, "other", Format::Oci, OCI_MANIFEST);
    let r = fx.get(&format!("/v2/other/manifests/{}", manifest_digest("other", Format::Oci)), &all);
    assert_manifest(&r, "other", Format::Oci, OCI_MANIFEST);
    let r = fx.get("/v2/small/manifests/legacy", &all);
    assert_manifest(&r, "small", Format::V2s2, DOCKER_MANIFEST);
    let other_len = manifest_bytes("other", Format::Oci).len();
    assert_head(&fx, "/v2/other/manifests/1", &all, &manifest_digest("other", Format::Oci), other_len);

    // Nobody has these: 404 with what each backend said.
    let e = assert_error(&fx.get("/v2/small/manifests/nope", &all), 404, "MANIFEST_UNKNOWN");
    assert_attempts(&e, &["harbor", "old"]);
    let absent = format!("sha256:{}", "0".repeat(64));
    let e = assert_error(&fx.get(&format!("/v2/small/manifests/{absent}"), &all), 404, "MANIFEST_UNKNOWN");
    assert_attempts(&e, &["harbor", "old"]);
    let r = fx.req("HEAD", "/v2/small/manifests/nope", &all);
    assert_eq!(r.status, 404);
    // An unknown repository: distribution says NAME_UNKNOWN, a proxy may say MANIFEST_UNKNOWN.
    let r = fx.get("/v2/nobody/here/manifests/1", &all);
    assert_eq!(r.status, 404, "{}", r.text());
    let code = r.json()["errors"][0]["code"].as_str().unwrap_or_default().to_string();
    assert!(code == "MANIFEST_UNKNOWN" || code == "NAME_UNKNOWN", "{}", r.text());

    // The backends saw the prefixed and the plain name, never the client's spelling.
    fx.sync_logs();
    for r in fx.harbor.requests() {
        assert!(r.path.starts_with("/v2/hub-proxy/library/") || r.path.starts_with("/v2/hub-proxy/nobody/"), "{r:?}");
    }
    for r in fx.old.requests() {
        assert!(r.path.starts_with("/v2/library/") || r.path.starts_with("/v2/nobody/"), "old got {r:?}");
        assert!(!r.path.contains('?'), "a query was forwarded: {r:?}");
    }
}

/// Which route answers: `?ns=` (stripped, never forwarded), a registry-name first path segment, the
/// `Host` header, then the default route; an unknown `ns` contacts no backend.
#[test]
fn routing_by_namespace_prefix_host_and_default() {
    let fx = fixture();
    let all = accept_manifests();
    let want = manifest_digest("other", Format::Oci);
    let layer = &layer_digests("other")[0];
    let quay_paths = [
        ("/v2/keycloak/keycloak/manifests/24.0?ns=quay.io", vec![]),
        ("/v2/keycloak/keycloak/manifests/24.0?ns=QUAY.IO", vec![]),
        ("/v2/quay.io/keycloak/keycloak/manifests/24.0?ns=quay.io", vec![]),
        ("/v2/quay.io/keycloak/keycloak/manifests/24.0", vec![]),
        ("/v2/keycloak/keycloak/manifests/24.0", vec![("Host", "mirror.quay.test")]),
        ("/v2/keycloak/keycloak/manifests/24.0", vec![("Host", "mirror.quay.test:5000")]),
        // A registry prefix wins over the Host header.
        ("/v2/quay.io/keycloak/keycloak/manifests/24.0", vec![("Host", "127.0.0.1")]),
    ];
    for (path, host) in &quay_paths {
        let mut headers = all.clone();
        headers.extend(host.iter().copied());
        let r = fx.get(path, &headers);
        assert_eq!(r.status, 200, "{path} {host:?}: {}", r.text());
        assert_eq!(r.header("Docker-Content-Digest"), Some(want.as_str()), "{path} {host:?}");
    }
    let r = fx.get(&format!("/v2/keycloak/keycloak/blobs/{layer}?ns=quay.io"), &[]);
    assert_blob(&r, layer);
    let r = fx.get(&format!("/v2/quay.io/keycloak/keycloak/blobs/{layer}"), &[]);
    assert_blob(&r, layer);
    let r = fx.get("/v2/keycloak/keycloak/tags/list", &[("Host", "mirror.quay.test")]);
    assert_eq!(tags_of(&r), ["24.0"]);

    // `ns` wins over the Host header.
    let mut headers = all.clone();
    headers.push(("Host", "mirror.quay.test"));
    let r = fx.get("/v2/small/manifests/oci?ns=docker.io", &headers);
    assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);

    // Nothing names quay: the default route (Docker Hub) does not have keycloak.
    let e = assert_error(&fx.get("/v2/keycloak/keycloak/manifests/24.0", &all), 404, "MANIFEST_UNKNOWN");
    assert_attempts(&e, &["harbor", "old"]);

    // An unknown ns is refused before any backend is contacted.
    let e = assert_error(&fx.get("/v2/unrouted/app/manifests/1?ns=evil.example", &all), 404, "NAME_UNKNOWN");
    assert!(e["message"].as_str().unwrap_or_default().contains("evil.example"), "{e}");
    let r = fx.get(&format!("/v2/unrouted/app/blobs/{layer}?ns=evil.example"), &[]);
    assert_error(&r, 404, "NAME_UNKNOWN");
    assert_error(&fx.get("/v2/unrouted/app/tags/list?ns=evil.example", &[]), 404, "NAME_UNKNOWN");
    assert_error(&fx.get("/v2/_catalog?ns=evil.example", &[]), 404, "NAME_UNKNOWN");

    fx.sync_logs();
    let harbor = fx.harbor.requests();
    let old = fx.old.requests();
    for r in harbor.iter().chain(&old) {
        assert!(!r.path.contains("unrouted") && !r.path.contains("_catalog"), "unknown ns reached a backend: {r:?}");
        assert!(!r.path.contains("ns="), "ns was forwarded: {r:?}");
        assert!(!r.path.contains("quay.io"), "the registry prefix was forwarded: {r:?}");
    }
    // The quay route only ever asked its own backend, with its prefix.
    let quay_manifest = "/v2/quay-proxy/keycloak/keycloak/manifests/24.0";
    assert!(fx.harbor.count("GET", quay_manifest) >= quay_paths.len(), "{harbor:?}");
    assert!(old.iter().all(|r| !r.path.contains("keycloak") || r.path.starts_with("/v2/keycloak/")), "{old:?}");
}

/// `tags/list` is the sorted union of the route's backends, paginated with `n`/`last` and a `Link`;
/// `_catalog` is the union with each backend's prefix stripped and only repositories under it.
#[test]
fn tags_list_and_catalog_are_unions() {
    let fx = fixture();
    // harbor: fresh, oci, v2s2; old: legacy, oci.
    let all_tags = ["fresh", "legacy", "oci", "v2s2"];
    for path in ["/v2/small/tags/list", "/v2/library/small/tags/list", "/v2/docker.io/small/tags/list"] {
        let r = fx.get(path, &[]);
        assert_eq!(tags_of(&r), all_tags, "{path}");
        assert_eq!(r.header("Docker-Distribution-API-Version"), Some("registry/2.0"));
        assert!(r.header("Content-Type").is_some_and(|t| t.starts_with("application/json")));
        assert_eq!(r.header("Link"), None, "{path}: no n, no Link");
    }

    let first = fx.get("/v2/small/tags/list?n=2", &[]);
    assert_eq!(tags_of(&first), ["fresh", "legacy"]);
    assert_eq!(first.header("Link"), Some("</v2/small/tags/list?n=2&last=legacy>; rel=\"next\""));
    let second = fx.get(&next_link(&first).expect("Link"), &[]);
    assert_eq!(tags_of(&second), ["oci", "v2s2"]);
    assert_eq!(second.header("Link"), None, "last page");
    let r = fx.get("/v2/small/tags/list?n=3&last=fresh", &[]);
    assert_eq!(tags_of(&r), ["legacy", "oci", "v2s2"]);
    assert_eq!(r.header("Link"), None);
    let r = fx.get("/v2/small/tags/list?last=legacy", &[]);
    assert_eq!(tags_of(&r), ["oci", "v2s2"]);
    let r = fx.get("/v2/small/tags/list?n=10", &[]);
    assert_eq!(tags_of(&r), all_tags);
    assert_eq!(r.header("Link"), None);
    // Walk the whole list one tag at a time by the Link header.
    let mut walked = Vec::new();
    let mut next = Some("/v2/small/tags/list?n=1".to_string());
    while let Some(path) = next {
        assert!(walked.len() < 10, "Link loop: {walked:?}");
        let r = fx.get(&path, &[]);
        walked.extend(tags_of(&r));
        next = next_link(&r);
    }
    assert_eq!(walked, all_tags);

    // Only on one backend each.
    assert_eq!(tags_of(&fx.get("/v2/other/tags/list", &[])), ["1"]);
    assert_eq!(tags_of(&fx.get("/v2/multi/tags/list", &[])), ["1"]);
    let e = assert_error(&fx.get("/v2/nobody/tags/list", &[]), 404, "NAME_UNKNOWN");
    assert_attempts(&e, &["harbor", "old"]);

    // Catalog of the default route: harbor's `hub-proxy/…` without the prefix (its `quay-proxy/…`
    // left out), and old's names.
    let want = ["library/multi", "library/other", "library/partial", "library/small"];
    let r = fx.get("/v2/_catalog", &[]);
    assert_eq!(repositories_of(&r), want);
    assert_eq!(r.header("Link"), None);
    let first = fx.get("/v2/_catalog?n=2", &[]);
    assert_eq!(repositories_of(&first), want[..2]);
    let link = next_link(&first).expect("catalog Link");
    assert!(link.starts_with("/v2/_catalog?"), "{link}");
    let second = fx.get(&link, &[]);
    assert_eq!(repositories_of(&second), want[2..]);
    assert_eq!(second.header("Link"), None);

    // The quay route's catalog: only what is under `quay-proxy/`, prefix stripped.
    assert_eq!(repositories_of(&fx.get("/v2/_catalog?ns=quay.io", &[])), ["keycloak/keycloak"]);
    let r = fx.get("/v2/_catalog", &[("Host", "mirror.quay.test")]);
    assert_eq!(repositories_of(&r), ["keycloak/keycloak"]);

    // Pages of an `ns`-routed listing stay on that route: the `Link` keeps `ns` (without it the
    // next page would go to the default route, which has neither these tags nor these names).
    let h = fx.harbor.reg.addr();
    push("other", &format!("{h}/quay-proxy/keycloak/keycloak:25.0"), Format::Oci);
    push("other", &format!("{h}/quay-proxy/keycloak/operator:1"), Format::Oci);
    let first = fx.get("/v2/keycloak/keycloak/tags/list?ns=quay.io&n=1", &[]);
    assert_eq!(tags_of(&first), ["24.0"]);
    let link = next_link(&first).expect("tags Link");
    assert!(link.contains("ns=quay.io"), "{link}");
    let second = fx.get(&link, &[]);
    assert_eq!(tags_of(&second), ["25.0"], "second page of {link}");
    assert_eq!(second.header("Link"), None);
    let first = fx.get("/v2/_catalog?ns=quay.io&n=1", &[]);
    assert_eq!(repositories_of(&first), ["keycloak/keycloak"]);
    let link = next_link(&first).expect("catalog Link");
    assert!(link.contains("ns=quay.io"), "{link}");
    let second = fx.get(&link, &[]);
    assert_eq!(repositories_of(&second), ["keycloak/operator"], "second page of {link}");
    assert_eq!(second.header("Link"), None);
    // And the default route never saw the quay names.
    fx.sync_logs();
    for r in fx.old.requests() {
        assert!(!r.path.contains("keycloak"), "a quay listing page went to the default route: {r:?}");
    }
}

/// Blobs: GET whole, HEAD without a body, ranges (206 + Content-Range), only allow-listed headers,
/// missing blobs.
#[test]
fn blobs_heads_and_ranges() {
    let fx = fixture();
    for digest in blob_digests("small") {
        let path = format!("/v2/small/blobs/{digest}");
        let r = fx.get(&path, &[]);
        assert_blob(&r, &digest);
        assert_only_allowed_headers(&r);
        assert_head(&fx, &path, &[], &digest, r.body.len());
    }
    for digest in blob_digests("multi") {
        assert_blob(&fx.get(&format!("/v2/multi/blobs/{digest}"), &[]), &digest);
    }
    let other = &layer_digests("other")[0];
    assert_blob(&fx.get(&format!("/v2/other/blobs/{other}"), &[]), other);

    // The registry itself sends headers that must not pass (so the allow-list checks above test
    // something): Cache-Control and Last-Modified on blobs.
    let layer = &layer_digests("small")[1];
    let direct = http("GET", &format!("{}/v2/hub-proxy/library/small/blobs/{layer}", fx.harbor.reg.url()), &[]);
    assert!(direct.header("Cache-Control").is_some(), "{:?}", direct.headers);

    // Several clients at once, each gets the whole blob.
    std::thread::scope(|s| {
        let pulls: Vec<_> = (0..6).map(|_| s.spawn(|| fx.get(&format!("/v2/small/blobs/{layer}"), &[]))).collect();
        for p in pulls {
            assert_blob(&p.join().expect("pull thread"), layer);
        }
    });

    let bytes = images().blob(layer);
    let size = bytes.len();
    for (range, from, to) in
        [("bytes=10-19", 10, 19), ("bytes=0-0", 0, 0), (&*format!("bytes={}-", size - 7), size - 7, size - 1)]
    {
        let r = fx.get(&format!("/v2/small/blobs/{layer}"), &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}: {}", r.text());
        assert_eq!(r.header("Content-Range"), Some(format!("bytes {from}-{to}/{size}").as_str()), "{range}");
        assert!(r.complete, "{range}");
        assert_eq!(r.body, bytes[from..=to], "{range}");
        assert_only_allowed_headers(&r);
    }

    let absent = format!("sha256:{}", "0".repeat(64));
    let e = assert_error(&fx.get(&format!("/v2/small/blobs/{absent}"), &[]), 404, "BLOB_UNKNOWN");
    assert_attempts(&e, &["harbor", "old"]);
    let r = fx.req("HEAD", &format!("/v2/small/blobs/{absent}"), &[]);
    assert_eq!(r.status, 404);
    let (head, body) = raw_head(fx.regmux.addr(), &format!("/v2/small/blobs/{absent}"), &[]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(body.is_empty(), "HEAD 404 sent a body");
    // A blob that exists, but not in this repository (registries link blobs per repository). The
    // location cache is by digest: old served this digest (for `other`) above, so it is asked first.
    let e = assert_error(&fx.get(&format!("/v2/multi/blobs/{other}"), &[]), 404, "BLOB_UNKNOWN");
    assert_attempts(&e, &["old", "harbor"]);
}

/// An image whose manifest the first backend serves and one of whose blobs only the second has is
/// pulled whole; afterwards that blob goes straight to the second backend (location cache).
#[test]
fn image_split_across_backends_and_location_cache() {
    let fx = fixture();
    let r = fx.get("/v2/partial/manifests/1", &accept_manifests());
    assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);
    for digest in blob_digests("small") {
        assert_blob(&fx.get(&format!("/v2/partial/blobs/{digest}"), &[]), &digest);
    }
    let missing = &layer_digests("small")[0];
    let harbor_path = format!("/v2/hub-proxy/library/partial/blobs/{missing}");
    let old_path = format!("/v2/library/partial/blobs/{missing}");
    fx.sync_logs();
    assert_eq!(fx.harbor.count("GET", "/v2/hub-proxy/library/partial/manifests/1"), 1);
    assert_eq!(fx.old.count("GET", "/v2/library/partial/manifests/1"), 0, "old asked for a manifest harbor has");
    assert_eq!(fx.harbor.count("GET", &harbor_path), 1);
    assert_eq!(fx.old.count("GET", &old_path), 1);
    for digest in &blob_digests("small")[..] {
        if digest != missing {
            assert_eq!(fx.old.count("GET", &format!("/v2/library/partial/blobs/{digest}")), 0, "{digest}");
        }
    }

    // The second request for the blob goes straight to old; HEAD as well.
    for _ in 0..3 {
        assert_blob(&fx.get(&format!("/v2/partial/blobs/{missing}"), &[]), missing);
    }
    let size = images().blob(missing).len();
    assert_head(&fx, &format!("/v2/partial/blobs/{missing}"), &[], missing, size);
    fx.sync_logs();
    assert_eq!(fx.harbor.count("GET", &harbor_path), 1, "harbor asked again: {:?}", fx.harbor.requests());
    assert_eq!(fx.harbor.count("HEAD", &harbor_path), 0, "harbor asked again: {:?}", fx.harbor.requests());
    assert_eq!(fx.old.count("GET", &old_path), 4);
}

/// A blob whose bytes on the first backend do not match its digest is never delivered whole: the
/// connection is cut before the last byte. That backend is not asked for the digest again; the
/// second backend serves it whole.
#[test]
fn corrupt_blob_is_never_completed() {
    let fx = fixture();
    let layer = layer_digests("small")[1].clone(); // ~3 MiB: many chunks
    let config = config_digest("small"); // a few hundred bytes: one chunk
    corrupt_blob(&fx.harbor.reg.storage_dir(), &layer);
    corrupt_blob(&fx.harbor.reg.storage_dir(), &config);

    // A manifest with other bytes under its digest (the registry serves them with 200), and one
    // the registry cannot even parse (it answers 500).
    let manifest = manifest_digest("small", Format::Oci);
    tamper_manifest(&fx.harbor.reg.storage_dir(), &manifest);
    let v2s2 = manifest_digest("small", Format::V2s2);
    corrupt_blob(&fx.harbor.reg.storage_dir(), &v2s2);
    let all = accept_manifests();
    for path in ["/v2/small/manifests/oci".to_string(), format!("/v2/small/manifests/{manifest}")] {
        let r = fx.get(&path, &all);
        assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);
    }
    // The tag that only harbor has (it points at the tampered manifest): nobody can serve it.
    let e = assert_error(&fx.get("/v2/small/manifests/fresh", &all), 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor", "old"]);
    // harbor answers 500 for the unreadable one: old serves `v2s2` by digest (it has it as `legacy`).
    let r = fx.get(&format!("/v2/small/manifests/{v2s2}"), &all);
    assert_manifest(&r, "small", Format::V2s2, DOCKER_MANIFEST);
    fx.sync_logs();
    let harbor_v2s2 = format!("/v2/hub-proxy/library/small/manifests/{v2s2}");
    assert!(
        fx.harbor.requests().iter().any(|r| r.path == harbor_v2s2 && r.status == 500),
        "harbor did not answer 500: {:?}",
        fx.harbor.requests()
    );

    let first = fx.get(&format!("/v2/small/blobs/{layer}"), &[]);
    assert_eq!(first.status, 200, "{}", first.text());
    let announced: usize = first.header("Content-Length").and_then(|l| l.parse().ok()).expect("Content-Length");
    assert_eq!(announced, images().blob(&layer).len());
    assert!(!first.complete, "a corrupt blob was delivered whole");
    assert!(first.body.len() < announced, "{} of {announced} bytes", first.body.len());

    // curl's view of a corrupt blob that fits in one chunk: either 18 ("transfer closed with
    // outstanding read data": the head was sent, the body cut) or 52 ("empty reply": regmux knew
    // the bytes were bad before the head went out). Both are an aborted transfer, which is what
    // matters; a 0 exit (a complete transfer) is the failure.
    let url = format!("{}/v2/small/blobs/{config}", fx.regmux.url());
    let out = Command::new("curl").args(["-sS", "-o", "/dev/null", "--max-time", "20", &url]).output().expect("curl");
    let code = out.status.code();
    assert!(code == Some(18) || code == Some(52), "curl exit {code:?}: {}", String::from_utf8_lossy(&out.stderr));

    fx.regmux.wait_log("do not match", Duration::from_secs(5));

    // Next time: the second backend, whole.
    for _ in 0..2 {
        assert_blob(&fx.get(&format!("/v2/small/blobs/{layer}"), &[]), &layer);
        assert_blob(&fx.get(&format!("/v2/small/blobs/{config}"), &[]), &config);
    }
    fx.sync_logs();
    for digest in [&layer, &config] {
        let harbor_path = format!("/v2/hub-proxy/library/small/blobs/{digest}");
        assert_eq!(fx.harbor.count("GET", &harbor_path), 1, "harbor asked again for {digest}");
        assert_eq!(fx.old.count("GET", &format!("/v2/library/small/blobs/{digest}")), 2, "{digest}");
    }
}

/// Malformed names, digests and references are refused with the right code and never reach a
/// backend.
#[test]
fn malformed_paths_never_reach_a_backend() {
    let fx = fixture();
    let d = layer_digests("small")[0].clone();
    let hex = d.trim_start_matches("sha256:").to_string();
    let long_name = "a".repeat(256);
    let long_nested = format!("{}/{}/{}", "a".repeat(100), "b".repeat(100), "c".repeat(60));
    // (path, codes accepted). Every name is distinct so the access logs can tell.
    let cases: Vec<(String, &[&str])> = vec![
        ("/v2/library/../small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/../small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/./small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/Library/small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/SMALL/tags/list".into(), &["NAME_INVALID"]),
        ("/v2/library//small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2//small/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/library%2Fsmall/manifests/oci".into(), &["NAME_INVALID"]),
        (format!("/v2/library%2fsmall/blobs/{d}"), &["NAME_INVALID"]),
        ("/v2/sm%61ll/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/small-/manifests/oci".into(), &["NAME_INVALID"]),
        ("/v2/sm%20all/manifests/oci".into(), &["NAME_INVALID"]),
        (format!("/v2/{long_name}/manifests/oci"), &["NAME_INVALID"]),
        (format!("/v2/{long_nested}/tags/list"), &["NAME_INVALID"]),
        ("/v2/small/blobs/sha256:xyz".into(), &["DIGEST_INVALID"]),
        (format!("/v2/small/blobs/sha256:{}", hex.to_ascii_uppercase()), &["DIGEST_INVALID"]),
        (format!("/v2/small/blobs/sha256:{}", &hex[1..]), &["DIGEST_INVALID"]),
        (format!("/v2/small/blobs/md5:{}", &hex[..32]), &["DIGEST_INVALID"]),
        (format!("/v2/small/blobs/{hex}"), &["DIGEST_INVALID"]),
        (format!("/v2/small/blobs/{d}%2F..%2F..%2Fx"), &["DIGEST_INVALID"]),
        ("/v2/small/referrers/latest".into(), &["DIGEST_INVALID"]),
        ("/v2/small/manifests/-bad".into(), &["MANIFEST_INVALID"]),
        ("/v2/small/manifests/..".into(), &["MANIFEST_INVALID"]),
        ("/v2/small/manifests/.oci".into(), &["MANIFEST_INVALID"]),
        ("/v2/small/manifests/oci%2F..%2F..%2Fother".into(), &["MANIFEST_INVALID"]),
        (format!("/v2/small/manifests/{}", "t".repeat(129)), &["MANIFEST_INVALID"]),
        // A reference with a colon is a digest; a bad one may be called either.
        ("/v2/small/manifests/sha256:zz".into(), &["MANIFEST_INVALID", "DIGEST_INVALID"]),
        (format!("/v2/small/manifests/sha256:{}", hex.to_ascii_uppercase()), &["MANIFEST_INVALID", "DIGEST_INVALID"]),
    ];
    for (path, codes) in &cases {
        let r = fx.get(path, &accept_manifests());
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let code = r.json()["errors"][0]["code"].as_str().unwrap_or_default().to_string();
        assert!(codes.contains(&code.as_str()), "{path}: {}", r.text());
        assert_error(&r, 400, &code);
        let h = fx.req("HEAD", path, &accept_manifests());
        assert_eq!(h.status, 400, "HEAD {path}");
        // With ns too: validation comes before routing.
        let sep = if path.contains('?') { '&' } else { '?' };
        assert_eq!(fx.get(&format!("{path}{sep}ns=docker.io"), &[]).status, 400, "{path}?ns=docker.io");
    }
    fx.sync_logs();
    assert_eq!(fx.harbor.requests(), [], "a malformed request reached harbor");
    assert_eq!(fx.old.requests(), [], "a malformed request reached old");
}

/// A backend behind token auth (distribution `auth.token`): regmux logs in as its robot account,
/// caches tokens, never shows the backend's challenge to the client, and never forwards the
/// client's credentials.
#[test]
fn token_auth_backend() {
    let lab = Lab::new();
    let (robot, robot_pass) = ("robot$regmux", "robot-secret");
    let issuer = TokenIssuer::start(lab.dir("token"), TokenOpts::default().credentials(robot, robot_pass));
    let harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain().token(&issuer));
    let (admin, admin_pass) = issuer.admin_creds();
    push_with_creds("small", &format!("{}/hub-proxy/library/small:oci", harbor.addr()), Format::Oci, admin, admin_pass);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[ledger]
path = "{ledger}"

[backends.harbor]
url = "{url}"
prefix = "hub-proxy"
username = "{robot}"
password = "{robot_pass}"

[backends.harbor-wrong]
url = "{url}"
prefix = "hub-proxy"
username = "{robot}"
password = "not-the-password"

[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["harbor"]
default = true

[[routes]]
name = "wrong"
registries = ["wrong.test"]
backends = ["harbor-wrong"]
"#,
        ledger = lab.path().join("ledger.db").display(),
        url = harbor.url(),
    );
    let regmux = start_debug(&lab, &config);
    let get = |path: &str, headers: &[(&str, &str)]| http("GET", &format!("{}{path}", regmux.url()), headers);
    let seeded = issuer.requests().len();
    let issued_before = issuer.issued();

    // The client sends credentials of its own: they must go nowhere.
    let client_auth = basic_auth("client-user", "client-pass");
    let mut headers = accept_manifests();
    headers.push(("Authorization", &client_auth));
    let r = get("/v2/small/manifests/oci", &headers);
    assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);
    assert_eq!(r.header("WWW-Authenticate"), None);
    let config_blob = config_digest("small");
    for digest in blob_digests("small") {
        let r = get(&format!("/v2/small/blobs/{digest}"), &[("Authorization", &client_auth)]);
        assert_blob(&r, &digest);
    }
    for _ in 0..20 {
        let r = get(&format!("/v2/small/blobs/{config_blob}"), &[("Authorization", "Bearer client-token")]);
        assert_blob(&r, &config_blob);
    }
    let issued = issuer.issued() - issued_before;
    assert!(issued <= 2, "{issued} tokens issued for one repository: {:?}", &issuer.requests()[seeded..]);

    // Listings with their own scopes.
    assert_eq!(tags_of(&get("/v2/small/tags/list", &[])), ["oci"]);
    assert_eq!(repositories_of(&get("/v2/_catalog", &[])), ["library/small"]);

    // Missing content: 404, not the backend's 401 challenge.
    let r = get("/v2/small/manifests/nope", &accept_manifests());
    assert_error(&r, 404, "MANIFEST_UNKNOWN");
    assert_eq!(r.header("WWW-Authenticate"), None);
    let r = get(&format!("/v2/nobody/blobs/{config_blob}"), &[]);
    assert_error(&r, 404, "BLOB_UNKNOWN");
    assert_eq!(r.header("WWW-Authenticate"), None);

    // A backend that refuses regmux's credentials: regmux cannot answer (503), and says so without
    // asking the client to log in.
    let r = get("/v2/wrong.test/library/small/manifests/oci", &accept_manifests());
    let e = assert_error(&r, 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor-wrong"]);
    assert_eq!(r.header("WWW-Authenticate"), None);
    let r = get(&format!("/v2/wrong.test/library/small/blobs/{config_blob}"), &[]);
    assert_error(&r, 503, "UNAVAILABLE");
    assert_eq!(r.header("WWW-Authenticate"), None);

    let requests = issuer.requests()[seeded..].to_vec();
    assert!(!requests.is_empty());
    for t in &requests {
        assert_eq!(t.user.as_deref(), Some(robot), "the token endpoint saw other credentials: {t:?}");
    }
    assert!(requests.iter().any(|t| t.scopes == ["registry:catalog:*"]), "{requests:?}");
    // Neither a password (plain or in Basic form, regmux's or the client's) nor a token (a JWT:
    // base64 of `{"`, "eyJ") is ever logged, even at debug level.
    wait_for("the last request's log line", Duration::from_secs(5), || {
        regmux.logs().lines().any(|l| l.contains("route=wrong") && l.contains("kind=\"blob\"")).then_some(())
    });
    let logs = regmux.logs();
    assert!(!logs.contains("eyJ"), "a token in regmux's log:\n{logs}");
    assert!(!logs.contains("client-token"), "the client's token in regmux's log:\n{logs}");
    assert_no_secrets(&regmux, &[(robot, robot_pass), (robot, "not-the-password"), ("client-user", "client-pass")]);
}

/// A backend behind plain htpasswd Basic auth, with regmux's username and password.
#[test]
fn basic_auth_backend() {
    let lab = Lab::new();
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain().htpasswd("mirror-user", "mirror-pass"));
    push_with_creds("other", &format!("{}/library/other:1", old.addr()), Format::V2s2, "mirror-user", "mirror-pass");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[ledger]
path = "{ledger}"

[backends.old]
url = "{url}"
username = "mirror-user"
password = "mirror-pass"

[backends.old-wrong]
url = "{url}"
username = "mirror-user"
password = "wrong-pass-5e1d"

[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["old"]
default = true

[[routes]]
name = "wrong"
registries = ["wrong.test"]
backends = ["old-wrong"]
"#,
        ledger = lab.path().join("ledger.db").display(),
        url = old.url(),
    );
    let regmux = start_debug(&lab, &config);
    let get = |path: &str, headers: &[(&str, &str)]| http("GET", &format!("{}{path}", regmux.url()), headers);

    for _ in 0..2 {
        let r = get("/v2/other/manifests/1", &accept_manifests());
        assert_manifest(&r, "other", Format::V2s2, DOCKER_MANIFEST);
        assert_eq!(r.header("WWW-Authenticate"), None);
        for digest in blob_digests("other") {
            assert_blob(&get(&format!("/v2/other/blobs/{digest}"), &[]), &digest);
        }
    }
    assert_eq!(tags_of(&get("/v2/other/tags/list", &[])), ["1"]);
    let r = get("/v2/other/manifests/nope", &accept_manifests());
    assert_error(&r, 404, "MANIFEST_UNKNOWN");
    assert_eq!(r.header("WWW-Authenticate"), None);

    let r = get("/v2/wrong.test/other/manifests/1", &accept_manifests());
    let e = assert_error(&r, 503, "UNAVAILABLE");
    assert_attempts(&e, &["old-wrong"]);
    assert_eq!(r.header("WWW-Authenticate"), None);

    // Credentials never reach a log line, even at debug level and when they are refused.
    regmux.wait_log("route=wrong", Duration::from_secs(5));
    assert_no_secrets(&regmux, &[("mirror-user", "mirror-pass"), ("mirror-user", "wrong-pass-5e1d")]);
}

/// A stopped first backend costs nothing noticeable: pulls are served by the second one, quickly.
/// With both stopped, regmux says 503 UNAVAILABLE (it cannot know whether they have it).
#[test]
fn stopped_first_backend() {
    let mut fx = fixture();
    fx.harbor.reg.stop();
    let all = accept_manifests();
    for i in 0..10 {
        let started = Instant::now();
        let r = fx.get("/v2/small/manifests/oci", &all);
        let took = started.elapsed();
        assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);
        if i >= 3 {
            assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
        }
    }
    // Blobs too. Only the small one is timed: a debug build hashing megabytes on a busy machine is
    // slow for reasons that have nothing to do with the dead backend.
    for digest in blob_digests("small") {
        let started = Instant::now();
        let r = fx.get(&format!("/v2/small/blobs/{digest}"), &[]);
        let took = started.elapsed();
        assert_blob(&r, &digest);
        if r.body.len() < 64 << 10 {
            assert!(took < Duration::from_secs(1), "blob {digest} ({} bytes) took {took:?}", r.body.len());
        }
    }
    // A listing is what the backends that answered have.
    assert_eq!(tags_of(&fx.get("/v2/small/tags/list", &[])), ["legacy", "oci"]);
    // What only the stopped backend has is unavailable, not unknown.
    let e = assert_error(&fx.get("/v2/small/manifests/fresh", &all), 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor", "old"]);

    fx.old.reg.stop();
    let started = Instant::now();
    let e = assert_error(&fx.get("/v2/other/manifests/1", &all), 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor", "old"]);
    let layer = &layer_digests("other")[0];
    let e = assert_error(&fx.get(&format!("/v2/other/blobs/{layer}"), &[]), 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor", "old"]);
    assert_error(&fx.get("/v2/other/tags/list", &[]), 503, "UNAVAILABLE");
    assert_error(&fx.get("/v2/_catalog", &[]), 503, "UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(4), "answers with both down took {:?}", started.elapsed());
}

/// A client that sends no `Accept` asks distribution for a schema2 tag; distribution converts it to
/// a signed schema1 manifest, whose `Docker-Content-Digest` is that of the payload without its
/// signatures (distribution `manifest/schema1`: the digest of `Canonical`). regmux must pass that
/// answer on (it streams the backend's answer unchanged), not treat it as a corrupt manifest.
#[test]
fn schema1_answer_without_accept_is_passed_on() {
    let fx = fixture();
    let direct = http("GET", &format!("{}/v2/library/small/manifests/legacy", fx.old.reg.url()), &[]);
    assert_eq!(direct.status, 200, "{}", direct.text());
    let schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    assert_eq!(direct.header("Content-Type"), Some(schema1), "distribution converts to schema1");
    let r = fx.get("/v2/small/manifests/legacy", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some(schema1));
    assert_eq!(r.header("Docker-Content-Digest"), direct.header("Docker-Content-Digest"));
    let m = r.json();
    assert_eq!(m["schemaVersion"], 1, "{m}");
    assert_eq!(m["name"], "library/small", "{m}");
    assert_eq!(m["tag"], "legacy", "{m}");
    assert!(r.complete);
}

/// `regmux check --config`: a configuration with several problems is refused with exit code 64 and
/// every problem named at once; one with an unknown key too; a good one exits 0 and prints each
/// route with its backends in the order they are tried (and no password).
#[test]
fn check_lists_every_problem_and_the_resolved_routes() {
    let lab = Lab::new();
    let check = |name: &str, config: &str| {
        let path = lab.write(name, config);
        let out = Command::new(env!("CARGO_BIN_EXE_regmux"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env_remove("REGMUX_CONFIG")
            .env("NO_COLOR", "1")
            .output()
            .expect("run regmux check");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };

    let bad = r#"
[server]
listen = "not-an-address"

[backends.harbor]
url = "ftp://harbor.test"

[backends.old]
url = "http://old.test"
username = "mirror-user"

[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["harbor", "missing"]
default = true

[[routes]]
name = "quay"
registries = ["quay.io"]
backends = ["old", "old"]
default = true
"#;
    let (code, stdout, stderr) = check("bad.toml", bad);
    assert_eq!(code, Some(64), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for problem in [
        r#"server.listen "not-an-address""#,
        r#"url "ftp://harbor.test" is not an http:// or https:// URL"#,
        r#"username "mirror-user" has no password"#,
        r#"backend "missing" is not defined"#,
        r#"backend "old" is listed twice"#,
        "more than one route is marked default",
    ] {
        assert!(stderr.contains(problem), "{problem:?} not reported; stderr:\n{stderr}");
    }
    assert!(!stdout.contains("configuration OK"), "{stdout}");

    let (code, _, stderr) = check("unknown-key.toml", "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("lisen"), "the unknown key is not named: {stderr}");

    let good = format!(
        r#"{header}
[backends.harbor]
url = "http://127.0.0.1:9"
prefix = "hub-proxy"

[backends.old]
url = "http://127.0.0.1:10"
username = "mirror-user"
password = "check-secret-7a2b"

[backends.harbor-quay]
url = "http://127.0.0.1:9"
prefix = "quay-proxy"

[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["harbor", "old"]
default = true

[[routes]]
name = "quay"
registries = ["quay.io"]
hosts = ["mirror.quay.test"]
backends = ["old", "harbor-quay"]
"#,
        header = config_header(&lab.path().join("ledger.db")),
    );
    let (code, stdout, stderr) = check("good.toml", &good);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let at = |prefix: &str| {
        lines.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?}:\n{stdout}"))
    };
    let hub = at(r#"route "hub""#);
    assert!(lines[hub].contains("docker.io") && lines[hub].contains("default"), "{}", lines[hub]);
    assert!(lines[hub + 1].starts_with("1. harbor: http://127.0.0.1:9/hub-proxy"), "{stdout}");
    assert!(lines[hub + 2].starts_with("2. old: http://127.0.0.1:10"), "{stdout}");
    let quay = at(r#"route "quay""#);
    assert!(lines[quay].contains("quay.io") && lines[quay].contains("mirror.quay.test"), "{}", lines[quay]);
    assert!(lines[quay + 1].starts_with("1. old: http://127.0.0.1:10"), "{stdout}");
    assert!(lines[quay + 2].starts_with("2. harbor-quay: http://127.0.0.1:9/quay-proxy"), "{stdout}");
    assert!(!stdout.contains("check-secret-7a2b") && !stderr.contains("check-secret-7a2b"), "{stdout}{stderr}");
}

/// `regmux serve` configured only by `REGMUX_CONFIG` and `REGMUX_LISTEN`, logging with
/// `--log-format json`: every stderr line is JSON, and each request ends in exactly one `request`
/// event with route, repository, kind, reference, served_by, attempts, status, bytes and duration.
#[test]
fn env_configuration_and_one_json_event_per_request() {
    let fx = fixture();
    let config = two_backend_config(&fx._lab.path().join("ledger-env.db"), &fx.harbor.reg.url(), &fx.old.reg.url());
    let path = fx._lab.write("regmux-env/regmux.toml", config);
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmux"));
    cmd.args(["serve", "--log-format", "json"])
        .env("REGMUX_CONFIG", &path)
        .env("REGMUX_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("REGMUX_LOG_FORMAT")
        .env_remove("RUST_LOG");
    let regmux = Regmux::spawn(cmd, &path);
    // The listener of REGMUX_LISTEN (the file says 127.0.0.1:0), and the routes of REGMUX_CONFIG
    // (the built-in default has four).
    assert_eq!(regmux.port(), port, "REGMUX_LISTEN was not used");
    let logs = regmux.logs();
    let listening = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .find(|e| e["message"] == "listening")
        .expect("listening event");
    assert_eq!((listening["routes"].as_u64(), listening["backends"].as_u64()), (Some(2), Some(3)), "{listening}");

    let get =
        |method: &str, path: &str, headers: &[(&str, &str)]| http(method, &format!("{}{path}", regmux.url()), headers);
    let all = accept_manifests();
    let missing = layer_digests("small")[0].clone();
    let size = images().blob(&missing).len();
    // (request, what its event must say: route, repository, kind, reference, served_by, attempts
    // named in order, status).
    struct Want {
        method: &'static str,
        path: String,
        headers: Vec<(&'static str, &'static str)>,
        route: &'static str,
        repository: &'static str,
        kind: &'static str,
        reference: String,
        served_by: &'static str,
        attempts: &'static [&'static str],
        status: u64,
    }
    let wants = [
        Want {
            method: "GET",
            path: "/v2/".into(),
            headers: vec![],
            route: "",
            repository: "",
            kind: "base",
            reference: "".into(),
            served_by: "",
            attempts: &[],
            status: 200,
        },
        Want {
            method: "GET",
            path: "/v2/small/manifests/oci".into(),
            headers: all.clone(),
            route: "hub",
            repository: "library/small",
            kind: "manifest",
            reference: "oci".into(),
            served_by: "harbor",
            attempts: &[],
            status: 200,
        },
        Want {
            method: "GET",
            path: format!("/v2/partial/blobs/{missing}"),
            headers: vec![],
            route: "hub",
            repository: "library/partial",
            kind: "blob",
            reference: missing.clone(),
            served_by: "old",
            attempts: &["harbor"],
            status: 200,
        },
        Want {
            method: "HEAD",
            path: format!("/v2/partial/blobs/{missing}"),
            headers: vec![],
            route: "hub",
            repository: "library/partial",
            kind: "blob",
            reference: missing.clone(),
            served_by: "old",
            attempts: &[],
            status: 200,
        },
        Want {
            method: "GET",
            path: "/v2/small/manifests/nope".into(),
            headers: all.clone(),
            route: "hub",
            repository: "library/small",
            kind: "manifest",
            reference: "nope".into(),
            served_by: "",
            attempts: &["harbor", "old"],
            status: 404,
        },
        Want {
            method: "GET",
            path: "/v2/keycloak/keycloak/tags/list?ns=quay.io".into(),
            headers: vec![],
            route: "quay",
            repository: "keycloak/keycloak",
            kind: "tags",
            reference: "".into(),
            served_by: "union",
            attempts: &[],
            status: 200,
        },
        Want {
            method: "DELETE",
            path: "/v2/small/manifests/oci".into(),
            headers: vec![],
            route: "",
            repository: "",
            kind: "",
            reference: "".into(),
            served_by: "",
            attempts: &[],
            status: 405,
        },
    ];
    for (i, w) in wants.iter().enumerate() {
        let r = get(w.method, &w.path, &w.headers);
        assert_eq!(u64::from(r.status), w.status, "{} {}: {}", w.method, w.path, r.text());
        assert!(r.complete, "{} {}", w.method, w.path);
        // Its event is logged once the body is done: wait for it before the next request, so the
        // events come in request order.
        let events = wait_for(&format!("request event {}", i + 1), Duration::from_secs(5), || {
            let events = request_events(&regmux.logs());
            (events.len() > i).then_some(events)
        });
        let e = &events[i];
        let what = format!("{} {}: {e}", w.method, w.path);
        assert_eq!(e["method"], w.method, "{what}");
        assert_eq!(e["route"], w.route, "{what}");
        assert_eq!(e["repository"], w.repository, "{what}");
        assert_eq!(e["kind"], w.kind, "{what}");
        assert_eq!(e["reference"], w.reference.as_str(), "{what}");
        assert_eq!(e["served_by"], w.served_by, "{what}");
        assert_eq!(e["status"].as_u64(), Some(w.status), "{what}");
        let attempts = e["attempts"].as_str().unwrap_or_else(|| panic!("attempts: {what}"));
        let named: Vec<&str> =
            attempts.split("; ").filter(|a| !a.is_empty()).map(|a| a.split(':').next().unwrap_or("")).collect();
        assert_eq!(named, w.attempts, "{what}");
        assert_eq!(e["bytes"].as_u64(), Some(r.body.len() as u64), "{what}");
        assert!(e["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{what}");
    }
    // The blob's event counts the whole blob.
    assert_eq!(request_events(&regmux.logs())[2]["bytes"].as_u64(), Some(size as u64));

    // Exactly one event per request: a last request's event is waited for, and there are as many
    // events as requests, no more.
    let r = get("GET", "/v2/other/tags/list", &[]);
    assert_eq!(r.status, 200);
    let events = wait_for("the last request event", Duration::from_secs(5), || {
        let events = request_events(&regmux.logs());
        events.iter().any(|e| e["repository"] == "library/other").then_some(events)
    });
    assert_eq!(events.len(), wants.len() + 1, "events: {events:#?}");
}

/// The location hint is dropped when the backend it names fails: the next request tries the
/// route's configured order again instead of going straight back to the failing backend.
#[test]
fn location_hint_is_forgotten_after_a_failure() {
    let fx = fixture();
    let missing = layer_digests("small")[0].clone(); // harbor's `partial` lacks it, old has it
    let partial = format!("/v2/partial/blobs/{missing}");
    // Served by old: the hint says old.
    assert_blob(&fx.get(&partial, &[]), &missing);
    // old goes straight first for it now (the location cache; harbor is not asked again).
    assert_blob(&fx.get(&partial, &[]), &missing);
    fx.sync_logs();
    let harbor_partial = format!("/v2/hub-proxy/library/partial/blobs/{missing}");
    assert_eq!(fx.harbor.count("GET", &harbor_partial), 1, "{:?}", fx.harbor.requests());

    // old now fails for that digest (500; it stays up for everything else). The request goes to
    // old first (the hint), records its failure, then asks harbor, which does not have it.
    // (Stopping old would not show this: the health probe marks a stopped backend down within
    // 2 s, and a down backend is skipped without being asked, so the failure path is not taken.)
    break_blob_link(&fx.old.reg.storage_dir(), "library/partial", &missing);
    let e = assert_error(&fx.get(&partial, &[]), 503, "UNAVAILABLE");
    assert_attempts(&e, &["old", "harbor"]);
    let attempts = e["detail"]["attempts"].as_array().expect("attempts");
    assert!(attempts[0].as_str().is_some_and(|a| a.contains("500")), "old's failure not recorded: {e}");

    // The hint is gone: the configured order again (harbor, then old).
    let e = assert_error(&fx.get(&partial, &[]), 503, "UNAVAILABLE");
    assert_attempts(&e, &["harbor", "old"]);
    // And a repository harbor has it in is served by harbor without asking old at all.
    assert_blob(&fx.get(&format!("/v2/small/blobs/{missing}"), &[]), &missing);
    fx.sync_logs();
    assert_eq!(fx.old.count("GET", &format!("/v2/library/small/blobs/{missing}")), 0, "{:?}", fx.old.requests());
    assert_eq!(fx.old.count("GET", &format!("/v2/library/partial/blobs/{missing}")), 4, "{:?}", fx.old.requests());
    assert_eq!(fx.harbor.count("GET", &harbor_partial), 3, "{:?}", fx.harbor.requests());
}

/// A token-auth backend without credentials in regmux's configuration: regmux asks the token
/// endpoint anonymously (no Authorization), with the challenge's service and the pull scope, and
/// the image is pulled whole.
#[test]
fn anonymous_token_auth_backend() {
    let lab = Lab::new();
    let issuer = TokenIssuer::start(lab.dir("token"), TokenOpts::default());
    let harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain().token(&issuer));
    let (admin, admin_pass) = issuer.admin_creds();
    push_with_creds("small", &format!("{}/hub-proxy/library/small:oci", harbor.addr()), Format::Oci, admin, admin_pass);
    // The registry itself wants a token.
    let direct = http("GET", &format!("{}/v2/hub-proxy/library/small/manifests/oci", harbor.url()), &[]);
    assert_eq!(direct.status, 401, "{}", direct.text());
    assert!(direct.header("WWW-Authenticate").is_some_and(|c| c.starts_with("Bearer ")), "{:?}", direct.headers);

    let config = harbor_only_config(&lab, &harbor, None);
    let regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    let seeded = issuer.requests().len();
    let issued_before = issuer.issued();
    let get = |path: &str, headers: &[(&str, &str)]| http("GET", &format!("{}{path}", regmux.url()), headers);
    let r = get("/v2/small/manifests/oci", &accept_manifests());
    assert_manifest(&r, "small", Format::Oci, OCI_MANIFEST);
    assert_eq!(r.header("WWW-Authenticate"), None);
    for digest in blob_digests("small") {
        assert_blob(&get(&format!("/v2/small/blobs/{digest}"), &[]), &digest);
    }

    let requests = issuer.requests()[seeded..].to_vec();
    assert!(!requests.is_empty(), "the token endpoint was not asked");
    assert!(issuer.issued() > issued_before);
    for t in &requests {
        assert_eq!(t.user, None, "not anonymous: {t:?}");
        assert_eq!(t.status, 200, "{t:?}");
        assert_eq!(t.service.as_deref(), Some(issuer.service()), "{t:?}");
        assert_eq!(t.scopes, ["repository:hub-proxy/library/small:pull"], "{t:?}");
    }
}

/// Tokens are cached until shortly before `expires_in`: with a short lifetime, a pull after it has
/// passed gets a new token, and both pulls succeed.
#[test]
fn expired_token_is_replaced() {
    let lab = Lab::new();
    let (robot, robot_pass) = ("robot$regmux", "robot-secret");
    // regmux uses a token until 10 s before `expires_in` (at least 1 s): 13 s → 3 s.
    let issuer =
        TokenIssuer::start(lab.dir("token"), TokenOpts::default().credentials(robot, robot_pass).expires_in(13));
    let usable = Duration::from_secs(3);
    let harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain().token(&issuer));
    let (admin, admin_pass) = issuer.admin_creds();
    push_with_creds("small", &format!("{}/hub-proxy/library/small:oci", harbor.addr()), Format::Oci, admin, admin_pass);
    let config = harbor_only_config(&lab, &harbor, Some((robot, robot_pass)));
    let regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    let get = |path: &str, headers: &[(&str, &str)]| http("GET", &format!("{}{path}", regmux.url()), headers);
    let pull = || {
        assert_manifest(&get("/v2/small/manifests/oci", &accept_manifests()), "small", Format::Oci, OCI_MANIFEST);
        for digest in blob_digests("small") {
            assert_blob(&get(&format!("/v2/small/blobs/{digest}"), &[]), &digest);
        }
    };
    let before = issuer.issued();
    let started = Instant::now();
    pull();
    let first = issuer.issued() - before;
    assert!(first >= 1, "no token issued");
    // Within the token's life it is reused (checked only if the pull was quick enough to tell).
    let config_blob = config_digest("small");
    assert_blob(&get(&format!("/v2/small/blobs/{config_blob}"), &[]), &config_blob);
    if started.elapsed() < usable {
        assert_eq!(issuer.issued() - before, first, "a token was fetched again within its lifetime");
    }

    // Past the lifetime regmux gives every token issued so far (the registry would still accept
    // them: distribution allows 60 s of clock skew, so only regmux's own expiry makes it ask again).
    // Time has to pass here: this sleep is the point of the test.
    std::thread::sleep(usable + Duration::from_millis(500));
    let mid = issuer.issued();
    pull();
    assert!(issuer.issued() > mid, "no new token after the old one expired: {:?}", issuer.requests());
    for t in &issuer.requests()[..] {
        if t.user.as_deref() == Some(robot) {
            assert_eq!(t.status, 200, "{t:?}");
            assert_eq!(t.scopes, ["repository:hub-proxy/library/small:pull"], "{t:?}");
        }
    }
}

/// A cached token the registry refuses (here: the registry now trusts another token issuer, as
/// after a key rotation; an expired token is refused the same way) is dropped, and the request is
/// retried once with a fresh token from the realm of the new challenge: the client sees a plain 200.
#[test]
fn refused_cached_token_is_replaced_once() {
    let lab = Lab::new();
    let (robot, robot_pass) = ("robot$regmux", "robot-secret");
    let first = TokenIssuer::start(lab.dir("token-1"), TokenOpts::default().credentials(robot, robot_pass));
    let mut harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain().token(&first));
    let (admin, admin_pass) = first.admin_creds();
    push_with_creds("small", &format!("{}/hub-proxy/library/small:oci", harbor.addr()), Format::Oci, admin, admin_pass);
    let config = harbor_only_config(&lab, &harbor, Some((robot, robot_pass)));
    let regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    let get = |path: &str, headers: &[(&str, &str)]| http("GET", &format!("{}{path}", regmux.url()), headers);
    assert_manifest(&get("/v2/small/manifests/oci", &accept_manifests()), "small", Format::Oci, OCI_MANIFEST);
    let from_first = first.issued();

    // The registry now trusts only a second issuer (same service and issuer name, another key and
    // realm), on the same port and storage.
    let second = TokenIssuer::start(lab.dir("token-2"), TokenOpts::default().credentials(robot, robot_pass));
    let yml = std::fs::read_to_string(harbor.config_path()).expect("read registry config");
    let rotated = yml
        .replace(&first.realm(), &second.realm())
        .replace(&*first.cert_path().to_string_lossy(), &second.cert_path().to_string_lossy());
    assert_ne!(rotated, yml, "the registry config names the first issuer");
    std::fs::write(harbor.config_path(), rotated).expect("write registry config");
    harbor.restart();
    let seen = harbor.requests().len();

    // regmux still holds the first issuer's token for this scope: refused, replaced, retried once.
    assert_manifest(&get("/v2/small/manifests/oci", &accept_manifests()), "small", Format::Oci, OCI_MANIFEST);
    for digest in blob_digests("small") {
        assert_blob(&get(&format!("/v2/small/blobs/{digest}"), &[]), &digest);
    }
    assert_eq!(first.issued(), from_first, "the old realm was asked again: {:?}", first.requests());
    let asked = second.requests();
    assert!(!asked.is_empty(), "no token from the new realm");
    for t in &asked {
        assert_eq!((t.user.as_deref(), t.status), (Some(robot), 200), "{t:?}");
        assert_eq!(t.scopes, ["repository:hub-proxy/library/small:pull"], "{t:?}");
    }
    // The registry refused the old token once, then every request carried the new one.
    let manifest = "/v2/hub-proxy/library/small/manifests/oci";
    let after: Vec<LoggedRequest> =
        wait_for("the retried manifest request in the access log", Duration::from_secs(5), || {
            let after = harbor.requests()[seen..].to_vec();
            after.iter().any(|r| r.path == manifest && r.status == 200).then_some(after)
        });
    let refused: Vec<&LoggedRequest> = after.iter().filter(|r| r.status == 401 && r.path != "/v2/").collect();
    assert_eq!(refused.len(), 1, "{after:?}");
    assert_eq!(refused[0].path, manifest, "{after:?}");
}

/// The in-memory manifest cache answers a by-digest manifest only when the route's target served it:
/// one another backend served goes to a backend again, so the ledger keeps seeing whether the target
/// has it (a cache hit would record the old mirror as serving it forever).
#[test]
fn manifest_cache_serves_only_what_the_target_served() {
    let fx = fixture();
    let oci = accept(&[OCI_MANIFEST]);
    // small is on harbor (the target): the second GET comes from the cache.
    let small = manifest_digest("small", Format::Oci);
    for _ in 0..2 {
        assert_manifest(&fx.get(&format!("/v2/small/manifests/{small}"), &oci), "small", Format::Oci, OCI_MANIFEST);
    }
    // other is only on old: each GET is answered by a backend.
    let other = manifest_digest("other", Format::Oci);
    for _ in 0..2 {
        assert_manifest(&fx.get(&format!("/v2/other/manifests/{other}"), &oci), "other", Format::Oci, OCI_MANIFEST);
    }
    fx.sync_logs();
    assert_eq!(
        fx.harbor.count("GET", &format!("/v2/hub-proxy/library/small/manifests/{small}")),
        1,
        "the target's manifest was not served from the cache: {:?}",
        fx.harbor.requests()
    );
    assert_eq!(
        fx.old.count("GET", &format!("/v2/library/other/manifests/{other}")),
        2,
        "a manifest the old mirror served was answered from the cache: {:?}",
        fx.old.requests()
    );
    // The same manifest in another repository (partial holds small's manifest too) is asked for
    // there: the cache answers only for the repository it was served for.
    assert_manifest(&fx.get(&format!("/v2/partial/manifests/{small}"), &oci), "small", Format::Oci, OCI_MANIFEST);
    fx.sync_logs();
    assert_eq!(
        fx.harbor.count("GET", &format!("/v2/hub-proxy/library/partial/manifests/{small}")),
        1,
        "a manifest cached for library/small was served for library/partial: {:?}",
        fx.harbor.requests()
    );
}
