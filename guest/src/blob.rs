//! Bounded reads of small blobs (indexes, manifests, configs) from the content store.
//!
//! [`read_small`] reads a blob whole in chunks of at most `content.max-read()` bytes, refuses
//! blobs over [`MAX_SMALL_BLOB`] = 4 MiB with `resource-exhausted` before reading anything
//! (containerd's CRI reads manifests and configs whole too; real ones are a few KiB, and
//! the largest manifest lists seen in the wild are well under 1 MiB), and checks the bytes
//! against the digest, so a puller never trusts a short read or a bad store.

use crate::digest;
use crate::error::{Error, Result, ResultExt};
use crate::host::Host;
use crate::types::Descriptor;

/// Largest index, manifest or config the puller reads.
pub const MAX_SMALL_BLOB: u64 = 4 << 20;

/// Reads the blob `desc` names, whole; `what` names it in errors (`manifest`, `config`).
///
/// Errors: `resource-exhausted` over [`MAX_SMALL_BLOB`]; `failed-precondition` when the
/// store returns fewer or more bytes than the descriptor's size or bytes that do not match
/// its digest; the errors of `content.read`.
pub fn read_small<H: Host + ?Sized>(host: &H, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
    if desc.size > MAX_SMALL_BLOB {
        return Err(Error::ResourceExhausted(format!(
            "{what} {} is {} bytes, over the {MAX_SMALL_BLOB}-byte limit for metadata blobs",
            desc.digest, desc.size
        )));
    }
    let chunk = u64::from(host.content_max_read()).max(1);
    let mut data = Vec::with_capacity(desc.size as usize);
    while (data.len() as u64) < desc.size {
        let offset = data.len() as u64;
        let length = (desc.size - offset).min(chunk) as u32;
        let part = host
            .content_read(&desc.digest, offset, length)
            .context_with(|| format!("reading {what} {}", desc.digest))?;
        if part.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{what} {} ends after {offset} bytes, its descriptor says {}",
                desc.digest, desc.size
            )));
        }
        if part.len() as u64 > u64::from(length) {
            return Err(Error::FailedPrecondition(format!(
                "reading {what} {}: asked for {length} bytes at {offset}, got {}",
                desc.digest,
                part.len()
            )));
        }
        data.extend_from_slice(&part);
    }
    digest::verify(&desc.digest, &data).map_err(|e| e.context(what))?;
    Ok(data)
}
