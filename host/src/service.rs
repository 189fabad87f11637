//! The image service: what the CLI (and the CRI server) call. Each operation builds a
//! [`Session`], calls one export of the puller, and ends the session when the export returns:
//!
//! - a pull runs under a fresh lease, which its session owns ([`Session::for_pull`],
//!   [`Session::release`]); when the puller returns, its downloads are settled and
//!   the lease is deleted — on success the image records now hold everything, on failure what
//!   the pull wrote is garbage and is collected at once;
//! - status, list and remove run without a lease, so they cannot write;
//! - a remove is followed by a collection, so an image with no records left releases its
//!   content and snapshots.
//!
//! A pull carries what the caller says it is for ([`PullContext`]: the CRI runtime handler,
//! the image spec's annotations and the pod), passed to the puller as is, since a puller's
//! policy may depend on any of it.
//!
//! Recording: a service made with [`ImageService::recording`] keeps what each pull resolved
//! and read ([`Recording`], for `pullbox pull --record`); a service with a shadow puller
//! ([`ImageService::set_shadow`]) records each pull and has the shadow judge the recording on
//! the side (see [`crate::verdict`]).
//!
//! One pull in flight per reference, platform, credentials and context: a pull that finds one
//! running waits for it and returns its result (a failure as [`Error::Shared`], same code and
//! message) instead of pulling again. A waiter pulls by itself when the pull it waited for was
//! cancelled or refused access (both depend on that caller's request, not on the image), or
//! was dropped. A remove waits for the pulls in flight of the same reference. Pulls that do
//! not share (other pods, other processes) still share the work through the stores: a second
//! writer of a blob waits for the first, and a second unpack of a layer waits for the first
//! (see `backend::embedded`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

pub use crate::image::{PodContext, PullContext};
use crate::{
    backend::{
        replay::{RecordedRequest, Recorder, Recording},
        Backend, GcReport,
    },
    engine::{CallError, Puller},
    error::{Code, Error},
    image::{ImageInfo, PullRequest},
    oci::{Digest, Platform},
    registry::{Credentials, Progress, SharedClient},
    session::Session,
    verdict::{Shadow, Verdict},
};
use tokio_util::sync::CancellationToken;

/// A failed image-service operation.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The puller refused or failed.
    #[error(transparent)]
    Puller(#[from] CallError),
    /// A host store failed.
    #[error(transparent)]
    Host(#[from] Error),
}

impl ServiceError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::Puller(e) => e.code(),
            ServiceError::Host(e) => e.code(),
        }
    }
}

/// What the waiters of a pull in flight get: the image, or the failure's code and message.
type PullOutcome = Result<ImageInfo, (Code, String)>;

/// The pulls in flight, by (reference, platform): each publishes its outcome once.
type InFlight = Arc<Mutex<HashMap<(String, String), watch::Receiver<Option<PullOutcome>>>>>;

/// Removes a pull's entry from the in-flight map when the pull ends or is dropped; waiters of
/// a dropped pull see the channel close and pull by themselves.
struct InFlightEntry {
    map: InFlight,
    key: (String, String),
}

impl Drop for InFlightEntry {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// The image service over one backend and one puller.
pub struct ImageService {
    in_flight: InFlight,
    backend: Backend,
    registry: SharedClient,
    /// The current puller; swapped whole by [`ImageService::swap_puller`], so a call in flight
    /// finishes on the puller it started with.
    puller: std::sync::RwLock<Arc<Puller>>,
    /// Recordings of the pulls made since [`ImageService::recording`] turned recording on.
    recordings: Option<Mutex<Vec<Recording>>>,
    /// The shadow puller judging each pull on the side, if any.
    shadow: std::sync::RwLock<Option<Arc<Shadow>>>,
}

impl ImageService {
    /// A service over `backend` using `puller`.
    pub fn new(backend: Backend, registry: SharedClient, puller: Puller) -> ImageService {
        ImageService {
            in_flight: InFlight::default(),
            backend,
            registry,
            puller: std::sync::RwLock::new(Arc::new(puller)),
            recordings: None,
            shadow: std::sync::RwLock::new(None),
        }
    }

    /// The same service, keeping a [`Recording`] of every pull it makes (see
    /// [`ImageService::take_recordings`]).
    pub fn recording(mut self) -> ImageService {
        self.recordings = Some(Mutex::new(Vec::new()));
        self
    }

    /// The recordings of the pulls made so far (successful or not), oldest first.
    pub fn take_recordings(&self) -> Vec<Recording> {
        match &self.recordings {
            Some(r) => std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    /// Makes `shadow` judge every pull from now on (`None`: no shadow puller). Each pull is
    /// then recorded, and its recording judged by the shadow in the background.
    pub fn set_shadow(&self, shadow: Option<Shadow>) {
        *self.shadow.write().unwrap_or_else(|e| e.into_inner()) = shadow.map(Arc::new);
    }

    fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A recorder for a pull, when this service records pulls or has a shadow puller.
    fn recorder(&self, reference: &str, platform: &Platform, context: &PullContext) -> Option<Arc<Recorder>> {
        if self.recordings.is_none() && self.shadow().is_none() {
            return None;
        }
        let request =
            RecordedRequest { reference: reference.to_owned(), platform: platform.clone(), context: context.clone() };
        Some(Arc::new(Recorder::new(request)))
    }

    /// Hands a pull's recording to the shadow puller and the recordings kept.
    fn recorded(&self, recording: Recording, result: &Result<ImageInfo, ServiceError>) {
        if let Some(shadow) = self.shadow() {
            let real = Verdict::of(&result.as_ref().map_err(|e| (e.code(), e.to_string())));
            shadow.spawn_compare(recording.clone(), real);
        }
        if let Some(list) = &self.recordings {
            list.lock().unwrap_or_else(|e| e.into_inner()).push(recording);
        }
    }

    /// The current puller.
    pub fn puller(&self) -> Arc<Puller> {
        self.puller.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks that `puller` accepts its settings, then makes it the current puller; calls in
    /// flight finish on the old one. A puller that fails the check leaves the old one serving.
    pub async fn swap_puller(&self, puller: Puller) -> Result<(), ServiceError> {
        puller.check(self.session()).await?;
        *self.puller.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(puller);
        Ok(())
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// A session of a request that may not write.
    fn session(&self) -> Arc<Session> {
        Arc::new(Session::new(self.backend.clone(), self.registry.clone()))
    }

    /// Checks that the puller accepts its settings.
    pub async fn check(&self) -> Result<(), ServiceError> {
        Ok(self.puller().check(self.session()).await?)
    }

    /// Pulls `reference` for `platform` and returns the READY image. The registry is
    /// accessed with `credentials` (for this request only; the puller never sees them).
    /// Cancelling `cancel` stops the downloads and makes the registry imports answer
    /// `cancelled`, so the pull fails and its lease is deleted like any failed pull's.
    ///
    /// A pull of the same reference and platform already in flight is waited for instead (see
    /// the module docs). The puller sees no context (no pod, the default runtime handler): see
    /// [`ImageService::pull_for`].
    pub async fn pull(
        &self,
        reference: &str,
        platform: Platform,
        progress: Arc<dyn Progress>,
        credentials: Credentials,
        cancel: CancellationToken,
    ) -> Result<ImageInfo, ServiceError> {
        self.pull_for(reference, platform, &PullContext::default(), progress, credentials, cancel).await
    }

    /// [`ImageService::pull`] for `context`: the puller's request carries it.
    pub async fn pull_for(
        &self,
        reference: &str,
        platform: Platform,
        context: &PullContext,
        progress: Arc<dyn Progress>,
        credentials: Credentials,
        cancel: CancellationToken,
    ) -> Result<ImageInfo, ServiceError> {
        // Pulls share only with pulls of the same image, platform and credentials: a request
        // must never get an image through someone else's access rights. And only with the
        // same context, whole: a puller's policy may depend on any of it (the default
        // puller's scopes read the namespace, pod labels and runtime handler), and a pull
        // allowed for one pod must not hand its image to a pod the policy would refuse.
        // Pulls for different pods therefore pull each by itself; they still share blobs and
        // unpacks through the stores.
        let key = (
            reference.to_owned(),
            format!(
                "{}|{}|{}",
                serde_json::to_string(&platform).unwrap_or_default(),
                credentials.identity(),
                serde_json::to_string(context).unwrap_or_default()
            ),
        );
        loop {
            let joined = {
                let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&key) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(key.clone(), rx);
                        Ok(tx)
                    }
                }
            };
            let mut rx = match joined {
                Ok(tx) => {
                    let _entry = InFlightEntry { map: self.in_flight.clone(), key };
                    let recorder = self.recorder(reference, &platform, context);
                    let request = context.request(reference, platform);
                    let result = self.pull_once(request, progress, credentials, cancel, recorder.clone()).await;
                    if let Some(recorder) = recorder {
                        self.recorded(recorder.recording(), &result);
                    }
                    tx.send_replace(Some(match &result {
                        Ok(image) => Ok(image.clone()),
                        Err(ServiceError::Host(e)) => Err((e.code(), e.chain())),
                        Err(e) => Err((e.code(), e.to_string())),
                    }));
                    return result;
                }
                Err(rx) => rx,
            };
            tracing::info!(reference, "a pull of the same image is in flight; waiting for it");
            let outcome = tokio::select! {
                outcome = rx.wait_for(Option::is_some) => outcome.ok().and_then(|o| o.clone()),
                () = cancel.cancelled() => {
                    return Err(Error::Cancelled(format!("pull of {reference} cancelled")).into());
                }
            };
            match outcome {
                Some(Ok(image)) => return Ok(image),
                Some(Err((Code::Cancelled | Code::PermissionDenied, _))) => {}
                Some(Err((code, message))) => return Err(Error::Shared { code, message }.into()),
                None => {}
            }
            tracing::info!(reference, "the pull waited for did not finish for this caller; pulling");
        }
    }

    /// One pull, under its own lease, which its session creates and releases (see
    /// [`Session::release`]; a pull dropped half-way releases it when its session goes).
    async fn pull_once(
        &self,
        request: PullRequest,
        progress: Arc<dyn Progress>,
        credentials: Credentials,
        cancel: CancellationToken,
        recorder: Option<Arc<Recorder>>,
    ) -> Result<ImageInfo, ServiceError> {
        let session = Arc::new(
            Session::for_pull(self.backend.clone(), self.registry.clone(), progress)
                .await?
                .with_credentials(credentials)
                .with_cancel(cancel)
                .with_recorder(recorder),
        );
        let result = self.puller().pull(session.clone(), &request).await;
        session.release(result.is_ok()).await?;
        Ok(result?)
    }

    /// The READY image `reference` (a reference, an image ID or an ID prefix) names.
    pub async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, ServiceError> {
        Ok(self.puller().status(self.session(), reference).await?)
    }

    /// Every READY image.
    pub async fn list(&self) -> Result<Vec<ImageInfo>, ServiceError> {
        Ok(self.puller().list(self.session()).await?)
    }

    /// Removes the image `reference` names, then collects what it no longer holds. Returns
    /// how many records went and what the collection freed.
    pub async fn remove(&self, reference: &str) -> Result<(usize, GcReport), ServiceError> {
        // A pull of the same reference in flight finishes first (or fails, or is dropped).
        let pulls: Vec<_> = {
            let map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            map.iter().filter(|((r, _), _)| r == reference).map(|(_, rx)| rx.clone()).collect()
        };
        for mut rx in pulls {
            let _ = rx.wait_for(Option::is_some).await;
        }
        let before = self.backend.images.list().await?.len();
        let census = self.backend.leases.census().await?;
        self.puller().remove(self.session(), reference).await?;
        let removed = before.saturating_sub(self.backend.images.list().await?.len());
        let report = self.backend.leases.collect_since(census).await?;
        Ok((removed, report))
    }

    /// The image config of the image whose ID is `id` (its config digest), as JSON.
    pub async fn config(&self, id: &str) -> Result<serde_json::Value, ServiceError> {
        let digest: Digest = id.parse()?;
        let info = self.backend.content.info(&digest).await?;
        if info.size > crate::registry::MAX_MANIFEST {
            return Err(Error::ResourceExhausted(format!("config {digest} is too large")).into());
        }
        let bytes = self.backend.content.read(&digest, 0, info.size as usize).await?;
        Ok(serde_json::from_slice(&bytes).map_err(Error::Corrupt)?)
    }
}
