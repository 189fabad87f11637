//! The layer applier over containerd's diff service.
//!
//! [`Differ`] implements [`crate::backend::Differ`] with `Apply`: containerd reads the layer
//! blob from its content store, decompresses it (gzip, zstd or none, by media type), unpacks
//! it onto the mounts of an active snapshot and answers with the descriptor of the
//! uncompressed stream, whose digest is the diff ID. The mounts are those containerd's
//! snapshots service returned; containerd mounts them itself.
//!
//! With [`super::Config::sync_fs`] the request asks containerd to flush the unpacked files to
//! disk before answering (`ApplyRequest.sync_fs`, honoured by containerd 2's differ);
//! containerd 1.6 predates the field and ignores it (protobuf skips unknown fields), so there
//! the option has no effect.
//!
//! containerd's differ finds the blob by digest alone and never looks at the descriptor's
//! size, so [`Differ`] holds the size to the stored blob's first, as the embedded applier
//! does: a layer announced with another size is a [`Error::Mismatch`], not applied.

use async_trait::async_trait;
use containerd_client::services::v1::{diff_client::DiffClient, ApplyRequest};

use super::{content::Content, parse_digest, to_descriptor, to_mount, Conn};
use crate::{
    backend::ContentStore,
    error::{Error, Result},
    oci::{Descriptor, Digest, Mount},
};

/// What containerd's messages say when unpacking a layer failed (as opposed to reaching the
/// content or mounting the snapshot).
const UNPACK_FAILURES: &[&str] = &["mount callback failed", "failed to extract layer", "decompress"];

/// containerd's diff service, in the connection's namespace.
pub(crate) struct Differ {
    conn: Conn,
    /// Sent as `ApplyRequest.sync_fs` (see [`super::Config::sync_fs`]).
    sync_fs: bool,
}

impl Differ {
    pub(crate) fn new(conn: Conn, sync_fs: bool) -> Differ {
        Differ { conn, sync_fs }
    }
}

#[async_trait]
impl crate::backend::Differ for Differ {
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> Result<Digest> {
        let size = Content::new(self.conn.clone()).info(&layer.digest).await?.size;
        if size != layer.size {
            return Err(Error::Mismatch {
                what: format!("size of layer {}", layer.digest),
                expected: format!("{} bytes", layer.size),
                actual: format!("{size} bytes"),
            });
        }
        let req = self.conn.request(ApplyRequest {
            diff: Some(to_descriptor(layer)),
            mounts: mounts.iter().map(to_mount).collect(),
            sync_fs: self.sync_fs,
            ..Default::default()
        });
        let applied = DiffClient::new(self.conn.channel.clone())
            .apply(req)
            .await
            .map_err(|s| match self.conn.error(s) {
                // containerd reports what went wrong while unpacking (a broken compressed
                // stream or archive) as an error without a code, from its mount callback.
                Error::Io { context, .. } if UNPACK_FAILURES.iter().any(|m| context.contains(m)) => {
                    let reason = context.strip_prefix("containerd: ").unwrap_or(&context).to_owned();
                    Error::BadLayer { layer: layer.digest.to_string(), reason }
                }
                e => e,
            })?
            .into_inner()
            .applied
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("containerd applied layer {} without a diff ID", layer.digest))
            })?;
        parse_digest(&applied.digest)
    }
}
