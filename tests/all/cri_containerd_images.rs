//! Every image in the namespace: with `backend = "containerd"`, pullbox's CRI `ListImages`,
//! `ImageStatus` and `RemoveImage` cover the images `ctr` pulled or imported beside it, as
//! containerd's own CRI (same socket) shows them, and stay right while `ctr` and pullbox add
//! and remove records on either side. containerd's CRI learns of records from containerd's
//! image events, a moment after they change; pullbox re-reads the records at each call, so
//! each comparison waits (up to [`SETTLE`]) for containerd's side to catch up. Needs root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{Image, ImageSpec, ImageStatusRequest, ListImagesRequest, PullImageRequest, RemoveImageRequest};
use pullbox_tests::oci::skopeo;
use pullbox_tests::{containerd::Containerd, cri, fixture};
use tonic::transport::Channel;

/// How long containerd's CRI may take to reflect a record change (its event loop handles
/// one in milliseconds).
const SETTLE: Duration = Duration::from_secs(10);

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() })
}

/// What the CRI says of an image: ID, repo tags, repo digests, size, uid, username, pinned.
type Described = (String, Vec<String>, Vec<String>, u64, Option<i64>, String, bool);

/// What the CRI says of an image, with names sorted (order is not part of the answer).
fn norm(i: &Image) -> Described {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    (
        i.id.clone(),
        sorted(&i.repo_tags),
        sorted(&i.repo_digests),
        i.size,
        i.uid.as_ref().map(|u| u.value),
        i.username.clone(),
        i.pinned,
    )
}

type Answer = BTreeMap<String, Described>;

async fn list(client: &mut ImageServiceClient<Channel>) -> Answer {
    client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images
        .iter()
        .map(|i| (i.id.clone(), norm(i)))
        .collect()
}

async fn status(client: &mut ImageServiceClient<Channel>, image: &str) -> Option<Image> {
    client.image_status(ImageStatusRequest { image: spec(image), verbose: false }).await.unwrap().into_inner().image
}

/// pullbox's `ListImages` equals containerd's once containerd's CRI has caught up, and
/// `ImageStatus` of each of `names` agrees; returns pullbox's list.
async fn agree(
    ours: &mut ImageServiceClient<Channel>,
    theirs: &mut ImageServiceClient<Channel>,
    names: &[&str],
    step: &str,
) -> Answer {
    let started = Instant::now();
    let (mut a, mut b);
    loop {
        a = list(ours).await;
        b = list(theirs).await;
        if a == b || started.elapsed() > SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a, b, "{step}: pullbox's ListImages (left) and containerd's (right)");
    for name in names {
        let x = status(ours, name).await.map(|i| norm(&i));
        let y = status(theirs, name).await.map(|i| norm(&i));
        assert_eq!(x, y, "{step}: ImageStatus {name}");
    }
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn images_of_ctr_and_pullbox_show_alike_on_both_sides() {
    let f = fixture();
    let ctd = Containerd::start().unwrap();
    ctd.allow_plain_http(f.registry.addr()).unwrap();
    let daemon = cri::Daemon::start(&ctd.pullbox_config()).unwrap();
    let mut ours = cri::connect(daemon.socket()).await.unwrap();
    let mut theirs = cri::connect(ctd.socket()).await.unwrap();
    let app_10 = f.reference("team/app:1.0");
    let app_11 = f.reference("team/app:1.1");
    let app_digest = format!("{}@{}", f.app.repo, f.app.manifest_digest);

    // 1. `ctr pull`: no pullbox label anywhere, unpacked into overlayfs.
    ctd.ctr_ok("k8s.io", &["images", "pull", "--plain-http", &app_10]).unwrap();
    let seen = agree(&mut ours, &mut theirs, &[&app_10, &f.app.config_digest], "ctr pull").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let app = &seen[&f.app.config_digest];
    assert_eq!(app.1, vec![app_10.clone()]);
    assert!(app.2.is_empty(), "ctr wrote no digest record: {app:?}");

    // 2. pullbox pulls another tag of the same image: one image with both tags.
    ours.pull_image(PullImageRequest { image: spec(&app_11), ..PullImageRequest::default() })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    let seen = agree(&mut ours, &mut theirs, &[&app_10, &app_11, &app_digest], "pullbox pull").await;
    assert_eq!(seen[&f.app.config_digest].1, vec![app_10.clone(), app_11.clone()]);

    // 3. `ctr images import` of an OCI archive of an image of its own (another config).
    f.layout.config_as("app", "app-imported", &["--config.user", "4242"]).unwrap();
    let archive = ctd.dir().join("imported.tar");
    let out = skopeo(&["copy", "--quiet"])
        .arg(format!("oci:{}", f.layout.image("app-imported")))
        .arg(format!("oci-archive:{}:1.0", archive.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported = "import.example/team/imported:1.0";
    ctd.ctr_ok(
        "k8s.io",
        &[
            "images",
            "import",
            "--base-name",
            "import.example/team/imported",
            "--digests",
            &archive.display().to_string(),
        ],
    )
    .unwrap();
    let seen = agree(&mut ours, &mut theirs, &[imported, &app_10], "ctr import").await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (imported_id, imported_image) = seen.iter().find(|(id, _)| **id != f.app.config_digest).unwrap();
    assert_eq!(imported_image.1, vec![imported.to_string()]);
    assert_eq!(imported_image.2.len(), 1, "--digests wrote a digest record: {imported_image:?}");
    assert_eq!(imported_image.4, Some(4242));

    // 4. pullbox removes the image by the name ctr gave it: every record of it goes, pullbox's
    // and ctr's.
    ours.remove_image(RemoveImageRequest { image: spec(&app_10) }).await.unwrap();
    let seen = agree(&mut ours, &mut theirs, &[&app_10, &app_11], "pullbox RemoveImage").await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec![imported_id]);
    // What is left is the imported image's: its names, and the ID record containerd's CRI
    // wrote when it adopted it.
    let left = ctd.list("k8s.io", "images").unwrap();
    assert!(left.iter().all(|n| n.starts_with("import.example/") || n == imported_id), "{left:?}");

    // 5. pullbox pulls it again; `ctr images rm` takes its records away one by one.
    ours.pull_image(PullImageRequest { image: spec(&app_10), ..PullImageRequest::default() })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    agree(&mut ours, &mut theirs, &[&app_10], "pullbox pull again").await;
    ctd.ctr_ok("k8s.io", &["images", "rm", &app_10]).unwrap();
    let seen = agree(&mut ours, &mut theirs, &[&app_10, &app_digest], "ctr rm of the tag").await;
    let app = &seen[&f.app.config_digest];
    assert!(app.1.is_empty() && app.2 == vec![app_digest.clone()], "{app:?}");
    ctd.ctr_ok("k8s.io", &["images", "rm", &app_digest, &f.app.config_digest]).unwrap();
    let seen = agree(&mut ours, &mut theirs, &[&app_digest], "ctr rm of the rest").await;
    assert_eq!(seen.len(), 1, "{seen:?}");

    // 6. pullbox removes the imported image by ID.
    ours.remove_image(RemoveImageRequest { image: spec(imported_id) }).await.unwrap();
    let seen = agree(&mut ours, &mut theirs, &[imported], "pullbox RemoveImage by ID").await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(ctd.list("k8s.io", "images").unwrap().is_empty());
}

/// A measurement, not a check (`--ignored`): `ListImages` over `PULLBOX_BENCH_UNLABELLED`
/// (default 1,000) images that `ctr images import` loaded (distinct configs over one tiny
/// layer, one archive), so that every record lacks pullbox's labels and pullbox derives each
/// image from content at every call. Prints the median and max of 21 calls, pullbox's and
/// containerd's own CRI's.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement, not a check: run it with --include-ignored --nocapture"]
async fn list_images_of_many_unlabelled_records() {
    use pullbox_tests::oci::sha256_digest;
    use serde_json::json;
    let n: usize = std::env::var("PULLBOX_BENCH_UNLABELLED").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let ctd = Containerd::start().unwrap();

    // An OCI archive: one layer, n configs and manifests, an index naming each `t<i>`.
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    layer.append_data(&mut h, "hello", &b"hello\n"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let mut blobs = vec![layer.clone()];
    let desc =
        |media: &str, bytes: &[u8]| json!({"mediaType": media, "digest": sha256_digest(bytes), "size": bytes.len()});
    let layer_desc = desc("application/vnd.oci.image.layer.v1.tar", &layer);
    let mut entries = Vec::new();
    for i in 0..n {
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": [format!("N={i}")]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]},
        })
        .to_string()
        .into_bytes();
        let manifest = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc("application/vnd.oci.image.config.v1+json", &config),
            "layers": [layer_desc],
        })
        .to_string()
        .into_bytes();
        let mut entry = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
        entry["platform"] = json!({"os": "linux", "architecture": "amd64"});
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": format!("t{i}")});
        entries.push(entry);
        blobs.extend([config, manifest]);
    }
    let index = json!({"schemaVersion": 2, "manifests": entries}).to_string();
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        archive.append_data(&mut h, path, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    for b in &blobs {
        add(&format!("blobs/sha256/{}", &sha256_digest(b)[7..]), b);
    }
    let path = ctd.dir().join("many.tar");
    std::fs::write(&path, archive.into_inner().unwrap()).unwrap();
    let t = Instant::now();
    ctd.ctr_ok("k8s.io", &["images", "import", "--base-name", "bench.example/many", &path.display().to_string()])
        .unwrap();
    eprintln!("ctr imported {n} images in {:.1} s", t.elapsed().as_secs_f64());

    let daemon = cri::Daemon::start(&ctd.pullbox_config()).unwrap();
    for (who, socket) in [("pullbox", daemon.socket()), ("containerd", ctd.socket())] {
        let mut client = cri::connect(socket).await.unwrap();
        // Wait until containerd's CRI has adopted them all (and warm pullbox's puller).
        let started = Instant::now();
        while list(&mut client).await.len() < n && started.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut times = Vec::new();
        let mut count = 0;
        for _ in 0..21 {
            let t = Instant::now();
            count = list(&mut client).await.len();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "{who}: ListImages over {count} unlabelled images: median {:.1} ms, max {:.1} ms of 21",
            times[10], times[20]
        );
        assert_eq!(count, n, "{who}");
    }
}
