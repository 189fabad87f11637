//! Production shape: `pullbox serve` with the containerd backend beside a real containerd
//! (Debian's 1.6 with runc), driven over CRI by the `k8s-cri` client. containerd's own CRI
//! service, on containerd's socket, is the reference: both must describe the image alike, and
//! containerd must be able to run what pullbox pulled. Needs root (CI runs as root).

use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};
use pullbox_tests::{chain_id, containerd::Containerd, cri, fixture};

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() })
}

fn status_req(image: &str) -> ImageStatusRequest {
    ImageStatusRequest { image: spec(image), verbose: false }
}

#[tokio::test(flavor = "multi_thread")]
async fn pullbox_pulls_into_containerd_and_containerd_agrees() {
    let f = fixture();
    let ctd = Containerd::start().unwrap();
    ctd.allow_plain_http(f.registry.addr()).unwrap();
    let daemon = cri::Daemon::start(&ctd.pullbox_config()).unwrap();
    let mut pullbox = cri::connect(daemon.socket()).await.unwrap();
    let mut reference_cri = cri::connect(ctd.socket()).await.unwrap();
    let reference = f.reference("team/app:1.0");

    let pulled = pullbox
        .pull_image(PullImageRequest { image: spec(&reference), ..PullImageRequest::default() })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, f.app.config_digest);

    // containerd runs it.
    let out = ctd
        .ctr_ok(
            "k8s.io",
            &["run", "--rm", &reference, "pullbox-run-test", "/bin/sh", "-c", "echo hello from containerd"],
        )
        .unwrap();
    assert_eq!(out.trim(), "hello from containerd");

    // containerd's own CRI adopts the image (label io.cri-containerd.image=managed) and
    // describes it as pullbox does.
    let ours = pullbox.image_status(status_req(&reference)).await.unwrap().into_inner().image.unwrap();
    let mut theirs = None;
    for _ in 0..100 {
        theirs = reference_cri.image_status(status_req(&reference)).await.unwrap().into_inner().image;
        if theirs.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let theirs = theirs.expect("containerd's CRI sees the image pullbox pulled");
    assert_eq!(ours.id, theirs.id);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(ours.repo_tags.clone()), sorted(theirs.repo_tags.clone()));
    assert_eq!(sorted(ours.repo_digests.clone()), sorted(theirs.repo_digests.clone()));
    assert_eq!(ours.size, theirs.size, "size as containerd's CRI counts it");
    assert_eq!(ours.uid, theirs.uid);

    // The top snapshot is the chain ID, committed in containerd's snapshotter.
    let snapshots = ctd.list("k8s.io", "snapshots").unwrap();
    assert!(snapshots.contains(&chain_id(&f.app.diff_ids)), "{snapshots:?}");

    // RemoveImage through pullbox: records gone, containerd's GC reclaims content.
    pullbox.remove_image(RemoveImageRequest { image: spec(&reference) }).await.unwrap();
    assert!(pullbox.image_status(status_req(&reference)).await.unwrap().into_inner().image.is_none());
    let images = ctd.list("k8s.io", "images").unwrap();
    assert!(images.is_empty(), "{images:?}");
    let content = ctd.list("k8s.io", "content").unwrap();
    for layer in &f.app.layers {
        assert!(!content.contains(&layer.digest), "layer {} survived GC: {content:?}", layer.digest);
    }
}

/// A CRI pull for a runtime handler (`ImageSpec.runtime_handler`).
fn for_handler(image: &str, handler: &str) -> PullImageRequest {
    let spec = ImageSpec { image: image.to_owned(), runtime_handler: handler.to_owned(), ..ImageSpec::default() };
    PullImageRequest { image: Some(spec), ..PullImageRequest::default() }
}

/// The default puller's `runtimePlatforms` (containerd's `runtime_platforms` and per-runtime
/// snapshotter): a runtime handler's pulls pick its platform from an index and unpack into
/// its snapshotter, one the operator offers (`containerd.snapshotters`); containerd runs the
/// image from that snapshotter, and status and list find it there.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_handlers_get_their_platform_and_snapshotter() {
    let f = fixture();
    let ctd = Containerd::start().unwrap();
    ctd.allow_plain_http(f.registry.addr()).unwrap();
    let settings = pullbox_tests::policy::SettingsFile::new(
        r#"{"runtimePlatforms": {
            "kata": {"platform": "linux/arm64", "snapshotter": "native"},
            "wasm": {"snapshotter": "native"}
        }}"#,
    );
    let config = format!(
        "settings = {:?}\n{}snapshotters = [\"native\"]\n",
        settings.path().display().to_string(),
        ctd.pullbox_config()
    );
    let daemon = cri::Daemon::start(&config).unwrap();
    let mut pullbox = cri::connect(daemon.socket()).await.unwrap();
    let native = |ctd: &Containerd| ctd.ctr_ok("k8s.io", &["snapshots", "--snapshotter", "native", "ls"]).unwrap();
    let overlay = |ctd: &Containerd| ctd.list("k8s.io", "snapshots").unwrap();

    // `wasm`: the host's platform, unpacked into `native`; containerd runs it from there.
    let app = f.reference("team/app:1.0");
    let pulled = pullbox
        .pull_image(for_handler(&app, "wasm"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, f.app.config_digest);
    let top = chain_id(&f.app.diff_ids);
    assert!(native(&ctd).contains(&top), "{}", native(&ctd));
    assert!(!overlay(&ctd).contains(&top), "nothing unpacked into overlayfs");
    let out = ctd
        .ctr_ok(
            "k8s.io",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "native",
                &app,
                "pullbox-native-run",
                "/bin/sh",
                "-c",
                "echo from native",
            ],
        )
        .unwrap();
    assert_eq!(out.trim(), "from native");
    let status = pullbox.image_status(status_req(&app)).await.unwrap().into_inner().image;
    assert_eq!(status.map(|i| i.id), Some(f.app.config_digest.clone()), "READY from the native snapshot");

    // `kata`: the index's arm64 image, also into `native`.
    let multi = &f.multi;
    let arm64 = &multi.images.iter().find(|(p, _)| p.architecture == "arm64").expect("arm64 entry").1;
    let pulled = pullbox.pull_image(for_handler(&multi.reference, "kata")).await.unwrap().into_inner();
    assert_eq!(pulled.image_ref, arm64.config_digest);
    let listed = pullbox.list_images(k8s_cri::v1::ListImagesRequest::default()).await.unwrap().into_inner().images;
    let mut ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    let mut want = vec![f.app.config_digest.as_str(), arm64.config_digest.as_str()];
    want.sort();
    assert_eq!(ids, want, "both images READY in native");

    // The default handler: the host's platform, into the default snapshotter.
    let pulled = pullbox.pull_image(for_handler(&multi.reference, "")).await.unwrap().into_inner();
    assert_eq!(pulled.image_ref, f.app.config_digest, "the amd64 entry is app's manifest");
    assert!(overlay(&ctd).contains(&top), "{:?}", overlay(&ctd));

    // Removing the kata image by ID leaves the others.
    pullbox.remove_image(RemoveImageRequest { image: spec(&arm64.config_digest) }).await.unwrap();
    assert!(pullbox.image_status(status_req(&arm64.config_digest)).await.unwrap().into_inner().image.is_none());
    let status = pullbox.image_status(status_req(&app)).await.unwrap().into_inner().image;
    assert_eq!(status.map(|i| i.id), Some(f.app.config_digest.clone()));
}

/// A snapshotter the operator does not offer is refused with the names of those offered,
/// before anything is fetched; the embedded store offers only its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshotter_not_offered_is_refused() {
    let f = fixture();
    let settings =
        pullbox_tests::policy::SettingsFile::new(r#"{"runtimePlatforms": {"wasm": {"snapshotter": "native"}}}"#);
    let daemon = cri::Daemon::start(&format!("settings = {:?}", settings.path().display().to_string())).unwrap();
    let mut pullbox = cri::connect(daemon.socket()).await.unwrap();
    let e = pullbox.pull_image(for_handler(&f.reference("team/app:1.0"), "wasm")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"native\" is not offered") && e.message().contains("overlayfs"), "{e:?}");
    assert!(e.message().contains("runtime handler \"wasm\""), "{e:?}");
    let leftovers = pullbox_tests::backends::embedded_leftovers(&daemon.root());
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
