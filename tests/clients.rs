//! Complete image pulls through regmux by the real clients it serves, each configured with exactly the
//! files `regmux client-config` writes: skopeo (containers/image, as Podman) through the
//! `registries.conf` path-prefix mirror, containerd through the `hosts.toml` files (`ns` routing), and
//! dockerd started with the generated `daemon.json` as its `--config-file` (Docker Hub through
//! `registry-mirrors`, the default route, `library/` names; other registries by the names in the
//! generated image-names file). dockerd also logs in to regmux when it asks for client credentials.
//!
//! The backends play the migration of `DESIGN.md`: "harbor" holds images under project prefixes
//! (`hub-proxy/…`, `quay-proxy/…`) and lacks one layer of one image (a partly cached proxy-cache
//! project); "old" is the old mirror and holds everything under the plain names. Every pull must
//! complete with the right digests, taking the manifest from one backend and blobs from both.
//!
//! containerd, dockerd and /etc/hosts are machine-wide: everything that touches them runs in one test.

mod support;

use std::time::Duration;

use support::*;

struct Setup {
    lab: Lab,
    harbor: Registry,
    old: Registry,
    regmux: Regmux,
}

/// Images: `library/alpine:3.19` (Docker schema2) and `quay.io/keycloak/keycloak:24.0` (OCI) and
/// `quay.io/multi/app:1` (a two-platform OCI index). Harbor has alpine and keycloak under its
/// project prefixes but lacks keycloak's first layer, and does not have the index at all.
fn setup() -> Setup {
    setup_with_server("")
}

/// [`setup`] with extra `[server]` settings (e.g. `htpasswd = "…"`).
fn setup_with_server(server: &str) -> Setup {
    let lab = Lab::new();
    let harbor = Registry::start(lab.dir("harbor"), RegistryOpts::plain());
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", old.addr()), Format::V2s2);
    push("other", &format!("{}/keycloak/keycloak:24.0", old.addr()), Format::Oci);
    push("multi", &format!("{}/multi/app:1", old.addr()), Format::All);
    push("small", &format!("{}/hub-proxy/library/alpine:3.19", harbor.addr()), Format::V2s2);
    push("other", &format!("{}/quay-proxy/keycloak/keycloak:24.0", harbor.addr()), Format::Oci);
    delete_blob(&harbor.url(), "quay-proxy/keycloak/keycloak", &layer_digests("other")[0]);
    let config = format!(
        r#"{header}
[backends.harbor-hub]
url = "{harbor}"
prefix = "hub-proxy"
[backends.harbor-quay]
url = "{harbor}"
prefix = "quay-proxy"
[backends.old-hub]
url = "{old}"
[backends.old-quay]
url = "{old}"
[[routes]]
name = "docker.io"
registries = ["docker.io"]
backends = ["harbor-hub", "old-hub"]
default = true
[[routes]]
name = "quay.io"
registries = ["quay.io"]
backends = ["harbor-quay", "old-quay"]
"#,
        header = config_header(&lab.path().join("ledger.db")).replacen("[server]\n", &format!("[server]\n{server}"), 1),
        harbor = harbor.url(),
        old = old.url(),
    );
    let regmux = Regmux::start(env!("CARGO_BIN_EXE_regmux"), lab.dir("regmux"), &config);
    Setup { lab, harbor, old, regmux }
}

/// `regmux client-config --for CLIENT --out DIR`: the files a user would install, written under `dir`.
fn client_config(s: &Setup, client: &str) -> std::path::PathBuf {
    let dir = s.lab.path().join(format!("client-config-{client}"));
    let out = run(
        std::process::Command::new(env!("CARGO_BIN_EXE_regmux"))
            .args(["client-config", "--for", client, "--endpoint", &s.regmux.url(), "--config"])
            .arg(s.regmux.config_path())
            .arg("--out")
            .arg(&dir),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "client-config --for {client}: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn saw(reg: &Registry, method: &str, path: &str) -> bool {
    reg.requests().iter().any(|r| r.method == method && r.path == path && r.status < 400)
}

/// Wait for a request to show up in a registry's access log (it is written after the response).
fn wait_saw(reg: &Registry, method: &str, path: &str) {
    wait_for(&format!("{method} {path} in the access log"), Duration::from_secs(5), || {
        saw(reg, method, path).then_some(())
    });
}

fn oci_layout_index(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("read index.json")).expect("index.json")
}

#[test]
fn skopeo_pulls_through_a_path_prefix_mirror_from_two_backends() {
    let s = setup();
    // Podman/skopeo keep a mirror's path prefix: regmux sees /v2/quay.io/keycloak/keycloak/….
    // The registries.conf is the one `regmux client-config --for podman` writes.
    let conf = client_config(&s, "podman").join("etc/containers/registries.conf.d/regmux.conf");
    let out_dir = s.lab.path().join("kc");
    let out = skopeo_copy_via_mirror(&conf, "quay.io/keycloak/keycloak:24.0", &out_dir);
    assert!(out.status.success(), "skopeo: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    assert_eq!(oci_layout_index(&out_dir)["manifests"][0]["digest"], manifest_digest("other", Format::Oci));
    // skopeo verified every blob's digest while writing the layout; they are all there.
    for d in blob_digests("other") {
        let hex = d.trim_start_matches("sha256:");
        assert!(out_dir.join("blobs/sha256").join(hex).exists(), "blob {d} in the pulled layout");
    }
    // The manifest and the present layer came from Harbor's project, the missing layer from the old mirror.
    let manifest = "/v2/quay-proxy/keycloak/keycloak/manifests/24.0";
    wait_saw(&s.harbor, "GET", manifest);
    let missing = &layer_digests("other")[0];
    wait_saw(&s.old, "GET", &format!("/v2/keycloak/keycloak/blobs/{missing}"));
    let present = layer_digests("other").into_iter().nth(1);
    if let Some(present) = present {
        wait_saw(&s.harbor, "GET", &format!("/v2/quay-proxy/keycloak/keycloak/blobs/{present}"));
        assert!(
            !saw(&s.old, "GET", &format!("/v2/keycloak/keycloak/blobs/{present}")),
            "a blob Harbor has is not fetched from the old mirror"
        );
    }
    assert!(!saw(&s.old, "GET", "/v2/keycloak/keycloak/manifests/24.0"), "Harbor answered the manifest");
}

#[test]
fn skopeo_pulls_a_multi_platform_index_by_prefix() {
    let s = setup();
    let conf = write_registries_conf(s.lab.path(), "quay.io", &format!("{}/quay.io", s.regmux.addr()));
    let out_dir = s.lab.path().join("multi");
    let out = skopeo_copy_via_mirror(&conf, "quay.io/multi/app:1", &out_dir);
    assert!(out.status.success(), "skopeo: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    // skopeo resolves the index to this machine's platform (amd64) and stores that manifest.
    assert_eq!(oci_layout_index(&out_dir)["manifests"][0]["digest"], manifest_digest("multi-amd64", Format::Oci));
    wait_saw(&s.old, "GET", "/v2/multi/app/manifests/1");
    // Harbor was asked first (and did not have it).
    assert!(s.harbor.requests().iter().any(|r| r.path == "/v2/quay-proxy/multi/app/manifests/1" && r.status == 404));
}

/// containerd (`ns` routing) and dockerd (`--registry-mirror`, default route, `library/`).
#[test]
fn containerd_and_dockerd_pull_complete_images() {
    let _machine = machine_lock();
    let s = setup();
    let _hosts = EtcHostsGuard::docker_hub();

    let containerd = Containerd::start(&s.lab);
    // The hosts.toml files are the ones `regmux client-config --for containerd` writes; every request
    // then carries ?ns=docker.io or ?ns=quay.io.
    let hosts = client_config(&s, "containerd").join("etc/containerd/certs.d");
    let out = containerd.pull("docker.io/library/alpine:3.19", &hosts);
    assert!(out.status.success(), "ctr pull alpine: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    assert_eq!(containerd.image_digest("docker.io/library/alpine:3.19"), Some(manifest_digest("small", Format::V2s2)));
    wait_saw(&s.harbor, "HEAD", "/v2/hub-proxy/library/alpine/manifests/3.19");

    // quay.io → regmux with ns=quay.io; the image is partly in Harbor.
    let out = containerd.pull("quay.io/keycloak/keycloak:24.0", &hosts);
    assert!(out.status.success(), "ctr pull keycloak: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    assert_eq!(containerd.image_digest("quay.io/keycloak/keycloak:24.0"), Some(manifest_digest("other", Format::Oci)));
    wait_saw(&s.old, "GET", &format!("/v2/keycloak/keycloak/blobs/{}", layer_digests("other")[0]));
    let logs = s.regmux.logs();
    assert!(
        logs.lines().any(|l| l.contains("route=quay.io") && l.contains("via=\"ns\"") && l.contains("kind=\"blob\"")),
        "containerd's requests are routed by their ns parameter:\n{logs}"
    );

    // The whole index, every platform.
    let out = containerd.ctr(&[
        "images",
        "pull",
        "--all-platforms",
        "--hosts-dir",
        hosts.to_str().expect("utf-8 path"),
        "--plain-http",
        "quay.io/multi/app:1",
    ]);
    assert!(out.status.success(), "ctr pull index: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    assert_eq!(containerd.image_digest("quay.io/multi/app:1"), Some(manifest_digest("multi", Format::All)));
    drop(containerd);

    // dockerd, started with the daemon.json `regmux client-config --for docker` writes as its config file.
    let docker_dir = client_config(&s, "docker");
    let daemon_json = docker_dir.join("etc/docker/daemon.json");
    let daemon: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&daemon_json).expect("read daemon.json")).expect("daemon.json");
    assert_eq!(daemon["registry-mirrors"], serde_json::json!([s.regmux.url()]));
    assert_eq!(daemon["insecure-registries"], serde_json::json!([s.regmux.addr()]));
    let dockerd = Dockerd::start_with_config(&s.lab, &daemon_json);
    // dockerd took both settings from the file (no --registry-mirror / --insecure-registry flags).
    let registry = dockerd.registry_config();
    assert_eq!(registry["Mirrors"], serde_json::json!([format!("{}/", s.regmux.url())]), "{registry}");
    assert_eq!(registry["IndexConfigs"][s.regmux.addr()]["Secure"], false, "{registry}");

    // Docker Hub through the mirror, one-segment name → library/alpine on the default route.
    let out = dockerd.pull("alpine:3.19");
    assert!(
        out.status.success(),
        "docker pull: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dockerd.log(),
        s.regmux.logs()
    );
    assert_eq!(dockerd.image_id("alpine:3.19"), Some(config_digest("small")));
    assert_eq!(dockerd.repo_digests("alpine:3.19"), [format!("alpine@{}", manifest_digest("small", Format::V2s2))]);
    // Another registry: by the name the generated image-names file gives for quay.io.
    let image = docker_image_name(&docker_dir, "quay.io", "keycloak/keycloak:24.0");
    assert_eq!(image, format!("{}/quay.io/keycloak/keycloak:24.0", s.regmux.addr()));
    let out = dockerd.pull(&image);
    assert!(out.status.success(), "docker pull {image}: {}\n{}", String::from_utf8_lossy(&out.stderr), s.regmux.logs());
    assert_eq!(dockerd.image_id(&image), Some(config_digest("other")));
}

/// The image name to `docker pull` for `registry/<repository:tag>`, from the image-names file
/// `client-config --for docker` writes (`<usual name>  <name through regmux>` per line).
fn docker_image_name(docker_dir: &std::path::Path, registry: &str, repository_tag: &str) -> String {
    let path = docker_dir.join(regmux::clientconfig::IMAGE_NAMES);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{registry}/<repository>:<tag> ")))
        .unwrap_or_else(|| panic!("no line for {registry} in {}:\n{text}", path.display()));
    let through = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("second column in {line:?}"));
    through.replace("<repository>:<tag>", repository_tag)
}

/// `[server] htpasswd` with dockerd: an anonymous pull is refused with an authentication error,
/// `docker login` against regmux (plain HTTP, trusted by the generated `insecure-registries`)
/// succeeds, and the same pull then completes.
#[test]
fn dockerd_logs_in_to_regmux_and_pulls() {
    let _machine = machine_lock();
    let lab_tmp = Lab::new();
    let out = run(std::process::Command::new("htpasswd").args(["-Bbn", "puller", "s3cret"]), Duration::from_secs(10));
    assert!(out.status.success(), "htpasswd: {out:?}");
    let htpasswd = lab_tmp.write("clients.htpasswd", &out.stdout);
    let s = setup_with_server(&format!("htpasswd = {:?}\n", htpasswd.display().to_string()));
    let _hosts = EtcHostsGuard::docker_hub();
    let docker_dir = client_config(&s, "docker");
    let dockerd = Dockerd::start_with_config(&s.lab, &docker_dir.join("etc/docker/daemon.json"));
    let image = docker_image_name(&docker_dir, "quay.io", "keycloak/keycloak:24.0");

    let before = s.harbor.requests().len() + s.old.requests().len();
    let out = dockerd.pull(&image);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an anonymous pull must fail: {stderr}");
    assert!(
        stderr.contains("no basic auth credentials") || stderr.contains("unauthorized"),
        "the anonymous pull fails for want of credentials: {stderr}"
    );
    assert_eq!(dockerd.image_id(&image), None);
    assert_eq!(
        s.harbor.requests().len() + s.old.requests().len(),
        before,
        "nothing reaches a backend before the client authenticates"
    );

    let wrong = dockerd.login(s.regmux.addr(), "puller", "wrong");
    assert!(!wrong.status.success(), "docker login with a wrong password: {}", String::from_utf8_lossy(&wrong.stdout));
    let login = dockerd.login(s.regmux.addr(), "puller", "s3cret");
    assert!(
        login.status.success() && String::from_utf8_lossy(&login.stdout).contains("Login Succeeded"),
        "docker login: {}\n{}\n{}",
        String::from_utf8_lossy(&login.stdout),
        String::from_utf8_lossy(&login.stderr),
        s.regmux.logs()
    );
    let out = dockerd.pull(&image);
    assert!(
        out.status.success(),
        "docker pull {image} after login: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.regmux.logs()
    );
    assert_eq!(dockerd.image_id(&image), Some(config_digest("other")));
    // Logged in, the pull went through regmux to the backends (Harbor's project holds the manifest).
    wait_for("the manifest request in Harbor's access log", Duration::from_secs(5), || {
        s.harbor
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v2/quay-proxy/keycloak/keycloak/manifests/") && r.status < 400)
            .then_some(())
    });
}
