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
//! end of this file (`mod.rs`) turns each listed function into two tests, `embedded::NAME` and
//! `containerd::NAME`. Run one backend with `cargo test --release -p pullbox-tests --test
//! all -- sandbox::embedded::` (or `sandbox::containerd::`).
//!
//! To add a test case:
//! 1. in the part of this folder that its topic belongs to (`limits.rs`, `cli.rs`, ...: the
//!    parts are named after the suite's sections), write `pub(super) async fn NAME(b: Backend)
//!    { ... }` (or `pub(super) fn NAME(b: Backend)` when it needs no async runtime), with no
//!    `#[test]` attribute;
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
    build_component, default_puller, hostile, peak_rss_kib, slow_server, wit_copy, SwapDaemon, WHOAMI,
};
use pullbox_tests::{cri, fixture, Captured, Pullbox};
use serde_json::json;
use tonic::Code;

mod capabilities;
mod cli;
mod imports_under_abuse;
mod limits;
mod load_time_checks;
mod reload;
mod time;
mod traps_and_leases;

use capabilities::*;
use cli::*;
use imports_under_abuse::*;
use limits::*;
use load_time_checks::*;
use reload::*;
use time::*;
use traps_and_leases::*;

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

/// Calls the CRI method that a read export serves (`ListImages`, `ImageStatus` of [`app`], or
/// `RemoveImage` of it for any other name), keeping only its status.
async fn read_call(
    c: &mut k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    call: &str,
) -> Result<(), tonic::Status> {
    match call {
        "ListImages" => c.list_images(ListImagesRequest::default()).await.map(|_| ()),
        "ImageStatus" => c.image_status(ImageStatusRequest { image: spec(&app()), verbose: false }).await.map(|_| ()),
        _ => c.remove_image(RemoveImageRequest { image: spec(&app()) }).await.map(|_| ()),
    }
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

// ---- both backends ------------------------------------------------------------------------------

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
