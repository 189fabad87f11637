//! The store suite: exact root filesystems.

use super::*;

#[test]
#[ignore = "needs root: mounts the store's images (make test-integration as root runs it)"]
fn corpus_mounts_exactly_as_umoci_unpacks_it() {
    require_root();
    let c = corpus();
    assert_eq!(
        c.mixed_media_types.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        [MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD].into(),
        "corpus-mixed should have every layer format"
    );
    for image in [&c.image, &c.mixed] {
        let pb = pullbox();
        let started = Instant::now();
        assert_eq!(pb.pull(&[], image), c.id, "{image}");
        let pulled = started.elapsed();
        let before = inventory(&pb);
        assert_eq!(before.snapshots.len(), LAYERS, "{image}: one snapshot per layer: {before:#?}");

        let mounted = Mounted::new(&pb, image).unwrap();
        let during = inventory(&pb);
        assert_eq!(during.snapshots.len(), LAYERS + 1, "the mount's view snapshot: {during:#?}");
        assert_eq!(during.mounts.len(), 1, "{during:#?}");
        let started = Instant::now();
        let differences = compare_rootfs(&c.rootfs, mounted.path()).unwrap();
        assert!(
            differences.is_empty(),
            "{image}: the mounted root filesystem differs from umoci unpack's:\n{}",
            differences.join("\n")
        );
        eprintln!("{image}: pulled in {pulled:?}, compared in {:?}", started.elapsed());
        let err = fs::write(mounted.path().join("etc/keep.txt"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(30), "the mount must be read-only (EROFS): {err}");
        mounted.unmount().assert_success();
        assert_eq!(inventory(&pb), before, "unmount must remove the view and the record");
    }
}

#[test]
#[ignore = "needs root: mounts the store's images (make test-integration as root runs it)"]
fn a_mount_outlives_rmi_and_unmount_releases_it() {
    require_root();
    let f = fixture();
    let pb = pullbox();
    pb.pull(&[], &f.app.reference);
    let spare = tempfile::tempdir().unwrap();
    let spare_dir = spare.path().display().to_string();
    pb.run("mount", ["127.0.0.1:1/no/such:image", &spare_dir]).assert_failure().assert_stderr_contains("not found");
    pb.run("unmount", [&spare_dir]).assert_failure().assert_stderr_contains("not mounted by pullbox");
    assert!(inventory(&pb).mounts.is_empty());

    let mounted = Mounted::new(&pb, &f.app.reference).unwrap();
    let dir = mounted.path().display().to_string();
    pb.run("mount", [&f.app.reference, &dir]).assert_failure().assert_stderr_contains("already");
    let file = mounted.path().join(app::LAYER3_FILE);
    assert_eq!(fs::read_to_string(&file).unwrap(), app::LAYER3_CONTENT);

    // Removing the image and collecting garbage leaves the mounted files alone.
    pb.run("rmi", [&f.app.reference]).assert_success();
    assert!(listed(&pb).is_empty());
    pb.run("gc", NO_ARGS).assert_success();
    assert_eq!(fs::read_to_string(&file).unwrap(), app::LAYER3_CONTENT);
    assert_eq!(inventory(&pb).snapshots.len(), app::LAYERS + 1);

    // Unmounting releases the view; the next collection frees the rest.
    mounted.unmount().assert_success();
    pb.run("gc", NO_ARGS).assert_success();
    let inv = inventory(&pb);
    assert!(inv.is_empty(), "{inv:#?}");

    // A one-layer image is a read-only bind mount.
    let one = push_image(
        &f.registry,
        "store/one-layer:1",
        &[HostileTar::new().dir("etc/").file("etc/hello", b"hello\n").finish()],
        spare.path(),
    )
    .unwrap();
    pb.pull(&[], &one);
    let mounted = Mounted::new(&pb, &one).unwrap();
    assert_eq!(fs::read(mounted.path().join("etc/hello")).unwrap(), b"hello\n");
    assert!(fs::write(mounted.path().join("etc/hello"), b"x").is_err(), "read-only");
}

#[test]
fn mount_needs_root() {
    if !is_root() {
        // As an ordinary user, the refusal is what every run of this command tests.
        let pb = pullbox();
        let dir = tempfile::tempdir().unwrap();
        pb.run("mount", ["x", &dir.path().display().to_string()]).assert_failure().assert_stderr_contains("needs root");
        return;
    }
    // As root: run it as `nobody`, on a store `nobody` owns.
    let root = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for d in [root.path(), dir.path()] {
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
    }
    for (sub, args) in [("mount", vec!["x".to_owned()]), ("unmount", vec![])] {
        let mut cmd = Command::new(Pullbox::bin().unwrap());
        cmd.arg(sub).arg("--root").arg(root.path()).args(args).arg(dir.path()).uid(65534).gid(65534);
        for var in pullbox_tests::pullbox::PULLBOX_ENV {
            cmd.env_remove(var);
        }
        let out = pullbox_tests::process::run(cmd, Duration::from_secs(60)).unwrap();
        out.assert_failure().assert_stderr_contains("needs root");
    }
}
