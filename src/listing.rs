//! `tags/list` and `_catalog`: the union of what the route's backends list, sorted, paginated with
//! `n`/`last` and a `Link` header (distribution-spec "Listing Tags"; distribution's catalog API).
//!
//! Backends are read page by page following their own `Link` headers, up to a bound, so a huge
//! backend cannot make one client request unbounded. A backend's `prefix` is stripped from catalog
//! entries and repositories outside it are left out.

use std::collections::BTreeSet;

use http::header::{HeaderValue, LINK};
use http::{HeaderMap, Method, Response};
use serde::Deserialize;

use crate::app::Snapshot;
use crate::backend::{Answer, Backend};
use crate::body::ProxyBody;
use crate::proxy::{nothing_served, Query};
use crate::record::Ctx;
use crate::registry::{ErrorCode, OciError, Reference, RepoName};
use crate::respond;
use crate::route::Route;

/// At most this many pages are read from one backend for one listing.
const MAX_PAGES: usize = 100;
/// Largest listing page accepted from a backend.
const MAX_PAGE_BYTES: usize = 8 << 20;

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Catalog {
    #[serde(default)]
    repositories: Option<Vec<String>>,
}

enum Pages {
    Found(Vec<Vec<u8>>),
    Missing,
    Failed,
}

/// Read every page of a listing from one backend.
async fn read_pages(backend: &Backend, first: String, repo: Option<&RepoName>, ctx: &mut Ctx) -> Pages {
    let mut pages = Vec::new();
    let mut next = Some(first);
    while let Some(path) = next.take() {
        if pages.len() >= MAX_PAGES {
            ctx.failed(backend, format!("listing cut at {MAX_PAGES} pages"));
            break;
        }
        let resp = match backend.fetch(&Method::GET, &path, repo, &HeaderMap::new()).await {
            Answer::Found(r) => r,
            Answer::Missing(s) if pages.is_empty() => {
                ctx.missing(backend, s.as_u16());
                return Pages::Missing;
            }
            Answer::Missing(s) => {
                ctx.failed(backend, format!("page answered {s}"));
                return Pages::Failed;
            }
            Answer::Failed(e) => {
                ctx.failed(backend, &e);
                return Pages::Failed;
            }
        };
        next = resp.headers().get(LINK).and_then(|l| l.to_str().ok()).and_then(next_link);
        if resp.content_length().is_some_and(|l| l > MAX_PAGE_BYTES as u64) {
            ctx.failed(backend, "listing page too large");
            return Pages::Failed;
        }
        match resp.bytes().await {
            Ok(b) if b.len() <= MAX_PAGE_BYTES => pages.push(b.to_vec()),
            Ok(_) => {
                ctx.failed(backend, "listing page too large");
                return Pages::Failed;
            }
            Err(e) => {
                ctx.failed(backend, format!("listing body: {e}"));
                return Pages::Failed;
            }
        }
    }
    Pages::Found(pages)
}

/// `</v2/_catalog?last=x&n=100>; rel="next"` → `/v2/_catalog?last=x&n=100`. Only a path on the same
/// backend under `/v2/` is followed (an absolute URL could point anywhere).
fn next_link(v: &str) -> Option<String> {
    let (target, params) = v.trim().strip_prefix('<')?.split_once('>')?;
    if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
        return None;
    }
    target.starts_with("/v2/").then(|| target.to_owned())
}

/// `n`/`last` pagination over a sorted set, and the `Link` to the next page. The client's `ns` is
/// kept in the `Link`: without it the next page would be routed elsewhere (containerd's `ns` routing).
fn paginate(all: BTreeSet<String>, q: &Query, base: &str) -> (Vec<String>, Option<String>) {
    let start = q.last.clone();
    let mut it = all.into_iter().filter(|x| start.as_ref().is_none_or(|l| x > l));
    let Some(n) = q.n else {
        return (it.collect(), None);
    };
    let page: Vec<String> = it.by_ref().take(n).collect();
    let more = it.next().is_some();
    let link = match (more, page.last()) {
        (true, Some(last)) => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("n", &n.to_string()).append_pair("last", last);
            if let Some(ns) = &q.ns {
                query.append_pair("ns", ns);
            }
            Some(format!("<{base}?{}>; rel=\"next\"", query.finish()))
        }
        _ => None,
    };
    (page, link)
}

fn listing_response(method: &Method, body: String, link: Option<String>) -> Response<ProxyBody> {
    let mut h = HeaderMap::new();
    if let Some(v) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(LINK, v);
    }
    respond::json(method, body, h)
}

/// Merge the listing of every backend of the route: `first` names a backend's first page (and the
/// repository for its token scope) or skips the backend; `extract` adds one page's entries.
async fn union(
    snap: &Snapshot,
    route: &Route,
    ctx: &mut Ctx,
    first: impl Fn(&Backend) -> Option<(String, Option<RepoName>)>,
    mut extract: impl FnMut(&Backend, &[u8], &mut BTreeSet<String>),
) -> Result<BTreeSet<String>, OciError> {
    let mut all = BTreeSet::new();
    let mut found = false;
    for b in &route.backends {
        let Some(backend) = snap.backends.get(b) else { continue };
        let Some((path, repo)) = first(backend) else { continue };
        if let Pages::Found(pages) = read_pages(backend, path, repo.as_ref(), ctx).await {
            found = true;
            for p in pages {
                extract(backend, &p, &mut all);
            }
        }
    }
    if !found {
        return Err(nothing_served(ctx, ErrorCode::NameUnknown));
    }
    ctx.served_by = "union".into();
    Ok(all)
}

pub async fn tags(
    snap: &Snapshot,
    route: &Route,
    client_name: &RepoName,
    name: &RepoName,
    q: &Query,
    method: &Method,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, OciError> {
    let first = |b: &Backend| b.map_name(name).ok().map(|m| (format!("/v2/{m}/tags/list"), Some(m)));
    let all = union(snap, route, ctx, first, |_, page, all| {
        if let Ok(list) = serde_json::from_slice::<TagList>(page) {
            all.extend(list.tags.unwrap_or_default().into_iter().filter(|t| t.parse::<Reference>().is_ok()));
        }
    })
    .await?;
    let (page, link) = paginate(all, q, &format!("/v2/{client_name}/tags/list"));
    let body = serde_json::json!({ "name": client_name.as_str(), "tags": page }).to_string();
    Ok(listing_response(method, body, link))
}

pub async fn catalog(
    snap: &Snapshot,
    route: &Route,
    q: &Query,
    method: &Method,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, OciError> {
    let first = |_: &Backend| Some(("/v2/_catalog?n=1000".to_owned(), None));
    let all = union(snap, route, ctx, first, |backend, page, all| {
        let Ok(c) = serde_json::from_slice::<Catalog>(page) else { return };
        for repo in c.repositories.unwrap_or_default() {
            if let Some(n) = repo.parse::<RepoName>().ok().and_then(|r| backend.unmap_name(&r)) {
                all.insert(n.to_string());
            }
        }
    })
    .await?;
    let (page, link) = paginate(all, q, "/v2/_catalog");
    let body = serde_json::json!({ "repositories": page }).to_string();
    Ok(listing_response(method, body, link))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pagination() {
        let q = Query { n: Some(2), ..Default::default() };
        let (page, link) = paginate(set(&["c", "a", "b"]), &q, "/v2/x/tags/list");
        assert_eq!(page, ["a", "b"]);
        assert_eq!(link.as_deref(), Some("</v2/x/tags/list?n=2&last=b>; rel=\"next\""));
        let q = Query { n: Some(2), last: Some("b".into()), ..Default::default() };
        let (page, link) = paginate(set(&["c", "a", "b"]), &q, "/v2/x/tags/list");
        assert_eq!(page, ["c"]);
        assert_eq!(link, None);
        let (page, link) = paginate(set(&["b", "a"]), &Query::default(), "/");
        assert_eq!((page, link), (vec!["a".to_string(), "b".to_string()], None));
        let q = Query { n: Some(1), ..Default::default() };
        let (_, link) = paginate(set(&["a/b", "c"]), &q, "/v2/_catalog");
        assert_eq!(link.as_deref(), Some("</v2/_catalog?n=1&last=a%2Fb>; rel=\"next\""));
        let q = Query { n: Some(1), ns: Some("quay.io".into()), ..Default::default() };
        let (_, link) = paginate(set(&["a", "b"]), &q, "/v2/_catalog");
        assert_eq!(link.as_deref(), Some("</v2/_catalog?n=1&last=a&ns=quay.io>; rel=\"next\""));
    }

    #[test]
    fn links() {
        assert_eq!(next_link("</v2/_catalog?last=b&n=2>; rel=\"next\"").as_deref(), Some("/v2/_catalog?last=b&n=2"));
        assert_eq!(next_link("<http://evil/v2/_catalog>; rel=\"next\""), None);
        assert_eq!(next_link("</v2/x>; rel=\"prev\""), None);
    }
}
