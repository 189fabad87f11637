//! The embedded backend: every store on local disk under one root directory, nothing else to
//! run.
//!
//! The layout follows containerd's content store and its overlayfs snapshotter, so the tree is
//! familiar to anyone who has looked inside `/var/lib/containerd`:
//!
//! ```text
//! <root>/content/blobs/<alg>/<hex>                 committed blobs             (content)
//! <root>/content/ingest/<sha256(ref)>/{data,ref,total,lock}
//!                                                  writes in progress, resumable
//! <root>/snapshots/<id>/fs, <root>/snapshots/<id>/work
//!                                                  one directory per snapshot  (snapshots)
//! <root>/staging/<uuid>/{fs,lock}                  layers unpacked while they
//!                                                  download                    (stage)
//! <root>/metadata.db                               SQLite: images, content labels,
//!                                                  snapshots, leases           (db)
//! <root>/mounts/<sha256(dir)>.json                 `pullbox mount` records (the CLI's)
//! <root>/reserve                                   disk space held back for a full
//!                                                  disk                        (fsutil)
//! <root>/cache/                                    compiled pullers (the engine's)
//! ```
//!
//! The root is `0700` and everything of pullbox's own under it (directories `0700`, files
//! `0600`: blobs, ingests, locks, the database, records) is its owner's alone, as containerd
//! keeps its root (CVE-2021-41103): snapshots hold image files with their setuid bits and
//! owners, and blobs may hold private images. Layer contents inside a snapshot's `fs` keep the
//! image's modes. A store made by an older pullbox (a root open to others) is tightened when
//! it is opened: once, since the root's mode then says it is done.
//!
//! [`open`] returns a [`Backend`] made of: [`content::Content`] (content store and writers),
//! [`snapshots::Snapshots`] (the `overlayfs` snapshotter), [`pipeline::Applier`] (the layer
//! applier, [`differ`], which uses [`unpack`] for the hostile-archive-safe tar extraction, and
//! unpacks layers while they download with [`stage::Staging`]),
//! [`images::Images`] and [`leases::LeaseManager`] (leases, and garbage collection in [`gc`]).
//!
//! The modules import only downward, from the ground up:
//!
//! ```text
//! fsutil, archive                 files, locks, disk usage; the tar reader
//! unpack, db                      hostile-archive-safe extraction; the metadata database
//! content, images, snapshots      the stores (lease owners: crate::backend::owner)
//! pipeline                        what differ and stage share: Applier, layer_stream, ...
//! stage, differ                   unpack while downloading; apply from the stored blob
//! gc                              mark and sweep over the stores
//! leases                          leases; creating one collects what dead owners left
//! proxy                           containerd's snapshots in this store
//! ```
//!
//! Several processes (the daemon and CLI invocations) may use one root at once: the database
//! serializes their writes, and every decision that could race with another process (is this
//! blob still referenced? is this directory an orphan?) is taken inside a database write
//! transaction. Every blocking filesystem or database call runs on tokio's blocking pool
//! through [`blocking`]. Two pulls that need the same blob or layer, in one process or two,
//! do the work once: the second writer of a blob waits for the first ([`content`]), and the
//! second unpack of a layer waits for the first ([`snapshots`]).
//!
//! Crashes: what a killed pull wrote is held by its lease, whose owner process is gone; the
//! next lease created (the next pull) or `pullbox gc` collects it ([`leases`], [`gc`]).
//! Content or snapshots removed behind pullbox's back read as absent, so the image is not
//! READY and a pull writes them again ([`snapshots`]).

mod archive;
mod content;
mod db;
mod differ;
mod fsutil;
mod gc;
mod images;
mod leases;
mod pipeline;
pub mod proxy;
mod snapshots;
mod stage;
mod unpack;

use std::{
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    backend::Backend,
    error::{Error, Result},
    oci::{Algorithm, Digest},
};

/// Opens (creating if needed) the embedded backend rooted at `root`.
///
/// This creates the directory layout and the database schema; it blocks briefly (and up to the
/// database's busy timeout if another process is migrating the same root), so call it at
/// start-up or from a blocking context.
///
/// `root` is made absolute (symlinks resolved). It must be valid UTF-8 without `,` or `:`:
/// its subdirectories become overlay mount options, where those characters are separators.
pub fn open(root: &Path) -> Result<Backend> {
    open_with(root, Options::default())
}

/// How the embedded backend writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Flush each snapshot's filesystem (one `syncfs`) before committing it, so a committed
    /// snapshot survives a power loss (containerd CRI's `image_pull_with_sync_fs`; off by
    /// default, as there). Blobs are always fsynced when committed.
    pub sync_fs: bool,
    /// The cap on one layer's uncompressed size, in bytes (default
    /// [`DEFAULT_MAX_LAYER_BYTES`]); a layer past it is refused as resource exhaustion.
    pub max_layer_bytes: u64,
}

pub use pipeline::DEFAULT_MAX_LAYER_BYTES;

impl Default for Options {
    fn default() -> Options {
        Options { sync_fs: false, max_layer_bytes: DEFAULT_MAX_LAYER_BYTES }
    }
}

/// [`open`] with `options`.
pub fn open_with(root: &Path, options: Options) -> Result<Backend> {
    let layout = Layout::create(root)?;
    let db = db::Db::open(&layout.db(), fsutil::Reserve::new(layout.reserve()))?;
    Ok(Backend {
        content: Arc::new(content::Content::new(layout.clone(), db.clone())),
        snapshots: Arc::new(snapshots::Snapshots::new(layout.clone(), db.clone(), options.sync_fs)),
        other_snapshotters: Vec::new(),
        differ: Arc::new(pipeline::Applier::new(layout.clone(), db.clone(), options.max_layer_bytes)),
        images: Arc::new(images::Images::new(db.clone())),
        leases: Arc::new(leases::LeaseManager::new(layout, db)),
    })
}

/// Where everything lives under the root. All paths derive from one canonical, absolute root,
/// so the mounts handed out and the upper directories handed back can be compared directly.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates the directory tree under `root` (tightening an older store's modes) and returns
    /// its layout.
    fn create(root: &Path) -> Result<Layout> {
        let shown = root.display().to_string();
        std::fs::create_dir_all(root).map_err(Error::io(format!("creating {shown}")))?;
        let root = root.canonicalize().map_err(Error::io(format!("resolving {shown}")))?;
        match root.to_str() {
            Some(s) if !s.contains([',', ':']) => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "storage root {shown:?} must be UTF-8 without ',' or ':' (it becomes overlay mount options)"
                )))
            }
        }
        let layout = Layout { root };
        let restricting = |path: &Path| Error::io(format!("restricting {}", path.display()));
        let open_to_others = std::fs::metadata(&layout.root).map_err(restricting(&layout.root))?.mode() & 0o077 != 0;
        std::fs::set_permissions(&layout.root, std::fs::Permissions::from_mode(fsutil::PRIVATE_DIR))
            .map_err(restricting(&layout.root))?;
        let blobs = ALGORITHMS.map(|alg| layout.blobs(alg));
        for dir in blobs.iter().chain([&layout.ingests(), &layout.snapshots(), &layout.staging()]) {
            fsutil::create_private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        }
        // SQLite creates its WAL and shared-memory files with the database's mode.
        let db = layout.db();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(fsutil::PRIVATE_FILE)
            .open(&db)
            .map_err(Error::io(format!("creating {}", db.display())))?;
        if open_to_others {
            layout.restrict_own().map_err(restricting(&layout.root))?;
        }
        Ok(layout)
    }

    /// Takes group and other permissions away from everything of pullbox's own under the root
    /// (not from layer contents: a snapshot's or staged layer's `fs`).
    fn restrict_own(&self) -> std::io::Result<()> {
        for name in ["content", "metadata.db", "metadata.db-wal", "metadata.db-shm", "mounts", "cache"] {
            match fsutil::restrict_tree(&self.root.join(name)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        for dir in [self.snapshots(), self.staging()] {
            fsutil::restrict(&dir)?;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?.path();
                fsutil::restrict(&entry)?;
                if entry.is_dir() {
                    for own in std::fs::read_dir(&entry)? {
                        let own = own?;
                        if own.file_name() != "fs" {
                            fsutil::restrict_tree(&own.path())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn db(&self) -> PathBuf {
        self.root.join("metadata.db")
    }

    /// Disk space held back for the metadata database (see [`fsutil::Reserve`]).
    fn reserve(&self) -> PathBuf {
        self.root.join("reserve")
    }

    /// The directory of committed blobs of one algorithm.
    fn blobs(&self, alg: Algorithm) -> PathBuf {
        self.root.join("content/blobs").join(algorithm_name(alg))
    }

    /// The file of a committed blob. Safe as a path: a [`Digest`] is validated hex.
    fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs(digest.algorithm()).join(digest.hex())
    }

    fn ingests(&self) -> PathBuf {
        self.root.join("content/ingest")
    }

    /// The directory of the ingest `reference`: named by the reference's sha256, as containerd
    /// does, so any reference string is a safe directory name.
    fn ingest(&self, reference: &str) -> PathBuf {
        self.ingests().join(ingest_dir_name(reference))
    }

    fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn snapshot(&self, id: i64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }

    /// The snapshot's own layer: a bind mount's source, an overlay's upper or lower dir.
    fn snapshot_fs(&self, id: i64) -> PathBuf {
        self.snapshot(id).join("fs")
    }

    /// Layers unpacked while they download, before their snapshots exist (see [`stage`]).
    fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The overlay work directory of an active snapshot.
    fn snapshot_work(&self, id: i64) -> PathBuf {
        self.snapshot(id).join("work")
    }

    /// A fresh name to move a doomed snapshot directory to, inside a transaction, before
    /// deleting it outside: renaming is instant, deleting a tree is not. The name is unique
    /// (ids can repeat after a rolled-back transaction) and never numeric, so a leftover is an
    /// orphan the collector removes.
    fn snapshot_trash(&self) -> PathBuf {
        self.snapshots().join(format!("{TRASH_PREFIX}{}", uuid::Uuid::new_v4().simple()))
    }
}

/// The algorithms the content store keeps blobs of.
const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

/// An algorithm's name, as in digests and blob directories.
fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::Sha256 => "sha256",
        Algorithm::Sha512 => "sha512",
    }
}

/// The name prefix of snapshot directories being deleted.
const TRASH_PREFIX: &str = "rm-";

/// The directory name of an ingest reference.
fn ingest_dir_name(reference: &str) -> String {
    Digest::sha256_of(reference.as_bytes()).hex().to_owned()
}

/// The disk use of the tree at `root` (a store's root: the image filesystem that CRI's
/// `ImageFsInfo` reports) while others change it: entries that vanish or cannot be read are
/// skipped, so the answer is never an error.
pub fn image_fs_usage(root: &Path) -> crate::backend::Usage {
    fsutil::disk_usage_lenient(root)
}

/// Runs blocking filesystem or database work on tokio's blocking pool. A panic in `f` is
/// resumed in the caller, as if `f` had run inline.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(Error::Cancelled(format!("storage task cancelled: {e}"))),
        },
    }
}

/// Nanoseconds since the Unix epoch, as stored in records.
fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
