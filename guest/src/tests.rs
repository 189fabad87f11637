//! Tests of the pull, status, list and remove logic against the in-memory [`FakeHost`].
//!
//! Each test pushes small images into the fake registry, runs the logic as the component
//! would, and checks what the host was asked to do (fetch batches, snapshots, labels,
//! records) and what came back.

use crate::catalog;
use crate::digest::{chain_ids, hex_part};
use crate::error::Error;
use crate::fake::{platform, FakeHost, Pushed};
use crate::labels;
use crate::pull::pull;
use crate::settings::Settings;
use crate::types::{label, Descriptor, ImageInfo, Level, Pod, PullRequest, SnapshotKind};

const BUSYBOX: &str = "docker.io/library/busybox";

fn req(reference: &str) -> PullRequest {
    PullRequest { reference: reference.into(), platform: platform("linux/amd64"), ..PullRequest::default() }
}

fn req_on(reference: &str, p: &str) -> PullRequest {
    PullRequest { reference: reference.into(), platform: platform(p), ..PullRequest::default() }
}

fn pull_ok(host: &FakeHost, r: &PullRequest) -> ImageInfo {
    pull(host, &Settings::DEFAULT, r).unwrap_or_else(|e| panic!("pull {r:?}: {e}"))
}

/// busybox:latest with two layers, pushed and tagged.
fn busybox(host: &FakeHost) -> Pushed {
    let img = host.push_image(&[b"base layer", b"top layer"], "nobody");
    host.tag(BUSYBOX, "latest", &img.manifest);
    img
}

fn size_of(root: &Descriptor, img: &Pushed) -> u64 {
    root.size + img.config.size + img.layers.iter().map(|l| l.size).sum::<u64>()
}

#[test]
fn pulls_a_single_manifest_image() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let chain = chain_ids(&img.diff_ids);
    let info = pull_ok(&host, &req("busybox"));

    assert_eq!(info.id, img.config.digest);
    assert_eq!(info.repo_tags, vec![format!("{BUSYBOX}:latest")]);
    assert_eq!(info.repo_digests, vec![format!("{BUSYBOX}@{}", img.manifest.digest)]);
    assert_eq!(info.chain_id, chain[1]);
    assert_eq!(info.manifest_digest, img.manifest.digest);
    assert_eq!(info.user, "nobody");
    assert_eq!(info.size, size_of(&img.manifest, &img));
    assert!(!info.pinned);

    let k0 = format!("extract-{}", hex_part(&chain[0]));
    let k1 = format!("extract-{}", hex_part(&chain[1]));
    let (m, c, l0, l1) = (&img.manifest.digest, &img.config.digest, &img.layers[0].digest, &img.layers[1].digest);
    assert_eq!(
        host.calls(),
        vec![
            format!("fetch {c}"),
            format!("fetch {l0},{l1}"),
            format!("prepare {k0} "),
            format!("apply {l0} {k0}"),
            format!("commit {} {k0}", chain[0]),
            format!("prepare {k1} {}", chain[0]),
            format!("apply {l1} {k1}"),
            format!("commit {} {k1}", chain[1]),
            format!("label {m}"),
            format!("label {c}"),
            format!("create {c}"),
            format!("create {BUSYBOX}:latest"),
            format!("create {BUSYBOX}@{m}"),
        ]
    );

    // containerd's GC labels, exactly.
    let ml = host.content_labels(m);
    assert_eq!(ml.len(), 3);
    assert_eq!(ml["containerd.io/gc.ref.content.config"], *c);
    assert_eq!(ml["containerd.io/gc.ref.content.l.0"], *l0);
    assert_eq!(ml["containerd.io/gc.ref.content.l.1"], *l1);
    let cl = host.content_labels(c);
    assert_eq!(cl.len(), 1);
    assert_eq!(cl["containerd.io/gc.ref.snapshot.overlayfs"], chain[1]);

    // Records: the ID, the tag, the digest; all point at the root, with the labels.
    assert_eq!(host.record_names().len(), 3);
    let rec = host.s.borrow().images[&format!("{BUSYBOX}:latest")].clone();
    assert_eq!(rec.target, img.manifest);
    assert_eq!(label(&rec.labels, "io.cri-containerd.image"), Some("managed"));
    assert_eq!(label(&rec.labels, labels::IMAGE_ID), Some(c.as_str()));
    assert_eq!(label(&rec.labels, labels::IMAGE_MANIFEST), Some(m.as_str()));
    assert_eq!(label(&rec.labels, labels::IMAGE_CHAIN_ID), Some(chain[1].as_str()));
    assert_eq!(label(&rec.labels, labels::IMAGE_SIZE), Some(info.size.to_string().as_str()));
    assert_eq!(label(&rec.labels, labels::IMAGE_USER), Some("nobody"));

    // Snapshots: two committed, no active key left.
    let s = host.s.borrow();
    assert_eq!(s.snapshots.len(), 2);
    assert!(s.snapshots.values().all(|x| x.kind == SnapshotKind::Committed));
    assert_eq!(s.snapshots[&chain[1]].parent, chain[0]);

    // Progress and log.
    let stages: Vec<&str> = s.progress.iter().map(|(st, _)| st.as_str()).collect();
    assert_eq!(
        stages,
        ["resolving", "resolved", "fetching", "fetching", "unpacking", "unpacked", "unpacking", "unpacked", "done"]
    );
    assert!(s.progress.contains(&("unpacked".into(), l1.clone())));
    assert!(s.logs.iter().any(|(l, m)| *l == Level::Info && m.starts_with("pulling docker.io/library/busybox:latest")));
    assert!(s.logs.iter().any(|(l, m)| *l == Level::Info && m.starts_with("pulled docker.io/library/busybox:latest")));
}

#[test]
fn pulls_the_platform_manifest_from_an_index() {
    let host = FakeHost::new();
    let amd = host.push_image(&[b"amd64 layer"], "");
    let arm = host.push_image(&[b"arm64 layer"], "");
    let armv7 = host.push_image(&[b"arm v7 layer"], "");
    let index = host.push_index(&[
        (&amd.manifest, "linux/amd64"),
        (&arm.manifest, "linux/arm64/v8"),
        (&armv7.manifest, "linux/arm/v7"),
    ]);
    host.tag("127.0.0.1:5000/team/app", "1.0", &index);

    let info = pull_ok(&host, &req_on("127.0.0.1:5000/team/app:1.0", "linux/arm64"));
    assert_eq!(info.id, arm.config.digest);
    assert_eq!(info.manifest_digest, arm.manifest.digest);
    assert_eq!(info.repo_digests, vec![format!("127.0.0.1:5000/team/app@{}", index.digest)]);
    // Size: index + chosen manifest + config + layers, as containerd's CRI.
    assert_eq!(info.size, index.size + size_of(&arm.manifest, &arm));

    let calls = host.calls();
    assert_eq!(calls[0], format!("fetch {}", arm.manifest.digest));
    assert_eq!(calls[1], format!("fetch {}", arm.config.digest));
    assert_eq!(calls[2], format!("fetch {}", arm.layers[0].digest));
    assert!(!calls.iter().any(|c| c.contains(&amd.config.digest)));

    let il = host.content_labels(&index.digest);
    assert_eq!(il.len(), 1);
    assert_eq!(il["containerd.io/gc.ref.content.m.0"], arm.manifest.digest);
    let rec = host.s.borrow().images[&info.id].clone();
    assert_eq!(rec.target, index);

    // arm64/v8 in the request and 32-bit arm without variant (v7).
    let host2 = FakeHost::new();
    host2.s.borrow_mut().remote = host.s.borrow().remote.clone();
    host2.tag("127.0.0.1:5000/team/app", "1.0", &index);
    assert_eq!(pull_ok(&host2, &req_on("127.0.0.1:5000/team/app:1.0", "linux/arm/v7")).id, armv7.config.digest);
    assert_eq!(pull_ok(&host2, &req_on("127.0.0.1:5000/team/app:1.0", "linux/aarch64/v8")).id, arm.config.digest);
}

#[test]
fn follows_indexes_nested_in_an_index() {
    let host = FakeHost::new();
    let amd = host.push_image(&[b"amd64 layer"], "");
    let arm = host.push_image_for(&[b"arm64 layer"], "", "linux/arm64");
    // The root lists an index for arm64 (skipped for amd64) and one without a platform,
    // which holds another index holding the amd64 manifest.
    let for_arm = host.push_index(&[(&arm.manifest, "linux/arm64")]);
    let inner = host.push_index(&[(&amd.manifest, "linux/amd64")]);
    let outer = host.push_index(&[(&inner, "")]);
    let root = host.push_index(&[(&for_arm, "linux/arm64"), (&outer, "")]);
    host.tag("127.0.0.1:5000/team/app", "1.0", &root);

    let info = pull_ok(&host, &req_on("127.0.0.1:5000/team/app:1.0", "linux/amd64"));
    assert_eq!(info.id, amd.config.digest);
    assert_eq!(info.manifest_digest, amd.manifest.digest);
    assert_eq!(info.size, root.size + outer.size + inner.size + size_of(&amd.manifest, &amd));
    assert!(
        !host.calls().iter().any(|c| c.contains(&for_arm.digest)),
        "the arm64 index is not fetched for amd64: {:?}",
        host.calls()
    );
    // GC labels: root → outer → inner → manifest, so the whole path stays while the image does.
    for (parent, child) in [(&root, &outer.digest), (&outer, &inner.digest), (&inner, &amd.manifest.digest)] {
        assert_eq!(host.content_labels(&parent.digest)["containerd.io/gc.ref.content.m.0"], *child);
    }
    assert_eq!(pull_ok(&host, &req_on("127.0.0.1:5000/team/app:1.0", "linux/arm64")).id, arm.config.digest);

    // Nesting deeper than the limit is refused, not followed.
    let mut deep = host.push_index(&[(&amd.manifest, "linux/amd64")]);
    for _ in 0..crate::pull::MAX_INDEX_NESTING + 1 {
        deep = host.push_index(&[(&deep, "")]);
    }
    host.tag("127.0.0.1:5000/team/deep", "1.0", &deep);
    match pull(&host, &Settings::DEFAULT, &req_on("127.0.0.1:5000/team/deep:1.0", "linux/amd64")) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("nests indexes more than 4 deep"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuses_an_index_without_the_platform() {
    let host = FakeHost::new();
    let amd = host.push_image(&[b"amd64 layer"], "");
    let index = host.push_index(&[(&amd.manifest, "linux/amd64"), (&amd.manifest, "")]);
    host.tag(BUSYBOX, "latest", &index);
    match pull(&host, &Settings::DEFAULT, &req_on("busybox", "linux/s390x")) {
        Err(Error::NotFound(m)) => {
            assert!(m.contains("docker.io/library/busybox:latest"), "{m}");
            assert!(m.contains("linux/s390x") && m.contains("it has: linux/amd64"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    match pull(&host, &Settings::DEFAULT, &req_on("busybox", "")) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("names no architecture"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(host.record_names().is_empty());
}

#[test]
fn second_pull_skips_committed_layers_and_shares_base_layers() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let first = pull_ok(&host, &req("busybox"));
    host.clear_calls();
    let again = pull_ok(&host, &req("busybox:latest"));
    assert_eq!(first, again);
    let calls = host.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("apply") || c.starts_with("prepare") || c.starts_with("update")),
        "{calls:?}"
    );
    assert_eq!(host.record_names().len(), 3);
    assert!(host.s.borrow().progress.iter().any(|(s, d)| s == "skipped" && *d == img.layers[0].digest));

    // Another image on the same base layer unpacks only its own layer.
    let other = host.push_image(&[b"base layer", b"other top"], "");
    host.tag("docker.io/user/other", "v1", &other.manifest);
    host.clear_calls();
    pull_ok(&host, &req("user/other:v1"));
    let applies: Vec<String> = host.calls().into_iter().filter(|c| c.starts_with("apply")).collect();
    assert_eq!(applies.len(), 1);
    assert!(applies[0].contains(&other.layers[1].digest));
}

#[test]
fn removes_a_stale_extract_key() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let chain = chain_ids(&img.diff_ids);
    let key = format!("extract-{}", hex_part(&chain[0]));
    host.snapshot_prepare_direct(&key);
    host.clear_calls();
    pull_ok(&host, &req("busybox"));
    let calls = host.calls();
    let i = calls.iter().position(|c| *c == format!("remove {key}")).expect("stale key removed");
    assert_eq!(calls[i - 1], format!("prepare {key} "));
    assert_eq!(calls[i + 1], format!("prepare {key} "));
}

#[test]
fn loses_a_commit_race_gracefully() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let chain = chain_ids(&img.diff_ids);
    host.s.borrow_mut().commit_race.insert(chain[0].clone());
    let info = pull_ok(&host, &req("busybox"));
    assert_eq!(info.chain_id, chain[1]);
    let key = format!("extract-{}", hex_part(&chain[0]));
    assert!(host.calls().contains(&format!("remove {key}")));
    let s = host.s.borrow();
    assert!(!s.snapshots.contains_key(&key));
    assert_eq!(s.snapshots[&chain[1]].kind, SnapshotKind::Committed);
}

#[test]
fn refuses_a_layer_with_the_wrong_diff_id() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let wrong = crate::digest::sha256(b"something else");
    host.s.borrow_mut().diff_override.insert(img.layers[1].digest.clone(), wrong.clone());
    match pull(&host, &Settings::DEFAULT, &req("busybox")) {
        Err(Error::FailedPrecondition(m)) => {
            assert!(m.contains(&img.layers[1].digest) && m.contains(&wrong) && m.contains("busybox"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let chain = chain_ids(&img.diff_ids);
    let s = host.s.borrow();
    assert!(!s.snapshots.contains_key(&format!("extract-{}", hex_part(&chain[1]))), "key removed");
    assert!(!s.snapshots.contains_key(&chain[1]));
    assert!(s.images.is_empty(), "no records for a failed pull");
}

#[test]
fn apply_errors_keep_their_case_and_drop_the_key() {
    let host = FakeHost::new();
    let img = busybox(&host);
    host.s
        .borrow_mut()
        .apply_error
        .insert(img.layers[0].digest.clone(), Error::FailedPrecondition("corrupt gzip".into()));
    match pull(&host, &Settings::DEFAULT, &req("busybox")) {
        Err(Error::FailedPrecondition(m)) => {
            assert_eq!(
                m,
                format!("applying layer {} of docker.io/library/busybox:latest: corrupt gzip", img.layers[0].digest)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(host.s.borrow().snapshots.is_empty());
}

#[test]
fn refuses_a_config_with_the_wrong_number_of_diff_ids() {
    let host = FakeHost::new();
    let layer = host.push_blob(crate::fake::LAYER_TAR, b"only layer");
    let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": []}});
    let config = host.push_blob(crate::oci::OCI_CONFIG, config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2, "config": crate::fake::desc_json(&config), "layers": [crate::fake::desc_json(&layer)]});
    let manifest = host.push_blob(crate::oci::OCI_MANIFEST, manifest.to_string().as_bytes());
    host.tag(BUSYBOX, "latest", &manifest);
    match pull(&host, &Settings::DEFAULT, &req("busybox")) {
        Err(Error::FailedPrecondition(m)) => {
            assert!(m.contains("0 diff IDs") && m.contains("1 layers"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuses_what_is_not_an_image() {
    let host = FakeHost::new();
    let schema1 = host.push_blob(crate::oci::DOCKER_SCHEMA1_SIGNED, br#"{"schemaVersion":1}"#);
    host.tag(BUSYBOX, "old", &schema1);
    match pull(&host, &Settings::DEFAULT, &req("busybox:old")) {
        Err(Error::FailedPrecondition(m)) => {
            assert!(m.contains("schema 1") && m.contains(&schema1.digest), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // schema 1 served as application/json is recognized by its content.
    let generic = host.push_blob("application/json", br#"{"schemaVersion":1,"name":"x"}"#);
    host.tag(BUSYBOX, "generic", &generic);
    assert!(matches!(pull(&host, &Settings::DEFAULT, &req("busybox:generic")), Err(Error::FailedPrecondition(_))));

    let odd = host.push_blob("application/vnd.example.thing", b"{}");
    host.tag(BUSYBOX, "odd", &odd);
    match pull(&host, &Settings::DEFAULT, &req("busybox:odd")) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("application/vnd.example.thing"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    let helm = host.push_blob("application/vnd.cncf.helm.config.v1+json", b"{}");
    let manifest = serde_json::json!({"schemaVersion": 2, "config": crate::fake::desc_json(&helm), "layers": []});
    let manifest = host.push_blob(crate::oci::OCI_MANIFEST, manifest.to_string().as_bytes());
    host.tag(BUSYBOX, "chart", &manifest);
    match pull(&host, &Settings::DEFAULT, &req("busybox:chart")) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("not a container image"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!host.calls().iter().any(|c| c.starts_with("fetch")), "nothing fetched for refused images");
}

#[test]
fn resolve_errors_name_the_reference() {
    let host = FakeHost::new();
    match pull(&host, &Settings::DEFAULT, &req("nope:1")) {
        Err(Error::NotFound(m)) => {
            assert!(m.starts_with("resolving docker.io/library/nope:1: "), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(pull(&host, &Settings::DEFAULT, &req("Bad")), Err(Error::InvalidArgument(_))));
}

#[test]
fn metadata_reads_are_chunked_and_capped() {
    let host = FakeHost::new();
    busybox(&host);
    host.s.borrow_mut().max_read = 7;
    pull_ok(&host, &req("busybox"));
    assert!(host.s.borrow().reads > 20, "read in 7-byte chunks");

    let host = FakeHost::new();
    let huge = Descriptor {
        media_type: crate::oci::OCI_INDEX.into(),
        digest: crate::digest::sha256(b"huge"),
        size: 4 * 1024 * 1024 + 1,
        ..Descriptor::default()
    };
    host.tag(BUSYBOX, "huge", &huge);
    match pull(&host, &Settings::DEFAULT, &req("busybox:huge")) {
        Err(Error::ResourceExhausted(m)) => assert!(m.contains(&huge.digest), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(host.s.borrow().reads, 0);
}

#[test]
fn digest_references_record_no_tag() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let by_digest = format!("busybox@{}", img.manifest.digest);
    let info = pull_ok(&host, &req(&by_digest));
    assert!(info.repo_tags.is_empty());
    assert_eq!(info.repo_digests, vec![format!("{BUSYBOX}@{}", img.manifest.digest)]);
    assert_eq!(host.record_names().len(), 2);

    // tag + digest: resolved by digest; containerd's CRI records no tag.
    let info = pull_ok(&host, &req(&format!("busybox:1.0@{}", img.manifest.digest)));
    assert!(info.repo_tags.is_empty());
    assert_eq!(host.record_names().len(), 2);

    // A digest the registry does not have.
    let missing = format!("busybox@{}", crate::digest::sha256(b"x"));
    assert!(matches!(pull(&host, &Settings::DEFAULT, &req(&missing)), Err(Error::NotFound(_))));
}

#[test]
fn a_moved_tag_follows_the_new_image() {
    let host = FakeHost::new();
    let v1 = busybox(&host);
    let first = pull_ok(&host, &req("busybox"));
    let v2 = host.push_image(&[b"base layer", b"newer top"], "root");
    host.tag(BUSYBOX, "latest", &v2.manifest);
    let second = pull_ok(&host, &req("busybox"));
    assert_ne!(first.id, second.id);
    assert_eq!(second.repo_tags, vec![format!("{BUSYBOX}:latest")]);
    assert!(host.calls().contains(&format!("update {BUSYBOX}:latest")));
    let rec = host.s.borrow().images[&format!("{BUSYBOX}:latest")].clone();
    assert_eq!(rec.target, v2.manifest);
    assert_eq!(label(&rec.labels, labels::IMAGE_USER), Some("root"));

    // The old image keeps its ID and digest records, without the tag.
    let old = catalog::status(&host, &v1.config.digest, &[]).unwrap().unwrap();
    assert!(old.repo_tags.is_empty());
    assert_eq!(old.repo_digests, vec![format!("{BUSYBOX}@{}", v1.manifest.digest)]);
}

#[test]
fn keeps_foreign_labels_when_updating_a_record() {
    let host = FakeHost::new();
    let img = busybox(&host);
    pull_ok(&host, &req("busybox"));
    let name = format!("{BUSYBOX}:latest");
    host.s
        .borrow_mut()
        .images
        .get_mut(&name)
        .unwrap()
        .labels
        .push(("io.cri-containerd.pinned".into(), "pinned".into()));
    let v2 = host.push_image(&[b"v2"], "");
    host.tag(BUSYBOX, "latest", &v2.manifest);
    pull_ok(&host, &req("busybox"));
    let rec = host.s.borrow().images[&name].clone();
    assert_eq!(label(&rec.labels, "io.cri-containerd.pinned"), Some("pinned"));
    assert_eq!(label(&rec.labels, labels::IMAGE_ID), Some(v2.config.digest.as_str()));
    let _ = img;
}

#[test]
fn pinned_images_by_setting_and_by_containerds_label() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let other = host.push_image(&[b"other"], "");
    host.tag("docker.io/user/other", "latest", &other.manifest);
    let pinning = crate::settings::parse(r#"{"pinnedImages": ["busybox"]}"#).unwrap();
    let pinned = &pinning.pinned_images;

    // The setting: the pull's answer, status (by any name) and list.
    assert!(pull(&host, &pinning, &req("busybox")).unwrap().pinned);
    assert!(!pull(&host, &pinning, &req("user/other")).unwrap().pinned);
    for arg in ["busybox", img.config.digest.as_str()] {
        assert!(catalog::status(&host, arg, pinned).unwrap().unwrap().pinned, "{arg}");
        assert!(!catalog::status(&host, arg, &[]).unwrap().unwrap().pinned, "{arg}");
    }
    let listed = |pinned: &[String]| -> Vec<(String, bool)> {
        catalog::list(&host, pinned).unwrap().into_iter().map(|i| (i.id, i.pinned)).collect()
    };
    let mut want = vec![(img.config.digest.clone(), true), (other.config.digest.clone(), false)];
    want.sort();
    assert_eq!(listed(pinned), want);

    // containerd CRI's label on any one record pins the image, whatever the setting says.
    host.s
        .borrow_mut()
        .images
        .get_mut("docker.io/user/other:latest")
        .unwrap()
        .labels
        .push((labels::CRI_PINNED.into(), labels::CRI_PINNED_PINNED.into()));
    assert!(catalog::status(&host, "user/other", &[]).unwrap().unwrap().pinned);
    let all_pinned: Vec<(String, bool)> = want.iter().map(|(id, _)| (id.clone(), true)).collect();
    assert_eq!(listed(pinned), all_pinned);
    // Another value of the label does not.
    for record in host.s.borrow_mut().images.values_mut() {
        for (k, v) in record.labels.iter_mut() {
            if k == labels::CRI_PINNED {
                *v = "no".into();
            }
        }
    }
    assert_eq!(listed(pinned), want);
}

#[test]
fn discard_unpacked_layers_drops_layer_references() {
    let host = FakeHost::new();
    let img = busybox(&host);
    pull_ok(&host, &req("busybox"));
    assert!(host.content_labels(&img.manifest.digest).contains_key("containerd.io/gc.ref.content.l.0"));
    let discard = Settings { discard_unpacked_layers: true, ..Settings::DEFAULT };
    pull(&host, &discard, &req("busybox")).unwrap();
    let ml = host.content_labels(&img.manifest.digest);
    assert_eq!(ml.len(), 1, "{ml:?}");
    assert_eq!(ml["containerd.io/gc.ref.content.config"], img.config.digest);
}

#[test]
fn status_finds_images_by_name_id_and_prefix() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let info = pull_ok(&host, &req("busybox"));
    let id = img.config.digest.clone();
    let hex = hex_part(&id).to_string();
    for arg in [
        "busybox".to_string(),
        "busybox:latest".into(),
        "docker.io/library/busybox".into(),
        format!("busybox@{}", img.manifest.digest),
        id.clone(),
        hex.clone(),
        hex[..12].to_string(),
        format!("sha256:{}", &hex[..5]),
    ] {
        assert_eq!(catalog::status(&host, &arg, &[]).unwrap().as_ref(), Some(&info), "{arg}");
    }
    for arg in ["busybox:other", "alpine", "sha256:ffff", "fffff"] {
        // (a prefix that matches nothing, unless the random ID starts with it)
        if hex.starts_with("ffff") {
            continue;
        }
        assert_eq!(catalog::status(&host, arg, &[]).unwrap(), None, "{arg}");
    }
    assert!(matches!(catalog::status(&host, "Bad Name", &[]), Err(Error::InvalidArgument(_))));
    assert!(matches!(catalog::status(&host, "", &[]), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_hex_name_is_a_name_first() {
    let host = FakeHost::new();
    let named = host.push_image(&[b"named"], "");
    host.tag("docker.io/library/abc", "latest", &named.manifest);
    let other = busybox(&host);
    pull_ok(&host, &req("abc"));
    pull_ok(&host, &req("busybox"));
    assert_eq!(catalog::status(&host, "abc", &[]).unwrap().unwrap().id, named.config.digest);
    // Without a record named abc, "abc…" would be an ID prefix.
    let prefix = &hex_part(&other.config.digest)[..6];
    assert_eq!(catalog::status(&host, prefix, &[]).unwrap().unwrap().id, other.config.digest);
}

#[test]
fn an_ambiguous_prefix_is_refused() {
    let host = FakeHost::new();
    // Pull images until two IDs share a first hex digit.
    let mut ids: Vec<String> = Vec::new();
    for i in 0..20 {
        let img = host.push_image(&[format!("layer {i}").as_bytes()], "");
        let name = format!("docker.io/library/img{i}");
        host.tag(&name, "latest", &img.manifest);
        ids.push(pull_ok(&host, &req(&name)).id);
        let first = &hex_part(&ids[ids.len() - 1])[..1];
        if ids[..ids.len() - 1].iter().any(|id| hex_part(id).starts_with(first)) {
            let query = format!("sha256:{first}");
            match catalog::status(&host, &query, &[]) {
                Err(Error::FailedPrecondition(m)) => assert!(m.contains("ambiguous"), "{m}"),
                other => panic!("{other:?}"),
            }
            assert!(matches!(catalog::remove(&host, &query), Err(Error::FailedPrecondition(_))));
            return;
        }
    }
    panic!("20 IDs with distinct first digits");
}

#[test]
fn images_that_lost_content_or_snapshots_are_not_ready() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let other = host.push_image(&[b"other"], "");
    host.tag("docker.io/user/other", "latest", &other.manifest);
    let a = pull_ok(&host, &req("busybox"));
    let b = pull_ok(&host, &req("user/other"));
    let mut want = vec![a.clone(), b.clone()];
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(catalog::list(&host, &[]).unwrap(), want);

    // Snapshot removed behind pullbox's back.
    host.s.borrow_mut().snapshots.remove(&a.chain_id);
    assert_eq!(catalog::status(&host, "busybox", &[]).unwrap(), None);
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![b.clone()]);

    // Config removed.
    host.s.borrow_mut().content.remove(&other.config.digest);
    assert_eq!(catalog::status(&host, "user/other", &[]).unwrap(), None);
    assert!(catalog::list(&host, &[]).unwrap().is_empty());

    // Pulling again repairs it.
    assert_eq!(pull_ok(&host, &req("busybox")), a);
    assert_eq!(catalog::status(&host, &img.config.digest, &[]).unwrap(), Some(a));
}

#[test]
fn list_checks_readiness_in_batches_and_agrees_with_status() {
    use crate::digest::sha256;
    use crate::fake::Snap;
    use crate::host::MAX_BATCH;
    use crate::types::ImageRecord;

    // 600 images (1,200 digests: more than one `content.sizes` call takes) over 4 chain IDs,
    // written straight into the fake's stores, three records each.
    const N: usize = 600;
    let host = FakeHost::new();
    let chains: Vec<String> = (0..4).map(|c| sha256(format!("chain {c}").as_bytes())).collect();
    let mut ids = Vec::new();
    {
        let mut s = host.s.borrow_mut();
        for chain in &chains {
            s.snapshots.insert(chain.clone(), Snap { parent: String::new(), kind: SnapshotKind::Committed });
        }
        for i in 0..N {
            let config = format!("config {i}").into_bytes();
            let manifest = format!("manifest {i}").into_bytes();
            let (id, mdigest) = (sha256(&config), sha256(&manifest));
            s.content.insert(id.clone(), (config, Default::default()));
            s.content.insert(mdigest.clone(), (manifest, Default::default()));
            let labels = vec![
                (labels::IMAGE_ID.to_string(), id.clone()),
                (labels::IMAGE_MANIFEST.to_string(), mdigest.clone()),
                (labels::IMAGE_CHAIN_ID.to_string(), chains[i % 4].clone()),
                (labels::IMAGE_SIZE.to_string(), i.to_string()),
            ];
            let name = format!("docker.io/library/img{i}");
            for record in [id.clone(), format!("{name}:latest"), format!("{name}@{mdigest}")] {
                s.images
                    .insert(record.clone(), ImageRecord { name: record, labels: labels.clone(), ..Default::default() });
            }
            ids.push((id, mdigest));
        }
        // Not ready: a lost config, a lost manifest, a chain that is only active, a chain
        // that is gone (each chain is shared by a quarter of the images).
        s.content.remove(&ids[5].0);
        s.content.remove(&ids[6].1);
        s.snapshots.get_mut(&chains[2]).unwrap().kind = SnapshotKind::Active;
        s.snapshots.remove(&chains[3]);
    }
    let ready = |i: usize| i != 5 && i != 6 && i % 4 < 2;

    host.s.borrow_mut().lookups.clear();
    let listed = catalog::list(&host, &[]).unwrap();
    assert_eq!(
        host.s.borrow().lookups,
        vec![
            format!("list-labels {}", catalog::RECORD_LABELS.join(",")),
            format!("sizes {MAX_BATCH}"),
            format!("sizes {}", 2 * N - MAX_BATCH),
            "stats 4".to_string(),
        ],
        "the records' names and labels only, then one look-up per batch, none per image"
    );
    let mut want: Vec<&str> = (0..N).filter(|&i| ready(i)).map(|i| ids[i].0.as_str()).collect();
    want.sort_unstable();
    let got: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(got, want, "sorted by ID, ready images only");
    let first = listed.iter().find(|i| i.id == ids[0].0).unwrap();
    assert_eq!(first.repo_tags, vec!["docker.io/library/img0:latest"]);
    assert_eq!(first.repo_digests, vec![format!("docker.io/library/img0@{}", ids[0].1)]);
    assert_eq!(first.chain_id, chains[0]);

    // The batched path and the single-image path (status) agree (on the first 40 images:
    // every kind of not-ready one is among them).
    for (i, (id, _)) in ids.iter().enumerate().take(40) {
        let status = catalog::status(&host, id, &[]).unwrap();
        assert_eq!(status.is_some(), ready(i), "image {i}");
        if let Some(status) = status {
            assert_eq!(Some(&status), listed.iter().find(|l| &l.id == id));
        }
    }
    assert!(!host.s.borrow().lookups.contains(&"list".to_string()), "status and list read names and labels only");
    // Why each one is not ready is logged, as by status.
    let logs = host.s.borrow().logs.clone();
    for what in ["config", "manifest", "snapshot"] {
        assert!(logs.iter().any(|(_, m)| m.contains("is not ready") && m.contains(what)), "{what}: {logs:?}");
    }
    assert!(logs.iter().any(|(l, m)| *l == Level::Warn && m.contains("not committed")));
}

#[test]
fn records_of_others_are_ignored() {
    let host = FakeHost::new();
    busybox(&host);
    let info = pull_ok(&host, &req("busybox"));
    host.s.borrow_mut().images.insert(
        "docker.io/library/foreign:latest".into(),
        crate::types::ImageRecord { name: "docker.io/library/foreign:latest".into(), ..Default::default() },
    );
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![info]);
    assert_eq!(catalog::status(&host, "foreign", &[]).unwrap(), None);
    catalog::remove(&host, "foreign").unwrap();
    assert_eq!(host.record_names().len(), 4);
}

#[test]
fn remove_deletes_every_record_of_the_image() {
    let host = FakeHost::new();
    let img = busybox(&host);
    host.tag(BUSYBOX, "1.36", &img.manifest);
    pull_ok(&host, &req("busybox"));
    pull_ok(&host, &req("busybox:1.36"));
    let other = host.push_image(&[b"other"], "");
    host.tag("docker.io/user/other", "latest", &other.manifest);
    let kept = pull_ok(&host, &req("user/other"));
    assert_eq!(catalog::status(&host, "busybox:1.36", &[]).unwrap().unwrap().repo_tags.len(), 2);

    host.clear_calls();
    catalog::remove(&host, "busybox:1.36").unwrap();
    let calls = host.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[3], format!("delete {}", img.config.digest), "the ID record goes last");
    assert_eq!(catalog::status(&host, "busybox", &[]).unwrap(), None);
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![kept]);

    // Unknown images are fine.
    catalog::remove(&host, "busybox").unwrap();
    catalog::remove(&host, &img.config.digest).unwrap();
    assert!(matches!(catalog::remove(&host, "UPPER"), Err(Error::InvalidArgument(_))));
}

#[test]
fn facade_uses_the_configured_settings() {
    // The only test that touches the global settings besides settings::tests, which restores
    // the defaults; this one only reads them.
    let host = FakeHost::new();
    busybox(&host);
    let info = crate::pull_image(&host, &req("busybox")).unwrap();
    assert_eq!(crate::image_status(&host, "busybox").unwrap(), Some(info.clone()));
    assert_eq!(crate::list_images(&host).unwrap(), vec![info]);
    crate::remove_image(&host, "busybox").unwrap();
    assert!(crate::list_images(&host).unwrap().is_empty());
    let err = crate::pull_image(&host, &req("nope")).unwrap_err();
    assert!(err.is_not_found());
    assert!(host.s.borrow().logs.iter().any(|(_, m)| m.starts_with("pull of \"nope\" failed: not-found")));
}

// ---- policy ---------------------------------------------------------------------------

fn settings(doc: &str) -> Settings {
    crate::settings::parse(doc).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

/// Pulls with `doc` as settings; returns the denial message, panicking on anything else.
#[track_caller]
fn denied(host: &FakeHost, doc: &str, r: &PullRequest) -> String {
    match pull(host, &settings(doc), r) {
        Err(Error::PermissionDenied(m)) => m,
        other => panic!("{doc} {r:?}: expected permission-denied, got {other:?}"),
    }
}

fn fetches(host: &FakeHost) -> Vec<String> {
    host.calls().into_iter().filter(|c| c.starts_with("fetch")).collect()
}

fn logged(host: &FakeHost, level: Level, needle: &str) -> bool {
    host.s.borrow().logs.iter().any(|(l, m)| *l == level && m.contains(needle))
}

/// Pushes the same small image under several names.
fn everywhere(host: &FakeHost, names: &[&str]) -> Pushed {
    let img = host.push_image(&[b"layer"], "");
    for name in names {
        host.tag(name, "latest", &img.manifest);
        host.tag(name, "1.0", &img.manifest);
    }
    img
}

#[test]
fn reference_rules_decide_before_the_registry_is_asked() {
    let names = [
        "registry.io/team/app",
        "registry.io.evil.com/team/app",
        "registry.io:5000/team/app",
        "evilregistry.io/team/app",
        "registry.io/teamevil/app",
        "registry.io/team/app-dev",
        "docker.io/library/busybox",
        "a.example.com/x/y",
        "example.com/x/y",
        "127.0.0.1:5000/team/app",
        "127.1:5000/team/app",
        "REGISTRY.IO/team/app",
    ];
    // (settings, reference, denied rule or None)
    let cases: &[(&str, &str, Option<&str>)] = &[
        (r#"{"allowedRegistries": ["registry.io"]}"#, "registry.io/team/app", None),
        (r#"{"allowedRegistries": ["registry.io"]}"#, "registry.io:5000/team/app", None),
        (r#"{"allowedRegistries": ["registry.io"]}"#, "REGISTRY.IO/team/app", None),
        (r#"{"allowedRegistries": ["registry.io"]}"#, "registry.io.evil.com/team/app", Some("allowedRegistries")),
        (r#"{"allowedRegistries": ["registry.io"]}"#, "evilregistry.io/team/app", Some("allowedRegistries")),
        (r#"{"allowedRegistries": ["registry.io"]}"#, "busybox", Some("allowedRegistries")),
        (r#"{"allowedRegistries": ["registry.io:5000"]}"#, "registry.io/team/app", Some("allowedRegistries")),
        (r#"{"allowedRegistries": ["docker.io"]}"#, "busybox", None),
        (r#"{"allowedRegistries": ["*.example.com"]}"#, "a.example.com/x/y", None),
        (r#"{"allowedRegistries": ["*.example.com"]}"#, "example.com/x/y", Some("allowedRegistries")),
        (r#"{"allowedRegistries": []}"#, "registry.io/team/app", Some("allowedRegistries")),
        (r#"{"blockedRegistries": ["registry.io"]}"#, "registry.io:5000/team/app", Some("blockedRegistries")),
        (r#"{"blockedRegistries": ["registry.io"]}"#, "registry.io.evil.com/team/app", None),
        (r#"{"blockedRegistries": ["127.0.0.1"]}"#, "127.1:5000/team/app", Some("blockedRegistries")),
        (r#"{"blockedRegistries": ["127.0.0.1"]}"#, "127.0.0.1:5000/team/app", Some("blockedRegistries")),
        (
            r#"{"allowedRegistries": ["*.io"], "blockedRegistries": ["evilregistry.io"]}"#,
            "evilregistry.io/team/app",
            Some("blockedRegistries"),
        ),
        (r#"{"allowedRepositories": ["registry.io/team/*"]}"#, "registry.io/team/app", None),
        (r#"{"allowedRepositories": ["registry.io/team/*"]}"#, "registry.io/teamevil/app", Some("allowedRepositories")),
        (
            r#"{"allowedRepositories": ["registry.io/team/*"]}"#,
            "registry.io.evil.com/team/app",
            Some("allowedRepositories"),
        ),
        (
            r#"{"allowedRepositories": ["registry.io/team/app"]}"#,
            "registry.io/team/app-dev",
            Some("allowedRepositories"),
        ),
        (r#"{"allowedRepositories": ["busybox"]}"#, "docker.io/library/busybox:1.0", None),
        (r#"{"allowedRepositories": ["**/app"]}"#, "registry.io/team/app-dev", Some("allowedRepositories")),
        (r#"{"blockedRepositories": ["registry.io/team/app"]}"#, "registry.io/team/app-dev", None),
        (
            r#"{"blockedRepositories": ["registry.io/team/app"]}"#,
            "registry.io:5000/team/app",
            Some("blockedRepositories"),
        ),
        (r#"{"blockedRepositories": ["registry.io/**"]}"#, "registry.io/team/app", Some("blockedRepositories")),
        (r#"{"deniedTags": ["latest"]}"#, "busybox", Some("deniedTags")),
        (r#"{"deniedTags": ["latest"]}"#, "busybox:latest", Some("deniedTags")),
        (r#"{"deniedTags": ["latest"]}"#, "busybox:1.0", None),
        (r#"{"deniedTags": ["1.*"]}"#, "busybox:1.0", Some("deniedTags")),
        (r#"{"deniedTags": ["Latest"]}"#, "busybox:latest", None),
        (r#"{"requireDigest": true}"#, "busybox:1.0", Some("requireDigest")),
        (r#"{"requireDigest": false}"#, "busybox:1.0", None),
    ];
    for (doc, reference, want) in cases {
        let host = FakeHost::new();
        everywhere(&host, &names);
        let result = pull(&host, &settings(doc), &req(reference));
        match (want, result) {
            (None, Ok(_)) => {}
            (Some(rule), Err(Error::PermissionDenied(m))) => {
                assert!(m.starts_with("policy denies "), "{doc} {reference}: {m}");
                assert!(m.contains(&format!("rule {rule}: ")), "{doc} {reference}: {m}");
                assert!(host.calls().is_empty(), "{doc} {reference}: {:?}", host.calls());
                assert!(host.s.borrow().content.is_empty(), "resolved before deciding");
                assert!(logged(&host, Level::Warn, "reference stage: denied"));
            }
            (want, got) => panic!("{doc} {reference}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn digests_pass_tag_and_digest_rules() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let doc = r#"{"deniedTags": ["latest"], "requireDigest": true}"#;
    let by_digest = format!("busybox@{}", img.manifest.digest);
    let m = denied(&host, doc, &req("busybox"));
    assert!(m.contains("rule requireDigest") && m.contains("rule deniedTags"), "{m}");
    pull(&host, &settings(doc), &req(&by_digest)).unwrap();
    // With a digest the tag plays no part in what is pulled, so it is not judged.
    pull(&host, &settings(doc), &req(&format!("busybox:latest@{}", img.manifest.digest))).unwrap();
}

#[test]
fn manifest_rules_decide_before_config_and_layers_are_fetched() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let size = img.config.size + img.layers.iter().map(|l| l.size).sum::<u64>();
    let cases: Vec<(String, Option<&str>)> = vec![
        (format!(r#"{{"maxImageSize": {size}}}"#), None),
        (format!(r#"{{"maxImageSize": {}}}"#, size - 1), Some("maxImageSize")),
        (r#"{"maxLayers": 2}"#.into(), None),
        (r#"{"maxLayers": 1}"#.into(), Some("maxLayers")),
        (r#"{"maxLayers": 0}"#.into(), Some("maxLayers")),
        (format!(r#"{{"allowedLayerMediaTypes": ["{}"]}}"#, crate::fake::LAYER_TAR), None),
        (
            r#"{"allowedLayerMediaTypes": ["application/vnd.oci.image.layer.v1.tar+zstd"]}"#.into(),
            Some("allowedLayerMediaTypes"),
        ),
    ];
    for (doc, want) in &cases {
        let host = FakeHost::new();
        busybox(&host);
        match (want, pull(&host, &settings(doc), &req("busybox"))) {
            (None, Ok(_)) => {}
            (Some(rule), Err(Error::PermissionDenied(m))) => {
                assert!(m.contains(&format!("rule {rule}: ")), "{doc}: {m}");
                assert!(fetches(&host).is_empty(), "{doc}: {:?}", host.calls());
                assert!(logged(&host, Level::Warn, "manifest stage: denied"));
            }
            (want, got) => panic!("{doc}: want {want:?}, got {got:?}"),
        }
    }
    let m = denied(&host, &format!(r#"{{"maxImageSize": {}}}"#, size - 1), &req("busybox"));
    assert!(m.contains(&format!("is {size} bytes")) && m.contains(&format!("{} allowed", size - 1)), "{m}");
    let m = denied(&host, r#"{"maxLayers": 1}"#, &req("busybox"));
    assert!(m.contains("has 2 layers, more than the 1 allowed"), "{m}");
    let m = denied(&host, r#"{"allowedLayerMediaTypes": ["a/b"]}"#, &req("busybox"));
    assert!(m.contains("2 of 2 layers have") && m.contains(crate::fake::LAYER_TAR), "{m}");
}

#[test]
fn platform_rules_judge_the_index_entry_and_the_config() {
    let host = FakeHost::new();
    let amd = host.push_image(&[b"amd64 layer"], "");
    let arm = host.push_image_for(&[b"arm64 layer"], "", "linux/arm64");
    let index = host.push_index(&[(&amd.manifest, "linux/amd64"), (&arm.manifest, "linux/arm64/v8")]);
    host.tag("quay.io/team/multi", "1", &index);
    host.tag("quay.io/team/single", "1", &amd.manifest);
    let only_arm = r#"{"platforms": ["linux/arm64"]}"#;

    // From an index: the entry's platform, before the config is fetched.
    let m = denied(&host, only_arm, &req_on("quay.io/team/multi:1", "linux/amd64"));
    assert!(m.contains("rule platforms") && m.contains("linux/amd64") && m.contains("\"linux/arm64\""), "{m}");
    assert_eq!(fetches(&host), vec![format!("fetch {}", amd.manifest.digest)]);
    pull(&host, &settings(only_arm), &req_on("quay.io/team/multi:1", "linux/arm64")).unwrap();

    // A single manifest: the config's platform, before any layer is fetched.
    let host = FakeHost::new();
    let amd = host.push_image(&[b"amd64 layer"], "");
    host.tag("quay.io/team/single", "1", &amd.manifest);
    let m = denied(&host, only_arm, &req("quay.io/team/single:1"));
    assert!(m.contains("the image config is for linux/amd64"), "{m}");
    assert_eq!(fetches(&host), vec![format!("fetch {}", amd.config.digest)]);
    assert!(logged(&host, Level::Warn, "config stage: denied"));
    pull(&host, &settings(r#"{"platforms": ["linux/amd64", "linux/arm64"]}"#), &req("quay.io/team/single:1")).unwrap();
}

#[test]
fn audit_mode_logs_violations_and_pulls() {
    let host = FakeHost::new();
    busybox(&host);
    let doc = r#"{"mode": "audit", "blockedRegistries": ["docker.io"], "maxLayers": 1, "platforms": ["linux/s390x"]}"#;
    let info = pull(&host, &settings(doc), &req("busybox")).unwrap();
    assert_eq!(info.repo_tags, vec![format!("{BUSYBOX}:latest")]);
    for needle in [
        "policy audit: docker.io/library/busybox:latest: reference stage: would deny: rule blockedRegistries",
        "manifest stage: would deny: rule maxLayers",
        "config stage: would deny: rule platforms",
    ] {
        assert!(logged(&host, Level::Warn, needle), "no warning {needle:?}: {:?}", host.s.borrow().logs);
    }
}

#[test]
fn every_decision_is_logged() {
    let host = FakeHost::new();
    busybox(&host);
    let doc =
        r#"{"allowedRegistries": ["docker.io"], "deniedTags": ["dev"], "maxLayers": 5, "platforms": ["linux/amd64"]}"#;
    pull(&host, &settings(doc), &req("busybox")).unwrap();
    for needle in [
        "policy: docker.io/library/busybox:latest: reference stage: allowed by allowedRegistries, deniedTags",
        "manifest stage: allowed by maxLayers",
        "config stage: allowed by platforms",
    ] {
        assert!(logged(&host, Level::Info, needle), "{needle:?}: {:?}", host.s.borrow().logs);
    }
    assert!(logged(&host, Level::Debug, "resolved stage: allowed, no rule applies"));
}

#[test]
fn a_policy_of_its_own_sees_each_stage() {
    use crate::policy::{Image, Policy, Verdict};
    use crate::reference::Reference;
    use std::cell::RefCell;

    /// Records the hooks it sees; refuses one root digest.
    struct Spy {
        seen: RefCell<Vec<String>>,
        refuse: String,
    }
    impl Policy for Spy {
        fn check_reference(&self, r: &Reference) -> Verdict {
            self.seen.borrow_mut().push(format!("reference {r}"));
            Verdict::new()
        }
        fn check_root(&self, _: &Reference, root: &Descriptor) -> Verdict {
            self.seen.borrow_mut().push(format!("root {}", root.digest));
            let mut v = Verdict::new();
            let outcome = if root.digest == self.refuse { Err("refused".to_string()) } else { Ok(()) };
            v.rule("spy", outcome);
            v
        }
        fn check_manifest(&self, _: &Reference, image: &Image<'_>) -> Verdict {
            self.seen.borrow_mut().push(format!("manifest {}", image.manifest_desc.digest));
            Verdict::new()
        }
        fn check_config(&self, _: &Reference, _: &Image<'_>, c: &crate::oci::Config) -> Verdict {
            self.seen.borrow_mut().push(format!("config {}", c.architecture));
            Verdict::new()
        }
    }
    let host = FakeHost::new();
    let img = busybox(&host);
    let spy = Spy { seen: RefCell::new(vec![]), refuse: String::new() };
    crate::pull::pull_with(&host, &crate::pull::Options::default(), &spy, &req("busybox")).unwrap();
    assert_eq!(
        spy.seen.into_inner(),
        vec![
            "reference docker.io/library/busybox:latest".to_string(),
            format!("root {}", img.manifest.digest),
            format!("manifest {}", img.manifest.digest),
            "config amd64".into(),
        ]
    );
    let host = FakeHost::new();
    let img = busybox(&host);
    let spy = Spy { seen: RefCell::new(vec![]), refuse: img.manifest.digest.clone() };
    match crate::pull::pull_with(&host, &crate::pull::Options::default(), &spy, &req("busybox")) {
        Err(Error::PermissionDenied(m)) => {
            assert_eq!(m, "policy denies docker.io/library/busybox:latest: rule spy: refused")
        }
        other => panic!("{other:?}"),
    }
    assert!(host.calls().is_empty());
    assert_eq!(spy.seen.borrow().len(), 2);
}

// ---- scopes: policy by pod and runtime handler ----------------------------------------

/// A request for `reference` from a pod in `namespace` with `labels`, or from no pod.
fn req_for(reference: &str, namespace: Option<&str>, labels: &[(&str, &str)], handler: &str) -> PullRequest {
    PullRequest {
        runtime_handler: handler.into(),
        pod: namespace.map(|ns| Pod {
            namespace: ns.into(),
            name: "web-0".into(),
            uid: "5f1c".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: Vec::new(),
        }),
        ..req(reference)
    }
}

const SCOPED: &str = r#"{
    "scopes": [
        {"name": "team-a", "namespaces": ["team-a"],
         "allowedRepositories": ["registry.example.com/team-a/**"]},
        {"name": "prod", "namespaces": ["prod-*"], "requireDigest": true},
        {"name": "pci", "podLabels": {"compliance": "pci*"},
         "blockedRegistries": ["docker.io"]},
        {"runtimeHandlers": ["kata", "gvisor-*"], "maxLayers": 0}
    ]
}"#;

#[test]
fn scopes_match_namespace_labels_and_handler() {
    let s = settings(SCOPED);
    let names = |r: &PullRequest| -> Vec<String> { s.scopes_for(r).iter().map(|x| x.name.clone()).collect() };
    let app = "registry.example.com/team-a/app";
    /// (namespace, labels, handler, scopes that apply)
    type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str, &'a [&'a str]);
    let cases: &[Case] = &[
        (None, &[], "", &[]),
        (None, &[("compliance", "pci-dss")], "kata", &["3"]),
        (Some("team-a"), &[], "", &["team-a"]),
        (Some("team-ab"), &[], "", &[]),
        (Some("prod-x"), &[], "", &["prod"]),
        (Some("prod-"), &[], "", &["prod"]),
        (Some("preprod-x"), &[], "", &[]),
        (Some("prod"), &[], "", &[]),
        (Some("default"), &[("compliance", "pci")], "", &["pci"]),
        (Some("default"), &[("compliance", "none")], "", &[]),
        (Some("default"), &[("other", "pci")], "", &[]),
        (Some("prod-eu"), &[("compliance", "pci-dss")], "gvisor-sandbox", &["prod", "pci", "3"]),
        (Some("team-a"), &[], "runc", &["team-a"]),
        (Some("team-a"), &[], "gvisor", &["team-a"]),
    ];
    for (ns, labels, handler, want) in cases {
        assert_eq!(
            names(&req_for(app, *ns, labels, handler)),
            want.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "namespace {ns:?} labels {labels:?} handler {handler:?}"
        );
    }
}

#[test]
fn the_same_image_is_allowed_in_one_namespace_and_denied_in_another() {
    let host = FakeHost::new();
    let img = everywhere(&host, &["registry.example.com/team-a/app", "registry.example.com/team-b/app"]);
    let tagged = "registry.example.com/team-a/app:1.0";
    let by_digest = format!("registry.example.com/team-a/app@{}", img.manifest.digest);
    let s = settings(SCOPED);

    // Allowed for team-a, and for no pod (scopes by namespace do not apply).
    for r in [
        req_for(tagged, Some("team-a"), &[], ""),
        req_for(tagged, None, &[], ""),
        req_for(tagged, Some("default"), &[], ""),
    ] {
        pull(&host, &s, &r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    }

    // prod-* requires a digest: by tag denied, naming the scope and the rule, before the
    // registry is asked; by digest allowed.
    host.clear_calls();
    let m = denied(&host, SCOPED, &req_for(tagged, Some("prod-x"), &[], ""));
    assert!(m.contains("rule scopes[prod].requireDigest:"), "{m}");
    assert!(!m.contains("team-a]"), "{m}");
    assert!(logged(&host, Level::Warn, "reference stage: denied: rule scopes[prod].requireDigest"));
    pull(&host, &s, &req_for(&by_digest, Some("prod-x"), &[], "")).unwrap();

    // team-a may pull only its own repositories; other namespaces may pull team-b's.
    let m = denied(&host, SCOPED, &req_for("registry.example.com/team-b/app:1.0", Some("team-a"), &[], ""));
    assert!(m.contains("rule scopes[team-a].allowedRepositories:"), "{m}");
    pull(&host, &s, &req_for("registry.example.com/team-b/app:1.0", Some("team-b"), &[], "")).unwrap();

    // An unnamed scope is named by its index; a manifest-stage rule in a scope applies too.
    let m = denied(&host, SCOPED, &req_for(tagged, Some("team-a"), &[], "kata"));
    assert!(m.contains("rule scopes[3].maxLayers:"), "{m}");

    // Several scopes and the top-level rules all apply: every violation is named.
    let doc = r#"{"deniedTags": ["1.0"], "scopes": [
        {"name": "prod", "namespaces": ["prod-*"], "requireDigest": true}]}"#;
    let m = denied(&host, doc, &req_for(tagged, Some("prod-x"), &[], ""));
    assert!(m.contains("rule deniedTags:") && m.contains("rule scopes[prod].requireDigest:"), "{m}");
}

#[test]
fn audit_mode_covers_scoped_rules() {
    let host = FakeHost::new();
    everywhere(&host, &["registry.example.com/team-a/app"]);
    let doc = r#"{"mode": "audit", "scopes": [
        {"name": "prod", "namespaces": ["prod-*"], "requireDigest": true}]}"#;
    let r = req_for("registry.example.com/team-a/app:1.0", Some("prod-x"), &[], "");
    pull(&host, &settings(doc), &r).unwrap();
    assert!(logged(&host, Level::Warn, "would deny: rule scopes[prod].requireDigest"));
}

#[test]
fn scope_settings_are_checked() {
    let ok = settings(SCOPED);
    assert_eq!(ok.scopes.len(), 4);
    assert_eq!(ok.scopes[3].name, "3");
    assert!(ok.scopes[1].rules.require_digest);
    assert_eq!(ok.scopes[1].namespaces.as_deref(), Some(&["prod-*".to_string()][..]));
    // (document, what the message must say)
    let bad: &[(&str, &[&str])] = &[
        (r#"{"scopes": {}}"#, &["\"scopes\" must be a list of objects"]),
        (r#"{"scopes": [1]}"#, &["\"scopes\"", "entry 0 is 1"]),
        (
            r#"{"scopes": [{"namespaces": ["Prod"]}]}"#,
            &["\"scopes\" entry 0", "\"namespaces\"", "not a namespace pattern"],
        ),
        (r#"{"scopes": [{"namespaces": "prod"}]}"#, &["\"namespaces\" must be a list"]),
        (r#"{"scopes": [{"podLabels": ["app"]}]}"#, &["\"podLabels\" must be an object"]),
        (r#"{"scopes": [{"podLabels": {"app": 1}}]}"#, &["\"podLabels\"", "label \"app\""]),
        (r#"{"scopes": [{"runtimeHandlers": ["ka ta"]}]}"#, &["\"runtimeHandlers\"", "not a runtime handler pattern"]),
        (
            r#"{"scopes": [{"requireDigest": "yes"}]}"#,
            &["\"scopes\" entry 0", "\"requireDigest\" must be true or false"],
        ),
        (r#"{"scopes": [{"mode": "audit"}]}"#, &["\"scopes\" entry 0", "\"mode\" is node-wide"]),
        (r#"{"scopes": [{"pinnedImages": []}]}"#, &["\"pinnedImages\" is node-wide"]),
        (r#"{"scopes": [{"scopes": []}]}"#, &["\"scopes\" is node-wide"]),
        (r#"{"scopes": [{"namespace": ["a"]}]}"#, &["unknown scope key \"namespace\"", "namespaces"]),
        (r#"{"scopes": [{"name": "a", "name": "b"}]}"#, &["key \"name\" is given twice in one object"]),
        (r#"{"scopes": [{"name": "x"}, {"name": "x"}]}"#, &["entry 1", "name \"x\" is given to two scopes"]),
        (r#"{"scopes": [{"name": ""}]}"#, &["\"name\" must be a name"]),
        (r#"{"scopes": [{"name": "1"}, {}]}"#, &["entry 1", "name \"1\" is given to two scopes"]),
    ];
    for (doc, wants) in bad {
        let m = match crate::settings::parse(doc) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{doc}: expected invalid-argument, got {other:?}"),
        };
        for want in *wants {
            assert!(m.contains(want), "{doc}: {m:?} lacks {want:?}");
        }
    }
}

// ---- fetching only what is missing ----------------------------------------------------

#[test]
fn a_second_tag_fetches_nothing() {
    let host = FakeHost::new();
    let img = busybox(&host);
    host.tag(BUSYBOX, "1.36", &img.manifest);
    pull_ok(&host, &req("busybox"));
    host.clear_calls();
    let info = pull_ok(&host, &req("busybox:1.36"));
    assert_eq!(fetches(&host), Vec::<String>::new());
    assert_eq!(info.repo_tags, vec![format!("{BUSYBOX}:1.36"), format!("{BUSYBOX}:latest")]);
    assert!(host.calls().contains(&format!("create {BUSYBOX}:1.36")));
}

#[test]
fn committed_layers_are_not_fetched_even_when_their_blobs_are_gone() {
    let host = FakeHost::new();
    let img = busybox(&host);
    host.tag(BUSYBOX, "1.36", &img.manifest);
    let discard = settings(r#"{"discard_unpacked_layers": true}"#);
    pull(&host, &discard, &req("busybox")).unwrap();
    // The garbage collector takes the unreferenced layer blobs.
    for l in &img.layers {
        host.s.borrow_mut().content.remove(&l.digest);
    }
    host.clear_calls();
    let info = pull(&host, &discard, &req("busybox:1.36")).unwrap();
    assert_eq!(fetches(&host), Vec::<String>::new());
    assert_eq!(info.repo_tags.len(), 2);
    assert!(catalog::status(&host, "busybox:1.36", &[]).unwrap().is_some());

    // A new image on the same base fetches only its own top layer.
    let other = host.push_image(&[b"base layer", b"other top"], "");
    host.tag("docker.io/user/other", "v1", &other.manifest);
    host.clear_calls();
    pull(&host, &discard, &req("user/other:v1")).unwrap();
    assert_eq!(
        fetches(&host),
        vec![format!("fetch {}", other.config.digest), format!("fetch {}", other.layers[1].digest)]
    );
}

#[test]
fn a_lost_snapshot_is_fetched_and_unpacked_again() {
    let host = FakeHost::new();
    let img = busybox(&host);
    let chain = chain_ids(&img.diff_ids);
    pull_ok(&host, &req("busybox"));
    // The top snapshot and its blob vanish; the base stays.
    host.s.borrow_mut().snapshots.remove(&chain[1]);
    host.s.borrow_mut().content.remove(&img.layers[1].digest);
    host.clear_calls();
    pull_ok(&host, &req("busybox"));
    assert_eq!(fetches(&host), vec![format!("fetch {}", img.layers[1].digest)]);
    let applies: Vec<String> = host.calls().into_iter().filter(|c| c.starts_with("apply")).collect();
    assert_eq!(applies.len(), 1, "{applies:?}");
}

// ---- dispatch -------------------------------------------------------------------------

#[test]
fn index_entries_without_a_platform_are_matched_by_their_config() {
    let host = FakeHost::new();
    let arm = host.push_image_for(&[b"arm64 layer"], "", "linux/arm64");
    let amd = host.push_image_for(&[b"amd64 layer"], "", "linux/amd64");
    let s390 = host.push_image_for(&[b"s390x layer"], "", "linux/s390x");
    let index = host.push_index(&[(&arm.manifest, ""), (&amd.manifest, ""), (&s390.manifest, "linux/s390x")]);
    host.tag(BUSYBOX, "latest", &index);
    let info = pull_ok(&host, &req("busybox"));
    assert_eq!(info.id, amd.config.digest);
    assert_eq!(info.manifest_digest, amd.manifest.digest);
    // An entry with a matching platform wins without reading any config.
    host.clear_calls();
    let info = pull_ok(&host, &req_on("busybox", "linux/s390x"));
    assert_eq!(info.id, s390.config.digest);
    assert_eq!(fetches(&host)[0], format!("fetch {}", s390.manifest.digest));
    // Nothing fits: not found, listing the platforms the index names.
    match pull(&host, &Settings::DEFAULT, &req_on("busybox", "linux/ppc64le")) {
        Err(Error::NotFound(m)) => assert!(m.contains("it has: linux/s390x"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn arm64_falls_back_to_32_bit_arm_and_amd64_to_386() {
    let host = FakeHost::new();
    let v7 = host.push_image_for(&[b"arm v7"], "", "linux/arm/v7");
    let i386 = host.push_image_for(&[b"386"], "", "linux/386");
    let index = host.push_index(&[(&v7.manifest, "linux/arm/v7"), (&i386.manifest, "linux/386")]);
    host.tag(BUSYBOX, "latest", &index);
    assert_eq!(pull_ok(&host, &req_on("busybox", "linux/arm64/v8")).id, v7.config.digest);
    assert_eq!(pull_ok(&host, &req_on("busybox", "linux/amd64")).id, i386.config.digest);
}

#[test]
fn artifacts_are_refused_naming_their_type() {
    let host = FakeHost::new();
    let empty = host.push_blob("application/vnd.oci.empty.v1+json", b"{}");
    let blob = host.push_blob("application/vnd.example.sbom", b"sbom");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": crate::fake::desc_json(&empty),
        "layers": [crate::fake::desc_json(&blob)],
    });
    let manifest = host.push_blob(crate::oci::OCI_MANIFEST, manifest.to_string().as_bytes());
    host.tag(BUSYBOX, "sbom", &manifest);
    match pull(&host, &Settings::DEFAULT, &req("busybox:sbom")) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("artifact type \"application/vnd.example.sbom\""), "{m}");
            assert!(m.contains("not a container image"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(fetches(&host).is_empty());
}

#[test]
fn non_distributable_layers_keep_only_allowed_urls() {
    let host = FakeHost::new();
    let layer_bytes: &[u8] = b"foreign layer";
    let mut layer = host.push_blob("application/vnd.oci.image.layer.nondistributable.v1.tar", layer_bytes);
    layer.urls = vec![
        "https://mcr.microsoft.com/blob/1".into(),
        "https://evil.example/blob/1".into(),
        "ftp://mcr.microsoft.com/blob/1".into(),
        "https://user@mcr.microsoft.com/blob/1".into(),
        "HTTP://MCR.microsoft.com:80/blob/1".into(),
    ];
    let config = serde_json::json!({"os": "linux", "architecture": "amd64",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]}});
    let config = host.push_blob(crate::oci::OCI_CONFIG, config.to_string().as_bytes());
    let mut layer_json = crate::fake::desc_json(&layer);
    layer_json["urls"] = serde_json::json!(layer.urls);
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": crate::oci::OCI_MANIFEST,
        "config": crate::fake::desc_json(&config), "layers": [layer_json]});
    let manifest = host.push_blob(crate::oci::OCI_MANIFEST, manifest.to_string().as_bytes());
    host.tag("mcr.microsoft.com/windows/base", "1", &manifest);

    let doc = r#"{"allowedRegistries": ["mcr.microsoft.com"]}"#;
    let info = pull(&host, &settings(doc), &req("mcr.microsoft.com/windows/base:1")).unwrap();
    assert_eq!(info.id, config.digest);
    let fetched = host.s.borrow().fetched.clone();
    let l = fetched.iter().find(|d| d.digest == layer.digest).expect("layer fetched");
    assert_eq!(
        l.urls,
        vec!["https://mcr.microsoft.com/blob/1".to_string(), "HTTP://MCR.microsoft.com:80/blob/1".into()]
    );
    assert!(logged(&host, Level::Warn, "dropped URL \"https://evil.example/blob/1\""));
    assert!(logged(&host, Level::Warn, "dropped URL \"ftp://"));
    // Without a registry policy every http(s) URL stays.
    let host2 = FakeHost::new();
    host2.s.borrow_mut().remote = host.s.borrow().remote.clone();
    host2.tag("mcr.microsoft.com/windows/base", "1", &manifest);
    pull(&host2, &Settings::DEFAULT, &req("mcr.microsoft.com/windows/base:1")).unwrap();
    let fetched = host2.s.borrow().fetched.clone();
    assert_eq!(fetched.iter().find(|d| d.digest == layer.digest).unwrap().urls.len(), 3);
}

// ---- metadata -------------------------------------------------------------------------

#[test]
fn tags_and_digests_merge_like_update_image_metadata() {
    let host = FakeHost::new();
    let img = busybox(&host);
    host.tag(BUSYBOX, "1.36", &img.manifest);
    host.tag("quay.io/mirror/busybox", "latest", &img.manifest);
    pull_ok(&host, &req("busybox"));
    pull_ok(&host, &req("busybox:1.36"));
    pull_ok(&host, &req(&format!("busybox@{}", img.manifest.digest)));
    pull_ok(&host, &req("quay.io/mirror/busybox"));
    let info = pull_ok(&host, &req("busybox"));
    assert_eq!(
        info.repo_tags,
        vec![format!("{BUSYBOX}:1.36"), format!("{BUSYBOX}:latest"), "quay.io/mirror/busybox:latest".to_string()]
    );
    assert_eq!(
        info.repo_digests,
        vec![format!("{BUSYBOX}@{}", img.manifest.digest), format!("quay.io/mirror/busybox@{}", img.manifest.digest)]
    );
    // One record per name: the ID, three tags, two digests.
    assert_eq!(host.record_names().len(), 6);
    assert_eq!(catalog::list(&host, &[]).unwrap().len(), 1);
}

#[test]
fn a_digest_pull_of_a_tagged_image_keeps_its_tags() {
    let host = FakeHost::new();
    let img = busybox(&host);
    pull_ok(&host, &req("busybox"));
    let info = pull_ok(&host, &req(&format!("busybox@{}", img.manifest.digest)));
    assert_eq!(info.repo_tags, vec![format!("{BUSYBOX}:latest")]);
    // A moved tag leaves a digest-only image behind.
    let v2 = host.push_image(&[b"v2 layer"], "");
    host.tag(BUSYBOX, "latest", &v2.manifest);
    pull_ok(&host, &req("busybox"));
    let old = catalog::status(&host, &img.config.digest, &[]).unwrap().unwrap();
    assert!(old.repo_tags.is_empty());
    assert_eq!(old.repo_digests, vec![format!("{BUSYBOX}@{}", img.manifest.digest)]);
    assert_eq!(catalog::list(&host, &[]).unwrap().len(), 2);
}

// --- records without pullbox's labels (ctr pull, ctr images import) ---

/// What `ctr pull` leaves behind: `blobs` in the content store, the snapshots of `diff_ids`
/// committed (unless empty), and a record `name` → `root` without pullbox's labels.
fn ctr_pull(host: &FakeHost, name: &str, root: &Descriptor, blobs: &[&Descriptor], diff_ids: &[String]) {
    use crate::fake::Snap;
    let mut s = host.s.borrow_mut();
    for d in std::iter::once(root).chain(blobs.iter().copied()) {
        let bytes = s.remote[&d.digest].clone();
        s.content.insert(d.digest.clone(), (bytes, Default::default()));
    }
    let mut parent = String::new();
    for chain in chain_ids(diff_ids) {
        s.snapshots.insert(
            chain.clone(),
            Snap { parent: std::mem::replace(&mut parent, chain), kind: SnapshotKind::Committed },
        );
    }
    s.images.insert(
        name.into(),
        crate::types::ImageRecord {
            name: name.into(),
            target: root.clone(),
            labels: vec![("containerd.io/some".into(), "label".into())],
            ..Default::default()
        },
    );
}

fn pushed_blobs(img: &Pushed) -> Vec<&Descriptor> {
    std::iter::once(&img.config).chain(&img.layers).collect()
}

#[test]
fn unlabelled_records_are_images_as_a_pull_would_describe_them() {
    let host = FakeHost::new();
    let img = busybox(&host);
    ctr_pull(&host, &format!("{BUSYBOX}:latest"), &img.manifest, &pushed_blobs(&img), &img.diff_ids);

    // The same image pulled by pullbox elsewhere: same ID, chain, size, user.
    let other = FakeHost::new();
    busybox(&other);
    let pulled = pull_ok(&other, &req("busybox"));

    let want = ImageInfo {
        repo_digests: vec![], // ctr wrote no digest record, containerd's CRI shows none
        ..pulled
    };
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![want.clone()]);
    for arg in ["busybox", &img.config.digest, &hex_part(&img.config.digest)[..12]] {
        assert_eq!(catalog::status(&host, arg, &[]).unwrap(), Some(want.clone()), "{arg}");
    }
    assert_eq!(want.size, size_of(&img.manifest, &img));
    assert_eq!(want.user, "nobody");
    // Reading it wrote nothing.
    assert!(host.calls().is_empty(), "{:?}", host.calls());

    // A pullbox pull of another tag of the same image joins it; remove by the ctr name
    // deletes both tools' records.
    host.tag(BUSYBOX, "1.36", &img.manifest);
    let joined = pull_ok(&host, &req("busybox:1.36"));
    assert_eq!(joined.repo_tags, vec![format!("{BUSYBOX}:1.36"), format!("{BUSYBOX}:latest")]);
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![joined]);
    catalog::remove(&host, "busybox:latest").unwrap();
    assert!(host.record_names().is_empty(), "{:?}", host.record_names());
    assert!(catalog::list(&host, &[]).unwrap().is_empty());
}

#[test]
fn unlabelled_index_records_take_the_entry_on_the_node() {
    let host = FakeHost::new();
    let amd = host.push_image_for(&[b"amd64 layer"], "", "linux/amd64");
    let arm = host.push_image_for(&[b"arm64 layer"], "1000", "linux/arm64");
    let index = host.push_index(&[(&amd.manifest, "linux/amd64"), (&arm.manifest, "linux/arm64")]);
    let name = "registry.example.com/multi:1";

    // Only amd64's manifest is in the store (`ctr pull` on an amd64 node).
    let mut blobs = pushed_blobs(&amd);
    blobs.push(&amd.manifest);
    ctr_pull(&host, name, &index, &blobs, &amd.diff_ids);
    let info = catalog::status(&host, name, &[]).unwrap().unwrap();
    assert_eq!(info.id, amd.config.digest);
    assert_eq!(info.manifest_digest, amd.manifest.digest);
    assert_eq!(info.size, index.size + size_of(&amd.manifest, &amd));

    // Both present (`ctr pull --all-platforms`), only arm64 unpacked: arm64, the platform
    // unpacked here, although amd64 comes first in the index.
    let mut blobs = pushed_blobs(&arm);
    blobs.push(&arm.manifest);
    host.s.borrow_mut().snapshots.clear();
    ctr_pull(&host, name, &index, &blobs, &arm.diff_ids);
    let info = catalog::status(&host, name, &[]).unwrap().unwrap();
    assert_eq!(info.id, arm.config.digest);
    assert_eq!(info.manifest_digest, arm.manifest.digest);
    assert_eq!(info.user, "1000");
    assert_eq!(info.size, index.size + size_of(&arm.manifest, &arm));
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![info]);
}

#[test]
fn unlabelled_records_that_are_not_ready_images_are_left_out() {
    let host = FakeHost::new();
    let img = busybox(&host);
    // Not unpacked: content there, no snapshot.
    ctr_pull(&host, "docker.io/library/packed:1", &img.manifest, &pushed_blobs(&img), &[]);
    // Config missing.
    let two = host.push_image(&[b"two"], "");
    ctr_pull(&host, "docker.io/library/noconfig:1", &two.manifest, &[], &two.diff_ids);
    // An artifact (config not an image config).
    let cfg = host.push_blob("application/vnd.example.config+json", b"{}");
    let art = host.push_blob(
        crate::oci::OCI_MANIFEST,
        serde_json::json!({
            "schemaVersion": 2, "mediaType": crate::oci::OCI_MANIFEST,
            "config": crate::fake::desc_json(&cfg), "layers": [],
        })
        .to_string()
        .as_bytes(),
    );
    ctr_pull(&host, "docker.io/library/artifact:1", &art, &[&cfg], &[]);
    // A target that is not in the store at all.
    let gone = host.push_image(&[b"gone"], "");
    host.s.borrow_mut().images.insert(
        "docker.io/library/gone:1".into(),
        crate::types::ImageRecord {
            name: "docker.io/library/gone:1".into(),
            target: gone.manifest.clone(),
            ..Default::default()
        },
    );
    // None fails the list; none is listed.
    assert!(catalog::list(&host, &[]).unwrap().is_empty());
    for name in ["packed:1", "noconfig:1", "artifact:1", "gone:1"] {
        assert_eq!(catalog::status(&host, name, &[]).unwrap(), None, "{name}");
    }
    // Unpacking it makes the first one READY.
    ctr_pull(&host, "docker.io/library/packed:1", &img.manifest, &pushed_blobs(&img), &img.diff_ids);
    assert_eq!(catalog::list(&host, &[]).unwrap().len(), 1);
}

#[test]
fn many_unlabelled_records_are_read_with_one_list_and_each_target_once() {
    use crate::unlabelled::GET_EACH_UP_TO;
    let host = FakeHost::new();
    let img = busybox(&host);
    let names: Vec<String> = (0..=GET_EACH_UP_TO).map(|i| format!("docker.io/library/copy{i}:latest")).collect();
    for name in &names {
        ctr_pull(&host, name, &img.manifest, &pushed_blobs(&img), &img.diff_ids);
    }
    host.s.borrow_mut().lookups.clear();
    host.s.borrow_mut().reads = 0;
    let list = catalog::list(&host, &[]).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].repo_tags.len(), names.len());
    let s = host.s.borrow();
    assert!(!s.lookups.iter().any(|l| l.starts_with("get ")), "{:?}", s.lookups);
    assert_eq!(s.lookups.iter().filter(|l| *l == "list").count(), 1);
    assert_eq!(s.reads, 2, "one read of the manifest and one of the config");
    drop(s);

    // Few: one `get` each, no `list`.
    for name in &names[1..] {
        host.s.borrow_mut().images.remove(name);
    }
    host.s.borrow_mut().lookups.clear();
    assert_eq!(catalog::list(&host, &[]).unwrap().len(), 1);
    let s = host.s.borrow();
    assert!(!s.lookups.contains(&"list".to_string()), "{:?}", s.lookups);
    assert_eq!(s.lookups.iter().filter(|l| l.starts_with("get ")).count(), 1);
}

// ---- runtimePlatforms: platform and snapshotter by runtime handler ---------------------

#[test]
fn runtime_platforms_pick_platform_and_snapshotter_by_handler() {
    let host = FakeHost::new();
    host.s.borrow_mut().other_snapshots.insert("native".into(), Default::default());
    let amd = host.push_image(&[b"amd64 base", b"amd64 top"], "");
    let arm = host.push_image(&[b"arm64 layer"], "");
    let index = host.push_index(&[(&amd.manifest, "linux/amd64"), (&arm.manifest, "linux/arm64")]);
    let app = "127.0.0.1:5000/team/app";
    host.tag(app, "1.0", &index);
    let s = settings(
        r#"{"runtimePlatforms": {
            "kata": {"platform": "linux/arm64", "snapshotter": "native"},
            "wasm": {"snapshotter": "native"}
        }}"#,
    );
    let reference = format!("{app}:1.0");

    // kata: the arm64 manifest, unpacked into `native`, recorded as such.
    let kata = pull(&host, &s, &req_for(&reference, None, &[], "kata")).unwrap();
    assert_eq!(kata.id, arm.config.digest);
    let calls = host.calls();
    let select = calls.iter().position(|c| c == "select native").expect("selected");
    let prepare = calls.iter().position(|c| c.starts_with("prepare ")).unwrap();
    assert!(select < prepare, "{calls:?}");
    assert!(host.s.borrow().snapshots.is_empty(), "nothing in the default snapshotter");
    let arm_chain = kata.chain_id.clone();
    assert_eq!(host.s.borrow().other_snapshots["native"][&arm_chain].kind, SnapshotKind::Committed);
    assert_eq!(host.content_labels(&arm.config.digest)["containerd.io/gc.ref.snapshot.native"], arm_chain);
    let rec = host.s.borrow().images[&kata.id].clone();
    assert_eq!(label(&rec.labels, labels::IMAGE_SNAPSHOTTER), Some("native"));

    // Status and list look the snapshot up in `native` and find the image READY.
    host.s.borrow_mut().selected = None;
    assert_eq!(catalog::status(&host, &reference, &[]).unwrap(), Some(kata.clone()));
    host.s.borrow_mut().selected = None;
    assert_eq!(catalog::list(&host, &[]).unwrap(), vec![kata.clone()]);

    // The default handler: the request's platform and the default snapshotter; the tag
    // moves to the amd64 image, whose records carry no snapshotter label.
    host.s.borrow_mut().selected = None;
    host.clear_calls();
    let plain = pull(&host, &s, &req_for(&reference, None, &[], "")).unwrap();
    assert_eq!(plain.id, amd.config.digest);
    assert!(!host.calls().iter().any(|c| c.starts_with("select")));
    assert_eq!(host.s.borrow().snapshots[&plain.chain_id].kind, SnapshotKind::Committed);
    let rec = host.s.borrow().images[&plain.id].clone();
    assert_eq!(label(&rec.labels, labels::IMAGE_SNAPSHOTTER), None);

    // Both images are listed, each found in its own snapshotter (the tag and the repo
    // digest moved to the second).
    host.s.borrow_mut().selected = None;
    let bare = |mut i: ImageInfo| {
        i.repo_tags.clear();
        i.repo_digests.clear();
        i
    };
    let mut want = vec![bare(kata.clone()), bare(plain.clone())];
    want.sort_by(|a, b| a.id.cmp(&b.id));
    let got: Vec<ImageInfo> = catalog::list(&host, &[]).unwrap().into_iter().map(bare).collect();
    assert_eq!(got, want);

    // A snapshotter the host does not offer fails the pull naming the handler, before
    // anything is fetched; an image recorded in one no longer offered is not READY.
    host.s.borrow_mut().selected = None;
    host.clear_calls();
    let bad = settings(r#"{"runtimePlatforms": {"gvisor": {"snapshotter": "zfs"}}}"#);
    let e = pull(&host, &bad, &req_for(&reference, None, &[], "gvisor")).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.message().contains("runtime handler \"gvisor\""), "{e}");
    assert!(!host.calls().iter().any(|c| c.starts_with("fetch")));
    host.s.borrow_mut().selected = None;
    host.s.borrow_mut().other_snapshots.clear();
    assert_eq!(catalog::status(&host, &kata.id, &[]).unwrap(), None);
    host.s.borrow_mut().selected = None;
    assert_eq!(catalog::list(&host, &[]).unwrap().len(), 1);
}

#[test]
fn runtime_platforms_settings_are_checked() {
    for (doc, needle) in [
        (r#"{"runtimePlatforms": []}"#, "must be an object"),
        (r#"{"runtimePlatforms": {"kata": {}}}"#, "names neither"),
        (r#"{"runtimePlatforms": {"kata": {"platform": "arm64"}}}"#, "not a platform"),
        (r#"{"runtimePlatforms": {"kata": {"snapshotter": "a/b"}}}"#, "not a snapshotter"),
        (r#"{"runtimePlatforms": {"kata": {"snapshoter": "native"}}}"#, "unknown key"),
        (r#"{"runtimePlatforms": {"ka*": {"snapshotter": "native"}}}"#, "not a pattern"),
        (r#"{"runtimePlatforms": {"kata": {"platform": 1}}}"#, "must be a string"),
        (r#"{"scopes": [{"runtimePlatforms": {}}]}"#, "runtimePlatforms"),
    ] {
        let e = crate::settings::parse(doc).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{doc}: {e}");
        assert!(e.message().contains(needle), "{doc}: {e}");
    }
    let s = settings(r#"{"runtimePlatforms": {"": {"platform": "linux/arm/v7"}}}"#);
    let p = s.runtime_platform("").unwrap().platform.clone().unwrap();
    assert_eq!((p.os.as_str(), p.architecture.as_str(), p.variant.as_str()), ("linux", "arm", "v7"));
    assert!(s.runtime_platform("kata").is_none());
}
