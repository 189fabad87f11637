//! Host side of `pullbox:image/registry`: resolve and fetch through [`crate::registry`],
//! writing under the request's lease. Credentials stay in the host: the session holds them
//! and the transport applies them; the guest only names repositories. Both imports answer
//! `cancelled` once the request is cancelled. A recorded pull's resolve answers go to its
//! recorder (`Session::recorder`).
//!
//! `referrers` lists what refers to a manifest (signatures, attestations) without storing
//! anything; it may only run in `pull-image` (it contacts the registry for the pull), and it
//! charges the import budget one unit per referrer it answers, on top of the call's unit.

use crate::{
    bindings::{
        pullbox::image::registry::{Host, Referrer},
        wit::Descriptor,
    },
    call::CallState,
    error::Error,
    registry::Repository,
};

use super::{bounded, descriptor, digest, label_pairs, wit_descriptor, ImportResult, MAX_BATCH};

impl Host for CallState {
    async fn resolve(&mut self, name: String, reference: String) -> ImportResult<Descriptor> {
        self.charge(1)?;
        self.grants.write("registry.resolve")?;
        let s = self.session.clone();
        let repo = Repository::parse(bounded("name", &name)?)?;
        let reference = bounded("reference", &reference)?;
        let sink = s.sink()?;
        s.check_cancelled()?;
        let resolving = s.registry.resolve(&repo, reference, sink);
        let desc = tokio::select! {
            r = resolving => r?,
            () = s.cancel.cancelled() => return Err(cancelled().into()),
        };
        tracing::debug!(%repo, reference, digest = %desc.digest, "resolved");
        if let Some(recorder) = &s.recorder {
            recorder.resolved(&repo, reference, &desc);
        }
        Ok(wit_descriptor(desc))
    }

    async fn fetch(&mut self, name: String, blobs: Vec<Descriptor>) -> ImportResult<()> {
        self.charge(1 + blobs.len() as u64)?;
        self.grants.write("registry.fetch")?;
        if blobs.len() > MAX_BATCH {
            return Err(Error::ResourceExhausted(format!("more than {MAX_BATCH} blobs in one fetch")).into());
        }
        let repo = Repository::parse(bounded("name", &name)?)?;
        let descs = blobs.into_iter().map(descriptor).collect::<Result<Vec<_>, _>>()?;
        for d in &descs {
            self.session.start_fetch(&repo, d)?;
        }
        Ok(())
    }

    async fn referrers(&mut self, name: String, subject: String, artifact_type: String) -> ImportResult<Vec<Referrer>> {
        self.charge(1)?;
        self.grants.write("registry.referrers")?;
        let s = self.session.clone();
        let repo = Repository::parse(bounded("name", &name)?)?;
        let subject = digest(&subject)?;
        let artifact_type = bounded("artifact type", &artifact_type)?;
        let credentials = s.sink()?.credentials();
        s.check_cancelled()?;
        let asking = s.registry.referrers(&repo, &subject, artifact_type, credentials);
        let found = tokio::select! {
            r = asking => r?,
            () = s.cancel.cancelled() => return Err(cancelled().into()),
        };
        tracing::debug!(%repo, %subject, artifact_type, count = found.len(), "referrers");
        self.charge(found.len() as u64)?;
        Ok(found
            .into_iter()
            .map(|r| Referrer {
                media_type: r.media_type,
                digest: r.digest.to_string(),
                size: r.size,
                artifact_type: r.artifact_type,
                annotations: label_pairs(r.annotations),
            })
            .collect())
    }
}

/// The answer of a registry import once the request is cancelled.
fn cancelled() -> Error {
    Error::Cancelled("the pull was cancelled".into())
}
