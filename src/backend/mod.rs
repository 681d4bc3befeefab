//! One backend registry: how a repository name maps to its path (`prefix`, e.g. a Harbor project), how
//! regmux authenticates to it, and one fetch that answers [`Answer::Found`], [`Answer::Missing`] or
//! [`Answer::Failed`] (`DESIGN.md`, "Request path", step 4).
//!
//! A backend knows nothing of routes, clients or the ledger. It never passes a backend challenge or
//! credential outward: a 401 is handled here (token flow) or becomes `Failed`.

pub mod auth;
pub mod health;
pub mod tls;
pub mod transport;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};

use crate::config::{BackendConfig, BackendKind, Redirects};
use crate::metrics::Metrics;
use crate::registry::challenge::{parse_challenge, Challenge};
use crate::registry::RepoName;
use auth::{Credentials, Secret, TokenCache, TokenKey};

pub struct Backend {
    pub name: Arc<str>,
    pub kind: BackendKind,
    pub verify_digests: bool,
    pub redirects: Redirects,
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    prefix: Option<RepoName>,
    /// Tokens and health probes.
    client: reqwest::Client,
    /// Every request to the registry API itself (see [`transport`]).
    transport: transport::Transport,
    credentials: Option<Credentials>,
    timeout: Duration,
    /// The last challenge seen, so that later requests authenticate up front instead of paying a 401
    /// round trip each time.
    challenge: RwLock<Option<Challenge>>,
    tokens: TokenCache,
    pub health: Arc<health::Health>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).field("base", &self.base).finish_non_exhaustive()
    }
}

/// What one backend said about one request.
#[derive(Debug)]
pub enum Answer {
    /// A success (2xx), a 416 for a range, or a redirect that is passed on: this backend answers.
    Found(reqwest::Response),
    /// The backend does not have it (404, 400, 410).
    Missing(StatusCode),
    /// The backend could not answer (connection, timeout, 5xx, 429, refused credentials).
    Failed(FetchError),
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connection: {0}")]
    Connect(#[source] reqwest::Error),
    #[error("connection: {}", chain(.0))]
    Transport(#[source] hyper_util::client::legacy::Error),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("the backend sent an unusable Location")]
    BadLocation,
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("authentication: {0}")]
    Token(#[source] Arc<auth::TokenError>),
    #[error("authentication refused (401) and no usable challenge or credentials")]
    Unauthorized,
    #[error("repository name too long with this backend's prefix")]
    NameTooLong,
    #[error("the backend named a location on another host; not followed with credentials")]
    ForeignLocation,
}

impl FetchError {
    /// Whether this says something about the backend's health (as opposed to, say, a name too long).
    pub fn is_backend_fault(&self) -> bool {
        match self {
            FetchError::Connect(_)
            | FetchError::Transport(_)
            | FetchError::Timeout(_)
            | FetchError::Token(_)
            | FetchError::TooManyRedirects(_)
            | FetchError::BadLocation => true,
            FetchError::Status(s) => s.is_server_error(),
            FetchError::Unauthorized | FetchError::NameTooLong | FetchError::ForeignLocation => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("backend {name}: cannot read password_file {path}: {source}")]
    PasswordFile { name: String, path: String, source: std::io::Error },
    #[error("backend {name}: cannot use ca_file {path}: {message}")]
    CaFile { name: String, path: String, message: String },
    #[error("backend {name}: {source}")]
    Client { name: String, source: reqwest::Error },
    #[error("backend {name}: TLS: {source}")]
    Tls { name: String, source: rustls::Error },
}

impl Backend {
    pub fn new(name: &str, cfg: &BackendConfig, metrics: Arc<Metrics>) -> Result<Backend, BuildError> {
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| BuildError::PasswordFile {
                    name: name.into(),
                    path: path.display().to_string(),
                    source,
                })?;
                Some(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, None) => None,
        };
        let credentials = match (&cfg.username, password) {
            (Some(u), Some(p)) => Some(Credentials { username: u.clone(), password: Secret(p.into()) }),
            _ => None,
        };
        // Redirects: reqwest drops `Authorization` (and other sensitive headers) when a redirect leaves
        // the original host, so a backend's credential never reaches object storage (cf. CVE-2018-1000007
        // class of bugs in curl). "pass" hands the 3xx to the client instead.
        let redirect = match cfg.redirects {
            Redirects::Follow => reqwest::redirect::Policy::limited(5),
            Redirects::Pass => reqwest::redirect::Policy::none(),
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("regmux/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .redirect(redirect)
            .connect_timeout(cfg.connect_timeout())
            // An idle body (a trickling backend) ends the stream; the client then sees a cut body.
            .read_timeout(cfg.timeout())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        let transport_tls;
        if cfg.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
            transport_tls =
                tls::insecure_client_config().map_err(|source| BuildError::Tls { name: name.into(), source })?;
        } else {
            let verifier = match &cfg.ca_file {
                None => tls::LazyVerifier::shared(),
                Some(path) => tls::verifier_with_ca_file(path).map_err(|message| BuildError::CaFile {
                    name: name.into(),
                    path: path.display().to_string(),
                    message,
                })?,
            };
            let config =
                tls::client_config(verifier).map_err(|source| BuildError::Tls { name: name.into(), source })?;
            // hyper-rustls sets the ALPN protocols itself.
            let mut without_alpn = config.clone();
            without_alpn.alpn_protocols.clear();
            transport_tls = without_alpn;
            builder = builder.use_preconfigured_tls(config);
        }
        let transport = transport::Transport::new(transport_tls, cfg.connect_timeout(), cfg.timeout(), cfg.redirects);
        let client = builder.build().map_err(|source| BuildError::Client { name: name.into(), source })?;
        Ok(Backend {
            name: name.into(),
            kind: cfg.kind,
            verify_digests: cfg.verify_digests,
            redirects: cfg.redirects,
            base: cfg.url.trim_end_matches('/').to_owned(),
            prefix: cfg.prefix.as_deref().and_then(|p| p.parse().ok()),
            client,
            transport,
            credentials,
            timeout: cfg.timeout(),
            challenge: RwLock::new(None),
            tokens: auth::token_cache(),
            health: Arc::default(),
            metrics,
        })
    }

    /// The repository name on this backend: `prefix/name`.
    pub fn map_name(&self, name: &RepoName) -> Result<RepoName, FetchError> {
        match &self.prefix {
            Some(p) => name.with_prefix(p).map_err(|_| FetchError::NameTooLong),
            None => Ok(name.clone()),
        }
    }

    /// The client's name for a repository of this backend's catalog; `None` if it lies outside `prefix`.
    pub fn unmap_name(&self, name: &RepoName) -> Option<RepoName> {
        match &self.prefix {
            Some(p) => name.strip_prefix(p),
            None => Some(name.clone()),
        }
    }

    /// Send one request to this backend. `path_and_query` starts with `/v2/` and is built from
    /// validated parts only; `repo` is the mapped repository (for the token scope), `None` for the
    /// catalog. `headers` are the client headers to forward (`Accept`, `Range`).
    pub async fn fetch(
        &self,
        method: &Method,
        path_and_query: &str,
        repo: Option<&RepoName>,
        headers: &HeaderMap,
    ) -> Answer {
        let started = Instant::now();
        let answer = self.fetch_inner(method, path_and_query, repo, headers).await;
        self.metrics.observe_backend(&self.name, started.elapsed());
        match &answer {
            Answer::Found(_) | Answer::Missing(_) => self.health.success(),
            Answer::Failed(e) if e.is_backend_fault() => {
                if self.health.failure() {
                    tracing::warn!(backend = %self.name, error = %e, "backend marked down after repeated failures");
                }
            }
            Answer::Failed(_) => {}
        }
        answer
    }

    /// Ask `GET /v2/`: any HTTP answer below 500 (401 included: it is alive) counts as up.
    pub async fn probe(&self) -> health::Probe {
        let timeout = self.timeout.min(health::PROBE_TIMEOUT);
        match tokio::time::timeout(timeout, self.client.get(format!("{}/v2/", self.base)).send()).await {
            Ok(Ok(r)) if r.status().as_u16() < 500 => health::Probe::Answered,
            Ok(Err(e)) if e.is_connect() => health::Probe::Refused,
            _ => health::Probe::Slow,
        }
    }

    async fn fetch_inner(
        &self,
        method: &Method,
        path_and_query: &str,
        repo: Option<&RepoName>,
        headers: &HeaderMap,
    ) -> Answer {
        let scope = match repo {
            Some(r) => format!("repository:{r}:pull"),
            None => "registry:catalog:*".to_owned(),
        };
        match self.request(method, path_and_query, &scope, headers, None).await {
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => Answer::Failed(FetchError::Status(resp.status())),
            Ok(resp) => classify(resp, self.redirects),
            Err(e) => Answer::Failed(e),
        }
    }

    /// One authenticated request with an explicit token `scope` (e.g. `repository:a/b:pull,push`) and an
    /// optional body (replayable, so a 401 can be retried once with a fresh token). `target` is a path
    /// on this backend, or an absolute URL on this backend's host (an upload `Location`). Returns the
    /// response whatever its status.
    pub async fn request(
        &self,
        method: &Method,
        target: &str,
        scope: &str,
        headers: &HeaderMap,
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, FetchError> {
        let url = self.url_for(target)?;
        let mut authorization = self.authorization(scope).await?;
        let mut retried = false;
        loop {
            let resp = self.send(method, &url, headers, authorization.as_ref(), body.clone()).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            retried = true;
            // A 401: learn the challenge, drop a token that was refused (expired or insufficient_scope)
            // and try once more with a fresh one.
            let challenge = resp
                .headers()
                .get(http::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge)
                .ok_or(FetchError::Unauthorized)?;
            if let Challenge::Bearer { realm, service, .. } = &challenge {
                let key = TokenKey { realm: realm.clone(), service: service.clone(), scope: scope.to_owned() };
                self.tokens.invalidate(&key).await;
            }
            if let Ok(mut slot) = self.challenge.write() {
                *slot = Some(challenge);
            }
            authorization = Some(self.authorization(scope).await?.ok_or(FetchError::Unauthorized)?);
        }
    }

    /// Send a streamed body once (a blob upload), with the authorization already learnt for `scope`:
    /// call [`Backend::request`] for the same scope first so the challenge and token are known.
    pub async fn request_stream(
        &self,
        method: &Method,
        target: &str,
        scope: &str,
        headers: &HeaderMap,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, FetchError> {
        let url = self.url_for(target)?;
        let authorization = self.authorization(scope).await?;
        let mut req = self.client.request(method.clone(), &url).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(a) = &authorization {
            req = req.header(http::header::AUTHORIZATION, &*a.0);
        }
        // No header timeout here: the request only completes once the whole body is sent.
        req.send().await.map_err(FetchError::Connect)
    }

    /// A path becomes a URL on this backend; an absolute URL must stay on this backend's origin, so a
    /// `Location` pointing elsewhere never receives this backend's credentials.
    fn url_for(&self, target: &str) -> Result<String, FetchError> {
        if target.starts_with('/') {
            return Ok(format!("{}{}", self.base, target));
        }
        let same_origin = target.strip_prefix(&self.base).is_some_and(|rest| rest.starts_with('/'));
        if same_origin {
            Ok(target.to_owned())
        } else {
            Err(FetchError::ForeignLocation)
        }
    }

    /// The token scope for pulling from a repository of this backend.
    pub fn pull_scope(repo: &RepoName) -> String {
        format!("repository:{repo}:pull")
    }

    async fn send(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        authorization: Option<&Secret>,
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, FetchError> {
        self.transport.send(method, url, headers, authorization, body).await
    }

    /// The `Authorization` value for `scope`, from the last challenge: Basic with the credentials, or a
    /// (cached) bearer token. `None` before any challenge was seen.
    async fn authorization(&self, scope: &str) -> Result<Option<Secret>, FetchError> {
        let challenge = self.challenge.read().ok().and_then(|c| c.clone());
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.as_ref().map(|c| Secret(c.basic_header().into()))),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let key = TokenKey { realm, service, scope: scope.to_owned() };
                let started = Instant::now();
                let token = self
                    .tokens
                    .try_get_with(key.clone(), async {
                        let t = auth::fetch_token(&self.client, &key, self.credentials.as_ref(), self.timeout).await;
                        tracing::debug!(backend = %self.name, scope, elapsed_ms = started.elapsed().as_millis() as u64, ok = t.is_ok(), "token fetched");
                        t
                    })
                    .await
                    .map_err(FetchError::Token)?;
                Ok(Some(Secret(format!("Bearer {}", token.value.0).into())))
            }
        }
    }
}

/// An error with its causes (`client error (Connect): tcp connect error: Connection refused`):
/// hyper-util, tokio-postgres and deadpool keep the useful part in the source chain. A cause whose text
/// its parent already ends with is not repeated.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn classify(resp: reqwest::Response, redirects: Redirects) -> Answer {
    let s = resp.status();
    if s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE {
        return Answer::Found(resp);
    }
    if s.is_redirection() && redirects == Redirects::Pass && resp.headers().contains_key(http::header::LOCATION) {
        return Answer::Found(resp);
    }
    match s {
        StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::GONE => Answer::Missing(s),
        _ => Answer::Failed(FetchError::Status(s)),
    }
}
