//! The containerd backend against a real containerd (the harness's [`Containerd`]) and the
//! fixture registry, through pullbox's library: the backend traits directly, and the
//! [`ImageService`] with the default puller (`make build`'s `pullbox-puller.wasm`). What every
//! backend's traits do, containerd's included, is checked in `backend_contract.rs`.
//!
//! One containerd serves every test of this module (its own, not the
//! process's shared one: a test here checks that blob files left the disk, which another
//! suite's namespace could still hold); each test works in its own namespace, so
//! one test's garbage collection never finds another's images missing. Needs root. Run them
//! alone with `cargo test --release -p pullbox-tests --test all -- containerd_backend::`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use pullbox::{
    backend::{
        containerd::{connect, Config},
        Backend, LeaseId,
    },
    engine::Runtime,
    error::{Code, Error},
    oci::Platform,
    registry::{Client, Credentials, NoProgress},
    service::ImageService,
};
use pullbox_tests::{
    app,
    blobs::{descriptor, noise, write_blob},
    containerd::Containerd,
    fixture, Pullbox,
};
use tokio_util::sync::CancellationToken;

/// The containerd of this module, started on first use.
fn containerd() -> &'static Containerd {
    static CONTAINERD: OnceLock<Result<Containerd, String>> = OnceLock::new();
    CONTAINERD
        .get_or_init(|| Containerd::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("starting containerd failed: {e}"))
}

fn config(namespace: &str) -> Config {
    Config { address: containerd().socket().to_owned(), namespace: namespace.to_owned(), ..Config::default() }
}

async fn backend(namespace: &str) -> Backend {
    connect(&config(namespace)).await.expect("connecting to containerd")
}

/// The image service over the containerd backend in `namespace`, with the default puller.
async fn service(namespace: &str) -> ImageService {
    let puller_path = Pullbox::puller("pullbox-puller.wasm").unwrap();
    let runtime = Runtime::new(None, Default::default()).unwrap();
    let puller = runtime.load(&puller_path, String::new()).await.unwrap();
    ImageService::new(backend(namespace).await, Arc::new(Client::new().unwrap()), puller)
}

/// The labels `ctr content ls` shows on blob `digest` in `namespace`.
fn content_labels(ctd: &Containerd, namespace: &str, digest: &str) -> BTreeMap<String, String> {
    let out = ctd.ctr_ok(namespace, &["content", "ls"]).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with(digest))
        .unwrap_or_else(|| panic!("{digest} not in `ctr -n {namespace} content ls`:\n{out}"));
    let labels = line.rsplit('\t').next().unwrap_or_default();
    // `ctr` joins the labels with commas, and a value may hold commas too (the repositories
    // of a distribution-source label): a piece without `=` continues the value before it.
    let mut out: Vec<(String, String)> = Vec::new();
    for piece in labels.split(',') {
        match (piece.split_once('='), out.last_mut()) {
            (Some((k, v)), _) => out.push((k.to_owned(), v.to_owned())),
            (None, Some((_, v))) => {
                v.push(',');
                v.push_str(piece);
            }
            (None, None) => {}
        }
    }
    out.into_iter().collect()
}

/// The `containerd.io/gc.ref.*` labels among `labels`.
fn gc_refs(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.iter().filter(|(k, _)| k.starts_with("containerd.io/gc.ref.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The `ctr images ls` row of `name` in `namespace`, split on whitespace.
fn image_row(ctd: &Containerd, namespace: &str, name: &str) -> Vec<String> {
    let out = ctd.ctr_ok(namespace, &["images", "ls"]).unwrap();
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("{name} not in `ctr -n {namespace} images ls`:\n{out}"))
}

/// Pulls `team/app:1.0` with pullbox into `k8s.io`, runs it with `ctr run`, and compares it
/// with the same image pulled by `ctr images pull` into another namespace.
#[tokio::test(flavor = "multi_thread")]
async fn pulled_image_runs_and_matches_ctr_pull() {
    let f = fixture();
    let ctd = containerd();
    let ns = "k8s.io";
    let svc = service(ns).await;
    let reference = f.app.reference.clone();
    let info = svc
        .pull(&reference, Platform::host(), Arc::new(NoProgress), Credentials::default(), CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("pull failed: {e}\ncontainerd log:\n{}", ctd.log()));
    assert_eq!(info.id, f.app.config_digest);
    assert_eq!(info.manifest_digest, f.app.manifest_digest);
    assert_eq!(info.chain_id, f.app.chain_id());
    assert_eq!(info.repo_tags, vec![reference.clone()]);
    assert_eq!(info.repo_digests, vec![f.app.digest_reference()]);

    // containerd lists the records, with CRI's label, and pullbox's lease is gone.
    let names = ctd.list(ns, "images").unwrap();
    for name in [&reference, &f.app.digest_reference(), &f.app.config_digest] {
        assert!(names.contains(name), "{name} not among {names:?}");
    }
    let row = image_row(ctd, ns, &reference);
    assert!(row.iter().any(|c| c.contains("io.cri-containerd.image=managed")), "{row:?}");
    let leases = ctd.list(ns, "leases").unwrap();
    assert!(!leases.iter().any(|l| l.starts_with("pullbox-")), "a pullbox lease is left: {leases:?}");

    // containerd runs it.
    let run = ctd.ctr(&["run", "--rm", &reference, "pullbox-run-app", "/bin/sh", "-c", "echo hello"]).unwrap();
    run.assert_success();
    assert_eq!(run.stdout.trim(), "hello", "{run}");
    let file = format!("/{}", app::LAYER3_FILE);
    let run = ctd.ctr(&["run", "--rm", &reference, "pullbox-run-app-2", "/bin/busybox", "cat", &file]).unwrap();
    run.assert_success();
    assert_eq!(run.stdout, app::LAYER3_CONTENT, "{run}");

    // `ctr images pull` of the same reference, in another namespace: same manifest, config
    // and top snapshot, and the same garbage-collection references.
    let other = "ctr-reference";
    ctd.ctr_ok(other, &["images", "pull", "--plain-http", &reference]).unwrap();
    assert_eq!(image_row(ctd, other, &reference)[2], image_row(ctd, ns, &reference)[2]);
    assert_eq!(image_row(ctd, ns, &reference)[2], f.app.manifest_digest);
    let manifest = |namespace| ctd.ctr_ok(namespace, &["content", "get", &f.app.manifest_digest]).unwrap();
    assert_eq!(manifest(ns), manifest(other));
    let parsed: serde_json::Value = serde_json::from_str(&manifest(other)).unwrap();
    assert_eq!(parsed["config"]["digest"], info.id.as_str());
    let chain = f.app.chain_id();
    for namespace in [ns, other] {
        let snapshots = ctd.ctr_ok(namespace, &["snapshots", "ls"]).unwrap();
        assert!(
            snapshots.lines().any(|l| l.starts_with(&chain) && l.trim_end().ends_with("Committed")),
            "{chain} is not committed in {namespace}:\n{snapshots}"
        );
    }
    for digest in [&f.app.manifest_digest, &f.app.config_digest] {
        assert_eq!(
            gc_refs(&content_labels(ctd, ns, digest)),
            gc_refs(&content_labels(ctd, other, digest)),
            "GC labels of {digest} differ from containerd's"
        );
    }
    assert_eq!(
        content_labels(ctd, ns, &f.app.config_digest).get("containerd.io/gc.ref.snapshot.overlayfs"),
        Some(&chain)
    );

    // Status through the service reads it back from containerd.
    let status = svc.status(&reference).await.unwrap().expect("image is READY");
    assert_eq!(status.id, info.id);
}

/// Removing the image through the service lets containerd's collector reclaim its blobs and
/// snapshots.
#[tokio::test(flavor = "multi_thread")]
async fn removed_image_is_collected_by_containerd() {
    let f = fixture();
    let ctd = containerd();
    let ns = "pullbox-gc";
    let svc = service(ns).await;
    // zstd layers: containerd's differ decompresses them too.
    let image = &f.app_zstd;
    let info = svc
        .pull(
            &image.reference,
            Platform::host(),
            Arc::new(NoProgress),
            Credentials::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(info.id, image.config_digest);
    let content = ctd.list(ns, "content").unwrap();
    for blob in image.blobs() {
        assert!(content.contains(&blob), "{blob} not in {content:?}");
    }
    let snapshots = ctd.list(ns, "snapshots").unwrap();
    assert_eq!(snapshots.len(), app::LAYERS, "{snapshots:?}");
    let layer_file = |digest: &str| {
        ctd.root().join("io.containerd.content.v1.content/blobs/sha256").join(digest.trim_start_matches("sha256:"))
    };
    for layer in &image.layers {
        assert!(layer_file(&layer.digest).is_file());
    }

    let (removed, report) = svc.remove(&image.reference).await.unwrap();
    assert_eq!(removed, 3, "image ID, repo tag and repo digest");
    assert!(ctd.list(ns, "images").unwrap().is_empty());
    let content = ctd.list(ns, "content").unwrap();
    assert!(content.is_empty(), "content left after removal: {content:?}");
    let snapshots = ctd.list(ns, "snapshots").unwrap();
    assert!(snapshots.is_empty(), "snapshots left after removal: {snapshots:?}");
    // Only this namespace held the zstd layers: their files are gone from disk too.
    for layer in &image.layers {
        assert!(!layer_file(&layer.digest).exists(), "{} is still on disk", layer.digest);
    }
    assert_eq!(report.blobs, image.blobs().len() as u64, "{report:?}");
    assert_eq!(report.snapshots, app::LAYERS as u64, "{report:?}");
    assert!(report.bytes > 0, "{report:?}");
    // And the service no longer knows it.
    assert!(svc.status(&image.reference).await.unwrap().is_none());
}

/// Leases: their labels, what deleting one frees, and collection of a dead owner's lease. (What
/// every backend's leases, content, snapshots and images do is in `backend_contract.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn leases_hold_and_release_and_dead_owners_are_collected() {
    let ctd = containerd();
    let ns = "pullbox-leases";
    let b = backend(ns).await;

    // A lease carries an expiry and its owner.
    let lease = b.leases.create().await.unwrap();
    let out = ctd.ctr_ok(ns, &["leases", "ls"]).unwrap();
    let line = out.lines().find(|l| l.starts_with(&lease.0)).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("containerd.io/gc.expire="), "{line}");
    assert!(line.contains("pullbox.io/owner="), "{line}");
    assert!(line.contains(&format!("/{}/", std::process::id())), "{line}");

    // What only a lease holds goes when it is deleted (synchronously).
    let data = noise(10_000, 5);
    let desc = descriptor("application/octet-stream", &data);
    write_blob(&b, &desc, &data, &lease, 4096).await;
    b.leases.collect().await.unwrap();
    assert!(b.content.info(&desc.digest).await.is_ok(), "collected under a live lease");
    b.leases.delete(&lease).await.unwrap();
    assert!(matches!(b.content.info(&desc.digest).await, Err(Error::NotFound(_))));
    assert!(matches!(b.leases.delete(&lease).await, Err(Error::NotFound(_))));

    // A lease of a process that is gone is deleted by the next collection, and what it held
    // is collected; a lease of a live process stays.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let pid_ns = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/pid").unwrap());
    let owner = format!("pullbox.io/owner={}/{pid_ns}/{dead_pid}/1", boot.trim());
    ctd.ctr_ok(ns, &["leases", "create", "--id", "pullbox-dead", &owner]).unwrap();
    let live = b.leases.create().await.unwrap();
    let data = noise(20_000, 6);
    let desc = descriptor("application/octet-stream", &data);
    write_blob(&b, &desc, &data, &LeaseId("pullbox-dead".into()), 4096).await;
    let report = b.leases.collect().await.unwrap();
    assert_eq!(report.leases, 1, "{report:?}");
    assert!(report.blobs >= 1 && report.bytes >= 20_000, "{report:?}");
    let leases = ctd.list(ns, "leases").unwrap();
    assert!(!leases.contains(&"pullbox-dead".to_owned()), "{leases:?}");
    assert!(leases.contains(&live.0), "{leases:?}");
    assert!(matches!(b.content.info(&desc.digest).await, Err(Error::NotFound(_))));
    b.leases.delete(&live).await.unwrap();
}

/// `connect` says what is wrong: no containerd, no such snapshotter, a bad namespace.
#[tokio::test(flavor = "multi_thread")]
async fn connect_reports_misconfiguration() {
    containerd();
    let mut c = config("default");
    c.address = "/nonexistent/containerd.sock".into();
    let err = connect(&c).await.err().unwrap();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("/nonexistent/containerd.sock"), "{err}");

    let mut c = config("default");
    c.snapshotter = "no-such-snapshotter".into();
    let err = connect(&c).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("no-such-snapshotter"), "{err}");

    let err = connect(&config("not a namespace")).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

/// Through a counting proxy: a re-pull of an unchanged tag sends `HEAD` and no manifest `GET`,
/// and every blob pullbox wrote carries containerd's `distribution.source` label for the
/// repository (what `ctr content ls` shows and Spegel reads); resolving the same manifest in a
/// second repository adds that repository to its label, comma-separated. (Blobs the second
/// pull finds stored and does not download keep their label.)
///
/// A plain test with a runtime of its own: the proxy runs its own runtime, which may not be
/// dropped inside another's.
#[test]
fn re_pulls_send_head_only_and_blobs_carry_distribution_source_labels() {
    let proxy = pullbox_tests::fault_server::FaultServer::proxy(fixture().registry.addr()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(head_and_labels(&proxy));
}

async fn head_and_labels(proxy: &pullbox_tests::fault_server::FaultServer) {
    let f = fixture();
    let ctd = containerd();
    let ns = "pullbox-registry";
    let svc = service(ns).await;
    let reference = f.app.reference.replacen(f.registry.addr(), proxy.addr(), 1);
    let pull = |reference: String| {
        let svc = &svc;
        async move {
            svc.pull(
                &reference,
                Platform::host(),
                Arc::new(NoProgress),
                Credentials::default(),
                CancellationToken::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("pull failed: {e}\ncontainerd log:\n{}", ctd.log()))
        }
    };
    assert_eq!(pull(reference.clone()).await.id, f.app.config_digest);
    let seen = proxy.requests().len();
    pull(reference.clone()).await;
    let again: Vec<String> = proxy.requests()[seen..]
        .iter()
        .filter(|r| r.path.contains("/manifests/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(again, vec!["HEAD /v2/team/app/manifests/1.0".to_owned()]);

    let key = format!("containerd.io/distribution.source.{}", proxy.addr());
    let blobs: Vec<&String> = [&f.app.manifest_digest, &f.app.config_digest]
        .into_iter()
        .chain(f.app.layers.iter().map(|l| &l.digest))
        .collect();
    for digest in &blobs {
        let labels = content_labels(ctd, ns, digest);
        assert_eq!(labels.get(&key).map(String::as_str), Some("team/app"), "labels of {digest}: {labels:?}");
    }

    // The same manifest under another repository: it now lists both.
    let tag = format!("other-{}", std::process::id());
    let manifest = f.layout.blob(&f.app.manifest_digest).unwrap();
    assert_eq!(pullbox_tests::oci::sha256_digest(&manifest), f.app.manifest_digest);
    let copy = format!("{}/team/app-copy:{tag}", proxy.addr());
    for blob in [&f.app.config_digest].into_iter().chain(f.app.layers.iter().map(|l| &l.digest)) {
        mount_blob(f.registry.addr(), "team/app", "team/app-copy", blob);
    }
    f.registry.put_manifest("team/app-copy", &tag, pullbox_tests::oci::MEDIA_TYPE_MANIFEST, &manifest).unwrap();
    pull(copy).await;
    let labels = content_labels(ctd, ns, &f.app.manifest_digest);
    assert_eq!(labels.get(&key).map(String::as_str), Some("team/app,team/app-copy"), "{labels:?}");
}

/// Links blob `digest` of repository `from` into `to` (a cross-repository mount).
fn mount_blob(addr: &str, from: &str, to: &str, digest: &str) {
    let path = format!("/v2/{to}/blobs/uploads/?mount={digest}&from={from}");
    let (status, response) =
        pullbox_tests::registry::send(addr, "POST", &path, "application/octet-stream", b"").unwrap();
    assert_eq!(status, 201, "mount {digest} into {to}: {response}");
}
