//! Leases over containerd's leases service; containerd's own garbage collector sweeps.
//!
//! [`LeaseManager`] implements [`Leases`]. A pull's lease carries two labels:
//!
//! - `containerd.io/gc.expire`, [`LEASE_EXPIRY`] ahead: containerd's collector ignores (and
//!   deletes) an expired lease, so what a killed pullbox wrote becomes garbage even if no
//!   pullbox ever runs again;
//! - [`OWNER_LABEL`], the owning process ([`Owner`], in its text form
//!   `<boot id>/<pid namespace>/<pid>/<start time>`), so that [`Leases::collect`] deletes the
//!   leases of dead pullbox processes at once instead of waiting for their expiry. A lease is
//!   judged only by a process that can ([`Owner::is_certainly_gone`]): one of another boot is
//!   dead; one whose owner ran in another PID namespace (the daemon in a pod, the CLI on the
//!   host) is left to its expiry.
//!
//! A pull's lease that cannot be deleted when the pull ends (containerd was down or
//! restarting) is remembered and deleted before the next lease is created, or at the next
//! collection: pullbox outlives a containerd restart without leaving that lease's content and
//! snapshots to its 24-hour expiry.
//!
//! `delete` is synchronous (containerd runs its collector before answering), so when a pull
//! ends, what only its lease held is gone. containerd's API has no "collect now" call:
//! `collect` creates a short-lived lease and deletes it synchronously, which runs the
//! collector, and reports what disappeared from the namespace's content, snapshots and
//! ingests meanwhile (containerd does not say what it removed; `bytes` counts blobs only).
//! containerd's scheduler may also collect on its own soon after an image is deleted, so the
//! service takes a [`Leases::census`] before it removes an image and reports against that.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use async_trait::async_trait;
use containerd_client::{
    services::v1::{
        content_client::ContentClient, leases_client::LeasesClient, snapshots::snapshots_client::SnapshotsClient,
        snapshots::ListSnapshotsRequest, AddResourceRequest, CreateRequest, DeleteRequest, ListContentRequest,
        ListRequest, ListStatusesRequest, Resource,
    },
    tonic::transport::Channel,
};

use super::{now_secs, rfc3339, Conn};
use crate::{
    backend::{owner::Owner, Census, GcReport, Held, LeaseId, Leases},
    error::{Error, Result},
};

/// The label that names a pullbox lease's owning process.
pub const OWNER_LABEL: &str = "pullbox.io/owner";

/// containerd's lease expiry label.
const EXPIRE_LABEL: &str = "containerd.io/gc.expire";

/// How long a pull's lease lives at most: containerd's own client (`ctr`, CRI) gives its
/// leases 24 hours. A pull lasts minutes; a longer expiry only matters for a pullbox killed
/// in a PID namespace no later pullbox shares (the others collect its lease at once), and a
/// shorter one would let containerd sweep a slow pull's blobs under it.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// The expiry of the lease `collect` creates only to run containerd's collector.
const GC_LEASE_EXPIRY: Duration = Duration::from_secs(60);

/// containerd's leases, in the connection's namespace.
pub(crate) struct LeaseManager {
    conn: Conn,
    snapshotter: String,
    /// Leases whose delete failed for a reason other than their absence: deleted later, see
    /// [`LeaseManager::delete_undeleted`].
    undeleted: std::sync::Mutex<Vec<LeaseId>>,
}

impl LeaseManager {
    pub(crate) fn new(conn: Conn, snapshotter: String) -> LeaseManager {
        LeaseManager { conn, snapshotter, undeleted: std::sync::Mutex::default() }
    }

    fn undeleted(&self) -> std::sync::MutexGuard<'_, Vec<LeaseId>> {
        self.undeleted.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the leases whose delete failed earlier (containerd was unreachable); keeps
    /// those that fail again. Returns how many went.
    async fn delete_undeleted(&self) -> u64 {
        let pending = std::mem::take(&mut *self.undeleted());
        let mut deleted = 0;
        for lease in pending {
            match self.delete_with(&lease, true).await {
                Ok(()) => {
                    tracing::info!(lease = %lease.0, "deleted the lease of a pull that ended while containerd was away");
                    deleted += 1;
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => {
                    tracing::debug!(lease = %lease.0, "the lease still cannot be deleted: {}", e.chain());
                    self.undeleted().push(lease);
                }
            }
        }
        deleted
    }

    fn client(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.conn.channel.clone())
    }

    async fn create_with(&self, id: String, labels: HashMap<String, String>) -> Result<LeaseId> {
        let req = self.conn.request(CreateRequest { id, labels });
        let lease = self.client().create(req).await.map_err(|s| self.conn.error(s))?.into_inner().lease;
        let id = lease.ok_or_else(|| Error::FailedPrecondition("containerd created a lease without an id".into()))?.id;
        Ok(LeaseId(id))
    }

    async fn delete_with(&self, lease: &LeaseId, sync: bool) -> Result<()> {
        let req = self.conn.request(DeleteRequest { id: lease.0.clone(), sync });
        self.client().delete(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }

    /// Deletes the leases of pullbox processes known to be gone, and this process's leases
    /// whose delete failed; returns how many.
    async fn delete_dead(&self) -> Result<u64> {
        let retried = self.delete_undeleted().await;
        let req = self.conn.request(ListRequest { filters: vec![format!("labels.\"{OWNER_LABEL}\"")] });
        let leases = self.client().list(req).await.map_err(|s| self.conn.error(s))?.into_inner().leases;
        let mut deleted = retried;
        for lease in leases {
            let Some(owner) = lease.labels.get(OWNER_LABEL).and_then(|v| Owner::parse(v)) else { continue };
            if owner.is_certainly_gone() {
                tracing::info!(lease = %lease.id, pid = owner.pid, "deleting the lease of a pullbox process that is gone");
                match self.delete_with(&LeaseId(lease.id), false).await {
                    Ok(()) => deleted += 1,
                    // Another collector was first.
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(deleted)
    }

    /// What the namespace holds that a collection may remove: blobs with their sizes,
    /// snapshot names, ingest references.
    async fn inventory(&self) -> Result<Census> {
        let mut blobs = HashMap::new();
        let req = self.conn.request(ListContentRequest { filters: Vec::new() });
        let mut stream =
            ContentClient::new(self.conn.channel.clone()).list(req).await.map_err(|s| self.conn.error(s))?.into_inner();
        while let Some(page) = stream.message().await.map_err(|s| self.conn.error(s))? {
            blobs.extend(page.info.into_iter().map(|i| (i.digest, u64::try_from(i.size).unwrap_or(0))));
        }
        let mut snapshots = HashSet::new();
        let req =
            self.conn.request(ListSnapshotsRequest { snapshotter: self.snapshotter.clone(), filters: Vec::new() });
        let mut stream = SnapshotsClient::new(self.conn.channel.clone())
            .list(req)
            .await
            .map_err(|s| self.conn.error(s))?
            .into_inner();
        while let Some(page) = stream.message().await.map_err(|s| self.conn.error(s))? {
            snapshots.extend(page.info.into_iter().map(|i| i.name));
        }
        let req = self.conn.request(ListStatusesRequest { filters: Vec::new() });
        let ingests = ContentClient::new(self.conn.channel.clone())
            .list_statuses(req)
            .await
            .map_err(|s| self.conn.error(s))?
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| s.r#ref)
            .collect();
        Ok(Census { blobs, snapshots, ingests })
    }
}

#[async_trait]
impl Leases for LeaseManager {
    async fn create(&self) -> Result<LeaseId> {
        if !self.undeleted().is_empty() {
            self.delete_undeleted().await;
        }
        let id = format!("pullbox-{}", uuid::Uuid::new_v4().simple());
        let labels = HashMap::from([
            (EXPIRE_LABEL.to_owned(), rfc3339(now_secs() + LEASE_EXPIRY.as_secs())),
            (OWNER_LABEL.to_owned(), Owner::current()?.to_string()),
        ]);
        self.create_with(id, labels).await
    }

    async fn delete(&self, lease: &LeaseId) -> Result<()> {
        match self.delete_with(lease, true).await {
            Err(e) if !matches!(e, Error::NotFound(_)) => {
                self.undeleted().push(lease.clone());
                Err(e)
            }
            done => done,
        }
    }

    /// containerd's `AddResource` (it does not check that the resource exists).
    async fn hold(&self, lease: &LeaseId, resource: Held<'_>) -> Result<()> {
        let resource = match resource {
            Held::Content(d) => Resource { id: d.to_string(), r#type: "content".into() },
            Held::Snapshot(snapshotter, key) => {
                Resource { id: key.to_owned(), r#type: format!("snapshots/{snapshotter}") }
            }
        };
        let req = self.conn.request(AddResourceRequest { id: lease.0.clone(), resource: Some(resource) });
        self.client().add_resource(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }

    async fn census(&self) -> Result<Option<Census>> {
        Ok(Some(self.inventory().await?))
    }

    async fn collect_since(&self, census: Option<Census>) -> Result<GcReport> {
        let leases = self.delete_dead().await?;
        let before = match census {
            Some(census) => census,
            None => self.inventory().await?,
        };
        // Run containerd's collector and wait for it: the synchronous delete of a lease does.
        let id = format!("pullbox-gc-{}", uuid::Uuid::new_v4().simple());
        let labels = HashMap::from([(EXPIRE_LABEL.to_owned(), rfc3339(now_secs() + GC_LEASE_EXPIRY.as_secs()))]);
        let trigger = self.create_with(id, labels).await?;
        match self.delete_with(&trigger, true).await {
            Ok(()) => {}
            Err(e) if e.code() == crate::error::Code::NotFound => {}
            Err(e) => return Err(e),
        }
        let after = self.inventory().await?;
        let report = GcReport { leases, ..before.gone(&after) };
        tracing::info!(?report, "containerd garbage collected");
        Ok(report)
    }
}
