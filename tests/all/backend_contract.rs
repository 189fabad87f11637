//! The backend traits' contract, through pullbox's library, against both backends: the
//! embedded store (in a temporary root) and a real containerd (the harness's shared
//! containerd, a fresh namespace per test).
//!
//! What a puller and the image service rely on, whichever backend stores the images:
//! content writes are checked against the expected size and digest before they become
//! visible, and resume; a deleted lease's objects are collected while a lease that holds them
//! keeps them; snapshots go active → committed, with views and removal rules; the differ
//! applies layers and returns their diff IDs; image records are created, updated and deleted.
//! A backend that differs in one of these answers breaks pullers written against the other.
//!
//! containerd collects synchronously when a lease is deleted; the embedded store when asked
//! ([`pullbox::backend::Leases::collect`]). The contract is the union: after a delete and a
//! collection, what only that lease held is gone. Needs root (containerd).

use std::io::Write;

use pullbox::{
    backend::{containerd, embedded, Backend, Held, ImageRecord, SnapshotKind},
    error::{Code, Error},
    oci::{Descriptor, Digest},
};
use pullbox_tests::{
    blobs::{descriptor, noise, write_blob},
    containerd::{fresh_namespace, shared, Containerd},
};
use tokio::io::AsyncReadExt;

/// One backend under test.
struct Subject {
    name: &'static str,
    backend: Backend,
    /// The containerd and namespace of the containerd backend.
    containerd: Option<(&'static Containerd, String)>,
    /// The embedded store's root, deleted at the end.
    _root: Option<tempfile::TempDir>,
}

/// The embedded store in a fresh root, and containerd in a fresh namespace.
async fn subjects() -> Vec<Subject> {
    let root = tempfile::tempdir().unwrap();
    let embedded = Subject {
        name: "embedded",
        backend: embedded::open(root.path()).unwrap(),
        containerd: None,
        _root: Some(root),
    };
    let ctd = shared().unwrap();
    let namespace = fresh_namespace();
    let config =
        containerd::Config { address: ctd.socket().to_owned(), namespace: namespace.clone(), ..Default::default() };
    let backend = containerd::connect(&config).await.expect("connecting to containerd");
    let containerd = Subject { name: "containerd", backend, containerd: Some((ctd, namespace)), _root: None };
    vec![embedded, containerd]
}

/// Whether blob `digest` is in the store.
async fn stored(b: &Backend, digest: &Digest) -> bool {
    match b.content.info(digest).await {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => panic!("info {digest}: {e}"),
    }
}

/// Content: streamed and bounded reads, writes checked against size and digest, resume,
/// truncate, labels, delete.
#[tokio::test(flavor = "multi_thread")]
async fn content_store_contract() {
    for s in subjects().await {
        let (b, name) = (&s.backend, s.name);
        let lease = b.leases.create().await.unwrap();

        // 9 MiB + a bit, in odd chunks: more than containerd's write window.
        let data = noise(9 * 1024 * 1024 + 4321, 1);
        let desc = descriptor("application/octet-stream", &data);
        write_blob(b, &desc, &data, &lease, 65_519).await;
        assert_eq!(b.content.info(&desc.digest).await.unwrap().size, data.len() as u64, "{name}");
        assert_eq!(b.content.read(&desc.digest, 7, 5).await.unwrap(), &data[7..12], "{name}");
        let tail = b.content.read(&desc.digest, data.len() as u64 - 3, 1000).await.unwrap();
        assert_eq!(tail, &data[data.len() - 3..], "{name}");
        let past = b.content.read(&desc.digest, 1 << 40, 10).await;
        assert!(matches!(past, Err(Error::InvalidArgument(_))), "{name}: a read past the end: {past:?}");
        assert_eq!(b.content.read(&desc.digest, data.len() as u64, 10).await.unwrap(), Vec::<u8>::new(), "{name}");
        assert_eq!(b.content.read(&desc.digest, 0, 0).await.unwrap(), Vec::<u8>::new(), "{name}");
        let mut all = Vec::new();
        b.content.open(&desc.digest).await.unwrap().read_to_end(&mut all).await.unwrap();
        assert!(all == data, "{name}: streamed read differs");

        // Writing it again: already there.
        let err = b.content.writer(&desc, &lease).await.err().unwrap();
        assert!(matches!(err, Error::AlreadyExists(_)), "{name}: {err}");

        // Interrupted: the next writer resumes where the ingest ends.
        let data = noise(3 * 1024 * 1024 + 17, 2);
        let desc = descriptor("application/vnd.oci.image.layer.v1.tar", &data);
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(&data[..2 * 1024 * 1024 + 5]).await.unwrap();
        drop(w);
        if let Some((ctd, ns)) = &s.containerd {
            let active = ctd.ctr_ok(ns, &["content", "active"]).unwrap();
            assert!(active.contains(&format!("layer-{}", desc.digest)), "{active}");
        }
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        let offset = w.offset() as usize;
        assert!(offset > 0 && offset <= 2 * 1024 * 1024 + 5, "{name}: resumed at {offset}");
        w.write(&data[offset..]).await.unwrap();
        assert_eq!(w.commit().await.unwrap().digest, desc.digest, "{name}");

        // truncate restarts from zero.
        let data = b"restart me".to_vec();
        let desc = descriptor("application/octet-stream", &data);
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(b"garbage").await.unwrap();
        w.truncate().await.unwrap();
        assert_eq!(w.offset(), 0, "{name}");
        w.write(&data).await.unwrap();
        w.commit().await.unwrap();

        // Mismatches: nothing becomes visible, and nothing is resumed from the bad bytes.
        let data = noise(300_000, 3);
        let desc = descriptor("application/octet-stream", &data);
        let mut wrong = data.clone();
        wrong[299_999] ^= 1;
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        w.write(&wrong).await.unwrap();
        let err = w.commit().await.err().unwrap();
        assert!(matches!(&err, Error::Mismatch { .. }), "{name}: wrong digest: {err}");
        assert!(!stored(b, &desc.digest).await, "{name}");
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        assert_eq!(w.offset(), 0, "{name}: the mismatched ingest was resumed");
        w.write(&data[..1000]).await.unwrap();
        assert!(matches!(w.commit().await, Err(Error::Mismatch { .. })), "{name}: too short");
        let mut w = b.content.writer(&desc, &lease).await.unwrap();
        assert_eq!(w.offset(), 0, "{name}");
        w.write(&data[..299_000]).await.unwrap();
        let err = w.write(&data[..2000]).await.err().unwrap();
        assert!(matches!(&err, Error::Mismatch { .. }), "{name}: too long: {err}");
        assert_eq!(w.offset(), 0, "{name}");
        w.write(&data).await.unwrap();
        w.commit().await.unwrap();

        // Labels; an empty value removes one.
        let labels = [("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())].into();
        assert_eq!(b.content.set_labels(&desc.digest, &labels).await.unwrap().labels, labels, "{name}");
        let info = b.content.set_labels(&desc.digest, &[("a".to_owned(), String::new())].into()).await.unwrap();
        assert_eq!(info.labels, [("b".to_owned(), "2".to_owned())].into(), "{name}");
        assert_eq!(b.content.info(&desc.digest).await.unwrap(), info, "{name}");

        // Delete.
        b.content.delete(&desc.digest).await.unwrap();
        assert!(!stored(b, &desc.digest).await, "{name}");
        assert!(matches!(b.content.delete(&desc.digest).await, Err(Error::NotFound(_))), "{name}");
        assert!(matches!(b.content.read(&desc.digest, 0, 10).await, Err(Error::NotFound(_))), "{name}");
        assert!(matches!(b.content.set_labels(&desc.digest, &labels).await, Err(Error::NotFound(_))), "{name}");
        b.leases.delete(&lease).await.unwrap();
    }
}

/// A second writer of a blob waits for the first, then finds the blob committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_waits_for_the_first() {
    for s in subjects().await {
        let (b, name) = (&s.backend, s.name);
        let lease = b.leases.create().await.unwrap();
        let data = noise(100_000, 4);
        let desc = descriptor("application/octet-stream", &data);
        let mut first = b.content.writer(&desc, &lease).await.unwrap();
        first.write(&data[..50_000]).await.unwrap();

        let content = b.content.clone();
        let (desc2, lease2) = (desc.clone(), b.leases.create().await.unwrap());
        let second = tokio::spawn(async move { content.writer(&desc2, &lease2).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!second.is_finished(), "{name}: the second writer must wait");

        first.write(&data[50_000..]).await.unwrap();
        first.commit().await.unwrap();
        let err = second.await.unwrap().err().unwrap();
        assert!(matches!(err, Error::AlreadyExists(_)), "{name}: {err}");
        b.leases.delete(&lease).await.unwrap();
    }
}

/// Leases: deleting one (and collecting) frees what only it held; a lease that holds a blob
/// or snapshot another lease wrote keeps it; a deleted lease is gone.
#[tokio::test(flavor = "multi_thread")]
async fn lease_deletion_collects_what_only_it_held() {
    for s in subjects().await {
        let (b, name) = (&s.backend, s.name);
        let lease = b.leases.create().await.unwrap();
        let data = noise(10_000, 5);
        let desc = descriptor("application/octet-stream", &data);
        write_blob(b, &desc, &data, &lease, 4096).await;
        b.leases.collect().await.unwrap();
        assert!(stored(b, &desc.digest).await, "{name}: collected under a live lease");
        b.leases.delete(&lease).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(!stored(b, &desc.digest).await, "{name}: outlived its lease");
        assert!(matches!(b.leases.delete(&lease).await, Err(Error::NotFound(_))), "{name}");

        // A blob and a snapshot another lease holds (as a pull holds what it found stored)
        // outlive the lease that wrote them, and go with the holder.
        let (writer, reader) = (b.leases.create().await.unwrap(), b.leases.create().await.unwrap());
        let data = noise(12_000, 7);
        let desc = descriptor("application/octet-stream", &data);
        write_blob(b, &desc, &data, &writer, 4096).await;
        b.snapshots.prepare("held-active", "", &writer).await.unwrap();
        b.snapshots.commit("held", "held-active", &writer).await.unwrap();
        b.leases.hold(&reader, Held::Content(&desc.digest)).await.unwrap();
        b.leases.hold(&reader, Held::Snapshot(b.snapshots.name(), "held")).await.unwrap();
        b.leases.delete(&writer).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(stored(b, &desc.digest).await, "{name}: a held blob was collected");
        assert!(b.snapshots.stat("held").await.is_ok(), "{name}: a held snapshot was collected");
        b.leases.delete(&reader).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(!stored(b, &desc.digest).await, "{name}");
        assert!(matches!(b.snapshots.stat("held").await, Err(Error::NotFound(_))), "{name}");
    }
}

/// A gzip layer of one file, and its diff ID.
fn layer(path: &str, contents: &[u8]) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(contents.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, path, contents).unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = Digest::sha256_of(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Snapshots and the differ: prepare, apply, commit, stat, view, mounts, usage, remove, and
/// their errors.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_and_differ_contract() {
    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    for subject in subjects().await {
        let (b, name) = (&subject.backend, subject.name);
        let s = &b.snapshots;
        assert_eq!(s.name(), "overlayfs", "{name}");
        let lease = b.leases.create().await.unwrap();

        let (blob, diff_id) = layer("hello.txt", b"hello from a layer\n");
        let desc = descriptor(GZIP, &blob);
        write_blob(b, &desc, &blob, &lease, 1000).await;
        let mounts = s.prepare("extract-1", "", &lease).await.unwrap();
        assert_eq!(s.mounts("extract-1").await.unwrap(), mounts, "{name}");
        assert_eq!(s.stat("extract-1").await.unwrap().kind, SnapshotKind::Active, "{name}");
        assert!(matches!(s.prepare("extract-1", "", &lease).await, Err(Error::AlreadyExists(_))), "{name}");
        assert_eq!(b.differ.apply(&desc, &mounts).await.unwrap(), diff_id, "{name}");
        s.commit("base", "extract-1", &lease).await.unwrap();
        assert!(matches!(s.stat("extract-1").await, Err(Error::NotFound(_))), "{name}");
        let info = s.stat("base").await.unwrap();
        assert_eq!((info.name.as_str(), info.parent.as_str(), info.kind), ("base", "", SnapshotKind::Committed));
        let err = s.mounts("base").await.err().unwrap();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{name}: {err}");
        let usage = s.usage("base").await.unwrap();
        assert!(usage.size > 0 && usage.inodes >= 1, "{name}: {usage:?}");

        // A second layer on top, a view, removal order.
        let (blob2, diff_id2) = layer("second.txt", b"second\n");
        let desc2 = descriptor(GZIP, &blob2);
        write_blob(b, &desc2, &blob2, &lease, 100).await;
        let mounts = s.prepare("extract-2", "base", &lease).await.unwrap();
        assert_eq!(b.differ.apply(&desc2, &mounts).await.unwrap(), diff_id2, "{name}");
        s.commit("top", "extract-2", &lease).await.unwrap();
        assert_eq!(s.stat("top").await.unwrap().parent, "base", "{name}");
        let view = s.view("v-top", "top", &lease).await.unwrap();
        assert!(!view.is_empty(), "{name}");
        assert_eq!(s.stat("v-top").await.unwrap().kind, SnapshotKind::View, "{name}");
        assert!(matches!(s.prepare("x", "nope", &lease).await, Err(Error::NotFound(_))), "{name}");
        let err = s.remove("base").await.err().unwrap();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{name}: a snapshot with children: {err}");
        for key in ["v-top", "top", "base"] {
            s.remove(key).await.unwrap();
        }
        assert!(matches!(s.remove("base").await, Err(Error::NotFound(_))), "{name}");
        assert!(matches!(s.stat("base").await, Err(Error::NotFound(_))), "{name}");

        // A layer that is not gzip although its media type says so: an error, not a diff ID.
        let bad = b"not a gzip stream at all".to_vec();
        let bad_desc = descriptor(GZIP, &bad);
        write_blob(b, &bad_desc, &bad, &lease, 100).await;
        let mounts = s.prepare("extract-bad", "", &lease).await.unwrap();
        let err = b.differ.apply(&bad_desc, &mounts).await.err().unwrap();
        assert!(
            matches!(&err, Error::BadLayer { layer, .. } if *layer == bad_desc.digest.to_string()),
            "{name}: {err:?}"
        );
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}");
        s.remove("extract-bad").await.unwrap();
        // A layer that is not in the content store.
        let missing = descriptor("application/vnd.oci.image.layer.v1.tar", b"absent");
        let mounts = s.prepare("extract-missing", "", &lease).await.unwrap();
        let err = b.differ.apply(&missing, &mounts).await.err().unwrap();
        assert!(matches!(err, Error::NotFound(_)), "{name}: {err}");
        s.remove("extract-missing").await.unwrap();

        // What the lease still held goes with it.
        s.prepare("left-active", "", &lease).await.unwrap();
        b.leases.delete(&lease).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(matches!(s.stat("left-active").await, Err(Error::NotFound(_))), "{name}");
        assert!(!stored(b, &desc.digest).await, "{name}");
        if let Some((ctd, ns)) = &subject.containerd {
            assert!(ctd.list(ns, "snapshots").unwrap().is_empty(), "{name}");
        }
    }
}

/// Image records: create, get, list, update, delete, and their errors.
#[tokio::test(flavor = "multi_thread")]
async fn image_store_contract() {
    for s in subjects().await {
        let (b, name) = (&s.backend, s.name);
        let lease = b.leases.create().await.unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let target = descriptor("application/vnd.oci.image.manifest.v1+json", manifest);
        write_blob(b, &target, manifest, &lease, 100).await;
        let record = |name: &str, target: &Descriptor| ImageRecord {
            name: name.into(),
            target: target.clone(),
            labels: [("io.cri-containerd.image".to_owned(), "managed".to_owned())].into(),
            created_at: 0,
            updated_at: 0,
        };
        let created = b.images.create(record("example.com/b:1", &target)).await.unwrap();
        assert!(created.created_at > 0 && created.updated_at >= created.created_at, "{name}: {created:?}");
        assert_eq!(created.target, target, "{name}");
        let err = b.images.create(record("example.com/b:1", &target)).await.err().unwrap();
        assert!(matches!(err, Error::AlreadyExists(_)), "{name}: {err}");
        b.images.create(record("example.com/a:1", &target)).await.unwrap();
        assert_eq!(b.images.get("example.com/b:1").await.unwrap(), created, "{name}");
        let names: Vec<_> = b.images.list().await.unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["example.com/a:1", "example.com/b:1"], "{name}");

        let other = descriptor("application/vnd.oci.image.manifest.v1+json", br#"{"schemaVersion":2,"x":1}"#);
        let mut changed = record("example.com/b:1", &other);
        changed.labels.insert("k".into(), "v".into());
        let updated = b.images.update(changed.clone()).await.unwrap();
        assert_eq!(updated.created_at, created.created_at, "{name}");
        assert!(updated.updated_at >= created.updated_at, "{name}");
        assert_eq!((updated.target.clone(), updated.labels.clone()), (other, changed.labels), "{name}");
        let err = b.images.update(record("example.com/nope:1", &target)).await.err().unwrap();
        assert!(matches!(err, Error::NotFound(_)), "{name}: {err}");

        // An image record keeps its target after the lease that wrote it is gone.
        b.leases.delete(&lease).await.unwrap();
        b.leases.collect().await.unwrap();
        assert!(stored(b, &target.digest).await, "{name}: an image's manifest was collected");

        for image in ["example.com/a:1", "example.com/b:1"] {
            b.images.delete(image).await.unwrap();
        }
        assert!(matches!(b.images.get("example.com/b:1").await, Err(Error::NotFound(_))), "{name}");
        assert!(matches!(b.images.delete("example.com/b:1").await, Err(Error::NotFound(_))), "{name}");
        b.leases.collect().await.unwrap();
        assert!(!stored(b, &target.digest).await, "{name}: a deleted image's manifest outlived it");
    }
}
