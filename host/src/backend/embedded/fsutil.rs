//! Small filesystem helpers shared by the embedded stores (all blocking; call them from the
//! blocking pool).
//!
//! - [`FileLock`]: an exclusive `flock(2)` on a lock file, which the kernel releases when the
//!   holder dies, so a killed pull never leaves a stale lock behind.
//! - [`disk_usage`]: bytes allocated and inodes of a tree, hardlinks counted once, as
//!   containerd's `fs.DiskUsage` computes them (allocated 512-byte blocks, not apparent size,
//!   because the question is "how much disk does this use"); [`disk_usage_lenient`] for a
//!   tree that changes while it is walked (the CRI's `ImageFsInfo`).
//! - [`sync_dir`]: makes a rename durable.
//! - [`remove_all`] / [`remove_at`]: delete a tree of any depth and width with one directory
//!   descriptor open at a time and no recursion (std's `remove_dir_all` recurses, holding a
//!   descriptor and a stack frame per level: a 20,000-level tree from a hostile layer, or
//!   from a container writing into its upper directory, overflowed the stack or ran out of
//!   descriptors, and every later collection died on it). [`disk_usage`] walks the same way.
//! - [`Reserve`]: space held back on the store's filesystem so that the metadata database can
//!   still write (open, delete a failed pull's lease, collect garbage) when the disk is full.
//! - [`PRIVATE_DIR`], [`PRIVATE_FILE`], [`create_private_dir`], [`write_private`],
//!   [`restrict`]: the store's own directories and files are the owner's alone (the daemon's:
//!   root). Layer contents inside snapshots keep the modes the image gives them.

use std::{
    collections::HashSet,
    ffi::{OsStr, OsString},
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{
            ffi::OsStringExt,
            fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
        },
    },
    path::Path,
};

use rustix::{
    fs::{self as rfs, flock, AtFlags, FileType, FlockOperation, Mode, OFlags, Stat},
    io::Errno,
};

use crate::backend::Usage;

/// The mode of the store's own directories: the owner's alone.
pub(crate) const PRIVATE_DIR: u32 = 0o700;

/// The mode of the store's own files (blobs, ingests, locks, the database, records).
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` and its missing parents with [`PRIVATE_DIR`].
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(dir)
}

/// Writes `path` (created with [`PRIVATE_FILE`], or truncated).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(PRIVATE_FILE).open(path)?.write_all(bytes)
}

/// Takes group and other permissions away from `path` (not following a symlink).
pub(crate) fn restrict(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    let mode = md.mode() & 0o7777;
    if md.file_type().is_symlink() || mode & 0o077 == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o077))
}

/// [`restrict`] on `path` and, for a directory, everything under it.
pub(crate) fn restrict_tree(path: &Path) -> io::Result<()> {
    restrict(path)?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            restrict_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock on `path` (creating the file) without waiting; `None` when another
    /// holder has it. When the file is unlinked while we wait for it (a holder finishing an
    /// ingest removes its directory), the lock we got would be on a dead inode, so it is
    /// dropped and `NotFound` returned: the caller recreates the directory and tries again.
    pub(crate) fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(PRIVATE_FILE).open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let held = file.metadata()?;
        let current = fs::symlink_metadata(path)?;
        if (held.dev(), held.ino()) != (current.dev(), current.ino()) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "lock file replaced while waiting"));
        }
        Ok(Some(FileLock { _file: file }))
    }
}

/// The disk use of `path` (a file or a whole tree), without following symlinks.
pub(crate) fn disk_usage(path: &Path) -> io::Result<Usage> {
    walk_usage(path, false)
}

/// [`disk_usage`] of a tree that others change meanwhile (the daemon's whole root, for CRI's
/// `ImageFsInfo`, while pulls and collections run): entries that vanish or cannot be read
/// are skipped instead of failing the walk.
pub(crate) fn disk_usage_lenient(path: &Path) -> Usage {
    walk_usage(path, true).unwrap_or_default()
}

fn walk_usage(path: &Path, lenient: bool) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut count = |st: &Stat| {
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        #[allow(clippy::unnecessary_cast)]
        if st.st_nlink > 1 && !is_dir && !seen.insert((st.st_dev as u64, st.st_ino as u64)) {
            return;
        }
        usage.inodes += 1;
        usage.size += st.st_blocks as u64 * 512;
    };
    let st = rfs::lstat(path)?;
    count(&st);
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(usage);
    }
    let top = rfs::open(path, DIR_FLAGS, Mode::empty())?;
    let visit = |_: BorrowedFd<'_>, _: &OsStr, st: io::Result<Stat>| {
        match st {
            Ok(st) => count(&st),
            Err(e) if lenient => drop(e),
            Err(e) => return Err(e),
        }
        Ok(Visit::Descend)
    };
    walk(top, visit, |_, _| Ok(()), lenient)?;
    Ok(usage)
}

/// Opening a directory during a walk: never follow a symlink, never leak the fd to children.
const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// What [`walk`] does after visiting an entry.
enum Visit {
    /// Go into it, if it is a directory.
    Descend,
    /// Nothing more (it was removed, say).
    Done,
}

/// One directory on the way down: its name in its parent, its identity (to check the way back
/// up), and the subdirectories of it still to visit.
struct Level {
    name: OsString,
    id: (u64, u64),
    pending: Vec<OsString>,
}

fn identity(st: &Stat) -> (u64, u64) {
    #[allow(clippy::unnecessary_cast)]
    (st.st_dev as u64, st.st_ino as u64)
}

/// Walks the tree below the open directory `top`, depth first, without recursion and with one
/// directory descriptor open at a time (plus `top`'s). `visit(dir, name, stat)` sees each entry
/// of a directory; for a subdirectory, [`Visit::Descend`] goes into it after its siblings, and
/// `leave(parent, name)` runs once everything below it was visited. The way back up is by
/// `..`, checked against the device and inode recorded on the way down: a tree moved while it
/// is walked ends the walk with an error rather than reaching outside it. With `lenient`,
/// directories that cannot be opened or read are skipped.
fn walk(
    top: OwnedFd,
    mut visit: impl FnMut(BorrowedFd<'_>, &OsStr, io::Result<Stat>) -> io::Result<Visit>,
    mut leave: impl FnMut(BorrowedFd<'_>, &OsStr) -> io::Result<()>,
    lenient: bool,
) -> io::Result<()> {
    let top_id = identity(&rfs::fstat(&top)?);
    let mut stack = vec![Level { name: OsString::new(), id: top_id, pending: Vec::new() }];
    let mut cur = rfs::openat(&top, ".", DIR_FLAGS, Mode::empty())?;
    let mut fresh = true;
    loop {
        if fresh {
            // First time in this directory: visit every entry, note the subdirectories.
            let mut pending = Vec::new();
            let names = match list(cur.as_fd()) {
                Ok(names) => names,
                Err(e) if lenient => {
                    drop(e);
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            for name in names {
                let st = rfs::statat(&cur, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from);
                let is_dir = matches!(&st, Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory);
                if let Visit::Descend = visit(cur.as_fd(), &name, st)? {
                    if is_dir {
                        pending.push(name);
                    }
                }
            }
            stack.last_mut().expect("the walk's own level").pending = pending;
        }
        let level = stack.last_mut().expect("the walk's own level");
        if let Some(child) = level.pending.pop() {
            match rfs::openat(&cur, &child, DIR_FLAGS, Mode::empty()) {
                Ok(next) => {
                    let id = identity(&rfs::fstat(&next)?);
                    stack.push(Level { name: child, id, pending: Vec::new() });
                    cur = next;
                    fresh = true;
                }
                Err(_) if lenient => fresh = false,
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // Everything below this directory is done: back up.
        let done = stack.pop().expect("the walk's own level");
        let Some(parent) = stack.last() else { return Ok(()) };
        let up = rfs::openat(&cur, "..", DIR_FLAGS, Mode::empty())?;
        if identity(&rfs::fstat(&up)?) != parent.id {
            return Err(io::Error::other("the tree was moved while it was walked"));
        }
        cur = up;
        fresh = false;
        leave(cur.as_fd(), &done.name)?;
    }
}

/// The names in the directory `dir`, without `.` and `..`.
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Removes a file or a whole tree without following symlinks; absent is fine.
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot remove {}", path.display())));
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let parent = match rfs::open(parent, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    match remove_at(parent.as_fd(), name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes `name` in `dir`: a file, or a tree of any depth (see [`walk`]), never following a
/// symlink.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rfs::unlinkat(dir, name, AtFlags::empty())?);
    }
    let top = rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
    walk(
        top,
        |dir, name, st| {
            let st = match st {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Visit::Done),
                Err(e) => return Err(e),
            };
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                return Ok(Visit::Descend);
            }
            match rfs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(Visit::Done),
                Err(e) => Err(e.into()),
            }
        },
        |parent, name| match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        },
        false,
    )?;
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Space held back on the store's filesystem: a file of [`Reserve::BYTES`] (`<root>/reserve`)
/// that is deleted when the disk is full, so that the metadata database can still write what
/// frees space (deleting a failed pull's lease, a collection) and can be opened at all (SQLite
/// allocates its shared-memory index when a process first opens the database). It is made
/// again when there is room for it with room to spare.
#[derive(Debug, Clone)]
pub(crate) struct Reserve {
    path: std::path::PathBuf,
}

impl Reserve {
    /// 8 MiB: a collection's transaction writes a few hundred KiB to SQLite's log; opening
    /// needs 32 KiB. Small next to any disk that holds images.
    pub(crate) const BYTES: u64 = 8 << 20;

    pub(crate) fn new(path: std::path::PathBuf) -> Reserve {
        Reserve { path }
    }

    /// Bytes this process may still write on the reserve's filesystem.
    fn free(&self) -> io::Result<u64> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let st = rfs::statvfs(dir)?;
        // Root may use the blocks the filesystem keeps back for it.
        let blocks = if rustix::process::geteuid().is_root() { st.f_bfree } else { st.f_bavail };
        Ok(blocks.saturating_mul(st.f_frsize))
    }

    /// Makes the reserve when it is missing and the disk has room for it four times over.
    /// Best effort: a failure leaves no partial file behind.
    pub(crate) fn ensure(&self) {
        if self.path.exists() || !self.free().is_ok_and(|free| free >= 4 * Self::BYTES) {
            return;
        }
        let tmp = self.path.with_extension(uuid::Uuid::new_v4().simple().to_string());
        let made = (|| -> io::Result<()> {
            let file = OpenOptions::new().write(true).create_new(true).mode(PRIVATE_FILE).open(&tmp)?;
            if rfs::fallocate(&file, rfs::FallocateFlags::empty(), 0, Self::BYTES).is_err() {
                // No fallocate here: write the zeros.
                let zeros = vec![0u8; 1 << 20];
                let mut file = &file;
                for _ in 0..Self::BYTES >> 20 {
                    io::Write::write_all(&mut file, &zeros)?;
                }
            }
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = made {
            tracing::debug!(reserve = %self.path.display(), "cannot make the disk-space reserve: {e}");
            let _ = fs::remove_file(&tmp);
        }
    }

    /// Deletes the reserve when the disk has less free space than the reserve's size; whether
    /// it did.
    pub(crate) fn release_if_full(&self) -> bool {
        if !self.free().is_ok_and(|free| free < Self::BYTES) {
            return false;
        }
        let released = fs::remove_file(&self.path).is_ok();
        if released {
            tracing::warn!(reserve = %self.path.display(), "the disk is full: releasing the space held back for the metadata database");
        }
        released
    }
}

/// Flushes everything written to the filesystem that holds `path` to disk: one `syncfs(2)`,
/// however many files a layer wrote.
pub(crate) fn sync_filesystem(path: &Path) -> io::Result<()> {
    rustix::fs::syncfs(File::open(path)?).map_err(io::Error::from)
}

/// Flushes a directory's entries (after a rename into it) to disk.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}
