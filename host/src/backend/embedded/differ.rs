//! The layer applier: decompresses a committed layer blob, unpacks it onto an active
//! snapshot's upper directory, and returns its diff ID.
//!
//! [`Applier`] implements [`Differ`]. The pipeline runs on the blocking pool, streaming:
//! blob file → decompressor (chosen by [`Compression::of_layer`]: none, gzip or zstd) →
//! [`HashingReader`] (sha256 of the uncompressed stream: the diff ID) → [`unpack`]. After the
//! archive's end marker, the rest of the uncompressed stream is drained into the hash, so the
//! diff ID covers every byte, as the OCI spec defines it.
//!
//! The uncompressed stream is capped ([`super::Options::max_layer_bytes`], default
//! [`DEFAULT_MAX_LAYER_BYTES`]): a reader past the cap fails with [`LayerTooLarge`], which the
//! unpacker reports as resource exhaustion. Every byte a layer's files put on disk comes from
//! that stream (holes of sparse files are not written), so the cap bounds what one layer can
//! write, and the time a decompression bomb can take, including zeros after the archive's end.
//!
//! The upper directory comes from the mounts: a `bind` mount's source, or an `overlay`
//! mount's `upperdir=`. Because mounts arrive from the puller (untrusted), the applier only
//! writes into a directory that is the `fs` of an *active* snapshot of this store; anything
//! else is `InvalidArgument`. The layers below come from the snapshot's own ancestry in the
//! database, never from the mount's `lowerdir=`: [`unpack`] reads them (only) to give the
//! parent directories it must create the metadata they have below, as containerd's applier
//! does with its `WithParents` option.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::{Component, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;

use super::{blocking, content::blob_error, db::Db, snapshots, stage::Staging, unpack::unpack, Layout};
use crate::{
    backend::{Differ, Stage},
    error::{Error, Result},
    oci::{Algorithm, Compression, Descriptor, Digest, Hasher, Mount},
};

/// How much of a stored blob is read at a time.
const READ_BUF: usize = 256 * 1024;

/// The default cap on a layer's uncompressed size: 64 GiB. Well above real layers (the largest
/// public ones, machine-learning images, hold a few tens of GiB), low enough that a
/// decompression bomb ends within about a minute of decompressing.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;

/// A layer's uncompressed stream went past the cap; the error inside the `io::Error` that the
/// stream returns, for the unpacker to find ([`LayerTooLarge::find`]).
#[derive(Debug, thiserror::Error)]
#[error("the layer's uncompressed size exceeds the limit of {limit} bytes (max_layer_bytes)")]
pub(crate) struct LayerTooLarge {
    pub(crate) limit: u64,
}

impl LayerTooLarge {
    /// The cap error inside `e`, if that is what `e` is.
    pub(crate) fn find(e: &io::Error) -> Option<&LayerTooLarge> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// The embedded layer applier.
#[derive(Clone)]
pub(crate) struct Applier {
    pub(super) layout: Layout,
    db: Db,
    /// The cap on a layer's uncompressed size.
    pub(super) max_layer_bytes: u64,
}

/// A reader that hashes everything read through it, and fails past `limit` bytes.
pub(super) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read >= self.limit {
            // At the cap: one more byte would be over it.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(LayerTooLarge { limit: self.limit })),
            };
        }
        let room = usize::try_from(self.limit - self.read).unwrap_or(usize::MAX);
        let len = buf.len().min(room);
        let n = self.inner.read(&mut buf[..len])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// The directory a layer is applied to, from an active snapshot's mounts.
pub(super) fn upper_dir(mounts: &[Mount]) -> Result<PathBuf> {
    let [mount] = mounts else {
        return Err(Error::InvalidArgument(format!("a layer is applied onto exactly one mount, not {}", mounts.len())));
    };
    match mount.kind.as_str() {
        "bind" if mount.options.iter().any(|o| o == "ro") => {
            Err(Error::InvalidArgument(format!("cannot apply a layer onto read-only mount {}", mount.source)))
        }
        "bind" => Ok(PathBuf::from(&mount.source)),
        "overlay" => {
            mount.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from).ok_or_else(|| {
                Error::InvalidArgument("cannot apply a layer onto a read-only overlay (no upperdir)".into())
            })
        }
        other => Err(Error::InvalidArgument(format!("cannot apply a layer onto a mount of type {other:?}"))),
    }
}

impl Applier {
    pub(crate) fn new(layout: Layout, db: Db, max_layer_bytes: u64) -> Applier {
        Applier { layout, db, max_layer_bytes }
    }

    /// Checks that `upper` is the `fs` directory of an active snapshot of this store; returns
    /// the `fs` directories of the snapshot's ancestors, nearest first.
    pub(super) async fn check_upper(&self, upper: &std::path::Path) -> Result<Vec<PathBuf>> {
        let refused = || Error::InvalidArgument(format!("{} is not an active snapshot of this store", upper.display()));
        let rel = upper.strip_prefix(self.layout.snapshots()).map_err(|_| refused())?;
        let parts: Vec<_> = rel.components().collect();
        let id = match parts.as_slice() {
            [Component::Normal(id), Component::Normal(fs)] if *fs == "fs" => {
                id.to_str().and_then(|s| s.parse::<i64>().ok())
            }
            _ => None,
        }
        .ok_or_else(refused)?;
        let layout = self.layout.clone();
        self.db.read(move |conn| snapshots::active_lowers(conn, &layout, id)).await?.ok_or_else(refused)
    }
}

/// The uncompressed stream of the layer blob `blob`, hashed as it is read.
pub(super) type LayerStream = HashingReader<Box<dyn Read + Send>>;

/// Decompresses `blob`, the layer `digest`, by `compression`; the stream fails past `limit`
/// bytes.
pub(super) fn layer_stream(
    blob: impl BufRead + Send + 'static,
    compression: Compression,
    digest: &Digest,
    limit: u64,
) -> Result<LayerStream> {
    let decompressed: Box<dyn Read + Send> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(decompress_error(digest))?)
        }
    };
    Ok(HashingReader { inner: decompressed, hasher: Hasher::new(Algorithm::Sha256), read: 0, limit })
}

/// Reads what follows the archive's end marker into the hash; returns the diff ID.
pub(super) fn finish_layer(mut rest: LayerStream, digest: &Digest) -> Result<Digest> {
    io::copy(&mut rest, &mut io::sink()).map_err(|e| match LayerTooLarge::find(&e) {
        Some(cap) => Error::ResourceExhausted(format!("layer {digest}: after the archive's end: {cap}")),
        None => decompress_error(digest)(e),
    })?;
    Ok(rest.hasher.finish())
}

fn decompress_error(digest: &Digest) -> impl Fn(io::Error) -> Error + '_ {
    |e| Error::BadLayer { layer: digest.to_string(), reason: format!("decompressing: {e}") }
}

#[async_trait]
impl Differ for Applier {
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> Result<Digest> {
        let compression = Compression::of_layer(&layer.media_type).ok_or_else(|| {
            Error::InvalidArgument(format!("{} has media type {:?}, not a layer", layer.digest, layer.media_type))
        })?;
        let upper = upper_dir(mounts)?;
        let lowers = self.check_upper(&upper).await?;
        let (blob, layer, limit) = (self.layout.blob(&layer.digest), layer.clone(), self.max_layer_bytes);
        blocking(move || {
            let digest = &layer.digest;
            let file = File::open(&blob).map_err(blob_error(digest))?;
            let size = file.metadata().map_err(blob_error(digest))?.len();
            if size != layer.size {
                return Err(Error::Mismatch {
                    what: format!("size of layer {digest}"),
                    expected: format!("{} bytes", layer.size),
                    actual: format!("{size} bytes"),
                });
            }
            let stream = layer_stream(BufReader::with_capacity(READ_BUF, file), compression, digest, limit)?;
            let rest = unpack(stream, &upper, &lowers, digest.as_str())?;
            finish_layer(rest, digest)
        })
        .await
    }

    fn stage(&self, layer: &Descriptor) -> Option<Arc<dyn Stage>> {
        let compression = Compression::of_layer(&layer.media_type)?;
        Some(Arc::new(Staging::new(self.clone(), layer.clone(), compression)))
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Write, os::unix::fs::FileTypeExt};

    use super::*;
    use crate::backend::{embedded::open, embedded::unpack::tests::Tar, Backend, LeaseId};

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        (dir, backend, lease)
    }

    async fn store(b: &Backend, lease: &LeaseId, media_type: &str, data: &[u8]) -> Descriptor {
        let desc = Descriptor {
            media_type: media_type.into(),
            digest: Digest::sha256_of(data),
            size: data.len() as u64,
            annotations: Default::default(),
            platform: None,
            urls: vec![],
        };
        let mut w = b.content.writer(&desc, lease).await.unwrap();
        w.write(data).await.unwrap();
        w.commit().await.unwrap();
        desc
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn applies_layers_and_returns_diff_ids() {
        let (_dir, b, lease) = setup().await;
        let base = Tar::new().dir("etc/", 0o755).file("etc/os-release", b"pullbox").file("etc/old", b"x").finish();
        // Trailing zero blocks after the end marker still count in the diff ID.
        let mut top = Tar::new().file("etc/.wh.old", b"").file("usr/bin/tool", b"tool").finish();
        top.extend_from_slice(&[0; 4096]);

        let base_desc = store(&b, &lease, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&base)).await;
        let mounts = b.snapshots.prepare("l1", "", &lease).await.unwrap();
        let diff_id = b.differ.apply(&base_desc, &mounts).await.unwrap();
        assert_eq!(diff_id, Digest::sha256_of(&base));
        let l1 = PathBuf::from(&mounts[0].source);
        assert_eq!(fs::read(l1.join("etc/os-release")).unwrap(), b"pullbox");
        b.snapshots.commit("base", "l1", &lease).await.unwrap();

        let top_desc =
            store(&b, &lease, "application/vnd.oci.image.layer.v1.tar+zstd", &zstd::encode_all(&top[..], 3).unwrap())
                .await;
        let mounts = b.snapshots.prepare("l2", "base", &lease).await.unwrap();
        assert_eq!(b.differ.apply(&top_desc, &mounts).await.unwrap(), Digest::sha256_of(&top));
        let upper = upper_dir(&mounts).unwrap();
        assert_eq!(fs::read(upper.join("usr/bin/tool")).unwrap(), b"tool");
        assert!(fs::symlink_metadata(upper.join("etc/old")).unwrap().file_type().is_char_device());
        assert!(l1.join("etc/old").exists(), "lower layers are untouched");

        let plain = Tar::new().file("plain", b"p").finish();
        let plain_desc = store(&b, &lease, "application/vnd.docker.image.rootfs.diff.tar", &plain).await;
        let mounts = b.snapshots.prepare("l3", "", &lease).await.unwrap();
        assert_eq!(b.differ.apply(&plain_desc, &mounts).await.unwrap(), Digest::sha256_of(&plain));
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_or_must_not_apply() {
        let (dir, b, lease) = setup().await;
        let data = Tar::new().file("f", b"f").finish();
        let desc = store(&b, &lease, "application/vnd.oci.image.layer.v1.tar", &data).await;
        let mounts = b.snapshots.prepare("a", "", &lease).await.unwrap();

        let mut config = desc.clone();
        config.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(matches!(b.differ.apply(&config, &mounts).await, Err(Error::InvalidArgument(_))));

        // Mounts that are not an active snapshot of this store: never written to.
        let outside = tempfile::tempdir().unwrap();
        let hostile = [
            vec![Mount {
                kind: "bind".into(),
                source: outside.path().display().to_string(),
                options: vec!["rw".into()],
            }],
            vec![Mount {
                kind: "bind".into(),
                source: format!("{}/../../{}", mounts[0].source, outside.path().display()),
                options: vec![],
            }],
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", mounts[0].source)],
            }],
            vec![],
        ];
        for m in hostile {
            assert!(matches!(b.differ.apply(&desc, &m).await, Err(Error::InvalidArgument(_))), "{m:?}");
        }
        b.snapshots.commit("c", "a", &lease).await.unwrap();
        let view = b.snapshots.view("v", "c", &lease).await.unwrap();
        assert!(matches!(b.differ.apply(&desc, &view).await, Err(Error::InvalidArgument(_))));
        assert!(matches!(b.differ.apply(&desc, &mounts).await, Err(Error::InvalidArgument(_))), "committed");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // A blob that is not gzip although it says so.
        let mut fake = desc.clone();
        fake.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        let mounts = b.snapshots.prepare("b", "", &lease).await.unwrap();
        assert!(matches!(b.differ.apply(&fake, &mounts).await, Err(Error::BadLayer { .. })));
        drop(dir);
    }
}
