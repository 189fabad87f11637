//! Host side of `pullbox:image/diff`: applies a layer with the backend's differ, after the
//! request's download of that layer (if any) has finished; a layer the session unpacked while
//! it downloaded ([`crate::session::Session::stage`]) is moved into place instead.
//!
//! The guest names the active snapshot by its key, which must be one this call prepared
//! ([`super::grants::Grants::begin_apply`]); the host asks its own snapshotter for the mounts.
//! A guest never hands the host a mount or a path.

use crate::{
    bindings::{pullbox::image::diff::Host, wit::Descriptor},
    call::CallState,
    error::Error,
};

use super::{bounded, content::wait, descriptor, ImportResult};

impl Host for CallState {
    async fn apply(&mut self, layer: Descriptor, key: String) -> ImportResult<String> {
        self.charge(1)?;
        let (s, snapshots) = (self.session.clone(), self.snapshots.clone());
        let key = bounded("key", &key)?.to_owned();
        let layer = descriptor(layer)?;
        self.grants.begin_apply(&key)?;
        // The key is given back whatever the apply answers: the steps go in one block.
        let applied: Result<String, Error> = async {
            s.lease()?;
            wait(&s, &layer.digest).await?;
            let ms = snapshots.mounts(&key).await?;
            let staged = match s.stage(&layer.digest) {
                Some(stage) => stage.apply(&layer, &ms).await?,
                None => None,
            };
            let diff_id = match staged {
                Some(diff_id) => diff_id,
                None => s.backend.differ.apply(&layer, &ms).await?,
            };
            s.sink()?.progress().done(&layer.digest);
            Ok(diff_id.to_string())
        }
        .await;
        self.grants.end_apply(&key);
        Ok(applied?)
    }
}
