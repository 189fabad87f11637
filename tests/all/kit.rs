//! The policy author's kit through the real `pullbox` binary and a real registry:
//! `pull --record` then `policy test` (replaying recorded pulls offline against candidate
//! pullers and settings, with and without an expected-results file); pullers loaded from the
//! registry by digest (`puller = "oci://…@sha256:…"`, reloaded on a new digest, tags and wrong
//! digests refused); a shadow puller whose disagreements the daemon counts.
//!
//! Needs `make build` first.

use std::path::{Path, PathBuf};

use std::process::Command;
use std::time::Duration;

use k8s_cri::v1::{ImageSpec, PullImageRequest};
use pullbox_tests::policy::{delete_blob, private_copy, push_puller, SettingsFile};
use pullbox_tests::{cri, fixture, Captured, Pullbox};

fn pull_req(image: &str) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() }),
        ..Default::default()
    }
}

/// A free loopback port for a daemon's metrics.
fn free_port() -> u16 {
    pullbox_tests::service::free_port().unwrap()
}

/// The daemon's metrics, once `needle` is among them (or after 10 s, whatever they are).
fn metrics_with(port: u16, needle: &str) -> String {
    let mut text = String::new();
    for _ in 0..200 {
        let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]).output().unwrap();
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(needle) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    text
}

fn pullbox() -> Pullbox {
    Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"))
}

/// `pullbox policy test ARGS... DIRS...`.
fn policy_test(pb: &Pullbox, args: &[&str], dirs: &[PathBuf]) -> Captured {
    let mut all: Vec<String> = vec!["test".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(dirs.iter().map(|d| d.display().to_string()));
    pb.run("policy", all)
}

/// The verdict `policy test` printed for `reference`: `allow`, `deny: …` or `error: …`.
fn verdict<'a>(out: &'a Captured, reference: &str) -> &'a str {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(reference).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no verdict for {reference}:\n{out}"))
}

fn files_under(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .map(|d| d.map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy())).collect())
        .unwrap_or_default()
}

#[test]
fn record_then_replay_several_images_offline_against_other_pullers_and_settings() {
    let f = fixture();
    let addr = f.registry.addr();
    // A private copy, so that the test can take its config away from the registry afterwards.
    let app = private_copy(addr, &f.app.reference, "kit/record-app:1.0").unwrap();
    let refs = [app.reference.clone(), f.app_zstd.reference.clone(), f.multi.reference.clone()];
    let recordings = tempfile::tempdir().unwrap();
    let pb = pullbox();
    let mut dirs = Vec::new();
    for (i, reference) in refs.iter().enumerate() {
        let dir = recordings.path().join(format!("pull{i}"));
        let out = pb.run("pull", ["--record".to_string(), dir.display().to_string(), reference.clone()]);
        out.assert_success();
        assert!(out.stderr.contains("recorded"), "{out}");
        dirs.push(dir);
    }

    // What was kept: the OCI layout files, the manifest and config, no layer.
    let kept = files_under(&dirs[0]);
    for needed in ["oci-layout", "index.json", "pullbox-request.json"] {
        assert!(dirs[0].join(needed).is_file(), "no {needed} in the recording");
    }
    assert!(kept.contains(&app.manifest_digest) && kept.contains(&app.config_digest), "{kept:?}");
    for layer in &app.layers {
        assert!(!kept.contains(&layer.digest), "layer {} was recorded", layer.digest);
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs[0].join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], app.manifest_digest.as_str());
    let multi_kept = files_under(&dirs[2]);
    assert!(multi_kept.contains(&f.multi.index_digest), "the index was recorded: {multi_kept:?}");

    // Offline: the registry no longer serves the private copy's config, a real pull fails,
    // the replay does not need it.
    delete_blob(addr, "kit/record-app", &app.config_digest).unwrap();
    pullbox().run("pull", [app.reference.as_str()]).assert_failure();

    // The default puller with no settings allows all three; exit 0.
    let other = pullbox();
    let out = policy_test(&other, &[], &dirs);
    out.assert_success();
    for reference in &refs {
        assert_eq!(verdict(&out, reference), "allow", "{out}");
    }
    assert!(other.images_json().is_empty() && other.blob_digests().unwrap().is_empty(), "replay wrote to the store");

    // Candidate settings that refuse three-layer images: the app images are denied, naming
    // the rule, and the exit is non-zero.
    let max1 = SettingsFile::new(r#"{"maxLayers": 1}"#);
    let settings = max1.path().display().to_string();
    let out = policy_test(&other, &["--settings", &settings], &dirs);
    out.assert_failure();
    let app_verdict = verdict(&out, &refs[0]);
    assert!(app_verdict.starts_with("deny: ") && app_verdict.contains("rule maxLayers"), "{out}");

    // An expected-results file: matching results exit 0, a difference does not.
    let expect_dir = tempfile::tempdir().unwrap();
    let expect = expect_dir.path().join("expected.txt");
    let expectations = |zstd: &str| format!("# maxLayers 1\n{} deny\n{} {zstd}\n{} deny\n", refs[0], refs[1], refs[2]);
    std::fs::write(&expect, expectations("deny")).unwrap();
    let expect_arg = expect.display().to_string();
    policy_test(&other, &["--settings", &settings, "--expect", &expect_arg], &dirs).assert_success();
    std::fs::write(&expect, expectations("allow")).unwrap();
    let out = policy_test(&other, &["--settings", &settings, "--expect", &expect_arg], &dirs);
    out.assert_failure();
    assert!(out.stderr.contains(&format!("{}: expected allow, got deny", refs[1])), "{out}");

    // Another puller: the allowlist, listing only the private copy's manifest, taken from
    // the registry by digest.
    let allow = SettingsFile::new(format!(r#"{{"digests": ["{}"]}}"#, app.manifest_digest));
    let allow_path = allow.path().display().to_string();
    let allowlist_file = Pullbox::puller("pullbox-allowlist.wasm").unwrap();
    let digest = push_puller(&allowlist_file, addr, "kit/record-allowlist:1").unwrap();
    let allowlist = format!("oci://{addr}/kit/record-allowlist@{digest}");
    let out = policy_test(&other, &["--puller", &allowlist, "--settings", &allow_path], &dirs);
    out.assert_failure();
    assert_eq!(verdict(&out, &refs[0]), "allow", "{out}");
    assert!(verdict(&out, &refs[1]).starts_with("deny: ") && verdict(&out, &refs[1]).contains("digests"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_puller_from_the_registry_by_digest_is_loaded_and_reloaded_on_a_new_digest() {
    let f = fixture();
    let addr = f.registry.addr();
    let default = push_puller(&Pullbox::puller("pullbox-puller.wasm").unwrap(), addr, "kit/pullers:default").unwrap();
    let refuse = push_puller(&Pullbox::puller("pullbox-refuse.wasm").unwrap(), addr, "kit/pullers:refuse").unwrap();
    let by_digest = |d: &str| format!("oci://{addr}/kit/pullers@{d}");
    let port = free_port();
    let daemon =
        cri::Daemon::start(&format!("puller = {:?}\nmetrics_address = \"127.0.0.1:{port}\"", by_digest(&default)))
            .unwrap();
    let mut c = cri::connect(daemon.socket()).await.unwrap();
    let reference = f.reference("team/app:1.0");
    let image = c.pull_image(pull_req(&reference)).await.unwrap().into_inner().image_ref;
    assert_eq!(image, f.app.config_digest);
    let cached =
        daemon.root().join("cache/pullers").join(format!("sha256-{}.wasm", default.trim_start_matches("sha256:")));
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(Pullbox::puller("pullbox-puller.wasm").unwrap()).unwrap()
    );

    // Another digest in the configuration file: the daemon notices and loads it.
    let config = daemon.dir().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(&default, &refuse)).unwrap();
    let mut refused = None;
    for _ in 0..200 {
        match c.pull_image(pull_req(&reference)).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("the new digest was not loaded:\n{}", daemon.log()));
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(daemon.log().contains("puller reloaded"), "{}", daemon.log());

    // The same digest again: not reloaded.
    daemon.signal("HUP").unwrap();
    let text = metrics_with(port, "pullbox_puller_reloads_total{result=\"ok\"} 2");
    assert!(text.contains("pullbox_puller_reloads_total{result=\"ok\"} 2"), "{text}\n{}", daemon.log());
    assert!(daemon.log().contains("unchanged; not reloaded"), "{}", daemon.log());

    // The CLI takes the same references.
    let pb = pullbox();
    let out = pb.run("pull", ["--puller", &by_digest(&default), &reference]);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.config_digest.as_str()));

    // Refused: a tag without a digest (unless tags are allowed), a digest the registry does
    // not have, an artifact that is not a puller.
    let tag = format!("oci://{addr}/kit/pullers:default");
    let err = format!("{:#}", cri::Daemon::start(&format!("puller = {tag:?}")).err().expect("a tag was accepted"));
    assert!(err.contains("names a tag, not a digest"), "{err}");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = format!(
        "{:#}",
        cri::Daemon::start(&format!("puller = {:?}", by_digest(&wrong))).err().expect("a wrong digest was accepted")
    );
    assert!(err.contains("cannot fetch puller"), "{err}");
    let not_a_puller = by_digest(&f.app.manifest_digest).replace("kit/pullers", "team/app");
    let err = format!(
        "{:#}",
        cri::Daemon::start(&format!("puller = {not_a_puller:?}")).err().expect("an image was accepted")
    );
    assert!(err.contains("is not a puller artifact"), "{err}");
    let tagged = cri::Daemon::start(&format!("puller = {tag:?}\nallow_puller_tags = true")).unwrap();
    let mut c = cri::connect(tagged.socket()).await.unwrap();
    c.pull_image(pull_req(&reference)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_puller_judges_each_pull_and_its_disagreements_are_counted() {
    let f = fixture();
    let port = free_port();
    let refuse = Pullbox::puller("pullbox-refuse.wasm").unwrap();
    let daemon = cri::Daemon::start(&format!(
        "shadow_puller = {:?}\nmetrics_address = \"127.0.0.1:{port}\"",
        refuse.display().to_string()
    ))
    .unwrap();
    let mut c = cri::connect(daemon.socket()).await.unwrap();
    // The real (default) puller allows; the shadow refuses, on the side: the pull succeeds.
    let image = c.pull_image(pull_req(&f.reference("team/app:1.0"))).await.unwrap().into_inner().image_ref;
    assert_eq!(image, f.app.config_digest);
    let text = metrics_with(port, "pullbox_shadow_disagreements_total 1");
    assert!(text.contains("pullbox_shadow_disagreements_total 1"), "{text}\n{}", daemon.log());
    assert!(text.contains("pullbox_shadow_judgments_total{result=\"disagree\"} 1"), "{text}");
    assert!(daemon.log().contains("shadow puller disagrees"), "{}", daemon.log());

    // A shadow that agrees: the allowlist puller listing the image's manifest.
    let settings = daemon.dir().join("allow.json");
    std::fs::write(&settings, format!(r#"{{"digests": ["{}"]}}"#, f.app.manifest_digest)).unwrap();
    let allowlist = Pullbox::puller("pullbox-allowlist.wasm").unwrap();
    let port = free_port();
    let agreeing = cri::Daemon::start(&format!(
        "shadow_puller = {:?}\nshadow_settings = {:?}\nmetrics_address = \"127.0.0.1:{port}\"",
        allowlist.display().to_string(),
        settings.display().to_string()
    ))
    .unwrap();
    let mut c = cri::connect(agreeing.socket()).await.unwrap();
    c.pull_image(pull_req(&f.reference("team/app:1.0"))).await.unwrap();
    let text = metrics_with(port, "pullbox_shadow_judgments_total{result=\"agree\"} 1");
    assert!(text.contains("pullbox_shadow_judgments_total{result=\"agree\"} 1"), "{text}\n{}", agreeing.log());
    assert!(text.contains("pullbox_shadow_disagreements_total 0"), "{text}");
}
