//! Garbage collection: mark and sweep over images, leases, blobs, snapshots and ingests.
//!
//! [`collect`] runs in one immediate write transaction of the metadata database (see
//! [`super::db`]):
//!
//! 1. delete leases whose owner process is gone ([`Owner::is_alive`]);
//! 2. mark ([`Marks::of`]): the roots are every image record's target and every remaining
//!    lease's resources; from a blob, follow its labels `containerd.io/gc.ref.content[.*|/*]`
//!    (value: a digest) and `containerd.io/gc.ref.snapshot.overlayfs[/*]` (value: a snapshot
//!    name); from a snapshot, its parent and the same labels;
//! 3. sweep: unreferenced blobs (files in `content/blobs/`), unreferenced snapshots (children
//!    before parents: a child's id is always greater), ingests no live lease holds and no
//!    writer has locked, and snapshot directories without a row (left by a crash); after the
//!    transaction, staging directories (layers unpacked while downloading) no process holds.
//!
//! Why this is safe against a pull in another process: every write that makes something
//! reachable (a lease resource, a committed blob, a snapshot row and its directory) happens in
//! a write transaction too, and SQLite serializes write transactions across processes. A blob
//! committed under a live lease is either recorded before the collector's transaction (so it
//! is marked) or after (so it was not yet in `blobs/` when the collector looked). Snapshot
//! directories are renamed to trash inside the transaction and deleted after it commits, so the
//! write lock is held for renames and unlinks only, never for deleting whole trees.
//!
//! On a full disk: the metadata database releases its reserve before the transaction (see
//! [`super::db`]), the collection frees space, and the reserve is made again afterwards when
//! there is room. Trees are deleted without recursion ([`super::fsutil::remove_all`]), whatever
//! their depth.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::PathBuf,
};

use rusqlite::{params, Connection};

use super::{
    algorithm_name, blocking,
    db::{owner_from_row, Db, Resource},
    fsutil::{disk_usage, remove_all, FileLock},
    images, ingest_dir_name, snapshots,
    stage::STAGING_LOCK,
    Layout, ALGORITHMS, TRASH_PREFIX,
};
use crate::{
    backend::{owner::Owner, GcReport},
    error::{Error, Result},
    oci::Digest,
};

/// Labels that reference a blob (by digest) from a blob or a snapshot.
const CONTENT_REF: &str = "containerd.io/gc.ref.content";
/// Labels that reference a snapshot (by name) of a snapshotter, named after the prefix.
const SNAPSHOT_REF_PREFIX: &str = "containerd.io/gc.ref.snapshot.";

/// Collects garbage under `layout`.
pub(crate) async fn collect(layout: &Layout, db: &Db) -> Result<GcReport> {
    let sweeping = layout.clone();
    let (mut report, trash) = db.write(move |tx| mark_and_sweep(tx, &sweeping)).await?;
    let layout = layout.clone();
    let (bytes, staged) = blocking(move || {
        let mut bytes = 0;
        for dir in trash {
            bytes += disk_usage(&dir).map(|u| u.size).unwrap_or_default();
            if let Err(e) = remove_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not delete a collected snapshot; the next collection retries");
            }
        }
        let staged = sweep_staging(&layout)?;
        Ok((bytes + staged.bytes, staged.snapshots))
    })
    .await?;
    // The space held back for a full disk, if it was used and there is room again.
    let reserve = db.reserve().clone();
    blocking(move || {
        reserve.ensure();
        Ok(())
    })
    .await?;
    report.bytes += bytes;
    report.snapshots += staged;
    if report != GcReport::default() {
        tracing::info!(?report, "garbage collected");
    }
    Ok(report)
}

/// What is reachable.
#[derive(Debug, Default)]
struct Marks {
    content: HashSet<String>,
    snapshots: HashSet<String>,
    /// Ingest directory names of the ingest references that live leases hold.
    ingests: HashSet<String>,
}

/// Where a label points, if it is a garbage-collection reference.
enum Ref {
    Content(String),
    Snapshot(String),
}

fn parse_ref(key: &str, value: &str) -> Option<Ref> {
    if let Some(rest) = key.strip_prefix(CONTENT_REF) {
        if rest.is_empty() || rest.starts_with(['.', '/']) {
            return Some(Ref::Content(value.to_owned()));
        }
    }
    let snapshotter = key.strip_prefix(SNAPSHOT_REF_PREFIX)?;
    let snapshotter = snapshotter.split_once('/').map_or(snapshotter, |(name, _)| name);
    (snapshotter == snapshots::NAME).then(|| Ref::Snapshot(value.to_owned()))
}

impl Marks {
    /// Marks everything reachable from image records and leases.
    fn of(conn: &Connection) -> Result<Marks> {
        let mut marks = Marks::default();
        let mut content: Vec<String> = images::all(conn)?.into_iter().map(|i| i.target.digest.to_string()).collect();
        let mut snaps: Vec<String> = Vec::new();
        let mut stmt = conn.prepare("SELECT kind, key FROM lease_resources")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (kind, key) = row?;
            match Resource::parse(&kind) {
                Some(Resource::Content) => content.push(key),
                Some(Resource::Snapshot) => snaps.push(key),
                Some(Resource::Ingest) => {
                    marks.ingests.insert(ingest_dir_name(&key));
                }
                None => tracing::warn!(kind, key, "unknown lease resource kind"),
            }
        }

        let mut blob_refs: HashMap<String, Vec<Ref>> = HashMap::new();
        let mut stmt =
            conn.prepare("SELECT digest, key, value FROM content_labels WHERE key LIKE 'containerd.io/gc.ref.%'")?;
        for row in
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
        {
            let (digest, key, value) = row?;
            if let Some(r) = parse_ref(&key, &value) {
                blob_refs.entry(digest).or_default().push(r);
            }
        }
        let snapshot_rows: HashMap<String, snapshots::Row> =
            snapshots::all(conn)?.into_iter().map(|row| (row.key.clone(), row)).collect();

        let follow = |r: &Ref, content: &mut Vec<String>, snaps: &mut Vec<String>| match r {
            Ref::Content(d) => content.push(d.clone()),
            Ref::Snapshot(s) => snaps.push(s.clone()),
        };
        loop {
            if let Some(digest) = content.pop() {
                if !marks.content.insert(digest.clone()) {
                    continue;
                }
                for r in blob_refs.get(&digest).into_iter().flatten() {
                    follow(r, &mut content, &mut snaps);
                }
            } else if let Some(key) = snaps.pop() {
                if !marks.snapshots.insert(key.clone()) {
                    continue;
                }
                if let Some(row) = snapshot_rows.get(&key) {
                    if !row.parent.is_empty() {
                        snaps.push(row.parent.clone());
                    }
                    for r in row.labels.iter().filter_map(|(k, v)| parse_ref(k, v)) {
                        follow(&r, &mut content, &mut snaps);
                    }
                }
            } else {
                return Ok(marks);
            }
        }
    }
}

/// The whole collection's database part; returns the report so far and the trashed snapshot
/// directories to delete once the transaction has committed.
fn mark_and_sweep(conn: &Connection, layout: &Layout) -> Result<(GcReport, Vec<PathBuf>)> {
    let mut report = GcReport { leases: collect_dead_leases(conn)?, ..GcReport::default() };
    let marks = Marks::of(conn)?;
    sweep_blobs(conn, layout, &marks, &mut report)?;
    let trash = sweep_snapshots(conn, layout, &marks, &mut report)?;
    sweep_ingests(layout, &marks, &mut report)?;
    Ok((report, trash))
}

/// Every lease with its owner.
fn leases(conn: &Connection) -> Result<Vec<(String, Owner)>> {
    let mut stmt = conn.prepare("SELECT id, pid, start_time, boot_id, pid_ns FROM leases")?;
    let leases = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, owner_from_row(r, 1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(leases)
}

/// Whether some lease's owner is gone: then a collection has something to do.
pub(crate) fn has_dead_leases(conn: &Connection) -> Result<bool> {
    Ok(leases(conn)?.iter().any(|(_, owner)| !owner.is_alive()))
}

/// Deletes the leases (and their resource lists) of processes that are gone.
fn collect_dead_leases(conn: &Connection) -> Result<u64> {
    let mut dead = 0;
    for (id, owner) in leases(conn)?.into_iter().filter(|(_, owner)| !owner.is_alive()) {
        tracing::info!(lease = id, pid = owner.pid, "deleting the lease of a process that is gone");
        conn.execute("DELETE FROM leases WHERE id = ?1", [&id])?;
        conn.execute("DELETE FROM lease_resources WHERE lease = ?1", [&id])?;
        dead += 1;
    }
    Ok(dead)
}

fn io_err(what: &str, path: &std::path::Path) -> impl FnOnce(io::Error) -> Error {
    Error::io(format!("garbage collection: {what} {}", path.display()))
}

/// The entries of a directory, as (name, path).
fn entries(dir: &std::path::Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        // Names that are not UTF-8 are not ours: leave them alone.
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

fn sweep_blobs(conn: &Connection, layout: &Layout, marks: &Marks, report: &mut GcReport) -> Result<()> {
    for alg in ALGORITHMS {
        for (hex, path) in entries(&layout.blobs(alg))? {
            let digest = format!("{}:{hex}", algorithm_name(alg));
            if digest.parse::<Digest>().is_err() || marks.content.contains(&digest) {
                continue;
            }
            let size = disk_usage(&path).map(|u| u.size).unwrap_or_default();
            remove_all(&path).map_err(io_err("deleting", &path))?;
            conn.execute("DELETE FROM content_labels WHERE digest = ?1", [&digest])?;
            report.blobs += 1;
            report.bytes += size;
        }
    }
    // Labels of blobs that are gone and unreferenced.
    let mut stmt = conn.prepare("SELECT DISTINCT digest FROM content_labels")?;
    let labelled = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    for digest in labelled.into_iter().filter(|d| !marks.content.contains(d)) {
        let present = digest.parse::<Digest>().is_ok_and(|d| layout.blob(&d).exists());
        if !present {
            conn.execute("DELETE FROM content_labels WHERE digest = ?1", [&digest])?;
        }
    }
    Ok(())
}

/// Deletes unreferenced snapshot rows (children first) and moves their directories, and those
/// of no row, to trash.
fn sweep_snapshots(conn: &Connection, layout: &Layout, marks: &Marks, report: &mut GcReport) -> Result<Vec<PathBuf>> {
    let mut trash = Vec::new();
    let mut rows = snapshots::all(conn)?;
    rows.sort_by_key(|row| std::cmp::Reverse(row.id));
    let mut live = HashSet::new();
    for row in rows {
        if marks.snapshots.contains(&row.key) {
            live.insert(row.id.to_string());
            continue;
        }
        conn.execute("DELETE FROM snapshots WHERE id = ?1", params![row.id])?;
        let dir = layout.snapshot(row.id);
        trash.extend(snapshots::move_to_trash(layout, &dir).map_err(io_err("moving", &dir))?);
        report.snapshots += 1;
    }
    for (name, path) in entries(&layout.snapshots())? {
        if live.contains(&name) {
            continue;
        }
        if name.starts_with(TRASH_PREFIX) {
            trash.push(path);
        } else {
            tracing::info!(dir = %path.display(), "deleting a snapshot directory that has no record");
            trash.extend(snapshots::move_to_trash(layout, &path).map_err(io_err("moving", &path))?);
            report.snapshots += 1;
        }
    }
    Ok(trash)
}

/// Deletes the staging directories of layers unpacked while downloading that no process has
/// locked (left by a killed process): outside the database transaction, as no record refers to
/// them. Counted as snapshots.
fn sweep_staging(layout: &Layout) -> Result<GcReport> {
    let mut report = GcReport::default();
    for (_, path) in entries(&layout.staging())? {
        let lock = match FileLock::try_acquire(&path.join(STAGING_LOCK)) {
            Ok(Some(lock)) => lock,
            // Its pull is running, or it finished and deleted the directory just now.
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("locking", &path)(e)),
        };
        tracing::info!(dir = %path.display(), "deleting a layer a killed pull unpacked");
        report.bytes += disk_usage(&path).map(|u| u.size).unwrap_or_default();
        remove_all(&path).map_err(io_err("deleting", &path))?;
        drop(lock);
        report.snapshots += 1;
    }
    Ok(report)
}

/// Deletes ingests that no live lease holds and no writer has locked.
fn sweep_ingests(layout: &Layout, marks: &Marks, report: &mut GcReport) -> Result<()> {
    for (name, path) in entries(&layout.ingests())? {
        if marks.ingests.contains(&name) {
            continue;
        }
        let lock = match path.is_dir() {
            true => match FileLock::try_acquire(&path.join("lock")) {
                Ok(Some(lock)) => Some(lock),
                // A writer holds it (its lease is in another process's transaction to come),
                // or it finished and removed the directory just now.
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("locking", &path)(e)),
            },
            false => None,
        };
        let size = disk_usage(&path).map(|u| u.size).unwrap_or_default();
        remove_all(&path).map_err(io_err("deleting", &path))?;
        drop(lock);
        report.ingests += 1;
        report.bytes += size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        backend::{embedded::open, Backend, Held, ImageRecord, Labels, LeaseId},
        oci::Descriptor,
    };

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        (dir, backend, lease)
    }

    async fn blob(b: &Backend, lease: &LeaseId, data: &[u8]) -> Descriptor {
        let desc = blob_descriptor(data);
        let mut w = b.content.writer(&desc, lease).await.unwrap();
        w.write(data).await.unwrap();
        w.commit().await.unwrap();
        desc
    }

    async fn exists(b: &Backend, d: &Descriptor) -> bool {
        b.content.info(&d.digest).await.is_ok()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[tokio::test]
    async fn an_image_keeps_its_graph() {
        let (dir, b, lease) = setup().await;
        let config = blob(&b, &lease, b"config").await;
        let layer = blob(&b, &lease, b"layer").await;
        let manifest = blob(&b, &lease, b"manifest").await;
        let stray = blob(&b, &lease, b"stray").await;
        b.snapshots.prepare("x1", "", &lease).await.unwrap();
        b.snapshots.commit("base", "x1", &lease).await.unwrap();
        b.snapshots.prepare("x2", "base", &lease).await.unwrap();
        b.snapshots.commit("top", "x2", &lease).await.unwrap();
        b.snapshots.prepare("x3", "", &lease).await.unwrap();
        b.snapshots.commit("unused", "x3", &lease).await.unwrap();
        b.content
            .set_labels(
                &manifest.digest,
                &labels(&[
                    ("containerd.io/gc.ref.content.config", config.digest.as_str()),
                    ("containerd.io/gc.ref.content.l.0", layer.digest.as_str()),
                ]),
            )
            .await
            .unwrap();
        b.content
            .set_labels(&config.digest, &labels(&[("containerd.io/gc.ref.snapshot.overlayfs", "top")]))
            .await
            .unwrap();
        b.images
            .create(ImageRecord {
                name: "img".into(),
                target: manifest.clone(),
                labels: Labels::new(),
                created_at: 0,
                updated_at: 0,
            })
            .await
            .unwrap();

        // While the lease lives, nothing goes.
        assert_eq!(b.leases.collect().await.unwrap(), GcReport::default());

        b.leases.delete(&lease).await.unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.blobs, report.snapshots, report.leases, report.ingests), (1, 1, 0, 0));
        assert!(report.bytes > 0);
        for d in [&config, &layer, &manifest] {
            assert!(exists(&b, d).await, "{} collected", d.digest);
        }
        assert!(!exists(&b, &stray).await);
        assert!(b.snapshots.stat("top").await.is_ok() && b.snapshots.stat("base").await.is_ok());
        assert!(b.snapshots.stat("unused").await.is_err());
        let snaps: HashSet<_> =
            fs::read_dir(dir.path().join("snapshots")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(snaps, ["1", "2"].map(std::ffi::OsString::from).into());

        // Without the image, everything goes.
        b.images.delete("img").await.unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.blobs, report.snapshots), (3, 2));
        assert_eq!(fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("content/blobs/sha256")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_released_lease_is_collected() {
        let (dir, b, lease) = setup().await;
        let kept_lease = b.leases.create().await.unwrap();
        let kept = blob(&b, &kept_lease, b"kept").await;
        let gone = blob(&b, &lease, b"gone").await;
        b.snapshots.prepare("active", "", &lease).await.unwrap();
        let half = Descriptor { size: 100, ..blob_descriptor(b"never finished") };
        let mut w = b.content.writer(&half, &lease).await.unwrap();
        w.write(b"partial").await.unwrap();
        drop(w);
        // An ingest of a live lease stays.
        let half2 = blob_descriptor(b"still going");
        let mut w2 = b.content.writer(&half2, &kept_lease).await.unwrap();
        w2.write(b"still").await.unwrap();

        b.leases.delete(&lease).await.unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.blobs, report.snapshots, report.ingests), (1, 1, 1));
        assert!(exists(&b, &kept).await && !exists(&b, &gone).await);
        assert_eq!(fs::read_dir(dir.path().join("content/ingest")).unwrap().count(), 1);
        w2.write(b" going").await.unwrap();
        w2.commit().await.unwrap();
    }

    fn blob_descriptor(data: &[u8]) -> Descriptor {
        Descriptor::of_bytes("application/octet-stream", data)
    }

    #[tokio::test]
    async fn a_dead_owners_lease_is_collected() {
        let (dir, b, lease) = setup().await;
        let d = blob(&b, &lease, b"orphaned by a killed pull").await;
        // The owner "restarted": same pid, another start time.
        let db = Connection::open(dir.path().join("metadata.db")).unwrap();
        db.execute("UPDATE leases SET start_time = start_time + 1 WHERE id = ?1", [&lease.0]).unwrap();
        // And a directory a crash left behind.
        fs::create_dir_all(dir.path().join("snapshots/77/fs")).unwrap();

        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.leases, report.blobs, report.snapshots), (1, 1, 1));
        assert!(!exists(&b, &d).await);
        assert!(!Path::new(&dir.path().join("snapshots/77")).exists());
        assert!(matches!(b.leases.delete(&lease).await, Err(Error::NotFound(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collecting_during_pulls_keeps_leased_blobs() {
        let (_dir, b, lease) = setup().await;
        let gc = {
            let b = b.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    b.leases.collect().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut written = Vec::new();
        for i in 0..40 {
            written.push(blob(&b, &lease, format!("blob {i}").as_bytes()).await);
        }
        gc.await.unwrap();
        b.leases.collect().await.unwrap();
        for d in &written {
            assert!(exists(&b, d).await, "{} collected under a live lease", d.digest);
        }
    }

    #[tokio::test]
    async fn a_held_blob_and_snapshot_outlive_the_lease_that_wrote_them() {
        let (_dir, b, writer) = setup().await;
        let layer = blob(&b, &writer, b"base layer").await;
        b.snapshots.prepare("x1", "", &writer).await.unwrap();
        b.snapshots.commit("base", "x1", &writer).await.unwrap();
        // Another pull finds both stored and holds them; then the writer's lease ends (the
        // image that needed them was removed).
        let reader = b.leases.create().await.unwrap();
        b.leases.hold(&reader, Held::Content(&layer.digest)).await.unwrap();
        b.leases.hold(&reader, Held::Snapshot("overlayfs", "base")).await.unwrap();
        b.leases.hold(&reader, Held::Snapshot("overlayfs", "not there (yet)")).await.unwrap();
        b.leases.delete(&writer).await.unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.blobs, report.snapshots), (0, 0), "{report:?}");
        assert!(exists(&b, &layer).await);
        assert!(b.snapshots.stat("base").await.is_ok());
        b.snapshots.prepare("x2", "base", &reader).await.unwrap();

        b.leases.delete(&reader).await.unwrap();
        let report = b.leases.collect().await.unwrap();
        assert_eq!((report.blobs, report.snapshots), (1, 2), "{report:?}");
        assert!(matches!(b.leases.hold(&reader, Held::Snapshot("overlayfs", "base")).await, Err(Error::NotFound(_))));
    }

    #[test]
    fn recognizes_reference_labels() {
        let r = |k| parse_ref(k, "v");
        assert!(matches!(r("containerd.io/gc.ref.content"), Some(Ref::Content(_))));
        assert!(matches!(r("containerd.io/gc.ref.content.m.0"), Some(Ref::Content(_))));
        assert!(matches!(r("containerd.io/gc.ref.content/x"), Some(Ref::Content(_))));
        assert!(r("containerd.io/gc.ref.contentx").is_none());
        assert!(matches!(r("containerd.io/gc.ref.snapshot.overlayfs"), Some(Ref::Snapshot(_))));
        assert!(matches!(r("containerd.io/gc.ref.snapshot.overlayfs/1"), Some(Ref::Snapshot(_))));
        assert!(r("containerd.io/gc.ref.snapshot.native").is_none());
    }
}
