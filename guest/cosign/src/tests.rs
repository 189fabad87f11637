//! The cosign puller against the default puller's in-memory fake host: signatures pushed
//! under the `.sig` tag and as referrers, and every kind of refusal.

use pullbox_puller::fake::{desc_json, platform, FakeHost, Pushed};
use pullbox_puller::oci;

use super::*;
use crate::verify::payload;
use crate::verify::tests::{pem_of, sign, signing_key};

const NAME: &str = "quay.io/team/app";

fn settings(extra: &str) -> CosignSettings {
    let release = serde_json::to_string(&pem_of(&signing_key(1))).unwrap();
    let ci = serde_json::to_string(&pem_of(&signing_key(2))).unwrap();
    CosignSettings::parse(&format!(
        r#"{{"keys": {{"release": {release}, "ci": {ci}}},
            "rules": [{{"name": "team", "repositories": ["quay.io/team/**"], "keys": ["release", "ci"]}}]{extra}}}"#
    ))
    .unwrap()
}

fn req(reference: &str) -> PullRequest {
    PullRequest { reference: reference.into(), platform: platform("linux/amd64"), ..PullRequest::default() }
}

fn image(host: &FakeHost) -> Pushed {
    let img = host.push_image(&[b"layer"], "");
    host.tag(NAME, "1.0", &img.manifest);
    img
}

/// Pushes a signature manifest whose layers are (payload, base64 signature); returns it.
fn push_signatures(host: &FakeHost, sigs: &[(Vec<u8>, String)]) -> Descriptor {
    let config = host.push_blob(oci::OCI_CONFIG, b"{}");
    let layers: Vec<serde_json::Value> = sigs
        .iter()
        .map(|(p, s)| {
            let mut d = desc_json(&host.push_blob(SIMPLE_SIGNING, p));
            d["annotations"] = serde_json::json!({ SIGNATURE_ANNOTATION: s });
            d
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
        "config": desc_json(&config), "layers": layers,
    });
    host.push_blob(oci::OCI_MANIFEST, manifest.to_string().as_bytes())
}

fn sig_tag(digest: &str) -> String {
    format!("sha256-{}.sig", digest::hex_part(digest))
}

/// A signature by key `seed` of `digest`, pushed under the `.sig` tag of `subject`.
fn sign_under_tag(host: &FakeHost, subject: &str, digest: &str, seed: u8) {
    let p = payload(NAME, digest);
    let s = sign(&signing_key(seed), &p);
    let m = push_signatures(host, &[(p, s)]);
    host.tag(NAME, &sig_tag(subject), &m);
}

#[track_caller]
fn denied(host: &FakeHost, s: &CosignSettings, reference: &str, want: &[&str]) {
    match pull(host, s, &req(reference)) {
        Err(Error::PermissionDenied(m)) => {
            for w in want {
                assert!(m.contains(w), "{w:?} not in {m}");
            }
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !host.calls().iter().any(|c| c.contains("prepare") || c.contains("create")),
        "a refused pull unpacked or recorded: {:?}",
        host.calls()
    );
}

#[test]
fn a_signed_image_is_pulled_by_tag_and_digest() {
    let host = FakeHost::new();
    let img = image(&host);
    sign_under_tag(&host, &img.manifest.digest, &img.manifest.digest, 2);
    let s = settings("");
    let info = pull(&host, &s, &req("quay.io/team/app:1.0")).unwrap();
    assert_eq!(info.id, img.config.digest);
    let by_digest = format!("{NAME}@{}", img.manifest.digest);
    assert_eq!(pull(&host, &s, &req(&by_digest)).unwrap().id, img.config.digest);
    assert!(host.s.borrow().logs.iter().any(|(_, m)| m.contains("signed by key ci")), "the accepting key is logged");
}

#[test]
fn unsigned_wrong_key_other_digest_and_tampered_are_denied() {
    let s = settings("");
    // Unsigned: neither the tag nor a referrer; nothing but the root was fetched.
    let host = FakeHost::new();
    let img = image(&host);
    denied(&host, &s, "quay.io/team/app:1.0", &["rule signatures[team]: unsigned", "tag sha256-"]);
    assert!(host.calls().is_empty(), "{:?}", host.calls());
    assert!(host
        .s
        .borrow()
        .lookups
        .contains(&format!("referrers {NAME}@{} {SIGNATURE_ARTIFACT_TYPE}", img.manifest.digest)));

    // Signed by a key the settings do not trust.
    let host = FakeHost::new();
    let img = image(&host);
    sign_under_tag(&host, &img.manifest.digest, &img.manifest.digest, 7);
    denied(&host, &s, "quay.io/team/app:1.0", &["rule signatures[team]: wrong key", "release, ci"]);

    // A trusted signature of another image copied under this image's tag.
    let host = FakeHost::new();
    let img = image(&host);
    let other = digest::sha256(b"another manifest");
    sign_under_tag(&host, &img.manifest.digest, &other, 1);
    denied(&host, &s, "quay.io/team/app:1.0", &["signature of another digest", &other]);

    // That signature with its payload edited to name this image.
    let host = FakeHost::new();
    let img = image(&host);
    let signature = sign(&signing_key(1), &payload(NAME, &other));
    let m = push_signatures(&host, &[(payload(NAME, &img.manifest.digest), signature)]);
    host.tag(NAME, &sig_tag(&img.manifest.digest), &m);
    denied(&host, &s, "quay.io/team/app:1.0", &["tampered payload"]);
}

#[test]
fn one_good_signature_among_bad_ones_passes() {
    let host = FakeHost::new();
    let img = image(&host);
    let d = &img.manifest.digest;
    let good = payload(NAME, d);
    let m = push_signatures(
        &host,
        &[
            (good.clone(), sign(&signing_key(9), &good)),
            (good.clone(), "not base64!".into()),
            (good.clone(), sign(&signing_key(1), &good)),
        ],
    );
    host.tag(NAME, &sig_tag(d), &m);
    pull(&host, &settings(""), &req("quay.io/team/app:1.0")).unwrap();
}

#[test]
fn a_signature_is_found_through_referrers() {
    let host = FakeHost::new();
    let img = image(&host);
    let d = &img.manifest.digest;
    let good = payload(NAME, d);
    let m = push_signatures(&host, &[(good.clone(), sign(&signing_key(1), &good))]);
    // An SBOM referrer is filtered out by artifact type.
    host.push_referrer(NAME, d, &host.push_blob(oci::OCI_MANIFEST, b"{}"), "application/spdx+json");
    host.push_referrer(NAME, d, &m, SIGNATURE_ARTIFACT_TYPE);
    let s = settings("");
    assert_eq!(pull(&host, &s, &req("quay.io/team/app:1.0")).unwrap().id, img.config.digest);
    assert!(host.calls().contains(&format!("fetch {}", m.digest)), "{:?}", host.calls());
}

#[test]
fn unmatched_images_follow_the_unmatched_setting() {
    let host = FakeHost::new();
    let img = host.push_image(&[b"layer"], "");
    host.tag("quay.io/other/app", "1", &img.manifest);
    denied(&host, &settings(""), "quay.io/other/app:1", &["rule unmatched: no signature rule covers"]);
    assert!(host.s.borrow().lookups.is_empty(), "refused before resolving");
    pull(&host, &settings(r#", "unmatched": "allow""#), &req("quay.io/other/app:1")).unwrap();
}

#[test]
fn expired_keys_verify_nothing_by_the_hosts_clock() {
    let host = FakeHost::new();
    let img = image(&host);
    sign_under_tag(&host, &img.manifest.digest, &img.manifest.digest, 1);
    let pem = serde_json::to_string(&pem_of(&signing_key(1))).unwrap();
    let s = CosignSettings::parse(&format!(
        r#"{{"keys": {{"release": {{"pem": {pem}, "expires": 2000000000}}}}, "rules": [{{"keys": ["release"]}}]}}"#
    ))
    .unwrap();
    host.s.borrow_mut().now.seconds = 1_999_999_999;
    pull(&host, &s, &req("quay.io/team/app:1.0")).unwrap();
    let host2 = FakeHost::new();
    host2.s.borrow_mut().remote = host.s.borrow().remote.clone();
    host2.s.borrow_mut().refs = host.s.borrow().refs.clone();
    host2.s.borrow_mut().now.seconds = 2_000_000_000;
    denied(&host2, &s, "quay.io/team/app:1.0", &["rule signatures[0]: every key of the rule (release) has expired"]);
}

#[test]
fn audit_mode_pulls_and_logs() {
    let host = FakeHost::new();
    let img = image(&host);
    let info = pull(&host, &settings(r#", "mode": "audit""#), &req("quay.io/team/app:1.0")).unwrap();
    assert_eq!(info.id, img.config.digest);
    assert!(host.s.borrow().logs.iter().any(|(_, m)| m.contains("unsigned")));
}

/// The only test that touches the instance's settings (tests run in parallel).
#[test]
fn the_puller_uses_the_configured_settings() {
    assert!(CosignPuller::configure(r#"{"keys": {"k": "x"}}"#).is_err());
    CosignPuller::configure("").unwrap();
    let host = FakeHost::new();
    let img = image(&host);
    sign_under_tag(&host, &img.manifest.digest, &img.manifest.digest, 1);
    match CosignPuller::pull_image(&host, &req("quay.io/team/app:1.0")) {
        Err(Error::PermissionDenied(m)) => assert!(m.contains("rule unmatched"), "{m}"),
        other => panic!("{other:?}"),
    }
    let pem = serde_json::to_string(&pem_of(&signing_key(1))).unwrap();
    CosignPuller::configure(&format!(r#"{{"keys": {{"r": {pem}}}, "rules": [{{"keys": ["r"]}}]}}"#)).unwrap();
    let info = CosignPuller::pull_image(&host, &req("quay.io/team/app:1.0")).unwrap();
    assert_eq!(CosignPuller::list_images(&host).unwrap(), vec![info]);
}
