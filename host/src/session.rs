//! One request's context: the store state every host import of that request sees.
//!
//! A [`Session`] holds the backend, the registry client, the request's download [`Sink`]
//! (content store, lease, progress, credentials) and the downloads it started.
//! `registry.fetch` starts downloads as tokio tasks and returns at once; `content.*` and
//! `diff.apply` on a digest being fetched first wait for that download
//! ([`Session::wait_fetched`]), so a guest overlaps downloads with unpacking without knowing
//! how. A backend whose differ can ([`crate::backend::Differ::stage`]) also unpacks each layer
//! while it downloads, and `diff.apply` then only moves it into place ([`Session::stage`]).
//! Two bounds apply to downloads. Node-wide, the registry client lets at most
//! `registry.max_concurrent_downloads` blobs download at a time (containerd's key and default,
//! 3), whichever pulls they belong to. Per request, at most one more than that of a session's
//! downloads wait for or hold one of those permits: the node-wide queue is first come,
//! first served, so without this bound a pull of an image with fifty layers would queue all
//! fifty ahead of a small pull that arrived a moment later; with it, concurrent pulls take
//! turns. (One more, so that a lone pull still keeps every node-wide permit busy while the
//! next of its downloads is already waiting.)
//!
//! A pull's session holds, under its lease, every blob and snapshot the puller asks about
//! ([`Session::hold`], from `content.info` and `snapshots.stat`) before answering: what a
//! puller finds stored and then relies on (a base layer another image unpacked, a manifest
//! already fetched) cannot be collected under it when another image is removed meanwhile.
//!
//! A recorded pull's session carries a [`Recorder`]: the `registry.resolve` and `content.read`
//! imports tell it what they answered, so the pull can be replayed later
//! ([`crate::backend::replay`]).
//!
//! A session also carries the request's registry [`Credentials`] (applied by the host, never
//! shown to the guest) and a [`CancellationToken`]: once it is cancelled (CLI Ctrl-C, a CRI
//! client that went away, daemon shutdown) every download of the session stops with
//! `cancelled`, and the registry imports answer `cancelled`, so the puller fails and the
//! session deletes the pull's lease.
//!
//! A pull's session ([`Session::for_pull`]) creates the pull's lease and is its one owner:
//! [`Session::release`] ends the request (its downloads settled or stopped, its stages
//! discarded) and deletes the lease, collecting what it held when the pull failed; a session
//! dropped before that (an abandoned pull: kubelet went away, the daemon stops) stops its
//! downloads and deletes and collects its lease in the background, so an abandoned pull leaves
//! nothing held.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::{future::Shared, FutureExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    backend::{replay::Recorder, Backend, Held, LeaseId, Stage},
    error::{Error, Result},
    oci::{Descriptor, Digest},
    registry::{Credentials, Progress, Repository, SharedClient, Sink},
};

/// The most distinct blobs one request may fetch (an image index with its manifests, configs
/// and layers has far fewer; each download in flight costs the host a few kilobytes).
pub const MAX_FETCHES: usize = 4096;

/// The outcome of one download, shared by everyone who waits for it.
type FetchOutcome = Result<(), Arc<Error>>;
type FetchFuture = Shared<futures::future::BoxFuture<'static, FetchOutcome>>;

/// The context of one request.
pub struct Session {
    pub backend: Backend,
    pub registry: SharedClient,
    /// Where a pull's downloads go, under the pull's lease; `None` for requests that must not
    /// write (status, list, remove).
    sink: Option<Sink>,
    /// Whether the session still owns its lease: set by [`Session::for_pull`], cleared by
    /// [`Session::release`]; a session dropped while it is set releases the lease itself.
    owns_lease: std::sync::atomic::AtomicBool,
    /// Cancels the request: its downloads stop, its registry imports answer `cancelled`.
    pub cancel: CancellationToken,
    fetches: Mutex<HashMap<Digest, (FetchFuture, tokio::task::AbortHandle)>>,
    /// Keeps what the pull resolved and read, when the pull is recorded (`pull --record`, the
    /// shadow puller's replay).
    pub recorder: Option<Arc<Recorder>>,
    /// Layers being unpacked while they download.
    stages: Mutex<HashMap<Digest, Arc<dyn Stage>>>,
    downloads: Arc<Semaphore>,
}

/// Tells a stage its download has ended, however the download task ends (even aborted).
struct EndStage(Option<Arc<dyn Stage>>);

impl Drop for EndStage {
    fn drop(&mut self) {
        if let Some(stage) = &self.0 {
            stage.end();
        }
    }
}

impl Session {
    /// A session that may not write (status, list, remove, a settings check): it has no lease.
    pub fn new(backend: Backend, registry: SharedClient) -> Session {
        Session {
            downloads: Arc::new(Semaphore::new(registry.max_concurrent_downloads().max(1) + 1)),
            backend,
            registry,
            sink: None,
            owns_lease: std::sync::atomic::AtomicBool::new(false),
            cancel: CancellationToken::new(),
            recorder: None,
            fetches: Mutex::new(HashMap::new()),
            stages: Mutex::new(HashMap::new()),
        }
    }

    /// A pull's session, under a lease it creates and owns (see the module docs): writes go
    /// under it, and [`Session::release`] (or dropping the session) deletes it.
    pub async fn for_pull(backend: Backend, registry: SharedClient, progress: Arc<dyn Progress>) -> Result<Session> {
        let lease = backend.leases.create().await?;
        let mut session = Session::new(backend, registry);
        let content = session.backend.content.clone();
        session.sink = Some(Sink::new(content, lease, progress, Credentials::anonymous()));
        *session.owns_lease.get_mut() = true;
        Ok(session)
    }

    /// The same session with the request's registry credentials (a pull's: they go with its
    /// sink; never logged, never handed to the guest).
    pub fn with_credentials(mut self, credentials: Credentials) -> Session {
        self.sink = self.sink.take().map(|s| s.with_credentials(credentials));
        self
    }

    /// The same session, cancelled when `cancel` is.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Session {
        self.cancel = cancel;
        self
    }

    /// The same session, recording what the pull resolves and reads into `recorder`.
    pub fn with_recorder(mut self, recorder: Option<Arc<Recorder>>) -> Session {
        self.recorder = recorder;
        self
    }

    /// `Cancelled` once the request is cancelled.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled("the pull was cancelled".into()));
        }
        Ok(())
    }

    /// Adds `resource` to the pull's lease, whether it exists or not (see the module docs);
    /// nothing for a request without a lease (status, list, remove).
    pub async fn hold(&self, resource: Held<'_>) -> Result<()> {
        match &self.sink {
            Some(sink) => self.backend.leases.hold(sink.lease(), resource).await,
            None => Ok(()),
        }
    }

    /// Where the request's downloads go; `FailedPrecondition` for a request that may not write.
    pub fn sink(&self) -> Result<&Sink> {
        self.sink.as_ref().ok_or_else(|| Error::FailedPrecondition("only pull-image may write to the stores".into()))
    }

    /// The lease writes go under; `FailedPrecondition` for a request that may not write.
    pub fn lease(&self) -> Result<&LeaseId> {
        self.sink().map(Sink::lease)
    }

    /// Starts downloading `desc` from `repo` unless this session already does.
    pub fn start_fetch(&self, repo: &Repository, desc: &Descriptor) -> Result<()> {
        let sink = self.sink()?.clone();
        self.check_cancelled()?;
        let mut fetches = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
        if fetches.contains_key(&desc.digest) {
            return Ok(());
        }
        if fetches.len() >= MAX_FETCHES {
            return Err(Error::ResourceExhausted(format!("one request may fetch at most {MAX_FETCHES} blobs")));
        }
        let registry = self.registry.clone();
        let (repo, desc2, permits, cancel) = (repo.clone(), desc.clone(), self.downloads.clone(), self.cancel.clone());
        let stage = self.backend.differ.stage(desc);
        if let Some(stage) = &stage {
            self.stages.lock().unwrap_or_else(|e| e.into_inner()).insert(desc.digest.clone(), stage.clone());
        }
        let task = tokio::spawn(async move {
            let stage = EndStage(stage);
            let download = async {
                let _permit =
                    permits.acquire_owned().await.map_err(|_| Error::Cancelled("download queue closed".into()))?;
                registry.fetch(&repo, &desc2, &sink, stage.0.as_deref()).await
            };
            tokio::select! {
                r = download => r,
                () = cancel.cancelled() => {
                    tracing::debug!(digest = %desc2.digest, "download cancelled");
                    Err(Error::Cancelled(format!("download of {} cancelled", desc2.digest)))
                }
            }
        });
        let abort = task.abort_handle();
        let fut = async move {
            match task.await {
                Ok(r) => r.map_err(Arc::new),
                Err(e) => Err(Arc::new(Error::Cancelled(format!("download stopped: {e}")))),
            }
        }
        .boxed()
        .shared();
        fetches.insert(desc.digest.clone(), (fut, abort));
        Ok(())
    }

    /// The layer `digest` as unpacked while it downloaded, if this session stages it.
    pub fn stage(&self, digest: &Digest) -> Option<Arc<dyn Stage>> {
        self.stages.lock().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    /// Deletes what was unpacked while downloading and never applied, and waits until it is
    /// gone: called when the request ends, after its downloads have.
    pub async fn discard_stages(&self) {
        let stages: Vec<_> = self.stages.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, s)| s).collect();
        for stage in stages {
            stage.discard().await;
        }
    }

    /// Waits for a download of `digest` started by this session, if there is one.
    pub async fn wait_fetched(&self, digest: &Digest) -> Result<(), Arc<Error>> {
        let fut = self.fetches.lock().unwrap_or_else(|e| e.into_inner()).get(digest).map(|(f, _)| f.clone());
        match fut {
            Some(f) => f.await,
            None => Ok(()),
        }
    }

    /// Waits for every download this session started; the first error wins. Used when the
    /// request ends, so no task outlives it and writes under a lease that is being released.
    pub async fn settle(&self) -> Result<(), Arc<Error>> {
        let all: Vec<FetchFuture> =
            self.fetches.lock().unwrap_or_else(|e| e.into_inner()).values().map(|(f, _)| f.clone()).collect();
        let mut first = Ok(());
        for f in all {
            if let Err(e) = f.await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Stops every download this session started (a failed or cancelled request), then waits
    /// until they have stopped.
    pub async fn abort(&self) {
        self.stop_downloads();
        let _ = self.settle().await;
    }

    fn stop_downloads(&self) {
        for (_, handle) in self.fetches.lock().unwrap_or_else(|e| e.into_inner()).values() {
            handle.abort();
        }
    }

    /// Ends a pull whose puller returned, `succeeded` or not: lets the downloads it started
    /// and never waited for end (success) or stops them (failure), discards what was unpacked
    /// and not applied, then deletes the lease; after a failure, also collects what the pull
    /// wrote. Once only: a second call (or a session without a lease) does nothing.
    pub async fn release(&self, succeeded: bool) -> Result<()> {
        if succeeded {
            // A puller may have started downloads it never waited for; let them end before
            // the lease that protects them goes.
            if let Err(e) = self.settle().await {
                tracing::warn!("a download the puller did not use failed: {}", e.chain());
            }
        } else {
            self.abort().await;
        }
        self.discard_stages().await;
        let Some(lease) = self.take_lease() else { return Ok(()) };
        self.backend.leases.delete(&lease).await?;
        if !succeeded {
            match self.backend.leases.collect().await {
                Ok(r) => tracing::debug!(?r, "collected what the failed pull wrote"),
                Err(e) => tracing::warn!("cannot collect what the failed pull wrote: {}", e.chain()),
            }
        }
        Ok(())
    }

    /// The lease, if this session still owns it; it no longer does after this.
    fn take_lease(&self) -> Option<LeaseId> {
        let owned = self.owns_lease.swap(false, std::sync::atomic::Ordering::AcqRel);
        owned.then(|| self.sink.as_ref().map(|s| s.lease().clone())).flatten()
    }
}

impl Drop for Session {
    /// An abandoned pull (its future dropped before [`Session::release`]): stops its downloads
    /// and deletes its lease, then collects what the lease held, in the background.
    fn drop(&mut self) {
        let Some(lease) = self.take_lease() else { return };
        self.stop_downloads();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let backend = self.backend.clone();
        runtime.spawn(async move {
            tracing::debug!(lease = lease.0, "releasing the lease of an abandoned pull");
            if backend.leases.delete(&lease).await.is_ok() {
                let _ = backend.leases.collect().await;
            }
        });
    }
}
