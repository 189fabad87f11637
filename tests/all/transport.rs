//! The registry transport against real servers on loopback, through the `pullbox` CLI:
//!
//! - authentication: Debian's registry with htpasswd basic auth (credentials from a Docker
//!   `config.json`, directly and through a credential helper) and with bearer tokens from
//!   the tests' token server; every authenticated pull runs with `--log trace` and its
//!   output is searched for the secrets and tokens: none may appear;
//! - TLS: the registry with a CA generated here and client certificates, trusted through
//!   `hosts.toml`, refused without the CA, accepted with `skip_verify`;
//! - mirrors from `hosts.toml`: one that lacks the image (the upstream serves it), one that
//!   serves it while the upstream is down;
//! - where credentials go: a registry that redirects blob GETs to object storage (the
//!   registry's `redirect` middleware, busybox `httpd` as the storage) gets the credentials
//!   and `hosts.toml` headers, the storage gets neither; a redirect from HTTPS to plain HTTP
//!   is refused; through the CRI daemon, an `AuthConfig` without `server_address` reaches
//!   neither a registry the (hostile) puller names nor a `hosts.toml` mirror, each of which
//!   asks for credentials and would accept them;
//! - faults from a proxy between pullbox and the registry: a connection reset in the middle
//!   of a blob (resumed with `Range`), corrupted bytes (digest error, nothing committed), a
//!   stall (the stall timeout ends the pull), 503s (retried); Ctrl-C cancels a pull and
//!   leaves no lease behind.
//!
//! Every authenticated or TLS registry serves the shared fixture's storage read-only, so
//! the images are those of [`pullbox_tests::fixture`]. Needs `make build` first.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use pullbox_tests::configured_registry::{Auth, BlobStorage, ConfiguredRegistry, Tls};
use pullbox_tests::fault_server::{Fault, FaultServer};
use pullbox_tests::oci::LayerDescriptor;
use pullbox_tests::tls::Pki;
use pullbox_tests::token_server::{self, TokenServer};
use pullbox_tests::{cri, fixture, sandbox, Captured, Fixture, Pullbox, Registry};

const NO_ARGS: [&str; 0] = [];

/// `--log` for the tests that search the output for secrets: everything at trace level
/// except the compiler's own tracing of the puller (hundreds of megabytes, no secrets).
const TRACE: &str =
    "trace,cranelift_codegen=warn,cranelift_frontend=warn,wasmtime_internal_cranelift=warn,regalloc2=warn";

/// A private store, an empty hosts directory, and no Docker config unless a test writes one.
struct Env {
    pb: Pullbox,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { pb: Pullbox::new().unwrap_or_else(|e| panic!("{e:#}")), dir: tempfile::tempdir().unwrap() }
    }

    fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    fn docker_config(&self) -> PathBuf {
        self.dir.path().join("docker/config.json")
    }

    /// Writes `hosts.toml` for `registry`.
    fn hosts_toml(&self, registry: &str, text: &str) {
        let d = self.hosts_dir().join(registry);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("hosts.toml"), text).unwrap();
    }

    fn write_docker_config(&self, json: &serde_json::Value) {
        fs::create_dir_all(self.docker_config().parent().unwrap()).unwrap();
        fs::write(self.docker_config(), json.to_string()).unwrap();
    }

    /// `pullbox pull` with this environment's hosts directory and Docker config.
    fn pull_command(&self, args: &[&str], reference: &str) -> Command {
        let mut all: Vec<String> = vec![
            "--hosts-dir".into(),
            self.hosts_dir().display().to_string(),
            "--docker-config".into(),
            self.docker_config().display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all.push(reference.to_owned());
        let mut cmd = self.pb.command("pull", all);
        cmd.env_remove("DOCKER_CONFIG");
        cmd
    }

    fn pull(&self, args: &[&str], reference: &str) -> Captured {
        self.pb.run_command(self.pull_command(args, reference))
    }

    /// A pull that must succeed and yield `f.app`'s image ID.
    #[track_caller]
    fn pull_app(&self, args: &[&str], reference: &str) -> Captured {
        let out = self.pull(args, reference);
        out.assert_success();
        assert_eq!(out.last_line(), Some(fixture().app.id()), "wrong image ID:\n{out}");
        out
    }
}

/// The fixture registry's storage directory, served by the configured registries.
fn storage(f: &Fixture) -> PathBuf {
    f.registry.dir().join("storage")
}

/// The largest layer of `team/app`: the one faults are injected into.
fn big_layer(f: &Fixture) -> &LayerDescriptor {
    f.app.layers.iter().max_by_key(|l| l.size).unwrap()
}

/// Neither stdout nor stderr holds any of `secrets`.
#[track_caller]
fn assert_no_secrets(out: &Captured, secrets: &[String]) {
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(
            !out.stdout.contains(s.as_str()) && !out.stderr.contains(s.as_str()),
            "the output contains the secret {s:?}:\n{out}"
        );
    }
}

/// A user's secrets as they could leak: the password, and `user:password` in base64.
fn secrets_of(user: &str, password: &str) -> Vec<String> {
    vec![password.to_owned(), STANDARD.encode(format!("{user}:{password}"))]
}

const ALICE: (&str, &str) = ("alice", "pw-Alice-Zq81xT4");
const BOB: (&str, &str) = ("bob", "pw-Bob-Kw93rM2");

fn htpasswd_registry(f: &Fixture) -> ConfiguredRegistry {
    let users = vec![(ALICE.0.to_owned(), ALICE.1.to_owned())];
    ConfiguredRegistry::start(&storage(f), &Auth::Htpasswd(users), None).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn basic_auth_with_credentials_from_docker_config() {
    let f = fixture();
    let reg = htpasswd_registry(f);
    let reference = format!("{}/team/app:1.0", reg.addr());
    let auth = STANDARD.encode(format!("{}:{}", ALICE.0, ALICE.1));

    // No credentials: refused, and the message says why.
    let env = Env::new();
    let out = env.pull(&[], &reference);
    out.assert_failure().assert_stderr_contains("no credentials for this host");

    // Wrong password: refused; the wrong password does not leak either.
    let env = Env::new();
    env.write_docker_config(
        &serde_json::json!({"auths": {reg.addr(): {"username": ALICE.0, "password": "pw-Wrong-Hh72"}}}),
    );
    let out = env.pull(&["--log", TRACE], &reference);
    out.assert_failure().assert_stderr_contains("credentials were refused");
    assert_no_secrets(&out, &secrets_of(ALICE.0, "pw-Wrong-Hh72"));

    // The right ones, as Docker writes them (`auth` under an URL key).
    let env = Env::new();
    env.write_docker_config(&serde_json::json!({"auths": {format!("http://{}/v2/", reg.addr()): {"auth": auth}}}));
    let out = env.pull_app(&["--log", TRACE], &reference);
    out.assert_stderr_contains("registry asks for authentication");
    assert_no_secrets(&out, &secrets_of(ALICE.0, ALICE.1));
    assert!(env.pb.blob_path(&big_layer(f).digest).is_file());
}

#[test]
fn basic_auth_through_a_credential_helper() {
    let f = fixture();
    let reg = htpasswd_registry(f);
    let env = Env::new();
    let bin = env.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-pbtest");
    fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread -r server\n[ \"$server\" = '{}' ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{}\",\"Secret\":\"{}\"}}\\n' \"$server\"\n",
            reg.addr(),
            ALICE.0,
            ALICE.1
        ),
    )
    .unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
    env.write_docker_config(&serde_json::json!({"credHelpers": {reg.addr(): "pbtest"}}));
    let mut cmd = env.pull_command(&["--log", TRACE], &format!("{}/team/app:1.0", reg.addr()));
    cmd.env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    let out = env.pb.run_command(cmd);
    out.assert_success();
    assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
    assert_no_secrets(&out, &secrets_of(ALICE.0, ALICE.1));
}

#[test]
fn bearer_tokens_from_a_token_server() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(work.path(), &[BOB]).unwrap();
    let auth = Auth::Token {
        realm: tokens.realm(),
        service: token_server::SERVICE.into(),
        issuer: token_server::ISSUER.into(),
        root_cert_bundle: tokens.cert_bundle().to_owned(),
    };
    let reg = ConfiguredRegistry::start(&storage(f), &auth, None).unwrap_or_else(|e| panic!("{e:#}"));
    let reference = format!("{}/team/app:1.0", reg.addr());

    // Anonymous: the token server refuses, so does the registry.
    let env = Env::new();
    env.pull(&[], &reference).assert_failure().assert_stderr_contains("refused anonymous access");

    let env = Env::new();
    env.write_docker_config(&serde_json::json!({"auths": {reg.addr(): {"username": BOB.0, "password": BOB.1}}}));
    let before = tokens.requests().len();
    let out = env.pull(&["--log", TRACE], &reference);
    assert!(out.success(), "{out}\nregistry log:\n{}", reg.log());
    assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
    // One token for the one scope, reused for the manifest, the config and every layer.
    let asked: Vec<String> = tokens.requests()[before..].to_vec();
    assert_eq!(asked.len(), 1, "token requests: {asked:#?}");
    assert!(
        asked[0].contains("scope=repository%3Ateam%2Fapp%3Apull")
            && asked[0].contains(&format!("service={}", token_server::SERVICE)),
        "{asked:?}"
    );
    let mut secrets = secrets_of(BOB.0, BOB.1);
    secrets.extend(tokens.issued());
    // The token's signature part alone is also a secret worth looking for.
    secrets.extend(tokens.issued().iter().filter_map(|t| t.rsplit('.').next().map(str::to_owned)));
    assert_no_secrets(&out, &secrets);
}

/// A TLS registry requiring client certificates; `hosts.toml` decides whether pullbox can
/// talk to it.
#[test]
fn tls_with_a_ca_and_client_certificates_from_hosts_toml() {
    let f = fixture();
    let pki = Pki::generate().unwrap();
    let (cert, key) = pki.server();
    let tls = Tls { certificate: cert, key, client_ca: Some(pki.ca()) };
    let reg = ConfiguredRegistry::start(&storage(f), &Auth::None, Some(&tls)).unwrap_or_else(|e| panic!("{e:#}"));
    let reference = format!("{}/team/app:1.0", reg.addr());
    let (client_cert, client_key) = pki.client();
    let client =
        format!("client = [[{:?}, {:?}]]", client_cert.display().to_string(), client_key.display().to_string());
    let server = format!("server = \"https://{}\"", reg.addr());

    // Loopback without configuration means plain HTTP: the TLS registry cannot answer that.
    Env::new().pull(&[], &reference).assert_failure();

    // The CA trusted through hosts.toml, the client certificate presented: the pull works.
    let env = Env::new();
    fs::copy(pki.ca(), env.dir.path().join("ca-copy.pem")).unwrap();
    env.hosts_toml(reg.addr(), &format!("{server}\nca = \"../../ca-copy.pem\"\n{client}\n"));
    env.pull_app(&["--log", "debug"], &reference);

    // Without the CA (the system's roots do not know it), or with an unrelated CA: refused.
    for ca in [String::new(), format!("ca = {:?}", pki.other_ca().display().to_string())] {
        let env = Env::new();
        env.hosts_toml(reg.addr(), &format!("{server}\n{ca}\n{client}\n"));
        let out = env.pull(&[], &reference);
        out.assert_failure().assert_stderr_contains("certificate");
        assert!(!out.stderr.contains("retrying"), "an untrusted certificate is not retried:\n{out}");
        assert!(env.pb.images_json().is_empty());
    }

    // The CA but no client certificate: the registry refuses the handshake.
    let env = Env::new();
    env.hosts_toml(reg.addr(), &format!("{server}\nca = {:?}\n", pki.ca().display().to_string()));
    env.pull(&[], &reference).assert_failure();

    // skip_verify, where configured, accepts the unknown CA.
    let env = Env::new();
    env.hosts_toml(reg.addr(), &format!("{server}\nskip_verify = true\n{client}\n"));
    env.pull_app(&[], &reference);
}

#[test]
fn a_mirror_without_the_image_falls_back_to_the_upstream() {
    let f = fixture();
    let mirror = Registry::start().unwrap_or_else(|e| panic!("{e:#}"));
    let recorder = FaultServer::proxy(mirror.addr()).unwrap();
    let env = Env::new();
    env.hosts_toml(
        f.registry.addr(),
        &format!("[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", recorder.addr()),
    );
    env.pull_app(&["--log", "debug"], &f.reference("team/app:1.0"));
    let asked = recorder.requests();
    let ns = format!("ns={}", f.registry.addr().replace(':', "%3A"));
    assert!(
        asked.iter().any(|r| r.path.starts_with("/v2/team/app/manifests/1.0") && r.path.contains(&ns)),
        "the mirror was not asked first, with ns: {asked:#?}"
    );
}

#[test]
fn a_mirror_serves_while_the_upstream_is_down() {
    let f = fixture();
    let down = pullbox_tests::service::loopback_addr().unwrap();
    let env = Env::new();
    env.hosts_toml(
        &down,
        &format!("[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", f.registry.addr()),
    );
    env.pull_app(&[], &format!("{down}/team/app:1.0"));
    let images = env.pb.images_json();
    assert!(images[0]["repoTags"].to_string().contains(&down), "named after the upstream: {images:#?}");
}

/// The fixture registry behind a fault-injecting proxy.
fn proxied(f: &Fixture) -> (FaultServer, String) {
    let proxy = FaultServer::proxy(f.registry.addr()).unwrap();
    let reference = format!("{}/team/app:1.0", proxy.addr());
    (proxy, reference)
}

#[test]
fn a_connection_reset_mid_blob_resumes_with_range() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let layer = big_layer(f);
    let cut = layer.size / 2;
    proxy.inject(&layer.digest, Fault::ResetAfter(cut), 1);
    let env = Env::new();
    env.pull_app(&["--log", "debug"], &reference);
    let asked = proxy.requests_for(&layer.digest);
    assert_eq!(asked.len(), 2, "{asked:#?}");
    let range = asked[1].range.clone().unwrap_or_else(|| panic!("the retry did not resume: {asked:#?}"));
    let start: u64 = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(start > 0 && start <= cut, "resumed at {start}, cut at {cut}");
    assert!(env.pb.blob_path(&layer.digest).is_file());
}

#[test]
fn corrupted_bytes_fail_the_pull_and_commit_nothing() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let layer = big_layer(f);
    proxy.inject(&layer.digest, Fault::CorruptAt(100), 1);
    let env = Env::new();
    let out = env.pull(&[], &reference);
    out.assert_failure().assert_stderr_contains(&layer.digest);
    out.assert_stderr_contains("expected");
    assert_eq!(proxy.requests_for(&layer.digest).len(), 1, "a digest mismatch is not retried");
    assert!(!env.pb.blob_path(&layer.digest).exists(), "the corrupt blob was committed");
    assert!(env.pb.images_json().is_empty());
    let gc = env.pb.run("gc", NO_ARGS);
    gc.assert_success();
    assert!(gc.stdout.contains(" 0 leases"), "the failed pull left its lease:\n{gc}");
}

#[test]
fn a_stalled_download_ends_at_the_stall_timeout() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let layer = big_layer(f);
    proxy.inject(&layer.digest, Fault::StallAfter(1000), 1);
    let env = Env::new();
    let started = Instant::now();
    let out = env.pull(&["--stall-timeout", "1"], &reference);
    let took = started.elapsed();
    out.assert_failure().assert_stderr_contains("stalled");
    out.assert_stderr_contains("stall timeout");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(!env.pb.blob_path(&layer.digest).exists());
    assert!(env.pb.images_json().is_empty());
}

#[test]
fn server_errors_are_retried() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let layer = big_layer(f);
    proxy.inject(&layer.digest, Fault::Status(503), 2);
    proxy.inject("/manifests/1.0", Fault::Status(503), 1);
    let env = Env::new();
    env.pull_app(&[], &reference);
    assert_eq!(proxy.requests_for(&layer.digest).len(), 3);
    assert_eq!(proxy.requests_for("/manifests/1.0").len(), 2);
}

#[test]
fn ctrl_c_cancels_the_pull_and_removes_its_lease() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let layer = big_layer(f);
    proxy.inject(&layer.digest, Fault::StallAfter(1000), 1);
    let env = Env::new();
    let mut cmd = env.pull_command(&["--stall-timeout", "60", "--log", "debug"], &reference);
    // Output to a file: a pipe nobody reads while waiting could fill and block pullbox.
    let log = env.dir.path().join("pull.log");
    let file = fs::File::create(&log).unwrap();
    let mut child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();

    // Wait until the download is stuck in the stall, then press Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.requests_for(&layer.digest).is_empty() {
        assert!(Instant::now() < deadline, "the pull never asked for {}", layer.digest);
        assert!(child.try_wait().unwrap().is_none(), "pullbox exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pullbox did not stop within 15 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = sent.elapsed();
    let status = child.wait().unwrap();
    let stderr = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "a cancelled pull must fail:\n{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");

    assert!(env.pb.images_json().is_empty());
    assert!(!env.pb.blob_path(&layer.digest).exists());
    // The pull deleted its lease and collected what it wrote: nothing is left to collect.
    let gc = env.pb.run("gc", NO_ARGS);
    gc.assert_success();
    assert!(gc.stdout.contains("removed 0 blobs, 0 snapshots, 0 ingests, 0 leases"), "{gc}");
}

/// A `hosts.toml` the transport cannot parse fails the pull and names the file, instead of
/// being ignored.
#[test]
fn a_broken_hosts_toml_is_an_error() {
    let f = fixture();
    let env = Env::new();
    env.hosts_toml(f.registry.addr(), "[host.\"http://x\"]\ncapabilities = [\"teleport\"]\n");
    let out = env.pull(&[], &f.reference("team/app:1.0"));
    out.assert_failure().assert_stderr_contains("hosts.toml");
    out.assert_stderr_contains("teleport");
}

/// The path prefix of blobs in a registry's storage: where a redirect to object storage goes.
const STORAGE_BLOBS: &str = "/docker/registry/v2/blobs/";

/// A registry that redirects blob GETs to object storage (another port: another origin).
/// The registry gets the credentials and the `hosts.toml` header; the storage gets the
/// blobs' requests without either, and the pull works.
#[test]
fn a_blob_redirect_to_another_host_carries_no_credentials_or_hosts_toml_headers() {
    let f = fixture();
    let blob_storage = BlobStorage::start(&storage(f)).unwrap_or_else(|e| panic!("{e:#}"));
    let at_storage = FaultServer::proxy(blob_storage.addr()).unwrap();
    let users = vec![(ALICE.0.to_owned(), ALICE.1.to_owned())];
    let reg = ConfiguredRegistry::start_redirecting(
        &storage(f),
        &Auth::Htpasswd(users),
        None,
        &format!("http://{}", at_storage.addr()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let at_registry = FaultServer::proxy(reg.addr()).unwrap();
    let header_secret = "hdr-Secret-Vq27Lp".to_owned();

    let env = Env::new();
    env.hosts_toml(at_registry.addr(), &format!("header = {{ X-Pullbox-Secret = {header_secret:?} }}\n"));
    env.write_docker_config(
        &serde_json::json!({"auths": {at_registry.addr(): {"username": ALICE.0, "password": ALICE.1}}}),
    );
    let out = env.pull(&["--log", TRACE], &format!("{}/team/app:1.0", at_registry.addr()));
    assert!(out.success(), "{out}\nregistry log:\n{}", reg.log());
    assert_eq!(out.last_line(), Some(f.app.id()), "{out}");
    let mut secrets = secrets_of(ALICE.0, ALICE.1);
    secrets.push(header_secret);
    assert_no_secrets(&out, &secrets);
    out.assert_stderr_contains("following a redirect");

    let layer = big_layer(f);
    let hex = layer.digest.trim_start_matches("sha256:");
    // The registry was asked with both, and answered with a redirect.
    let asked = at_registry.requests_for(&layer.digest);
    assert!(
        asked.iter().any(|r| r.authorized && r.headers.iter().any(|h| h == "x-pullbox-secret")),
        "the registry never got the credentials and the header: {asked:#?}"
    );
    // The storage served the layer, asked without either.
    let served = at_storage.requests();
    assert!(
        served.iter().any(|r| r.path.starts_with(STORAGE_BLOBS) && r.path.contains(hex)),
        "the layer did not come from the storage: {served:#?}"
    );
    for r in &served {
        assert!(!r.authorized, "the storage got an Authorization header: {r:#?}");
        assert!(!r.headers.iter().any(|h| h == "x-pullbox-secret"), "the storage got the hosts.toml header: {r:#?}");
    }
    assert!(env.pb.blob_path(&layer.digest).is_file());
}

/// A TLS registry that redirects blobs to plain HTTP: the pull fails and says why, and the
/// plain-HTTP server is never asked.
#[test]
fn a_redirect_from_https_to_http_is_refused() {
    let f = fixture();
    let pki = Pki::generate().unwrap();
    let (cert, key) = pki.server();
    let tls = Tls { certificate: cert, key, client_ca: None };
    let blob_storage = BlobStorage::start(&storage(f)).unwrap_or_else(|e| panic!("{e:#}"));
    let at_storage = FaultServer::proxy(blob_storage.addr()).unwrap();
    let reg = ConfiguredRegistry::start_redirecting(
        &storage(f),
        &Auth::None,
        Some(&tls),
        &format!("http://{}", at_storage.addr()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let env = Env::new();
    env.hosts_toml(
        reg.addr(),
        &format!("server = \"https://{}\"\nca = {:?}\n", reg.addr(), pki.ca().display().to_string()),
    );
    let out = env.pull(&[], &format!("{}/team/app:1.0", reg.addr()));
    out.assert_failure().assert_stderr_contains("redirected from HTTPS to plain HTTP");
    assert!(at_storage.requests().is_empty(), "the plain-HTTP target was asked: {:#?}", at_storage.requests());
    assert!(env.pb.images_json().is_empty());
}

/// A CRI pull request with alice's credentials and no `server_address`.
fn pull_with_alice(image: &str) -> k8s_cri::v1::PullImageRequest {
    k8s_cri::v1::PullImageRequest {
        image: Some(k8s_cri::v1::ImageSpec { image: image.to_owned(), ..Default::default() }),
        auth: Some(k8s_cri::v1::AuthConfig {
            username: ALICE.0.to_owned(),
            password: ALICE.1.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One CRI `PullImage` on `socket`, from a runtime of its own (the test's servers run on
/// theirs, which cannot be started from inside another).
fn cri_pull(
    socket: &std::path::Path,
    req: k8s_cri::v1::PullImageRequest,
) -> Result<k8s_cri::v1::PullImageResponse, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = cri::connect(socket).await.unwrap();
        c.pull_image(req).await.map(tonic::Response::into_inner)
    })
}

/// `[registry]` for a daemon: `hosts_dir` (empty unless the test writes to it).
fn registry_section(hosts_dir: &std::path::Path) -> String {
    format!("[registry]\nhosts_dir = {:?}\n", hosts_dir.display().to_string())
}

/// The puller names the registry of each resolve. A hostile one, asked to pull from
/// registry A with credentials that name no server, resolves on registry B too (which asks
/// for credentials and would accept alice's): B never sees them; A does, and the pull works.
#[test]
fn cri_credentials_never_reach_a_registry_the_puller_names() {
    let f = fixture();
    let a = htpasswd_registry(f);
    let b = htpasswd_registry(f);
    let at_b = FaultServer::proxy(b.addr()).unwrap();
    let elsewhere = format!("{}/team/app:1.0", at_b.addr());
    let settings = serde_json::json!({"behavior": "sleepy", "resolve": [elsewhere], "reads": 1}).to_string();
    let hosts = tempfile::tempdir().unwrap();
    let d = sandbox::SwapDaemon::start(
        pullbox_tests::backends::Backend::Embedded,
        &sandbox::hostile().unwrap(),
        &settings,
        &registry_section(hosts.path()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let pulled = cri_pull(d.daemon.socket(), pull_with_alice(&format!("{}/team/app:1.0", a.addr())))
        .unwrap_or_else(|e| panic!("the pull from A failed: {e:?}\n{}", d.daemon.log()));
    assert_eq!(pulled.image_ref, f.app.manifest_digest, "sleepy answers the manifest digest");
    let log = d.daemon.log();
    assert!(log.contains(&format!("sleepy: resolve {elsewhere}: permission-denied")), "{log}");
    let asked = at_b.requests();
    assert!(!asked.is_empty(), "the puller never asked B: the test proves nothing\n{log}");
    assert!(asked.iter().all(|r| !r.authorized), "B got A's credentials: {asked:#?}");
    for s in secrets_of(ALICE.0, ALICE.1) {
        assert!(!log.contains(&s), "the daemon logged a secret:\n{log}");
    }
}

/// The default puller, a mirror in `hosts.toml` that asks for credentials and would accept
/// alice's: the CRI request's credentials (no `server_address`) are for the registry, so the
/// mirror gets none and the upstream serves the image.
#[test]
fn cri_credentials_are_not_sent_to_a_mirror() {
    let f = fixture();
    let upstream = htpasswd_registry(f);
    let mirror = htpasswd_registry(f);
    let at_mirror = FaultServer::proxy(mirror.addr()).unwrap();
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts.path().join(upstream.addr());
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("hosts.toml"),
        format!("[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", at_mirror.addr()),
    )
    .unwrap();
    let daemon = cri::Daemon::start(&registry_section(hosts.path())).unwrap_or_else(|e| panic!("{e:#}"));
    let pulled = cri_pull(daemon.socket(), pull_with_alice(&format!("{}/team/app:1.0", upstream.addr())))
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(pulled.image_ref, f.app.id());
    let asked = at_mirror.requests();
    assert!(!asked.is_empty(), "the mirror was not tried: the test proves nothing\n{}", daemon.log());
    assert!(asked.iter().all(|r| !r.authorized), "the mirror got the registry's credentials: {asked:#?}");
}

/// The manifest requests among `requests`, as `METHOD path`.
fn manifest_requests(requests: &[pullbox_tests::fault_server::Logged]) -> Vec<String> {
    requests.iter().filter(|r| r.path.contains("/manifests/")).map(|r| format!("{} {}", r.method, r.path)).collect()
}

/// The `containerd.io/distribution.source.*` labels of blob `digest` in the embedded store at
/// `root`, read through pullbox's library.
fn source_labels(root: &std::path::Path, digest: &str) -> std::collections::BTreeMap<String, String> {
    let store = pullbox::backend::embedded::open(root).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let info = rt.block_on(store.content.info(&digest.parse().unwrap())).unwrap_or_else(|e| panic!("{digest}: {e}"));
    info.labels.into_iter().filter(|(k, _)| k.starts_with(pullbox::registry::DISTRIBUTION_SOURCE_LABEL)).collect()
}

/// A re-pull of an unchanged tag asks with `HEAD` only: the manifest it names is stored, so
/// no `GET` (the request Docker Hub counts against pull limits). The first pull does one
/// `HEAD` and one `GET`, by the digest the `HEAD` named. Every blob of the image carries the
/// registry's distribution-source label naming the repository.
#[test]
fn a_re_pull_of_an_unchanged_tag_sends_head_and_no_get() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    let env = Env::new();
    env.pull_app(&[], &reference);
    let first = manifest_requests(&proxy.requests());
    assert_eq!(
        first,
        vec![
            "HEAD /v2/team/app/manifests/1.0".to_owned(),
            format!("GET /v2/team/app/manifests/{}", f.app.manifest_digest)
        ],
        "first pull"
    );
    let seen = proxy.requests().len();
    env.pull_app(&[], &reference);
    let again = manifest_requests(&proxy.requests()[seen..]);
    assert_eq!(again, vec!["HEAD /v2/team/app/manifests/1.0".to_owned()], "re-pull of an unchanged tag");

    let key = format!("{}{}", pullbox::registry::DISTRIBUTION_SOURCE_LABEL, proxy.addr());
    let blobs =
        [&f.app.manifest_digest, &f.app.config_digest].into_iter().chain(f.app.layers.iter().map(|l| &l.digest));
    for digest in blobs {
        let labels = source_labels(env.pb.root(), digest);
        assert_eq!(labels, [(key.clone(), "team/app".to_owned())].into_iter().collect(), "labels of {digest}");
    }
}

/// A tag that moved to another manifest is fetched again with `GET` after the `HEAD`.
#[test]
fn a_moved_tag_is_fetched_again() {
    let f = fixture();
    let tag = format!("moving-{}", std::process::id());
    let v1 = serde_json::to_vec(&f.app.manifest).unwrap();
    let mut moved = f.app.manifest.clone();
    moved["annotations"] = serde_json::json!({"moved": "yes"});
    let v2 = serde_json::to_vec(&moved).unwrap();
    let media_type = pullbox_tests::oci::MEDIA_TYPE_MANIFEST;
    f.registry.put_manifest("team/app", &tag, media_type, &v1).unwrap();
    let proxy = FaultServer::proxy(f.registry.addr()).unwrap();
    let reference = format!("{}/team/app:{tag}", proxy.addr());
    let env = Env::new();
    env.pull_app(&[], &reference);
    f.registry.put_manifest("team/app", &tag, media_type, &v2).unwrap();
    let seen = proxy.requests().len();
    env.pull_app(&[], &reference);
    let again = manifest_requests(&proxy.requests()[seen..]);
    let v2_digest = pullbox_tests::oci::sha256_digest(&v2);
    assert_eq!(
        again,
        vec![format!("HEAD /v2/team/app/manifests/{tag}"), format!("GET /v2/team/app/manifests/{v2_digest}")],
        "re-pull of a moved tag"
    );
    assert!(env.pb.blob_path(&v2_digest).is_file(), "the new manifest is stored");
}

/// A host that refuses `HEAD` (405) is asked with `GET`: the pull works.
#[test]
fn a_registry_refusing_head_is_asked_with_get() {
    let f = fixture();
    let (proxy, reference) = proxied(f);
    proxy.inject("/manifests/1.0", Fault::Status(405), 1);
    let env = Env::new();
    env.pull_app(&[], &reference);
    assert_eq!(
        manifest_requests(&proxy.requests()),
        vec!["HEAD /v2/team/app/manifests/1.0".to_owned(), "GET /v2/team/app/manifests/1.0".to_owned()]
    );
}

/// Three pulls of different images at once, through one daemon with
/// `registry.max_concurrent_downloads = 2` and a proxy that makes every blob download last
/// 300 ms: never more than two blob downloads are in flight, and there were two (the bound is
/// reached, so the test can tell a daemon that ignores it).
#[test]
fn downloads_are_bounded_across_concurrent_pulls() {
    let f = fixture();
    let proxy = FaultServer::proxy(f.registry.addr()).unwrap();
    proxy.inject("/blobs/", Fault::Delay(300), 1000);
    let hosts = tempfile::tempdir().unwrap();
    let config = format!("{}max_concurrent_downloads = 2\n", registry_section(hosts.path()));
    let d = pullbox_tests::cri::Daemon::start(&config).unwrap_or_else(|e| panic!("{e:#}"));
    let images = [&f.app, &f.app_zstd, &f.app_uncompressed];
    let pulls: Vec<_> = images
        .iter()
        .map(|image| {
            let reference = image.reference.replacen(f.registry.addr(), proxy.addr(), 1);
            let socket = d.socket().to_owned();
            std::thread::spawn(move || {
                cri_pull(
                    &socket,
                    k8s_cri::v1::PullImageRequest {
                        image: Some(k8s_cri::v1::ImageSpec { image: reference, ..Default::default() }),
                        ..Default::default()
                    },
                )
            })
        })
        .collect();
    for (p, image) in pulls.into_iter().zip(images) {
        let r = p.join().unwrap().unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
        assert_eq!(r.image_ref, image.config_digest);
    }
    let blob_gets = proxy.requests().iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/")).count();
    assert!(blob_gets >= 6, "only {blob_gets} blob downloads: the test proves nothing");
    assert_eq!(proxy.max_blob_gets_in_flight(), 2, "blob downloads in flight at most");
}
