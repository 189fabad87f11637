//! The store suite: Issue 15 item 7: mount flags and the store's own permissions.

use super::*;

/// The options of the mount at `dir` in this process's mount namespace (`/proc/self/mountinfo`,
/// field 6: per-mount options such as `ro,nosuid,nodev,relatime`).
fn mount_options(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not a mount point", dir.display()));
    line.split(' ').nth(5).unwrap().split(',').map(str::to_owned).collect()
}

#[test]
#[ignore = "needs root: mounts the store's images (make test-integration as root runs it)"]
fn mounts_are_read_only_nosuid_and_nodev() {
    require_root();
    let f = fixture();
    let pb = pullbox();
    let spare = tempfile::tempdir().unwrap();
    let one = push_image(
        &f.registry,
        "store/perm-one-layer:1",
        &[HostileTar::new().dir("bin/").file("bin/x", b"#!/bin/sh\n").finish()],
        spare.path(),
    )
    .unwrap();
    // Overlay (several layers) and bind mount (one layer).
    for image in [&f.app.reference, &one] {
        pb.pull(&[], image);
        let mounted = Mounted::new(&pb, image).unwrap();
        let options = mount_options(mounted.path());
        for wanted in ["ro", "nosuid", "nodev"] {
            assert!(options.iter().any(|o| o == wanted), "{image}: mount options {options:?} lack {wanted}");
        }
    }
}

/// Every path under `root` that others (group or world) may use, except symlinks and layer
/// contents (snapshots' and staged layers' `fs` directories, whose modes the image sets).
fn open_to_others(root: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(path) = todo.pop() {
        let md = fs::symlink_metadata(&path).unwrap();
        let layer = path.file_name() == Some("fs".as_ref())
            && path.parent().and_then(Path::parent).is_some_and(|p| p.ends_with("snapshots") || p.ends_with("staging"));
        if md.file_type().is_symlink() || layer {
            continue;
        }
        if md.mode() & 0o077 != 0 {
            open.push(format!("{} {:o}", path.display(), md.mode() & 0o7777));
        }
        if md.is_dir() {
            todo.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    open.sort();
    open
}

#[test]
fn the_store_is_its_owners_alone_and_older_stores_are_tightened() {
    let f = fixture();
    let pb = pullbox();
    pb.pull(&[], &f.app.reference);
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(pb.root()), 0o700);
    assert_eq!(open_to_others(pb.root()), Vec::<String>::new());
    let blob = pb.root().join("content/blobs/sha256").join(f.app.config_digest.trim_start_matches("sha256:"));
    assert_eq!(mode(&blob), 0o600, "a blob");
    assert_eq!(mode(&pb.root().join("metadata.db")), 0o600);
    // Layer contents keep the image's modes: the root directory of the image's filesystem.
    let snapshot = fs::read_dir(pb.root().join("snapshots")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(mode(&snapshot), 0o700);
    assert_eq!(mode(&snapshot.join("fs")), 0o755);

    // A store as an older pullbox left it: root, blobs and database open to everyone.
    let loosen =
        [pb.root().to_owned(), pb.root().join("content"), pb.root().join("content/blobs/sha256"), blob.clone()];
    for p in loosen.iter().chain([&pb.root().join("metadata.db"), &snapshot]) {
        let loose = if fs::metadata(p).unwrap().is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(p, fs::Permissions::from_mode(loose)).unwrap();
    }
    assert!(!open_to_others(pb.root()).is_empty());
    pb.run("images", NO_ARGS).assert_success();
    assert_eq!(open_to_others(pb.root()), Vec::<String>::new(), "opening the store tightens it");
    assert_eq!(mode(&blob), 0o600);
    assert_eq!(mode(&snapshot.join("fs")), 0o755, "layer contents untouched");
}
