//! One size- and digest-checked [`ContentWriter`] for every content store.
//!
//! A store says how bytes are kept ([`Ingest`]: append, start over, throw away, make visible);
//! [`Checked`] is the one place that holds a write to its descriptor: it counts the bytes,
//! refuses the first write that would go past the expected size (and starts the ingest over,
//! since what it holds belongs to something else), refuses a commit of fewer bytes, and, when
//! it is given a hasher, a commit whose digest differs. A refused commit discards the ingest,
//! so nothing that does not match its descriptor becomes visible.
//!
//! A store that verifies the digest itself at commit (containerd does, and a resumed
//! containerd ingest's earlier bytes are not at hand to hash) gives no hasher; its
//! [`Ingest::commit`] reports a digest mismatch as [`Error::Mismatch`] itself.

use async_trait::async_trait;

use super::{ContentInfo, ContentWriter};
use crate::{
    error::{Error, Result},
    oci::{Descriptor, Hasher},
};

/// How a content store keeps the bytes of one blob being written; see [`Checked`], which
/// calls it only with bytes that fit the descriptor.
#[async_trait]
pub(crate) trait Ingest: Send + Sized + 'static {
    /// Appends bytes.
    async fn append(&mut self, data: &[u8]) -> Result<()>;

    /// Discards what was written, to start over at offset 0.
    async fn reset(&mut self) -> Result<()>;

    /// Throws the ingest away after a refused commit. Best effort: a failure is logged, the
    /// caller's mismatch stands.
    async fn discard(&mut self);

    /// Makes the blob visible; its size (and, given a hasher, its digest) are verified.
    async fn commit(self) -> Result<ContentInfo>;
}

/// The writer of one blob over a store's [`Ingest`] (see the module docs).
pub(crate) struct Checked<I> {
    expected: Descriptor,
    offset: u64,
    /// Fed every byte written; `None` when the store verifies the digest itself.
    hasher: Option<Hasher>,
    ingest: I,
}

impl<I: Ingest> Checked<I> {
    /// A writer of `expected` whose ingest holds `offset` bytes already (an interrupted
    /// earlier write); `hasher`, when given, has been fed those bytes.
    pub(crate) fn new(expected: Descriptor, offset: u64, hasher: Option<Hasher>, ingest: I) -> Checked<I> {
        Checked { expected, offset, hasher, ingest }
    }
}

#[async_trait]
impl<I: Ingest> ContentWriter for Checked<I> {
    fn offset(&self) -> u64 {
        self.offset
    }

    async fn truncate(&mut self) -> Result<()> {
        self.ingest.reset().await?;
        if let Some(h) = &mut self.hasher {
            *h = Hasher::new(self.expected.digest.algorithm());
        }
        self.offset = 0;
        Ok(())
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        let size = self.expected.size;
        if data.len() as u64 > size - self.offset.min(size) {
            let got = self.offset + data.len() as u64;
            // The bytes so far belong to something else: do not resume from them.
            self.truncate().await?;
            return Err(Error::Mismatch {
                what: format!("size of blob {}", self.expected.digest),
                expected: format!("{size} bytes"),
                actual: format!("at least {got} bytes"),
            });
        }
        self.ingest.append(data).await?;
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<ContentInfo> {
        let digest = &self.expected.digest;
        if self.offset != self.expected.size {
            let (expected, actual) = (self.expected.size, self.offset);
            let what = format!("size of blob {digest}");
            self.ingest.discard().await;
            return Err(Error::Mismatch {
                what,
                expected: format!("{expected} bytes"),
                actual: format!("{actual} bytes"),
            });
        }
        if let Some(hasher) = self.hasher.take() {
            let actual = hasher.finish();
            if actual != *digest {
                let (what, expected) = (format!("blob {digest}"), digest.to_string());
                self.ingest.discard().await;
                return Err(Error::Mismatch { what, expected, actual: actual.to_string() });
            }
        }
        self.ingest.commit().await
    }
}
