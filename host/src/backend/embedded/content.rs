//! The content store: blobs by digest in containerd's on-disk layout, with resumable,
//! verified writes.
//!
//! [`Content`] implements [`ContentStore`]; [`Writer`] is one ingest on disk, whose writes the
//! backends' shared [`Checked`] writer holds to the blob's size and digest.
//!
//! A write goes to `content/ingest/<sha256(ref)>/data`, where the ingest reference is the
//! blob's digest (so an interrupted write of a blob is found again by the next writer of the
//! same blob, in any process), with `ref` and `total` beside it as in containerd. Bytes are
//! hashed as they arrive; [`ContentWriter::commit`] checks size and digest ([`Checked`]), fsyncs, and renames
//! the file into `content/blobs/<alg>/<hex>`, an atomic step, so a blob is either complete and
//! verified or absent.
//!
//! Concurrent writers of one blob: each ingest has a `lock` file, locked with `flock(2)` for
//! the writer's lifetime. A second writer of the same blob (another pull sharing a layer, in
//! this process or another) *waits* for the lock, polling every [`LOCK_POLL`], rather than
//! failing: when the first writer commits, the second sees the committed blob and gets
//! `AlreadyExists` (holding the blob under its own lease); when the first gives up, the
//! second resumes its bytes. Dropping the waiting future (the caller's cancel or stall
//! timeout) stops the wait. The kernel drops the lock of a killed process.
//!
//! Leases: `writer` records the ingest under the lease, or, when the blob is already
//! committed, the blob itself, in the same transaction that checks whether it is committed;
//! `commit` records the blob in the transaction that renames it into place. The garbage
//! collector decides inside a transaction too, so it never sweeps a blob or an ingest that a
//! live lease holds.
//!
//! Labels live in the database (`content_labels`); [`MAX_LABEL_LEN`] is containerd's limit.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::fd::OwnedFd,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use rusqlite::{params, Connection};
use rustix::fs::{AtFlags, Mode, OFlags};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{
    blocking,
    db::{add_resource, drop_resource, Db, Resource},
    fsutil::{create_private_dir, remove_all, sync_dir, write_private, FileLock, PRIVATE_FILE},
    Layout,
};
use crate::{
    backend::{
        ingest::{Checked, Ingest},
        BlobReader, ContentInfo, ContentStore, ContentWriter, Labels, LeaseId,
    },
    error::{Error, Result},
    oci::{Algorithm, Descriptor, Digest, Hasher},
};

/// How often a writer waiting for another writer of the same blob checks the lock: short
/// enough that the wait ends soon after the other writer does, long enough to cost nothing.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// The longest label (key and value together) that containerd accepts.
const MAX_LABEL_LEN: usize = 4096;

/// The embedded content store.
pub(crate) struct Content {
    layout: Layout,
    db: Db,
}

impl Content {
    pub(crate) fn new(layout: Layout, db: Db) -> Content {
        Content { layout, db }
    }

    /// In one transaction: when the blob is committed, records it under `lease` and returns
    /// `true`; otherwise records the ingest `reference` (if any) under `lease`.
    async fn hold_if_committed(&self, digest: &Digest, lease: &LeaseId, reference: Option<String>) -> Result<bool> {
        let (blob, digest, lease) = (self.layout.blob(digest), digest.clone(), lease.clone());
        self.db
            .write(move |tx| {
                if blob.try_exists().map_err(Error::io(format!("checking blob {digest}")))? {
                    add_resource(tx, &lease, Resource::Content, digest.as_str())?;
                    return Ok(true);
                }
                if let Some(reference) = reference {
                    add_resource(tx, &lease, Resource::Ingest, &reference)?;
                }
                Ok(false)
            })
            .await
    }
}

/// Maps an error opening a committed blob: absent is `NotFound`.
pub(crate) fn blob_error(digest: &Digest) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound(format!("blob {digest}")),
        _ => Error::Io { context: format!("reading blob {digest}"), source: e },
    }
}

/// The ingest reference of a blob: its digest, so all writers of a blob share one ingest.
fn ingest_ref(digest: &Digest) -> String {
    digest.to_string()
}

/// Size (from the file) and labels (from the database) of a committed blob.
fn info_of(conn: &Connection, layout: &Layout, digest: &Digest) -> Result<ContentInfo> {
    let size = fs::metadata(layout.blob(digest)).map_err(blob_error(digest))?.len();
    let mut stmt = conn.prepare_cached("SELECT key, value FROM content_labels WHERE digest = ?1")?;
    let labels = stmt
        .query_map([digest.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Labels>>()?;
    Ok(ContentInfo { digest: digest.clone(), size, labels })
}

/// The sizes of committed blobs, in order: each from a `stat` relative to the directory of its
/// algorithm (opened once), the short path lookup of one name. No database: a blob is
/// committed when its file is in `blobs/` (see the module docs).
fn sizes_of(layout: &Layout, digests: &[Digest]) -> Vec<Result<u64>> {
    // The directory of each algorithm met so far; `None` when it cannot be opened, and then
    // the blob's own path is looked at, so the answer is what `info` would give.
    let mut dirs: Vec<(Algorithm, Option<OwnedFd>)> = Vec::new();
    digests
        .iter()
        .map(|digest| {
            let alg = digest.algorithm();
            let i = match dirs.iter().position(|(a, _)| *a == alg) {
                Some(i) => i,
                None => {
                    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
                    dirs.push((alg, rustix::fs::open(layout.blobs(alg), flags, Mode::empty()).ok()));
                    dirs.len() - 1
                }
            };
            match &dirs[i].1 {
                Some(dir) => rustix::fs::statat(dir, digest.hex(), AtFlags::empty())
                    .map(|st| st.st_size as u64)
                    .map_err(|e| blob_error(digest)(e.into())),
                None => fs::metadata(layout.blob(digest)).map(|m| m.len()).map_err(blob_error(digest)),
            }
        })
        .collect()
}

#[async_trait]
impl ContentStore for Content {
    async fn info(&self, digest: &Digest) -> Result<ContentInfo> {
        let (layout, digest) = (self.layout.clone(), digest.clone());
        self.db.read(move |conn| info_of(conn, &layout, &digest)).await
    }

    /// One task on the blocking pool for the whole batch, and no database: see [`sizes_of`].
    async fn sizes(&self, digests: &[Digest]) -> Result<Vec<Result<u64>>> {
        let (layout, digests) = (self.layout.clone(), digests.to_vec());
        blocking(move || Ok(sizes_of(&layout, &digests))).await
    }

    async fn read(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (path, digest) = (self.layout.blob(digest), digest.clone());
        blocking(move || {
            let file = File::open(&path).map_err(blob_error(&digest))?;
            let size = file.metadata().map_err(blob_error(&digest))?.len();
            if offset > size {
                return Err(crate::backend::past_end(&digest, offset, size));
            }
            // Bounded by the caller's `len` and by the blob: never allocate more than exists.
            let n = size.saturating_sub(offset).min(len as u64) as usize;
            let mut buf = vec![0; n];
            file.read_exact_at(&mut buf, offset).map_err(blob_error(&digest))?;
            Ok(buf)
        })
        .await
    }

    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        let file = tokio::fs::File::open(self.layout.blob(digest)).await.map_err(blob_error(digest))?;
        Ok(Box::new(file))
    }

    async fn writer(&self, expected: &Descriptor, lease: &LeaseId) -> Result<Box<dyn ContentWriter>> {
        let digest = &expected.digest;
        let already = || Error::AlreadyExists(format!("blob {digest}"));
        let reference = ingest_ref(digest);
        if self.hold_if_committed(digest, lease, Some(reference.clone())).await? {
            return Err(already());
        }
        let dir = self.layout.ingest(&reference);
        let lock = lock_ingest(&dir, digest).await?;
        // The writer we may have waited for may have committed the blob meanwhile (and dropped
        // the ingest from every lease, so record it again).
        if self.hold_if_committed(digest, lease, Some(reference.clone())).await? {
            // Waiting recreated the ingest directory that writer removed: remove it again,
            // lock held, so no empty ingest is left behind.
            let (dir, context) = (dir.clone(), format!("removing the ingest of blob {digest}"));
            if let Err(e) = blocking(move || remove_all(&dir).map_err(Error::io(context))).await {
                tracing::warn!(error = %e.chain(), "leaving an empty ingest behind");
            }
            drop(lock);
            return Err(already());
        }
        let (file, hasher, offset) = {
            let (dir, reference, expected) = (dir.clone(), reference.clone(), expected.clone());
            blocking(move || open_ingest(&dir, &reference, &expected)).await?
        };
        let ingest = Writer {
            layout: self.layout.clone(),
            db: self.db.clone(),
            digest: digest.clone(),
            lease: lease.clone(),
            reference,
            dir,
            file: tokio::fs::File::from_std(file),
            _lock: lock,
        };
        Ok(Box::new(Checked::new(expected.clone(), offset, Some(hasher), ingest)))
    }

    async fn set_labels(&self, digest: &Digest, labels: &Labels) -> Result<ContentInfo> {
        if let Some((key, value)) = labels.iter().find(|(k, v)| k.is_empty() || k.len() + v.len() > MAX_LABEL_LEN) {
            return Err(Error::InvalidArgument(format!(
                "label {key:?} of blob {digest}: a key must be non-empty and key plus value at most {MAX_LABEL_LEN} bytes (got {})",
                key.len() + value.len()
            )));
        }
        let (layout, digest, labels) = (self.layout.clone(), digest.clone(), labels.clone());
        self.db
            .write(move |tx| {
                // Inside the transaction: a collection cannot remove the blob between the
                // check and the update.
                fs::metadata(layout.blob(&digest)).map_err(blob_error(&digest))?;
                for (key, value) in &labels {
                    if value.is_empty() {
                        tx.execute(
                            "DELETE FROM content_labels WHERE digest = ?1 AND key = ?2",
                            params![digest.as_str(), key],
                        )?;
                    } else {
                        tx.execute(
                            "INSERT INTO content_labels (digest, key, value) VALUES (?1, ?2, ?3)
                             ON CONFLICT (digest, key) DO UPDATE SET value = excluded.value",
                            params![digest.as_str(), key, value],
                        )?;
                    }
                }
                info_of(tx, &layout, &digest)
            })
            .await
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        let (blob, digest) = (self.layout.blob(digest), digest.clone());
        self.db
            .write(move |tx| {
                fs::remove_file(&blob).map_err(blob_error(&digest))?;
                tx.execute("DELETE FROM content_labels WHERE digest = ?1", [digest.as_str()])?;
                drop_resource(tx, Resource::Content, digest.as_str())
            })
            .await
    }
}

/// Takes the lock of the ingest directory `dir`, waiting while another writer holds it.
async fn lock_ingest(dir: &Path, digest: &Digest) -> Result<FileLock> {
    let mut announced = false;
    loop {
        let (dir, context) = (dir.to_path_buf(), format!("locking ingest of blob {digest}"));
        let lock = blocking(move || {
            create_private_dir(&dir).map_err(Error::io(context.clone()))?;
            match FileLock::try_acquire(&dir.join("lock")) {
                // The holder removed the directory as we opened it: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                other => other.map_err(Error::io(context)),
            }
        })
        .await?;
        if let Some(lock) = lock {
            return Ok(lock);
        }
        if !announced {
            tracing::info!(%digest, "blob is being written by another pull; waiting for it");
            announced = true;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Opens (or resumes) the ingest in `dir`, with the lock held. Returns the data file positioned
/// at its end, a hasher fed with the bytes already there, and their count. An ingest left for a
/// different size, or longer than the blob, is restarted.
fn open_ingest(dir: &Path, reference: &str, expected: &Descriptor) -> Result<(File, Hasher, u64)> {
    let io_err = || Error::io(format!("opening ingest of blob {}", expected.digest));
    let total_path = dir.join("total");
    let same_total =
        fs::read_to_string(&total_path).ok().and_then(|s| s.trim().parse::<u64>().ok()) == Some(expected.size);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE)
        .open(dir.join("data"))
        .map_err(io_err())?;
    let mut hasher = Hasher::new(expected.digest.algorithm());
    let mut offset = file.metadata().map_err(io_err())?.len();
    if !same_total || offset > expected.size {
        file.set_len(0).map_err(io_err())?;
        offset = 0;
        write_private(&dir.join("ref"), reference.as_bytes()).map_err(io_err())?;
        write_private(&total_path, expected.size.to_string().as_bytes()).map_err(io_err())?;
    } else if offset > 0 {
        let mut buf = vec![0; 1 << 16];
        let mut fed = 0;
        loop {
            let n = file.read(&mut buf).map_err(io_err())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            fed += n as u64;
        }
        if fed != offset {
            return Err(io_err()(io::Error::new(io::ErrorKind::UnexpectedEof, "ingest shrank while resuming")));
        }
    }
    file.seek(SeekFrom::Start(offset)).map_err(io_err())?;
    Ok((file, hasher, offset))
}

/// An open, locked ingest; [`Checked`] holds its writes to the descriptor.
pub(crate) struct Writer {
    layout: Layout,
    db: Db,
    digest: Digest,
    lease: LeaseId,
    reference: String,
    dir: PathBuf,
    file: tokio::fs::File,
    /// Held until the writer is dropped (after commit has removed the ingest).
    _lock: FileLock,
}

impl Writer {
    fn io_err(&self, what: &str) -> impl FnOnce(io::Error) -> Error {
        Error::io(format!("{what} ingest of blob {} in {}", self.digest, self.dir.display()))
    }
}

#[async_trait]
impl Ingest for Writer {
    async fn append(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data).await.map_err(self.io_err("writing"))
    }

    async fn reset(&mut self) -> Result<()> {
        self.file.set_len(0).await.map_err(self.io_err("truncating"))?;
        self.file.seek(SeekFrom::Start(0)).await.map_err(self.io_err("truncating"))?;
        Ok(())
    }

    /// Removes the ingest, with the lock still held. A failure is only logged: the caller's
    /// outcome (a mismatch, or a committed blob) stands, and the collector removes ingests
    /// that no lease holds.
    async fn discard(&mut self) {
        let dir = self.dir.clone();
        let context = format!("discarding ingest of blob {}", self.digest);
        if let Err(e) = blocking(move || remove_all(&dir).map_err(Error::io(context))).await {
            tracing::warn!(error = %e.chain(), "leaving an ingest behind");
        }
    }

    async fn commit(mut self) -> Result<ContentInfo> {
        let digest = self.digest.clone();
        self.file.flush().await.map_err(self.io_err("flushing"))?;
        self.file.sync_all().await.map_err(self.io_err("syncing"))?;

        let (layout, lease, reference, dir) =
            (self.layout.clone(), self.lease.clone(), self.reference.clone(), self.dir.clone());
        let info = self
            .db
            .write(move |tx| {
                add_resource(tx, &lease, Resource::Content, digest.as_str())?;
                let blob = layout.blob(&digest);
                let context = format!("committing blob {digest}");
                fs::rename(dir.join("data"), &blob).map_err(Error::io(context.clone()))?;
                sync_dir(&layout.blobs(digest.algorithm())).map_err(Error::io(context))?;
                drop_resource(tx, Resource::Ingest, &reference)?;
                info_of(tx, &layout, &digest)
            })
            .await?;
        self.discard().await;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{embedded::open, Backend};

    fn descriptor(data: &[u8]) -> Descriptor {
        Descriptor::of_bytes("application/octet-stream", data)
    }

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        (dir, backend, lease)
    }

    fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
        root.join("content/blobs/sha256").join(digest.hex())
    }

    #[tokio::test]
    async fn write_commit_read() {
        let (dir, b, lease) = setup().await;
        let data = b"hello, content store".repeat(100);
        let desc = descriptor(&data);
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        assert_eq!(w.offset(), 0);
        for chunk in data.chunks(7) {
            w.write(chunk).await.unwrap();
        }
        let info = w.commit().await.unwrap();
        assert_eq!((info.digest.clone(), info.size), (desc.digest.clone(), data.len() as u64));
        assert_eq!(fs::read(blob_path(dir.path(), &desc.digest)).unwrap(), data);
        assert_eq!(fs::read_dir(dir.path().join("content/ingest")).unwrap().count(), 0, "ingest left behind");

        assert_eq!(b.content.read(&desc.digest, 7, 5).await.unwrap(), &data[7..12]);
        assert_eq!(b.content.read(&desc.digest, data.len() as u64 - 3, 1000).await.unwrap(), &data[data.len() - 3..]);
        assert!(
            matches!(b.content.read(&desc.digest, 1 << 40, 10).await, Err(Error::InvalidArgument(_))),
            "past the end"
        );
        assert!(b.content.read(&desc.digest, data.len() as u64, 10).await.unwrap().is_empty(), "at the end");
        let mut all = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b.content.open(&desc.digest).await.unwrap(), &mut all).await.unwrap();
        assert_eq!(all, data);

        // Writing it again: already there, and the second lease now holds it.
        let lease2 = b.leases.create().await.unwrap();
        let err = b.content.writer(&desc, &lease2).await.err().unwrap();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    }

    #[tokio::test]
    async fn labels_and_delete() {
        let (_dir, b, lease) = setup().await;
        let desc = descriptor(b"labelled");
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"labelled").await.unwrap();
        w.commit().await.unwrap();

        let labels: Labels = [("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())].into();
        assert_eq!(b.content.set_labels(&desc.digest, &labels).await.unwrap().labels, labels);
        let info = b.content.set_labels(&desc.digest, &[("a".to_owned(), String::new())].into()).await.unwrap();
        assert_eq!(info.labels, [("b".to_owned(), "2".to_owned())].into());
        assert_eq!(b.content.info(&desc.digest).await.unwrap(), info);

        b.content.delete(&desc.digest).await.unwrap();
        assert!(matches!(b.content.info(&desc.digest).await, Err(Error::NotFound(_))));
        assert!(matches!(b.content.delete(&desc.digest).await, Err(Error::NotFound(_))));
        assert!(matches!(b.content.set_labels(&desc.digest, &labels).await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn sizes_answer_each_digest_as_info_does() {
        let (dir, b, lease) = setup().await;
        let mut digests = Vec::new();
        for data in [&b"one"[..], b"three"] {
            let desc = descriptor(data);
            let mut w = b.content.writer(&desc, &lease).await.unwrap();
            w.write(data).await.unwrap();
            w.commit().await.unwrap();
            digests.push(desc.digest);
        }
        let gone = descriptor(b"removed behind our back").digest;
        let sha512: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        let asked = [digests[0].clone(), gone.clone(), digests[1].clone(), sha512, digests[0].clone()];
        let sizes = b.content.sizes(&asked).await.unwrap();
        assert_eq!(sizes.len(), asked.len());
        assert_eq!(sizes[0].as_ref().unwrap(), &3);
        assert!(matches!(&sizes[1], Err(Error::NotFound(m)) if m.contains(gone.as_str())), "{:?}", sizes[1]);
        assert_eq!(sizes[2].as_ref().unwrap(), &5);
        assert!(matches!(&sizes[3], Err(Error::NotFound(_))), "{:?}", sizes[3]);
        assert_eq!(sizes[4].as_ref().unwrap(), &3);
        for (d, size) in asked.iter().zip(&sizes) {
            let info = b.content.info(d).await.map(|i| i.size).map_err(|e| e.to_string());
            assert_eq!(info, size.as_ref().copied().map_err(|e| e.to_string()), "{d}");
        }
        // A blob deleted behind pullbox's back is absent at once.
        fs::remove_file(blob_path(dir.path(), &digests[1])).unwrap();
        assert!(matches!(b.content.sizes(&digests).await.unwrap()[1], Err(Error::NotFound(_))));
        assert!(b.content.sizes(&[]).await.unwrap().is_empty());
    }

    /// [`ContentStore::sizes`] as a backend without its own gets it: `info` of each digest.
    #[tokio::test]
    async fn the_default_sizes_asks_info_for_each_digest() {
        use std::sync::Arc;
        struct InfoOnly(Arc<dyn ContentStore>);
        #[async_trait]
        impl ContentStore for InfoOnly {
            async fn info(&self, digest: &Digest) -> Result<ContentInfo> {
                self.0.info(digest).await
            }
            async fn read(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
                self.0.read(digest, offset, len).await
            }
            async fn open(&self, digest: &Digest) -> Result<BlobReader> {
                self.0.open(digest).await
            }
            async fn writer(&self, expected: &Descriptor, lease: &LeaseId) -> Result<Box<dyn ContentWriter>> {
                self.0.writer(expected, lease).await
            }
            async fn set_labels(&self, digest: &Digest, labels: &Labels) -> Result<ContentInfo> {
                self.0.set_labels(digest, labels).await
            }
            async fn delete(&self, digest: &Digest) -> Result<()> {
                self.0.delete(digest).await
            }
        }
        let (_dir, b, lease) = setup().await;
        let desc = descriptor(b"present");
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"present").await.unwrap();
        w.commit().await.unwrap();
        let absent = |i: u8| descriptor(&[i]).digest;
        let asked: Vec<Digest> = (0..40).map(|i| if i % 2 == 0 { desc.digest.clone() } else { absent(i) }).collect();
        let sizes = InfoOnly(b.content.clone()).sizes(&asked).await.unwrap();
        assert_eq!(sizes.len(), 40);
        for (i, size) in sizes.iter().enumerate() {
            match i % 2 {
                0 => assert_eq!(size.as_ref().unwrap(), &7),
                _ => assert!(matches!(size, Err(Error::NotFound(_))), "{i}: {size:?}"),
            }
        }
    }

    #[tokio::test]
    async fn mismatches_discard_the_ingest() {
        let (dir, b, lease) = setup().await;
        let desc = descriptor(b"expected bytes");
        let ingests = || fs::read_dir(dir.path().join("content/ingest")).unwrap().count();

        // Same size, different bytes.
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"unexpected byt").await.unwrap();
        let err = w.commit().await.err().unwrap();
        assert!(matches!(&err, Error::Mismatch { what, .. } if what.contains(desc.digest.as_str())), "{err}");
        assert_eq!(ingests(), 0);
        assert!(!blob_path(dir.path(), &desc.digest).exists());

        // Too short.
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"expected").await.unwrap();
        assert!(matches!(w.commit().await, Err(Error::Mismatch { .. })));
        assert_eq!(ingests(), 0);

        // Too long: refused as soon as it happens.
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"expected ").await.unwrap();
        assert!(matches!(w.write(b"bytes and more").await, Err(Error::Mismatch { .. })));
        assert_eq!(w.offset(), 0);
        w.write(b"expected bytes").await.unwrap();
        w.commit().await.unwrap();
        assert!(blob_path(dir.path(), &desc.digest).exists());
    }

    #[tokio::test]
    async fn interrupted_writes_resume() {
        let (_dir, b, lease) = setup().await;
        let data = b"0123456789abcdefghij".to_vec();
        let desc = descriptor(&data);
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(&data[..8]).await.unwrap();
        drop(w);

        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        assert_eq!(w.offset(), 8);
        w.write(&data[8..]).await.unwrap();
        assert_eq!(w.commit().await.unwrap().digest, desc.digest);

        // truncate restarts from zero.
        let other = descriptor(b"restart me");
        let mut w = b.content.writer(&other, &lease).await.unwrap();
        w.write(b"garbage").await.unwrap();
        w.truncate().await.unwrap();
        assert_eq!(w.offset(), 0);
        w.write(b"restart me").await.unwrap();
        w.commit().await.unwrap();
    }

    #[tokio::test]
    async fn a_second_writer_waits_for_the_first() {
        let (dir, b, lease) = setup().await;
        let data = b"shared layer".to_vec();
        let desc = descriptor(&data);
        let mut first = b.content.writer(&desc, &lease).await.unwrap();
        first.write(&data[..6]).await.unwrap();

        let content = b.content.clone();
        let (desc2, lease2) = (desc.clone(), b.leases.create().await.unwrap());
        let second = tokio::spawn(async move { content.writer(&desc2, &lease2).await.map(|_| ()) });
        tokio::time::sleep(LOCK_POLL * 3).await;
        assert!(!second.is_finished(), "the second writer must wait");

        first.write(&data[6..]).await.unwrap();
        first.commit().await.unwrap();
        let err = second.await.unwrap().err().unwrap();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("content/ingest")).unwrap().count(), 0, "an ingest was left behind");
    }

    #[tokio::test]
    async fn writes_need_a_live_lease() {
        let (_dir, b, lease) = setup().await;
        b.leases.delete(&lease).await.unwrap();
        let err = b.content.writer(&descriptor(b"x"), &lease).await.err().unwrap();
        assert!(matches!(err, Error::NotFound(m) if m.contains("lease")));
    }
}
