//! The storage backends, behind small async traits.
//!
//! The interface modules (`crate::interfaces`) and the registry transport only ever talk to
//! these traits, so the same puller runs unchanged on either backend:
//!
//! - [`ContentStore`] / [`ContentWriter`]: blobs by digest, with labels; writes are verified
//!   against the expected size and digest before they become visible (one checked writer,
//!   `ingest::Checked`, serves every store).
//! - [`Snapshotter`]: containerd's snapshot model (active → committed, views).
//! - [`Differ`]: applies a layer blob onto an active snapshot's mounts, returning the diff ID;
//!   optionally unpacks a layer while it downloads ([`Stage`]).
//! - [`ImageStore`]: named image records.
//! - [`Leases`]: what a pull has written, kept alive until its records exist, and garbage
//!   collection of whatever no image and no lease refers to.
//!
//! [`Backend`] bundles one implementation of each. `embedded` is the default backend;
//! `containerd` drives containerd's services; `replay` answers from a recorded pull, offline
//! and in memory (`pullbox policy test`, the daemon's shadow puller).

pub mod containerd;
pub mod embedded;
pub(crate) mod ingest;
mod owner;
pub mod replay;

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use crate::{
    error::Result,
    oci::{Descriptor, Digest, Mount},
};

/// Labels of a blob, snapshot or record.
pub type Labels = BTreeMap<String, String>;

/// The identifier of a lease. Every write made on behalf of a pull names the pull's lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub String);

/// What the content store knows about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentInfo {
    pub digest: Digest,
    pub size: u64,
    pub labels: Labels,
}

/// A byte stream of one blob.
pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

/// Blobs by digest.
#[async_trait]
pub trait ContentStore: Send + Sync {
    /// What the store knows of a committed blob. `NotFound` when absent.
    async fn info(&self, digest: &Digest) -> Result<ContentInfo>;

    /// The size of each of `digests`: one answer per digest, in order, each as
    /// [`ContentStore::info`] answers it (`NotFound` when absent). The outer error is a failure
    /// of the whole batch.
    ///
    /// The default asks `info` for each digest, up to 16 at a time; a backend that can answer
    /// many at once more cheaply overrides it.
    async fn sizes(&self, digests: &[Digest]) -> Result<Vec<Result<u64>>> {
        use futures::StreamExt as _;
        let asks: Vec<_> = digests.iter().map(|d| self.info(d)).collect();
        Ok(futures::stream::iter(asks).buffered(16).map(|i| i.map(|i| i.size)).collect().await)
    }

    /// Reads up to `len` bytes from `offset` of a committed blob (fewer at its end).
    /// `InvalidArgument` for an offset past the end.
    async fn read(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Opens a committed blob for streaming.
    async fn open(&self, digest: &Digest) -> Result<BlobReader>;

    /// Starts (or resumes) writing the blob `expected` under `lease`. The writer's
    /// [`ContentWriter::offset`] says how many bytes an earlier, interrupted write of the
    /// same blob left; the caller continues from there. `AlreadyExists` when the blob is
    /// committed already (the lease then holds it).
    async fn writer(&self, expected: &Descriptor, lease: &LeaseId) -> Result<Box<dyn ContentWriter>>;

    /// Sets labels on a blob; an empty value removes the label.
    async fn set_labels(&self, digest: &Digest, labels: &Labels) -> Result<ContentInfo>;

    /// Deletes a committed blob.
    async fn delete(&self, digest: &Digest) -> Result<()>;
}

/// The error of [`ContentStore::read`] at an `offset` past the end of a blob of `size` bytes.
pub(crate) fn past_end(digest: &Digest, offset: u64, size: u64) -> crate::error::Error {
    crate::error::Error::InvalidArgument(format!("offset {offset} is past the end of {digest} ({size} bytes)"))
}

/// An open ingest of one blob.
#[async_trait]
pub trait ContentWriter: Send {
    /// Bytes written so far (including those of an interrupted earlier write).
    fn offset(&self) -> u64;

    /// Discards what was written, to restart from offset 0 (a registry that does not honour
    /// range requests).
    async fn truncate(&mut self) -> Result<()>;

    /// Appends bytes. Fails with `Mismatch` as soon as more bytes arrive than expected.
    async fn write(&mut self, data: &[u8]) -> Result<()>;

    /// Verifies size and digest and makes the blob visible. On a mismatch the ingest is
    /// discarded and nothing becomes visible.
    async fn commit(self: Box<Self>) -> Result<ContentInfo>;
}

/// The state of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    View,
    Active,
    Committed,
}

impl SnapshotKind {
    /// The kind as containerd's filters and pullbox's database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::View => "view",
            SnapshotKind::Active => "active",
            SnapshotKind::Committed => "committed",
        }
    }
}

/// What the snapshotter knows of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The parent's name, empty when none.
    pub parent: String,
    pub kind: SnapshotKind,
    pub labels: Labels,
}

/// Disk use of one snapshot's own layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

/// Layered filesystem trees, in containerd's model.
#[async_trait]
pub trait Snapshotter: Send + Sync {
    /// The snapshotter's name, as used in `containerd.io/gc.ref.snapshot.<name>` labels.
    fn name(&self) -> &str;

    /// Creates an active snapshot `key` on the committed snapshot `parent` ("" for none).
    async fn prepare(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>>;

    /// Creates a read-only view `key` of the committed snapshot `parent`.
    async fn view(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>>;

    /// The mounts of an active snapshot or view.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Commits the active snapshot `key` as `name`.
    async fn commit(&self, name: &str, key: &str, lease: &LeaseId) -> Result<()>;

    /// What the snapshotter knows of `key`.
    async fn stat(&self, key: &str) -> Result<SnapshotInfo>;

    /// What the snapshotter knows of each of `keys`: one answer per key, in order, each as
    /// [`Snapshotter::stat`] answers it. The outer error is a failure of the whole batch.
    ///
    /// The default asks `stat` for each key, up to 16 at a time; a backend that can answer
    /// many at once (one database read) overrides it.
    async fn stats(&self, keys: &[String]) -> Result<Vec<Result<SnapshotInfo>>> {
        use futures::StreamExt as _;
        let asks: Vec<_> = keys.iter().map(|k| self.stat(k)).collect();
        Ok(futures::stream::iter(asks).buffered(16).collect().await)
    }

    /// Removes a snapshot that has no children.
    async fn remove(&self, key: &str) -> Result<()>;

    /// Disk use of a snapshot's own layer.
    async fn usage(&self, key: &str) -> Result<Usage>;
}

/// Applies layers onto snapshots.
#[async_trait]
pub trait Differ: Send + Sync {
    /// Applies the committed blob `layer` onto `mounts` and returns its diff ID.
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> Result<Digest>;

    /// Starts unpacking `layer` from its bytes as they download, before anyone asks for it to
    /// be applied: layers then decompress and unpack in parallel, in the same pass as their
    /// download. `None` when this differ does not (the default) or `layer` is no layer.
    fn stage(&self, _layer: &Descriptor) -> Option<Arc<dyn Stage>> {
        None
    }
}

/// A layer unpacked while it downloads, into a place of its own; see [`Differ::stage`].
/// Dropping it discards what was unpacked and not applied.
#[async_trait]
pub trait Stage: Send + Sync {
    /// The next downloaded bytes of the blob, which start at `offset`. Bytes that do not
    /// continue the ones before (a download that starts over) end the staging.
    async fn feed(&self, offset: u64, bytes: bytes::Bytes);

    /// The download has ended, whatever its outcome: no more bytes come.
    fn end(&self);

    /// Once the download has succeeded (so the blob's digest is verified): moves the unpacked
    /// layer onto `mounts` (an empty active snapshot, as for [`Differ::apply`]) and returns its
    /// diff ID. `None` when nothing usable was staged for `layer` (an incomplete or restarted
    /// download, a layer that failed to unpack, a descriptor other than the one staged, a
    /// snapshot that is not empty, a second apply): the caller then uses [`Differ::apply`],
    /// which also says what is wrong with a bad layer or descriptor.
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> Result<Option<Digest>>;

    /// Deletes what was staged and not applied, and waits until it is gone.
    async fn discard(&self);
}

/// A named image record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
    #[serde(default)]
    pub labels: Labels,
    /// Nanoseconds since the Unix epoch.
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub updated_at: u64,
}

/// The records [`ImageStore::list`] answers, shared: a store may keep the records it read and
/// hand the same ones to every caller until they change, so a caller that needs a few fields
/// of each (the `images.list-labels` import) borrows them ([`std::ops::Deref`] to a slice) and
/// copies just those. Iterating by value gives owned records, copied only while someone else
/// holds them too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRecords(Arc<Vec<ImageRecord>>);

impl From<Vec<ImageRecord>> for ImageRecords {
    fn from(records: Vec<ImageRecord>) -> Self {
        ImageRecords(Arc::new(records))
    }
}

impl std::ops::Deref for ImageRecords {
    type Target = [ImageRecord];

    fn deref(&self) -> &[ImageRecord] {
        &self.0
    }
}

impl IntoIterator for ImageRecords {
    type Item = ImageRecord;
    type IntoIter = std::vec::IntoIter<ImageRecord>;

    fn into_iter(self) -> Self::IntoIter {
        Arc::unwrap_or_clone(self.0).into_iter()
    }
}

impl<'a> IntoIterator for &'a ImageRecords {
    type Item = &'a ImageRecord;
    type IntoIter = std::slice::Iter<'a, ImageRecord>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Named image records.
#[async_trait]
pub trait ImageStore: Send + Sync {
    async fn get(&self, name: &str) -> Result<ImageRecord>;
    /// Every record, by name (see [`ImageRecords`]: shared, not copied).
    async fn list(&self) -> Result<ImageRecords>;
    /// Creates a record; sets both timestamps. `AlreadyExists` when the name is taken.
    async fn create(&self, image: ImageRecord) -> Result<ImageRecord>;
    /// Replaces target and labels; keeps `created_at`, sets `updated_at`.
    async fn update(&self, image: ImageRecord) -> Result<ImageRecord>;
    async fn delete(&self, name: &str) -> Result<()>;
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub snapshots: u64,
    pub ingests: u64,
    pub leases: u64,
    /// Bytes freed on disk.
    pub bytes: u64,
}

/// What [`Leases::hold`] adds to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held<'a> {
    /// A blob, by digest.
    Content(&'a Digest),
    /// A snapshot, by the snapshotter's name and the snapshot's key or name.
    Snapshot(&'a str, &'a str),
}

/// Leases and garbage collection.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Creates a lease owned by this process.
    async fn create(&self) -> Result<LeaseId>;

    /// Adds `resource` to `lease`, whether it exists or not: while the lease lives, the
    /// collector keeps it (and what it references). A pull holds what it finds already stored
    /// before it relies on it, so that removing another image meanwhile cannot collect it.
    async fn hold(&self, lease: &LeaseId, resource: Held<'_>) -> Result<()>;

    /// Creates a lease that no process owns, for what must outlive the command that creates
    /// it (the view behind `pullbox mount`): it lasts until [`Leases::delete`] (the embedded
    /// backend also ends it at the next boot, which no mount survives). `FailedPrecondition`
    /// on a backend that has no such leases.
    async fn create_detached(&self) -> Result<LeaseId> {
        Err(crate::error::Error::FailedPrecondition("this backend has no leases that outlive their process".into()))
    }

    /// Deletes a lease; what only it held becomes garbage.
    async fn delete(&self, lease: &LeaseId) -> Result<()>;

    /// Removes leases whose owning process is gone, then everything that no image record and
    /// no lease refers to (following `containerd.io/gc.ref.*` labels and snapshot parents).
    async fn collect(&self) -> Result<GcReport> {
        let census = self.census().await?;
        self.collect_since(census).await
    }

    /// What the store holds now, for a backend whose own collector may free things at any time
    /// (containerd's scheduler runs at its own pace after a delete): given to
    /// [`Leases::collect_since`] after the delete, it makes the report count those too. `None`
    /// (the default) for a backend whose collections only [`Leases::collect_since`] runs.
    async fn census(&self) -> Result<Option<Census>> {
        Ok(None)
    }

    /// [`Leases::collect`], reporting what went since `census` was taken.
    async fn collect_since(&self, census: Option<Census>) -> Result<GcReport>;
}

/// What a store held at one moment: blobs with their sizes, snapshot names, ingest references.
/// See [`Leases::census`].
#[derive(Debug, Clone, Default)]
pub struct Census {
    pub blobs: std::collections::HashMap<String, u64>,
    pub snapshots: std::collections::HashSet<String>,
    pub ingests: std::collections::HashSet<String>,
}

impl Census {
    /// What went between `self` and `after`, as a report (`leases` is left to the caller).
    pub fn gone(&self, after: &Census) -> GcReport {
        let gone_blobs: Vec<u64> =
            self.blobs.iter().filter(|(d, _)| !after.blobs.contains_key(*d)).map(|(_, size)| *size).collect();
        GcReport {
            blobs: gone_blobs.len() as u64,
            bytes: gone_blobs.iter().sum(),
            snapshots: self.snapshots.difference(&after.snapshots).count() as u64,
            ingests: self.ingests.difference(&after.ingests).count() as u64,
            leases: 0,
        }
    }
}

/// One implementation of each store.
#[derive(Clone)]
pub struct Backend {
    pub content: Arc<dyn ContentStore>,
    /// The default snapshotter: the one every call starts on.
    pub snapshots: Arc<dyn Snapshotter>,
    /// The other snapshotters the operator offers pullers (`snapshots.select`); empty for the
    /// embedded store, which has one.
    pub other_snapshotters: Vec<Arc<dyn Snapshotter>>,
    pub differ: Arc<dyn Differ>,
    pub images: Arc<dyn ImageStore>,
    pub leases: Arc<dyn Leases>,
}

impl Backend {
    /// The offered snapshotter named `name`: the default one or one of the others.
    ///
    /// Errors: `NotFound` naming the snapshotters offered.
    pub fn snapshotter(&self, name: &str) -> Result<Arc<dyn Snapshotter>> {
        let offered = || std::iter::once(&self.snapshots).chain(&self.other_snapshotters);
        if let Some(s) = offered().find(|s| s.name() == name) {
            return Ok(s.clone());
        }
        let names: Vec<&str> = offered().map(|s| s.name()).collect();
        Err(crate::error::Error::NotFound(format!(
            "snapshotter {name:?} is not offered here (offered: {})",
            names.join(", ")
        )))
    }
}
