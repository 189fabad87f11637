//! The sandbox suite: limits.

use super::*;

pub(super) async fn limits_stop_the_guest_and_the_daemon_serves_on(b: Backend) {
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

pub(super) async fn limits_apply_to_every_export_not_only_pulls(b: Backend) {
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
            let answer = read_call(&mut c, call).await;
            let status = answer.expect_err(&format!("{call} with {doc} succeeded"));
            expect.check(&format!("{call} with {doc}"), &status, t.elapsed());
            // The other exports of the same puller answer.
            let pulled = c.pull_image(pull_req(&app())).await.expect_err("hostile pulls refuse");
            assert_eq!(pulled.code(), Code::PermissionDenied, "{doc}: {pulled:?}");
        }
    }
    good_pull(&d, "misbehaving list, status and remove").await;
}
