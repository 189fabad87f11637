//! The hostile-puller suite (issue 6): a puller that loops, grows memory, recurses, traps,
//! hands the host garbage or oversized arguments, or floods it with work must fail only its
//! own request — with a clear error, and leaving nothing in the store — while the daemon
//! goes on serving. The misbehaving component is `pullbox-hostile.wasm` (guest/hostile, built
//! by `make build`), steered by its settings; components that do not fit pullbox's world are
//! made here from WIT with `wasm-tools`.
//!
//! Daemon tests run one `pullbox serve` per test and, for each hostile request, go through a
//! *round*: swap the hostile puller in with the round's settings (live reload: rewrite the
//! files, SIGHUP), make the hostile request and check its error and duration, check that the
//! same daemon still answers `ListImages`, `ImageFsInfo` and `ImageStatus`, check that the
//! store holds no blob, ingest or snapshot (on containerd, no lease or image either), then
//! swap the default puller in and pull, and remove, a real image. CLI tests do the same with `pullbox pull --puller`.
//!
//! Limits are small here (32 MiB of memory, 500 ms of CPU, 256 KiB of stack) so that every
//! hit comes at once; each test takes a few seconds.
//!
//! ## Both backends
//!
//! Every test that pulls into a store runs twice: on the embedded store and with
//! `backend = "containerd"` against a real containerd (Debian's 1.6, one per test process,
//! started on first use; each daemon or CLI store gets a fresh namespace of it). A test body
//! is written once, as a plain function taking the [`Backend`]; [`on_both_backends!`] at the
//! end of this file turns each listed function into two tests, `embedded::NAME` and
//! `containerd::NAME`. Run one backend with `cargo test --release -p pullbox-tests --test
//! all -- sandbox::embedded::` (or `sandbox::containerd::`).
//!
//! To add a test case:
//! 1. write `async fn NAME(b: Backend) { ... }` (or `fn NAME(b: Backend)` when it needs no
//!    async runtime), with no `#[test]` attribute;
//! 2. get its daemon from `hostile_daemon(b, ...)` or `SwapDaemon::start(b, ...)`, its CLI
//!    store from `pullbox(b)`, and check the store with `round` / `good_pull` (which check
//!    it) or `d.assert_clean(...)` / `pb.assert_clean(...)`: these know what each backend
//!    holds (`pullbox_tests::backends`);
//! 3. add `NAME` to the `async` (or `sync`) list of the [`on_both_backends!`] call.
//!
//! A function left out of the list is never run, and the compiler says so (dead code). Tests
//! that use no store at all (`policy check`, load-time checks) stay plain `#[test]`s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest, PullImageRequest, RemoveImageRequest,
};
use pullbox_tests::backends::Backend;
use pullbox_tests::sandbox::{
    build_component, default_puller, hostile, peak_rss_kib, wit_copy, SlowServer, SwapDaemon, WHOAMI,
};
use pullbox_tests::{cri, fixture, Captured, Pullbox};
use serde_json::json;
use tonic::Code;

/// How long any one request may take before the test gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `[sandbox]` of most daemons here.
const SANDBOX: &str = "[sandbox]\nmemory_limit = 33554432\ncpu_limit_ms = 500\nstack_limit = 262144\n";

/// The CPU limit of [`SANDBOX`].
const CPU_LIMIT: Duration = Duration::from_millis(500);

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() })
}

fn pull_req(image: &str) -> PullImageRequest {
    PullImageRequest { image: spec(image), ..PullImageRequest::default() }
}

fn app() -> String {
    fixture().reference("team/app:1.0")
}

/// What a hostile request must fail with.
struct Expect {
    /// The acceptable status codes.
    codes: &'static [Code],
    /// Words the message must contain (case-insensitive).
    needles: Vec<String>,
    /// Words of which the message must contain at least one, when not empty.
    any: Vec<String>,
    /// The least time the request may take (for example the CPU limit).
    at_least: Duration,
    /// The most time it may take.
    at_most: Duration,
}

impl Expect {
    fn new(codes: &'static [Code], needles: &[&str]) -> Expect {
        Expect {
            codes,
            needles: needles.iter().map(|s| s.to_string()).collect(),
            any: Vec::new(),
            at_least: Duration::ZERO,
            at_most: Duration::from_secs(10),
        }
    }

    /// Stopped by the CPU limit `limit`: not before it, not long after it.
    fn cpu(limit: Duration) -> Expect {
        Expect {
            at_least: limit,
            at_most: limit + Duration::from_secs(4),
            ..Expect::new(&[Code::ResourceExhausted, Code::Internal], &["CPU time limit"])
        }
    }

    /// The message must also contain one of `words`.
    fn or_any(mut self, words: &[&str]) -> Expect {
        self.any = words.iter().map(|s| s.to_string()).collect();
        self
    }

    /// A trap: the guest panicked (`unreachable`).
    fn trap() -> Expect {
        Expect::new(&[Code::Internal], &["puller failed", "unreachable"])
    }

    #[track_caller]
    fn check(&self, what: &str, status: &tonic::Status, took: Duration) {
        assert!(
            self.codes.contains(&status.code()),
            "{what}: code {:?}, wanted one of {:?}: {status:?}",
            status.code(),
            self.codes
        );
        let m = status.message().to_lowercase();
        for n in &self.needles {
            assert!(m.contains(&n.to_lowercase()), "{what}: the message does not mention {n:?}: {}", status.message());
        }
        assert!(
            self.any.is_empty() || self.any.iter().any(|n| m.contains(&n.to_lowercase())),
            "{what}: the message mentions none of {:?}: {}",
            self.any,
            status.message()
        );
        assert!(
            took >= self.at_least,
            "{what}: failed after {took:?}, before {:?}: {}",
            self.at_least,
            status.message()
        );
        assert!(took <= self.at_most, "{what}: took {took:?}, more than {:?}: {}", self.at_most, status.message());
    }
}

/// A daemon on a fresh store of `b` running `pullbox-hostile` (settings `idle`) with the TOML
/// `extra`.
fn hostile_daemon(b: Backend, extra: &str) -> SwapDaemon {
    SwapDaemon::start(b, &hostile().unwrap(), &json!({"behavior": "idle"}).to_string(), extra)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Swaps `pullbox-hostile` with `settings` in and waits until it serves.
async fn use_hostile(d: &SwapDaemon, settings: &str) {
    d.swap(Some(&hostile().unwrap()), settings).unwrap();
    d.wait_for(Some(settings)).await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// The daemon answers the calls that need no pull, with whatever puller serves.
async fn still_serves(d: &SwapDaemon, what: &str) {
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    c.list_images(ListImagesRequest::default())
        .await
        .unwrap_or_else(|e| panic!("after {what}: ListImages failed: {e:?}\n{}", d.daemon.log()));
    c.image_fs_info(ImageFsInfoRequest {}).await.unwrap_or_else(|e| panic!("after {what}: ImageFsInfo failed: {e:?}"));
    c.image_status(ImageStatusRequest { image: spec(WHOAMI), verbose: false })
        .await
        .unwrap_or_else(|e| panic!("after {what}: ImageStatus failed: {e:?}"));
    assert!(t.elapsed() < Duration::from_secs(2), "after {what}: the daemon took {:?} to answer", t.elapsed());
}

/// Swaps the default puller in, pulls the fixture's image, checks it (and that the store
/// holds it), removes it, and checks that the store is empty again.
async fn good_pull(d: &SwapDaemon, after: &str) {
    d.swap(Some(&default_puller().unwrap()), "").unwrap();
    d.wait_for(None).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let pulled = tokio::time::timeout(REQUEST_TIMEOUT, c.pull_image(pull_req(&app())))
        .await
        .unwrap_or_else(|_| panic!("after {after}: the good pull did not finish"))
        .unwrap_or_else(|e| panic!("after {after}: the good pull failed: {e:?}\n{}", d.daemon.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, fixture().app.config_digest, "after {after}");
    // The store check sees what a pull writes (else it would pass anything).
    let held = d.store.leftovers(&d.daemon.root()).unwrap();
    assert!(
        held.iter().any(|h| h.starts_with("snapshot")),
        "after {after}: the store check sees no snapshot of the image pulled: {held:?}"
    );
    c.remove_image(RemoveImageRequest { image: spec(&app()) }).await.unwrap();
    d.assert_clean(&format!("the good pull after {after}, removed"));
}

/// One round: the hostile puller with `settings` pulls `reference`; that fails as `expect`
/// says; the daemon still serves; nothing is left in the store; a good pull follows.
async fn round(d: &SwapDaemon, settings: serde_json::Value, reference: &str, expect: &Expect) -> tonic::Status {
    let doc = settings.to_string();
    use_hostile(d, &doc).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, c.pull_image(pull_req(reference)))
        .await
        .unwrap_or_else(|_| panic!("{doc}: the pull did not end in {REQUEST_TIMEOUT:?}\n{}", d.daemon.log()));
    let took = t.elapsed();
    let status = match answer {
        Ok(r) => panic!("{doc}: the pull succeeded: {:?}", r.into_inner()),
        Err(s) => s,
    };
    eprintln!("{doc}: {:?} after {took:?}: {}", status.code(), first_line(status.message()));
    expect.check(&doc, &status, took);
    still_serves(d, &doc).await;
    d.assert_clean(&doc);
    good_pull(d, &doc).await;
    status
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

// ---- limits --------------------------------------------------------------------------------

async fn limits_stop_the_guest_and_the_daemon_serves_on(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    round(&d, json!({"behavior": "loop-in-pull"}), &app(), &Expect::cpu(CPU_LIMIT)).await;
    round(
        &d,
        json!({"behavior": "grow-memory"}),
        &app(),
        &Expect::new(&[Code::ResourceExhausted, Code::Internal], &["memory limit"]),
    )
    .await;
    round(
        &d,
        json!({"behavior": "recursion"}),
        &app(),
        &Expect::new(&[Code::ResourceExhausted, Code::Internal], &["stack"]),
    )
    .await;
}

async fn limits_apply_to_every_export_not_only_pulls(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    for (export, call) in
        [("list-images", "ListImages"), ("image-status", "ImageStatus"), ("remove-image", "RemoveImage")]
    {
        for (behavior, expect) in [
            ("loop-in-pull", Expect::cpu(CPU_LIMIT)),
            ("grow-memory", Expect::new(&[Code::ResourceExhausted, Code::Internal], &["memory limit"])),
        ] {
            let doc = json!({"behavior": behavior, "export": export}).to_string();
            use_hostile(&d, &doc).await;
            let mut c = cri::connect(d.daemon.socket()).await.unwrap();
            let t = Instant::now();
            let answer = match call {
                "ListImages" => c.list_images(ListImagesRequest::default()).await.map(|_| ()),
                "ImageStatus" => {
                    c.image_status(ImageStatusRequest { image: spec(&app()), verbose: false }).await.map(|_| ())
                }
                _ => c.remove_image(RemoveImageRequest { image: spec(&app()) }).await.map(|_| ()),
            };
            let status = answer.expect_err(&format!("{call} with {doc} succeeded"));
            expect.check(&format!("{call} with {doc}"), &status, t.elapsed());
            // The other exports of the same puller answer.
            let pulled = c.pull_image(pull_req(&app())).await.expect_err("hostile pulls refuse");
            assert_eq!(pulled.code(), Code::PermissionDenied, "{doc}: {pulled:?}");
        }
    }
    good_pull(&d, "misbehaving list, status and remove").await;
}

// ---- traps and leases ----------------------------------------------------------------------

async fn a_pull_stopped_midway_leaves_nothing_behind(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    round(&d, json!({"behavior": "trap-mid-pull"}), &app(), &Expect::trap()).await;
    round(&d, json!({"behavior": "trap-mid-pull", "then": "loop"}), &app(), &Expect::cpu(CPU_LIMIT)).await;
    round(
        &d,
        json!({"behavior": "trap-mid-pull", "then": "grow-memory"}),
        &app(),
        &Expect::new(&[Code::ResourceExhausted, Code::Internal], &["memory limit"]),
    )
    .await;
    round(
        &d,
        json!({"behavior": "trap-mid-pull", "then": "recursion"}),
        &app(),
        &Expect::new(&[Code::ResourceExhausted, Code::Internal], &["stack"]),
    )
    .await;
    // The hostile puller did write: the daemon's log shows the layer it applied.
    assert!(
        d.daemon.log().contains("applied sha256:"),
        "trap-mid-pull never got to apply a layer:\n{}",
        d.daemon.log()
    );
}

/// One puller, two requests at once: a well-behaved pull that holds a blob under its lease
/// and then waits on a slow registry, and a pull that writes and traps. The trap's cleanup
/// (its lease deleted, garbage collected) must not touch the other request's blob: the
/// well-behaved pull reads it afterwards and succeeds.
async fn a_trap_does_not_disturb_a_pull_in_flight(b: Backend) {
    let f = fixture();
    // Long enough that the trapping pull (a real partial pull, slower on containerd and on a
    // loaded machine) ends first.
    let slow = SlowServer::start(Duration::from_millis(6000)).unwrap();
    let other = f.reference("team/app-zstd:1.0");
    let doc = json!({
        "behavior": "trap-mid-pull",
        "overrides": {
            other.clone(): {"behavior": "sleepy", "resolve": [format!("{}/slow/image:1", slow.addr())], "reads": 500},
        },
    })
    .to_string();
    let d = SwapDaemon::start(b, &hostile().unwrap(), &doc, SANDBOX).unwrap();
    let socket = d.daemon.socket().to_owned();
    let in_flight = tokio::spawn(async move {
        let mut c = cri::connect(&socket).await.unwrap();
        c.pull_image(pull_req(&other)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let status = c.pull_image(pull_req(&app())).await.expect_err("trap-mid-pull succeeded");
    Expect::trap().check("trap-mid-pull", &status, t.elapsed());
    assert!(!in_flight.is_finished(), "the sleepy pull ended before the trap: the test proves nothing");
    let pulled = in_flight
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the pull in flight failed: {e:?}\n{}", d.daemon.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, f.app_zstd.manifest_digest);
    still_serves(&d, "a trap beside a pull in flight").await;
    good_pull(&d, "a trap beside a pull in flight").await;
}

// ---- the host's imports under abuse --------------------------------------------------------

async fn garbage_digests_paths_and_foreign_snapshot_keys_are_refused(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    let victim = tempfile::Builder::new().prefix("pullbox-victim-").tempdir_in("/tmp").unwrap();
    std::fs::write(victim.path().join("file"), "victim\n").unwrap();
    let beside_root: Vec<_> = dir_names(d.daemon.root().parent().unwrap());
    let doc = json!({"behavior": "bad-digests", "victim": victim.path()}).to_string();
    use_hostile(&d, &doc).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let status = c.pull_image(pull_req(&app())).await.expect_err("bad-digests succeeded");
    eprintln!("bad-digests: {:?}: {}", status.code(), status.message());
    // Nothing escaped, whatever the host answered.
    assert_eq!(dir_names(victim.path()), vec!["file".to_string()], "the victim directory changed");
    assert_eq!(std::fs::read_to_string(victim.path().join("file")).unwrap(), "victim\n");
    assert_eq!(dir_names(d.daemon.root().parent().unwrap()), beside_root, "files appeared beside the store root");
    still_serves(&d, &doc).await;
    d.assert_clean(&doc);
    // Every probe the WIT contract says is an error was one (the message lists any the
    // host accepted).
    Expect::new(&[Code::FailedPrecondition], &["bad-digests: every probe refused"]).check(
        &doc,
        &status,
        Duration::ZERO,
    );
    good_pull(&d, &doc).await;
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

async fn huge_arguments_fail_the_request_not_the_host(b: Backend) {
    // Room for a 100 MiB string in the guest.
    let d = hostile_daemon(b, "[sandbox]\nmemory_limit = 268435456\ncpu_limit_ms = 5000\nstack_limit = 262144\n");
    round(
        &d,
        json!({"behavior": "huge-argument", "variant": "string", "bytes": 100 << 20}),
        &app(),
        // Refused after lifting ("longer than"), or before (wasmtime's hostcall fuel).
        &Expect::new(&[Code::InvalidArgument, Code::ResourceExhausted, Code::Internal], &[])
            .or_any(&["longer than", "too much data"]),
    )
    .await;
    round(
        &d,
        json!({"behavior": "huge-argument", "variant": "log", "bytes": 100 << 20}),
        &app(),
        &Expect::new(&[Code::PermissionDenied, Code::InvalidArgument, Code::ResourceExhausted, Code::Internal], &[]),
    )
    .await;
    round(
        &d,
        json!({"behavior": "huge-argument", "variant": "list", "count": 1_000_000}),
        &app(),
        &Expect::new(&[Code::InvalidArgument, Code::ResourceExhausted, Code::Internal], &[])
            .or_any(&["more than 1024", "too much data"]),
    )
    .await;
}

async fn malformed_abi_arguments_trap_the_call_not_the_host(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    for variant in ["oob-string", "oob-list", "misaligned", "utf8", "discriminant", "enum"] {
        round(
            &d,
            json!({"behavior": "bad-abi", "variant": variant}),
            &app(),
            &Expect::new(&[Code::Internal], &["puller failed"]),
        )
        .await;
    }
}

/// A guest's strings are lifted into host strings one by one, so a list whose elements all
/// point at one big string costs the host `count * bytes` while the guest holds `bytes`.
/// The host must bound what it lifts on a guest's behalf, not only what it keeps: no more
/// than the guest may hold itself (wasmtime's per-call "hostcall fuel" defaults to 128 MiB,
/// twice this test's memory limit, and applies to each of the calls running at once).
async fn aliased_arguments_do_not_amplify_into_host_memory(b: Backend) {
    let memory_limit: u64 = 64 << 20;
    let d = hostile_daemon(b, &format!("[sandbox]\nmemory_limit = {memory_limit}\ncpu_limit_ms = 5000\n"));
    // Warm up (compile both pullers, one good pull), so the peak below is the abuse's.
    good_pull(&d, "start").await;
    let doc = json!({"behavior": "huge-argument", "variant": "aliased", "count": 512, "bytes": 1 << 20});
    use_hostile(&d, &doc.to_string()).await;
    let pid = d.pid().unwrap();
    let before = peak_rss_kib(pid).unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let status = c.pull_image(pull_req(&app())).await.expect_err("aliased labels succeeded");
    let after = peak_rss_kib(pid).unwrap();
    let grew_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "aliased 512 x 1 MiB labels: {:?} {}; daemon peak RSS {} -> {} MiB (+{grew_mib} MiB)",
        status.code(),
        first_line(status.message()),
        before / 1024,
        after / 1024
    );
    still_serves(&d, "aliased labels").await;
    assert!(
        grew_mib < memory_limit / (1 << 20),
        "the host allocated {grew_mib} MiB for a guest holding 1 MiB (memory limit {} MiB)",
        memory_limit >> 20
    );
}

/// Every `registry.fetch` starts downloads the host tracks for the request; a guest that asks
/// for a hundred thousand made-up blobs must be refused long before the host holds that many
/// tasks (each costs the host about 5 KiB: 500 MiB here, from a guest using almost nothing).
async fn a_flood_of_fetches_is_bounded(b: Backend) {
    let d = hostile_daemon(b, "[sandbox]\ncpu_limit_ms = 5000\n");
    good_pull(&d, "start").await;
    let doc = json!({"behavior": "fetch-flood", "count": 100_000});
    use_hostile(&d, &doc.to_string()).await;
    let pid = d.pid().unwrap();
    let before = peak_rss_kib(pid).unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), c.pull_image(pull_req(&app()))).await;
    let took = t.elapsed();
    let after = peak_rss_kib(pid).unwrap();
    let status = answer
        .unwrap_or_else(|_| panic!("fetch-flood: the request did not end in 30 s"))
        .expect_err("fetch-flood succeeded");
    eprintln!(
        "fetch-flood: {:?} after {took:?}: {}; daemon peak RSS {} -> {} MiB",
        status.code(),
        first_line(status.message()),
        before / 1024,
        after / 1024
    );
    still_serves(&d, "fetch-flood").await;
    d.assert_clean("fetch-flood");
    assert!(!status.message().contains("ACCEPTED"), "the host took every fetch: {}", first_line(status.message()));
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let grew_mib = after.saturating_sub(before) / 1024;
    assert!(grew_mib < 128, "the host grew by {grew_mib} MiB for one request's fetches");
}

/// The log interface promises that a guest cannot flood the host's log: message sizes *and
/// rates* are capped. A hundred thousand messages in one call must not become a hundred
/// thousand lines.
async fn a_flood_of_log_messages_is_capped(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    let doc = json!({"behavior": "log-flood", "count": 100_000}).to_string();
    use_hostile(&d, &doc).await;
    let before = d.daemon.log().len();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let status = c.pull_image(pull_req(&app())).await.expect_err("log-flood succeeded");
    let took = t.elapsed();
    let grew = d.daemon.log().len() - before;
    eprintln!(
        "log-flood of 100000: {:?} after {took:?}: {}; the daemon's log grew by {} KiB",
        status.code(),
        first_line(status.message()),
        grew / 1024
    );
    still_serves(&d, &doc).await;
    assert!(grew < 1 << 20, "100000 guest messages grew the daemon's log by {} KiB", grew / 1024);
    good_pull(&d, &doc).await;
}

/// Calls beyond the instance pool (`max_calls`) fail at once with `resource-exhausted`; they
/// neither wait for a looping guest nor break the daemon, which serves again as soon as the
/// loops are stopped.
async fn calls_beyond_the_instance_pool_fail_fast(b: Backend) {
    let d = SwapDaemon::start(
        b,
        &hostile().unwrap(),
        &json!({"behavior": "loop-in-pull"}).to_string(),
        "[sandbox]\ncpu_limit_ms = 1500\nmax_calls = 2\n",
    )
    .unwrap();
    let loops: Vec<_> = (0..2)
        .map(|i| {
            let socket = d.daemon.socket().to_owned();
            tokio::spawn(async move {
                let mut c = cri::connect(&socket).await.unwrap();
                c.pull_image(pull_req(&format!("pullbox-hostile/pool-{i}:1"))).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let status =
        c.list_images(ListImagesRequest::default()).await.expect_err("a third call found room in a pool of two");
    let took = t.elapsed();
    eprintln!("third call with a pool of 2 busy: {:?} after {took:?}: {}", status.code(), first_line(status.message()));
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(took < Duration::from_millis(1000), "the refusal took {took:?}");
    for l in loops {
        let status = l.await.unwrap().expect_err("a looping pull succeeded");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    c.list_images(ListImagesRequest::default()).await.expect("the pool is free again");
}

// ---- time ----------------------------------------------------------------------------------

async fn time_in_host_imports_does_not_count_against_the_cpu_limit(b: Backend) {
    let slow = SlowServer::start(Duration::from_millis(1500)).unwrap();
    let doc = json!({
        "behavior": "sleepy",
        "resolve": [format!("{}/slow/image:1", slow.addr())],
        "reads": 2000,
    })
    .to_string();
    let d = SwapDaemon::start(b, &hostile().unwrap(), &doc, "[sandbox]\ncpu_limit_ms = 300\n").unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let pulled = c
        .pull_image(pull_req(&app()))
        .await
        .unwrap_or_else(|e| panic!("sleepy was stopped: {e:?}\n{}", d.daemon.log()))
        .into_inner();
    let took = t.elapsed();
    eprintln!("sleepy: {took:?} for a pull with a CPU limit of 300 ms");
    assert_eq!(pulled.image_ref, fixture().app.manifest_digest);
    assert!(took >= Duration::from_millis(1500), "sleepy took only {took:?}: the slow server was not waited for");
}

async fn looping_pullers_do_not_starve_other_requests(b: Backend) {
    let cpu = Duration::from_millis(3000);
    let d = SwapDaemon::start(
        b,
        &hostile().unwrap(),
        &json!({"behavior": "loop-in-pull"}).to_string(),
        &format!("[sandbox]\ncpu_limit_ms = {}\n", cpu.as_millis()),
    )
    .unwrap();
    // Distinct references, so that no pull waits for another of the same image.
    let started = Instant::now();
    // One more looping guest than the daemon's async runtime has worker threads (one per core).
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) + 1;
    let loops: Vec<_> = (0..n)
        .map(|i| {
            let socket = d.daemon.socket().to_owned();
            tokio::spawn(async move {
                let mut c = cri::connect(&socket).await.unwrap();
                let t = Instant::now();
                let r = c.pull_image(pull_req(&format!("pullbox-hostile/loop-{i}:1"))).await;
                (r, t.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        c.list_images(ListImagesRequest::default()).await.unwrap();
        c.image_status(ImageStatusRequest { image: spec(WHOAMI), verbose: false }).await.unwrap();
        c.image_fs_info(ImageFsInfoRequest {}).await.unwrap();
        worst = worst.max(t.elapsed());
    }
    let served = started.elapsed();
    eprintln!("while {n} guests loop: 10 x (ListImages, ImageStatus, ImageFsInfo), the slowest {worst:?}, all done {served:?} after the loops started");
    // An idle daemon answers in milliseconds; a starved one only once the loops end (after
    // `cpu`). 1 s leaves room for a loaded 2-core machine without blurring the two.
    assert!(worst < Duration::from_millis(1000), "a request took {worst:?} while guests looped");
    assert!(served < cpu, "the requests were answered only after {served:?}, when the loops were stopped");
    for l in loops {
        let (r, took) = l.await.unwrap();
        let status = r.expect_err("a looping pull succeeded");
        Expect::cpu(cpu).check("looping pull", &status, took);
    }
    good_pull(&d, "looping pulls").await;
}

// ---- configure, start and live reload ------------------------------------------------------

/// Polls the daemon's log, from byte `from`, until it reports a failed reload; returns what
/// it logged since `from`.
async fn wait_failed_reload(d: &SwapDaemon, from: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = d.daemon.log();
        let new = log.get(from..).unwrap_or_default();
        if new.contains("reload failed") {
            return new.to_owned();
        }
        assert!(Instant::now() < deadline, "the daemon did not log a failed reload in 15 s:\n{new}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_reload_that_traps_or_loops_keeps_the_last_good_puller(b: Backend) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = hostile_daemon(b, &format!("metrics_address = \"127.0.0.1:{port}\"\n{SANDBOX}"));
    let idle = json!({"behavior": "idle"}).to_string();
    d.wait_for(Some(&idle)).await.unwrap();
    let garbage = d.settings_path().with_file_name("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x0d\0\x01\0 not really").unwrap();
    let cases = [
        (None, json!({"behavior": "loop-in-configure"}).to_string(), "CPU time limit"),
        (None, json!({"behavior": "trap-in-configure"}).to_string(), "unreachable"),
        (None, json!({"behavior": "no-such-behaviour"}).to_string(), "no-such-behaviour"),
        (Some(garbage.as_path()), idle.clone(), "cannot load puller"),
    ];
    for (puller, settings, needle) in &cases {
        let from = d.daemon.log().len();
        let t = Instant::now();
        d.swap(*puller, settings).unwrap();
        let logged = wait_failed_reload(&d, from).await;
        eprintln!("reload with {settings} refused after {:?}", t.elapsed());
        assert!(logged.contains(needle), "the failed reload with {settings} does not mention {needle:?}:\n{logged}");
        // Still the last good puller and settings, answering at once.
        assert_eq!(pullbox_tests::sandbox::whoami(d.daemon.socket()).await.unwrap().as_deref(), Some(idle.as_str()));
        still_serves(&d, &format!("a refused reload ({settings})")).await;
    }
    let out =
        std::process::Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("pullbox_puller_reloads_total{result=\"error\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(failed >= Some(cases.len() as u64), "failed reloads not counted: {failed:?}\n{text}");
    good_pull(&d, "refused reloads").await;
}

fn the_daemon_does_not_start_with_a_configure_that_traps_or_loops(b: Backend) {
    let hostile = hostile().unwrap();
    for (behavior, needle) in [("loop-in-configure", "CPU time limit"), ("trap-in-configure", "unreachable")] {
        let t = Instant::now();
        let err = match SwapDaemon::start(b, &hostile, &json!({"behavior": behavior}).to_string(), SANDBOX) {
            Ok(_) => panic!("the daemon started with {behavior}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(needle), "{behavior}: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{behavior}: start took {:?}", t.elapsed());
    }
}

// ---- the CLI -------------------------------------------------------------------------------

/// The CLI on a fresh store of `b`.
fn pullbox(b: Backend) -> Pullbox {
    Pullbox::on(b).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `pullbox pull --puller pullbox-hostile.wasm --settings S REF` with a 500 ms CPU limit.
fn cli_hostile(pb: &Pullbox, subcommand: &str, settings: &serde_json::Value, args: &[&str]) -> (Captured, Duration) {
    let file = pb.root().join("hostile-settings.json");
    std::fs::write(&file, settings.to_string()).unwrap();
    let mut cmd = pb.command(subcommand, ["--puller".as_ref(), hostile().unwrap().as_os_str()]);
    cmd.arg("--settings").arg(&file).args(args).env("PULLBOX_GUEST_CPU_MS", "500");
    let t = Instant::now();
    let out = pb.run_command(cmd);
    (out, t.elapsed())
}

/// A hostile CLI pull on a fresh store of `b` fails naming `needle`, leaves the store clean,
/// and a good pull with the default puller on the same store follows.
fn cli_case(b: Backend, settings: serde_json::Value, needle: &str) {
    cli_case_any(b, settings, &[needle]);
}

/// [`cli_case`] where the message names one of `needles`.
fn cli_case_any(b: Backend, settings: serde_json::Value, needles: &[&str]) {
    let pb = pullbox(b);
    let (out, took) = cli_hostile(&pb, "pull", &settings, &[&app()]);
    eprintln!(
        "{settings}: exit {:?} after {took:?}: {}",
        out.status.code(),
        out.stderr.lines().last().unwrap_or_default()
    );
    out.assert_failure();
    let stderr = out.stderr.to_lowercase();
    assert!(
        needles.iter().any(|n| stderr.contains(&n.to_lowercase())),
        "{settings}: stderr mentions none of {needles:?}:\n{out}"
    );
    assert!(took < Duration::from_secs(10), "{settings}: took {took:?}");
    pb.assert_clean(&settings.to_string());
    assert_eq!(pb.pull(&[], &app()), fixture().app.config_digest);
}

fn cli_loop_in_pull(b: Backend) {
    cli_case(b, json!({"behavior": "loop-in-pull"}), "CPU time limit");
}

fn cli_loop_in_configure(b: Backend) {
    cli_case(b, json!({"behavior": "loop-in-configure"}), "CPU time limit");
}

fn cli_grow_memory(b: Backend) {
    cli_case(b, json!({"behavior": "grow-memory"}), "memory limit");
}

fn cli_recursion(b: Backend) {
    cli_case(b, json!({"behavior": "recursion"}), "stack");
}

fn cli_trap_in_configure(b: Backend) {
    cli_case(b, json!({"behavior": "trap-in-configure"}), "unreachable");
}

fn cli_trap_mid_pull(b: Backend) {
    cli_case(b, json!({"behavior": "trap-mid-pull"}), "unreachable");
    cli_case(b, json!({"behavior": "trap-mid-pull", "then": "loop"}), "CPU time limit");
}

fn cli_bad_digests(b: Backend) {
    cli_case(b, json!({"behavior": "bad-digests"}), "every probe refused");
}

fn cli_huge_argument_and_bad_abi(b: Backend) {
    cli_case_any(
        b,
        json!({"behavior": "huge-argument", "variant": "string", "bytes": 32 << 20}),
        &["longer than", "too much data"],
    );
    cli_case(b, json!({"behavior": "bad-abi", "variant": "oob-string"}), "puller failed");
}

fn cli_sleepy_pull_succeeds_under_a_small_cpu_limit(b: Backend) {
    let pb = pullbox(b);
    let (out, took) = cli_hostile(&pb, "pull", &json!({"behavior": "sleepy", "reads": 5000}), &[&app()]);
    out.assert_success();
    eprintln!("sleepy, 5000 reads: {took:?}");
    assert_eq!(out.last_line(), Some(fixture().app.manifest_digest.as_str()));
}

fn cli_images_with_a_looping_list(b: Backend) {
    let pb = pullbox(b);
    let (out, took) = cli_hostile(&pb, "images", &json!({"behavior": "loop-in-pull", "export": "list-images"}), &[]);
    out.assert_failure().assert_stderr_contains("CPU time limit");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn policy_check_reports_a_configure_that_traps_or_loops() {
    let pb = pullbox(Backend::Embedded);
    let hostile = hostile().unwrap();
    let file = pb.root().join("settings.json");
    for (settings, needle) in [
        (json!({"behavior": "loop-in-configure"}), Some("CPU time limit")),
        (json!({"behavior": "trap-in-configure"}), Some("unreachable")),
        (json!({"behavior": "no-such"}), Some("no-such")),
        (json!({"behavior": "idle"}), None),
    ] {
        std::fs::write(&file, settings.to_string()).unwrap();
        let mut cmd =
            pb.command("policy", ["check".as_ref(), hostile.as_os_str(), "--settings".as_ref(), file.as_os_str()]);
        cmd.env("PULLBOX_GUEST_CPU_MS", "500");
        let t = Instant::now();
        let out = pb.run_command(cmd);
        let took = t.elapsed();
        eprintln!("policy check {settings}: exit {:?} after {took:?}", out.status.code());
        match needle {
            Some(n) => {
                out.assert_failure().assert_stderr_contains(n);
            }
            None => {
                out.assert_success();
            }
        }
        assert!(took < Duration::from_secs(3), "policy check {settings} took {took:?} (PULLBOX_GUEST_CPU_MS=500)");
    }
}

// ---- load-time checks ----------------------------------------------------------------------

/// A component that does not fit the world is refused by `policy check`, `pull --puller` and
/// `serve`, each naming what is wrong.
fn components_that_do_not_fit_are_refused_naming_what_is_wrong(b: Backend) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let same = |_: &str, t: String| t;
    let extra_wit = "package pullbox:image@0.2.0;\n\
        interface shell { exec: func(command: string) -> string; }\n\
        world extra-import { include puller-world; import shell; }\n\
        world wasi-import { include puller-world; import wasi:cli/environment@0.2.0; }\n\
        world no-export { import log; import content; }\n";
    let wasi =
        "package wasi:cli@0.2.0;\ninterface environment { get-environment: func() -> list<tuple<string, string>>; }\n";
    let base =
        wit_copy(&w.join("wit"), same, &[("hostile-test.wit", extra_wit), ("deps/wasi-cli/environment.wit", wasi)])
            .unwrap();
    let lacking = wit_copy(
        &w.join("wit-lacking"),
        |name, t| {
            if name == "world.wit" {
                drop_function(&t, "remove-image")
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let extra_fn = wit_copy(
        &w.join("wit-extra-fn"),
        |name, t| {
            if name == "content.wit" {
                t.replacen("max-read: func() -> u32;", "max-read: func() -> u32;\n    exec: func(command: string);", 1)
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let wrong_type = wit_copy(
        &w.join("wit-wrong-type"),
        |name, t| {
            if name == "world.wit" {
                t.replace("configure: func(settings: string)", "configure: func(settings: u32)")
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let next_version =
        wit_copy(&w.join("wit-next"), |_, t| t.replace("pullbox:image@0.2.0", "pullbox:image@0.3.0"), &[]).unwrap();
    let out = w.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let keep = |t: String| t;
    let cases: Vec<(PathBuf, &[&str])> = vec![
        (build_component(&base, "extra-import", &out, keep).unwrap(), &["pullbox:image/shell@0.2.0"]),
        (build_component(&base, "wasi-import", &out, keep).unwrap(), &["wasi:cli/environment@0.2.0"]),
        (build_component(&base, "no-export", &out, keep).unwrap(), &["pullbox:image/puller@0.2.0"]),
        (build_component(&lacking, "puller-world", &w.join("out-lacking"), keep).unwrap(), &["remove-image"]),
        (build_component(&extra_fn, "puller-world", &w.join("out-extra-fn"), keep).unwrap(), &["exec"]),
        (build_component(&wrong_type, "puller-world", &w.join("out-wrong-type"), keep).unwrap(), &["configure"]),
        (build_component(&next_version, "puller-world", &w.join("out-next"), keep).unwrap(), &["@0.3.0"]),
    ];
    let pb = pullbox(b);
    // Every case is checked before the test fails, so one run lists every gap.
    let mut wrong = Vec::new();
    for (component, needles) in &cases {
        for (what, out) in [
            ("policy check", pb.run("policy", ["check".as_ref(), component.as_os_str()])),
            ("pull --puller", pb.run("pull", ["--puller".as_ref(), component.as_os_str(), app().as_ref()])),
        ] {
            eprintln!("{what} {}: {}", component.display(), out.stderr.trim());
            if out.success() || needles.iter().any(|n| !out.stderr.contains(n)) || out.stderr.contains("unreachable") {
                wrong.push(format!(
                    "{what} {}: wanted a refusal naming {needles:?} before running it:\n{out}",
                    component.display()
                ));
            }
        }
        let config = format!("puller = {:?}", component.display().to_string());
        match cri::Daemon::start(&pb.store().daemon_config(&config)) {
            Ok(_) => wrong.push(format!("serve started with {}", component.display())),
            Err(e) => {
                let err = format!("{e:#}");
                if needles.iter().any(|n| !err.contains(n)) {
                    wrong.push(format!("serve with {}: wanted {needles:?}: {err}", component.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    pb.assert_clean("refused components");
}

/// A WIT text with the function `name` (one line) removed.
fn drop_function(wit: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skip_docs = Vec::new();
    for line in wit.lines() {
        if line.trim_start().starts_with("///") {
            skip_docs.push(line);
            continue;
        }
        if line.trim_start().starts_with(&format!("{name}: func")) {
            skip_docs.clear();
            continue;
        }
        for d in skip_docs.drain(..) {
            out.push_str(d);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Memories and tables that a component declares up front count against the limits at
/// instantiation.
#[test]
fn oversized_memories_and_tables_are_refused_at_instantiation() {
    let work = tempfile::tempdir().unwrap();
    let wit = wit_copy(&work.path().join("wit"), |_, t| t, &[]).unwrap();
    // 256 MiB of initial memory; the default limit is 64 MiB.
    let big_memory =
        build_component(&wit, "puller-world", &work.path().join("mem"), |t| replace_memory(&t, "(memory (;0;) 4096)"))
            .unwrap();
    // A table of ten million entries.
    let big_table = build_component(&wit, "puller-world", &work.path().join("table"), |t| {
        add_before_first_func(&t, "  (table (;9;) 10000000 funcref)\n")
    })
    .unwrap();
    let pb = pullbox(Backend::Embedded);
    for (component, needle) in [(big_memory, "memory"), (big_table, "table")] {
        let out = pb.run("policy", ["check".as_ref(), component.as_os_str()]);
        eprintln!("policy check {}: {}", component.display(), out.stderr.trim());
        out.assert_failure().assert_stderr_contains(needle);
        assert!(!out.stderr.contains("unreachable"), "the component was run: {out}");
    }
}

/// The dummy module's memory declaration replaced by `decl`.
fn replace_memory(wat: &str, decl: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    for line in wat.lines() {
        if !done && line.trim_start().starts_with("(memory ") {
            out.push_str(&format!("  {decl}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(done, "no memory in the dummy module:\n{wat}");
    out
}

/// `text` inserted before the module's first function definition (after imports and types).
fn add_before_first_func(wat: &str, text: &str) -> String {
    let i = wat.find("\n  (func ").expect("no function in the dummy module");
    format!("{}\n{}{}", &wat[..i], text, &wat[i + 1..])
}

// ---- capabilities and budgets (WIT 0.2.0) ---------------------------------------------------

/// The `[sandbox]` of the budget tests: [`SANDBOX`] with a small import budget and creation
/// caps, so that a guest looping on an import is stopped within a second.
const BUDGET_SANDBOX: &str = "[sandbox]\nmemory_limit = 33554432\ncpu_limit_ms = 500\nstack_limit = 262144\n\
     import_budget = 100000\nmax_snapshots = 64\nmax_holds = 256\n";

async fn loops_inside_host_imports_end_with_a_clear_error(b: Backend) {
    let d = hostile_daemon(b, BUDGET_SANDBOX);
    for variant in ["stat-missing", "prepare-fresh", "max-read", "stats"] {
        round(
            &d,
            json!({"behavior": "import-loop", "variant": variant}),
            &app(),
            &Expect::new(&[Code::ResourceExhausted], &["import budget", "sandbox.import_budget"]),
        )
        .await;
    }
    // Read-only exports are bounded the same way.
    for (export, call) in [("list-images", "ListImages"), ("image-status", "ImageStatus")] {
        let doc = json!({"behavior": "import-loop", "variant": "max-read", "export": export}).to_string();
        use_hostile(&d, &doc).await;
        let mut c = cri::connect(d.daemon.socket()).await.unwrap();
        let t = Instant::now();
        let answer = match call {
            "ListImages" => c.list_images(ListImagesRequest::default()).await.map(|_| ()),
            _ => c.image_status(ImageStatusRequest { image: spec(&app()), verbose: false }).await.map(|_| ()),
        };
        let status = answer.expect_err(&format!("{call} with {doc} succeeded"));
        Expect::new(&[Code::ResourceExhausted], &["import budget"]).check(&doc, &status, t.elapsed());
        let pulled = c.pull_image(pull_req(&app())).await.expect_err("hostile pulls refuse");
        assert_eq!(pulled.code(), Code::PermissionDenied, "{doc}: the other exports answer: {pulled:?}");
    }
}

async fn a_pull_past_its_deadline_ends_and_leaves_nothing(b: Backend) {
    // The guest waits in host imports (a registry that answers after 10 s, twice): no CPU
    // time, no budget to speak of; the 4 s deadline ends it (and leaves the good pull that
    // follows, a few seconds on containerd, time enough).
    let slow = SlowServer::start(Duration::from_millis(10_000)).unwrap();
    let extra = format!("{SANDBOX}pull_timeout_s = 4\n");
    let d = hostile_daemon(b, &extra);
    let slow_ref = format!("{}/slow/image:1", slow.addr());
    let mut expect = Expect::new(&[Code::ResourceExhausted], &["deadline", "sandbox.pull_timeout_s"]);
    expect.at_least = Duration::from_secs(4);
    expect.at_most = Duration::from_secs(9);
    round(&d, json!({"behavior": "sleepy", "resolve": [slow_ref.clone(), slow_ref]}), &app(), &expect).await;
}

async fn status_list_and_remove_cannot_write(b: Backend) {
    let d = hostile_daemon(b, SANDBOX);
    // An image in the store for the hostile calls to aim at.
    d.swap(Some(&default_puller().unwrap()), "").unwrap();
    d.wait_for(None).await.unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    c.pull_image(pull_req(&app())).await.unwrap();
    for (export, call) in
        [("image-status", "ImageStatus"), ("list-images", "ListImages"), ("remove-image", "RemoveImage")]
    {
        let doc = json!({"behavior": "write-in-read", "export": export}).to_string();
        use_hostile(&d, &doc).await;
        let mut c = cri::connect(d.daemon.socket()).await.unwrap();
        let answer = match call {
            "ListImages" => c.list_images(ListImagesRequest::default()).await.map(|_| ()),
            "ImageStatus" => {
                c.image_status(ImageStatusRequest { image: spec(&app()), verbose: false }).await.map(|_| ())
            }
            _ => c.remove_image(RemoveImageRequest { image: spec(&app()) }).await.map(|_| ()),
        };
        let status = answer.expect_err(&format!("{call} with {doc} succeeded"));
        Expect::new(&[Code::FailedPrecondition], &["every write refused"]).check(&doc, &status, Duration::ZERO);
    }
    // The image is untouched: still READY under the default puller, its files intact.
    d.swap(Some(&default_puller().unwrap()), "").unwrap();
    d.wait_for(None).await.unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let status = c.image_status(ImageStatusRequest { image: spec(&app()), verbose: false }).await.unwrap().into_inner();
    assert_eq!(
        status.image.map(|i| i.id),
        Some(fixture().app.config_digest.clone()),
        "the image survived the hostile status, list and remove"
    );
    c.remove_image(RemoveImageRequest { image: spec(&app()) }).await.unwrap();
    d.assert_clean("write-in-read, then a real remove");
}

async fn another_requests_snapshot_is_no_capability(b: Backend) {
    // Request A prepares an active snapshot and stays in flight (a registry that answers after
    // 4 s); request B, of the same puller, names A's key to apply, commit and remove: refused.
    let f = fixture();
    let slow = SlowServer::start(Duration::from_millis(4000)).unwrap();
    let held = f.reference("team/held:1");
    let key = "pullbox-hostile/held-by-another-request";
    let doc = json!({
        "behavior": "bad-digests",
        "foreign_key": key,
        "overrides": {
            held.clone(): {"behavior": "hold-key", "foreign_key": key, "resolve": [format!("{}/slow/image:1", slow.addr())]},
        },
    })
    .to_string();
    let d = SwapDaemon::start(b, &hostile().unwrap(), &doc, SANDBOX).unwrap();
    let socket = d.daemon.socket().to_owned();
    let holder = tokio::spawn(async move {
        let mut c = cri::connect(&socket).await.unwrap();
        c.pull_image(pull_req(&held)).await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let status = c.pull_image(pull_req(&app())).await.expect_err("bad-digests succeeded");
    Expect::new(&[Code::FailedPrecondition], &["every probe refused", key]).check(&doc, &status, Duration::ZERO);
    assert!(
        status.message().contains(&format!("diff.apply(real layer, {key:?}) -> permission-denied")),
        "{}",
        status.message()
    );
    let held = holder.await.unwrap().expect_err("hold-key refuses its pull");
    assert_eq!(held.code(), Code::PermissionDenied, "the holder was not disturbed: {held:?}");
    still_serves(&d, &doc).await;
    d.assert_clean("both requests");
}

// ---- both backends -------------------------------------------------------------------------

/// Turns each test body `NAME(b: Backend)` into the tests `embedded::NAME` and
/// `containerd::NAME` (see the module docs). `async` bodies run on a multi-threaded tokio
/// runtime, `sync` ones on the test's thread.
macro_rules! on_both_backends {
    (async: [$($a:ident),* $(,)?], sync: [$($s:ident),* $(,)?] $(,)?) => {
        on_both_backends!(@backend embedded, Embedded, [$($a),*], [$($s),*]);
        on_both_backends!(@backend containerd, Containerd, [$($a),*], [$($s),*]);
    };
    (@backend $module:ident, $variant:ident, [$($a:ident),*], [$($s:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $a() {
                    super::$a(::pullbox_tests::backends::Backend::$variant).await
                }
            )*
            $(
                #[test]
                fn $s() {
                    super::$s(::pullbox_tests::backends::Backend::$variant)
                }
            )*
        }
    };
}

on_both_backends! {
    async: [
        limits_stop_the_guest_and_the_daemon_serves_on,
        limits_apply_to_every_export_not_only_pulls,
        a_pull_stopped_midway_leaves_nothing_behind,
        a_trap_does_not_disturb_a_pull_in_flight,
        garbage_digests_paths_and_foreign_snapshot_keys_are_refused,
        huge_arguments_fail_the_request_not_the_host,
        malformed_abi_arguments_trap_the_call_not_the_host,
        aliased_arguments_do_not_amplify_into_host_memory,
        a_flood_of_fetches_is_bounded,
        a_flood_of_log_messages_is_capped,
        calls_beyond_the_instance_pool_fail_fast,
        time_in_host_imports_does_not_count_against_the_cpu_limit,
        looping_pullers_do_not_starve_other_requests,
        a_reload_that_traps_or_loops_keeps_the_last_good_puller,
        loops_inside_host_imports_end_with_a_clear_error,
        a_pull_past_its_deadline_ends_and_leaves_nothing,
        status_list_and_remove_cannot_write,
        another_requests_snapshot_is_no_capability,
    ],
    sync: [
        the_daemon_does_not_start_with_a_configure_that_traps_or_loops,
        components_that_do_not_fit_are_refused_naming_what_is_wrong,
        cli_loop_in_pull,
        cli_loop_in_configure,
        cli_grow_memory,
        cli_recursion,
        cli_trap_in_configure,
        cli_trap_mid_pull,
        cli_bad_digests,
        cli_huge_argument_and_bad_abi,
        cli_sleepy_pull_succeeds_under_a_small_cpu_limit,
        cli_images_with_a_looping_list,
    ],
}
