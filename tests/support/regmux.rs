//! Runs the real `regmux` binary (`env!("CARGO_BIN_EXE_regmux")` in integration tests) as
//! `regmux serve --config FILE` and finds the address it bound from its log.
//!
//! The config should say `listen = "127.0.0.1:0"`; regmux then logs (on stderr) a line containing
//! `listening` and `addr=127.0.0.1:PORT` (text format) or an `"addr"` field (`--log-format json`)
//! once it is bound (a `listening` line that also mentions `admin` is taken as the admin
//! listener's). A background thread reads stderr line by line into a buffer and a file
//! (`regmux.log` next to the config), so tests can look at log lines later; stdout goes to
//! `regmux.stdout`. The child gets `NO_COLOR=1`, and escape codes are stripped anyway, so the log
//! reads as plain text.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::process::{signal, wait_for, ChildGuard};

/// A running regmux; killed and reaped on drop.
#[derive(Debug)]
pub struct Regmux {
    child: ChildGuard,
    addr: String,
    logs: Arc<Mutex<String>>,
    config_path: PathBuf,
    reader: Option<JoinHandle<()>>,
}

impl Regmux {
    /// Writes `config_toml` to `dir/regmux.toml` and starts `BIN serve --config` on it.
    pub fn start(bin: impl AsRef<Path>, dir: impl AsRef<Path>, config_toml: &str) -> Regmux {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let config_path = dir.join("regmux.toml");
        fs::write(&config_path, config_toml).expect("write regmux.toml");
        let mut cmd = Command::new(bin.as_ref());
        cmd.arg("serve").arg("--config").arg(&config_path);
        Regmux::spawn(cmd, &config_path)
    }

    /// Starts a prepared command (any arguments or environment the test wants; `config_path` names the
    /// config it serves, its folder gets the logs) and waits up to 10 s for the `listening` line.
    pub fn spawn(mut cmd: Command, config_path: &Path) -> Regmux {
        let dir = config_path.parent().expect("config file has a folder").to_path_buf();
        let log_path = dir.join("regmux.log");
        let stdout = fs::File::create(dir.join("regmux.stdout")).expect("create regmux.stdout");
        cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(stdout).stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("regmux", &mut cmd, Some(log_path.clone()));
        let stderr = child.take_stderr().expect("regmux stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let reader = {
            let logs = Arc::clone(&logs);
            let mut file = fs::File::create(&log_path).expect("create regmux.log");
            thread::Builder::new()
                .name("regmux-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        let line = strip_ansi(&line);
                        let _ = writeln!(file, "{line}");
                        let mut buf = logs.lock().unwrap_or_else(|p| p.into_inner());
                        buf.push_str(&line);
                        buf.push('\n');
                    }
                })
                .expect("spawn regmux stderr reader")
        };
        let mut rx =
            Regmux { child, addr: String::new(), logs, config_path: config_path.to_path_buf(), reader: Some(reader) };
        let addr = wait_for("regmux to log `listening … addr=`", Duration::from_secs(10), || {
            if let Some(status) = rx.child.try_wait() {
                rx.join_reader();
                panic!("regmux exited with {status} before listening; log:\n{}", rx.logs());
            }
            rx.logs().lines().filter(|l| !l.contains("admin")).find_map(listening_addr)
        });
        rx.addr = addr;
        rx
    }

    /// The admin listener's address, from a `listening` line that mentions `admin` (waits up to 10 s).
    pub fn admin_addr(&self) -> String {
        wait_for("regmux to log the admin `listening … addr=` line", Duration::from_secs(10), || {
            self.logs().lines().filter(|l| l.contains("admin")).find_map(listening_addr)
        })
    }

    /// `127.0.0.1:PORT` as logged.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("port in logged addr")
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Everything regmux wrote to stderr so far (ANSI codes stripped).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits up to `timeout` for a log line containing `needle`, and returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("regmux log line containing {needle:?}"), timeout, || {
            self.logs().lines().find(|l| l.contains(needle)).map(String::from)
        })
    }

    /// Sends a signal by name (`"HUP"`, `"TERM"`, `"INT"`) with `kill -s`.
    pub fn send_signal(&self, sig: &str) {
        assert!(signal(self.pid(), sig), "kill -s {sig} {} failed", self.pid());
    }

    /// Waits up to `timeout` for regmux to exit; its status, or None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self.child.wait_exit(timeout);
        if status.is_some() {
            self.join_reader();
        }
        status
    }

    /// Kills and reaps regmux (also done on drop).
    pub fn stop(&mut self) {
        self.child.stop();
        self.join_reader();
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join(); // ends at EOF on stderr, i.e. when the process is gone
        }
    }
}

impl Drop for Regmux {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `addr=127.0.0.1:PORT` (possibly quoted) from a line that mentions `listening`; with
/// `--log-format json`, the `addr` field of an event whose message mentions `listening`.
fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    if line.trim_start().starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        let message = event["message"].as_str().or(event["fields"]["message"].as_str())?;
        let addr = event["addr"].as_str().or(event["fields"]["addr"].as_str())?;
        if !message.contains("listening") {
            return None;
        }
        return addr.parse::<std::net::SocketAddr>().ok().map(|a| a.to_string());
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let value = rest.split_whitespace().next()?.trim_matches(|c| c == '"' || c == ',');
    value.parse::<std::net::SocketAddr>().ok().map(|a| a.to_string())
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The `[server]`, `[admin]` and `[ledger]` sections every test configuration starts with: both
/// listeners on ephemeral loopback ports (the runner reads the addresses from the log), the ledger at
/// `ledger`.
pub fn config_header(ledger: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\npath = \"{}\"\n",
        ledger.display()
    )
}
