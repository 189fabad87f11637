//! The sandbox suite: capabilities and budgets (WIT 0.2.0).

use super::*;

/// The `[sandbox]` of the budget tests: [`SANDBOX`] with a small import budget and creation
/// caps, so that a guest looping on an import is stopped within a second.
const BUDGET_SANDBOX: &str = "[sandbox]\nmemory_limit = 33554432\ncpu_limit_ms = 500\nstack_limit = 262144\n\
     import_budget = 100000\nmax_snapshots = 64\nmax_holds = 256\n";

pub(super) async fn loops_inside_host_imports_end_with_a_clear_error(b: Backend) {
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
        let answer = read_call(&mut c, call).await;
        let status = answer.expect_err(&format!("{call} with {doc} succeeded"));
        Expect::new(&[Code::ResourceExhausted], &["import budget"]).check(&doc, &status, t.elapsed());
        let pulled = c.pull_image(pull_req(&app())).await.expect_err("hostile pulls refuse");
        assert_eq!(pulled.code(), Code::PermissionDenied, "{doc}: the other exports answer: {pulled:?}");
    }
}

pub(super) async fn a_pull_past_its_deadline_ends_and_leaves_nothing(b: Backend) {
    // The guest waits in host imports (a registry that answers after 10 s, twice): no CPU
    // time, no budget to speak of; the 4 s deadline ends it (and leaves the good pull that
    // follows, a few seconds on containerd, time enough).
    let slow = slow_server(Duration::from_millis(10_000)).unwrap();
    let extra = format!("{SANDBOX}pull_timeout_s = 4\n");
    let d = hostile_daemon(b, &extra);
    let slow_ref = format!("{}/slow/image:1", slow.addr());
    let mut expect = Expect::new(&[Code::ResourceExhausted], &["deadline", "sandbox.pull_timeout_s"]);
    expect.at_least = Duration::from_secs(4);
    expect.at_most = Duration::from_secs(9);
    round(&d, json!({"behavior": "sleepy", "resolve": [slow_ref.clone(), slow_ref]}), &app(), &expect).await;
}

pub(super) async fn status_list_and_remove_cannot_write(b: Backend) {
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
        let answer = read_call(&mut c, call).await;
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

pub(super) async fn another_requests_snapshot_is_no_capability(b: Backend) {
    // Request A prepares an active snapshot and stays in flight (a registry that answers after
    // 4 s); request B, of the same puller, names A's key to apply, commit and remove: refused.
    let f = fixture();
    let slow = slow_server(Duration::from_millis(4000)).unwrap();
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
