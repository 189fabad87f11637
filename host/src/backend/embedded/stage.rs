//! Layers unpacked while they download: the embedded store's [`Stage`].
//!
//! containerd downloads a whole layer, syncs it, reads it back, and only then decompresses and
//! unpacks it, one layer after another. Here the registry transport hands every chunk it
//! stores to the layer's [`Staging`] as well, and a blocking task decompresses, hashes (the
//! diff ID) and unpacks the stream into a directory of its own, `staging/<uuid>/fs`, as the
//! bytes arrive. So each blob is read once, and the layers of an image, which download in
//! parallel, unpack in parallel. The puller still prepares, applies and commits its snapshots
//! in order: its `diff.apply` of a staged layer moves the unpacked tree onto the snapshot with
//! one `rename(2)` and gives the parent directories the layer did not list the metadata of the
//! layers below ([`inherit_parents`]), which only now exist.
//!
//! The unpacking runs on bytes whose digest is not verified yet, with the same hostile-archive
//! safety as any unpack; its result is used only after the download has succeeded, which
//! verifies size and digest. Anything unusual (a download that resumes from an earlier
//! process's ingest or starts over, a blob that was already stored, a layer that fails to
//! unpack, a snapshot that is not empty) ends the staging, and `diff.apply` unpacks the stored
//! blob as before (and then reports a bad layer in full).
//!
//! Memory: at most [`CHANNEL_CHUNKS`] network chunks wait per layer; a slow unpack slows its
//! download rather than buffering it. Disk: a staging directory holds a file lock while its
//! owner lives; one nobody applies is deleted when its [`Staging`] is dropped (the end of the
//! request), and one a killed process left is deleted by the next garbage collection.

use std::{
    fs::DirBuilder,
    io::{self, BufRead, Read},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    blocking,
    fsutil::{remove_all, FileLock, PRIVATE_DIR},
    pipeline::{finish_layer, layer_stream, upper_dir, Applier},
    unpack::{inherit_parents, unpack_staged, CreatedParents},
    Layout,
};
use crate::{
    backend::Stage,
    error::{Error, Result},
    oci::{Compression, Descriptor, Digest, Mount},
};

/// How many downloaded chunks may wait for the unpacker of one layer.
const CHANNEL_CHUNKS: usize = 4;

/// One layer being unpacked while it downloads.
pub(crate) struct Staging {
    applier: Applier,
    layer: Descriptor,
    compression: Compression,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes fed so far: the offset the next chunk must start at.
    fed: u64,
    /// The staging was given up: nothing more is fed.
    ended: bool,
    /// To the unpacker; `None` before the first chunk and after the end.
    tx: Option<mpsc::Sender<Bytes>>,
    /// The unpacker, from the first chunk on, until `apply` takes its result.
    job: Option<JoinHandle<Result<Staged>>>,
}

impl State {
    fn give_up(&mut self) {
        self.ended = true;
        self.tx = None;
    }
}

impl Staging {
    pub(crate) fn new(applier: Applier, layer: Descriptor, compression: Compression) -> Staging {
        Staging { applier, layer, compression, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the staging and takes the unpacker, if it was started and not taken yet.
    fn take_job(&self) -> Option<JoinHandle<Result<Staged>>> {
        let mut state = self.state();
        state.give_up();
        state.job.take()
    }

    /// Starts the unpacker on the chunks `rx` will carry.
    fn spawn(&self, rx: mpsc::Receiver<Bytes>) -> JoinHandle<Result<Staged>> {
        let (layout, layer, compression) = (self.applier.layout.clone(), self.layer.clone(), self.compression);
        let limit = self.applier.max_layer_bytes;
        tokio::task::spawn_blocking(move || {
            let dir = StagingDir::create(&layout)?;
            let incoming = Incoming { rx, chunk: Bytes::new(), remaining: layer.size };
            let stream = layer_stream(incoming, compression, &layer.digest, limit)?;
            let (rest, created) = unpack_staged(stream, &dir.fs(), layer.digest.as_str())?;
            let diff_id = finish_layer(rest, &layer.digest)?;
            Ok(Staged { dir, created, diff_id })
        })
    }
}

#[async_trait]
impl Stage for Staging {
    async fn feed(&self, offset: u64, bytes: Bytes) {
        let tx = {
            let mut state = self.state();
            if state.ended {
                return;
            }
            if offset != state.fed {
                tracing::debug!(layer = %self.layer.digest, offset, fed = state.fed, "download does not continue; unpacking from the stored blob instead");
                state.give_up();
                return;
            }
            if state.job.is_none() {
                let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
                state.job = Some(self.spawn(rx));
                state.tx = Some(tx);
            }
            state.fed += bytes.len() as u64;
            state.tx.clone()
        };
        // The unpacker stopped (a bad layer): the download goes on without it.
        if let Some(tx) = tx {
            if tx.send(bytes).await.is_err() {
                self.state().give_up();
            }
        }
    }

    fn end(&self) {
        self.state().give_up();
    }

    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> Result<Option<Digest>> {
        let staged_as = (&self.layer.digest, self.layer.size, &self.layer.media_type);
        if (&layer.digest, layer.size, &layer.media_type) != staged_as {
            return Ok(None);
        }
        // A snapshot outside this store (another snapshotter of containerd's, chosen with
        // `snapshots.select`) is unpacked by the backend's differ from the stored blob.
        let outside = |e: Error| tracing::debug!(layer = %layer.digest, "not unpacked while downloading: {e}");
        let upper = match upper_dir(mounts) {
            Ok(upper) => upper,
            Err(e @ Error::InvalidArgument(_)) => {
                outside(e);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let lowers = match self.applier.check_upper(&upper).await {
            Ok(lowers) => lowers,
            Err(e @ Error::InvalidArgument(_)) => {
                outside(e);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let Some(job) = self.take_job() else { return Ok(None) };
        let digest = self.layer.digest.clone();
        let staged = match job.await {
            Ok(Ok(staged)) => staged,
            Ok(Err(e)) => {
                tracing::debug!(layer = %digest, "unpacking while downloading failed; unpacking from the stored blob: {}", e.chain());
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!(layer = %digest, "the unpacker stopped: {e}");
                return Ok(None);
            }
        };
        blocking(move || staged.move_onto(&upper, &lowers, &digest)).await
    }

    async fn discard(&self) {
        if let Some(job) = self.take_job() {
            delete_staged(job).await;
        }
    }
}

/// Waits for the unpacker `job` and deletes what it staged, on the blocking pool (it may be a
/// big tree).
async fn delete_staged(job: JoinHandle<Result<Staged>>) {
    if let Ok(Ok(staged)) = job.await {
        let _ = tokio::task::spawn_blocking(move || drop(staged)).await;
    }
}

impl Drop for Staging {
    /// Deletes what was staged and never applied or discarded, in the background.
    fn drop(&mut self) {
        let Some(job) = self.take_job() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(delete_staged(job));
        }
    }
}

/// A layer unpacked into its staging directory.
struct Staged {
    dir: StagingDir,
    created: CreatedParents,
    diff_id: Digest,
}

impl Staged {
    /// Moves the unpacked tree onto the empty directory `upper` (whose layers below are
    /// `lowers`) and finishes it; `None` when it cannot be moved there.
    fn move_onto(self, upper: &Path, lowers: &[PathBuf], layer: &Digest) -> Result<Option<Digest>> {
        // rename(2) replaces an empty directory and refuses a non-empty one.
        if let Err(e) = std::fs::rename(self.dir.fs(), upper) {
            tracing::debug!(layer = %layer, upper = %upper.display(), "cannot move the unpacked layer into place: {e}");
            return Ok(None);
        }
        inherit_parents(upper, lowers, &self.created, layer.as_str())?;
        Ok(Some(self.diff_id))
    }
}

/// `staging/<uuid>`: a lock file held while its owner lives, and `fs`, the unpacked tree.
/// Deleted when dropped.
struct StagingDir {
    path: PathBuf,
    _lock: FileLock,
}

impl StagingDir {
    fn create(layout: &Layout) -> Result<StagingDir> {
        let path = layout.staging().join(uuid::Uuid::new_v4().simple().to_string());
        let context = format!("creating the staging directory {}", path.display());
        DirBuilder::new().mode(PRIVATE_DIR).create(&path).map_err(Error::io(context.clone()))?;
        let lock =
            FileLock::try_acquire(&path.join(STAGING_LOCK)).map_err(Error::io(context.clone()))?.ok_or_else(|| {
                Error::FailedPrecondition(format!("{} is locked although it was just made", path.display()))
            })?;
        let dir = StagingDir { path, _lock: lock };
        // As the snapshotter makes a snapshot's directory: this one replaces it.
        DirBuilder::new().mode(0o755).create(dir.fs()).map_err(Error::io(context))?;
        Ok(dir)
    }

    fn fs(&self) -> PathBuf {
        self.path.join("fs")
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = remove_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), "cannot delete a staging directory (the next collection will): {e}");
        }
    }
}

/// The name of a staging directory's lock file.
pub(crate) const STAGING_LOCK: &str = "lock";

/// The downloaded chunks of a blob of known size, as a blocking reader. Ends exactly at the
/// size; a download that stops before is an error.
struct Incoming {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    /// Bytes not received yet.
    remaining: u64,
}

impl BufRead for Incoming {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunk.is_empty() && self.remaining > 0 {
            let chunk = self.rx.blocking_recv().ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the download stopped before the end of the layer")
            })?;
            // The transport never stores more than the size; a chunk beyond it is not ours.
            self.remaining = self
                .remaining
                .checked_sub(chunk.len() as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "more bytes than the layer's size"))?;
            self.chunk = chunk;
        }
        Ok(&self.chunk)
    }

    fn consume(&mut self, n: usize) {
        self.chunk.advance(n);
    }
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Write};

    use super::*;
    use crate::backend::{embedded::open, embedded::unpack::tests::Tar, Backend, LeaseId};

    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        (dir, backend, lease)
    }

    fn layer(tar: &[u8]) -> (Descriptor, Vec<u8>) {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(tar).unwrap();
        let blob = e.finish().unwrap();
        let desc = Descriptor::of_bytes(GZIP, &blob);
        (desc, blob)
    }

    /// Feeds `blob` in chunks of `chunk` bytes, as the transport does, then ends.
    async fn feed_all(stage: &dyn Stage, blob: &[u8], chunk: usize) {
        let mut offset = 0;
        for part in blob.chunks(chunk) {
            stage.feed(offset, Bytes::copy_from_slice(part)).await;
            offset += part.len() as u64;
        }
        stage.end();
    }

    fn staging_entries(dir: &tempfile::TempDir) -> usize {
        fs::read_dir(dir.path().join("staging")).unwrap().count()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_layer_unpacked_while_downloading_is_moved_onto_its_snapshot() {
        let (dir, b, lease) = setup().await;
        let base = Tar::new().dir("etc/", 0o750).file("etc/os-release", b"pullbox").finish();
        let (base_desc, base_blob) = layer(&base);
        let mounts = b.snapshots.prepare("l1", "", &lease).await.unwrap();
        let stage = b.differ.stage(&base_desc).unwrap();
        feed_all(stage.as_ref(), &base_blob, 7).await;
        assert_eq!(stage.apply(&base_desc, &mounts).await.unwrap(), Some(Digest::sha256_of(&base)));
        assert_eq!(fs::read(PathBuf::from(&mounts[0].source).join("etc/os-release")).unwrap(), b"pullbox");
        assert_eq!(stage.apply(&base_desc, &mounts).await.unwrap(), None, "a staged layer is applied once");
        b.snapshots.commit("base", "l1", &lease).await.unwrap();

        // The upper layer's unlisted parent takes the metadata of the layer below.
        let top = Tar::new().file("etc/extra", b"x").finish();
        let (top_desc, top_blob) = layer(&top);
        let stage = b.differ.stage(&top_desc).unwrap();
        feed_all(stage.as_ref(), &top_blob, 1000).await;
        let mounts = b.snapshots.prepare("l2", "base", &lease).await.unwrap();
        assert_eq!(stage.apply(&top_desc, &mounts).await.unwrap(), Some(Digest::sha256_of(&top)));
        let upper = upper_dir(&mounts).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(upper.join("etc")).unwrap().permissions().mode() & 0o7777, 0o750);
        drop(stage);
        assert_eq!(staging_entries(&dir), 0, "nothing left in staging");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn anything_unusual_falls_back_to_the_stored_blob() {
        let (dir, b, lease) = setup().await;
        let tar = Tar::new().file("f", b"data").finish();
        let (desc, blob) = layer(&tar);

        // A download that starts over, one that stops short, one never fed (already stored).
        let restarted = b.differ.stage(&desc).unwrap();
        restarted.feed(0, Bytes::copy_from_slice(&blob[..10])).await;
        restarted.feed(0, Bytes::copy_from_slice(&blob)).await;
        restarted.end();
        let short = b.differ.stage(&desc).unwrap();
        feed_all(short.as_ref(), &blob[..blob.len() - 1], 5).await;
        let unfed = b.differ.stage(&desc).unwrap();
        unfed.end();
        // A layer that is not what it says (not gzip).
        let mut fake = desc.clone();
        fake.size = tar.len() as u64;
        let bad = b.differ.stage(&fake).unwrap();
        feed_all(bad.as_ref(), &tar, 100).await;
        // And a descriptor other than the one staged (a layer applied as a config).
        let other = b.differ.stage(&desc).unwrap();
        feed_all(other.as_ref(), &blob, 64).await;
        let mut as_config = desc.clone();
        as_config.media_type = "application/vnd.oci.image.config.v1+json".into();
        let cases = [(restarted, &desc), (short, &desc), (unfed, &desc), (bad, &fake), (other, &as_config)];
        for (i, (stage, applied_as)) in cases.into_iter().enumerate() {
            let mounts = b.snapshots.prepare(&format!("s{i}"), "", &lease).await.unwrap();
            assert_eq!(stage.apply(applied_as, &mounts).await.unwrap(), None, "case {i}");
            assert_eq!(fs::read_dir(&mounts[0].source).unwrap().count(), 0, "case {i}: nothing moved");
        }

        // A snapshot that is not empty is not replaced.
        let stage = b.differ.stage(&desc).unwrap();
        feed_all(stage.as_ref(), &blob, 64).await;
        let mounts = b.snapshots.prepare("full", "", &lease).await.unwrap();
        fs::write(PathBuf::from(&mounts[0].source).join("mine"), b"m").unwrap();
        assert_eq!(stage.apply(&desc, &mounts).await.unwrap(), None);
        assert!(PathBuf::from(&mounts[0].source).join("mine").exists());

        // Mounts that are no active snapshot of this store (another snapshotter's) get nothing
        // from the stage; the differ, which the caller falls back to, refuses them here.
        let stage = b.differ.stage(&desc).unwrap();
        feed_all(stage.as_ref(), &blob, 64).await;
        let outside = tempfile::tempdir().unwrap();
        let hostile =
            vec![Mount { kind: "bind".into(), source: outside.path().display().to_string(), options: vec![] }];
        assert_eq!(stage.apply(&desc, &hostile).await.unwrap(), None);
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "nothing moved outside the store");
        assert!(matches!(b.differ.apply(&desc, &hostile).await, Err(Error::InvalidArgument(_))));
        let discarded = b.differ.stage(&desc).unwrap();
        feed_all(discarded.as_ref(), &blob, 64).await;
        discarded.discard().await;
        drop(stage);
        // Unapplied staging directories go when their stage does (off the async threads).
        for _ in 0..100 {
            if staging_entries(&dir) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(staging_entries(&dir), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn collection_removes_what_a_killed_pull_staged_and_spares_live_ones() {
        let (dir, b, _lease) = setup().await;
        let layout = Layout { root: dir.path().canonicalize().unwrap() };
        let live = blocking({
            let layout = layout.clone();
            move || StagingDir::create(&layout)
        })
        .await
        .unwrap();
        fs::write(live.fs().join("f"), b"live").unwrap();
        let dead = dir.path().join("staging/left-by-a-killed-pull");
        fs::create_dir_all(dead.join("fs/usr")).unwrap();
        fs::write(dead.join("fs/usr/f"), b"dead").unwrap();
        fs::write(dead.join(STAGING_LOCK), b"").unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!(report.snapshots, 1, "{report:?}");
        assert!(!dead.exists());
        assert!(live.fs().join("f").exists());
        drop(live);
        assert_eq!(staging_entries(&dir), 0);
    }
}
