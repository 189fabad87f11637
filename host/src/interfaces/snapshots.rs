//! Host side of `pullbox:image/snapshots`: the backend's snapshotter, with every write under
//! the request's lease; `stat` during a pull first holds the snapshot under that lease
//! ([`crate::session::Session::hold`]).

use crate::{
    backend::{self, Held, SnapshotKind},
    engine::{
        bindings::pullbox::image::{
            snapshots::{Host, SnapshotInfo, Kind, DiskUsage},
            types::{Error as WitError, Mount},
        },
        CallState,
    },
};

use super::{answer, batch, bounded, label_pairs, wit_mounts, ImportResult};

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
        answer(
            async {
                let key = bounded("key", &key)?;
                s.hold(Held::Snapshot(key)).await?;
                s.backend.snapshots.stat(key).await.map(snapshot_info)
            }
            .await,
        )
    }

    async fn stats(&mut self, keys: Vec<String>) -> ImportResult<Vec<Result<SnapshotInfo, WitError>>> {
        let s = self.session.clone();
        // Overlong keys are answered here; the others go to the snapshotter together.
        let check = |key: String| {
            std::future::ready(match bounded("key", &key).err() {
                None => Ok(key),
                Some(e) => Err(e),
            })
        };
        let ask = |keys: Vec<String>| async move {
            Ok(s.backend.snapshots.stats(&keys).await?.into_iter().map(|r| r.map(snapshot_info)).collect())
        };
        answer(batch(keys, ("keys", "stats"), check, ask).await)
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
