//! Leases: what a pull has written, kept alive until its image records exist.
//!
//! [`LeaseManager`] implements [`Leases`]; garbage collection itself is in [`super::gc`].
//!
//! A lease records its owning process as an [`Owner`] (see [`crate::backend::owner`] for who
//! counts as alive): a lease whose owner is gone belongs to a killed pull, and the next
//! collection deletes it.
//!
//! A *detached* lease ([`Leases::create_detached`]) has no owner process
//! ([`Owner::detached`]): it holds what must outlive the command that made it, such as the view
//! behind `pullbox mount`, until it is deleted or the machine reboots.
//!
//! A *permanent* lease ([`ensure_permanent`]) has no owner and no boot: its boot id is
//! [`PERMANENT`], and only deleting it ends it. The containerd proxy snapshotter keeps the
//! snapshots containerd made in one ([`super::proxy`]): they outlive pullbox and reboots, as
//! containerd's own snapshots do, and containerd's `Remove` is what frees them.
//!
//! Creating a lease first collects garbage when some lease's owner is gone (a killed pull), so
//! the next pull after a crash cleans up after it ("collected at the next start"); checking
//! costs one query and a `/proc` read per lease.

use async_trait::async_trait;
use rusqlite::params;

use super::{
    db::{add_resource, Db, Resource},
    gc, now_nanos, Layout,
};
use crate::{
    backend::{
        owner::{Owner, PERMANENT},
        Census, GcReport, Held, LeaseId, Leases,
    },
    error::{Error, Result},
};

/// The embedded lease manager.
pub(crate) struct LeaseManager {
    layout: Layout,
    db: Db,
}

impl LeaseManager {
    pub(crate) fn new(layout: Layout, db: Db) -> LeaseManager {
        LeaseManager { layout, db }
    }
}

/// Creates the permanent lease `id` unless it exists.
pub(crate) fn ensure_permanent(conn: &rusqlite::Connection, id: &LeaseId) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO leases (id, pid, start_time, boot_id, pid_ns, created_at) VALUES (?1, 0, 0, ?2, 0, ?3)",
        params![id.0, PERMANENT, now_nanos() as i64],
    )?;
    Ok(())
}

impl LeaseManager {
    /// Inserts a lease owned by `owner`, after collecting the garbage of dead owners' leases.
    async fn insert(&self, owner: impl FnOnce() -> Result<Owner> + Send + 'static) -> Result<LeaseId> {
        if self.db.read(gc::has_dead_leases).await? {
            match gc::collect(&self.layout, &self.db).await {
                Ok(report) => tracing::info!(?report, "collected what killed pulls left behind"),
                // The new lease does not depend on it; the next collection retries.
                Err(e) => tracing::warn!(error = %e.chain(), "cannot collect what killed pulls left behind"),
            }
        }
        self.db
            .write(|tx| {
                let owner = owner()?;
                let id = LeaseId(format!("pullbox-{}", uuid::Uuid::new_v4().simple()));
                tx.execute(
                    "INSERT INTO leases (id, pid, start_time, boot_id, pid_ns, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        id.0,
                        owner.pid,
                        owner.start_time as i64,
                        owner.boot_id,
                        owner.pid_ns as i64,
                        now_nanos() as i64
                    ],
                )?;
                Ok(id)
            })
            .await
    }
}

#[async_trait]
impl Leases for LeaseManager {
    async fn create(&self) -> Result<LeaseId> {
        self.insert(Owner::current).await
    }

    async fn create_detached(&self) -> Result<LeaseId> {
        self.insert(|| Ok(Owner::detached())).await
    }

    async fn hold(&self, lease: &LeaseId, resource: Held<'_>) -> Result<()> {
        let (kind, key) = match resource {
            Held::Content(d) => (Resource::Content, d.to_string()),
            // One snapshotter: the name is always its own.
            Held::Snapshot(_, key) => (Resource::Snapshot, key.to_owned()),
        };
        let lease = lease.clone();
        self.db.write(move |tx| add_resource(tx, &lease, kind, &key)).await
    }

    async fn delete(&self, lease: &LeaseId) -> Result<()> {
        let lease = lease.clone();
        self.db
            .write(move |tx| {
                if tx.execute("DELETE FROM leases WHERE id = ?1", [&lease.0])? == 0 {
                    return Err(Error::NotFound(format!("lease {}", lease.0)));
                }
                tx.execute("DELETE FROM lease_resources WHERE lease = ?1", [&lease.0])?;
                Ok(())
            })
            .await
    }

    /// Only this collector removes anything here: no census is needed.
    async fn collect_since(&self, _census: Option<Census>) -> Result<GcReport> {
        gc::collect(&self.layout, &self.db).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_lease_collects_what_dead_owners_left() {
        let dir = tempfile::tempdir().unwrap();
        let b = crate::backend::embedded::open(dir.path()).unwrap();
        let dead = b.leases.create().await.unwrap();
        let detached = b.leases.create_detached().await.unwrap();
        b.snapshots.prepare("orphan", "", &dead).await.unwrap();
        b.snapshots.prepare("kept", "", &detached).await.unwrap();
        // The owner of `dead` "was killed": its pid now runs another process.
        let db = rusqlite::Connection::open(dir.path().join("metadata.db")).unwrap();
        db.execute("UPDATE leases SET start_time = start_time + 1 WHERE id = ?1", [&dead.0]).unwrap();

        let _next = b.leases.create().await.unwrap();
        assert!(matches!(b.snapshots.stat("orphan").await, Err(Error::NotFound(_))));
        assert!(matches!(b.leases.delete(&dead).await, Err(Error::NotFound(_))));
        assert!(b.snapshots.stat("kept").await.is_ok(), "a detached lease outlives its creator");
        b.leases.delete(&detached).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(matches!(b.snapshots.stat("kept").await, Err(Error::NotFound(_))));
    }
}
