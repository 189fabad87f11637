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
//! - [`PRIVATE_DIR`], [`PRIVATE_FILE`], [`create_private_dir`], [`write_private`],
//!   [`restrict`]: the store's own directories and files are the owner's alone (the daemon's:
//!   root). Layer contents inside snapshots keep the modes the image gives them.

use std::{
    collections::HashSet,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use rustix::fs::{flock, FlockOperation};

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
    let mut stack = vec![path.to_path_buf()];
    let skip = |e: io::Error| if lenient { Ok(()) } else { Err(e) };
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) => {
                skip(e)?;
                continue;
            }
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += meta.blocks() * 512;
        if meta.is_dir() {
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) => {
                    skip(e)?;
                    continue;
                }
            };
            for entry in entries {
                match entry {
                    Ok(entry) => stack.push(entry.path()),
                    Err(e) => skip(e)?,
                }
            }
        }
    }
    Ok(usage)
}

/// Removes a file or a whole tree (std's removal never follows symlinks); absent is fine.
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
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
