//! The image store over containerd's images service.
//!
//! [`Images`] implements [`ImageStore`]. containerd keeps a record's name, labels and target
//! (media type, digest, size, annotations; not a descriptor's platform or URLs) and sets the
//! timestamps. A record is a root of containerd's garbage collector: its target, and what the
//! target's `containerd.io/gc.ref.*` labels name, stay. Records carrying
//! `io.cri-containerd.image=managed` (the puller sets it) are containerd CRI's images too.

use async_trait::async_trait;
use containerd_client::{
    services::v1::{
        images_client::ImagesClient, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest,
        UpdateImageRequest,
    },
    tonic::transport::Channel,
};

use super::{from_descriptor, nanos, to_descriptor, Conn};
use crate::{
    backend::{ImageRecord, ImageRecords, ImageStore},
    error::{Error, Result},
};

/// containerd's images, in the connection's namespace.
pub(crate) struct Images {
    conn: Conn,
}

impl Images {
    pub(crate) fn new(conn: Conn) -> Images {
        Images { conn }
    }

    fn client(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.conn.channel.clone())
    }
}

fn to_image(r: &ImageRecord) -> Image {
    Image {
        name: r.name.clone(),
        labels: r.labels.clone().into_iter().collect(),
        target: Some(to_descriptor(&r.target)),
        created_at: None,
        updated_at: None,
    }
}

fn from_image(i: Option<Image>) -> Result<ImageRecord> {
    let i = i.ok_or_else(|| Error::FailedPrecondition("containerd answered without an image".into()))?;
    let target =
        i.target.ok_or_else(|| Error::FailedPrecondition(format!("containerd's image {} has no target", i.name)))?;
    Ok(ImageRecord {
        target: from_descriptor(target)?,
        labels: i.labels.into_iter().collect(),
        created_at: nanos(i.created_at),
        updated_at: nanos(i.updated_at),
        name: i.name,
    })
}

#[async_trait]
impl ImageStore for Images {
    async fn get(&self, name: &str) -> Result<ImageRecord> {
        let req = self.conn.request(GetImageRequest { name: name.to_owned() });
        from_image(self.client().get(req).await.map_err(|s| self.conn.error(s))?.into_inner().image)
    }

    async fn list(&self) -> Result<ImageRecords> {
        let req = self.conn.request(ListImagesRequest { filters: Vec::new() });
        let images = self.client().list(req).await.map_err(|s| self.conn.error(s))?.into_inner().images;
        let mut records = Vec::with_capacity(images.len());
        for image in images {
            let name = image.name.clone();
            match from_image(Some(image)) {
                Ok(r) => records.push(r),
                // Another client's record pullbox cannot read (a digest it does not support):
                // not pullbox's image, so not listed.
                Err(e) => tracing::debug!(image = %name, "skipping a containerd image: {}", e.chain()),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records.into())
    }

    async fn create(&self, image: ImageRecord) -> Result<ImageRecord> {
        if image.name.is_empty() {
            return Err(Error::InvalidArgument("an image name must not be empty".into()));
        }
        let req = self.conn.request(CreateImageRequest { image: Some(to_image(&image)), source_date_epoch: None });
        from_image(self.client().create(req).await.map_err(|s| self.conn.error(s))?.into_inner().image)
    }

    async fn update(&self, image: ImageRecord) -> Result<ImageRecord> {
        let req = self.conn.request(UpdateImageRequest {
            image: Some(to_image(&image)),
            update_mask: Some(prost_types::FieldMask { paths: vec!["target".into(), "labels".into()] }),
            source_date_epoch: None,
        });
        from_image(self.client().update(req).await.map_err(|s| self.conn.error(s))?.into_inner().image)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        // Not synchronous: whoever removes records collects afterwards (`Leases::collect`),
        // once for all of an image's records.
        let req = self.conn.request(DeleteImageRequest { name: name.to_owned(), sync: false, target: None });
        self.client().delete(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }
}
