//! Host side of `pullbox:image/registry`: resolve and fetch through [`crate::registry`],
//! writing under the request's lease. Credentials stay in the host: the session holds them
//! and the transport applies them; the guest only names repositories. Both imports answer
//! `cancelled` once the request is cancelled. A recorded pull's resolve answers go to its
//! recorder (`Session::recorder`).

use crate::{
    engine::{
        bindings::pullbox::image::{registry::Host, types::Descriptor},
        CallState,
    },
    error::Error,
    registry::Repository,
};

use super::{answer, bounded, descriptor, wit_descriptor, ImportResult, MAX_BATCH};

impl Host for CallState {
    async fn resolve(&mut self, name: String, reference: String) -> ImportResult<Descriptor> {
        self.charge(1)?;
        let (s, grants) = (self.session.clone(), &self.grants);
        answer(
            async {
                grants.write("registry.resolve")?;
                let repo = Repository::parse(bounded("name", &name)?)?;
                let reference = bounded("reference", &reference)?;
                let lease = s.lease()?;
                s.check_cancelled()?;
                let resolving = s.registry.resolve(&repo, reference, s.backend.content.as_ref(), lease, &s.credentials);
                let desc = tokio::select! {
                    r = resolving => r?,
                    () = s.cancel.cancelled() => return Err(Error::Cancelled("the pull was cancelled".into())),
                };
                tracing::debug!(%repo, reference, digest = %desc.digest, "resolved");
                if let Some(recorder) = &s.recorder {
                    recorder.resolved(&repo, reference, &desc);
                }
                Ok(wit_descriptor(desc))
            }
            .await,
        )
    }

    async fn fetch(&mut self, name: String, blobs: Vec<Descriptor>) -> ImportResult<()> {
        self.charge(1 + blobs.len() as u64)?;
        let (s, grants) = (self.session.clone(), &self.grants);
        answer((|| {
            grants.write("registry.fetch")?;
            if blobs.len() > MAX_BATCH {
                return Err(Error::InvalidArgument(format!("more than {MAX_BATCH} blobs in one fetch")));
            }
            let repo = Repository::parse(bounded("name", &name)?)?;
            let descs = blobs.into_iter().map(descriptor).collect::<Result<Vec<_>, _>>()?;
            for d in &descs {
                s.start_fetch(&repo, d)?;
            }
            Ok(())
        })())
    }
}
