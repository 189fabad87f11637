//! The store suite: concurrency.

use super::*;

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
