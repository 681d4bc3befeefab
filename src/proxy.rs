//! `handle(request)`: gate → parse → route → backends → stream → record (`DESIGN.md`, "Request path").
//!
//! Reads top to bottom: the method gate and `/v2/` first, then the typed path, the route, and one
//! function per endpoint. Every answer, good or bad, leaves through [`crate::respond`], and every
//! request ends in exactly one log event, emitted when its body is finished or dropped.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION, RANGE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::app::{App, CachedManifest, Snapshot};
use crate::backend::{Answer, Backend};
use crate::body::ProxyBody;
use crate::config::BackendKind;
use crate::listing;
use crate::metrics::BackendLabel;
use crate::record::Ctx;
use crate::registry::manifest;
use crate::registry::path::PathError;
use crate::registry::{
    parse_path, Digest, ErrorCode, OciError, Reference, RegistryPath, RepoName, CONTENT_DIGEST_HEADER,
};
use crate::respond;
use crate::route::{Route, RouteError};

/// The largest manifest regmux accepts from a backend (distribution-spec: registries SHOULD accept
/// manifests of at least 4 MiB). Manifests are buffered so they can be verified before a byte is sent.
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Answer one client request.
pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<ProxyBody> {
    let mut ctx = Ctx::new(req.method().clone());
    let resp = dispatch(&app, &req, &mut ctx).await.unwrap_or_else(|e| respond::error(&ctx.method, &e));
    ctx.finish(&app, resp)
}

async fn dispatch<B>(app: &App, req: &Request<B>, ctx: &mut Ctx) -> Result<Response<ProxyBody>, OciError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return Err(OciError::new(ErrorCode::Unsupported)
            .message(format!("{method} is not supported: regmux serves pulls only")));
    }
    let snap = app.snapshot();
    if let Some(users) = &snap.htpasswd {
        if !users.authorized(req.headers().get(AUTHORIZATION)) {
            return Ok(respond::unauthorized(&method));
        }
    }
    let path = parse_path(req.uri().path()).map_err(path_error)?;
    ctx.kind = kind_of(&path);
    if path == RegistryPath::Base {
        return Ok(respond::json(&method, "{}".into(), HeaderMap::new()));
    }
    let query = Query::parse(req.uri().query());
    let host =
        req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
    let name = match &path {
        RegistryPath::Manifest { name, .. }
        | RegistryPath::Blob { name, .. }
        | RegistryPath::TagsList { name }
        | RegistryPath::Referrers { name, .. } => Some(name),
        RegistryPath::Base | RegistryPath::Catalog => None,
    };
    let routed = snap.router.route(query.ns.as_deref(), host, name).map_err(|e| {
        let m = e.to_string();
        match e {
            RouteError::UnknownNamespace(_) | RouteError::NoRoute => OciError::new(ErrorCode::NameUnknown).message(m),
        }
    })?;
    let route = routed.route;
    ctx.route = route.name.clone();
    ctx.target = route.target.clone();
    ctx.via = routed.via.as_str();
    ctx.warm = route.warm;
    if route.warm {
        ctx.target_backend = snap.backends.get(&route.target).cloned();
    }
    if let Some(n) = &routed.name {
        ctx.repo = n.to_string();
    }
    let headers = forwarded_headers(req.headers());
    match (path, routed.name) {
        (RegistryPath::Manifest { reference, .. }, Some(name)) => {
            ctx.reference = reference.to_string();
            manifest(app, &snap, route, &name, &reference, &method, &headers, ctx).await
        }
        (RegistryPath::Blob { digest, .. }, Some(name)) => {
            ctx.reference = digest.to_string();
            ctx.digest = Some(digest.to_string());
            blob(app, &snap, route, &name, &digest, &method, &headers, ctx).await
        }
        (RegistryPath::Referrers { digest, .. }, Some(name)) => {
            ctx.reference = digest.to_string();
            let mut path = format!("referrers/{digest}");
            if let Some(t) = &query.artifact_type {
                path.push_str("?artifactType=");
                path.push_str(&form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>());
            }
            referrers(app, &snap, route, &name, &path, &method, &headers, ctx).await
        }
        (RegistryPath::TagsList { name: client_name }, Some(name)) => {
            listing::tags(&snap, route, &client_name, &name, &query, &method, ctx).await
        }
        (RegistryPath::Catalog, _) => listing::catalog(&snap, route, &query, &method, ctx).await,
        _ => Err(OciError::new(ErrorCode::NameInvalid)),
    }
}

fn kind_of(p: &RegistryPath) -> &'static str {
    match p {
        RegistryPath::Base => "base",
        RegistryPath::Catalog => "catalog",
        RegistryPath::Manifest { .. } => "manifest",
        RegistryPath::Blob { .. } => "blob",
        RegistryPath::TagsList { .. } => "tags",
        RegistryPath::Referrers { .. } => "referrers",
    }
}

/// A path regmux does not serve (no pull endpoint, or the push API) is 405 `UNSUPPORTED`, like any
/// method but GET/HEAD; a malformed name, digest or reference is a 400 with its own code.
fn path_error(e: PathError) -> OciError {
    let m = e.to_string();
    match e {
        PathError::NotAnEndpoint | PathError::Upload => OciError::new(ErrorCode::Unsupported).message(m),
        PathError::Name(_) => OciError::new(ErrorCode::NameInvalid).message(m),
        PathError::Digest(_) => OciError::new(ErrorCode::DigestInvalid).message(m),
        PathError::Reference(_) => OciError::new(ErrorCode::ManifestInvalid).message(m),
    }
}

/// The query parameters regmux understands; everything else is dropped, never forwarded.
#[derive(Debug, Default)]
pub struct Query {
    pub ns: Option<String>,
    pub n: Option<usize>,
    pub last: Option<String>,
    pub artifact_type: Option<String>,
}

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut out = Query::default();
        for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            match &*k {
                "ns" => out.ns = Some(v.into_owned()),
                "n" => out.n = v.parse().ok(),
                "last" => out.last = Some(v.into_owned()),
                "artifactType" => out.artifact_type = Some(v.into_owned()),
                _ => {}
            }
        }
        out
    }
}

/// The client headers a backend sees: every `Accept` line (dockerd sends six; dropping one makes
/// distribution answer a different manifest), and `Range`.
fn forwarded_headers(from: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in from.get_all(ACCEPT) {
        h.append(ACCEPT, v.clone());
    }
    if let Some(r) = from.get(RANGE) {
        h.insert(RANGE, r.clone());
    }
    h
}

/// The final answer when no backend served: 503 if any failed (it might have had it), else 404.
pub(crate) fn nothing_served(ctx: &Ctx, missing: ErrorCode) -> OciError {
    let detail = serde_json::json!({ "attempts": ctx.attempts });
    if ctx.any_failed {
        OciError::new(ErrorCode::Unavailable).message("no backend could answer").detail(detail)
    } else {
        OciError::new(missing).detail(detail)
    }
}

#[allow(clippy::too_many_arguments)]
async fn manifest(
    app: &App,
    snap: &Snapshot,
    route: &Route,
    name: &RepoName,
    reference: &Reference,
    method: &Method,
    headers: &HeaderMap,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, OciError> {
    let digest = reference.digest();
    // Only a manifest the route's target served for this repository comes from the cache: one another
    // backend served must ask the target again, so the ledger sees whether the target has it by now (a
    // cache hit cannot tell, and would keep a miss open, or reopen one, that the target has long since
    // resolved); one served for another repository says nothing about this one.
    if let Some(d) = digest {
        let cached = app
            .manifests
            .get(d)
            .filter(|m| *m.origin == *ctx.target && m.repo == *name && accepts(headers, &m.content_type));
        if let Some(m) = cached {
            ctx.served(&m.origin);
            ctx.from_cache = true;
            return Ok(manifest_response(method, d, &m));
        }
    }
    let (candidates, skipped) = snap.candidates(app, route, digest);
    ctx.skipped(&skipped);
    for backend in candidates {
        let suffix = format!("manifests/{reference}");
        let Some((mapped, resp)) = ask(app, &backend, method, name, &suffix, headers, digest, ctx).await else {
            continue;
        };
        if *method == Method::HEAD {
            ctx.served(&backend.name);
            if let Some(d) = header_digest(resp.headers()).or(digest.cloned()) {
                ctx.digest = Some(d.to_string());
                app.locations.insert(d, backend.name.clone());
            }
            return Ok(respond::response(
                method,
                resp.status(),
                respond::passed_headers(resp.headers()),
                ProxyBody::empty(),
            ));
        }
        match read_manifest(&backend.name, name, resp, digest).await {
            Ok((d, m)) => {
                ctx.served(&backend.name);
                app.locations.insert(d.clone(), backend.name.clone());
                ctx.digest = Some(d.to_string());
                app.manifests.insert(d.clone(), m.clone());
                return Ok(manifest_response(method, &d, &m));
            }
            Err(e) => {
                if matches!(e, ManifestError::Mismatch(_)) {
                    tracing::warn!(backend = %backend.name, repository = %mapped, reference = %reference, "{e}");
                    app.metrics
                        .digest_mismatches
                        .get_or_create(&BackendLabel { backend: backend.name.to_string() })
                        .inc();
                    if let Some(d) = digest {
                        app.bad.insert((backend.name.clone(), d.clone()), ());
                    }
                }
                forget(app, &backend, digest);
                ctx.failed(&backend, &e);
            }
        }
    }
    Err(nothing_served(ctx, ErrorCode::ManifestUnknown))
}

#[derive(Debug, thiserror::Error)]
enum ManifestError {
    #[error("manifest body: {0}")]
    Read(String),
    #[error("manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("manifest bytes do not match digest {0}")]
    Mismatch(String),
    #[error("answered {0} for a manifest")]
    Status(StatusCode),
}

/// Buffer and verify a manifest: against the requested digest, else against the backend's
/// `Docker-Content-Digest`. Returns the digest it has.
async fn read_manifest(
    origin: &Arc<str>,
    repo: &RepoName,
    resp: reqwest::Response,
    requested: Option<&Digest>,
) -> Result<(Digest, CachedManifest), ManifestError> {
    if resp.status() != StatusCode::OK {
        return Err(ManifestError::Status(resp.status()));
    }
    if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
        return Err(ManifestError::TooLarge);
    }
    let content_type =
        resp.headers().get(CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let claimed = header_digest(resp.headers());
    let body = http_body_util::Limited::new(reqwest::Body::from(resp), MAX_MANIFEST_BYTES);
    let bytes: Bytes = body.collect().await.map_err(|e| ManifestError::Read(e.to_string()))?.to_bytes();
    let media = content_type.to_str().unwrap_or("");
    let digest = match requested.cloned().or(claimed) {
        Some(d) if manifest::matches(&d, media, &bytes) => d,
        Some(d) => return Err(ManifestError::Mismatch(d.to_string())),
        None => manifest::digest_of(media, &bytes),
    };
    Ok((digest, CachedManifest { origin: origin.clone(), repo: repo.clone(), content_type, bytes }))
}

/// Ask one backend for `/v2/<its name>/<suffix>`. A found answer comes back with the mapped name; a
/// missing or failed one is noted in `ctx` (a failure also drops the location hint for `digest`).
#[allow(clippy::too_many_arguments)]
async fn ask(
    app: &App,
    backend: &Backend,
    method: &Method,
    name: &RepoName,
    suffix: &str,
    headers: &HeaderMap,
    digest: Option<&Digest>,
    ctx: &mut Ctx,
) -> Option<(RepoName, reqwest::Response)> {
    let mapped = match backend.map_name(name) {
        Ok(m) => m,
        Err(e) => {
            ctx.failed(backend, &e);
            return None;
        }
    };
    let path = format!("/v2/{mapped}/{suffix}");
    let mut answer = backend.fetch(method, &path, Some(&mapped), headers).await;
    // Harbor answers a HEAD for a blob its proxy cache has not fetched yet with 404, although a GET
    // would fetch it (goharbor/harbor#22609): ask again with GET and use only its headers.
    let harbor_blob_head =
        *method == Method::HEAD && backend.kind == BackendKind::Harbor && suffix.starts_with("blobs/");
    if harbor_blob_head && matches!(answer, Answer::Missing(_)) {
        answer = backend.fetch(&Method::GET, &path, Some(&mapped), headers).await;
    }
    match answer {
        Answer::Found(r) => Some((mapped, r)),
        Answer::Missing(s) => {
            ctx.missing(backend, s.as_u16());
            None
        }
        Answer::Failed(e) => {
            forget(app, backend, digest);
            ctx.failed(backend, &e);
            None
        }
    }
}

fn manifest_response(method: &Method, digest: &Digest, m: &CachedManifest) -> Response<ProxyBody> {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, m.content_type.clone());
    h.insert(CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(CONTENT_DIGEST_HEADER, v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(http::header::ETAG, etag);
        }
    }
    respond::response(method, StatusCode::OK, h, ProxyBody::full(m.bytes.clone()))
}

/// Whether the client's `Accept` lines name `content_type` exactly. A cached manifest is served only
/// then; otherwise the backend decides (it may convert or refuse, as distribution does).
fn accepts(headers: &HeaderMap, content_type: &HeaderValue) -> bool {
    let want = content_type.to_str().unwrap_or("");
    headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let media = item.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case(want)
    })
}

fn header_digest(h: &HeaderMap) -> Option<Digest> {
    h.get(CONTENT_DIGEST_HEADER)?.to_str().ok()?.parse().ok()
}

fn forget(app: &App, backend: &Backend, digest: Option<&Digest>) {
    if let Some(d) = digest {
        if app.locations.get(d).is_some_and(|b| *b == *backend.name) {
            app.locations.invalidate(d);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn blob(
    app: &App,
    snap: &Snapshot,
    route: &Route,
    name: &RepoName,
    digest: &Digest,
    method: &Method,
    headers: &HeaderMap,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, OciError> {
    let (candidates, skipped) = snap.candidates(app, route, Some(digest));
    ctx.skipped(&skipped);
    let suffix = format!("blobs/{digest}");
    for backend in candidates {
        let Some((_, resp)) = ask(app, &backend, method, name, &suffix, headers, Some(digest), ctx).await else {
            continue;
        };
        ctx.served(&backend.name);
        app.locations.insert(digest.clone(), backend.name.clone());
        let status = resp.status();
        let mut out_headers = respond::passed_headers(resp.headers());
        if status.is_redirection() {
            if let Some(l) = resp.headers().get(LOCATION) {
                out_headers.insert(LOCATION, l.clone());
            }
        }
        if *method == Method::HEAD {
            return Ok(respond::response(method, status, out_headers, ProxyBody::empty()));
        }
        let mut body = ProxyBody::stream(reqwest::Body::from(resp));
        // Only a whole blob can be checked against its digest; a 206 range is passed as it is.
        if status == StatusCode::OK && backend.verify_digests {
            let bad = app.bad.clone();
            let locations = app.locations.clone();
            let metrics = app.metrics.clone();
            let name = backend.name.clone();
            body = body.verify(
                digest.clone(),
                Box::new(move |expected, got| {
                    tracing::error!(backend = %name, digest = %expected, got, "blob bytes do not match their digest; connection aborted");
                    metrics.digest_mismatches.get_or_create(&BackendLabel { backend: name.to_string() }).inc();
                    bad.insert((name.clone(), expected.clone()), ());
                    locations.invalidate(expected);
                }),
            );
        }
        return Ok(respond::response(method, status, out_headers, body));
    }
    Err(nothing_served(ctx, ErrorCode::BlobUnknown))
}

/// Referrers (distribution-spec "Listing Referrers"): the first backend in the route's order that
/// answers; a registry without the API answers 404, and clients then fall back to the tag schema.
#[allow(clippy::too_many_arguments)]
async fn referrers(
    app: &App,
    snap: &Snapshot,
    route: &Route,
    name: &RepoName,
    suffix: &str,
    method: &Method,
    headers: &HeaderMap,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, OciError> {
    let (candidates, skipped) = snap.candidates(app, route, None);
    ctx.skipped(&skipped);
    for backend in candidates {
        if let Some((_, resp)) = ask(app, &backend, method, name, suffix, headers, None, ctx).await {
            ctx.served(&backend.name);
            let status = resp.status();
            let h = respond::passed_headers(resp.headers());
            return Ok(respond::response(method, status, h, ProxyBody::stream(reqwest::Body::from(resp))));
        }
    }
    Err(nothing_served(ctx, ErrorCode::ManifestUnknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        h.append(ACCEPT, HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"));
        h.append(ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json; q=0.5, */*"));
        assert!(accepts(&h, &HeaderValue::from_static("application/vnd.oci.image.index.v1+json")));
        assert!(accepts(&h, &HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json")));
        assert!(!accepts(&h, &HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json")));
    }

    #[test]
    fn forwards_every_accept_line() {
        let mut h = HeaderMap::new();
        for v in ["a/1", "b/2", "c/3"] {
            h.append(ACCEPT, HeaderValue::from_static(v));
        }
        h.insert(RANGE, HeaderValue::from_static("bytes=0-1"));
        h.insert("authorization", HeaderValue::from_static("Basic eA=="));
        let f = forwarded_headers(&h);
        assert_eq!(f.get_all(ACCEPT).iter().count(), 3);
        assert!(f.contains_key(RANGE));
        assert!(!f.contains_key("authorization"), "client credentials never go to a backend");
    }

    #[test]
    fn query() {
        let q = Query::parse(Some("ns=quay.io&n=10&last=a%2Fb&x=y"));
        assert_eq!(q.ns.as_deref(), Some("quay.io"));
        assert_eq!(q.n, Some(10));
        assert_eq!(q.last.as_deref(), Some("a/b"));
    }
}
