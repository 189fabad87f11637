//! The example cosign puller (`--puller pullbox-cosign.wasm`) through the real `pullbox`
//! binary and a real `docker-registry`: the tests make their own P-256 keys, sign the
//! fixture image's manifest digest the way `cosign sign --key` does, push the signatures to
//! the registry, and pull.
//!
//! Each test works on a private copy of the fixture image (its own repository), so that the
//! signature tags of one test are not seen by another. Needs `make build` first. Denials
//! are checked as every policy denial is ([`assert_denied`]): non-zero exit, the rule named,
//! nothing recorded or left in the store (signature blobs included).
//!
//! Debian's `docker-registry` (distribution 2.8) has no OCI 1.1 referrers API: it answers
//! 404 there, so the referrers test exercises the host's tag-schema fallback (the
//! `sha256-<hex>` index); [`cosign::push_referrer`] says which path the registry offers and
//! the test prints it.

use pullbox_tests::cosign::{self, payload, push_referrer, push_sig_tag, Layer, TestKey};
use pullbox_tests::policy::{assert_denied, private_copy, pull_with, SettingsFile};
use pullbox_tests::{fixture, Pullbox, RemoteImage};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn args() -> Vec<String> {
    let path = Pullbox::puller("pullbox-cosign.wasm").unwrap();
    vec!["--puller".into(), path.display().to_string()]
}

/// A private copy of the fixture image as `<addr>/signed/<name>:1.0`, and the settings
/// trusting `key` (as `release`) for `<addr>/signed/**`, by the rule `signatures[signed]`.
fn setup(name: &str, key: &TestKey) -> (RemoteImage, SettingsFile) {
    let f = fixture();
    let addr = f.registry.addr();
    let img = private_copy(addr, &f.app.reference, &format!("signed/{name}:1.0")).unwrap();
    let settings = cosign::settings(&[("release", key)], "signed", &format!("{addr}/signed/**")).unwrap();
    (img, SettingsFile::new(settings))
}

/// The repository path of `img` (`signed/<name>`).
fn path(img: &RemoteImage) -> String {
    img.repo.split_once('/').unwrap().1.to_string()
}

/// Pulls `reference` through the cosign puller into a fresh store: it must be refused by
/// `signatures[signed]` with `reason` in the message.
#[track_caller]
fn denied(settings: &SettingsFile, reference: &str, reason: &str) -> String {
    let pb = Pullbox::new().unwrap();
    let args = args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pull_with(&pb, settings, &args, reference);
    assert_denied(&pb, &out, "signatures[signed]");
    assert!(out.stderr.contains(reason), "expected {reason:?}:\n{out}");
    out.stderr.clone()
}

/// Pulls `reference` through the cosign puller into a fresh store: it must succeed with
/// image `id`.
#[track_caller]
fn allowed(settings: &SettingsFile, reference: &str, id: &str) {
    let pb = Pullbox::new().unwrap();
    let args = args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--log", "puller=info"]);
    let out = pull_with(&pb, settings, &args, reference);
    out.assert_success();
    assert_eq!(out.last_line(), Some(id), "{out}");
    assert!(out.stderr.contains("signed by key release"), "the accepting key is logged:\n{out}");
}

#[test]
fn a_signed_image_is_pulled_by_tag_and_by_digest() {
    let key = TestKey::generate().unwrap();
    let (img, settings) = setup("ok", &key);
    let f = fixture();
    push_sig_tag(
        &f.registry,
        &path(&img),
        &img.manifest_digest,
        &[Layer::signed(&key, payload(&img.repo, &img.manifest_digest))],
    )
    .unwrap();
    allowed(&settings, &img.reference, img.id());
    allowed(&settings, &img.digest_reference(), img.id());
}

#[test]
fn an_unsigned_image_is_denied_as_unsigned() {
    let key = TestKey::generate().unwrap();
    let (img, settings) = setup("unsigned", &key);
    let stderr = denied(&settings, &img.reference, "unsigned: no cosign signature of");
    assert!(stderr.contains(&cosign::sig_tag(&img.manifest_digest)), "names where it looked:\n{stderr}");
    // Images no rule covers are denied by `unmatched` (the default).
    let pb = Pullbox::new().unwrap();
    let args = args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pull_with(&pb, &settings, &args, &fixture().app.reference);
    assert_denied(&pb, &out, "unmatched");
}

#[test]
fn a_signature_by_another_key_is_denied_as_wrong_key() {
    let (key, stranger) = (TestKey::generate().unwrap(), TestKey::generate().unwrap());
    let (img, settings) = setup("wrong-key", &key);
    let f = fixture();
    push_sig_tag(
        &f.registry,
        &path(&img),
        &img.manifest_digest,
        &[Layer::signed(&stranger, payload(&img.repo, &img.manifest_digest))],
    )
    .unwrap();
    denied(&settings, &img.reference, "wrong key");
}

#[test]
fn a_signature_of_another_digest_is_denied() {
    let key = TestKey::generate().unwrap();
    let (img, settings) = setup("other-digest", &key);
    let f = fixture();
    // A valid signature of another image (the zstd variant), copied under this one's tag.
    let other = &f.app_zstd.manifest_digest;
    push_sig_tag(&f.registry, &path(&img), &img.manifest_digest, &[Layer::signed(&key, payload(&img.repo, other))])
        .unwrap();
    let stderr = denied(&settings, &img.reference, "signature of another digest");
    assert!(stderr.contains(other.as_str()), "names the signed digest:\n{stderr}");
}

#[test]
fn a_tampered_payload_is_denied() {
    let key = TestKey::generate().unwrap();
    let (img, settings) = setup("tampered", &key);
    let f = fixture();
    // A valid signature of another image whose payload was edited to name this one.
    let signature = key.sign(&payload(&img.repo, &f.app_zstd.manifest_digest));
    let tampered = Layer { payload: payload(&img.repo, &img.manifest_digest), signature };
    push_sig_tag(&f.registry, &path(&img), &img.manifest_digest, &[tampered]).unwrap();
    denied(&settings, &img.reference, "tampered payload");
}

#[test]
fn a_signature_is_found_through_referrers() {
    let key = TestKey::generate().unwrap();
    let (img, settings) = setup("referrers", &key);
    let f = fixture();
    let layer = Layer::signed(&key, payload(&img.repo, &img.manifest_digest));
    let subject = (img.manifest_digest.as_str(), img.manifest_size, OCI_MANIFEST);
    let (_, api) = push_referrer(&f.registry, &path(&img), subject, &[layer]).unwrap();
    eprintln!(
        "the registry {} the OCI 1.1 referrers API: the {} path is exercised",
        if api { "serves" } else { "does not serve (404)" },
        if api { "API" } else { "tag schema fallback" }
    );
    // No `.sig` tag: only the referrer can make it pass.
    let (status, _) =
        f.registry.get(&format!("/v2/{}/manifests/{}", path(&img), cosign::sig_tag(&img.manifest_digest))).unwrap();
    assert_eq!(status, 404);
    allowed(&settings, &img.reference, img.id());
}
