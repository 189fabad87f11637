//! Filesystem trees, to compare what pullbox unpacked with an independent unpacker.
//!
//! Key types: [`Node`] (what is at a path: type, mode, owner, a content hash for files),
//! [`Tree`] (path → node, relative to a root, the root itself left out), [`scan`],
//! [`merge_layers`] (the overlay view of a stack of snapshot directories, computed in user
//! space so that no mount is needed), [`entry_kinds`] and [`diff`].
//!
//! Modification times are not compared: appliers differ on directory mtimes and nothing in
//! the contract pins them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::oci::{file_digest, EntryKind};

/// What is at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        digest: String,
    },
    Symlink {
        target: PathBuf,
        uid: u32,
        gid: u32,
    },
    /// An overlay whiteout: a character device with device number 0:0.
    Whiteout,
    /// Any other device or a FIFO: the file type bits of the mode and the device number.
    Special {
        mode: u32,
        rdev: u64,
    },
}

/// Path (relative, root excluded) → node, sorted so parents come before children.
pub type Tree = BTreeMap<PathBuf, Node>;

/// Scans `root` recursively without following symlinks.
pub fn scan(root: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    scan_into(root, Path::new(""), &mut tree).with_context(|| format!("scanning {}", root.display()))?;
    Ok(tree)
}

fn scan_into(root: &Path, rel: &Path, tree: &mut Tree) -> Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let (mode, uid, gid) = (meta.mode() & 0o7777, meta.uid(), meta.gid());
        let node = if ft.is_dir() {
            Node::Dir { mode, uid, gid }
        } else if ft.is_file() {
            Node::File { mode, uid, gid, size: meta.len(), digest: file_digest(&path)? }
        } else if ft.is_symlink() {
            Node::Symlink { target: fs::read_link(&path)?, uid, gid }
        } else if ft.is_char_device() && meta.rdev() == 0 {
            Node::Whiteout
        } else {
            Node::Special { mode: meta.mode() & 0o170000, rdev: meta.rdev() }
        };
        let is_dir = ft.is_dir();
        tree.insert(rel.clone(), node);
        if is_dir {
            scan_into(root, &rel, tree)?;
        }
    }
    Ok(())
}

/// The non-directory entries of a snapshot tree, in the terms of
/// [`crate::oci::layer_entries`], so that a snapshot can be matched with the layer it holds.
pub fn entry_kinds(tree: &Tree) -> BTreeSet<(PathBuf, EntryKind)> {
    tree.iter()
        .filter_map(|(path, node)| {
            let kind = match node {
                Node::Dir { .. } => return None,
                Node::File { .. } => EntryKind::File,
                Node::Symlink { .. } => EntryKind::Symlink,
                Node::Whiteout => EntryKind::Whiteout,
                Node::Special { .. } => EntryKind::Other,
            };
            Some((path.clone(), kind))
        })
        .collect()
}

/// The merged (overlay) view of snapshot trees, lowest first: an upper entry replaces a lower
/// one (a non-directory replacing a directory hides its subtree) and a whiteout deletes the
/// path and everything below it. Opaque directories (`trusted.overlay.opaque`) are not
/// handled; the fixture has none.
pub fn merge_layers(layers: &[Tree]) -> Tree {
    let mut merged = Tree::new();
    for layer in layers {
        for (path, node) in layer {
            match node {
                Node::Whiteout => merged.retain(|p, _| !p.starts_with(path)),
                Node::Dir { .. } => {
                    if !matches!(merged.get(path), Some(Node::Dir { .. })) {
                        merged.retain(|p, _| !p.starts_with(path));
                    }
                    merged.insert(path.clone(), node.clone());
                }
                _ => {
                    merged.retain(|p, _| !p.starts_with(path));
                    merged.insert(path.clone(), node.clone());
                }
            }
        }
    }
    merged
}

/// The differences between two trees, one line each (empty when equal).
pub fn diff(expected: &Tree, actual: &Tree) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, node) in expected {
        match actual.get(path) {
            None => lines.push(format!("missing: {} ({node:?})", path.display())),
            Some(other) if other != node => {
                lines.push(format!("differs: {}: expected {node:?}, found {other:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for (path, node) in actual {
        if !expected.contains_key(path) {
            lines.push(format!("unexpected: {} ({node:?})", path.display()));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(digest: &str) -> Node {
        Node::File { mode: 0o644, uid: 0, gid: 0, size: 1, digest: digest.into() }
    }
    fn dir() -> Node {
        Node::Dir { mode: 0o755, uid: 0, gid: 0 }
    }

    #[test]
    fn merge_applies_whiteouts_and_replacements() {
        let lower: Tree = [
            ("etc".into(), dir()),
            ("etc/a".into(), file("a1")),
            ("etc/gone".into(), file("g")),
            ("d".into(), dir()),
            ("d/x".into(), file("x")),
        ]
        .into();
        let upper: Tree = [
            ("etc".into(), dir()),
            ("etc/a".into(), file("a2")),
            ("etc/gone".into(), Node::Whiteout),
            ("d".into(), file("now a file")),
        ]
        .into();
        let merged = merge_layers(&[lower, upper]);
        let expected: Tree =
            [("etc".into(), dir()), ("etc/a".into(), file("a2")), ("d".into(), file("now a file"))].into();
        assert_eq!(diff(&expected, &merged), Vec::<String>::new());
    }
}
