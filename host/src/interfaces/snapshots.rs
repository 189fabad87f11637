//! Host side of `pullbox:image/snapshots`: the backend's snapshotter, with every write under
//! the request's lease; `stat` during a pull first holds the snapshot under that lease
//! ([`crate::session::Session::hold`]).
//!
//! Keys are capabilities ([`super::grants`]): `prepare` records the key it created as this
//! call's, and `commit` and `remove` (and `diff.apply`) accept only such keys — or, for
//! `remove`, a stale active snapshot whose `prepare` answered `already-exists` in this call. No mount or
//! host path reaches the guest.
//!
//! A call works in one snapshotter at a time ([`CallState::snapshots`]): the backend's default,
//! or another the operator offers, chosen by `select` before the call's first `prepare`.

use crate::{
    backend::{self, Held, SnapshotKind},
    bindings::{
        pullbox::image::snapshots::{DiskUsage, Host, Kind, SnapshotInfo},
        wit::Error as WitError,
    },
    call::CallState,
    error::Error,
};

use super::{batch, bounded, label_pairs, ImportResult};

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
        self.charge(1)?;
        Ok(self.snapshots.name().to_owned())
    }

    async fn select(&mut self, snapshotter: String) -> ImportResult<()> {
        self.charge(1)?;
        let name = bounded("snapshotter", &snapshotter)?;
        self.grants.may_select()?;
        self.snapshots = self.session.backend.snapshotter(name)?;
        Ok(())
    }

    async fn prepare(&mut self, key: String, parent: String) -> ImportResult<()> {
        self.charge(1)?;
        let (key, parent) = (bounded("key", &key)?, bounded("parent", &parent)?);
        self.grants.create_snapshot()?;
        let (lease, snapshots) = (self.session.lease()?, self.snapshots.clone());
        match snapshots.prepare(key, parent, lease).await {
            Ok(_mounts) => {
                self.grants.prepared(key, true);
                Ok(())
            }
            Err(e @ Error::AlreadyExists(_)) => {
                // Only an active snapshot can be stale; a committed one (an image's layer) or
                // a view stays out of this call's reach.
                if matches!(snapshots.stat(key).await, Ok(i) if i.kind == SnapshotKind::Active) {
                    self.grants.prepared(key, false);
                }
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn commit(&mut self, name: String, key: String) -> ImportResult<()> {
        self.charge(1)?;
        let (name, key) = (bounded("name", &name)?, bounded("key", &key)?);
        self.grants.may_commit(key)?;
        self.snapshots.commit(name, key, self.session.lease()?).await?;
        self.grants.forget(key);
        Ok(())
    }

    async fn stat(&mut self, key: String) -> ImportResult<SnapshotInfo> {
        self.charge(1)?;
        let key = bounded("key", &key)?;
        let snapshots = self.snapshots.clone();
        if self.grants.hold(format!("snapshot {} {key}", snapshots.name()))? {
            self.session.hold(Held::Snapshot(snapshots.name(), key)).await?;
        }
        Ok(snapshots.stat(key).await.map(snapshot_info)?)
    }

    async fn stats(&mut self, keys: Vec<String>) -> ImportResult<Vec<Result<SnapshotInfo, WitError>>> {
        self.charge(1 + keys.len() as u64)?;
        let snapshots = self.snapshots.clone();
        // Overlong keys are answered here; the others go to the snapshotter together.
        let check = |key: String| {
            std::future::ready(match bounded("key", &key).err() {
                None => Ok(key),
                Some(e) => Err(e),
            })
        };
        let ask = |keys: Vec<String>| async move {
            Ok(snapshots.stats(&keys).await?.into_iter().map(|r| r.map(snapshot_info)).collect())
        };
        Ok(batch(keys, ("keys", "stats"), check, ask).await?)
    }

    async fn remove(&mut self, key: String) -> ImportResult<()> {
        self.charge(1)?;
        let key = bounded("key", &key)?;
        self.grants.may_remove_snapshot(key)?;
        self.snapshots.remove(key).await?;
        self.grants.forget(key);
        Ok(())
    }

    async fn usage(&mut self, key: String) -> ImportResult<DiskUsage> {
        self.charge(1)?;
        let u = self.snapshots.usage(bounded("key", &key)?).await?;
        Ok(DiskUsage { size: u.size, inodes: u.inodes })
    }
}
