//! Host side of `pullbox:image/snapshots`: the backend's snapshotter, with every write under
//! the request's lease; `stat` during a pull first holds the snapshot under that lease
//! ([`crate::session::Session::hold`]).
//!
//! Keys are capabilities ([`super::grants`]): `prepare` records the key it created as this
//! call's, and `commit` and `remove` (and `diff.apply`) accept only such keys — or, for
//! `remove`, a stale active snapshot whose `prepare` answered `already-exists` in this call. No mount or
//! host path reaches the guest.

use crate::{
    backend::{self, Held, SnapshotKind},
    engine::{
        bindings::pullbox::image::{
            snapshots::{DiskUsage, Host, Kind, SnapshotInfo},
            types::Error as WitError,
        },
        CallState,
    },
    error::Error,
};

use super::{answer, batch, bounded, label_pairs, ImportResult};

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
        Ok(self.session.backend.snapshots.name().to_owned())
    }

    async fn prepare(&mut self, key: String, parent: String) -> ImportResult<()> {
        self.charge(1)?;
        let (s, grants) = (self.session.clone(), &mut self.grants);
        answer(
            async {
                let (key, parent) = (bounded("key", &key)?, bounded("parent", &parent)?);
                grants.create_snapshot()?;
                match s.backend.snapshots.prepare(key, parent, s.lease()?).await {
                    Ok(_mounts) => {
                        grants.prepared(key, true);
                        Ok(())
                    }
                    Err(e @ Error::AlreadyExists(_)) => {
                        // Only an active snapshot can be stale; a committed one (an image's
                        // layer) or a view stays out of this call's reach.
                        if matches!(s.backend.snapshots.stat(key).await, Ok(i) if i.kind == SnapshotKind::Active) {
                            grants.prepared(key, false);
                        }
                        Err(e)
                    }
                    Err(e) => Err(e),
                }
            }
            .await,
        )
    }

    async fn commit(&mut self, name: String, key: String) -> ImportResult<()> {
        self.charge(1)?;
        let (s, grants) = (self.session.clone(), &mut self.grants);
        answer(
            async {
                let (name, key) = (bounded("name", &name)?, bounded("key", &key)?);
                grants.may_commit(key)?;
                s.backend.snapshots.commit(name, key, s.lease()?).await?;
                grants.forget(key);
                Ok(())
            }
            .await,
        )
    }

    async fn stat(&mut self, key: String) -> ImportResult<SnapshotInfo> {
        self.charge(1)?;
        let (s, grants) = (self.session.clone(), &mut self.grants);
        answer(
            async {
                let key = bounded("key", &key)?;
                if grants.hold(format!("snapshot {key}"))? {
                    s.hold(Held::Snapshot(key)).await?;
                }
                s.backend.snapshots.stat(key).await.map(snapshot_info)
            }
            .await,
        )
    }

    async fn stats(&mut self, keys: Vec<String>) -> ImportResult<Vec<Result<SnapshotInfo, WitError>>> {
        self.charge(1 + keys.len() as u64)?;
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
        self.charge(1)?;
        let (s, grants) = (self.session.clone(), &mut self.grants);
        answer(
            async {
                let key = bounded("key", &key)?;
                grants.may_remove_snapshot(key)?;
                s.backend.snapshots.remove(key).await?;
                grants.forget(key);
                Ok(())
            }
            .await,
        )
    }

    async fn usage(&mut self, key: String) -> ImportResult<DiskUsage> {
        self.charge(1)?;
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
