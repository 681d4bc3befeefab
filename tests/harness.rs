//! Self-test of the integration-test harness in `tests/support`: each part is driven against the
//! real component it wraps (docker-registry, the token issuer, umoci/skopeo images, containerd,
//! dockerd, /etc/hosts), with no regmux involved, so that a failure here points at the harness or
//! the machine rather than at regmux.

mod support;

use std::time::Duration;

use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Accept as real clients send it: one header line per media type.
fn accept_all() -> Vec<(&'static str, &'static str)> {
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json"]
        .into_iter()
        .map(|t| ("Accept", t))
        .collect()
}

fn get_manifest(base: &str, repo: &str, reference: &str, extra: &[(&str, &str)]) -> Response {
    let mut headers = accept_all();
    headers.extend_from_slice(extra);
    http("GET", &format!("{base}/v2/{repo}/manifests/{reference}"), &headers)
}

#[test]
fn plain_registry_serves_what_the_harness_pushed() {
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("plain"), RegistryOpts::plain());
    let base = reg.url();

    push("small", &format!("{}/lab/small:oci", reg.addr()), Format::Oci);
    push("small", &format!("{}/lab/small:v2s2", reg.addr()), Format::V2s2);
    push("multi", &format!("{}/lab/multi:1", reg.addr()), Format::All);

    for (tag, format, media_type) in [("oci", Format::Oci, OCI_MANIFEST), ("v2s2", Format::V2s2, DOCKER_MANIFEST)] {
        let by_tag = get_manifest(&base, "lab/small", tag, &[]);
        assert_eq!(by_tag.status, 200, "manifest {tag}: {}", by_tag.text());
        let digest = manifest_digest("small", format);
        assert_eq!(by_tag.header("Docker-Content-Digest"), Some(digest.as_str()), "{tag}");
        assert_eq!(by_tag.header("Content-Type"), Some(media_type), "{tag}");
        let by_digest = get_manifest(&base, "lab/small", &digest, &[]);
        assert_eq!(by_digest.status, 200);
        assert_eq!(by_digest.body_digest(), digest);
        assert_eq!(by_digest.body, manifest_bytes("small", format));
    }
    assert_ne!(manifest_digest("small", Format::Oci), manifest_digest("small", Format::V2s2));

    // The index and both platform manifests are there by digest.
    let index = get_manifest(&base, "lab/multi", "1", &[]);
    assert_eq!(index.status, 200, "{}", index.text());
    assert_eq!(index.header("Content-Type"), Some(OCI_INDEX));
    assert_eq!(index.body_digest(), manifest_digest("multi", Format::All));
    for child in ["multi-amd64", "multi-arm64"] {
        let m = get_manifest(&base, "lab/multi", &manifest_digest(child, Format::Oci), &[]);
        assert_eq!(m.status, 200, "{child}");
    }
    assert_eq!(blob_digests("multi").len(), 4, "two configs and two layers");

    // The same index as a Docker manifest list of schema2 manifests.
    push("multi", &format!("{}/lab/multi:v2s2", reg.addr()), Format::V2s2);
    let list = get_manifest(&base, "lab/multi", "v2s2", &[]);
    assert_eq!(list.header("Content-Type"), Some("application/vnd.docker.distribution.manifest.list.v2+json"));
    assert_eq!(list.body_digest(), manifest_digest("multi", Format::V2s2));
    let listed: Vec<String> = list.json()["manifests"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| m["digest"].as_str().expect("digest").to_string())
        .collect();
    assert_eq!(listed, [manifest_digest("multi-amd64", Format::V2s2), manifest_digest("multi-arm64", Format::V2s2)]);

    // An OCI manifest asked for without an OCI Accept is refused by distribution 2.8.2.
    let no_accept = http("GET", &format!("{base}/v2/lab/small/manifests/oci"), &[]);
    assert_eq!(no_accept.status, 404, "{}", no_accept.text());

    // Blobs: every digest the harness computed is served with matching bytes; Range works.
    let small_layers = image("small").layers.clone();
    assert_eq!(small_layers.len(), 2);
    assert!(small_layers[0].1 > 1_000_000 && small_layers[1].1 > 3_000_000, "{small_layers:?}");
    for digest in blob_digests("small") {
        let blob = http("GET", &format!("{base}/v2/lab/small/blobs/{digest}"), &[]);
        assert_eq!(blob.status, 200, "{digest}");
        assert!(blob.complete);
        assert_eq!(blob.body_digest(), digest);
    }
    let layer = &layer_digests("small")[0];
    let ranged = http("GET", &format!("{base}/v2/lab/small/blobs/{layer}"), &[("Range", "bytes=10-19")]);
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body.len(), 10);
    assert_eq!(ranged.body, images().blob(layer)[10..20]);

    // Partly present: the repository no longer links a deleted blob.
    delete_blob(&base, "lab/small", layer);
    let gone = http("GET", &format!("{base}/v2/lab/small/blobs/{layer}"), &[]);
    assert_eq!(gone.status, 404);

    // Corrupted in storage: same length, other bytes.
    let other_layer = &layer_digests("small")[1];
    corrupt_blob(&reg.storage_dir(), other_layer);
    let bad = http("GET", &format!("{base}/v2/lab/small/blobs/{other_layer}"), &[]);
    assert_eq!(bad.status, 200);
    assert_eq!(bad.body.len() as u64, small_layers[1].1);
    assert_ne!(bad.body_digest(), *other_layer);

    // The access log records requests (it is written after each response: poll).
    let blob_path = format!("/v2/lab/small/blobs/{other_layer}");
    wait_for("access log line for the corrupted blob", Duration::from_secs(5), || {
        reg.requests().iter().any(|r| r.method == "GET" && r.path == blob_path && r.status == 200).then_some(())
    });
}

#[test]
fn stopped_registry_refuses_and_restarts() {
    let lab = Lab::new();
    let mut reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    push("other", &format!("{}/lab/other:1", reg.addr()), Format::Oci);
    let url = format!("{}/v2/lab/other/manifests/1", reg.url());
    reg.stop();
    assert!(!reg.is_running());
    assert!(try_http("GET", &url, &accept_all()).is_err(), "a stopped registry must refuse connections");
    reg.restart();
    let m = get_manifest(&reg.url(), "lab/other", "1", &[]);
    assert_eq!(m.status, 200, "storage survives a restart");
    assert_eq!(m.body_digest(), manifest_digest("other", Format::Oci));
}

#[test]
fn token_registry_accepts_issuer_tokens() {
    let lab = Lab::new();
    let issuer = TokenIssuer::start(lab.dir("token"), TokenOpts::default());
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain().token(&issuer));
    let (admin, admin_pass) = issuer.admin_creds();
    push_with_creds("small", &format!("{}/library/alpine:3.19", reg.addr()), Format::Oci, admin, admin_pass);

    // Anonymous: 401 with a Bearer challenge naming the issuer, the service and the scope.
    let anon = get_manifest(&reg.url(), "library/alpine", "3.19", &[]);
    assert_eq!(anon.status, 401);
    let challenge = anon.header("WWW-Authenticate").expect("challenge header");
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(challenge.contains(&format!("realm=\"{}\"", issuer.realm())), "{challenge}");
    assert!(challenge.contains("service=\"lab-registry\""), "{challenge}");
    assert!(challenge.contains("scope=\"repository:library/alpine:pull\""), "{challenge}");

    let before = issuer.issued();
    let token = issuer.fetch_token("repository:library/alpine:pull", None);
    assert_eq!(issuer.issued(), before + 1);
    let bearer = format!("Bearer {token}");
    let ok = get_manifest(&reg.url(), "library/alpine", "3.19", &[("Authorization", &bearer)]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.body_digest(), manifest_digest("small", Format::Oci));
    let layer = &layer_digests("small")[0];
    let blob = http("GET", &format!("{}/v2/library/alpine/blobs/{layer}", reg.url()), &[("Authorization", &bearer)]);
    assert_eq!(blob.status, 200);
    assert_eq!(blob.body_digest(), *layer);

    // A token for one repository does not open another.
    let other = get_manifest(&reg.url(), "library/busybox", "1", &[("Authorization", &bearer)]);
    assert_eq!(other.status, 401);
    assert!(other.header("WWW-Authenticate").unwrap_or("").contains("insufficient_scope"), "{:?}", other.headers);

    // Catalog scope.
    let catalog_url = format!("{}/v2/_catalog", reg.url());
    let anon_catalog = http("GET", &catalog_url, &[]);
    assert!(anon_catalog.header("WWW-Authenticate").unwrap_or("").contains("registry:catalog:*"));
    let catalog_token = format!("Bearer {}", issuer.fetch_token("registry:catalog:*", None));
    let catalog = http("GET", &catalog_url, &[("Authorization", &catalog_token)]);
    assert_eq!(catalog.status, 200, "{}", catalog.text());
    assert_eq!(catalog.json()["repositories"][0], "library/alpine");

    let reqs = issuer.requests();
    assert!(reqs.iter().any(|r| r.scopes == ["registry:catalog:*"] && r.status == 200), "{reqs:?}");
}

#[test]
fn token_issuer_with_credentials_and_expiry() {
    let lab = Lab::new();
    let issuer =
        TokenIssuer::start(lab.dir("token"), TokenOpts::default().credentials("alice", "s3cret").expires_in(7));
    let realm = format!("{}?service=lab-registry&scope=repository:x/y:pull", issuer.realm());
    let anon = http("GET", &realm, &[]);
    assert_eq!(anon.status, 401);
    let wrong = http("GET", &realm, &[("Authorization", &basic_auth("alice", "nope"))]);
    assert_eq!(wrong.status, 401);
    let ok = http("GET", &realm, &[("Authorization", &basic_auth("alice", "s3cret"))]);
    assert_eq!(ok.status, 200);
    let body = ok.json();
    assert_eq!(body["expires_in"], 7);
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(issuer.issued(), 1, "401 answers issue no token");
    let users: Vec<Option<String>> = issuer.requests().into_iter().map(|r| r.user).collect();
    assert_eq!(users, [None, Some("alice".into()), Some("alice".into())]);
}

#[test]
fn htpasswd_and_pull_through_registries() {
    let lab = Lab::new();
    let secured = Registry::start(lab.dir("htpasswd"), RegistryOpts::plain().htpasswd("bob", "pw"));
    push_with_creds("other", &format!("{}/lab/other:1", secured.addr()), Format::V2s2, "bob", "pw");
    let anon = get_manifest(&secured.url(), "lab/other", "1", &[]);
    assert_eq!(anon.status, 401);
    assert!(anon.header("WWW-Authenticate").unwrap_or("").starts_with("Basic "), "{:?}", anon.headers);
    let auth = basic_auth("bob", "pw");
    let ok = get_manifest(&secured.url(), "lab/other", "1", &[("Authorization", &auth)]);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body_digest(), manifest_digest("other", Format::V2s2));

    let origin = Registry::start(lab.dir("origin"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", origin.addr()), Format::V2s2);
    let mirror = Registry::start(lab.dir("mirror"), RegistryOpts::plain().proxy(&origin.url()));
    let through = get_manifest(&mirror.url(), "library/alpine", "3.19", &[]);
    assert_eq!(through.status, 200, "{}", through.text());
    assert_eq!(through.body_digest(), manifest_digest("small", Format::V2s2));
    let layer = &layer_digests("small")[1];
    let blob = http("GET", &format!("{}/v2/library/alpine/blobs/{layer}", mirror.url()), &[]);
    assert_eq!(blob.body_digest(), *layer);
}

#[test]
fn skopeo_pulls_through_a_path_prefix_mirror() {
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    push("other", &format!("{}/quay-proxy/keycloak/keycloak:24.0", reg.addr()), Format::Oci);
    let conf = write_registries_conf(lab.path(), "quay.io", &format!("{}/quay-proxy", reg.addr()));
    let out_dir = lab.path().join("out");
    let out = skopeo_copy_via_mirror(&conf, "quay.io/keycloak/keycloak:24.0", &out_dir);
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).expect("read out index.json")).expect("json");
    assert_eq!(index["manifests"][0]["digest"], manifest_digest("other", Format::Oci));
    let wanted = "/v2/quay-proxy/keycloak/keycloak/manifests/24.0";
    wait_for("skopeo's manifest request in the access log", Duration::from_secs(5), || {
        reg.requests().iter().any(|r| r.path == wanted).then_some(())
    });
}

/// containerd, dockerd and /etc/hosts are machine-wide: one test, under the machine lock.
#[test]
fn containerd_and_dockerd_pull_from_a_local_registry() {
    let _machine = machine_lock();
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", reg.addr()), Format::V2s2);

    let hosts_before = std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts");
    {
        let _hosts = EtcHostsGuard::docker_hub();
        let resolved =
            run(std::process::Command::new("getent").args(["hosts", "registry-1.docker.io"]), Duration::from_secs(5));
        assert!(String::from_utf8_lossy(&resolved.stdout).starts_with("127.0.0.1"), "{resolved:?}");

        let containerd = Containerd::start(&lab);
        let hosts_dir = write_hosts_toml(lab.path().join("hosts"), "docker.io", &reg.url(), false);
        let out = containerd.pull("docker.io/library/alpine:3.19", &hosts_dir);
        assert!(out.status.success(), "ctr pull: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            containerd.image_digest("docker.io/library/alpine:3.19"),
            Some(manifest_digest("small", Format::V2s2))
        );
        // Path-prefix style: quay.io goes to /v2/quay-proxy/… on the registry (override_path).
        push("other", &format!("{}/quay-proxy/keycloak/keycloak:24.0", reg.addr()), Format::Oci);
        let hosts_dir =
            write_hosts_toml(lab.path().join("hosts"), "quay.io", &format!("{}/v2/quay-proxy", reg.url()), true);
        let out = containerd.pull("quay.io/keycloak/keycloak:24.0", &hosts_dir);
        assert!(out.status.success(), "ctr pull via prefix: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            containerd.image_digest("quay.io/keycloak/keycloak:24.0"),
            Some(manifest_digest("other", Format::Oci))
        );
        drop(containerd);

        let dockerd = Dockerd::start(&lab, &reg.url());
        let out = dockerd.pull("alpine:3.19");
        assert!(out.status.success(), "docker pull: {}\n{}", String::from_utf8_lossy(&out.stderr), dockerd.log());
        assert_eq!(dockerd.image_id("alpine:3.19"), Some(config_digest("small")));
        assert_eq!(dockerd.repo_digests("alpine:3.19"), [format!("alpine@{}", manifest_digest("small", Format::V2s2))]);
        // dockerd went to the mirror (HEAD by tag, with several Accept lines) and nowhere else.
        assert!(reg.requests().iter().any(|r| r.method == "HEAD" && r.path == "/v2/library/alpine/manifests/3.19"));
    }
    assert_eq!(std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts"), hosts_before, "/etc/hosts restored");
}

/// The http client must tell a complete body from one the server cut short (regmux aborts a blob
/// whose bytes do not match its digest), for both framings.
#[test]
fn http_client_reports_truncated_bodies() {
    use std::io::{Read, Write};
    let cases: [(&str, &[u8], bool); 4] = [
        ("length-complete", b"Content-Length: 5\r\n\r\nhello", true),
        ("length-cut", b"Content-Length: 10\r\n\r\nhello", false),
        ("chunked-complete", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n", true),
        ("chunked-cut", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n8\r\n!!", false),
    ];
    for (name, rest, complete) in cases {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).expect("read request");
            conn.write_all(b"HTTP/1.1 200 OK\r\n").expect("write status");
            conn.write_all(rest).expect("write rest");
        });
        let resp = http("GET", &format!("http://127.0.0.1:{port}/x"), &[("Accept", "a"), ("Accept", "b")]);
        server.join().expect("server thread");
        assert_eq!(resp.status, 200, "{name}");
        assert_eq!(resp.complete, complete, "{name}: {:?}", resp.text());
        assert!(resp.text().starts_with("hello"), "{name}");
    }
}

/// The regmux runner: start the built binary in front of a plain registry, find its address in the
/// log, pull through it, reload on SIGHUP and stop on SIGTERM.
#[test]
fn regmux_runner_finds_the_address_and_signals() {
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", reg.addr()), Format::Oci);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [ledger]\npath = \"{ledger}\"\n\n\
         [backends.local]\nurl = \"{url}\"\n\n\
         [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"local\"]\ndefault = true\n",
        ledger = lab.path().join("ledger.db").display(),
        url = reg.url(),
    );
    let mut regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    assert!(regmux.port() > 0);
    let ping = http("GET", &format!("{}/v2/", regmux.url()), &[]);
    assert_eq!(ping.status, 200, "{}", ping.text());
    let m = get_manifest(&regmux.url(), "library/alpine", "3.19", &[]);
    assert_eq!(m.status, 200, "{}\n{}", m.text(), regmux.logs());
    assert_eq!(m.body_digest(), manifest_digest("small", Format::Oci));

    regmux.send_signal("HUP");
    regmux.wait_log("reloaded", Duration::from_secs(10));
    regmux.send_signal("TERM");
    let status = regmux.wait_exit(Duration::from_secs(10)).expect("regmux exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", regmux.logs());
}
