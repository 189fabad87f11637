//! Host side of `pullbox:image/images`: the backend's image store. `list` and `list-labels`
//! answer at most [`MAX_RECORDS`] records; `list-labels` takes at most [`MAX_LIST_KEYS`] keys.
//!
//! The store's records are shared ([`ImageRecords`]): `list-labels`, which the catalog asks
//! for on every list and status, copies only each record's name and the values asked for,
//! never whole records.
//!
//! Only a pull creates and updates records (at most `sandbox.max_records` of them); a pull or
//! a remove deletes them ([`super::grants`]).

use crate::{
    backend::{ImageRecord, ImageRecords},
    bindings::{
        pullbox::image::images::{Host, Labelled},
        wit::Image,
    },
    call::CallState,
    error::Error,
    session::Session,
};

use super::{bounded, descriptor, label_pairs, labels, wit_descriptor, ImportResult};

/// The most records `list` hands to a guest in one call (each record is a few hundred bytes:
/// this keeps the answer well inside a guest's default 64 MiB of memory).
pub const MAX_RECORDS: usize = 100_000;

/// The most label keys one `list-labels` call may name: it is for a few labels of every
/// record, and keys × records is what the host builds before handing it over.
pub const MAX_LIST_KEYS: usize = 16;

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

/// Every record, or `resource-exhausted` when there are more than [`MAX_RECORDS`].
async fn all(s: &Session) -> Result<ImageRecords, Error> {
    let all = s.backend.images.list().await?;
    if all.len() > MAX_RECORDS {
        return Err(Error::ResourceExhausted(format!(
            "{} image records are more than one call may return ({MAX_RECORDS})",
            all.len()
        )));
    }
    Ok(all)
}

impl Host for CallState {
    async fn get(&mut self, name: String) -> ImportResult<Image> {
        self.charge(1)?;
        let s = self.session.clone();
        Ok(s.backend.images.get(bounded("image name", &name)?).await.map(image)?)
    }

    async fn list(&mut self) -> ImportResult<Vec<Image>> {
        self.charge(1)?;
        let s = self.session.clone();
        let records = all(&s).await?;
        self.charge(records.len() as u64)?;
        Ok(records.into_iter().map(image).collect())
    }

    async fn list_labels(&mut self, keys: Vec<String>) -> ImportResult<Vec<Labelled>> {
        self.charge(1 + keys.len() as u64)?;
        if keys.len() > MAX_LIST_KEYS {
            return Err(Error::ResourceExhausted(format!("more than {MAX_LIST_KEYS} label keys")).into());
        }
        for k in &keys {
            if k.is_empty() {
                return Err(Error::InvalidArgument("a label key must not be empty".into()).into());
            }
            bounded("label key", k)?;
        }
        let s = self.session.clone();
        let records = all(&s).await?;
        self.charge(records.len() as u64)?;
        Ok(records
            .iter()
            .map(|r| Labelled { name: r.name.clone(), values: keys.iter().map(|k| r.labels.get(k).cloned()).collect() })
            .collect())
    }

    async fn create(&mut self, i: Image) -> ImportResult<Image> {
        self.charge(1 + i.labels.len() as u64)?;
        let record = record(i)?;
        self.grants.create_record()?;
        Ok(self.session.backend.images.create(record).await.map(image)?)
    }

    async fn update(&mut self, i: Image) -> ImportResult<Image> {
        self.charge(1 + i.labels.len() as u64)?;
        self.grants.write("images.update")?;
        Ok(self.session.backend.images.update(record(i)?).await.map(image)?)
    }

    async fn delete(&mut self, name: String) -> ImportResult<()> {
        self.charge(1)?;
        self.grants.delete("images.delete")?;
        Ok(self.session.backend.images.delete(bounded("image name", &name)?).await?)
    }
}
