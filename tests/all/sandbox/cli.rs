//! The sandbox suite: the CLI.

use super::*;

/// The CLI on a fresh store of `b`.
pub(super) fn pullbox(b: Backend) -> Pullbox {
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

pub(super) fn cli_loop_in_pull(b: Backend) {
    cli_case(b, json!({"behavior": "loop-in-pull"}), "CPU time limit");
}

pub(super) fn cli_loop_in_configure(b: Backend) {
    cli_case(b, json!({"behavior": "loop-in-configure"}), "CPU time limit");
}

pub(super) fn cli_grow_memory(b: Backend) {
    cli_case(b, json!({"behavior": "grow-memory"}), "memory limit");
}

pub(super) fn cli_recursion(b: Backend) {
    cli_case(b, json!({"behavior": "recursion"}), "stack");
}

pub(super) fn cli_trap_in_configure(b: Backend) {
    cli_case(b, json!({"behavior": "trap-in-configure"}), "unreachable");
}

pub(super) fn cli_trap_mid_pull(b: Backend) {
    cli_case(b, json!({"behavior": "trap-mid-pull"}), "unreachable");
    cli_case(b, json!({"behavior": "trap-mid-pull", "then": "loop"}), "CPU time limit");
}

pub(super) fn cli_bad_digests(b: Backend) {
    cli_case(b, json!({"behavior": "bad-digests"}), "every probe refused");
}

pub(super) fn cli_huge_argument_and_bad_abi(b: Backend) {
    cli_case_any(
        b,
        json!({"behavior": "huge-argument", "variant": "string", "bytes": 32 << 20}),
        &["longer than", "too much data"],
    );
    cli_case(b, json!({"behavior": "bad-abi", "variant": "oob-string"}), "puller failed");
}

pub(super) fn cli_sleepy_pull_succeeds_under_a_small_cpu_limit(b: Backend) {
    let pb = pullbox(b);
    let (out, took) = cli_hostile(&pb, "pull", &json!({"behavior": "sleepy", "reads": 5000}), &[&app()]);
    out.assert_success();
    eprintln!("sleepy, 5000 reads: {took:?}");
    assert_eq!(out.last_line(), Some(fixture().app.manifest_digest.as_str()));
}

pub(super) fn cli_images_with_a_looping_list(b: Backend) {
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
