//! The image store: named [`ImageRecord`]s in the `images` table, each stored as JSON (the
//! record's own serde form, so new optional fields need no migration).
//!
//! [`Images`] implements [`ImageStore`]. The store sets the timestamps (nanoseconds since the
//! epoch): `create` sets both, `update` keeps `created_at` and sets `updated_at`. An image
//! record is a garbage-collection root: its target's graph is kept.
//!
//! `list` keeps the records it read, decoded, with SQLite's `PRAGMA data_version` at the time,
//! and answers from them while nothing has changed: `data_version` moves when another process
//! (another connection) commits, and this store's own writes drop the copy. Decoding every
//! record's JSON is most of a list's cost, and status and list (kubelet asks for them all the
//! time) read every record. The records kept are shared with every caller
//! ([`ImageRecords`]), never copied out.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{db::Db, now_nanos};
use crate::{
    backend::{ImageRecord, ImageRecords, ImageStore},
    error::{Error, Result},
};

/// The embedded image store.
pub(crate) struct Images {
    db: Db,
    /// What `list` read last, with the `data_version` it read it at (see the module docs).
    listed: Listed,
}

/// The records a `list` read and the `data_version` of the database then; `None` after a
/// write.
type Listed = Arc<Mutex<Option<(i64, ImageRecords)>>>;

impl Images {
    pub(crate) fn new(db: Db) -> Images {
        Images { db, listed: Listed::default() }
    }

    /// Forgets what `list` read: called inside every write transaction, so no `list` can read
    /// between the write and this.
    fn forget(listed: &Listed) {
        *listed.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// The record named `name`, if any.
fn get(conn: &Connection, name: &str) -> Result<Option<ImageRecord>> {
    let json: Option<String> =
        conn.query_row("SELECT record FROM images WHERE name = ?1", [name], |r| r.get(0)).optional()?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

/// Every record, by name.
pub(crate) fn all(conn: &Connection) -> Result<Vec<ImageRecord>> {
    // In table order, sorted here: `ORDER BY name` walks the name index and looks every row
    // up from it, which takes longer than reading the table straight and sorting.
    let mut stmt = conn.prepare_cached("SELECT record FROM images")?;
    let mut rows = stmt.query([])?;
    let mut all = Vec::new();
    while let Some(row) = rows.next()? {
        let json = row
            .get_ref(0)?
            .as_str()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
        all.push(serde_json::from_str::<ImageRecord>(json)?);
    }
    all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
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

    async fn list(&self) -> Result<ImageRecords> {
        let listed = self.listed.clone();
        self.db
            .read(move |conn| {
                // One read transaction: the version read is that of the records read.
                let tx = conn.unchecked_transaction()?;
                let version: i64 = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
                let kept = listed.lock().unwrap_or_else(PoisonError::into_inner).clone();
                Ok(match kept {
                    Some((v, records)) if v == version => records,
                    _ => {
                        let records = ImageRecords::from(all(&tx)?);
                        *listed.lock().unwrap_or_else(PoisonError::into_inner) = Some((version, records.clone()));
                        records
                    }
                })
            })
            .await
    }

    async fn create(&self, mut image: ImageRecord) -> Result<ImageRecord> {
        if image.name.is_empty() {
            return Err(Error::InvalidArgument("an image name must not be empty".into()));
        }
        let listed = self.listed.clone();
        self.db
            .write(move |tx| {
                Self::forget(&listed);
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
        let listed = self.listed.clone();
        self.db
            .write(move |tx| {
                Self::forget(&listed);
                let old = get(tx, &image.name)?.ok_or_else(|| not_found(&image.name))?;
                image.created_at = old.created_at;
                image.updated_at = now_nanos().max(old.created_at);
                put(tx, &image)?;
                Ok(image)
            })
            .await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let (name, listed) = (name.to_owned(), self.listed.clone());
        self.db
            .write(move |tx| {
                Self::forget(&listed);
                match tx.execute("DELETE FROM images WHERE name = ?1", [&name])? {
                    0 => Err(not_found(&name)),
                    _ => Ok(()),
                }
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
            target: Descriptor::of_bytes("application/vnd.oci.image.manifest.v1+json", data),
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

    #[tokio::test]
    async fn list_sees_every_write_of_this_and_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        // Two connections to one root, as two processes have.
        let (ours, theirs) = (open(dir.path()).unwrap().images, open(dir.path()).unwrap().images);
        let names = |list: ImageRecords| list.into_iter().map(|i| i.name).collect::<Vec<_>>();
        let digest = |list: ImageRecords| list[0].target.digest.clone();
        ours.create(record("a", b"one")).await.unwrap();
        assert_eq!(names(ours.list().await.unwrap()), ["a"]);
        let (first, again) = (ours.list().await.unwrap(), ours.list().await.unwrap());
        assert!(std::ptr::eq(first.as_ptr(), again.as_ptr()), "answered from what was read, shared");
        assert_eq!(names(again), ["a"]);
        theirs.create(record("b", b"two")).await.unwrap();
        assert_eq!(names(ours.list().await.unwrap()), ["a", "b"]);
        ours.update(record("a", b"three")).await.unwrap();
        assert_eq!(digest(ours.list().await.unwrap()), Digest::sha256_of(b"three"));
        theirs.update(record("a", b"four")).await.unwrap();
        assert_eq!(digest(ours.list().await.unwrap()), Digest::sha256_of(b"four"));
        ours.delete("b").await.unwrap();
        assert_eq!(names(ours.list().await.unwrap()), ["a"]);
        assert_eq!(names(theirs.list().await.unwrap()), ["a"]);
        theirs.delete("a").await.unwrap();
        assert!(ours.list().await.unwrap().is_empty());
    }
}
