//! The sandbox suite: traps and leases.

use super::*;

pub(super) async fn a_pull_stopped_midway_leaves_nothing_behind(b: Backend) {
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
pub(super) async fn a_trap_does_not_disturb_a_pull_in_flight(b: Backend) {
    let f = fixture();
    // Long enough that the trapping pull (a real partial pull, slower on containerd and on a
    // loaded machine) ends first.
    let slow = slow_server(Duration::from_millis(6000)).unwrap();
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
