//! The image store: named [`ImageRecord`]s in the `images` table, each stored as JSON (the
//! record's own serde form, so new optional fields need no migration).
//!
//! [`Images`] implements [`ImageStore`]. The store sets the timestamps (nanoseconds since the
//! epoch): `create` sets both, `update` keeps `created_at` and sets `updated_at`. An image
//! record is a garbage-collection root: its target's graph is kept.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{db::Db, now_nanos};
use crate::{
    backend::{ImageRecord, ImageStore},
    error::{Error, Result},
};

/// The embedded image store.
pub(crate) struct Images {
    db: Db,
}

impl Images {
    pub(crate) fn new(db: Db) -> Images {
        Images { db }
    }
}

/// The record named `name`, if any.
fn get(conn: &Connection, name: &str) -> Result<Option<ImageRecord>> {
    let json: Option<String> =
        conn.query_row("SELECT record FROM images WHERE name = ?1", [name], |r| r.get(0)).optional()?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

/// Every record.
pub(crate) fn all(conn: &Connection) -> Result<Vec<ImageRecord>> {
    let mut stmt = conn.prepare("SELECT record FROM images ORDER BY name")?;
    let json = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(json.iter().map(|j| serde_json::from_str(j)).collect::<Result<_, _>>()?)
}

fn put(conn: &Connection, image: &ImageRecord) -> Result<()> {
    conn.execute(
        "INSERT INTO images (name, record) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET record = excluded.record",
        params![image.name, serde_json::to_string(image)?],
    )?;
    Ok(())
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("image {name}"))
}

#[async_trait]
impl ImageStore for Images {
    async fn get(&self, name: &str) -> Result<ImageRecord> {
        let name = name.to_owned();
        self.db.read(move |conn| get(conn, &name)?.ok_or_else(|| not_found(&name))).await
    }

    async fn list(&self) -> Result<Vec<ImageRecord>> {
        self.db.read(all).await
    }

    async fn create(&self, mut image: ImageRecord) -> Result<ImageRecord> {
        if image.name.is_empty() {
            return Err(Error::InvalidArgument("an image name must not be empty".into()));
        }
        self.db
            .write(move |tx| {
                if get(tx, &image.name)?.is_some() {
                    return Err(Error::AlreadyExists(format!("image {}", image.name)));
                }
                image.created_at = now_nanos();
                image.updated_at = image.created_at;
                put(tx, &image)?;
                Ok(image)
            })
            .await
    }

    async fn update(&self, mut image: ImageRecord) -> Result<ImageRecord> {
        self.db
            .write(move |tx| {
                let old = get(tx, &image.name)?.ok_or_else(|| not_found(&image.name))?;
                image.created_at = old.created_at;
                image.updated_at = now_nanos().max(old.created_at);
                put(tx, &image)?;
                Ok(image)
            })
            .await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.db
            .write(move |tx| match tx.execute("DELETE FROM images WHERE name = ?1", [&name])? {
                0 => Err(not_found(&name)),
                _ => Ok(()),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::embedded::open,
        oci::{Descriptor, Digest},
    };

    fn record(name: &str, data: &[u8]) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            target: Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: Digest::sha256_of(data),
                size: data.len() as u64,
                annotations: Default::default(),
                platform: None,
                urls: vec![],
            },
            labels: [("io.cri-containerd.image".to_owned(), "managed".to_owned())].into(),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[tokio::test]
    async fn crud() {
        let dir = tempfile::tempdir().unwrap();
        let images = open(dir.path()).unwrap().images;
        let created = images.create(record("docker.io/library/b:1", b"one")).await.unwrap();
        assert!(created.created_at > 0 && created.created_at == created.updated_at);
        assert!(matches!(images.create(record("docker.io/library/b:1", b"x")).await, Err(Error::AlreadyExists(_))));
        images.create(record("docker.io/library/a:1", b"two")).await.unwrap();

        assert_eq!(images.get("docker.io/library/b:1").await.unwrap(), created);
        let names: Vec<_> = images.list().await.unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["docker.io/library/a:1", "docker.io/library/b:1"]);

        let updated = images.update(record("docker.io/library/b:1", b"three")).await.unwrap();
        assert_eq!(updated.created_at, created.created_at);
        assert!(updated.updated_at >= created.updated_at);
        assert_eq!(images.get("docker.io/library/b:1").await.unwrap().target.digest, Digest::sha256_of(b"three"));
        assert!(matches!(images.update(record("nope", b"")).await, Err(Error::NotFound(_))));

        images.delete("docker.io/library/b:1").await.unwrap();
        assert!(matches!(images.get("docker.io/library/b:1").await, Err(Error::NotFound(_))));
        assert!(matches!(images.delete("docker.io/library/b:1").await, Err(Error::NotFound(_))));
    }
}
