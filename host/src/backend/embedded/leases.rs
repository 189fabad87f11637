//! Leases: what a pull has written, kept alive until its image records exist.
//!
//! [`LeaseManager`] implements [`Leases`]; garbage collection itself is in [`super::gc`].
//!
//! A lease records its owning process as an [`Owner`]: the pid, the process's start time
//! (field 22 of `/proc/<pid>/stat`, in clock ticks since boot) and the kernel's boot id. A
//! lease whose owner is gone (no such pid, or a pid reused by a process that started at
//! another time, or another boot) belongs to a killed pull, and the next collection deletes
//! it. Pids are those of the PID namespace the processes run in: processes sharing one root
//! must share a PID namespace (as the daemon and its CLI on one node do).
//!
//! A *detached* lease ([`Leases::create_detached`]) has no owner process (pid 0): it holds
//! what must outlive the command that made it, such as the view behind `pullbox mount`, until
//! it is deleted. It records the boot id only, and dies with the boot: no mount survives a
//! reboot.
//!
//! Creating a lease first collects garbage when some lease's owner is gone (a killed pull), so
//! the next pull after a crash cleans up after it ("collected at the next start"); checking
//! costs one query and a `/proc` read per lease.

use std::fs;

use async_trait::async_trait;
use rusqlite::params;

use super::{
    db::{add_resource, Db, Resource},
    gc, now_nanos, Layout,
};
use crate::{
    backend::{Census, GcReport, Held, LeaseId, Leases},
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

/// The process that owns a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    pub(crate) boot_id: String,
}

impl Owner {
    /// This process.
    fn current() -> Result<Owner> {
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let start_time = start_time(pid).ok_or_else(|| Error::Io {
            context: "reading this process's start time".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("/proc/{pid}/stat unreadable or malformed"),
            ),
        })?;
        Ok(Owner { pid, start_time, boot_id: boot_id() })
    }

    /// No process: a detached lease, alive until deleted or until the next boot.
    fn detached() -> Owner {
        Owner { pid: 0, start_time: 0, boot_id: boot_id() }
    }

    /// Whether the owning process still runs (for a detached lease: whether the machine has not
    /// rebooted since).
    pub(crate) fn is_alive(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        self.pid == 0 || start_time(self.pid) == Some(self.start_time)
    }
}

/// The start time of process `pid`, or `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/<pid>/stat` line. Field 2, the command name, is in parentheses and may
/// itself contain spaces and parentheses, so counting starts after the last `)`, at field 3.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The kernel's boot id (empty when unavailable: then only the start time tells reuse).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
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
                    "INSERT INTO leases (id, pid, start_time, boot_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id.0, owner.pid, owner.start_time as i64, owner.boot_id, now_nanos() as i64],
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
            Held::Snapshot(key) => (Resource::Snapshot, key.to_owned()),
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

    #[test]
    fn parses_proc_stat() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        assert!(!Owner { start_time: me.start_time + 1, ..me.clone() }.is_alive());
        assert!(!Owner { boot_id: "another boot".into(), ..me.clone() }.is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!Owner { pid, ..me }.is_alive());
        assert!(Owner::detached().is_alive());
        assert!(!Owner { boot_id: "another boot".into(), ..Owner::detached() }.is_alive());
    }

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
