//! Drivers for the real clients regmux serves: skopeo (containers/image, as Podman), a private
//! containerd driven with `ctr`, and a private dockerd driven with `docker`; plus [`EtcHostsGuard`],
//! which points the public registry names at 127.0.0.1 so that a client's fallback to the origin
//! fails at once on this machine instead of going to the internet.
//!
//! Each daemon gets its own root, state and socket (sockets under a short `/tmp/rmx*` folder: unix
//! socket paths are limited to ~108 bytes), is ready when its CLI's `version` call succeeds, and is
//! stopped and reaped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::process::{describe, pid_alive, run, signal, ChildGuard, POLL};
use super::{short_tmp_dir, Lab};

/// Generous limit for one client pull: a hung proxy fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// skopeo / Podman

/// Writes `registries.conf` into `dir` declaring `mirror_location` (e.g. `127.0.0.1:PORT` or
/// `127.0.0.1:PORT/quay-proxy`, plain HTTP) as the mirror of `location` (e.g. `quay.io`).
pub fn write_registries_conf(dir: impl AsRef<Path>, location: &str, mirror_location: &str) -> PathBuf {
    let path = dir.as_ref().join("registries.conf");
    let text = format!(
        "unqualified-search-registries = []\n\n\
         [[registry]]\nlocation = {loc:?}\n\n\
         [[registry.mirror]]\nlocation = {mirror:?}\ninsecure = true\n",
        loc = location,
        mirror = mirror_location
    );
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// `skopeo --registries-conf CONF copy --src-tls-verify=false docker://SRC oci:OUT:pulled`.
/// `src_ref` is the origin reference (`quay.io/keycloak/keycloak:24.0`); the mirror in the conf
/// file is what actually answers. Returns skopeo's output whatever happened.
pub fn skopeo_copy_via_mirror(registries_conf: &Path, src_ref: &str, out_dir: &Path) -> Output {
    let policy = out_dir.with_extension("policy.json");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("write policy.json");
    run(
        Command::new("skopeo")
            .arg("--registries-conf")
            .arg(registries_conf)
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--retry-times", "0", "--src-tls-verify=false"])
            .arg(format!("docker://{src_ref}"))
            .arg(format!("oci:{}:pulled", out_dir.display())),
        CLIENT_TIMEOUT,
    )
}

// ---------------------------------------------------------------------------------------------
// containerd

/// Writes `DIR/<registry>/hosts.toml` sending `registry` (e.g. `docker.io`, `quay.io`) to
/// `host_url` (`http://127.0.0.1:PORT`, or `http://127.0.0.1:PORT/v2/quay-proxy` with
/// `override_path = true` for a path-prefix mirror). Returns the hosts dir for `--hosts-dir`.
pub fn write_hosts_toml(hosts_dir: impl AsRef<Path>, registry: &str, host_url: &str, override_path: bool) -> PathBuf {
    let hosts_dir = hosts_dir.as_ref().to_path_buf();
    let dir = hosts_dir.join(registry);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let server = if registry == "docker.io" {
        "https://registry-1.docker.io".to_string()
    } else {
        format!("https://{registry}")
    };
    let mut text = format!("server = {server:?}\n\n[host.{host_url:?}]\n  capabilities = [\"pull\", \"resolve\"]\n");
    if override_path {
        text.push_str("  override_path = true\n");
    }
    fs::write(dir.join("hosts.toml"), text).expect("write hosts.toml");
    hosts_dir
}

/// A private containerd (CRI disabled) with root and state in the lab.
#[derive(Debug)]
pub struct Containerd {
    socket: PathBuf,
    log: PathBuf,
    child: ChildGuard,
    _sock_dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers (deadline 30 s).
    pub fn start(lab: &Lab) -> Containerd {
        let dir = lab.dir("containerd");
        let sock_dir = short_tmp_dir("rmxc");
        let socket = sock_dir.path().join("c.sock");
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {sock:?}\n[ttrpc]\n  address = {ttrpc:?}\n[metrics]\n  address = \"\"\n",
            root = dir.join("root"),
            state = sock_dir.path().join("state"),
            sock = socket,
            ttrpc = sock_dir.path().join("c.sock.ttrpc"),
        );
        let config_path = dir.join("containerd.toml");
        fs::write(&config_path, config).expect("write containerd.toml");
        let log = dir.join("containerd.log");
        let log_file = fs::File::create(&log).expect("create containerd.log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file);
        let mut child = ChildGuard::spawn("containerd", &mut cmd, Some(log.clone()));
        let ctr_version = |socket: &Path| {
            Command::new("ctr")
                .arg("--address")
                .arg(socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_daemon("containerd", &mut child, &log, Duration::from_secs(30), || ctr_version(&socket));
        Containerd { socket, log, child, _sock_dir: sock_dir }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr --address SOCK images pull --hosts-dir DIR --plain-http REF`.
    pub fn pull(&self, image_ref: &str, hosts_dir: &Path) -> Output {
        self.ctr(&["images", "pull", "--hosts-dir", path_str(hosts_dir), "--plain-http", image_ref])
    }

    /// Any `ctr` command against this containerd (e.g. extra pull flags, `images ls`, `content ls`).
    pub fn ctr(&self, args: &[&str]) -> Output {
        run(Command::new("ctr").arg("--address").arg(&self.socket).args(args), CLIENT_TIMEOUT)
    }

    /// The manifest (or index) digest containerd recorded for `image_ref`, if it has the image.
    pub fn image_digest(&self, image_ref: &str) -> Option<String> {
        let out = self.ctr(&["images", "ls"]);
        assert!(out.status.success(), "ctr images ls: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // REF TYPE DIGEST SIZE PLATFORMS LABELS
            if cols.first() == Some(&image_ref) {
                cols.get(2).map(|d| d.to_string())
            } else {
                None
            }
        })
    }

    /// Kills and reaps containerd (also done on drop).
    pub fn stop(&mut self) {
        self.child.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// dockerd

/// A private dockerd (classic image store, vfs, no networking) configured by a `daemon.json`.
#[derive(Debug)]
pub struct Dockerd {
    socket: PathBuf,
    exec_root: PathBuf,
    client_config: PathBuf,
    log: PathBuf,
    child: ChildGuard,
    _sock_dir: tempfile::TempDir,
}

impl Dockerd {
    /// Starts dockerd with one registry mirror (`registry-mirrors` and, for its `HOST:PORT`,
    /// `insecure-registries` in a `daemon.json` written to the lab); see [`Dockerd::start_with_config`].
    pub fn start(lab: &Lab, mirror_url: &str) -> Dockerd {
        let mirror_host = mirror_url.split_once("://").map_or(mirror_url, |(_, rest)| rest).trim_end_matches('/');
        let daemon = serde_json::json!({"registry-mirrors": [mirror_url], "insecure-registries": [mirror_host]});
        let daemon_json = lab.dir("dockerd").join("daemon.json");
        fs::write(&daemon_json, serde_json::to_string_pretty(&daemon).expect("daemon.json"))
            .expect("write daemon.json");
        Dockerd::start_with_config(lab, &daemon_json)
    }

    /// Starts dockerd with `--config-file DAEMON_JSON` (e.g. the one `regmux client-config --for docker`
    /// writes, used as it is) and waits until `docker version` answers (deadline 60 s). Flags add only
    /// what a lab needs and the file does not set: private data root, exec root, socket and pid file,
    /// vfs, no bridge or iptables; dockerd refuses to start if a key is both in the file and a flag.
    /// Create an [`EtcHostsGuard`] first: dockerd goes to Docker Hub whenever the mirror fails.
    pub fn start_with_config(lab: &Lab, daemon_json: &Path) -> Dockerd {
        let dir = lab.dir("dockerd");
        let sock_dir = short_tmp_dir("rmxd");
        let socket = sock_dir.path().join("d.sock");
        let exec_root = sock_dir.path().join("x");
        let client_config = dir.join("client");
        fs::create_dir_all(&client_config).expect("create docker client config dir");
        let log = dir.join("dockerd.log");
        let log_file = fs::File::create(&log).expect("create dockerd.log");
        let mut cmd = Command::new("dockerd");
        cmd.args(["--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs"])
            .arg("--config-file")
            .arg(daemon_json)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("-p")
            .arg(sock_dir.path().join("dockerd.pid"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file);
        // SIGTERM lets dockerd stop the containerd it started; SIGKILL would orphan it.
        let mut child = ChildGuard::spawn("dockerd", &mut cmd, Some(log.clone())).graceful(Duration::from_secs(15));
        wait_daemon("dockerd", &mut child, &log, Duration::from_secs(60), || {
            docker_cmd(&socket, &client_config)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        Dockerd { socket, exec_root, client_config, log, child, _sock_dir: sock_dir }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Any `docker` client command against this daemon (`/usr/bin/docker`, the daemon's own version).
    pub fn docker(&self, args: &[&str]) -> Output {
        run(docker_cmd(&self.socket, &self.client_config).args(args), CLIENT_TIMEOUT)
    }

    /// `docker login -u USER -p PASS REGISTRY` (the client's `config.json` is private to this daemon).
    pub fn login(&self, registry: &str, user: &str, pass: &str) -> Output {
        self.docker(&["login", "-u", user, "-p", pass, registry])
    }

    /// The daemon's effective registry settings (`docker info`'s `RegistryConfig`: `Mirrors`,
    /// `IndexConfigs` with `Secure`, …), to check what it made of its `daemon.json`.
    pub fn registry_config(&self) -> serde_json::Value {
        let out = self.docker(&["info", "--format", "{{json .RegistryConfig}}"]);
        assert!(out.status.success(), "docker info: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("RegistryConfig JSON")
    }

    /// `docker pull IMAGE` (e.g. `alpine:3.19`, which the daemon sends to its mirror).
    pub fn pull(&self, image: &str) -> Output {
        self.docker(&["pull", image])
    }

    /// `docker image inspect IMAGE` as JSON, or None when the daemon does not have it.
    pub fn inspect(&self, image: &str) -> Option<serde_json::Value> {
        let out = self.docker(&["image", "inspect", image]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("docker image inspect JSON");
        v.as_array().and_then(|a| a.first().cloned())
    }

    /// The image ID (`sha256:` of its config), or None.
    pub fn image_id(&self, image: &str) -> Option<String> {
        self.inspect(image).and_then(|v| v["Id"].as_str().map(String::from))
    }

    /// `RepoDigests` of the image (`alpine@sha256:…`), empty when it is absent.
    pub fn repo_digests(&self, image: &str) -> Vec<String> {
        self.inspect(image)
            .and_then(|v| v["RepoDigests"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.as_str().map(String::from))
            .collect()
    }

    /// `docker rmi -f IMAGE`, so the next pull fetches again.
    pub fn remove_image(&self, image: &str) -> Output {
        self.docker(&["rmi", "-f", image])
    }

    /// Stops dockerd (SIGTERM, SIGKILL after 15 s), then makes sure the containerd it started is gone.
    pub fn stop(&mut self) {
        let ctrd_pid = fs::read_to_string(self.exec_root.join("containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        self.child.stop();
        if let Some(pid) = ctrd_pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if pid_alive(pid) {
                signal(pid, "KILL");
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop(); // the guard then prints the log tail if the test is panicking
    }
}

fn docker_cmd(socket: &Path, client_config: &Path) -> Command {
    // /usr/bin/docker matches the daemon (20.10); another client earlier in PATH may not.
    let mut cmd = Command::new("/usr/bin/docker");
    cmd.env("DOCKER_CONFIG", client_config).arg("-H").arg(format!("unix://{}", socket.display()));
    cmd
}

/// Polls `ready` until true; panics with the log tail if the daemon exits or the deadline passes.
fn wait_daemon(name: &str, child: &mut ChildGuard, log: &Path, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait() {
            panic!("{name} exited during start with {status}:\n{}", super::tail_file(log, 40));
        }
        if ready() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{name} not ready after {timeout:?}:\n{}", super::tail_file(log, 40));
        }
        std::thread::sleep(POLL);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------------
// /etc/hosts

/// Names that clients fall back to when a mirror fails.
pub const DOCKER_HUB_NAMES: &[&str] =
    &["registry-1.docker.io", "index.docker.io", "auth.docker.io", "production.cloudflare.docker.com", "quay.io"];

const HOSTS: &str = "/etc/hosts";
const MARK: &str = "# regmux-test EtcHostsGuard pid=";

/// Maps names to 127.0.0.1 in `/etc/hosts` while it lives and writes the original file back on drop.
/// Lines it adds carry a marker with the pid, so lines left by a killed test process are removed by
/// the next guard. Only one guard exists at a time in a process.
#[derive(Debug)]
pub struct EtcHostsGuard {
    original: String,
    _lock: MutexGuard<'static, ()>,
}

impl EtcHostsGuard {
    /// Maps [`DOCKER_HUB_NAMES`].
    pub fn docker_hub() -> EtcHostsGuard {
        EtcHostsGuard::new(DOCKER_HUB_NAMES)
    }

    pub fn new(names: &[&str]) -> EtcHostsGuard {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let current = fs::read_to_string(HOSTS).expect("read /etc/hosts");
        // Lines with the marker were left by a test process that was killed: not part of the original.
        let original = if current.contains(MARK) {
            current.split_inclusive('\n').filter(|l| !l.contains(MARK)).collect()
        } else {
            current
        };
        let mut text = original.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for name in names {
            text.push_str(&format!("127.0.0.1 {name} {MARK}{}\n", std::process::id()));
        }
        // Written in place (not renamed over): /etc/hosts is often a bind mount.
        fs::write(HOSTS, text).expect("write /etc/hosts (tests run as root)");
        EtcHostsGuard { original, _lock: lock }
    }
}

impl Drop for EtcHostsGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::write(HOSTS, &self.original) {
            eprintln!("[harness] could not restore /etc/hosts: {e}");
        }
    }
}
