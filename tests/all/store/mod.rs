//! The embedded store against real images: exact root filesystems (compared with `umoci
//! unpack` through `pullbox mount`), hostile archives, READY-only answers after damage, crash
//! safety (`kill -9` mid-pull) and concurrent pulls and removes.
//!
//! Needs `make build` first. Mount-based checks need root (CI runs as root); without it they
//! are skipped with a message. Images: the shared fixture's `team/app`, the umoci-built corpus
//! of [`pullbox_tests::corpus`] and hand-made hostile layers ([`pullbox_tests::hostile`]).
//! Pulls are held in a known state with the gated proxy ([`pullbox_tests::gate`]): a download
//! held after some bytes, until the test releases it.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pullbox_tests::corpus::{corpus, LAYERS};
use pullbox_tests::gate::GateProxy;
use pullbox_tests::hostile::{nonce, push_image, HostileTar};
use pullbox_tests::mounts::{can_mount, compare_rootfs, find_named, Inventory, Mounted};
use pullbox_tests::oci::{file_digest, is_root, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD};
use pullbox_tests::tree::{diff, scan};
use pullbox_tests::{app, fixture, Captured, Pullbox};

const NO_ARGS: [&str; 0] = [];

/// How long a test waits for a background pull to reach a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh store whose compiled-puller cache is shared with every other store of this test
/// binary: compiling the puller takes a second, the rest of a pull milliseconds. (Cache
/// entries are written atomically, so sharing them between processes is safe.)
fn pullbox() -> Pullbox {
    let pb = Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"));
    let shared = fixture().registry.dir().join("store-puller-cache");
    fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, pb.root().join("cache")).unwrap();
    pb
}

/// The IDs `images --json` lists.
fn listed(pb: &Pullbox) -> Vec<String> {
    pb.images_json().iter().map(|i| i["id"].as_str().unwrap_or_default().to_owned()).collect()
}

fn inventory(pb: &Pullbox) -> Inventory {
    Inventory::of(pb.root()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `cond` holds, failing the test (with `what`) after [`STATE_TIMEOUT`] or when
/// `child` exits first.
#[track_caller]
fn wait_for(child: &mut Child, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !cond() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the pull exited ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pull running in the background, its stderr in a file the test can read meanwhile.
struct Background {
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl Background {
    /// `pullbox pull --log pullbox=info ARGS REF` in the background.
    fn pull(pb: &Pullbox, args: &[&str], reference: &str) -> Background {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = pb
            .command("pull", ["--log", "pullbox=info"].iter().chain(args).copied().chain([reference]))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap();
        Background { child, stderr }
    }

    /// Waits for the pull to end and captures its output.
    fn finish(self) -> Captured {
        let out = self.child.wait_with_output().unwrap();
        Captured {
            command: "background pull".to_owned(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: fs::read_to_string(self.stderr.path()).unwrap_or_default(),
        }
    }
}

/// The blob digests of the fixture's `team/app`.
fn app_blobs() -> BTreeSet<String> {
    fixture().app.blobs().into_iter().collect()
}

/// A gated proxy in front of the fixture's registry.
fn proxy() -> GateProxy {
    GateProxy::start(fixture().registry.addr()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The GETs of blob `digest` through `proxy` that started a download (not a resumption).
fn downloads(proxy: &GateProxy, digest: &str) -> usize {
    proxy.downloads(&format!("/blobs/{digest}"))
}

/// The store holds exactly `app`, pulled once: its blobs, three snapshots, nothing in progress.
#[track_caller]
fn assert_only_app(pb: &Pullbox) -> Inventory {
    let inv = inventory(pb);
    assert_eq!(inv.blobs, app_blobs(), "{inv:#?}");
    assert_eq!(inv.snapshots.len(), app::LAYERS, "{inv:#?}");
    assert!(
        inv.ingests.is_empty() && inv.snapshot_strays.is_empty() && inv.mounts.is_empty() && inv.staging.is_empty(),
        "{inv:#?}"
    );
    inv
}

/// When this process may mount: `image`'s root filesystem through `pullbox mount` equals
/// `app`'s as umoci unpacks it.
#[track_caller]
fn assert_app_mounts(pb: &Pullbox, image: &str) {
    if !is_root() {
        return;
    }
    let mounted = Mounted::new(pb, image).unwrap_or_else(|e| panic!("{e:#}"));
    let differences = diff(&fixture().rootfs, &scan(mounted.path()).unwrap());
    assert!(differences.is_empty(), "the mounted root filesystem differs from umoci's:\n{}", differences.join("\n"));
}

// ---- exact root filesystems -------------------------------------------------------------

#[test]
fn corpus_mounts_exactly_as_umoci_unpacks_it() {
    if !can_mount() {
        return;
    }
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
fn a_mount_outlives_rmi_and_unmount_releases_it() {
    if !can_mount() {
        return;
    }
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

// ---- READY only -------------------------------------------------------------------------

/// What was damaged, and how.
type Damage<'a> = (&'a str, &'a dyn Fn(&Pullbox));

#[test]
fn images_damaged_behind_pullboxs_back_are_not_ready_and_a_pull_repairs_them() {
    let f = fixture();
    let chain = f.app.chain_id();
    // Snapshot ids in a fresh store: layer 1 is 1, layer 3 (the top) is 3.
    let damages: [Damage; 4] = [
        ("top snapshot's directory deleted", &|pb| fs::remove_dir_all(pb.root().join("snapshots/3")).unwrap()),
        ("middle snapshot's directory deleted", &|pb| fs::remove_dir_all(pb.root().join("snapshots/2/fs")).unwrap()),
        ("config blob deleted", &|pb| fs::remove_file(pb.blob_path(f.app.id())).unwrap()),
        ("top snapshot removed (record and directory)", &|pb| {
            let backend = pullbox::backend::embedded::open(pb.root()).unwrap();
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(backend.snapshots.remove(&chain)).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let pb = pullbox();
        let id = pb.pull(&[], &f.app.reference);
        damage(&pb);
        assert!(listed(&pb).is_empty(), "{what}: the image is still listed");
        let out = pb.run("inspect", [&f.app.reference]);
        out.assert_failure().assert_stderr_contains("not found");
        if is_root() {
            let dir = tempfile::tempdir().unwrap();
            pb.run("mount", [&f.app.reference, &dir.path().display().to_string()]).assert_failure();
        }

        assert_eq!(pb.pull(&[], &f.app.reference), id, "{what}: the re-pull");
        assert_eq!(listed(&pb), vec![id.clone()], "{what}: not listed after the re-pull");
        assert_eq!(pb.inspect(&f.app.reference)["chainId"], chain.as_str());
        pb.run("gc", NO_ARGS).assert_success();
        assert_only_app(&pb);
        assert_app_mounts(&pb, &f.app.reference);
    }
}

// ---- leases and garbage collection after kill -9 ------------------------------------------

/// Starts a pull of `app` through a proxy that holds layer 2 halfway, and waits until the
/// pull holds everything a crash can leave: committed blobs, the committed snapshot of layer
/// 1, the active snapshot layer 2 is to be unpacked into, and layer 2's partial ingest. Then
/// kills it with SIGKILL.
fn kill_a_pull_midway(pb: &Pullbox) {
    let f = fixture();
    let proxy = proxy();
    let layer2 = &f.app.layers[1];
    let half = layer2.size / 2;
    proxy.hold(&layer2.digest, half);
    let reference = format!("{}/{}:1.0", proxy.addr(), f.app.path());
    let mut pull = Background::pull(pb, &[], &reference);
    wait_for(&mut pull.child, "layer 2 is half downloaded (the only download left) and its snapshot prepared", || {
        let inv = inventory(pb);
        proxy.held() == 1
            && Inventory::ingest_bytes(pb.root()) >= half
            && inv.snapshots.len() == 2
            && inv.ingests.len() == 1
    });
    pull.child.kill().unwrap();
    pull.child.wait().unwrap();
    let inv = inventory(pb);
    assert_eq!(inv.ingests.len(), 1, "{inv:#?}");
    assert!(!inv.staging.is_empty(), "layer 2 was being unpacked as it downloaded: {inv:#?}");
    assert!(inv.blobs.contains(&f.app.layers[0].digest) && inv.blobs.contains(f.app.id()), "{inv:#?}");
}

#[test]
fn gc_removes_what_a_killed_pull_left_and_a_re_pull_succeeds() {
    let f = fixture();
    let pb = pullbox();
    kill_a_pull_midway(&pb);
    assert!(listed(&pb).is_empty());
    // Two snapshots, and the layers that were being unpacked as they downloaded.
    let snapshots = 2 + inventory(&pb).staging.len();

    let out = pb.run("gc", NO_ARGS);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!(", {snapshots} snapshots, 1 ingests, 1 leases;")),
        "gc must report what it removed:\n{out}"
    );
    let inv = inventory(&pb);
    assert!(inv.is_empty(), "orphans left after gc: {inv:#?}");

    pb.pull(&[], &f.app.reference);
    assert_only_app(&pb);
    assert_app_mounts(&pb, &f.app.reference);
}

#[test]
fn the_next_pull_removes_what_a_killed_pull_left() {
    let f = fixture();
    let pb = pullbox();
    kill_a_pull_midway(&pb);
    // Mark the killed pull's snapshot directories. Ids alone cannot tell them apart from the
    // re-pull's: when the kill lands inside the transaction that creates a snapshot, its
    // directory exists but its id was never committed, and the next snapshot reuses that id.
    const MARK: &str = "left-by-the-killed-pull";
    for id in inventory(&pb).snapshots {
        fs::write(pb.root().join("snapshots").join(id.to_string()).join(MARK), b"").unwrap();
    }

    pb.pull(&[], &f.app.reference);
    let inv = assert_only_app(&pb);
    let left: Vec<_> = inv
        .snapshots
        .iter()
        .filter(|id| pb.root().join("snapshots").join(id.to_string()).join(MARK).exists())
        .collect();
    assert!(left.is_empty(), "the killed pull's snapshots {left:?} were not collected: {inv:#?}");
    let out = pb.run("gc", NO_ARGS);
    out.assert_success();
    assert!(out.stdout.contains("removed 0 blobs, 0 snapshots, 0 ingests, 0 leases"), "{out}");
    assert_app_mounts(&pb, &f.app.reference);
}

// ---- hostile archives ---------------------------------------------------------------------

/// A check of what a sanitized hostile image left in the store.
type Check = Box<dyn Fn(&Pullbox)>;

/// What a hostile image must lead to.
enum Expect {
    /// The pull fails; stderr names this entry (a substring of it).
    Refused(String),
    /// The pull succeeds; the check looks at the store's snapshot directories.
    Sanitized(Check),
}

/// The snapshot `fs` directory holding `name` at its top, if any.
fn in_layers(pb: &Pullbox, name: &str) -> Option<PathBuf> {
    pb.snapshot_fs_dirs().unwrap().into_iter().map(|d| d.join(name)).find(|p| fs::symlink_metadata(p).is_ok())
}

#[test]
fn hostile_archives_are_refused_or_sanitized_and_nothing_lands_outside_the_store() {
    let f = fixture();
    let n = nonce();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join(format!("{n}-outside"));
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    fs::write(&victim, b"original").unwrap();
    let outside_s = outside.display().to_string();
    let up = "../".repeat(16);
    let passwd = (fs::metadata("/etc/passwd").unwrap().nlink(), file_digest(Path::new("/etc/passwd")).unwrap());
    let long = format!("{}-{n}", "x".repeat(300));

    let cases: Vec<(&str, Vec<Vec<u8>>, Expect)> = vec![
        (
            "dotdot-and-absolute",
            vec![HostileTar::new()
                .file(&format!("{up}{n}-dotdot"), b"1")
                .file(&format!("/{n}-absolute"), b"2")
                .file(&format!("./a/../../../{n}-climb"), b"3")
                .finish()],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    for name in ["dotdot", "absolute", "climb"] {
                        assert!(
                            in_layers(pb, &format!("{n}-{name}")).is_some(),
                            "{name} was not kept inside the image"
                        );
                    }
                }
            })),
        ),
        (
            "write-through-absolute-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-link"), &outside_s)
                .file(&format!("{n}-link/pwned"), b"x")
                .finish()],
            Expect::Refused(format!("{n}-link/pwned")),
        ),
        (
            "write-through-relative-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-up"), &format!("{up}{}", outside_s.trim_start_matches('/')))
                .dir(&format!("{n}-up/made-outside/"))
                .finish()],
            Expect::Refused(format!("{n}-up/made-outside")),
        ),
        (
            // The upper layer gets a directory of its own there, which hides the symlink below.
            "symlink-in-a-lower-layer",
            vec![
                HostileTar::new().symlink(&format!("{n}-lower"), &outside_s).finish(),
                HostileTar::new().file(&format!("{n}-lower/kept-inside"), b"x").finish(),
            ],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    let dirs = pb.snapshot_fs_dirs().unwrap();
                    let top = dirs.last().unwrap().join(format!("{n}-lower"));
                    assert!(fs::symlink_metadata(&top).unwrap().is_dir(), "{}", top.display());
                    assert_eq!(fs::read(top.join("kept-inside")).unwrap(), b"x");
                }
            })),
        ),
        (
            "hardlink-to-an-absolute-path",
            vec![HostileTar::new().hardlink(&format!("{n}-stolen"), &victim.display().to_string()).finish()],
            Expect::Refused(format!("{n}-stolen")),
        ),
        (
            "hardlink-climbing-out",
            vec![HostileTar::new().hardlink(&format!("{n}-passwd"), &format!("{up}etc/passwd")).finish()],
            Expect::Refused(format!("{n}-passwd")),
        ),
        (
            "hardlink-through-a-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-out"), &outside_s)
                .hardlink(&format!("{n}-h"), &format!("{n}-out/victim"))
                .finish()],
            Expect::Refused(format!("{n}-h")),
        ),
        (
            "duplicate-and-replaced-entries",
            vec![HostileTar::new()
                .file(&format!("{n}-dup"), b"first")
                .file(&format!("{n}-dup"), b"second")
                .symlink(&format!("{n}-s"), &victim.display().to_string())
                .file(&format!("{n}-s"), b"replaces the symlink")
                .dir(&format!("{n}-d/"))
                .file(&format!("{n}-d/x"), b"x")
                .file(&format!("{n}-d"), b"replaces the directory")
                .finish()],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    let read = |name: &str| fs::read(in_layers(pb, &format!("{n}-{name}")).unwrap()).unwrap();
                    assert_eq!(read("dup"), b"second");
                    assert_eq!(read("s"), b"replaces the symlink");
                    assert_eq!(read("d"), b"replaces the directory");
                }
            })),
        ),
        ("overlong-name", vec![HostileTar::new().file(&long, b"x").finish()], Expect::Refused(long[..60].to_owned())),
        (
            "whiteout-of-dotdot",
            vec![HostileTar::new().dir(&format!("{n}-w/")).file(&format!("{n}-w/.wh.."), b"").finish()],
            Expect::Refused(format!("{n}-w/.wh..")),
        ),
    ];

    for (case, layers, expect) in cases {
        let reference = push_image(&f.registry, &format!("hostile/{case}:1"), &layers, work.path()).unwrap();
        let pb = pullbox();
        let out = pb.run("pull", [&reference]);
        match &expect {
            Expect::Refused(entry) => {
                out.assert_failure().assert_stderr_contains(entry);
                assert!(listed(&pb).is_empty(), "{case}");
                let inv = inventory(&pb);
                assert!(inv.is_empty(), "{case}: a refused pull left {inv:#?}");
            }
            Expect::Sanitized(check) => {
                out.assert_success();
                check(&pb);
                if is_root() {
                    // The mounted view shows the same.
                    let _m = Mounted::new(&pb, &reference).unwrap();
                }
            }
        }
        // Nowhere a `..` could reach from a snapshot directory holds one of the names.
        let snapshots = pb.root().join("snapshots");
        let mut dirs: Vec<PathBuf> = pb.root().ancestors().map(Path::to_path_buf).collect();
        dirs.push(snapshots.clone());
        dirs.extend(inventory(&pb).snapshots.iter().map(|id| snapshots.join(id.to_string())));
        dirs.extend([work.path().to_path_buf(), PathBuf::from("/etc"), std::env::temp_dir()]);
        let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        let escaped: Vec<PathBuf> = find_named(&refs, &n)
            .into_iter()
            .filter(|p| p != &outside && !p.starts_with(work.path().join("layout-")))
            .collect();
        assert!(escaped.is_empty(), "{case}: written outside the snapshots: {escaped:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{case}: the outside directory changed");
        assert_eq!(fs::read(&victim).unwrap(), b"original", "{case}");
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1, "{case}: linked to the victim");
        let now = (fs::metadata("/etc/passwd").unwrap().nlink(), file_digest(Path::new("/etc/passwd")).unwrap());
        assert_eq!(now, passwd, "{case}: /etc/passwd changed");
    }
}

#[test]
fn a_layer_cannot_forge_overlay_opacity() {
    if !can_mount() {
        return;
    }
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut top = HostileTar::new();
    // `trusted.overlay.opaque=y` in a PAX record would hide the lower layer's directory.
    let mut pax = tar::Builder::new(Vec::new());
    pax.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])]).unwrap();
    let mut layer = pax.into_inner().unwrap();
    layer.truncate(layer.len() - 1024); // drop the end-of-archive marker
    layer.extend(top.dir("kept/").file("kept/new", b"new").finish());
    let base = HostileTar::new().dir("kept/").file("kept/old", b"old").finish();
    let reference = push_image(&f.registry, "hostile/forged-opacity:1", &[base, layer], work.path()).unwrap();
    let pb = pullbox();
    pb.pull(&[], &reference);
    let m = Mounted::new(&pb, &reference).unwrap();
    assert_eq!(fs::read(m.path().join("kept/old")).unwrap(), b"old", "the forged attribute hid a lower layer");
    assert_eq!(fs::read(m.path().join("kept/new")).unwrap(), b"new");
}

// ---- concurrency --------------------------------------------------------------------------

#[test]
fn concurrent_processes_pulling_one_image_download_each_blob_once() {
    const PULLS: usize = 4;
    let f = fixture();
    let proxy = proxy();
    let reference = format!("{}/{}:1.0", proxy.addr(), f.app.path());
    let pb = pullbox();
    let started = Instant::now();
    let outs: Vec<Captured> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PULLS).map(|_| s.spawn(|| pb.run("pull", [&reference]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    for out in &outs {
        out.assert_success();
        assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
    }
    for digest in std::iter::once(f.app.id()).chain(f.app.layers.iter().map(|l| l.digest.as_str())) {
        assert_eq!(downloads(&proxy, digest), 1, "{digest} was downloaded more than once by {PULLS} pulls");
    }
    let inv = assert_only_app(&pb);
    // Snapshot ids are never reused: a layer unpacked twice (and the copy dropped) leaves a gap.
    let unpacks = inv.snapshots.last().copied().unwrap_or(0);
    eprintln!("{PULLS} concurrent pulls: {elapsed:?}, {unpacks} unpacks of {} layers", app::LAYERS);
    assert_eq!(listed(&pb), vec![f.app.id().to_owned()]);
    assert_app_mounts(&pb, &reference);
}

#[test]
fn a_pull_waits_for_another_process_unpacking_a_shared_layer() {
    let f = fixture();
    let c = corpus();
    let proxy = proxy();
    let pb = pullbox();
    // Pull A: `app`, its top layer held halfway, so A holds the active snapshot of layer 3.
    let layer3 = &f.app.layers[2];
    proxy.hold(&layer3.digest, layer3.size / 2);
    let app_ref = format!("{}/{}:1.0", proxy.addr(), f.app.path());
    let mut a = Background::pull(&pb, &[], &app_ref);
    wait_for(&mut a.child, "pull A has prepared the snapshot for layer 3", || {
        proxy.held() == 1 && inventory(&pb).snapshots.len() == 3
    });
    // Pull B: `app-plus` shares all three layers; it finds layer 3 being unpacked, and waits.
    let plus_ref = c.app_plus.replace(f.registry.addr(), proxy.addr());
    let mut b = Background::pull(&pb, &[], &plus_ref);
    let b_log = b.stderr.path().to_owned();
    wait_for(&mut b.child, "pull B waits for A's unpack of layer 3", || {
        fs::read_to_string(&b_log).unwrap_or_default().contains("another pull is unpacking this snapshot")
    });
    proxy.release(&layer3.digest);
    let (a, b) = (a.finish(), b.finish());
    a.assert_success();
    b.assert_success();

    for layer in &f.app.layers {
        assert_eq!(downloads(&proxy, &layer.digest), 1, "layer {} downloaded twice", layer.digest);
    }
    let inv = inventory(&pb);
    assert_eq!(
        inv.snapshots,
        (1..=app::LAYERS as u64 + 1).collect(),
        "each layer must be unpacked once (a dropped duplicate leaves a gap in the ids): {inv:#?}"
    );
    assert!(inv.ingests.is_empty(), "{inv:#?}");
    assert_eq!(listed(&pb).len(), 2);
}

#[test]
fn in_process_pulls_of_one_reference_share_one_pull() {
    use pullbox::{
        engine::{Limits, Runtime},
        oci::Platform,
        registry::{Client, Credentials, NoProgress},
        service::ImageService,
    };
    const PULLS: usize = 4;
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let puller = Pullbox::puller("pullbox-puller.wasm").unwrap();
    // One pull alone, then PULLS at once: the registry must see the same requests.
    let mut requests = Vec::new();
    for pulls in [1, PULLS] {
        let proxy = proxy();
        let reference = format!("{}/{}:1.0", proxy.addr(), f.app.path());
        let root = tempfile::tempdir().unwrap();
        let ids = rt.block_on(async {
            let backend = pullbox::backend::embedded::open(root.path()).unwrap();
            let cache = fixture().registry.dir().join("store-puller-cache");
            let runtime = Runtime::new(Some(cache), Limits::default()).unwrap();
            let puller = runtime.load(&puller, String::new()).await.unwrap();
            let service = Arc::new(ImageService::new(backend, Arc::new(Client::new().unwrap()), puller));
            let tasks: Vec<_> = (0..pulls)
                .map(|_| {
                    let (service, reference) = (service.clone(), reference.clone());
                    tokio::spawn(async move {
                        let cancel = tokio_util::sync::CancellationToken::new();
                        service
                            .pull(&reference, Platform::host(), Arc::new(NoProgress), Credentials::anonymous(), cancel)
                            .await
                            .map(|image| image.id)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let mut ids = Vec::new();
            for t in tasks {
                ids.push(t.await.unwrap());
            }
            ids
        });
        for id in ids {
            assert_eq!(id.as_deref(), Ok(f.app.id()));
        }
        let mut seen: Vec<String> = proxy.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
        seen.sort();
        requests.push(seen);
    }
    assert_eq!(requests[0], requests[1], "{PULLS} pulls of one reference must make the requests of one");
}

#[test]
fn removes_racing_pulls_leave_a_consistent_store() {
    let f = fixture();
    let proxy = proxy();
    let pb = pullbox();
    let reference = format!("{}/{}:1.0", proxy.addr(), f.app.path());

    // A remove and a collection while a pull is half-way: the pull still completes whole.
    let layer2 = &f.app.layers[1];
    proxy.hold(&layer2.digest, layer2.size / 2);
    let mut pull = Background::pull(&pb, &[], &reference);
    wait_for(&mut pull.child, "the pull is under way", || proxy.held() == 1 && inventory(&pb).snapshots.len() == 2);
    pb.run("rmi", [&reference]).assert_failure().assert_stderr_contains("not found");
    pb.run("gc", NO_ARGS).assert_success();
    proxy.release(&layer2.digest);
    pull.finish().assert_success();
    assert_eq!(listed(&pb), vec![f.app.id().to_owned()]);
    assert_only_app(&pb);

    // Pulls of a present image and removes of it, at once, several times: afterwards the image
    // is either whole and listed, or gone (and a collection leaves nothing).
    for round in 0..6 {
        let (pulled, removed) = std::thread::scope(|s| {
            let p = s.spawn(|| pb.run("pull", [&reference]));
            if round % 2 == 1 {
                std::thread::sleep(Duration::from_millis(30));
            }
            let r = s.spawn(|| pb.run("rmi", [&reference]));
            (p.join().unwrap(), r.join().unwrap())
        });
        pulled.assert_success();
        let inv = inventory(&pb);
        assert!(inv.ingests.is_empty(), "round {round}: {inv:#?}\n{pulled}\n{removed}");
        if listed(&pb).is_empty() {
            pb.run("gc", NO_ARGS).assert_success();
            let inv = inventory(&pb);
            assert!(inv.is_empty(), "round {round}: removed, yet the store holds {inv:#?}");
        } else {
            // Whole, under some of its names (the remove may have deleted some of the records
            // the pull had just written; the ID record goes last).
            assert_only_app(&pb);
            assert_eq!(pb.inspect(f.app.id())["id"], f.app.id());
        }
    }
    pb.pull(&[], &reference);
    assert_app_mounts(&pb, &reference);
    pb.run("rmi", [&reference]).assert_success();
    let inv = inventory(&pb);
    assert!(inv.is_empty(), "{inv:#?}");
    // Nothing was left that a permission check would trip over.
    assert_eq!(fs::metadata(pb.root().join("snapshots")).unwrap().permissions().mode() & 0o777, 0o700);
}

// ---- layer bombs ------------------------------------------------------------------------

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
fn a_sparse_file_stays_sparse_on_a_small_disk() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
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
fn a_full_disk_is_resource_exhaustion_and_the_store_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
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
fn trees_of_any_depth_are_deleted_by_rmi_and_gc() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
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

// ---- Issue 15 item 7: mount flags and the store's own permissions -----------------------
// (kept together at the end of the file)

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
fn mounts_are_read_only_nosuid_and_nodev() {
    if !can_mount() {
        return;
    }
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
