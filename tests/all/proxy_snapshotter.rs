//! pullbox as containerd's proxy snapshotter, against a real containerd 1.6: `pullbox serve`
//! serves the snapshots API on its snapshotter socket, containerd lists it in
//! `[proxy_plugins]` as `pullbox`, and containerd pulls (its differ unpacking onto pullbox's
//! mounts), runs containers from pullbox's store, and removes snapshots there when its
//! garbage collector runs.
//!
//! Each test has its own daemon and containerd. Needs root. Run them alone with
//! `cargo test --release -p pullbox-tests --test all -- proxy_snapshotter::`.

use std::path::{Path, PathBuf};

use pullbox_tests::{app, containerd::Containerd, cri::Daemon, fixture, Pullbox};

/// The name containerd knows pullbox's snapshotter by, in these tests.
const SNAPSHOTTER: &str = "pullbox";

/// A socket path for the snapshotter in a fresh directory (short: unix socket paths are
/// limited to 108 bytes), and the directory.
fn snapshotter_socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("pbsn-").tempdir_in("/tmp").unwrap();
    let socket = dir.path().join("run").join("s.sock");
    (dir, socket)
}

/// The snapshot directories in the store at `root` (numbered, one per snapshot).
fn snapshot_dirs(root: &Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

/// `ctr run --rm --snapshotter pullbox IMAGE ID cat LAYER3_FILE`: its output.
fn cat_layer3(ctd: &Containerd, namespace: &str, reference: &str, id: &str) -> String {
    let file = format!("/{}", app::LAYER3_FILE);
    let args = ["run", "--rm", "--snapshotter", SNAPSHOTTER, reference, id, "/bin/busybox", "cat", &file];
    let run = ctd.ctr_in(namespace, &args).unwrap();
    assert!(run.success(), "{run}\ncontainerd log:\n{}", ctd.log());
    run.stdout
}

#[test]
fn containerd_pulls_runs_and_collects_through_pullbox() {
    let f = fixture();
    let (_sock_dir, socket) = snapshotter_socket();
    let daemon = Daemon::start(&format!("[snapshotter]\naddress = {:?}\n", socket.display().to_string())).unwrap();
    // Root's alone: the socket 0600, its directory 0700.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    let ctd = Containerd::start_with_proxy(SNAPSHOTTER, &socket).unwrap();
    let ns = "proxy";
    let reference = &f.app.reference;
    let pull = ctd.ctr_in(ns, &["images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, reference]).unwrap();
    assert!(pull.success(), "{pull}\ncontainerd log:\n{}\npullbox log:\n{}", ctd.log(), daemon.log());

    // The layers are in pullbox's store, one directory each, and containerd knows them.
    let root = daemon.root();
    assert_eq!(snapshot_dirs(&root).len(), app::LAYERS, "{:?}", snapshot_dirs(&root));
    let listed = ctd.ctr_ok(ns, &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]).unwrap();
    assert!(listed.contains(&f.app.chain_id()), "{listed}");

    assert_eq!(cat_layer3(&ctd, ns, reference, "pb-run-1"), app::LAYER3_CONTENT);
    // The container's own snapshot went with `--rm`, from containerd's database; its
    // collector removes it from pullbox's store, and keeps the image's layers.
    ctd.collect(ns).unwrap();
    assert_eq!(snapshot_dirs(&root).len(), app::LAYERS, "{:?}", snapshot_dirs(&root));

    // pullbox's collector never takes what containerd references: the snapshots have no
    // pullbox image record, and survive `pullbox gc` on the daemon's root.
    let mut gc = std::process::Command::new(Pullbox::bin().unwrap());
    gc.arg("gc").arg("--root").arg(&root);
    pullbox_tests::process::run(gc, std::time::Duration::from_secs(60)).unwrap().assert_success();
    assert_eq!(snapshot_dirs(&root).len(), app::LAYERS);
    assert_eq!(cat_layer3(&ctd, ns, reference, "pb-run-2"), app::LAYER3_CONTENT);

    // Removing the image and collecting in containerd removes the snapshots from pullbox's
    // store: containerd's collector walks the snapshotter and removes what it no longer
    // references.
    let images: Vec<String> = ctd.list(ns, "images").unwrap();
    for image in &images {
        ctd.ctr_ok(ns, &["images", "rm", image]).unwrap();
    }
    ctd.collect(ns).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !snapshot_dirs(&root).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(snapshot_dirs(&root).is_empty(), "left in pullbox's store: {:?}\n{}", snapshot_dirs(&root), daemon.log());
    let listed = ctd.ctr_ok(ns, &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]).unwrap();
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

/// pullbox's own pulls on the containerd backend with its proxy snapshotter: the image record
/// and content go to containerd, the snapshots are prepared and committed through containerd
/// (so `ctr` knows and runs them), and the layers are unpacked by pullbox while they
/// download, into its own store, not by containerd's differ.
#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_lands_in_pullbox_snapshotter() {
    use k8s_cri::v1::{ImageSpec, PullImageRequest};

    let f = fixture();
    let (_sock_dir, socket) = snapshotter_socket();
    let ctd = Containerd::start_with_proxy(SNAPSHOTTER, &socket).unwrap();
    let config = format!(
        "{}snapshotter = {SNAPSHOTTER:?}\n[snapshotter]\naddress = {:?}\nname = {SNAPSHOTTER:?}\n",
        ctd.pullbox_config(),
        socket.display().to_string()
    );
    let daemon = Daemon::start(&config).unwrap();
    let mut client = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
    let reference = f.reference("team/app:1.0");
    let request = PullImageRequest {
        image: Some(ImageSpec { image: reference.clone(), ..ImageSpec::default() }),
        ..PullImageRequest::default()
    };
    let pulled = client
        .pull_image(request)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\npullbox log:\n{}\ncontainerd log:\n{}", daemon.log(), ctd.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, f.app.config_digest);

    let root = daemon.root();
    assert_eq!(snapshot_dirs(&root).len(), app::LAYERS, "{:?}", snapshot_dirs(&root));
    assert!(
        !daemon.log().contains("containerd's differ unpacks"),
        "a layer was not unpacked by pullbox:\n{}",
        daemon.log()
    );
    let listed = ctd.ctr_ok("k8s.io", &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]).unwrap();
    assert!(
        listed.lines().any(|l| l.starts_with(&f.app.chain_id()) && l.trim_end().ends_with("Committed")),
        "{listed}"
    );
    assert_eq!(cat_layer3(&ctd, "k8s.io", &reference, "pb-cri-1"), app::LAYER3_CONTENT);
    let run = ctd
        .ctr(&["run", "--rm", "--snapshotter", SNAPSHOTTER, &reference, "pb-cri-2", "/bin/sh", "-c", "echo hello"])
        .unwrap();
    assert_eq!(run.stdout.trim(), "hello", "{run}");
}
