//! The layer pipeline that the applier ([`super::differ`]) and the unpack-while-downloading
//! stage ([`super::stage`]) share: where a layer goes, and the stream it is unpacked from.
//!
//! - [`Applier`]: the store's layer target. It holds the store, the cap on a layer's size, and
//!   [`Applier::check_upper`], which accepts only the `fs` directory of an *active* snapshot of
//!   this store as a place to write: mounts arrive from the puller (untrusted), so anything else
//!   is `InvalidArgument`. The layers below come from the snapshot's own ancestry in the
//!   database, never from the mount's `lowerdir=`.
//! - [`upper_dir`]: the directory a layer is applied to, from an active snapshot's mounts (a
//!   `bind` mount's source, or an `overlay` mount's `upperdir=`).
//! - [`layer_stream`] → [`super::unpack`] → [`finish_layer`]: blob → decompressor (chosen by
//!   [`Compression::of_layer`]: none, gzip or zstd) → [`HashingReader`] (sha256 of the
//!   uncompressed stream: the diff ID) → the unpacker. After the archive's end marker, the
//!   rest of the uncompressed stream is drained into the hash, so the diff ID covers every
//!   byte, as the OCI spec defines it.
//!
//! The uncompressed stream is capped ([`super::Options::max_layer_bytes`], default
//! [`DEFAULT_MAX_LAYER_BYTES`]): a reader past the cap fails with [`LayerTooLarge`], which the
//! unpacker reports as resource exhaustion. Every byte a layer's files put on disk comes from
//! that stream (holes of sparse files are not written), so the cap bounds what one layer can
//! write, and the time a decompression bomb can take, including zeros after the archive's end.

use std::{
    io::{self, BufRead, Read},
    path::{Component, PathBuf},
};

use super::{db::Db, snapshots::active_lowers, unpack::LayerTooLarge, Layout};
use crate::{
    error::{Error, Result},
    oci::{Algorithm, Compression, Digest, Hasher, Mount},
};

/// The default cap on a layer's uncompressed size: 64 GiB. Well above real layers (the largest
/// public ones, machine-learning images, hold a few tens of GiB), low enough that a
/// decompression bomb ends within about a minute of decompressing.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;

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
        self.db.read(move |conn| active_lowers(conn, &layout, id)).await?.ok_or_else(refused)
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
