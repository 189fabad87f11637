//! pullbox as containerd's proxy snapshotter, against a real containerd 1.6: `pullbox serve`
//! serves the snapshots API on its snapshotter socket, containerd lists it in
//! `[proxy_plugins]` as `pullbox`, and containerd pulls (its differ unpacking onto pullbox's
//! mounts), runs containers from pullbox's store, and removes snapshots there when its
//! garbage collector runs.
//!
//! containerd's own CRI on that snapshotter runs a pod whose sandbox image it pulled itself, and
//! a pullbox killed mid-pull is repaired by its next start, and a containerd killed mid-pull
//! and started again leaves nothing once the next pull is done.
//!
//! Each test has its own daemon and containerd. Needs root. Run them alone with
//! `cargo test --release -p pullbox-tests --test all -- proxy_snapshotter::`.

use std::path::{Path, PathBuf};

use pullbox_tests::{app, containerd::Containerd, cri::Daemon, fault_server::FaultServer, fixture, Pullbox};

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
    // `cat` exits 0 only when the file is there; `ctr run` on a loaded machine now and then
    // loses a short-lived task's output (its stdout fifo is copied after the task exited), so
    // an empty output of a successful run is tried again, under a fresh container ID.
    for attempt in 0..3 {
        let id = format!("{id}-{attempt}");
        let args = ["run", "--rm", "--snapshotter", SNAPSHOTTER, reference, &id, "/bin/busybox", "cat", &file];
        let run = ctd.ctr_in(namespace, &args).unwrap();
        assert!(run.success(), "{run}\ncontainerd log:\n{}", ctd.log());
        if !run.stdout.is_empty() {
            return run.stdout;
        }
    }
    String::new()
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
    let f = fixture();
    let (_sock_dir, socket) = snapshotter_socket();
    let ctd = Containerd::start_with_proxy(SNAPSHOTTER, &socket).unwrap();
    let daemon = Daemon::start(&proxy_mode_config(&ctd, &socket)).unwrap();
    let mut client = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
    let reference = f.reference("team/app:1.0");
    let pulled = client
        .pull_image(pull_request(&reference))
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

/// The config of a `pullbox serve` in proxy-snapshotter mode on `ctd`: records and content in
/// containerd, snapshots in pullbox's own store through containerd, served at `socket`.
fn proxy_mode_config(ctd: &Containerd, socket: &Path) -> String {
    format!(
        "{}snapshotter = {SNAPSHOTTER:?}\n[snapshotter]\naddress = {:?}\nname = {SNAPSHOTTER:?}\n",
        ctd.pullbox_config(),
        socket.display().to_string()
    )
}

/// A CRI pull request for `reference`.
fn pull_request(reference: &str) -> k8s_cri::v1::PullImageRequest {
    k8s_cri::v1::PullImageRequest {
        image: Some(k8s_cri::v1::ImageSpec { image: reference.to_owned(), ..Default::default() }),
        ..Default::default()
    }
}

/// A node as stargz-snapshotter's and SOCI's users run one: kubelet's images through pullbox,
/// containerd's CRI runs pods and containers on pullbox's snapshotter and pulls its sandbox
/// image itself (its differ unpacking onto pullbox's mounts). A pod runs, its container reads
/// a file of the image pullbox pulled; `ctr images pull --snapshotter` of another image
/// afterwards runs too; pullbox lists the images it did not pull; removing the images and
/// the pod reclaims pullbox's store.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_cri_runs_pods_from_pullbox_snapshotter() {
    use k8s_cri::v1::{
        ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListImagesRequest, NamespaceMode, NamespaceOption,
        PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
        StopPodSandboxRequest,
    };

    let f = fixture();
    let (_sock_dir, socket) = snapshotter_socket();
    let pause = f.reference("team/pause:1.0");
    let ctd = Containerd::start_cri_on_proxy(SNAPSHOTTER, &socket, &pause).unwrap();
    ctd.allow_plain_http(f.registry.addr()).unwrap();
    let daemon = Daemon::start(&proxy_mode_config(&ctd, &socket)).unwrap();
    let logs = || format!("pullbox log:\n{}\ncontainerd log:\n{}", daemon.log(), ctd.log());

    // kubelet's pull goes to pullbox.
    let mut images = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
    let reference = f.reference("team/app:1.0");
    let pulled = images.pull_image(pull_request(&reference)).await.unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
    assert_eq!(pulled.into_inner().image_ref, f.app.config_digest);

    // The pod, on the node's network (no CNI here); containerd pulls the sandbox image.
    let mut runtime = pullbox_tests::cri::connect_runtime(ctd.socket()).await.unwrap();
    let logs_dir = tempfile::tempdir().unwrap();
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "pb-pod".into(),
            uid: "pb-pod-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs_dir.path().display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Node as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = runtime
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(sandbox_config.clone()), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()))
        .into_inner()
        .pod_sandbox_id;
    let container = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
                image: Some(ImageSpec { image: reference.clone(), ..Default::default() }),
                command: ["/bin/busybox", "cat", &format!("/{}", app::LAYER3_FILE)].map(String::from).to_vec(),
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()))
        .into_inner()
        .container_id;
    runtime
        .start_container(StartContainerRequest { container_id: container.clone() })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let status = runtime
            .container_status(ContainerStatusRequest { container_id: container.clone(), verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if status.state == ContainerState::ContainerExited as i32 || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}\n{}", logs());
    assert_eq!(status.exit_code, 0, "{status:?}");
    // CRI's log format: `<time> stdout F <line>`.
    let log = std::fs::read_to_string(logs_dir.path().join("app.log")).unwrap();
    assert!(log.trim_end().ends_with(&format!("stdout F {}", app::LAYER3_CONTENT.trim_end())), "{log}");

    // The sandbox image came through containerd's differ onto pullbox's store, and pullbox
    // lists it although it did not pull it.
    let listed = images.list_images(ListImagesRequest::default()).await.unwrap().into_inner().images;
    let tags: Vec<&String> = listed.iter().flat_map(|i| &i.repo_tags).collect();
    assert!(tags.contains(&&pause) && tags.contains(&&reference), "{tags:?}");

    // containerd's own pull of another image onto pullbox's snapshotter, after the CRI pull.
    let zstd = &f.app_zstd.reference;
    let pull = ctd.ctr(&["images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, zstd]).unwrap();
    assert!(pull.success(), "{pull}\n{}", logs());
    assert_eq!(cat_layer3(&ctd, "k8s.io", zstd, "pb-zstd-1"), app::LAYER3_CONTENT);

    // Removing the pod and every image reclaims pullbox's store.
    runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    runtime.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    for image in ctd.list("k8s.io", "images").unwrap() {
        ctd.ctr_ok("k8s.io", &["images", "rm", &image]).unwrap();
    }
    ctd.collect("k8s.io").unwrap();
    let root = daemon.root();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !snapshot_dirs(&root).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(snapshot_dirs(&root).is_empty(), "left in pullbox's store: {:?}\n{}", snapshot_dirs(&root), logs());
}

/// A proxy-mode pull of the app image through a gate that holds layer 2 halfway: pullbox's
/// daemon and containerd, and the pull in flight, once layer 1's snapshot is committed and
/// layer 2's prepared on pullbox's store.
struct HeldPull {
    gate: FaultServer,
    _sock_dir: tempfile::TempDir,
    ctd: Containerd,
    daemon: Daemon,
    reference: String,
    pull: tokio::task::JoinHandle<Result<tonic::Response<k8s_cri::v1::PullImageResponse>, tonic::Status>>,
}

impl HeldPull {
    fn start() -> HeldPull {
        let f = fixture();
        let gate = FaultServer::proxy(f.registry.addr()).unwrap();
        let layer2 = &f.app.layers[1];
        gate.hold(&layer2.digest, layer2.size / 2);
        let (sock_dir, socket) = snapshotter_socket();
        let ctd = Containerd::start_with_proxy(SNAPSHOTTER, &socket).unwrap();
        let daemon = Daemon::start(&proxy_mode_config(&ctd, &socket)).unwrap();
        let reference = format!("{}/{}:1.0", gate.addr(), f.app.path());
        let cri = daemon.socket().to_owned();
        let request = pull_request(&reference);
        let pull =
            tokio::spawn(async move { pullbox_tests::cri::connect(&cri).await.unwrap().pull_image(request).await });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(gate.held() == 1 && snapshot_dirs(&daemon.root()).len() >= 2) {
            assert!(std::time::Instant::now() < deadline, "the pull never reached layer 2:\n{}", daemon.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        HeldPull { gate, _sock_dir: sock_dir, ctd, daemon, reference, pull }
    }

    /// Lets the rest of layer 2 through.
    fn release(&self) {
        self.gate.release(&fixture().app.layers[1].digest);
    }

    /// After a crash: the same pull succeeds, and once containerd's collector ran no lease
    /// and no partial download is left, pullbox's store holds exactly the image's layers, and
    /// a container of the image runs (under the container ID `id`).
    async fn pull_again_and_check_nothing_is_left(&self, id: &str) {
        let (ctd, daemon) = (&self.ctd, &self.daemon);
        let mut client = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
        let pulled = client
            .pull_image(pull_request(&self.reference))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\npullbox log:\n{}\ncontainerd log:\n{}", daemon.log(), ctd.log()));
        assert_eq!(pulled.into_inner().image_ref, fixture().app.config_digest);

        ctd.collect("k8s.io").unwrap();
        assert_eq!(ctd.list("k8s.io", "leases").unwrap(), Vec::<String>::new(), "{}", daemon.log());
        let active = ctd.ctr_ok("k8s.io", &["content", "active"]).unwrap();
        assert_eq!(active.lines().skip(1).count(), 0, "{active}");
        let root = daemon.root();
        assert_eq!(snapshot_dirs(&root).len(), app::LAYERS, "{:?}\n{}", snapshot_dirs(&root), daemon.log());
        assert_eq!(cat_layer3(ctd, "k8s.io", &self.reference, id), app::LAYER3_CONTENT);
    }
}

/// A pullbox killed (SIGKILL) in the middle of a proxy-mode pull, with layer 1 committed and
/// layer 2 half unpacked into the snapshot containerd prepared on pullbox's store: the next
/// start and containerd's collector leave nothing behind, and the same pull then succeeds
/// and runs.
#[tokio::test(flavor = "multi_thread")]
async fn killed_daemon_mid_pull_is_repaired_by_the_next_start() {
    let mut held = HeldPull::start();
    held.daemon.kill().unwrap();
    assert!((&mut held.pull).await.unwrap().is_err(), "the pull's connection went with the daemon");
    // What the crash left: the dead process's lease in containerd, holding layer 1's
    // committed snapshot and layer 2's active one, both in pullbox's store.
    assert!(!held.ctd.list("k8s.io", "leases").unwrap().is_empty());
    assert!(snapshot_dirs(&held.daemon.root()).len() >= 2);

    held.release();
    held.daemon.restart().unwrap();
    held.pull_again_and_check_nothing_is_left("pb-crash-1").await;
}

/// containerd killed (SIGKILL) in the middle of a proxy-mode pull, with layer 1 committed and
/// layer 2 half unpacked into the snapshot it prepared on pullbox's store, while pullbox keeps
/// running: the pull fails with a clear error; once containerd is started again on the same
/// root, the same pull succeeds and runs, the failed pull's lease is gone (pullbox could not
/// delete it while containerd was down) and, after containerd's collector, pullbox's store
/// holds exactly the image's layers.
#[tokio::test(flavor = "multi_thread")]
async fn killed_containerd_mid_pull_leaves_nothing_once_it_is_back() {
    let mut held = HeldPull::start();
    held.ctd.crash().unwrap();
    // The rest of layer 2 arrives for a content write containerd's crash cut off.
    held.release();
    let failed = (&mut held.pull).await.unwrap().expect_err("the pull outlived containerd's crash");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}\n{}", held.daemon.log());
    assert!(failed.message().contains("containerd"), "{failed:?}");
    held.ctd.restart().unwrap();
    // What the crash left in containerd's database: the failed pull's lease (pullbox could
    // not delete it while containerd was down), holding layer 1's committed snapshot and
    // layer 2's active one.
    assert!(!held.ctd.list("k8s.io", "leases").unwrap().is_empty());

    held.pull_again_and_check_nothing_is_left("pb-ctd-crash-1").await;
}
