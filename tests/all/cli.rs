//! The `pullbox` CLI against a real registry: pull, images, inspect, rmi, gc, pullers and
//! platforms, each test with its own store root and the shared images of
//! [`pullbox_tests::fixture`].
//!
//! Needs `make build` first (`target/release/pullbox` and the pullers next to it; see
//! [`pullbox_tests::pullbox`] for overrides). Every pull in the embedded store is checked down
//! to the files: the snapshot directories must hold exactly what each layer holds, and their
//! overlay view must equal `umoci unpack` of the same image.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use pullbox_tests::oci::{digest_hex, file_digest, EntryKind};
use pullbox_tests::tree::{diff, entry_kinds, merge_layers, scan, Tree};
use pullbox_tests::{app, fixture, Captured, Fixture, Platform, Pullbox, RemoteImage};

const NO_ARGS: [&str; 0] = [];

fn pullbox() -> Pullbox {
    Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The strings of a JSON array field, panicking with the whole object otherwise.
#[track_caller]
fn strings(object: &Value, key: &str) -> Vec<String> {
    object[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array in {object:#}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("{key} holds a non-string in {object:#}")).to_owned())
        .collect()
}

#[track_caller]
fn assert_has(object: &Value, key: &str, wanted: &str) {
    let values = strings(object, key);
    assert!(values.iter().any(|v| v == wanted), "{key} lacks {wanted}: {object:#}");
}

#[track_caller]
fn size_of(object: &Value) -> u64 {
    object["size"].as_u64().unwrap_or_else(|| panic!("size is not a number in {object:#}"))
}

/// `images --json` must list nothing.
#[track_caller]
fn assert_no_images(pb: &Pullbox) {
    let images = pb.images_json();
    assert!(images.is_empty(), "expected no images, found {images:#?}");
}

/// The store holds every blob of `image` (manifest, config, layers), each with its digest.
#[track_caller]
fn assert_blobs_stored(pb: &Pullbox, image: &RemoteImage) {
    for digest in image.blobs() {
        let path = pb.blob_path(&digest);
        assert!(path.is_file(), "blob {digest} of {} is not at {}", image.reference, path.display());
        assert_eq!(file_digest(&path).unwrap(), digest, "{} does not hold its digest's bytes", path.display());
    }
}

/// The store holds `app`'s layers unpacked, one overlay snapshot per layer, and nothing else.
/// Returns the snapshot `fs` directories bottom first.
#[track_caller]
fn assert_app_unpacked(pb: &Pullbox, f: &Fixture) -> Vec<PathBuf> {
    let dirs = pb.snapshot_fs_dirs().unwrap();
    assert_eq!(dirs.len(), app::LAYERS, "expected one snapshot per layer, found {dirs:#?}");
    let trees: Vec<Tree> = dirs.iter().map(|d| scan(d).unwrap()).collect();

    // Each layer's entries are exactly those of one snapshot: that snapshot is the layer's.
    let mut order = Vec::new();
    for (layer, expected) in f.layer_entries.iter().enumerate() {
        let matching: Vec<usize> = (0..trees.len()).filter(|&i| &entry_kinds(&trees[i]) == expected).collect();
        assert_eq!(
            matching.len(),
            1,
            "layer {} should be exactly one snapshot; it holds:\n{}\nthe snapshots hold:\n{}",
            layer + 1,
            show(expected),
            dirs.iter()
                .zip(&trees)
                .map(|(d, t)| format!("{}:\n{}", d.display(), show(&entry_kinds(t))))
                .collect::<String>()
        );
        order.push(matching[0]);
    }
    let layer_dir = |layer: usize| &dirs[order[layer]];
    let layer_tree = |layer: usize| &trees[order[layer]];

    // Spelled out for the reader: each layer's own files are in its snapshot only.
    for (layer, file) in [(0, app::LAYER1_FILE), (1, app::LAYER2_FILE), (2, app::LAYER3_FILE)] {
        let holders = trees.iter().filter(|t| t.contains_key(Path::new(file))).count();
        assert_eq!(holders, 1, "{file} should be in exactly one snapshot");
        assert!(layer_tree(layer).contains_key(Path::new(file)), "{file} is not in layer {}'s snapshot", layer + 1);
    }
    assert_eq!(fs::read_to_string(layer_dir(0).join(app::LAYER1_FILE)).unwrap(), app::LAYER1_CONTENT);
    assert_eq!(fs::read(layer_dir(1).join(app::LAYER2_FILE)).unwrap().len(), app::LAYER2_SIZE);
    assert_eq!(fs::read_to_string(layer_dir(0).join(app::OVERWRITTEN)).unwrap(), app::OVERWRITTEN_V1);
    assert_eq!(fs::read_to_string(layer_dir(1).join(app::OVERWRITTEN)).unwrap(), app::OVERWRITTEN_V2);
    // The deletion is an overlay whiteout in the upper layer: a character device 0:0.
    assert!(layer_dir(0).join(app::DELETED).is_file());
    let whiteout = fs::symlink_metadata(layer_dir(2).join(app::DELETED)).unwrap();
    assert!(whiteout.file_type().is_char_device(), "{} is not a whiteout: {whiteout:?}", app::DELETED);
    assert_eq!(whiteout.rdev(), 0, "{} is a device other than 0:0", app::DELETED);
    assert_eq!(fs::read_link(layer_dir(2).join(app::SYMLINK)).unwrap(), Path::new(app::SYMLINK_TARGET));
    let link = fs::metadata(layer_dir(2).join(app::HARDLINK)).unwrap();
    let target = fs::metadata(layer_dir(2).join(app::HARDLINK_TARGET)).unwrap();
    assert_eq!((link.dev(), link.ino()), (target.dev(), target.ino()), "the hardlink is a copy, not a link");
    assert!(link.nlink() >= 2);

    // The overlay view of the snapshots is the root filesystem umoci unpacks.
    let merged = merge_layers(&order.iter().map(|&i| trees[i].clone()).collect::<Vec<_>>());
    let differences = diff(&f.rootfs, &merged);
    assert!(differences.is_empty(), "pullbox's root filesystem differs from umoci's:\n{}", differences.join("\n"));

    order.iter().map(|&i| dirs[i].clone()).collect()
}

/// One line per entry, for messages.
fn show(entries: &BTreeSet<(PathBuf, EntryKind)>) -> String {
    entries.iter().map(|(path, kind)| format!("    {} ({kind:?})\n", path.display())).collect()
}

/// Pulls `app:1.0` into a fresh store and checks the ID; most tests start here.
fn pulled_app() -> (&'static Fixture, Pullbox, String) {
    let f = fixture();
    let pb = pullbox();
    let id = pb.pull(&[], &f.app.reference);
    assert_eq!(id, f.app.id(), "pull printed an ID other than the config digest");
    (f, pb, id)
}

#[test]
fn pull_by_tag_records_and_unpacks_the_image() {
    let (f, pb, id) = pulled_app();
    let info = pb.inspect(&f.app.reference);
    assert_eq!(info["id"], id.as_str());
    assert_has(&info, "repoTags", &f.app.reference);
    assert_has(&info, "repoDigests", &f.app.digest_reference());
    assert_eq!(info["chainId"], f.app.chain_id().as_str(), "chainId is not the chain ID of the diff IDs");
    assert_eq!(info["config"], f.app.config, "config is not the image config");
    assert_eq!(info["config"]["config"]["User"], app::USER);
    assert_eq!(info["config"]["config"]["Cmd"], serde_json::json!(app::CMD));
    let range = f.app.size_range(0);
    assert!(range.contains(&size_of(&info)), "size {} is not the compressed size ({range:?})", size_of(&info));

    assert_blobs_stored(&pb, &f.app);
    assert_app_unpacked(&pb, f);
}

#[test]
fn images_lists_the_pulled_image() {
    let (f, pb, id) = pulled_app();

    let out = pb.run("images", NO_ARGS);
    out.assert_success();
    for wanted in [f.app.repo.as_str(), &digest_hex(&id)[..12], &digest_hex(&f.app.manifest_digest)[..12]] {
        assert!(out.stdout.contains(wanted), "images does not show {wanted}:\n{out}");
    }
    // The tag, either in the reference or in a column of its own.
    assert!(
        out.stdout.contains(&f.app.reference) || out.stdout.split_whitespace().any(|w| w == "1.0"),
        "images does not show the tag 1.0:\n{out}"
    );

    let images = pb.images_json();
    assert_eq!(images.len(), 1, "{images:#?}");
    let image = &images[0];
    assert_eq!(image["id"], id.as_str());
    assert_has(image, "repoTags", &f.app.reference);
    assert_has(image, "repoDigests", &f.app.digest_reference());
    assert_eq!(image["chainId"], f.app.chain_id().as_str());
    assert!(size_of(image) > 0);
    assert_eq!(size_of(image), size_of(&pb.inspect(&id)), "images and inspect disagree on the size");
}

#[test]
fn second_tag_names_the_same_image() {
    let (f, pb, id) = pulled_app();
    assert_eq!(pb.pull(&[], &f.app_second_tag.reference), id);
    // Pulling again changes nothing.
    assert_eq!(pb.pull(&[], &f.app.reference), id);

    let info = pb.inspect(&f.app_second_tag.reference);
    assert_eq!(info["id"], id.as_str());
    assert_has(&info, "repoTags", &f.app.reference);
    assert_has(&info, "repoTags", &f.app_second_tag.reference);
    assert_has(&info, "repoDigests", &f.app.digest_reference());
    let images = pb.images_json();
    assert_eq!(images.len(), 1, "one image under two tags: {images:#?}");
    assert_eq!(images[0]["id"], id.as_str());
    assert_eq!(pb.snapshot_fs_dirs().unwrap().len(), app::LAYERS, "the second tag unpacked the layers again");
}

#[test]
fn pull_by_digest() {
    let f = fixture();
    let pb = pullbox();
    let by_digest = f.app.digest_reference();
    let id = pb.pull(&[], &by_digest);
    assert_eq!(id, f.app.id());
    let info = pb.inspect(&by_digest);
    assert_eq!(info["id"], id.as_str());
    assert_has(&info, "repoDigests", &by_digest);
    let tags = strings(&info, "repoTags");
    assert!(!tags.contains(&f.app.reference), "a pull by digest recorded a tag: {info:#}");
    assert_blobs_stored(&pb, &f.app);

    // The same image by tag afterwards: still one image, now tagged.
    assert_eq!(pb.pull(&[], &f.app.reference), id);
    let info = pb.inspect(&id);
    assert_has(&info, "repoTags", &f.app.reference);
    assert_has(&info, "repoDigests", &by_digest);
    assert_eq!(pb.images_json().len(), 1);
}

#[test]
fn inspect_by_id_and_id_prefix() {
    let (f, pb, id) = pulled_app();
    assert_eq!(pb.inspect(&id)["id"], id.as_str());
    let prefix = &digest_hex(&id)[..12];
    let info = pb.inspect(prefix);
    assert_eq!(info["id"], id.as_str(), "inspect {prefix} found another image");
    assert_has(&info, "repoTags", &f.app.reference);
}

#[test]
fn inspect_unknown_image_fails() {
    let f = fixture();
    let pb = pullbox();
    for reference in [f.app.reference.clone(), f.app.id().to_owned()] {
        let out = pb.run("inspect", [&reference]);
        out.assert_failure();
        assert!(!out.stderr.trim().is_empty(), "no error message:\n{out}");
    }
    pb.pull(&[], &f.app.reference);
    let nope = f.reference("team/nope:1.0");
    let zeros = format!("sha256:{}", "0".repeat(64));
    for reference in [nope.as_str(), zeros.as_str()] {
        pb.run("inspect", [reference]).assert_failure();
    }
}

#[test]
fn rmi_by_tag_removes_every_record_and_releases_storage() {
    let (f, pb, id) = pulled_app();
    pb.pull(&[], &f.app_second_tag.reference);
    pb.pull(&[], &f.app.digest_reference());
    assert_blobs_stored(&pb, &f.app);
    assert_eq!(pb.snapshot_fs_dirs().unwrap().len(), app::LAYERS);

    pb.run("rmi", [&f.app.reference]).assert_success();

    assert_no_images(&pb);
    // Every record went: the other tag, the digest and the ID name nothing now.
    for reference in [&f.app.reference, &f.app_second_tag.reference, &f.app.digest_reference(), &id] {
        pb.run("inspect", [reference]).assert_failure();
    }
    // Nothing else uses the content and snapshots, so they are released.
    for digest in f.app.blobs() {
        assert!(!pb.blob_path(&digest).exists(), "blob {digest} survived rmi");
    }
    assert_eq!(pb.snapshot_fs_dirs().unwrap(), Vec::<PathBuf>::new(), "snapshots survived rmi");
    let snapshots = pb.root().join("snapshots");
    if snapshots.exists() {
        let left: Vec<_> =
            fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
        assert!(left.is_empty(), "snapshot directories survived rmi: {left:?}");
    }

    // The image can be pulled again.
    assert_eq!(pb.pull(&[], &f.app.reference), id);
    assert_app_unpacked(&pb, f);
}

#[test]
fn gc_keeps_images_in_use() {
    let (f, pb, id) = pulled_app();
    let out = pb.run("gc", NO_ARGS);
    out.assert_success();
    assert_eq!(pb.inspect(&f.app.reference)["id"], id.as_str(), "gc lost the image");
    assert_eq!(pb.images_json().len(), 1);
    assert_blobs_stored(&pb, &f.app);
    assert_app_unpacked(&pb, f);

    pb.run("rmi", [&id]).assert_success();
    pb.run("gc", NO_ARGS).assert_success();
    assert_no_images(&pb);
    assert_eq!(pb.blob_digests().unwrap(), Vec::<String>::new(), "content left after rmi and gc");
    assert_eq!(pb.snapshot_fs_dirs().unwrap().len(), 0, "snapshots left after rmi and gc");
}

#[test]
fn malformed_references_are_rejected() {
    let pb = pullbox();
    for reference in ["UPPER/Case:tag", "bad@sha256:xyz", "a//b"] {
        let out = pb.run("pull", [reference]);
        out.assert_failure();
        assert!(out.stderr.contains(reference), "stderr does not name the reference {reference}:\n{out}");
    }
    assert_no_images(&pb);
}

#[test]
fn unknown_image_is_not_found() {
    let f = fixture();
    let pb = pullbox();
    for reference in [f.reference("team/nope:1.0"), f.reference("team/app:9.9")] {
        pb.run("pull", [&reference]).assert_failure().assert_stderr_contains("not found");
    }
    assert_no_images(&pb);
}

/// `pull` with the refuse puller, chosen by `how`; it must fail with its reason and record
/// nothing.
#[track_caller]
fn assert_refused(pb: &Pullbox, out: Captured) {
    out.assert_failure().assert_stderr_contains("refus");
    assert_no_images(pb);
}

#[test]
fn refuse_puller_swaps_policy_without_rebuilding() {
    let f = fixture();
    let pb = pullbox();
    let refuse = Pullbox::puller("pullbox-refuse.wasm").unwrap();
    let reference = &f.app.reference;

    assert_refused(&pb, pb.run("pull", ["--puller".as_ref(), refuse.as_os_str(), reference.as_ref()]));
    let mut by_env = pb.command("pull", [reference]);
    by_env.env("PULLBOX_PULLER", &refuse);
    assert_refused(&pb, pb.run_command(by_env));

    // The same binary with its default puller pulls the same reference ...
    assert_eq!(pb.pull(&[], reference), f.app.id());
    // ... and so does naming the default puller explicitly.
    let default = Pullbox::puller("pullbox-puller.wasm").unwrap();
    let out = pb.run("pull", ["--puller".as_ref(), default.as_os_str(), reference.as_ref()]);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()));
}

#[test]
fn invalid_settings_are_refused() {
    let f = fixture();
    let pb = pullbox();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    fs::write(&bad, "this is not a settings document {").unwrap();
    let out = pb.run("pull", ["--settings".as_ref(), bad.as_os_str(), f.app.reference.as_ref()]);
    out.assert_failure();
    assert!(!out.stderr.trim().is_empty(), "no error message:\n{out}");
    assert_no_images(&pb);

    // An empty JSON object leaves every setting at its default.
    let empty = dir.path().join("empty.json");
    fs::write(&empty, "{}").unwrap();
    let out = pb.run("pull", ["--settings".as_ref(), empty.as_os_str(), f.app.reference.as_ref()]);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()));
}

#[test]
fn an_index_nested_in_an_index_is_followed() {
    let f = fixture();
    let multi = &f.multi;
    // An index whose one entry, without a platform, is team/multi's index, pushed next to it.
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": pullbox_tests::oci::MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": pullbox_tests::oci::MEDIA_TYPE_INDEX,
            "digest": multi.index_digest,
            "size": multi.index_size,
        }],
    }))
    .unwrap();
    let reference = format!("{}:nested", multi.repo);
    f.registry.put_manifest("team/multi", "nested", pullbox_tests::oci::MEDIA_TYPE_INDEX, &nested).unwrap();

    let image = multi.image_for(&Platform::parse("linux/arm64")).unwrap();
    let pb = pullbox();
    assert_eq!(pb.pull(&["--platform", "linux/arm64"], &reference), image.id());
    let info = pb.inspect(&reference);
    let nested_digest = pullbox_tests::oci::sha256_digest(&nested);
    assert_has(&info, "repoDigests", &format!("{}@{nested_digest}", multi.repo));
    assert_eq!(info["chainId"], image.chain_id().as_str());
    // containerd's size: both indexes, the manifest, the config and the layers.
    let size = nested.len() as u64 + multi.index_size + image.manifest_size + image.content_size();
    assert_eq!(size_of(&info), size);
    for index in [&nested_digest, &multi.index_digest] {
        assert!(pb.blob_path(index).is_file(), "index {index} is not in the content store");
    }
    assert_app_unpacked(&pb, f);
}

#[test]
fn platform_selects_an_index_entry() {
    let f = fixture();
    let multi = &f.multi;
    for platform in ["linux/arm64", "linux/arm/v7", "linux/amd64"] {
        let image = multi.image_for(&Platform::parse(platform)).unwrap();
        let pb = pullbox();
        let id = pb.pull(&["--platform", platform], &multi.reference);
        assert_eq!(id, image.id(), "--platform {platform} pulled another image");
        let info = pb.inspect(&multi.reference);
        assert_eq!(info["id"], id.as_str());
        assert_has(&info, "repoTags", &multi.reference);
        assert_has(&info, "repoDigests", &multi.digest_reference());
        assert_eq!(info["chainId"], image.chain_id().as_str());
        assert_eq!(info["config"]["architecture"], image.config["architecture"]);
        let range = image.size_range(multi.index_size);
        assert!(range.contains(&size_of(&info)), "size {} not in {range:?}", size_of(&info));
        assert_blobs_stored(&pb, image);
        assert!(pb.blob_path(&multi.index_digest).is_file(), "the index is not in the content store");
        assert_app_unpacked(&pb, f);
    }

    // Without --platform, the host's own.
    let host = Platform::host();
    if let Some(image) = multi.image_for(&host) {
        let pb = pullbox();
        assert_eq!(pb.pull(&[], &multi.reference), image.id(), "the default platform is not {host}");
    } else {
        eprintln!("the index has no image for this machine ({host}); default platform not tested");
    }

    // A platform the index lacks.
    let pb = pullbox();
    let out = pb.run("pull", ["--platform", "linux/s390x", &multi.reference]);
    out.assert_failure();
    let stderr = out.stderr.to_lowercase();
    assert!(stderr.contains("s390x") || stderr.contains("platform"), "the error does not say what was missing:\n{out}");
    assert_no_images(&pb);
}

#[test]
fn zstd_and_uncompressed_layers_unpack_alike() {
    let f = fixture();
    // The zstd pull also syncs each snapshot to disk before committing it.
    for (image, args) in [(&f.app_zstd, &["--sync-fs"][..]), (&f.app_uncompressed, &[][..])] {
        let pb = pullbox();
        let id = pb.pull(args, &image.reference);
        assert_eq!(id, f.app.id(), "{}: the same config is the same image ID", image.reference);
        let info = pb.inspect(&image.reference);
        assert_eq!(info["chainId"], f.app.chain_id().as_str(), "{}: same diff IDs, same chain ID", image.reference);
        assert_has(&info, "repoDigests", &image.digest_reference());
        assert_blobs_stored(&pb, image);
        assert_app_unpacked(&pb, f);
    }
}

#[test]
fn root_from_environment() {
    let (f, pb, id) = pulled_app();
    let out = pb.run_command(pb.command_with_root_env("images", ["--json"]));
    out.assert_success();
    let images = out.json().unwrap();
    assert_eq!(images.as_array().map(Vec::len), Some(1), "PULLBOX_ROOT did not select the store:\n{out}");
    assert_eq!(images[0]["id"], id.as_str());
    let out = pb.run_command(pb.command_with_root_env("inspect", [&f.app.reference]));
    out.assert_success();
}
