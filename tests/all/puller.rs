//! The default puller's image metadata and fetching through the real `pullbox` binary and a
//! real registry: a second tag fetches nothing, a moved tag moves, tags and digests merge.
//!
//! Needs `make build` first. Each test pushes its own copy of the fixture image into a
//! repository no other test uses ([`pullbox_tests::policy::private_copy`]), so it can move
//! tags and delete blobs there while the other tests run.

use serde_json::Value;

use pullbox_tests::policy::{delete_blob, private_copy, pull_with, push_layout_image, SettingsFile};
use pullbox_tests::{fixture, Pullbox, RemoteImage};

fn pullbox() -> Pullbox {
    Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"))
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array in {v:#}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// Removes the config and every layer of `image` from its repository in the registry: a
/// pull that still needs any of them fails.
fn delete_config_and_layers(image: &RemoteImage) {
    let addr = fixture().registry.addr();
    delete_blob(addr, image.path(), &image.config_digest).unwrap();
    for layer in &image.layers {
        delete_blob(addr, image.path(), &layer.digest).unwrap();
    }
}

#[test]
fn a_second_tag_is_recorded_without_fetching_again() {
    let f = fixture();
    let addr = f.registry.addr();
    let one = private_copy(addr, &f.app.reference, "second-tag/app:one").unwrap();
    let two = private_copy(addr, &f.app.reference, "second-tag/app:two").unwrap();
    assert_eq!(one.manifest_digest, two.manifest_digest);
    let pb = pullbox();
    assert_eq!(pb.pull(&[], &one.reference), f.app.id());

    // The registry no longer serves config or layers: the second tag must not need them.
    delete_config_and_layers(&one);
    let out = pb.run("pull", ["--log", "puller=debug", &two.reference]);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()));
    assert!(out.stderr.contains("nothing to fetch"), "{out}");
    let info = pb.inspect(&two.reference);
    assert_eq!(strings(&info, "repoTags"), vec![one.reference.clone(), two.reference.clone()]);
    assert_eq!(strings(&info, "repoDigests"), vec![one.digest_reference()]);
    assert_eq!(pb.images_json().len(), 1);
}

#[test]
fn committed_snapshots_spare_fetching_discarded_layers() {
    let f = fixture();
    let addr = f.registry.addr();
    let one = private_copy(addr, &f.app.reference, "discarded/app:one").unwrap();
    let two = private_copy(addr, &f.app.reference, "discarded/app:two").unwrap();
    let pb = pullbox();
    let discard = SettingsFile::new(r#"{"discard_unpacked_layers": true}"#);
    pull_with(&pb, &discard, &[], &one.reference).assert_success();
    pb.run("gc", [""; 0]).assert_success();
    let blobs = pb.blob_digests().unwrap();
    assert!(one.layers.iter().all(|l| !blobs.contains(&l.digest)), "layers kept: {blobs:?}");

    // Layers gone locally and remotely; their snapshots are committed, so nothing is missing.
    for layer in &one.layers {
        delete_blob(addr, one.path(), &layer.digest).unwrap();
    }
    let out = pull_with(&pb, &discard, &["--log", "puller=debug"], &two.reference);
    out.assert_success();
    assert!(out.stderr.contains("snapshots of the lowest 3 of 3 layers are committed"), "{out}");
    assert_eq!(strings(&pb.inspect(f.app.id()), "repoTags").len(), 2);
}

#[test]
fn a_moved_tag_moves() {
    let f = fixture();
    let addr = f.registry.addr();
    let v1 = private_copy(addr, &f.app.reference, "moving/app:stable").unwrap();
    let pb = pullbox();
    let old_id = pb.pull(&[], &v1.reference);
    pb.pull(&[], &v1.digest_reference());

    // The tag now names another image (another config, so another image ID).
    let v2 = push_layout_image(&f.layout.image("app-arm64"), addr, "moving/app:stable").unwrap();
    assert_ne!(v2.id(), old_id);
    let new_id = pb.pull(&[], &v2.reference);
    assert_eq!(new_id, v2.id());

    let new = pb.inspect(&v2.reference);
    assert_eq!(new["id"], new_id.as_str());
    assert_eq!(strings(&new, "repoTags"), vec![v2.reference.clone()]);
    assert_eq!(strings(&new, "repoDigests"), vec![v2.digest_reference()]);
    // The old image lost the tag and keeps its digest.
    let old = pb.inspect(&old_id);
    assert_eq!(strings(&old, "repoTags"), Vec::<String>::new());
    assert_eq!(strings(&old, "repoDigests"), vec![v1.digest_reference()]);
    assert_eq!(pb.images_json().len(), 2);
}

#[test]
fn tags_and_digests_merge() {
    let f = fixture();
    let pb = pullbox();
    let id = pb.pull(&[], &f.app.digest_reference());
    // By digest: only the repo digest.
    let info = pb.inspect(&id);
    assert_eq!(strings(&info, "repoTags"), Vec::<String>::new());
    assert_eq!(strings(&info, "repoDigests"), vec![f.app.digest_reference()]);
    // Then two tags and the same image from two more repositories (zstd and uncompressed
    // copies: same config, same image ID, other manifests).
    for reference in [
        &f.app.reference,
        &f.app_second_tag.reference,
        &f.app.reference,
        &f.app_zstd.reference,
        &f.app_uncompressed.reference,
    ] {
        assert_eq!(pb.pull(&[], reference), id);
    }
    let info = pb.inspect(&id);
    let mut tags = vec![
        f.app.reference.clone(),
        f.app_second_tag.reference.clone(),
        f.app_zstd.reference.clone(),
        f.app_uncompressed.reference.clone(),
    ];
    tags.sort();
    assert_eq!(strings(&info, "repoTags"), tags);
    let mut digests =
        vec![f.app.digest_reference(), f.app_zstd.digest_reference(), f.app_uncompressed.digest_reference()];
    digests.sort();
    assert_eq!(strings(&info, "repoDigests"), digests);
    assert_eq!(pb.images_json().len(), 1);
}
