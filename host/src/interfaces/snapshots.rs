//! Host side of `pullbox:image/snapshots`: the backend's snapshotter, with every write under
//! the request's lease.

use crate::{
    backend::{self, SnapshotKind},
    engine::{
        bindings::pullbox::image::{
            snapshots::{Host, SnapshotInfo, Kind, DiskUsage},
            types::{Error as WitError, Mount},
        },
        CallState,
    },
    error::{Code, Error},
};

use super::{answer, bounded, label_pairs, to_wit_error, wit_error, wit_mounts, ImportResult, MAX_BATCH};

fn snapshot_info(i: backend::SnapshotInfo) -> SnapshotInfo {
    SnapshotInfo {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            SnapshotKind::View => Kind::View,
            SnapshotKind::Active => Kind::Active,
            SnapshotKind::Committed => Kind::Committed,
        },
        labels: label_pairs(i.labels),
    }
}

impl Host for CallState {
    async fn name(&mut self) -> wasmtime::Result<String> {
        Ok(self.session.backend.snapshots.name().to_owned())
    }

    async fn prepare(&mut self, key: String, parent: String) -> ImportResult<Vec<Mount>> {
        let s = self.session.clone();
        answer(
            async {
                let (key, parent) = (bounded("key", &key)?, bounded("parent", &parent)?);
                s.backend.snapshots.prepare(key, parent, s.lease()?).await.map(wit_mounts)
            }
            .await,
        )
    }

    async fn view(&mut self, key: String, parent: String) -> ImportResult<Vec<Mount>> {
        let s = self.session.clone();
        answer(
            async {
                let (key, parent) = (bounded("key", &key)?, bounded("parent", &parent)?);
                s.backend.snapshots.view(key, parent, s.lease()?).await.map(wit_mounts)
            }
            .await,
        )
    }

    async fn mounts(&mut self, key: String) -> ImportResult<Vec<Mount>> {
        let s = self.session.clone();
        answer(async { s.backend.snapshots.mounts(bounded("key", &key)?).await.map(wit_mounts) }.await)
    }

    async fn commit(&mut self, name: String, key: String) -> ImportResult<()> {
        let s = self.session.clone();
        answer(
            async {
                let (name, key) = (bounded("name", &name)?, bounded("key", &key)?);
                s.backend.snapshots.commit(name, key, s.lease()?).await
            }
            .await,
        )
    }

    async fn stat(&mut self, key: String) -> ImportResult<SnapshotInfo> {
        let s = self.session.clone();
        answer(async { s.backend.snapshots.stat(bounded("key", &key)?).await.map(snapshot_info) }.await)
    }

    async fn stats(&mut self, keys: Vec<String>) -> ImportResult<Vec<Result<SnapshotInfo, WitError>>> {
        let s = self.session.clone();
        answer(
            async {
                if keys.len() > MAX_BATCH {
                    return Err(Error::ResourceExhausted(format!(
                        "{} keys are more than one stats call may ask for ({MAX_BATCH})",
                        keys.len()
                    )));
                }
                // Overlong keys are answered here; the others go to the snapshotter together.
                let mut answers: Vec<Option<Result<SnapshotInfo, WitError>>> = Vec::with_capacity(keys.len());
                let mut asked = Vec::new();
                for key in keys {
                    match bounded("key", &key) {
                        Ok(_) => {
                            asked.push(key);
                            answers.push(None);
                        }
                        Err(e) => answers.push(Some(Err(to_wit_error(&e)))),
                    }
                }
                let mut found = s.backend.snapshots.stats(&asked).await?.into_iter();
                Ok(answers
                    .into_iter()
                    .map(|a| {
                        a.unwrap_or_else(|| match found.next() {
                            Some(r) => r.map(snapshot_info).map_err(|e| to_wit_error(&e)),
                            None => Err(wit_error(Code::Internal, "the snapshotter answered too few keys".into())),
                        })
                    })
                    .collect())
            }
            .await,
        )
    }

    async fn remove(&mut self, key: String) -> ImportResult<()> {
        let s = self.session.clone();
        answer(
            async {
                let key = bounded("key", &key)?;
                s.lease()?;
                s.backend.snapshots.remove(key).await
            }
            .await,
        )
    }

    async fn usage(&mut self, key: String) -> ImportResult<DiskUsage> {
        let s = self.session.clone();
        answer(
            async {
                let u = s.backend.snapshots.usage(bounded("key", &key)?).await?;
                Ok(DiskUsage { size: u.size, inodes: u.inodes })
            }
            .await,
        )
    }
}
