//! An in-process Docker token server (the `auth.token` realm of a [`super::Registry`]).
//!
//! `GET /token?service=S&scope=repository:NAME:pull[&scope=…]`, optionally with Basic auth, answers
//! `{"token","access_token","expires_in"}`. The token is an ES256 JWT whose `x5c` header
//! carries a self-signed certificate (rcgen); that certificate, written to [`TokenIssuer::cert_path`],
//! is the registry's `rootcertbundle`. distribution 2.8.2 verifies the chain, the signature, `iss`,
//! `aud` (= service) and `exp`/`nbf` (with 60 s leeway), then looks for the repository in `access`.
//!
//! Grants: `pull` to anyone allowed in (everyone, or only the configured credentials), `push`/`delete`
//! only to the admin account ([`TokenIssuer::admin_creds`]) so that tests can seed a token registry,
//! and `*` on `registry:catalog:*`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rcgen::SigningKey as _;
use serde_json::json;

const ADMIN_USER: &str = "token-admin";
const ADMIN_PASS: &str = "token-admin-pass";

/// What the issuer demands and hands out.
#[derive(Debug, Clone)]
pub struct TokenOpts {
    /// When set, requests without these Basic credentials (or the admin's) get 401.
    pub credentials: Option<(String, String)>,
    /// Token lifetime in seconds: both the JWT `exp` and the `expires_in` field.
    pub expires_in: u64,
    /// `service` (the JWT audience) the registry is configured with.
    pub service: String,
    /// `iss` claim.
    pub issuer: String,
}

impl Default for TokenOpts {
    fn default() -> Self {
        TokenOpts { credentials: None, expires_in: 300, service: "lab-registry".into(), issuer: "lab-issuer".into() }
    }
}

impl TokenOpts {
    pub fn credentials(mut self, user: &str, pass: &str) -> TokenOpts {
        self.credentials = Some((user.into(), pass.into()));
        self
    }

    pub fn expires_in(mut self, secs: u64) -> TokenOpts {
        self.expires_in = secs;
        self
    }
}

/// One request the issuer received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub service: Option<String>,
    /// Every scope asked for (repeated `scope` parameters and space-separated lists flattened).
    pub scopes: Vec<String>,
    /// The Basic user, if any was sent.
    pub user: Option<String>,
    /// The HTTP status answered (200 or 401).
    pub status: u16,
}

#[derive(Debug)]
struct Shared {
    opts: TokenOpts,
    key: rcgen::KeyPair,
    cert_der: Vec<u8>,
    issued: Arc<AtomicUsize>,
    requests: Mutex<Vec<TokenRequest>>,
    stop: AtomicBool,
}

/// The running token server; stopped and joined on drop.
#[derive(Debug)]
pub struct TokenIssuer {
    port: u16,
    cert_path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TokenIssuer {
    /// Generates a key and certificate (certificate PEM written to `dir/token-cert.pem`) and starts
    /// listening on 127.0.0.1:<ephemeral>. Ready when this returns.
    pub fn start(dir: impl AsRef<Path>, opts: TokenOpts) -> TokenIssuer {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let key = rcgen::KeyPair::generate().expect("generate P-256 key"); // ECDSA P-256 / SHA-256
        let params = rcgen::CertificateParams::new(vec!["lab-token-issuer".to_string()]).expect("certificate params");
        let cert = params.self_signed(&key).expect("self-sign token certificate");
        let cert_path = dir.join("token-cert.pem");
        fs::write(&cert_path, cert.pem()).expect("write token cert PEM");

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token issuer on 127.0.0.1:0");
        let port = listener.local_addr().expect("token issuer local addr").port();
        let shared = Arc::new(Shared {
            opts,
            key,
            cert_der: cert.der().to_vec(),
            issued: Arc::new(AtomicUsize::new(0)),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("token-issuer".into())
            .spawn(move || accept_loop(listener, thread_shared))
            .expect("spawn token issuer thread");
        TokenIssuer { port, cert_path, shared, thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/token`: the registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn service(&self) -> &str {
        &self.shared.opts.service
    }

    pub fn issuer_name(&self) -> &str {
        &self.shared.opts.issuer
    }

    /// The certificate PEM (the registry's `rootcertbundle`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Credentials that are always accepted and also get `push` and `delete` (for seeding).
    pub fn admin_creds(&self) -> (&'static str, &'static str) {
        (ADMIN_USER, ADMIN_PASS)
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// The live counter behind [`TokenIssuer::issued`].
    pub fn issued_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.issued)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.requests.lock().expect("token requests lock").clone()
    }

    /// Fetches a token for `scope` directly (as a client would), optionally with Basic credentials.
    /// Panics unless the issuer answers 200.
    pub fn fetch_token(&self, scope: &str, creds: Option<(&str, &str)>) -> String {
        let url = format!("{}?service={}&scope={}", self.realm(), self.service(), scope);
        let auth = creds.map(|(u, p)| super::basic_auth(u, p));
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
        let resp = super::http("GET", &url, &headers);
        assert_eq!(resp.status, 200, "token endpoint answered {}: {}", resp.status, resp.text());
        resp.json()["token"].as_str().expect("token field is a string").to_string()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = Arc::clone(&shared);
        // One thread per connection: a client holding a connection open must not block others.
        let _ = thread::Builder::new().name("token-conn".into()).spawn(move || handle(stream, &shared));
    }
}

fn handle(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, extra) = answer(shared, method, target, authorization.as_deref());
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = stream;
    let _ = stream.write_all(response.as_bytes());
}

/// Decides the answer: (status, JSON body, extra header lines).
fn answer(shared: &Shared, method: &str, target: &str, authorization: Option<&str>) -> (u16, String, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return (404, r#"{"error":"not found"}"#.into(), String::new());
    }
    if method != "GET" {
        return (405, r#"{"error":"only GET"}"#.into(), String::new());
    }
    let mut service = None;
    let mut scopes = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "service" => service = Some(v),
            "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(String::from)),
            _ => {}
        }
    }
    let creds = authorization.and_then(decode_basic);
    let user = creds.as_ref().map(|(u, _)| u.clone());
    let is_admin = creds.as_ref().is_some_and(|(u, p)| u == ADMIN_USER && p == ADMIN_PASS);
    let allowed = is_admin
        || match &shared.opts.credentials {
            None => true,
            Some((u, p)) => creds.as_ref().is_some_and(|(cu, cp)| cu == u && cp == p),
        };
    let status = if allowed { 200 } else { 401 };
    shared.requests.lock().expect("token requests lock").push(TokenRequest {
        service: service.clone(),
        scopes: scopes.clone(),
        user: user.clone(),
        status,
    });
    if !allowed {
        return (
            401,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into(),
            "WWW-Authenticate: Basic realm=\"lab-token\"\r\n".into(),
        );
    }

    let access: Vec<serde_json::Value> = scopes.iter().filter_map(|s| grant(s, is_admin)).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let n = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let claims = json!({
        "iss": shared.opts.issuer,
        "sub": user.unwrap_or_default(),
        "aud": service.unwrap_or_else(|| shared.opts.service.clone()),
        "exp": now + shared.opts.expires_in,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("lab-{}-{n}", shared.opts.issuer),
        "access": access,
    });
    let token = sign_jwt(shared, &claims);
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": shared.opts.expires_in,
    });
    (200, body.to_string(), String::new())
}

/// `repository:NAME:ACTIONS` → its pull (and, for the admin, push/delete) grant; `registry:catalog:*`.
fn grant(scope: &str, is_admin: bool) -> Option<serde_json::Value> {
    // The name may itself contain ':' only with a port (not used here); split from both ends.
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let wanted: Vec<&str> = actions.split(',').collect();
    let granted: Vec<&str> = match kind {
        "repository" => wanted
            .into_iter()
            .filter(|a| *a == "pull" || (is_admin && (*a == "push" || *a == "delete" || *a == "*")))
            .collect(),
        "registry" if name == "catalog" => vec!["*"],
        _ => return None,
    };
    Some(json!({"type": kind, "name": name, "actions": granted}))
}

fn sign_jwt(shared: &Shared, claims: &serde_json::Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&shared.cert_der)]});
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let der = shared.key.sign(signing_input.as_bytes()).expect("ECDSA sign");
    let sig = ecdsa_der_to_jose(&der);
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// rcgen signs ECDSA as ASN.1 `SEQUENCE { INTEGER r, INTEGER s }`; JWS ES256 wants `r || s`, each
/// 32 bytes big-endian (RFC 7518 §3.4).
fn ecdsa_der_to_jose(der: &[u8]) -> [u8; 64] {
    fn int(der: &[u8]) -> (&[u8], &[u8]) {
        assert_eq!(der[0], 0x02, "ASN.1 INTEGER expected in ECDSA signature");
        let len = der[1] as usize;
        (&der[2..2 + len], &der[2 + len..])
    }
    assert_eq!(der[0], 0x30, "ASN.1 SEQUENCE expected in ECDSA signature");
    // P-256 signatures are at most 72 bytes, so the length is always in short form.
    let body = &der[2..];
    let (r, rest) = int(body);
    let (s, _) = int(rest);
    let mut out = [0u8; 64];
    for (i, v) in [r, s].into_iter().enumerate() {
        let v = &v[v.len().saturating_sub(32)..]; // drop the sign byte
        out[i * 32 + 32 - v.len()..(i + 1) * 32].copy_from_slice(v);
    }
    out
}

fn decode_basic(authorization: &str) -> Option<(String, String)> {
    let (scheme, b64) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
