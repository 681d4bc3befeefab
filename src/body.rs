//! The response body regmux hands to hyper: a backend stream passed through with back-pressure (never
//! buffered whole), or a small buffered body; optionally verified against its digest; counted; and
//! logged once when it is finished or dropped.
//!
//! Verification holds back the last chunk until the hash is known (`CRATES.md`: a check at the end of
//! the stream is useless on HTTP/1.1, where a client that has `Content-Length` bytes is done). On a
//! mismatch the body ends with an error, which makes hyper abort the connection: the client sees a
//! short body and retries instead of storing bad data.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::registry::types::{Algorithm, Digest};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Source {
    Empty,
    Full(Option<Bytes>),
    Stream(reqwest::Body),
}

/// Called once when a verified body turns out not to match its digest.
pub type OnMismatch = Box<dyn FnOnce(&Digest, &str) + Send>;

/// How a body ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Finished {
    pub bytes: u64,
    /// Sent whole.
    pub complete: bool,
    /// Cut because its bytes did not match its digest.
    pub mismatch: bool,
    /// Cut because the backend's body failed (reset, idle timeout).
    pub backend_error: bool,
}

/// Called once when the body is finished or dropped.
pub type OnFinish = Box<dyn FnOnce(Finished) + Send>;

enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(alg: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    fn finish_hex(self) -> String {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

struct Verifier {
    expected: Digest,
    hasher: Option<Hasher>,
    held: Option<Bytes>,
    on_mismatch: Option<OnMismatch>,
    mismatched: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("blob content does not match digest {expected} (got sha256/512 {got}); connection aborted")]
pub struct DigestMismatch {
    pub expected: String,
    pub got: String,
}

pub struct ProxyBody {
    source: Source,
    verifier: Option<Verifier>,
    sent: u64,
    /// The body's length when known up front: hyper stops polling once it has sent that many bytes.
    expected_len: Option<u64>,
    complete: bool,
    backend_error: bool,
    on_finish: Option<OnFinish>,
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::new(Source::Empty)
    }

    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::new(Source::Full(Some(bytes.into())))
    }

    pub fn stream(body: reqwest::Body) -> ProxyBody {
        ProxyBody::new(Source::Stream(body))
    }

    fn new(source: Source) -> ProxyBody {
        let expected_len = match &source {
            Source::Empty => Some(0),
            Source::Full(b) => b.as_ref().map(|b| b.len() as u64),
            Source::Stream(s) => s.size_hint().exact(),
        };
        ProxyBody {
            source,
            verifier: None,
            sent: 0,
            expected_len,
            complete: false,
            backend_error: false,
            on_finish: None,
        }
    }

    /// Verify the bytes against `digest`; the last chunk is released only if they match.
    pub fn verify(mut self, digest: Digest, on_mismatch: OnMismatch) -> ProxyBody {
        self.verifier = Some(Verifier {
            hasher: Some(Hasher::new(digest.algorithm())),
            expected: digest,
            held: None,
            on_mismatch: Some(on_mismatch),
            mismatched: false,
        });
        self
    }

    pub fn on_finish(mut self, f: OnFinish) -> ProxyBody {
        self.on_finish = Some(f);
        self
    }

    fn emit(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.sent += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let next = match &mut this.source {
                Source::Empty => None,
                Source::Full(b) => b.take().map(Ok),
                Source::Stream(s) => match Pin::new(s).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => None,
                    Poll::Ready(Some(Err(e))) => Some(Err(e)),
                    // Trailers are not part of the registry protocol: skip them.
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(d) => Some(Ok(d)),
                        Err(_) => continue,
                    },
                },
            };
            match next {
                Some(Err(e)) => {
                    this.backend_error = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => match &mut this.verifier {
                    None => return this.emit(data),
                    Some(v) => {
                        if let Some(h) = v.hasher.as_mut() {
                            h.update(&data);
                        }
                        if let Some(prev) = v.held.replace(data) {
                            return this.emit(prev);
                        }
                    }
                },
                None => {
                    let Some(v) = &mut this.verifier else {
                        this.complete = true;
                        return Poll::Ready(None);
                    };
                    if let Some(h) = v.hasher.take() {
                        let got = h.finish_hex();
                        if got != v.expected.hex() {
                            if let Some(f) = v.on_mismatch.take() {
                                f(&v.expected, &got);
                            }
                            v.held = None;
                            v.mismatched = true;
                            let e = DigestMismatch { expected: v.expected.to_string(), got };
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                    match v.held.take() {
                        Some(last) => {
                            this.complete = true;
                            return this.emit(last);
                        }
                        None => {
                            this.complete = true;
                            return Poll::Ready(None);
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Empty => true,
            Source::Full(b) => b.is_none(),
            Source::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Empty => SizeHint::with_exact(0),
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Stream(s) => s.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(f) = self.on_finish.take() {
            let complete = self.complete || self.expected_len == Some(self.sent);
            let mismatch = self.verifier.as_ref().is_some_and(|v| v.mismatched);
            f(Finished { bytes: self.sent, complete, mismatch, backend_error: self.backend_error });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn chunks(parts: &[&'static [u8]]) -> reqwest::Body {
        let s = futures_util::stream::iter(
            parts.iter().map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))).collect::<Vec<_>>(),
        );
        reqwest::Body::wrap_stream(s)
    }

    #[tokio::test]
    async fn verified_body_passes_through() {
        let d = Digest::sha256_of(b"hello world");
        let body =
            ProxyBody::stream(chunks(&[b"hello", b" ", b"world"])).verify(d, Box::new(|_, _| panic!("no mismatch")));
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"hello world");
    }

    #[tokio::test]
    async fn mismatch_withholds_the_last_chunk() {
        let d = Digest::sha256_of(b"hello world");
        let flagged = Arc::new(AtomicBool::new(false));
        let f = flagged.clone();
        let mut body = ProxyBody::stream(chunks(&[b"hello", b" ", b"WORLD"]))
            .verify(d, Box::new(move |_, _| f.store(true, Ordering::SeqCst)));
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(fr)) => got.extend_from_slice(&fr.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("a corrupt body must not end cleanly"),
            }
        };
        assert!(err.to_string().contains("does not match"), "{err}");
        assert_eq!(got, b"hello ", "the last chunk is never released");
        assert!(flagged.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn finish_reports_bytes() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let s = seen.clone();
        let body = ProxyBody::full(Bytes::from_static(b"abc"))
            .on_finish(Box::new(move |f| *s.lock().unwrap() = Some((f.bytes, f.complete))));
        let _ = body.collect().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), Some((3, true)));
    }
}
