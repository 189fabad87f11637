//! Host side of `pullbox:image/images`: the backend's image store. `list` answers at most
//! [`MAX_RECORDS`] records.

use crate::{
    backend::ImageRecord,
    engine::{
        bindings::pullbox::image::{images::Host, types::Image},
        CallState,
    },
    error::Error,
};

use super::{answer, bounded, descriptor, label_pairs, labels, wit_descriptor, ImportResult};

/// The most records `list` hands to a guest in one call (each record is a few hundred bytes:
/// this keeps the answer well inside a guest's default 64 MiB of memory).
pub const MAX_RECORDS: usize = 100_000;

fn record(i: Image) -> Result<ImageRecord, Error> {
    if i.name.is_empty() {
        return Err(Error::InvalidArgument("image name must not be empty".into()));
    }
    Ok(ImageRecord {
        name: bounded("image name", &i.name)?.to_owned(),
        target: descriptor(i.target)?,
        labels: labels(i.labels)?,
        created_at: 0,
        updated_at: 0,
    })
}

fn image(r: ImageRecord) -> Image {
    Image {
        name: r.name,
        target: wit_descriptor(r.target),
        labels: label_pairs(r.labels),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

impl Host for CallState {
    async fn get(&mut self, name: String) -> ImportResult<Image> {
        let s = self.session.clone();
        answer(async { s.backend.images.get(bounded("image name", &name)?).await.map(image) }.await)
    }

    async fn list(&mut self) -> ImportResult<Vec<Image>> {
        let s = self.session.clone();
        answer(
            async {
                let all = s.backend.images.list().await?;
                if all.len() > MAX_RECORDS {
                    return Err(Error::ResourceExhausted(format!(
                        "{} image records are more than one call may return ({MAX_RECORDS})",
                        all.len()
                    )));
                }
                Ok(all.into_iter().map(image).collect())
            }
            .await,
        )
    }

    async fn create(&mut self, i: Image) -> ImportResult<Image> {
        let s = self.session.clone();
        answer(async { s.backend.images.create(record(i)?).await.map(image) }.await)
    }

    async fn update(&mut self, i: Image) -> ImportResult<Image> {
        let s = self.session.clone();
        answer(async { s.backend.images.update(record(i)?).await.map(image) }.await)
    }

    async fn delete(&mut self, name: String) -> ImportResult<()> {
        let s = self.session.clone();
        answer(async { s.backend.images.delete(bounded("image name", &name)?).await }.await)
    }
}
