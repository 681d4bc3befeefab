//! An in-process HTTP/1.1 stub of a registry, for unit tests of what a real registry cannot be made to
//! do on demand: a manifest that appears only after a few polls, an absolute `Link` URL, a slow answer.
//! One connection per request (`Connection: close`); it records the most requests in flight at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::backend::Backend;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO }
    }
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply { body: body.into(), ..Reply::status(200) }
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Handler = dyn Fn(&str, &str) -> Reply + Send + Sync;

pub struct Stub {
    pub url: String,
    max_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    /// Listen on an ephemeral port of 127.0.0.1; `handler(method, path_and_query)` answers.
    pub async fn start(handler: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let handler: Arc<Handler> = Arc::new(handler);
        let (in_flight, max_in_flight): (Arc<AtomicUsize>, Arc<AtomicUsize>) = (Arc::default(), Arc::default());
        let counters = (in_flight, Arc::clone(&max_in_flight));
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let handler = handler.clone();
                let (in_flight, max) = (counters.0.clone(), counters.1.clone());
                tokio::spawn(async move {
                    let Some((method, path)) = read_request(&mut sock).await else { return };
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    let reply = handler(&method, &path);
                    tokio::time::sleep(reply.delay).await;
                    let mut out = format!(
                        "HTTP/1.1 {} Stub\r\nContent-Length: {}\r\nConnection: close\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    let mut bytes = out.into_bytes();
                    if method != "HEAD" {
                        bytes.extend_from_slice(&reply.body);
                    }
                    let _ = sock.write_all(&bytes).await;
                    let _ = sock.shutdown().await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Stub { url, max_in_flight, task }
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// A backend named `name` for this stub.
    pub fn backend(&self, name: &str) -> Arc<Backend> {
        let cfg: crate::config::BackendConfig =
            toml::from_str(&format!("url = \"{}\"\ntimeout = \"10s\"", self.url)).expect("backend config");
        Arc::new(Backend::new(name, &cfg, Arc::new(crate::metrics::Metrics::new())).expect("backend"))
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The request line's method and target; the headers and any body are read and ignored.
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - end;
    while have < length {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        have += n;
    }
    let mut first = head.lines().next()?.split_whitespace();
    Some((first.next()?.to_owned(), first.next()?.to_owned()))
}
