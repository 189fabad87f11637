//! Host side of `pullbox:image/content`: bounded reads and labels on the content store.
//! Reads wait for a download of the same blob that the request started. `info` during a
//! pull first holds the blob under the pull's lease ([`Session::hold`]); only a pull may label
//! blobs, and only a pull or a remove may delete them ([`super::grants`]). A recorded pull's
//! reads are copied into its recorder ([`Session::recorder`]).
//!
//! [`MAX_READ`] is 1 MiB: large enough that a 4 MiB manifest takes four calls, small
//! enough that one call cannot make the host allocate much on the guest's behalf.

use std::sync::Arc;

use crate::{
    backend::Held,
    bindings::{
        pullbox::image::content::{BlobInfo, Host},
        wit::Error as WitError,
    },
    call::CallState,
    error::Error,
    oci::Digest,
    session::Session,
};

use super::{batch, digest, label_pairs, labels, ImportResult};

/// The largest read one call may ask for.
pub const MAX_READ: u32 = 1 << 20;

/// Waits for a download of `d` in flight, turning its failure into an error for this call.
pub(crate) async fn wait(s: &Session, d: &Digest) -> Result<(), Error> {
    s.wait_fetched(d).await.map_err(|e: Arc<Error>| Error::Shared { code: e.code(), message: e.chain() })
}

impl Host for CallState {
    async fn info(&mut self, d: String) -> ImportResult<BlobInfo> {
        self.charge(1)?;
        let s = self.session.clone();
        let d = digest(&d)?;
        wait(&s, &d).await?;
        if self.grants.hold(format!("content {d}"))? {
            s.hold(Held::Content(&d)).await?;
        }
        let info = s.backend.content.info(&d).await?;
        Ok(BlobInfo { digest: info.digest.to_string(), size: info.size, labels: label_pairs(info.labels) })
    }

    async fn sizes(&mut self, ds: Vec<String>) -> ImportResult<Vec<Result<u64, WitError>>> {
        self.charge(1 + ds.len() as u64)?;
        let s = self.session.clone();
        // Each digest as `info` takes it; the ones that pass go to the store together.
        let check = |d: String| {
            let s = s.clone();
            async move {
                let d = digest(&d)?;
                wait(&s, &d).await?;
                Ok(d)
            }
        };
        let content = s.backend.content.clone();
        let ask = |asked: Vec<Digest>| async move { content.sizes(&asked).await };
        Ok(batch(ds, ("digests", "sizes"), check, ask).await?)
    }

    async fn read(&mut self, d: String, offset: u64, length: u32) -> ImportResult<Vec<u8>> {
        self.charge(1 + u64::from(length.min(MAX_READ)) / 1024)?;
        let s = self.session.clone();
        let d = digest(&d)?;
        if length > MAX_READ {
            return Err(
                Error::ResourceExhausted(format!("read of {length} bytes is over the limit of {MAX_READ}")).into()
            );
        }
        wait(&s, &d).await?;
        // The store refuses an offset past the end itself (one look-up, not two).
        let bytes = s.backend.content.read(&d, offset, length as usize).await?;
        if let Some(recorder) = &s.recorder {
            recorder.read(s.backend.content.as_ref(), &d).await;
        }
        Ok(bytes)
    }

    async fn max_read(&mut self) -> wasmtime::Result<u32> {
        self.charge(1)?;
        Ok(MAX_READ)
    }

    async fn set_labels(&mut self, d: String, l: Vec<(String, String)>) -> ImportResult<()> {
        self.charge(1 + l.len() as u64)?;
        self.grants.write("content.set-labels")?;
        let s = self.session.clone();
        let d = digest(&d)?;
        let l = labels(l)?;
        wait(&s, &d).await?;
        s.backend.content.set_labels(&d, &l).await?;
        Ok(())
    }

    async fn delete(&mut self, d: String) -> ImportResult<()> {
        self.charge(1)?;
        self.grants.delete("content.delete")?;
        let s = self.session.clone();
        let d = digest(&d)?;
        wait(&s, &d).await?;
        Ok(s.backend.content.delete(&d).await?)
    }
}
