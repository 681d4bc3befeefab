//! The files under `docker/` as a user gets them: every `config.*.toml` passes `regmux check` (the
//! Swarm secrets it names replaced by temporary files), `regmux client-config` works on them without
//! those secrets, and `compose.yml` / `stack.yml` parse as YAML (Debian's `python3-yaml`, the parser
//! `docker-compose` uses) with the services, configs and secrets the configurations rely on.
//!
//! Nothing here starts a daemon; building the image and deploying the stack are described in
//! `docker/README.md` ("What was validated").

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_regmux");

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `docker/config.*.toml`, sorted.
fn docker_configs() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(docker_dir())
        .expect("read docker/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("config.") && name.ends_with(".toml")
        })
        .collect();
    found.sort();
    found
}

/// Every `"/run/secrets/NAME"` in `text` (commented lines included).
fn secret_names(text: &str) -> BTreeSet<String> {
    text.split("\"/run/secrets/").skip(1).filter_map(|rest| rest.split_once('"').map(|(n, _)| n.to_owned())).collect()
}

/// Swarm secrets only in active (uncommented) lines.
fn active_secret_names(text: &str) -> BTreeSet<String> {
    let active: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).map(|l| format!("{l}\n")).collect();
    secret_names(&active)
}

/// A copy of the configuration at `path` in `lab`, each `/run/secrets/NAME` replaced by a temporary
/// file holding a dummy secret.
fn with_dummy_secrets(lab: &Lab, path: &Path) -> PathBuf {
    let mut text = read(path);
    for name in secret_names(&text) {
        let dummy = lab.write(&format!("secrets/{name}"), "dummy-secret\n");
        text = text.replace(&format!("\"/run/secrets/{name}\""), &format!("{:?}", dummy.display().to_string()));
    }
    assert!(!text.contains("\"/run/secrets/"), "every secret path was rewritten:\n{text}");
    lab.write(path.file_name().and_then(|n| n.to_str()).expect("file name"), text)
}

fn regmux(args: &[&str]) -> std::process::Output {
    run(Command::new(BIN).args(args), Duration::from_secs(20))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn every_docker_config_passes_regmux_check() {
    let lab = Lab::new();
    let configs = docker_configs();
    let names: Vec<_> = configs.iter().filter_map(|p| p.file_name()?.to_str()).collect();
    assert_eq!(names, ["config.compose.toml", "config.default.toml", "config.stack.toml"]);
    for path in &configs {
        let copy = with_dummy_secrets(&lab, path);
        let out = regmux(&["check", "--config", copy.to_str().expect("utf-8")]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "regmux check {}: {}\n{stdout}", path.display(), text(&out.stderr));
        assert!(stdout.starts_with("configuration OK"), "{stdout}");
        let config = regmux::config::Config::parse(&read(path)).expect("parses");
        for r in &config.routes {
            assert!(stdout.contains(&format!("route {:?}:", r.name)), "route {} listed:\n{stdout}", r.name);
        }
    }
    // Without the secrets the stack's configuration is refused, for exactly the missing files.
    let stack = docker_dir().join("config.stack.toml");
    let out = regmux(&["check", "--config", stack.to_str().expect("utf-8")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for name in active_secret_names(&read(&stack)) {
        assert!(stderr.contains(&format!("cannot read /run/secrets/{name}")), "{name}:\n{stderr}");
    }
}

/// `client-config` needs routes and host names only: the stack's configuration works outside the
/// swarm, where `/run/secrets` does not exist. An endpoint with a path is refused (exit 64).
#[test]
fn client_config_works_without_the_secrets() {
    let stack = docker_dir().join("config.stack.toml");
    assert!(!Path::new("/run/secrets/harbor-robot").exists(), "this test needs the secret to be absent");
    let stack = stack.to_str().expect("utf-8");
    let out = regmux(&[
        "client-config",
        "--config",
        stack,
        "--for",
        "containerd",
        "--endpoint",
        "https://mirror.hub.example",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "client-config: {}", text(&out.stderr));
    for registry in ["docker.io", "quay.io"] {
        assert!(stdout.contains(&format!("/etc/containerd/certs.d/{registry}/hosts.toml")), "{stdout}");
    }
    assert!(stdout.contains("[host.\"https://mirror.hub.example\"]"), "{stdout}");

    let out =
        regmux(&["client-config", "--config", stack, "--for", "docker", "--endpoint", "https://mirror.example/regmux"]);
    assert_eq!(out.status.code(), Some(64), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("has a path"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "no files for a rejected endpoint: {}", text(&out.stdout));
}

/// A YAML file as JSON, parsed by Debian's python3-yaml (what docker-compose 1.x uses).
fn yaml(path: &Path) -> Value {
    let out = run(
        Command::new("/usr/bin/python3")
            .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"])
            .arg(path),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "parse {} as YAML (python3-yaml): {}", path.display(), text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn compose_file_is_valid_and_matches_its_config() {
    let compose = yaml(&docker_dir().join("compose.yml"));
    assert_eq!(keys(&compose["services"]), BTreeSet::from(["regmux".into(), "old-mirror".into()]));
    let regmux = &compose["services"]["regmux"];
    assert_eq!(regmux["build"]["dockerfile"], "docker/Dockerfile");
    assert!(docker_dir()
        .join(regmux["build"]["context"].as_str().expect("context"))
        .join("docker/Dockerfile")
        .exists());
    let volumes: Vec<&str> = regmux["volumes"].as_array().expect("volumes").iter().filter_map(Value::as_str).collect();
    assert!(volumes.contains(&"./config.compose.toml:/etc/regmux/config.toml:ro"), "{volumes:?}");
    assert!(volumes.contains(&"regmux-ledger:/var/lib/regmux"), "{volumes:?}");
    assert!(keys(&compose["volumes"]).contains("regmux-ledger"));
    assert_eq!(regmux["stop_grace_period"], "40s");
    assert!(regmux["healthcheck"]["test"].to_string().contains("http://127.0.0.1:9100/healthz"));
    assert_eq!(compose["services"]["old-mirror"]["image"], "registry:2.8.2");
    // The configuration's backend is the compose service.
    let config = regmux::config::Config::parse(&read(&docker_dir().join("config.compose.toml"))).expect("parses");
    assert_eq!(config.backends["old-mirror"].url, "http://old-mirror:5000");
}

#[test]
fn stack_file_is_valid_and_matches_its_config() {
    let stack = yaml(&docker_dir().join("stack.yml"));
    assert_eq!(keys(&stack["services"]), BTreeSet::from(["regmux".into(), "ledger-db".into()]));
    let regmux = &stack["services"]["regmux"];
    let deploy = &regmux["deploy"];
    assert_eq!(deploy["replicas"], 3);
    assert_eq!(deploy["placement"]["max_replicas_per_node"], 1);
    assert_eq!(deploy["update_config"]["order"], "start-first");
    assert_eq!(deploy["update_config"]["failure_action"], "rollback");
    assert_eq!(regmux["stop_grace_period"], "40s");

    // The Swarm config is the TOML next to the stack file, mounted where REGMUX_CONFIG points.
    let config_file = stack["configs"]["regmux-config"]["file"].as_str().expect("configs.regmux-config.file");
    let config_path = docker_dir().join(config_file);
    assert_eq!(config_path, docker_dir().join("./config.stack.toml"));
    let mount = &regmux["configs"][0];
    assert_eq!(mount["source"], "regmux-config");
    assert_eq!(mount["target"], regmux["environment"]["REGMUX_CONFIG"]);
    assert_eq!(mount["mode"], 0o440, "YAML 0440 is octal");
    let toml = read(&config_path);
    let config = regmux::config::Config::parse(&toml).expect("config.stack.toml parses");

    // Every secret the configuration reads is mounted into regmux under that name and declared.
    let mounted: BTreeSet<String> = regmux["secrets"]
        .as_array()
        .expect("regmux secrets")
        .iter()
        .map(|s| s["target"].as_str().expect("secret target").to_owned())
        .collect();
    let needed = active_secret_names(&toml);
    assert_eq!(needed, BTreeSet::from(["harbor-robot".into(), "regmux-ledger-password".into()]));
    assert!(needed.is_subset(&mounted), "config.stack.toml reads {needed:?}, stack.yml mounts {mounted:?}");
    assert_eq!(keys(&stack["secrets"]), needed);
    for name in &needed {
        assert_eq!(stack["secrets"][name]["external"], true, "{name}");
    }
    // The ledger database shares its password secret and network with regmux.
    let db = &stack["services"]["ledger-db"];
    assert_eq!(db["environment"]["POSTGRES_PASSWORD_FILE"], "/run/secrets/regmux-ledger-password");
    assert_eq!(config.ledger.url.as_deref(), Some("postgres://regmux@ledger-db:5432/regmux"));
    let nets = |v: &Value| -> BTreeSet<String> {
        v["networks"].as_array().expect("networks").iter().filter_map(|n| n.as_str().map(String::from)).collect()
    };
    assert!(nets(regmux).contains("ledger") && nets(db).contains("ledger"));

    // One Traefik router per host the configuration routes on, all to the regmux service on :5000.
    let labels: Vec<&str> =
        deploy["labels"].as_array().expect("deploy.labels").iter().filter_map(Value::as_str).collect();
    assert!(labels.contains(&"traefik.enable=true"));
    assert!(labels.contains(&"traefik.http.services.regmux.loadbalancer.server.port=5000"));
    let port = config.server.listen.rsplit_once(':').map(|(_, p)| p);
    assert_eq!(port, Some("5000"), "Traefik's port is regmux's listen port");
    let hosts: Vec<&str> = config.routes.iter().flat_map(|r| r.hosts.iter().map(String::as_str)).collect();
    assert_eq!(hosts.len(), 2);
    for host in hosts {
        let rule = labels
            .iter()
            .find(|l| l.ends_with(&format!(".rule=Host(`{host}`)")))
            .unwrap_or_else(|| panic!("no Traefik router for {host}: {labels:?}"));
        let router = rule.trim_start_matches("traefik.http.routers.").split('.').next().expect("router name");
        assert!(labels.contains(&format!("traefik.http.routers.{router}.service=regmux").as_str()), "{router}");
    }
}
