//! Leases over containerd's leases service; containerd's own garbage collector sweeps.
//!
//! [`LeaseManager`] implements [`Leases`]. A pull's lease carries two labels:
//!
//! - `containerd.io/gc.expire`, [`LEASE_EXPIRY`] ahead: containerd's collector ignores (and
//!   deletes) an expired lease, so what a killed pullbox wrote becomes garbage even if no
//!   pullbox ever runs again;
//! - [`OWNER_LABEL`], the owning process as `<boot id>/<pid namespace>/<pid>/<start time>`
//!   (start time: field 22 of `/proc/<pid>/stat`), so that [`Leases::collect`] deletes the
//!   leases of dead pullbox processes at once instead of waiting for their expiry. A lease is
//!   judged only by a process that can: one of another boot is dead; one whose owner ran in
//!   another PID namespace (the daemon in a pod, the CLI on the host) is left to its expiry.
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
    fs,
    os::unix::fs::MetadataExt,
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
    backend::{Census, GcReport, Held, LeaseId, Leases},
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
}

impl LeaseManager {
    pub(crate) fn new(conn: Conn, snapshotter: String) -> LeaseManager {
        LeaseManager { conn, snapshotter }
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

    /// Deletes the leases of pullbox processes known to be gone; returns how many.
    async fn delete_dead(&self) -> Result<u64> {
        let req = self.conn.request(ListRequest { filters: vec![format!("labels.\"{OWNER_LABEL}\"")] });
        let leases = self.client().list(req).await.map_err(|s| self.conn.error(s))?.into_inner().leases;
        let here = Here::current();
        let mut deleted = 0;
        for lease in leases {
            let Some(owner) = lease.labels.get(OWNER_LABEL).and_then(|v| Owner::parse(v)) else { continue };
            if here.judges_dead(&owner) {
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
        let id = format!("pullbox-{}", uuid::Uuid::new_v4().simple());
        let labels = HashMap::from([
            (EXPIRE_LABEL.to_owned(), rfc3339(now_secs() + LEASE_EXPIRY.as_secs())),
            (OWNER_LABEL.to_owned(), Here::current().owner()?.to_string()),
        ]);
        self.create_with(id, labels).await
    }

    async fn delete(&self, lease: &LeaseId) -> Result<()> {
        self.delete_with(lease, true).await
    }

    /// containerd's `AddResource` (it does not check that the resource exists).
    async fn hold(&self, lease: &LeaseId, resource: Held<'_>) -> Result<()> {
        let resource = match resource {
            Held::Content(d) => Resource { id: d.to_string(), r#type: "content".into() },
            Held::Snapshot(key) => Resource { id: key.to_owned(), r#type: format!("snapshots/{}", self.snapshotter) },
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

/// The process that owns a lease. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    boot_id: String,
    pid_ns: u64,
    pid: u32,
    start_time: u64,
}

impl Owner {
    fn parse(s: &str) -> Option<Owner> {
        let mut parts = s.split('/');
        let owner = Owner {
            boot_id: parts.next()?.to_owned(),
            pid_ns: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok()?,
            start_time: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(owner)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}/{}", self.boot_id, self.pid_ns, self.pid, self.start_time)
    }
}

/// Where this process runs: its boot and PID namespace.
struct Here {
    boot_id: String,
    pid_ns: u64,
}

impl Here {
    fn current() -> Here {
        Here {
            boot_id: fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            pid_ns: fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()),
        }
    }

    /// This process as a lease owner.
    fn owner(&self) -> Result<Owner> {
        let pid = std::process::id();
        let start_time = start_time(pid).ok_or_else(|| Error::Io {
            context: "reading this process's start time".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("/proc/{pid}/stat unreadable or malformed"),
            ),
        })?;
        Ok(Owner { boot_id: self.boot_id.clone(), pid_ns: self.pid_ns, pid, start_time })
    }

    /// Whether `owner` is certainly gone: it ran in another boot, or in this PID namespace
    /// as a process that no longer runs (its pid is free or reused by a later process).
    fn judges_dead(&self, owner: &Owner) -> bool {
        if self.boot_id.is_empty() || owner.boot_id.is_empty() {
            return false;
        }
        if owner.boot_id != self.boot_id {
            return true;
        }
        owner.pid_ns == self.pid_ns && self.pid_ns != 0 && start_time(owner.pid) != Some(owner.start_time)
    }
}

/// The start time of process `pid`, or `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command, is in parentheses and may contain anything: count after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_are_judged() {
        let here = Here::current();
        let me = here.owner().unwrap();
        assert_eq!(Owner::parse(&me.to_string()), Some(me.clone()));
        assert_eq!(Owner::parse("a/1/2"), None);
        assert_eq!(Owner::parse("a/1/2/3/4"), None);
        assert!(!here.judges_dead(&me));
        assert!(here.judges_dead(&Owner { start_time: me.start_time + 1, ..me.clone() }));
        assert!(here.judges_dead(&Owner { boot_id: "another boot".into(), ..me.clone() }));
        // Another PID namespace: cannot tell, so alive.
        assert!(!here.judges_dead(&Owner { pid_ns: me.pid_ns + 1, start_time: 0, ..me.clone() }));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(here.judges_dead(&Owner { pid, ..me }));
    }
}
