//! Host side of `pullbox:image/diff`: applies a layer with the backend's differ, after the
//! request's download of that layer (if any) has finished; a layer the session unpacked while
//! it downloaded ([`crate::session::Session::stage`]) is moved into place instead.
//!
//! The guest names the active snapshot by its key, which must be one this call prepared
//! ([`super::grants::Grants::begin_apply`]); the host asks its own snapshotter for the mounts.
//! A guest never hands the host a mount or a path.

use crate::engine::{
    bindings::pullbox::image::{diff::Host, types::Descriptor},
    CallState,
};

use super::{answer, bounded, content::wait, descriptor, ImportResult};

impl Host for CallState {
    async fn apply(&mut self, layer: Descriptor, key: String) -> ImportResult<String> {
        self.charge(1)?;
        let (s, snapshots) = (self.session.clone(), self.snapshots.clone());
        let key = match bounded("key", &key) {
            Ok(k) => k.to_owned(),
            Err(e) => return answer(Err(e)),
        };
        let layer = match descriptor(layer) {
            Ok(l) => l,
            Err(e) => return answer(Err(e)),
        };
        if let Err(e) = self.grants.begin_apply(&key) {
            return answer(Err(e));
        }
        let applied = async {
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
            s.progress.done(&layer.digest);
            Ok(diff_id.to_string())
        }
        .await;
        self.grants.end_apply(&key);
        answer(applied)
    }
}
