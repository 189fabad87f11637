//! The embedded store's side of the containerd proxy snapshotter ([`crate::snapshotter`]):
//! containerd's snapshots, in pullbox's store, owned by a permanent lease.
//!
//! [`ProxyStore`] is the embedded snapshotter ([`super::snapshots::Snapshots`]: same
//! directories, same mounts, same database) restricted to the snapshots containerd created
//! through the proxy. Every one of them is a resource of the permanent lease [`LEASE`] (see
//! [`super::leases`]), so:
//!
//! - pullbox's garbage collector (`pullbox gc`, the daemon's start-up collection, the
//!   collection after a killed pull) takes them as roots and never collects one containerd
//!   still references: only containerd's `Remove` frees them;
//! - [`ProxyStore::list`] (containerd's `Walk`) answers only them. containerd's metadata
//!   garbage collector removes every snapshot the backend lists that its own database does
//!   not know: listing pullbox's own images' snapshots would have it delete them.
//!
//! Every call on a key or name containerd did not create here answers `NotFound`, as if the
//! rest of the store did not exist. containerd names backend snapshots
//! `<namespace>/<id>/<key>` ([`super::snapshots::is_containerd_key`], a key shape the snapshotter knows), so its
//! keys never collide with the keys pullbox's own pulls use (`extract-<hex>`, `sha256:<hex>`).

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    db::Db,
    gc,
    leases::ensure_permanent,
    snapshots::{kind_and_labels, Snapshots},
    Layout, Options,
};
use crate::{
    backend::{GcReport, Labels, LeaseId, SnapshotKind, Snapshotter, Usage},
    error::{Error, Result},
    oci::Mount,
};

/// The permanent lease that holds containerd's snapshots.
pub const LEASE: &str = "containerd-proxy";

/// What containerd's `Stat`, `Update` and `List` answer for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    pub name: String,
    /// The parent's name, empty when none.
    pub parent: String,
    pub kind: SnapshotKind,
    pub labels: Labels,
    /// Nanoseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
}

/// The embedded snapshotter as containerd's proxy snapshotter sees it (see the module docs).
#[derive(Clone)]
pub struct ProxyStore {
    layout: Layout,
    db: Db,
    snapshots: Arc<Snapshots>,
    lease: LeaseId,
}

/// The row of `key` if the proxy's lease holds it.
fn owned(conn: &Connection, key: &str) -> Result<Option<ProxyInfo>> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} AND s.key = ?2"))?;
    Ok(stmt.query_row(params![LEASE, key], info_of).optional()?)
}

fn require(conn: &Connection, key: &str) -> Result<ProxyInfo> {
    owned(conn, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
}

/// The snapshots the proxy's lease (`?1`) holds.
const SELECT: &str = "SELECT s.key, s.parent, s.kind, s.labels, s.created_at, s.updated_at
     FROM snapshots s JOIN lease_resources r ON r.key = s.key AND r.kind = 'snapshot' AND r.lease = ?1
     WHERE 1";

fn info_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<ProxyInfo> {
    let (kind, labels) = kind_and_labels(row, 2)?;
    Ok(ProxyInfo {
        name: row.get(0)?,
        parent: row.get(1)?,
        kind,
        labels,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
    })
}

/// How containerd's `Update` changes labels: no field paths or `labels` replace them all;
/// `labels.<key>` sets that one label from `given` (or removes it when `given` lacks it).
/// Any other path is `InvalidArgument` (only labels of a snapshot can change).
pub fn updated_labels(current: &Labels, given: &Labels, paths: &[String]) -> Result<Labels> {
    if paths.is_empty() {
        return Ok(given.clone());
    }
    let mut labels = current.clone();
    for path in paths {
        if path == "labels" {
            labels = given.clone();
        } else if let Some(key) = path.strip_prefix("labels.") {
            match given.get(key) {
                Some(value) => labels.insert(key.to_owned(), value.clone()),
                None => labels.remove(key),
            };
        } else {
            return Err(Error::InvalidArgument(format!("cannot update field {path:?} of a snapshot")));
        }
    }
    Ok(labels)
}

impl ProxyStore {
    /// Opens the embedded store at `root` for the proxy, creating its permanent lease.
    pub async fn open(root: &std::path::Path, options: Options) -> Result<ProxyStore> {
        let layout = Layout::create(root)?;
        let db = Db::open(&layout.db(), super::fsutil::Reserve::new(layout.reserve()))?;
        let lease = LeaseId(LEASE.into());
        db.write({
            let lease = lease.clone();
            move |tx| ensure_permanent(tx, &lease)
        })
        .await?;
        let snapshots = Arc::new(Snapshots::new(layout.clone(), db.clone(), options.sync_fs));
        Ok(ProxyStore { layout, db, snapshots, lease })
    }

    /// The lease every proxy snapshot belongs to.
    pub fn lease(&self) -> &LeaseId {
        &self.lease
    }

    async fn check_parent(&self, parent: &str) -> Result<()> {
        if parent.is_empty() {
            return Ok(());
        }
        let parent = parent.to_owned();
        self.db.read(move |conn| require(conn, &parent).map(drop)).await
    }

    /// containerd's `Prepare` (`kind` active) or `View` (`kind` view).
    pub async fn create(&self, key: &str, parent: &str, kind: SnapshotKind, labels: &Labels) -> Result<Vec<Mount>> {
        self.check_parent(parent).await?;
        self.snapshots.create(key, parent, kind, &self.lease, labels).await
    }

    /// containerd's `Mounts`.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.stat(key).await?;
        self.snapshots.mounts(key).await
    }

    /// containerd's `Commit`: the committed snapshot carries `labels`.
    pub async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.stat(key).await?;
        self.snapshots.commit_labeled(name, key, &self.lease, Some(labels)).await
    }

    /// containerd's `Remove`: deletes the snapshot's row and directory.
    pub async fn remove(&self, key: &str) -> Result<()> {
        self.stat(key).await?;
        self.snapshots.remove(key).await
    }

    /// containerd's `Stat`.
    pub async fn stat(&self, key: &str) -> Result<ProxyInfo> {
        let key = key.to_owned();
        self.db.read(move |conn| require(conn, &key)).await
    }

    /// containerd's `Update` (see [`updated_labels`]).
    pub async fn update(&self, key: &str, labels: Labels, paths: Vec<String>) -> Result<ProxyInfo> {
        let key = key.to_owned();
        self.db
            .write(move |tx| {
                let mut info = require(tx, &key)?;
                info.labels = updated_labels(&info.labels, &labels, &paths)?;
                info.updated_at = super::now_nanos() as i64;
                tx.execute(
                    "UPDATE snapshots SET labels = ?1, updated_at = ?2 WHERE key = ?3",
                    params![serde_json::to_string(&info.labels)?, info.updated_at, key],
                )?;
                Ok(info)
            })
            .await
    }

    /// containerd's `Walk`: every proxy snapshot, parents before children.
    pub async fn list(&self) -> Result<Vec<ProxyInfo>> {
        self.db
            .read(|conn| {
                let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY s.id"))?;
                let rows = stmt.query_map([LEASE], info_of)?.collect::<rusqlite::Result<_>>()?;
                Ok(rows)
            })
            .await
    }

    /// containerd's `Usage`: disk use of the snapshot's own layer.
    pub async fn usage(&self, key: &str) -> Result<Usage> {
        self.stat(key).await?;
        self.snapshots.usage(key).await
    }

    /// containerd's `Cleanup` (after its garbage collection): collects the store's garbage,
    /// which deletes the directories removals left behind. Proxy snapshots are never garbage.
    pub async fn cleanup(&self) -> Result<GcReport> {
        gc::collect(&self.layout, &self.db).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::snapshots::is_containerd_key;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn recognizes_containerd_keys() {
        assert!(is_containerd_key("k8s.io/12/extract-1 sha256:ab"));
        assert!(is_containerd_key("default/3/sha256:ab"));
        assert!(!is_containerd_key("extract-ab"));
        assert!(!is_containerd_key("sha256:ab"));
        assert!(!is_containerd_key("a/b/c"));
        assert!(!is_containerd_key("/1/c"));
    }

    #[test]
    fn label_updates_follow_field_paths() {
        let current = labels(&[("a", "1"), ("b", "2")]);
        let given = labels(&[("b", "3"), ("c", "4")]);
        assert_eq!(updated_labels(&current, &given, &[]).unwrap(), given);
        assert_eq!(updated_labels(&current, &given, &["labels".into()]).unwrap(), given);
        assert_eq!(
            updated_labels(&current, &given, &["labels.b".into(), "labels.a".into()]).unwrap(),
            labels(&[("b", "3")])
        );
        assert!(matches!(updated_labels(&current, &given, &["parent".into()]), Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn only_containerds_snapshots_are_visible_and_they_survive_gc() {
        let dir = tempfile::tempdir().unwrap();
        let backend = super::super::open(dir.path()).unwrap();
        let proxy = ProxyStore::open(dir.path(), Options::default()).await.unwrap();
        // pullbox's own snapshot, held by nothing after its lease goes.
        let lease = backend.leases.create().await.unwrap();
        backend.snapshots.prepare("extract-own", "", &lease).await.unwrap();
        backend.snapshots.commit("own", "extract-own", &lease).await.unwrap();

        let l = labels(&[("containerd.io/snapshot.ref", "x")]);
        proxy.create("default/1/a", "", SnapshotKind::Active, &l).await.unwrap();
        assert_eq!(proxy.stat("default/1/a").await.unwrap().labels, l);
        proxy.commit("default/2/base", "default/1/a", labels(&[("k", "v")])).await.unwrap();
        let base = proxy.stat("default/2/base").await.unwrap();
        assert_eq!((base.kind, base.labels.clone()), (SnapshotKind::Committed, labels(&[("k", "v")])));
        proxy.create("default/3/c", "default/2/base", SnapshotKind::Active, &Labels::new()).await.unwrap();
        assert!(matches!(
            proxy.create("default/4/v", "own", SnapshotKind::View, &Labels::new()).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(proxy.stat("own").await, Err(Error::NotFound(_))));
        assert!(matches!(proxy.remove("own").await, Err(Error::NotFound(_))));
        assert!(matches!(
            proxy.create("default/3/c", "", SnapshotKind::Active, &Labels::new()).await,
            Err(Error::AlreadyExists(_))
        ));
        let names: Vec<_> = proxy.list().await.unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["default/2/base", "default/3/c"]);

        // pullbox's collector keeps containerd's snapshots and collects its own garbage.
        backend.leases.delete(&lease).await.unwrap();
        let report = backend.leases.collect().await.unwrap();
        assert_eq!(report.snapshots, 1);
        assert!(proxy.stat("default/2/base").await.is_ok() && proxy.stat("default/3/c").await.is_ok());

        let updated = proxy.update("default/2/base", labels(&[("n", "1")]), vec!["labels.n".into()]).await.unwrap();
        assert_eq!(updated.labels, labels(&[("k", "v"), ("n", "1")]));
        assert!(matches!(proxy.remove("default/2/base").await, Err(Error::FailedPrecondition(_))));
        proxy.remove("default/3/c").await.unwrap();
        proxy.remove("default/2/base").await.unwrap();
        assert!(proxy.list().await.unwrap().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("snapshots")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
