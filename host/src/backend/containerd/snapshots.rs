//! The snapshotter over containerd's snapshots service, with the configured snapshotter.
//!
//! [`Snapshots`] implements [`Snapshotter`]. `prepare`, `view` and `commit` carry the pull's
//! lease, so containerd records the active snapshot and the committed one under it. The
//! mounts are containerd's (for `overlayfs`: `bind` for a first layer, `overlay` above), and
//! go back to containerd's diff service unchanged.

use async_trait::async_trait;
use containerd_client::{
    services::v1::snapshots::{
        snapshots_client::SnapshotsClient, CommitSnapshotRequest, Kind, MountsRequest, PrepareSnapshotRequest,
        RemoveSnapshotRequest, StatSnapshotRequest, UsageRequest, ViewSnapshotRequest,
    },
    tonic::transport::Channel,
};

use super::{from_mount, Conn};
use crate::{
    backend::{LeaseId, SnapshotInfo, SnapshotKind, Snapshotter, Usage},
    error::{Error, Result},
    oci::Mount,
};

/// containerd's snapshotter `name`, in the connection's namespace.
pub(crate) struct Snapshots {
    conn: Conn,
    name: String,
}

impl Snapshots {
    pub(crate) fn new(conn: Conn, name: String) -> Snapshots {
        Snapshots { conn, name }
    }

    fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.conn.channel.clone())
    }

    /// `prepare` or `view`: the same fields, under the pull's lease; the mounts of the new
    /// snapshot back.
    async fn create(&self, new: New, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>> {
        let (snapshotter, key, parent, labels) =
            (self.name.clone(), key.to_owned(), parent.to_owned(), Default::default());
        let mut client = self.client();
        let mounts = match new {
            New::Active => {
                let req = self.conn.leased(PrepareSnapshotRequest { snapshotter, key, parent, labels }, lease)?;
                client.prepare(req).await.map(|r| r.into_inner().mounts)
            }
            New::View => {
                let req = self.conn.leased(ViewSnapshotRequest { snapshotter, key, parent, labels }, lease)?;
                client.view(req).await.map(|r| r.into_inner().mounts)
            }
        }
        .map_err(|s| self.conn.error(s))?;
        Ok(mounts.into_iter().map(from_mount).collect())
    }
}

/// Which snapshot [`Snapshots::create`] makes.
#[derive(Clone, Copy)]
enum New {
    /// An active snapshot, to write in (`prepare`).
    Active,
    /// A read-only view (`view`).
    View,
}

#[async_trait]
impl Snapshotter for Snapshots {
    fn name(&self) -> &str {
        &self.name
    }

    async fn prepare(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>> {
        self.create(New::Active, key, parent, lease).await
    }

    async fn view(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>> {
        self.create(New::View, key, parent, lease).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let req = self.conn.request(MountsRequest { snapshotter: self.name.clone(), key: key.to_owned() });
        let resp = self.client().mounts(req).await.map_err(|s| self.conn.error(s))?;
        Ok(resp.into_inner().mounts.into_iter().map(from_mount).collect())
    }

    async fn commit(&self, name: &str, key: &str, lease: &LeaseId) -> Result<()> {
        let req = self.conn.leased(
            CommitSnapshotRequest {
                snapshotter: self.name.clone(),
                name: name.to_owned(),
                key: key.to_owned(),
                labels: Default::default(),
            },
            lease,
        )?;
        self.client().commit(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }

    async fn stat(&self, key: &str) -> Result<SnapshotInfo> {
        let req = self.conn.request(StatSnapshotRequest { snapshotter: self.name.clone(), key: key.to_owned() });
        let info =
            self.client().stat(req).await.map_err(|s| self.conn.error(s))?.into_inner().info.ok_or_else(|| {
                Error::FailedPrecondition(format!("containerd answered without info on snapshot {key}"))
            })?;
        let kind = match Kind::try_from(info.kind) {
            Ok(Kind::View) => SnapshotKind::View,
            Ok(Kind::Active) => SnapshotKind::Active,
            Ok(Kind::Committed) => SnapshotKind::Committed,
            Ok(Kind::Unknown) | Err(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is of a kind containerd calls {}",
                    info.kind
                )))
            }
        };
        Ok(SnapshotInfo { name: info.name, parent: info.parent, kind, labels: info.labels.into_iter().collect() })
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let req = self.conn.request(RemoveSnapshotRequest { snapshotter: self.name.clone(), key: key.to_owned() });
        self.client().remove(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let req = self.conn.request(UsageRequest { snapshotter: self.name.clone(), key: key.to_owned() });
        let u = self.client().usage(req).await.map_err(|s| self.conn.error(s))?.into_inner();
        Ok(Usage { size: u64::try_from(u.size).unwrap_or(0), inodes: u64::try_from(u.inodes).unwrap_or(0) })
    }
}
