//! The CRI `ImageService` (runtime.v1) over the image service: what kubelet talks to.
//!
//! Each RPC goes through one export of the puller. Where the CRI leaves behaviour open, this
//! does what containerd's CRI plugin does:
//!
//! - `PullImage` answers `image_ref` = the image ID (the config digest), which is also
//!   `Image.id` in every other answer. The pull runs in its own task with a cancellation
//!   token: a client that hangs up, or the daemon shutting down, cancels it, and the pull
//!   then stops its downloads and deletes its lease before the task ends — never cut in half.
//! - `ImageStatus` of an unknown image is an empty response, not an error; with `verbose`,
//!   `info["info"]` holds a JSON document with the chain ID, manifest digest and image config.
//! - `ListImages` with a filter answers the one image the filter names (or none).
//! - `RemoveImage` of an unknown image succeeds.
//! - `ImageFsInfo` reports the filesystem holding the snapshots and what the images use, as
//!   last measured: a background task walks the tree every `image_fs_stats_period_seconds`
//!   (containerd's `stats_collect_period`, 10 s), so the call costs no walk (kubelet asks
//!   often, and a walk of a store with many images takes seconds). The `timestamp` is the
//!   measurement's; the first call waits for the first measurement.
//! - `PullImage` credentials (`AuthConfig`) are bound to their `server_address`, or without
//!   one to the registry of the request's reference as the host parses it, never to a
//!   registry the puller names (see `registry::auth`).
//! - `PullImage` hands the puller what the request says the image is for: the image spec's
//!   `runtime_handler` and annotations, and from `sandbox_config` the pod's namespace, name,
//!   uid, labels and annotations (no pod when the request has no sandbox config).
//! - `uid`/`username` come from the config's `User`: a numeric user (before any `:group`) is
//!   a uid, anything else a user name, as containerd's `getUserFromImage`.
//!
//! Errors map to gRPC status codes in one place, [`status`]. Connections reach tonic through
//! [`authority::NormalizeAuthority`], which lets grpc C-core and grpc-java clients in (they
//! send the socket path as `:authority`, which `h2` refuses).

pub mod authority;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_cri::v1::{
    image_service_server::ImageService as CriImageService, FilesystemIdentifier, FilesystemUsage, Image,
    ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};

use crate::{
    backend::embedded::image_fs_usage,
    image::ImageInfo,
    metrics::Metrics,
    oci::Platform,
    registry::{reference_registry, AuthConfig, Credentials},
    service::{ImageService, PodContext, PullContext, ServiceError},
};
use tokio_util::sync::CancellationToken;

/// The CRI image service.
pub struct Cri {
    service: Arc<ImageService>,
    metrics: Arc<Metrics>,
    /// The last measurement of the directory `ImageFsInfo` reports (where snapshots live);
    /// `None` until the first one.
    fs_usage: tokio::sync::watch::Receiver<Option<FilesystemUsage>>,
    /// Cancelled at shutdown; every pull's token is a child of it.
    shutdown: CancellationToken,
    /// Pulls in flight, so shutdown can wait for their cleanup.
    pulls: tokio_util::task::TaskTracker,
}

impl Cri {
    /// The CRI service over `service`; `fs_root` is the directory `ImageFsInfo` reports, its
    /// disk use measured every `stats_period` until `shutdown` is cancelled; cancelling
    /// `shutdown` also cancels every pull in flight. Must be called inside a tokio runtime.
    pub fn new(
        service: Arc<ImageService>,
        metrics: Arc<Metrics>,
        fs_root: PathBuf,
        stats_period: Duration,
        shutdown: CancellationToken,
    ) -> Cri {
        let (tx, fs_usage) = tokio::sync::watch::channel(None);
        tokio::spawn(measure_fs(fs_root, stats_period, tx, shutdown.clone()));
        Cri { service, metrics, fs_usage, shutdown, pulls: tokio_util::task::TaskTracker::new() }
    }

    /// The tracker of pulls in flight: after cancelling the shutdown token, close it and wait
    /// on it so that every cancelled pull has cleaned up before the process exits.
    pub fn pulls(&self) -> tokio_util::task::TaskTracker {
        self.pulls.clone()
    }
}

/// Measures the disk use of `root` every `period` and publishes it to `tx`, until `shutdown`
/// is cancelled or nobody listens any more.
async fn measure_fs(
    root: PathBuf,
    period: Duration,
    tx: tokio::sync::watch::Sender<Option<FilesystemUsage>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    // A slow walk delays the next one instead of starting several back to back.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
        }
        let dir = root.clone();
        let started = Instant::now();
        let usage = match tokio::task::spawn_blocking(move || image_fs_usage(&dir)).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("disk usage task failed: {e}");
                continue;
            }
        };
        tracing::trace!(bytes = usage.size, inodes = usage.inodes, elapsed = ?started.elapsed(), "measured the image filesystem");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let answer = FilesystemUsage {
            timestamp: now,
            fs_id: Some(FilesystemIdentifier { mountpoint: root.display().to_string() }),
            used_bytes: Some(UInt64Value { value: usage.size }),
            inodes_used: Some(UInt64Value { value: usage.inodes }),
        };
        if tx.send(Some(answer)).is_err() {
            return;
        }
    }
}

/// The gRPC status of a failed operation.
pub fn status(e: &ServiceError) -> Status {
    let code = e.code().into();
    let message = match e {
        ServiceError::Host(h) => h.chain(),
        other => other.to_string(),
    };
    Status::new(code, message)
}

/// The registry's view of a CRI `AuthConfig` (same fields).
fn pullbox_auth(a: &k8s_cri::v1::AuthConfig) -> AuthConfig {
    AuthConfig {
        username: a.username.clone(),
        password: a.password.clone(),
        auth: a.auth.clone(),
        server_address: a.server_address.clone(),
        identity_token: a.identity_token.clone(),
        registry_token: a.registry_token.clone(),
    }
}

/// The image reference of a request, or `InvalidArgument`.
fn reference(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(r) if !r.is_empty() => Ok(r),
        _ => Err(Status::invalid_argument("no image reference in the request")),
    }
}

/// What a `PullImage` request says the image is for.
fn context(req: &PullImageRequest) -> PullContext {
    fn collect(m: &std::collections::HashMap<String, String>) -> std::collections::BTreeMap<String, String> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
    let spec = req.image.as_ref();
    PullContext {
        runtime_handler: spec.map(|s| s.runtime_handler.clone()).unwrap_or_default(),
        annotations: spec.map(|s| collect(&s.annotations)).unwrap_or_default(),
        pod: req.sandbox_config.as_ref().map(|c| {
            let meta = c.metadata.clone().unwrap_or_default();
            PodContext {
                namespace: meta.namespace,
                name: meta.name,
                uid: meta.uid,
                labels: collect(&c.labels),
                annotations: collect(&c.annotations),
            }
        }),
    }
}

/// Splits a config `User` into CRI's uid or user name.
fn user(u: &str) -> (Option<Int64Value>, String) {
    let name = u.split(':').next().unwrap_or_default();
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(Int64Value { value: uid }), String::new()),
        Err(_) => (None, name.to_owned()),
    }
}

/// The CRI image of a puller answer.
fn image(i: ImageInfo) -> Image {
    let (uid, username) = user(&i.user);
    Image {
        spec: Some(ImageSpec { image: i.id.clone(), ..ImageSpec::default() }),
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size,
        uid,
        username,
        pinned: i.pinned,
    }
}

#[tonic::async_trait]
impl CriImageService for Cri {
    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        let filter = req.into_inner().filter.and_then(|f| f.image).map(|s| s.image).filter(|s| !s.is_empty());
        let images = match filter {
            Some(r) => self.service.status(&r).await.map_err(|e| status(&e))?.into_iter().collect(),
            None => self.service.list().await.map_err(|e| status(&e))?,
        };
        Ok(Response::new(ListImagesResponse { images: images.into_iter().map(image).collect() }))
    }

    async fn image_status(&self, req: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let r = reference(req.image.as_ref())?;
        let Some(info) = self.service.status(r).await.map_err(|e| status(&e))? else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut extra = std::collections::HashMap::new();
        if req.verbose {
            let config = self.service.config(&info.id).await.map_err(|e| status(&e))?;
            let doc = serde_json::json!({
                "chainID": info.chain_id,
                "manifestDigest": info.manifest_digest,
                "imageSpec": config,
            });
            extra.insert("info".to_owned(), doc.to_string());
        }
        Ok(Response::new(ImageStatusResponse { image: Some(image(info)), info: extra }))
    }

    async fn pull_image(&self, req: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let req = req.into_inner();
        let r = reference(req.image.as_ref())?.to_owned();
        // The request's credentials, for this pull only, bound to the registry of the
        // reference as the host reads it (never to one the puller names); the error never
        // quotes them.
        let credentials = match &req.auth {
            Some(a) => Credentials::from_auth_config(&pullbox_auth(a), &reference_registry(&r))
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => Credentials::anonymous(),
        };
        let context = context(&req);
        let (service, metrics) = (self.service.clone(), self.metrics.clone());
        let started = Instant::now();
        let cancel = self.shutdown.child_token();
        // Dropping this RPC's future (the client hung up) cancels the pull.
        let _cancel_on_hangup = cancel.clone().drop_guard();
        // In its own task: cancellation reaches the pull as a token, so it cleans up.
        let task = self.pulls.spawn(async move {
            let result = service.pull_for(&r, Platform::host(), &context, metrics.clone(), credentials, cancel).await;
            metrics.pull_done(result.as_ref().map(|_| ()).map_err(|e| e.code()), started.elapsed().as_secs_f64());
            match &result {
                Ok(i) => tracing::info!(reference = %r, id = %i.id, "pulled"),
                Err(e) => tracing::warn!(reference = %r, "pull failed: {e}"),
            }
            result
        });
        let info =
            task.await.map_err(|e| Status::internal(format!("pull task failed: {e}")))?.map_err(|e| status(&e))?;
        Ok(Response::new(PullImageResponse { image_ref: info.id }))
    }

    async fn remove_image(&self, req: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let r = reference(req.image.as_ref())?;
        self.service.remove(r).await.map_err(|e| status(&e))?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(&self, _: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        let mut usage = self.fs_usage.clone();
        let usage = usage
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::unavailable("the image filesystem is no longer measured (shutting down)"))?
            .clone()
            .expect("waited for a measurement");
        Ok(Response::new(ImageFsInfoResponse { image_filesystems: vec![usage], container_filesystems: vec![] }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_split_like_containerd() {
        assert_eq!(user(""), (None, String::new()));
        assert_eq!(user("1000"), (Some(Int64Value { value: 1000 }), String::new()));
        assert_eq!(user("1000:1000"), (Some(Int64Value { value: 1000 }), String::new()));
        assert_eq!(user("nobody"), (None, "nobody".to_owned()));
        assert_eq!(user("www-data:www-data"), (None, "www-data".to_owned()));
    }

    #[test]
    fn pull_context_comes_from_the_image_spec_and_sandbox_config() {
        use k8s_cri::v1::{PodSandboxConfig, PodSandboxMetadata};
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut req = PullImageRequest {
            image: Some(ImageSpec {
                image: "busybox".into(),
                runtime_handler: "kata".into(),
                annotations: map(&[("b", "2"), ("a", "1")]),
                ..ImageSpec::default()
            }),
            ..PullImageRequest::default()
        };
        let c = context(&req);
        assert_eq!((c.runtime_handler.as_str(), c.pod.is_none()), ("kata", true));
        assert_eq!(c.annotations.keys().collect::<Vec<_>>(), ["a", "b"]);
        req.sandbox_config = Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "u1".into(),
                namespace: "prod-x".into(),
                attempt: 2,
            }),
            labels: map(&[("app", "web")]),
            annotations: map(&[("note", "x")]),
            ..PodSandboxConfig::default()
        });
        let pod = context(&req).pod.expect("a pod");
        assert_eq!((pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()), ("prod-x", "web-0", "u1"));
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(pod.annotations.get("note").map(String::as_str), Some("x"));
    }
}
