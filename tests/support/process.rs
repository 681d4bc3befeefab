//! Child-process plumbing shared by every driver: a guard that kills and reaps on drop, a command
//! runner with a deadline, and the polling loop used for every readiness check.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How often readiness conditions are polled.
pub(crate) const POLL: Duration = Duration::from_millis(25);

/// Polls `check` every 25 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// Runs `cmd` to completion with stdout and stderr captured; kills it after `timeout`, in which case
/// the returned stderr ends with a `[harness] killed after …` line and the status is unsuccessful.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    scrub_env(cmd);
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || read_all(out));
    let err_reader = thread::spawn(move || read_all(err));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap_or_else(|e| panic!("wait for {desc}: {e}"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {desc}: {e}"),
        }
    };
    let stdout = out_reader.join().expect("stdout reader thread");
    let mut stderr = err_reader.join().expect("stderr reader thread");
    if timed_out {
        stderr.extend_from_slice(format!("\n[harness] killed after {timeout:?}: {desc}\n").as_bytes());
    }
    Output { status, stdout, stderr }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    buf
}

/// Removes proxy settings (a proxy would take 127.0.0.1 traffic elsewhere) and Docker client settings
/// that would point a client at the machine's own daemon.
pub(crate) fn scrub_env(cmd: &mut Command) {
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "CONTAINERD_ADDRESS",
        "CONTAINERD_NAMESPACE",
    ] {
        cmd.env_remove(var);
    }
}

/// Formats an `Output` for a panic message.
pub(crate) fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends a signal by name (`"HUP"`, `"TERM"`, …) with `kill(1)`, so the harness needs no libc.
pub(crate) fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill").args(["-s", sig, &pid.to_string()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// True while `pid` is a live process (a zombie counts as dead: nobody may be left to reap it).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A spawned long-running child: killed (SIGKILL, or SIGTERM first when `graceful` is set) and
/// reaped on drop. When the drop happens during a panic, the tail of `log` is printed.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
    graceful: Option<Duration>,
}

impl ChildGuard {
    /// Spawns `cmd` (environment scrubbed of proxies) and guards it.
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<PathBuf>) -> ChildGuard {
        scrub_env(cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        ChildGuard { name: name.to_string(), child: Some(child), log, graceful: None }
    }

    /// Stop with SIGTERM and wait up to `grace` before SIGKILL (for daemons that own children).
    pub fn graceful(mut self, grace: Duration) -> ChildGuard {
        self.graceful = Some(grace);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("child present until stopped")
    }

    /// The child's exit status if it has exited (it is reaped then), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().unwrap_or_else(|e| panic!("try_wait {}: {e}", self.name))
    }

    /// Polls for exit until `timeout`; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills (gracefully if configured) and reaps the child. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(grace) = self.graceful {
            if matches!(child.try_wait(), Ok(None)) && signal(child.id(), "TERM") {
                let deadline = Instant::now() + grace;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = child.kill(); // an already exited child reports an error here: fine
        if let Err(e) = child.wait() {
            eprintln!("[harness] wait for {} failed: {e}", self.name);
        }
    }

    /// The child's stderr pipe, if it was spawned with `Stdio::piped()` (taken once).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// Where the child's output goes, if it was redirected to a file.
    pub fn log_path(&self) -> Option<&PathBuf> {
        self.log.as_ref()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if thread::panicking() {
            if let Some(log) = &self.log {
                eprintln!("[harness] {} log {} (last lines):\n{}", self.name, log.display(), super::tail_file(log, 40));
            }
        }
        self.stop();
    }
}
