//! Where one request's downloads go: a [`Sink`] is the content store, the request's lease,
//! its progress reporter and its registry credentials, bundled once per request (the
//! request's `Session` owns it) so the transport takes one value instead of five.
//!
//! [`Sink::open`] opens one blob as a [`BlobSink`]: the content writer tee'd into the layer's
//! [`Stage`] (a layer unpacking while it downloads), reporting progress as bytes arrive. The
//! transport only decides where bytes come from; what happens to them is the sink's.

use std::sync::Arc;

use bytes::Bytes;

use super::{merge_source, Credentials, Progress, Repository, DISTRIBUTION_SOURCE_LABEL};
use crate::{
    backend::{ContentStore, ContentWriter, LeaseId, Stage},
    error::{Error, Result},
    oci::{Descriptor, Digest},
};

/// The download target of one request (see the module docs). Cheap to clone: a download task
/// takes its own copy.
#[derive(Clone)]
pub struct Sink {
    content: Arc<dyn ContentStore>,
    lease: LeaseId,
    progress: Arc<dyn Progress>,
    credentials: Credentials,
}

impl Sink {
    /// Writes into `content` under `lease`, reporting to `progress`; the registry is asked with
    /// `credentials` (never logged, never handed to the guest).
    pub fn new(
        content: Arc<dyn ContentStore>,
        lease: LeaseId,
        progress: Arc<dyn Progress>,
        credentials: Credentials,
    ) -> Sink {
        Sink { content, lease, progress, credentials }
    }

    /// The same sink, asking the registry with `credentials`.
    pub fn with_credentials(mut self, credentials: Credentials) -> Sink {
        self.credentials = credentials;
        self
    }

    /// The content store written to.
    pub fn content(&self) -> &dyn ContentStore {
        self.content.as_ref()
    }

    /// The lease every write goes under.
    pub fn lease(&self) -> &LeaseId {
        &self.lease
    }

    /// The credentials the registry is asked with.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Where progress goes.
    pub fn progress(&self) -> &dyn Progress {
        self.progress.as_ref()
    }

    /// Whether the blob `desc` is stored already; when it is, the lease now holds it (so the
    /// caller may rely on it). A blob collected between the two questions counts as absent.
    pub async fn holds(&self, desc: &Descriptor) -> Result<bool> {
        match self.content.info(&desc.digest).await {
            Ok(info) if info.size == desc.size => {}
            Ok(_) | Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        // Opening a writer of a committed blob adds it to the lease and answers `AlreadyExists`.
        match self.content.writer(desc, &self.lease).await {
            Err(Error::AlreadyExists(_)) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stores the whole blob `desc` from `body` (a manifest read in one piece); nothing when it
    /// is stored already.
    pub async fn put(&self, desc: &Descriptor, body: &[u8]) -> Result<()> {
        match self.content.writer(desc, &self.lease).await {
            Ok(mut w) => {
                w.truncate().await?;
                w.write(body).await?;
                w.commit().await?;
                Ok(())
            }
            Err(Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens the blob `desc` for writing, every chunk also going to `stage`; `None` when it is
    /// stored already (the lease then holds it). The writer resumes an interrupted ingest: see
    /// [`BlobSink::offset`].
    pub async fn open<'a>(
        &'a self,
        desc: &'a Descriptor,
        stage: Option<&'a dyn Stage>,
    ) -> Result<Option<BlobSink<'a>>> {
        match self.content.writer(desc, &self.lease).await {
            Ok(writer) => Ok(Some(BlobSink { writer, desc, stage, progress: self.progress.as_ref(), written: 0 })),
            Err(Error::AlreadyExists(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds `repo` to the blob's `containerd.io/distribution.source.<registry>` label, as
    /// containerd does for every blob it pulls. Best effort: a label that cannot be written is
    /// logged, the pull goes on (the label only tells peer mirrors where the blob came from).
    pub async fn label_source(&self, digest: &Digest, repo: &Repository) {
        let key = format!("{DISTRIBUTION_SOURCE_LABEL}{}", repo.registry());
        let result = async {
            let info = self.content.info(digest).await?;
            if let Some(value) = merge_source(info.labels.get(&key).map(String::as_str), repo.path()) {
                self.content.set_labels(digest, &[(key.clone(), value)].into_iter().collect()).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%digest, label = key, "cannot label the blob with its source: {}", e.chain());
        }
    }
}

/// One blob being written: the content writer tee'd into the layer's stage, with progress.
pub struct BlobSink<'a> {
    writer: Box<dyn ContentWriter>,
    desc: &'a Descriptor,
    stage: Option<&'a dyn Stage>,
    progress: &'a dyn Progress,
    written: u64,
}

impl BlobSink<'_> {
    /// The blob written to.
    pub fn descriptor(&self) -> &Descriptor {
        self.desc
    }

    /// Bytes stored so far, including those of an interrupted earlier download.
    pub fn offset(&self) -> u64 {
        self.writer.offset()
    }

    /// Bytes this sink stored (not counting what an earlier download left).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Discards what was stored, to start over at offset 0.
    pub async fn truncate(&mut self) -> Result<()> {
        self.writer.truncate().await
    }

    /// Reports that the download starts (or resumes) at [`BlobSink::offset`].
    pub fn start(&self) {
        self.progress.start(&self.desc.digest, self.offset(), self.desc.size);
    }

    /// Stores `chunk`, which continues the bytes stored so far, and hands it to the stage.
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let pos = self.offset();
        self.writer.write(&chunk).await?;
        let n = chunk.len() as u64;
        if let Some(stage) = self.stage {
            stage.feed(pos, chunk).await;
        }
        self.written += n;
        self.progress.advance(&self.desc.digest, n);
        Ok(())
    }

    /// Verifies size and digest and makes the blob visible.
    pub async fn commit(self) -> Result<()> {
        self.writer.commit().await.map(|_| ())
    }
}
