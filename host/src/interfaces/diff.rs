//! Host side of `pullbox:image/diff`: applies a layer with the backend's differ, after the
//! request's download of that layer (if any) has finished; a layer the session unpacked while
//! it downloaded ([`crate::session::Session::stage`]) is moved into place instead.

use crate::engine::{
    bindings::pullbox::image::{
        diff::Host,
        types::{Descriptor, Mount},
    },
    CallState,
};

use super::{answer, content::wait, descriptor, mounts, ImportResult};

impl Host for CallState {
    async fn apply(&mut self, layer: Descriptor, ms: Vec<Mount>) -> ImportResult<String> {
        let s = self.session.clone();
        answer(
            async {
                let layer = descriptor(layer)?;
                let ms = mounts(ms)?;
                s.lease()?;
                wait(&s, &layer.digest).await?;
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
            .await,
        )
    }
}
