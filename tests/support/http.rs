//! A minimal blocking HTTP/1.1 client for assertions (plain `http://` only, one request per
//! connection). Headers are sent exactly as given, in order, so a test can send `Accept` as several
//! lines the way Docker and containerd do, or set its own `Host`. A body cut short by the server
//! (connection closed before `Content-Length` bytes or before the last chunk) is reported in
//! [`Response::complete`] instead of as an error, because regmux aborts bad blobs on purpose.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;

/// Status, headers (in arrival order, names as sent) and body of one response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// False when the connection ended before the framing said the body was complete.
    pub complete: bool,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    /// `sha256:<hex>` of the body.
    pub fn body_digest(&self) -> String {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&self.body)))
    }
}

/// `"Basic <base64(user:pass)>"`, for an `Authorization` header.
pub fn basic_auth(user: &str, pass: &str) -> String {
    let raw = format!("{user}:{pass}");
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// Sends one request; panics with the URL on a connection or protocol error.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> Response {
    try_http(method, url, headers).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Sends one request (`Connection: close`, no request body) and reads the whole response.
pub fn try_http(method: &str, url: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("only http:// URLs: {url}")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;

    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {authority}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\nUser-Agent: regmux-test-harness\r\n\r\n");
    stream.write_all(req.as_bytes())?;

    let mut reader = BufReader::new(stream);
    let status_line = read_line(&mut reader)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut resp_headers = Vec::new();
    loop {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| bad(format!("bad header {line:?}")))?;
        resp_headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response { status, headers: resp_headers, body: Vec::new(), complete: true };
    if method.eq_ignore_ascii_case("HEAD") || status / 100 == 1 || status == 204 || status == 304 {
        return Ok(resp);
    }
    let chunked = resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        resp.complete = read_chunked(&mut reader, &mut resp.body);
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad(format!("bad content-length {len:?}")))?;
        let _ = reader.by_ref().take(len as u64).read_to_end(&mut resp.body);
        resp.complete = resp.body.len() == len;
    } else {
        reader.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in headers"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Decodes a chunked body into `out`; false when the stream ends before the terminating chunk.
fn read_chunked(r: &mut impl BufRead, out: &mut Vec<u8>) -> bool {
    loop {
        let Ok(size_line) = read_line(r) else { return false };
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else { return false };
        if size == 0 {
            // Trailers (ignored) end with an empty line.
            while let Ok(line) = read_line(r) {
                if line.is_empty() {
                    break;
                }
            }
            return true;
        }
        let before = out.len();
        let _ = r.by_ref().take(size as u64).read_to_end(out);
        if out.len() - before != size || read_line(r).is_err() {
            return false;
        }
    }
}
