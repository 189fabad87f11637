//! Registry transport: the OCI distribution protocol over HTTP(S), with containerd's host
//! configuration, authentication, retries, resumption and a stall timeout.
//!
//! [`Client`] resolves references to root manifests and streams blobs into a request's
//! [`Sink`] (the content writer under the request's lease, tee'd into a layer's stage),
//! verifying size and digest on the way (the writer checks both before the blob becomes
//! visible). It owns everything the guest must not see: which hosts serve a
//! registry, TLS, credentials and tokens. Key types:
//!
//! - [`Config`]: the hosts directory, the stall timeout and the retry policy.
//! - [`Credentials`] (with [`AuthConfig`] for the CRI and [`DockerConfig`] for the CLI): what
//!   one request authenticates with; carried by its [`Sink`], never stored beyond it except
//!   as the tokens it bought (see `auth`).
//! - [`Sink`] / [`BlobSink`]: where one request's downloads go (see `sink`).
//! - [`Progress`]: per-blob events for progress bars and metrics.
//! - [`Referrer`]: what [`Client::referrers`] lists (OCI 1.1 referrers API, with the tag
//!   schema fallback; see `referrers`).
//!
//! How a request travels:
//!
//! 1. The hosts of the registry come from `hosts.toml` (see `hosts`): mirrors in file order,
//!    the upstream last; only hosts with the `resolve` capability resolve, only hosts with
//!    `pull` serve blobs. The file is read on every call, so edits apply to the next pull
//!    without a restart, as in containerd.
//! 2. Each host is tried in turn. On one host, connection errors, broken bodies and 5xx
//!    answers (except 501 and 505) are retried [`Config::attempts`] times with exponential
//!    backoff from [`Config::backoff`] (capped at [`Config::max_backoff`], with jitter); a
//!    download that made progress before it broke resumes with `Range` from where the ingest
//!    stopped and does not use up an attempt. A 404, a refused authorization, a host that
//!    gives no answer within the stall timeout, or retries used up move on to the next
//!    host; the error of the last host is reported.
//! 3. A digest or size mismatch, a failing content store, or a body that stalls (no bytes
//!    for [`Config::stall_timeout`]) fails the call at once: the content writer never
//!    commits bytes that do not match their digest, and a stalled pull is cancelled rather
//!    than retried forever.
//! 4. Authentication follows the host's `WWW-Authenticate` challenge (see `auth`).
//! 5. Redirects (registries send blob GETs to object storage) are followed here, not by the
//!    HTTP library, at most [`MAX_REDIRECTS`] times: the `Authorization` header and the host's
//!    `hosts.toml` headers go only to the origin (scheme, host, port) of the host, never to
//!    one a redirect leads to, and a challenge from such a host is not answered; `Accept` and
//!    `Range` go along. A redirect from HTTPS to plain HTTP is refused (the next host is
//!    tried). The token service is not followed through redirects at all.
//!
//! Registry-friendly pulls, as containerd's:
//!
//! - A reference resolves with `HEAD` first; the manifest is fetched with `GET` only when the
//!   digest the `HEAD` names is not stored yet, so re-pulling an unchanged tag sends no `GET`
//!   (Docker Hub counts `GET`s of manifests against its pull limits). A host whose `HEAD`
//!   answer is of no use (no digest, size or media type; 405) is asked with `GET`.
//! - At most [`Config::max_concurrent_downloads`] blobs download at a time across every pull
//!   that shares the [`Client`] (the whole daemon).
//! - Every blob a pull resolves or downloads (or finds stored) carries containerd's
//!   [`DISTRIBUTION_SOURCE_LABEL`]`<registry>` label, the repositories it came from,
//!   comma-separated: peer mirrors that read the content store (Spegel, on the containerd
//!   backend) can serve what pullbox pulled.
//!
//! HTTP errors are reported without URLs (`reqwest::Error::without_url`): a redirect to
//! blob storage may carry a signed query string. Manifests are capped at [`MAX_MANIFEST`]
//! bytes (4 MiB, as containerd's limit on manifests and indexes), so a hostile registry cannot
//! make the host buffer arbitrary amounts.

mod auth;
mod docker_config;
pub mod hosts;
mod name;
mod referrers;
mod sink;

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use reqwest::{header, StatusCode};
use sha2::{Digest as _, Sha256};

pub use auth::{AuthConfig, CredentialProvider, Credentials, Secret};
pub use docker_config::DockerConfig;
pub use hosts::Host;
pub use name::{reference_registry, Repository};
pub use referrers::{Referrer, MAX_REFERRERS, MAX_REFERRERS_BYTES};
pub use sink::{BlobSink, Sink};

use crate::{
    backend::Stage,
    error::{Error, Result},
    oci::{Descriptor, Digest, Hasher},
};

/// The largest manifest or index the host accepts (containerd uses the same bound).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// The most redirects one request follows (Go's and reqwest's default).
pub const MAX_REDIRECTS: usize = 10;

/// containerd's default hosts directory, shared with it.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// containerd's default `max_concurrent_downloads`.
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 3;

/// The label prefix containerd writes on every blob it pulls: the key ends with the registry's
/// host, the value lists the repositories the blob came from, comma-separated. Peer mirrors
/// that read containerd's content store (Spegel) find what a node can serve through it.
pub const DISTRIBUTION_SOURCE_LABEL: &str = "containerd.io/distribution.source.";

/// Media types asked for when resolving, most specific first.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/json;q=0.1";

/// Settings of the transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// containerd's hosts directory; `None`: no host configuration, defaults only.
    pub hosts_dir: Option<PathBuf>,
    /// No bytes for this long cancels a download; no answer for this long gives up on a
    /// host. 60 s by default: long enough for a slow registry to start sending a large
    /// blob, short enough that a dead connection does not hold a pull (and kubelet) for long.
    pub stall_timeout: Duration,
    /// How long a TCP connection may take (containerd: 30 s).
    pub connect_timeout: Duration,
    /// How many times one host is tried for one request before the next host is (4).
    pub attempts: u32,
    /// The first retry's delay (250 ms), doubled for each retry after it.
    pub backoff: Duration,
    /// The longest delay between retries (4 s).
    pub max_backoff: Duration,
    /// How many blobs download at the same time, across every pull sharing this client (the
    /// whole daemon): containerd's `max_concurrent_downloads`, with its default of 3.
    pub max_concurrent_downloads: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            hosts_dir: Some(PathBuf::from(DEFAULT_HOSTS_DIR)),
            stall_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            attempts: 4,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        }
    }
}

/// Reports bytes as they arrive.
pub trait Progress: Send + Sync {
    /// A blob download starts (or resumes at `offset`).
    fn start(&self, digest: &Digest, offset: u64, total: u64);
    /// `n` more bytes of `digest` arrived.
    fn advance(&self, digest: &Digest, n: u64);
    /// The blob is complete and verified (or was present already).
    fn done(&self, digest: &Digest);
}

/// A progress sink that discards everything.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &Digest, _: u64, _: u64) {}
    fn advance(&self, _: &Digest, _: u64) {}
    fn done(&self, _: &Digest) {}
}

/// How one attempt on one host failed, which decides what happens next.
#[derive(Debug)]
enum Failure {
    /// Transient: try the same host again after a backoff.
    Retry(Error),
    /// This host cannot serve the request: try the next host.
    NextHost(Error),
    /// Nothing else will help: fail the call.
    Fatal(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Retry(e) | Failure::NextHost(e) | Failure::Fatal(e) => e,
        }
    }
}

/// An error of the token service or the credential lookup, as a failure of the request.
fn auth_failure(e: Error) -> Failure {
    match e.code() {
        crate::error::Code::Unavailable => Failure::Retry(e),
        crate::error::Code::PermissionDenied => Failure::NextHost(e),
        _ => Failure::Fatal(e),
    }
}

/// The key of a TLS configuration: a hash of the files' contents and `skip_verify`.
type TlsKey = [u8; 32];

/// Where one request goes: a repository on one host, through that host's HTTP client, with
/// the request's credentials.
struct Route<'a> {
    host: &'a Host,
    http: &'a reqwest::Client,
    repo: &'a Repository,
    credentials: &'a Credentials,
}

impl Route<'_> {
    /// The URL of `path` (`manifests/<ref>`, `blobs/<digest>`) in the repository on the host.
    fn url(&self, path: &str) -> String {
        self.host.url(self.repo.registry(), self.repo.path(), path)
    }
}

/// An OCI distribution client shared by every pull of a process.
pub struct Client {
    config: Config,
    /// The client for hosts without TLS settings (system roots).
    http: reqwest::Client,
    /// Clients for hosts with their own CAs, client certificates or `skip_verify`.
    tls_clients: Mutex<HashMap<TlsKey, reqwest::Client>>,
    auth: auth::Authorizer,
    /// One permit per download in flight ([`Config::max_concurrent_downloads`]).
    downloads: Arc<tokio::sync::Semaphore>,
}

impl Client {
    /// A client with the default [`Config`] (containerd's hosts directory, system roots).
    pub fn new() -> Result<Client> {
        Client::with_config(Config::default())
    }

    /// A client with `config`.
    pub fn with_config(config: Config) -> Result<Client> {
        let http =
            Self::builder(&config).build().map_err(|e| Error::unavailable("cannot set up the HTTP client", e))?;
        let downloads = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_downloads.max(1)));
        Ok(Client {
            config,
            http,
            tls_clients: Mutex::new(HashMap::new()),
            auth: auth::Authorizer::default(),
            downloads,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn builder(config: &Config) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .user_agent(concat!("pullbox/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            // Redirects are followed by `Client::send`, which decides what goes where.
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls()
    }

    /// The hosts to try for `registry`, in order.
    pub fn hosts(&self, registry: &str) -> Result<Vec<Host>> {
        hosts::hosts_for(self.config.hosts_dir.as_deref(), registry)
    }

    /// The HTTP client for `host`: the shared one, or one with the host's TLS settings.
    fn http_for(&self, host: &Host) -> Result<reqwest::Client> {
        if host.plain_http() || host.tls == hosts::TlsFiles::default() {
            return Ok(self.http.clone());
        }
        let bad = |what: String| Error::FailedPrecondition(format!("TLS settings of {}: {what}", host.authority));
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| bad(format!("cannot read {}: {e}", p.display())));
        let mut key = Sha256::new();
        key.update([host.tls.skip_verify as u8]);
        let mut cas = Vec::new();
        for p in &host.tls.ca {
            let pem = read(p)?;
            key.update(b"ca");
            key.update(Sha256::digest(&pem));
            cas.push((p, pem));
        }
        let mut identities = Vec::new();
        for (cert, keyfile) in &host.tls.client {
            let mut pem = read(cert)?;
            if let Some(k) = keyfile {
                pem.push(b'\n');
                pem.extend(read(k)?);
            }
            key.update(b"client");
            key.update(Sha256::digest(&pem));
            identities.push((cert, pem));
        }
        let key: TlsKey = key.finalize().into();
        if let Some(c) = self.tls_clients.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let mut b = Self::builder(&self.config);
        for (p, pem) in cas {
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|_| bad(format!("{} is not a PEM certificate bundle", p.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("{} holds no certificate", p.display())));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if identities.len() > 1 {
            tracing::warn!(host = %host.authority, "several client certificates configured; using the first");
        }
        if let Some((p, pem)) = identities.into_iter().next() {
            let id = reqwest::Identity::from_pem(&pem).map_err(|_| {
                bad(format!("{} (and its key) is not a PEM certificate with a private key", p.display()))
            })?;
            b = b.identity(id);
        }
        if host.tls.skip_verify {
            tracing::warn!(host = %host.authority, "skip_verify: the certificate of this host is not verified");
            b = b.danger_accept_invalid_certs(true);
        }
        let client = b.build().map_err(|e| bad(format!("cannot set up TLS: {}", Error::unavailable("", e).chain())))?;
        self.tls_clients.lock().unwrap_or_else(|e| e.into_inner()).insert(key, client.clone());
        Ok(client)
    }

    /// The delay before retry number `failures` (1-based): exponential, capped, with up to
    /// 50 % jitter so that parallel downloads do not retry in lockstep.
    fn backoff(&self, failures: u32) -> Duration {
        let base = self.config.backoff.saturating_mul(1 << failures.saturating_sub(1).min(16));
        let base = base.min(self.config.max_backoff);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        base + base.mul_f64(f64::from(nanos % 500) / 1000.0)
    }

    /// Runs `op` on each host in turn (see the module docs). `op` gets the host and its
    /// HTTP client and does its own retries.
    async fn on_hosts<T, F, Fut>(&self, registry: &str, hosts: Vec<Host>, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Host, reqwest::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        if hosts.is_empty() {
            return Err(Error::FailedPrecondition(format!("no configured host of {registry} may serve {what}")));
        }
        let count = hosts.len();
        let mut last = None;
        for (i, host) in hosts.into_iter().enumerate() {
            let authority = host.authority.clone();
            let http = match self.http_for(&host) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(host = %authority, "skipping host: {}", e.chain());
                    last = Some(e);
                    continue;
                }
            };
            match op(host, http).await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(f) => {
                    let e = f.into_error();
                    if i + 1 < count {
                        tracing::info!(host = %authority, "{what}: trying the next host: {}", e.chain());
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one host was tried"))
    }

    /// Retries `op` on one host while it fails transiently.
    async fn retrying<T, F, Fut>(&self, host: &Host, what: &str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut failures = 0;
        loop {
            match op().await {
                Err(Failure::Retry(e)) => {
                    failures += 1;
                    if failures >= self.config.attempts {
                        return Err(Failure::NextHost(e));
                    }
                    let delay = self.backoff(failures);
                    tracing::warn!(host = %host.authority, attempt = failures, ?delay, "{what} failed, retrying: {}", e.chain());
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Resolves the manifest or index `reference` (a tag or digest) of `repo`, makes sure it
    /// is stored in `sink` (verified, under its lease), labels it with its distribution
    /// source, and returns its descriptor.
    ///
    /// Each host is asked with `HEAD` first: when its answer names a digest that is stored
    /// already, nothing more is sent (registries such as Docker Hub count manifest `GET`s
    /// against pull limits, `HEAD`s not). Otherwise the manifest is fetched with `GET` by the
    /// digest the `HEAD` named, or by `reference` when the host's `HEAD` answer is of no use
    /// (no `Docker-Content-Digest`, `Content-Length` or `Content-Type`, or a status such as
    /// 405).
    pub async fn resolve(&self, repo: &Repository, reference: &str, sink: &Sink) -> Result<Descriptor> {
        let pinned: Option<Digest> = if reference.contains(':') { Some(reference.parse()?) } else { None };
        if pinned.is_none() && !name::valid_tag(reference) {
            return Err(Error::InvalidArgument(format!("invalid tag {reference:?}")));
        }
        let what = format!("manifest {repo}:{reference}");
        let hosts: Vec<Host> = self.hosts(repo.registry())?.into_iter().filter(|h| h.capabilities.resolve).collect();
        let (desc, body) = self
            .on_hosts(repo.registry(), hosts, &what, |host, http| {
                let (what, pinned) = (&what, pinned.clone());
                async move {
                    let route = Route { host: &host, http: &http, repo, credentials: sink.credentials() };
                    let head =
                        self.retrying(&host, what, || self.head_once(&route, reference, pinned.as_ref(), what)).await?;
                    let (reference, pinned) = match head {
                        Some(desc) => {
                            if sink.holds(&desc).await.map_err(Failure::Fatal)? {
                                tracing::debug!(%repo, reference, digest = %desc.digest, "resolved with HEAD; stored already");
                                return Ok((desc, None));
                            }
                            (desc.digest.to_string(), Some(desc.digest))
                        }
                        None => (reference.to_owned(), pinned),
                    };
                    self.retrying(&host, what, || self.resolve_once(&route, &reference, pinned.clone(), what))
                    .await
                    .map(|(desc, body)| (desc, Some(body)))
                }
            })
            .await?;
        tracing::debug!(%repo, reference, digest = %desc.digest, size = desc.size, "resolved");
        if let Some(body) = body {
            sink.put(&desc, &body).await?;
        }
        sink.label_source(&desc.digest, repo).await;
        Ok(desc)
    }

    /// Asks one host for the manifest `reference` with `HEAD`: its descriptor when the answer
    /// names digest, size and media type; `None` when it does not, or the host answers `HEAD`
    /// with an error that a `GET` may not share (405, 400, ...): the caller then uses `GET`.
    async fn head_once(
        &self,
        route: &Route<'_>,
        reference: &str,
        pinned: Option<&Digest>,
        what: &str,
    ) -> Result<Option<Descriptor>, Failure> {
        let host = route.host;
        let url = route.url(&format!("manifests/{reference}"));
        let accept = [(header::ACCEPT, MANIFEST_ACCEPT.to_owned())];
        let resp = match self.request(reqwest::Method::HEAD, route, &url, &accept, what).await {
            Ok(r) => r,
            // A GET would be refused the same way, or not found, or not answered: no fallback.
            Err(Failure::NextHost(e))
                if !matches!(e, Error::NotFound(_) | Error::Unavailable { .. } | Error::PermissionDenied(_)) =>
            {
                tracing::debug!(host = %host.authority, "{what}: HEAD failed, trying GET: {}", e.chain());
                return Ok(None);
            }
            Err(f) => return Err(f),
        };
        let headers = resp.headers();
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let digest =
            text(header::HeaderName::from_static("docker-content-digest")).and_then(|d| d.parse::<Digest>().ok());
        let size = text(header::CONTENT_LENGTH).and_then(|n| n.parse::<u64>().ok());
        let media_type = text(header::CONTENT_TYPE)
            .map(|t| t.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|t| is_manifest(t));
        match (digest, size, media_type) {
            (Some(digest), Some(size), Some(media_type))
                if size > 0 && size <= MAX_MANIFEST && pinned.is_none_or(|p| *p == digest) =>
            {
                Ok(Some(Descriptor {
                    media_type,
                    digest,
                    size,
                    annotations: Default::default(),
                    platform: None,
                    urls: Vec::new(),
                }))
            }
            _ => {
                tracing::debug!(host = %host.authority, "{what}: the HEAD answer names no usable descriptor, trying GET");
                Ok(None)
            }
        }
    }

    /// Fetches the manifest `reference` from one host with `GET` and verifies it against
    /// `pinned` (else the digest the host names, else its own hash).
    async fn resolve_once(
        &self,
        route: &Route<'_>,
        reference: &str,
        pinned: Option<Digest>,
        what: &str,
    ) -> Result<(Descriptor, Vec<u8>), Failure> {
        let host = route.host;
        let url = route.url(&format!("manifests/{reference}"));
        let accept = [(header::ACCEPT, MANIFEST_ACCEPT.to_owned())];
        let resp = self.request(reqwest::Method::GET, route, &url, &accept, what).await?;
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(Failure::NextHost)?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(Failure::Fatal(Error::ResourceExhausted(format!(
                "{what} is larger than {MAX_MANIFEST} bytes"
            ))));
        }
        let body =
            read_capped(resp, MAX_MANIFEST, what, self.config.stall_timeout).await.map_err(|e| match e.code() {
                crate::error::Code::Unavailable => Failure::Retry(e),
                _ => Failure::Fatal(e),
            })?;

        // The digest we trust: the one asked for, else the registry's, else our own hash.
        let expected = pinned.or(header_digest).unwrap_or_else(|| Digest::sha256_of(&body));
        let mut hasher = Hasher::new(expected.algorithm());
        hasher.update(&body);
        let actual = hasher.finish();
        if actual != expected {
            return Err(Failure::Fatal(Error::Mismatch {
                what: format!("{what} from {}", host.authority),
                expected: expected.to_string(),
                actual: actual.to_string(),
            }));
        }
        let media_type = match content_type.filter(|t| !t.is_empty() && t != "application/json" && t != "text/plain") {
            Some(t) => t,
            None => media_type_of(&body)
                .ok_or_else(|| Failure::Fatal(Error::FailedPrecondition(format!("{what} has no media type"))))?,
        };
        let desc = Descriptor {
            media_type,
            digest: expected,
            size: body.len() as u64,
            annotations: Default::default(),
            platform: None,
            urls: Vec::new(),
        };
        Ok((desc, body))
    }

    /// Streams the blob `desc` of `repo` into `sink`, resuming an interrupted ingest,
    /// retrying transient failures, falling back to the next host; every chunk stored also
    /// goes to `stage`, a layer unpacking as it downloads. Returns once the blob is committed.
    pub async fn fetch(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        sink: &Sink,
        stage: Option<&dyn Stage>,
    ) -> Result<()> {
        // Manifests and indexes live under `manifests/`, everything else under `blobs/`.
        let endpoint = if is_manifest(&desc.media_type) { "manifests" } else { "blobs" };
        let what = format!("{} {}", &endpoint[..endpoint.len() - 1], desc.digest);
        let hosts: Vec<Host> = self.hosts(repo.registry())?.into_iter().filter(|h| h.capabilities.pull).collect();
        // Node-wide: every pull sharing this client waits for the same permits.
        let _permit =
            self.downloads.acquire().await.map_err(|_| Error::Cancelled("the download queue is closed".into()))?;
        let started = Instant::now();
        let result = self
            .on_hosts(repo.registry(), hosts, &what, |host, http| {
                let what = &what;
                async move {
                    let route = Route { host: &host, http: &http, repo, credentials: sink.credentials() };
                    let mut failures = 0;
                    loop {
                        let Some(mut blob) = sink.open(desc, stage).await.map_err(Failure::Fatal)? else {
                            return Ok(());
                        };
                        let attempt = self.fetch_once(&route, &mut blob, endpoint, what).await;
                        let written = blob.written();
                        let attempt = match attempt {
                            Ok(()) => blob.commit().await.map_err(Failure::Fatal),
                            Err(f) => {
                                // Closed before any backoff: a writer waiting for this ingest
                                // may take it meanwhile.
                                drop(blob);
                                Err(f)
                            }
                        };
                        match attempt {
                            Err(Failure::Retry(e)) => {
                                // Progress made: the next attempt resumes; it is a first failure.
                                failures = if written > 0 { 1 } else { failures + 1 };
                                if failures >= self.config.attempts {
                                    return Err(Failure::NextHost(e));
                                }
                                let delay = self.backoff(failures);
                                tracing::warn!(host = %host.authority, attempt = failures, written, ?delay, "{what} failed, retrying: {}", e.chain());
                                tokio::time::sleep(delay).await;
                            }
                            other => return other,
                        }
                    }
                }
            })
            .await;
        match &result {
            Ok(()) => {
                sink.label_source(&desc.digest, repo).await;
                sink.progress().done(&desc.digest);
                tracing::debug!(digest = %desc.digest, size = desc.size, elapsed = ?started.elapsed(), "blob ready");
            }
            Err(e) => tracing::debug!(digest = %desc.digest, "blob download failed: {}", e.chain()),
        }
        result
    }

    /// One download attempt from one host into `blob` (from `endpoint`, `manifests` or
    /// `blobs`); the caller commits the blob once the attempt has stored all of it.
    async fn fetch_once(
        &self,
        route: &Route<'_>,
        blob: &mut BlobSink<'_>,
        endpoint: &str,
        what: &str,
    ) -> Result<(), Failure> {
        let (host, desc) = (route.host, blob.descriptor().clone());
        let url = route.url(&format!("{endpoint}/{}", desc.digest));
        let mut offset = blob.offset();
        if offset > desc.size {
            blob.truncate().await.map_err(Failure::Fatal)?;
            offset = 0;
        }
        let mut headers = Vec::new();
        if endpoint == "manifests" {
            // The distribution registry answers 404 for an OCI manifest that the request
            // does not say it accepts.
            headers.push((header::ACCEPT, MANIFEST_ACCEPT.to_owned()));
        }
        if offset > 0 && offset < desc.size {
            headers.push((header::RANGE, format!("bytes={offset}-")));
        }
        let resp = self.request(reqwest::Method::GET, route, &url, &headers, what).await?;
        if offset > 0 {
            let resumed_at = (resp.status() == StatusCode::PARTIAL_CONTENT)
                .then(|| resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(range_start))
                .flatten();
            if resumed_at != Some(offset) {
                // The host sent the whole blob (or another range): start over.
                tracing::debug!(host = %host.authority, digest = %desc.digest, offset, "host does not resume; starting over");
                blob.truncate().await.map_err(Failure::Fatal)?;
                if resp.status() == StatusCode::PARTIAL_CONTENT {
                    return Err(Failure::Retry(Error::Unavailable {
                        what: format!("{what}: {} answered a range that was not asked for", host.authority),
                        source: None,
                    }));
                }
            }
        }
        let mut pos = blob.offset();
        if let Some(len) = resp.content_length() {
            if pos + len != desc.size {
                return Err(Failure::Fatal(Error::Mismatch {
                    what: format!("size of {what} from {}", host.authority),
                    expected: desc.size.to_string(),
                    actual: (pos + len).to_string(),
                }));
            }
        }
        tracing::debug!(host = %host.authority, digest = %desc.digest, offset = pos, size = desc.size, "downloading");
        blob.start();
        let stall = self.config.stall_timeout;
        let mut body = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(stall, body.next()).await {
                Err(_) => {
                    return Err(Failure::Fatal(Error::Unavailable {
                        what: format!(
                            "download of {what} from {} stalled: no data for {} (stall timeout) at byte {pos} of {}",
                            host.authority,
                            seconds(stall),
                            desc.size
                        ),
                        source: None,
                    }))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Failure::Retry(Error::unavailable(
                        format!("reading {what} from {} at byte {pos}", host.authority),
                        e.without_url(),
                    )))
                }
                Ok(Some(Ok(c))) => c,
            };
            if pos + chunk.len() as u64 > desc.size {
                return Err(Failure::Fatal(Error::Mismatch {
                    what: format!("size of {what} from {}", host.authority),
                    expected: desc.size.to_string(),
                    actual: format!("more than {}", desc.size),
                }));
            }
            pos += chunk.len() as u64;
            blob.write(chunk).await.map_err(Failure::Fatal)?;
        }
        if pos < desc.size {
            // The connection ended early without an error: resume.
            return Err(Failure::Retry(Error::Unavailable {
                what: format!("{what} from {} ended at byte {pos} of {}", host.authority, desc.size),
                source: None,
            }));
        }
        Ok(())
    }

    /// Sends a `method` (GET or HEAD) request to `host`, answering an authentication
    /// challenge once; maps HTTP failures to [`Failure`]s.
    async fn request(
        &self,
        method: reqwest::Method,
        route: &Route<'_>,
        url: &str,
        headers: &[(header::HeaderName, String)],
        what: &str,
    ) -> Result<reqwest::Response, Failure> {
        let Route { host, http, repo, credentials } = *route;
        let origin = host.origin();
        let target = auth::Target {
            origin: &origin,
            host: &host.authority,
            plain_http: host.plain_http(),
            registry: repo.registry(),
            repository: repo.path(),
            mirror: host.mirror,
        };
        let url = reqwest::Url::parse(url).map_err(|_| {
            Failure::Fatal(Error::InvalidArgument(format!("{what}: no valid URL on {}", host.authority)))
        })?;
        let home = url.origin();
        let stall = self.config.stall_timeout;
        let mut authz = self.auth.authorize(http, &target, credentials, stall).await.map_err(auth_failure)?;
        let mut challenged = false;
        loop {
            let resp = self.send(&method, route, url.clone(), headers, authz.header.as_ref(), what).await?;
            // A challenge from a host redirected to is not answered: the credentials are not
            // for it.
            let redirected = resp.url().origin() != home;
            if resp.status() == StatusCode::UNAUTHORIZED && !challenged && !redirected {
                challenged = true;
                if self.auth.challenged(&target, &resp, &authz) {
                    let next = self.auth.authorize(http, &target, credentials, stall).await.map_err(auth_failure)?;
                    if next.header.is_some() {
                        authz = next;
                        continue;
                    }
                    authz = next;
                }
            }
            let place = if redirected {
                format!("{} (redirected to {})", host.authority, authority_of(resp.url()))
            } else {
                host.authority.clone()
            };
            return check_status(resp, what, &place, &authz, stall).await;
        }
    }

    /// Sends one `method` request (GET or HEAD) of `url` to `host` and follows its redirects, at most
    /// [`MAX_REDIRECTS`]. `authorization` and the host's `hosts.toml` headers go only to
    /// `url`'s origin (scheme, host and port), never to another one a redirect leads to;
    /// `headers` (`Accept`, `Range`) go to every hop. A redirect from HTTPS to plain HTTP is
    /// refused. Returns the first answer that is not a redirect.
    async fn send(
        &self,
        method: &reqwest::Method,
        route: &Route<'_>,
        mut url: reqwest::Url,
        headers: &[(header::HeaderName, String)],
        authorization: Option<&header::HeaderValue>,
        what: &str,
    ) -> Result<reqwest::Response, Failure> {
        let (http, host) = (route.http, route.host);
        let home = url.origin();
        let stall = self.config.stall_timeout;
        let mut hops = 0;
        loop {
            let at_home = url.origin() == home;
            let place = if at_home {
                host.authority.clone()
            } else {
                format!("{} (redirected to {})", host.authority, authority_of(&url))
            };
            let mut req = http.request(method.clone(), url.clone());
            if at_home {
                for (k, v) in &host.headers {
                    req = req.header(k, v);
                }
                if let Some(h) = authorization {
                    req = req.header(header::AUTHORIZATION, h.clone());
                }
            }
            for (k, v) in headers {
                req = req.header(k, v);
            }
            // The path only: a redirect's query string may be a signature.
            tracing::trace!(host = %authority_of(&url), path = url.path(), authorized = at_home && authorization.is_some(), "{method}");
            let resp = match tokio::time::timeout(stall, req.send()).await {
                Err(_) => {
                    return Err(Failure::NextHost(Error::Unavailable {
                        what: format!("{place} did not answer {what} within {} (stall timeout)", seconds(stall)),
                        source: None,
                    }))
                }
                Ok(Err(e)) => {
                    let retry = transient(&e);
                    let e = Error::unavailable(format!("cannot reach {place} for {what}"), e.without_url());
                    return Err(if retry { Failure::Retry(e) } else { Failure::NextHost(e) });
                }
                Ok(Ok(r)) => r,
            };
            tracing::trace!(host = %authority_of(&url), status = %resp.status(), "answer");
            let followed = matches!(
                resp.status(),
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            );
            // A redirect without a location is an answer like any other (check_status).
            let Some(location) = resp.headers().get(header::LOCATION).filter(|_| followed) else { return Ok(resp) };
            let refuse = |why: String| Failure::NextHost(Error::FailedPrecondition(format!("{what}: {place} {why}")));
            let next = location
                .to_str()
                .ok()
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| refuse("redirected to an invalid location".into()))?;
            match (url.scheme(), next.scheme()) {
                ("https", "https") | ("http", "http") | ("http", "https") => {}
                ("https", "http") => {
                    return Err(refuse(format!(
                        "redirected from HTTPS to plain HTTP ({}); refusing to follow a redirect that drops TLS",
                        authority_of(&next)
                    )))
                }
                (_, other) => return Err(refuse(format!("redirected to an unsupported scheme {other:?}"))),
            }
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(refuse(format!("redirected more than {MAX_REDIRECTS} times")));
            }
            tracing::debug!(
                host = %host.authority,
                to = %authority_of(&next),
                status = %resp.status(),
                credentials = next.origin() == home,
                "{what}: following a redirect"
            );
            url = next;
        }
    }
}

/// `repositories` (a [`DISTRIBUTION_SOURCE_LABEL`] value) with `path` added: comma-separated,
/// sorted, without duplicates, as containerd writes it. `None` when `path` is listed already.
pub fn merge_source(repositories: Option<&str>, path: &str) -> Option<String> {
    let mut all: Vec<&str> = repositories.unwrap_or_default().split(',').filter(|r| !r.is_empty()).collect();
    if all.contains(&path) {
        return None;
    }
    all.push(path);
    all.sort_unstable();
    Some(all.join(","))
}

/// `host[:port]` of a URL, for messages (never its path or query, which may be signed).
fn authority_of(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => String::new(),
    }
}

/// Whether a failed request is worth retrying on the same host: refused or reset
/// connections and timeouts are; TLS failures (a certificate that is not trusted does not
/// become trusted) and malformed answers, which surface as `InvalidData`, are not.
fn transient(e: &reqwest::Error) -> bool {
    // rustls's errors are boxed inside the connector's errors; their variant names are the
    // stable way to recognize them through the layers.
    let debug = format!("{e:?}");
    if [
        "InvalidCertificate",
        "AlertReceived",
        "InvalidMessage",
        "PeerIncompatible",
        "PeerMisbehaved",
        "NoCertificatesPresented",
    ]
    .iter()
    .any(|v| debug.contains(v))
    {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData) {
            return false;
        }
        source = s.source();
    }
    true
}

/// `N s` or `N ms`, for messages.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The first byte of a `Content-Range: bytes A-B/N` value.
fn range_start(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes")?.trim().split('-').next()?.trim().parse().ok()
}

/// Maps an HTTP status to a [`Failure`], keeping the registry's own error message.
async fn check_status(
    resp: reqwest::Response,
    what: &str,
    host: &str,
    authz: &auth::Authorization,
    stall: Duration,
) -> Result<reqwest::Response, Failure> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let detail = registry_message(resp, stall).await;
    let mut msg = match detail {
        Some(d) => format!("{what}: {host} answered {status}: {d}"),
        None => format!("{what}: {host} answered {status}"),
    };
    Err(match status {
        StatusCode::NOT_FOUND => Failure::NextHost(Error::NotFound(format!("{what} on {host}"))),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            msg.push_str(match (authz.header.is_some(), authz.had_credentials) {
                (true, _) => " (the credentials were refused)",
                (false, true) => " (the credentials do not fit the authentication the host asks for)",
                (false, false) => " (no credentials for this host)",
            });
            Failure::NextHost(Error::PermissionDenied(msg))
        }
        StatusCode::NOT_IMPLEMENTED | StatusCode::HTTP_VERSION_NOT_SUPPORTED => {
            Failure::NextHost(Error::Unavailable { what: msg, source: None })
        }
        s if s.is_server_error() => Failure::Retry(Error::Unavailable { what: msg, source: None }),
        StatusCode::TOO_MANY_REQUESTS => Failure::NextHost(Error::Unavailable { what: msg, source: None }),
        _ => Failure::NextHost(Error::FailedPrecondition(msg)),
    })
}

/// Whether `media_type` is a manifest or index, served under `manifests/`.
fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.oci.image.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
            | "application/vnd.docker.distribution.manifest.v2+json"
            | "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
}

/// The first message of a distribution-spec error body, if there is one.
async fn registry_message(resp: reqwest::Response, stall: Duration) -> Option<String> {
    let body = read_capped(resp, 16 << 10, "error body", stall).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let e = v.get("errors")?.get(0)?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or_default();
    let message = e.get("message").and_then(|c| c.as_str()).unwrap_or_default();
    Some(format!("{code} {message}").trim().to_owned())
}

/// Reads a whole response body, refusing one larger than `cap` bytes or one that stalls for
/// `stall`.
async fn read_capped(resp: reqwest::Response, cap: u64, what: &str, stall: Duration) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    loop {
        let chunk = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => {
                return Err(Error::Unavailable {
                    what: format!("reading {what}: no data for {}", seconds(stall)),
                    source: None,
                })
            }
            Ok(None) => break,
            Ok(Some(c)) => c.map_err(|e| Error::unavailable(format!("reading {what}"), e.without_url()))?,
        };
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Err(Error::ResourceExhausted(format!("{what} is larger than {cap} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The `mediaType` field of a manifest or index body.
fn media_type_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let p: Probe = serde_json::from_slice(body).ok()?;
    match (p.media_type, p.schema_version) {
        (Some(t), _) => Some(t),
        (None, Some(1)) => Some("application/vnd.docker.distribution.manifest.v1+json".to_owned()),
        _ => None,
    }
}

/// Where a request's registry imports go: the network ([`Client`]), or a recorded pull
/// ([`crate::backend::replay`], which answers from what a pull read before and downloads
/// nothing). The image service and sessions hold one as a [`SharedClient`].
#[async_trait::async_trait]
pub trait Remote: Send + Sync {
    /// How many blobs may download at once across every pull sharing this remote.
    fn max_concurrent_downloads(&self) -> usize;

    /// See [`Client::resolve`].
    async fn resolve(&self, repo: &Repository, reference: &str, sink: &Sink) -> Result<Descriptor>;

    /// See [`Client::fetch`].
    async fn fetch(&self, repo: &Repository, desc: &Descriptor, sink: &Sink, stage: Option<&dyn Stage>) -> Result<()>;

    /// See [`Client::referrers`].
    async fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: &str,
        credentials: &Credentials,
    ) -> Result<Vec<Referrer>>;
}

#[async_trait::async_trait]
impl Remote for Client {
    fn max_concurrent_downloads(&self) -> usize {
        self.config.max_concurrent_downloads
    }

    async fn resolve(&self, repo: &Repository, reference: &str, sink: &Sink) -> Result<Descriptor> {
        Client::resolve(self, repo, reference, sink).await
    }

    async fn fetch(&self, repo: &Repository, desc: &Descriptor, sink: &Sink, stage: Option<&dyn Stage>) -> Result<()> {
        Client::fetch(self, repo, desc, sink, stage).await
    }

    async fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: &str,
        credentials: &Credentials,
    ) -> Result<Vec<Referrer>> {
        Client::referrers(self, repo, digest, artifact_type, credentials).await
    }
}

/// Shared handle to the remote a service pulls from.
pub type SharedClient = Arc<dyn Remote>;

#[cfg(test)]
mod tests;
