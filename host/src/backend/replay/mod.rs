//! The replay backend: a data plane that answers a puller from a [`Recording`] of an earlier
//! pull, offline, and writes nothing anywhere. `pullbox policy test` runs candidate pullers
//! on it, and the daemon's shadow puller judges each real pull on it.
//!
//! [`Replay`] implements every backend trait and the registry's [`Remote`]:
//!
//! - **resolve** answers what the recorded pull's resolve answered for the same repository
//!   and reference; a digest reference whose blob is recorded resolves to that blob too.
//!   Anything else is `not-found` ("not in the recording").
//! - **fetch** downloads nothing. A recorded blob is there already; any other blob (a layer)
//!   becomes present with the size its descriptor says: the replay "pretends" to download it.
//! - **content** serves the recorded blobs' bytes; reading a blob that is present but was
//!   not recorded (a layer) is `not-found`. Labels are kept in memory.
//! - **snapshots** are bookkeeping in memory (no directories, no mounts).
//! - **diff** pretends to unpack: a layer's diff ID is the one the recorded image config
//!   lists at the layer's position in a recorded manifest, so a puller that checks diff IDs
//!   sees what it would have seen. A layer that no recorded manifest lists cannot be applied.
//! - **images** and **leases** are in memory; garbage collection has nothing to do.
//!
//! A replay is as complete as the recording: a pull that was refused before it read the
//! manifest recorded no manifest, so a candidate that would go further fails with
//! `not-found` naming what is missing. Record with a permissive puller (or the default
//! puller's `mode: "audit"`) to record everything.

pub mod recording;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;

pub use recording::{RecordedRequest, Recorder, Recording, Resolved};

use super::{
    past_end, Backend, BlobReader, ContentInfo, ContentStore, ContentWriter, Differ, GcReport, Held, ImageRecord,
    ImageRecords, ImageStore, Labels, LeaseId, Leases, SnapshotInfo, SnapshotKind, Snapshotter, Stage, Usage,
};
use crate::{
    error::{Error, Result},
    oci::{Descriptor, Digest, Mount},
    registry::{Credentials, Remote, Repository, SharedClient, Sink},
};

/// The snapshotter name replayed pullers see (in GC labels they write).
pub const SNAPSHOTTER: &str = "replay";

/// The data plane over one recording.
pub struct Replay {
    recording: Recording,
    /// Layer digest → diff ID, from the recorded manifests and configs.
    diff_ids: HashMap<Digest, Digest>,
    state: Mutex<State>,
}

/// What the replayed pull changed.
#[derive(Default)]
struct State {
    /// Blobs "downloaded" that were not recorded (layers), with their sizes.
    fetched: HashMap<Digest, u64>,
    /// Blobs deleted by the puller.
    deleted: std::collections::HashSet<Digest>,
    labels: HashMap<Digest, Labels>,
    snapshots: BTreeMap<String, SnapshotInfo>,
    images: BTreeMap<String, ImageRecord>,
    leases: u64,
}

impl Replay {
    /// A replay of `recording`.
    pub fn new(recording: Recording) -> Arc<Replay> {
        let diff_ids = diff_ids(&recording.blobs);
        Arc::new(Replay { recording, diff_ids, state: Mutex::new(State::default()) })
    }

    /// The backend and the remote of this replay, for an image service.
    pub fn open(recording: Recording) -> (Backend, SharedClient) {
        let replay = Replay::new(recording);
        let backend = Backend {
            content: replay.clone(),
            snapshots: replay.clone(),
            // One pretend snapshotter: a puller that selects another gets `not-found`.
            other_snapshotters: Vec::new(),
            differ: replay.clone(),
            images: replay.clone(),
            leases: replay.clone(),
        };
        (backend, replay)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The size of a blob present in the replay, if it is.
    fn size_of(&self, digest: &Digest) -> Option<u64> {
        let state = self.state();
        if state.deleted.contains(digest) {
            return None;
        }
        match self.recording.blobs.get(digest) {
            Some(b) => Some(b.len() as u64),
            None => state.fetched.get(digest).copied(),
        }
    }

    fn recorded(&self, digest: &Digest) -> Result<&[u8]> {
        match self.recording.blobs.get(digest) {
            Some(b) if !self.state().deleted.contains(digest) => Ok(b),
            _ if self.size_of(digest).is_some() => Err(Error::NotFound(format!(
                "the bytes of {digest} (the replay has no layers; only what the recorded pull read)"
            ))),
            _ => Err(Error::NotFound(format!("blob {digest} (not in the recording)"))),
        }
    }
}

/// Layer digest → diff ID for every recorded manifest whose recorded config lists as many
/// diff IDs as the manifest has layers.
fn diff_ids(blobs: &BTreeMap<Digest, Vec<u8>>) -> HashMap<Digest, Digest> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    let mut out = HashMap::new();
    for bytes in blobs.values() {
        let Ok(m) = serde_json::from_slice::<Manifest>(bytes) else {
            continue;
        };
        let Some(config) = blobs.get(&m.config.digest) else {
            continue;
        };
        let Ok(c) = serde_json::from_slice::<Config>(config) else {
            continue;
        };
        if c.rootfs.diff_ids.len() == m.layers.len() {
            out.extend(m.layers.into_iter().map(|l| l.digest).zip(c.rootfs.diff_ids));
        }
    }
    out
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}

#[async_trait]
impl Remote for Replay {
    fn max_concurrent_downloads(&self) -> usize {
        crate::registry::DEFAULT_MAX_CONCURRENT_DOWNLOADS
    }

    async fn resolve(&self, repo: &Repository, reference: &str, _: &Sink) -> Result<Descriptor> {
        let name = repo.to_string();
        if let Some(r) = self.recording.resolved.iter().find(|r| r.name == name && r.reference == reference) {
            return Ok(r.root.clone());
        }
        if let Ok(digest) = reference.parse::<Digest>() {
            if let Some(r) = self.recording.resolved.iter().find(|r| r.name == name && r.root.digest == digest) {
                return Ok(r.root.clone());
            }
            if let Some(bytes) = self.recording.blobs.get(&digest) {
                let media_type = serde_json::from_slice::<serde_json::Value>(bytes)
                    .ok()
                    .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
                    .ok_or_else(|| Error::FailedPrecondition(format!("recorded {digest} names no media type")))?;
                return Ok(Descriptor {
                    media_type,
                    digest,
                    size: bytes.len() as u64,
                    annotations: Default::default(),
                    platform: None,
                    urls: Vec::new(),
                });
            }
        }
        Err(Error::NotFound(format!("{name}:{reference} (not resolved in the recording)")))
    }

    async fn fetch(&self, _: &Repository, desc: &Descriptor, sink: &Sink, _: Option<&dyn Stage>) -> Result<()> {
        if let Some(bytes) = self.recording.blobs.get(&desc.digest) {
            if bytes.len() as u64 != desc.size {
                return Err(Error::Mismatch {
                    what: format!("size of {}", desc.digest),
                    expected: desc.size.to_string(),
                    actual: bytes.len().to_string(),
                });
            }
        } else {
            self.state().fetched.insert(desc.digest.clone(), desc.size);
        }
        self.state().deleted.remove(&desc.digest);
        sink.progress().done(&desc.digest);
        Ok(())
    }

    /// Referrers answers are not recorded: a puller that needs them cannot be judged offline.
    async fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        _: &str,
        _: &Credentials,
    ) -> Result<Vec<crate::registry::Referrer>> {
        Err(Error::Unavailable {
            what: format!("referrers of {repo}@{digest}: the recording holds no referrers answers"),
            source: None,
        })
    }
}

#[async_trait]
impl ContentStore for Replay {
    async fn info(&self, digest: &Digest) -> Result<ContentInfo> {
        let size = self.size_of(digest).ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
        let labels = self.state().labels.get(digest).cloned().unwrap_or_default();
        Ok(ContentInfo { digest: digest.clone(), size, labels })
    }

    async fn read(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
        let bytes = self.recorded(digest)?;
        let size = bytes.len() as u64;
        if offset > size {
            return Err(past_end(digest, offset, size));
        }
        let start = offset as usize;
        Ok(bytes[start..start.saturating_add(len).min(bytes.len())].to_vec())
    }

    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        Ok(Box::new(std::io::Cursor::new(self.recorded(digest)?.to_vec())))
    }

    async fn writer(&self, expected: &Descriptor, _: &LeaseId) -> Result<Box<dyn ContentWriter>> {
        Err(Error::FailedPrecondition(format!("the replay store does not store bytes ({})", expected.digest)))
    }

    async fn set_labels(&self, digest: &Digest, labels: &Labels) -> Result<ContentInfo> {
        self.info(digest).await?;
        {
            let mut state = self.state();
            let have = state.labels.entry(digest.clone()).or_default();
            for (k, v) in labels {
                if v.is_empty() {
                    have.remove(k);
                } else {
                    have.insert(k.clone(), v.clone());
                }
            }
        }
        self.info(digest).await
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.info(digest).await?;
        let mut state = self.state();
        state.fetched.remove(digest);
        state.labels.remove(digest);
        state.deleted.insert(digest.clone());
        Ok(())
    }
}

impl Replay {
    fn create_snapshot(&self, key: &str, parent: &str, kind: SnapshotKind) -> Result<Vec<Mount>> {
        let mut state = self.state();
        if state.snapshots.contains_key(key) {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        if !parent.is_empty() && state.snapshots.get(parent).map(|s| s.kind) != Some(SnapshotKind::Committed) {
            return Err(Error::NotFound(format!("committed snapshot {parent}")));
        }
        let info = SnapshotInfo { name: key.to_owned(), parent: parent.to_owned(), kind, labels: Labels::new() };
        state.snapshots.insert(key.to_owned(), info);
        Ok(Vec::new())
    }
}

#[async_trait]
impl Snapshotter for Replay {
    fn name(&self) -> &str {
        SNAPSHOTTER
    }

    async fn prepare(&self, key: &str, parent: &str, _: &LeaseId) -> Result<Vec<Mount>> {
        self.create_snapshot(key, parent, SnapshotKind::Active)
    }

    async fn view(&self, key: &str, parent: &str, _: &LeaseId) -> Result<Vec<Mount>> {
        self.create_snapshot(key, parent, SnapshotKind::View)
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.stat(key).await.map(|_| Vec::new())
    }

    async fn commit(&self, name: &str, key: &str, _: &LeaseId) -> Result<()> {
        let mut state = self.state();
        if state.snapshots.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name}")));
        }
        match state.snapshots.remove(key) {
            Some(mut info) if info.kind == SnapshotKind::Active => {
                info.name = name.to_owned();
                info.kind = SnapshotKind::Committed;
                state.snapshots.insert(name.to_owned(), info);
                Ok(())
            }
            Some(info) => {
                state.snapshots.insert(key.to_owned(), info);
                Err(Error::FailedPrecondition(format!("snapshot {key} is not active")))
            }
            None => Err(Error::NotFound(format!("snapshot {key}"))),
        }
    }

    async fn stat(&self, key: &str) -> Result<SnapshotInfo> {
        self.state().snapshots.get(key).cloned().ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let mut state = self.state();
        if state.snapshots.values().any(|s| s.parent == key) {
            return Err(Error::FailedPrecondition(format!("snapshot {key} has children")));
        }
        state.snapshots.remove(key).map(|_| ()).ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        self.stat(key).await.map(|_| Usage::default())
    }
}

#[async_trait]
impl Differ for Replay {
    async fn apply(&self, layer: &Descriptor, _: &[Mount]) -> Result<Digest> {
        if self.size_of(&layer.digest).is_none() {
            return Err(Error::NotFound(format!("layer {} (never fetched)", layer.digest)));
        }
        self.diff_ids.get(&layer.digest).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "layer {} is in no recorded manifest whose config was recorded: its diff ID is unknown",
                layer.digest
            ))
        })
    }
}

#[async_trait]
impl ImageStore for Replay {
    async fn get(&self, name: &str) -> Result<ImageRecord> {
        self.state().images.get(name).cloned().ok_or_else(|| Error::NotFound(format!("image {name}")))
    }

    async fn list(&self) -> Result<ImageRecords> {
        Ok(self.state().images.values().cloned().collect::<Vec<_>>().into())
    }

    async fn create(&self, mut image: ImageRecord) -> Result<ImageRecord> {
        let mut state = self.state();
        if state.images.contains_key(&image.name) {
            return Err(Error::AlreadyExists(format!("image {}", image.name)));
        }
        (image.created_at, image.updated_at) = (now(), now());
        state.images.insert(image.name.clone(), image.clone());
        Ok(image)
    }

    async fn update(&self, mut image: ImageRecord) -> Result<ImageRecord> {
        let mut state = self.state();
        let Some(old) = state.images.get(&image.name) else {
            return Err(Error::NotFound(format!("image {}", image.name)));
        };
        (image.created_at, image.updated_at) = (old.created_at, now());
        state.images.insert(image.name.clone(), image.clone());
        Ok(image)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.state().images.remove(name).map(|_| ()).ok_or_else(|| Error::NotFound(format!("image {name}")))
    }
}

#[async_trait]
impl Leases for Replay {
    async fn create(&self) -> Result<LeaseId> {
        let mut state = self.state();
        state.leases += 1;
        Ok(LeaseId(format!("replay-{}", state.leases)))
    }

    async fn hold(&self, _: &LeaseId, _: Held<'_>) -> Result<()> {
        Ok(())
    }

    async fn delete(&self, _: &LeaseId) -> Result<()> {
        Ok(())
    }

    async fn collect_since(&self, _: Option<super::Census>) -> Result<GcReport> {
        Ok(GcReport::default())
    }
}

#[cfg(test)]
mod tests;
