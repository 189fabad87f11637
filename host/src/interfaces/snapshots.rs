//! Host side of `pullbox:image/snapshots`: the backend's snapshotter, with every write under
//! the request's lease.

use crate::{
    backend::SnapshotKind,
    engine::{
        bindings::pullbox::image::{
            snapshots::{Host, SnapshotInfo, Kind, DiskUsage},
            types::Mount,
        },
        CallState,
    },
};

use super::{answer, bounded, label_pairs, wit_mounts, ImportResult};

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
                let i = s.backend.snapshots.stat(bounded("key", &key)?).await?;
                Ok(SnapshotInfo {
                    name: i.name,
                    parent: i.parent,
                    kind: match i.kind {
                        SnapshotKind::View => Kind::View,
                        SnapshotKind::Active => Kind::Active,
                        SnapshotKind::Committed => Kind::Committed,
                    },
                    labels: label_pairs(i.labels),
                })
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
