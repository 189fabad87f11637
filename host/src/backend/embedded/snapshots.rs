//! The snapshotter: containerd's `overlayfs` snapshotter layout and mount shapes, with its
//! metadata in the database.
//!
//! [`Snapshots`] implements [`Snapshotter`]. Each snapshot gets a numeric id (SQLite
//! `AUTOINCREMENT`, so a committed id is never reused and a child's id is always greater than
//! its parent's) and a directory `snapshots/<id>/` holding `fs` (the snapshot's own layer) and,
//! for active snapshots, `work` (overlayfs's work directory). The `snapshots` table maps the key
//! (an active snapshot's key, a committed snapshot's name: one namespace, as in containerd) to
//! the id, the parent's name, the [`SnapshotKind`] and labels.
//!
//! Mounts ([`mounts_of`]), as containerd's overlayfs snapshotter returns them:
//!
//! | snapshot | no parent | one parent | more |
//! |---|---|---|---|
//! | active | `bind` own `fs`, `rw` | `overlay` `upperdir`+`workdir`+`lowerdir` | same |
//! | view | `bind` own `fs`, `ro` | `bind` parent's `fs`, `ro` | `overlay` `lowerdir` only |
//!
//! `lowerdir` lists the parents nearest first. Storing needs no privilege; mounting needs root.
//!
//! Directories are created inside the transaction that inserts the row, and renamed away
//! inside the one that deletes it, so the garbage collector (which sweeps directories without
//! a row inside its own transaction) never sees a half-made snapshot.
//!
//! Concurrent unpacks of one layer (two pulls, in one process or several, of images that share
//! it). A puller unpacks into an active snapshot whose key derives from the chain ID it will
//! commit as (pullbox's puller: `extract-<chain hex>`; containerd's unpacker:
//! `extract-<unique> <chain ID>`), and when `prepare` finds that key taken it removes the
//! "stale" snapshot and prepares again. Were that snapshot another live pull's, the other pull
//! would fail. So:
//!
//! - `prepare` of a key that is an active snapshot held by *another live lease* waits
//!   (polling every [`WAIT_POLL`], at most [`PREPARE_WAIT_LIMIT`]) until that pull commits or
//!   removes it, or dies, then prepares; `AlreadyExists` is left for keys of this lease or of dead ones (really stale);
//! - `stat` of a name that does not exist while a live lease's active snapshot is about to be
//!   committed as that name (recognized by the two key shapes above) waits for that unpack to
//!   end, up to [`STAT_WAIT_LIMIT`]: a puller that checks for the committed layer before
//!   unpacking it (as pullbox's does) then finds it and skips the layer instead of unpacking it
//!   a second time.
//!
//! A waiting call stops waiting when its future is dropped (a cancelled pull).
//!
//! Durability. Unpacking writes through the page cache and syncs nothing per file. With
//! [`super::Options::sync_fs`] (containerd CRI's `image_pull_with_sync_fs`), `commit` first
//! flushes the snapshot's filesystem with one `syncfs`, so that a snapshot recorded as
//! committed has its files on disk after a power loss; without it (the default, as
//! containerd's), a power loss can leave a committed snapshot with missing data.
//!
//! Snapshots removed behind pullbox's back. A snapshot whose directory is gone, or one of whose
//! ancestors (row or directory) is, cannot be mounted: `stat` reports it as `NotFound` (so an
//! image that needs it is not READY, and a pull unpacks it again), `prepare` and `view` on it
//! fail with `FailedPrecondition`, and a `commit` under its name replaces it (children keep
//! working: they name their parent, and a chain ID names the same content).

use std::{
    collections::HashMap,
    fs::DirBuilder,
    io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row as SqlRow};

use super::{
    blocking,
    db::{add_resource, drop_resource, owner_from_row, Db, Resource},
    fsutil::{disk_usage, remove_all, sync_filesystem, PRIVATE_DIR},
    now_nanos, Layout,
};
use crate::{
    backend::{Labels, LeaseId, SnapshotInfo, SnapshotKind, Snapshotter, Usage},
    error::{Error, Result},
    oci::Mount,
};

/// The snapshotter's name, as in `containerd.io/gc.ref.snapshot.overlayfs` labels.
pub(crate) const NAME: &str = "overlayfs";

/// How often a call waiting for another pull's active snapshot looks again: a layer takes far
/// longer to unpack, and one indexed query per poll costs nothing.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// How long `stat` waits for another pull's unpack of the snapshot asked about before it
/// answers `NotFound` anyway. `stat` also serves image status, which should not hang on a
/// stuck pull; a pull that gets `NotFound` prepares the snapshot and waits there instead.
const STAT_WAIT_LIMIT: Duration = Duration::from_secs(300);

/// How long `prepare` waits for another pull's unpack into the same key before it gives up
/// with `Unavailable` (the caller retries later). A layer that takes longer to download and
/// unpack is a stuck pull; the waiting call's own deadline (`sandbox.pull_timeout_s`) ends it
/// sooner when it is shorter.
const PREPARE_WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The prefix of the keys pullers unpack layers into (see the module docs).
const EXTRACT_PREFIX: &str = "extract-";

/// Whether `key` has the shape of the keys containerd's metadata layer gives a backend
/// snapshotter: `<namespace>/<id>/<key>`, with a decimal id.
pub(crate) fn is_containerd_key(key: &str) -> bool {
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(id), Some(_)) => !ns.is_empty() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        _ => false,
    }
}

/// The embedded snapshotter.
pub(crate) struct Snapshots {
    layout: Layout,
    db: Db,
    /// Sync the filesystem before each commit ([`super::Options::sync_fs`]).
    sync_fs: bool,
}

/// One row of the `snapshots` table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) id: i64,
    pub(crate) key: String,
    pub(crate) parent: String,
    pub(crate) kind: SnapshotKind,
    pub(crate) labels: Labels,
}

const COLUMNS: &str = "id, key, parent, kind, labels";

fn kind_str(kind: SnapshotKind) -> &'static str {
    kind.as_str()
}

/// The kind and labels in columns `first` and `first + 1` of `row`.
pub(crate) fn kind_and_labels(row: &SqlRow<'_>, first: usize) -> rusqlite::Result<(SnapshotKind, Labels)> {
    let corrupt = |i, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
    };
    let kind = match row.get_ref(first)?.as_str()? {
        "active" => SnapshotKind::Active,
        "view" => SnapshotKind::View,
        "committed" => SnapshotKind::Committed,
        other => return Err(corrupt(first, format!("unknown snapshot kind {other:?}").into())),
    };
    let labels = serde_json::from_str(row.get_ref(first + 1)?.as_str()?).map_err(|e| corrupt(first + 1, e.into()))?;
    Ok((kind, labels))
}

impl Row {
    fn from_sql(row: &SqlRow<'_>) -> rusqlite::Result<Row> {
        let (kind, labels) = kind_and_labels(row, 3)?;
        Ok(Row { id: row.get(0)?, key: row.get(1)?, parent: row.get(2)?, kind, labels })
    }
}

/// The snapshot `key`, if any.
pub(crate) fn get(conn: &Connection, key: &str) -> Result<Option<Row>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM snapshots WHERE key = ?1"))?;
    Ok(stmt.query_row([key], Row::from_sql).optional()?)
}

/// Every snapshot.
pub(crate) fn all(conn: &Connection) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM snapshots"))?;
    let rows = stmt.query_map([], Row::from_sql)?.collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The `fs` directories of the ancestors of the active snapshot with id `id`, nearest first
/// (what an overlay mount of it has as `lowerdir`); `None` when there is no such active
/// snapshot.
pub(crate) fn active_lowers(conn: &Connection, layout: &Layout, id: i64) -> Result<Option<Vec<PathBuf>>> {
    let row: Option<(String, String)> = conn
        .query_row("SELECT kind, parent FROM snapshots WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        Some((kind, parent)) if kind == kind_str(SnapshotKind::Active) => {
            Ok(Some(chain(conn, layout, &parent)?.into_iter().map(|id| layout.snapshot_fs(id)).collect()))
        }
        _ => Ok(None),
    }
}

fn require(conn: &Connection, key: &str) -> Result<Row> {
    get(conn, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
}

/// The ids of `name` and its ancestors, nearest first ("" gives none). `FailedPrecondition`
/// when one of them, or its directory, is missing.
fn chain(conn: &Connection, layout: &Layout, name: &str) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    let mut name = name.to_owned();
    while !name.is_empty() {
        let row = get(conn, &name)?.ok_or_else(|| Error::FailedPrecondition(missing_ancestor(&name)))?;
        if is_missing(&layout.snapshot_fs(row.id)) {
            return Err(Error::FailedPrecondition(lost_directory(layout, &name, row.id)));
        }
        ids.push(row.id);
        name = row.parent;
    }
    Ok(ids)
}

/// Why a chain is unusable when its snapshot `name` has no row.
fn missing_ancestor(name: &str) -> String {
    format!("snapshot {name}, an ancestor, is missing")
}

/// Why a chain is unusable when the directory of its snapshot `name` (id `id`) is gone.
fn lost_directory(layout: &Layout, name: &str, id: i64) -> String {
    let dir = layout.snapshot_fs(id);
    format!("snapshot {name} has lost its directory {} (removed behind pullbox's back)", dir.display())
}

/// Whether `path` is certainly absent (any other failure to look is not taken as absence).
fn is_missing(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// Why `row` cannot be used, if it cannot: its directory, or an ancestor or its directory, is
/// missing.
fn damage(conn: &Connection, layout: &Layout, row: &Row) -> Result<Option<String>> {
    damage_seen(conn, layout, row, &mut Seen::default())
}

/// What the looks of one batch of `stat`s share, so that a batch reads each ancestor and the
/// list of active snapshots once, however many snapshots share them.
#[derive(Default)]
struct Seen {
    /// Name → why the chain from that snapshot down to the root is unusable (`None`: usable),
    /// for every ancestor walked so far.
    chains: HashMap<String, Option<String>>,
    /// The keys of the active snapshots, once a look has needed them.
    active: Option<Vec<String>>,
}

/// [`damage`], reusing and extending what `seen` knows of the ancestors.
fn damage_seen(conn: &Connection, layout: &Layout, row: &Row, seen: &mut Seen) -> Result<Option<String>> {
    let fs = layout.snapshot_fs(row.id);
    if is_missing(&fs) {
        return Ok(Some(format!("its directory {} is missing", fs.display())));
    }
    // As `chain(row.parent)`, nearest ancestor first; every name walked gets the verdict of
    // the first unusable snapshot at or above it (the same one `chain` would report).
    let mut walked = Vec::new();
    let mut name = row.parent.clone();
    let verdict = loop {
        if name.is_empty() {
            break None;
        }
        if let Some(known) = seen.chains.get(&name) {
            break known.clone();
        }
        let Some(ancestor) = get(conn, &name)? else {
            let why = missing_ancestor(&name);
            walked.push(name);
            break Some(why);
        };
        if is_missing(&layout.snapshot_fs(ancestor.id)) {
            let why = lost_directory(layout, &name, ancestor.id);
            walked.push(name);
            break Some(why);
        }
        walked.push(std::mem::replace(&mut name, ancestor.parent));
    };
    for name in walked {
        seen.chains.insert(name, verdict.clone());
    }
    Ok(verdict)
}

/// A live lease other than `except` that holds the snapshot `key`, if any.
fn live_holder(conn: &Connection, key: &str, except: Option<&LeaseId>) -> Result<Option<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT l.id, l.pid, l.start_time, l.boot_id, l.pid_ns FROM lease_resources r JOIN leases l ON l.id = r.lease
         WHERE r.kind = ?1 AND r.key = ?2",
    )?;
    let holders = stmt
        .query_map(params![Resource::Snapshot.as_str(), key], |r| Ok((r.get::<_, String>(0)?, owner_from_row(r, 1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(holders.into_iter().find(|(id, owner)| except.is_none_or(|e| e.0 != *id) && owner.is_alive()).map(|(id, _)| id))
}

/// The name an active snapshot `key` will be committed as, when its key says so (see the
/// module docs): `extract-<hex>` → `sha256:<hex>`, `<anything> <name>` → `<name>`.
fn unpack_target(key: &str) -> Option<String> {
    if is_containerd_key(key) {
        // containerd's own unpacks through the proxy snapshotter (`<namespace>/<id>/<key>`)
        // commit under keys of the same shape, never under a name pullbox's pulls stat.
        return None;
    }
    if let Some((_, name)) = key.rsplit_once(' ') {
        return (!name.is_empty()).then(|| name.to_owned());
    }
    let hex = key.strip_prefix(EXTRACT_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

/// The key of a live lease's active snapshot that is being unpacked to become `name`, if any;
/// the active snapshots are read once per `seen`.
fn pending_unpack(conn: &Connection, name: &str, seen: &mut Seen) -> Result<Option<String>> {
    if seen.active.is_none() {
        let mut stmt = conn.prepare_cached("SELECT key FROM snapshots WHERE kind = ?1")?;
        let active = stmt
            .query_map([kind_str(SnapshotKind::Active)], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        seen.active = Some(active);
    }
    for key in seen.active.iter().flatten() {
        if unpack_target(key).as_deref() == Some(name) && live_holder(conn, key, None)?.is_some() {
            return Ok(Some(key.clone()));
        }
    }
    Ok(None)
}

/// What one look at a snapshot found, for `stat`.
enum Look {
    Found(Row),
    /// Absent, or unusable (the reason).
    Absent(Option<String>),
    /// Absent, but the active snapshot with this key is being unpacked to become it.
    Pending(String),
}

/// One look at the snapshot `name`, for `stat` and `stats`.
fn look(conn: &Connection, layout: &Layout, name: &str, seen: &mut Seen) -> Result<Look> {
    let why = match get(conn, name)? {
        Some(row) => match damage_seen(conn, layout, &row, seen)? {
            None => return Ok(Look::Found(row)),
            why => why,
        },
        None => None,
    };
    Ok(match pending_unpack(conn, name, seen)? {
        Some(active) => Look::Pending(active),
        None => Look::Absent(why),
    })
}

/// `stat`'s answer for `key` from a look that is not waited on any longer.
fn settled(key: &str, look: Look) -> Result<SnapshotInfo> {
    match look {
        Look::Found(row) => Ok(SnapshotInfo { name: row.key, parent: row.parent, kind: row.kind, labels: row.labels }),
        Look::Pending(_) | Look::Absent(None) => Err(Error::NotFound(format!("snapshot {key}"))),
        Look::Absent(Some(why)) => {
            tracing::info!(snapshot = key, "snapshot is unusable: {why}");
            Err(Error::NotFound(format!("snapshot {key} (unusable: {why})")))
        }
    }
}

/// What `create` found.
enum Created {
    Mounts(Vec<Mount>),
    /// The key is another live lease's active snapshot (that lease).
    Busy(String),
}

/// Renames a snapshot directory to a fresh trash name, to be deleted outside the transaction;
/// `None` when it does not exist.
pub(crate) fn move_to_trash(layout: &Layout, dir: &Path) -> io::Result<Option<PathBuf>> {
    let trash = layout.snapshot_trash();
    match std::fs::rename(dir, &trash) {
        Ok(()) => Ok(Some(trash)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The mounts of an active snapshot or a view whose ancestors are `lowers` (nearest first).
fn mounts_of(layout: &Layout, row: &Row, lowers: &[i64]) -> Vec<Mount> {
    // The root is checked to be UTF-8 at open, so nothing is lost here.
    let fs = |id| layout.snapshot_fs(id).to_string_lossy().into_owned();
    let bind = |source, mode: &str| Mount { kind: "bind".into(), source, options: vec![mode.into(), "rbind".into()] };
    let overlay = |options| Mount { kind: "overlay".into(), source: "overlay".into(), options };
    let lowerdir = || format!("lowerdir={}", lowers.iter().map(|&id| fs(id)).collect::<Vec<_>>().join(":"));
    match (row.kind, lowers) {
        (SnapshotKind::Active, []) => vec![bind(fs(row.id), "rw")],
        (SnapshotKind::Active, _) => vec![overlay(vec![
            format!("workdir={}", layout.snapshot_work(row.id).to_string_lossy()),
            format!("upperdir={}", fs(row.id)),
            lowerdir(),
        ])],
        (_, []) => vec![bind(fs(row.id), "ro")],
        (_, [parent]) => vec![bind(fs(*parent), "ro")],
        (_, _) => vec![overlay(vec![lowerdir()])],
    }
}

impl Snapshots {
    pub(crate) fn new(layout: Layout, db: Db, sync_fs: bool) -> Snapshots {
        Snapshots { layout, db, sync_fs }
    }

    /// With [`super::Options::sync_fs`]: flushes the active snapshot `key`'s files to disk, so
    /// that a committed snapshot survives a power loss (one `syncfs` per snapshot).
    async fn sync_before_commit(&self, key: &str) -> Result<()> {
        if !self.sync_fs {
            return Ok(());
        }
        let key = key.to_owned();
        let id = self.db.read(move |conn| Ok(require(conn, &key)?.id)).await?;
        let fs = self.layout.snapshot_fs(id);
        let context = format!("syncing snapshot {} to disk", fs.display());
        blocking(move || sync_filesystem(&fs).map_err(Error::io(context))).await
    }

    /// Creates an active snapshot or a view on `parent`, first waiting while `key` is another
    /// live pull's active snapshot (see the module docs).
    /// `labels` are the new snapshot's (containerd's `Prepare`/`View` options).
    pub(crate) async fn create(
        &self,
        key: &str,
        parent: &str,
        kind: SnapshotKind,
        lease: &LeaseId,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot key must not be empty".into()));
        }
        let started = Instant::now();
        let mut announced = false;
        loop {
            match self.try_create(key, parent, kind, lease, labels).await? {
                Created::Mounts(mounts) => {
                    if announced {
                        tracing::info!(key, waited = ?started.elapsed(), "the other pull is done with the snapshot");
                    }
                    return Ok(mounts);
                }
                Created::Busy(holder) => {
                    if started.elapsed() > PREPARE_WAIT_LIMIT {
                        return Err(Error::Unavailable {
                            what: format!(
                                "snapshot {key} has been unpacked by another pull (lease {holder}) for more than {} s",
                                PREPARE_WAIT_LIMIT.as_secs()
                            ),
                            source: None,
                        });
                    }
                    if !announced {
                        tracing::info!(key, holder, "another pull is unpacking into this snapshot; waiting for it");
                        announced = true;
                    }
                    tokio::time::sleep(WAIT_POLL).await;
                }
            }
        }
    }

    async fn try_create(
        &self,
        key: &str,
        parent: &str,
        kind: SnapshotKind,
        lease: &LeaseId,
        labels: &Labels,
    ) -> Result<Created> {
        let (layout, key, parent, lease) = (self.layout.clone(), key.to_owned(), parent.to_owned(), lease.clone());
        let labels = labels.clone();
        self.db
            .write(move |tx| {
                if let Some(existing) = get(tx, &key)? {
                    if existing.kind == SnapshotKind::Active && kind == SnapshotKind::Active {
                        if let Some(holder) = live_holder(tx, &key, Some(&lease))? {
                            return Ok(Created::Busy(holder));
                        }
                    }
                    return Err(Error::AlreadyExists(format!("snapshot {key}")));
                }
                add_resource(tx, &lease, Resource::Snapshot, &key)?;
                if !parent.is_empty() {
                    let p = require(tx, &parent)?;
                    if p.kind != SnapshotKind::Committed {
                        return Err(Error::FailedPrecondition(format!("parent snapshot {parent} is not committed")));
                    }
                }
                let lowers = chain(tx, &layout, &parent)?;
                let now = now_nanos() as i64;
                tx.execute(
                    "INSERT INTO snapshots (key, parent, kind, labels, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    params![key, parent, kind_str(kind), serde_json::to_string(&labels)?, now],
                )?;
                let row = Row { id: tx.last_insert_rowid(), key, parent, kind, labels };

                let dir = layout.snapshot(row.id);
                let context = format!("creating snapshot {} in {}", row.key, dir.display());
                // A rolled-back transaction may have used this id and left its directory.
                remove_all(&dir).map_err(Error::io(context.clone()))?;
                // The snapshot's directory is pullbox's own; `fs` becomes the root directory of
                // the image's filesystem (the layers set its mode, as containerd's snapshotter).
                let mut builder = DirBuilder::new();
                builder.mode(PRIVATE_DIR).create(&dir).map_err(Error::io(context.clone()))?;
                builder.mode(0o755).create(layout.snapshot_fs(row.id)).map_err(Error::io(context.clone()))?;
                if kind == SnapshotKind::Active {
                    builder.mode(PRIVATE_DIR).create(layout.snapshot_work(row.id)).map_err(Error::io(context))?;
                }
                Ok(Created::Mounts(mounts_of(&layout, &row, &lowers)))
            })
            .await
    }

    /// Deletes a trashed snapshot directory, outside any transaction; a failure is only
    /// logged (the collector deletes trash).
    async fn delete_trash(trash: Option<PathBuf>) {
        if let Some(trash) = trash {
            let context = format!("deleting {}", trash.display());
            if let Err(e) = blocking(move || remove_all(&trash).map_err(Error::io(context))).await {
                tracing::warn!(error = %e.chain(), "leaving a removed snapshot's files behind");
            }
        }
    }

    /// Commits the active snapshot `key` as `name`; the committed snapshot gets `labels`
    /// (containerd's `Commit` options), or keeps the active snapshot's when `None`.
    pub(crate) async fn commit_labeled(
        &self,
        name: &str,
        key: &str,
        lease: &LeaseId,
        labels: Option<Labels>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a snapshot name must not be empty".into()));
        }
        self.sync_before_commit(key).await?;
        let (layout, name, key, lease) = (self.layout.clone(), name.to_owned(), key.to_owned(), lease.clone());
        let trash = self
            .db
            .write(move |tx| {
                add_resource(tx, &lease, Resource::Snapshot, &name)?;
                let row = require(tx, &key)?;
                if row.kind != SnapshotKind::Active {
                    return Err(Error::FailedPrecondition(format!("snapshot {key} is not active")));
                }
                let mut trash = None;
                if let Some(existing) = get(tx, &name)? {
                    let Some(why) = damage(tx, &layout, &existing)? else {
                        return Err(Error::AlreadyExists(format!("snapshot {name}")));
                    };
                    // Unusable: this commit takes its place (see the module docs).
                    tracing::warn!(
                        snapshot = name,
                        "replacing a snapshot that was damaged behind pullbox's back: {why}"
                    );
                    tx.execute("DELETE FROM snapshots WHERE id = ?1", [existing.id])?;
                    trash = move_to_trash(&layout, &layout.snapshot(existing.id))
                        .map_err(Error::io(format!("replacing snapshot {name}")))?;
                }
                let labels = serde_json::to_string(labels.as_ref().unwrap_or(&row.labels))?;
                tx.execute(
                    "UPDATE snapshots SET key = ?1, kind = ?2, labels = ?3, updated_at = ?4 WHERE id = ?5",
                    params![name, kind_str(SnapshotKind::Committed), labels, now_nanos() as i64, row.id],
                )?;
                drop_resource(tx, Resource::Snapshot, &key)?;
                Ok(trash)
            })
            .await?;
        Self::delete_trash(trash).await;
        Ok(())
    }
}

#[async_trait]
impl Snapshotter for Snapshots {
    fn name(&self) -> &str {
        NAME
    }

    async fn prepare(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>> {
        self.create(key, parent, SnapshotKind::Active, lease, &Labels::new()).await
    }

    async fn view(&self, key: &str, parent: &str, lease: &LeaseId) -> Result<Vec<Mount>> {
        self.create(key, parent, SnapshotKind::View, lease, &Labels::new()).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (layout, key) = (self.layout.clone(), key.to_owned());
        self.db
            .read(move |conn| {
                let row = require(conn, &key)?;
                if row.kind == SnapshotKind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {key} is committed: only active snapshots and views have mounts"
                    )));
                }
                Ok(mounts_of(&layout, &row, &chain(conn, &layout, &row.parent)?))
            })
            .await
    }

    async fn commit(&self, name: &str, key: &str, lease: &LeaseId) -> Result<()> {
        self.commit_labeled(name, key, lease, None).await
    }

    async fn stat(&self, key: &str) -> Result<SnapshotInfo> {
        let deadline = Instant::now() + STAT_WAIT_LIMIT;
        let mut announced = false;
        loop {
            let (layout, name) = (self.layout.clone(), key.to_owned());
            let look = self.db.read(move |conn| look(conn, &layout, &name, &mut Seen::default())).await?;
            match look {
                Look::Pending(active) if Instant::now() < deadline => {
                    if !announced {
                        tracing::info!(
                            snapshot = key,
                            active,
                            "another pull is unpacking this snapshot; waiting for it"
                        );
                        announced = true;
                    }
                    tokio::time::sleep(WAIT_POLL).await;
                }
                look => return settled(key, look),
            }
        }
    }

    /// One database read (one task on the blocking pool) looks at every key, reading shared
    /// ancestors once; only a key that another pull is unpacking right now is then waited for
    /// on its own, as `stat` does.
    async fn stats(&self, keys: &[String]) -> Result<Vec<Result<SnapshotInfo>>> {
        let (layout, names) = (self.layout.clone(), keys.to_vec());
        let looks = self
            .db
            .read(move |conn| {
                let mut seen = Seen::default();
                Ok(names.iter().map(|name| look(conn, &layout, name, &mut seen)).collect::<Vec<_>>())
            })
            .await?;
        let mut answers = Vec::with_capacity(looks.len());
        for (key, look) in keys.iter().zip(looks) {
            answers.push(match look {
                Ok(Look::Pending(_)) => self.stat(key).await,
                Ok(look) => settled(key, look),
                Err(e) => Err(e),
            });
        }
        Ok(answers)
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let (layout, key) = (self.layout.clone(), key.to_owned());
        let trash = self
            .db
            .write(move |tx| {
                let row = require(tx, &key)?;
                let children: i64 =
                    tx.query_row("SELECT COUNT(*) FROM snapshots WHERE parent = ?1", [&key], |r| r.get(0))?;
                if children > 0 {
                    return Err(Error::FailedPrecondition(format!("snapshot {key} has {children} children")));
                }
                tx.execute("DELETE FROM snapshots WHERE id = ?1", [row.id])?;
                drop_resource(tx, Resource::Snapshot, &key)?;
                move_to_trash(&layout, &layout.snapshot(row.id)).map_err(Error::io(format!("removing snapshot {key}")))
            })
            .await?;
        // The row is gone; should deleting the files fail, the collector deletes them later.
        Self::delete_trash(trash).await;
        Ok(())
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let key = key.to_owned();
        let row = self
            .db
            .read({
                let key = key.clone();
                move |conn| require(conn, &key)
            })
            .await?;
        let fs = self.layout.snapshot_fs(row.id);
        blocking(move || disk_usage(&fs).map_err(Error::io(format!("measuring snapshot {key}")))).await
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::backend::{embedded::open, Backend};

    async fn setup() -> (tempfile::TempDir, Backend, LeaseId, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path()).unwrap();
        let lease = backend.leases.create().await.unwrap();
        let snapshots = dir.path().canonicalize().unwrap().join("snapshots");
        (dir, backend, lease, snapshots)
    }

    fn fs_of(snapshots: &Path, id: i64) -> String {
        snapshots.join(id.to_string()).join("fs").display().to_string()
    }

    #[tokio::test]
    async fn commit_with_sync_fs() {
        let dir = tempfile::tempdir().unwrap();
        let b = crate::backend::embedded::open_with(
            dir.path(),
            crate::backend::embedded::Options { sync_fs: true, ..Default::default() },
        )
        .unwrap();
        let lease = b.leases.create().await.unwrap();
        let m = b.snapshots.prepare("extract-1", "", &lease).await.unwrap();
        fs::write(Path::new(&m[0].source).join("file"), b"durable").unwrap();
        b.snapshots.commit("layer", "extract-1", &lease).await.unwrap();
        assert_eq!(b.snapshots.stat("layer").await.unwrap().kind, SnapshotKind::Committed);
        assert!(matches!(b.snapshots.commit("other", "extract-2", &lease).await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn prepare_commit_view_remove() {
        let (_dir, b, lease, snaps) = setup().await;
        let s = &b.snapshots;
        assert_eq!(s.name(), "overlayfs");

        // A base layer: a read-write bind mount of its own directory.
        let m = s.prepare("extract-1", "", &lease).await.unwrap();
        assert_eq!(
            m,
            vec![Mount { kind: "bind".into(), source: fs_of(&snaps, 1), options: vec!["rw".into(), "rbind".into()] }]
        );
        assert!(snaps.join("1/work").is_dir());
        assert_eq!(s.mounts("extract-1").await.unwrap(), m);
        fs::write(snaps.join("1/fs/hello"), b"hi").unwrap();
        assert!(matches!(s.prepare("extract-1", "", &lease).await, Err(Error::AlreadyExists(_))));
        assert!(matches!(s.prepare("x", "extract-1", &lease).await, Err(Error::FailedPrecondition(_))));
        assert!(matches!(s.prepare("x", "nope", &lease).await, Err(Error::NotFound(_))));

        s.commit("base", "extract-1", &lease).await.unwrap();
        assert!(matches!(s.stat("extract-1").await, Err(Error::NotFound(_))));
        let info = s.stat("base").await.unwrap();
        assert_eq!((info.name.as_str(), info.parent.as_str(), info.kind), ("base", "", SnapshotKind::Committed));
        assert!(matches!(s.mounts("base").await, Err(Error::FailedPrecondition(_))));

        // A second layer: overlay with the base below.
        let m = s.prepare("extract-2", "base", &lease).await.unwrap();
        let upper = fs_of(&snaps, 2);
        assert_eq!(
            m,
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", snaps.join("2/work").display()),
                    format!("upperdir={upper}"),
                    format!("lowerdir={}", fs_of(&snaps, 1)),
                ],
            }]
        );
        s.prepare("other", "", &lease).await.unwrap();
        assert!(matches!(s.commit("base", "other", &lease).await, Err(Error::AlreadyExists(_))));
        s.commit("top", "extract-2", &lease).await.unwrap();
        assert_eq!(s.stat("top").await.unwrap().parent, "base");

        // Views: one parent is a read-only bind, more are a lowerdir-only overlay.
        let m = s.view("v-base", "base", &lease).await.unwrap();
        assert_eq!(
            m,
            vec![Mount { kind: "bind".into(), source: fs_of(&snaps, 1), options: vec!["ro".into(), "rbind".into()] }]
        );
        let m = s.view("v-top", "top", &lease).await.unwrap();
        assert_eq!(
            m,
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}:{}", fs_of(&snaps, 2), fs_of(&snaps, 1))],
            }]
        );
        assert_eq!(s.stat("v-top").await.unwrap().kind, SnapshotKind::View);
        assert!(matches!(s.commit("x", "v-top", &lease).await, Err(Error::FailedPrecondition(_))));

        // Removal: refused while children exist; children first.
        assert!(matches!(s.remove("base").await, Err(Error::FailedPrecondition(_))));
        for key in ["v-base", "v-top", "top", "base"] {
            s.remove(key).await.unwrap();
        }
        assert!(matches!(s.remove("base").await, Err(Error::NotFound(_))));
        let left: Vec<_> = fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().file_name()).collect();
        // Only "other" (id 3) remains.
        assert_eq!(left, vec![std::ffi::OsString::from("3")]);
    }

    #[tokio::test]
    async fn a_second_unpack_of_a_layer_waits_for_the_first() {
        let (_dir, b, first, _) = setup().await;
        let second = b.leases.create().await.unwrap();
        let hex = "ab".repeat(32);
        let (key, name) = (format!("extract-{hex}"), format!("sha256:{hex}"));
        b.snapshots.prepare(&key, "", &first).await.unwrap();

        // The other pull checks for the layer (waits), or prepares the same key (waits).
        let stat = tokio::spawn({
            let (s, name) = (b.snapshots.clone(), name.clone());
            async move { s.stat(&name).await }
        });
        let prepare = tokio::spawn({
            let (s, key, lease) = (b.snapshots.clone(), key.clone(), second.clone());
            async move { s.prepare(&key, "", &lease).await }
        });
        tokio::time::sleep(WAIT_POLL * 3).await;
        assert!(!stat.is_finished() && !prepare.is_finished(), "both must wait for the first unpack");
        // This lease's own active snapshot is stale: `AlreadyExists`, no wait.
        assert!(matches!(b.snapshots.prepare(&key, "", &first).await, Err(Error::AlreadyExists(_))));

        b.snapshots.commit(&name, &key, &first).await.unwrap();
        let info = stat.await.unwrap().unwrap();
        assert_eq!((info.name.as_str(), info.kind), (name.as_str(), SnapshotKind::Committed));
        prepare.await.unwrap().unwrap();
        assert_eq!(b.snapshots.stat(&key).await.unwrap().kind, SnapshotKind::Active);
        assert!(matches!(b.snapshots.commit(&name, &key, &second).await, Err(Error::AlreadyExists(_))));
        b.snapshots.remove(&key).await.unwrap();
    }

    #[tokio::test]
    async fn a_dead_pulls_active_snapshot_is_stale_at_once() {
        let (dir, b, lease, _) = setup().await;
        b.snapshots.prepare("extract-x", "", &lease).await.unwrap();
        let db = Connection::open(dir.path().join("metadata.db")).unwrap();
        db.execute("UPDATE leases SET start_time = start_time + 1 WHERE id = ?1", [&lease.0]).unwrap();
        let next = b.leases.create().await.unwrap();
        // Creating `next` collected the dead lease's snapshot; make another stale one by hand.
        assert!(matches!(b.snapshots.stat("extract-x").await, Err(Error::NotFound(_))));
        let dead = LeaseId("pullbox-dead".into());
        db.execute(
            "INSERT INTO leases (id, pid, start_time, boot_id, created_at) VALUES (?1, 1, 1, 'gone', 0)",
            [&dead.0],
        )
        .unwrap();
        b.snapshots.prepare("extract-y", "", &next).await.unwrap();
        db.execute("UPDATE lease_resources SET lease = ?1 WHERE key = 'extract-y'", [&dead.0]).unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(b.snapshots.prepare("extract-y", "", &next).await, Err(Error::AlreadyExists(_))));
        assert!(started.elapsed() < WAIT_POLL, "no waiting for a dead pull");
    }

    #[tokio::test]
    async fn snapshots_removed_behind_our_back_are_not_found_and_replaced() {
        let (_dir, b, lease, snaps) = setup().await;
        let s = &b.snapshots;
        s.prepare("x1", "", &lease).await.unwrap();
        s.commit("base", "x1", &lease).await.unwrap();
        s.prepare("x2", "base", &lease).await.unwrap();
        s.commit("top", "x2", &lease).await.unwrap();
        let base_dir = snaps.join("1");
        fs::remove_dir_all(&base_dir).unwrap();

        for key in ["base", "top"] {
            let err = s.stat(key).await.unwrap_err();
            assert!(matches!(&err, Error::NotFound(m) if m.contains("unusable")), "{key}: {err}");
        }
        assert!(matches!(s.view("v", "top", &lease).await, Err(Error::FailedPrecondition(_))));
        assert!(matches!(s.prepare("x3", "base", &lease).await, Err(Error::FailedPrecondition(_))));

        // A pull unpacks the layer again and commits it under the same name: it replaces the
        // damaged snapshot, and the child works again.
        let m = s.prepare("x1", "", &lease).await.unwrap();
        fs::write(PathBuf::from(&m[0].source).join("f"), b"again").unwrap();
        s.commit("base", "x1", &lease).await.unwrap();
        assert_eq!(s.stat("base").await.unwrap().kind, SnapshotKind::Committed);
        assert_eq!(s.stat("top").await.unwrap().parent, "base");
        let m = s.view("v", "top", &lease).await.unwrap();
        assert_eq!(m[0].options, vec![format!("lowerdir={}:{}", fs_of(&snaps, 2), fs_of(&snaps, 3))]);
        assert!(!snaps.join("1").exists());
        // An intact snapshot is never replaced.
        s.prepare("x4", "", &lease).await.unwrap();
        assert!(matches!(s.commit("base", "x4", &lease).await, Err(Error::AlreadyExists(_))));
    }

    #[tokio::test]
    async fn stats_answer_each_key_as_stat_does() {
        let (_dir, b, lease, snaps) = setup().await;
        let s = &b.snapshots;
        // base <- mid <- top, and base2 <- other: then mid's directory goes.
        s.prepare("x1", "", &lease).await.unwrap();
        s.commit("base", "x1", &lease).await.unwrap();
        s.prepare("x2", "base", &lease).await.unwrap();
        s.commit("mid", "x2", &lease).await.unwrap();
        s.prepare("x3", "mid", &lease).await.unwrap();
        s.commit("top", "x3", &lease).await.unwrap();
        s.prepare("x4", "", &lease).await.unwrap();
        s.commit("base2", "x4", &lease).await.unwrap();
        s.prepare("other", "base2", &lease).await.unwrap();
        fs::remove_dir_all(snaps.join("2")).unwrap();

        let keys: Vec<String> =
            ["top", "base", "mid", "missing", "other", "top", "base2", ""].iter().map(|k| k.to_string()).collect();
        let stats = s.stats(&keys).await.unwrap();
        assert_eq!(stats.len(), keys.len());
        for (key, got) in keys.iter().zip(&stats) {
            let want = s.stat(key).await;
            assert_eq!(got.as_ref().map_err(|e| e.to_string()), want.as_ref().map_err(|e| e.to_string()), "{key}");
        }
        assert_eq!(stats[1].as_ref().unwrap().kind, SnapshotKind::Committed);
        assert_eq!(stats[4].as_ref().unwrap().kind, SnapshotKind::Active);
        for i in [0, 2, 5] {
            assert!(matches!(&stats[i], Err(Error::NotFound(m)) if m.contains("unusable")), "{:?}", stats[i]);
        }
        assert!(matches!(&stats[3], Err(Error::NotFound(_))));
        assert!(s.stats(&[]).await.unwrap().is_empty());
    }

    #[test]
    fn recognizes_unpack_keys() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(unpack_target(&format!("extract-{hex}")), Some(format!("sha256:{hex}")));
        assert_eq!(unpack_target(&format!("extract-123-abc sha256:{hex}")), Some(format!("sha256:{hex}")));
        assert_eq!(unpack_target("extract-short"), None);
        assert_eq!(unpack_target("pullbox-mount-1"), None);
        assert_eq!(unpack_target(&format!("k8s.io/12/extract-123-abc sha256:{hex}")), None);
    }

    #[tokio::test]
    async fn usage_counts_hardlinks_once() {
        let (_dir, b, lease, snaps) = setup().await;
        b.snapshots.prepare("k", "", &lease).await.unwrap();
        let fs_dir = snaps.join("1/fs");
        fs::write(fs_dir.join("a"), vec![7u8; 10_000]).unwrap();
        fs::hard_link(fs_dir.join("a"), fs_dir.join("b")).unwrap();
        fs::create_dir(fs_dir.join("d")).unwrap();
        let u = b.snapshots.usage("k").await.unwrap();
        // fs itself, a (= b), d.
        assert_eq!(u.inodes, 3);
        assert!(u.size >= 10_000, "{u:?}");
        assert!(matches!(b.snapshots.usage("nope").await, Err(Error::NotFound(_))));
    }
}
