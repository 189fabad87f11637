//! Looking at what the embedded store holds: `pullbox mount`ed root filesystems and the store's
//! own directories.
//!
//! Key items: [`Mounted`] (`pullbox mount IMAGE DIR` into a fresh directory, `pullbox unmount`
//! when dropped), [`compare_rootfs`] (names, types, modes, owners, link targets and contents
//! with [`crate::tree`], plus which names share an inode: hardlinks), [`Inventory`] (blobs,
//! snapshot directories, ingests and mount records under a store root) and [`find_named`]
//! (where a name turns up in a set of directories).
//!
//! Mounting needs root: tests that mount are `#[ignore = "needs root: ..."]` and call
//! [`require_root`] first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::oci::is_root;
use crate::process::Captured;
use crate::pullbox::Pullbox;
use crate::tree::{diff, scan};

/// Fails the calling test unless this process is root: a root-only test (ignored by default,
/// see the module docs) that an ordinary user runs with `--include-ignored` says why it fails.
#[track_caller]
pub fn require_root() {
    assert!(is_root(), "this test needs root (it mounts); run it as root, or leave out --include-ignored");
}

/// An image mounted with `pullbox mount`; unmounted with `pullbox unmount` when dropped.
#[derive(Debug)]
pub struct Mounted<'a> {
    pb: &'a Pullbox,
    dir: Option<tempfile::TempDir>,
}

impl<'a> Mounted<'a> {
    /// `pullbox mount IMAGE DIR` into a fresh directory; the command must succeed.
    pub fn new(pb: &'a Pullbox, image: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("pullbox-mnt-").tempdir()?;
        let out = pb.run("mount", [image, &dir.path().display().to_string()]);
        ensure!(out.success(), "pullbox mount failed:\n{out}");
        Ok(Mounted { pb, dir: Some(dir) })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// `pullbox unmount DIR`, returning what it printed.
    pub fn unmount(mut self) -> Captured {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> Captured {
        let dir = self.dir.take().unwrap();
        let out = self.pb.run("unmount", [dir.path()]);
        if !out.success() {
            // Never leave a mount behind a failed test; the directory then stays too.
            let _ = std::process::Command::new("umount").arg("-l").arg(dir.path()).status();
            let _ = dir.keep();
        }
        out
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.dir.is_some() {
            let out = self.unmount_now();
            if !out.success() && !std::thread::panicking() {
                panic!("pullbox unmount failed:\n{out}");
            }
        }
    }
}

/// The groups of two or more names (relative to `root`) that are one inode: hardlinks.
pub fn link_groups(root: &Path) -> Result<BTreeSet<Vec<PathBuf>>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(root.join(&rel))?;
            if meta.is_dir() {
                stack.push(rel);
            } else if meta.nlink() > 1 {
                by_inode.entry((meta.dev(), meta.ino())).or_default().push(rel);
            }
        }
    }
    Ok(by_inode
        .into_values()
        .filter(|names| names.len() > 1)
        .map(|mut names| {
            names.sort();
            names
        })
        .collect())
}

/// How `actual` differs from `expected` (one line each; empty when equal): every entry's
/// name, type, mode, owner, link target and contents, and which names are hardlinks.
pub fn compare_rootfs(expected: &Path, actual: &Path) -> Result<Vec<String>> {
    let mut lines = diff(&scan(expected)?, &scan(actual)?);
    let (want, got) = (link_groups(expected)?, link_groups(actual)?);
    for group in want.difference(&got) {
        lines.push(format!("hardlinks missing: {group:?}"));
    }
    for group in got.difference(&want) {
        lines.push(format!("unexpected hardlinks: {group:?}"));
    }
    Ok(lines)
}

/// What the store under a root holds on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// `sha256:<hex>` of every committed blob.
    pub blobs: BTreeSet<String>,
    /// The numeric ids of the snapshot directories.
    pub snapshots: BTreeSet<u64>,
    /// Other entries of `snapshots/` (trash being deleted, strays).
    pub snapshot_strays: BTreeSet<String>,
    /// The ingest directories (writes in progress or left by a killed pull).
    pub ingests: BTreeSet<String>,
    /// The `mounts/` records of `pullbox mount`.
    pub mounts: BTreeSet<String>,
    /// The `staging/` directories of layers unpacked while they downloaded.
    pub staging: BTreeSet<String>,
}

fn names(dir: &Path) -> Result<BTreeSet<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

impl Inventory {
    /// Looks at the store under `root`.
    pub fn of(root: &Path) -> Result<Inventory> {
        let mut inv = Inventory {
            blobs: names(&root.join("content/blobs/sha256"))?.into_iter().map(|h| format!("sha256:{h}")).collect(),
            ingests: names(&root.join("content/ingest"))?,
            mounts: names(&root.join("mounts"))?,
            staging: names(&root.join("staging"))?,
            ..Inventory::default()
        };
        for name in names(&root.join("snapshots"))? {
            match name.parse() {
                Ok(id) => {
                    inv.snapshots.insert(id);
                }
                Err(_) => {
                    inv.snapshot_strays.insert(name);
                }
            }
        }
        Ok(inv)
    }

    /// Whether nothing at all is stored.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
            && self.snapshots.is_empty()
            && self.snapshot_strays.is_empty()
            && self.ingests.is_empty()
            && self.mounts.is_empty()
            && self.staging.is_empty()
    }

    /// The bytes written to ingests so far.
    pub fn ingest_bytes(root: &Path) -> u64 {
        names(&root.join("content/ingest"))
            .unwrap_or_default()
            .iter()
            .filter_map(|i| fs::metadata(root.join("content/ingest").join(i).join("data")).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Every path under `dirs` (not recursing, and not following symlinks) whose name contains
/// `needle`.
pub fn find_named(dirs: &[&Path], needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in dirs {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().contains(needle) {
                    found.push(entry.path());
                }
            }
        }
    }
    found
}
