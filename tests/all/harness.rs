//! Tests of the harness itself: the registry, the images umoci builds and what skopeo pushes.
//! They need no pullbox binary, so they show that a failing CLI test is about pullbox, not
//! about the fixture. Run them alone with `cargo test -p pullbox-tests --test all -- harness::`.

use std::path::PathBuf;

use pullbox_tests::oci::{
    diff_id_of, EntryKind, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD,
};
use pullbox_tests::tree::Node;
use pullbox_tests::{app, chain_id, fixture, Platform, Registry};

#[test]
fn harness_registry_starts_answers_and_stops() {
    let registry = Registry::start().unwrap();
    let (status, _) = registry.get("/v2/").unwrap();
    assert_eq!(status, 200);
    let addr = registry.addr().to_owned();
    let dir = registry.dir().to_owned();
    drop(registry);
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the registry still listens on {addr}");
    // The supervisor deletes the directory right after the registry exits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dir.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn harness_builds_and_pushes_image() {
    let f = fixture();
    eprintln!("fixture built and pushed in {:?}", f.build_time);
    let image = &f.app;

    // What the registry serves is what the layout holds.
    let descriptor = f.layout.descriptor("app").unwrap();
    assert_eq!(descriptor["digest"], image.manifest_digest.as_str());
    assert_eq!(image.reference, f.reference("team/app:1.0"));
    assert_eq!(image.repo, f.reference("team/app"));

    // Three gzip layers whose uncompressed digests are the config's diff IDs, all in the
    // registry with the sizes the manifest gives.
    assert_eq!(image.layers.len(), app::LAYERS);
    assert_eq!(image.diff_ids.len(), app::LAYERS);
    for (layer, diff_id) in image.layers.iter().zip(&image.diff_ids) {
        assert_eq!(layer.media_type, MEDIA_TYPE_LAYER_GZIP);
        assert_eq!(&diff_id_of(&f.layout.blob_path(&layer.digest), &layer.media_type).unwrap(), diff_id);
        assert_eq!(f.registry.blob_size(image.path(), &layer.digest).unwrap(), Some(layer.size));
    }
    assert_eq!(f.registry.blob_size(image.path(), &image.config_digest).unwrap(), Some(image.config_size));
    assert_eq!(f.registry.blob_size(image.path(), &format!("sha256:{}", "0".repeat(64))).unwrap(), None);

    // The config carries what umoci config set.
    let config = &image.config["config"];
    assert_eq!(config["User"], app::USER);
    assert_eq!(config["Cmd"], serde_json::json!(app::CMD));
    assert_eq!(config["WorkingDir"], app::WORKDIR);
    assert!(config["Env"].as_array().unwrap().iter().any(|e| e == app::ENV));
    assert_eq!(image.config["architecture"], "amd64");
    assert_eq!(image.chain_id(), chain_id(&image.diff_ids));

    // The second tag is the same manifest.
    assert_eq!(f.app_second_tag.manifest_digest, image.manifest_digest);
    assert_eq!(f.app_second_tag.reference, f.reference("team/app:1.1"));
}

#[test]
fn harness_layers_hold_what_the_tests_expect() {
    let f = fixture();
    let entries = &f.layer_entries;
    let has = |layer: usize, path: &str, kind: EntryKind| entries[layer].contains(&(PathBuf::from(path), kind));
    assert!(has(0, "bin/busybox", EntryKind::File));
    assert!(has(0, "bin/sh", EntryKind::Symlink));
    assert!(has(0, app::LAYER1_FILE, EntryKind::File));
    assert!(has(0, app::DELETED, EntryKind::File));
    assert!(has(0, app::OVERWRITTEN, EntryKind::File));
    assert!(has(1, app::LAYER2_FILE, EntryKind::File));
    assert!(has(1, app::OVERWRITTEN, EntryKind::File));
    assert!(!has(1, app::LAYER1_FILE, EntryKind::File), "layer 2 repeats an unchanged file");
    assert!(has(2, app::DELETED, EntryKind::Whiteout), "layer 3 has no whiteout: {:?}", entries[2]);
    assert!(has(2, app::SYMLINK, EntryKind::Symlink));
    assert!(has(2, app::HARDLINK, EntryKind::File));
    assert!(has(2, app::HARDLINK_TARGET, EntryKind::File));
    assert!(has(2, app::LAYER3_FILE, EntryKind::File));

    // umoci's own unpack (the reference root filesystem) shows the merged result.
    let rootfs = &f.rootfs;
    assert!(!rootfs.contains_key(&PathBuf::from(app::DELETED)));
    assert!(
        matches!(rootfs.get(&PathBuf::from(app::SYMLINK)), Some(Node::Symlink { target, .. }) if target == &PathBuf::from(app::SYMLINK_TARGET))
    );
    let digest = |path: &str| match rootfs.get(&PathBuf::from(path)) {
        Some(Node::File { digest, .. }) => digest.clone(),
        other => panic!("{path}: {other:?}"),
    };
    assert_eq!(digest(app::OVERWRITTEN), pullbox_tests::oci::sha256_digest(app::OVERWRITTEN_V2.as_bytes()));
    assert_eq!(digest(app::HARDLINK), digest(app::HARDLINK_TARGET));
    if pullbox_tests::oci::is_root() {
        assert!(matches!(
            rootfs.get(&PathBuf::from(app::PRIVATE)),
            Some(Node::File { mode: 0o600, uid: 1000, gid: 1000, .. })
        ));
    }
}

#[test]
fn harness_recompressed_copies_keep_the_config() {
    let f = fixture();
    for (image, media_type) in [(&f.app_zstd, MEDIA_TYPE_LAYER_ZSTD), (&f.app_uncompressed, MEDIA_TYPE_LAYER_TAR)] {
        assert_eq!(image.config_digest, f.app.config_digest, "{}", image.reference);
        assert_ne!(image.manifest_digest, f.app.manifest_digest, "{}", image.reference);
        for layer in &image.layers {
            assert_eq!(layer.media_type, media_type, "{}", image.reference);
            assert_eq!(f.registry.blob_size(image.path(), &layer.digest).unwrap(), Some(layer.size));
        }
    }
    // Uncompressed layers are named by their diff IDs.
    let digests: Vec<_> = f.app_uncompressed.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(digests, f.app.diff_ids);
}

#[test]
fn harness_pushes_a_multi_platform_index() {
    let f = fixture();
    let multi = &f.multi;
    assert_eq!(multi.index["mediaType"], MEDIA_TYPE_INDEX);
    let platforms: Vec<String> = multi.images.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let amd64 = multi.image_for(&Platform::parse("linux/amd64")).unwrap();
    let arm64 = multi.image_for(&Platform::parse("linux/arm64")).unwrap();
    let armv7 = multi.image_for(&Platform::parse("linux/arm/v7")).unwrap();
    assert_eq!(amd64.manifest_digest, f.app.manifest_digest);
    assert_eq!(arm64.config["architecture"], "arm64");
    assert_eq!(armv7.config["architecture"], "arm");
    // Three different image IDs over the same layers.
    assert_ne!(arm64.config_digest, amd64.config_digest);
    assert_ne!(armv7.config_digest, amd64.config_digest);
    assert_ne!(armv7.config_digest, arm64.config_digest);
    assert_eq!(arm64.diff_ids, amd64.diff_ids);
    assert_eq!(arm64.chain_id(), amd64.chain_id());
}
