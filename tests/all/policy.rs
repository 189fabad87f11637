//! Pull policy through the real `pullbox` binary and a real registry: one test per settings
//! key of the default puller (`--settings FILE`), the example allowlist puller
//! (`--puller pullbox-allowlist.wasm`), and `pullbox policy check`.
//!
//! Needs `make build` first. Every denial is checked the same way
//! ([`pullbox_tests::policy::assert_denied`]): non-zero exit, `policy denies … rule <key>:`
//! on stderr, and nothing recorded or left in the store. Where a key is matched against the
//! registry host or repository, the test also tries the spellings that a string-prefix
//! match would get wrong.

use pullbox_tests::policy::{assert_denied, port_of, pull_with, SettingsFile};
use pullbox_tests::{fixture, Platform, Pullbox};

fn pullbox() -> Pullbox {
    Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"))
}

/// `pull --settings` of `reference` into a fresh store must succeed with image `id`.
#[track_caller]
fn allowed(settings: &str, args: &[&str], reference: &str, id: &str) {
    let pb = pullbox();
    let out = pull_with(&pb, &SettingsFile::new(settings), args, reference);
    out.assert_success();
    assert_eq!(out.last_line(), Some(id), "{settings} {reference}:\n{out}");
}

/// `pull --settings` of `reference` into a fresh store must be denied by `rule`; returns
/// stderr.
#[track_caller]
fn denied(settings: &str, args: &[&str], reference: &str, rule: &str) -> String {
    let pb = pullbox();
    let out = pull_with(&pb, &SettingsFile::new(settings), args, reference);
    assert_denied(&pb, &out, rule);
    out.stderr.clone()
}

#[test]
fn mode_audit_logs_violations_and_pulls() {
    let f = fixture();
    let settings = r#"{"mode": "audit", "blockedRegistries": ["127.0.0.1"], "maxLayers": 1}"#;
    let pb = pullbox();
    let out = pull_with(&pb, &SettingsFile::new(settings), &[], &f.app.reference);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()));
    for needle in ["policy audit", "rule blockedRegistries", "rule maxLayers", "pulling anyway"] {
        assert!(out.stderr.contains(needle), "audit mode does not log {needle:?}:\n{out}");
    }
    assert_eq!(pb.images_json().len(), 1);

    // The same rules enforced (the default mode, and spelled out).
    denied(r#"{"blockedRegistries": ["127.0.0.1"]}"#, &[], &f.app.reference, "blockedRegistries");
    denied(r#"{"mode": "enforce", "maxLayers": 1}"#, &[], &f.app.reference, "maxLayers");
}

#[test]
fn allowed_registries() {
    let f = fixture();
    let addr = f.registry.addr();
    let port = port_of(addr);
    let app = &f.app.reference;
    allowed(&format!(r#"{{"allowedRegistries": ["{addr}"]}}"#), &[], app, f.app.id());
    // Without a port a pattern allows every port of the host; other spellings of the same
    // address are the same host.
    allowed(r#"{"allowedRegistries": ["127.0.0.1"]}"#, &[], app, f.app.id());
    allowed(r#"{"allowedRegistries": ["127.1"]}"#, &[], app, f.app.id());
    allowed(r#"{"allowedRegistries": ["[::ffff:7f00:1]"]}"#, &[], app, f.app.id());

    let stderr = denied(r#"{"allowedRegistries": ["registry.example.com"]}"#, &[], app, "allowedRegistries");
    assert!(stderr.contains("is not an allowed registry"), "{stderr}");
    // Never a string prefix: neither the port's first digits, nor a longer address, nor a
    // DNS name that starts with the address.
    denied(
        &format!(r#"{{"allowedRegistries": ["127.0.0.1:{}"]}}"#, &port[..port.len() - 1]),
        &[],
        app,
        "allowedRegistries",
    );
    denied(r#"{"allowedRegistries": ["127.0.0.10"]}"#, &[], app, "allowedRegistries");
    denied(r#"{"allowedRegistries": ["127.0.0.1.nip.io"]}"#, &[], app, "allowedRegistries");
    denied(r#"{"allowedRegistries": []}"#, &[], app, "allowedRegistries");
}

#[test]
fn blocked_registries() {
    let f = fixture();
    let addr = f.registry.addr();
    let port = port_of(addr);
    let app = &f.app.reference;
    for pattern in [addr.to_string(), "127.0.0.1".into(), "127.1".into(), "0x7f000001".into()] {
        let stderr = denied(&format!(r#"{{"blockedRegistries": ["{pattern}"]}}"#), &[], app, "blockedRegistries");
        assert!(stderr.contains(&format!("matches blocked pattern \"{pattern}\"")), "{stderr}");
    }
    // The reference spelled differently is the same registry, refused before it is asked.
    for reference in [
        format!("127.1:{port}/team/app:1.0"),
        format!("[::ffff:7f00:1]:{port}/team/app:1.0"),
        format!("0177.0.0.1:{port}/team/app:1.0"),
    ] {
        denied(r#"{"blockedRegistries": ["127.0.0.1"]}"#, &[], &reference, "blockedRegistries");
    }
    // Other hosts, and prefixes of this one, are not blocked.
    for pattern in ["127.0.0.10", "127.0.0", "*.0.0.1.example.com", "registry.example.com"] {
        allowed(&format!(r#"{{"blockedRegistries": ["{pattern}"]}}"#), &[], app, f.app.id());
    }
    // A block wins over an allow.
    denied(
        &format!(r#"{{"allowedRegistries": ["{addr}"], "blockedRegistries": ["127.0.0.1"]}}"#),
        &[],
        app,
        "blockedRegistries",
    );
}

#[test]
fn allowed_repositories() {
    let f = fixture();
    let addr = f.registry.addr();
    let app = &f.app.reference;
    for pattern in [
        format!("{addr}/team/app"),
        format!("{addr}/team/*"),
        format!("{addr}/**"),
        "127.0.0.1/team/*".to_string(),
        "**/app".into(),
        "*/team/app".into(),
    ] {
        allowed(&format!(r#"{{"allowedRepositories": ["{pattern}"]}}"#), &[], app, f.app.id());
    }
    for pattern in [
        format!("{addr}/team/ap"),
        format!("{addr}/tea/*"),
        format!("{addr}/team/app/*"),
        format!("{addr}/other/**"),
        format!("127.0.0.10:{}/team/app", port_of(addr)),
        format!("127.0.0.1.nip.io:{}/team/app", port_of(addr)),
        "**/ap".into(),
    ] {
        let stderr = denied(&format!(r#"{{"allowedRepositories": ["{pattern}"]}}"#), &[], app, "allowedRepositories");
        assert!(stderr.contains("is not an allowed repository"), "{stderr}");
    }
}

#[test]
fn blocked_repositories() {
    let f = fixture();
    let addr = f.registry.addr();
    let settings = format!(r#"{{"blockedRepositories": ["{addr}/team/app"]}}"#);
    denied(&settings, &[], &f.app.reference, "blockedRepositories");
    denied(&settings, &[], &f.app.digest_reference(), "blockedRepositories");
    // team/app-zstd starts with team/app, and is another repository.
    allowed(&settings, &[], &f.app_zstd.reference, f.app_zstd.id());
    denied(r#"{"blockedRepositories": ["127.0.0.1/team/*"]}"#, &[], &f.app_zstd.reference, "blockedRepositories");
}

#[test]
fn denied_tags() {
    let f = fixture();
    denied(r#"{"deniedTags": ["1.0"]}"#, &[], &f.app.reference, "deniedTags");
    denied(r#"{"deniedTags": ["1.*"]}"#, &[], &f.app_second_tag.reference, "deniedTags");
    allowed(r#"{"deniedTags": ["1.0"]}"#, &[], &f.app_second_tag.reference, f.app.id());
    // By digest the tag plays no part in what is pulled.
    allowed(r#"{"deniedTags": ["1.0"]}"#, &[], &f.app.digest_reference(), f.app.id());
    // `latest` is what a reference without a tag means.
    let untagged = f.reference("team/app");
    let stderr = denied(r#"{"deniedTags": ["latest"]}"#, &[], &untagged, "deniedTags");
    assert!(stderr.contains("tag \"latest\" is denied"), "{stderr}");
}

#[test]
fn require_digest() {
    let f = fixture();
    let stderr = denied(r#"{"requireDigest": true}"#, &[], &f.app.reference, "requireDigest");
    assert!(stderr.contains("names no digest"), "{stderr}");
    allowed(r#"{"requireDigest": true}"#, &[], &f.app.digest_reference(), f.app.id());
    allowed(r#"{"requireDigest": false}"#, &[], &f.app.reference, f.app.id());
}

#[test]
fn platforms() {
    let f = fixture();
    let multi = &f.multi;
    let arm64 = multi.image_for(&Platform::parse("linux/arm64")).unwrap();
    let only_arm64 = r#"{"platforms": ["linux/arm64"]}"#;
    allowed(only_arm64, &["--platform", "linux/arm64"], &multi.reference, arm64.id());
    allowed(r#"{"platforms": ["linux/arm64/v8"]}"#, &["--platform", "linux/arm64"], &multi.reference, arm64.id());
    // From an index: the chosen entry's platform, judged before its config is fetched.
    let stderr =
        denied(only_arm64, &["--platform", "linux/amd64", "--log", "puller=debug"], &multi.reference, "platforms");
    assert!(stderr.contains("linux/amd64") && stderr.contains("\"linux/arm64\""), "{stderr}");
    let amd64 = multi.image_for(&Platform::parse("linux/amd64")).unwrap();
    assert!(!stderr.contains(&format!("fetching {}", amd64.config_digest)), "config fetched:\n{stderr}");
    // A single manifest: the platform its config declares, judged before any layer is
    // fetched.
    let stderr = denied(only_arm64, &["--log", "puller=debug"], &f.app.reference, "platforms");
    assert!(stderr.contains("the image config is for linux/amd64"), "{stderr}");
    for layer in &f.app.layers {
        assert!(!stderr.contains(&layer.digest), "layer {} was fetched:\n{stderr}", layer.digest);
    }
    allowed(r#"{"platforms": ["linux/amd64", "linux/arm64"]}"#, &[], &f.app.reference, f.app.id());
}

#[test]
fn max_image_size() {
    let f = fixture();
    let size = f.app.content_size();
    allowed(&format!(r#"{{"maxImageSize": {size}}}"#), &[], &f.app.reference, f.app.id());
    let stderr = denied(
        &format!(r#"{{"maxImageSize": {}}}"#, size - 1),
        &["--log", "puller=debug"],
        &f.app.reference,
        "maxImageSize",
    );
    assert!(stderr.contains(&format!("is {size} bytes")), "{stderr}");
    // Judged from the manifest: neither config nor layers were fetched.
    assert!(!stderr.contains("fetching"), "something was fetched:\n{stderr}");
}

#[test]
fn max_layers() {
    let f = fixture();
    allowed(r#"{"maxLayers": 3}"#, &[], &f.app.reference, f.app.id());
    let stderr = denied(r#"{"maxLayers": 2}"#, &[], &f.app.reference, "maxLayers");
    assert!(stderr.contains("has 3 layers, more than the 2 allowed"), "{stderr}");
}

#[test]
fn allowed_layer_media_types() {
    let f = fixture();
    let gzip = &f.app.layers[0].media_type;
    let zstd = &f.app_zstd.layers[0].media_type;
    assert_ne!(gzip, zstd);
    let only_gzip = format!(r#"{{"allowedLayerMediaTypes": ["{gzip}"]}}"#);
    allowed(&only_gzip, &[], &f.app.reference, f.app.id());
    let stderr = denied(&only_gzip, &[], &f.app_zstd.reference, "allowedLayerMediaTypes");
    assert!(stderr.contains(zstd.as_str()), "{stderr}");
    let only_zstd = format!(r#"{{"allowedLayerMediaTypes": ["{zstd}"]}}"#);
    allowed(&only_zstd, &[], &f.app_zstd.reference, f.app.id());
    denied(&only_zstd, &[], &f.app.reference, "allowedLayerMediaTypes");
}

#[test]
fn discard_unpacked_layers() {
    let f = fixture();
    let pb = pullbox();
    let settings = SettingsFile::new(r#"{"discard_unpacked_layers": true}"#);
    let out = pull_with(&pb, &settings, &[], &f.app.reference);
    out.assert_success();
    pb.run("gc", [""; 0]).assert_success();
    let blobs = pb.blob_digests().unwrap();
    for layer in &f.app.layers {
        assert!(!blobs.contains(&layer.digest), "layer {} kept:\n{blobs:?}", layer.digest);
    }
    assert!(blobs.contains(&f.app.config_digest) && blobs.contains(&f.app.manifest_digest));
    // The image is still READY: its snapshots hold the layers.
    assert_eq!(pb.inspect(&f.app.reference)["id"], f.app.id());
    assert_eq!(pb.images_json().len(), 1);
    // Without the setting the layers stay.
    let pb = pullbox();
    pb.pull(&[], &f.app.reference);
    pb.run("gc", [""; 0]).assert_success();
    let blobs = pb.blob_digests().unwrap();
    assert!(f.app.layers.iter().all(|l| blobs.contains(&l.digest)), "{blobs:?}");
}

#[test]
fn every_decision_is_logged() {
    let f = fixture();
    let pb = pullbox();
    let settings = SettingsFile::new(
        r#"{"allowedRegistries": ["127.0.0.1"], "deniedTags": ["latest"], "maxLayers": 9, "platforms": ["linux/amd64"]}"#,
    );
    let out = pull_with(&pb, &settings, &["--log", "puller=info"], &f.app.reference);
    out.assert_success();
    let reference = &f.app.reference;
    for needle in [
        format!("policy: {reference}: reference stage: allowed by allowedRegistries, deniedTags"),
        format!("policy: {reference}: manifest stage: allowed by maxLayers"),
        format!("policy: {reference}: config stage: allowed by platforms"),
    ] {
        assert!(out.stderr.contains(&needle), "not logged: {needle}\n{out}");
    }
}

#[test]
fn invalid_settings_are_refused_naming_the_key() {
    let f = fixture();
    let puller = Pullbox::puller("pullbox-puller.wasm").unwrap();
    for (doc, needle) in [
        (r#"{"maxLayers": "3"}"#, "\"maxLayers\""),
        (r#"{"mode": "permissive"}"#, "\"mode\""),
        (r#"{"allowedRegistries": ["https://127.0.0.1"]}"#, "\"allowedRegistries\" entry 0"),
        (r#"{"blockedRepositories": ["team/*"]}"#, "\"blockedRepositories\" entry 0"),
        (r#"{"platforms": ["amd64"]}"#, "\"platforms\" entry 0"),
        (r#"{"deniedTags": "latest"}"#, "\"deniedTags\""),
        (r#"{"requireDigest": 1}"#, "\"requireDigest\""),
        (r#"{"maxImageSize": -5}"#, "\"maxImageSize\""),
        (r#"{"allowedLayerMediaTypes": ["gzip"]}"#, "\"allowedLayerMediaTypes\" entry 0"),
        (r#"{"allowRegistries": []}"#, "unknown setting \"allowRegistries\""),
        (r#"{"maxLayers": 1, "maxLayers": 2}"#, "\"maxLayers\" is given twice"),
        ("[]", "must be a JSON object"),
    ] {
        let settings = SettingsFile::new(doc);
        let pb = pullbox();
        let out = pull_with(&pb, &settings, &[], &f.app.reference);
        out.assert_failure();
        assert!(out.stderr.contains(needle), "{doc}: the error does not name {needle}:\n{out}");
        assert_eq!(pb.images_json().len(), 0);
        // `policy check` says the same.
        let out = policy_check(&puller, Some(&settings));
        out.assert_failure();
        assert!(out.stderr.contains("refuses the settings") && out.stderr.contains(needle), "{doc}:\n{out}");
    }
}

/// `pullbox policy check [--settings FILE] COMPONENT`.
fn policy_check(component: &std::path::Path, settings: Option<&SettingsFile>) -> pullbox_tests::Captured {
    let pb = pullbox();
    let mut cmd = std::process::Command::new(Pullbox::bin().unwrap());
    cmd.arg("policy").arg("check");
    if let Some(s) = settings {
        cmd.arg("--settings").arg(s.path());
    }
    cmd.arg(component);
    for var in pullbox_tests::pullbox::PULLBOX_ENV {
        cmd.env_remove(var);
    }
    pb.run_command(cmd)
}

#[test]
fn policy_check_accepts_and_refuses() {
    let default = Pullbox::puller("pullbox-puller.wasm").unwrap();
    let allowlist = Pullbox::puller("pullbox-allowlist.wasm").unwrap();
    let refuse = Pullbox::puller("pullbox-refuse.wasm").unwrap();
    let full = SettingsFile::new(
        r#"{"mode": "audit", "allowedRegistries": ["docker.io", "*.example.com", "127.0.0.1:5000", "[::1]"],
            "blockedRegistries": ["evil.io"], "allowedRepositories": ["docker.io/library/*", "quay.io/team/**"],
            "blockedRepositories": ["docker.io/library/bad"], "deniedTags": ["latest"], "requireDigest": true,
            "platforms": ["linux/amd64", "linux/arm64/v8"], "maxImageSize": 1073741824, "maxLayers": 40,
            "allowedLayerMediaTypes": ["application/vnd.oci.image.layer.v1.tar+gzip"], "discard_unpacked_layers": true}"#,
    );
    let digests = SettingsFile::new(format!(r#"{{"digests": ["sha256:{}"]}}"#, "a".repeat(64)));
    for (component, settings) in
        [(&default, None), (&default, Some(&full)), (&allowlist, None), (&allowlist, Some(&digests)), (&refuse, None)]
    {
        let out = policy_check(component, settings);
        out.assert_success();
        assert!(out.stdout.contains("implements pullbox:image/puller-world@0.2.0 and accepts the settings"), "{out}");
    }

    // Settings a puller refuses: its own message, naming the key.
    let out = policy_check(&allowlist, Some(&full));
    out.assert_failure().assert_stderr_contains("unknown setting \"");
    out.assert_stderr_contains("(known: digests)");
    let out = policy_check(&default, Some(&digests));
    out.assert_failure().assert_stderr_contains("unknown setting \"digests\"");
    let bad_digest = SettingsFile::new(r#"{"digests": ["sha256:abc"]}"#);
    policy_check(&allowlist, Some(&bad_digest)).assert_failure().assert_stderr_contains("\"digests\" entry 0");

    // Files that are not puller components.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("not-wasm.wasm");
    std::fs::write(&text, "hello").unwrap();
    policy_check(&text, None).assert_failure().assert_stderr_contains("not a WebAssembly component");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    policy_check(&core, None).assert_failure().assert_stderr_contains("core WebAssembly module");
    let empty_component = dir.path().join("empty.wasm");
    std::fs::write(&empty_component, b"\0asm\x0d\0\x01\0").unwrap();
    let out = policy_check(&empty_component, None);
    out.assert_failure();
    assert!(out.stderr.contains("does not fit pullbox") || out.stderr.contains("puller"), "{out}");
    policy_check(&dir.path().join("missing.wasm"), None).assert_failure().assert_stderr_contains("cannot read");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cri_answers_permission_denied() {
    use k8s_cri::v1::{ImageSpec, PullImageRequest};
    let f = fixture();
    let settings = SettingsFile::new(format!(r#"{{"blockedRepositories": ["{}/team/app"]}}"#, f.registry.addr()));
    let daemon =
        pullbox_tests::cri::Daemon::start(&format!("settings = {:?}", settings.path().display().to_string())).unwrap();
    let mut c = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
    let pull = |image: &str| PullImageRequest {
        image: Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() }),
        ..PullImageRequest::default()
    };
    let err = c.pull_image(pull(&f.app.reference)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("policy denies") && err.message().contains("rule blockedRepositories"),
        "{}",
        err.message()
    );
    let ok = c.pull_image(pull(&f.app_zstd.reference)).await.unwrap().into_inner();
    assert_eq!(ok.image_ref, f.app_zstd.id());
}

// ---- scopes: policy by namespace, pod labels and runtime handler -----------------------

/// Settings scoping rules to namespaces `team-a` (only `team/**`), `prod-*` (digests only)
/// and runtime handler `kata` (no image with a layer).
fn scoped_settings(addr: &str) -> SettingsFile {
    SettingsFile::new(format!(
        r#"{{"scopes": [
            {{"name": "team-a", "namespaces": ["team-a"], "allowedRepositories": ["{addr}/team/**"]}},
            {{"name": "prod", "namespaces": ["prod-*"], "requireDigest": true}},
            {{"runtimeHandlers": ["kata"], "maxLayers": 0}}
        ]}}"#
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cri_pod_namespace_selects_scoped_rules() {
    use k8s_cri::v1::{ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest};
    let f = fixture();
    let settings = scoped_settings(f.registry.addr());
    let daemon =
        pullbox_tests::cri::Daemon::start(&format!("settings = {:?}", settings.path().display().to_string())).unwrap();
    let mut c = pullbox_tests::cri::connect(daemon.socket()).await.unwrap();
    let pull = |image: &str, namespace: Option<&str>, handler: &str| PullImageRequest {
        image: Some(ImageSpec { image: image.to_owned(), runtime_handler: handler.to_owned(), ..ImageSpec::default() }),
        sandbox_config: namespace.map(|ns| PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "0b4ef2a8".into(),
                namespace: ns.into(),
                attempt: 0,
            }),
            ..PodSandboxConfig::default()
        }),
        ..PullImageRequest::default()
    };
    let by_tag = &f.app.reference;

    // Allowed by tag in team-a.
    let ok = c.pull_image(pull(by_tag, Some("team-a"), "")).await.unwrap().into_inner();
    assert_eq!(ok.image_ref, f.app.id());

    // The same image by tag in prod-x: denied, naming the scope and rule, although the
    // image is already on the node.
    let err = c.pull_image(pull(by_tag, Some("prod-x"), "")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("policy denies") && err.message().contains("rule scopes[prod].requireDigest: "),
        "{}",
        err.message()
    );
    // By digest in prod-x: allowed.
    let ok = c.pull_image(pull(&f.app.digest_reference(), Some("prod-x"), "")).await.unwrap().into_inner();
    assert_eq!(ok.image_ref, f.app.id());

    // No sandbox config (crictl pull without a pod config): namespace scopes do not apply.
    c.pull_image(pull(by_tag, None, "")).await.unwrap();

    // The runtime handler reaches the puller too.
    let err = c.pull_image(pull(by_tag, Some("team-a"), "kata")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("rule scopes[2].maxLayers: "), "{}", err.message());
}

#[test]
fn cli_pod_namespace_and_runtime_handler_select_scoped_rules() {
    let f = fixture();
    let settings = scoped_settings(f.registry.addr());
    let app = &f.app.reference;
    let pb = pullbox();
    let out = pull_with(&pb, &settings, &["--pod-namespace", "prod-x"], app);
    assert_denied(&pb, &out, "scopes[prod].requireDigest");
    let out = pull_with(&pb, &settings, &["--runtime-handler", "kata"], app);
    assert_denied(&pb, &out, "scopes[2].maxLayers");
    let out = pull_with(&pb, &settings, &["--pod-namespace", "team-a"], app);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
}

// ---- the example allowlist puller ------------------------------------------------------

fn allowlist_args() -> Vec<String> {
    let path = Pullbox::puller("pullbox-allowlist.wasm").unwrap();
    vec!["--puller".into(), path.display().to_string()]
}

#[test]
fn allowlist_puller_pulls_only_listed_digests() {
    let f = fixture();
    let args = allowlist_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let listed = format!(r#"{{"digests": ["{}"]}}"#, f.app.manifest_digest);

    // The listed manifest, by tag, by another tag, and by digest; recorded as the default
    // puller records it.
    let pb = pullbox();
    let settings = SettingsFile::new(&listed);
    for reference in [&f.app.reference, &f.app_second_tag.reference, &f.app.digest_reference()] {
        let out = pull_with(&pb, &settings, &args, reference);
        out.assert_success();
        assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
    }
    let info = pb.inspect(&f.app.reference);
    assert_eq!(info["repoTags"].as_array().unwrap().len(), 2, "{info:#}");
    // status and list through the same puller
    let mut images = pb.command("images", ["--json"]);
    images.args(&args[..]);
    let out = pb.run_command(images);
    out.assert_success();
    assert_eq!(out.json().unwrap().as_array().map(Vec::len), Some(1), "{out}");

    // Another manifest of the same image (zstd layers): another digest, refused.
    let stderr = denied(&listed, &args, &f.app_zstd.reference, "digests");
    assert!(stderr.contains(&format!("manifest {} is not on the allowlist", f.app_zstd.manifest_digest)), "{stderr}");
    // No settings: nothing may be pulled.
    let pb = pullbox();
    let out = pb.run("pull", args.iter().copied().chain([f.app.reference.as_str()]));
    assert_denied(&pb, &out, "digests");
    assert!(out.stderr.contains("the allowlist is empty"), "{out}");
    // The default puller's settings are not this puller's.
    let pb = pullbox();
    let out = pull_with(&pb, &SettingsFile::new(r#"{"maxLayers": 3}"#), &args, &f.app.reference);
    out.assert_failure().assert_stderr_contains("unknown setting \"maxLayers\"");
}

#[test]
fn allowlist_puller_and_indexes() {
    let f = fixture();
    let args = allowlist_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let multi = &f.multi;
    let arm64 = multi.image_for(&Platform::parse("linux/arm64")).unwrap();
    let amd64 = multi.image_for(&Platform::parse("linux/amd64")).unwrap();

    // The index digest allows every platform of it.
    let by_index = format!(r#"{{"digests": ["{}"]}}"#, multi.index_digest);
    for (platform, image) in [("linux/arm64", arm64), ("linux/amd64", amd64)] {
        let mut a = args.clone();
        a.extend(["--platform", platform]);
        allowed(&by_index, &a, &multi.reference, image.id());
    }
    // A platform manifest's digest allows that platform only.
    let by_manifest = format!(r#"{{"digests": ["{}"]}}"#, arm64.manifest_digest);
    let mut a = args.clone();
    a.extend(["--platform", "linux/arm64"]);
    allowed(&by_manifest, &a, &multi.reference, arm64.id());
    let mut a = args.clone();
    a.extend(["--platform", "linux/amd64"]);
    let stderr = denied(&by_manifest, &a, &multi.reference, "digests");
    assert!(stderr.contains(&multi.index_digest) && stderr.contains(&amd64.manifest_digest), "{stderr}");
}
