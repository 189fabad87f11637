//! The sandbox suite: the host's imports under abuse.

use super::*;

pub(super) async fn garbage_digests_paths_and_foreign_snapshot_keys_are_refused(b: Backend) {
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

pub(super) async fn huge_arguments_fail_the_request_not_the_host(b: Backend) {
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
        // Too many items is a limit hit, whichever side counts them.
        &Expect::new(&[Code::ResourceExhausted], &[]).or_any(&["more than 1024", "too much data"]),
    )
    .await;
}

pub(super) async fn malformed_abi_arguments_trap_the_call_not_the_host(b: Backend) {
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
pub(super) async fn aliased_arguments_do_not_amplify_into_host_memory(b: Backend) {
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
pub(super) async fn a_flood_of_fetches_is_bounded(b: Backend) {
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
pub(super) async fn a_flood_of_log_messages_is_capped(b: Backend) {
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
pub(super) async fn calls_beyond_the_instance_pool_fail_fast(b: Backend) {
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
