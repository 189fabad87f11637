//! Registry transport: the OCI distribution protocol over HTTP.
//!
//! [`Client`] resolves references to root manifests and streams blobs into a
//! [`ContentWriter`], verifying size and digest on the way (the writer checks both before the
//! blob becomes visible). It owns everything the guest must not see: the scheme choice, the
//! bearer-token dance, and (later) credentials.
//!
//! - HTTPS by default; registries on loopback (`127.0.0.0/8`, `localhost`, `[::1]`) are
//!   spoken to in plain HTTP, as containerd and Docker allow.
//! - `docker.io` is served by `registry-1.docker.io`.
//! - Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=…,service=…,scope=…`) are
//!   fetched on the first 401 and cached per registry and repository.
//! - Blobs are streamed chunk by chunk; nothing is held whole in memory. An interrupted blob
//!   resumes from the ingest's offset with a `Range` request.
//!
//! Manifests are capped at [`MAX_MANIFEST`] bytes (4 MiB, as containerd's limit on manifests
//! and indexes), so a hostile registry cannot make the host buffer arbitrary amounts.

mod auth;
mod name;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use reqwest::{header, StatusCode};

pub use name::Repository;

use crate::{
    backend::{ContentWriter, LeaseId, ContentStore},
    error::{Error, Result},
    oci::{Descriptor, Digest, Hasher},
};

/// The largest manifest or index the host accepts (containerd uses the same bound).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// How many times a blob download is attempted before its error is reported.
const ATTEMPTS: u32 = 3;

/// Media types asked for when resolving, most specific first.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/json;q=0.1";

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

/// An OCI distribution client shared by every pull of a process.
pub struct Client {
    http: reqwest::Client,
    tokens: auth::TokenCache,
}

impl Client {
    /// A client with the platform's TLS roots.
    pub fn new() -> Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("pullbox/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::unavailable("cannot set up the HTTP client", e))?;
        Ok(Client { http, tokens: auth::TokenCache::default() })
    }

    /// Fetches the manifest or index `reference` (a tag or digest) of `repo`, verifies it,
    /// stores it in `content` under `lease`, and returns its descriptor.
    pub async fn resolve(
        &self,
        repo: &Repository,
        reference: &str,
        content: &dyn ContentStore,
        lease: &LeaseId,
    ) -> Result<Descriptor> {
        let pinned: Option<Digest> = if reference.contains(':') { Some(reference.parse()?) } else { None };
        if pinned.is_none() && !name::valid_tag(reference) {
            return Err(Error::InvalidArgument(format!("invalid tag {reference:?}")));
        }
        let url = repo.url(&format!("manifests/{reference}"));
        let what = format!("manifest {}:{reference}", repo);
        let resp = self.get(repo, &url, &[(header::ACCEPT, MANIFEST_ACCEPT.to_owned())], &what).await?;
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::parse::<Digest>)
            .transpose()?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(Error::ResourceExhausted(format!("{what} is larger than {MAX_MANIFEST} bytes")));
        }
        let body = read_capped(resp, MAX_MANIFEST, &what).await?;

        // The digest we trust: the one asked for, else the registry's, else our own hash.
        let expected = pinned.or(header_digest).unwrap_or_else(|| Digest::sha256_of(&body));
        let mut hasher = Hasher::new(expected.algorithm());
        hasher.update(&body);
        let actual = hasher.finish();
        if actual != expected {
            return Err(Error::Mismatch { what, expected: expected.to_string(), actual: actual.to_string() });
        }
        let media_type = match content_type.filter(|t| !t.is_empty() && t != "application/json" && t != "text/plain") {
            Some(t) => t,
            None => media_type_of(&body).ok_or_else(|| {
                Error::FailedPrecondition(format!("{what} has no media type"))
            })?,
        };
        let desc = Descriptor {
            media_type,
            digest: expected,
            size: body.len() as u64,
            annotations: Default::default(),
            platform: None,
            urls: Vec::new(),
        };
        match content.writer(&desc, lease).await {
            Ok(mut w) => {
                w.truncate().await?;
                w.write(&body).await?;
                w.commit().await?;
            }
            Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(desc)
    }

    /// Streams the blob `desc` of `repo` into `content` under `lease`, resuming an
    /// interrupted ingest, retrying transient failures. Returns once the blob is committed.
    pub async fn fetch(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        content: &dyn ContentStore,
        lease: &LeaseId,
        progress: &dyn Progress,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let writer = match content.writer(desc, lease).await {
                Ok(w) => w,
                Err(Error::AlreadyExists(_)) => {
                    progress.done(&desc.digest);
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            match self.fetch_once(repo, desc, writer, progress).await {
                Ok(()) => {
                    progress.done(&desc.digest);
                    return Ok(());
                }
                Err(e) if attempt < ATTEMPTS && e.code() == crate::error::Code::Unavailable => {
                    tracing::warn!(digest = %desc.digest, attempt, "blob download failed, retrying: {}", e.chain());
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch_once(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        mut writer: Box<dyn ContentWriter>,
        progress: &dyn Progress,
    ) -> Result<()> {
        // Manifests and indexes live under `manifests/`, everything else under `blobs/`.
        let endpoint = if is_manifest(&desc.media_type) { "manifests" } else { "blobs" };
        let url = repo.url(&format!("{endpoint}/{}", desc.digest));
        let what = format!("{} {}", &endpoint[..endpoint.len() - 1], desc.digest);
        let offset = writer.offset();
        let mut headers = Vec::new();
        if endpoint == "manifests" {
            // The distribution registry answers 404 for an OCI manifest that the request
            // does not say it accepts.
            headers.push((header::ACCEPT, MANIFEST_ACCEPT.to_owned()));
        }
        if offset > 0 && offset < desc.size {
            headers.push((header::RANGE, format!("bytes={offset}-")));
        }
        let resp = self.get(repo, &url, &headers, &what).await?;
        if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            writer.truncate().await?;
        }
        if let Some(len) = resp.content_length() {
            if writer.offset() + len > desc.size {
                return Err(Error::Mismatch {
                    what: format!("size of {what}"),
                    expected: desc.size.to_string(),
                    actual: (writer.offset() + len).to_string(),
                });
            }
        }
        progress.start(&desc.digest, writer.offset(), desc.size);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::unavailable(format!("reading {what}"), e))?;
            writer.write(&chunk).await?;
            progress.advance(&desc.digest, chunk.len() as u64);
        }
        writer.commit().await?;
        Ok(())
    }

    /// Sends a GET, answering a bearer challenge once; maps HTTP failures to errors.
    async fn get(
        &self,
        repo: &Repository,
        url: &str,
        headers: &[(header::HeaderName, String)],
        what: &str,
    ) -> Result<reqwest::Response> {
        let send = |token: Option<String>| {
            let mut req = self.http.get(url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send()
        };
        let token = self.tokens.get(repo);
        let mut resp = send(token.clone())
            .await
            .map_err(|e| Error::unavailable(format!("cannot reach {} for {what}", repo.registry()), e))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let Some(challenge) = resp.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()) {
                let challenge = challenge.to_owned();
                let token = self.tokens.fetch(&self.http, repo, &challenge).await?;
                resp = send(Some(token))
                    .await
                    .map_err(|e| Error::unavailable(format!("cannot reach {} for {what}", repo.registry()), e))?;
            }
        }
        check_status(resp, what).await
    }
}

/// Maps an HTTP status to pullbox's errors, keeping the registry's own error message.
async fn check_status(resp: reqwest::Response, what: &str) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let detail = registry_message(resp).await;
    let msg = match detail {
        Some(d) => format!("{what}: {status}: {d}"),
        None => format!("{what}: {status}"),
    };
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound(what.to_owned()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::PermissionDenied(msg),
        StatusCode::TOO_MANY_REQUESTS => Error::Unavailable { what: msg, source: None },
        s if s.is_server_error() => Error::Unavailable { what: msg, source: None },
        _ => Error::FailedPrecondition(msg),
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
async fn registry_message(resp: reqwest::Response) -> Option<String> {
    let body = read_capped(resp, 16 << 10, "error body").await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let e = v.get("errors")?.get(0)?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or_default();
    let message = e.get("message").and_then(|c| c.as_str()).unwrap_or_default();
    Some(format!("{code} {message}").trim().to_owned())
}

/// Reads a whole response body, refusing one larger than `cap` bytes.
async fn read_capped(resp: reqwest::Response, cap: u64, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::unavailable(format!("reading {what}"), e))?;
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

/// Shared handle to the client.
pub type SharedClient = Arc<Client>;
