//! The store suite: layer bombs.

use super::hostile_archives::in_layers;
use super::*;

/// A store whose root is a tmpfs of `mib` MiB (needs root), unmounted when dropped.
struct TmpfsStore {
    pb: Pullbox,
}

impl TmpfsStore {
    fn new(mib: u64) -> TmpfsStore {
        let pb = Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(pb.root())
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        let shared = fixture().registry.dir().join("store-puller-cache");
        fs::create_dir_all(&shared).unwrap();
        std::os::unix::fs::symlink(&shared, pb.root().join("cache")).unwrap();
        TmpfsStore { pb }
    }
}

impl Drop for TmpfsStore {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.pb.root()).status();
    }
}

/// A finished command with its peak resident set size (KiB, sampled from `/proc` while it
/// ran) and how long it took.
struct Measured {
    out: Captured,
    peak_rss_kib: u64,
    took: Duration,
}

/// Runs `pullbox SUBCOMMAND ARGS` on `pb`, sampling its memory.
fn measured<S: AsRef<std::ffi::OsStr>>(pb: &Pullbox, subcommand: &str, args: impl IntoIterator<Item = S>) -> Measured {
    let stdout = tempfile::NamedTempFile::new().unwrap();
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    let mut child = pb
        .command(subcommand, args)
        .stdin(std::process::Stdio::null())
        .stdout(stdout.reopen().unwrap())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        if let Ok(kib) = pullbox_tests::sandbox::peak_rss_kib(child.id()) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("pullbox {subcommand} ran past 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Captured {
        command: format!("pullbox {subcommand}"),
        status,
        stdout: fs::read_to_string(stdout.path()).unwrap_or_default(),
        stderr: fs::read_to_string(stderr.path()).unwrap_or_default(),
    };
    Measured { out, peak_rss_kib: peak, took: started.elapsed() }
}

/// How much memory and time a refused bomb may cost the CLI: a pull of the small `app` image
/// peaks near 60 MiB (mostly the wasm engine); the bombs measured 5.6 GB before.
const BOMB_RSS_KIB: u64 = 256 * 1024;
const BOMB_TIME: Duration = Duration::from_secs(30);

#[test]
fn layer_bombs_are_refused_quickly_in_little_memory_and_the_store_stays_usable() {
    use pullbox_tests::bombs;
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let gib = 1u64 << 30;
    let cases: Vec<(&str, pullbox_tests::hostile::GzipLayer, &[&str], &[&str])> = vec![
        (
            "long-name",
            bombs::long_name(gib).unwrap(),
            &[],
            &["GNU long name of 1073741824 bytes", "limit of 1048576 bytes"],
        ),
        (
            "pax-record",
            bombs::pax_record(gib).unwrap(),
            &[],
            &["PAX extended header of 1073741824 bytes", "limit of 1048576 bytes"],
        ),
        ("deep-pax-path", bombs::deep_path(20_000).unwrap(), &[], &["d/d/d/", "exceeds the limit of 1024 components"]),
        ("deep-short-path", bombs::deep_path(1500).unwrap(), &[], &["exceeds the limit of 1024 components"]),
        (
            "over-the-size-cap",
            bombs::zeros("big-file", 8 << 20).unwrap(),
            &["--max-layer-bytes", "4194304"],
            &["big-file", "exceeds the limit of 4194304 bytes (max_layer_bytes)"],
        ),
    ];
    let pb = pullbox();
    for (case, layer, args, expect) in cases {
        assert!(layer.gz.len() < 4 << 20, "{case}: the bomb itself is small ({} bytes)", layer.gz.len());
        let reference =
            pullbox_tests::hostile::push_layers(&f.registry, &format!("bombs/{case}:1"), &[layer], work.path())
                .unwrap();
        let m = measured(&pb, "pull", args.iter().copied().chain([reference.as_str()]));
        m.out.assert_failure();
        for needle in expect {
            m.out.assert_stderr_contains(needle);
        }
        assert!(m.out.stderr.len() < 4096, "{case}: the message stays short:\n{}", m.out.stderr);
        eprintln!("{case}: refused in {:?}, peak RSS {} MiB", m.took, m.peak_rss_kib / 1024);
        assert!(m.peak_rss_kib < BOMB_RSS_KIB, "{case}: peak RSS {} KiB", m.peak_rss_kib);
        assert!(m.took < BOMB_TIME, "{case}: took {:?}", m.took);
        assert!(listed(&pb).is_empty(), "{case}");
        let inv = inventory(&pb);
        assert!(inv.snapshots.is_empty() && inv.staging.is_empty() && inv.ingests.is_empty(), "{case}: {inv:#?}");
    }
    pb.run("gc", NO_ARGS).assert_success();
    pb.pull(&[], &f.app.reference);
    assert_only_app(&pb);
}

#[test]
#[ignore = "needs root: mounts a tmpfs as the store (make test-integration as root runs it)"]
fn a_sparse_file_stays_sparse_on_a_small_disk() {
    require_root();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let store = TmpfsStore::new(64);
    let pb = &store.pb;
    let real = 4u64 << 30;
    let layer = pullbox_tests::bombs::sparse_file("sparse-4g", real).unwrap();
    let reference = pullbox_tests::hostile::push_layers(&f.registry, "bombs/sparse:1", &[layer], work.path()).unwrap();
    let m = measured(pb, "pull", [&reference]);
    m.out.assert_success();
    assert!(m.took < BOMB_TIME, "{:?}", m.took);
    let file = in_layers(pb, "sparse-4g").expect("the sparse file is unpacked");
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), real);
    assert!(meta.blocks() * 512 <= 64 * 1024, "{} bytes allocated", meta.blocks() * 512);
    let mut last = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(&file).unwrap(), &mut last, real - 1).unwrap();
    assert_eq!(&last, b"x");
    assert!(in_layers(pb, "beside-the-sparse-file").is_some());
}

#[test]
#[ignore = "needs root: mounts a tmpfs as the store (make test-integration as root runs it)"]
fn a_full_disk_is_resource_exhaustion_and_the_store_recovers() {
    require_root();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let store = TmpfsStore::new(96);
    let pb = &store.pb;
    pb.run("images", NO_ARGS).assert_success();
    assert!(pb.root().join("reserve").exists(), "the store holds space back for a full disk");

    // A layer bigger than the disk: refused as a full disk, naming where, leaving nothing.
    let layer = pullbox_tests::bombs::zeros("fills-the-disk", 256 << 20).unwrap();
    let reference = pullbox_tests::hostile::push_layers(&f.registry, "bombs/zeros:1", &[layer], work.path()).unwrap();
    let m = measured(pb, "pull", [&reference]);
    m.out.assert_failure().assert_stderr_contains("fills-the-disk").assert_stderr_contains("No space left on device");
    m.out.assert_stderr_contains(&pb.root().display().to_string());
    assert!(m.took < BOMB_TIME, "{:?}", m.took);
    pb.run("images", NO_ARGS).assert_success();
    pb.run("gc", NO_ARGS).assert_success();
    let inv = inventory(pb);
    assert!(inv.snapshots.is_empty() && inv.staging.is_empty() && inv.ingests.is_empty(), "{inv:#?}");
    pb.pull(&[], &f.app.reference);
    assert_eq!(listed(pb).len(), 1);

    // The disk filled behind the store's back, to the last byte: the store still opens,
    // lists, removes and collects; once there is room, pulls work again.
    let junk = pb.root().join("junk");
    let out =
        Command::new("dd").args(["if=/dev/zero", "bs=1M"]).arg(format!("of={}", junk.display())).output().unwrap();
    assert!(!out.status.success(), "dd fills the disk: {}", String::from_utf8_lossy(&out.stderr));
    // Even the reserve's last blocks: whatever is left over.
    let _ = Command::new("dd").args(["if=/dev/zero", "bs=4k"]).arg(format!("of={}.tail", junk.display())).output();
    let out = pb.run("images", NO_ARGS);
    out.assert_success();
    assert!(out.stdout.contains("team/app"), "{out}");
    pb.run("rmi", [&f.app.reference]).assert_success();
    pb.run("gc", NO_ARGS).assert_success();
    assert!(inventory(pb).is_empty());
    fs::remove_file(&junk).unwrap();
    fs::remove_file(junk.with_extension("tail")).unwrap();
    pb.pull(&[], &f.app.reference);
    assert_only_app(pb);
    pb.run("gc", NO_ARGS).assert_success();
    assert!(pb.root().join("reserve").exists(), "the reserve is made again once there is room");
}

#[test]
#[ignore = "needs root: mounts a tmpfs as the store (make test-integration as root runs it)"]
fn trees_of_any_depth_are_deleted_by_rmi_and_gc() {
    require_root();
    let f = fixture();
    let store = TmpfsStore::new(256);
    let pb = &store.pb;
    pb.pull(&[], &f.app.reference);
    // What a container could leave in a writable layer, and a stray directory of the store:
    // 20,000 levels, far deeper than PATH_MAX names or std's recursive removal survives.
    let top = *inventory(pb).snapshots.iter().max().unwrap();
    pullbox_tests::bombs::deep_tree(&pb.root().join(format!("snapshots/{top}/fs")), 20_000).unwrap();
    let stray = pb.root().join("snapshots/999999/fs");
    fs::create_dir_all(&stray).unwrap();
    pullbox_tests::bombs::deep_tree(&stray, 20_000).unwrap();
    let m = measured(pb, "rmi", [&f.app.reference]);
    m.out.assert_success();
    eprintln!("rmi of an image holding a 20,000-level tree: {:?}", m.took);
    let m = measured(pb, "gc", NO_ARGS);
    m.out.assert_success();
    assert!(m.took < BOMB_TIME, "{:?}", m.took);
    let inv = inventory(pb);
    assert!(inv.is_empty(), "{inv:#?}");
    pb.pull(&[], &f.app.reference);
    assert_only_app(pb);
}
