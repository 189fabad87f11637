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
    let daemon = cri::Daemon::start(&ctd.pullbox_config())
    .unwrap();
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
        .ctr_ok("k8s.io", &["run", "--rm", &reference, "pullbox-run-test", "/bin/sh", "-c", "echo hello from containerd"])
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
