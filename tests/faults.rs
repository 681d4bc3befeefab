//! Faults regmux must live through without breaking a pull that could have worked: hung, refusing and
//! cutting backends, redirects to object storage, TLS on both sides, client authentication, reload and
//! stop during a download, and request limits (`DESIGN.md`, "Request path").
//!
//! Real components wherever they can show the fault (docker-registry, curl, skopeo); small in-process
//! fake backends ([`FakeServer`]: `std::net::TcpListener` + threads, canned HTTP/1.1) for faults no
//! real registry shows on demand. Every test starts its own regmux and registries on 127.0.0.1 with
//! ephemeral ports and measures how long each fault cost the client; the measurements are printed with
//! a `[faults]` prefix (`cargo test --test faults -- --nocapture` shows them).

mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_regmux");

/// A request that must not pay a backend's timeout (a down backend skipped, a refused connection)
/// finishes within this. Loopback answers take a few milliseconds; the margin absorbs a loaded machine
/// running the other tests of this file in parallel.
const FAST: Duration = Duration::from_millis(500);

/// The backend timeouts the failover tests configure (`connect_timeout = "1s"`, `timeout = "2s"`).
const TIMEOUT: Duration = Duration::from_secs(2);

/// Size of the blob that reload and stop tests download slowly.
const BIG: u64 = 64 << 20;

/// curl's `--limit-rate` for those downloads: 64 MiB take ~8 s, long enough to act in the middle.
const SLOW_RATE: &str = "8M";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `Accept` as real clients send it: one line per media type.
fn accept_all() -> Vec<(&'static str, &'static str)> {
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].into_iter().map(|t| ("Accept", t)).collect()
}

/// A TOML (and YAML) basic string: JSON string syntax is valid in both.
fn q(s: impl std::fmt::Display) -> String {
    serde_json::to_string(&s.to_string()).expect("quote string")
}

/// A regmux configuration: both listeners on ephemeral ports, the ledger in the lab, `server_extra`
/// lines appended to `[server]`, then `rest` (backends and routes).
fn regmux_config(lab: &Lab, server_extra: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [ledger]\npath = {}\n\n{rest}",
        q(lab.path().join("ledger.db").display())
    )
}

/// The first regmux log line containing every needle (waits up to `timeout`).
fn wait_log_all(regmux: &Regmux, needles: &[&str], timeout: Duration) -> String {
    wait_for(&format!("regmux log line containing all of {needles:?}"), timeout, || {
        regmux.logs().lines().find(|l| needles.iter().all(|n| l.contains(n))).map(String::from)
    })
}

/// GET with the clients' `Accept` lines, timed.
fn timed_get(url: &str) -> (Response, Duration) {
    let started = Instant::now();
    let r = http("GET", url, &accept_all());
    (r, started.elapsed())
}

fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file, by `sha256sum` (the test binary is unoptimised; 64 MiB would be slow).
fn sha256_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), Duration::from_secs(60));
    assert!(out.status.success(), "sha256sum {}: {out:?}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", text.split_whitespace().next().expect("sha256sum output"))
}

/// Writes a [`BIG`] random file to `path` and returns its digest.
fn write_big_file(path: &Path, seed: u64) -> String {
    let mut f = io::BufWriter::new(fs::File::create(path).expect("create big file"));
    for block in 0..(BIG >> 20) {
        f.write_all(&random_bytes(seed.wrapping_mul(1000).wrapping_add(block), 1 << 20)).expect("write big file");
    }
    f.flush().expect("flush big file");
    drop(f);
    sha256_file(path)
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client that tells a complete body from a cut one and times both ends

/// What a raw request saw.
#[derive(Debug)]
struct Raw {
    /// 0 when the connection ended before a status line.
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body framing (Content-Length or chunked) was satisfied.
    complete: bool,
    /// Our deadline passed while the server was still silent.
    timed_out: bool,
    /// From connect to the end of the response headers.
    headers_after: Option<Duration>,
    /// From connect to the end (complete, closed by the server, or deadline).
    elapsed: Duration,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body; the flag says whether the terminating chunk arrived.
fn decode_chunked(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(data, b"\r\n") else { return (out, false) };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
            return (out, false);
        };
        data = &data[eol + 2..];
        if size == 0 {
            return (out, true);
        }
        if data.len() < size + 2 {
            out.extend_from_slice(&data[..size.min(data.len())]);
            return (out, false);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Sends one request (`Connection: close`) to a plain `http://` URL and reads until the response is
/// complete, the server ends the connection, or `deadline` passes. Never panics on a cut connection.
fn raw_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&mut dyn Read, u64)>,
    deadline: Duration,
) -> Raw {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("only http:// URLs: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let started = Instant::now();
    let mut stream = TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    stream.set_read_timeout(Some(Duration::from_millis(50))).expect("set read timeout");
    stream.set_write_timeout(Some(Duration::from_secs(30))).expect("set write timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((_, len)) = &body {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("Connection: close\r\nUser-Agent: regmux-faults-test\r\n\r\n");
    // A server may answer and close before reading everything (431): write errors are not fatal.
    if stream.write_all(head.as_bytes()).is_ok() {
        if let Some((reader, _)) = body {
            let _ = io::copy(reader, &mut stream);
        }
    }

    let mut raw = Raw {
        status: 0,
        headers: Vec::new(),
        body: Vec::new(),
        complete: false,
        timed_out: false,
        headers_after: None,
        elapsed: Duration::ZERO,
    };
    let mut data = Vec::new();
    let mut body_start = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if body_start.is_none() {
            if let Some(end) = find(&data, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let mut lines = head.split("\r\n");
                raw.status =
                    lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
                raw.headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                raw.headers_after = Some(started.elapsed());
                body_start = Some(end + 4);
                if method == "HEAD" || raw.status == 204 || raw.status == 304 {
                    raw.complete = true;
                    break;
                }
            }
        }
        if let (Some(start), Some(len)) = (body_start, raw.content_length()) {
            if (data.len() - start) as u64 >= len {
                raw.complete = true;
                break;
            }
        }
        if started.elapsed() >= deadline {
            raw.timed_out = true;
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break, // reset: the server aborted the connection
        }
    }
    raw.elapsed = started.elapsed();
    if let Some(start) = body_start {
        let body = &data[start.min(data.len())..];
        let chunked = raw.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            let (decoded, done) = decode_chunked(body);
            raw.body = decoded;
            raw.complete = done;
        } else {
            raw.body = body.to_vec();
            if raw.content_length().is_none() && !raw.complete {
                raw.complete = !raw.timed_out; // read to close
            }
        }
    }
    raw
}

/// Pushes a blob into a plain registry (`POST` an upload, `PUT` the bytes with their digest).
fn upload_blob(registry_url: &str, repo: &str, body: &mut dyn Read, len: u64, digest: &str) {
    let start = raw_request(
        "POST",
        &format!("{registry_url}/v2/{repo}/blobs/uploads/"),
        &[("Content-Length", "0")],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(start.status, 202, "start upload to {registry_url}/{repo}: {start:?}");
    let location = start.header("location").expect("upload Location").to_string();
    let location = if location.starts_with("http") { location } else { format!("{registry_url}{location}") };
    let sep = if location.contains('?') { '&' } else { '?' };
    let done = raw_request(
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        Some((body, len)),
        Duration::from_secs(120),
    );
    assert_eq!(done.status, 201, "finish upload of {digest}: {} {}", done.status, String::from_utf8_lossy(&done.body));
}

// ---------------------------------------------------------------------------------------------
// In-process fake backends

/// One request a fake backend received.
#[derive(Debug, Clone)]
struct FakeReq {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl FakeReq {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the connection does after a handler answered.
enum Flow {
    KeepAlive,
    Close,
}

/// One accepted connection of a fake backend.
struct FakeConn {
    stream: TcpStream,
    buf: Vec<u8>,
    stop: Arc<AtomicBool>,
}

impl FakeConn {
    /// The next request's head (requests to a registry carry no body), or `None` at EOF or stop.
    fn read_request(&mut self) -> Option<FakeReq> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let mut first = lines.next()?.split_whitespace();
                let method = first.next()?.to_string();
                let path = first.next()?.to_string();
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                return Some(FakeReq { method, path, headers });
            }
            if self.stopping() {
                return None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).and_then(|()| self.stream.flush()).is_ok()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Holds the connection while `cond` is true and the server runs.
    fn wait_while(&self, cond: impl Fn() -> bool) {
        while cond() && !self.stopping() {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sleeps `d`; false if the server stopped meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stopping() {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Flow {
        let head = response_head(status, headers, Some(body.len()));
        if self.send(head.as_bytes()) && self.send(body) {
            Flow::KeepAlive
        } else {
            Flow::Close
        }
    }
}

fn response_head(status: u16, headers: &[(&str, &str)], content_length: Option<usize>) -> String {
    let reason = match status {
        200 => "OK",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Whatever",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = content_length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("\r\n");
    head
}

type Handler = dyn Fn(&FakeReq, &mut FakeConn) -> Flow + Send + Sync;

/// A fake backend: accepts on 127.0.0.1, reads each request head, records it, and lets a handler
/// write whatever it likes. Stopped (every thread joined) on drop.
struct FakeServer {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<FakeReq>>>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakeServer {
    fn start(name: &str, handler: impl Fn(&FakeReq, &mut FakeConn) -> Flow + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake backend");
        FakeServer::serve(name, listener, handler)
    }

    fn serve(
        name: &str,
        listener: TcpListener,
        handler: impl Fn(&FakeReq, &mut FakeConn) -> Flow + Send + Sync + 'static,
    ) -> FakeServer {
        let port = listener.local_addr().expect("fake backend addr").port();
        listener.set_nonblocking(true).expect("nonblocking listener");
        let handler: Arc<Handler> = Arc::new(handler);
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, requests, conns) = (stop.clone(), requests.clone(), conns.clone());
            thread::Builder::new()
                .name(format!("fake-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let stream = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(_) => {
                                thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        };
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                        let _ = stream.set_nodelay(true);
                        let mut conn = FakeConn { stream, buf: Vec::new(), stop: stop.clone() };
                        let (handler, requests) = (handler.clone(), requests.clone());
                        let worker = thread::spawn(move || {
                            while let Some(req) = conn.read_request() {
                                requests.lock().unwrap_or_else(|p| p.into_inner()).push(req.clone());
                                if let Flow::Close = handler(&req, &mut conn) {
                                    break;
                                }
                            }
                            let _ = conn.stream.shutdown(Shutdown::Both);
                        });
                        conns.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
                    }
                })
                .expect("spawn fake backend")
        };
        FakeServer { port, stop, requests, accept: Some(accept), conns }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<FakeReq> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let workers = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// A registry that has nothing: `/v2/` answers 200, everything else 404.
fn empty_registry(req: &FakeReq, conn: &mut FakeConn) -> Flow {
    let json = [("Content-Type", "application/json")];
    if req.path == "/v2/" {
        reply(req, conn, 200, &json, b"{}")
    } else {
        reply(req, conn, 404, &json, br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}"#)
    }
}

/// Answer as HTTP requires: the head, and the body only if the request was not a HEAD (a body after
/// a HEAD answer would be read as the next response on a kept-alive connection).
fn reply(req: &FakeReq, conn: &mut FakeConn, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Flow {
    if req.method != "HEAD" {
        return conn.respond(status, headers, body);
    }
    if conn.send(response_head(status, headers, Some(body.len())).as_bytes()) {
        Flow::KeepAlive
    } else {
        Flow::Close
    }
}

// ---------------------------------------------------------------------------------------------
// TLS material and an HTTPS docker-registry

struct Pki {
    /// The CA certificate (PEM).
    ca: PathBuf,
    /// A folder holding only `ca.crt`, for skopeo's `--src-cert-dir`.
    cert_dir: PathBuf,
    /// Server certificate for 127.0.0.1 and localhost, signed by the CA, and its key (PEM).
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "regmux faults test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("self-sign CA");

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &*ca).expect("sign server certificate");

    fs::create_dir_all(dir.join("certs.d")).expect("create cert dir");
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert_dir: dir.join("certs.d"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    fs::write(&pki.ca, ca.pem()).expect("write CA");
    fs::write(pki.cert_dir.join("ca.crt"), ca.pem()).expect("write cert dir CA");
    fs::write(&pki.cert, cert.pem()).expect("write server cert");
    fs::write(&pki.key, key.serialize_pem()).expect("write server key");
    pki
}

/// `curl --cacert CA ARGS… URL` with `-w FORMAT` on stdout.
fn curl(args: &[&str], url: &str) -> Output {
    run(Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).arg(url), Duration::from_secs(70))
}

/// docker-registry serving HTTPS with the PKI's server certificate (the harness's [`Registry`] is
/// plain HTTP only). Killed on drop.
struct TlsRegistry {
    port: u16,
    _child: ChildGuard,
}

impl TlsRegistry {
    fn start(dir: &Path, pki: &Pki) -> TlsRegistry {
        fs::create_dir_all(dir.join("storage")).expect("create TLS registry storage");
        let log = dir.join("registry.log");
        for attempt in 1..=3 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog: {{level: info, formatter: text}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  \
                 maintenance: {{uploadpurging: {{enabled: false}}}}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: regmux-test-secret\n  tls: {{certificate: {}, key: {}}}\n",
                q(dir.join("storage").display()),
                q(pki.cert.display()),
                q(pki.key.display()),
            );
            let config_path = dir.join("config.yml");
            fs::write(&config_path, config).expect("write TLS registry config");
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(fs::File::create(dir.join("access.log")).expect("create access.log"))
                .stderr(fs::File::create(&log).expect("create registry.log"));
            let mut child = ChildGuard::spawn("docker-registry (TLS)", &mut cmd, Some(log.clone()));
            let url = format!("https://127.0.0.1:{port}/v2/");
            let ca = pki.ca.display().to_string();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = child.try_wait() {
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    if attempt < 3 && text.contains("address already in use") {
                        break;
                    }
                    panic!("TLS docker-registry exited with {status}:\n{text}");
                }
                // Listening first (cheap), then a verified HTTPS answer.
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let out = curl(&["--cacert", &ca, "-o", "/dev/null", "-w", "%{http_code}"], &url);
                    if String::from_utf8_lossy(&out.stdout) == "200" {
                        return TlsRegistry { port, _child: child };
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "TLS docker-registry not ready on {url}:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(25));
            }
        }
        unreachable!("the loop returns or panics")
    }
}

// ---------------------------------------------------------------------------------------------
// Clients: skopeo and a slow curl download

/// `skopeo copy [extra…] docker://SRC oci:<lab>/<out>:pulled`.
fn skopeo_copy(lab: &Lab, src: &str, extra: &[&str], out: &str) -> (Output, PathBuf) {
    let policy = lab.write("policy.json", r#"{"default":[{"type":"insecureAcceptAnything"}]}"#);
    let out_dir = lab.path().join(out);
    let output = run(
        Command::new("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--retry-times", "0"])
            .args(extra)
            .arg(format!("docker://{src}"))
            .arg(format!("oci:{}:pulled", out_dir.display())),
        Duration::from_secs(120),
    );
    (output, out_dir)
}

/// Asserts that an OCI layout skopeo wrote holds `image` (pushed as OCI) whole.
fn assert_pulled(out_dir: &Path, image_name: &str) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join("index.json")).expect("read pulled index.json")).expect("json");
    assert_eq!(index["manifests"][0]["digest"], manifest_digest(image_name, Format::Oci), "{index}");
    for d in blob_digests(image_name) {
        let p = out_dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
        assert_eq!(sha256_file(&p), d, "pulled blob {}", p.display());
    }
}

/// `curl --limit-rate RATE -o FILE URL` running in the background.
struct Download {
    child: ChildGuard,
    out: PathBuf,
    meta: PathBuf,
    started: Instant,
}

impl Download {
    fn start(url: &str, dir: &Path, rate: &str) -> Download {
        fs::create_dir_all(dir).expect("create download dir");
        let (out, meta) = (dir.join("download.bin"), dir.join("download.meta"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--limit-rate", rate, "-o"])
            .arg(&out)
            .args(["-w", "%{http_code} %{size_download} %{http_version}"])
            .arg(url)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&meta).expect("create download.meta"))
            .stderr(fs::File::create(dir.join("download.err")).expect("create download.err"));
        let child = ChildGuard::spawn("curl download", &mut cmd, Some(dir.join("download.err")));
        Download { child, out, meta, started: Instant::now() }
    }

    fn received(&self) -> u64 {
        fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// Waits for curl to exit: its status, its `-w` line, and the time since the start.
    fn finish(&mut self, timeout: Duration) -> (ExitStatus, String, Duration) {
        let status =
            self.child.wait_exit(timeout).unwrap_or_else(|| panic!("curl download still running after {timeout:?}"));
        (status, fs::read_to_string(&self.meta).unwrap_or_default(), self.started.elapsed())
    }
}

// ---------------------------------------------------------------------------------------------
// Timeouts and failover

/// A backend that accepts and never answers costs a request its `timeout` (2 s), after which the next
/// backend (a real registry) answers; three such failures mark it down and later requests skip it at
/// once; the background probe brings it back as soon as it answers `GET /v2/` again.
#[test]
fn hung_backend_costs_its_timeout_then_is_skipped_until_a_probe_brings_it_back() {
    let lab = Lab::new();
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", real.addr()), Format::Oci);
    let hung = Arc::new(AtomicBool::new(true));
    let fake = {
        let hung = hung.clone();
        FakeServer::start("hung", move |req, conn| {
            if hung.load(Ordering::SeqCst) {
                conn.wait_while(|| hung.load(Ordering::SeqCst)); // accepted, never answered
                return Flow::Close;
            }
            empty_registry(req, conn)
        })
    };
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.hung]\nurl = {}\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.real]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"hung\", \"real\"]\ndefault = true\n",
            q(fake.url()),
            q(real.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let manifest_url = format!("{}/v2/library/alpine/manifests/3.19", regmux.url());
    let small = manifest_digest("small", Format::Oci);
    let layer = layer_digests("small")[0].clone();

    // Three requests at once (two manifests by tag, one blob): each pays the hung backend's timeout,
    // no more, and is then answered by the registry.
    let asks = [
        (manifest_url.clone(), small.clone()),
        (manifest_url.clone(), small.clone()),
        (format!("{}/v2/library/alpine/blobs/{layer}", regmux.url()), layer.clone()),
    ];
    let clients: Vec<_> = asks.into_iter().map(|(url, want)| thread::spawn(move || (timed_get(&url), want))).collect();
    for client in clients {
        let ((r, took), want) = client.join().expect("client thread");
        eprintln!("[faults] hung backend: {} answered after {took:?} (timeout {TIMEOUT:?})", r.status);
        assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
        assert!(r.complete);
        assert_eq!(r.body_digest(), want);
        assert!(
            took >= TIMEOUT - Duration::from_millis(100) && took <= TIMEOUT + Duration::from_secs(1),
            "a hung backend must cost its timeout ({TIMEOUT:?}) and no more than a second beyond: took {took:?}"
        );
    }
    wait_log_all(&regmux, &["marked down after repeated failures", "backend=hung"], Duration::from_secs(5));

    // Marked down: skipped, no timeout paid.
    let (r, took) = timed_get(&manifest_url);
    eprintln!("[faults] hung backend marked down: answered in {took:?}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body_digest(), small);
    assert!(took < FAST, "a backend marked down must be skipped at once, took {took:?}");
    wait_log_all(&regmux, &["hung: down, skipped", "served_by=real"], Duration::from_secs(5));

    // It answers again: the probe (every 2 s) marks it up and requests go to it first again.
    let seen_before = fake.requests().len();
    hung.store(false, Ordering::SeqCst);
    let revived = Instant::now();
    wait_log_all(&regmux, &["answers again: marked up", "backend=hung"], Duration::from_secs(10));
    eprintln!("[faults] hung backend marked up {:?} after it answered again", revived.elapsed());
    let (r, took) = timed_get(&manifest_url);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body_digest(), small);
    assert!(took < FAST, "took {took:?}");
    let asked: Vec<FakeReq> = fake.requests()[seen_before..].to_vec();
    assert!(
        asked.iter().any(|q| q.method == "GET" && q.path == "/v2/library/alpine/manifests/3.19"),
        "the revived backend is asked first again: {asked:?}"
    );
}

/// A listening port whose accept queue is full: the kernel drops new SYNs, so a connect hangs (what a
/// firewall that drops packets looks like, on loopback).
struct Blackhole {
    port: u16,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    fn new() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind blackhole");
        let addr = listener.local_addr().expect("blackhole addr");
        let mut queued = Vec::new();
        // Never accepted: once the queue (the listen backlog) is full, a connect times out.
        while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            queued.push(s);
            assert!(queued.len() < 10_000, "the accept queue never filled");
        }
        Blackhole { port: addr.port(), _listener: listener, _queued: queued }
    }
}

/// A backend whose connect hangs costs a request its `connect_timeout` (1 s), not its `timeout` (2 s),
/// after which the next backend answers.
#[test]
fn unreachable_backend_costs_its_connect_timeout() {
    let lab = Lab::new();
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", real.addr()), Format::Oci);
    let hole = Blackhole::new();
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.blackhole]\nurl = \"http://127.0.0.1:{}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.real]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"blackhole\", \"real\"]\ndefault = true\n",
            hole.port,
            q(real.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let (r, took) = timed_get(&format!("{}/v2/library/alpine/manifests/3.19", regmux.url()));
    eprintln!("[faults] connect to the backend hangs: {} answered after {took:?} (connect_timeout 1s)", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.body_digest(), manifest_digest("small", Format::Oci));
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1600),
        "a hanging connect must cost connect_timeout (1 s), took {took:?}"
    );
}

/// A backend whose port refuses connections costs milliseconds: the next backend answers at once. It
/// is marked down after three failures, and comes back when something answers on its port.
#[test]
fn refusing_backend_fails_over_in_milliseconds_and_comes_back() {
    let lab = Lab::new();
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", real.addr()), Format::Oci);
    let refused_port = free_port();
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.refused]\nurl = \"http://127.0.0.1:{refused_port}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.real]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"refused\", \"real\"]\ndefault = true\n",
            q(real.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let manifest_url = format!("{}/v2/library/alpine/manifests/3.19", regmux.url());
    let small = manifest_digest("small", Format::Oci);

    for i in 0..3 {
        let (r, took) = timed_get(&manifest_url);
        eprintln!("[faults] refusing backend, request {i}: {} in {took:?}", r.status);
        assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
        assert_eq!(r.body_digest(), small);
        assert!(took < FAST, "a refused connection must fail over in milliseconds, took {took:?}");
    }
    // Marked down by those three failures, or (on a machine so loaded that the first probe, 2 s after
    // the start, came before them) by the probe; the hung-backend test checks the three-failure rule.
    wait_for("the refusing backend to be marked down", Duration::from_secs(5), || {
        regmux.logs().lines().any(|l| l.contains("backend=refused") && l.contains("marked down")).then_some(())
    });
    let (r, took) = timed_get(&manifest_url);
    eprintln!("[faults] refusing backend marked down: answered in {took:?}");
    assert_eq!(r.status, 200);
    assert!(took < FAST, "took {took:?}");
    wait_log_all(&regmux, &["refused: down, skipped"], Duration::from_secs(5));

    // Something answers on the port now: the probe brings the backend back.
    let listener = TcpListener::bind(("127.0.0.1", refused_port))
        .unwrap_or_else(|e| panic!("port {refused_port} was taken meanwhile by another process: {e}"));
    let fake = FakeServer::serve("refused-now-answering", listener, empty_registry);
    let revived = Instant::now();
    wait_log_all(&regmux, &["answers again: marked up", "backend=refused"], Duration::from_secs(10));
    eprintln!("[faults] refusing backend marked up {:?} after it listened again", revived.elapsed());
    let (r, _) = timed_get(&manifest_url);
    assert_eq!(r.status, 200);
    assert_eq!(r.body_digest(), small);
    assert!(
        fake.requests().iter().any(|q| q.path == "/v2/library/alpine/manifests/3.19"),
        "the revived backend is asked again: {:?}",
        fake.requests()
    );
}

/// Once a byte has gone to the client there is no failover: a body the backend cuts, stalls or
/// trickles too slowly must end the client's connection short of `Content-Length` — never a short
/// response that looks complete — even though the next backend has the blob. A body that is slow but
/// keeps moving (gaps shorter than the timeout) is not cut.
#[test]
fn cut_stalled_and_trickling_bodies_abort_the_client_never_a_short_success() {
    let lab = Lab::new();
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    let blob = Arc::new(random_bytes(42, 256 << 10));
    let digest = sha256_bytes(&blob);
    upload_blob(&real.url(), "lab/cut", &mut &blob[..], blob.len() as u64, &digest);
    let tiny: &'static [u8] = b"slow";
    let tiny_digest = sha256_bytes(tiny);

    // Sends the headers with the full Content-Length and half the bytes, then closes the connection.
    let cut = {
        let (blob, path) = (blob.clone(), format!("/v2/lab/cut/blobs/{digest}"));
        FakeServer::start("cut", move |req, conn| {
            if req.path != path {
                return empty_registry(req, conn);
            }
            let head = response_head(
                200,
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Docker-Content-Digest", path.rsplit('/').next().unwrap_or("")),
                ],
                Some(blob.len()),
            );
            if conn.send(head.as_bytes()) {
                let _ = conn.send(&blob[..blob.len() / 2]);
            }
            Flow::Close
        })
    };
    // Sends the headers and half the bytes, then goes silent without closing.
    let stall = {
        let (blob, path) = (blob.clone(), format!("/v2/lab/cut/blobs/{digest}"));
        FakeServer::start("stall", move |req, conn| {
            if req.path != path {
                return empty_registry(req, conn);
            }
            let head = response_head(200, &[("Content-Type", "application/octet-stream")], Some(blob.len()));
            if conn.send(head.as_bytes()) && conn.send(&blob[..blob.len() / 2]) {
                conn.wait_while(|| true);
            }
            Flow::Close
        })
    };
    // Sends the headers at once, then one byte per second.
    let trickle = {
        let path = format!("/v2/lab/slow/blobs/{tiny_digest}");
        FakeServer::start("trickle", move |req, conn| {
            if req.path != path {
                return empty_registry(req, conn);
            }
            let head = response_head(200, &[("Content-Type", "application/octet-stream")], Some(tiny.len()));
            if !conn.send(head.as_bytes()) {
                return Flow::Close;
            }
            for b in tiny {
                if !conn.pause(Duration::from_secs(1)) || !conn.send(&[*b]) {
                    return Flow::Close;
                }
            }
            Flow::KeepAlive
        })
    };
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.cut]\nurl = {cut}\ntimeout = \"2s\"\n\n\
             [backends.cut-unverified]\nurl = {cut}\ntimeout = \"2s\"\nverify_digests = false\n\n\
             [backends.stall]\nurl = {stall}\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.trickle-500ms]\nurl = {trickle}\ntimeout = \"500ms\"\n\n\
             [backends.trickle-2s]\nurl = {trickle}\ntimeout = \"2s\"\n\n\
             [backends.real]\nurl = {real}\n\n\
             [[routes]]\nname = \"cut\"\nregistries = [\"cut.test\"]\nbackends = [\"cut\", \"real\"]\n\n\
             [[routes]]\nname = \"cut-unverified\"\nregistries = [\"raw.test\"]\nbackends = [\"cut-unverified\", \"real\"]\n\n\
             [[routes]]\nname = \"stall\"\nregistries = [\"stall.test\"]\nbackends = [\"stall\", \"real\"]\n\n\
             [[routes]]\nname = \"trickle-cut\"\nregistries = [\"trickle.test\"]\nbackends = [\"trickle-500ms\", \"real\"]\n\n\
             [[routes]]\nname = \"trickle-ok\"\nregistries = [\"slow.test\"]\nbackends = [\"trickle-2s\", \"real\"]\n",
            cut = q(cut.url()),
            stall = q(stall.url()),
            trickle = q(trickle.url()),
            real = q(real.url()),
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);

    // All five at once: (label, path, the backend's whole body).
    let cases = [
        ("cut, verified", format!("/v2/cut.test/lab/cut/blobs/{digest}"), blob.to_vec()),
        ("cut, unverified", format!("/v2/raw.test/lab/cut/blobs/{digest}"), blob.to_vec()),
        ("stalled", format!("/v2/stall.test/lab/cut/blobs/{digest}"), blob.to_vec()),
        ("trickle vs 500ms", format!("/v2/trickle.test/lab/slow/blobs/{tiny_digest}"), tiny.to_vec()),
        ("trickle vs 2s", format!("/v2/slow.test/lab/slow/blobs/{tiny_digest}"), tiny.to_vec()),
    ];
    let clients: Vec<_> = cases
        .into_iter()
        .map(|(label, path, whole)| {
            let url = format!("{}{path}", regmux.url());
            thread::spawn(move || (label, whole, raw_request("GET", &url, &[], None, Duration::from_secs(15))))
        })
        .collect();
    for client in clients {
        let (label, whole, r) = client.join().expect("client thread");
        let len = whole.len();
        eprintln!(
            "[faults] {label}: status {} headers after {:?}, {} of {len} bytes, complete {}, ended after {:?}",
            r.status,
            r.headers_after,
            r.body.len(),
            r.complete,
            r.elapsed
        );
        assert_eq!(r.status, 200, "{label}: the backend's 200 was already on its way\n{r:?}");
        assert!(!r.timed_out, "{label}: regmux never ended the response ({r:?})\n{}", regmux.logs());
        match label {
            "trickle vs 2s" => {
                assert!(r.complete, "{label}: a slow body that keeps moving must not be cut: {r:?}");
                assert_eq!(r.body, whole);
                assert!(r.elapsed >= Duration::from_secs(3), "{label}: {r:?}");
            }
            _ => {
                assert!(!r.complete, "{label}: a cut body must not look complete: {r:?}");
                assert!(r.body.len() < len, "{label}: {} bytes of {len}", r.body.len());
                assert_eq!(r.content_length(), Some(len as u64), "{label}: the backend's length is announced");
                assert_eq!(r.body[..], whole[..r.body.len()], "{label}: the bytes sent are the backend's");
                let (lo, hi) = match label {
                    "stalled" => (TIMEOUT - Duration::from_millis(100), TIMEOUT + Duration::from_secs(1)),
                    "trickle vs 500ms" => (Duration::from_millis(400), Duration::from_millis(1500)),
                    _ => (Duration::ZERO, FAST),
                };
                assert!(
                    r.elapsed >= lo && r.elapsed <= hi,
                    "{label}: ended after {:?}, expected {lo:?}..{hi:?}",
                    r.elapsed
                );
            }
        }
    }
    // The real registry was never asked for the blob: no failover once bytes were sent.
    let blob_path = format!("/v2/lab/cut/blobs/{digest}");
    assert!(
        !real.requests().iter().any(|r| r.path == blob_path),
        "no failover after the first byte: {:?}",
        real.requests()
    );
}

// ---------------------------------------------------------------------------------------------
// Redirects

/// A backend that needs Basic credentials answers a blob with 307 to object storage that refuses any
/// request carrying `Authorization`: regmux follows the redirect without the credentials and the
/// client gets the right bytes. With `redirects = "pass"`, the client gets the 307 itself.
#[test]
fn redirects_are_followed_without_credentials_or_passed_to_the_client() {
    let lab = Lab::new();
    let blob = Arc::new(random_bytes(7, 300 << 10));
    let digest = sha256_bytes(&blob);
    let object_path = format!("/objects/{}", digest.trim_start_matches("sha256:"));

    let storage = {
        let (blob, object_path) = (blob.clone(), object_path.clone());
        FakeServer::start("object-storage", move |req, conn| {
            if req.header("authorization").is_some() {
                return conn.respond(403, &[], b"credentials must never reach object storage");
            }
            if req.path.split('?').next() == Some(object_path.as_str()) {
                return conn.respond(200, &[("Content-Type", "application/octet-stream")], &blob);
            }
            conn.respond(404, &[], b"")
        })
    };
    let location = format!("{}{object_path}?signature=abc", storage.url());
    let expected_auth = basic_auth("robot", "s3cret");
    let backend = |name: &str| {
        let (location, expected_auth, blob_path) =
            (location.clone(), expected_auth.clone(), format!("/v2/lab/redir/blobs/{digest}"));
        FakeServer::start(name, move |req, conn| {
            if req.header("authorization") != Some(expected_auth.as_str()) {
                let challenge = [("WWW-Authenticate", "Basic realm=\"x\""), ("Content-Type", "application/json")];
                return conn.respond(401, &challenge, br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
            }
            if req.path == blob_path {
                return conn.respond(307, &[("Location", location.as_str())], b"");
            }
            empty_registry(req, conn)
        })
    };
    let follow = backend("redirecting-backend");
    let pass = backend("redirecting-backend-pass");
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.follow]\nurl = {}\nusername = \"robot\"\npassword = \"s3cret\"\n\n\
             [backends.pass]\nurl = {}\nusername = \"robot\"\npassword = \"s3cret\"\nredirects = \"pass\"\n\n\
             [[routes]]\nname = \"follow\"\nregistries = [\"follow.test\"]\nbackends = [\"follow\"]\n\n\
             [[routes]]\nname = \"pass\"\nregistries = [\"pass.test\"]\nbackends = [\"pass\"]\n",
            q(follow.url()),
            q(pass.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);

    // Followed: the right bytes, and object storage never saw a credential.
    let started = Instant::now();
    let r = http("GET", &format!("{}/v2/follow.test/lab/redir/blobs/{digest}", regmux.url()), &[]);
    let took = started.elapsed();
    eprintln!("[faults] redirect followed: {} in {took:?}", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert!(took < FAST, "following a redirect on loopback costs milliseconds, took {took:?}");
    assert!(r.complete);
    assert_eq!(r.body_digest(), digest);
    assert!(r.header("location").is_none());
    let asked = follow.requests();
    assert!(
        asked.iter().any(|q| q.path.contains("/blobs/") && q.header("authorization") == Some(expected_auth.as_str())),
        "regmux authenticated to the backend with its own credentials: {asked:?}"
    );
    let fetched = storage.requests();
    assert!(!fetched.is_empty(), "regmux followed the redirect");
    assert!(
        fetched.iter().all(|q| q.header("authorization").is_none()),
        "credentials leaked to object storage: {fetched:?}"
    );

    // Passed: the client gets the 307 and Location, regmux does not fetch the object.
    let before = storage.requests().len();
    let r = http("GET", &format!("{}/v2/pass.test/lab/redir/blobs/{digest}", regmux.url()), &[]);
    assert_eq!(r.status, 307, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.header("location"), Some(location.as_str()), "{:?}", r.headers);
    assert_eq!(storage.requests().len(), before, "with redirects = \"pass\" regmux must not fetch the object");
    let direct = http("GET", &location, &[]);
    assert_eq!(direct.status, 200);
    assert_eq!(direct.body_digest(), digest);
}

// ---------------------------------------------------------------------------------------------
// TLS

/// `[server] tls_cert`/`tls_key`: a blob over HTTP/2 and over HTTP/1.1 (curl), a whole image with
/// skopeo trusting the CA through `--src-cert-dir`; a client that does not trust the CA is refused.
#[test]
fn tls_serving_http2_http11_and_skopeo() {
    let lab = Lab::new();
    let pki = make_pki(&lab.dir("pki"));
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", real.addr()), Format::Oci);
    let config = regmux_config(
        &lab,
        &format!("tls_cert = {}\ntls_key = {}\n", q(pki.cert.display()), q(pki.key.display())),
        &format!(
            "[backends.real]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"real\"]\ndefault = true\n",
            q(real.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    wait_log_all(&regmux, &["listening", "https"], Duration::from_secs(5));
    let base = format!("https://127.0.0.1:{}", regmux.port());
    let ca = pki.ca.display().to_string();
    let layer = layer_digests("small")[1].clone();
    let blob_url = format!("{base}/v2/library/alpine/blobs/{layer}");
    // Clients that connect and never start their TLS handshake, or finish it and then send nothing,
    // must not hold a connection forever.
    let silent = {
        let addr = regmux.addr().to_string();
        thread::spawn(move || slow_client(addr, Slow::Silent))
    };
    let silent_after_handshake: Vec<_> = [&b"http/1.1"[..], &b"h2"[..]]
        .into_iter()
        .map(|alpn| {
            let (addr, ca) = (regmux.addr().to_string(), pki.ca.clone());
            thread::spawn(move || (alpn, silent_after_tls_handshake(&addr, &ca, alpn)))
        })
        .collect();

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = lab.path().join(format!("blob-http{version}"));
        let out_s = out.display().to_string();
        let o = curl(&["--cacert", &ca, flag, "-o", &out_s, "-w", "%{http_code} %{http_version}"], &blob_url);
        assert!(o.status.success(), "curl {flag}: {o:?}\n{}", regmux.logs());
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("200 {version}"), "curl {flag}");
        assert_eq!(sha256_file(&out), layer, "curl {flag}");
    }
    let ping = curl(&["--cacert", &ca, "--http2", "-o", "/dev/null", "-w", "%{http_code}"], &format!("{base}/v2/"));
    assert_eq!(String::from_utf8_lossy(&ping.stdout), "200");

    // The certificate is really checked: a client without the CA refuses the connection.
    let untrusting = curl(&["-o", "/dev/null"], &blob_url);
    assert!(!untrusting.status.success(), "curl without the CA must fail: {untrusting:?}");

    // A whole image copy through TLS, skopeo trusting the CA from a cert dir.
    let cert_dir = pki.cert_dir.display().to_string();
    let src = format!("127.0.0.1:{}/library/alpine:3.19", regmux.port());
    let (o, out) = skopeo_copy(&lab, &src, &["--src-cert-dir", &cert_dir], "pulled-tls");
    assert!(o.status.success(), "skopeo over TLS: {}\n{}", String::from_utf8_lossy(&o.stderr), regmux.logs());
    assert_pulled(&out, "small");

    let (ended, got) = silent.join().expect("silent TLS client thread");
    let mut problems: Vec<String> =
        check_cut_off("client on the TLS port that never starts its handshake", ended, &got)
            .err()
            .into_iter()
            .collect();
    for client in silent_after_handshake {
        let (alpn, ended) = client.join().expect("silent TLS client thread");
        let what = format!("client silent after its TLS handshake (ALPN {})", String::from_utf8_lossy(alpn));
        problems.extend(check_cut_off(&what, ended, &[]).err());
    }
    assert!(problems.is_empty(), "slow clients on the TLS port:\n{}", problems.join("\n"));
}

/// TLS, HTTP/2 and a client that must log in, together: over HTTP/2 (ALPN), curl without credentials
/// gets 401 with the Basic challenge and with them the blob; skopeo with `--src-creds`, trusting the
/// generated CA through `--src-cert-dir`, copies the whole image.
#[test]
fn tls_http2_pull_by_a_client_that_must_log_in() {
    let lab = Lab::new();
    let pki = make_pki(&lab.dir("pki"));
    let real = Registry::start(lab.dir("real"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", real.addr()), Format::Oci);
    let out = run(Command::new("htpasswd").args(["-Bbn", "user", "pass"]), Duration::from_secs(10));
    assert!(out.status.success(), "htpasswd: {out:?}");
    let htpasswd = lab.write("clients.htpasswd", &out.stdout);
    let config = regmux_config(
        &lab,
        &format!(
            "tls_cert = {}\ntls_key = {}\nhtpasswd = {}\n",
            q(pki.cert.display()),
            q(pki.key.display()),
            q(htpasswd.display())
        ),
        &format!(
            "[backends.real]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"real\"]\ndefault = true\n",
            q(real.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    wait_log_all(&regmux, &["listening", "https"], Duration::from_secs(5));
    let base = format!("https://127.0.0.1:{}", regmux.port());
    let ca = pki.ca.display().to_string();
    let layer = layer_digests("small")[1].clone();
    let blob_url = format!("{base}/v2/library/alpine/blobs/{layer}");
    let format = "%{http_code} %{http_version}";

    for url in [format!("{base}/v2/"), blob_url.clone()] {
        let headers = lab.path().join("anon-headers");
        let headers_s = headers.display().to_string();
        let o = curl(&["--cacert", &ca, "--http2", "-o", "/dev/null", "-D", &headers_s, "-w", format], &url);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "401 2", "{url} without credentials, over HTTP/2: {o:?}");
        let head = fs::read_to_string(&headers).expect("read response headers").to_ascii_lowercase();
        assert!(head.contains("www-authenticate: basic realm=\"regmux\""), "{head}");
        let o = curl(&["--cacert", &ca, "--http2", "-u", "user:wrong", "-o", "/dev/null", "-w", format], &url);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "401 2", "{url} with a wrong password: {o:?}");
    }

    let out = lab.path().join("blob-h2-auth");
    let out_s = out.display().to_string();
    let o = curl(&["--cacert", &ca, "--http2", "-u", "user:pass", "-o", &out_s, "-w", format], &blob_url);
    assert!(o.status.success(), "curl: {o:?}\n{}", regmux.logs());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200 2", "blob with credentials, over HTTP/2");
    assert_eq!(sha256_file(&out), layer);

    let cert_dir = pki.cert_dir.display().to_string();
    let src = format!("127.0.0.1:{}/library/alpine:3.19", regmux.port());
    let (o, out) =
        skopeo_copy(&lab, &src, &["--src-cert-dir", &cert_dir, "--src-creds", "user:pass"], "pulled-tls-auth");
    assert!(
        o.status.success(),
        "skopeo over TLS with login: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        regmux.logs()
    );
    assert_pulled(&out, "small");
    let (o, _) = skopeo_copy(&lab, &src, &["--src-cert-dir", &cert_dir], "pulled-tls-anon");
    assert!(!o.status.success(), "skopeo over TLS without credentials must fail");
}

/// HTTPS backends: with `ca_file` naming the CA the backend works; without it the certificate is
/// refused (the next backend answers, or 503 when there is none); `insecure_skip_verify` works too.
#[test]
fn tls_backends_need_their_ca_or_insecure_skip_verify() {
    let lab = Lab::new();
    let pki = make_pki(&lab.dir("pki"));
    let tls_reg = TlsRegistry::start(&lab.dir("tls-registry"), &pki);
    push("small", &format!("127.0.0.1:{}/library/alpine:3.19", tls_reg.port), Format::Oci);
    let plain = Registry::start(lab.dir("plain"), RegistryOpts::plain());
    push("other", &format!("{}/library/alpine:3.19", plain.addr()), Format::Oci);
    let url = q(format!("https://127.0.0.1:{}", tls_reg.port));
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.tls-ca]\nurl = {url}\nca_file = {ca}\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.tls-noca]\nurl = {url}\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.tls-noca-fallback]\nurl = {url}\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\n\
             [backends.tls-insecure]\nurl = {url}\ninsecure_skip_verify = true\n\n\
             [backends.plain]\nurl = {plain}\n\n\
             [[routes]]\nname = \"ca\"\nregistries = [\"ca.test\"]\nbackends = [\"tls-ca\"]\n\n\
             [[routes]]\nname = \"noca\"\nregistries = [\"noca.test\"]\nbackends = [\"tls-noca\"]\n\n\
             [[routes]]\nname = \"fallback\"\nregistries = [\"fallback.test\"]\nbackends = [\"tls-noca-fallback\", \"plain\"]\n\n\
             [[routes]]\nname = \"insecure\"\nregistries = [\"insecure.test\"]\nbackends = [\"tls-insecure\"]\n",
            ca = q(pki.ca.display()),
            plain = q(plain.url()),
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let manifest = |registry: &str| format!("{}/v2/{registry}/library/alpine/manifests/3.19", regmux.url());
    let small = manifest_digest("small", Format::Oci);

    let (r, took) = timed_get(&manifest("ca.test"));
    eprintln!("[faults] HTTPS backend with ca_file: {} in {took:?}", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.body_digest(), small);
    let layer = layer_digests("small")[0].clone();
    let (b, _) = timed_get(&format!("{}/v2/ca.test/library/alpine/blobs/{layer}", regmux.url()));
    assert_eq!(b.status, 200);
    assert_eq!(b.body_digest(), layer);

    let (r, took) = timed_get(&manifest("insecure.test"));
    eprintln!("[faults] HTTPS backend with insecure_skip_verify: {} in {took:?}", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.body_digest(), small);

    let (r, took) = timed_get(&manifest("noca.test"));
    eprintln!("[faults] HTTPS backend without ca_file, alone: {} in {took:?}", r.status);
    assert_eq!(r.status, 503, "an untrusted certificate must not be accepted: {}", r.text());
    assert!(took < FAST, "a certificate refusal fails at once, took {took:?}");

    let (r, took) = timed_get(&manifest("fallback.test"));
    eprintln!("[faults] HTTPS backend without ca_file, then a plain one: {} in {took:?}", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.body_digest(), manifest_digest("other", Format::Oci), "served by the next backend");
    assert!(took < FAST, "took {took:?}");
    // Tried and refused, or (once the probe found it failing) skipped: never used.
    let line = wait_log_all(&regmux, &["route=fallback", "served_by=plain"], Duration::from_secs(5));
    assert!(
        line.contains("tls-noca-fallback: connection") || line.contains("tls-noca-fallback: down, skipped"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------------
// Client authentication

/// `[server] htpasswd`: everything answers 401 with a Basic challenge until the client logs in; skopeo
/// pulls with `--src-creds` and fails without; the client's `Authorization` never reaches a backend,
/// which gets regmux's own credentials instead.
#[test]
fn client_authentication_is_required_and_never_forwarded() {
    let lab = Lab::new();
    let secured = Registry::start(lab.dir("secured"), RegistryOpts::plain().htpasswd("bob", "backend-pw"));
    push_with_creds("small", &format!("{}/library/alpine:3.19", secured.addr()), Format::Oci, "bob", "backend-pw");
    let spy = FakeServer::start("spy", empty_registry);
    let out = run(Command::new("htpasswd").args(["-Bbn", "user", "pass"]), Duration::from_secs(10));
    assert!(out.status.success(), "htpasswd: {out:?}");
    let htpasswd = lab.write("clients.htpasswd", &out.stdout);
    let config = regmux_config(
        &lab,
        &format!("htpasswd = {}\n", q(htpasswd.display())),
        &format!(
            "[backends.secured]\nurl = {}\nusername = \"bob\"\npassword = \"backend-pw\"\n\n\
             [backends.spy]\nurl = {}\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"secured\"]\ndefault = true\n\n\
             [[routes]]\nname = \"spy\"\nregistries = [\"spy.test\"]\nbackends = [\"spy\"]\n",
            q(secured.url()),
            q(spy.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let base = regmux.url();
    let layer = layer_digests("small")[0].clone();
    let urls = [
        format!("{base}/v2/"),
        format!("{base}/v2/library/alpine/manifests/3.19"),
        format!("{base}/v2/library/alpine/blobs/{layer}"),
        format!("{base}/v2/library/alpine/tags/list"),
        format!("{base}/v2/_catalog"),
    ];
    let good = basic_auth("user", "pass");
    let bad_creds = [basic_auth("user", "wrong"), basic_auth("bob", "backend-pw"), "Bearer abc".to_string()];
    for url in &urls {
        for method in ["GET", "HEAD"] {
            let r = http(method, url, &accept_all());
            assert_eq!(r.status, 401, "{method} {url} without credentials");
            assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"regmux\""), "{method} {url}");
        }
        for bad in &bad_creds {
            let mut h = accept_all();
            h.push(("Authorization", bad.as_str()));
            assert_eq!(http("GET", url, &h).status, 401, "GET {url} with {bad}");
        }
    }
    let mut h = accept_all();
    h.push(("Authorization", good.as_str()));
    assert_eq!(http("GET", &urls[0], &h).status, 200);
    let m = http("GET", &urls[1], &h);
    assert_eq!(m.status, 200, "{}\n{}", m.text(), regmux.logs());
    assert_eq!(m.body_digest(), manifest_digest("small", Format::Oci));
    let b = http("GET", &urls[2], &h);
    assert_eq!(b.status, 200);
    assert_eq!(b.body_digest(), layer);

    // The client's credentials stay at regmux: the backend sees none of them.
    let r = http("GET", &format!("{base}/v2/spy.test/lab/x/manifests/1"), &h);
    assert_eq!(r.status, 404, "{}", r.text());
    let seen = spy.requests();
    assert!(seen.iter().any(|q| q.path == "/v2/lab/x/manifests/1"), "{seen:?}");
    assert!(seen.iter().all(|q| q.header("authorization").is_none()), "client credentials forwarded: {seen:?}");

    let src = format!("{}/library/alpine:3.19", regmux.addr());
    let (o, out) = skopeo_copy(&lab, &src, &["--src-tls-verify=false", "--src-creds", "user:pass"], "pulled-auth");
    assert!(o.status.success(), "skopeo with credentials: {}\n{}", String::from_utf8_lossy(&o.stderr), regmux.logs());
    assert_pulled(&out, "small");
    let (o, _) = skopeo_copy(&lab, &src, &["--src-tls-verify=false"], "pulled-anon");
    assert!(!o.status.success(), "skopeo without credentials must fail");
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("unauthorized") || err.contains("authentication required"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Reload and stop

/// SIGHUP: a valid configuration (backend order swapped, a route added) applies to new requests while
/// a slow 64 MiB download started before it finishes whole; an invalid one is rejected with the
/// problem logged and the running one stays in effect.
#[test]
fn reload_applies_valid_config_rejects_invalid_and_keeps_pulls_in_flight() {
    let lab = Lab::new();
    let a = Registry::start(lab.dir("a"), RegistryOpts::plain());
    let b = Registry::start(lab.dir("b"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", a.addr()), Format::Oci);
    push("other", &format!("{}/library/alpine:3.19", b.addr()), Format::Oci);
    let big_path = lab.path().join("big.bin");
    let big = write_big_file(&big_path, 1);
    let mut f = fs::File::open(&big_path).expect("open big file");
    upload_blob(&a.url(), "library/alpine", &mut f, BIG, &big);

    let backends = format!("[backends.a]\nurl = {}\n\n[backends.b]\nurl = {}\n\n", q(a.url()), q(b.url()));
    let hub = |order: &str| {
        format!("[[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [{order}]\ndefault = true\n\n")
    };
    let v1 = regmux_config(&lab, "", &format!("{backends}{}", hub("\"a\", \"b\"")));
    let mut regmux = Regmux::start(BIN, lab.dir("regmux"), &v1);
    let tag_url = format!("{}/v2/library/alpine/manifests/3.19", regmux.url());
    let extra_url = format!("{}/v2/extra.test/library/alpine/manifests/3.19", regmux.url());
    let (small, other) = (manifest_digest("small", Format::Oci), manifest_digest("other", Format::Oci));
    assert_eq!(timed_get(&tag_url).0.body_digest(), small, "v1: a first");
    assert_eq!(timed_get(&extra_url).0.status, 404, "v1 has no route for extra.test");

    let mut download =
        Download::start(&format!("{}/v2/library/alpine/blobs/{big}", regmux.url()), &lab.dir("download"), SLOW_RATE);
    wait_for("the slow download to be under way", Duration::from_secs(10), || {
        (download.received() >= 2 << 20).then_some(())
    });

    // v2: order swapped, a route added.
    let v2 = regmux_config(
        &lab,
        "",
        &format!(
            "{backends}{}[[routes]]\nname = \"extra\"\nregistries = [\"extra.test\"]\nbackends = [\"a\"]\n",
            hub("\"b\", \"a\"")
        ),
    );
    fs::write(regmux.config_path(), &v2).expect("write v2");
    let hup = Instant::now();
    regmux.send_signal("HUP");
    regmux.wait_log("configuration reloaded", Duration::from_secs(10));
    eprintln!("[faults] reload applied within {:?} of SIGHUP", hup.elapsed());
    let (r, _) = timed_get(&tag_url);
    assert_eq!(r.body_digest(), other, "v2: b first\n{}", regmux.logs());
    let (r, _) = timed_get(&extra_url);
    assert_eq!(r.status, 200, "v2 added extra.test: {}", r.text());
    assert_eq!(r.body_digest(), small);
    let mid = download.received();
    assert!(download.running() && mid < BIG, "the reload must happen while the download runs ({mid} bytes)");

    // v3: invalid (a route names an undefined backend, and the order is swapped back): rejected.
    let v3 = regmux_config(
        &lab,
        "",
        &format!(
            "{backends}{}[[routes]]\nname = \"broken\"\nregistries = [\"broken.test\"]\nbackends = [\"nope\"]\n",
            hub("\"a\", \"b\"")
        ),
    );
    fs::write(regmux.config_path(), &v3).expect("write v3");
    regmux.send_signal("HUP");
    regmux.wait_log("configuration rejected", Duration::from_secs(10));
    // The problem list follows the "rejected" line.
    wait_for("the rejected configuration's problem in the log", Duration::from_secs(5), || {
        let logs = regmux.logs();
        let tail = &logs[logs.find("configuration rejected")?..];
        tail.contains("backend \"nope\" is not defined").then_some(())
    });
    let (r, _) = timed_get(&tag_url);
    assert_eq!(r.body_digest(), other, "v2 stays in effect after a rejected reload");
    assert_eq!(timed_get(&extra_url).0.status, 200, "v2's added route stays");

    let (status, meta, took) = download.finish(Duration::from_secs(60));
    eprintln!("[faults] download across two reloads: {meta} in {took:?}");
    assert!(
        status.success(),
        "curl: {status} {meta} {}",
        fs::read_to_string(lab.path().join("download/download.err")).unwrap_or_default()
    );
    assert_eq!(meta, format!("200 {BIG} 1.1"));
    assert_eq!(sha256_file(&download.out), big, "the download in flight finished with the right bytes");
    regmux.send_signal("TERM");
    assert!(regmux.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

/// SIGTERM during a slow download: regmux stops accepting at once (new connections are refused),
/// finishes the download with the right bytes, then exits 0. Streaming 64 MiB keeps regmux's memory
/// flat: its peak RSS (VmHWM) stays far below the blob's size.
#[test]
fn sigterm_finishes_the_running_download_then_exits_zero() {
    stop_signal_finishes_the_running_download("TERM");
}

/// The same with SIGINT (Ctrl-C in a terminal).
#[test]
fn sigint_finishes_the_running_download_then_exits_zero() {
    stop_signal_finishes_the_running_download("INT");
}

/// The most regmux's peak RSS may reach while it streams [`BIG`] (64 MiB) to one slow client. About
/// 28 MiB were measured (debug build); a regmux that buffered the blob would need more than 64 MiB.
const PEAK_RSS_LIMIT_KIB: u64 = 40 << 10;

/// Samples `VmHWM` (peak resident set, KiB) of `pid` every 50 ms until the process is gone; the last
/// value read is its peak over its whole life up to then.
fn peak_rss_sampler(pid: u32) -> JoinHandle<Option<u64>> {
    thread::spawn(move || {
        let mut peak = None;
        while let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            // A zombie has no memory lines left: keep the last real reading.
            if hwm.is_none() {
                break;
            }
            peak = hwm;
            thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

/// Backend `name` at `url` and the default route `hub` (Docker Hub) with only that backend.
fn one_backend_route(name: &str, url: &str) -> String {
    format!(
        "[backends.{name}]\nurl = {}\n\n[[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"{name}\"]\ndefault = true\n",
        q(url)
    )
}

fn stop_signal_finishes_the_running_download(signal: &str) {
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    let big_path = lab.path().join("big.bin");
    let big = write_big_file(&big_path, 2);
    let mut f = fs::File::open(&big_path).expect("open big file");
    upload_blob(&reg.url(), "library/alpine", &mut f, BIG, &big);
    let config = regmux_config(&lab, "", &one_backend_route("reg", &reg.url()));
    let mut regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let rss = peak_rss_sampler(regmux.pid());
    let mut download =
        Download::start(&format!("{}/v2/library/alpine/blobs/{big}", regmux.url()), &lab.dir("download"), SLOW_RATE);
    wait_for("the slow download to be under way", Duration::from_secs(10), || {
        (download.received() >= 2 << 20).then_some(())
    });

    regmux.send_signal(signal);
    let sent = Instant::now();
    let addr = regmux.addr().to_string();
    let refused =
        wait_for(&format!("regmux to refuse new connections after SIG{signal}"), Duration::from_secs(5), || {
            TcpStream::connect(&addr).is_err().then(|| sent.elapsed())
        });
    eprintln!("[faults] new connections refused {refused:?} after SIG{signal}");
    assert!(refused < Duration::from_secs(1), "took {refused:?}");
    assert!(regmux.wait_exit(Duration::ZERO).is_none(), "regmux exited with a download in flight");
    assert!(download.running() && download.received() < BIG, "the download is still running after SIG{signal}");

    let (status, meta, took) = download.finish(Duration::from_secs(60));
    eprintln!("[faults] download across SIG{signal}: {meta} in {took:?}");
    assert!(
        status.success(),
        "curl: {status} {meta} {}",
        fs::read_to_string(lab.path().join("download/download.err")).unwrap_or_default()
    );
    assert_eq!(meta, format!("200 {BIG} 1.1"));
    assert_eq!(sha256_file(&download.out), big);
    let exit = regmux.wait_exit(Duration::from_secs(10)).expect("regmux exits once the download is done");
    eprintln!("[faults] regmux exited {:?} after SIG{signal}", sent.elapsed());
    assert_eq!(exit.code(), Some(0), "{}", regmux.logs());
    assert!(regmux.logs().contains("all connections drained"), "{}", regmux.logs());

    let peak = rss.join().expect("RSS sampler thread").expect("VmHWM of regmux was read");
    eprintln!("[faults] regmux peak RSS while streaming {} MiB: {} KiB", BIG >> 20, peak);
    assert!(peak < PEAK_RSS_LIMIT_KIB, "peak RSS {peak} KiB, limit {PEAK_RSS_LIMIT_KIB} KiB: memory must stay flat");
}

/// A stop that comes after regmux has handed the last chunk of a body to hyper, while that chunk
/// still waits for a slow client (the socket is full): the connection counts as busy until the
/// socket has taken it, so the client gets every byte and regmux then exits 0.
#[test]
fn sigterm_after_the_last_chunk_still_delivers_the_end_to_a_slow_client() {
    const SIZE: u64 = 12 << 20;
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    let bytes = random_bytes(77, SIZE as usize);
    let digest = sha256_bytes(&bytes);
    upload_blob(&reg.url(), "library/alpine", &mut &bytes[..], SIZE, &digest);
    let config = regmux_config(&lab, "", &one_backend_route("reg", &reg.url()));
    let mut regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let mut download =
        Download::start(&format!("{}/v2/library/alpine/blobs/{digest}", regmux.url()), &lab.dir("download"), "1M");
    // regmux logs the request once its body has given hyper the last chunk; the client, reading 1 MB/s,
    // is seconds from the end then (the rest sits in hyper and in the sockets).
    wait_for("regmux to have handed over the whole body", Duration::from_secs(20), || {
        regmux.logs().lines().any(|l| l.contains(" request ") && l.contains(&digest)).then_some(())
    });
    // How much is still unread depends on how far the kernel grew the socket buffers for this slow
    // reader (4 MiB in a quiet run, nothing on a busy machine): logged, not required.
    let left = SIZE - download.received();
    eprintln!("[faults] body handed over with {left} bytes not yet read by the client");
    regmux.send_signal("TERM");
    let (status, meta, took) = download.finish(Duration::from_secs(60));
    eprintln!("[faults] download across SIGTERM: {meta} in {took:?}");
    assert!(
        status.success(),
        "curl: {status} {meta} {}",
        fs::read_to_string(lab.path().join("download/download.err")).unwrap_or_default()
    );
    assert_eq!(meta, format!("200 {SIZE} 1.1"));
    assert_eq!(sha256_file(&download.out), digest);
    let exit = regmux.wait_exit(Duration::from_secs(10)).expect("regmux exits once the download is done");
    assert_eq!(exit.code(), Some(0), "{}", regmux.logs());
}

/// `[server] shutdown_grace = "1s"`: a download that would take seconds more is cut when the grace
/// ends; regmux then exits 0 at once, and the client sees an incomplete body (never a short success).
#[test]
fn shutdown_grace_cuts_a_download_that_outlasts_it() {
    let lab = Lab::new();
    let reg = Registry::start(lab.dir("reg"), RegistryOpts::plain());
    let big_path = lab.path().join("big.bin");
    let big = write_big_file(&big_path, 3);
    let mut f = fs::File::open(&big_path).expect("open big file");
    upload_blob(&reg.url(), "library/alpine", &mut f, BIG, &big);
    let config = regmux_config(&lab, "shutdown_grace = \"1s\"\n", &one_backend_route("reg", &reg.url()));
    let mut regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let mut download =
        Download::start(&format!("{}/v2/library/alpine/blobs/{big}", regmux.url()), &lab.dir("download"), SLOW_RATE);
    wait_for("the slow download to be under way", Duration::from_secs(10), || {
        (download.received() >= 2 << 20).then_some(())
    });

    regmux.send_signal("TERM");
    let sent = Instant::now();
    let exit = regmux.wait_exit(Duration::from_secs(10)).expect("regmux exits once the grace period is over");
    let exited = sent.elapsed();
    eprintln!("[faults] regmux exited {exited:?} after SIGTERM with shutdown_grace = 1s");
    assert_eq!(exit.code(), Some(0), "{}", regmux.logs());
    assert!(
        exited >= Duration::from_millis(900) && exited < Duration::from_secs(3),
        "regmux must let the download run for the 1 s grace, then exit promptly: exited after {exited:?}"
    );
    assert!(regmux.logs().contains("grace period over"), "{}", regmux.logs());

    let (status, meta, _) = download.finish(Duration::from_secs(10));
    let got = download.received();
    eprintln!("[faults] download cut by the grace period: curl {status}, {meta}, {got} of {BIG} bytes");
    assert!(!status.success(), "curl must see the body cut: {status} {meta}");
    assert_eq!(status.code(), Some(18), "curl: partial file (the body ended before Content-Length): {meta}");
    assert!(got < BIG, "{got} bytes");
    assert!(meta.starts_with("200 "), "{meta}");
}

// ---------------------------------------------------------------------------------------------
// Limits

/// What a hand-made h2c request saw.
#[derive(Debug, Default)]
struct H2Outcome {
    /// The server's SETTINGS_MAX_HEADER_LIST_SIZE, if it sent one.
    max_header_list_size: Option<u32>,
    /// `:status` of the response on stream 1.
    status: Option<u16>,
    /// RST_STREAM error code on stream 1.
    reset: Option<u32>,
    /// GOAWAY error code.
    goaway: Option<u32>,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), OR-ed into `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// The digits of an HPACK Huffman-coded string made of digits only (a `:status` value): '0'–'2' are
/// the 5-bit codes 0–2, '3'–'9' the 6-bit codes 0x19–0x1f (RFC 7541 Appendix B); padding is all ones.
fn huffman_digits(bytes: &[u8]) -> String {
    let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
    let take = |at: usize, n: usize| bits.get(at..at + n).map(|b| b.iter().fold(0u8, |acc, x| (acc << 1) | x));
    let (mut at, mut out) = (0, String::new());
    loop {
        match (take(at, 5), take(at, 6)) {
            (Some(c @ 0..=2), _) => {
                out.push((b'0' + c) as char);
                at += 5;
            }
            (_, Some(c @ 0x19..=0x1f)) => {
                out.push((b'3' + (c - 0x19)) as char);
                at += 6;
            }
            _ => return out,
        }
    }
}

/// `:status` from the first field of a response header block (indexed, or a literal with the
/// `:status` name index 8).
fn hpack_status(block: &[u8]) -> Option<u16> {
    const INDEXED: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return INDEXED.get(((first & 0x7f) as usize).checked_sub(8)?).copied();
    }
    let name_index = if first & 0x40 != 0 { first & 0x3f } else { first & 0x0f };
    if name_index != 8 {
        return None;
    }
    let len_byte = *block.get(1)?;
    let value = block.get(2..2 + (len_byte & 0x7f) as usize)?;
    let text = if len_byte & 0x80 != 0 { huffman_digits(value) } else { String::from_utf8_lossy(value).into_owned() };
    text.parse().ok()
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One frame: (type, flags, stream, payload).
fn h2_read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some((head[3], head[4], stream, payload))
}

/// One h2c (prior knowledge) GET written by hand, so that a header list larger than the server's
/// advertised limit can be sent at all (conforming clients such as curl refuse to). The server's
/// SETTINGS are acknowledged before the request, so that its limits are in force.
fn h2c_get(addr: &str, path: &str, extra: &[(String, String)]) -> H2Outcome {
    let mut s = TcpStream::connect(addr).expect("connect h2c");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, 4, 0, 0, &[]);
    s.write_all(&out).expect("write h2 preface");
    let mut outcome = H2Outcome::default();
    loop {
        let (kind, flags, _, payload) = h2_read_frame(&mut s).expect("server SETTINGS");
        if kind == 4 && flags & 1 == 0 {
            for pair in payload.chunks_exact(6) {
                if u16::from_be_bytes([pair[0], pair[1]]) == 6 {
                    outcome.max_header_list_size = Some(u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]));
                }
            }
            break;
        }
    }
    let mut block = Vec::new();
    let pseudo = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", addr)];
    let fields = pseudo.iter().map(|(k, v)| (k.to_string(), v.to_string())).chain(extra.iter().cloned());
    for (k, v) in fields {
        block.push(0x00); // literal without indexing, new name
        hpack_int(&mut block, 0, 7, k.len());
        block.extend_from_slice(k.as_bytes());
        hpack_int(&mut block, 0, 7, v.len());
        block.extend_from_slice(v.as_bytes());
    }
    let mut out = Vec::new();
    h2_frame(&mut out, 4, 1, 0, &[]); // SETTINGS ACK
    let parts: Vec<&[u8]> = block.chunks(16 << 10).collect();
    for (i, part) in parts.iter().enumerate() {
        let end_headers = if i + 1 == parts.len() { 0x4 } else { 0 };
        if i == 0 {
            h2_frame(&mut out, 1, 0x1 | end_headers, 1, part); // HEADERS with END_STREAM
        } else {
            h2_frame(&mut out, 9, end_headers, 1, part); // CONTINUATION
        }
    }
    // The server may answer before reading everything: what it answers is what counts.
    let _ = s.write_all(&out);
    while let Some((kind, flags, stream, payload)) = h2_read_frame(&mut s) {
        let code = |at: usize| payload.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        match (kind, stream) {
            (1, 1) => {
                outcome.status = hpack_status(&payload);
                if flags & 1 != 0 {
                    break;
                }
            }
            (0, 1) if flags & 1 != 0 => break,
            (3, 1) => {
                outcome.reset = code(0);
                break;
            }
            (7, _) => {
                outcome.goaway = code(4);
                break;
            }
            _ => {}
        }
    }
    outcome
}

/// How long a slow client waits to be disconnected (the server's header-read limit is 10 s).
const SLOW_DEADLINE: Duration = Duration::from_secs(15);

/// How a slow client misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Connects and sends nothing at all.
    Silent,
    /// Sends the start of a request head, then nothing.
    PartialHead,
    /// Sends the start of a request head, then one more byte every 500 ms, never ending it.
    Trickle,
    /// Sends the first line of the HTTP/2 connection preface, then nothing.
    PartialPreface,
}

/// When the server ended a slow client's connection (None: not within [`SLOW_DEADLINE`]), and any bytes it sent.
fn slow_client(addr: String, mode: Slow) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).expect("connect slow client");
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    match mode {
        Slow::Silent => {}
        Slow::PartialPreface => s.write_all(b"PRI * HTTP/2.0\r\n").expect("write partial preface"),
        Slow::PartialHead | Slow::Trickle => {
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\nX-Slow: ").expect("write partial head")
        }
    }
    let mut last_write = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < SLOW_DEADLINE {
        if mode == Slow::Trickle && last_write.elapsed() >= Duration::from_millis(500) {
            if s.write_all(b"a").is_err() {
                return (Some(started.elapsed()), got);
            }
            last_write = Instant::now();
        }
        match s.read(&mut buf) {
            Ok(0) => return (Some(started.elapsed()), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return (Some(started.elapsed()), got),
        }
    }
    (None, got)
}

/// Completes a TLS handshake with `addr` (trusting `ca`, offering ALPN `alpn`), then sends nothing:
/// when the server ended the connection (None: not within [`SLOW_DEADLINE`]).
fn silent_after_tls_handshake(addr: &str, ca: &Path, alpn: &[u8]) -> Option<Duration> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA PEM") {
        roots.add(cert.expect("CA certificate")).expect("trust CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).expect("connect TLS client");
    tcp.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    let pending = |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
    while conn.is_handshaking() {
        assert!(started.elapsed() < Duration::from_secs(5), "TLS handshake with {addr} did not finish");
        if let Err(e) = conn.complete_io(&mut tcp) {
            assert!(pending(&e), "TLS handshake with {addr}: {e}");
        }
    }
    assert_eq!(conn.alpn_protocol(), Some(alpn), "ALPN");
    let mut buf = [0u8; 1024];
    while started.elapsed() < SLOW_DEADLINE {
        match rustls::Stream::new(&mut conn, &mut tcp).read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if pending(&e) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Whether a slow client was disconnected after about the 10 s header-read limit (printed either way).
fn check_cut_off(what: &str, ended: Option<Duration>, got: &[u8]) -> Result<(), String> {
    eprintln!("[faults] {what}: disconnected after {ended:?} ({} bytes answered)", got.len());
    match ended {
        None => {
            Err(format!("{what}: still connected after {SLOW_DEADLINE:?}; it must be disconnected after about 10 s"))
        }
        Some(t) if t < Duration::from_secs(5) || t > Duration::from_secs(12) => {
            Err(format!("{what}: disconnected after {t:?}, expected about 10 s"))
        }
        Some(_) => Ok(()),
    }
}

/// Request headers over 64 KiB get 431 (HTTP/1.1 and h2c) while 32 KiB pass; clients that never finish
/// their headers (silent, or one byte every 500 ms) are disconnected after about 10 s, and meanwhile
/// well-behaved clients are answered at once.
#[test]
fn oversized_headers_get_431_and_slow_clients_are_cut_off() {
    let lab = Lab::new();
    let backend = FakeServer::start("limits-backend", empty_registry);
    let config = regmux_config(&lab, "", &one_backend_route("b", &backend.url()));
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let ping = format!("{}/v2/", regmux.url());

    // Slow clients first, so that the rest of the test runs while they hang on.
    let modes = [Slow::Trickle, Slow::PartialHead, Slow::PartialHead, Slow::Silent, Slow::PartialPreface];
    let slow: Vec<_> = modes
        .into_iter()
        .map(|mode| {
            let addr = regmux.addr().to_string();
            thread::spawn(move || (mode, slow_client(addr, mode)))
        })
        .collect();

    let huge = "h".repeat(70 << 10);
    let r = raw_request("GET", &ping, &[("X-Huge", &huge)], None, Duration::from_secs(10));
    assert_eq!(r.status, 431, "70 KiB of request headers over HTTP/1.1: {:?}", r.headers);
    let large = "l".repeat(32 << 10);
    let r = raw_request("GET", &ping, &[("X-Large", &large)], None, Duration::from_secs(10));
    assert_eq!(r.status, 200, "32 KiB of request headers are fine");

    // HTTP/2 (h2c): the limit is advertised in SETTINGS, so conforming clients never send more; a
    // request within it is answered, and one over it (ten 7 KiB fields) gets 431 on its stream.
    let header = format!("X-Large: {large}");
    let o = curl(
        &["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "-H", &header],
        &ping,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200 2", "32 KiB of request headers over h2c: {o:?}");
    let fields: Vec<(String, String)> = (0..10).map(|i| (format!("x-field-{i}"), "f".repeat(7 << 10))).collect();
    let h2 = h2c_get(regmux.addr(), "/v2/", &fields);
    eprintln!("[faults] h2c with 70 KiB of header fields: {h2:?}");
    assert_eq!(h2.max_header_list_size, Some(64 << 10), "SETTINGS_MAX_HEADER_LIST_SIZE: {h2:?}");
    assert_eq!(h2.status, Some(431), "70 KiB of request headers over h2c: {h2:?}");
    let h2 = h2c_get(regmux.addr(), "/v2/", &[("x-huge".to_string(), huge.clone())]);
    assert_eq!(h2.status, Some(431), "one 70 KiB request header over h2c: {h2:?}");
    let h2 = h2c_get(regmux.addr(), "/v2/", &[("x-large".to_string(), large.clone())]);
    assert_eq!(h2.status, Some(200), "the hand-made h2c client itself works: {h2:?}");

    // Well-behaved clients are answered at once while the slow ones hang on.
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(8) {
        let (r, took) = timed_get(&ping);
        assert_eq!(r.status, 200);
        worst = worst.max(took);
        thread::sleep(Duration::from_millis(200)); // pacing between requests, not a readiness wait
    }
    eprintln!("[faults] slowest well-behaved request while slow clients hang: {worst:?}");
    assert!(worst < FAST, "{worst:?}");

    let mut problems = Vec::new();
    for client in slow {
        let (mode, (ended, got)) = client.join().expect("slow client thread");
        problems.extend(check_cut_off(&format!("{mode:?} slow client"), ended, &got).err());
    }
    assert!(problems.is_empty(), "slow clients:\n{}", problems.join("\n"));
}

/// How an idle client of [`idle_client`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    H2c,
}

/// What an idle client saw: the status of its one request, and how long after that answer the
/// server closed the connection (None: not within [`SLOW_DEADLINE`]).
#[derive(Debug)]
struct IdleOutcome {
    proto: Proto,
    status: Option<u16>,
    closed_after: Option<Duration>,
    goaway: bool,
}

/// A well-behaved client that makes one request (`GET /v2/`), reads the answer, then keeps its
/// connection open without a request, answering HTTP/2 PINGs as a live client does. `ready` is sent
/// once it was answered.
fn idle_client(addr: String, proto: Proto, ready: std::sync::mpsc::Sender<()>) -> IdleOutcome {
    let mut s = TcpStream::connect(&addr).expect("connect idle client");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let mut outcome = IdleOutcome { proto, status: None, closed_after: None, goaway: false };
    match proto {
        Proto::Http1 => {
            s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).expect("write request");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    break end;
                }
                let n = s.read(&mut chunk).expect("read response head");
                assert!(n > 0, "connection closed before the answer");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            outcome.status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).expect("read response body");
                assert!(n > 0, "connection closed in the body");
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        Proto::H2c => {
            let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            h2_frame(&mut out, 4, 0, 0, &[]);
            h2_frame(&mut out, 4, 1, 0, &[]); // ACK of the server's SETTINGS, sent ahead
            let mut block = Vec::new();
            for (k, v) in [(":method", "GET"), (":scheme", "http"), (":path", "/v2/"), (":authority", addr.as_str())] {
                block.push(0x00);
                hpack_int(&mut block, 0, 7, k.len());
                block.extend_from_slice(k.as_bytes());
                hpack_int(&mut block, 0, 7, v.len());
                block.extend_from_slice(v.as_bytes());
            }
            h2_frame(&mut out, 1, 0x1 | 0x4, 1, &block);
            s.write_all(&out).expect("write h2c request");
            loop {
                let (kind, flags, stream, payload) = h2_read_frame(&mut s).expect("h2c answer");
                match (kind, stream) {
                    (1, 1) => {
                        outcome.status = hpack_status(&payload);
                        if flags & 1 != 0 {
                            break;
                        }
                    }
                    (0, 1) if flags & 1 != 0 => break,
                    (6, 0) if flags & 1 == 0 => {
                        let mut pong = Vec::new();
                        h2_frame(&mut pong, 6, 1, 0, &payload);
                        s.write_all(&pong).expect("PING ACK");
                    }
                    _ => {}
                }
            }
        }
    }
    let answered = Instant::now();
    let _ = ready.send(());
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    while answered.elapsed() < SLOW_DEADLINE {
        match proto {
            Proto::Http1 => {
                let mut buf = [0u8; 1024];
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                    Err(_) => break,
                }
            }
            Proto::H2c => {
                let mut head = [0u8; 9];
                match s.peek(&mut head) {
                    Ok(0) => break,
                    Ok(n) if n < 9 => continue,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                    Err(_) => break,
                }
                s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
                let Some((kind, flags, _, payload)) = h2_read_frame(&mut s) else { break };
                s.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
                match kind {
                    6 if flags & 1 == 0 => {
                        let mut pong = Vec::new();
                        h2_frame(&mut pong, 6, 1, 0, &payload);
                        if s.write_all(&pong).is_err() {
                            break;
                        }
                    }
                    7 => outcome.goaway = true,
                    _ => {}
                }
                continue;
            }
        }
    }
    if answered.elapsed() < SLOW_DEADLINE {
        outcome.closed_after = Some(answered.elapsed());
    }
    outcome
}

/// `[server] max_connections = 8`, all eight held by clients that made one request and then idle
/// (HTTP/1.1 keep-alive and h2c, answering PINGs): each is closed after the 10 s idle timeout, so a
/// new client, waiting in the accept queue meanwhile, is answered within about that time.
#[test]
fn idle_connections_are_closed_so_a_small_connection_cap_frees_up() {
    let lab = Lab::new();
    let backend = FakeServer::start("idle-backend", empty_registry);
    let config = regmux_config(&lab, "max_connections = 8\n", &one_backend_route("b", &backend.url()));
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let clients: Vec<_> = [Proto::Http1, Proto::H2c]
        .into_iter()
        .cycle()
        .take(8)
        .map(|proto| {
            let (addr, ready_tx) = (regmux.addr().to_string(), ready_tx.clone());
            thread::spawn(move || idle_client(addr, proto, ready_tx))
        })
        .collect();
    for _ in 0..8 {
        ready.recv_timeout(Duration::from_secs(10)).expect("every idle client was answered");
    }
    let all_idle = Instant::now();

    let (r, took) = timed_get(&format!("{}/v2/", regmux.url()));
    eprintln!("[faults] a new client with 8 of 8 connections idle: {} after {took:?}", r.status);
    assert_eq!(r.status, 200, "{}", regmux.logs());
    assert!(
        took > Duration::from_secs(5),
        "the cap of 8 was in force: the new client had to wait for a slot, took {took:?}"
    );
    assert!(took < Duration::from_secs(13), "answered within about the 10 s idle timeout, took {took:?}");

    let mut problems = Vec::new();
    for client in clients {
        let o = client.join().expect("idle client thread");
        eprintln!("[faults] idle {:?} client: {o:?}", o.proto);
        if o.status != Some(200) {
            problems.push(format!("{o:?}: its request was not answered 200"));
        }
        match o.closed_after {
            Some(t) if t > Duration::from_secs(8) && t < Duration::from_secs(13) => {}
            _ => problems.push(format!("{o:?}: must be closed about 10 s after its last answer")),
        }
        if o.proto == Proto::H2c && !o.goaway {
            problems.push(format!("{o:?}: an HTTP/2 connection is closed with a GOAWAY"));
        }
    }
    assert!(problems.is_empty(), "idle clients:\n{}", problems.join("\n"));
    eprintln!("[faults] all idle clients closed within {:?}", all_idle.elapsed());
}

/// Harbor's proxy-cache quirk (goharbor/harbor#22609): a blob `HEAD` answers 404 until a `GET` made
/// Harbor fetch the blob. Harbor itself cannot run here, so a fake backend plays exactly that. With
/// `kind = "harbor"` a client's HEAD must find the blob (regmux asks with GET); with the default kind
/// the 404 is taken at its word and the next backend (which lacks it too) makes it a 404.
#[test]
fn harbor_blob_head_404_is_resolved_by_get() {
    let lab = Lab::new();
    let blob = Arc::new(random_bytes(11, 100 << 10));
    let digest = sha256_bytes(&blob);
    let harbor = {
        let (blob, path) = (blob.clone(), format!("/v2/quay-proxy/keycloak/keycloak/blobs/{digest}"));
        let fetched = Arc::new(AtomicBool::new(false));
        let digest = digest.clone();
        FakeServer::start("harbor", move |req, conn| {
            if req.path != path {
                return empty_registry(req, conn);
            }
            let headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", digest.as_str())];
            match req.method.as_str() {
                "GET" => {
                    fetched.store(true, Ordering::SeqCst);
                    conn.respond(200, &headers, &blob)
                }
                "HEAD" if fetched.load(Ordering::SeqCst) => reply(req, conn, 200, &headers, &blob),
                _ => reply(
                    req,
                    conn,
                    404,
                    &[("Content-Type", "application/json")],
                    br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#,
                ),
            }
        })
    };
    let empty = FakeServer::start("empty", empty_registry);
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.harbor]\nurl = {h}\nprefix = \"quay-proxy\"\nkind = \"harbor\"\n\n\
             [backends.plain]\nurl = {h}\nprefix = \"quay-proxy\"\n\n\
             [backends.empty]\nurl = {e}\n\n\
             [[routes]]\nname = \"quay\"\nregistries = [\"quay.io\"]\nbackends = [\"harbor\", \"empty\"]\n\n\
             [[routes]]\nname = \"plain\"\nregistries = [\"plain.test\"]\nbackends = [\"plain\", \"empty\"]\n",
            h = q(harbor.url()),
            e = q(empty.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);

    // The default kind trusts the HEAD 404 (nothing fetched it yet).
    let r = http("HEAD", &format!("{}/v2/plain.test/keycloak/keycloak/blobs/{digest}", regmux.url()), &[]);
    assert_eq!(r.status, 404, "{}", regmux.logs());

    // kind = "harbor": the HEAD is answered from a GET's headers, with the blob's length and digest.
    let blob_requests = |s: &FakeServer| s.requests().iter().filter(|q| q.path.contains("/blobs/")).count();
    let empty_before = blob_requests(&empty);
    let r = http("HEAD", &format!("{}/v2/quay.io/keycloak/keycloak/blobs/{digest}", regmux.url()), &[]);
    assert_eq!(r.status, 200, "{}", regmux.logs());
    assert_eq!(r.header("content-length"), Some(blob.len().to_string().as_str()));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.body.is_empty());
    let asked: Vec<String> = harbor.requests().iter().map(|q| format!("{} {}", q.method, q.path)).collect();
    assert!(asked.iter().any(|a| a.starts_with("GET ") && a.ends_with(&digest)), "regmux asked with GET: {asked:?}");
    assert_eq!(blob_requests(&empty), empty_before, "no fallback was needed");
}

/// Referrers API (distribution-spec "Listing Referrers"): a first backend without it (404) is passed
/// over and the second one's OCI index reaches the client whole, with its content type, and the
/// client's `artifactType` filter is forwarded to the backends. (No docker-registry here: distribution
/// does not serve the referrers API, so two fake backends play a registry without and one with it.)
#[test]
fn referrers_come_from_the_first_backend_that_has_the_api() {
    let lab = Lab::new();
    let subject = sha256_bytes(b"the subject manifest");
    let sbom = sha256_bytes(b"an sbom manifest");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{sbom}","size":321,"artifactType":"application/spdx+json"}}]}}"#
    );
    let path = format!("/v2/lab/app/referrers/{subject}");
    let without = FakeServer::start("no-referrers", empty_registry);
    let with = {
        let (index, path) = (index.clone(), path.clone());
        FakeServer::start("referrers", move |req, conn| {
            if req.path.split('?').next() == Some(path.as_str()) {
                let filtered = req.path.contains("artifactType=");
                let mut headers = vec![("Content-Type", OCI_INDEX)];
                if filtered {
                    headers.push(("OCI-Filters-Applied", "artifactType"));
                }
                return reply(req, conn, 200, &headers, index.as_bytes());
            }
            empty_registry(req, conn)
        })
    };
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.without]\nurl = {}\n\n[backends.with]\nurl = {}\n\n\
             [[routes]]\nname = \"ref\"\nregistries = [\"ref.test\"]\nbackends = [\"without\", \"with\"]\n",
            q(without.url()),
            q(with.url())
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);
    let url =
        format!("{}/v2/ref.test/lab/app/referrers/{subject}?artifactType=application%2Fspdx%2Bjson", regmux.url());
    let (r, took) = timed_get(&url);
    eprintln!("[faults] referrers from the second backend: {} in {took:?}", r.status);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), regmux.logs());
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert_eq!(r.text(), index, "the OCI index, byte for byte");
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let forwarded = format!("{path}?artifactType=application%2Fspdx%2Bjson");
    let asked_without: Vec<FakeReq> =
        without.requests().into_iter().filter(|q| q.path.contains("/referrers/")).collect();
    assert!(
        asked_without.iter().any(|q| q.method == "GET" && q.path == forwarded),
        "the first backend was asked, with the filter: {asked_without:?}"
    );
    let asked_with: Vec<FakeReq> = with.requests().into_iter().filter(|q| q.path.contains("/referrers/")).collect();
    assert!(
        asked_with.iter().any(|q| q.method == "GET" && q.path == forwarded),
        "artifactType was forwarded to the backend that answered: {asked_with:?}"
    );

    // Without a filter: none is forwarded, and the answer says none was applied.
    let r = http("GET", &format!("{}/v2/ref.test/lab/app/referrers/{subject}", regmux.url()), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), index);
    assert_eq!(r.header("oci-filters-applied"), None);
    assert!(with.requests().iter().any(|q| q.path == path), "{:?}", with.requests());
}

/// Harbor's Docker Hub proxy-cache projects redirect a one-segment name to `library/`
/// (`GET /v2/<project>/alpine/manifests/x` → `/v2/<project>/library/alpine/manifests/x`;
/// goharbor/harbor#12719, shipped in v2.7; the `defaultLibrary` handling of `ManifestMiddleware` and
/// `BlobGetMiddleware` in `src/server/middleware/repoproxy/proxy.go`, which answers 301, as
/// goharbor/harbor#23368 describes). A route that does not add `library/` itself (here a registry
/// that is not `docker.io`) sends such names to Harbor as they are. regmux follows the same-origin
/// redirect with the bearer token it got for the original name; Harbor accepts it because its
/// tokens authorize a project, not one repository, which the fake (its own token realm, robot
/// credentials required) checks the same way. Both 301 and 307 are followed; a whole image copies.
#[test]
fn harbor_library_redirect_is_followed_with_the_token() {
    let lab = Lab::new();
    let manifest = Arc::new(manifest_bytes("small", Format::Oci));
    let manifest_digest_ = manifest_digest("small", Format::Oci);
    let blobs: Arc<Vec<(String, Vec<u8>)>> =
        Arc::new(blob_digests("small").into_iter().map(|d| (d.clone(), images().blob(&d))).collect());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake harbor");
    let realm = format!("http://{}/service/token", listener.local_addr().expect("fake harbor addr"));
    let robot = basic_auth("robot$regmux", "robot-secret");
    let harbor = {
        let (manifest, digest, blobs) = (manifest.clone(), manifest_digest_.clone(), blobs.clone());
        FakeServer::serve("harbor-library", listener, move |req, conn| {
            let json = [("Content-Type", "application/json")];
            let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
            if path == "/service/token" {
                if req.header("authorization") != Some(robot.as_str()) {
                    return reply(req, conn, 401, &json, br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                }
                let scope = form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let body = serde_json::json!({ "token": scope, "expires_in": 300 }).to_string();
                return reply(req, conn, 200, &json, body.as_bytes());
            }
            let Some(rest) = path.strip_prefix("/v2/") else { return empty_registry(req, conn) };
            let Some((repo, kind, reference)) = ["/manifests/", "/blobs/"].iter().find_map(|k| {
                rest.split_once(k)
                    .map(|(repo, reference)| (repo.to_string(), k.trim_matches('/'), reference.to_string()))
            }) else {
                return empty_registry(req, conn);
            };
            let project = repo.split('/').next().unwrap_or_default().to_string();
            // Harbor's tokens authorize the project: any pull token for a repository of it will do.
            let token_project = req
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer repository:"))
                .and_then(|scope| scope.split('/').next())
                .map(String::from);
            if token_project.as_deref() != Some(project.as_str()) {
                let challenge =
                    format!("Bearer realm=\"{realm}\",service=\"harbor-registry\",scope=\"repository:{repo}:pull\"");
                return reply(req, conn, 401, &[("WWW-Authenticate", challenge.as_str())], b"");
            }
            let segments: Vec<&str> = repo.split('/').collect();
            if segments.len() == 2 {
                let status = if project == "hub-proxy" { 301 } else { 307 };
                let location = format!("/v2/{project}/library/{}/{kind}/{reference}", segments[1]);
                return reply(req, conn, status, &[("Location", location.as_str())], b"");
            }
            if segments.get(1..) != Some(&["library", "alpine"][..]) {
                return empty_registry(req, conn);
            }
            if kind == "manifests" && (reference == "3.19" || reference == digest) {
                let headers = [("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", digest.as_str())];
                return reply(req, conn, 200, &headers, &manifest);
            }
            if let Some((d, bytes)) = blobs.iter().find(|(d, _)| kind == "blobs" && *d == reference) {
                let headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", d.as_str())];
                return reply(req, conn, 200, &headers, bytes);
            }
            empty_registry(req, conn)
        })
    };
    let config = regmux_config(
        &lab,
        "",
        &format!(
            "[backends.harbor-hub]\nurl = {h}\nprefix = \"hub-proxy\"\nkind = \"harbor\"\n\
             username = \"robot$regmux\"\npassword = \"robot-secret\"\n\n\
             [backends.harbor-hub-307]\nurl = {h}\nprefix = \"hub-temp\"\nkind = \"harbor\"\n\
             username = \"robot$regmux\"\npassword = \"robot-secret\"\n\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"hub.test\"]\nbackends = [\"harbor-hub\"]\n\n\
             [[routes]]\nname = \"hub-307\"\nregistries = [\"hub307.test\"]\nbackends = [\"harbor-hub-307\"]\n",
            h = q(harbor.url()),
        ),
    );
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config);

    for (registry, project, status) in [("hub.test", "hub-proxy", 301), ("hub307.test", "hub-temp", 307)] {
        let base = format!("{}/v2/{registry}/alpine", regmux.url());
        let (r, took) = timed_get(&format!("{base}/manifests/3.19"));
        eprintln!("[faults] Harbor {status} to library/ for a manifest: {} in {took:?}", r.status);
        assert_eq!(r.status, 200, "{registry}: {}\n{}", r.text(), regmux.logs());
        assert_eq!(r.body_digest(), manifest_digest_);
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert!(took < FAST, "took {took:?}");
        let h = http("HEAD", &format!("{base}/manifests/3.19"), &accept_all());
        assert_eq!(h.status, 200, "{registry}: HEAD manifest");
        assert_eq!(h.header("docker-content-digest"), Some(manifest_digest_.as_str()));
        for (d, bytes) in blobs.iter() {
            let b = http("GET", &format!("{base}/blobs/{d}"), &[]);
            assert_eq!(b.status, 200, "{registry}: blob {d}: {}", b.text());
            assert!(b.complete);
            assert_eq!(b.body.len(), bytes.len());
            assert_eq!(b.body_digest(), *d);
            let h = http("HEAD", &format!("{base}/blobs/{d}"), &[]);
            assert_eq!(h.status, 200, "{registry}: HEAD blob {d}");
            assert_eq!(h.header("content-length"), Some(bytes.len().to_string().as_str()));
        }
        let asked = harbor.requests();
        let original = format!("/v2/{project}/alpine/");
        let redirected = format!("/v2/{project}/library/alpine/");
        assert!(
            asked.iter().any(|q| q.path.starts_with(&original) && q.header("authorization").is_some()),
            "regmux asked for the one-segment name, authenticated: {asked:?}"
        );
        assert!(
            asked.iter().any(|q| q.path.starts_with(&redirected)
                && q.header("authorization") == Some(&*format!("Bearer repository:{project}/alpine:pull"))),
            "regmux followed the {status} with the token of the original name: {asked:?}"
        );
    }

    // A real client pulls the whole image through the redirect.
    let src = format!("{}/hub.test/alpine:3.19", regmux.addr());
    let (o, out) = skopeo_copy(&lab, &src, &["--src-tls-verify=false"], "pulled-harbor-library");
    assert!(o.status.success(), "skopeo: {}\n{}", String::from_utf8_lossy(&o.stderr), regmux.logs());
    assert_pulled(&out, "small");
}
