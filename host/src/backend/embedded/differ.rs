//! The layer applier: decompresses a committed layer blob, unpacks it onto an active
//! snapshot's upper directory, and returns its diff ID.
//!
//! [`Applier`] implements [`Differ`]: the layer's blob file runs through the shared layer
//! pipeline ([`super::pipeline`]: decompress, hash, cap) into [`unpack`], on the blocking pool,
//! streaming. [`Differ::stage`] hands out a [`Staging`], which unpacks a layer while it
//! downloads and lets `apply` move the result into place.
//!
//! Only the `fs` of an active snapshot of this store is written to
//! ([`Applier::check_upper`]); the layers below come from the snapshot's ancestry:
//! [`unpack`] reads them (only) to give the parent directories it must create the metadata
//! they have below, as containerd's applier does with its `WithParents` option.

use std::{fs::File, io::BufReader, sync::Arc};

use async_trait::async_trait;

use super::{
    blocking,
    content::blob_error,
    pipeline::{finish_layer, layer_stream, upper_dir, Applier},
    stage::Staging,
    unpack::unpack,
};
use crate::{
    backend::{Differ, Stage},
    error::{Error, Result},
    oci::{Compression, Descriptor, Digest, Mount},
};

/// How much of a stored blob is read at a time.
const READ_BUF: usize = 256 * 1024;

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
    use std::{fs, io::Write, os::unix::fs::FileTypeExt, path::PathBuf};

    use super::*;
    use crate::backend::{embedded::open, embedded::unpack::tests::Tar, Backend, LeaseId};

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        (dir, backend, lease)
    }

    async fn store(b: &Backend, lease: &LeaseId, media_type: &str, data: &[u8]) -> Descriptor {
        let desc = Descriptor::of_bytes(media_type, data);
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
